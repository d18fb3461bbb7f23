"""LoRA as a separate pytree: init, apply (inside the transformer), merge, save/load, PEFT export.

Tree layout mirrors the stacked layers: ``{"q": {"a": [L, in, r], "b": [L, r, out]}, ...}``;
``forward(..., lora=tree, lora_scale=alpha/r)`` adds ``scale * (x A) B``. B starts at
zero so a fresh adapter leaves the model unchanged. Per-role adapters are
``{"roles": {role: tree}}``. The base params never enter the optimizer.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax.model.config import ModelConfig
from diffmas_jax.model.transformer import LORA_TARGETS

HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class LoraConfigError(ValueError):
    """An adapter configuration that cannot be built."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = LORA_TARGETS
    dropout: float = 0.0
    per_role: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoraConfig":
        if int(self.rank) <= 0:
            raise LoraConfigError(f"LoRA rank must be positive, got {self.rank}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise LoraConfigError(f"unknown LoRA target(s) {bad or '(none given)'}; choose from {', '.join(LORA_TARGETS)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise LoraConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        return self


def _dims(cfg: ModelConfig, target: str) -> tuple[int, int]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {"q": (d, cfg.q_size), "k": (d, cfg.kv_size), "v": (d, cfg.kv_size), "o": (cfg.q_size, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}[target]


def init_lora(cfg: ModelConfig, lcfg: LoraConfig, key: jax.Array, roles: Sequence[str] = ()) -> dict:
    """A = kaiming-uniform (as PEFT), B = 0."""
    lcfg.validate()

    def one(k):
        tree = {}
        for t, kt in zip(lcfg.targets, jax.random.split(k, len(lcfg.targets))):
            din, dout = _dims(cfg, t)
            bound = 1.0 / np.sqrt(din)
            tree[t] = {"a": jax.random.uniform(kt, (cfg.num_layers, din, lcfg.rank), jnp.float32, -bound, bound),
                       "b": jnp.zeros((cfg.num_layers, lcfg.rank, dout), jnp.float32)}
        return tree

    if lcfg.per_role:
        if not roles:
            raise LoraConfigError("per_role adapters need the list of roles")
        return {"roles": {r: one(k) for r, k in zip(roles, jax.random.split(key, len(roles)))}}
    return one(key)


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
    """Base params with W + scale * A B folded in (for one shared adapter)."""
    if "roles" in lora:
        raise LoraConfigError("merging needs one shared adapter, not per-role adapters")
    layers = dict(params["layers"])
    for t, ab in lora.items():
        w = layers[t]["kernel"]
        delta = scale * jnp.einsum("lir,lro->lio", ab["a"], ab["b"])
        layers[t] = dict(layers[t], kernel=(w.astype(jnp.float32) + delta).astype(w.dtype))
    return dict(params, layers=layers)


# --------------------------------------------------------------------------- files
def save_tree(file, tree: dict) -> None:
    """A dict-of-arrays pytree as one safetensors file, keys joined with '/' (float32)."""
    from safetensors.numpy import save_file
    flat = {"/".join(k.key for k in p): np.asarray(v, np.float32)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    save_file(flat, str(file))


def save_adapter(path, lora: dict, lcfg: LoraConfig, extra: Optional[dict] = None) -> Path:
    """Our own format: adapter.json + adapter.safetensors (flattened tree)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tree(path / "adapter.safetensors", lora)
    meta = dict(dataclasses.asdict(lcfg), targets=list(lcfg.targets), **(extra or {}))
    (path / "adapter.json").write_text(json.dumps(meta, indent=2))
    return path


@dataclasses.dataclass
class Adapter:
    tree: dict
    config: LoraConfig
    meta: dict

    @property
    def scale(self) -> float:
        return self.config.scale


def load_adapter(path) -> Adapter:
    from safetensors.numpy import load_file
    path = Path(path)
    if not (path / "adapter.json").exists() or not (path / "adapter.safetensors").exists():
        raise FileNotFoundError(f"no adapter (adapter.json + adapter.safetensors) in {path}")
    meta = json.loads((path / "adapter.json").read_text())
    lcfg = LoraConfig(rank=meta["rank"], alpha=meta["alpha"], targets=tuple(meta["targets"]),
                      dropout=meta.get("dropout", 0.0), per_role=meta.get("per_role", False))
    tree: dict = {}
    for name, arr in load_file(str(path / "adapter.safetensors")).items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(arr)
    return Adapter(tree=tree, config=lcfg, meta=meta)


def export_peft(path, lora: dict, lcfg: LoraConfig, cfg: ModelConfig, base_model: str = "") -> Path:
    """A Hugging Face PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.numpy import save_file
    if "roles" in lora:
        raise LoraConfigError("PEFT export needs one shared adapter, not per-role adapters")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for t, ab in lora.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[t]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)   # [r, in]
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)   # [out, r]
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank, "lora_alpha": lcfg.alpha,
              "lora_dropout": lcfg.dropout, "bias": "none", "base_model_name_or_path": base_model,
              "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in lora), "fan_in_fan_out": False,
              "inference_mode": True, "use_rslora": False, "init_lora_weights": True}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def export_merged(path, params: dict, lora: dict, scale: float, cfg: ModelConfig, model_dir) -> Path:
    """A plain HF checkpoint with the adapter merged (config and tokenizer copied from model_dir)."""
    import shutil
    from safetensors.numpy import save_file
    from diffmas_jax.model.weights import params_to_hf
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    merged = merge_lora(params, lora, scale)
    tensors = {k: np.asarray(v, np.float32) for k, v in params_to_hf(cfg, merged).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(model_dir).iterdir():
        if f.suffix in (".json", ".jinja", ".txt", ".model") and f.name != "model.safetensors.index.json":
            shutil.copy(f, path / f.name)
    return path

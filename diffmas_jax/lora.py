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


def _adapter_config(meta, where: str) -> LoraConfig:
    """LoraConfig from adapter.json's fields, each checked for its type (one line naming the field)."""
    import math
    if not isinstance(meta, dict):
        raise LoraConfigError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("rank", "alpha", "targets") if k not in meta]
    if missing:
        raise LoraConfigError(f"{where}: missing field(s) {missing}")
    rank, alpha, targets = meta["rank"], meta["alpha"], meta["targets"]
    dropout, per_role = meta.get("dropout", 0.0), meta.get("per_role", False)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise LoraConfigError(f"{where}: 'rank' must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoraConfigError(f"{where}: 'alpha' must be a finite number, got {alpha!r}")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise LoraConfigError(f"{where}: 'targets' must be a list of names, got {targets!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LoraConfigError(f"{where}: 'dropout' must be a number in [0, 1), got {dropout!r}")
    if not isinstance(per_role, bool):
        raise LoraConfigError(f"{where}: 'per_role' must be true or false, got {per_role!r}")
    try:
        return LoraConfig(rank=rank, alpha=alpha, targets=tuple(targets), dropout=dropout,
                          per_role=per_role).validate()
    except LoraConfigError as e:
        raise LoraConfigError(f"{where}: {e}") from None


def _check_tree_layout(tree: dict, lcfg: LoraConfig, where: str) -> None:
    """The tensors match adapter.json: the listed targets, each an A [L, in, r] and B [L, r, out]."""
    if lcfg.per_role:
        if set(tree) != {"roles"} or not isinstance(tree["roles"], dict) or not tree["roles"]:
            raise LoraConfigError(f"{where}: adapter.json says per_role but the tensors are not "
                                  "'roles/ROLE/TARGET/a|b'")
        for role, sub in tree["roles"].items():
            _check_tree_layout(sub, dataclasses.replace(lcfg, per_role=False), f"{where} (role {role!r})")
        return
    if set(tree) != set(lcfg.targets):
        raise LoraConfigError(f"{where}: the tensors are for target(s) {sorted(tree)} but adapter.json lists "
                              f"{sorted(lcfg.targets)}")
    for t, ab in tree.items():
        if not isinstance(ab, dict) or set(ab) != {"a", "b"}:
            raise LoraConfigError(f"{where}: target {t!r} needs tensors '{t}/a' and '{t}/b'")
        a, b = ab["a"], ab["b"]
        if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != lcfg.rank \
                or b.shape[1] != lcfg.rank:
            raise LoraConfigError(f"{where}: target {t!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                                  f"not [layers, in, {lcfg.rank}] and [layers, {lcfg.rank}, out] (rank "
                                  f"{lcfg.rank} in adapter.json)")


def load_adapter(path) -> Adapter:
    """adapter.json + adapter.safetensors; fields and tensor layout checked (LoraConfigError)."""
    from safetensors.numpy import load_file
    path = Path(path)
    if not (path / "adapter.json").exists() or not (path / "adapter.safetensors").exists():
        raise FileNotFoundError(f"no adapter (adapter.json + adapter.safetensors) in {path}")
    meta = json.loads((path / "adapter.json").read_text())
    lcfg = _adapter_config(meta, str(path / "adapter.json"))
    tree: dict = {}
    for name, arr in load_file(str(path / "adapter.safetensors")).items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LoraConfigError(f"{path / 'adapter.safetensors'}: tensor names clash at {name!r}")
        node[leaf] = jnp.asarray(arr)
    _check_tree_layout(tree, lcfg, str(path / "adapter.safetensors"))
    return Adapter(tree=tree, config=lcfg, meta=meta)


def check_adapter_fits(tree: dict, cfg: ModelConfig, name: str = "adapter") -> None:
    """Every A/B of a (shared or per-role) LoRA tree has the shape the model needs, or one
    LoraConfigError naming the first mismatch (layers, input or output size)."""
    if "roles" in tree:
        for role, sub in tree["roles"].items():
            check_adapter_fits(sub, cfg, f"{name} (role {role!r})")
        return
    for t, ab in tree.items():
        if t not in LORA_TARGETS:
            raise LoraConfigError(f"{name}: unknown LoRA target {t!r}")
        din, dout = _dims(cfg, t)
        a, b = tuple(ab["a"].shape), tuple(ab["b"].shape)
        r = a[-1] if len(a) == 3 else None
        want_a, want_b = (cfg.num_layers, din, r), (cfg.num_layers, r, dout)
        if a != want_a or b != want_b:
            what = (f"{a[0]} layers, the model has {cfg.num_layers}" if len(a) == 3 and a[0] != cfg.num_layers
                    else "input/output sizes differ")
            raise LoraConfigError(f"{name} does not fit the model: target {t!r} has A {a} and B {b}, the model "
                                  f"needs {want_a} and {want_b} ({what})")


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


MERGED_DTYPE = "float32"


def export_merged(path, params: dict, lora: dict, scale: float, cfg: ModelConfig, model_dir,
                  max_shard_size: int | str = "5GB") -> Path:
    """A plain HF checkpoint with the adapter merged (config and tokenizer copied from model_dir).

    Each tensor is merged in float32 and written so, one shard at a time (HF's sharded layout
    and index past ``max_shard_size``): rounding W + scale * A B back to a bfloat16 base would
    drop every update smaller than half a bfloat16 step of W, most of a trained adapter. The
    copied config.json says float32 accordingly. Written into a temporary sibling folder that
    then replaces ``path``: a failed export leaves the previous one whole, never a mix."""
    import os
    import shutil
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.numpy import save_file
    from diffmas_jax.model.weights import hf_layout
    if "roles" in lora:
        raise LoraConfigError("merging needs one shared adapter, not per-role adapters")
    path = Path(path)
    flat = {".".join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    deltas = {f"layers.{t}.kernel": (ab["a"], ab["b"]) for t, ab in lora.items()}
    layout = {name: (p, i, tr) for name, p, i, tr in hf_layout(cfg, params)}

    def tensor(name):
        p, i, transpose = layout[name]
        w = np.asarray(flat[p] if i is None else flat[p][i], np.float32)
        if p in deltas:
            a, b = (np.asarray(x[i], np.float32) for x in deltas[p])
            w = w + np.float32(scale) * (a @ b)
        return np.ascontiguousarray(w.T if transpose else w)

    names = list(layout)

    def nbytes(name):
        p, i, _ = layout[name]
        return 4 * int(np.prod(flat[p].shape[0 if i is None else 1:]))

    # the splitter sees ints (it skips str values); each stands for the tensor of that name
    split = split_state_dict_into_shards_factory({n: k for k, n in enumerate(names)},
                                                 get_storage_size=lambda k: nbytes(names[k]),
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (path.with_name(f".{path.name}.{what}-{os.getpid()}") for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for filename, members in split.filename_to_tensors.items():
            save_file({n: tensor(n) for n in members}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in Path(model_dir).iterdir():
            if f.suffix in (".json", ".jinja", ".txt", ".model") and f.name != "model.safetensors.index.json":
                shutil.copy(f, tmp / f.name)
        hf_config = json.loads((tmp / "config.json").read_text())
        hf_config.update({k: MERGED_DTYPE for k in ("torch_dtype", "dtype") if k in hf_config} or
                         {"torch_dtype": MERGED_DTYPE})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path

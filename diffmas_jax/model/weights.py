"""Hugging Face checkpoints -> params pytree, via one declarative name map.

All four families share HF's ``model.layers.N.*`` naming; what differs (qkv
bias, q/k norm, an untied lm_head) is declared per entry as optional. Every
checkpoint tensor must be consumed and every parameter filled, or the load
fails naming what is missing or left over.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax.model.config import ModelConfig

# (HF name template, params path, transpose). "{i}" marks a per-layer tensor that is
# stacked on the leading layer axis.
HF_NAME_MAP: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed", False),
    ("model.norm.weight", "final_norm", False),
    ("lm_head.weight", "lm_head", True),
    ("model.layers.{i}.input_layernorm.weight", "layers.attn_norm", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.mlp_norm", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.q.kernel", True),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.k.kernel", True),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.v.kernel", True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.o.kernel", True),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.q.bias", False),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.k.bias", False),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.v.bias", False),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.q_norm", False),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.k_norm", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.gate.kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.up.kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.down.kernel", True),
)


class WeightLoadError(ValueError):
    """A checkpoint that does not match the model config."""


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_MAP = [(_template_regex(t), path, tr, "{i}" in t) for t, path, tr in HF_NAME_MAP]


def expected_param_paths(cfg: ModelConfig) -> dict[str, tuple]:
    from diffmas_jax.model.transformer import param_shapes, _is_leaf
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_leaf)[0]
    return {".".join(k.key for k in path): shape for path, (shape, _) in flat}


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors weights in {model_dir}")
    return files


# Stored dtypes numpy has no type for; safetensors reads them through JAX instead.
_NOT_NUMPY = frozenset({"BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4"})


def iter_safetensors(files):
    """(name, host array) for every tensor, read straight into numpy (513 MB of float32 in
    0.5 s against 1.2 s through JAX); bfloat16 and float8 go through ``framework="flax"``."""
    from safetensors import safe_open
    for fn in files:
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(safe_open(str(fn), framework="numpy"))
            via_jax = None
            for name in f.keys():
                if f.get_slice(name).get_dtype() not in _NOT_NUMPY:
                    yield name, f.get_tensor(name)
                    continue
                if via_jax is None:
                    via_jax = stack.enter_context(safe_open(str(fn), framework="flax"))
                yield name, np.asarray(via_jax.get_tensor(name))


def load_params(cfg: ModelConfig, tensors, dtype=jnp.float32,
                place: Optional[Callable[[str, np.ndarray], jax.Array]] = None) -> dict:
    """Build the params pytree from an iterable of (HF name, array).

    ``place(path, host_array)`` puts each finished tensor on devices (default:
    ``jnp.asarray``); a sharded load passes one that uses the path's sharding. A tensor is
    placed, and its host buffer freed, as soon as it is complete: an unstacked one when it
    is read, a layer-stacked one when its last layer is read. Checkpoints store layer after
    layer, so the host peak is about the stacked layers' share of the model.
    """
    dtype = jnp.dtype(dtype)
    expected = expected_param_paths(cfg)
    place = place or (lambda path, a: jnp.asarray(a))
    buffers: dict[str, np.ndarray] = {}
    placed: dict[str, jax.Array] = {}
    filled: dict[str, set] = {}
    leftover = []
    for name, arr in tensors:
        for rx, path, transpose, stacked in _MAP:
            m = rx.match(name)
            if m:
                break
        else:
            leftover.append(name)
            continue
        if path == "lm_head" and cfg.tie_embeddings:
            continue  # some tied checkpoints still store the (identical) head
        if path not in expected:
            leftover.append(name)
            continue
        shape = expected[path]
        arr = arr.T if transpose else arr
        if stacked:
            layer = int(m.group(1))
            if layer >= cfg.num_layers:
                leftover.append(name)
                continue
            if layer in filled.get(path, ()):
                raise WeightLoadError(f"{name}: layer {layer} of {path} appears twice in the checkpoint")
            buf = buffers.setdefault(path, np.empty(shape, dtype))
            if arr.shape != shape[1:]:
                raise WeightLoadError(f"{name}: shape {arr.shape} != expected {shape[1:]}")
            buf[layer] = arr  # cast on assignment: no temporary copy
            filled.setdefault(path, set()).add(layer)
            if len(filled[path]) == cfg.num_layers:
                placed[path] = place(path, buffers.pop(path))
        else:
            if arr.shape != shape:
                raise WeightLoadError(f"{name}: shape {arr.shape} != expected {shape}")
            placed[path] = place(path, arr.astype(dtype, copy=False))
            filled[path] = {-1}
    if leftover:
        raise WeightLoadError(f"checkpoint tensors not used by a {cfg.model_type} model: "
                              f"{', '.join(sorted(leftover)[:8])}{' ...' if len(leftover) > 8 else ''}")
    missing = [p for p in expected if p not in filled]
    partial = [p for p, s in filled.items() if p.startswith("layers.") and len(s) != cfg.num_layers]
    if missing or partial:
        raise WeightLoadError(f"parameters missing from the checkpoint: {', '.join(missing + partial)}")
    params: dict = {}
    for path, arr in placed.items():
        node = params
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return params


def hf_layout(cfg: ModelConfig, params: dict) -> list[tuple[str, str, Optional[int], bool]]:
    """(HF name, params path, layer index or None, transpose) of every tensor ``params`` holds."""
    paths = {".".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = []
    for template, path, transpose in HF_NAME_MAP:
        if path not in paths:
            continue
        if "{i}" in template:
            out += [(template.format(i=i), path, i, transpose) for i in range(cfg.num_layers)]
        else:
            out.append((template, path, None, transpose))
    return out


def params_to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Inverse map: params pytree -> HF-named float arrays."""
    flat = {".".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = {}
    for name, path, i, transpose in hf_layout(cfg, params):
        arr = np.asarray(flat[path] if i is None else flat[path][i])
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out

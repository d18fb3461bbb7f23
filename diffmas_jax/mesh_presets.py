"""Mesh presets for the machines the paper's models run on, and the paper models' shapes.

A preset names a machine (how many devices, how much memory each, how many hosts)
and the (data, fsdp, tensor) mesh we recommend on it. ``--config.mesh_preset=v5e-8``
picks one; ``--config.mesh=1,-1,4`` gives a mesh shape directly (it wins over the
preset's shape, the preset still supplies the device memory). Both are resolved at
startup by :func:`resolve_mesh_config`, which checks them against the devices that
are really there, so a wrong preset is one clear error before any weights load.

Why these shapes: the tensor axis (4) shards attention heads, MLP columns, the
vocabulary and the KV trace's kv heads (8 in every paper model, so 4 divides them);
the fsdp axis shards the remaining weight dimension and the batch. Parameters and
the trace are sharded over both axes, so per-device memory falls with the whole
slice; see :mod:`diffmas_jax.memory` for what each model needs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from diffmas_jax.cli import UserError

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    name: str
    platform: str            # "tpu" | "gpu"
    accelerator_type: str    # what `gcloud compute tpus tpu-vm create --accelerator-type` takes
    num_devices: int         # jax.device_count() on the whole slice
    num_hosts: int           # jax.process_count()
    memory_gib: float        # HBM per device
    mesh: tuple              # (data, fsdp, tensor)
    runtime_version: str = ""  # a TPU VM software version that fits the accelerator
    description: str = ""

    @property
    def devices_per_host(self) -> int:
        return self.num_devices // self.num_hosts

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)


# TPU naming: v4 and v5p slice names count TensorCores (2 per chip, one JAX device per
# chip), v5e (v5litepod) names count chips. HBM per chip: v4 32 GiB, v5e 16 GiB, v5p 95 GiB.
PRESETS: dict[str, MeshPreset] = {p.name: p for p in [
    MeshPreset("v4-8", "tpu", "v4-8", 4, 1, 32.0, (1, 2, 2), "tpu-ubuntu2204-base",
               "TPU v4-8: 4 chips x 32 GiB, one host"),
    MeshPreset("v5e-8", "tpu", "v5litepod-8", 8, 1, 16.0, (1, 2, 4), "v2-alpha-tpuv5-lite",
               "TPU v5e-8 (v5litepod-8): 8 chips x 16 GiB, one host"),
    MeshPreset("v5e-16", "tpu", "v5litepod-16", 16, 4, 16.0, (1, 4, 4), "v2-alpha-tpuv5-lite",
               "TPU v5e-16 (v5litepod-16): 16 chips x 16 GiB, 4 hosts"),
    MeshPreset("v5p-8", "tpu", "v5p-8", 4, 1, 95.0, (1, 2, 2), "v2-alpha-tpuv5",
               "TPU v5p-8: 4 chips x 95 GiB, one host"),
    MeshPreset("gpu-8", "gpu", "", 8, 1, 80.0, (1, 2, 4), "",
               "8 GPUs x 80 GiB (A100/H100 80GB) in one machine"),
    MeshPreset("gpu-1", "gpu", "", 1, 1, 80.0, (1, 1, 1), "",
               "one 80 GiB GPU (A100/H100 80GB)"),
]}


# The paper's models, as the fields of their Hugging Face config.json that size them,
# so memory estimates need no download (the weights still come from these Hub ids).
PAPER_MODELS: dict[str, dict] = {
    "Qwen/Qwen3-4B": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1000000.0),
    "Qwen/Qwen3-8B": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          tie_word_embeddings=False, max_position_embeddings=40960, rope_theta=1000000.0),
    "Qwen/Qwen3-14B": dict(model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=17408,
                           num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                           tie_word_embeddings=False, max_position_embeddings=40960, rope_theta=1000000.0),
    "mistralai/Ministral-8B-Instruct-2410": dict(
        model_type="mistral", vocab_size=131072, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=100000000.0, sliding_window=32768),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
        tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=1000000.0),
}


def paper_model_config(name: str):
    """ModelConfig of a paper model by Hub id (no download), or None for other names."""
    from diffmas_jax.model.config import ModelConfig
    hf = PAPER_MODELS.get(name)
    return None if hf is None else ModelConfig.from_hf_dict(dict(hf))


def get_preset(name: str) -> MeshPreset:
    if name not in PRESETS:
        raise UserError(f"unknown mesh_preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_mesh(value) -> Optional[tuple]:
    """'1,-1,4' / (1, -1, 4) -> (1, -1, 4); None / '' -> None. Checks the form only."""
    if value is None or value == "":
        return None
    parts = list(value) if isinstance(value, (list, tuple)) else str(value).replace("x", ",").split(",")
    try:
        shape = tuple(int(str(p).strip()) for p in parts if str(p).strip())
    except ValueError:
        raise UserError(f"mesh must be three integers data,fsdp,tensor (one may be -1), got {value!r}") from None
    if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise UserError(f"mesh must be three integers data,fsdp,tensor (positive, at most one -1), got {value!r}")
    return shape


def fill_mesh(shape: Sequence[int], num_devices: int) -> tuple:
    """Replace the -1 entry so the mesh uses ``num_devices``; UserError if it cannot."""
    shape = tuple(int(s) for s in shape)
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or num_devices % known:
        raise UserError(f"mesh {shape} does not divide the {num_devices} available devices")
    full = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(full) != num_devices:
        raise UserError(f"mesh {shape} uses {math.prod(full)} devices but {num_devices} are available")
    return full


@dataclasses.dataclass(frozen=True)
class MeshChoice:
    shape: tuple                    # (data, fsdp, tensor), -1 filled in
    preset: Optional[MeshPreset]
    source: str                     # "preset v5e-8", "mesh 1,-1,4", "default (one device)"


def resolve_mesh_config(config, num_devices: Optional[int] = None) -> MeshChoice:
    """The mesh a run asked for: ``mesh`` (a shape) wins, else ``mesh_preset``'s shape, else (1, 1, 1).

    ``config`` is a ConfigDict or a dict; missing fields count as unset. With a preset
    the device count must be the preset's (``num_devices`` defaults to jax.device_count()).
    """
    get = (lambda k: config.get(k)) if hasattr(config, "get") else (lambda k: getattr(config, k, None))
    preset = get_preset(get("mesh_preset")) if get("mesh_preset") else None
    shape = parse_mesh(get("mesh"))
    if shape is None and preset is None:
        return MeshChoice((1, 1, 1), None, "default (one device)")
    if num_devices is None:
        import jax
        num_devices = jax.device_count()
    if preset is not None and num_devices != preset.num_devices:
        raise UserError(f"mesh_preset {preset.name} is for {preset.num_devices} devices but "
                        f"{num_devices} are available; pick the preset of this machine or set --config.mesh")
    if shape is not None:
        return MeshChoice(fill_mesh(shape, num_devices), preset, f"mesh {','.join(map(str, shape))}")
    return MeshChoice(fill_mesh(preset.mesh, num_devices), preset, f"preset {preset.name}")


def make_config_mesh(choice: MeshChoice, devices=None):
    """A jax Mesh for a resolved choice (via diffmas_jax.sharding.make_mesh)."""
    from diffmas_jax.sharding import make_mesh
    return make_mesh(choice.shape, devices=devices)


def mesh_and_placer(config, model_name):
    """(mesh, place) for a run: the config's mesh and a ``load_model(place=...)`` callback
    that puts each weight straight into its shards. (None, None) when the config asks
    for no mesh (everything on the default device, as before)."""
    choice = resolve_mesh_config(config)
    if choice.preset is None and choice.source.startswith("default"):
        return None, None
    from diffmas_jax.sharding import param_placer
    mesh = make_config_mesh(choice)
    return mesh, param_placer(load_config_checked(model_name), mesh)


def load_config_checked(model_name):
    """The model's ModelConfig, read before the weights load (mesh, memory preflight): a
    damaged config.json is one UserError line worded as ``cli.load_model_checked`` words
    it, not a JSONDecodeError / KeyError traceback (DIFFMAS_TRACEBACK=1: the original)."""
    import os
    from diffmas_jax.cli import _diagnose_model, user_error_types
    from diffmas_jax.model.loading import load_config, resolve_model_dir
    try:
        return load_config(resolve_model_dir(model_name))
    except user_error_types():
        raise
    except Exception as e:
        msg = None if os.environ.get("DIFFMAS_TRACEBACK") else _diagnose_model(model_name, e)
        if msg is None:
            raise
        raise UserError(msg) from None

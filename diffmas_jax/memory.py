"""Per-device memory estimate: will this model, mesh, batch and trace fit?

The estimate adds up what one device holds at the peak of a training step or an
evaluation batch:

  params       base weights in the run's dtype, sharded by ``sharding.LOGICAL_RULES``
               (a dimension the mesh axis does not divide stays replicated, as there)
  lora         the adapter (float32, replicated), times the number of per-role copies
  optimizer    AdamW mu and nu (2 x LoRA), MultiSteps' accumulator when grad_accum > 1,
               and the gradient itself (training only)
  trace        the KV trace: 2 x layers x batch x slots x kv_heads x head_dim in the
               compute dtype, batch over data x fsdp and kv heads over tensor, plus slot
               metadata; in training also the gradient w.r.t. the trace (and with
               trace_grad=full the upstream stages' saved trace slices)
  activations  training: what the backward pass keeps per layer (all of it without
               remat, only each layer's input with remat plus one layer recomputed),
               one layer's attention scores (float32, not fused: this implementation
               materialises them, and recomputes them in the backward rather than keeping
               every layer's), and the target logits; evaluation: one layer of the
               largest prefill chunk and the last-position logits
  other        the realignment matrix (hidden x hidden, float32)

It is an estimate (XLA fuses some buffers and adds scratch of its own), meant to say
early and in one line that a run cannot fit, and which knob helps. Checked against
XLA's own ``compile().memory_analysis()`` of the train step (SmolLM2-135M, B=4, three
upstream agents with 128-token prompts and m=10, solver 192, CPU, 2026-12-03):
activations + trace are 1.00x XLA's temporary buffers with trace_grad stop (1.52 GB) and
0.83x with full (5.09 GB); with remat "dots" 1.11x (stop, 1.22 GB) and 0.92x (full, 4.00 GB). It is pure
Python: no device is touched, so it runs before any weights load.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
from typing import Optional, Sequence

from diffmas_jax.cli import UserError
from diffmas_jax.mesh_presets import GiB, MeshChoice, resolve_mesh_config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
WARN_FRACTION = 0.9   # above this share of the device the estimate warns: too close to call


def _bytes(dtype) -> int:
    name = getattr(dtype, "__name__", None) or getattr(getattr(dtype, "dtype", None), "name", None) or str(dtype)
    name = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(name), str(name))
    if name not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r} for the memory estimate; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _mesh_stub(shape: Sequence[int]):
    data, fsdp, tensor = (int(s) for s in shape)
    return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


def _div(n: int, k: int) -> int:
    """Share of a dimension of size n on one device when split k ways (replicated if k does not divide)."""
    return n // k if k > 1 and n % k == 0 else n


@dataclasses.dataclass
class MemoryEstimate:
    components: dict            # name -> bytes on the fullest device
    mesh: tuple
    mode: str
    notes: list = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(self.components.values()))

    def table(self, device_bytes: Optional[int] = None, title: str = "") -> str:
        head = f"memory estimate per device{(' for ' + title) if title else ''} ({self.mode}, mesh " \
               f"data x fsdp x tensor = {' x '.join(map(str, self.mesh))}):"
        rows = [f"  {k:<12}{v / GiB:9.2f} GiB" for k, v in self.components.items()]
        rows.append(f"  {'total':<12}{self.total / GiB:9.2f} GiB" +
                    (f"  of {device_bytes / GiB:.1f} GiB on the device" if device_bytes else
                     "  (device memory unknown: set --config.device_memory_gib to check)"))
        return "\n".join([head] + rows + [f"  note: {n}" for n in self.notes])


def param_bytes(cfg, mesh_shape: Sequence[int], dtype="float32") -> int:
    """Bytes of the base parameters on the fullest device under ``sharding.LOGICAL_RULES``."""
    from diffmas_jax.model.transformer import _is_leaf, param_shapes
    from diffmas_jax.sharding import head_units, spec_for
    import jax
    stub, size, units = _mesh_stub(mesh_shape), _bytes(dtype), head_units(cfg)
    total = 0
    for shape, axes in jax.tree.leaves(param_shapes(cfg), is_leaf=_is_leaf):
        spec = spec_for(axes, shape, stub, units=units)
        split = 1
        for entry in spec:
            for name in ((entry,) if isinstance(entry, str) else (entry or ())):
                split *= stub.shape[name]
        total += math.prod(shape) * size // split
    return int(total)


def lora_param_count(cfg, rank: int, targets: Sequence[str] = ("q", "k", "v", "o", "gate", "up", "down")) -> int:
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    dims = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    return int(sum(cfg.num_layers * rank * (dims[t][0] + dims[t][1]) for t in targets))


def _trace_bytes(cfg, mesh, batch: int, slots: int, dtype_bytes: int) -> int:
    b = _div(batch, mesh.shape["data"] * mesh.shape["fsdp"])
    kvh = _div(cfg.num_kv_heads, mesh.shape["tensor"])
    kv = 2 * cfg.num_layers * b * slots * kvh * cfg.head_dim * dtype_bytes
    meta = b * slots * (1 + 4 + 4 + 4)  # valid, segment, kind, pos
    return int(kv + meta)


def _layer_act(cfg, mesh, batch: int, t: int, s: int, a: int) -> tuple[int, int, int]:
    """(bytes one layer keeps for backward, the part of it remat "dots" keeps (the
    projections' outputs), bytes of its attention scores) for a chunk of t tokens
    attending to s keys, on one device."""
    tp = mesh.shape["tensor"]
    b = _div(batch, mesh.shape["data"] * mesh.shape["fsdp"])
    d = cfg.hidden_size
    # q / k / v split over tensor in whole heads only (sharding.head_units)
    heads, kvh = _div(cfg.num_heads, tp), _div(cfg.num_kv_heads, tp)
    q, kv, f = heads * cfg.head_dim, kvh * cfg.head_dim, _div(cfg.intermediate_size, tp)
    dense = b * t * (6 * d + 4 * q + 4 * kv + 4 * f) * a
    # q, k, v, o, gate, up and down outputs, twice: the base projection and its LoRA product
    dots = 2 * b * t * (2 * d + q + 2 * kv + 2 * f) * a
    scores = b * heads * t * s * (4 + a)        # float32 scores and the probabilities in the compute dtype
    return int(dense), int(dots), int(scores)


def estimate_train(cfg, mesh_shape: Sequence[int], *, batch: int, solver_length: int,
                   upstream_lengths: Sequence[int] = (), latent_steps: Sequence[int] = (),
                   max_target: Optional[int] = None, capacity: Optional[int] = None,
                   dtype="float32", lora_rank: int = 8, lora_targets=("q", "k", "v", "o", "gate", "up", "down"),
                   lora_copies: int = 1, grad_accum: int = 1, remat: bool = False,
                   trace_grad: str = "stop") -> MemoryEstimate:
    """Peak per-device bytes of one DiffMAS training step (see the module docstring)."""
    mesh = _mesh_stub(mesh_shape)
    a = _bytes(dtype)
    upstream_lengths, latent_steps = tuple(upstream_lengths), tuple(latent_steps)
    slots = capacity or (sum(upstream_lengths) + sum(latent_steps) + solver_length)
    n_lora = lora_param_count(cfg, lora_rank, lora_targets) * max(1, lora_copies)
    c = {"params": param_bytes(cfg, mesh_shape, dtype), "lora": 4 * n_lora,
         "optimizer": 4 * n_lora * (2 + (1 if grad_accum > 1 else 0) + 1)}
    trace = _trace_bytes(cfg, mesh, batch, slots, a)
    c["trace"] = trace * 2  # the trace and its gradient (value_and_grad w.r.t. k and v)
    L = cfg.num_layers

    def chunk(t, s):
        dense, dots, scores = _layer_act(cfg, mesh, batch, t, s, a)
        if remat == "dots":  # the projections' outputs are kept; the rest is recomputed one layer at a time
            return L * dots + dense + scores
        if remat:  # each layer's input is kept; one layer is recomputed at a time
            b = _div(batch, mesh.shape["data"] * mesh.shape["fsdp"])
            return L * b * t * cfg.hidden_size * a + dense + scores
        return L * dense + scores  # scores are recomputed in the backward, one layer at a time

    act = chunk(solver_length, slots)
    if trace_grad == "full":
        filled = 0
        for tj, mj in zip(upstream_lengths, latent_steps + (0,) * len(upstream_lengths)):
            act += chunk(tj, filled + tj)
            filled += tj
            act += mj * chunk(1, filled + mj)  # latent steps: one token each, under lax.scan
            filled += mj
            c["trace"] += _trace_bytes(cfg, mesh, batch, filled, a)  # the stage's saved trace slice
    k = max_target or solver_length
    b = _div(batch, mesh.shape["data"] * mesh.shape["fsdp"])
    act += 2 * b * k * _div(cfg.vocab_size, mesh.shape["tensor"]) * 4  # target logits and their softmax
    c["activations"] = int(act)
    c["other"] = cfg.hidden_size ** 2 * 4
    notes = []
    if not remat:
        notes.append("remat off: every layer's activations are kept for backward (--config.remat=True saves most)")
    return MemoryEstimate(c, tuple(mesh_shape), "train", notes)


def estimate_eval(cfg, mesh_shape: Sequence[int], *, batch: int, prompt_tokens: int, num_agents: int,
                  latent_steps: int, max_new_tokens: int, text_tokens: int = 0, dtype="float32",
                  lora_params: int = 0) -> MemoryEstimate:
    """Peak per-device bytes of one evaluation batch.

    ``prompt_tokens``: padded prompt length per agent; ``latent_steps``: total over the
    upstream agents; ``text_tokens``: TextMAS notes each agent reads (0 otherwise); ``lora_params``: adapter size.
    """
    mesh = _mesh_stub(mesh_shape)
    a = _bytes(dtype)
    slots = num_agents * (prompt_tokens + text_tokens) + latent_steps + max_new_tokens
    c = {"params": param_bytes(cfg, mesh_shape, dtype), "lora": 4 * int(lora_params), "optimizer": 0,
         "trace": _trace_bytes(cfg, mesh, batch, slots, a)}
    chunk = prompt_tokens + text_tokens
    # The solver's prefill attends to what the upstream agents filled plus its own chunk;
    # a decode step (one token) attends to every slot.
    filled = (num_agents - 1) * chunk + latent_steps + chunk
    dense, _, scores = _layer_act(cfg, mesh, batch, chunk, filled, a)
    scores = max(scores, _layer_act(cfg, mesh, batch, 1, slots, a)[2])
    b = _div(batch, mesh.shape["data"] * mesh.shape["fsdp"])
    logits = 3 * b * cfg.vocab_size * 4  # last-position logits, log-softmax, sampling sort
    c["activations"] = int(dense + scores + logits)
    c["other"] = cfg.hidden_size ** 2 * 4
    return MemoryEstimate(c, tuple(mesh_shape), "eval", [])


# ---------------------------------------------------------------- device memory
def device_memory_bytes(override_gib=None, preset=None) -> tuple[Optional[int], str]:
    """(bytes per device, where the number came from): the config override, else the
    device's own ``memory_stats()['bytes_limit']``, else the preset's figure, else None."""
    if override_gib not in (None, "", 0):
        try:
            value = float(override_gib)
        except (TypeError, ValueError):
            raise UserError(f"device_memory_gib must be a number of GiB, got {override_gib!r}") from None
        if not (math.isfinite(value) and value > 0):  # int(nan * GiB) would raise, inf would pass anything
            raise UserError(f"device_memory_gib must be a positive finite number of GiB, got {override_gib!r}")
        return int(value * GiB), "config device_memory_gib"
    try:
        import jax
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # no stats on this backend (CPU) or no backend at all
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "device memory_stats"
    if preset is not None:
        return preset.memory_bytes, f"preset {preset.name}"
    return None, "unknown"


def check_fits(est: MemoryEstimate, device_bytes: Optional[int], model_name: str) -> Optional[str]:
    """Raise UserError when ``est`` cannot fit; return a warning line when it is tight."""
    if not device_bytes:
        return None
    need, have = est.total / GiB, device_bytes / GiB
    if est.total > device_bytes:
        hints = []
        if est.components.get("params", 0) > 0.5 * device_bytes or est.mesh[1] * est.mesh[2] == 1:
            hints.append("use a larger fsdp or tensor axis (--config.mesh or a bigger --config.mesh_preset)")
        if est.mode == "train" and any("remat off" in n for n in est.notes):
            hints.append("turn on --config.remat=True")
        if est.components.get("trace", 0) + est.components.get("activations", 0) > 0.25 * est.total:
            hints.append("use a smaller batch_size" + (" or shorter max_new_tokens" if est.mode == "eval"
                                                        else " or shorter max_target_tokens"))
        big = max(est.components, key=est.components.get)
        raise UserError(f"model {model_name} needs ~{need:.1f} GiB per device (mostly {big}: "
                        f"{est.components[big] / GiB:.1f} GiB) on mesh {'x'.join(map(str, est.mesh))}, "
                        f"device has {have:.1f} GiB; {'; '.join(hints) or 'use more devices'}")
    if est.total > WARN_FRACTION * device_bytes:
        return (f"warning: the estimate ({need:.1f} GiB) is within {100 * (1 - WARN_FRACTION):.0f}% of the "
                f"device's {have:.1f} GiB; the run may run out of memory")
    return None


def _say(text: str) -> None:
    from diffmas_jax import distributed
    if distributed.is_main_process():
        print(text, file=sys.stderr, flush=True)


def _get(config, key, default=None):
    try:
        v = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    except Exception:
        v = default
    return default if v is None else v


def report(est: MemoryEstimate, config, model_name: str, choice: Optional[MeshChoice] = None) -> MemoryEstimate:
    """Print the estimate (process 0) and raise UserError if it cannot fit the device."""
    preset = choice.preset if choice is not None else None
    device, source = device_memory_bytes(_get(config, "device_memory_gib"), preset)
    _say(est.table(device, model_name) + (f"\n  device memory from {source}" if device else ""))
    warning = check_fits(est, device, model_name)
    if warning:
        _say(warning)
    return est


def model_config_for(name: str):
    """ModelConfig for a model name without loading weights: the paper models are known,
    local dirs / the embedded model / Hub ids are read (Hub: config.json only)."""
    from diffmas_jax.mesh_presets import load_config_checked, paper_model_config
    known = paper_model_config(name)
    if known is not None:
        return known
    from pathlib import Path
    p = Path(str(name)).expanduser()
    if name in (None, "", "embedded") or p.exists():
        return load_config_checked(name)  # a damaged config.json: one error line
    try:
        from huggingface_hub import hf_hub_download
        from diffmas_jax.model.config import ModelConfig
        return ModelConfig.from_json(hf_hub_download(str(name), "config.json"))
    except Exception:
        return None  # load_model will report the real problem


def preflight_model(config, model_name: str, dtype: str) -> Optional[MemoryEstimate]:
    """Before loading weights: do the parameters alone fit? (UserError if not.)"""
    choice = resolve_mesh_config(config)
    device, _ = device_memory_bytes(_get(config, "device_memory_gib"), choice.preset)
    if not device:
        return None
    cfg = model_config_for(model_name)
    if cfg is None:
        return None
    est = MemoryEstimate({"params": param_bytes(cfg, choice.shape, dtype)}, choice.shape, "weights")
    check_fits(est, device, model_name)
    return est


def preflight_train(cfg, config, sc, lcfg, model_name: Optional[str] = None) -> MemoryEstimate:
    """Before compiling the train step: print the estimate, UserError if it cannot fit."""
    choice = resolve_mesh_config(config)
    est = estimate_train(
        cfg, choice.shape, batch=int(config.batch_size), solver_length=int(sc.solver_length),
        upstream_lengths=tuple(sc.up_lengths), latent_steps=tuple(sc.latent_steps), max_target=sc.max_target,
        capacity=int(sc.capacity), dtype=sc.compute_dtype, lora_rank=int(lcfg.rank), lora_targets=lcfg.targets,
        lora_copies=len(sc.roles) if lcfg.per_role else 1, grad_accum=int(_get(config, "grad_accum", 1)),
        remat=sc.remat, trace_grad=sc.trace_grad)
    return report(est, config, model_name or str(_get(config, "model", "model")), choice)


def preflight_eval(model, cfg: dict, mc, items, adapter=None) -> Optional[MemoryEstimate]:
    """Before the first evaluation batch: print the estimate, UserError if it cannot fit.

    Prompt length: the longest of the first 64 questions in tokens plus 256 for the role
    prompt and chat template, rounded up to ``prompt_bucket``."""
    choice = resolve_mesh_config(cfg)
    if not hasattr(model, "cfg") or not hasattr(model, "tokenizer"):
        return None  # a composite system (c2c) sizes itself differently; no estimate
    qs = [it.question for it in items[:64]]
    longest = max((len(model.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in qs), default=0) \
        if model.tokenizer is not None else 0
    bucket = int(cfg.get("prompt_bucket") or 32)
    prompt = -(-(longest + 256) // bucket) * bucket
    agents = mc.agents()
    upstream = agents[:-1] if mc.method != "single" else ()
    text = int(cfg.get("text_max_new_tokens") or 0) * len(upstream) if mc.method == "text_mas" else 0
    n_lora = 0
    if adapter is not None:
        import jax
        n_lora = sum(math.prod(x.shape) for x in jax.tree.leaves(getattr(adapter, "tree", adapter)))
    est = estimate_eval(model.cfg, choice.shape, batch=int(cfg["batch_size"]), prompt_tokens=prompt,
                        num_agents=len(agents) if mc.method != "single" else 1,
                        latent_steps=sum(a.latent_steps for a in upstream) if mc.method != "text_mas" else 0,
                        max_new_tokens=int(cfg["max_new_tokens"]), text_tokens=text, dtype=cfg["dtype"],
                        lora_params=n_lora)
    return report(est, cfg, str(cfg.get("model")), choice)

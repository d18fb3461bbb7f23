"""A pure-functional decoder-only transformer over a params pytree.

Covers llama, qwen2, qwen3 and mistral: RMSNorm, rope (HF split-half layout,
so no q/k permutation), grouped-query attention, optional qkv bias and q/k
norm, SwiGLU MLP. Layers are stacked on a leading axis and run under
``lax.scan`` so compile time does not grow with depth. Inside the scan the KV
trace is only read: attention sees it with a mask built from slot validity,
causality, visibility and the sliding window, and each layer emits the chunk's
keys and values, written into the trace once after the scan with one
``dynamic_update_slice`` (in place under jit). Per-layer params (``per_layer``)
run the layers in a Python loop instead (decode loops on a CPU).

LoRA is a separate pytree: ``forward(..., lora=tree, lora_scale=alpha/r)``
adds ``scale * (x A) B`` to the targeted projections without touching params.
``dropout=LoraDropout(rate, key)`` drops the LoRA branch's input as PEFT does
(training only; the base path never sees dropout).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffmas_jax.model.config import ModelConfig, rope_inv_freq
from diffmas_jax.sharding import constrain_trace, mesh_jit
from diffmas_jax.trace import PROMPT, KVTrace
from diffmas_jax.xla_cpu import prompt_dot_options

Params = dict[str, Any]
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
_NEG = -1e30  # finite: a fully masked (padding) query row yields garbage, never NaN

# What a rematerialised layer keeps for the backward pass. "dots" keeps the outputs of the
# weight matmuls and recomputes only norms, rope, attention and activations: most of full
# remat's memory saving at a fraction of its recompute (the matmuls are the costly part).
REMAT_POLICIES = {True: None, "full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name) -> Any:
    if not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# --------------------------------------------------------------------------- shapes
def param_shapes(cfg: ModelConfig) -> dict:
    """Shape and logical axis names of every parameter (the one place they are defined)."""
    d, f, L, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.head_dim
    q, kv = cfg.q_size, cfg.kv_size
    layers = {
        "attn_norm": ((L, d), ("layers", "norm")),
        "q": {"kernel": ((L, d, q), ("layers", "embed", "q_heads"))},
        "k": {"kernel": ((L, d, kv), ("layers", "embed", "kv_heads"))},
        "v": {"kernel": ((L, d, kv), ("layers", "embed", "kv_heads"))},
        "o": {"kernel": ((L, q, d), ("layers", "q_heads", "embed"))},
        "mlp_norm": ((L, d), ("layers", "norm")),
        "gate": {"kernel": ((L, d, f), ("layers", "embed", "mlp"))},
        "up": {"kernel": ((L, d, f), ("layers", "embed", "mlp"))},
        "down": {"kernel": ((L, f, d), ("layers", "mlp", "embed"))},
    }
    if cfg.qkv_bias:
        layers["q"]["bias"] = ((L, q), ("layers", "q_heads"))
        layers["k"]["bias"] = ((L, kv), ("layers", "kv_heads"))
        layers["v"]["bias"] = ((L, kv), ("layers", "kv_heads"))
    if cfg.qk_norm:
        layers["q_norm"] = ((L, hd), ("layers", "norm"))
        layers["k_norm"] = ((L, hd), ("layers", "norm"))
    tree = {"embed": ((cfg.vocab_size, d), ("vocab", "embed")), "layers": layers,
            "final_norm": ((d,), ("norm",))}
    if not cfg.tie_embeddings:
        tree["lm_head"] = ((d, cfg.vocab_size), ("embed", "vocab"))
    return tree


def _is_leaf(x):
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def param_axes(cfg: ModelConfig) -> dict:
    """Pytree of logical axis-name tuples, matching the params tree."""
    return jax.tree.map(lambda s: s[1], param_shapes(cfg), is_leaf=_is_leaf)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (for tests and shape-only benchmarks)."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_leaf)
    keys = jax.random.split(key, len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_leaf)[0]]
    out = []
    for k, (shape, _), path in zip(keys, leaves, paths):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        elif "bias" in path:
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------- pieces
def rms_norm(x, weight, eps):
    # Statistics in float32 like HF, then scale in the input dtype.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_tables(cfg: ModelConfig, positions, dtype):
    inv_freq, scale = rope_inv_freq(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)          # [B, T, hd]
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x, cos, sin):
    # x: [B, T, heads, hd]; HF "rotate_half" convention.
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@partial(jax.tree_util.register_dataclass, data_fields=["key"], meta_fields=["rate"])
@dataclasses.dataclass(frozen=True)
class LoraDropout:
    """Dropout on the LoRA input (PEFT's ``lora_dropout``): a static rate and a PRNG key.

    Every call site derives its own key with :meth:`fold` so that each layer, target,
    agent stage and latent step draws an independent mask, and a training step's masks
    are a function of (seed, step) alone: resuming replays them exactly."""
    rate: float
    key: jax.Array

    def fold(self, *data) -> "LoraDropout":
        key = self.key
        for d in data:
            key = jax.random.fold_in(key, d)
        return LoraDropout(self.rate, key)


def lora_delta(x, lora, lora_scale=1.0, dropout: Optional[LoraDropout] = None):
    """The LoRA branch ``scale * (x A) B`` of one projection (``x`` dropped out first)."""
    if dropout is not None and dropout.rate > 0:
        keep = jax.random.bernoulli(dropout.key, 1.0 - dropout.rate, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout.rate), 0).astype(x.dtype)
    # Rank-2 matmuls over flattened tokens: B's gradient then contracts the token rows in
    # place. Over [B, T, r] XLA:CPU first transposes the [B*T, out] cotangent (in the B=4
    # train step 0.9 s of 10 s, for gate and up alone).
    x2 = x.reshape(-1, x.shape[-1])
    y = (x2 @ lora["a"].astype(x.dtype)) @ lora["b"].astype(x.dtype)
    return lora_scale * y.reshape(*x.shape[:-1], y.shape[-1])


def dense(x, p, lora=None, lora_scale=1.0, dropout: Optional[LoraDropout] = None):
    if "kernel_t" in p:  # laid out [out, in] by ``per_layer`` for few-row decode steps
        y = matmul_out_in(x, p["kernel_t"].astype(x.dtype))
    else:
        y = x @ p["kernel"].astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    if lora is not None:
        y = y + lora_delta(x, lora, lora_scale, dropout)
    return y


def matmul_out_in(x, kernel_t):
    """``x [..., in] @ kernel_t.T`` for a kernel laid out [out, in], computed as the [out, ...]
    product and then transposed.

    With few rows XLA:CPU streams an [out, in] weight faster as the product's left operand
    (embedded model's layer shapes, 30 products each: at 8 rows 10-35% less time with
    YNNPACK, at one row 0-27% with XLA's emitter; docs/performance.md). The barrier keeps
    XLA's simplifier from folding the transpose back into the slow ``x @ kernel_t.T``."""
    y_t = jax.lax.dot_general(kernel_t, x, (((1,), (x.ndim - 1,)), ((), ())))
    return jnp.moveaxis(jax.lax.optimization_barrier(y_t), 0, -1)


# Projections that read the same input, and the name of their concatenated kernel in a
# per-layer dict made by ``fuse_projections``.
FUSED_PROJECTIONS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def fuse_projections(layer: Params) -> Params:
    """One layer's params with the q/k/v and gate/up kernels (and biases) concatenated along
    their output axis, for the per-layer decode loop.

    In a one-token step q/k/v wait on the same norm and gate/up on the same input, so one
    wider GEMM beats two or three narrow ones (embedded model, decode step medians: B=1
    28.6 -> 26.2 ms, B=8 59.1 -> 55.9 ms). LoRA stays per target (``forward`` adds each
    target's branch to its slice of the fused output)."""
    layer = dict(layer)
    for fused, names in FUSED_PROJECTIONS.items():
        if fused in layer or not all(n in layer for n in names):
            continue
        parts = [layer.pop(n) for n in names]
        layer[fused] = {key: jnp.concatenate([part[key] for part in parts], axis=-1) for key in parts[0]}
    return layer


@dataclasses.dataclass(frozen=True)
class Visibility:
    """Which earlier slots a chunk may attend to: a table over (writer segment, slot kind).

    Evaluated against the trace's metadata at every call, so slots a stage writes
    itself (latent steps, decoded tokens) follow the same rule. Combine with ``|``.
    """
    table: jax.Array   # [MAX_SEGMENTS, 4] bool, kinds indexed EMPTY/PROMPT/LATENT/TEXT

    def slot_mask(self, trace: KVTrace):
        seg = jnp.clip(trace.segment, 0, self.table.shape[0] - 1)
        return self.table[seg, trace.kind.astype(jnp.int32)] & (trace.segment >= 0)

    def __or__(self, other: "Visibility") -> "Visibility":
        return Visibility(self.table | other.table)


jax.tree_util.register_dataclass(Visibility, data_fields=["table"], meta_fields=[])
MAX_SEGMENTS = 16


def make_visibility(segments=None, kinds=None) -> Visibility:
    """Slots written by the given segment ids (None: any) of the given kinds (None: any)."""
    if segments is not None and any(not 0 <= s < MAX_SEGMENTS for s in segments):
        raise ValueError(f"segment ids must be in [0, {MAX_SEGMENTS}), got {list(segments)}")
    seg = np.ones(MAX_SEGMENTS, bool) if segments is None else np.isin(np.arange(MAX_SEGMENTS), list(segments))
    kd = np.ones(4, bool) if kinds is None else np.isin(np.arange(4), list(kinds))
    return Visibility(jnp.asarray(seg[:, None] & kd[None, :]))


@dataclasses.dataclass(frozen=True)
class ForwardOut:
    logits: Optional[jax.Array]   # [B, T, vocab] float32, or None
    hidden: jax.Array             # [B, T, D] final-normed hidden states
    trace: KVTrace


jax.tree_util.register_dataclass(ForwardOut, data_fields=["logits", "hidden", "trace"], meta_fields=[])


def default_positions(trace: KVTrace, valid):
    """Real tokens get consecutive positions continuing the row; pads repeat the last."""
    return trace.next_pos[:, None] + jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


# --------------------------------------------------------------------------- forward
def forward(params: Params, cfg: ModelConfig, trace: KVTrace, *,
            tokens=None, embeds=None, valid=None, positions=None,
            segment=0, kind=PROMPT, visible: Optional["Visibility"] = None, offset=None,
            prefix: Optional[KVTrace] = None, lora: Optional[Params] = None, lora_scale: float = 1.0,
            compute_dtype=jnp.float32, return_logits: bool = True,
            remat: bool = False, dropout: Optional[LoraDropout] = None) -> ForwardOut:
    """Run new tokens (or input embeddings) on top of ``trace``.

    tokens [B, T] int or embeds [B, T, D]; valid [B, T] marks real tokens (pads
    are computed but never become visible slots). ``visible`` (a Visibility)
    hides earlier slots by segment and kind (stitched, overwrite or latent-only
    communication); the chunk always sees its own tokens causally.
    With ``offset=None`` the chunk is appended at ``trace.length`` (static, so
    overflow raises before compute); a traced ``offset`` writes into slots
    already reserved with ``trace.reserve`` (decode loops).
    ``prefix`` holds read-only slots that come before all of ``trace``'s: the chunk attends
    to [prefix | trace | chunk] and writes into ``trace`` only (``think`` carries just its
    latent slots through its scan this way).
    With per-layer ``params`` (see ``per_layer``) the layers run in a Python loop and
    the returned trace holds per-layer K/V (``trace.stacked()`` restores the stacks).
    """
    compute_dtype = resolve_dtype(compute_dtype)
    if (tokens is None) == (embeds is None):
        raise ValueError("pass exactly one of tokens or embeds")
    if tokens is not None:
        x = params["embed"][tokens].astype(compute_dtype)
    else:
        x = embeds.astype(compute_dtype)
    b, t = x.shape[:2]
    if b != trace.batch:
        raise ValueError(f"batch {b} does not match the trace's batch {trace.batch}")
    valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    if positions is None:
        positions = default_positions(trace, valid)
    if offset is None:
        trace.check_room(t, f"a chunk of {t} tokens")
        offset = trace.length
    old = trace.length  # slots [0, old) already exist (reserved ones are still invalid)
    next_pos = jnp.maximum(trace.next_pos, jnp.max(jnp.where(valid, positions + 1, 0), axis=1))

    # Keys are [existing slots | this chunk]. Existing slots: real and visible (and in the
    # sliding window); the chunk: causal among its own real tokens. The cache is only read
    # inside the layer scan; the chunk's K/V are written once after it (in place under jit).
    if prefix is not None and prefix.batch != b:
        raise ValueError(f"batch {b} does not match the prefix's batch {prefix.batch}")
    caches = ([] if prefix is None else [(prefix, prefix.length)]) + [(trace, old)]

    def visible_slots(tr, n):
        m = tr.valid[:, :n]
        if visible is not None:
            m = m & visible.slot_mask(tr)[:, :n]
        m = jnp.broadcast_to(m[:, None, :], (b, t, n))
        if cfg.sliding_window is not None:
            m = m & ((positions[:, :, None] - tr.pos[:, None, :n]) < cfg.sliding_window)
        return m

    new_mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    if cfg.sliding_window is not None:
        new_mask = new_mask & ((positions[:, :, None] - positions[:, None, :]) < cfg.sliding_window)
    mask = jnp.concatenate([visible_slots(tr, n) for tr, n in caches] + [new_mask], axis=-1)

    cos, sin = rope_tables(cfg, positions, compute_dtype)
    lora_layers = lora if lora is not None else {}

    use_dropout = dropout is not None and dropout.rate > 0 and lora is not None

    def block(h, p, lo, idx, attend):
        """One decoder layer; ``attend(q, k, v)`` -> (attention output, what the layer emits)."""
        def drop(name):
            return dropout.fold(idx, LORA_TARGETS.index(name)) if use_dropout else None

        def proj(x, name):
            return dense(x, p[name], lo.get(name), lora_scale, drop(name))

        def projs(x, fused, sizes):
            """The projections ``FUSED_PROJECTIONS[fused]`` of one input, from a fused kernel if any."""
            names = FUSED_PROJECTIONS[fused]
            if fused not in p:
                return [proj(x, n) for n in names]
            outs = jnp.split(dense(x, p[fused]), np.cumsum(sizes)[:-1].tolist(), axis=-1)
            return [y if lo.get(n) is None else y + lora_delta(x, lo[n], lora_scale, drop(n))
                    for y, n in zip(outs, names)]

        # Projections run over the flattened [B*T, D] tokens (see ``lora_delta``), so the LoRA
        # branches of q/k/v (and of gate/up) share one saved input for the backward.
        hn = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps).reshape(b * t, -1)
        q, k, v = projs(hn, "qkv", (cfg.q_size, cfg.kv_size, cfg.kv_size))
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn, emitted = attend(q, k, v)
        h = h + proj(attn.reshape(b * t, cfg.q_size), "o").reshape(b, t, -1)
        hn = rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps).reshape(b * t, -1)
        gate, up = projs(hn, "gate_up", (cfg.intermediate_size, cfg.intermediate_size))
        h = h + proj(jax.nn.silu(gate) * up, "down").reshape(b, t, -1)
        return h, emitted

    def attend_cache(q, k, v, k_old, v_old):
        """Attention over (cache slots..., chunk), the slots given as tuples of parts; the
        chunk's K/V are rounded to the cache's dtype first."""
        k, v = k.astype(k_old[-1].dtype), v.astype(v_old[-1].dtype)
        cast = lambda parts: tuple(a.astype(compute_dtype) for a in parts)
        attn = attention(q, cast(k_old + (k,)), cast(v_old + (v,)), mask, cfg)
        return attn, (k, v)

    def layer(h, xs):  # the scan body: reads the cache's slots, emits the chunk's K/V
        p, lo, k_old, v_old, idx = xs
        return block(h, p, lo, idx, lambda q, k, v: attend_cache(q, k, v, k_old, v_old))

    body = layer
    if remat not in REMAT_POLICIES and remat is not False:
        raise ValueError(f"unknown remat {remat!r}; expected False, True/'full' or 'dots'")
    if remat:  # True: keep each layer's input only; "dots": also keep projection outputs
        body = jax.checkpoint(layer, policy=REMAT_POLICIES[remat])
    meta = trace.write_meta(offset, valid, segment, kind, positions, next_pos)
    length = max(old, offset + t) if isinstance(offset, int) else old
    if isinstance(params["layers"], (list, tuple)):
        if remat:
            raise ValueError("remat needs stacked layers (a scan); got per-layer params")
        trace = trace.per_layer()
        # Per-layer arrays (see ``unstack_layers``): a Python loop reads each layer's
        # weights and K/V where they lie, where a scan would copy its slice first. The
        # chunk's write is made to depend on attention's output: XLA:CPU then sees the read
        # ordered before the write and updates a loop-carried cache in place (without it, it
        # copies every layer's K and V twice per decode step).
        # per_layer also splits a LoRA that is still stacked
        per_layer_lora = [None] * cfg.num_layers if lora is None else per_layer(params, lora, cfg)[1]
        # The per-layer K/V are head-major (``KVTrace.per_layer``): K [B, KVH, hd, S], V [B, KVH, S, hd].
        ks, vs = list(trace.k), list(trace.v)
        pre = None if prefix is None else prefix.per_layer()
        cast = lambda parts: tuple(a.astype(compute_dtype) for a in parts)
        for i, p in enumerate(params["layers"]):
            def attend(q, k, v, i=i):
                k_t = jnp.transpose(k.astype(ks[i].dtype), (0, 2, 3, 1))  # the chunk's K, [B, KVH, hd, t]
                v_h = jnp.transpose(v.astype(vs[i].dtype), (0, 2, 1, 3))  # its V, [B, KVH, t, hd]
                k_pre = () if pre is None else (pre.k[i][..., :pre.length],)
                v_pre = () if pre is None else (pre.v[i][:, :, :pre.length],)
                attn = head_major_attention(q, cast(k_pre + (ks[i][..., :old], k_t)),
                                            cast(v_pre + (vs[i][:, :, :old], v_h)), mask, cfg)
                after = (0 * attn[:, :, :1, :1]).astype(k_t.dtype)  # the write's data dependence on the read
                ks[i] = jax.lax.dynamic_update_slice(ks[i], k_t + jnp.transpose(after, (0, 2, 3, 1)),
                                                     (0, 0, 0, offset))
                vs[i] = jax.lax.dynamic_update_slice(vs[i], v_h + jnp.transpose(after, (0, 2, 1, 3)),
                                                     (0, 0, offset, 0))
                return attn, None
            x, _ = block(x, p, per_layer_lora[i] or {}, i, attend)
        new_trace = meta.replace(k=tuple(ks), v=tuple(vs), length=length)
    else:
        parts = [(trace, old)] if prefix is None else [(prefix.stacked(), prefix.length), (trace, old)]
        xs = (params["layers"], lora_layers, tuple(tr.k[:, :, :n] for tr, n in parts),
              tuple(tr.v[:, :, :n] for tr, n in parts), jnp.arange(cfg.num_layers))
        x, (k_new, v_new) = jax.lax.scan(body, x, xs, unroll=layer_unroll(cfg, t))
        new_trace = meta.replace(
            k=jax.lax.dynamic_update_slice(trace.k, k_new, (0, 0, offset, 0, 0)),
            v=jax.lax.dynamic_update_slice(trace.v, v_new, (0, 0, offset, 0, 0)),
            length=length)
    hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    logits = lm_logits(params, cfg, hidden) if return_logits else None
    return ForwardOut(logits=logits, hidden=hidden, trace=constrain_trace(new_trace))


def unstack_layers(tree, num_layers: int) -> list:
    """A ``[layers, ...]``-stacked pytree as a list of per-layer pytrees."""
    return [jax.tree.map(lambda a: a[i], tree) for i in range(num_layers)]


# Largest stack of layer weights that decode loops copy into per-layer arrays (below).
PER_LAYER_MAX_BYTES = 4 << 30


def use_per_layer(params: Params, *, remat=False, dropout: Optional[LoraDropout] = None) -> bool:
    """Whether a decode loop should run its layers from per-layer arrays.

    Inside a scan over stacked layers XLA:CPU copies every layer's weight slice and K/V slab
    before using it; for one-token steps those copies cost more than the matmuls (a B=1 decode
    step of the embedded model: 51 ms stacked, 33 ms per layer). Unstacking once, before the
    loop, is one transient copy of the layer weights per call. Chosen on a single CPU device
    for inference only (no remat, no dropout) and weights up to ``PER_LAYER_MAX_BYTES``;
    GPUs keep the stacked path (not measured there), meshes too (the trace's sharding rules
    are written for stacks). Latent steps keep the scan: ten steps per agent do not repay
    the copy, and unrolled layers triple the pipeline's first call (Xeon, B=1, 2026-12-07:
    16.4 -> 43.7-49.8 s for a pipeline 0-8% faster; docs/performance.md)."""
    from diffmas_jax.sharding import current_mesh
    if remat or (dropout is not None and dropout.rate > 0):
        return False
    if jax.default_backend() != "cpu" or current_mesh() is not None:
        return False
    if isinstance(params["layers"], (list, tuple)):
        return True
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params["layers"])) <= PER_LAYER_MAX_BYTES


def per_layer(params: Params, lora: Optional[Params], cfg: ModelConfig, *, out_in: bool = False):
    """(params, lora) with their layer stacks split into lists (``forward`` then loops in Python);
    each layer's projections that share an input are fused (``fuse_projections``) in the same copy,
    and with ``out_in`` their kernels laid out [out, in] (``out_in_kernels``)."""
    if not isinstance(params["layers"], (list, tuple)):
        layout = out_in_kernels if out_in else (lambda layer: layer)
        params = dict(params, layers=[layout(fuse_projections(p))
                                      for p in unstack_layers(params["layers"], cfg.num_layers)])
    if lora is not None and not isinstance(lora, (list, tuple)):
        lora = unstack_layers(lora, cfg.num_layers)
    return params, lora


def out_in_kernels(layer: Params) -> Params:
    """One layer's params with each projection's kernel laid out [out, in] (``matmul_out_in``)."""
    return {name: {"kernel_t": sub["kernel"].T, **{k: v for k, v in sub.items() if k != "kernel"}}
            if isinstance(sub, dict) and "kernel" in sub else sub for name, sub in layer.items()}


def layer_unroll(cfg: ModelConfig, chunk: int) -> int:
    """How many layers one iteration of the layer scan runs.

    On GPUs a scan iteration costs a host round trip (the loop predicate) plus kernel
    launches; for one-token chunks (decode, latent steps) that overhead rivals the work,
    so the layers are unrolled there. Elsewhere a rolled scan keeps compiles short."""
    return cfg.num_layers if chunk <= 16 and jax.default_backend() == "gpu" else 1


def attention(q, keys, vals, mask, cfg: ModelConfig):
    """Grouped-query attention. q [B,T,H,hd]; keys/vals: [B,S,KVH,hd] arrays or tuples of them
    (cache slots, chunk) whose slot axes concatenate; mask [B,T,sum S].

    Scores are computed per part and only they are concatenated: joining the (small) score
    blocks instead of the cache avoids copying the whole K/V cache on every decode step."""
    b, t = q.shape[:2]
    keys = keys if isinstance(keys, tuple) else (keys,)
    vals = vals if isinstance(vals, tuple) else (vals,)
    impl = fused_attention_impl(cfg)
    if impl is not None:
        return fused_attention(q, keys, vals, mask, impl)
    if jax.default_backend() == "cpu":
        if t == 1:  # one query's scores are small: kept, not recomputed
            return _one_token_attention(q, keys, vals, mask, cfg)
        if jax.device_count() == 1:  # a map over rows of a batch sharded over devices would gather it
            return _blocked_attention(q, keys, vals, mask, cfg)
    return _recomputed(_grouped_attention, cfg)(q, keys, vals, mask)


def _recomputed(attention_fn, cfg: ModelConfig):
    """``attention_fn`` whose scores and probabilities are recomputed in the backward pass.

    Saved, they are the largest activation of a layer ([B, H, T, S] twice, for every layer
    of every differentiated chunk: 2.2 of the 7.2 GB of temporaries of the full-mode
    DiffMAS step at B=4); recomputing them costs one more QK^T per layer in the backward,
    as flash attention does. Outside of differentiation it changes nothing."""
    return jax.checkpoint(lambda q, keys, vals, mask: attention_fn(q, keys, vals, mask, cfg))


_CPU_QUERY_BLOCK = 128
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def fused_attention_impl(cfg: ModelConfig) -> Optional[str]:
    """Which fused kernel, if any, runs chunk attention: ``"cudnn"`` (flash attention) when
    the config asks for it; ``"auto"`` and ``"xla"`` keep XLA's attention."""
    choice = cfg.attention
    if choice not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {choice!r}; expected one of {ATTENTION_IMPLS}")
    # "auto" stays on XLA: on an H100 the cuDNN path (one row at a time, the mask as a bias)
    # made the DiffMAS step slower (0.62 s against 0.38 s at B=8) and the SFT step no faster;
    # it is the choice for chunks whose [T, S] scores would not fit.
    return "cudnn" if choice == "cudnn" else None


def fused_attention(q, keys, vals, mask, implementation: str):
    """Attention through ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPUs):
    the [T, S] scores never reach memory, so long chunks need neither their O(T S) buffers
    nor remat to fit.

    The mask is arbitrary (holes from padding and visibility), so it goes in as a bias.
    cuDNN back-propagates a bias only for a batch of one with one bias per query head,
    so rows run one at a time under ``lax.map`` with the row's mask broadcast over heads;
    with bias, cuDNN training also needs even T and S, so both are padded by one if odd
    (a padded key is masked, a padded query is dropped)."""
    b, t, n, hd = q.shape
    k = jnp.concatenate(keys, axis=1) if len(keys) > 1 else keys[0]
    v = jnp.concatenate(vals, axis=1) if len(vals) > 1 else vals[0]
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = k.shape[1]
    pt, ps = t % 2, s % 2
    if pt or ps:
        q = jnp.pad(q, ((0, 0), (0, pt), (0, 0), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, ps), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, ps), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pt), (0, ps)))

    def one(args):
        qr, kr, vr, mr = args
        mr = jnp.broadcast_to(mr[None, None], (1, n) + mr.shape)
        return jax.nn.dot_product_attention(qr[None], kr[None], vr[None], mask=mr,
                                            implementation=implementation)[0]

    out = jax.lax.map(one, (q, k, v, mask))
    return out[:, :t]


def _blocked_attention(q, keys, vals, mask, cfg: ModelConfig, block: int = _CPU_QUERY_BLOCK):
    """``_grouped_attention`` one (row, block of queries) at a time, for CPUs.

    Done for the whole batch at once, the [B, H, T, S] scores outgrow the CPU caches and
    the three attention ops run at half speed (B=8, T=128, S=640: 51 ms against 27 ms
    per layer). A map over rows and query blocks keeps each block's scores cache-sized."""
    b, t = q.shape[:2]
    nb = -(-t // block)
    tq = -(-t // nb)  # equal blocks of at most ``block`` queries: little padding
    pad = nb * tq - t
    if pad:  # padded queries see nothing (uniform weights over the row) and are dropped
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    q_blocks = q.reshape(b * nb, tq, *q.shape[2:])
    mask_blocks = mask.reshape(b * nb, tq, mask.shape[-1])

    @jax.checkpoint  # each block's scores are recomputed in the backward (see ``_recomputed``)
    def one(args):
        qb, mb, row = args
        pick = lambda xs: tuple(jax.lax.dynamic_index_in_dim(x, row, 0) for x in xs)  # keeps a [1, ...] axis
        return _grouped_attention(qb[None], pick(keys), pick(vals), mb[None], cfg)[0]

    rows = jnp.repeat(jnp.arange(b), nb)
    out = jax.lax.map(one, (q_blocks, mask_blocks, rows))
    return out.reshape(b, nb * tq, *out.shape[2:])[:, :t]


def _grouped_attention(q, keys, vals, mask, cfg: ModelConfig):
    """Scores and values as batched GEMMs over [B, KVH, rows, hd] operands.

    XLA:CPU emits a dot whose batch axes (B, KVH) are not the leading ones of both
    operands as slow strided loops (QK^T at B=8, T=128, S=640: 116 ms against 12 ms
    for the same dot on [B, KVH, S, hd]). Moving the head axis in front is one cheap
    copy of the chunk's q and of the cache; the dots that follow are plain GEMMs."""
    b, t = q.shape[:2]
    kvh, hd = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // kvh
    qh = jnp.transpose(q.reshape(b, t, kvh, g, hd), (0, 2, 3, 1, 4)).reshape(b, kvh, g * t, hd)
    scores = jnp.concatenate([jnp.einsum("bkxd,bksd->bkxs", qh, jnp.swapaxes(k, 1, 2)).astype(jnp.float32)
                              for k in keys], -1)                       # [B, KVH, (g, t), S]
    scores = scores.reshape(b, kvh, g, t, -1) * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(vals[0].dtype)
    out, start = 0, 0
    for v in vals:
        s = v.shape[1]
        p = probs[..., start:start + s].reshape(b, kvh, g * t, s)
        out = out + jnp.einsum("bkxs,bksd->bkxd", p, jnp.swapaxes(v, 1, 2))
        start += s
    return jnp.transpose(out.reshape(b, kvh, g, t, hd), (0, 3, 1, 2, 4)).reshape(b, t, cfg.num_heads, hd)


def _one_token_attention(q, keys, vals, mask, cfg: ModelConfig):
    """``attention`` for one query token per row (decode, latent steps) as contiguous GEMMs.

    XLA:CPU runs the per-head einsum over a [B, S, KVH, hd] cache as many small strided
    dots, about 10x the time it takes to stream the cache. Multiplying each row's whole
    [S, KVH*hd] slab by a block-diagonal query matrix is one plain batched GEMM per part;
    it does KVH x the (small) attention FLOPs, the zero blocks add exact zeros, and the
    whole attention of a decode step at S = 572, B = 8 runs about 3x faster. It also
    beats the generic path's head-major copy of the cache, which a single query token
    cannot amortise. Decode loops, which copy their per-layer cache once per call anyway,
    keep it head-major and run ``_head_major_one_token_attention`` instead (2-3x faster);
    latent steps read the stacked trace and use this form."""
    b, t = q.shape[:2]
    kvh, hd = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // kvh
    eye = jnp.eye(kvh, dtype=q.dtype)
    # q_bd[b, (k, d), (j, g, t)] = q[b, t, k, g, d] if k == j else 0
    q_bd = jnp.einsum("btkgd,kj->bkdjgt", q.reshape(b, t, kvh, g, hd), eye).reshape(b, kvh * hd, kvh * g * t)
    scores = jnp.concatenate([jnp.matmul(k.reshape(b, k.shape[1], kvh * hd), q_bd.astype(k.dtype))
                              for k in keys], axis=1).astype(jnp.float32)          # [B, S, (j, g, t)]
    # The scores are small: transposed once, the softmax reduces over their minor axis and
    # the probabilities are already the value GEMM's left operand (a softmax over S as
    # axis 1 and a transposed copy per part cost 10-25% more across B = 1, 8, S = 192, 670).
    scores = jnp.swapaxes(scores, 1, 2).reshape(b, kvh, g, t, -1) * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(vals[0].dtype)
    out, start = 0, 0
    for v in vals:
        s = v.shape[1]
        p = probs[..., start:start + s].reshape(b, kvh * g * t, s)
        blocks = jnp.matmul(p, v.reshape(b, s, kvh * hd)).reshape(b, kvh, g, t, kvh, hd)
        out = out + jnp.stack([blocks[:, j, :, :, j] for j in range(kvh)], axis=1)  # diagonal blocks
        start += s
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, cfg.num_heads, hd)


def head_major_attention(q, keys_t, vals_h, mask, cfg: ModelConfig):
    """``attention`` over the head-major parts of a per-layer trace (``KVTrace.per_layer``):
    keys [B, KVH, hd, S], values [B, KVH, S, hd]. One query token (decode) runs as GEMVs
    (``_head_major_one_token_attention``); a longer chunk takes the parts back to
    [B, S, KVH, hd] and runs ``attention``."""
    if q.shape[1] == 1:
        return _head_major_one_token_attention(q, keys_t, vals_h, mask, cfg)
    keys = tuple(jnp.transpose(k, (0, 3, 1, 2)) for k in keys_t)
    vals = tuple(jnp.transpose(v, (0, 2, 1, 3)) for v in vals_h)
    return attention(q, keys, vals, mask, cfg)


def _head_major_one_token_attention(q, keys_t, vals_h, mask, cfg: ModelConfig):
    """One query token per row over head-major parts, as matrix-vector products.

    For each row, KV head j and query head of its group, the scores are q · K_j^T over a
    contiguous [hd, S] block and the output p · V_j over a contiguous [S, hd] block: batched
    dots with a single output row, which XLA:CPU emits as tiled GEMVs that stream the cache.
    ``_one_token_attention``'s block-diagonal GEMMs over the [B, S, KVH*hd] layout are small-N
    Eigen GEMMs that pack the cache first: 30 layers of the embedded model took 43 ms there
    against 15 ms here at B=8, S=670, and 13.4 against 7.3 ms at B=8, S=192 (1.8-2.9x across
    B = 1, 8 and S = 192, 670; 2026-12-04)."""
    b = q.shape[0]
    kvh, hd = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // kvh
    q4 = q.reshape(b, kvh, g, hd)  # query head h = j * g + i reads KV head j
    scores = jnp.concatenate(
        [jnp.stack([jnp.einsum("bjd,bjds->bjs", q4[:, :, i].astype(k.dtype), k) for i in range(g)], axis=2)
         for k in keys_t], axis=-1).astype(jnp.float32) * (hd ** -0.5)       # [B, KVH, g, S]
    scores = jnp.where(mask[:, None], scores, _NEG)                          # mask [B, 1, S]
    probs = jax.nn.softmax(scores, axis=-1)
    out, start = 0, 0
    for v in vals_h:
        s = v.shape[2]
        p = probs[..., start:start + s].astype(v.dtype)
        out = out + jnp.stack([jnp.einsum("bjs,bjsd->bjd", p[:, :, i], v) for i in range(g)], axis=2)
        start += s
    return out.reshape(b, 1, cfg.num_heads, hd)


def lm_logits(params: Params, cfg: ModelConfig, hidden):
    if "lm_head" in params:  # untied, or a tied table laid out [D, V] by ``with_lm_head``
        logits = hidden @ params["lm_head"].astype(hidden.dtype)
    else:  # tied: contract with the [V, D] table directly, no transposed copy of it
        logits = jnp.einsum("...d,vd->...v", hidden, params["embed"].astype(hidden.dtype))
    return logits.astype(jnp.float32)


def with_lm_head(params: Params, cfg: ModelConfig) -> Params:
    """``params`` whose tied LM head is also laid out [D, V], on a CPU (elsewhere unchanged).

    For the one-token steps of a decode loop: XLA:CPU streams a [D, V] table faster than it
    contracts the [V, D] embedding (embedded model, 49152 x 576: 5.2 -> 3.7 ms at B=1 and
    16.7 -> 10.8 ms at B=8). The transpose is one copy per call (about 15 ms there), made
    before the loop."""
    if not cfg.tie_embeddings or "lm_head" in params or jax.default_backend() != "cpu":
        return params
    return dict(params, lm_head=params["embed"].T)


def last_valid_index(valid):
    """Index of each row's last real token (0 for an all-pad row)."""
    t = valid.shape[1]
    idx = jnp.where(valid, jnp.arange(t)[None, :], -1).max(axis=1)
    return jnp.maximum(idx, 0)


def take_rows(x, idx):
    """x [B, T, ...] -> x[b, idx[b]] for each row."""
    return jnp.take_along_axis(x, idx.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def cast_params(params: Params, dtype) -> Params:
    dtype = resolve_dtype(dtype)
    return jax.tree.map(lambda a: a.astype(dtype), params)


_STATIC = ("cfg", "return_logits", "remat", "compute_dtype", "lora_scale")
# The public jitted forward keeps the input trace usable (traces are immutable values);
# pipelines that own their trace use the donating variant to update it in place.
# On an active mesh these compile with explicit input shardings (sharding.mesh_jit).
# Prompt-sized GEMMs pick their dot library by host (``xla_cpu.prompt_dot_options``).
jit_forward = mesh_jit(forward, static_argnames=_STATIC, compiler_options=lambda args: prompt_dot_options())
jit_forward_donating = mesh_jit(forward, static_argnames=_STATIC, donate_argnames=("trace",),
                                compiler_options=lambda args: prompt_dot_options())

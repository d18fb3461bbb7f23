"""The few pure stage functions every method is built from.

* ``agent_stage``: prefill an agent's prompt onto the trace, then ``think``: m
  latent steps, each feeding the realigned last hidden state back as the next
  input embedding (one new KV slot per layer per step).
* ``solver_prefill``: the solver's prompt on top of the trace; decoding the answer
  is ``generation.decode_to_text``.
* ``teacher_forced_nll``: the solver's prompt plus a target, loss on the target only.

All take (params, cfg, trace, inputs, lora) and return new values; none mutates.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from diffmas_jax.model.config import ModelConfig
from diffmas_jax.model.transformer import (LoraDropout, Visibility, forward, last_valid_index, lm_logits,
                                           take_rows)
from diffmas_jax.sharding import mesh_jit
from diffmas_jax.trace import LATENT, PROMPT, KVTrace
from diffmas_jax.xla_cpu import prompt_dot_options

REALIGN_MODES = ("ridge", "norm", "none")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Realign:
    """Maps a last-layer hidden state back into input-embedding space."""
    matrix: Optional[jax.Array]   # [D, D] or None
    target_norm: jax.Array        # mean L2 norm of the embedding rows
    mode: str = dataclasses.field(default="ridge", metadata=dict(static=True))

    def __call__(self, h):
        if self.mode == "none":
            return h
        e = h.astype(jnp.float32)
        if self.mode == "ridge":
            e = e @ self.matrix
        norm = jnp.linalg.norm(e, axis=-1, keepdims=True)
        return (e * (self.target_norm / jnp.maximum(norm, 1e-6))).astype(h.dtype)


def make_realign(params, cfg: ModelConfig, mode: str = "ridge", lam: float = 1e-5) -> Realign:
    """W_a = (W_out^T W_out + lam I)^-1 W_out^T W_in in float32 (LatentMAS realignment)."""
    if mode not in REALIGN_MODES:
        raise ValueError(f"unknown realign mode {mode!r}; choose one of {', '.join(REALIGN_MODES)}")
    w_in = params["embed"].astype(jnp.float32)                        # [V, D]
    w_out = w_in if cfg.tie_embeddings else params["lm_head"].astype(jnp.float32).T  # [V, D]
    target = jnp.mean(jnp.linalg.norm(w_in, axis=-1))
    matrix = None
    if mode == "ridge":
        gram = w_out.T @ w_out + lam * jnp.eye(cfg.hidden_size, dtype=jnp.float32)
        matrix = jnp.linalg.solve(gram, w_out.T @ w_in)
    return Realign(matrix=matrix, target_norm=target, mode=mode)


def think(params, cfg: ModelConfig, trace: KVTrace, seed_hidden, realign: Realign, *, steps: int,
          segment, active=None, visible: Optional[Visibility] = None, lora=None, lora_scale: float = 1.0,
          compute_dtype=jnp.float32, remat: bool = False, dropout: Optional[LoraDropout] = None):
    """m latent steps under ``lax.scan``; returns (trace, last hidden)."""
    if steps == 0:
        return trace, seed_hidden
    b = trace.batch
    active = jnp.ones((b,), bool) if active is None else active
    trace.check_room(steps, f"{steps} latent steps")
    # Only the m new slots are carried through the scan; the trace so far is a read-only
    # prefix, a loop constant. Carrying the whole trace made the backward save all of it
    # at every step (with trace_grad="full": steps x the trace, ~10 GB at B=4, m=10).
    slots = KVTrace.create(cfg, b, steps, dtype=trace.k.dtype)
    slots = slots.replace(next_pos=trace.next_pos).reserve(steps, f"{steps} latent steps")

    def step(carry, i):
        new, h = carry
        out = forward(params, cfg, new, prefix=trace, embeds=realign(h)[:, None], valid=active[:, None],
                      segment=segment, kind=LATENT, offset=i, visible=visible, lora=lora,
                      lora_scale=lora_scale, compute_dtype=compute_dtype, return_logits=False, remat=remat,
                      dropout=None if dropout is None else dropout.fold(i))
        return (out.trace, out.hidden[:, 0]), None

    (slots, h), _ = jax.lax.scan(step, (slots, seed_hidden), jnp.arange(steps))
    return trace.append(slots), h


def agent_stage(params, cfg: ModelConfig, trace: KVTrace, tokens, valid, realign: Realign, *,
                steps: int, segment, visible: Optional[Visibility] = None, lora=None,
                lora_scale: float = 1.0, compute_dtype=jnp.float32, remat: bool = False,
                dropout: Optional[LoraDropout] = None) -> KVTrace:
    """An upstream agent: prefill its prompt, then think ``steps`` latent steps."""
    out = forward(params, cfg, trace, tokens=tokens, valid=valid, segment=segment, kind=PROMPT,
                  visible=visible, lora=lora, lora_scale=lora_scale, compute_dtype=compute_dtype,
                  return_logits=False, remat=remat, dropout=None if dropout is None else dropout.fold(0))
    seed = take_rows(out.hidden, last_valid_index(valid))  # the row's last *real* token
    trace, _ = think(params, cfg, out.trace, seed, realign, steps=steps, segment=segment,
                     active=valid.any(axis=1), visible=visible, lora=lora, lora_scale=lora_scale,
                     compute_dtype=compute_dtype, remat=remat,
                     dropout=None if dropout is None else dropout.fold(1))
    return trace


def solver_prefill(params, cfg: ModelConfig, trace: KVTrace, tokens, valid, *, segment,
                   visible: Optional[Visibility] = None, lora=None, lora_scale: float = 1.0,
                   compute_dtype=jnp.float32):
    """The solver's prompt on top of the trace; returns (trace, next-token logits)."""
    out = forward(params, cfg, trace, tokens=tokens, valid=valid, segment=segment, kind=PROMPT,
                  visible=visible, lora=lora, lora_scale=lora_scale, compute_dtype=compute_dtype,
                  return_logits=False)
    return out.trace, lm_logits(params, cfg, take_rows(out.hidden, last_valid_index(valid)))


def teacher_forced_nll(params, cfg: ModelConfig, trace: KVTrace, tokens, valid, target_mask, *, segment,
                       visible: Optional[Visibility] = None, lora=None, lora_scale: float = 1.0,
                       compute_dtype=jnp.float32, remat: bool = False, max_target: Optional[int] = None,
                       dropout: Optional[LoraDropout] = None):
    """Solver prompt + target in one chunk; returns (summed target NLL, number of target tokens).

    ``target_mask`` [B, T] marks the target tokens (a contiguous span per row); token t
    is predicted from position t-1. Only the target's positions go through the LM head
    (``max_target`` static bound, default T), which is most of the vocabulary cost.
    """
    out = forward(params, cfg, trace, tokens=tokens, valid=valid, segment=segment, kind=PROMPT,
                  visible=visible, lora=lora, lora_scale=lora_scale, compute_dtype=compute_dtype,
                  return_logits=False, remat=remat, dropout=dropout)
    b, t = tokens.shape
    k = t - 1 if max_target is None else min(max_target, t - 1)
    target_mask = target_mask & valid
    first = jnp.argmax(target_mask, axis=1)                      # first target token per row
    pos = jnp.clip(first[:, None] - 1 + jnp.arange(k)[None, :], 0, t - 2)   # predicting positions
    use = (jnp.arange(k)[None, :] < target_mask.sum(1)[:, None]) & (first[:, None] > 0)
    hidden = jnp.take_along_axis(out.hidden, pos[:, :, None], axis=1)
    logp = jax.nn.log_softmax(lm_logits(params, cfg, hidden), axis=-1)
    labels = jnp.take_along_axis(tokens, pos + 1, axis=1)
    nll = -jnp.take_along_axis(logp, labels[:, :, None], axis=-1)[..., 0]
    m = use.astype(jnp.float32)
    return jnp.sum(nll * m), jnp.sum(m)


_STATIC = ("cfg", "steps", "lora_scale", "compute_dtype", "remat")
# On an active mesh these compile with explicit input shardings (sharding.mesh_jit).
# Prompt-sized GEMMs pick their dot library by host (``xla_cpu.prompt_dot_options``).
jit_agent_stage = mesh_jit(agent_stage, static_argnames=_STATIC, compiler_options=lambda args: prompt_dot_options())
jit_solver_prefill = mesh_jit(solver_prefill, static_argnames=("cfg", "lora_scale", "compute_dtype"),
                              compiler_options=lambda args: prompt_dot_options())

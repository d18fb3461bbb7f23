"""The DiffMAS training step: Stage I builds the trace with the LoRA applied, Stage II
teacher-forces the solver's target; only the LoRA tree gets gradients.

``trace_grad="full"`` backpropagates through every upstream agent (a chain of
per-stage VJPs, so the gradient arriving at each agent's segment is measured on
the way: Proposition 3.1 as a logged number); ``"stop"`` treats the trace as a
constant. ``single_sft`` trains the same adapter on the same targets with no
upstream agents.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from diffmas_jax.agents import agent_messages, render_chat
from diffmas_jax.generation import pad_batch
from diffmas_jax.methods import MethodConfig, select_lora, solver_visibility, upstream_visibility
from diffmas_jax.model.transformer import LoraDropout, resolve_dtype
from diffmas_jax.sharding import jit_per_options, mesh_jit
from diffmas_jax.stages import Realign, agent_stage, teacher_forced_nll
from diffmas_jax.trace import KVTrace, TraceOverflowError
from diffmas_jax.xla_cpu import ynn_dot_options

TRAIN_METHODS = ("diffmas", "single_sft", "text_mas_sft")
TRACE_GRADS = ("stop", "full")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static description of the training step (hashable: a jit static argument)."""
    method: str
    trace_grad: str
    roles: tuple            # all agents, the last is the solver
    latent_steps: tuple     # per upstream agent
    up_lengths: tuple       # padded prompt length per upstream agent
    solver_length: int      # padded solver prompt + target length
    capacity: int
    lora_scale: float
    communication: str = "concat"
    visibility: str = "full"
    remat: object = False  # False, True (keep layer inputs only) or "dots" (also keep projections)
    compute_dtype: str = "float32"
    max_target: Optional[int] = None  # static bound on target tokens per row (LM-head cost)
    lora_dropout: float = 0.0         # dropout on the LoRA input; needs a per-step rng

    def method_config(self) -> MethodConfig:
        return MethodConfig(method="latent_mas", roles=self.roles, latent_steps=self.latent_steps,
                            communication=self.communication, visibility=self.visibility)


def encode_target(tokenizer, text: str, max_target_tokens: int) -> tuple[list, bool]:
    """(target ids, cut): the target then EOS when both fit in ``max_target_tokens``; else its
    first ``max_target_tokens`` tokens and no EOS, so a cut target does not teach the solver to
    stop where the cut fell (a math target's answer comes last: cut + EOS would reward ending
    the reasoning before it)."""
    if max_target_tokens < 1:
        raise ValueError(f"max_target_tokens must be at least 1, got {max_target_tokens}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id: a training target must end with EOS")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max_target_tokens:
        return ids + [tokenizer.eos_token_id], False
    return ids[:max_target_tokens], True


def warn_cut_targets(data, eval_data, max_target_tokens: int) -> None:
    """One warning line each for the training and held-out targets longer than
    ``max_target_tokens`` (process 0 only)."""
    import sys
    from diffmas_jax.distributed import is_main_process
    for what, d in (("training", data), ("held-out", eval_data)):
        if d is not None and d.n_cut and is_main_process():
            print(f"warning: {d.n_cut} of {len(d.n_target)} {what} targets do not fit in max_target_tokens="
                  f"{max_target_tokens} with their EOS; they are cut there and end without EOS (raise "
                  f"max_target_tokens to train on whole answers)", file=sys.stderr)


@dataclasses.dataclass
class EncodedData:
    up_tokens: list          # per upstream agent: [N, T_j] int32
    up_valid: list           # per upstream agent: [N, T_j] bool
    tokens: np.ndarray       # [N, T] solver prompt + target
    valid: np.ndarray
    target_mask: np.ndarray
    n_target: np.ndarray     # [N] target tokens per item
    n_cut: int = 0           # targets cut at max_target_tokens (no EOS after them)


def encode_items(tokenizer, items, answer_instruction: str, mc: MethodConfig, method: str,
                 max_target_tokens: int, bucket: int = 32, notes=None) -> tuple[EncodedData, tuple]:
    """Tokenize every item once into fixed shapes, so the whole run compiles once.

    ``notes`` (text_mas_sft): per item, the upstream agents' text that the solver reads.
    """
    agents = mc.agents() if method == "diffmas" else MethodConfig(method="single", layout=mc.layout,
                                                                   roles=mc.roles).agents()
    upstream, solver = agents[:-1], agents[-1]
    up_tokens, up_valid = [], []
    for a in upstream:
        seqs = [render_chat(tokenizer, agent_messages(a, it.question), mc.enable_thinking) for it in items]
        t, v = pad_batch(seqs, tokenizer.pad_token_id or 0, multiple=bucket)
        up_tokens.append(t)
        up_valid.append(v)
    seqs, marks, n_cut = [], [], 0
    for i, it in enumerate(items):
        prompt = render_chat(tokenizer, agent_messages(solver, it.question, answer_instruction=answer_instruction,
                                                       is_solver=True, has_team=method != "single_sft",
                                                       notes=notes[i] if notes else ()),
                             mc.enable_thinking)
        target, cut = encode_target(tokenizer, it.target, max_target_tokens)
        n_cut += cut
        seqs.append(prompt + target)
        marks.append([False] * len(prompt) + [True] * len(target))
    tokens, valid = pad_batch(seqs, tokenizer.pad_token_id or 0, multiple=bucket)
    target_mask = np.zeros_like(valid)
    for i, m in enumerate(marks):
        target_mask[i, :len(m)] = m
    data = EncodedData(up_tokens, up_valid, tokens, valid, target_mask, target_mask.sum(1), n_cut)
    return data, agents


def batch_of(data: EncodedData, idx) -> dict:
    return {"up_tokens": [t[idx] for t in data.up_tokens], "up_valid": [v[idx] for v in data.up_valid],
            "tokens": data.tokens[idx], "valid": data.valid[idx], "target_mask": data.target_mask[idx]}


def loss_and_grads(lora, params, cfg, realign: Realign, batch: dict, sc: StepConfig, rng=None):
    """Returns (loss, lora grads, per-upstream-segment gradient norms [K]).

    ``rng`` drives LoRA dropout (``sc.lora_dropout > 0``); each stage folds in its index."""
    dtype = resolve_dtype(sc.compute_dtype)
    if sc.lora_dropout > 0 and rng is None:
        raise ValueError("lora_dropout > 0 needs an rng for the step")
    drop = LoraDropout(sc.lora_dropout, rng) if sc.lora_dropout > 0 else None
    stage_drop = (lambda j: None) if drop is None else drop.fold
    b = batch["tokens"].shape[0]
    k_up = len(sc.latent_steps)
    mc = sc.method_config()
    trace = KVTrace.create(cfg, b, sc.capacity, dtype=dtype)
    vjps = []
    for j in range(k_up):
        role = sc.roles[j]
        prev = trace

        def stage(lo, k, v, j=j, role=role, prev=prev):
            out = agent_stage(params, cfg, prev.replace(k=k, v=v), batch["up_tokens"][j], batch["up_valid"][j],
                              realign, steps=sc.latent_steps[j], segment=j, visible=upstream_visibility(mc, j),
                              lora=select_lora(lo, role), lora_scale=sc.lora_scale, compute_dtype=dtype,
                              remat=sc.remat, dropout=stage_drop(j))
            return (out.k, out.v), out

        if sc.trace_grad == "full":
            _, vjp, trace = jax.vjp(stage, lora, trace.k, trace.v, has_aux=True)
            vjps.append(vjp)
        else:
            _, trace = stage(lora, trace.k, trace.v)
            trace = trace.replace(k=jax.lax.stop_gradient(trace.k), v=jax.lax.stop_gradient(trace.v))
    solver_role = sc.roles[-1]
    vis = solver_visibility(mc, k_up, sum(sc.latent_steps)) if k_up else None

    def solver_loss(lo, k, v):
        tr = trace.replace(k=k, v=v)
        if sc.trace_grad == "stop":
            tr = tr.replace(k=jax.lax.stop_gradient(k), v=jax.lax.stop_gradient(v))
        nll, n = teacher_forced_nll(params, cfg, tr, batch["tokens"], batch["valid"], batch["target_mask"],
                                    segment=k_up, visible=vis, lora=select_lora(lo, solver_role),
                                    lora_scale=sc.lora_scale, compute_dtype=dtype, remat=sc.remat,
                                    max_target=sc.max_target, dropout=stage_drop(k_up))
        return nll / jnp.maximum(n, 1.0)

    loss, (g_lora, g_k, g_v) = jax.value_and_grad(solver_loss, argnums=(0, 1, 2))(lora, trace.k, trace.v)
    seg_norms = []
    for j in reversed(range(k_up)):
        # g_k/g_v now hold the total gradient w.r.t. the trace as stage j left it; its
        # segment-j slots are what stage j wrote.
        m = ((trace.segment == j) & trace.valid)[None, :, :, None, None]
        seg_norms.append(jnp.sqrt(jnp.sum(jnp.where(m, g_k, 0) ** 2) + jnp.sum(jnp.where(m, g_v, 0) ** 2)))
        if sc.trace_grad == "full":
            g_lo_j, g_k, g_v = vjps[j]((g_k, g_v))
            g_lora = jax.tree.map(jnp.add, g_lora, g_lo_j)
    norms = jnp.stack(seg_norms[::-1]) if seg_norms else jnp.zeros((0,))
    return loss, g_lora, norms


def make_optimizer(lr: float, total_steps: int, warmup_steps: int, weight_decay: float, clip: float,
                   grad_accum: int) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay and global-norm clipping, accumulated over micro-batches."""
    opt_steps = max(1, total_steps // grad_accum)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup_steps, max(opt_steps - 1, 0)), opt_steps,
                                                  end_value=0.0) if opt_steps > 1 else optax.constant_schedule(lr)
    tx = optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay))
    return optax.MultiSteps(tx, every_k_schedule=grad_accum) if grad_accum > 1 else tx


def make_train_step(cfg, sc: StepConfig, optimizer, mesh=None):
    """A jitted (lora, opt_state, params, realign, batch[, rng, grad_weight]) -> (lora, opt_state, metrics).

    ``rng`` (the step's dropout key) is needed only when ``sc.lora_dropout > 0``;
    ``grad_weight`` scales the gradient handed to the optimizer (metrics are unscaled). With a
    ``mesh`` the step is compiled with explicit shardings (``sharding.mesh_jit``): params
    in their logical-axis layout, the batch over data x fsdp, LoRA, optimizer state,
    realignment and rng replicated, in and out; every step reuses the first step's
    executable."""
    # cfg as a static keyword: mesh_jit reads it to lay out ``params`` by the model's axes
    def step(lora, opt_state, params, realign, batch, rng=None, grad_weight=1.0, *, cfg=cfg):
        loss, grads, norms = loss_and_grads(lora, params, cfg, realign, batch, sc, rng)
        grad_norm = optax.tree.norm(grads)
        # under accumulation: this micro-batch's share of the window's target tokens (times the
        # window length), so the accumulated mean is the window's per-token mean (train_loop)
        weighted = jax.tree.map(lambda g: g * grad_weight, grads)
        updates, opt_state = optimizer.update(weighted, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        return lora, opt_state, {"loss": loss, "grad_norm": grad_norm, "segment_grad_norms": norms}

    # YNNPACK dots on CPU (``xla_cpu``): the full-mode step at B=4 ran 13.3-15.5 s against
    # 15.6-17.3 s with XLA's own GEMMs, at B=1 4.05-4.32 against 4.38-5.16 s (alternating
    # processes, 2026-12-04).
    if mesh is None:
        pick = jit_per_options(step, lambda args, kwargs: ynn_dot_options(), donate_argnums=(0, 1))

        def plain(*args, **kwargs):
            return pick(args, kwargs)(*args, **kwargs)
        plain.jits = pick.jits  # compiler options -> jit; for tests
        return plain
    rep = NamedSharding(mesh, PartitionSpec())
    return mesh_jit(step, static_argnames=("cfg",), donate_argnames=("lora", "opt_state"), mesh=mesh,
                    out_shardings=(rep, rep, rep), compiler_options=lambda args: ynn_dot_options())


def make_eval_loss(cfg, sc: StepConfig):
    def f(lora, params, realign, batch):
        # Evaluation: no dropout, no gradient through the trace.
        return loss_and_grads(lora, params, cfg, realign, batch,
                              dataclasses.replace(sc, trace_grad="stop", lora_dropout=0.0))[0]
    return jax.jit(f)


def step_capacity(data: EncodedData, latent_steps: Sequence[int], capacity: Optional[int]) -> int:
    need = sum(t.shape[1] for t in data.up_tokens) + sum(latent_steps) + data.tokens.shape[1]
    if capacity is not None and capacity < need:
        raise TraceOverflowError(
            f"KV trace overflow: training needs {need} slots (agent prompts + latent steps + solver prompt "
            f"and target) but trace_capacity is {capacity}")
    return capacity or need

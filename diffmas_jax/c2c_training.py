"""Training the C2C fuser: data, loss, optimizer, step, and the ``train`` CLI's c2c run.

Only the fuser trains: the loss is the receiver's next-token cross-entropy on the
response, read on the fused prompt cache, and ``jax.grad`` is taken with respect to
the fuser tree alone (both models are frozen inputs), so optimizer state exists only
for it. Reference hyperparameters: AdamW lr 1e-4, weight decay 0.01,
linear schedule with 10% warmup, clip 1.0; the gate temperature falls from 1.0 to
0.001 (exponentially) over the optimizer steps.

Sharer and receiver with different tokenizers: every receiver token is decoded and
re-encoded with the sharer's tokenizer, keeping the first sharer token, so both read
sequences of the same length at the same positions. Same-tokenizer pairs skip this.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from diffmas_jax.agents import agent_messages, render_chat
from diffmas_jax.c2c import FuserConfig, chain_cache, decays, sharer_reading
from diffmas_jax.generation import pad_batch
from diffmas_jax.model.transformer import resolve_dtype
from diffmas_jax.sharding import mesh_jit
from diffmas_jax.stages import teacher_forced_nll
from diffmas_jax.training import encode_target, warn_cut_targets


# --------------------------------------------------------------------------- tokens
def same_tokenizer(a, b) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def align_ids(ids: Sequence[int], receiver_tok, sharer_tok, cache: Optional[dict] = None) -> list[int]:
    """One sharer token per receiver token: decode it, re-encode with the sharer, keep the first."""
    cache = {} if cache is None else cache
    fallback = next((t for t in (sharer_tok.unk_token_id, sharer_tok.pad_token_id, sharer_tok.eos_token_id)
                     if t is not None), 0)
    out = []
    for i in ids:
        if i not in cache:
            piece = sharer_tok(receiver_tok.decode([int(i)]), add_special_tokens=False)["input_ids"]
            cache[i] = int(piece[0]) if piece else int(fallback)
        out.append(cache[i])
    return out


@dataclasses.dataclass
class Prompts:
    heads: list          # per agent: [N, H_j] int32, every prompt token but the last (right-padded)
    valids: list         # per agent: [N, H_j] bool
    lasts: list          # per agent: [N] int32, the last prompt token
    sharer_head: Optional[np.ndarray] = None   # one agent, different tokenizers: aligned sharer tokens


def encode_prompts(tokenizer, agents, questions, answer_instruction: str, enable_thinking=None, bucket: int = 32,
                   sharer_tokenizer=None) -> Prompts:
    """Each agent's chat prompt, split into head and last token (the same prompts as the other methods)."""
    k = len(agents) - 1
    pad = tokenizer.pad_token_id or 0
    heads, valids, lasts, seqs0 = [], [], [], None
    for j, a in enumerate(agents):
        solver = j == k
        seqs = [render_chat(tokenizer, agent_messages(a, q, answer_instruction=answer_instruction if solver else "",
                                                      is_solver=solver, has_team=not solver or k > 0),
                            enable_thinking) for q in questions]
        h, v = pad_batch([s[:-1] for s in seqs], pad, multiple=bucket)
        heads.append(h)
        valids.append(v)
        lasts.append(np.asarray([s[-1] for s in seqs], np.int32))
        seqs0 = seqs0 or seqs
    sharer_head = None
    if k == 0 and sharer_tokenizer is not None and not same_tokenizer(tokenizer, sharer_tokenizer):
        cache: dict = {}
        aligned = [align_ids(s[:-1], tokenizer, sharer_tokenizer, cache) for s in seqs0]
        sharer_head, _ = pad_batch(aligned, sharer_tokenizer.pad_token_id or 0, length=heads[0].shape[1])
    return Prompts(heads, valids, lasts, sharer_head)


@dataclasses.dataclass
class C2CData:
    prompts: Prompts
    tail: np.ndarray          # [N, 1 + target]: the solver's last prompt token, then the target
    tail_valid: np.ndarray
    tail_target: np.ndarray
    n_target: np.ndarray
    n_cut: int = 0            # targets cut at max_target_tokens (no EOS after them)

    def batch(self, idx) -> dict:
        p = self.prompts
        return {"heads": [h[idx] for h in p.heads], "valids": [v[idx] for v in p.valids],
                "lasts": [x[idx] for x in p.lasts[:-1]],
                "s_head": None if p.sharer_head is None else p.sharer_head[idx],
                "tail": self.tail[idx], "tail_valid": self.tail_valid[idx], "tail_target": self.tail_target[idx]}


def encode_training(tokenizer, items, answer_instruction: str, agents, max_target_tokens: int,
                    enable_thinking=None, bucket: int = 32, sharer_tokenizer=None) -> C2CData:
    """Every item once, into fixed shapes (the run compiles once)."""
    prompts = encode_prompts(tokenizer, agents, [it.question for it in items], answer_instruction,
                             enable_thinking, bucket, sharer_tokenizer)
    targets = [encode_target(tokenizer, it.target, max_target_tokens) for it in items]
    tails = [[int(prompts.lasts[-1][i])] + ids for i, (ids, _) in enumerate(targets)]
    tail, tail_valid = pad_batch(tails, tokenizer.pad_token_id or 0, multiple=bucket)
    target = tail_valid.copy()
    target[:, 0] = False
    return C2CData(prompts, tail, tail_valid, target, target.sum(1), sum(cut for _, cut in targets))


# --------------------------------------------------------------------------- loss and step
@dataclasses.dataclass(frozen=True)
class C2CStepConfig:
    """Static description of the step (hashable)."""
    fc: FuserConfig
    anneal_steps: int = 1           # optimizer steps over which the gate temperature falls
    grad_accum: int = 1
    gate_t0: float = 1.0
    gate_t1: float = 1e-3
    max_target: Optional[int] = None
    compute_dtype: str = "float32"
    remat: bool = False
    seed: int = 0


def gate_temperature(opt_step, sc: C2CStepConfig):
    """tau = t0 (t1 / t0)^(s / (N - 1)), clamped at t1: a function of the optimizer step only."""
    ratio = jnp.clip(jnp.asarray(opt_step, jnp.float32) / max(sc.anneal_steps - 1, 1), 0.0, 1.0)
    return sc.gate_t0 * (sc.gate_t1 / sc.gate_t0) ** ratio


def c2c_loss(fuser, r_params, r_cfg, s_params, s_cfg, batch: dict, sc: C2CStepConfig, *, train: bool = True,
             temperature=1.0, rng=None, s_read=None):
    """Mean receiver NLL of the target tokens, read on the fused prompt cache.

    ``s_read``: plain C2C's sharer reading, already computed (``c2c.sharer_reading``)."""
    dtype = resolve_dtype(sc.compute_dtype)
    tail = batch["tail"]
    trace = chain_cache(fuser, sc.fc, r_params, r_cfg, s_params, s_cfg, batch["heads"], batch["valids"],
                        batch["lasts"], batch.get("s_head"), extra=tail.shape[1], s_read=s_read, train=train,
                        temperature=temperature, rng=rng, compute_dtype=dtype, remat=sc.remat)
    nll, n = teacher_forced_nll(r_params, r_cfg, trace, tail, batch["tail_valid"], batch["tail_target"],
                                segment=len(batch["heads"]) - 1, compute_dtype=dtype, remat=sc.remat,
                                max_target=sc.max_target)
    return nll / jnp.maximum(n, 1.0)


def make_c2c_optimizer(lr: float, opt_steps: int, warmup_frac: float = 0.1, weight_decay: float = 0.01,
                       clip: float = 1.0, grad_accum: int = 1) -> optax.GradientTransformation:
    """AdamW, linear warmup over ``warmup_frac`` of the optimizer steps then linear decay to 0, clipping."""
    warm = int(round(warmup_frac * opt_steps))
    decay = optax.linear_schedule(lr, 0.0, max(opt_steps - warm, 1))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm]) if warm else decay
    mask = lambda tree: jax.tree_util.tree_map_with_path(lambda p, _: decays(p), tree)
    tx = optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay, mask=mask))
    return optax.MultiSteps(tx, every_k_schedule=grad_accum) if grad_accum > 1 else tx


def _compile(fn, mesh, static=("cfg",), donate=(), out_shardings=None):
    """``jax.jit``; on a mesh ``sharding.mesh_jit``, which lays every argument out by its name:
    ``params`` by the static ``cfg`` (its model's config), ``batch``/``tokens``/``valid``
    over data x fsdp, ``trace`` by the KV-trace rules, the rest (fuser, optimizer state,
    step number) replicated."""
    if mesh is None:
        return jax.jit(fn, static_argnames=static, donate_argnames=donate or None)
    return mesh_jit(fn, static_argnames=static, donate_argnames=donate, mesh=mesh, out_shardings=out_shardings)


def _sharer_first(plain, chain, r_cfg, s_cfg, sc: C2CStepConfig, mesh):
    """``run(state, r_params, s_params, batch, extra)`` over two compiled programs.

    ``plain(*state, params, trace, batch, *extra, cfg)`` (one agent) gets the sharer's
    reading of the prompt as ``trace``, computed first in a jit of its own: the sharer
    is frozen and the fuser does not change its reading. Each program thus takes one
    model's weights as ``params`` with that model's ``cfg``, which is how the sharding
    table lays weights out, so on a mesh both models stay in their own shards.
    ``chain(*state, params, batch, *extra, cfg)`` (several agents, sharer = receiver)
    needs no reading."""
    read = _compile(sharer_reading, mesh, static=("cfg", "compute_dtype"))

    def run(state, r_params, s_params, batch, extra):
        body = {k: v for k, v in batch.items() if k != "s_head"}
        if len(batch["heads"]) > 1:
            return chain(*state, r_params, body, *extra, cfg=r_cfg)
        tokens = batch["heads"][0] if batch.get("s_head") is None else batch["s_head"]
        s_read = read(s_params, s_cfg, tokens, batch["valids"][0], compute_dtype=sc.compute_dtype)
        return plain(*state, r_params, s_read, body, *extra, cfg=r_cfg)

    run.programs = {"sharer_reading": read, "plain": plain, "chain": chain}  # for tests and inspection
    return run


def make_c2c_train_step(r_cfg, s_cfg, sc: C2CStepConfig, optimizer, mesh=None):
    """(fuser, opt_state, r_params, s_params, batch, micro_step[, grad_weight]) -> (fuser, opt_state, metrics).

    ``grad_weight`` scales the gradient handed to the optimizer, as in ``training.make_train_step``:
    under accumulation, the micro-batch's share of its window's target tokens (``train_loop``).

    The gate temperature and the random stream are functions of the step number, so a
    resumed run repeats an uninterrupted one; the temperature moves once per optimizer
    step (every ``grad_accum`` micro-steps). With a ``mesh``, compiled with explicit
    shardings like ``training.make_train_step``: each model's weights in their layout, the
    batch over data x fsdp, the fuser, optimizer state and metrics replicated, in and out.
    """
    def update(fuser, opt_state, params, s_read, batch, micro_step, grad_weight, cfg):
        tau = gate_temperature(micro_step // sc.grad_accum, sc)
        rng = jax.random.fold_in(jax.random.PRNGKey(sc.seed), micro_step)
        sharer = (params, cfg) if s_read is None else (None, None)  # a chain: the receiver shares
        loss, grads = jax.value_and_grad(
            lambda f: c2c_loss(f, params, cfg, *sharer, batch, sc, train=True, temperature=tau, rng=rng,
                               s_read=s_read))(fuser)
        updates, opt_state = optimizer.update(jax.tree.map(lambda g: g * grad_weight, grads), opt_state, fuser)
        fuser = optax.apply_updates(fuser, updates)
        return fuser, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "gate_temperature": tau,
                                  "open_k": jnp.mean(fuser["k"]["gate"] > 0),
                                  "open_v": jnp.mean(fuser["v"]["gate"] > 0)}

    # Argument names are the sharding table's (see _compile).
    def plain(fuser, opt_state, params, trace, batch, micro_step, grad_weight, *, cfg):
        return update(fuser, opt_state, params, trace, batch, micro_step, grad_weight, cfg)

    def chain(fuser, opt_state, params, batch, micro_step, grad_weight, *, cfg):
        return update(fuser, opt_state, params, None, batch, micro_step, grad_weight, cfg)

    rep = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    compile_ = functools.partial(_compile, mesh=mesh, donate=("fuser", "opt_state"), out_shardings=(rep, rep, rep))
    run = _sharer_first(compile_(plain), compile_(chain), r_cfg, s_cfg, sc, mesh)

    def step(fuser, opt_state, r_params, s_params, batch, micro_step, grad_weight=1.0):
        return run((fuser, opt_state), r_params, s_params, batch, (micro_step, jnp.float32(grad_weight)))

    step.programs = run.programs
    return step


def make_c2c_eval_loss(r_cfg, s_cfg, sc: C2CStepConfig, mesh=None):
    """(fuser, r_params, s_params, batch) -> held-out loss as evaluation runs it: hard gates, no dropout."""
    def plain(fuser, params, trace, batch, *, cfg):
        return c2c_loss(fuser, params, cfg, None, None, batch, sc, train=False, s_read=trace)

    def chain(fuser, params, batch, *, cfg):
        return c2c_loss(fuser, params, cfg, params, cfg, batch, sc, train=False)

    run = _sharer_first(_compile(plain, mesh), _compile(chain, mesh), r_cfg, s_cfg, sc, mesh)
    return lambda fuser, r_params, s_params, batch: run((fuser,), r_params, s_params, batch, ())


# --------------------------------------------------------------------------- CLI
# Fields whose change makes an existing workdir a different experiment (data, prompts, targets,
# model math, optimizer and schedule); cadence, exports, remat and the mesh may change on resume.
IDENTITY_FIELDS = ("model", "receiver", "sharer", "dtype", "method", "task", "task_path", "split", "data_dir", "limit",
                   "eval_items", "layout", "roles", "enable_thinking", "fuser_hidden", "fuser_depth", "fuser_dropout",
                   "layer_map", "gate_t0", "gate_t1", "batch_size", "steps", "grad_accum", "lr", "warmup_frac",
                   "weight_decay", "clip", "seed", "max_target_tokens")

# The fields train_c2c reads: a config file without them is not a C2C training config.
TRAIN_FIELDS = ("method", "model", "receiver", "sharer", "dtype", "task", "task_path", "split", "data_dir", "limit",
                "layout", "roles", "enable_thinking", "fuser_hidden", "fuser_depth", "fuser_dropout", "layer_map",
                "gate_t0", "gate_t1", "batch_size", "steps", "grad_accum", "lr", "warmup_frac", "weight_decay", "clip",
                "max_target_tokens", "remat", "seed", "checkpoint_every", "keep_checkpoints", "eval_every",
                "eval_items", "on_nan")


def validate(c) -> None:
    """The C2C config values checkable without the models; UserError naming the first bad one."""
    from diffmas_jax import train_loop
    from diffmas_jax.cli import UserError, remat_setting
    train_loop.validate_loop_fields(c)
    if not 0 <= train_loop.finite_number(c, "warmup_frac") < 1:
        raise UserError(f"warmup_frac must be in [0, 1), got {c.warmup_frac}")
    t0, t1 = train_loop.finite_number(c, "gate_t0"), train_loop.finite_number(c, "gate_t1")
    if not 0 < t1 <= t0:
        raise UserError(f"gate temperatures need 0 < gate_t1 <= gate_t0, got {c.gate_t0} -> {c.gate_t1}")
    if not 0 <= train_loop.finite_number(c, "fuser_dropout") < 1:
        raise UserError(f"fuser_dropout must be in [0, 1), got {c.fuser_dropout}")
    remat_setting(c)  # remat_policy


def check_config(c):
    """Every check of a C2C config that needs no model, data or workdir (the CLI's first
    step, and a sweep's plan): (receiver, sharer, agents, fuser options)."""
    from diffmas_jax.c2c import FuserConfigError, pair_problem
    from diffmas_jax.cli import UserError
    from diffmas_jax.config_utils import resolve_model
    from diffmas_jax.methods import MethodConfig
    validate(c)
    receiver_name = resolve_model(c.receiver or c.model)
    sharer_name = resolve_model(c.sharer or receiver_name)
    roles = None if not c.roles else tuple(r.strip() for r in str(c.roles).split(",") if r.strip())
    try:
        agents = MethodConfig(method="c2c", layout=c.layout, roles=roles, latent_steps=0).validate().agents()
        opts = dict(hidden=int(c.fuser_hidden), depth=int(c.fuser_depth), dropout=float(c.fuser_dropout),
                    layer_map=c.layer_map)
        FuserConfig(1, 1, 1, 1, 1, 1, **opts).validate()
    except (ValueError, FuserConfigError) as e:
        raise UserError(str(e)) from None
    problem = pair_problem(len(agents), sharer_name == receiver_name)
    if problem:
        raise UserError(problem)
    return receiver_name, sharer_name, agents, opts


def train_c2c(c, workdir: Path) -> int:
    """``python -m diffmas_jax.train`` with ``method = c2c`` (see configs/embedded_c2c_train.py).

    On a mesh (``mesh`` / ``mesh_preset``, as DiffMAS) both models load straight into
    their shards, each by its own config; the batch goes over data x fsdp and the fuser
    and its optimizer state are replicated."""
    from diffmas_jax import distributed, memory, mesh_presets, train_loop
    from diffmas_jax.c2c import init_fuser, save_fuser
    from diffmas_jax.cli import enable_compilation_cache, load_model_checked, remat_setting

    receiver_name, sharer_name, agents, opts = check_config(c)
    identical = sharer_name == receiver_name
    resolved = json.loads(c.to_json())
    train_loop.check_workdir(workdir, resolved, IDENTITY_FIELDS)

    distributed.maybe_initialize()  # on a pod: connect the hosts before anything touches a device
    enable_compilation_cache()
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    from diffmas_jax.lora import count_params
    from diffmas_jax.sharding import param_placer, set_active_mesh

    task, train_items, eval_items = train_loop.split_items(c)
    n_eval = len(eval_items)
    for name in dict.fromkeys((receiver_name, sharer_name)):
        memory.preflight_model(c, name, c.dtype)  # the weights alone must fit before they load
    mesh, place = mesh_presets.mesh_and_placer(c, receiver_name)  # the config's mesh (None: one device)
    distributed.check_batch_layout(int(c.batch_size), mesh)  # several hosts: rows split over them
    set_active_mesh(mesh)  # traces inside the steps are pinned to this mesh's sharding
    receiver = load_model_checked(receiver_name, dtype=c.dtype, place=place)  # weights straight into their shards
    if identical:
        sharer = receiver
    else:  # the sharer's weights are laid out by its own config
        s_place = None if mesh is None else param_placer(mesh_presets.load_config_checked(sharer_name), mesh)
        sharer = load_model_checked(sharer_name, dtype=c.dtype, place=s_place)
    enc = dict(answer_instruction=task.answer_instruction, agents=agents, max_target_tokens=int(c.max_target_tokens),
               enable_thinking=c.enable_thinking, sharer_tokenizer=None if identical else sharer.tokenizer)
    data = encode_training(receiver.tokenizer, train_items, **enc)
    eval_data = encode_training(receiver.tokenizer, eval_items, **enc) if n_eval else None
    warn_cut_targets(data, eval_data, int(c.max_target_tokens))
    fc = FuserConfig.for_models(sharer.cfg, receiver.cfg, **opts)
    opt_steps = -(-int(c.steps) // int(c.grad_accum))
    sc = C2CStepConfig(fc=fc, anneal_steps=opt_steps, grad_accum=int(c.grad_accum), gate_t0=float(c.gate_t0),
                       gate_t1=float(c.gate_t1), compute_dtype=c.dtype, remat=remat_setting(c), seed=int(c.seed),
                       max_target=int(max([data.n_target.max()] + ([eval_data.n_target.max()] if n_eval else []))))
    optimizer = make_c2c_optimizer(float(c.lr), opt_steps, float(c.warmup_frac), float(c.weight_decay),
                                   float(c.clip), int(c.grad_accum))
    fuser = init_fuser(fc, int(c.seed))
    train_step = make_c2c_train_step(receiver.cfg, sharer.cfg, sc, optimizer, mesh)
    eval_loss = make_c2c_eval_loss(receiver.cfg, sharer.cfg, sc, mesh) if n_eval else None

    def step(state, batch, i, grad_weight=1.0):
        f, opt, m = train_step(state["fuser"], state["opt_state"], receiver.params, sharer.params, batch, jnp.int32(i),
                               grad_weight)
        return {"fuser": f, "opt_state": opt}, m

    extra = ("gate_temperature", "open_k", "open_v")
    return train_loop.run(train_loop.Trainer(
        label="train c2c", state={"fuser": fuser, "opt_state": optimizer.init(fuser)}, n_items=len(train_items),
        banner=f"training c2c ({len(agents)} agent(s), sharer {sharer_name} -> receiver {receiver_name}) on "
               f"{len(train_items)} items, {count_params(fuser):,} fuser params",
        batch=data.batch, step=step, target_tokens=lambda idx: int(np.sum(data.n_target[idx])),
        # jnp sums: the batch may be a global array spread over several hosts
        tokens=lambda b: sum(jnp.sum(v) for v in b["valids"]) + jnp.sum(b["tail_valid"]),
        fields=["step", "loss", "grad_norm", *extra, "tokens_per_s", "eval_loss"],
        extra_metrics=lambda m: {k: float(m[k]) for k in extra},
        postfix=lambda row: {"loss": f"{row['loss']:.3f}", "tau": f"{row['gate_temperature']:.3g}"},
        eval_loss=None if eval_loss is None else lambda state: eval_loss(
            state["fuser"], receiver.params, sharer.params, eval_data.batch(np.arange(n_eval))),
        export=lambda state: save_fuser(workdir / "fuser", state["fuser"], fc, meta={
            "receiver": receiver_name, "sharer": sharer_name, "roles": [a.role for a in agents],
            "steps": int(c.steps)}),
        exports="fuser", done=f"done: fuser in {workdir / 'fuser'}"),
        c, workdir, resolved, mesh)

"""Training the C2C fuser: data, loss, optimizer, step, and the ``train`` CLI's c2c run.

Only the fuser trains: the loss is the receiver's next-token cross-entropy on the
response, read on the fused prompt cache, and ``jax.grad`` is taken with respect to
the fuser tree alone (both models are closed-over constants), so optimizer state
exists only for it. Reference hyperparameters: AdamW lr 1e-4, weight decay 0.01,
linear schedule with 10% warmup, clip 1.0; the gate temperature falls from 1.0 to
0.001 (exponentially) over the optimizer steps.

Sharer and receiver with different tokenizers: every receiver token is decoded and
re-encoded with the sharer's tokenizer, keeping the first sharer token, so both read
sequences of the same length at the same positions. Same-tokenizer pairs skip this.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffmas_jax.agents import agent_messages, render_chat
from diffmas_jax.c2c import FuserConfig, chain_cache, decays
from diffmas_jax.generation import pad_batch
from diffmas_jax.model.transformer import resolve_dtype
from diffmas_jax.stages import teacher_forced_nll


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
    eos = tokenizer.eos_token_id
    tails = [[int(prompts.lasts[-1][i])] + tokenizer(it.target, add_special_tokens=False)["input_ids"]
             [:max_target_tokens - 1] + [eos] for i, it in enumerate(items)]
    tail, tail_valid = pad_batch(tails, tokenizer.pad_token_id or 0, multiple=bucket)
    target = tail_valid.copy()
    target[:, 0] = False
    return C2CData(prompts, tail, tail_valid, target, target.sum(1))


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
             temperature=1.0, rng=None):
    """Mean receiver NLL of the target tokens, read on the fused prompt cache."""
    dtype = resolve_dtype(sc.compute_dtype)
    tail = batch["tail"]
    trace = chain_cache(fuser, sc.fc, r_params, r_cfg, s_params, s_cfg, batch["heads"], batch["valids"],
                        batch["lasts"], batch.get("s_head"), extra=tail.shape[1], train=train,
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


def make_c2c_train_step(r_cfg, s_cfg, sc: C2CStepConfig, optimizer):
    """Jitted (fuser, opt_state, r_params, s_params, batch, micro_step) -> (fuser, opt_state, metrics).

    The gate temperature and the random stream are functions of the step number, so a
    resumed run repeats an uninterrupted one; the temperature moves once per optimizer
    step (every ``grad_accum`` micro-steps).
    """
    def step(fuser, opt_state, r_params, s_params, batch, micro_step):
        tau = gate_temperature(micro_step // sc.grad_accum, sc)
        rng = jax.random.fold_in(jax.random.PRNGKey(sc.seed), micro_step)
        loss, grads = jax.value_and_grad(
            lambda f: c2c_loss(f, r_params, r_cfg, s_params, s_cfg, batch, sc, train=True, temperature=tau,
                               rng=rng))(fuser)
        updates, opt_state = optimizer.update(grads, opt_state, fuser)
        fuser = optax.apply_updates(fuser, updates)
        return fuser, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "gate_temperature": tau,
                                  "open_k": jnp.mean(fuser["k"]["gate"] > 0), "open_v": jnp.mean(fuser["v"]["gate"] > 0)}

    return jax.jit(step, donate_argnums=(0, 1))


def make_c2c_eval_loss(r_cfg, s_cfg, sc: C2CStepConfig):
    """Held-out loss as evaluation runs it: hard gates, no dropout."""
    return jax.jit(lambda fuser, r_params, s_params, batch: c2c_loss(fuser, r_params, r_cfg, s_params, s_cfg,
                                                                     batch, sc, train=False))


# --------------------------------------------------------------------------- CLI
IDENTITY_FIELDS = ("model", "receiver", "sharer", "dtype", "method", "task", "task_path", "split", "limit", "layout",
                   "roles", "fuser_hidden", "fuser_depth", "fuser_dropout", "layer_map", "gate_t0", "gate_t1",
                   "batch_size", "steps", "grad_accum", "lr", "warmup_frac", "weight_decay", "clip", "seed",
                   "max_target_tokens")


def train_c2c(c, workdir: Path) -> int:
    """``python -m diffmas_jax.train`` with ``method = c2c`` (see configs/embedded_c2c_train.py)."""
    from diffmas_jax.c2c import LAYER_MAPS, FuserConfigError, init_fuser, pair_problem, save_fuser
    from diffmas_jax.cli import UserError, enable_compilation_cache
    from diffmas_jax.config_utils import resolve_model
    from diffmas_jax.methods import MethodConfig

    for name in ("batch_size", "steps", "grad_accum", "checkpoint_every", "keep_checkpoints", "max_target_tokens",
                 "eval_every"):
        if int(c[name]) <= 0:
            raise UserError(f"{name} must be positive, got {c[name]}")
    if not c.lr > 0:
        raise UserError(f"lr must be positive, got {c.lr}")
    if not 0 <= c.warmup_frac < 1:
        raise UserError(f"warmup_frac must be in [0, 1), got {c.warmup_frac}")
    if not 0 < c.gate_t1 <= c.gate_t0:
        raise UserError(f"gate temperatures need 0 < gate_t1 <= gate_t0, got {c.gate_t0} -> {c.gate_t1}")
    if c.on_nan not in ("stop", "skip"):
        raise UserError(f"on_nan must be 'stop' or 'skip', got {c.on_nan!r}")
    receiver_name = resolve_model(c.receiver or c.model)
    sharer_name = resolve_model(c.sharer or receiver_name)
    identical = sharer_name == receiver_name
    roles = None if not c.roles else tuple(r.strip() for r in str(c.roles).split(",") if r.strip())
    try:
        agents = MethodConfig(method="c2c", layout=c.layout, roles=roles, latent_steps=0).validate().agents()
        opts = dict(hidden=int(c.fuser_hidden), depth=int(c.fuser_depth), dropout=float(c.fuser_dropout),
                    layer_map=c.layer_map)
        FuserConfig(1, 1, 1, 1, 1, 1, **opts).validate()
    except (ValueError, FuserConfigError) as e:
        raise UserError(str(e)) from None
    problem = pair_problem(len(agents), identical)
    if problem:
        raise UserError(problem)
    config_path = workdir / "config.json"
    resolved = json.loads(c.to_json())
    if config_path.exists():
        old = json.loads(config_path.read_text())
        diff = [k for k in IDENTITY_FIELDS if old.get(k) != resolved.get(k)]
        if diff:
            raise UserError(f"{workdir} holds a run with a different config ({', '.join(diff)}); use a new --workdir")

    enable_compilation_cache()
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    from tqdm import tqdm
    from diffmas_jax.checkpoint import Checkpointer, abstract_like
    from diffmas_jax.lora import count_params
    from diffmas_jax.model.loading import load_model
    from diffmas_jax.tasks import get_task

    task = get_task(c.task, **({"path": c.task_path} if c.task_path else {}))
    items = [it for it in task.load(c.split, data_dir=c.data_dir, limit=c.limit) if it.target]
    if not items:
        raise UserError(f"no training items with targets in task {c.task!r} split {c.split!r}")
    n_eval = min(int(c.eval_items), len(items) // 5)
    eval_items, train_items = items[:n_eval], items[n_eval:]
    if len(train_items) < c.batch_size:
        raise UserError(f"{len(train_items)} training items is fewer than batch_size {c.batch_size}")
    receiver = load_model(receiver_name, dtype=c.dtype)
    sharer = receiver if identical else load_model(sharer_name, dtype=c.dtype)
    enc = dict(answer_instruction=task.answer_instruction, agents=agents, max_target_tokens=int(c.max_target_tokens),
               enable_thinking=c.enable_thinking, sharer_tokenizer=None if identical else sharer.tokenizer)
    data = encode_training(receiver.tokenizer, train_items, **enc)
    eval_data = encode_training(receiver.tokenizer, eval_items, **enc) if n_eval else None
    fc = FuserConfig.for_models(sharer.cfg, receiver.cfg, **opts)
    opt_steps = -(-int(c.steps) // int(c.grad_accum))
    sc = C2CStepConfig(fc=fc, anneal_steps=opt_steps, grad_accum=int(c.grad_accum), gate_t0=float(c.gate_t0),
                       gate_t1=float(c.gate_t1), compute_dtype=c.dtype, remat=bool(c.remat), seed=int(c.seed),
                       max_target=int(max([data.n_target.max()] + ([eval_data.n_target.max()] if n_eval else []))))
    optimizer = make_c2c_optimizer(float(c.lr), opt_steps, float(c.warmup_frac), float(c.weight_decay),
                                   float(c.clip), int(c.grad_accum))
    fuser = init_fuser(fc, int(c.seed))
    opt_state = optimizer.init(fuser)

    workdir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(resolved, indent=2))
    ckpt = Checkpointer(workdir / "checkpoints", keep=int(c.keep_checkpoints))
    start = 0
    restored = ckpt.restore_latest(abstract_like({"fuser": fuser, "opt_state": opt_state}))
    if restored is not None:
        start, state, _ = restored
        fuser, opt_state = state["fuser"], state["opt_state"]
    # Fresh and restored state placed alike (Orbax hands back committed arrays): the step
    # compiles to the same program, so a resumed run hits the compilation cache.
    fuser, opt_state = jax.device_put((fuser, opt_state), jax.devices()[0])
    if restored is not None:
        print(f"resumed from step {start} ({workdir / 'checkpoints'})", flush=True)

    n, bs = len(train_items), int(c.batch_size)
    per_epoch = n // bs

    def indices(step: int):  # a function of (seed, step) alone: resuming replays the same order
        epoch, k = divmod(step, per_epoch)
        return np.random.default_rng([c.seed, epoch]).permutation(n)[k * bs:(k + 1) * bs]

    train_step = make_c2c_train_step(receiver.cfg, sharer.cfg, sc, optimizer)
    eval_loss = make_c2c_eval_loss(receiver.cfg, sharer.cfg, sc) if n_eval else None
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    from tensorboardX import SummaryWriter
    tb = SummaryWriter(str(workdir / "tensorboard"))
    csv_path = workdir / "metrics.csv"
    fields = ["step", "loss", "grad_norm", "gate_temperature", "open_k", "open_v", "tokens_per_s", "eval_loss"]
    if start == 0 or not csv_path.exists():
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)
    else:  # rows past the checkpoint will be recomputed identically
        rows = list(csv.reader(open(csv_path)))
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= start])

    print(f"training c2c ({len(agents)} agent(s), sharer {sharer_name} -> receiver {receiver_name}) on {n} items, "
          f"{count_params(fuser):,} fuser params", flush=True)
    last_good = start if restored else None
    bar = tqdm(range(start, int(c.steps)), initial=start, total=int(c.steps), desc="train c2c", dynamic_ncols=True)
    t_last = time.perf_counter()
    for step in bar:
        batch = jax.tree.map(jnp.asarray, data.batch(indices(step)))
        if c.on_nan == "skip":
            held = jax.device_get((fuser, opt_state))
        new_fuser, new_opt, m = train_step(fuser, opt_state, receiver.params, sharer.params, batch, jnp.int32(step))
        loss = float(m["loss"])
        if not math.isfinite(loss):
            if c.on_nan == "skip":  # the step donated its inputs: restore the host copies
                print(f"warning: non-finite loss at step {step + 1}; batch skipped", file=sys.stderr)
                fuser, opt_state = held
                continue
            where = f"last good checkpoint: step {last_good}" if last_good is not None else "no checkpoint yet"
            raise UserError(f"non-finite loss ({loss}) at step {step + 1}; {where}")
        fuser, opt_state = new_fuser, new_opt
        now = time.perf_counter()
        toks = int(sum(np.asarray(v).sum() for v in batch["valids"]) + np.asarray(batch["tail_valid"]).sum())
        row = {"step": step + 1, "loss": loss, "grad_norm": float(m["grad_norm"]),
               "gate_temperature": float(m["gate_temperature"]), "open_k": float(m["open_k"]),
               "open_v": float(m["open_v"]), "tokens_per_s": toks / max(now - t_last, 1e-9), "eval_loss": ""}
        t_last = now
        if eval_loss is not None and (step + 1) % int(c.eval_every) == 0:
            row["eval_loss"] = float(eval_loss(fuser, receiver.params, sharer.params,
                                               jax.tree.map(jnp.asarray, eval_data.batch(np.arange(n_eval)))))
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in fields])
        for k, v in row.items():
            if k != "step" and v != "":
                tb.add_scalar(f"train/{k}", v, step + 1)
        bar.set_postfix(loss=f"{loss:.3f}", tau=f"{row['gate_temperature']:.3g}")
        if (step + 1) % int(c.checkpoint_every) == 0 or step + 1 == int(c.steps) or stop["flag"]:
            ckpt.save(step + 1, {"fuser": fuser, "opt_state": opt_state},
                      {"step": step + 1, "data_position": (step + 1) * bs, "seed": c.seed})
            last_good = step + 1
        if stop["flag"]:
            print(f"SIGTERM: saved checkpoint at step {step + 1}; exiting", flush=True)
            tb.close()
            ckpt.close()
            return 0
    bar.close()
    tb.close()
    ckpt.close()
    save_fuser(workdir / "fuser", fuser, fc, meta={"receiver": receiver_name, "sharer": sharer_name,
                                                    "roles": [a.role for a in agents], "steps": int(c.steps)})
    print(f"done: fuser in {workdir / 'fuser'}", flush=True)
    return 0

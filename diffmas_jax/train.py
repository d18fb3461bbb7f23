"""Train DiffMAS communication (or an SFT baseline) with LoRA.

    python -m diffmas_jax.train --config configs/embedded_train.py --workdir runs/train \
        [--config.trace_grad=full --config.steps=100 ...]

Restarting with the same workdir resumes exactly (same data order, same result).
SIGTERM saves a checkpoint and exits cleanly.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from diffmas_jax.cli import UserError, config_flag_value, enable_compilation_cache, load_model_checked, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (resumes if it holds a run)")

# Fields whose change makes an existing workdir a different experiment.
IDENTITY_FIELDS = ("model", "dtype", "method", "task", "split", "limit", "layout", "roles", "latent_steps",
                   "realign", "communication", "visibility", "trace_grad", "lora_rank", "lora_alpha",
                   "lora_targets", "lora_dropout", "lora_per_role", "batch_size", "steps", "grad_accum", "lr", "seed",
                   "max_target_tokens")


def _ints(v):
    """'10' -> 10 (every upstream agent); '2,5,1' -> (2, 5, 1)."""
    if isinstance(v, int):
        return v
    try:
        vals = tuple(int(x) for x in str(v).split(",") if x.strip())
    except ValueError:
        raise UserError(f"latent_steps must be an int or a comma list of ints, got {v!r}") from None
    return vals[0] if len(vals) == 1 else vals


def _roles(v):
    return None if v in (None, "") else tuple(r.strip() for r in str(v).split(",") if r.strip())


def validate(c) -> None:
    from diffmas_jax.training import TRACE_GRADS, TRAIN_METHODS
    if c.method not in TRAIN_METHODS:
        raise UserError(f"unknown training method {c.method!r}; known: {', '.join(TRAIN_METHODS)}")
    if c.trace_grad not in TRACE_GRADS:
        raise UserError(f"unknown trace_grad {c.trace_grad!r}; known: {', '.join(TRACE_GRADS)}")
    for name in ("batch_size", "steps", "grad_accum", "checkpoint_every", "keep_checkpoints", "max_target_tokens"):
        if int(c[name]) <= 0:
            raise UserError(f"{name} must be positive, got {c[name]}")
    if not c.lr > 0:
        raise UserError(f"lr must be positive, got {c.lr}")
    if c.on_nan not in ("stop", "skip"):
        raise UserError(f"on_nan must be 'stop' or 'skip', got {c.on_nan!r}")


def upstream_notes(model, mc, train_items, eval_items, workdir: Path, max_new_tokens: int):
    """TextMAS+SFT: the upstream agents' text for every item, generated once by the base model."""
    import dataclasses as dc
    from tqdm import tqdm
    from diffmas_jax.methods import speak_upstream
    cache = workdir / "text_notes.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
    else:
        saved = {}
    mc = dc.replace(mc, method="text_mas", text_max_new_tokens=max_new_tokens)
    todo = [it for it in train_items + eval_items if it.id not in saved]
    for k in tqdm(range(0, len(todo), 8), desc="upstream text", disable=not todo):
        chunk = todo[k:k + 8]
        notes, _, _ = speak_upstream(model, [it.question for it in chunk], mc)
        saved.update({it.id: n for it, n in zip(chunk, notes)})
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved))
        os.replace(tmp, cache)
    get = lambda items: [[tuple(x) for x in saved[it.id]] for it in items]
    return get(train_items), get(eval_items)


def main(argv) -> int:
    c = config_flag_value(_CONFIG, sys.argv)
    if argv is not None and len(argv) > 1:
        raise UserError(f"unexpected arguments {list(argv[1:])}; fields are set with --config.FIELD=VALUE")
    if c is None:
        raise UserError("--config is required (e.g. configs/embedded_train.py)")
    if not _WORKDIR.value:
        raise UserError("--workdir is required")
    if c.method == "c2c":  # the fuser has its own data, step and state
        from diffmas_jax.c2c_training import train_c2c
        return train_c2c(c, Path(_WORKDIR.value))
    validate(c)
    from diffmas_jax import distributed, memory, mesh_presets
    distributed.maybe_initialize()  # on a pod: connect the hosts before anything touches a device
    main_proc = distributed.is_main_process()  # only process 0 logs and writes the workdir
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    workdir = Path(_WORKDIR.value)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} exists and is not a directory")
    config_path = workdir / "config.json"
    resolved = json.loads(c.to_json())
    if config_path.exists():
        try:
            old = json.loads(config_path.read_text())
            assert isinstance(old, dict)
        except (OSError, ValueError, AssertionError) as e:
            raise UserError(f"{config_path}: cannot read the previous run's config ({e or 'not an object'}); "
                            "use a new --workdir") from None
        diff = [k for k in IDENTITY_FIELDS if old.get(k) != resolved.get(k)]
        if diff:
            raise UserError(f"{workdir} holds a run with a different config ({', '.join(diff)}); "
                            f"use a new --workdir")

    # Everything that can fail on bad input happens before anything is written.
    enable_compilation_cache()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from diffmas_jax.checkpoint import Checkpointer, abstract_like
    from diffmas_jax.lora import (LoraConfig, LoraConfigError, count_params, export_merged, export_peft, init_lora,
                                  save_adapter)
    from diffmas_jax.methods import MethodConfig
    from diffmas_jax.model.loading import load_model
    from diffmas_jax.stages import make_realign
    from diffmas_jax.tasks import get_task
    from diffmas_jax.training import (StepConfig, batch_of, encode_items, make_eval_loss, make_optimizer,
                                      make_train_step, step_capacity)

    lcfg = LoraConfig(rank=int(c.lora_rank), alpha=float(c.lora_alpha),
                      targets=tuple(t.strip() for t in str(c.lora_targets).split(",") if t.strip()),
                      dropout=float(c.lora_dropout), per_role=bool(c.lora_per_role))
    try:
        lcfg.validate()
        mc = MethodConfig(method="latent_mas", layout=c.layout, roles=_roles(c.roles),
                          latent_steps=_ints(c.latent_steps), realign=c.realign,
                          realign_lambda=float(c.realign_lambda), communication=c.communication,
                          visibility=c.visibility, enable_thinking=c.enable_thinking,
                          compute_dtype=c.dtype).validate()
    except (LoraConfigError, ValueError) as e:
        raise UserError(str(e)) from None
    task = get_task(c.task, **({"path": c.task_path} if c.task_path else {}))
    items = [it for it in task.load(c.split, data_dir=c.data_dir, limit=c.limit) if it.target]
    if not items:
        raise UserError(f"no training items with targets in task {c.task!r} split {c.split!r}")
    n_eval = min(int(c.eval_items), len(items) // 5)
    eval_items, train_items = items[:n_eval], items[n_eval:]
    if len(train_items) < c.batch_size:
        raise UserError(f"{len(train_items)} training items is fewer than batch_size {c.batch_size}")

    memory.preflight_model(c, c.model, c.dtype)  # the weights alone must fit before they load
    mesh, place = mesh_presets.mesh_and_placer(c, c.model)  # the config's mesh (None: one device)
    from diffmas_jax.sharding import set_active_mesh
    set_active_mesh(mesh)  # traces inside the step are pinned to this mesh's sharding
    model = load_model_checked(c.model, dtype=c.dtype, place=place)  # weights straight into their shards
    notes = eval_notes = None
    if c.method == "text_mas_sft":  # the base model's upstream text, written once (cached in workdir)
        notes, eval_notes = upstream_notes(model, mc, train_items, eval_items, workdir, int(c.text_max_new_tokens))
    data, agents = encode_items(model.tokenizer, train_items, task.answer_instruction, mc, c.method,
                                int(c.max_target_tokens), notes=notes)
    eval_data, _ = encode_items(model.tokenizer, eval_items, task.answer_instruction, mc, c.method,
                                int(c.max_target_tokens), notes=eval_notes) if n_eval else (None, None)
    latent = tuple(a.latent_steps for a in agents[:-1])
    capacity = step_capacity(data, latent, c.trace_capacity)
    sc = StepConfig(method=c.method, trace_grad=c.trace_grad, roles=tuple(a.role for a in agents),
                    latent_steps=latent, up_lengths=tuple(t.shape[1] for t in data.up_tokens),
                    solver_length=data.tokens.shape[1], capacity=capacity, lora_scale=lcfg.scale,
                    communication=c.communication, visibility=c.visibility, remat=bool(c.remat),
                    compute_dtype=c.dtype, lora_dropout=lcfg.dropout,
                    max_target=int(max([data.n_target.max()] + ([eval_data.n_target.max()] if n_eval else []))))
    optimizer = make_optimizer(float(c.lr), int(c.steps), int(c.warmup_steps), float(c.weight_decay),
                               float(c.clip), int(c.grad_accum))
    lora = init_lora(model.cfg, lcfg, jax.random.PRNGKey(c.seed), roles=sc.roles)
    opt_state = optimizer.init(lora)
    if mesh is not None:  # replicated, as the step returns them: every step reuses one executable
        from diffmas_jax.sharding import replicate
        lora, opt_state = replicate(lora, mesh), replicate(opt_state, mesh)
    realign = make_realign(model.params, model.cfg, c.realign, float(c.realign_lambda))
    memory.preflight_train(model.cfg, c, sc, lcfg)  # per-device estimate before compiling; error if it cannot fit

    workdir.mkdir(parents=True, exist_ok=True)
    if main_proc:
        tmp = config_path.with_name(f".config.json.{os.getpid()}.tmp")  # atomic: a kill leaves old or new
        tmp.write_text(json.dumps(resolved, indent=2))
        os.replace(tmp, config_path)
    ckpt = Checkpointer(workdir / "checkpoints", keep=int(c.keep_checkpoints))
    start = 0
    restored = ckpt.restore_latest(abstract_like({"lora": lora, "opt_state": opt_state}))
    if restored is not None:
        start, state, meta = restored
        lora, opt_state = state["lora"], state["opt_state"]
        print(f"resumed from step {start} ({workdir / 'checkpoints'})", flush=True)

    n = len(train_items)
    per_epoch = n // c.batch_size

    def indices(step: int):
        # The data order is a function of (seed, step) alone: resuming replays it exactly.
        epoch, k = divmod(step, per_epoch)
        perm = np.random.default_rng([c.seed, epoch]).permutation(n)
        return perm[k * c.batch_size:(k + 1) * c.batch_size]

    train_step = make_train_step(model.cfg, sc, optimizer, mesh)
    eval_loss = make_eval_loss(model.cfg, sc) if n_eval else None
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))

    from tensorboardX import SummaryWriter
    tb = SummaryWriter(str(distributed.output_dir(workdir) / "tensorboard"))
    csv_path = distributed.output_dir(workdir) / "metrics.csv"
    fields = ["step", "loss", "grad_norm", "tokens_per_s", "eval_loss"] + \
        [f"seg_grad_{j}_{r}" for j, r in enumerate(sc.roles[:-1])]
    if start == 0 or not csv_path.exists():
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)
    else:  # drop rows past the checkpoint: they will be recomputed identically
        rows = list(csv.reader(open(csv_path)))
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= start]
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows(keep)

    if main_proc:
        print(f"training {c.method} (trace_grad={c.trace_grad}) on {n} items, {count_params(lora):,} LoRA params, "
              f"trace capacity {capacity}", flush=True)
    last_good = start if restored else None
    bar = tqdm(range(start, int(c.steps)), initial=start, total=int(c.steps), desc="train", dynamic_ncols=True,
               disable=not main_proc)
    t_last = time.perf_counter()
    for step in bar:
        # Each host reads only its rows of the global batch (all of them on a single host).
        batch = distributed.global_batch(batch_of(data, distributed.local_indices(indices(step))), mesh)
        if c.on_nan == "skip":
            host_lora, host_opt = jax.device_get((lora, opt_state))
        # Dropout masks, like the data order, are a function of (seed, step) alone.
        drop_rng = jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), step) if lcfg.dropout > 0 else None
        new_lora, new_opt, m = train_step(lora, opt_state, model.params, realign, batch, drop_rng)
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(gnorm)):  # a finite loss with a NaN gradient poisons too
            where = f"last good checkpoint: step {last_good}" if last_good is not None else "no checkpoint yet"
            what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({gnorm}, loss {loss:.4g})"
            if c.on_nan == "skip":
                # The step donated its inputs, so keep the pre-step values we still hold on host.
                print(f"warning: non-finite {what} at step {step + 1}; batch skipped", file=sys.stderr)
                lora, opt_state = host_lora, host_opt
                continue
            raise UserError(f"non-finite {what} at step {step + 1}; {where}")
        lora, opt_state = new_lora, new_opt
        now = time.perf_counter()
        # jnp sums: the batch may be a global array spread over several hosts
        toks = int(jnp.sum(batch["valid"]) + sum(jnp.sum(v) for v in batch["up_valid"]))
        tps = toks / max(now - t_last, 1e-9)
        t_last = now
        row = {"step": step + 1, "loss": loss, "grad_norm": float(m["grad_norm"]), "tokens_per_s": tps, "eval_loss": ""}
        for j, v in enumerate(np.asarray(m["segment_grad_norms"]).tolist()):
            row[f"seg_grad_{j}_{sc.roles[j]}"] = v
        if eval_loss is not None and (step + 1) % int(c.eval_every) == 0:
            row["eval_loss"] = float(eval_loss(lora, model.params, realign,
                                               jax.tree.map(jnp.asarray, batch_of(eval_data, np.arange(n_eval)))))
            tb.add_scalar("eval/loss", row["eval_loss"], step + 1)
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in fields])
        for k, v in row.items():
            if k != "step" and v != "":
                tb.add_scalar(f"train/{k}", v, step + 1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}")
        done = step + 1 == int(c.steps)
        if (step + 1) % int(c.checkpoint_every) == 0 or done or stop["flag"]:
            ckpt.save(step + 1, {"lora": lora, "opt_state": opt_state},
                      {"step": step + 1, "data_position": (step + 1) * c.batch_size, "seed": c.seed})
            last_good = step + 1
        if stop["flag"]:
            print(f"SIGTERM: saved checkpoint at step {step + 1}; exiting", flush=True)
            tb.close()
            ckpt.close()
            return 0
    bar.close()
    tb.close()
    ckpt.close()
    if not main_proc:
        return 0
    try:
        save_adapter(workdir / "adapter", lora, lcfg, extra={"model": c.model, "roles": list(sc.roles),
                                                             "trace_grad": c.trace_grad, "method": c.method})
        if c.export_peft and not lcfg.per_role:
            export_peft(workdir / "peft", lora, lcfg, model.cfg, base_model=str(model.path))
        if c.get("export_merged") and not lcfg.per_role:  # a plain HF checkpoint with the LoRA folded in
            export_merged(workdir / "merged", model.params, lora, lcfg.scale, model.cfg, model.path)
    except Exception as e:  # disk full while exporting: the final checkpoint is intact, a rerun exports again
        from diffmas_jax.cli import WriteError, environment_cause
        if environment_cause(e) is None:
            raise
        raise WriteError(f"cannot write the adapter exports in {workdir}: {environment_cause(e)}; "
                         f"checkpoint step {last_good} is intact: free space and rerun to export") from None
    print(f"done: adapter in {workdir / 'adapter'}", flush=True)
    return 0


def _parse_flags(argv):
    """absl flag parsing; a bad flag or config file is one 'error:' line (exit 2), not FATAL + usage."""
    from diffmas_jax.cli import parse_config_flags
    try:
        return parse_config_flags(flags.FLAGS, _CONFIG, argv)[0]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def entry():
    flags.mark_flags_as_required([])
    app.run(lambda argv: run_cli(lambda _: main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()

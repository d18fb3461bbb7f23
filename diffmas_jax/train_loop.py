"""The training loop both trainers run: DiffMAS LoRA (``train.py``) and the C2C fuser
(``c2c_training.py``).

Shared here: the workdir's config check, checkpoint resume (a damaged latest
checkpoint falls back to an earlier one), the data order, SIGTERM, non-finite
losses, metrics.csv and TensorBoard, the held-out loss, the progress bar and the
final export. A trainer brings what differs as a :class:`Trainer`.
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
from typing import Any, Callable, Optional, Sequence

import numpy as np

from diffmas_jax.cli import UserError


def finite_number(c, name: str) -> float:
    """``c[name]`` as a float; UserError unless it is a finite number (NaN and inf are refused)."""
    from diffmas_jax.config_utils import is_finite_number
    v = c[name]
    if not is_finite_number(v):
        raise UserError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def require_fields(c, fields: Sequence[str], kind: str, example: str) -> None:
    """UserError naming the fields a trainer reads that the config file lacks (another kind of config)."""
    missing = [f for f in fields if f not in c]
    if not missing:
        return
    from diffmas_jax.cli import config_path_arg
    path = config_path_arg(sys.argv) or "the config"
    shown = missing if len(missing) <= 12 else missing[:10] + [f"... {len(missing) - 10} more"]
    raise UserError(f"{path} is not a {kind} config: missing field(s) {shown}; use {example}")


def validate_loop_fields(c, positive: Sequence[str] = ()) -> None:
    """The config fields the loop and the optimizer read; UserError naming the first bad one.

    Fields a config lacks are skipped here (``require_fields`` reports them)."""
    for name in ("batch_size", "steps", "grad_accum", "checkpoint_every", "keep_checkpoints", "max_target_tokens",
                 *positive):
        if int(c[name]) <= 0:
            raise UserError(f"{name} must be positive, got {c[name]}")
    if int(c.steps) % int(c.grad_accum):
        raise UserError(f"steps ({c.steps} micro-batches) must be a multiple of grad_accum ({c.grad_accum}): "
                        f"the last {int(c.steps) % int(c.grad_accum)} would never reach the optimizer")
    if int(c.eval_every) < 0:
        raise UserError(f"eval_every must be >= 0 (0: no held-out loss), got {c.eval_every}")
    if "eval_items" in c and int(c.eval_items) < 0:
        raise UserError(f"eval_items must be >= 0 (0: no held-out items), got {c.eval_items}")
    if not finite_number(c, "lr") > 0:
        raise UserError(f"lr must be positive, got {c.lr}")
    if "clip" in c and not finite_number(c, "clip") > 0:
        raise UserError(f"clip (the global gradient-norm bound) must be positive, got {c.clip}")
    if "weight_decay" in c and finite_number(c, "weight_decay") < 0:
        raise UserError(f"weight_decay must be >= 0, got {c.weight_decay}")
    if c.on_nan not in ("stop", "skip"):
        raise UserError(f"on_nan must be 'stop' or 'skip', got {c.on_nan!r}")
    if c.get("device_memory_gib") is not None and not finite_number(c, "device_memory_gib") > 0:
        raise UserError(f"device_memory_gib must be positive, got {c.device_memory_gib}")


# How training targets are tokenized (training.encode_target), recorded in a run's config.json:
# before 2026-12-08 a target cut at max_target_tokens still ended with EOS, so a run begun then
# is not resumed with targets encoded this way (its steps would mix the two).
TARGET_ENCODING = "cut-without-eos"


def check_workdir(workdir: Path, resolved: dict, identity_fields: Sequence[str]) -> None:
    """Before anything is written: refuse a workdir that holds another experiment, or
    that is (or lies inside) a file. Records ``target_encoding`` in ``resolved`` (and so in
    the config.json the run writes) and compares it with the previous run's."""
    resolved["target_encoding"] = TARGET_ENCODING
    identity_fields = tuple(identity_fields) + ("target_encoding",)
    from diffmas_jax.cli import check_workdir_path
    check_workdir_path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        return
    try:
        old = json.loads(config_path.read_text())
        assert isinstance(old, dict)
    except (OSError, ValueError, AssertionError) as e:
        raise UserError(f"{config_path}: cannot read the previous run's config ({e or 'not an object'}); "
                        "use a new --workdir") from None
    diff = [k for k in identity_fields if old.get(k) != resolved.get(k)]
    if diff:
        raise UserError(f"{workdir} holds a run with a different config ({', '.join(diff)}); use a new --workdir")


def split_items(c):
    """(task, train items, held-out items): items with targets; the first ``eval_items`` (at most a fifth) held out.

    Task errors that name the task's own options (``path``) are told in the training
    config's words (``task_path``)."""
    from diffmas_jax.tasks import TaskError, get_task
    try:
        task = get_task(c.task, **({"path": c.task_path} if c.task_path else {}))
    except TaskError as e:
        if c.task_path and "does not take option(s) ['path']" in str(e):
            raise UserError(f"task {c.task!r} reads no file, but task_path is set ({c.task_path}); "
                            "unset --config.task_path or use --config.task=jsonl") from None
        raise
    try:
        loaded = task.load(c.split, data_dir=c.data_dir, limit=c.limit)
    except TaskError as e:
        if "pass path=" in str(e):
            raise UserError(f"task {c.task!r} needs a file: set --config.task_path=<file.jsonl> "
                            f"(or --config.data_dir=<dir> containing {c.split}.jsonl)") from None
        raise
    items = [it for it in loaded if it.target]
    if not items:
        raise UserError(f"no training items with targets in task {c.task!r} split {c.split!r}")
    n_eval = min(int(c.eval_items), len(items) // 5)
    eval_items, train_items = items[:n_eval], items[n_eval:]
    if len(train_items) < c.batch_size:
        raise UserError(f"{len(train_items)} training items is fewer than batch_size {c.batch_size}")
    return task, train_items, eval_items


def resume_metrics(csv_path: Path, fields: Sequence[str], start: int) -> None:
    """metrics.csv for a run starting at step ``start``: the header and the rows up to ``start``
    (later rows will be recomputed identically). An empty, damaged or missing file (a crash can
    leave one) gets the header; rows that do not parse are dropped. Replaced atomically."""
    rows = []
    if start > 0:
        try:
            with open(csv_path, newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, csv.Error, UnicodeDecodeError, ValueError):
            rows = []
    keep = []
    if rows and rows[0] == list(fields):  # another header: the columns cannot be trusted
        for r in rows[1:]:
            try:
                ok = len(r) == len(fields) and int(r[0]) <= start
            except ValueError:
                ok = False
            if ok:
                keep.append(r)
    tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([list(fields)] + keep)
    os.replace(tmp, csv_path)


def accumulation_weight(window_tokens: Sequence[int], j: int) -> float:
    """k * (micro-batch j's target tokens) / (its window's): optax.MultiSteps averages the k
    gradients of per-token means, so weighted so the update is the window's per-token mean,
    as one batch of all k micro-batches would give (not a mean of per-micro-batch means)."""
    return len(window_tokens) * window_tokens[j] / max(sum(window_tokens), 1)


@dataclasses.dataclass
class Trainer:
    """What a trainer brings to :func:`run`."""
    label: str                                  # progress bar, e.g. "train c2c"
    banner: str                                 # printed once before the first step
    state: dict                                 # trainable pytrees, e.g. {"lora": ..., "opt_state": ...}
    n_items: int                                # training items (the data order permutes these)
    batch: Callable[[np.ndarray], Any]          # item indices -> host rows of a batch
    step: Callable[..., tuple]                  # (state, batch, step[, grad_weight=]) -> (state, metrics with loss, grad_norm)
    tokens: Callable[[Any], Any]                # tokens in a batch, for tokens/s
    fields: Sequence[str]                       # metrics.csv columns, in order
    extra_metrics: Callable[[dict], dict]       # step metrics -> columns beyond loss, grad_norm, tokens/s, eval
    postfix: Callable[[dict], dict]             # a metrics row -> progress bar postfix
    export: Callable[[dict], None]              # writes the run's outputs from the final state (process 0)
    exports: str                                # what export writes, for its error message
    done: str                                   # printed after the export
    eval_loss: Optional[Callable[[dict], Any]] = None   # state -> held-out loss
    # item indices -> target tokens; with it, grad_accum > 1 weights each micro-batch by its
    # share of the window's tokens (step gets grad_weight=), so k micro-batches of b update
    # as one batch of k*b whose loss is a per-token mean
    target_tokens: Optional[Callable[[np.ndarray], int]] = None


def scalar_writer(logdir: Path):
    """tensorboardX's ``SummaryWriter`` for the loop's scalars.

    Its module imports torch where torch is installed, only to recognise torch tensors: 2 s and
    about 200 MB of a training process that logs Python floats. Unless something already loaded
    torch, it is hidden from that one import (``import torch`` raises ImportError, which
    tensorboardX handles) and visible again afterwards."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide and sys.modules.get("torch", False) is None:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir))


def any_host(flag: bool) -> bool:
    """``flag`` OR-ed over all hosts, the same answer on each. SIGTERM reaches hosts at different
    steps: a host that saved (an Orbax barrier) while another ran the next step (a collective)
    would deadlock both. One tiny all-gather per step, and none on a single host."""
    import jax
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def run(tr: Trainer, c, workdir: Path, resolved: dict, mesh=None) -> int:
    """Train ``tr`` for ``c.steps`` steps in ``workdir``, resuming from its latest intact checkpoint.

    The data order is a function of (seed, step) alone, so a resumed run replays an
    uninterrupted one. SIGTERM saves a checkpoint and returns 0."""
    import jax
    from tqdm import tqdm

    from diffmas_jax import distributed
    from diffmas_jax.checkpoint import Checkpointer, abstract_like

    if c.on_nan == "skip" and int(c.grad_accum) > 1 and tr.target_tokens is None:
        # a skipped micro-batch becomes a zero-weight micro-step, which needs step(grad_weight=)
        raise UserError(f"on_nan=skip with grad_accum > 1 is not supported by {tr.label!r} (its step takes no "
                        "gradient weight); use on_nan=stop or grad_accum=1")
    main_proc = distributed.is_main_process()  # only process 0 logs and writes the workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if main_proc:
        config_path = workdir / "config.json"
        tmp = config_path.with_name(f".config.json.{os.getpid()}.tmp")  # atomic: a kill leaves old or new
        tmp.write_text(json.dumps(resolved, indent=2))
        os.replace(tmp, config_path)

    # Fresh and restored state placed alike (replicated on a mesh, as the steps return it;
    # else this host's first device, as Orbax restores): every step reuses one executable.
    if mesh is not None:
        from diffmas_jax.sharding import replicate
        place = lambda s: replicate(s, mesh)  # noqa: E731
    else:
        place = lambda s: jax.device_put(s, jax.local_devices()[0])  # noqa: E731
    state = place(tr.state)
    ckpt = Checkpointer(workdir / "checkpoints", keep=int(c.keep_checkpoints))
    start = 0
    restored = ckpt.restore_latest(abstract_like(state))
    if restored is not None:
        start, state, _ = restored
        state = place(state)
        print(f"resumed from step {start} ({workdir / 'checkpoints'})", flush=True)

    n, bs = tr.n_items, int(c.batch_size)
    per_epoch = n // bs

    def indices(step: int):
        epoch, k = divmod(step, per_epoch)
        return np.random.default_rng([c.seed, epoch]).permutation(n)[k * bs:(k + 1) * bs]

    accum = int(c.grad_accum)
    window: dict = {}  # first micro-step of the current window -> its micro-batches' target tokens

    def grad_weight(step: int) -> Optional[float]:
        if accum == 1 or tr.target_tokens is None:
            return None
        first = step - step % accum
        if first not in window:  # once per window, not once per micro-batch
            window.clear()
            window[first] = [tr.target_tokens(indices(j)) for j in range(first, first + accum)]
        return accumulation_weight(window[first], step - first)

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    out = distributed.output_dir(workdir)
    tb = scalar_writer(out / "tensorboard")
    csv_path = out / "metrics.csv"
    resume_metrics(csv_path, tr.fields, start)  # drop rows past the checkpoint

    if main_proc:
        print(tr.banner, flush=True)
    last_good = start if restored else None
    steps = int(c.steps)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=tr.label, dynamic_ncols=True,
               disable=not main_proc)
    t_last = time.perf_counter()

    def batch_at(step: int):
        # Each host reads only its rows of the global batch (all of them on a single host).
        return distributed.global_batch(tr.batch(distributed.local_indices(indices(step))), mesh)

    good = None  # the last micro-step whose gradient was finite

    def zero_weight_step(held: dict, step: int, where: str) -> dict:
        """A skipped micro-batch as a micro-step of weight 0, so the optimizer's micro-step count
        and the loop's windows stay aligned (a skipped last micro-step still applies the window's
        update). 0 * NaN is NaN: the zero weight rides on a micro-batch whose gradient was finite."""
        j = good if good is not None else step - 1 if step > 0 else step + 1
        st, m = tr.step(held, batch_at(j), j, grad_weight=0.0)
        if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
            raise UserError(f"non-finite loss at step {step + 1}, and at step {j + 1} standing in for it "
                            f"with weight 0: the weights themselves are non-finite; {where}")
        return st

    for step in bar:
        batch = batch_at(step)
        if c.on_nan == "skip":
            held = jax.device_get(state)
        w = grad_weight(step)
        new_state, m = tr.step(state, batch, step) if w is None else tr.step(state, batch, step, grad_weight=w)
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        if math.isfinite(loss) and math.isfinite(gnorm):  # a finite loss with a NaN gradient poisons too
            state, good = new_state, step
            now = time.perf_counter()
            tps = int(tr.tokens(batch)) / max(now - t_last, 1e-9)
            t_last = now
            row = {"step": step + 1, "loss": loss, "grad_norm": gnorm, "tokens_per_s": tps, "eval_loss": "",
                   **tr.extra_metrics(m)}
            if tr.eval_loss is not None and int(c.eval_every) > 0 and (step + 1) % int(c.eval_every) == 0:
                row["eval_loss"] = float(tr.eval_loss(state))
                tb.add_scalar("eval/loss", row["eval_loss"], step + 1)
            with open(csv_path, "a", newline="") as f:
                csv.writer(f).writerow([row.get(k, "") for k in tr.fields])
            for k, v in row.items():
                if k != "step" and v != "":
                    tb.add_scalar(f"train/{k}", v, step + 1)
            bar.set_postfix(**tr.postfix(row))
        else:
            where = f"last good checkpoint: step {last_good}" if last_good is not None else "no checkpoint yet"
            what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({gnorm}, loss {loss:.4g})"
            if c.on_nan != "skip":
                raise UserError(f"non-finite {what} at step {step + 1}; {where}")
            # The step donated its inputs, so go on from the pre-step values we still hold on host.
            print(f"warning: non-finite {what} at step {step + 1}; batch skipped", file=sys.stderr)
            state = held if accum == 1 else zero_weight_step(held, step, where)
        # A skipped step too: the cadence's checkpoint and SIGTERM, decided alike on every host.
        stopping = any_host(stop["flag"])
        if (step + 1) % int(c.checkpoint_every) == 0 or step + 1 == steps or stopping:
            ckpt.save(step + 1, state, {"step": step + 1, "data_position": (step + 1) * bs, "seed": c.seed})
            last_good = step + 1
        if stopping:
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
        tr.export(state)
    except Exception as e:  # disk full while exporting: the final checkpoint is intact, a rerun exports again
        from diffmas_jax.cli import WriteError, environment_cause
        if environment_cause(e) is None:
            raise
        raise WriteError(f"cannot write the {tr.exports} in {workdir}: {environment_cause(e)}; "
                         f"checkpoint step {last_good} is intact: free space and rerun to export") from None
    print(tr.done, flush=True)
    return 0

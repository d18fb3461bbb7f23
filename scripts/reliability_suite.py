#!/usr/bin/env python
"""The reliability suite: fault injection, a bad-input sweep, NaN/inf injection and
sandbox escape attempts, with every case's result recorded.

    nice -n 10 .venv/bin/python scripts/reliability_suite.py            # everything (~15-20 min on 2 CPU cores)
    .venv/bin/python scripts/reliability_suite.py --sections bad_inputs,sandbox --out /tmp/rel

Sections (``--sections``, comma separated; default all):

faults      A tiny training run (random 2-layer model, 16 steps) is SIGKILLed at
            ``--kills`` (default 12) moments: during start-up, mid-step, during a
            checkpoint write (a harness slows Orbax's tmp-dir create/finalize so the
            kill lands while ``<step>.orbax-checkpoint-tmp`` exists) and during the
            final export. After every kill each ``<step>`` checkpoint directory must
            restore with a matching checksum; the run is restarted until it finishes,
            and its adapter must equal an uninterrupted run's (max abs diff <= 1e-6)
            with every step logged exactly once. Then: a damaged latest checkpoint
            (garbage data file, bit flip, missing metadata, emptied directory) must make
            the run fall back to the previous one with a warning and still end with the
            reference adapter; an evaluation killed at random moments must resume with
            no item lost or duplicated and the same outputs as an uninterrupted run; a
            full disk during a checkpoint write (RLIMIT_FSIZE in the child, portable; and
            a real tiny tmpfs filled to the brim where ``mount`` is permitted) and during
            the adapter export must end with one ``error:`` line, leave the previous
            checkpoint intact, and resume to the reference adapter once space is back.
bad_inputs  At least 40 bad configs, CLI flags, data files, model directories and
            workdirs for the train / evaluate / generate CLIs. Each must exit non-zero
            with exactly one ``error:`` line (the last line of stderr) naming the
            problem, no traceback, and leave the workdir (and every input) byte-for-byte
            as it was.
nan         NaN / inf injected into a training step at a random step k (NaN loss, inf
            loss, finite loss with a NaN gradient, and a real overflow from lr=1e38):
            with ``on_nan=stop`` the run must stop naming step k and the last good
            checkpoint (which must hold finite values); with ``on_nan=skip`` it must
            warn about step k, skip it and finish with a finite adapter.
sandbox     Escape attempts against ``diffmas_jax.tasks.sandbox.run_code`` beyond the
            basic tests: environment secrets, a root-only secret file, writing to the
            home directory and the repository, detached processes (setsid + double
            fork), file-descriptor exhaustion, filling the disk and /dev/shm, and ctypes
            calls into libc (setuid, kill, kill(-1), ptrace, unshare + umount, mount).
            Each runs from a separate evaluator process so a failure cannot take the
            suite down; what the code saw is recorded.

Writes ``OUT/summary.json`` (every case: section, case, expected, observed, pass,
seconds) and ``OUT/README.md`` (the same as tables), and prints progress (tqdm).
Exit status 0 when every case passes, 1 otherwise.

``tests/test_reliability.py`` imports this file and runs a fast subset in CI.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN_CFG = str(REPO / "configs" / "embedded_train.py")
EVAL_CFG = str(REPO / "configs" / "embedded_eval.py")
TMP_MARK = ".orbax-checkpoint-tmp"


# ============================================================================ harness
# `python reliability_suite.py _harness SPEC_JSON MODULE [ARGS...]` runs a CLI module
# (diffmas_jax.train) with faults injected from inside the process:
#   slow_ckpt: seconds   sleep after every Orbax tmp-dir create and before every finalize
#   disk_full: {"at": "save"|"adapter", "step": k, "how": "fsize"|"fill", "fill_dir": D}
#   nan: {"step": k, "kind": "nan"|"inf"|"grad"}
def _harness(spec: dict, module: str, args: list) -> None:
    if spec.get("slow_ckpt"):
        delay = float(spec["slow_ckpt"])
        from orbax.checkpoint._src.path import atomicity
        cls = atomicity.AtomicRenameTemporaryPath
        orig_create, orig_finalize = cls.create, cls.finalize

        async def create(self, *a, **k):
            out = await orig_create(self, *a, **k)
            time.sleep(delay)
            return out

        async def finalize(self, *a, **k):
            time.sleep(delay)
            return await orig_finalize(self, *a, **k)
        cls.create, cls.finalize = create, finalize

    if spec.get("disk_full"):
        df = spec["disk_full"]

        def make_disk_full():
            if df["how"] == "fsize":  # every file may now grow to 2 KiB at most: writes fail with EFBIG
                import resource
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            else:  # fill the (tiny tmpfs) file system until ENOSPC
                fd = os.open(os.path.join(df["fill_dir"], "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                for chunk in (1 << 16, 512, 1):
                    try:
                        while True:
                            os.write(fd, b"\0" * chunk)
                    except OSError:
                        pass
                os.close(fd)

        if df["at"] == "save":
            from diffmas_jax import checkpoint
            orig_save = checkpoint.Checkpointer.save

            def save(self, step, state, meta):
                if step == int(df["step"]):
                    make_disk_full()
                return orig_save(self, step, state, meta)
            checkpoint.Checkpointer.save = save
        else:
            from diffmas_jax import lora
            orig_sa = lora.save_adapter

            def save_adapter(*a, **k):
                make_disk_full()
                return orig_sa(*a, **k)
            lora.save_adapter = save_adapter

    if spec.get("nan"):
        nn = spec["nan"]
        from diffmas_jax import training
        orig_make = training.make_train_step

        def make_train_step(*a, **k):
            real = orig_make(*a, **k)
            calls = [0]

            def step(lora, opt_state, params, *rest, **kw):
                import jax
                import jax.numpy as jnp
                calls[0] += 1
                if calls[0] != int(nn["step"]):
                    return real(lora, opt_state, params, *rest, **kw)
                if nn["kind"] == "nan":  # a real NaN through the real step: poisoned weights
                    params = jax.tree.map(lambda x: x * jnp.nan, params)
                    return real(lora, opt_state, params, *rest, **kw)
                new_lora, new_opt, m = real(lora, opt_state, params, *rest, **kw)
                m = dict(m)
                if nn["kind"] == "inf":
                    m["loss"] = jnp.asarray(jnp.inf, jnp.float32)
                else:  # finite loss, non-finite gradient: the update poisons the adapter
                    m["grad_norm"] = jnp.asarray(jnp.nan, jnp.float32)
                    new_lora = jax.tree.map(lambda x: x * jnp.nan, new_lora)
                return new_lora, new_opt, m
            return step
        training.make_train_step = make_train_step

    sys.argv = [module, *args]
    import runpy
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# ============================================================================ helpers
@dataclasses.dataclass
class Result:
    section: str
    case: str
    expected: str
    observed: str
    passed: bool
    seconds: float = 0.0
    details: dict = dataclasses.field(default_factory=dict)


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONWARNINGS", None)
    return env


def run(cmd: list, timeout: float = 300, cwd=REPO, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or child_env())


def harness_cmd(spec: dict, module: str, args: list) -> list:
    return [PY, str(Path(__file__).resolve()), "_harness", json.dumps(spec), module, *args]


def tree_digest(path: Path) -> Optional[dict]:
    """Every file and directory under `path` with a content hash (None if absent)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def judge_error(rc: int, stderr: str, expected: list[str]) -> tuple[bool, str]:
    """One `error:` line, last on stderr, naming the problem; non-zero exit; no traceback."""
    errs = error_lines(stderr)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    problems = []
    if rc == 0:
        problems.append("exit 0")
    if len(errs) != 1:
        problems.append(f"{len(errs)} error lines")
    elif lines[-1] != errs[0]:
        problems.append("error line is not last")
    if "Traceback" in stderr or "FATAL" in stderr:
        problems.append("traceback on stderr")
    missing = [e for e in expected if not errs or e.lower() not in errs[0].lower()]
    if missing:
        problems.append(f"message lacks {missing}")
    shown = errs[0] if len(errs) == 1 else (lines[-1] if lines else "(no stderr)")
    observed = f"exit {rc}: {shown[:300]}" + (f" [{'; '.join(problems)}]" if problems else "")
    return not problems, observed


def make_tiny_model(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random 2-layer llama with the embedded model's tokenizer (vocab 49152): no torch needed."""
    import numpy as np
    from safetensors.numpy import save_file
    from diffmas_jax.model.loading import resolve_model_dir
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src = resolve_model_dir("embedded")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    vocab, inter, heads, kv = 49152, 48, 4, 2
    head_dim = hidden // heads
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 1024,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    w = lambda *shape: (0.5 * rng.standard_normal(shape)).astype(np.float32)
    t = {"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                  p + "self_attn.k_proj.weight": w(kv * head_dim, hidden),
                  p + "self_attn.v_proj.weight": w(kv * head_dim, hidden),
                  p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                  p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                  p + "mlp.down_proj.weight": w(hidden, inter),
                  p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32),
                  p + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)})
    save_file(t, str(path / "model.safetensors"))
    return path


# ---------------------------------------------------------------- training helpers
def train_args(model: Path, workdir: Path, steps: int = 16, every: int = 2, extra=()) -> list:
    return ["--config", TRAIN_CFG, "--workdir", str(workdir), f"--config.model={model}", "--config.limit=40",
            "--config.batch_size=2", f"--config.steps={steps}", f"--config.checkpoint_every={every}",
            "--config.keep_checkpoints=2", "--config.latent_steps=2", "--config.roles=planner,solver",
            "--config.eval_every=8", "--config.max_target_tokens=24", "--config.warmup_steps=2", *extra]


def train_cmd(model, workdir, **kw) -> list:
    return [PY, "-m", "diffmas_jax.train", *train_args(model, workdir, **kw)]


def abstract_state(model: Path):
    """The (lora, opt_state) structure train.py checkpoints for train_args' config."""
    import jax
    from diffmas_jax.checkpoint import abstract_like
    from diffmas_jax.lora import LoraConfig, init_lora
    from diffmas_jax.model.loading import load_config
    from diffmas_jax.training import make_optimizer
    lcfg = LoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    lora = init_lora(load_config(Path(model)), lcfg, jax.random.PRNGKey(0), roles=("planner", "solver"))
    opt = make_optimizer(1e-3, 16, 2, 0.0, 1.0, 1)
    return abstract_like({"lora": lora, "opt_state": opt.init(lora)})


def check_checkpoints(ckdir: Path, abstract) -> dict:
    """Read-only check of every <step> directory: restores and matches its checksum."""
    import numpy as np
    import orbax.checkpoint as ocp
    from diffmas_jax.checkpoint import CHECKSUM_KEY, state_digest
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns that a read-only manager is read-only
    out = {"steps": [], "unreadable": [], "tmp": [], "nonfinite": []}
    if not ckdir.exists():
        return out
    out["tmp"] = sorted(p.name for p in ckdir.iterdir() if TMP_MARK in p.name)
    steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    if not steps:
        return out
    mgr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(read_only=True))
    for s in steps:
        try:
            r = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                      meta=ocp.args.JsonRestore()))
            want = dict(r["meta"]).get(CHECKSUM_KEY)
            if want is not None and state_digest(r["state"]) != want:
                raise ValueError("checksum mismatch")
            out["steps"].append(s)
            import jax
            if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(r["state"]["lora"])):
                out["nonfinite"].append(s)
        except Exception as e:  # noqa: BLE001 - recorded
            out["unreadable"].append(f"{s}: {type(e).__name__}: {str(e)[:120]}")
    mgr.close()
    return out


def adapter_diff(a: Path, b: Path) -> float:
    import numpy as np
    from safetensors.numpy import load_file
    x, y = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    if set(x) != set(y):
        return float("inf")
    return max(float(np.abs(x[k].astype(np.float64) - y[k]).max()) for k in x)


def adapter_finite(a: Path) -> bool:
    import numpy as np
    from safetensors.numpy import load_file
    return all(np.isfinite(v).all() for v in load_file(str(a / "adapter.safetensors")).values())


def metric_steps(workdir: Path) -> list[int]:
    rows = (workdir / "metrics.csv").read_text().strip().splitlines()[1:]
    return [int(r.split(",")[0]) for r in rows if r]


def latest_step(ckdir: Path) -> int:
    steps = [int(p.name) for p in ckdir.iterdir() if p.name.isdigit()] if ckdir.exists() else []
    return max(steps, default=0)


def wait_for(pred: Callable[[], bool], proc: subprocess.Popen, timeout: float, poll: float = 0.02) -> bool:
    """True when pred() holds while proc is alive; False if proc ended or time ran out."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        try:
            if pred():
                return True
        except OSError:
            pass
        time.sleep(poll)
    return False


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL; True if the process was still running."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


class Ctx:
    def __init__(self, ws: Path, seed: int, progress: bool = True, only: str = ""):
        self.ws, self.rng, self.progress, self.only = ws, random.Random(seed), progress, only
        self._model = None
        self._ref = None
        self._abstract = None

    @property
    def model(self) -> Path:
        if self._model is None:
            self._model = make_tiny_model(self.ws / "tiny_model")
        return self._model

    @property
    def abstract(self):
        if self._abstract is None:
            self._abstract = abstract_state(self.model)
        return self._abstract

    def reference(self) -> tuple[Path, float]:
        """An uninterrupted 16-step run: the adapter every interrupted run must end with."""
        if self._ref is None:
            wd = self.ws / "train_reference"
            t = time.time()
            r = run(train_cmd(self.model, wd), timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"reference training failed: {r.stderr[-2000:]}")
            self._ref = (wd, time.time() - t)
        return self._ref


def bar(iterable, desc: str, ctx: Ctx, total=None):
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=not ctx.progress, dynamic_ncols=True, file=sys.stderr)


# ============================================================================ faults
KILL_KINDS = ["startup", "mid_step", "ckpt_write", "mid_step", "ckpt_write", "random", "ckpt_write",
              "startup", "mid_step", "ckpt_write", "random", "ckpt_write"]


def fault_training_kills(ctx: Ctx, kills: int) -> list[Result]:
    """SIGKILL a 16-step training run at `kills` moments, restarting it each time. If a
    run finishes before all kills are spent, it is verified and a fresh run takes the
    remaining kills (a campaign per workdir); the last kill of the last campaign lands
    in the final checkpoint / adapter export."""
    ref, ref_s = ctx.reference()
    kinds = (KILL_KINDS * (kills // len(KILL_KINDS) + 1))[:kills - 1] + ["final_export"]
    results, done_kills, campaign = [], 0, 0
    pb = bar(None, "faults: SIGKILL training", ctx, total=kills)
    while done_kills < kills and campaign < 4:
        campaign += 1
        wd = ctx.ws / f"train_killed_{campaign}"
        ck = wd / "checkpoints"
        first = len(results)
        for _ in range(kills * 3):
            if done_kills >= kills:
                break
            kind = kinds[done_kills]
            before = latest_step(ck)
            rows_before = len(metric_steps(wd)) if (wd / "metrics.csv").exists() else 0
            if kind != "final_export" and before >= 14:
                kind = "startup"  # little left to train: kill before it resumes, keep the run alive
            spec = {"slow_ckpt": 0.25} if kind == "ckpt_write" else {}
            args = train_args(ctx.model, wd)
            cmd = harness_cmd(spec, "diffmas_jax.train", args) if spec else [PY, "-m", "diffmas_jax.train", *args]
            t0 = time.time()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=child_env())
            if kind == "startup":
                time.sleep(ctx.rng.uniform(0.3, 4.0))
            elif kind == "mid_step":
                wait_for(lambda: (wd / "metrics.csv").exists() and len(metric_steps(wd)) > max(rows_before, before),
                         proc, 300)
                time.sleep(ctx.rng.uniform(0.0, 0.5))
            elif kind == "ckpt_write":
                wait_for(lambda: ck.exists() and any(TMP_MARK in p.name and int(p.name.split(".")[0]) > before
                                                     for p in ck.iterdir()), proc, 300, poll=0.005)
                time.sleep(ctx.rng.uniform(0.0, 1.4))  # the slowed save takes ~6 x 0.25 s
            elif kind == "final_export":
                wait_for(lambda: latest_step(ck) >= 16, proc, 300, poll=0.005)
                time.sleep(ctx.rng.uniform(0.0, 0.3))
            else:
                time.sleep(ctx.rng.uniform(0.5, max(1.0, 0.7 * ref_s)))
            tmp_at_kill = sorted(p.name for p in ck.iterdir() if TMP_MARK in p.name) if ck.exists() else []
            at = time.time() - t0
            if not kill(proc):  # it finished first: this campaign is complete
                break
            chk = check_checkpoints(ck, ctx.abstract)
            done_kills += 1
            pb.update(1)
            results.append(Result(
                "faults", f"train SIGKILL #{done_kills} ({kind})",
                "every <step> checkpoint dir restores with matching checksum",
                f"killed at {at:.2f}s, latest checkpoint {before} -> {latest_step(ck)}; tmp dirs at kill: "
                f"{tmp_at_kill or 'none'}; readable steps {chk['steps']}; unreadable {chk['unreadable'] or 'none'}",
                not chk["unreadable"], at, {"kind": kind, "tmp_at_kill": tmp_at_kill, "check": chk}))
        t = time.time()
        final = run(train_cmd(ctx.model, wd), timeout=600)
        chk = check_checkpoints(ck, ctx.abstract)
        ok = final.returncode == 0 and (wd / "adapter").exists()
        diff = adapter_diff(ref / "adapter", wd / "adapter") if ok else float("inf")
        steps = metric_steps(wd) if (wd / "metrics.csv").exists() else []
        mine = results[first:]
        in_write = sum(1 for r in mine if r.details["tmp_at_kill"])
        passed = ok and diff <= 1e-6 and steps == list(range(1, 17)) and not chk["tmp"] and not chk["unreadable"]
        results.append(Result(
            "faults", f"train run {campaign} resumed after {len(mine)} SIGKILLs ({in_write} during a checkpoint write)",
            "final adapter equals the uninterrupted run (<= 1e-6); steps 1..16 logged once; no tmp/unreadable dirs",
            f"exit {final.returncode}; max |diff| {diff:.2e}; logged steps "
            f"{'1..16 once' if steps == list(range(1, 17)) else steps}; tmp {chk['tmp'] or 'none'}; "
            f"unreadable {chk['unreadable'] or 'none'}",
            passed, time.time() - t, {"max_abs_diff": diff, "kills": len(mine), "kills_during_write": in_write}))
    pb.close()
    return results


CORRUPTIONS = {
    "garbage data file": lambda d: [p.write_bytes(b"garbage") for p in (d / "state").rglob("*")
                                    if p.is_file() and "/d/" in str(p)],
    "one byte flipped in each data file": lambda d: [_flip(p) for p in (d / "state").rglob("*")
                                                    if p.is_file() and "/d/" in str(p)],
    "recorded checksum does not match": lambda d: _tamper_checksum(d),
    "metadata deleted": lambda d: [p.unlink() for p in (d / "state").rglob("_METADATA")] + [(d / "state" / "manifest.ocdbt").unlink()],
    "directory emptied": lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(d.iterdir())],
}


def _tamper_checksum(d: Path):
    """Silent corruption as the checksum sees it: the data reads fine but is not what was saved."""
    meta = d / "meta" / "metadata"
    m = json.loads(meta.read_text())
    m["_state_sha256"] = "0" * 64
    meta.write_text(json.dumps(m))


def _flip(p: Path):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def fault_corrupted_latest(ctx: Ctx) -> list[Result]:
    ref, _ = ctx.reference()
    results = []
    for name, corrupt in bar(CORRUPTIONS.items(), "faults: corrupted latest checkpoint", ctx):
        wd = ctx.ws / f"corrupt_{name.replace(' ', '_')}"
        ck = wd / "checkpoints"
        t = time.time()
        proc = subprocess.Popen(train_cmd(ctx.model, wd), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=child_env())
        target = 2 * ctx.rng.randint(2, 6)
        wait_for(lambda: latest_step(ck) >= target, proc, 300)
        kill(proc)
        steps = sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit())
        latest, prev = steps[-1], steps[-2]
        corrupt(ck / str(latest))
        r = run(train_cmd(ctx.model, wd), timeout=600)
        warned = re.findall(r"warning: checkpoint step \d+[^\n]*", r.stderr)
        resumed = re.search(r"resumed from step (\d+)", r.stdout)
        diff = adapter_diff(ref / "adapter", wd / "adapter") if (wd / "adapter").exists() else float("inf")
        chk = check_checkpoints(ck, ctx.abstract)
        passed = (r.returncode == 0 and len(warned) == 1 and f"step {latest}" in warned[0]
                  and resumed is not None and int(resumed.group(1)) == prev and diff <= 1e-6
                  and not chk["unreadable"] and (ck / "unreadable" / str(latest)).exists())
        results.append(Result(
            "faults", f"corrupted latest checkpoint: {name}",
            f"warning naming step {latest}, resume from step {prev}, set aside in unreadable/, reference adapter",
            f"exit {r.returncode}; {warned[0][:160] if warned else 'no warning'}; resumed from "
            f"{resumed.group(1) if resumed else 'nothing'}; max |diff| {diff:.2e}",
            passed, time.time() - t))
    return results


def eval_args(model: Path, workdir: Path) -> list:
    return ["--config", EVAL_CFG, "--workdir", str(workdir), f"--config.model={model}", "--config.task=arith",
            "--config.limit=24", "--config.batch_size=2", "--config.max_new_tokens=6", "--config.latent_steps=2",
            "--config.roles=planner,solver", "--config.method=latent_mas"]


def read_items(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"id": "<torn>"})
    return out


def fault_eval_kills(ctx: Ctx, kills: int) -> list[Result]:
    ref = ctx.ws / "eval_reference"
    r = run([PY, "-m", "diffmas_jax.evaluate", *eval_args(ctx.model, ref)], timeout=600)
    if r.returncode != 0:
        return [Result("faults", "eval reference run", "exit 0", f"exit {r.returncode}: {r.stderr[-300:]}", False)]
    ref_items = {x["id"]: x for x in read_items(ref / "items.jsonl")}
    wd = ctx.ws / "eval_killed"
    items = wd / "items.jsonl"
    results, n = [], 0
    pb = bar(None, "faults: SIGKILL evaluation", ctx, total=kills)
    for attempt in range(kills * 3):
        if n >= kills:
            break
        have = len(items.read_text().splitlines()) if items.exists() else 0
        if have >= 22:
            break
        proc = subprocess.Popen([PY, "-m", "diffmas_jax.evaluate", *eval_args(ctx.model, wd)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
        t0 = time.time()
        if n % 2 == 0:
            time.sleep(ctx.rng.uniform(0.5, 6.0))
        else:
            wait_for(lambda: items.exists() and len(items.read_text().splitlines()) > have, proc, 300, poll=0.01)
            time.sleep(ctx.rng.uniform(0.0, 0.4))
        at = time.time() - t0
        if not kill(proc):
            continue
        n += 1
        pb.update(1)
        data = items.read_bytes() if items.exists() else b""
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # a kill may tear only the last, unterminated line
        try:
            ids = [json.loads(x)["id"] for x in complete]
            ok = len(ids) == len(set(ids)) and set(ids) <= set(ref_items)
        except (ValueError, KeyError):
            ids, ok = [], False
        results.append(Result("faults", f"eval SIGKILL #{n}", "items.jsonl: complete lines parse, no duplicate id",
                              f"killed at {at:.2f}s with {len(ids)} complete item lines on disk"
                              f"{' and a torn tail' if tail else ''}; duplicates: {len(ids) - len(set(ids))}",
                              ok, at))
    pb.close()
    t = time.time()
    r = run([PY, "-m", "diffmas_jax.evaluate", *eval_args(ctx.model, wd)], timeout=600)
    got = read_items(items) if items.exists() else []
    ids = [x["id"] for x in got]
    same = all(x["output"] == ref_items[x["id"]]["output"] and x["prediction"] == ref_items[x["id"]]["prediction"]
               for x in got if x["id"] in ref_items)
    summary = json.loads((wd / "summary.json").read_text()) if (wd / "summary.json").exists() else {}
    passed = (r.returncode == 0 and sorted(ids) == sorted(ref_items) and len(ids) == len(set(ids)) and same
              and summary.get("complete") and summary.get("n") == len(ref_items) == 24)
    results.append(Result(
        "faults", f"eval resumed after {n} SIGKILLs", "24 items, each exactly once, outputs equal an uninterrupted run",
        f"exit {r.returncode}; {len(ids)} lines, {len(set(ids))} distinct ids; outputs equal: {same}; "
        f"summary complete={summary.get('complete')}", passed, time.time() - t))
    return results


def _can_mount_tmpfs(d: Path) -> bool:
    if os.geteuid() != 0:
        return False
    d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        return False
    subprocess.run(["umount", str(d)], capture_output=True)
    return True


def fault_disk_full(ctx: Ctx) -> list[Result]:
    ref, _ = ctx.reference()
    results = []
    variants = [("fsize", "save", "RLIMIT_FSIZE (EFBIG) during checkpoint write"),
                ("fsize", "adapter", "RLIMIT_FSIZE (EFBIG) during adapter export")]
    mnt = ctx.ws / "tmpfs_probe"
    if _can_mount_tmpfs(mnt):
        variants += [("fill", "save", "tiny tmpfs filled (ENOSPC) during checkpoint write"),
                     ("fill", "adapter", "tiny tmpfs filled (ENOSPC) during adapter export")]
    else:
        results.append(Result("faults", "full tmpfs (ENOSPC)", "real ENOSPC on a tiny tmpfs",
                              "skipped: mount not permitted here; RLIMIT_FSIZE variants cover the write failure",
                              True, 0.0, {"skipped": True}))
    for how, at, name in bar(variants, "faults: full disk", ctx):
        t = time.time()
        base = ctx.ws / f"disk_{how}_{at}"
        base.mkdir(parents=True, exist_ok=True)
        mounted = False
        if how == "fill":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(base)], check=True)
            mounted = True
        wd = base / "run"
        ck = wd / "checkpoints"
        k = 2 * ctx.rng.randint(2, 6)
        spec = {"disk_full": {"at": at, "step": k, "how": how, "fill_dir": str(base)}}
        try:
            r = run(harness_cmd(spec, "diffmas_jax.train", train_args(ctx.model, wd)), timeout=600)
            ok_err, observed = judge_error(r.returncode, r.stderr, [])
            errs = error_lines(r.stderr)
            line = errs[0] if errs else ""
            if at == "save":
                want = [f"checkpoint step {k}", f"last checkpoint: step {k - 2}, intact"]
                want.append("No space left on device" if how == "fill" else "File too large")
            else:
                want = ["No space left on device" if how == "fill" else "File too large", "adapter"]
            named = all(w in line for w in want)
            chk = check_checkpoints(ck, ctx.abstract)
            intact = (not chk["unreadable"] and not chk["tmp"] and chk["steps"]
                      and max(chk["steps"]) == (k - 2 if at == "save" else 16))
            # space comes back: the run resumes and ends where an uninterrupted one does
            if how == "fill":
                (base / "filler").unlink(missing_ok=True)
            again = run(train_cmd(ctx.model, wd), timeout=600)
            diff = adapter_diff(ref / "adapter", wd / "adapter") if (wd / "adapter").exists() else float("inf")
        finally:
            if mounted:
                subprocess.run(["umount", "-l", str(base)], capture_output=True)
        passed = ok_err and named and bool(intact) and again.returncode == 0 and diff <= 1e-6
        results.append(Result(
            "faults", f"full disk: {name}",
            f"one error line naming {want}; checkpoints intact; resumes to the reference adapter once space is back",
            f"{observed}; checkpoints {chk['steps']} (tmp {chk['tmp'] or 'none'}, unreadable "
            f"{chk['unreadable'] or 'none'}); rerun exit {again.returncode}, max |diff| {diff:.2e}",
            passed, time.time() - t))
    return results


# ======================================================================== bad inputs
@dataclasses.dataclass
class BadCase:
    name: str
    category: str            # config | flags | data | model | workdir
    cli: str                 # train | evaluate | generate
    args: Callable           # (ctx_paths) -> argv after the module
    expected: list           # substrings the error line must contain
    setup: Optional[Callable] = None   # (case_dir) -> None: creates input files
    fast: bool = True        # fails before any model is loaded (runs in-process in CI)


def _w(p: Path, text, binary=False) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if binary else p.write_text)(text)
    return p


def _model_variant(mutate: Callable):
    """A setup that copies the tiny model to case_dir/model and mutates it."""
    def setup(d: Path, model: Path):
        dst = d / "model"
        shutil.copytree(model, dst)
        mutate(dst)
    return setup


def _cfg_edit(**changes):
    def mutate(dst: Path):
        cfg = json.loads((dst / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (dst / "config.json").write_text(json.dumps(cfg))
    return mutate


def _truncate_weights(dst: Path):
    p = dst / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _previous_eval_run(d: Path, model: Path, items_text: Optional[str] = None, config_text: Optional[str] = None):
    """A workdir that looks like an earlier evaluation with the case's base argv (without running one)."""
    wd = d / "run"
    from diffmas_jax import config_utils, evaluate
    config, _ = evaluate.parse_flags(["evaluate", *case_base_argv("evaluate", d, model)])
    cfg = config_utils.resolve(config)
    _w(wd / "config.json", config_text if config_text is not None else json.dumps(cfg, indent=2) + "\n")
    rec = lambda i: json.dumps({"id": f"arith-test-{i}", "prediction": "1", "correct": False,  # a finished record
                                "prompt_tokens": 20, "generated_tokens": 1}) + "\n"
    _w(wd / "items.jsonl", items_text if items_text is not None else rec(0) + rec(1))


def _previous_train_run(d: Path, model: Path, config_text: Optional[str] = None, **changes):
    wd = d / "run"
    base = {"model": str(model), "method": "diffmas", "steps": 4}
    base.update(changes)
    _w(wd / "config.json", config_text if config_text is not None else json.dumps(base))
    _w(wd / "metrics.csv", "step,loss\n1,2.0\n")


E = lambda *a: list(a)  # noqa: E731 - readability of the case table


def bad_cases() -> list[BadCase]:
    T, V = "train", "evaluate"
    jl = lambda d: d / "data.jsonl"
    cases = [
        # ------------------------------------------------------------- config files
        BadCase("missing config file", "config", V, lambda p: ["--config", str(p["d"] / "nope.py")], ["not found", "nope.py"]),
        BadCase("config file with a syntax error", "config", V, lambda p: ["--config", str(p["d"] / "bad.py")],
                ["cannot load config file", "SyntaxError"], setup=lambda d, m: _w(d / "bad.py", "def get_config(:\n")),
        BadCase("config file without get_config", "config", V, lambda p: ["--config", str(p["d"] / "empty.py")],
                ["has no get_config"], setup=lambda d, m: _w(d / "empty.py", "x = 1\n")),
        BadCase("config file whose get_config raises", "config", V, lambda p: ["--config", str(p["d"] / "raise.py")],
                ["cannot load config file", "boom"],
                setup=lambda d, m: _w(d / "raise.py", "def get_config():\n    raise RuntimeError('boom')\n")),
        BadCase("train: missing config file", "config", T, lambda p: ["--config", str(p["d"] / "nope.py")], ["not found", "nope.py"]),
        BadCase("train: config file with a syntax error", "config", T, lambda p: ["--config", str(p["d"] / "bad.py")],
                ["cannot load config file", "SyntaxError"], setup=lambda d, m: _w(d / "bad.py", "def get_config(:\n")),
        BadCase("train: config file without get_config", "config", T, lambda p: ["--config", str(p["d"] / "empty.py")],
                ["has no get_config"], setup=lambda d, m: _w(d / "empty.py", "x = 1\n")),
        # ----------------------------------------------------------------- CLI flags
        BadCase("no --config", "flags", V, lambda p: ["--workdir", p["work"]], ["--config is required"]),
        BadCase("no --workdir", "flags", V, lambda p: ["--config", EVAL_CFG], ["--workdir is required"]),
        BadCase("stray positional argument", "flags", V, lambda p: ["stray"], ["unexpected arguments"]),
        BadCase("unknown flag", "flags", V, lambda p: ["--frobnicate=1"], ["frobnicate"]),
        BadCase("unknown config field", "flags", V, lambda p: ["--config.nope=1"], ["nope"]),
        BadCase("non-integer limit", "flags", V, lambda p: ["--config.limit=x"], ["config.limit"]),
        BadCase("negative temperature", "flags", V, lambda p: ["--config.temperature=-1"], ["temperature"]),
        BadCase("top_p = 0", "flags", V, lambda p: ["--config.top_p=0"], ["top_p"]),
        BadCase("num_samples > 1 with greedy decoding", "flags", V, lambda p: ["--config.num_samples=3"], ["num_samples", "temperature"]),
        BadCase("latent_steps not integers", "flags", V, lambda p: ["--config.latent_steps=a,b"], ["latent_steps"]),
        BadCase("unknown realign", "flags", V, lambda p: ["--config.realign=bogus"], ["realign", "bogus"]),
        BadCase("unknown role", "flags", V, lambda p: ["--config.roles=planner,wizard"], ["wizard"]),
        BadCase("unknown method", "flags", V, lambda p: ["--config.method=nope"], ["method", "nope"]),
        BadCase("unknown communication", "flags", V, lambda p: ["--config.communication=sideways"], ["communication", "sideways"]),
        BadCase("unknown dtype", "flags", V, lambda p: ["--config.dtype=float13"], ["float13"]),
        BadCase("diffmas without an adapter", "flags", V, lambda p: ["--config.method=diffmas"], ["diffmas", "lora"]),
        BadCase("batch_size = 0", "flags", V, lambda p: ["--config.batch_size=0"], ["batch_size"]),
        BadCase("train: no --config", "flags", T, lambda p: ["--workdir", p["work"]], ["--config is required"]),
        BadCase("train: no --workdir", "flags", T, lambda p: ["--config", TRAIN_CFG], ["--workdir is required"]),
        BadCase("train: stray positional argument", "flags", T, lambda p: ["stray"], ["unexpected arguments"]),
        BadCase("train: unknown flag", "flags", T, lambda p: ["--frobnicate=1"], ["frobnicate"]),
        BadCase("train: unknown config field", "flags", T, lambda p: ["--config.nope=1"], ["nope"]),
        BadCase("train: non-integer steps", "flags", T, lambda p: ["--config.steps=abc"], ["config.steps"]),
        BadCase("train: lr = 0", "flags", T, lambda p: ["--config.lr=0"], ["lr must be positive"]),
        BadCase("train: unknown on_nan", "flags", T, lambda p: ["--config.on_nan=ignore"], ["on_nan"]),
        BadCase("train: unknown training method", "flags", T, lambda p: ["--config.method=nope"], ["method", "nope"]),
        BadCase("train: batch_size = 0", "flags", T, lambda p: ["--config.batch_size=0"], ["batch_size"]),
        BadCase("train: latent_steps not integers", "flags", T, lambda p: ["--config.latent_steps=x"], ["latent_steps"]),
        BadCase("train: unknown role", "flags", T, lambda p: ["--config.roles=planner,wizard"], ["wizard"], fast=False),
        BadCase("train: unknown communication", "flags", T, lambda p: ["--config.communication=sideways"], ["communication"], fast=False),
        BadCase("train: unknown dtype", "flags", T, lambda p: ["--config.dtype=float13"], ["float13"], fast=False),
        BadCase("train: trace too small", "flags", T, lambda p: ["--config.trace_capacity=16"], ["trace overflow"], fast=False),
        BadCase("train: batch larger than the data", "flags", T, lambda p: ["--config.limit=4", "--config.batch_size=8"],
                ["fewer than batch_size"], fast=False),
        BadCase("train: unknown LoRA target", "flags", T, lambda p: ["--config.lora_targets=q,qkv"], ["qkv"], fast=False),
        BadCase("generate: max-new-tokens 0", "flags", "generate", lambda p: ["--prompt", "hi", "--max-new-tokens", "0"],
                ["max-new-tokens"]),
        BadCase("generate: negative temperature", "flags", "generate", lambda p: ["--prompt", "hi", "--temperature", "-1"],
                ["temperature"]),
        # ---------------------------------------------------------------- data files
        BadCase("jsonl: malformed line", "data", V, lambda p: ["--config.task=jsonl", f"--config.task_options.path={jl(p['d'])}"],
                [":2", "malformed JSON"], setup=lambda d, m: _w(jl(d), '{"question": "a?", "answer": "1"}\n{"question": \n')),
        BadCase("jsonl: empty file", "data", V, lambda p: ["--config.task=jsonl", f"--config.task_options.path={jl(p['d'])}"],
                ["no items"], setup=lambda d, m: _w(jl(d), "")),
        BadCase("jsonl: file missing", "data", V, lambda p: ["--config.task=jsonl", f"--config.task_options.path={jl(p['d'])}"],
                ["not found"]),
        BadCase("jsonl: binary garbage", "data", V, lambda p: ["--config.task=jsonl", f"--config.task_options.path={jl(p['d'])}"],
                ["data.jsonl"], setup=lambda d, m: _w(jl(d), bytes(range(256)) * 4, binary=True)),
        BadCase("jsonl: record without a question", "data", V,
                lambda p: ["--config.task=jsonl", f"--config.task_options.path={jl(p['d'])}"],
                ["question"], setup=lambda d, m: _w(jl(d), '{"answer": "1"}\n')),
        BadCase("jsonl: duplicate ids", "data", V, lambda p: ["--config.task=jsonl", f"--config.task_options.path={jl(p['d'])}"],
                ["duplicate id"], setup=lambda d, m: _w(jl(d), '{"id": "a", "question": "q?", "answer": "1"}\n' * 2)),
        BadCase("jsonl: answer index out of range", "data", V,
                lambda p: ["--config.task=jsonl", f"--config.task_options.path={jl(p['d'])}"], ["out of range"],
                setup=lambda d, m: _w(jl(d), '{"question": "q?", "choices": ["a", "b"], "answer": 5}\n')),
        BadCase("jsonl: a line that is a list", "data", V,
                lambda p: ["--config.task=jsonl", f"--config.task_options.path={jl(p['d'])}"], ["JSON object"],
                setup=lambda d, m: _w(jl(d), '["q?", "1"]\n')),
        BadCase("jsonl: path is a directory", "data", V,
                lambda p: ["--config.task=jsonl", f"--config.task_options.path={p['d']}"], ["is a directory"]),
        BadCase("jsonl task without a path (data_dir has no test.jsonl)", "data", V, lambda p: ["--config.task=jsonl"],
                ["test.jsonl", "not found"]),
        BadCase("unknown task", "data", V, lambda p: ["--config.task=nope"], ["unknown task 'nope'"]),
        BadCase("data_dir missing (data-backed task; generated tasks ignore data_dir)", "data", V,
                lambda p: ["--config.task=gsm8k", f"--config.data_dir={p['d'] / 'nodata'}"], ["data_dir", "does not exist"]),
        BadCase("data_dir without the task's file", "data", V,
                lambda p: ["--config.task=gsm8k", f"--config.data_dir={p['d'] / 'data'}"], ["gsm8k", "not found"],
                setup=lambda d, m: (d / "data").mkdir()),
        BadCase("unknown split", "data", V, lambda p: ["--config.split=validation"], ["split"]),
        BadCase("train: jsonl target is not a string", "data", T,
                lambda p: ["--config.task=jsonl", f"--config.task_path={jl(p['d'])}"], ["target", "must be str"],
                setup=lambda d, m: _w(jl(d), "".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1),
                                                                 "target": i + 1}) + "\n" for i in range(10)))),
        BadCase("train: malformed jsonl", "data", T,
                lambda p: ["--config.task=jsonl", f"--config.task_path={jl(p['d'])}"], ["malformed JSON"],
                setup=lambda d, m: _w(jl(d), '{"question": "a?", "answer": "1", "target": "1"}\n{oops\n')),
        BadCase("train: data file missing", "data", T,
                lambda p: ["--config.task=jsonl", f"--config.task_path={jl(p['d'])}"], ["not found"]),
        # ------------------------------------------------------------ model directories
        BadCase("model path does not exist", "model", V, lambda p: [f"--config.model={p['d'] / 'nomodel'}"], ["not found"]),
        BadCase("model dir without config.json", "model", V, lambda p: [f"--config.model={p['d'] / 'model'}"], ["config.json"],
                setup=_model_variant(lambda m: (m / "config.json").unlink())),
        BadCase("model config.json is not JSON", "model", V, lambda p: [f"--config.model={p['d'] / 'model'}"], ["config.json"],
                setup=_model_variant(lambda m: _w(m / "config.json", "{not json"))),
        BadCase("unsupported architecture", "model", V, lambda p: [f"--config.model={p['d'] / 'model'}"], ["gpt2"],
                setup=_model_variant(_cfg_edit(model_type="gpt2", architectures=["GPT2LMHeadModel"]))),
        BadCase("config.json lacks hidden_size", "model", V, lambda p: [f"--config.model={p['d'] / 'model'}"], ["hidden_size"],
                setup=_model_variant(_cfg_edit(hidden_size=None))),
        BadCase("unsupported rope type", "model", V, lambda p: [f"--config.model={p['d'] / 'model'}"], ["rope"],
                setup=_model_variant(_cfg_edit(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))),
        BadCase("model dir without weights", "model", V, lambda p: [f"--config.model={p['d'] / 'model'}"], ["safetensors"],
                setup=_model_variant(lambda m: (m / "model.safetensors").unlink())),
        BadCase("truncated safetensors", "model", V, lambda p: [f"--config.model={p['d'] / 'model'}"], ["model.safetensors"],
                setup=_model_variant(_truncate_weights)),
        BadCase("weights do not match config shapes", "model", V, lambda p: [f"--config.model={p['d'] / 'model'}"], ["shape"],
                setup=_model_variant(_cfg_edit(intermediate_size=64))),
        BadCase("model dir without a tokenizer", "model", V, lambda p: [f"--config.model={p['d'] / 'model'}"], ["tokenizer"],
                setup=_model_variant(lambda m: [(m / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")])),
        BadCase("garbage .gguf file", "model", V, lambda p: [f"--config.model={p['d'] / 'x.gguf'}"], ["x.gguf"],
                setup=lambda d, m: _w(d / "x.gguf", b"GGUF" + os.urandom(64), binary=True)),
        BadCase("model is a plain file", "model", V, lambda p: [f"--config.model={p['d'] / 'notes.txt'}"], ["notes.txt"],
                setup=lambda d, m: _w(d / "notes.txt", "hello")),
        BadCase("train: model dir without config.json", "model", T, lambda p: [f"--config.model={p['d'] / 'model'}"],
                ["config.json"], setup=_model_variant(lambda m: (m / "config.json").unlink()), fast=False),
        BadCase("train: truncated safetensors", "model", T, lambda p: [f"--config.model={p['d'] / 'model'}"],
                ["model.safetensors"], setup=_model_variant(_truncate_weights), fast=False),
        BadCase("generate: model path does not exist", "model", "generate",
                lambda p: ["--prompt", "hi", "--model", str(p["d"] / "nomodel")], ["not found"]),
        # -------------------------------------------------------------- workdirs / state
        BadCase("workdir is a file", "workdir", V, lambda p: [], ["not a directory"],
                setup=lambda d, m: _w(d / "run", "i am a file")),
        BadCase("workdir holds a different config", "workdir", V, lambda p: ["--config.method=single"],
                ["different configuration", "method"], setup=lambda d, m: _previous_eval_run(d, m)),
        BadCase("items.jsonl damaged mid-file", "workdir", V, lambda p: [], ["damaged line"],
                setup=lambda d, m: _previous_eval_run(d, m, items_text='{"id": "arith-test-0"}\n{broken\n{"id": "arith-test-2"}\n')),
        BadCase("workdir config.json is garbage", "workdir", V, lambda p: [], ["config.json"],
                setup=lambda d, m: _previous_eval_run(d, m, config_text="{garbage")),
        BadCase("adapter dir is empty", "workdir", V,
                lambda p: ["--config.method=diffmas", f"--config.lora={p['d'] / 'adapter'}"], ["adapter"],
                setup=lambda d, m: (d / "adapter").mkdir(), fast=False),
        BadCase("adapter.json is garbage", "workdir", V,
                lambda p: ["--config.method=diffmas", f"--config.lora={p['d'] / 'adapter'}"], ["adapter.json"],
                setup=lambda d, m: (_w(d / "adapter" / "adapter.json", "{nope"),
                                    _w(d / "adapter" / "adapter.safetensors", b"\0" * 16, binary=True)), fast=False),
        BadCase("train: workdir is a file", "workdir", T, lambda p: [], ["not a directory"],
                setup=lambda d, m: _w(d / "run", "i am a file"), fast=False),
        BadCase("train: workdir holds a different config", "workdir", T, lambda p: [], ["different config"],
                setup=lambda d, m: _previous_train_run(d, m, method="single_sft")),
        BadCase("train: workdir config.json is garbage", "workdir", T, lambda p: [], ["config.json"],
                setup=lambda d, m: _previous_train_run(d, m, config_text="{garbage")),
    ]
    return cases


def case_base_argv(cli: str, d: Path, model: Path) -> list:
    """The working argv a bad-input case starts from (a valid, small run in d/run)."""
    if cli == "train":
        return [a for a in train_args(model, d / "run", steps=4) if not a.startswith("--config.limit=")] + \
            ["--config.limit=24"]
    if cli == "generate":
        return ["--model", str(model), "--max-new-tokens", "4"]
    return [a for a in eval_args(model, d / "run") if not a.startswith(("--config.limit=", "--config.max_new_tokens="))] + \
        ["--config.limit=4", "--config.max_new_tokens=4"]


def case_argv(case: BadCase, d: Path, model: Path) -> list:
    """The full argv (after the module) of a bad-input case: the base argv plus the case's
    flags; a case starting with --config / --workdir replaces those flags."""
    extra = case.args({"d": d, "work": str(d / "run"), "model": model})
    base = case_base_argv(case.cli, d, model)
    if case.cli == "generate":
        if "--model" in extra:
            base = base[2:]
        return [*base, *extra]
    if "no --config" in case.name:
        return list(extra)
    if extra[:1] in (["--config"], ["--workdir"]):
        overrides = [a for a in base if a.startswith("--config.")]
        if extra[0] == "--config" and "no --workdir" not in case.name:
            extra = [*extra, "--workdir", str(d / "run")]
        return [*extra, *overrides]
    return [*base, *extra]


def watched(case: BadCase, d: Path) -> dict:
    """Everything a failed run must leave untouched: the case directory (workdir, inputs)."""
    return {"case_dir": tree_digest(d)}


def bad_input_section(ctx: Ctx, only_fast: bool = False) -> list[Result]:
    results = []
    cases = [c for c in bad_cases() if (c.fast or not only_fast) and re.search(ctx.only, f"{c.cli}: {c.name}")]
    for case in bar(cases, "bad inputs", ctx):
        d = ctx.ws / "bad" / re.sub(r"[^a-z0-9]+", "_", f"{case.cli}_{case.name}".lower())
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        if case.setup:
            case.setup(d, ctx.model)
        before = watched(case, d)
        argv = case_argv(case, d, ctx.model)
        t = time.time()
        try:
            r = run([PY, "-m", f"diffmas_jax.{case.cli}", *argv], timeout=300)
            rc, stderr = r.returncode, r.stderr
        except subprocess.TimeoutExpired:
            rc, stderr = -1, "timed out"
        ok, observed = judge_error(rc, stderr, case.expected)
        unchanged = watched(case, d) == before
        if not unchanged:
            observed += " [workdir or inputs changed]"
        results.append(Result("bad_inputs", f"{case.cli}: {case.name}" if not case.name.startswith(case.cli) else case.name,
                              f"[{case.category}] exit != 0, one error line naming {case.expected}, nothing written",
                              observed, ok and unchanged, time.time() - t, {"argv": argv}))
    return results


# =============================================================================== NaN
NAN_CASES = [  # (name, kind, on_nan)
    ("NaN loss (poisoned weights), on_nan=stop", "nan", "stop"),
    ("inf loss, on_nan=stop", "inf", "stop"),
    ("finite loss, NaN gradient, on_nan=stop", "grad", "stop"),
    ("NaN loss, on_nan=skip", "nan", "skip"),
    ("finite loss, NaN gradient, on_nan=skip", "grad", "skip"),
]


def nan_case(ctx: Ctx, name: str, kind: str, on_nan: str, k: int, steps: int = 10) -> Result:
    wd = ctx.ws / f"nan_{kind}_{on_nan}_{k}"
    if wd.exists():
        shutil.rmtree(wd)
    t = time.time()
    spec = {"nan": {"step": k, "kind": kind}}
    r = run(harness_cmd(spec, "diffmas_jax.train", train_args(ctx.model, wd, steps=steps, extra=[f"--config.on_nan={on_nan}"])),
            timeout=600)
    chk = check_checkpoints(wd / "checkpoints", ctx.abstract)
    if on_nan == "stop":
        good = (k - 1) // 2 * 2
        where = f"last good checkpoint: step {good}" if good else "no checkpoint yet"
        ok, observed = judge_error(r.returncode, r.stderr, ["non-finite", f"at step {k}", where])
        clean = not chk["nonfinite"] and (not chk["steps"] or max(chk["steps"]) == good)
        observed += f"; checkpoints {chk['steps']} (non-finite: {chk['nonfinite'] or 'none'})"
        return Result("nan", name + f" (injected at step {k})", f"stops naming step {k} and '{where}'; checkpoints finite",
                      observed, ok and clean, time.time() - t)
    warn = [line[line.index("warning:"):] for line in r.stderr.replace("\r", "\n").splitlines()
            if "warning: non-finite" in line]
    steps_logged = metric_steps(wd) if (wd / "metrics.csv").exists() else []
    fin = (wd / "adapter").exists() and adapter_finite(wd / "adapter")
    ok = (r.returncode == 0 and len(warn) == 1 and f"step {k}" in warn[0] and fin
          and steps_logged == [s for s in range(1, steps + 1) if s != k] and not chk["nonfinite"])
    return Result("nan", name + f" (injected at step {k})", f"warns once about step {k}, skips it, finishes finite",
                  f"exit {r.returncode}; warnings {[w[:100] for w in warn]}; logged steps {steps_logged}; adapter finite: {fin}",
                  ok, time.time() - t)


def nan_section(ctx: Ctx) -> list[Result]:
    results = []
    for name, kind, on_nan in bar([c for c in NAN_CASES if re.search(ctx.only, c[0])], "nan/inf", ctx):
        results.append(nan_case(ctx, name, kind, on_nan, ctx.rng.randint(2, 8)))
    # a real overflow, no injection: a huge learning rate
    wd = ctx.ws / "nan_overflow"
    t = time.time()
    r = run(train_cmd(ctx.model, wd, steps=10, every=1,
                      extra=["--config.lr=1e38", "--config.clip=1e38", "--config.warmup_steps=0"]), timeout=600)
    ok, observed = judge_error(r.returncode, r.stderr, ["non-finite", "at step 2", "last good checkpoint: step 1"])
    results.append(Result("nan", "real overflow (lr=1e38), on_nan=stop", "stops at step 2 naming the last good checkpoint",
                          observed, ok, time.time() - t))
    return results


# =========================================================================== sandbox
_DRIVER = r'''
import json, os, sys
from diffmas_jax.tasks import sandbox
code = sys.stdin.read()
kw = json.loads(sys.argv[1])
fds = lambda: len(os.listdir("/proc/self/fd"))
before = fds()
r = sandbox.run_code(code, **kw)
after = fds()
again = sandbox.run_code("print(6 * 7)")
print(json.dumps({"status": r.status, "returncode": r.returncode, "stdout": r.stdout[-6000:],
                  "stderr": r.stderr[-3000:], "fds_before": before, "fds_after": after,
                  "next_run": [again.status, again.stdout.strip()], "evaluator_pid": os.getpid()}))
'''


def evaluate_in_child(code: str, env_extra: Optional[dict] = None, **kw) -> dict:
    """run_code(code) from a separate evaluator process (so a failed containment cannot hit us)."""
    env = dict(child_env(), **(env_extra or {}))
    p = subprocess.run([PY, "-c", _DRIVER, json.dumps(kw)], input=code, capture_output=True, text=True,
                       timeout=180, cwd=REPO, env=env)
    if p.returncode != 0:
        return {"evaluator_died": p.returncode, "stderr": p.stderr[-2000:], "stdout": p.stdout[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in st and "\nState:\tX" not in st


@dataclasses.dataclass
class Attack:
    name: str
    goal: str
    code: Callable            # (env) -> source
    check: Callable           # (report, env) -> (contained: bool, observed: str)
    fast: bool = True
    kw: dict = dataclasses.field(default_factory=dict)


def _secret_env(ws: Path) -> dict:
    """A fresh token in the evaluator's environment and in a root-only file."""
    token = "RELIABILITY-" + os.urandom(12).hex()
    d = Path(tempfile.mkdtemp(prefix=".reliability_secret_", dir=str(REPO.parent)))
    d.chmod(0o755)  # the directory is traversable: only the file's own mode protects it
    f = d / "secret.txt"
    f.write_text(token)
    f.chmod(0o600)
    home_secret = Path.home() / ".cache" / "diffmas_jax" / "reliability_secret.txt"
    home_secret.parent.mkdir(parents=True, exist_ok=True)
    home_secret.write_text(token)
    home_secret.chmod(0o600)
    return {"token": token, "file": str(f), "dir": str(d), "home_file": str(home_secret), "home": str(Path.home()),
            "repo": str(REPO), "evaluator_uid": os.getuid()}


def _same_uid_guard(env) -> str:
    """Attacks that would hurt the machine if the sandbox did not switch to its own uid
    (kill(-1) as root signals every process there is) refuse to run in that case."""
    return textwrap.dedent(f"""
        import os as _os, sys as _sys
        if _os.getuid() == {env['evaluator_uid']}:
            print("SKIPPED: the sandbox runs as the evaluator's own uid; this attack would hit the host")
            _sys.exit(0)
    """)


def _no_token(rep, env) -> bool:
    return env["token"] not in json.dumps(rep)


def attacks() -> list[Attack]:
    def a_env(env):
        return textwrap.dedent(f"""
            import os
            print(sorted(os.environ))
            print({{k: v for k, v in os.environ.items()}})
            for p in ("/proc/self/environ", "/proc/%d/environ" % os.getppid(), "/proc/1/environ",
                      "/proc/%d/cmdline" % os.getppid()):
                try:
                    print(p, open(p, "rb").read()[:4000])
                except OSError as e:
                    print(p, "denied", e.errno)
            # walk every readable /proc/*/environ
            n = 0
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        data = open(f"/proc/{{pid}}/environ", "rb").read()
                        n += 1
                        print("environ", pid, data[:4000])
                    except OSError:
                        pass
            print("readable environ files", n)
        """)

    def c_env(rep, env):
        ok = _no_token(rep, env) and "RELIABILITY_SECRET" not in rep.get("stdout", "")
        n = re.search(r"readable environ files (\d+)", rep.get("stdout", ""))
        return ok, (f"token not seen; env keys {rep.get('stdout', '').splitlines()[0][:140] if rep.get('stdout') else '?'}; "
                    f"readable /proc/*/environ: {n.group(1) if n else '?'} (own processes only)")

    def a_file(env):
        return textwrap.dedent(f"""
            import os, posix, glob
            for p in ({env['file']!r}, {env['home_file']!r}, "/proc/%d/root{env['file']}" % os.getppid()):
                for how, f in (("open", lambda: open(p).read()), ("posix.open", lambda: os.read(posix.open(p, 0), 100))):
                    try:
                        print(how, p, f())
                    except OSError as e:
                        print(how, p, "denied", e.errno)
            print("home listing", end=" ")
            try:
                print(os.listdir({env['home']!r}))
            except OSError as e:
                print("denied", e.errno)
            print("ssh keys", glob.glob("/root/.ssh/*") + glob.glob("/home/*/.ssh/*"))
        """)

    def c_file(rep, env):
        out = rep.get("stdout", "")
        return _no_token(rep, env), "; ".join(line[:110] for line in out.splitlines()[:7])

    def a_home(env):
        return textwrap.dedent(f"""
            import os, pwd
            target = os.path.join({env['home']!r}, "sandbox_was_here")
            for p in (target, os.path.join({env['repo']!r}, "sandbox_was_here"), "/etc/sandbox_was_here"):
                try:
                    open(p, "w").write("x")
                    print("WROTE", p)
                except OSError as e:
                    print("denied", p, e.errno)
            own = os.path.expanduser("~/own_file")
            open(own, "w").write("mine")
            print("own home", own)
        """)

    def c_home(rep, env):
        leaked = [p for p in (Path(env["home"]) / "sandbox_was_here", Path(env["repo"]) / "sandbox_was_here",
                              Path("/etc/sandbox_was_here")) if p.exists()]
        for p in leaked:
            p.unlink()
        own = re.search(r"own home (\S+)", rep.get("stdout", ""))
        own_gone = own is not None and not Path(own.group(1)).exists()
        return (not leaked and "WROTE" not in rep.get("stdout", "") and own_gone,
                f"writes outside denied ({rep.get('stdout', '').count('denied')} of 3); ~ is the sandbox's own dir "
                f"({own.group(1) if own else '?'}), removed after: {own_gone}; leaked files: {leaked or 'none'}")

    def a_detach(env):
        return _same_uid_guard(env) + textwrap.dedent("""
            import ctypes, os, posix, signal, sys, time
            libc = ctypes.CDLL(None)
            r, w = posix.pipe()
            pid = libc.fork()                     # libc fork: below the prelude
            if pid == 0:
                libc.setsid()                     # new session, no controlling terminal
                for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                    signal.signal(s, signal.SIG_IGN)
                if libc.fork() == 0:              # double fork: orphaned, re-parented to init
                    posix.write(w, (str(posix.getpid()) + "\\n").encode())
                    posix.close(1); posix.close(2)
                    time.sleep(120)
                posix._exit(0)
            print("daemon", posix.read(r, 32).decode().strip(), flush=True)
            pid2 = posix.fork()                   # posix.fork: the prelude only wraps os.fork
            if pid2 == 0:
                posix.setsid()
                posix.close(1); posix.close(2)
                time.sleep(120)
                posix._exit(0)
            print("second", pid2, flush=True)
        """)

    def c_detach(rep, env):
        pids = [int(x) for x in re.findall(r"(?:daemon|second) (\d+)", rep.get("stdout", ""))]
        time.sleep(0.3)
        alive = [p for p in pids if _alive(p)]
        for p in alive:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        return (len(pids) == 2 and not alive,
                f"spawned {pids} (setsid + double fork; posix.fork + setsid); alive after run_code returned: {alive or 'none'}")

    def a_fds(env):
        return textwrap.dedent("""
            import os, socket
            files = []
            try:
                while True:
                    files.append(open("/dev/null"))
            except OSError as e:
                print("open stopped at", len(files), "errno", e.errno)
            try:
                os.pipe()
                print("pipe ok")
            except OSError as e:
                print("pipe denied", e.errno)
            for f in files:
                f.close()
            fds = []
            try:
                while True:
                    fds.append(os.dup(0))
            except OSError as e:
                print("dup stopped at", len(fds), "errno", e.errno)
        """)

    def c_fds(rep, env):
        out = rep.get("stdout", "")
        m = re.search(r"open stopped at (\d+)", out)
        same = rep.get("fds_before") == rep.get("fds_after")
        nxt = rep.get("next_run") == ["passed", "42"]
        return (m is not None and int(m.group(1)) < 300 and same and nxt,
                f"{out.strip().splitlines()[0] if out.strip() else '?'} (RLIMIT_NOFILE); evaluator fds "
                f"{rep.get('fds_before')} -> {rep.get('fds_after')}; next sandbox run {rep.get('next_run')}")

    def a_setuid(env):
        return textwrap.dedent("""
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            for name, call in (("setuid(0)", lambda: libc.setuid(0)), ("setgid(0)", lambda: libc.setgid(0)),
                               ("setresuid(0,0,0)", lambda: libc.setresuid(0, 0, 0)),
                               ("seteuid(0)", lambda: libc.seteuid(0)),
                               ("prctl(NO_NEW_PRIVS=0)", lambda: libc.prctl(38, 0, 0, 0, 0))):
                rc = call()
                print(name, rc, ctypes.get_errno())
            print("uid now", os.getuid(), os.geteuid(), "caps", open("/proc/self/status").read().split("CapEff:")[1].split()[0])
        """)

    def c_setuid(rep, env):
        out = rep.get("stdout", "")
        m = re.search(r"uid now (\d+) (\d+) caps (\w+)", out)
        ok = m is not None and m.group(1) != "0" and m.group(2) != "0" and int(m.group(3), 16) == 0
        return ok, f"{' | '.join(out.strip().splitlines())[:300]}"

    def a_kill(env):
        return _same_uid_guard(env) + textwrap.dedent("""
            import ctypes, os, signal
            libc = ctypes.CDLL(None, use_errno=True)
            ppid = os.getppid()
            print("kill(ppid)", libc.kill(ppid, signal.SIGKILL), ctypes.get_errno())
            print("kill(1)", libc.kill(1, signal.SIGKILL), ctypes.get_errno())
            print("ptrace(ATTACH, ppid)", libc.ptrace(16, ppid, 0, 0), ctypes.get_errno())
            try:
                open("/proc/%d/mem" % ppid, "rb")
                print("MEM OPEN")
            except OSError as e:
                print("/proc/ppid/mem denied", e.errno)
            print("kill(-1)", flush=True)
            libc.kill(-1, signal.SIGKILL)   # everything this uid may signal: only the sandbox itself
        """)

    def c_kill(rep, env):
        out = rep.get("stdout", "")
        ok = "evaluator_died" not in rep and "MEM OPEN" not in out and rep.get("next_run") == ["passed", "42"] \
            and "kill(ppid) -1" in out and "ptrace(ATTACH, ppid) -1" in out
        return ok, (f"{' | '.join(out.strip().splitlines())[:260]}; evaluator alive: {'evaluator_died' not in rep}; "
                    f"sandbox status {rep.get('status')}")

    def a_unshare(env):
        return textwrap.dedent(f"""
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
            print("mount on host ns", libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None), ctypes.get_errno())
            print("unshare(USER|NS)", libc.unshare(0x10000000 | 0x00020000), ctypes.get_errno())
            print("umount2 /root", libc.umount2(b"/root", 2), ctypes.get_errno())
            print("umount2 /tmp", libc.umount2(b"/tmp", 2), ctypes.get_errno())
            print("umount2 cwd", libc.umount2(os.getcwd().encode(), 2), ctypes.get_errno())
            for p in ({env['file']!r}, {env['home_file']!r}):
                try:
                    print("read", p, open(p).read())
                except OSError as e:
                    print("read", p, "denied", e.errno)
            try:
                fd = os.open("/proc/1/ns/net", os.O_RDONLY)
                print("setns to init netns", libc.setns(fd, 0), ctypes.get_errno())
            except OSError as e:
                print("open /proc/1/ns/net denied", e.errno)
        """)

    def c_unshare(rep, env):
        out = rep.get("stdout", "")
        return _no_token(rep, env), " | ".join(out.strip().splitlines())[:320]

    def a_disk(env):
        return _same_uid_guard(env) + textwrap.dedent("""
            import os
            written = 0
            try:
                for i in range(10_000):
                    with open(f"fill_{i}", "wb") as f:
                        for _ in range(8):
                            f.write(b"x" * (1 << 20))
                            written += 1
            except OSError as e:
                print("stopped after MiB", written, "errno", e.errno)
            shm = 0
            try:
                with open("/dev/shm/fill", "wb") as f:
                    while True:
                        f.write(b"y" * (1 << 20))
                        shm += 1
            except OSError as e:
                print("/dev/shm stopped after MiB", shm, "errno", e.errno)
        """)

    def c_disk(rep, env):
        out = rep.get("stdout", "")
        m = re.search(r"stopped after MiB (\d+)", out)
        s = re.search(r"/dev/shm stopped after MiB (\d+)", out)
        leftover = Path("/dev/shm/fill").exists()
        ok = m is not None and int(m.group(1)) <= 512 and s is not None and int(s.group(1)) <= 512 and not leftover
        return ok, f"{' | '.join(out.strip().splitlines())}; host /dev/shm/fill left: {leftover}"

    return [
        Attack("environment secrets", "read a token from the evaluator's environment", a_env, c_env),
        Attack("root-only secret file", "read a mode-600 file (in a traversable dir, and under $HOME)", a_file, c_file),
        Attack("write to the home directory", "write to $HOME, the repository and /etc", a_home, c_home),
        Attack("detached processes", "leave a setsid'd double-forked daemon running", a_detach, c_detach,
               kw={"timeout_s": 5}),
        Attack("file-descriptor exhaustion", "exhaust fds; the evaluator must keep working", a_fds, c_fds),
        Attack("ctypes: setuid / capabilities", "regain root via libc", a_setuid, c_setuid),
        Attack("ctypes: kill / ptrace the evaluator", "kill(ppid), kill(1), kill(-1), ptrace, /proc/ppid/mem",
               a_kill, c_kill),
        Attack("ctypes: unshare + umount", "new user+mount namespace, unmount the covers, read the secrets",
               a_unshare, c_unshare),
        Attack("fill the disk and /dev/shm", "write until the disk is full", a_disk, c_disk, fast=False,
               kw={"timeout_s": 60, "memory_mb": 1024}),
    ]


def sandbox_section(ctx: Ctx, only_fast: bool = False) -> list[Result]:
    env = _secret_env(ctx.ws)
    results = []
    try:
        for att in bar([a for a in attacks() if (a.fast or not only_fast) and re.search(ctx.only, a.name)],
                       "sandbox attacks", ctx):
            t = time.time()
            rep = evaluate_in_child(att.code(env), env_extra={"RELIABILITY_SECRET": env["token"]}, **att.kw)
            if "evaluator_died" in rep and att.name != "ctypes: kill / ptrace the evaluator":
                ok, observed = False, f"evaluator died: {rep}"
            elif "SKIPPED:" in rep.get("stdout", ""):
                ok, observed = False, rep["stdout"].strip()
            else:
                ok, observed = att.check(rep, env)
            results.append(Result("sandbox", att.name, f"contained: {att.goal} fails",
                                  f"status {rep.get('status')}; {observed}", ok, time.time() - t,
                                  {"stdout": rep.get("stdout", "")[:2000]}))
    finally:
        shutil.rmtree(env["dir"], ignore_errors=True)
        Path(env["home_file"]).unlink(missing_ok=True)
    return results


def sandbox_layers() -> dict:
    """Which containment layers run_code uses on this machine."""
    from diffmas_jax.tasks import sandbox
    r = sandbox.run_code(textwrap.dedent("""
        import os
        mounts = [l.split()[4] for l in open("/proc/self/mountinfo")]
        print(os.getuid(), os.getcwd() in mounts, os.path.exists("/sys/class/net/lo") and len(os.listdir("/sys/class/net")))
    """))
    parts = r.stdout.split()
    return {"root": os.geteuid() == 0, "sandbox_uid": parts[0] if parts else None,
            "private_mounts": parts[1:2] == ["True"], "status": r.status}


# ============================================================================ report
def write_report(out: Path, results: list[Result], meta: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    by = {}
    for r in results:
        s = by.setdefault(r.section, {"cases": 0, "passed": 0})
        s["cases"] += 1
        s["passed"] += int(r.passed)
    faults = [r for r in results if r.section == "faults"]
    figures = {
        "training_sigkills": sum(1 for r in faults if r.case.startswith("train SIGKILL")),
        "training_sigkills_during_checkpoint_write": sum(1 for r in faults if r.case.startswith("train SIGKILL")
                                                         and r.details.get("tmp_at_kill")),
        "eval_sigkills": sum(1 for r in faults if r.case.startswith("eval SIGKILL")),
        "faults_injected": sum(1 for r in faults if not r.details.get("skipped") and ("SIGKILL #" in r.case
                               or r.case.startswith(("corrupted", "full disk")))),
    }
    figures["faults_survived"] = sum(1 for r in faults if r.passed and not r.details.get("skipped") and ("SIGKILL #" in r.case
                                     or r.case.startswith(("corrupted", "full disk"))))
    summary = {"sections": by, "figures": figures, "all_passed": all(r.passed for r in results), **meta,
               "cases": [dataclasses.asdict(r) for r in results]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["# Reliability suite results", "",
             f"Run {meta['finished']} on {meta['machine']} in {meta['wall_s'] / 60:.1f} min "
             f"(`{meta['command']}`). Sandbox layers: {meta.get('sandbox_layers')}.", "",
             "| section | cases | passed |", "|---|---|---|"]
    for s, v in by.items():
        lines.append(f"| {s} | {v['cases']} | {v['passed']} |")
    lines += ["", "Figures: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items()), ""]
    for s in by:
        lines += [f"## {s}", "", "| case | expected | observed | pass |", "|---|---|---|---|"]
        for r in results:
            if r.section == s:
                lines.append(f"| {esc(r.case)} | {esc(r.expected)} | {esc(r.observed)} | {'yes' if r.passed else '**NO**'} |")
        lines.append("")
    (out / "README.md").write_text("\n".join(lines))
    return summary


SECTIONS = ("faults", "bad_inputs", "nan", "sandbox")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "results" / "reliability"))
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--kills", type=int, default=12, help="SIGKILLs of the training run (>= 10 for the issue)")
    ap.add_argument("--eval-kills", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-workspace", action="store_true")
    ap.add_argument("--only", default="", help="regex: run only the bad-input / nan / sandbox cases it matches")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        ap.error(f"unknown section(s) {bad}; known: {', '.join(SECTIONS)}")
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    t0 = time.time()
    ws = Path(tempfile.mkdtemp(prefix="reliability_"))
    ctx = Ctx(ws, args.seed, only=args.only)
    results: list[Result] = []
    print(f"workspace {ws}", file=sys.stderr)
    try:
        if "faults" in sections:
            results += fault_training_kills(ctx, args.kills)
            results += fault_corrupted_latest(ctx)
            results += fault_eval_kills(ctx, args.eval_kills)
            results += fault_disk_full(ctx)
        if "bad_inputs" in sections:
            results += bad_input_section(ctx)
        if "nan" in sections:
            results += nan_section(ctx)
        if "sandbox" in sections:
            results += sandbox_section(ctx)
    finally:
        if not args.keep_workspace:
            shutil.rmtree(ws, ignore_errors=True)
    layers = sandbox_layers() if "sandbox" in sections else None
    import platform
    meta = {"finished": time.strftime("%Y-%m-%d %H:%M"), "wall_s": round(time.time() - t0, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {'root' if os.geteuid() == 0 else 'non-root'}",
            "command": "python scripts/reliability_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seed": args.seed, "sandbox_layers": layers}
    summary = write_report(Path(args.out), results, meta)
    for s, v in summary["sections"].items():
        print(f"{s}: {v['passed']}/{v['cases']} passed", file=sys.stderr)
    failed = [r for r in results if not r.passed]
    for r in failed:
        print(f"FAILED [{r.section}] {r.case}: {r.observed}", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'summary.json'} and README.md", file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_harness":
        sys.path.insert(0, str(REPO))
        _harness(json.loads(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        sys.exit(main())

"""Faults around the training loop's checkpoints: a restore that fails for a reason other than
damage moves nothing; on_nan=skip keeps the checkpoint cadence, SIGTERM and the accumulation
windows; hosts agree on SIGTERM. A toy trainer (three weights, no model) drives train_loop.run."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import REPO, xla_env

from diffmas_jax import train_loop
from diffmas_jax.checkpoint import Checkpointer, abstract_like
from diffmas_jax.cli import UserError
from diffmas_jax.training import make_optimizer

N_ITEMS = 20
DATA = np.arange(N_ITEMS, dtype=np.float32)
STATE = {"a": jnp.arange(12.0).reshape(4, 3), "b": jnp.arange(2, dtype=jnp.int32)}


@pytest.fixture(autouse=True)
def _keep_stderr(monkeypatch):
    """Checkpoint errors leave their stderr guard installed (the run ends); not past a test."""
    monkeypatch.setattr(sys, "stderr", sys.stderr)


def saved(d: Path, steps=(10, 20, 30)) -> Path:
    with Checkpointer(d, keep=5) as ck:
        for s in steps:
            ck.save(s, jax.tree.map(lambda x: x + s, STATE), {"step": s})
    return d


def listing(d: Path) -> list:
    return sorted(os.listdir(d))


# ----------------------------------------------------------------------------- restore
@pytest.mark.parametrize("other,detail", [
    ({**STATE, "a": jnp.ones((4, 5))}, "a saved (4, 3) float32, expected (4, 5) float32"),
    ({**STATE, "c": jnp.ones(3)}, "c expected but not saved"),
    ({"a": STATE["a"]}, "b saved but not expected"),
    ({**STATE, "a": STATE["a"].astype(jnp.bfloat16)}, "a saved (4, 3) float32, expected (4, 3) bfloat16"),
], ids=["shape", "extra", "missing", "dtype"])
def test_restore_of_another_tree_moves_nothing_and_raises_one_line(tmp_path, other, detail):
    d = saved(tmp_path / "ck")
    before = listing(d)
    with Checkpointer(d) as ck, pytest.raises(UserError) as e:
        ck.restore_latest(abstract_like(other))
    msg = str(e.value)
    assert "\n" not in msg and detail in msg and "no checkpoint was moved" in msg and "step 30" in msg
    assert listing(d) == before and not (d / "unreadable").exists()


@pytest.mark.parametrize("error", [
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB"),
    MemoryError(),
    OSError(errno.EIO, "Input/output error"),
    ValueError("UNAVAILABLE: Error reading local file: [OS error 5: Input/output error]"),
], ids=["device-oom", "host-oom", "eio", "tensorstore-eio"])
def test_restore_resource_or_io_error_moves_nothing(tmp_path, monkeypatch, error):
    d = saved(tmp_path / "ck")
    before = listing(d)
    with Checkpointer(d) as ck:
        def fail(*a, **k):
            raise error
        monkeypatch.setattr(ck.manager, "restore", fail)
        with pytest.raises(UserError, match="cannot restore checkpoint step 30 .*no checkpoint was moved"):
            ck.restore_latest(abstract_like(STATE))
    assert listing(d) == before


def _damage(d: Path, how: str) -> None:
    """Damage of checkpoint 30 as scripts/reliability_suite.py and the audit made it."""
    state = d / "30" / "state"
    if how == "truncate":
        for p in state.rglob("*"):
            if p.is_file() and "/d/" in str(p):
                with open(p, "r+b") as f:
                    f.truncate(10)
    elif how in ("garbage", "flip"):
        for p in state.rglob("*"):
            if p.is_file() and "/d/" in str(p):
                b = bytearray(p.read_bytes())
                b[len(b) // 2] ^= 0xFF
                p.write_bytes(b"garbage" if how == "garbage" else bytes(b))
    elif how == "no-metadata":
        for p in [*state.rglob("_METADATA"), state / "manifest.ocdbt"]:
            p.unlink()
    elif how == "meta-json":
        (d / "30" / "meta" / "metadata").write_text("{not json")
    elif how == "no-state":
        shutil.rmtree(state)
    elif how == "empty":
        shutil.rmtree(d / "30")
        (d / "30").mkdir()
    elif how == "checksum":
        p = d / "30" / "meta" / "metadata"
        p.write_text(json.dumps({**json.loads(p.read_text()), "_state_sha256": "0" * 64}))


@pytest.mark.parametrize("how", ["truncate", "garbage", "flip", "no-metadata", "meta-json", "no-state", "empty",
                                 "checksum"])
def test_damaged_latest_still_falls_back_quietly(tmp_path, capfd, how):
    d = saved(tmp_path / "ck")
    _damage(d, how)
    with Checkpointer(d) as ck:
        step, state, meta = ck.restore_latest(abstract_like(STATE))
    assert (step, meta, np.asarray(state["b"]).tolist()) == (20, {"step": 20}, [20, 21])
    assert listing(d / "unreadable") == ["30"] and "30" not in listing(d)
    err = capfd.readouterr().err
    assert "warning: checkpoint step 30" in err and "falling back" in err
    assert "Event loop is closed" not in err and "Traceback" not in err  # background threads' noise held back


def test_restore_holds_back_the_failed_reads_thread_noise(tmp_path, capfd, monkeypatch):
    """A failed read leaves Orbax threads that print 'Event loop is closed' tracebacks, even
    while the next checkpoint is read; around the warning only the warning is printed."""
    d = saved(tmp_path / "ck")
    later = threading.Event()

    def noise():
        later.wait(10)
        sys.stderr.write("Traceback (most recent call last):\nRuntimeError: Event loop is closed\n")
    thread = threading.Thread(target=noise)
    with Checkpointer(d) as ck:
        real = ck.manager.restore

        def restore(step, *a, **k):
            if step == 30:  # damaged: its reader thread prints on
                thread.start()
                raise ValueError("DATA_LOSS: Error reading local file")
            later.set()
            thread.join()
            return real(step, *a, **k)
        monkeypatch.setattr(ck.manager, "restore", restore)
        assert ck.restore_latest(abstract_like(STATE))[0] == 20
    err = capfd.readouterr().err
    assert err.splitlines() == [next(x for x in err.splitlines() if x.startswith("warning: checkpoint step 30"))]


# ------------------------------------------------------------------------------ loop
def config(**kw):
    c = ml_collections.ConfigDict(dict(batch_size=2, steps=8, grad_accum=1, checkpoint_every=4, keep_checkpoints=5,
                                       seed=0, on_nan="skip", eval_every=0, lr=0.1))
    c.update(kw)
    return c


def toy(c, nan_at=(), term_at=None, weighted=True):
    """Weights pulled toward batch statistics; a batch in ``nan_at`` is NaN, so its gradient is too."""
    opt = make_optimizer(float(c.lr), int(c.steps), 0, 0.0, 1e9, int(c.grad_accum))
    w0 = {"w": jnp.zeros((3,), jnp.float32)}

    @jax.jit
    def update(w, opt_state, x, weight):
        loss, g = jax.value_and_grad(lambda w: jnp.sum((w["w"] - jnp.stack([x.mean(), x.std(), x.max()])) ** 2))(w)
        u, opt_state = opt.update(jax.tree.map(lambda t: t * weight, g), opt_state, w)
        return optax.apply_updates(w, u), opt_state, loss, optax.tree.norm(g)

    def step(st, batch, i, grad_weight=1.0):
        if term_at is not None and i == term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x = jnp.asarray(batch) * (jnp.nan if i in nan_at else 1.0)
        w, o, loss, gn = update(st["lora"], st["opt_state"], x, jnp.float32(grad_weight))
        return {"lora": w, "opt_state": o}, {"loss": loss, "grad_norm": gn}

    return train_loop.Trainer(
        label="toy", banner="toy", state={"lora": w0, "opt_state": opt.init(w0)}, n_items=N_ITEMS,
        batch=lambda idx: DATA[idx], step=step, tokens=lambda b: 1,
        fields=["step", "loss", "grad_norm", "tokens_per_s", "eval_loss"], extra_metrics=lambda m: {},
        postfix=lambda r: {}, export=lambda s: None, exports="nothing", done="done",
        target_tokens=(lambda idx: len(idx)) if weighted else None)


def checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def final_state(workdir: Path, c):
    with Checkpointer(workdir / "checkpoints") as ck:
        return ck.restore_latest(abstract_like(jax.device_put(toy(c).state)))


@pytest.fixture
def sigterm_restored():
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def test_skipped_step_still_writes_the_cadence_checkpoints(tmp_path, sigterm_restored):
    c = config()
    assert train_loop.run(toy(c, nan_at={3, 7}), c, tmp_path / "w", {}) == 0  # steps 4 and 8 skipped
    assert checkpoints(tmp_path / "w") == [4, 8]


def test_skipped_step_still_honours_sigterm(tmp_path, sigterm_restored, capsys):
    c = config(steps=12, checkpoint_every=100)
    assert train_loop.run(toy(c, nan_at={2}, term_at=2), c, tmp_path / "w", {}) == 0
    assert checkpoints(tmp_path / "w") == [3]
    assert "SIGTERM: saved checkpoint at step 3" in capsys.readouterr().out


def test_skip_with_grad_accum_keeps_windows_aligned(tmp_path, sigterm_restored):
    c = config(grad_accum=2, checkpoint_every=8)
    # a window's first micro-batch, and a window's last
    assert train_loop.run(toy(c, nan_at={2, 5}), c, tmp_path / "w", {}) == 0
    step, st, _ = final_state(tmp_path / "w", c)
    ms = st["opt_state"]
    assert (step, int(ms.gradient_step), int(ms.mini_step)) == (8, 4, 0)  # 8 micro-steps: 4 updates, none pending
    assert not np.any(np.asarray(ms.acc_grads["w"])) and np.all(np.isfinite(np.asarray(st["lora"]["w"])))


def test_skip_with_grad_accum_refused_without_a_gradient_weight(tmp_path):
    c = config(grad_accum=2)
    with pytest.raises(UserError, match="on_nan=skip with grad_accum > 1"):
        train_loop.run(toy(c, weighted=False), c, tmp_path / "w", {})
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- hosts
def test_any_host_ors_the_flags_and_costs_nothing_on_one_host(monkeypatch):
    from jax.experimental import multihost_utils
    calls = []

    def gather(x):
        calls.append(np.asarray(x).tolist())
        return np.array([False, bool(x), True])  # another host saw SIGTERM
    monkeypatch.setattr(multihost_utils, "process_allgather", gather)
    assert train_loop.any_host(False) is False and train_loop.any_host(True) is True and calls == []
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    assert train_loop.any_host(False) is True and calls == [False]


def test_loop_stops_when_another_host_saw_sigterm(tmp_path, monkeypatch, sigterm_restored):
    seen = []
    monkeypatch.setattr(train_loop, "any_host", lambda flag: seen.append(flag) or len(seen) == 3)
    c = config(steps=12, checkpoint_every=100)
    assert train_loop.run(toy(c), c, tmp_path / "w", {}) == 0
    assert seen == [False] * 3 and checkpoints(tmp_path / "w") == [3]  # this host never got the signal


HOSTS_WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, "tests")
    from diffmas_jax import distributed
    assert distributed.maybe_initialize()
    import jax
    from diffmas_jax import train_loop
    from diffmas_jax.sharding import make_mesh
    from test_train_faults import config, toy
    me = jax.process_index()
    agreed = [train_loop.any_host(me == 1), train_loop.any_host(False)]
    c = config(batch_size=4, steps=12, checkpoint_every=100, on_nan="stop")
    # only host 1 is sent SIGTERM, during step 3; a step's batch is spread over both hosts' devices
    rc = train_loop.run(toy(c, term_at=2 if me == 1 else None), c, Path(sys.argv[1]), {}, mesh=make_mesh((1, -1, 1)))
    print("RESULT" + json.dumps({"agreed": agreed, "rc": rc}), flush=True)
""")


def test_two_hosts_agree_on_sigterm_and_stop_at_one_step(tmp_path):
    """2 processes x 2 CPU devices (gloo): SIGTERM on one host stops both after the same step,
    with one checkpoint, instead of one host saving while the other waits in the next step."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", HOSTS_WORKER, str(tmp_path / "w")], cwd=str(REPO),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=xla_env(
                                  "--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                                  JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                  JAX_PROCESS_ID=str(pid)))
             for pid in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the hosts deadlocked after SIGTERM on one of them")
        assert p.returncode == 0, err[-2000:]
        assert "SIGTERM: saved checkpoint at step 3" in out
        outs.append(json.loads(out.split("RESULT", 1)[1]))
    assert outs == [{"agreed": [True, False], "rc": 0}] * 2
    assert checkpoints(tmp_path / "w") == [3]


def test_failed_io_filter_drops_only_orbax_noise(monkeypatch):
    """After a failed save or restore, the failed I/O's late "Event loop is closed" reports are
    dropped; any other unraisable still reaches the hook that was there."""
    import sys
    import types
    from diffmas_jax import checkpoint
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u))
    checkpoint._drop_failed_io_unraisables()
    checkpoint._drop_failed_io_unraisables()  # installed once
    report = lambda exc: types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                                               err_msg=None, object=None)
    sys.unraisablehook(report(RuntimeError("Event loop is closed")))
    other = report(ValueError("a finaliser's own bug"))
    sys.unraisablehook(other)
    assert seen == [other]

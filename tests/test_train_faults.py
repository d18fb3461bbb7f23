"""Faults around the training loop's checkpoints: a restore that fails for a reason other than
damage moves nothing."""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax.checkpoint import Checkpointer, abstract_like
from diffmas_jax.cli import UserError

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

"""Reliability, fast subset (CI): the full suite is scripts/reliability_suite.py.

Checkpoints survive a kill mid-write, a damaged latest checkpoint and a full disk;
bad inputs end with one error line and leave nothing behind (the suite's own case
table, run in-process); NaN gradients are caught at their step; the sandbox
contains the escape attempts of the suite.
"""
from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("reliability_suite", REPO / "scripts" / "reliability_suite.py")
suite = importlib.util.module_from_spec(spec)
sys.modules["reliability_suite"] = suite  # dataclasses look their module up while the file executes
spec.loader.exec_module(suite)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return suite.make_tiny_model(tmp_path_factory.mktemp("rel") / "tiny")


def small_state(k: float = 0.0):
    import optax
    lora = {"q": {"a": np.arange(24, dtype=np.float32).reshape(2, 3, 4) + k, "b": np.ones((2, 4, 3), np.float32) * k}}
    return {"lora": lora, "opt_state": optax.adamw(1e-3).init(lora)}


# ------------------------------------------------------------------ checkpoints
def test_damaged_latest_checkpoint_falls_back_and_is_set_aside(tmp_path, capsys):
    from diffmas_jax.checkpoint import Checkpointer, abstract_like
    with Checkpointer(tmp_path / "ck", keep=3) as ck:
        for s in (1, 2, 3):
            ck.save(s, small_state(s), {"step": s})
    suite.CORRUPTIONS["garbage data file"](tmp_path / "ck" / "3")
    suite._tamper_checksum(tmp_path / "ck" / "2")  # reads fine, but not what was saved
    ck = Checkpointer(tmp_path / "ck", keep=3)
    step, state, meta = ck.restore_latest(abstract_like(small_state()))
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(state["lora"]["q"]["b"], small_state(1)["lora"]["q"]["b"])
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and "warning: checkpoint step 3" in warnings[0]
    assert "checkpoint step 2" in warnings[1] and "checksum" in warnings[1]
    assert sorted(p.name for p in (tmp_path / "ck" / "unreadable").iterdir()) == ["2", "3"]
    assert not (tmp_path / "ck" / "3").exists()
    ck.save(3, small_state(3), {"step": 3})  # the step that was set aside can be written again
    ck.close()
    with Checkpointer(tmp_path / "ck") as again:
        assert again.restore_latest(abstract_like(small_state()))[0] == 3


def test_leftovers_of_killed_saves_and_deletes_are_swept(tmp_path):
    from diffmas_jax.checkpoint import Checkpointer
    ck = Checkpointer(tmp_path / "ck", keep=2)
    ck.save(1, small_state(1), {"step": 1})
    (tmp_path / "ck" / "2.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # killed mid-write
    (tmp_path / "ck" / "trash" / "0" / "state").mkdir(parents=True)             # killed mid-delete
    ck.close()
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"] and ck.steps() == [1]
        for s in (2, 3):  # keep-N deletes through trash/, which is emptied again
            ck.save(s, small_state(s), {"step": s})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["2", "3"]


_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    cls = atomicity.AtomicRenameTemporaryPath
    orig = cls.finalize
    async def slow_finalize(self, *a, **k):
        time.sleep(0.3)
        return await orig(self, *a, **k)
    cls.finalize = slow_finalize
    from diffmas_jax.checkpoint import Checkpointer, CheckpointWriteError
    ck = Checkpointer(sys.argv[1], keep=2)
    mode = sys.argv[2]
    for s in range(1, 100):
        if mode == "fsize" and s == 3:
            import resource, signal
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            ck.save(s, {"a": np.random.default_rng(s).random(5000).astype(np.float32)}, {"step": s})
        except CheckpointWriteError as e:
            print("ERROR", e, flush=True)
            sys.exit(2)
""")


def test_kill_during_checkpoint_write_leaves_every_step_readable(tmp_path):
    from diffmas_jax.checkpoint import Checkpointer, abstract_like
    d = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(d), "kill"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert suite.wait_for(lambda: d.exists() and any(p.name.startswith("3.orbax-checkpoint-tmp")
                                                         for p in d.iterdir()), proc, 120, poll=0.005)
        time.sleep(0.15)  # inside the slowed save of step 3
    finally:
        suite.kill(proc)
    assert any(".orbax-checkpoint-tmp" in p.name for p in d.iterdir())
    with Checkpointer(d) as ck:
        restored = ck.restore_latest(abstract_like({"a": np.zeros(5000, np.float32)}))
    assert restored[0] == 2
    np.testing.assert_array_equal(restored[1]["a"], np.random.default_rng(2).random(5000).astype(np.float32))
    assert sorted(p.name for p in d.iterdir()) == ["1", "2"]  # the torn save is swept


def test_full_disk_during_checkpoint_write_is_one_clear_error(tmp_path):
    from diffmas_jax.checkpoint import Checkpointer, abstract_like
    d = tmp_path / "ck"
    r = subprocess.run([sys.executable, "-c", _WRITER, str(d), "fsize"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert "cannot write checkpoint step 3" in line and "File too large" in line
    assert "last checkpoint: step 2, intact" in line
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["1", "2"]  # no torn tmp dir left
    with Checkpointer(d) as ck:
        step, state, _ = ck.restore_latest(abstract_like({"a": np.zeros(5000, np.float32)}))
    assert step == 2
    np.testing.assert_array_equal(state["a"], np.random.default_rng(2).random(5000).astype(np.float32))


def test_run_cli_reports_disk_errors_in_one_line(capsys):
    from diffmas_jax.cli import run_cli

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.csv")
    with pytest.raises(SystemExit) as e:
        run_cli(full)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: No space left on device: /data/run/metrics.csv (errno 28)\n"

    def bug(_):
        raise OSError(errno.ECONNREFUSED, "Connection refused")
    with pytest.raises(ConnectionRefusedError):  # not an environment problem of ours: keeps its traceback
        run_cli(bug)


# ------------------------------------------------------------------- bad inputs
FAST_CASES = [c for c in suite.bad_cases() if c.fast and c.cli in ("evaluate", "generate")]


def test_the_sweep_has_enough_cases():
    cases = suite.bad_cases()
    assert len(cases) >= 40 and len({c.name for c in cases}) == len(cases)
    assert {c.category for c in cases} == {"config", "flags", "data", "model", "workdir"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("case", FAST_CASES, ids=[f"{c.cli}:{c.name}" for c in FAST_CASES])
def test_bad_input_in_process(case, tmp_path, tiny_model, monkeypatch):
    from diffmas_jax import evaluate, generate
    from diffmas_jax.cli import run_cli
    monkeypatch.chdir(REPO)
    d = tmp_path / "case"
    d.mkdir()
    if case.setup:
        case.setup(d, tiny_model)
    before = suite.tree_digest(d)
    argv = suite.case_argv(case, d, tiny_model)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        run_cli({"evaluate": evaluate.main, "generate": generate.main}[case.cli], argv)
    ok, observed = suite.judge_error(e.value.code, err.getvalue(), case.expected)
    assert ok, observed
    assert suite.tree_digest(d) == before  # nothing written, inputs untouched


TRAIN_CASES = ["train: config file with a syntax error", "train: unknown config field", "train: stray positional argument",
               "train: workdir config.json is garbage"]


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_train_bad_input_subprocess(name, tmp_path, tiny_model):
    case = next(c for c in suite.bad_cases() if c.name == name)
    d = tmp_path / "case"
    d.mkdir()
    if case.setup:
        case.setup(d, tiny_model)
    before = suite.tree_digest(d)
    r = suite.run([sys.executable, "-m", "diffmas_jax.train", *suite.case_argv(case, d, tiny_model)], timeout=120)
    ok, observed = suite.judge_error(r.returncode, r.stderr, case.expected)
    assert ok, observed
    assert suite.tree_digest(d) == before


# -------------------------------------------------------------------------- NaN
def test_nan_gradient_with_finite_loss_stops_at_its_step(tmp_path, tiny_model):
    wd = tmp_path / "w"
    spec = {"nan": {"step": 3, "kind": "grad"}}
    r = suite.run(suite.harness_cmd(spec, "diffmas_jax.train", suite.train_args(tiny_model, wd, steps=5)), timeout=300)
    ok, observed = suite.judge_error(r.returncode, r.stderr, ["non-finite gradient norm", "at step 3",
                                                              "last good checkpoint: step 2"])
    assert ok, observed
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert suite.metric_steps(wd) == [1, 2]


# ---------------------------------------------------------------------- sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox contains these only as root (dedicated uid)")
def test_sandbox_escape_attempts_are_contained(tmp_path):
    ctx = suite.Ctx(tmp_path, 0, progress=False)
    results = suite.sandbox_section(ctx, only_fast=True)
    assert len(results) >= 8
    failed = [(r.case, r.observed) for r in results if not r.passed]
    assert not failed, failed
    assert not list(REPO.parent.glob(".reliability_secret_*"))

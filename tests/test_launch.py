"""launch/tpu_pod.sh and launch/gpu.sh against a fake `gcloud` on PATH (nothing leaves the machine)."""
import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_pod.sh"
GPU = REPO / "launch" / "gpu.sh"

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# Records every call (one line, args separated by ' | '); behaves like a TPU API that works.
printf '%s' "$1" >> "$FAKE_LOG"; shift; for a in "$@"; do printf ' | %s' "${a//$'\n'/\\n}" >> "$FAKE_LOG"; done; echo >> "$FAKE_LOG"
case "$*" in
  *"tpu-vm describe"*) [ -n "${FAKE_TPU_EXISTS:-}" ] && { echo READY; exit 0; }; echo "NOT_FOUND" >&2; exit 1;;
  *"tpu-vm ssh"*"diffmas_jax.train"*) echo "worker 0: step 1 loss 2.5"; echo "worker 1: step 1 loss 2.5"
                                      exit "${FAKE_RUN_RC:-0}";;
esac
exit 0
'''


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    g = bin_dir / "gcloud"
    g.write_text(FAKE_GCLOUD)
    g.chmod(g.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.txt"

    def run(*args, **env):
        e = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log))
        for k in ("TPU_NAME", "TPU_ZONE", "CLOUDSDK_COMPUTE_ZONE", "TPU_ACCELERATOR", "TPU_VERSION"):
            e.pop(k, None)
        e.update(env)
        r = subprocess.run(["bash", str(TPU), *args], capture_output=True, text=True, env=e, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        if log.exists():
            log.unlink()
        return r, [c.split(" | ") for c in calls]
    return run


def test_dry_run_prints_every_gcloud_command_and_calls_nothing(fake):
    r, calls = fake("--zone", "us-west4-a", "--accelerator", "v5e-8", "--dry-run", "train",
                    "--config", "configs/qwen3_8b_train.py", "--workdir", "runs/q 8", "--config.trace_grad=full")
    assert r.returncode == 0, r.stderr
    assert calls == []  # a dry run touches nothing
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("+ ")]
    assert lines[0].startswith("+ gcloud compute tpus tpu-vm describe diffmas-v5litepod-8 --zone=us-west4-a")
    assert lines[1] == ("+ gcloud compute tpus tpu-vm create diffmas-v5litepod-8 --zone=us-west4-a "
                        "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite")
    assert lines[2].startswith("+ git archive --format=tar.gz")
    assert lines[3].startswith("+ gcloud compute tpus tpu-vm scp ") and lines[3].endswith("--worker=all")
    assert "tpu-vm ssh diffmas-v5litepod-8 --zone=us-west4-a --worker=all" in lines[4] and "pip install" in lines[4]
    run_line = lines[5]
    assert "--worker=all" in run_line and "diffmas_jax.train" in run_line
    assert "runs/q\\\\\\ 8" in run_line or "runs/q\\ 8" in run_line  # the space survives two shells
    assert "--config.mesh_preset=v5e-8" in run_line and "DIFFMAS_DISTRIBUTED" not in run_line  # one host
    # a multi-host slice: every worker initialises jax.distributed; an explicit mesh is left alone
    r, _ = fake("--zone", "z", "--accelerator", "v5litepod-16", "--dry-run", "evaluate", "--config.mesh=1,-1,4")
    run_line = [ln for ln in r.stdout.splitlines() if ln.startswith("+ ")][-1]
    assert "DIFFMAS_DISTRIBUTED=1" in run_line and "diffmas_jax.evaluate" in run_line
    assert "mesh_preset" not in run_line
    r, _ = fake("--zone", "z", "--accelerator", "v4-8", "--version", "my-image", "--name", "pod1", "--spot",
                "--dry-run", "up")
    assert "create pod1 --zone=z --accelerator-type=v4-8 --version=my-image --spot" in r.stdout
    assert "python -m diffmas_jax" not in r.stdout  # up: no run


def test_run_creates_or_reuses_installs_everywhere_and_streams_the_log(fake, tmp_path):
    log = tmp_path / "run.log"
    r, calls = fake("--zone", "z", "--accelerator", "v5p-8", "--log", str(log), "train", "--config", "c.py")
    assert r.returncode == 0, r.stderr
    kinds = [c[3] for c in calls]  # gcloud compute tpus tpu-vm <verb>
    assert kinds == ["describe", "create", "scp", "ssh", "ssh"], calls
    assert "--version=v2-alpha-tpuv5" in calls[1] and "--accelerator-type=v5p-8" in calls[1]
    assert all("--worker=all" in c for c in calls[2:])
    assert calls[-1][-1].startswith("--command=cd ~/diffmas_jax &&") and "diffmas_jax.train --config c.py" in \
        calls[-1][-1]
    assert "worker 1: step 1 loss 2.5" in r.stdout and "worker 1: step 1 loss 2.5" in log.read_text()
    # the slice exists: reused, not created; --skip-install: no copy, no pip
    r, calls = fake("--zone", "z", "--accelerator", "v5p-8", "--log", str(log), "--skip-install", "train",
                    FAKE_TPU_EXISTS="1")
    assert r.returncode == 0 and [c[3] for c in calls] == ["describe", "ssh"], calls
    assert "reusing TPU VM diffmas-v5p-8" in r.stderr
    # the run's exit status comes back
    r, _ = fake("--zone", "z", "--log", str(log), "--skip-install", "train", FAKE_TPU_EXISTS="1", FAKE_RUN_RC="3")
    assert r.returncode == 3
    r, calls = fake("--zone", "z", "--name", "pod1", "delete")
    assert r.returncode == 0 and calls == [["compute", "tpus", "tpu-vm", "delete", "pod1", "--zone=z", "--quiet"]]


@pytest.mark.parametrize("args, message", [
    ([], "no command given"),
    (["--zone", "z", "launch"], "unknown command 'launch'"),
    (["train"], "no zone: pass --zone"),
    (["--zone", "z", "--accelerator", "v9-8", "train"], "unknown accelerator type 'v9-8'"),
    (["--zone", "z", "--bogus", "train"], "unknown option '--bogus'"),
])
def test_bad_input_is_one_error_line(fake, args, message):
    r, calls = fake(*args)
    assert r.returncode == 2 and calls == []
    assert r.stderr.strip().splitlines()[-1] == "error: " + r.stderr.strip().splitlines()[-1][7:]
    assert message in r.stderr.strip().splitlines()[-1]


def test_help_and_gpu_launcher():
    r = subprocess.run(["bash", str(TPU), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--accelerator TYPE" in r.stdout and "--dry-run" in r.stdout
    r = subprocess.run(["bash", str(GPU), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "gpu-8" in r.stdout
    r = subprocess.run(["bash", str(GPU), "--dry-run", "evaluate", "--config", "a b.py"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == \
        "+ .venv/bin/python -m diffmas_jax.evaluate --config a\\ b.py"
    r = subprocess.run(["bash", str(GPU), "serve"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown command 'serve' (train, evaluate, generate)"
    for script in (TPU, GPU):
        text = script.read_text()
        assert "set -euo pipefail" in text and os.access(script, os.X_OK)

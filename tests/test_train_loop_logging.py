"""The training loop's TensorBoard writer: scalars readable, torch kept out of the process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, tensorboard_scalars


def test_scalar_writer_keeps_torch_out_and_importable(tmp_path):
    pytest.importorskip("torch")  # without torch installed there is nothing to keep out
    code = ("import sys, json; from pathlib import Path; from diffmas_jax.train_loop import scalar_writer;"
            f"tb = scalar_writer(Path({str(tmp_path / 'tb')!r}));"
            "tb.add_scalar('train/loss', 1.5, 1); tb.add_scalar('train/loss', 0.75, 2); tb.close();"
            "loaded = 'torch' in sys.modules; import torch;"
            "print(json.dumps([loaded, hasattr(torch, 'tensor')]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [False, True]  # not loaded, yet importable after
    assert tensorboard_scalars(tmp_path / "tb") == {"train/loss": [(1, 1.5), (2, 0.75)]}


def test_scalar_writer_leaves_a_loaded_torch_alone(tmp_path):
    torch = pytest.importorskip("torch")
    from diffmas_jax.train_loop import scalar_writer
    tb = scalar_writer(tmp_path / "tb")
    tb.add_scalar("eval/loss", 2.0, 3)
    tb.close()
    assert sys.modules["torch"] is torch
    assert tensorboard_scalars(tmp_path / "tb") == {"eval/loss": [(3, 2.0)]}

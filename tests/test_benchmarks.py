"""The accelerator benchmark's smoke path on CPU: rows per variant, a failing variant recorded
as an error row (the others go on), and the profile summary read back from a real trace."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_quick_variants_and_profile(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks/bench_gpu.py"), "--quick", "--shape", "tiny", "--skip-torch",
           "--out", str(tmp_path), "--cases", "sft8", "--attention", "xla,cudnn", "--remat", "dots",
           "--decode-batches", "1", "--profile", str(tmp_path / "prof")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("gpu_*.json")).read_text())
    rows = report["shapes"]["tiny"]["train"]
    assert [row["attention"] for row in rows] == ["xla", "cudnn"]
    xla, cudnn = rows
    assert xla["remat"] == "dots" and xla["jax"]["tok_s"] > 0 and 0 < xla["jax"]["mfu"] < 1
    prof = xla["jax"]["profile"]
    assert prof["total_ms"] > 0 and prof["kernels_ms"] and prof["planes"] == ["/host:CPU"]
    assert "error" in cudnn and "jax" not in cudnn  # no cuDNN on a CPU: recorded, not fatal
    assert report["shapes"]["tiny"]["decode"][0]["jax"]["s_per_step"] > 0
    assert "| B=2 K=0" in next(tmp_path.glob("gpu_*.md")).read_text()

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


def test_kernel_floor_fused_chain_holds_the_same_weights():
    """bench_kernels' fused chain is the decode loop's layout: per layer qkv, o, gate_up, down,
    the same numbers as the seven separate matrices, and the LM head last."""
    import jax
    import numpy as np
    from diffmas_jax.model.config import ModelConfig
    from diffmas_jax.model.transformer import init_params
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_kernels import weight_chain
    cfg = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    plain, fused = weight_chain(params), weight_chain(params, fused=True)
    assert len(plain) == 7 * 2 + 1 and len(fused) == 4 * 2 + 1
    assert [m.shape for m in fused[:4]] == [(32, 32 + 2 * 16), (32, 32), (32, 2 * 48), (48, 32)]
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_allclose(x @ fused[0], np.concatenate([x @ plain[0], x @ plain[1], x @ plain[2]], 1), rtol=1e-5)
    np.testing.assert_allclose(x @ fused[2], np.concatenate([x @ plain[4], x @ plain[5]], 1), rtol=1e-5)
    np.testing.assert_array_equal(fused[-1], np.asarray(params["embed"]).T)

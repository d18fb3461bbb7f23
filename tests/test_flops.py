"""The benchmarks' FLOP counts: the jaxpr matmul counter is exact on known programs, and the
model count ("% of peak") is checked against what the real train step multiplies."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from flops import dot_flops  # noqa: E402


def test_dot_flops_counts_scans_per_iteration_and_only_the_gradients_taken():
    a, w = jnp.ones((4, 8)), jnp.ones((5, 8, 16))

    def f(a, w):  # five [4, 8] x [8, 16] matmuls in a scan, summed
        return jax.lax.scan(lambda c, wi: (c, (c @ wi).sum()), a, w)[1].sum()

    forward = 5 * 2 * 4 * 8 * 16
    assert dot_flops(f, a, w) == forward
    # d/da only: one more matmul per iteration (the input gradient); d/dw would add another
    assert dot_flops(jax.grad(f), a, w) == 2 * forward
    assert dot_flops(jax.grad(f, argnums=(0, 1)), a, w) == 3 * forward
    # batch dimensions count in the output; abstract shapes are enough
    bmm = lambda x, y: jnp.einsum("bij,bjk->bik", x, y)
    spec = jax.ShapeDtypeStruct
    assert dot_flops(bmm, spec((3, 4, 5), jnp.float32), spec((3, 5, 6), jnp.float32)) == 2 * 3 * 4 * 6 * 5


def test_dot_flops_takes_the_costlier_branch_and_refuses_while_loops():
    x = jnp.ones((8, 8))
    branchy = lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)
    assert dot_flops(branchy, True, x) == 2 * 2 * 8 ** 3
    loop = lambda x: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]
    with pytest.raises(ValueError, match="while loop"):
        dot_flops(loop, x)


@pytest.mark.parametrize("mode", ["stop", "full"])
def test_model_flops_bound_what_the_benchmarked_train_step_multiplies(embedded, mode):
    """bench_train's step at its default shapes (B=4, K=3 x (128 + m=10), solver 192, 64 targets):
    the model count (``step_flops``, the "% of peak" numerator) may not exceed the FLOPs the
    jitted step runs, and the implementation may add at most 12%: LoRA, recomputed attention
    scores and masked blocks (measured 5% stop, 9.5% full). Counting weight gradients the frozen
    backbone never computes, or leaving out attention (13% of the count) or the backward,
    falls outside."""
    import bench_train as bt
    b, k, t_up, m, t_sol, n_tgt = 4, 3, 128, 10, 192, 64
    jx = bt.JaxTrain(embedded, 8, 5e-5)
    up, sol = bt.make_inputs(embedded.tokenizer, b, k, t_up, t_sol)
    _, st, _ = jx.step_fn(up, sol, n_tgt, m, mode)
    model = bt.count_flops(embedded.cfg, b, k, t_up, m, t_sol, n_tgt, mode)["flops"]
    run = st["dot_flops"]()
    assert model <= run <= 1.12 * model, (mode, model / 1e9, run / 1e9)


def test_bench_train_quick_reports_both_counts_and_matching_losses(tmp_path, embedded):
    """A quick bench_train on a tiny random llama (embedded tokenizer): the JSON, its table and
    bench_all's summary carry the model FLOPs and the FLOPs run; both sides' first-step losses agree."""
    from conftest import save_tiny_model
    model = save_tiny_model(tmp_path / "tiny", "llama", vocab_size=embedded.cfg.vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(embedded.path) / name, model / name)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_train.py"), "--quick", "--model", str(model),
                        "--out", str(out), "--modes", "full", "--threads", "1"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(next(out.glob("train_*.json")).read_text())
    (row,) = report["results"]
    assert 0 < row["flops"] <= row["implementation_flops"]
    j = row["diffmas_jax"]
    assert j["first_call_split"]["trace_s"] > 0  # counting the FLOPs run must not pre-trace the timed call
    assert j["implementation_share_of_peak"] == pytest.approx(j["mfu"] * row["implementation_flops"] / row["flops"])
    # the peak is the fastest matmul measured: XLA's dots, YNNPACK's (where the step uses them), torch.mm
    from diffmas_jax.xla_cpu import ynn_dot_options
    machine = report["machine"]
    emitters = machine["matmul_peak"]["emitters"]
    assert set(emitters) == ({"xla", "ynnpack"} if ynn_dot_options() else {"xla"})
    measured = [e["flop_s"] for e in emitters.values()] + [machine["torch_matmul_peak"]["flop_s"]]
    assert machine["peak_flop_s"] == max(measured)
    assert j["mfu"] == pytest.approx(row["flops"] / j["median_s"] / max(measured))
    jax_loss, torch_loss = report["checks"]["B2_full_first_loss_jax_vs_torch"]
    assert jax_loss == pytest.approx(torch_loss, rel=1e-4)
    assert "% of peak, FLOPs run" in next(out.glob("train_*.md")).read_text()
    # bench_all's summary keeps the model-FLOPs share as the target and notes the FLOPs-run share
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_all.py"), "--from-dir", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (share,) = [s for s in json.loads((out / "summary.json").read_text())["rows"] if "share of" in s["measurement"]]
    assert share["value"] == j["mfu"]
    assert share["note"] == f"{100 * j['implementation_share_of_peak']:.1f}% counting the FLOPs the step runs"

"""`benchmarks/profile_summary.py`: self time of nested events, waits left out, time by loop level."""
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from profile_summary import op_family, pool_region_ns, pool_regions, render, self_times, summarize  # noqa: E402


def _ev(name, start, dur):
    return SimpleNamespace(name=name, start_ns=float(start), duration_ns=float(dur))


def test_self_times_charge_nested_events_once():
    # executor [0, 100] runs a [10, 30] and a while loop [40, 90] whose body is [50, 60]; then a sibling
    events = [_ev("body", 50, 10), _ev("executor", 0, 100), _ev("while", 40, 50), _ev("a", 10, 20),
              _ev("next", 100, 5)]
    got = {e.name: ns for e, ns in self_times(events)}
    assert got == {"executor": 30, "a": 20, "while": 40, "body": 10, "next": 5}
    assert sum(got.values()) == 105  # the union of the busy intervals, not the 185 of summed durations


def test_pool_regions_pair_start_and_stop_marks():
    marks = [_ev("ThreadpoolListener::StopRegion", 30, 0), _ev("ThreadpoolListener::StartRegion", 10, 0),
             _ev("ThreadpoolListener::Record", 12, 0), _ev("ThreadpoolListener::StartRegion", 50, 0),
             _ev("ThreadpoolListener::StopRegion", 95, 0), _ev("ThreadpoolListener::StartRegion", 99, 0)]
    assert pool_regions(marks) == [(10, 30), (50, 95)]  # the last region never stopped inside the trace
    assert pool_region_ns(marks) == 20 + 45


def test_op_family_drops_only_the_instance_suffix():
    assert op_family("ynn_fusion.191") == "ynn_fusion"
    assert op_family("dynamic-slice_bitcast_fusion") == "dynamic-slice_bitcast_fusion"
    assert op_family("fusion.1.2") == "fusion.1"


def test_cpu_trace_totals_are_work_and_group_by_loop_level(tmp_path):
    steps = 7
    w = jnp.asarray(np.random.default_rng(0).standard_normal((steps, 256, 256), np.float32) / 16)

    @jax.jit
    def chain(x, w):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    x = jnp.ones((64, 256), jnp.float32)
    chain(x, w).block_until_ready()
    jax.profiler.start_trace(str(tmp_path))
    for _ in range(2):
        chain(x, w).block_until_ready()
    jax.profiler.stop_trace()

    s = summarize(str(tmp_path), top=50, steps=2)
    assert s["planes"] == ["/host:CPU"]
    names = [k for k, _, _ in s["kernels_ms"]]
    assert not any(k.endswith(("(wait for completion)", "::Await")) or k.startswith("ThreadpoolListener")
                   for k in names)
    # self time cannot exceed the span times the threads that ran work (nested events counted once);
    # a pool thread can work only as a library's helper, with regions but no events of its own
    assert len(s["lines_ms"]) <= s["threads"]
    assert 0 < s["total_ms"] <= s["span_ms"] * s["threads"] + 1e-6
    assert 0 < s["busy_threads"] <= s["threads"] + 1e-6
    assert s["unattributed_ms"] == max(s["pool_ms"] - s["total_ms"], 0.0)
    calls = dict(s["calls_ms"])
    assert calls.get(steps, 0) > 0  # the scan body's ops run once per layer of the chain
    families = {k: n for k, _, n in s["families_ms"]}
    assert any(n == steps for n in families.values())
    assert "by calls per step" in render(s) and f"of {s['threads']} threads busy" in render(s)

#!/usr/bin/env python
"""Where device time goes: a ``jax.profiler`` trace summarised without TensorBoard.

Reads the ``*.xplane.pb`` under a trace directory with ``jax.profiler.ProfileData`` and sums
event *self time* (an event's duration less the events nested inside it on the same line) on
the accelerator's planes, or on the host CPU plane when there are none (XLA:CPU). Waits
(``... (wait for completion)``, ``::Await``) are idle time and left out. On a CPU, XLA's pool
threads also mark when they run pool work (``ThreadpoolListener`` regions); that time counts
libraries' helpers too (a YNNPACK GEMM runs on both threads but has an event only on the one
that called it), so ``busy_threads``, how many threads were busy on average, comes from the
regions where a trace has them, and ``unattributed_ms`` is the pool work no event names. Totals are
given by kernel name, by XLA op (``hlo_op``, where the event carries one), by op family (the
name without its ``.N`` suffix: ``ynn_fusion``, ``dynamic-slice_bitcast_fusion``, ...) and by
calls per step: inside nested loops an op runs once per iteration, so on a train step ops
called L times are the layers of the prompt chunks, L x m the latent steps, and so on.

    python benchmarks/profile_summary.py TRACE_DIR [--top 30] [--steps N]
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys

WAITS = ("(wait for completion)", "::Await")  # a thread waiting on others: idle, not work
AGGREGATE_LINES = ("XLA Modules", "Steps", "python")  # summaries of the kernels, not kernels
POOL_MARKERS = "ThreadpoolListener::"  # zero-length marks of a pool thread starting/stopping work


def _stats(event) -> dict:
    out = {}
    try:
        for name, value in event.stats:
            out[name] = value
    except Exception:  # stats are optional; names are enough for a summary
        pass
    return out


def self_times(events) -> list:
    """(event, self ns) for one line's events: each duration less its direct children's.

    Events on one line nest (an executor's event encloses the kernels it runs); a stack over
    the events sorted by start, longest first, finds each event's parent."""
    evs = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))
    out, stack = [], []  # stack holds [end_ns, index into out]
    for e in evs:
        while stack and stack[-1][0] <= e.start_ns:
            stack.pop()
        if stack:  # charge this event's time to it, not to its parent
            out[stack[-1][1]][1] -= e.duration_ns
        out.append([e, e.duration_ns])
        stack.append([e.start_ns + e.duration_ns, len(out) - 1])
    return [(e, max(ns, 0.0)) for e, ns in out]


def pool_regions(events) -> list:
    """(start_ns, stop_ns) of each pool work region on one line (StartRegion to StopRegion marks);
    a region still open at the end of the trace is left out."""
    regions, start = [], None
    for e in sorted(events, key=lambda e: e.start_ns):
        if e.name == POOL_MARKERS + "StartRegion":
            start = e.start_ns
        elif e.name == POOL_MARKERS + "StopRegion" and start is not None:
            regions.append((start, e.start_ns))
            start = None
    return regions


def pool_region_ns(events) -> float:
    """Time one line's thread spent inside pool work regions."""
    return float(sum(stop - start for start, stop in pool_regions(events)))


def op_family(name: str) -> str:
    return re.sub(r"\.\d+$", "", name)


def summarize(trace_dir: str, top: int = 30, steps: int = 1) -> dict:
    """Self-time totals (ms per step) on accelerator planes (host CPU plane if none)."""
    from jax.profiler import ProfileData
    files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(files[-1])
    planes = [p for p in data.planes if p.name.startswith("/device:")] or \
             [p for p in data.planes if p.name.startswith("/host:CPU")]
    by_kernel, by_op, by_line = collections.Counter(), collections.Counter(), collections.Counter()
    count = collections.Counter()
    first, last, pool_ns, working = float("inf"), 0.0, 0.0, set()
    for plane in planes:
        for line in plane.lines:
            if line.name in AGGREGATE_LINES:
                continue
            regions = pool_regions(line.events)
            if regions:  # a thread that only helped (no events of its own) still worked
                working.add(f"{plane.name} {line.name}")
                pool_ns += sum(stop - start for start, stop in regions)
                first, last = min(first, regions[0][0]), max(last, regions[-1][1])
            for ev, ns in self_times(line.events):
                if ev.name.endswith(WAITS) or ev.name.startswith(POOL_MARKERS):
                    continue
                first, last = min(first, ev.start_ns), max(last, ev.start_ns + ev.duration_ns)
                ms = ns / 1e6 / steps
                working.add(f"{plane.name} {line.name}")
                by_line[f"{plane.name} {line.name}"] += ms
                by_kernel[ev.name] += ms
                count[ev.name] += 1
                op = _stats(ev).get("hlo_op")
                if op is not None:
                    by_op[str(op)] += ms
    by_family, by_calls, family_calls = collections.Counter(), collections.Counter(), collections.Counter()
    for name, ms in by_kernel.items():
        by_family[op_family(name)] += ms
        family_calls[op_family(name)] += count[name] // steps
        by_calls[count[name] // steps] += ms
    total = sum(by_kernel.values())
    span_ms = (last - first) / 1e6 / steps if last > first else 0.0
    pool_ms = pool_ns / 1e6 / steps
    return {"planes": [p.name for p in planes], "lines_ms": dict(by_line.most_common(12)), "total_ms": total,
            "span_ms": span_ms, "pool_ms": pool_ms, "unattributed_ms": max(pool_ms - total, 0.0),
            "threads": len(working), "busy_threads": max(pool_ms, total) / span_ms if span_ms else 0.0,
            "kernels_ms": [(k, round(v, 3), count[k] // steps) for k, v in by_kernel.most_common(top)],
            "ops_ms": [(k, round(v, 3)) for k, v in by_op.most_common(top)],
            "families_ms": [(k, round(v, 3), family_calls[k]) for k, v in by_family.most_common(top)],
            "calls_ms": [(n, round(v, 3)) for n, v in by_calls.most_common(top)]}


def render(summary: dict) -> str:
    lines = [f"planes {summary['planes']}; self time {summary['total_ms']:.2f} ms per step over a "
             f"{summary.get('span_ms', 0):.2f} ms span; {summary.get('busy_threads', 0):.2f} "
             + (f"of {summary['threads']} " if "threads" in summary else "") + "threads busy on average"
             + (f", {summary['unattributed_ms']:.2f} ms of pool work named by no event (library helpers)"
                if summary.get("unattributed_ms") else ""),
             "lines: " + ", ".join(f"{k}: {v:.2f}" for k, v in summary["lines_ms"].items()), "kernels (ms/step, calls):"]
    lines += [f"  {v:9.3f}  {n:5d}  {k[:110]}" for k, v, n in summary["kernels_ms"]]
    if summary["ops_ms"]:
        lines += ["XLA ops (ms/step):"] + [f"  {v:9.3f}  {k[:110]}" for k, v in summary["ops_ms"]]
    if summary.get("families_ms"):
        lines += ["op families (ms/step, calls):"] + [f"  {v:9.3f}  {n:6d}  {k[:100]}" for k, v, n in summary["families_ms"]]
    if summary.get("calls_ms"):
        lines += ["by calls per step (ops run N times: one loop level each):"]
        lines += [f"  {v:9.3f}  N={n}" for n, v in summary["calls_ms"]]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--steps", type=int, default=1, help="steps traced: totals are divided by it")
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args(argv)
    s = summarize(args.trace_dir, args.top, args.steps)
    print(render(s))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Where device time goes: a ``jax.profiler`` trace summarised without TensorBoard.

Reads the ``*.xplane.pb`` under a trace directory with ``jax.profiler.ProfileData`` and sums
event durations on the accelerator's planes (one line per stream), by kernel name and, where the
event carries one, by XLA op (``hlo_op``). Prints the top entries and returns them as a dict.

    python benchmarks/profile_summary.py TRACE_DIR [--top 30]
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import sys


def _stats(event) -> dict:
    out = {}
    try:
        for name, value in event.stats:
            out[name] = value
    except Exception:  # stats are optional; names are enough for a summary
        pass
    return out


def summarize(trace_dir: str, top: int = 30, steps: int = 1) -> dict:
    """Per-kernel and per-op totals (ms per step) on accelerator planes (host CPU plane if none)."""
    from jax.profiler import ProfileData
    files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(files[-1])
    planes = [p for p in data.planes if p.name.startswith("/device:")] or \
             [p for p in data.planes if p.name.startswith("/host:CPU")]
    by_kernel, by_op, by_line = collections.Counter(), collections.Counter(), collections.Counter()
    count = collections.Counter()
    for plane in planes:
        for line in plane.lines:
            if line.name in ("XLA Modules", "Steps", "python"):  # aggregates, not kernels
                continue
            for ev in line.events:
                ms = ev.duration_ns / 1e6 / steps
                by_line[f"{plane.name} {line.name}"] += ms
                by_kernel[ev.name] += ms
                count[ev.name] += 1
                op = _stats(ev).get("hlo_op")
                if op is not None:
                    by_op[str(op)] += ms
    total = sum(by_kernel.values())
    return {"planes": [p.name for p in planes], "lines_ms": dict(by_line.most_common(12)), "total_ms": total,
            "kernels_ms": [(k, round(v, 3), count[k] // steps) for k, v in by_kernel.most_common(top)],
            "ops_ms": [(k, round(v, 3)) for k, v in by_op.most_common(top)]}


def render(summary: dict) -> str:
    lines = [f"planes {summary['planes']}; summed event time {summary['total_ms']:.2f} ms per step",
             "lines: " + ", ".join(f"{k}: {v:.2f}" for k, v in summary["lines_ms"].items()), "kernels (ms/step, calls):"]
    lines += [f"  {v:9.3f}  {n:5d}  {k[:110]}" for k, v, n in summary["kernels_ms"]]
    if summary["ops_ms"]:
        lines += ["XLA ops (ms/step):"] + [f"  {v:9.3f}  {k[:110]}" for k, v in summary["ops_ms"]]
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

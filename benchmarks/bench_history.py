#!/usr/bin/env python
"""Issue 8's targets across ``bench_all`` runs: how often each is met, and how far it moves.

One run's ratio says little on a noisy machine (the same code moves 15-35% between runs
here). This reads every ``all_<date>`` folder under the results directory, summarises each
with the current ``bench_all.summarise`` (so rows line up across runs), and writes:
  history.json  every run's figure per target, with n, met count, min / median / max
  history.md    the same as a table: one column per run, then the spread and "met in k of n"
  history.png   each target's figures as fractions of the target, one dot per run

    python benchmarks/bench_history.py --since 2026-12-03      # the AVX-512 machine's runs
    python benchmarks/bench_history.py --results benchmarks/results --out /tmp/history

Runs made with ``--quick`` are left out. Figures are what each run recorded; shares of the matmul
peak that a run counted as 6N FLOPs per trained token (before 2026-12-03 16:25, see
docs/performance.md) are marked and kept out of the spread and the met count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SCRIPT_PREFIXES = ("model_", "pipeline_", "train_", "kernels_")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(HERE / "results"), help="folder holding the all_<date> runs")
    ap.add_argument("--since", default=None, help="only runs from this date on (YYYY-MM-DD)")
    ap.add_argument("--out", default=None, help="where to write history.* (default: --results)")
    return ap.parse_args(argv)


def run_stamp(folder: Path) -> str:
    """'all_2026-12-03_223719' -> '2026-12-03 22:37'."""
    date, time = folder.name[len("all_"):].split("_")[:2]
    return f"{date} {time[:2]}:{time[2:4]}"


def is_quick(folder: Path) -> bool:
    for f in folder.glob("*.json"):
        if f.name.startswith(SCRIPT_PREFIXES):
            if f.stem.endswith("_quick") or json.loads(f.read_text()).get("machine", {}).get("quick"):
                return True
    return False


def find_runs(results: Path, since: str | None = None) -> list:
    """The full (not --quick) bench_all runs under ``results``, oldest first."""
    runs = []
    for folder in sorted(results.glob("all_*")):
        if not folder.is_dir() or not any(f.name.startswith(SCRIPT_PREFIXES) for f in folder.glob("*.json")):
            continue
        if since and folder.name[len("all_"):len("all_") + 10] < since:
            continue
        if not is_quick(folder):
            runs.append(folder)
    return runs


def collect(runs: list) -> dict:
    """{"runs": [stamps], "rows": [{measurement, target, unit, values, n, met, min, median, max}]}."""
    from bench_all import summarise
    rows: dict = {}
    hosts = []
    for i, folder in enumerate(runs):
        summary = summarise(folder)
        hosts.append(summary["host"])
        for r in summary["rows"]:
            row = rows.setdefault(r["measurement"], dict(measurement=r["measurement"], target=r["target"],
                                                         unit=r["unit"], values=[None] * len(runs),
                                                         met_in_run=[None] * len(runs),
                                                         legacy_6n_count=[False] * len(runs),
                                                         best=[None] * len(runs)))
            row["values"][i], row["met_in_run"][i] = r["value"], r["met"]  # bench_all's own verdict
            row["best"][i] = r.get("ratio_best", r.get("best"))  # runs whose sides took turns (2026-12-08 on)
            row["legacy_6n_count"][i] = bool(r.get("legacy_6n_count"))
    for row in rows.values():  # the spread and the met count use only figures counted alike
        kept = [(v, ok) for v, ok, old in zip(row["values"], row["met_in_run"], row["legacy_6n_count"])
                if v is not None and not old]
        got = [v for v, _ in kept]
        row.update(n=len(got), met=sum(bool(ok) for _, ok in kept),
                   min=min(got, default=None), median=statistics.median(got) if got else None,
                   max=max(got, default=None))
    ordered = sorted(rows.values(), key=lambda r: r["measurement"][:3])  # (a), (b), (c), (e); stable within
    return dict(runs=[run_stamp(f) for f in runs], folders=[f.name for f in runs], hosts=hosts, rows=ordered)


def cpu_generation(cpu_model) -> str:
    """'AMD EPYC (Zen 5: family 26, model 2; AVX-512)' -> 'Zen 5'; where no generation is
    named, the vendor with family and model, and AMX where present ('Intel family 6, model
    167, AMX'); '—' for runs that recorded the name alone."""
    if not cpu_model or "(" not in cpu_model:
        return "—"
    name, _, inner = cpu_model.rpartition("(")
    head, _, isa = inner.rstrip(")").partition(";")
    if ":" in head:
        return head.split(":")[0]
    vendor = name.split()[0].replace("(R)", "") if name.split() else ""
    return " ".join(filter(None, (vendor, head.strip()))) + (", AMX" if "AMX" in isa else "")


def _fmt(v, unit):
    if v is None:
        return "—"
    return f"{v:.1%}" if unit == "" else f"{v:.2f}x" if unit == "x" else f"{v:.1f} s"


def to_markdown(history: dict) -> str:
    runs = history["runs"]
    md = [f"# Issue 8 targets over {len(runs)} bench_all runs ({runs[0]} to {runs[-1]})", "",
          "| measurement | target | " + " | ".join(runs) + " | min | median | max | met |",
          "|---|---:|" + "---:|" * (len(runs) + 3) + "---|"]
    hosts = history.get("hosts") or [{}] * len(runs)
    peaks = [h.get("matmul_peak_gflop_s") for h in hosts]
    known = [p for p in peaks if p is not None]
    md.append("| host: CPU (recorded from 2026-12-07 14:40 on) | | "
              + " | ".join(cpu_generation(h.get("cpu_model")) for h in hosts) + " | | | | |")
    md.append("| host: f32 matmul peak, GFLOP/s | | " + " | ".join("—" if p is None else f"{p:.0f}" for p in peaks)
              + (f" | {min(known):.0f} | {statistics.median(known):.0f} | {max(known):.0f} | |" if known
                 else " | | | | |"))
    for r in history["rows"]:
        tgt = ("≤ " if r["unit"] == "s" else "≥ ") + _fmt(r["target"], r["unit"])
        best = r.get("best") or [None] * len(runs)
        cells = [_fmt(v, r["unit"]) + (" †" if old else "") + ("" if b is None else f" (best {_fmt(b, r['unit'])})")
                 for v, old, b in zip(r["values"], r["legacy_6n_count"], best)]
        cells += [_fmt(r[k], r["unit"]) for k in ("min", "median", "max")]
        md.append(f"| {r['measurement']} | {tgt} | " + " | ".join(cells) + f" | in {r['met']} of {r['n']} runs |")
    if any(b is not None for r in history["rows"] for b in r.get("best") or []):
        md += ["", "(best …): the same figure from each side's best repeat, in runs whose two sides took "
               "turns over their repeats (2026-12-08 on); the cell, the spread and the met count are medians."]
    if any(any(r["legacy_6n_count"]) for r in history["rows"]):
        md += ["", "† counted 6N FLOPs per trained token (runs before 2026-12-03 16:25), which over-counts a "
               "frozen-backbone LoRA step; left out of the spread and the met count."]
    return "\n".join(md) + "\n"


def main(argv=None):
    args = parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        sys.exit(f"error: results folder {results} does not exist")
    runs = find_runs(results, args.since)
    if not runs:
        sys.exit(f"error: no full bench_all run (all_<date> folder) under {results}"
                 + (f" from {args.since} on" if args.since else ""))
    history = collect(runs)
    out = Path(args.out or results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    (out / "history.md").write_text(to_markdown(history))
    from plots import history_plot
    history_plot(history, out / "history.png")
    print(to_markdown(history))
    print(f"wrote {out / 'history.json'}, history.md and history.png", file=sys.stderr)


if __name__ == "__main__":
    main()

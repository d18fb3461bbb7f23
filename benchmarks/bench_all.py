#!/usr/bin/env python
"""Issue 8's benchmark in one run: every script, then one table of ratios against the targets.

Runs, each in its own process and in this order, writing into one folder:
  bench_model.py     (b) batched greedy decode vs HF generate
  bench_pipeline.py  (a) the 4-agent LatentMAS pipeline vs an HF forward loop over a DynamicCache,
                     (d) peak memory against trace length, (e) first-call times
  bench_train.py     (c) the DiffMAS train step vs transformers + peft, share of the matmul peak
  bench_kernels.py   the floors: the decode step's matmul chain in XLA and in torch, and the
                     cost of writing fresh memory (what each XLA:CPU run and first run pays)
(glibc's malloc asking for huge pages, ``diffmas_jax.host_malloc``, unless the caller
set ``glibc.malloc.hugetlb`` in GLIBC_TUNABLES; each once other work has left the CPUs,
``machine_load.wait_until_quiet``, up to ``--max-wait`` s), then reads their JSON and writes
``summary.json`` and ``summary.md``: each target, the
measured figure, and whether it is met; ``targets.png`` draws each figure against its target
and ``memory.png`` the pipeline's peak RSS against trace length.

    python benchmarks/bench_all.py                  # about 30-40 min on 2 quiet cores
    python benchmarks/bench_all.py --quick          # smoke test of the whole chain (a few minutes)
    python benchmarks/bench_all.py --threads 1      # torch on one thread (a busy machine)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PACING = "pacing.json"  # bench_all's own record of the wait before each script
from bench_model import pairs_span  # noqa: E402
from machine_load import wait_until_quiet  # noqa: E402

SCRIPTS = ("bench_model", "bench_pipeline", "bench_train", "bench_kernels")
# issue 8's CPU targets
TARGETS = {"pipeline": 3.0, "generate_b8": 2.0, "train": 1.3, "train_peak_share": 0.5, "first_call_s": 60.0}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every script's --quick (smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every script")
    ap.add_argument("--only", default=",".join(SCRIPTS), help="comma list of scripts to run (default: all)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/all_<date>)")
    ap.add_argument("--max-wait", type=float, default=90.0,
                    help="seconds to wait before each script for other work to leave the CPUs (0: do not wait)")
    ap.add_argument("--from-dir", default=None, help="summarise an earlier run's folder without running anything")
    return ap.parse_args(argv)


def newest(folder: Path, prefix: str):
    files = sorted(folder.glob(f"{prefix}_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def _ratio(row):
    return row.get("ratio_jax_over_torch") if row else None


def _spread(row) -> dict:
    """A row's ratio of each side's best run and its per-repeat pairs' ratios (runs from
    2026-12-08 on, whose sides took turns; none before)."""
    return {k: row[k] for k in ("ratio_best", "ratio_pairs") if k in (row or {})}


def host_of(train, model, pipe) -> dict:
    """The run's CPU (``machine_load.cpu_model``: family and model from 2026-12-07 14:40 on, the
    name alone before) and the f32 matmul peak its train script measured (None where not run):
    the one the shares of the peak divide by, the faster of JAX's dots and torch.mm (on the AMX
    Xeon of 2026-12-07, torch.mm's 353.5 against 295.4 GFLOP/s), with each library's own."""
    cpu = next((r["machine"].get("cpu_model") for r in (train, model, pipe) if r), None)
    machine = (train or {}).get("machine", {})
    jax_peak = (machine.get("matmul_peak") or {}).get("flop_s")
    torch_peak = (machine.get("torch_matmul_peak") or {}).get("flop_s")
    peak = machine.get("peak_flop_s", jax_peak)
    gflop = lambda v: None if v is None else v / 1e9  # noqa: E731
    return dict(cpu_model=cpu, matmul_peak_gflop_s=gflop(peak), jax_matmul_peak_gflop_s=gflop(jax_peak),
                torch_matmul_peak_gflop_s=gflop(torch_peak))


def summarise(folder: Path) -> dict:
    """One row per target from the scripts' JSON (None where a script did not run)."""
    rows = []

    def add(what, target, value, unit="x", higher_is_better=True, note="", **extra):
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        rows.append(dict(measurement=what, target=target, value=value, unit=unit, met=met, note=note, **extra))

    pipe = newest(folder, "pipeline")
    if pipe:
        for r in pipe["results"]:
            if r.get("kind") == "forced":
                add(f"(a) LatentMAS pipeline, {r['measurement']}: tok/s vs HF loop", TARGETS["pipeline"], _ratio(r),
                    **_spread(r))
        for name, sub in pipe.get("subprocesses", {}).items():
            first = (sub.get("forced") or {}).get("first_call_s")
            if name.startswith("jax") and first is not None and not sub.get("memory_only"):
                _first_call_rows(add, f"pipeline, {name}", sub["forced"])
    model = newest(folder, "model")
    if model:
        for r in model["results"]:
            if r["measurement"].startswith("greedy decode tok/s, end to end (B=8"):
                add(f"(b) {r['measurement']} vs HF generate", TARGETS["generate_b8"], _ratio(r), **_spread(r))
    train = newest(folder, "train")
    if train:
        for r in train["results"]:
            add(f"(c) {r['measurement']}: tok/s vs transformers + peft", TARGETS["train"], _ratio(r), **_spread(r))
            j = r.get("diffmas_jax") or {}
            run_share = j.get("implementation_share_of_peak")
            # runs before 2026-12-03 16:25 counted 6N FLOPs per trained token (flops.conventional_6n)
            legacy = {} if "conventional_6n_flops" in r else dict(legacy_6n_count=True)
            add(f"(c) {r['measurement']}: share of measured f32 matmul peak", TARGETS["train_peak_share"],
                j.get("mfu"), unit="", **({"best": j["mfu_best"]} if "mfu_best" in j else {}),
                note="; ".join(([] if run_share is None else [f"{100 * run_share:.1f}% counting the FLOPs the step runs"])
                               + (["counted as 6N per trained token"] if legacy else [])), **legacy)
            _first_call_rows(add, r["measurement"], r.get("diffmas_jax") or {})
    memory = []
    if pipe:
        from plots import run_slots
        runs = pipe.get("subprocesses", {})
        slots_of = run_slots(runs)
        for name, sub in runs.items():
            memory.append(dict(run=name, slots_per_row=slots_of[name], rss_loaded_mb=sub.get("rss_loaded_mb"),
                               rss_peak_mb=sub.get("rss_peak_mb")))
        memory.sort(key=lambda m: (m["run"].split("_")[:2], m["slots_per_row"] or 0))
    kernels = newest(folder, "kernels")
    loads = {k: v["machine"].get("load_avg_start") or v["machine"].get("load_avg")
             for k, v in (("pipeline", pipe), ("model", model), ("train", train), ("kernels", kernels)) if v}
    hugetlb = {k: v["machine"].get("glibc_malloc_hugetlb")  # runs before 2026-12-03 22:40 lack it
               for k, v in (("pipeline", pipe), ("model", model), ("train", train), ("kernels", kernels)) if v}
    pacing = json.loads((folder / PACING).read_text()) if (folder / PACING).exists() else {}
    return dict(rows=rows, host=host_of(train, model, pipe), memory=memory, memory_runs=(pipe or {}).get("subprocesses", {}),
                kernels=kernels["rows"] if kernels else None, memory_touch=(kernels or {}).get("memory_touch") or [],
                load_avg_start=loads, malloc_hugetlb=hugetlb, pacing=pacing)


def _first_call_rows(add, what: str, res: dict):
    """(e): the compile time a first call pays (JAX's trace + lowering + XLA compile), then the
    whole first call (compile and the first run), both against the 60 s target."""
    split = res.get("first_call_split")
    if split:  # runs before 2026-12-03 16:30 have the total only
        add(f"(e) {what}: first-call compile (trace + lower + XLA compile)", TARGETS["first_call_s"],
            split["compile_s"], unit="s", higher_is_better=False)
    add(f"(e) {what}: whole first call (compile + first run)", TARGETS["first_call_s"], res.get("first_call_s"),
        unit="s", higher_is_better=False)


def _fmt(v, unit):
    if v is None:
        return "not run"
    return f"{v:.0%}" if unit == "" else f"{v:.2f}{unit}" if unit == "x" else f"{v:.1f} {unit}"


def to_markdown(summary: dict, title: str) -> str:
    host = summary.get("host") or {}
    peak = host.get("matmul_peak_gflop_s")
    each = [f"{lib} {host[key]:.1f}" for lib, key in (("JAX's dots", "jax_matmul_peak_gflop_s"),
                                                       ("torch.mm", "torch_matmul_peak_gflop_s"))
            if host.get(key) is not None]
    md = [f"# {title}", "", f"Host: {host.get('cpu_model') or 'CPU not recorded'}; f32 matmul peak "
          f"{'not measured' if peak is None else f'{peak:.1f} GFLOP/s'}"
          + (f" (the faster library's; {', '.join(each)})" if len(each) > 1 else "") + ".", "",
          "Measured: the median of each side's repeats (the sides took turns, A B, B A, ...); then the "
          "figure from each side's best run, and the range of the ratios of the repeats' pairs. 'met' is "
          "decided on the medians; 'close' marks a ratio whose pairs fall on both sides of its target.", "",
          "| measurement | target | measured | best vs best | pairs | met |", "|---|---:|---:|---:|---:|---|"]
    for r in summary["rows"]:
        sign = "≥" if r["unit"] in ("x", "") else "≤"
        tgt = f"{sign} {r['target']:.0%}" if r["unit"] == "" else f"{sign} {r['target']}{r['unit']}"
        note = f" ({r['note']})" if r.get("note") else ""
        best = r.get("ratio_best", r.get("best"))
        pairs = r.get("ratio_pairs") or []
        span = pairs_span(pairs) if pairs else "—"
        close = len(pairs) > 1 and min(pairs) < r["target"] <= max(pairs)
        met = "—" if r["met"] is None else ("yes" if r["met"] else "no") + (", close" if close else "")
        md.append(f"| {r['measurement']} | {tgt} | {_fmt(r['value'], r['unit'])}{note} | "
                  f"{'—' if best is None else _fmt(best, r['unit'])} | {span} | {met} |")
    if summary["memory"]:
        md += ["", "(d) peak memory against trace length (each run in a fresh process)", "",
               "| run | trace slots/row | RSS after load MB | peak RSS MB |", "|---|---:|---:|---:|"]
        md += [f"| {m['run']} | {m['slots_per_row'] or '—'} | {m['rss_loaded_mb']:.0f} | {m['rss_peak_mb']:.0f} |"
               for m in summary["memory"] if m["rss_peak_mb"] is not None]
    if summary["kernels"]:
        md += ["", "Floor: the decode step's matmul chain (bench_kernels.py)", "",
               "| batch | XLA ms | XLA fused q/k/v, gate/up ms | torch ms |", "|---:|---:|---:|---:|"]
        fused = lambda k: f"{k['xla_fused_ms']:.1f}" if "xla_fused_ms" in k else "—"  # runs before 2026-12-03 08:48
        md += [f"| {k['batch']} | {k['xla_ms']:.1f} | {fused(k)} | {k['torch_ms']:.1f} |" for k in summary["kernels"]]
    if summary.get("memory_touch"):  # bench_kernels from 2026-12-04 on
        md += ["", "Floor: writing fresh memory (bench_kernels.py; one fresh process per row, in this order)", "",
               "| glibc.malloc.hugetlb | GB | first touch s | later touches s |", "|---|---:|---:|---:|"]
        md += [f"| {t['hugetlb']} | {t['gb']:.1f} | {t['first_wall_s']:.2f} | {t['later_wall_s']:.2f} |"
               for t in summary["memory_touch"]]
    md += ["", f"Load average at each script's start: {summary['load_avg_start']}"]
    if summary.get("pacing"):
        md += ["Other work on the CPUs before each script (cores busy, after waiting up to --max-wait): " +
               ", ".join(f"{k} {'n/a' if v['cpu_busy_before'] is None else format(v['cpu_busy_before'], '.2f')}"
                         f" ({v['waited_s']:.0f} s waited)" for k, v in summary["pacing"].items())]
    if any(summary.get("malloc_hugetlb", {}).values()):
        md += [f"glibc.malloc.hugetlb in each script: {summary['malloc_hugetlb']}"]
    return "\n".join(md) + "\n"


def main(argv=None):
    from diffmas_jax.host_malloc import with_hugetlb
    args = parse_args(argv)
    if args.from_dir:
        folder = Path(args.from_dir)
    else:
        stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
        folder = Path(args.out or HERE / "results" / f"all_{stamp}")
        folder.mkdir(parents=True, exist_ok=True)
        pacing = {}
        for name in args.only.split(","):
            if name not in SCRIPTS:
                sys.exit(f"error: unknown script {name!r}; known: {', '.join(SCRIPTS)}")
            cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(folder)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            if args.max_wait > 0:  # the previous script's processes may still be winding down
                busy, waited = wait_until_quiet(args.max_wait, log=lambda m: print(m, file=sys.stderr, flush=True))
                pacing[name] = {"cpu_busy_before": busy, "waited_s": waited}
                (folder / PACING).write_text(json.dumps(pacing, indent=2) + "\n")
            print(f"== {' '.join(cmd)}", file=sys.stderr, flush=True)
            rc = subprocess.run(cmd, cwd=HERE.parent, env=with_hugetlb(os.environ)).returncode
            if rc:
                print(f"warning: {name} exited with {rc}; its rows are missing", file=sys.stderr)
    summary = summarise(folder)
    title = f"Issue 8 targets, {_dt.date.today().isoformat()} ({folder.name})"
    runs = summary.pop("memory_runs")
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.md").write_text(to_markdown(summary, title))
    from plots import memory_plot, targets_plot
    if any(r["value"] for r in summary["rows"]):
        targets_plot(summary["rows"], folder / "targets.png", title=title)
    if runs:
        memory_plot(runs, folder / "memory.png",
                    title="(d) 4-agent LatentMAS pipeline: peak RSS against trace length")
    print(to_markdown(summary, title))


if __name__ == "__main__":
    main()

"""PNG figures for the benchmark reports (matplotlib, headless).

  memory_plot   (d): peak RSS against trace slots per row, one line per side and batch size
  targets_plot  issue 8's targets: each measurement as a fraction of its target (1 = met)
  history_plot  the same across bench_all runs, one dot per run (bench_history.py)
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

SIDES = {"jax": ("diffmas_jax", "-", "o"), "torch": ("transformers", "--", "s")}
RUN_NAME = re.compile(r"^(jax|torch)_B(\d+)_N(\d+)$")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def run_slots(runs: dict) -> dict:
    """{run name: trace slots per row} for a pipeline report's ``subprocesses``
    ({"jax_B8_N512": {...}, ...}). A torch run has no trace of its own; it gets the slots of the
    diffmas_jax run with the same batch and N (the same tokens)."""
    out = {}
    for name, r in runs.items():
        m = RUN_NAME.match(name)
        own = r.get("slots_per_row")
        out[name] = own or (runs.get(f"jax_B{m.group(2)}_N{m.group(3)}", {}).get("slots_per_row") if m else None)
    return out


def memory_series(runs: dict) -> dict:
    """{(side, batch): [(slots per row, peak RSS MB), ...] sorted by slots} (slots from run_slots)."""
    slots_of, series = run_slots(runs), {}
    for name, r in runs.items():
        m = RUN_NAME.match(name)
        if not m or r.get("rss_peak_mb") is None or not slots_of[name]:
            continue
        series.setdefault((m.group(1), int(m.group(2))), []).append((slots_of[name], r["rss_peak_mb"]))
    return {k: sorted(v) for k, v in sorted(series.items())}


def memory_plot(runs: dict, path: Path, title: str = "Peak memory against trace length") -> Path:
    """Peak RSS (MB) against trace slots per row for each (side, batch) in ``runs`` (see memory_series)."""
    plt = _pyplot()
    series = memory_series(runs)
    if not series:
        raise ValueError("no run with a peak RSS and a trace length to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (side, b), pts in series.items():
        label, style, marker = SIDES[side]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, style, marker=marker, label=f"{label}, B={b}")
    ax.set_xlabel("trace slots per row")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def targets_plot(rows: list, path: Path, title: str = "Issue 8 targets") -> Path:
    """Each measured row as a fraction of its target (higher is better; times are inverted, so a
    60 s limit met in 30 s shows as 2.0). Rows that did not run are left out."""
    plt = _pyplot()
    done = [r for r in rows if r.get("value")]
    if not done:
        raise ValueError("no measured row to plot")
    frac = [r["value"] / r["target"] if r["unit"] in ("x", "") else r["target"] / r["value"] for r in done]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(done) + 1.2))
    ys = range(len(done))[::-1]
    ax.barh(list(ys), frac, color=["tab:green" if f >= 1 else "tab:red" for f in frac])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([textwrap.fill(r["measurement"], 60) for r in done], fontsize=7)
    ax.set_xlabel("measured / target (≥ 1: met)")
    ax.set_title(title)
    for y, f in zip(ys, frac):
        ax.text(f, y, f" {f:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def history_plot(history: dict, path: Path, title: str = "Issue 8 targets across bench_all runs") -> Path:
    """One row per target: every run's figure as a fraction of the target (times inverted, as in
    ``targets_plot``), the latest run as a black ring, 1 = met. From ``bench_history.collect``."""
    plt = _pyplot()
    rows = [r for r in history["rows"] if r["n"]]
    if not rows:
        raise ValueError("no measured row to plot")
    frac = lambda r, v: v / r["target"] if r["unit"] != "s" else r["target"] / v
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 1.6))
    for y, r in zip(range(len(rows))[::-1], rows):
        pts = [frac(r, v) for v, old in zip(r["values"], r["legacy_6n_count"]) if v is not None and not old]
        ax.scatter(pts, [y] * len(pts), s=18, alpha=0.6,
                   color=["tab:green" if p >= 1 else "tab:red" for p in pts])
        if r["values"][-1] is not None:
            ax.scatter([frac(r, r["values"][-1])], [y], s=70, facecolors="none", edgecolors="black")
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(list(range(len(rows))[::-1]))
    ax.set_yticklabels([textwrap.fill(f"{r['measurement']} (met in {r['met']} of {r['n']})", 50)
                        for r in rows], fontsize=7)
    ax.set_xscale("log")  # compile times sit at 3-9x their limit, the misses at 0.4-0.9x
    ax.set_xticks([0.25, 0.5, 1, 2, 4, 8])
    ax.set_xticklabels(["0.25", "0.5", "1", "2", "4", "8"])
    ax.set_xlabel("measured / target, log scale (≥ 1: met)")
    ax.set_title(f"{title}\none dot per run, {history['runs'][0]} to {history['runs'][-1]}; ring: the latest",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

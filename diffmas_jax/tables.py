"""Tables from evaluation summaries.

    python -m diffmas_jax.tables --workdirs results/baselines/* --out results/baselines

Each cell is accuracy with its 95% CI and n, read from ``summary.json``; a cell
whose run is missing or incomplete shows as missing (never as zero).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffmas_jax.cli import UserError, run_cli


def load_summaries(dirs) -> list[dict]:
    rows = []
    for d in dirs:
        p = Path(d) / "summary.json"
        if not p.exists():
            continue
        s = json.loads(p.read_text())
        cfg = s.get("config", {})
        name = cfg.get("method", "?")
        if cfg.get("lora") and name != "diffmas":
            name += "+sft"
        rows.append({"task": cfg.get("task", "?"), "method": name, "summary": s, "dir": str(d)})
    return rows


def cell(s: dict) -> str:
    if not s.get("complete", False):
        return f"incomplete ({s.get('n', 0)}/{s.get('n_total', '?')})"
    lo, hi = s["accuracy_ci95"]
    return f"{100 * s['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={s['n']})"


def accuracy_table(rows: list[dict], methods=None) -> str:
    tasks = sorted({r["task"] for r in rows})
    methods = methods or list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["task"], r["method"]): r["summary"] for r in rows}
    out = ["| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for t in tasks:
        out.append(f"| {t} | " + " | ".join(cell(by[(t, m)]) if (t, m) in by else "missing" for m in methods) + " |")
    return "\n".join(out)


def cost_table(rows: list[dict]) -> str:
    out = ["| task | method | prompt tok/q | generated tok/q | latent slots/q | s/q |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["method"])):
        s, tok = r["summary"], r["summary"].get("tokens_per_question", {})
        fmt = lambda v, f: ("%" + f) % v if isinstance(v, (int, float)) else "missing"
        out.append(f"| {r['task']} | {r['method']} | {fmt(tok.get('prompt'), '.0f')} | "
                   f"{fmt(tok.get('generated'), '.1f')} | {fmt(tok.get('latent_slots'), '.0f')} | "
                   f"{fmt(s.get('seconds_per_question'), '.2f')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffmas_jax.tables", description=__doc__.splitlines()[0])
    ap.add_argument("--workdirs", nargs="+", required=True, help="evaluation workdirs (each with summary.json)")
    ap.add_argument("--out", default=None, help="write tables.md and tables.json here")
    ap.add_argument("--methods", default=None, help="column order, comma separated")
    args = ap.parse_args(argv)
    rows = load_summaries(args.workdirs)
    if not rows:
        raise UserError("no summary.json found in the given workdirs")
    methods = args.methods.split(",") if args.methods else None
    md = "## Accuracy (%) with 95% bootstrap CI\n\n" + accuracy_table(rows, methods) + \
         "\n\n## Cost per question\n\n" + cost_table(rows) + "\n"
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tables.md").write_text(md)
        (out / "tables.json").write_text(json.dumps(
            [{k: r[k] for k in ("task", "method", "dir")} | {"accuracy": r["summary"].get("accuracy"),
              "ci95": r["summary"].get("accuracy_ci95"), "n": r["summary"].get("n"),
              "complete": r["summary"].get("complete")} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)

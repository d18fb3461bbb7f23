"""The offline DiffMAS demo on the embedded SmolLM2-135M.

1. trains DiffMAS communication (planner -> solver, m latent steps, LoRA) on
   arithmetic word problems the project generates itself;
2. evaluates Single, LatentMAS and DiffMAS (LatentMAS + the adapter) on held-out
   problems;
3. prints the table, writes results.md / results.json and a loss-curve PNG.

Every stage is the ordinary CLI (train / evaluate) in a subprocess, so the demo
resumes where it stopped when re-run with the same --workdir.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd)
    if r.returncode == 2:  # the step's own one-line error is already on stderr
        sys.exit(2)
    if r.returncode != 0:
        print(f"error: step failed (exit {r.returncode}): {' '.join(cmd[2:4])}", file=sys.stderr)
        sys.exit(r.returncode if 0 < r.returncode < 128 else 1)


def plot_loss(metrics_csv: Path, out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(metrics_csv)))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [float(r["loss"]) for r in rows], label="train loss (target NLL)")
    ev = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r.get("eval_loss")]
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("mean NLL per target token")
    ax.set_title("DiffMAS on the embedded SmolLM2-135M")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def check_args(args) -> None:
    """Bad arguments are one UserError line before the demo trains or writes anything."""
    from diffmas_jax.cli import UserError, check_workdir_path
    for flag, value, least in (("--train-steps", args.train_steps, 1), ("--eval-items", args.eval_items, 1),
                               ("--latent-steps", args.latent_steps, 0), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < least:
            kind = "a positive integer" if least == 1 else "an integer >= 0"
            raise UserError(f"{flag} must be {kind}, got {value}")
    check_workdir_path(args.workdir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffmas_jax.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--eval-items", type=int, default=40)
    ap.add_argument("--latent-steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--with-sft", action="store_true",
                    help="also train and evaluate Single+SFT (same targets, no trace): separates learning "
                         "the task from learning to communicate")
    args = ap.parse_args(argv)
    check_args(args)  # before anything runs or is written
    wd = Path(args.workdir).expanduser()
    wd.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t0 = time.time()
    common = ["--config.roles=planner,solver", f"--config.latent_steps={args.latent_steps}"]
    run([py, "-m", "diffmas_jax.train", "--config", str(REPO / "configs/embedded_train.py"),
         "--workdir", str(wd / "train"), f"--config.steps={args.train_steps}", "--config.limit=400",
         "--config.checkpoint_every=10", "--config.eval_every=10", *common])
    if args.with_sft:
        run([py, "-m", "diffmas_jax.train", "--config", str(REPO / "configs/embedded_train.py"),
             "--workdir", str(wd / "train_sft"), f"--config.steps={args.train_steps}", "--config.limit=400",
             "--config.checkpoint_every=10", "--config.eval_every=10", "--config.method=single_sft", *common])
    rows = []
    runs = [("single", "single", []), ("latent_mas", "latent_mas", []),
            ("diffmas", "diffmas", [f"--config.lora={wd / 'train' / 'adapter'}"])]
    if args.with_sft:
        runs.insert(1, ("single+sft", "single", [f"--config.lora={wd / 'train_sft' / 'adapter'}"]))
    for name, method, extra in runs:
        run([py, "-m", "diffmas_jax.evaluate", "--config", str(REPO / "configs/embedded_eval.py"),
             "--workdir", str(wd / f"eval_{name.replace('+', '_')}"), f"--config.method={method}", "--config.task=arith",
             f"--config.limit={args.eval_items}", "--config.batch_size=8",
             f"--config.max_new_tokens={args.max_new_tokens}", *common, *extra])
        s = json.loads((wd / f"eval_{name.replace('+', '_')}" / "summary.json").read_text())
        rows.append((name, s))
    plot_loss(wd / "train" / "metrics.csv", wd / "loss.png")
    lines = ["| method | accuracy | 95% CI | n | prompt tok/q | generated tok/q | s/q |", "|---|---|---|---|---|---|---|"]
    for method, s in rows:
        lo, hi = s.get("accuracy_ci95", [float("nan")] * 2)
        lines.append(f"| {method} | {100 * s['accuracy']:.1f} | [{100 * lo:.1f}, {100 * hi:.1f}] | {s['n']} | "
                     f"{s['tokens_per_question']['prompt']:.0f} | {s['tokens_per_question']['generated']:.1f} | "
                     f"{s['seconds_per_question']:.2f} |")
    table = "\n".join(lines)
    (wd / "results.md").write_text(f"# DiffMAS demo (embedded SmolLM2-135M, task arith)\n\n{table}\n\n"
                                   f"Loss curve: loss.png. Total wall time {time.time() - t0:.0f} s.\n")
    (wd / "results.json").write_text(json.dumps({m: s for m, s in rows}, indent=2, default=str))
    print("\n" + table + f"\n\nwrote {wd / 'results.md'}, {wd / 'loss.png'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    from diffmas_jax.cli import run_cli
    run_cli(main)

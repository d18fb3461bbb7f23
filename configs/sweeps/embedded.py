"""The paper's tables on this machine: embedded SmolLM2-135M, arc_easy and gsm8k (issue 7).

    python -m diffmas_jax.sweep --config configs/sweeps/embedded.py --dry-run
    python -m diffmas_jax.sweep --config configs/sweeps/embedded.py [--grids main,stitch]
    python -m diffmas_jax.tables --workdirs runs/sweeps/embedded --out results/embedded

DiffMAS and the SFT baselines train on the task's train split (ARC-Easy-Train, GSM8K
train) and every method is evaluated on the first `limit` test items, greedy.
Agents: planner -> solver (one upstream agent keeps CPU training affordable). StitchMAS
and overwrite need two upstream agents (with one, StitchMAS equals LatentMAS and
overwrite equals concat), so those grids run planner -> critic -> solver, with LatentMAS
and DiffMAS (trace_grad full, where Proposition 3.1's gradient attenuation lives) for
the same agents; the tables compare runs of one agent set only.

Grids (cells shared between grids run once):
  main          Single, TextMAS, LatentMAS, DiffMAS (trace_grad stop), m = 10, both tasks
  latent_steps  LatentMAS and DiffMAS at m = 0, 5, 10, 20, 40 (arc_easy)
  sft           Single+SFT and TextMAS+SFT (arc_easy): same targets, no trace
  trace_grad    DiffMAS with trace_grad = full, m = 10 (arc_easy)
  stitch        StitchMAS, m = 10, planner -> critic -> solver (arc_easy)
  overwrite     LatentMAS and DiffMAS (full), concat and overwrite, planner -> critic -> solver (arc_easy)
  c2c           C2C between planner and solver: a trained cache fuser (arc_easy)

Rough cost on a 2-core CPU (from the baseline and demo runs, other jobs sharing it):
evaluation 4-9 s per question (arc_easy, 100 questions; gsm8k, 40 with 160 new
tokens), DiffMAS training 10-20 s per step (60 steps); about 25 trainings + evaluations
in all. Use --grids to run a part, and --set to shrink it (e.g. --set eval.limit=50).
"""
from pathlib import Path

import ml_collections

# The benchmark copies beside the clone, found from this file (any working directory).
SHARED_DATA = str(Path(__file__).resolve().parents[3] / "shared" / "data")


def get_config():
    c = ml_collections.ConfigDict()
    c.root = "runs/sweeps/embedded"
    c.eval_config = "configs/embedded_eval.py"
    c.train_config = "configs/embedded_train.py"
    c.c2c_train_config = "configs/embedded_c2c_train.py"
    # axes (a grid's own value wins)
    c.models = "embedded"
    c.tasks = "arc_easy,gsm8k"
    c.methods = "single,text_mas,latent_mas,diffmas"
    c.latent_steps = "10"
    c.seeds = "0"
    c.trace_grads = "stop"
    c.communications = "concat"
    c.visibilities = "full"
    c.roles = "planner,solver"
    # --config.FIELD values for every evaluation / training (then task_*, then the grid's own)
    c.eval = ml_collections.ConfigDict({
        "data_dir": SHARED_DATA, "split": "test", "limit": 100, "batch_size": 10,
        "max_new_tokens": 48, "text_max_new_tokens": 64, "temperature": 0.0,
    })
    c.train = ml_collections.ConfigDict({
        "data_dir": SHARED_DATA, "split": "train", "limit": 400, "steps": 60, "batch_size": 4,
        "lr": 1e-3, "warmup_steps": 5, "max_target_tokens": 64, "text_max_new_tokens": 64,
        "checkpoint_every": 20, "eval_every": 20, "eval_items": 16,
    })
    # the C2C fuser's trainer (configs/embedded_c2c_train.py keeps the reference optimiser:
    # AdamW lr 1e-4, 10% warmup, gate temperature 1 -> 0.001)
    c.c2c_train = ml_collections.ConfigDict({
        "data_dir": SHARED_DATA, "split": "train", "limit": 400, "steps": 60, "batch_size": 4,
        "max_target_tokens": 64, "checkpoint_every": 20, "eval_every": 20, "eval_items": 8,
    })
    c.task_eval = ml_collections.ConfigDict({"gsm8k": {"limit": 40, "max_new_tokens": 160}})
    c.task_train = ml_collections.ConfigDict({"gsm8k": {"max_target_tokens": 160}})
    c.grids = ml_collections.ConfigDict({
        "main": {},
        "latent_steps": {"tasks": "arc_easy", "methods": "latent_mas,diffmas", "latent_steps": "0,5,10,20,40"},
        "sft": {"tasks": "arc_easy", "methods": "single_sft,text_mas_sft"},
        "stitch": {"tasks": "arc_easy", "methods": "stitch_mas", "roles": "planner,critic,solver"},
        "trace_grad": {"tasks": "arc_easy", "methods": "diffmas", "trace_grads": "full"},
        "overwrite": {"tasks": "arc_easy", "methods": "latent_mas,diffmas", "trace_grads": "full",
                      "communications": "concat,overwrite", "roles": "planner,critic,solver"},
        # C2C between planner and solver (c2c_train below)
        "c2c": {"tasks": "arc_easy", "methods": "c2c"},
    })
    return c

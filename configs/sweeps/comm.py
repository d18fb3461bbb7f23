"""The communication benchmark (task `comm`): facts reach the upstream agents only.

    python -m diffmas_jax.sweep --config configs/sweeps/comm.py --dry-run
    python -m diffmas_jax.sweep --config configs/sweeps/comm.py
    python -m diffmas_jax.tables --workdirs runs/sweeps/comm --out results/comm

Each problem's facts ("Ava has 12 cards. Jonas has 8 cards. ...") go to the upstream
agents (planner, critic) only; the solver's prompt holds the question alone, and with
visibility = latent_only the solver attends to their latent slots, never their prompt
tokens. Two upstream agents, so StitchMAS (each segment built apart) differs from
LatentMAS. Single sees
no facts (a floor: only guessing), TextMAS's solver reads the planner's text (a channel
that can carry the facts), Single+SFT learns the format without any facts (a second
floor); LatentMAS, StitchMAS and DiffMAS (trace_grad stop and full) at several m.
With m = 0 and latent_only the solver sees nothing upstream.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.root = "runs/sweeps/comm"
    c.eval_config = "configs/embedded_eval.py"
    c.train_config = "configs/embedded_train.py"
    c.c2c_train_config = "configs/embedded_c2c_train.py"
    c.models = "embedded"
    c.tasks = "comm"
    c.methods = "single,text_mas,latent_mas,stitch_mas,diffmas"
    c.latent_steps = "0,4,16"
    c.seeds = "0"
    c.trace_grads = "stop,full"
    c.communications = "concat"
    c.visibilities = "latent_only"
    c.roles = "planner,critic,solver"
    c.eval = ml_collections.ConfigDict({
        "split": "test", "limit": 100, "batch_size": 10, "max_new_tokens": 32, "text_max_new_tokens": 64,
        "temperature": 0.0,
    })
    c.train = ml_collections.ConfigDict({
        "split": "train", "limit": 400, "steps": 60, "batch_size": 4, "lr": 1e-3, "warmup_steps": 5,
        "max_target_tokens": 48, "text_max_new_tokens": 64, "checkpoint_every": 20, "eval_every": 20,
        "eval_items": 16,
    })
    c.task_eval = ml_collections.ConfigDict({})
    c.task_train = ml_collections.ConfigDict({})
    c.grids = ml_collections.ConfigDict({
        "comm": {},
        "sft": {"methods": "single_sft"},
    })
    return c

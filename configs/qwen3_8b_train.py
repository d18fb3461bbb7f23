"""DiffMAS training with the paper's hyperparameters on Qwen3-8B.

LoRA rank 8, alpha 16, AdamW lr 5e-5 with warmup + cosine decay, gradient
accumulation 64, m = 10 latent steps, sequential planner -> critic -> refiner -> solver.
Targets: gsm8k worked solutions by default (--config.task=jsonl --config.task_path=FILE
for trajectories written by a stronger model). Needs an accelerator.

    python -m diffmas_jax.train --config configs/qwen3_8b_train.py --workdir runs/q8 \
        --config.trace_grad=full
"""
from diffmas_jax.config_utils import sibling_config


def get_config():
    c = sibling_config(__file__, "embedded_train.py")
    c.model = "Qwen/Qwen3-8B"
    c.dtype = "bfloat16"
    c.task = "gsm8k"
    c.limit = 7473
    c.latent_steps = "10"
    # as the evaluation rows (configs/qwen3_8b.py): trained on the prompts it is evaluated on
    # (thinking off appends an empty think block to every agent's prompt). The GSM8K targets
    # hold no thinking, so the solver learns to answer without it.
    c.enable_thinking = True
    c.lora_rank, c.lora_alpha = 8, 16.0
    c.lr = 5e-5
    c.batch_size = 1
    c.grad_accum = 64
    c.steps = 64 * 100
    c.warmup_steps = 10
    c.weight_decay = 0.0
    c.max_target_tokens = 512     # target + EOS; a longer target is cut here, without EOS (the run warns)
    c.remat = True
    c.remat_policy = "full"  # with remat: "full" (least memory) or "dots" (keeps matmul outputs: faster)
    c.checkpoint_every = 640
    c.eval_every = 640
    c.eval_items = 64
    return c

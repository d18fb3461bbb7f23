"""The paper's grid (needs accelerators): Qwen3 models, the paper's benchmarks and settings.

    python -m diffmas_jax.sweep --config configs/sweeps/paper.py --dry-run
    python -m diffmas_jax.sweep --config configs/sweeps/paper.py --shard auto     # every host of a pod
    python -m diffmas_jax.tables --workdirs runs/sweeps/paper --out results/paper

Evaluation follows configs/qwen3_8b.py (bfloat16, temperature 0.6, top-p 0.95, thinking
on, benchmarks from the Hugging Face Hub); training follows configs/qwen3_8b_train.py
(LoRA rank 8 / alpha 16, lr 5e-5, accumulation 64, m = 10) on GSM8K worked solutions:
one adapter per (model, method, m, trace_grad), shared by every benchmark it is
evaluated on (the paper does not say what it trains on; --set task_train... to change).
The model axis overrides the configs' model (same settings for 4B, 8B and 14B).

Grids:
  main          Single, TextMAS, LatentMAS, DiffMAS on Qwen3-4B / 8B (AIME24, GPQA-Diamond)
  code          the same on Qwen3-14B (HumanEval+, MBPP+)
  latent_steps  DiffMAS and LatentMAS at m = 0, 10, 40, 100, 200 (Qwen3-8B, AIME24)
  stitch        StitchMAS (Qwen3-8B, AIME24 and GPQA-Diamond)
  sft           Single+SFT and TextMAS+SFT (Qwen3-8B)
  trace_grad    DiffMAS with trace_grad = full (Qwen3-8B)
Sampling is at temperature 0.6, so more seeds narrow the CIs: --set seeds=0,1,2.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.root = "runs/sweeps/paper"
    c.eval_config = "configs/qwen3_8b.py"
    c.train_config = "configs/qwen3_8b_train.py"
    c.c2c_train_config = "configs/embedded_c2c_train.py"
    c.models = "Qwen/Qwen3-8B"
    c.tasks = "aime24,gpqa_diamond"
    c.methods = "single,text_mas,latent_mas,diffmas"
    c.latent_steps = "10"
    c.seeds = "0"
    c.trace_grads = "stop"
    c.communications = "concat"
    c.visibilities = "full"
    c.roles = None                      # the configs' layout: planner -> critic -> refiner -> solver
    c.eval = ml_collections.ConfigDict({"split": "test"})
    c.train = ml_collections.ConfigDict({"task": "gsm8k", "split": "train"})
    c.task_eval = ml_collections.ConfigDict({})
    c.task_train = ml_collections.ConfigDict({})
    c.grids = ml_collections.ConfigDict({
        "main": {"models": "Qwen/Qwen3-4B,Qwen/Qwen3-8B"},
        "code": {"models": "Qwen/Qwen3-14B", "tasks": "humanevalplus,mbppplus"},
        "latent_steps": {"tasks": "aime24", "methods": "latent_mas,diffmas", "latent_steps": "0,10,40,100,200"},
        "stitch": {"methods": "stitch_mas"},
        "sft": {"methods": "single_sft,text_mas_sft"},
        "trace_grad": {"methods": "diffmas", "trace_grads": "full"},
    })
    return c

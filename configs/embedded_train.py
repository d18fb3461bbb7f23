"""DiffMAS training on the embedded SmolLM2-135M (CPU-sized defaults).

    python -m diffmas_jax.train --config configs/embedded_train.py --workdir runs/train
"""
import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "embedded"
    c.dtype = "float32"
    c.method = "diffmas"              # diffmas | single_sft | text_mas_sft
    c.task = "arith"                  # generated arithmetic word problems (offline)
    c.task_path = placeholder(str)     # task=jsonl: the JSONL file of (question, answer, target)
    c.split = "train"
    c.data_dir = placeholder(str)       # None: generated / Hugging Face hub
    c.limit = 256
    c.layout = "sequential"
    c.roles = placeholder(str)         # e.g. "planner,solver"; None: the layout
    c.latent_steps = "4"              # one value, or a comma list with one per upstream agent
    c.realign = "ridge"
    c.realign_lambda = 1e-5
    c.communication = "concat"        # concat | overwrite
    c.visibility = "full"             # full | latent_only
    c.trace_grad = "stop"             # stop | full
    c.enable_thinking = placeholder(bool)
    c.text_max_new_tokens = 64        # text_mas_sft: tokens each upstream agent writes
    # LoRA
    c.lora_rank = 8
    c.lora_alpha = 16.0
    c.lora_targets = "q,k,v,o,gate,up,down"
    c.lora_dropout = 0.0
    c.lora_per_role = False
    # optimisation
    c.batch_size = 4
    c.steps = 60                      # micro-batches (a multiple of grad_accum)
    c.grad_accum = 1                  # micro-batches per update; the loss is a per-token mean over all of them
    c.lr = 1e-3
    c.warmup_steps = 5                # optimizer updates (micro-batches / grad_accum)
    c.weight_decay = 0.0
    c.clip = 1.0
    c.max_target_tokens = 64      # target + EOS; a longer target is cut here, without EOS (the run warns)
    c.trace_capacity = placeholder(int)  # None: exactly what the longest batch needs
    c.remat = False
    c.remat_policy = "full"  # with remat: "full" (least memory) or "dots" (keeps matmul outputs: faster)
    c.seed = 0
    # bookkeeping
    c.checkpoint_every = 20
    c.keep_checkpoints = 2
    c.eval_every = 20                 # held-out loss every N steps (0: never)
    c.eval_items = 8
    c.log_every = 1
    c.on_nan = "stop"                 # stop | skip
    c.export_peft = True              # workdir/peft: a PEFT adapter directory
    c.export_merged = False           # workdir/merged: an HF checkpoint with the LoRA merged in
    # hardware (diffmas_jax.mesh_presets, diffmas_jax.memory)
    c.mesh_preset = placeholder(str)          # v4-8 | v5e-8 | v5e-16 | v5p-8 | gpu-8 | gpu-1
    c.mesh = placeholder(str)                 # "data,fsdp,tensor" (one may be -1); wins over the preset
    c.device_memory_gib = placeholder(float)  # per-device memory for the estimate if the device hides it
    return c

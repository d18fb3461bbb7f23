"""C2C fuser training on the embedded SmolLM2-135M (the identical setting, CPU-sized).

    python -m diffmas_jax.train --config configs/embedded_c2c_train.py --workdir runs/c2c
    python -m diffmas_jax.evaluate --config configs/embedded_eval.py --workdir runs/eval_c2c \
        --config.method=c2c --config.fuser=runs/c2c/fuser

Optimisation follows the C2C reference (AdamW lr 1e-4, weight decay 0.01, linear
schedule with 10% warmup, clip 1.0, gate temperature 1.0 -> 0.001); the fuser is
smaller than the reference's (hidden 1024) so it trains on a CPU.
"""
import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    c = ml_collections.ConfigDict()
    c.method = "c2c"
    c.model = "embedded"
    c.receiver = placeholder(str)      # the model that answers; None: model
    c.sharer = placeholder(str)        # None: the receiver (identical setting); another model needs one agent
    c.dtype = "float32"
    c.task = "arith"                   # generated arithmetic word problems (offline)
    c.task_path = placeholder(str)      # task=jsonl: the JSONL file of (question, answer, target)
    c.split = "train"
    c.data_dir = placeholder(str)
    c.limit = 256
    c.layout = "sequential"            # C2C between consecutive agents, same roles and prompts as the others
    c.roles = placeholder(str)         # "solver": plain C2C (the sharer reads the solver's prompt)
    c.enable_thinking = placeholder(bool)
    # fuser
    c.fuser_hidden = 128               # reference: 1024
    c.fuser_depth = 3                  # residual blocks: shared + (depth - 2) projection + weight
    c.fuser_dropout = 0.1
    c.layer_map = "last"               # last | proportional
    c.gate_t0 = 1.0                    # Gumbel-sigmoid temperature, annealed per optimizer step
    c.gate_t1 = 0.001
    # optimisation
    c.batch_size = 4
    c.steps = 60                       # micro-batches
    c.grad_accum = 1
    c.lr = 1e-4
    c.warmup_frac = 0.1
    c.weight_decay = 0.01
    c.clip = 1.0
    c.max_target_tokens = 64      # target + EOS; a longer target is cut here, without EOS (the run warns)
    c.remat = False
    c.remat_policy = "full"  # with remat: "full" (least memory) or "dots" (keeps matmul outputs: faster)
    c.seed = 0
    # bookkeeping
    c.checkpoint_every = 20
    c.keep_checkpoints = 2
    c.eval_every = 20                  # held-out loss every N steps (0: never)
    c.eval_items = 8
    c.on_nan = "stop"                  # stop | skip
    # hardware (diffmas_jax.mesh_presets): both models load into their shards on this mesh
    c.mesh_preset = placeholder(str)          # v4-8 | v5e-8 | v5e-16 | v5p-8 | gpu-8 | gpu-1
    c.mesh = placeholder(str)                 # "data,fsdp,tensor" (one may be -1); wins over the preset
    c.device_memory_gib = placeholder(float)  # per-device memory for the fit check if the device hides it
    return c

"""Evaluation configs: one shared default, checked and resolved into plain values.

``configs/*.py`` files build on :func:`eval_config` (importing it from the installed
package, so they load from any working directory), e.g.::

    def get_config():
        return eval_config(model="Qwen/Qwen3-8B", dtype="bfloat16", temperature=0.6)

Every field can be overridden on the command line (``--config.method=single``).
Fields that may be unset (None) are placeholders with a type, so ``--config.lora=DIR``
and ``--config.task_options.path=FILE`` work too. ``latent_steps`` and ``roles`` are
strings so one flag can give one value or a comma list (``--config.latent_steps=4,8,16``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from diffmas_jax.cli import UserError

REALIGNS = ("ridge", "norm", "none")

# Fields that do not change what an item's result is: a run may resume with new values.
# (No row depends on its batch company, greedy or sampled, so batch_size is always free;
# with sampling, seed picks every item's random stream and must match.)
RESUMABLE_FIELDS = ("limit", "batch_size", "seed", "prompt_bucket", "bootstrap_resamples",
                    "mesh_preset", "mesh", "device_memory_gib")
SAMPLING_FIELDS = ("seed", "sample_keys")
# The Stage I settings an adapter is trained with: train records them with the adapter,
# evaluate warns when it runs the adapter with others.
STAGE1_FIELDS = ("latent_steps", "realign", "realign_lambda", "communication", "visibility", "enable_thinking")
# How sampled runs derive each item's key (evaluate.item_seed), recorded in a sampled run's
# config: a workdir sampled another way (before 2026-12-07: one key per batch) is not resumed
# with this one, nor are its seeds pooled with this one's in tables.
SAMPLE_KEYS = "per-item"


def eval_config(**overrides) -> ml_collections.ConfigDict:
    """The default evaluation config (embedded model, LatentMAS on GSM8K), with overrides."""
    c = ml_collections.ConfigDict()
    # model
    c.model = "embedded"                     # 'embedded', a local HF dir / .gguf file, or a Hub id
    c.dtype = "float32"                      # weights and compute: float32 | bfloat16
    c.lora = config_dict.placeholder(str)    # adapter dir: diffmas, or single/text_mas for SFT baselines
    c.lora_scale = 1.0                       # multiplies the adapter's alpha/rank (1.0 = as trained)
    c.fuser = config_dict.placeholder(str)   # method c2c: trained fuser dir (train with method=c2c)
    c.receiver = config_dict.placeholder(str)  # method c2c: the answering model; None: model
    c.sharer = config_dict.placeholder(str)  # method c2c: None = the receiver (identical setting)
    # method
    c.method = "latent_mas"                  # single | text_mas | latent_mas | stitch_mas | diffmas | c2c
    c.layout = "sequential"                  # sequential | hierarchical
    c.roles = config_dict.placeholder(str)   # "planner,critic,solver": overrides the layout
    c.latent_steps = "10"                    # one value, or one per upstream agent: "10,10,10"
    c.realign = "ridge"                      # ridge | norm | none
    c.realign_lambda = 1e-5
    c.communication = "concat"               # concat | overwrite
    c.visibility = "full"                    # full | latent_only
    c.solver_reads_trace = True
    # decoding
    c.max_new_tokens = 256
    c.text_max_new_tokens = 128              # TextMAS: tokens each upstream agent writes
    c.enable_thinking = config_dict.placeholder(bool)  # None: the chat template's default
    c.temperature = 0.0                      # 0 = greedy
    c.top_p = 1.0
    c.top_k = 0
    c.num_samples = 1                        # > 1: self-consistency (needs temperature > 0)
    # data
    c.task = "gsm8k"
    c.task_options = ml_collections.ConfigDict({
        "path": config_dict.placeholder(str),       # jsonl: the file
        "kind": config_dict.placeholder(str),       # jsonl: 'text' | 'math' for free-form answers
        "timeout_s": config_dict.placeholder(float),  # code tasks: sandbox limits
        "memory_mb": config_dict.placeholder(int),
        "limit_factor": config_dict.placeholder(float),     # code: a timed-out answer reruns under this x the reference's time
        "reference_cap_s": config_dict.placeholder(float),  # code: the cap on timing the reference
    })
    c.split = "test"
    c.data_dir = config_dict.placeholder(str)  # None: the Hugging Face Hub
    c.limit = config_dict.placeholder(int)     # None: every item
    # run
    c.batch_size = 4
    c.seed = 0
    c.prompt_bucket = 32
    c.bootstrap_resamples = 2000
    # hardware (diffmas_jax.mesh_presets, diffmas_jax.memory)
    c.mesh_preset = config_dict.placeholder(str)          # v4-8 | v5e-8 | v5e-16 | v5p-8 | gpu-8 | gpu-1
    c.mesh = config_dict.placeholder(str)                 # "data,fsdp,tensor" (one may be -1); wins over the preset
    c.device_memory_gib = config_dict.placeholder(float)  # per-device memory for the estimate if the device hides it
    for key, value in overrides.items():
        if key not in c:
            raise KeyError(f"eval_config has no field {key!r}")
        if key == "latent_steps":
            value = str(value) if not isinstance(value, (list, tuple)) else ",".join(map(str, value))
        if key == "task_options":
            c.task_options.update(value)
        elif value is None:
            continue  # the placeholders already default to None
        else:
            setattr(c, key, value)
    return c


DEFAULTS = eval_config().to_dict()


# ----------------------------------------------------------------------- resolving
def is_finite_number(value) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_list(name: str, value) -> Any:
    """'10' -> 10; '4,8,16' -> [4, 8, 16]; ints and lists pass through."""
    if isinstance(value, bool):
        raise UserError(f"{name} must be an integer or a comma list of integers, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
    try:
        ints = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise UserError(f"{name} must be an integer or a comma list of integers, got {value!r}") from None
    if not ints:
        raise UserError(f"{name} is empty")
    return ints[0] if len(ints) == 1 and not isinstance(value, (list, tuple)) else ints


def _abs_if_local(value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def resolve_model(model) -> str:
    """'embedded' for the default; local paths made absolute; Hub ids unchanged."""
    if model in (None, "", "embedded"):
        return "embedded"
    return _abs_if_local(str(model))


def resolve(config) -> dict:
    """Check a config and return plain JSON-able values (paths made absolute).

    Raises UserError with one line for anything wrong with the values themselves;
    whether the task, data and model exist is checked where they are loaded.
    """
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown config field(s) {unknown}; known: {', '.join(sorted(DEFAULTS))}")
    cfg = {**DEFAULTS, **raw}
    opts = dict(cfg.get("task_options") or {})
    cfg["task_options"] = {k: v for k, v in sorted(opts.items()) if v is not None}
    if "path" in cfg["task_options"]:
        cfg["task_options"]["path"] = _abs_if_local(str(cfg["task_options"]["path"]))

    def positive(name, allow_none=False):
        v = cfg[name]
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UserError(f"{name} must be a positive integer, got {v!r}")

    positive("limit", allow_none=True)
    positive("batch_size")
    positive("max_new_tokens")
    positive("text_max_new_tokens")
    positive("num_samples")
    positive("prompt_bucket")
    positive("bootstrap_resamples")
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
        raise UserError(f"seed must be an integer, got {cfg['seed']!r}")
    t, p, k = cfg["temperature"], cfg["top_p"], cfg["top_k"]
    if not is_finite_number(t) or t < 0:
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
    if not is_finite_number(p) or not 0 < p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {p!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UserError(f"top_k must be an integer >= 0 (0 disables), got {k!r}")
    cfg["temperature"], cfg["top_p"] = float(t), float(p)
    if not is_finite_number(cfg["lora_scale"]):
        raise UserError(f"lora_scale must be a finite number, got {cfg['lora_scale']!r}")
    if not is_finite_number(cfg["realign_lambda"]) or cfg["realign_lambda"] < 0:
        raise UserError(f"realign_lambda must be a finite number >= 0, got {cfg['realign_lambda']!r}")
    cfg["lora_scale"], cfg["realign_lambda"] = float(cfg["lora_scale"]), float(cfg["realign_lambda"])
    gib = cfg["device_memory_gib"]
    if gib is not None and (not is_finite_number(gib) or gib <= 0):
        raise UserError(f"device_memory_gib must be a finite positive number of GiB, got {gib!r}")
    if cfg["temperature"] > 0:
        cfg["sample_keys"] = SAMPLE_KEYS
    if cfg["num_samples"] > 1 and cfg["temperature"] <= 0:
        raise UserError(f"num_samples={cfg['num_samples']} needs temperature > 0: "
                        "greedy samples are all the same")
    if cfg["realign"] not in REALIGNS:
        raise UserError(f"unknown realign {cfg['realign']!r}; known: {', '.join(REALIGNS)}")
    cfg["latent_steps"] = _int_list("latent_steps", cfg["latent_steps"])
    if cfg["roles"] is not None:
        roles = [r.strip() for r in str(cfg["roles"]).split(",") if r.strip()] \
            if not isinstance(cfg["roles"], (list, tuple)) else list(cfg["roles"])
        if not roles:
            raise UserError("roles is empty; leave it unset to use the layout's roles")
        cfg["roles"] = roles
    if cfg["method"] == "diffmas" and not cfg["lora"]:
        raise UserError("method 'diffmas' needs a trained adapter: set --config.lora=DIR")
    if cfg["lora"] and cfg["method"] == "latent_mas":
        # latent_mas + adapter is what 'diffmas' names; other methods take an adapter for
        # the SFT baselines (single + Single+SFT adapter, text_mas + TextMAS+SFT adapter).
        raise UserError("lora is set with method 'latent_mas'; use method 'diffmas' for the trained trace")
    if cfg["lora"]:
        if not Path(cfg["lora"]).expanduser().exists():
            raise UserError(f"lora adapter {cfg['lora']} not found")
        cfg["lora"] = _abs_if_local(cfg["lora"])
    from diffmas_jax.tasks import is_generated
    if isinstance(cfg["data_dir"], str) and cfg["data_dir"].strip().lower() in ("", "none"):
        cfg["data_dir"] = None  # --config.data_dir=None: a config's local copies off, the Hub instead
    # A generated task (arith, comm) reads no files: a config's default data_dir need not exist.
    if cfg["data_dir"] is not None and not is_generated(cfg["task"]):
        d = Path(cfg["data_dir"]).expanduser()
        if not d.is_dir():
            raise UserError(f"data_dir {cfg['data_dir']} does not exist or is not a directory")
        cfg["data_dir"] = str(d.resolve())
    from diffmas_jax.c2c import resolve_config as resolve_c2c
    resolve_c2c(cfg)  # fuser, receiver and sharer (method c2c)
    cfg["model"] = resolve_model(cfg["model"])
    return json.loads(json.dumps(cfg))  # plain JSON types: what config.json will hold


def behaviour_differences(old: dict, new: dict) -> list[str]:
    """Fields whose change would mix results of different runs in one workdir."""
    sampling = (new.get("temperature") or 0) > 0 or (old.get("temperature") or 0) > 0
    skip = set(RESUMABLE_FIELDS) - (set(SAMPLING_FIELDS) if sampling else set())
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in skip:
            continue
        a, b = old.get(key, DEFAULTS.get(key)), new.get(key, DEFAULTS.get(key))
        if a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def qwen3_config(model_id: str, batch_size: int = 4) -> ml_collections.ConfigDict:
    """The paper's Qwen3 rows: temperature 0.6, top-p 0.95, thinking on, long answers.

    Task defaults to AIME24 from the Hugging Face Hub (data_dir None); the paper also
    reports aime25, gpqa_diamond, humanevalplus and mbppplus (--config.task=...).
    Memory: the KV trace keeps batch x (prompts + latent steps + max_new_tokens) slots
    per layer, about 4.5 GiB per row at 32k tokens for Qwen3-8B in bfloat16.
    """
    return eval_config(
        model=model_id, dtype="bfloat16",
        method="latent_mas", task="aime24", split="test", data_dir=None,
        batch_size=batch_size, max_new_tokens=32768, text_max_new_tokens=4096,
        latent_steps=10, realign="ridge", enable_thinking=True,
        temperature=0.6, top_p=0.95, top_k=0)


def sibling_config(config_file: str, name: str):
    """``get_config()`` of another config file in the same folder (configs that extend one)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    spec = importlib.util.spec_from_file_location(os.path.splitext(name)[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()

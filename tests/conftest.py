"""Shared fixtures: tiny random HF models saved in the test, and the embedded model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tests check results, not speed, and most of their time is XLA compiling programs: with
# LLVM at optimisation level 0 the whole suite ran in 22.0 and 26.3 min against 29.8 min at XLA's
# default (cold compilation caches, 2026-12-07; the 8-device sharding check alone 116 -> 80 s). GEMMs
# are library calls either way; only the elementwise fusions run unoptimised, which costs the few
# tests that run many steps (overfitting one batch: 23 -> 33 s). Child processes inherit it.
# DIFFMAS_TEST_FULL_OPT=1 runs the suite at XLA's default level, as users run.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if os.environ.get("DIFFMAS_TEST_FULL_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_hf_config(family: str, **overrides):
    import transformers
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[family]
    kw = dict(TINY)
    if family == "qwen3":
        kw["head_dim"] = 32
    kw.update(overrides)
    return cls(**kw)


def save_tiny_model(path: Path, family: str, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = make_hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Random norms and biases too, so parity covers them (HF initialises norms to 1, biases to 0).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def xla_env(*flags: str, **env) -> dict:
    """os.environ for a child process with ``flags`` added to the suite's XLA_FLAGS (XLA reads
    them once per process, so simulated devices need a fresh one)."""
    return dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip(), **env)


def tensorboard_scalars(logdir: Path) -> dict:
    """{tag: [(step, value), ...]} from the TensorBoard event files under ``logdir`` (records are
    length, length CRC, an ``Event`` proto, data CRC)."""
    import struct
    from tensorboardX.proto import event_pb2
    scalars: dict = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


@pytest.fixture
def tiny_model_dir(tmp_path):
    def make(family="llama", seed=0, **overrides):
        return save_tiny_model(tmp_path / f"{family}-{seed}", family, seed, **overrides)
    return make


@pytest.fixture(scope="session")
def embedded():
    from diffmas_jax.model.loading import load_model
    return load_model()


@pytest.fixture(scope="session")
def embedded_hf(embedded):
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(embedded.path), dtype=torch.float32, attn_implementation="eager").eval()


def jsonl_eval_config(path: Path, **kw):
    """An evaluation config over a jsonl file, small enough for a faked model."""
    from diffmas_jax import config_utils
    base = dict(task="jsonl", task_options={"path": str(path)}, data_dir=None, limit=5, batch_size=2,
                method="latent_mas", latent_steps=2, max_new_tokens=8)
    base.update(kw)
    return config_utils.eval_config(**base)

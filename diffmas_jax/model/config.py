"""Model configuration read from a Hugging Face ``config.json``.

One frozen (hashable) dataclass covers the four supported families; it is a
static argument of every jitted function. Anything we do not implement is an
error that names the field, never a silently different model.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ModelConfigError(ValueError):
    """A config that this project cannot run faithfully."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Rope scaling as a sorted tuple of (key, value) pairs so the config stays hashable.
    rope_scaling: tuple = ()
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    hidden_act: str = "silu"
    # Runtime choice, not read from HF: "auto"/"xla" (XLA's attention) or "cudnn" (flash
    # attention through cuDNN on NVIDIA GPUs: no [T, S] score buffers, for very long chunks).
    attention: str = "auto"

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + L * per_layer + d + head

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' "swish" is SiLU too
            raise ModelConfigError(f"unsupported hidden_act {act!r} (only 'silu')")
        act = "silu"
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // heads
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelConfigError("unsupported partial_rotary_factor != 1.0")
        if cfg.get("attention_bias") and mt != "qwen2":
            raise ModelConfigError(f"unsupported attention_bias=True for model_type {mt!r}")
        if cfg.get("mlp_bias"):
            raise ModelConfigError("unsupported mlp_bias=True")
        # transformers >= 5 nests rope_theta inside rope_parameters; older configs keep
        # rope_theta / rope_scaling at the top level. transformers reads rope_scaling
        # first when both are there, and then drops rope_parameters' theta: refuse that.
        params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
        if params and scaling and _rope_key(params) != _rope_key(scaling):
            raise ModelConfigError(
                f"config has both rope_parameters {params} and rope_scaling {scaling}, which "
                "differ; keep one")
        rope = dict(scaling or params or {})
        if any(isinstance(v, dict) for v in rope.values()):
            raise ModelConfigError(f"unsupported rope parameters per layer type: {sorted(rope)}")
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope.pop("type", None)
        rope["rope_type"] = rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope.pop("partial_rotary_factor", None) not in (None, 1.0):
            raise ModelConfigError("unsupported partial_rotary_factor != 1.0")
        if rope_type in ("llama3", "yarn"):
            # as transformers: a top-level value wins, else the context length
            top = cfg.get("original_max_position_embeddings")
            if top is not None:
                rope["original_max_position_embeddings"] = top
            elif rope.get("original_max_position_embeddings") is None:
                rope["original_max_position_embeddings"] = cfg.get("max_position_embeddings", 4096)
        rope = {k: v for k, v in rope.items() if v is not None}

        sliding = _sliding_window(mt, cfg)

        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            model_type=mt,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=tuple(sorted((k, _freeze(v)) for k, v in rope.items())),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=(mt == "qwen2") or bool(cfg.get("attention_bias", False)),
            qk_norm=(mt == "qwen3"),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
            hidden_act=act,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))


def _rope_key(rope: dict) -> dict:
    """A rope dict with the legacy "type" key renamed, for comparing two spellings."""
    rope = dict(rope)
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    return rope


def _sliding_window(mt: str, cfg: dict[str, Any]) -> int | None:
    """The attention window every layer uses, or None for full attention.

    Layer types come from `layer_types` (transformers >= 5) or, for qwen2 / qwen3, from
    `use_sliding_window` / `max_window_layers` (layers from that index on slide).
    One window for all layers is supported (Mistral); a mix is refused.
    """
    n = cfg.get("num_hidden_layers", 0)
    kinds = cfg.get("layer_types")
    if not kinds and mt in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        first = cfg.get("max_window_layers", n)
        kinds = ["full_attention" if i < first else "sliding_attention" for i in range(n)]
    if mt == "mistral" and not kinds:
        kinds = ["sliding_attention"] * n  # Mistral's window (None: none) on every layer
    kinds = set(kinds or ["full_attention"])
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown:
        raise ModelConfigError(f"unsupported layer_types {sorted(unknown)}")
    if kinds == {"full_attention"}:
        return None
    if mt != "mistral":
        raise ModelConfigError(f"unsupported sliding-window attention for model_type {mt!r}")
    if len(kinds) > 1:
        raise ModelConfigError(
            "unsupported layer_types mixing full_attention and sliding_attention (one window "
            "for all layers only)")
    return cfg.get("sliding_window")


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies and cos/sin scale for ``cfg``'s rope type (HF semantics)."""
    p = dict(cfg.rope_scaling)
    dim = cfg.head_dim
    base = cfg.rope_theta
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    inv = (1.0 / (base ** exps)).astype(np.float32)
    kind = p.get("rope_type", "default")
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return (inv / p["factor"]).astype(np.float32), 1.0
    if kind == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, smoothed, out).astype(np.float32), 1.0
    if kind == "yarn":
        orig = p["original_max_position_embeddings"]
        factor = p.get("factor") or cfg.max_position_embeddings / orig

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = p.get("attention_factor")
        if attn is None:
            if p.get("mscale") and p.get("mscale_all_dim"):
                attn = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
            else:
                attn = mscale(factor)
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def corr_dim(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extra = 1 - ramp
        pos_freqs = (base ** (np.arange(0, dim, 2).astype(np.float32) / dim)).astype(np.float32)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        return inv.astype(np.float32), float(attn)
    raise ModelConfigError(f"unsupported rope scaling type {kind!r}")

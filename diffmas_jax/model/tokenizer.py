"""Load a model directory's tokenizer as ``AutoTokenizer`` would, without its import cost.

``AutoTokenizer`` picks the class from tokenizer_config.json, config.json and the Hub's
known exceptions, and to do so imports transformers' configuration stack, which imports
torch whenever torch is installed (as in Colab, or beside the parity tests): about 4 s and
200 MB of every CLI process that only needs a tokenizer. The tokenizer classes themselves
import without torch. So the class ``AutoTokenizer`` picked for a directory is remembered in
the cache (``tokenizer_classes.json``), keyed by the directory, the files that decide the
choice (name, size, mtime) and the transformers version; later processes load that class
directly. A change to any of those files or an upgrade of transformers asks ``AutoTokenizer``
again, and so does a remembered class that fails to load (its choice is then replaced).
Remote-code tokenizers are never remembered.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from pathlib import Path

CLASS_CACHE_FILE = "tokenizer_classes.json"
MAX_REMEMBERED = 256  # the oldest choices go first (temporary model dirs would grow it forever)
# The files AutoTokenizer's choice depends on (config.json: model_type and tokenizer_class).
_DECIDING_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "tokenizer.model",
                   "special_tokens_map.json")


def _choice_key(model_dir: Path, transformers_version: str) -> str:
    parts = [transformers_version, str(model_dir.resolve())]
    for name in _DECIDING_FILES:
        p = model_dir / name
        if p.exists():
            st = p.stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_choices(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or torn: ask AutoTokenizer again
        return {}
    return data if isinstance(data, dict) else {}


def _remember(path: Path, key: str, cls: type) -> None:
    """Adds ``key -> cls`` to the cache file atomically; a failure only costs the shortcut."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        choices = _read_choices(path)
        choices.pop(key, None)
        choices[key] = {"module": cls.__module__, "name": cls.__qualname__}
        choices = dict(list(choices.items())[-MAX_REMEMBERED:])
        fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(choices, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def _uses_remote_code(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return "auto_map" in config


def remembered_class(model_dir: Path, cache_dir: Path):
    """The tokenizer class AutoTokenizer picked for ``model_dir`` before, or None."""
    import transformers
    return _class_for(_choice_key(model_dir, transformers.__version__), cache_dir)


def _class_for(key: str, cache_dir: Path):
    entry = _read_choices(cache_dir / CLASS_CACHE_FILE).get(key)
    if not entry or not str(entry.get("module", "")).startswith("transformers."):
        return None
    try:
        return getattr(importlib.import_module(entry["module"]), entry["name"])
    except (ImportError, AttributeError):
        return None


def load_tokenizer(model_dir, cache_dir: Path):
    """``AutoTokenizer.from_pretrained(model_dir)``, through the remembered class when there is one.

    A tokenizer without a pad token pads with its EOS token."""
    import transformers
    model_dir = Path(model_dir)
    key = _choice_key(model_dir, transformers.__version__)
    cls = _class_for(key, cache_dir)
    tok = None
    if cls is not None:
        try:
            tok = cls.from_pretrained(str(model_dir))
        except Exception:  # noqa: BLE001 - e.g. a dependency gone since; AutoTokenizer decides (and raises) again
            tok = None
    if tok is None:
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        if type(tok).__module__.startswith("transformers.") and not _uses_remote_code(model_dir):
            _remember(cache_dir / CLASS_CACHE_FILE, key, type(tok))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok

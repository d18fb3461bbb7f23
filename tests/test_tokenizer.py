"""The tokenizer class AutoTokenizer picks is remembered, and loading it directly gives the same
tokenizer without importing torch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, make_hf_config

TEXTS = ["Hello world", "  two leading spaces, tabs\tand\nnewlines", "ünïcödé → 数学 🙂", "<|im_start|>user x<|im_end|>"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


def tokenizer_dir(path, embedded, family, declared):
    """A model directory with ``family``'s config.json and the embedded model's tokenizer files,
    its tokenizer_config.json declaring ``declared`` (None: as saved)."""
    make_hf_config(family).save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    if declared is not None:
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = declared
        cfg_path.write_text(json.dumps(cfg))
    return path


def behaviour(tok):
    return {"class": type(tok).__name__, "ids": [tok.encode(t) for t in TEXTS],
            "batch": tok(TEXTS, padding=True)["input_ids"],
            "chat": tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
            "special": (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, len(tok)),
            "decoded": [tok.decode(tok.encode(t)) for t in TEXTS]}


@pytest.mark.parametrize("family,declared", [("llama", None), ("qwen2", "PreTrainedTokenizerFast"),
                                             ("qwen3", "Qwen2Tokenizer"), ("mistral", "LlamaTokenizerFast")])
def test_remembered_class_loads_the_tokenizer_autotokenizer_loads(tmp_path, embedded, family, declared):
    import transformers
    from diffmas_jax.model.tokenizer import CLASS_CACHE_FILE, load_tokenizer, remembered_class
    model_dir = tokenizer_dir(tmp_path / "m", embedded, family, declared)
    cache = tmp_path / "cache"
    auto = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert remembered_class(model_dir, cache) is None
    first = load_tokenizer(model_dir, cache)  # asks AutoTokenizer, remembers its class
    assert type(first) is type(auto)
    assert remembered_class(model_dir, cache) is type(auto)
    assert len(json.loads((cache / CLASS_CACHE_FILE).read_text())) == 1
    second = load_tokenizer(model_dir, cache)  # the remembered class, loaded directly
    assert behaviour(second) == behaviour(first) == behaviour(auto)


def test_changed_files_or_a_torn_cache_ask_autotokenizer_again(tmp_path, embedded):
    from diffmas_jax.model.tokenizer import CLASS_CACHE_FILE, load_tokenizer, remembered_class
    model_dir = tokenizer_dir(tmp_path / "m", embedded, "qwen2", "PreTrainedTokenizerFast")
    cache = tmp_path / "cache"
    load_tokenizer(model_dir, cache)
    picked = remembered_class(model_dir, cache)
    assert picked is not None
    # The config decides the class (qwen2's Hub configs name the wrong one): a new one is a new key.
    make_hf_config("llama").save_pretrained(model_dir)
    assert remembered_class(model_dir, cache) is None
    tok = load_tokenizer(model_dir, cache)
    assert len(json.loads((cache / CLASS_CACHE_FILE).read_text())) == 2
    assert remembered_class(model_dir, cache) is type(tok)
    (cache / CLASS_CACHE_FILE).write_text('{"torn": ')  # a write cut off
    assert remembered_class(model_dir, cache) is None
    assert behaviour(load_tokenizer(model_dir, cache)) == behaviour(tok)
    assert remembered_class(model_dir, cache) is type(tok)


def test_a_remembered_class_that_fails_to_load_asks_autotokenizer_and_is_replaced(tmp_path, embedded, monkeypatch):
    """E.g. a dependency of the remembered class removed since: the load still succeeds."""
    import transformers.models.llama as llama_pkg
    from diffmas_jax.model.tokenizer import CLASS_CACHE_FILE, load_tokenizer, remembered_class
    model_dir = tokenizer_dir(tmp_path / "m", embedded, "llama", None)
    cache = tmp_path / "cache"
    good = load_tokenizer(model_dir, cache)

    class BrokenTokenizer:
        @classmethod
        def from_pretrained(cls, path):
            raise ImportError("this tokenizer needs a package that is not installed")
    BrokenTokenizer.__module__ = llama_pkg.__name__
    monkeypatch.setattr(llama_pkg, "BrokenTokenizer", BrokenTokenizer, raising=False)
    choices = json.loads((cache / CLASS_CACHE_FILE).read_text())
    (key,) = choices
    choices[key] = {"module": llama_pkg.__name__, "name": "BrokenTokenizer"}
    (cache / CLASS_CACHE_FILE).write_text(json.dumps(choices))
    assert remembered_class(model_dir, cache) is BrokenTokenizer
    tok = load_tokenizer(model_dir, cache)
    assert behaviour(tok) == behaviour(good)
    assert remembered_class(model_dir, cache) is type(good)


def test_only_the_latest_choices_are_kept(tmp_path, embedded, monkeypatch):
    from diffmas_jax.model import tokenizer
    monkeypatch.setattr(tokenizer, "MAX_REMEMBERED", 2)
    dirs = [tokenizer_dir(tmp_path / f"m{i}", embedded, "llama", None) for i in range(3)]
    cache = tmp_path / "cache"
    for d in dirs:
        tokenizer.load_tokenizer(d, cache)
    assert [tokenizer.remembered_class(d, cache) is not None for d in dirs] == [False, True, True]


def test_a_later_process_loads_the_tokenizer_without_importing_torch(tmp_path, embedded):
    pytest.importorskip("torch")  # without torch installed there is nothing to avoid
    model_dir = tokenizer_dir(tmp_path / "m", embedded, "llama", None)
    code = ("import sys, json; from pathlib import Path; from diffmas_jax.model.tokenizer import load_tokenizer;"
            f"tok = load_tokenizer(Path({str(model_dir)!r}), Path({str(tmp_path / 'cache')!r}));"
            "print(json.dumps([type(tok).__name__, tok.encode('Hello world'), 'torch' in sys.modules]))")

    def run():
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first[2] is True  # AutoTokenizer's import of transformers' config stack brings torch
    assert second[:2] == first[:2] and second[2] is False

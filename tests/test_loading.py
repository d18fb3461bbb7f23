"""Model loading: sources, sharded checkpoints, and clear errors for bad inputs."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax.model.config import ModelConfig, ModelConfigError
from diffmas_jax.model.loading import ModelNotFoundError, load_model, resolve_model_dir
from diffmas_jax.model.transformer import jit_forward, resolve_dtype
from diffmas_jax.model.weights import WeightLoadError, iter_safetensors, load_params, safetensors_files
from diffmas_jax.trace import KVTrace


def test_sharded_checkpoint_with_index(tmp_path):
    import torch
    import transformers
    from conftest import make_hf_config
    model = transformers.AutoModelForCausalLM.from_config(make_hf_config("llama"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    m = load_model(str(tmp_path / "sharded"), with_tokenizer=False)
    ids = np.arange(3, 19)[None]
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    out = jit_forward(m.params, m.cfg, KVTrace.create(m.cfg, 1, 16), tokens=jnp.asarray(ids))
    np.testing.assert_allclose(out.logits, ref, atol=1e-4)


@pytest.mark.parametrize("load_dtype", ["float32", "bfloat16"])
def test_bfloat16_checkpoint_loads_exactly(tmp_path, load_dtype):
    """Most Hub checkpoints store bfloat16, which numpy has no type for: those tensors are read
    through JAX, the others straight into numpy; every value arrives exact, in either dtype."""
    import torch
    import transformers
    from conftest import make_hf_config
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_hf_config("qwen2", tie_word_embeddings=False))
    model = model.to(torch.bfloat16)
    model.model.norm.weight.data = model.model.norm.weight.data.float()  # a float32 tensor beside them
    model.save_pretrained(tmp_path / "bf16")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="numpy") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored == {"BF16", "F32"}
    m = load_model(str(tmp_path / "bf16"), dtype=load_dtype, with_tokenizer=False)
    want = jnp.dtype(load_dtype)
    assert {a.dtype for a in jax.tree.leaves(m.params)} == {want}
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(m.params["layers"]["q"]["kernel"][1], np.float32),
                                  sd["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(m.params["layers"]["q"]["bias"][0], np.float32),
                                  sd["model.layers.0.self_attn.q_proj.bias"])
    np.testing.assert_array_equal(np.asarray(m.params["embed"], np.float32), sd["model.embed_tokens.weight"])
    if load_dtype == "float32":
        np.testing.assert_array_equal(np.asarray(m.params["final_norm"]), sd["model.norm.weight"])
        ids = np.arange(3, 19)[None]
        with torch.no_grad():
            ref = model.float()(torch.tensor(ids)).logits.numpy()
        out = jit_forward(m.params, m.cfg, KVTrace.create(m.cfg, 1, 16), tokens=jnp.asarray(ids))
        np.testing.assert_allclose(out.logits, ref, atol=1e-4)


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="model path not found: ./no/such/model"):
        resolve_model_dir("./no/such/model")


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="is not a model directory"):
        resolve_model_dir(str(tmp_path))


def test_unsupported_model_type():
    with pytest.raises(ModelConfigError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"})


def test_unsupported_rope_type_named():
    from conftest import make_hf_config
    cfg = make_hf_config("llama").to_dict()
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(ModelConfigError, match="unsupported rope scaling type 'dynamic'"):
        ModelConfig.from_hf_dict(cfg)


@pytest.mark.parametrize("family,edits,message", [
    # transformers reads "mistral" with layer_types as Ministral: a window on some layers only
    ("mistral", {"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]},
     "mixing full_attention and sliding_attention"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1, "layer_types": None},
     "sliding-window attention for model_type 'qwen2'"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]},
     "sliding-window attention for model_type 'qwen3'"),
    ("llama", {"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
    # transformers takes rope_scaling over rope_parameters (and drops the latter's theta)
    ("qwen3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
               "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
     "both rope_parameters .* and rope_scaling"),
    ("llama", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     "rope parameters per layer type"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("llama", {"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
])
def test_configs_computed_differently_are_refused(family, edits, message):
    from conftest import make_hf_config
    cfg = make_hf_config(family).to_dict()
    cfg.update(edits)
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_hf_dict(cfg)


def test_both_rope_spellings_agreeing_are_accepted():
    from conftest import make_hf_config
    cfg = make_hf_config("llama").to_dict()
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0, "rope_theta": 1e4}
    assert ModelConfig.from_hf_dict(cfg).rope_type == "linear"


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_missing_and_extra_tensors_are_named(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    cfg = ModelConfig.from_json(path / "config.json")
    tensors = dict(iter_safetensors(safetensors_files(path)))
    partial = {k: v for k, v in tensors.items() if "layers.1.self_attn.k_norm" not in k}
    with pytest.raises(WeightLoadError, match="missing from the checkpoint: layers.k_norm"):
        load_params(cfg, partial.items())
    extra = dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)})
    with pytest.raises(WeightLoadError, match="not used by a qwen3 model: model.layers.0.self_attn.rotary_emb"):
        load_params(cfg, extra.items())


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="could not get 'nobody/no-such-model' from the Hugging Face Hub"):
        resolve_model_dir("nobody/no-such-model")


def test_generate_cli_prints_completion_and_rejects_bad_input():
    ok = subprocess.run([sys.executable, "-m", "diffmas_jax.generate", "--prompt", "What is 2+2?",
                         "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "tokens in" in ok.stdout and len(ok.stdout.splitlines()[0].strip()) > 0
    bad = subprocess.run([sys.executable, "-m", "diffmas_jax.generate", "--model", "./missing-dir",
                          "--prompt", "x"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: model path not found: ./missing-dir"]
    bad = subprocess.run([sys.executable, "-m", "diffmas_jax.generate", "--dtype", "float8",
                          "--prompt", "x"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown dtype 'float8'" in bad.stderr


def test_gguf_conversions_are_keyed_on_the_file_not_its_name(tmp_path, monkeypatch):
    """Two GGUF files of one name and size (another folder, or one replaced in place) get
    conversions of their own: the second used to load the first one's weights."""
    import os
    import shutil
    import gguf
    from diffmas_jax.model.loading import embedded_gguf_path
    monkeypatch.setenv("DIFFMAS_CACHE", str(tmp_path / "cache"))
    src = embedded_gguf_path()
    copies = []
    for sub, value in (("a", 3.0), ("b", 7.0)):
        (tmp_path / sub).mkdir()
        dst = tmp_path / sub / src.name
        shutil.copy(src, dst)
        reader = gguf.GGUFReader(str(dst), "r+")
        next(t for t in reader.tensors if t.name == "output_norm.weight").data[:] = value
        reader.data.flush()
        del reader
        copies.append(dst)
    assert os.path.getsize(copies[0]) == os.path.getsize(copies[1])
    a, b = (load_model(str(c), with_tokenizer=False) for c in copies)
    assert a.path != b.path
    np.testing.assert_array_equal(np.asarray(a.params["final_norm"]), 3.0)
    np.testing.assert_array_equal(np.asarray(b.params["final_norm"]), 7.0)
    # the same file again: the cached conversion; the file rewritten: a new one
    assert load_model(str(copies[0]), with_tokenizer=False).path == a.path
    reader = gguf.GGUFReader(str(copies[0]), "r+")
    next(t for t in reader.tensors if t.name == "output_norm.weight").data[:] = 5.0
    reader.data.flush()
    del reader
    os.utime(copies[0], ns=(os.stat(copies[0]).st_atime_ns, os.stat(copies[0]).st_mtime_ns + 10**9))
    np.testing.assert_array_equal(np.asarray(load_model(str(copies[0]), with_tokenizer=False).params["final_norm"]), 5.0)


def test_gguf_without_torch_is_one_clear_error(tmp_path, monkeypatch):
    import transformers
    from diffmas_jax.model.loading import convert_gguf, embedded_gguf_path

    def no_torch(*a, **k):
        raise ModuleNotFoundError("Could not import module 'read_gguf_metadata'")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_torch)
    with pytest.raises(ModelNotFoundError, match=r"needs torch .*pip install torch"):
        convert_gguf(embedded_gguf_path(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_hub_download_skips_mistral_consolidated_weights(monkeypatch, tmp_path):
    from huggingface_hub.utils import filter_repo_objects
    from diffmas_jax.model import loading
    seen = {}
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo, **kw: seen.update(kw) or str(tmp_path))
    loading.download_from_hub("mistralai/Ministral-8B-Instruct-2410")
    files = ["config.json", "consolidated.safetensors", "model-00001-of-00004.safetensors", "params.json",
             "model.safetensors.index.json", "tekken.json", "tokenizer.json", "original/consolidated.00.pth",
             "original/params.json", "README.md"]
    kept = list(filter_repo_objects(files, allow_patterns=seen["allow_patterns"],
                                    ignore_patterns=seen["ignore_patterns"]))
    assert kept == ["config.json", "model-00001-of-00004.safetensors", "params.json",
                    "model.safetensors.index.json", "tekken.json", "tokenizer.json"]


def test_hub_errors_keep_the_line_that_explains(monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import _http, hf_raise_for_status
    httpx = _http.httpx2  # the HTTP client huggingface_hub itself ships with
    from diffmas_jax.model import loading

    def refuse(code, error_code, message):
        def fake(repo_id, **kw):
            req = httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}/revision/main")
            hf_raise_for_status(httpx.Response(code, headers={"X-Error-Code": error_code, "X-Request-Id": "r1"},
                                               request=req, json={"error": message}))
        return fake
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        refuse(401, "GatedRepo", "Access to model org/gated is restricted."))
    with pytest.raises(ModelNotFoundError) as e:
        loading.download_from_hub("org/gated")
    line = str(e.value)
    assert "\n" not in line and "GatedRepoError (a gated model: accept its terms on the Hub and set HF_TOKEN)" in line
    assert "Request ID" not in line
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse(401, "RepoNotFound", "Repository not found"))
    with pytest.raises(ModelNotFoundError, match="RepositoryNotFoundError \\(no such model, or a private one"):
        loading.download_from_hub("org/typo")


def test_a_missing_gguf_path_is_not_a_hub_id():
    with pytest.raises(ModelNotFoundError, match="model path not found: models/typo.gguf"):
        resolve_model_dir("models/typo.gguf")


def test_damaged_weights_of_a_hub_model_are_one_error_line(tmp_path, monkeypatch, tiny_model_dir):
    import shutil
    from diffmas_jax import cli
    from diffmas_jax.model import loading
    snap = tmp_path / "snapshot"
    shutil.copytree(tiny_model_dir("qwen3"), snap)
    weights = snap / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    monkeypatch.setattr(loading, "download_from_hub", lambda repo: snap)
    with pytest.raises(cli.UserError, match=r"cannot read the weights in .*model.safetensors: damaged or truncated"):
        cli.load_model_checked("fakeorg/tiny", with_tokenizer=False)


def test_each_tensor_is_placed_as_soon_as_it_is_complete(tiny_model_dir):
    """Not after the whole checkpoint is on the host: an unstacked tensor right after it is
    read, a layer-stacked one right after its last layer."""
    d = tiny_model_dir("qwen3", num_hidden_layers=3)
    m = load_model(str(d), with_tokenizer=False)
    events = []

    def reading():
        for name, arr in iter_safetensors(safetensors_files(d)):
            events.append(("read", name))
            yield name, arr

    def place(path, arr):
        events.append(("place", path))
        return jnp.asarray(arr)
    params = load_params(m.cfg, reading(), place=place)
    jax.tree.map(np.testing.assert_array_equal, params, m.params)
    reads = [n for kind, n in events if kind == "read"]
    for i, (kind, what) in enumerate(events):
        if kind != "place":
            continue
        before = events[i - 1][1]
        if what == "embed":
            assert before == "model.embed_tokens.weight"
        elif what == "layers.q.kernel":
            assert before == "model.layers.2.self_attn.q_proj.weight"
    first_place = next(i for i, (kind, _) in enumerate(events) if kind == "place")
    assert first_place < max(i for i, (kind, _) in enumerate(events) if kind == "read")
    assert len(reads) == len(set(reads)) == sum(kind == "read" for kind, _ in events)
    twice = list(iter_safetensors(safetensors_files(d)))
    layer1 = [x for x in twice if x[0] == "model.layers.1.self_attn.q_proj.weight"]
    for order in (twice + layer1, layer1 + twice):  # after its tensor is complete, and before
        with pytest.raises(WeightLoadError, match="layer 1 of layers.q.kernel appears twice"):
            load_params(m.cfg, order)

"""Logits parity with transformers' PyTorch models, float32, tiny random models per family."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from diffmas_jax.model.loading import load_model
from diffmas_jax.model.transformer import jit_forward
from diffmas_jax.trace import KVTrace

CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-head-dim": ("llama", {"head_dim": 24}),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "llama-rope-llama3": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0}}),
    "llama-rope-yarn": ("llama", {"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}}),
    "qwen2-bias": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3-qknorm": ("qwen3", {}),
    "qwen3-yarn": ("qwen3", {"rope_parameters": {
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "rope_theta": 1000000.0}}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 8}),
}


def hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def assert_logits_match_transformers(path, seed=0):
    """Our float32 logits of a random [2, 40] batch equal transformers' within 1e-4; returns the model."""
    m = load_model(str(path), with_tokenizer=False)
    ids = np.random.default_rng(seed).integers(3, 256, size=(2, 40))
    ref = hf_logits(path, ids)
    out = jit_forward(m.params, m.cfg, KVTrace.create(m.cfg, 2, 64), tokens=jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-4, rtol=0)
    return m


@pytest.mark.parametrize("case", list(CASES))
def test_logits_parity_float32(case, tiny_model_dir):
    family, overrides = CASES[case]
    m = assert_logits_match_transformers(tiny_model_dir(family, **overrides))
    if "rope" in case or "yarn" in case:
        assert m.cfg.rope_type == overrides["rope_parameters"]["rope_type"]
    if case == "mistral-sliding-window":
        assert m.cfg.sliding_window == 8  # and positions > 8 were exercised above


# config.json spellings that transformers reads its own way: the file is edited after saving,
# and both libraries load the edited file.
EDITED_CONFIGS = {
    # a top-level original_max_position_embeddings wins over the rope dict's (Phi-3 style)
    "yarn-top-level-original-max": ("llama", {"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}},
        {"original_max_position_embeddings": 64}),
    # a v4-style rope_scaling without original_max_position_embeddings: the context length
    "yarn-v4-no-original-max": ("qwen3", {}, {
        "rope_parameters": None, "rope_theta": 1000000.0, "max_position_embeddings": 32,
        "rope_scaling": {"type": "yarn", "factor": 4.0}}),
    "llama3-v4-no-original-max": ("llama", {}, {
        "rope_parameters": None, "rope_theta": 500000.0, "max_position_embeddings": 16,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0}}),
    "swish-is-silu": ("llama", {}, {"hidden_act": "swish"}),
    # qwen2's window only from layer max_window_layers on: none with 2 layers and 2
    "qwen2-window-past-the-last-layer": ("qwen2", {}, {
        "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2, "layer_types": None}),
}


@pytest.mark.parametrize("case", list(EDITED_CONFIGS))
def test_logits_parity_hand_edited_configs(case, tiny_model_dir):
    import json
    family, overrides, edits = EDITED_CONFIGS[case]
    path = tiny_model_dir(family, **overrides)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(edits)
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    assert_logits_match_transformers(path, seed=1)


def test_bfloat16_forward_close_to_float32(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    m32 = load_model(str(path), with_tokenizer=False)
    m16 = load_model(str(path), dtype="bfloat16", with_tokenizer=False)
    assert m16.params["embed"].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 256, size=(1, 24)))
    a = jit_forward(m32.params, m32.cfg, KVTrace.create(m32.cfg, 1, 32), tokens=ids).logits
    b = jit_forward(m16.params, m16.cfg, KVTrace.create(m16.cfg, 1, 32, jnp.bfloat16), tokens=ids,
                    compute_dtype=jnp.bfloat16).logits
    assert b.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a - b))) < 0.1 * float(jnp.max(jnp.abs(a)))


def test_embedded_model_parity_on_chat_prompts(embedded, embedded_hf):
    tok = embedded.tokenizer
    from diffmas_jax.generation import chat_ids
    for text in ["What is 7 times 8?", "Name three colours of the rainbow.", "Summarise: the cat sat."]:
        ids = chat_ids(tok, [{"role": "user", "content": text}])
        with torch.no_grad():
            ref = embedded_hf(torch.tensor([ids])).logits.numpy()
        out = jit_forward(embedded.params, embedded.cfg, KVTrace.create(embedded.cfg, 1, 64),
                          tokens=jnp.asarray([ids]))
        got = np.asarray(out.logits)
        # Real 30-layer model with logits up to ~40: tolerance relative to the logit scale.
        assert np.max(np.abs(got - ref)) < 1e-3 * max(1.0, np.max(np.abs(ref)))
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_gguf_conversion_matches_transformers_gguf_loader(embedded):
    """Our GGUF dequantisation + q/k un-permutation equals transformers' own GGUF loader."""
    from diffmas_jax.model.loading import embedded_gguf_path
    from safetensors.numpy import load_file
    gguf = embedded_gguf_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).state_dict()
    ours = load_file(str(embedded.path / "model.safetensors"))
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]:
        np.testing.assert_allclose(ours[name], ref[name].numpy(), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kv_heads,parts", [(4, 2), (1, 1), (12, 2)])
def test_one_token_attention_equals_grouped_attention(kv_heads, parts):
    """The CPU decode path (block-diagonal GEMMs over the cache's own layout) computes the
    same attention as the grouped einsum, for GQA, MQA and MHA, over cache + chunk parts,
    with masked slots and a row that sees nothing."""
    import types
    import jax
    import jax.numpy as jnp
    from diffmas_jax.model.transformer import _grouped_attention, _one_token_attention
    cfg = types.SimpleNamespace(num_heads=12, num_kv_heads=kv_heads, head_dim=16)
    rng = np.random.default_rng(kv_heads)
    sizes = [37, 1][:parts]
    q = jnp.asarray(rng.standard_normal((3, 1, 12, 16)), jnp.float32)
    keys = tuple(jnp.asarray(rng.standard_normal((3, s, kv_heads, 16)), jnp.float32) for s in sizes)
    vals = tuple(jnp.asarray(rng.standard_normal((3, s, kv_heads, 16)), jnp.float32) for s in sizes)
    mask = rng.random((3, 1, sum(sizes))) > 0.3
    mask[2] = False
    want = _grouped_attention(q, keys, vals, jnp.asarray(mask), cfg)
    got = jax.jit(lambda *a: _one_token_attention(*a, cfg))(q, keys, vals, jnp.asarray(mask))
    assert got.shape == want.shape == (3, 1, 12, 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_fused_attention_equals_grouped_attention():
    """The fused path (jax.nn.dot_product_attention, rows mapped, odd T and S padded to even,
    the mask as a per-row bias) gives the grouped attention's values and gradients. On a GPU
    the same code runs cuDNN's kernel; here its XLA reference checks the wiring."""
    import types
    import jax
    import jax.numpy as jnp
    from diffmas_jax.model.transformer import _grouped_attention, fused_attention
    cfg = types.SimpleNamespace(num_heads=6, num_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(1)
    b, t, sizes = 3, 9, (6, 9)  # T = 9 and S = 15: both padded
    q = jnp.asarray(rng.standard_normal((b, t, 6, 8)), jnp.float32)
    keys = tuple(jnp.asarray(rng.standard_normal((b, s, 2, 8)), jnp.float32) for s in sizes)
    vals = tuple(jnp.asarray(rng.standard_normal((b, s, 2, 8)), jnp.float32) for s in sizes)
    mask = rng.random((b, t, sum(sizes))) > 0.3
    mask[:, :, 0] = True  # every query sees at least one key: a fully masked row is garbage either way
    mask = jnp.asarray(mask)
    fused = lambda q, k, v: fused_attention(q, k, v, mask, "xla")
    grouped = lambda q, k, v: _grouped_attention(q, k, v, mask, cfg)
    np.testing.assert_allclose(np.asarray(jax.jit(fused)(q, keys, vals)), np.asarray(grouped(q, keys, vals)),
                               atol=1e-5)
    weights = jnp.asarray(rng.standard_normal((b, t, 6, 8)), jnp.float32)
    got = jax.grad(lambda *a: (fused(*a) * weights).sum(), argnums=(0, 1, 2))(q, keys, vals)
    want = jax.grad(lambda *a: (grouped(*a) * weights).sum(), argnums=(0, 1, 2))(q, keys, vals)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_grouped_attention_on_gpu():
    """On a GPU, the cuDNN kernel behind the fused path gives the XLA path's values and
    gradients in bfloat16, for a chunk over a cache with holes and odd lengths."""
    import types
    from diffmas_jax.model.transformer import _grouped_attention, fused_attention
    cfg = types.SimpleNamespace(num_heads=16, num_kv_heads=8, head_dim=128)
    rng = np.random.default_rng(2)
    b, t, sizes = 3, 129, (200, 129)
    bf = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    q, keys, vals = bf(b, t, 16, 128), tuple(bf(b, s, 8, 128) for s in sizes), tuple(bf(b, s, 8, 128) for s in sizes)
    old = rng.random((b, sizes[0])) > 0.3
    mask = np.concatenate([np.broadcast_to(old[:, None], (b, t, sizes[0])),
                           np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))], -1)
    mask = jnp.asarray(mask)
    weights = bf(b, t, 16, 128).astype(jnp.float32)
    loss = lambda fn: lambda *a: (fn(*a).astype(jnp.float32) * weights).sum()
    fused = lambda q, k, v: fused_attention(q, k, v, mask, "cudnn")
    grouped = lambda q, k, v: _grouped_attention(q, k, v, mask, cfg)
    got, want = jax.jit(fused)(q, keys, vals), jax.jit(grouped)(q, keys, vals)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)
    g = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, keys, vals)
    w = jax.jit(jax.grad(loss(grouped), argnums=(0, 1, 2)))(q, keys, vals)
    for a, e in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.abs(a - e).max() <= 2e-2 * np.abs(e).max() + 1e-3


def test_attention_impl_choice():
    """"auto" keeps XLA's attention on CPU and for short or float32 chunks; "cudnn" forces the
    fused kernel; an unknown name is an error naming the choices."""
    import dataclasses
    from diffmas_jax.model.config import ModelConfig
    from diffmas_jax.model.transformer import fused_attention_impl
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    assert fused_attention_impl(cfg) is None  # CPU
    assert fused_attention_impl(dataclasses.replace(cfg, attention="cudnn")) == "cudnn"
    assert fused_attention_impl(dataclasses.replace(cfg, attention="xla")) is None
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        fused_attention_impl(dataclasses.replace(cfg, attention="flash"))


def test_blocked_attention_equals_grouped_attention():
    """The CPU path for chunks (a map over rows and query blocks, the last block padded)
    gives the grouped attention's values and gradients, with a query that sees nothing."""
    import types
    import jax
    import jax.numpy as jnp
    from diffmas_jax.model.transformer import _blocked_attention, _grouped_attention
    cfg = types.SimpleNamespace(num_heads=6, num_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(0)
    b, t, sizes = 3, 10, (7, 10)
    q = jnp.asarray(rng.standard_normal((b, t, 6, 8)), jnp.float32)
    keys = tuple(jnp.asarray(rng.standard_normal((b, s, 2, 8)), jnp.float32) for s in sizes)
    vals = tuple(jnp.asarray(rng.standard_normal((b, s, 2, 8)), jnp.float32) for s in sizes)
    mask = rng.random((b, t, sum(sizes))) > 0.3
    mask[1, 4] = False
    mask = jnp.asarray(mask)

    def loss(fn, q, keys, vals):
        return (fn(q, keys, vals, mask, cfg) ** 2).sum()

    blocked = lambda *a: _blocked_attention(*a, block=4)  # 10 queries -> 3 blocks of 4, 2 padded
    np.testing.assert_allclose(np.asarray(jax.jit(lambda *a: blocked(*a, mask, cfg))(q, keys, vals)),
                               np.asarray(_grouped_attention(q, keys, vals, mask, cfg)), atol=1e-6)
    got = jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2))(q, keys, vals)
    want = jax.grad(lambda *a: loss(_grouped_attention, *a), argnums=(0, 1, 2))(q, keys, vals)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_attention_scores_are_recomputed_not_saved_for_backward(capsys):
    """Chunk attention saves no [.., S] score or probability block for the backward pass (both
    the CPU blocked path and the grouped path), where the plain grouped attention does;
    the gradients are unchanged."""
    import types
    import jax
    import jax.numpy as jnp
    from jax.ad_checkpoint import print_saved_residuals
    from diffmas_jax.model.transformer import _grouped_attention, _recomputed, attention
    cfg = types.SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=8, attention="auto")
    rng = np.random.default_rng(1)
    b, t, sizes = 2, 7, (11, 7)   # slot counts 11 and 18 appear in no other shape
    q = jnp.asarray(rng.standard_normal((b, t, 4, 8)), jnp.float32)
    keys = tuple(jnp.asarray(rng.standard_normal((b, s, 2, 8)), jnp.float32) for s in sizes)
    vals = tuple(jnp.asarray(rng.standard_normal((b, s, 2, 8)), jnp.float32) for s in sizes)
    mask = jnp.asarray(rng.random((b, t, sum(sizes))) > 0.3)

    def score_residuals(fn):
        capsys.readouterr()
        print_saved_residuals(lambda q, k, v: (fn(q, k, v, mask) ** 2).sum(), q, keys, vals)
        lines = capsys.readouterr().out.splitlines()
        return [ln for ln in lines if ln.startswith("f32[") and ln.split("]")[0].rsplit(",", 1)[-1] in ("11", "18")]

    plain = lambda q, k, v, m: _grouped_attention(q, k, v, m, cfg)
    assert score_residuals(plain), "the check must see the plain path's saved scores"
    assert score_residuals(lambda q, k, v, m: attention(q, k, v, m, cfg)) == []        # CPU: blocked
    assert score_residuals(_recomputed(_grouped_attention, cfg)) == []                 # GPU / TPU path
    loss = lambda fn: jax.grad(lambda q, k, v: (fn(q, k, v, mask) ** 2).sum(), argnums=(0, 1, 2))(q, keys, vals)
    for g, w in zip(jax.tree.leaves(loss(_recomputed(_grouped_attention, cfg))), jax.tree.leaves(loss(plain))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_lora_gradient_does_not_transpose_the_cotangent():
    """The LoRA branch of a [B, T, D] chunk runs as rank-2 matmuls over the flattened tokens, so
    the compiled gradient of B contracts the [B*T, out] cotangent where it lies: no [out, B*T]
    transpose (on XLA:CPU it cost 0.9 s of a 10 s train step). Values match the einsum form."""
    from diffmas_jax.model.transformer import dense
    rng = np.random.default_rng(2)
    b, t, d, r, out = 2, 37, 24, 4, 53        # B*T = 74 and out = 53 appear in no other shape
    x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((b, t, out)), jnp.float32)
    p = {"kernel": jnp.asarray(rng.standard_normal((d, out)), jnp.float32)}
    lora = {"a": jnp.asarray(rng.standard_normal((d, r)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((r, out)), jnp.float32)}

    def loss(lo, x):
        return (jax.nn.silu(dense(x, p, lo, 2.0)) * ct).sum()

    def reference(lo, x):
        y = x @ p["kernel"] + 2.0 * jnp.einsum("btr,ro->bto", jnp.einsum("btd,dr->btr", x, lo["a"]), lo["b"])
        return (jax.nn.silu(y) * ct).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    hlo = grad.lower(lora, x).compile().as_text()
    transposed = [ln for ln in hlo.splitlines() if "= f32[53,74]" in ln or "= f32[53,2,37]" in ln]
    assert transposed == [], transposed
    for g, w in zip(jax.tree.leaves(grad(lora, x)), jax.tree.leaves(jax.grad(reference, argnums=(0, 1))(lora, x))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-3)


def test_lora_branches_share_one_saved_input(capsys):
    """q/k/v (and gate/up) read the same normed input; the backward saves it once per layer, not
    once per LoRA branch (flattening it per branch had raised the full-mode train step's XLA
    temporaries from 5.09 to 5.59 GB)."""
    from jax.ad_checkpoint import print_saved_residuals
    from diffmas_jax.lora import LoraConfig, init_lora
    from diffmas_jax.model.config import ModelConfig
    from diffmas_jax.model.transformer import forward, init_params
    cfg = ModelConfig("llama", vocab_size=64, hidden_size=40, intermediate_size=48, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=12)  # q_size 48: no other [.., 40] activation
    params = init_params(cfg, jax.random.PRNGKey(0))
    lora = init_lora(cfg, LoraConfig(rank=2, alpha=4.0), jax.random.PRNGKey(1))
    lora = jax.tree.map(lambda a: a + 0.01, lora)  # B != 0
    tokens = jnp.arange(2 * 7).reshape(2, 7) % cfg.vocab_size

    def loss(lo):
        out = forward(params, cfg, KVTrace.create(cfg, 2, 8), tokens=tokens, lora=lo, lora_scale=2.0,
                      return_logits=False)
        return (out.hidden ** 2).sum()

    print_saved_residuals(loss, lora)
    lines = capsys.readouterr().out.splitlines()
    # the scan stacks each layer's saved [B*T, D] inputs: [layers, 14, 40]
    normed = [ln for ln in lines if ln.startswith("f32[3,14,40]")]
    assert len(normed) == 2, lines  # the attention norm's output and the MLP norm's

"""Per-layer arrays (the decode loop's layout on a CPU) give what the stacked layer scan gives,
and XLA updates the loop-carried per-layer K/V in place."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax.generation import decode_steps, start_decode
from diffmas_jax.lora import LoraConfig, init_lora
from diffmas_jax.model.config import ModelConfig
from diffmas_jax.model.transformer import (LoraDropout, forward, init_params, lm_logits, make_visibility, per_layer,
                                           use_per_layer, with_lm_head)
from diffmas_jax.trace import LATENT, PROMPT, TEXT, KVTrace

CFGS = {
    "qwen3": ModelConfig("qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True),
    "mistral_window": ModelConfig("mistral", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                                  num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, sliding_window=6),
}


def _setup(cfg, b=3, prompt=7, seed=0):
    params = init_params(cfg, jax.random.PRNGKey(seed), std=0.2)
    lora = init_lora(cfg, LoraConfig(rank=4), jax.random.PRNGKey(seed + 1))
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(7), a.shape), lora)  # B != 0
    toks = jax.random.randint(jax.random.PRNGKey(seed + 2), (b, prompt), 3, cfg.vocab_size)
    valid = jnp.arange(prompt)[None, :] < jnp.asarray([prompt, 4, 2])[:b, None]   # ragged rows
    trace = KVTrace.create(cfg, b, prompt + 20)
    out = forward(params, cfg, trace, tokens=toks, valid=valid, segment=0, lora=lora, lora_scale=0.5)
    return params, lora, out


def _assert_traces_close(a: KVTrace, b: KVTrace):
    assert not isinstance(a.k, tuple) and not isinstance(b.k, tuple)  # both come back stacked
    assert a.length == b.length
    for name in ("valid", "segment", "kind", "pos", "next_pos"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.k, b.k, atol=2e-5)
    np.testing.assert_allclose(a.v, b.v, atol=2e-5)


@pytest.mark.parametrize("out_in", [False, True])
@pytest.mark.parametrize("name", sorted(CFGS))
def test_decode_per_layer_equals_scan(name, out_in, monkeypatch):
    """Per-layer decode, with kernels laid out [in, out] and [out, in], gives the scan's tokens."""
    import diffmas_jax.generation as generation
    monkeypatch.setattr(generation, "use_out_in_kernels", lambda rows: out_in)
    cfg = CFGS[name]
    params, lora, out = _setup(cfg)
    last = out.logits[:, -1]
    vis = make_visibility(segments=[0], kinds=[PROMPT, TEXT])
    kw = dict(num_steps=9, eos_ids=(5,), segment=1, visible=vis, lora=lora, lora_scale=0.5)
    state = start_decode(out.trace, last, 12, jax.random.PRNGKey(0))
    scan = jax.jit(lambda s: decode_steps(params, cfg, s, per_layer=False, **kw))(state)
    loop_fn = jax.jit(lambda s: decode_steps(params, cfg, s, per_layer=True, **kw))
    # the layout reaches the compiled loop: [out, in] kernels are the left operand of the dots
    gate_up = "%d" % (2 * cfg.intermediate_size)
    dots = re.findall(r"f32\[(\d+),(\d+)\][^ ]* dot\(", loop_fn.lower(state).compile().as_text())
    assert ((gate_up, "3") in dots) == out_in and (("3", gate_up) in dots) == (not out_in)
    loop = loop_fn(state)
    np.testing.assert_array_equal(loop.tokens, scan.tokens)
    np.testing.assert_array_equal(loop.count, scan.count)
    np.testing.assert_allclose(loop.logprobs, scan.logprobs, atol=2e-5)
    np.testing.assert_allclose(loop.logits, scan.logits, atol=2e-4)
    _assert_traces_close(loop.trace, scan.trace)
    assert int(scan.step) == 9 and int(scan.trace.valid.sum()) > int(out.trace.valid.sum())


def test_chunk_forward_per_layer_equals_scan():
    """A multi-token chunk (appended at a static offset) and a one-token write at a traced
    offset into reserved slots, as latent steps and decode do."""
    cfg = CFGS["mistral_window"]
    params, lora, out = _setup(cfg)
    p_layers, lo_layers = per_layer(params, lora, cfg)
    # q/k/v and gate/up are fused kernels (and biases) in the per-layer copy
    fused = p_layers["layers"][0]
    assert {"qkv", "gate_up"} <= set(fused) and not {"q", "k", "v", "gate", "up"} & set(fused)
    assert fused["qkv"]["kernel"].shape == (cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size)
    assert fused["qkv"]["bias"].shape == (cfg.q_size + 2 * cfg.kv_size,)
    embeds = jax.random.normal(jax.random.PRNGKey(3), (3, 4, cfg.hidden_size))
    kw = dict(embeds=embeds, valid=jnp.asarray([[1, 1, 1, 0]] * 3, bool), segment=2, kind=LATENT,
              lora_scale=0.5, visible=make_visibility(kinds=[PROMPT]))
    scan = forward(params, cfg, out.trace, lora=lora, **kw)
    loop = forward(p_layers, cfg, out.trace, lora=lo_layers, **kw)
    assert isinstance(loop.trace.k, tuple) and len(loop.trace.k) == cfg.num_layers
    np.testing.assert_allclose(loop.logits, scan.logits, atol=2e-5)
    _assert_traces_close(loop.trace.stacked(), scan.trace)
    mixed = forward(p_layers, cfg, out.trace, lora=lora, **kw)   # a stacked LoRA is split too
    np.testing.assert_allclose(mixed.logits, scan.logits, atol=2e-5)

    reserved = out.trace.reserve(5)
    step = jax.jit(lambda p, lo, tr, off: forward(p, cfg, tr, embeds=embeds[:, :1], offset=off, lora=lo,
                                                  lora_scale=0.5).trace.stacked())
    _assert_traces_close(step(p_layers, lo_layers, reserved, 9), step(params, lora, reserved, 9))


def test_out_in_kernels_change_no_result():
    """``per_layer(out_in=True)`` holds every projection's kernel transposed, [out, in], and the
    forward over it (a chunk, then a one-token step) equals the stacked scan's."""
    cfg = CFGS["mistral_window"]
    params, lora, out = _setup(cfg)
    p_layers, lo_layers = per_layer(params, lora, cfg, out_in=True)
    layer = p_layers["layers"][0]
    d, f, qkv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size
    shapes = {n: layer[n]["kernel_t"].shape for n in ("qkv", "o", "gate_up", "down")}
    assert shapes == {"qkv": (qkv, d), "o": (d, cfg.q_size), "gate_up": (2 * f, d), "down": (d, f)}
    assert not any("kernel" in v for v in layer.values() if isinstance(v, dict))
    assert layer["qkv"]["bias"].shape == (qkv,)
    np.testing.assert_array_equal(layer["down"]["kernel_t"], params["layers"]["down"]["kernel"][0].T)
    embeds = jax.random.normal(jax.random.PRNGKey(3), (3, 4, cfg.hidden_size))
    kw = dict(valid=jnp.asarray([[1, 1, 1, 0]] * 3, bool), segment=2, kind=LATENT, lora_scale=0.5)
    scan = forward(params, cfg, out.trace, embeds=embeds, lora=lora, **kw)
    loop = forward(p_layers, cfg, out.trace, embeds=embeds, lora=lo_layers, **kw)
    np.testing.assert_allclose(loop.logits, scan.logits, atol=2e-5)
    _assert_traces_close(loop.trace.stacked(), scan.trace)
    step = forward(p_layers, cfg, loop.trace, embeds=embeds[:, :1], lora=lo_layers, lora_scale=0.5)
    want = forward(params, cfg, scan.trace, embeds=embeds[:, :1], lora=lora, lora_scale=0.5)
    np.testing.assert_allclose(step.logits, want.logits, atol=2e-5)


def test_matmul_out_in_keeps_the_kernel_as_left_operand():
    """XLA folds ``dot(kernel_t, x).T`` back into ``dot(x, kernel_t)``, the slow form; the
    barrier in ``matmul_out_in`` keeps the [out, rows] product."""
    from diffmas_jax.model.transformer import matmul_out_in
    x, w = jax.random.normal(jax.random.PRNGKey(0), (8, 64)), jax.random.normal(jax.random.PRNGKey(1), (96, 64))
    np.testing.assert_allclose(matmul_out_in(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    x3 = x.reshape(2, 4, 64)  # leading axes of any rank
    np.testing.assert_allclose(matmul_out_in(x3, w), x3 @ w.T, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(matmul_out_in).lower(x, w).compile().as_text()
    assert re.findall(r"f32\[(\d+),(\d+)\][^ ]* dot\(", hlo) == [("96", "8")]


def test_out_in_kernels_only_where_decode_dots_go_to_ynnpack():
    from diffmas_jax.xla_cpu import use_out_in_kernels, ynn_dot_options
    assert not use_out_in_kernels(1)
    assert use_out_in_kernels(8) == bool(ynn_dot_options(8))


def test_per_layer_forward_is_differentiable_like_the_scan():
    """The per-layer path is chosen only for inference, but its gradients are still right."""
    cfg = CFGS["mistral_window"]
    params, lora, out = _setup(cfg)
    toks = jnp.asarray([[5, 6], [7, 8], [9, 10]])

    def loss(lo, layered):
        p, lo2 = per_layer(params, lo, cfg) if layered else (params, lo)
        return jnp.sum(forward(p, cfg, out.trace, tokens=toks, lora=lo2, lora_scale=0.5).logits ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # compiled: op by op it takes several times longer
    g_scan, g_loop = grad(lora, False), grad(lora, True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_loop, g_scan)


def test_use_per_layer_only_for_single_device_inference():
    cfg = CFGS["qwen3"]
    params = init_params(cfg, jax.random.PRNGKey(0))
    assert use_per_layer(params) == (jax.default_backend() == "cpu")
    assert not use_per_layer(params, remat=True)
    assert not use_per_layer(params, remat="dots")
    assert not use_per_layer(params, dropout=LoraDropout(0.1, jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="remat needs stacked layers"):
        p, _ = per_layer(params, None, cfg)
        forward(p, cfg, KVTrace.create(cfg, 1, 4), tokens=jnp.ones((1, 1), jnp.int32), remat=True)


def test_decode_loop_updates_per_layer_cache_in_place():
    """Without the write's dependence on attention's read, XLA:CPU copies every layer's K and V
    (twice) on every decode step; the compiled loop must hold no copy of a K/V-shaped buffer."""
    cfg = CFGS["qwen3"]
    params, lora, out = _setup(cfg)
    state = start_decode(out.trace, out.logits[:, -1], 12, jax.random.PRNGKey(0))
    fn = jax.jit(lambda s: decode_steps(params, cfg, s, num_steps=12, eos_ids=(), per_layer=True))
    hlo = fn.lower(state).compile().as_text()
    cap, kvh, hd = state.trace.capacity, cfg.num_kv_heads, cfg.head_dim
    # the head-major per-layer layouts (KVTrace.per_layer): K [B, KVH, hd, S], V [B, KVH, S, hd]
    k_shape, v_shape = "f32[3,%d,%d,%d]" % (kvh, hd, cap), "f32[3,%d,%d,%d]" % (kvh, cap, hd)
    body = _while_body_text(hlo, k_shape)
    assert k_shape in body and v_shape in body
    copies = re.findall(r"(?:%s|%s)\{[^}]*\} copy\(" % (re.escape(k_shape), re.escape(v_shape)), body)
    assert copies == [], f"{len(copies)} copies of per-layer K/V buffers in the decode loop"


def _while_body_text(hlo: str, carried: str) -> str:
    """The HLO text of the body of the while loop whose state holds a ``carried``-shaped buffer,
    with every computation it calls (fusions, nested loops)."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if m:
            cur = m.group(1)
            comps[cur] = []
        elif line.startswith("}"):
            cur = None
        elif cur:
            comps[cur].append(line)
    bodies = {b for lines in comps.values() for line in lines if carried in line
              for b in re.findall(r"body=%([\w.\-]+)", line)}
    assert len(bodies) == 1, f"expected one decode loop carrying {carried}, found {sorted(bodies)}"
    seen, todo = set(), list(bodies)
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            todo += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
    return "\n".join(line for name in seen for line in comps[name])


def test_auto_choice_takes_the_per_layer_loop_for_long_generations(monkeypatch):
    import diffmas_jax.generation as generation
    cfg = CFGS["qwen3"]
    params, _, out = _setup(cfg)
    calls = []
    real = generation.as_per_layer
    monkeypatch.setattr(generation, "as_per_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    for n in (generation.PER_LAYER_MIN_TOKENS - 1, generation.PER_LAYER_MIN_TOKENS):
        big = KVTrace.create(cfg, 3, 8 + n)
        state = start_decode(big, out.logits[:, -1], n, jax.random.PRNGKey(0))
        jax.eval_shape(lambda s: decode_steps(params, cfg, s, num_steps=2, eos_ids=()), state)
    assert calls == ([1] if jax.default_backend() == "cpu" else [])


def test_tied_lm_head_layout_changes_no_result(monkeypatch):
    """Decode loops on a CPU read a tied LM head from a [D, V] copy of the embedding; logits,
    tokens and log-probs are those of the [V, D] contraction."""
    import diffmas_jax.generation as generation
    cfg = dataclasses.replace(CFGS["qwen3"], tie_embeddings=True)
    params, lora, out = _setup(cfg)
    assert "lm_head" not in params
    laid = with_lm_head(params, cfg)
    on_cpu = jax.default_backend() == "cpu"
    assert ("lm_head" in laid) == on_cpu
    if on_cpu:
        assert laid["lm_head"].shape == (cfg.hidden_size, cfg.vocab_size)
    hidden = jax.random.normal(jax.random.PRNGKey(4), (3, 2, cfg.hidden_size))
    np.testing.assert_allclose(lm_logits(laid, cfg, hidden), lm_logits(params, cfg, hidden), atol=1e-5)
    untied = init_params(CFGS["qwen3"], jax.random.PRNGKey(0))
    assert with_lm_head(untied, CFGS["qwen3"]) is untied

    state = start_decode(out.trace, out.logits[:, -1], 12, jax.random.PRNGKey(0))
    run = lambda: jax.jit(lambda s: decode_steps(params, cfg, s, num_steps=12, eos_ids=(5,), per_layer=True,
                                                 lora=lora, lora_scale=0.5))(state)
    laid_out = run()
    monkeypatch.setattr(generation, "with_lm_head", lambda p, c: p)
    plain = run()
    np.testing.assert_array_equal(laid_out.tokens, plain.tokens)
    np.testing.assert_allclose(laid_out.logprobs, plain.logprobs, atol=2e-5)
    np.testing.assert_allclose(laid_out.logits, plain.logits, atol=2e-4)


@pytest.mark.parametrize("t", [1, 3])
def test_head_major_attention_matches_attention(t):
    """Attention over the head-major per-layer parts (K [B, KVH, hd, S], V [B, KVH, S, hd]) equals
    the stacked layout's attention over the same slots: one query token runs as GEMVs, a chunk
    through the usual path; several parts (prefix, cache, chunk), GQA groups and padding rows."""
    from diffmas_jax.model.transformer import attention, head_major_attention
    cfg = CFGS["qwen3"]
    kvh, hd, h = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    assert h // kvh > 1  # grouped queries
    ks = jax.random.split(jax.random.PRNGKey(7), 8)
    sizes = (5, 11, t)
    keys = tuple(jax.random.normal(k, (3, s, kvh, hd)) for k, s in zip(ks[:3], sizes))
    vals = tuple(jax.random.normal(k, (3, s, kvh, hd)) for k, s in zip(ks[3:6], sizes))
    q = jax.random.normal(ks[6], (3, t, h, hd))
    mask = jax.random.bernoulli(ks[7], 0.7, (3, t, sum(sizes))).at[:, :, 0].set(True)
    want = attention(q, keys, vals, mask, cfg)
    got = head_major_attention(q, tuple(jnp.transpose(k, (0, 2, 3, 1)) for k in keys),
                               tuple(jnp.transpose(v, (0, 2, 1, 3)) for v in vals), mask, cfg)
    np.testing.assert_allclose(got, want, atol=2e-5)

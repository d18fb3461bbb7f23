"""Latent thinking (``stages.think``): its scan carries only the new slots over a read-only
prefix, and gives what appending one latent step at a time gives, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax.lora import LoraConfig, init_lora
from diffmas_jax.model.config import ModelConfig
from diffmas_jax.model.transformer import forward, init_params, make_visibility
from diffmas_jax.stages import make_realign, think
from diffmas_jax.trace import LATENT, PROMPT, KVTrace

CFGS = {
    "qwen3": ModelConfig("qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True),
    "mistral_window": ModelConfig("mistral", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                                  num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, sliding_window=6),
}
STEPS = 5


def _setup(cfg, b=3, prompt=7, capacity=24):
    params = init_params(cfg, jax.random.PRNGKey(0), std=0.2)
    lora = init_lora(cfg, LoraConfig(rank=4), jax.random.PRNGKey(1))
    lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(7), a.shape), lora)  # B != 0
    toks = jax.random.randint(jax.random.PRNGKey(2), (b, prompt), 3, cfg.vocab_size)
    valid = jnp.arange(prompt)[None, :] < jnp.asarray([prompt, 4, 0])[:b, None]   # ragged; row 2 empty
    out = forward(params, cfg, KVTrace.create(cfg, b, capacity), tokens=toks, valid=valid, segment=0)
    return params, lora, out.trace, out.hidden[:, -1], valid.any(axis=1)


def _one_at_a_time(params, cfg, trace, h, realign, active, **kw):
    """The definition: each latent step appended to the whole trace by its own forward call."""
    for _ in range(STEPS):
        out = forward(params, cfg, trace, embeds=realign(h)[:, None], valid=active[:, None], kind=LATENT,
                      return_logits=False, **kw)
        trace, h = out.trace, out.hidden[:, 0]
    return trace, h


@pytest.mark.parametrize("name", sorted(CFGS))
def test_think_equals_one_step_at_a_time(name):
    cfg = CFGS[name]
    params, lora, trace, h, active = _setup(cfg)
    realign = make_realign(params, cfg, "norm")
    kw = dict(segment=1, visible=make_visibility(segments=[0, 1], kinds=[PROMPT, LATENT]), lora=lora,
              lora_scale=0.5)
    got, got_h = jax.jit(lambda tr, h: think(params, cfg, tr, h, realign, steps=STEPS, active=active, **kw))(
        trace, h)
    ref, ref_h = _one_at_a_time(params, cfg, trace, h, realign, active, **kw)
    assert got.length == ref.length == trace.length + STEPS
    for field in ("valid", "segment", "kind", "pos", "next_pos"):
        np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)
    # invalid slots and the empty row's state are never visible and not compared
    # float32 rounding, not a loose check: with std=0.2 weights each path is about 5e-4 from a
    # float64 run of the same steps (|k| up to 5.4), and the two sum in different orders
    slot = np.asarray(ref.valid)[None, :, :, None, None]
    np.testing.assert_allclose(np.where(slot, got.k, 0), np.where(slot, ref.k, 0), atol=5e-4, rtol=5e-4)
    np.testing.assert_allclose(np.where(slot, got.v, 0), np.where(slot, ref.v, 0), atol=5e-4, rtol=5e-4)
    np.testing.assert_allclose(got_h[:2], ref_h[:2], atol=5e-4, rtol=5e-4)
    assert not np.asarray(got.valid[2]).any()          # the empty row wrote no latent slot
    assert np.asarray(got.kind[0, trace.length:got.length] == LATENT).all()


def test_think_gradients_equal_one_step_at_a_time():
    """Gradients reach the LoRA and the incoming trace (trace_grad="full") as in the unrolled loop."""
    cfg = CFGS["mistral_window"]
    params, lora, trace, h, active = _setup(cfg)
    realign = make_realign(params, cfg, "norm")
    w = jax.random.normal(jax.random.PRNGKey(3), (cfg.num_layers, 3, 24, cfg.num_kv_heads, cfg.head_dim))

    def loss(run):
        def f(lo, k, v):   # on real slots and rows only: the empty row's values are never seen
            tr, hh = run(trace.replace(k=k, v=v), lo)
            ww = jnp.where(tr.valid[None, :, :, None, None], w, 0)
            return jnp.sum(hh[:2] ** 2) + jnp.sum(tr.k * ww) + jnp.sum(jnp.sin(tr.v) * ww)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(lora, trace.k, trace.v)

    got = loss(lambda tr, lo: think(params, cfg, tr, h, realign, steps=STEPS, segment=1, active=active, lora=lo))
    ref = loss(lambda tr, lo: _one_at_a_time(params, cfg, tr, h, realign, active, segment=1, lora=lo))
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, atol=1e-4 * float(jnp.abs(r).max()), rtol=1e-3)  # float32 sums
    assert float(jnp.abs(got[1]).sum()) > 0   # the prefix gets a gradient through attention


def test_think_backward_does_not_save_the_trace_per_step():
    """The backward keeps the trace once, not once per latent step: its temporaries stay
    well under steps x the trace's K/V bytes (they were over it when the scan carried the trace)."""
    cfg = CFGS["qwen3"]
    params, lora, trace, h, active = _setup(cfg, capacity=1024)
    realign = make_realign(params, cfg, "norm")
    steps = 16

    def f(lo, k, v):
        tr, hh = think(params, cfg, trace.replace(k=k, v=v), h, realign, steps=steps, segment=1, active=active,
                       lora=lo)
        return jnp.sum(hh ** 2) + jnp.sum(tr.k[:, :, :40] ** 2)

    compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(lora, trace.k, trace.v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    kv_bytes = trace.k.nbytes + trace.v.nbytes
    assert temp < 4 * kv_bytes, (temp, kv_bytes)

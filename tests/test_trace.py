"""The KV trace: incremental equals whole, ragged rows, invisibility of pads, overflow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax.model.loading import load_model
from diffmas_jax.model.transformer import jit_forward, make_visibility
from diffmas_jax.trace import LATENT, PROMPT, KVTrace, TraceOverflowError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import save_tiny_model
    path = save_tiny_model(tmp_path_factory.mktemp("m") / "qwen2", "qwen2")
    return load_model(str(path), with_tokenizer=False)


def test_incremental_equals_whole(tiny):
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 256, size=(2, 30)))
    whole = jit_forward(tiny.params, tiny.cfg, KVTrace.create(tiny.cfg, 2, 48), tokens=ids).logits
    trace = KVTrace.create(tiny.cfg, 2, 48)
    parts = []
    for lo, hi in [(0, 7), (7, 20)] + [(i, i + 1) for i in range(20, 30)]:
        out = jit_forward(tiny.params, tiny.cfg, trace, tokens=ids[:, lo:hi])
        parts.append(out.logits)
        trace = out.trace
    np.testing.assert_allclose(np.concatenate(parts, 1), whole, atol=1e-5)
    assert trace.length == 30 and np.asarray(trace.valid[:, :30]).all()
    assert np.asarray(trace.next_pos).tolist() == [30, 30]


def test_ragged_rows_and_pads_are_invisible(tiny):
    """A row padded inside a batch, with padding between chunks, equals the row alone."""
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 256, size=12), rng.integers(3, 256, size=6)
    cont = rng.integers(3, 256, size=5)
    alone = KVTrace.create(tiny.cfg, 1, 64)
    alone = jit_forward(tiny.params, tiny.cfg, alone, tokens=jnp.asarray([b])).trace
    ref = jit_forward(tiny.params, tiny.cfg, alone, tokens=jnp.asarray([cont])).logits[0]

    toks = np.zeros((2, 12), np.int32)
    valid = np.zeros((2, 12), bool)
    toks[0], valid[0] = a, True
    toks[1, :6], valid[1, :6] = b, True
    toks[1, 6:] = 77  # garbage in pad slots must not leak
    trace = KVTrace.create(tiny.cfg, 2, 64)
    trace = jit_forward(tiny.params, tiny.cfg, trace, tokens=jnp.asarray(toks), valid=jnp.asarray(valid)).trace
    assert np.asarray(trace.next_pos).tolist() == [12, 6]
    both = jnp.asarray(np.stack([cont, cont]))
    got = jit_forward(tiny.params, tiny.cfg, trace, tokens=both).logits[1]
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_segments_kinds_and_visibility(tiny):
    trace = KVTrace.create(tiny.cfg, 1, 32)
    ids = jnp.asarray([[5, 6, 7, 8]])
    trace = jit_forward(tiny.params, tiny.cfg, trace, tokens=ids, segment=0).trace
    trace = jit_forward(tiny.params, tiny.cfg, trace, tokens=ids, segment=1, kind=LATENT).trace
    seg = np.asarray(trace.segment[0, :10]).tolist()
    assert seg == [0] * 4 + [1] * 4 + [-1, -1]
    assert np.asarray(trace.kind[0, :8]).tolist() == [PROMPT] * 4 + [LATENT] * 4
    # Hidden slots contribute nothing: corrupting their K/V changes nothing when hidden,
    # and changes the output when visible.
    hidden = make_visibility(segments=[1])
    noise = jax.random.normal(jax.random.PRNGKey(0), trace.k.shape)
    in_seg0 = (trace.segment == 0)[None, :, :, None, None]
    corrupt = trace.replace(k=jnp.where(in_seg0, noise, trace.k), v=jnp.where(in_seg0, noise, trace.v))
    q = jnp.asarray([[9]])
    run = lambda tr, vis: np.asarray(jit_forward(tiny.params, tiny.cfg, tr, tokens=q, visible=vis).logits)
    np.testing.assert_allclose(run(trace, hidden), run(corrupt, hidden), atol=1e-6)
    assert np.abs(run(trace, None) - run(corrupt, None)).max() > 1e-3


def test_overflow_is_a_clear_error_before_compute(tiny):
    trace = KVTrace.create(tiny.cfg, 1, 8)
    with pytest.raises(TraceOverflowError, match="needs 10 slots but only 8 of 8 are free"):
        jit_forward(tiny.params, tiny.cfg, trace, tokens=jnp.ones((1, 10), jnp.int32))
    trace = jit_forward(tiny.params, tiny.cfg, trace, tokens=jnp.ones((1, 6), jnp.int32)).trace
    with pytest.raises(TraceOverflowError, match="only 2 of 8"):
        trace.reserve(3)


def test_trace_is_a_pytree_with_static_length(tiny):
    trace = KVTrace.create(tiny.cfg, 2, 16).reserve(5)
    leaves, treedef = jax.tree.flatten(trace)
    assert jax.tree.unflatten(treedef, leaves).length == 5
    assert trace.k.shape == (tiny.cfg.num_layers, 2, 16, tiny.cfg.num_kv_heads, tiny.cfg.head_dim)

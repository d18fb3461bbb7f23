"""Generation: parity with HF greedy generate, batch invariance, sampling controls."""
import jax
import jax.numpy as jnp
import pytest
import torch

from diffmas_jax.generation import (GREEDY, SamplingConfig, chat_ids, cut_at_stop, generate,
                                    sample_tokens)
from diffmas_jax.trace import TraceOverflowError

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers and explain why they are prime."]


def test_greedy_matches_transformers_generate(embedded, embedded_hf):
    # 64 new tokens: on a CPU this runs the per-layer decode loop (PER_LAYER_MIN_TOKENS).
    g = generate(embedded, PROMPTS, max_new_tokens=64)
    for i, p in enumerate(PROMPTS):
        ids = chat_ids(embedded.tokenizer, [{"role": "user", "content": p}])
        with torch.no_grad():
            ref = embedded_hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                       pad_token_id=embedded.tokenizer.pad_token_id)
        assert g.tokens[i] == ref[0, len(ids):].tolist(), p
        assert len(g.logprobs[i]) == len(g.tokens[i]) and all(lp <= 0 for lp in g.logprobs[i])
        # Entropy of the full next-token distribution, checked against HF's logits at step 0.
        with torch.no_grad():
            first = torch.log_softmax(embedded_hf(torch.tensor([ids])).logits[0, -1], -1)
        assert g.entropies[i][0] == pytest.approx(float(-(first.exp() * first).sum()), abs=1e-3)


def test_batch_invariance_ragged(embedded):
    target = "Explain photosynthesis briefly."
    alone = generate(embedded, [target], max_new_tokens=24)
    batch = generate(embedded, ["Hi", target, "Please write a long story about a dragon who "
                                "learns to bake bread in a small mountain village."], max_new_tokens=24)
    assert batch.tokens[1] == alone.tokens[0]


def test_eos_stops_rows_and_stop_strings_cut(embedded):
    g = generate(embedded, ["Say only the word yes."], max_new_tokens=64)
    assert g.tokens[0][-1] in (embedded.tokenizer.eos_token_id,) and len(g.tokens[0]) < 64
    s = generate(embedded, ["Count from 1 to 20, separated by commas."], max_new_tokens=64, stop=["5"])
    assert "5" not in s.texts[0] and len(s.tokens[0]) < 64
    assert cut_at_stop("abc###def", ["###"]) == "abc"
    # tokens and log-probs end with the token that completed the stop string, not the chunk's end
    tok = embedded.tokenizer
    for chunk in (4, 32):
        from diffmas_jax.generation import decode_to_text, jit_prefill
        from diffmas_jax.trace import KVTrace
        ids = chat_ids(tok, [{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
        trace = KVTrace.create(embedded.cfg, 1, len(ids) + 64)
        trace, logits, _ = jit_prefill(embedded.params, embedded.cfg, trace, jnp.asarray([ids]),
                                       jnp.ones((1, len(ids)), bool))
        g = decode_to_text(embedded.params, embedded.cfg, tok, trace, logits, max_new_tokens=64,
                           stop=["5"], chunk=chunk)
        assert "5" in tok.decode(g.tokens[0]) and "5" not in tok.decode(g.tokens[0][:-1]), chunk
        assert len(g.logprobs[0]) == len(g.entropies[0]) == len(g.tokens[0])
        assert g.texts[0] == s.texts[0]


def test_sampling_controls():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    rng = jax.random.PRNGKey(0)
    draws = lambda s: {int(sample_tokens(logits, k, s)[0]) for k in jax.random.split(rng, 200)}
    assert draws(SamplingConfig(temperature=1.0, top_k=1)) == {0}
    assert draws(SamplingConfig(temperature=1.0, top_p=0.7)) == {0, 1}
    assert draws(SamplingConfig(temperature=1.0)) == {0, 1, 2, 3}
    assert int(sample_tokens(logits, rng, GREEDY)[0]) == 0
    # as transformers' warpers: top_k past the vocabulary keeps every token, top_p=0 the best one
    assert draws(SamplingConfig(temperature=1.0, top_k=10)) == {0, 1, 2, 3}
    assert draws(SamplingConfig(temperature=1.0, top_p=0.0)) == {0}


def test_sampled_generation_is_seeded(embedded):
    s = SamplingConfig(temperature=0.8, top_p=0.95)
    a = generate(embedded, ["Tell me a fun fact."], max_new_tokens=12, sampling=s, seed=3)
    b = generate(embedded, ["Tell me a fun fact."], max_new_tokens=12, sampling=s, seed=3)
    assert a.tokens == b.tokens


def test_prompt_longer_than_capacity_is_clear(embedded):
    with pytest.raises(TraceOverflowError, match="overflow"):
        generate(embedded, ["word " * 100], max_new_tokens=8, capacity=64)

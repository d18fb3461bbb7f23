"""Methods end to end on a tiny random model with a real chat tokenizer."""
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax.agents import build_agents
from diffmas_jax.methods import MethodConfig, run_batch, solver_visibility, upstream_visibility
from diffmas_jax.model.loading import load_model
from diffmas_jax.stages import make_realign
from diffmas_jax.trace import LATENT, PROMPT, TEXT

INSTR = "Put the final answer inside \\boxed{}."
QS = ["What is 3 + 4?", "A farmer has 12 cows and sells 5 of them, then buys 9 more. How many cows now?",
      "Is 17 prime?"]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, embedded):
    """A random 2-layer llama with the embedded model's vocabulary and chat template."""
    from conftest import save_tiny_model
    path = save_tiny_model(tmp_path_factory.mktemp("chat") / "m", "llama", vocab_size=49152,
                           bos_token_id=1, eos_token_id=2, pad_token_id=2)
    embedded.tokenizer.save_pretrained(path)
    return load_model(str(path))


def run(model, method, qs=QS, seed=0, **kw):
    mc = MethodConfig(method=method, max_new_tokens=kw.pop("max_new_tokens", 6), text_max_new_tokens=4,
                      latent_steps=kw.pop("latent_steps", 3), **kw)
    return run_batch(model, qs, INSTR, mc, seed=seed)


@pytest.mark.parametrize("method", ["single", "text_mas", "latent_mas", "stitch_mas"])
def test_every_method_end_to_end(tiny_chat, method):
    r = run(tiny_chat, method)
    assert len(r.texts) == len(QS) and len(r.records) == len(QS)
    for rec in r.records:
        assert rec["generated_tokens"] >= 1 and rec["prompt_tokens"] > 10
        assert rec["latent_slots"] == (9 if method in ("latent_mas", "stitch_mas") else 0)


def test_latent_mas_slots_per_agent(tiny_chat):
    from diffmas_jax.agents import agent_messages, render_chat
    steps = (2, 5, 1)
    r = run(tiny_chat, "latent_mas", latent_steps=steps, max_new_tokens=3)
    agents = build_agents("sequential", None, steps)
    for i, q in enumerate(QS):
        per = r.records[i]["trace_per_agent"]
        for j, a in enumerate(agents[:-1]):
            n_prompt = len(render_chat(tiny_chat.tokenizer, agent_messages(a, q)))
            assert per[f"{j}:{a.role}"] == n_prompt + a.latent_steps
        assert r.records[i]["latent_slots"] == sum(steps)


@pytest.mark.parametrize("method", ["latent_mas", "stitch_mas"])
def test_padding_never_reaches_the_latent_seed(tiny_chat, method):
    """A latent step starts from the last real prompt token's hidden state, not from the padded
    row's last slot: the same question with no padding (bucket 1) and padded to 32 gives the same
    tokens and log-probabilities. A pad query attends to the real tokens at the last real
    position, so batch-invariance tests that pad alike on both sides cannot see this."""
    kw = dict(qs=QS[:1], max_new_tokens=5, latent_steps=2, roles=("planner", "solver"))
    free, padded = run(tiny_chat, method, prompt_bucket=1, **kw), run(tiny_chat, method, prompt_bucket=32, **kw)
    assert free.records[0]["generated_ids"] == padded.records[0]["generated_ids"]
    np.testing.assert_allclose(free.records[0]["generated_logprobs"], padded.records[0]["generated_logprobs"],
                               atol=2e-5)


def test_realign_identity_for_tied_and_ridge_for_untied(tiny_model_dir):
    m = load_model(str(tiny_model_dir("llama", tie_word_embeddings=True)), with_tokenizer=False)
    tied = make_realign(m.params, m.cfg, "ridge")
    np.testing.assert_allclose(tied.matrix, np.eye(m.cfg.hidden_size), atol=1e-3)
    u = load_model(str(tiny_model_dir("qwen2")), with_tokenizer=False)
    w = make_realign(u.params, u.cfg, "ridge", lam=1e-5)
    w_in = np.asarray(u.params["embed"], np.float64)
    w_out = np.asarray(u.params["lm_head"], np.float64).T
    lhs = (w_out.T @ w_out + 1e-5 * np.eye(u.cfg.hidden_size)) @ np.asarray(w.matrix, np.float64)
    np.testing.assert_allclose(lhs, w_out.T @ w_in, atol=1e-4)
    assert abs(float(w.target_norm) - np.linalg.norm(w_in, axis=1).mean()) < 1e-4
    h = jnp.ones((2, u.cfg.hidden_size))
    assert np.allclose(np.linalg.norm(np.asarray(w(h)), axis=-1), float(w.target_norm), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown realign mode 'rigde'"):
        make_realign(u.params, u.cfg, "rigde")


@pytest.mark.parametrize("method", ["latent_mas", "text_mas"])
def test_batch_invariance_greedy(tiny_chat, method):
    alone = run(tiny_chat, method, qs=[QS[0]], max_new_tokens=8)
    batch = run(tiny_chat, method, qs=[QS[1], QS[0], QS[2] * 3], max_new_tokens=8)
    assert batch.records[1]["generated_ids"] == alone.records[0]["generated_ids"]
    assert batch.texts[1] == alone.texts[0]


@pytest.mark.parametrize("method", ["latent_mas", "text_mas"])
def test_batch_invariance_sampled(tiny_chat, method):
    """With per-row seeds, a sampled row draws the same tokens alone as inside a ragged batch,
    and two copies of one question with different seeds draw differently."""
    from diffmas_jax.generation import SamplingConfig
    hot = dict(max_new_tokens=8, sampling=SamplingConfig(temperature=1.5))
    alone = run(tiny_chat, method, qs=[QS[0]], seed=[7], **hot)
    batch = run(tiny_chat, method, qs=[QS[1], QS[0], QS[2] * 3, QS[0]], seed=[3, 7, 5, 8], **hot)
    assert batch.records[1]["generated_ids"] == alone.records[0]["generated_ids"]
    assert batch.texts[1] == alone.texts[0]
    assert batch.records[3]["generated_ids"] != batch.records[1]["generated_ids"]
    # an int seed s gives row i the seed s + i
    assert run(tiny_chat, method, qs=[QS[1], QS[0]], seed=6, **hot).texts[1] == alone.texts[0]


def test_decoding_takes_typed_and_raw_keys(tiny_chat):
    """jax.random.key (typed) and jax.random.PRNGKey (raw uint32) keys of one seed draw alike."""
    import jax
    from diffmas_jax.generation import SamplingConfig, decode_to_text, jit_prefill, pad_batch
    from diffmas_jax.trace import KVTrace
    tokens, valid = pad_batch([[5, 9, 200, 31], [7, 8]], 0)
    trace = KVTrace.create(tiny_chat.cfg, 2, tokens.shape[1] + 6)
    trace, logits, _ = jit_prefill(tiny_chat.params, tiny_chat.cfg, trace, jnp.asarray(tokens), jnp.asarray(valid))
    draw = lambda key: decode_to_text(tiny_chat.params, tiny_chat.cfg, tiny_chat.tokenizer, trace, logits,
                                      max_new_tokens=6, sampling=SamplingConfig(temperature=1.5), rng=key).tokens
    assert draw(jax.random.key(3)) == draw(jax.random.PRNGKey(3))
    assert draw(jax.random.split(jax.random.key(3), 2)) == draw(jax.random.split(jax.random.PRNGKey(3), 2))


def test_zero_latent_steps_is_explicit(tiny_chat):
    reads = run(tiny_chat, "latent_mas", latent_steps=0, solver_reads_trace=True)
    blind = run(tiny_chat, "latent_mas", latent_steps=0, solver_reads_trace=False)
    blind_other_roles = run(tiny_chat, "latent_mas", latent_steps=0, solver_reads_trace=False,
                            roles=("critic", "critic", "solver"))
    reads_other_roles = run(tiny_chat, "latent_mas", latent_steps=0, solver_reads_trace=True,
                            roles=("critic", "critic", "solver"))
    ids = lambda r: [x["generated_logprobs"] for x in r.records]
    # Blind solver: upstream prompts are invisible, so changing them changes nothing.
    np.testing.assert_allclose(np.concatenate(ids(blind)), np.concatenate(ids(blind_other_roles)), atol=1e-5)
    # Reading solver: with m = 0 it still reads the upstream prompt slots.
    a, b = np.concatenate(ids(reads)), np.concatenate(ids(reads_other_roles))
    assert a.shape != b.shape or np.abs(a - b).max() > 1e-4
    assert all(r["latent_slots"] == 0 for r in reads.records)


def test_visibility_rules():
    mc = MethodConfig(method="latent_mas")
    assert upstream_visibility(mc, 2) is None
    ov = upstream_visibility(MethodConfig(communication="overwrite"), 2).table
    assert ov[1].all() and ov[2].all() and not ov[0].any()
    st = upstream_visibility(MethodConfig(method="stitch_mas"), 1).table
    assert st[1].all() and not st[0].any() and not st[2].any()
    lo = solver_visibility(MethodConfig(visibility="latent_only"), 3, total_latent=30).table
    assert lo[3].all() and lo[0, LATENT] and not lo[0, PROMPT] and not lo[2, TEXT]
    blind = solver_visibility(MethodConfig(solver_reads_trace=False), 3, total_latent=0).table
    assert blind[3].all() and not blind[:3].any()


def test_overwrite_without_upstream_agents(tiny_chat):
    # no upstream agent: the solver sees its own segment, as with concat
    for method, roles in (("single", None), ("latent_mas", ("solver",))):
        kw = {} if roles is None else dict(roles=roles)
        over = run(tiny_chat, method, qs=QS[:1], communication="overwrite", **kw)
        concat = run(tiny_chat, method, qs=QS[:1], **kw)
        assert over.records[0]["generated_ids"] == concat.records[0]["generated_ids"]


def test_text_mas_adapter_reads_base_model_notes(tiny_chat):
    """A TextMAS+SFT adapter is trained on notes the base model wrote (train.upstream_notes), so
    in evaluation only the solver uses it: the upstream notes are the base model's."""
    import jax
    from diffmas_jax.lora import LoraConfig, init_lora
    from diffmas_jax.methods import speak_upstream
    lcfg = LoraConfig(rank=4, alpha=8.0)
    lora = init_lora(tiny_chat.cfg, lcfg, jax.random.PRNGKey(0))
    lora = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), lora)
    mc = MethodConfig(method="text_mas", roles=("planner", "solver"), text_max_new_tokens=6, max_new_tokens=4)
    base_notes, _, _ = speak_upstream(tiny_chat, QS[:1], mc)
    adapted_notes, _, _ = speak_upstream(tiny_chat, QS[:1], mc, lora, lcfg.scale)
    assert base_notes != adapted_notes  # the adapter does change what an agent writes
    with_adapter = run_batch(tiny_chat, QS[:1], INSTR, mc, lora=lora, lora_scale=lcfg.scale)
    without = run_batch(tiny_chat, QS[:1], INSTR, mc)
    assert with_adapter.records[0]["notes"] == [t for _, t in base_notes[0]] == without.records[0]["notes"]
    assert with_adapter.records[0]["generated_ids"] != without.records[0]["generated_ids"]  # the solver uses it


def test_chat_without_template_is_a_plain_transcript(tiny_chat):
    from transformers import AutoTokenizer
    from diffmas_jax.agents import agent_messages, render_chat
    tok = AutoTokenizer.from_pretrained(tiny_chat.tokenizer.name_or_path)
    tok.chat_template = None  # a base model
    msgs = agent_messages(build_agents()[0], "What is 2+2?")
    text = tok.decode(render_chat(tok, msgs))
    assert text.startswith("System: ") and "\n\nUser: " in text and "What is 2+2?" in text
    assert text.endswith("Assistant:")


@pytest.fixture()
def no_system_turn(tiny_chat, monkeypatch):
    """The tiny model with a template that refuses a system turn, as Mistral-7B-Instruct-v0.2's does."""
    tok = tiny_chat.tokenizer
    refusing = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('Conversation roles must alternate "
                "user/assistant/user/assistant/...') }}{% endif %}" + tok.chat_template)
    monkeypatch.setattr(tok, "chat_template", refusing)
    return tiny_chat


@pytest.mark.parametrize("method", ["text_mas", "latent_mas", "single"])
def test_every_method_folds_a_refused_system_turn_into_the_user_turn(no_system_turn, method):
    """TextMAS generates through generation.generate, the latent methods through render_chat: both
    go through chat_ids, so a template that refuses a system turn works for all of them (TextMAS
    raised), and the prompt it counts is the prompt it runs."""
    from diffmas_jax.agents import agent_messages, render_chat
    from diffmas_jax.generation import chat_ids
    tok = no_system_turn.tokenizer
    msgs = agent_messages(build_agents()[0], "What is 2+2?")
    assert msgs[0]["role"] == "system"
    with pytest.raises(Exception, match="roles must alternate"):
        tok.apply_chat_template(msgs, add_generation_prompt=True)
    folded = tok.decode(chat_ids(tok, msgs))
    assert folded.count(msgs[0]["content"][:40]) == 1 and "What is 2+2?" in folded
    assert render_chat(tok, msgs) == chat_ids(tok, msgs)
    res = run(no_system_turn, method, qs=QS[:1], max_new_tokens=2)
    assert res.records[0]["generated_tokens"] > 0


def test_a_template_error_the_fold_does_not_cure_is_the_templates_own(tiny_chat, monkeypatch):
    """The fold is tried only for a system turn then a user turn of text, and when it does not
    help the caller sees the template's first complaint, not one the fold caused."""
    from diffmas_jax.generation import chat_ids
    tok = tiny_chat.tokenizer
    monkeypatch.setattr(tok, "chat_template", "{% if messages[0]['role'] == 'system' %}{{ raise_exception("
                        "'unsupported content') }}{% else %}{{ raise_exception('the fold failed too') }}{% endif %}")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    with pytest.raises(Exception, match="unsupported content"):
        chat_ids(tok, msgs)
    with pytest.raises(Exception, match="unsupported content"):  # not a TypeError of our own
        chat_ids(tok, [{"role": "system", "content": [{"type": "text", "text": "S"}]}, msgs[1]])


def test_bad_method_config():
    with pytest.raises(ValueError, match="unknown method 'latentmas'"):
        MethodConfig(method="latentmas").validate()
    with pytest.raises(ValueError, match="latent_steps lists 2 values for 3 upstream agents"):
        MethodConfig(latent_steps=(1, 2)).validate()
    with pytest.raises(ValueError, match="unknown agent role 'boss'"):
        MethodConfig(roles=("boss", "solver")).validate()
    with pytest.raises(ValueError, match="needs a trained adapter"):
        run_batch(None, ["q"], INSTR, MethodConfig(method="diffmas"))

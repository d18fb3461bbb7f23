"""The communication benchmark: facts reach the upstream agents only.

Under ``visibility = latent_only`` the solver's visible slots (checked on a real trace
built by ``run_batch`` with a tiny random model: the visibility mask, the slots'
segment ids and kinds, and which token each slot holds) contain no token of the
facts; Single's prompt and the SFT baselines' solver prompts contain no fact.
"""
import numpy as np
import pytest

from diffmas_jax import methods
from diffmas_jax.agents import Question, agent_messages, build_agents
from diffmas_jax.methods import MethodConfig, run_batch
from diffmas_jax.tasks import TaskError, get_task
from diffmas_jax.trace import LATENT, PROMPT

ROLES = ("planner", "critic", "solver")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """A random 2-layer llama with the embedded model's tokenizer and chat template."""
    from conftest import save_tiny_model
    from diffmas_jax.model.loading import load_model, load_tokenizer, resolve_model_dir
    path = save_tiny_model(tmp_path_factory.mktemp("comm") / "m", "llama", vocab_size=49152,
                           bos_token_id=1, eos_token_id=2, pad_token_id=2)
    load_tokenizer(resolve_model_dir("embedded")).save_pretrained(path)
    return load_model(str(path))


def fact_token_mask(tokenizer, messages, facts: str, ids: list) -> np.ndarray:
    """True for the tokens of a rendered chat whose characters overlap the facts text."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == list(ids)  # the offsets describe exactly the tokens on the trace
    start = text.find(facts)
    if start < 0:
        return np.zeros(len(ids), bool)
    end = start + len(facts)
    return np.array([s < end and e > start for s, e in enc["offset_mapping"]])


class Captured(Exception):
    """Raised at the start of decoding: the trace and rule the solver decodes with are recorded."""


def capture_trace(monkeypatch):
    """Record, for every chunk written by run_batch, its slot offset and tokens, and the
    trace with the solver's visibility rule as decoding starts (decoding itself is skipped:
    every decoded token follows the same rule)."""
    seen = {"chunks": []}
    stage, prefill = methods.jit_agent_stage, methods.jit_solver_prefill

    def agent_stage(params, cfg, trace, tokens, valid, *a, **kw):
        seen["chunks"].append((kw["segment"], trace.length, np.asarray(tokens), np.asarray(valid)))
        return stage(params, cfg, trace, tokens, valid, *a, **kw)

    def solver_prefill(params, cfg, trace, tokens, valid, **kw):
        seen["chunks"].append((kw["segment"], trace.length, np.asarray(tokens), np.asarray(valid)))
        return prefill(params, cfg, trace, tokens, valid, **kw)

    def decode_to_text(params, cfg, tok, trace, logits, **kw):
        seen["trace"], seen["visible"], seen["segment"] = trace, kw["visible"], kw["segment"]
        raise Captured

    monkeypatch.setattr(methods, "jit_agent_stage", agent_stage)
    monkeypatch.setattr(methods, "jit_solver_prefill", solver_prefill)
    monkeypatch.setattr(methods, "decode_to_text", decode_to_text)
    return seen


def slot_facts(model, items, seen, mc) -> np.ndarray:
    """[batch, capacity] bool: the slot holds a token of the item's facts."""
    trace = seen["trace"]
    out = np.zeros(np.asarray(trace.valid).shape, bool)
    agents = mc.agents()
    for seg, offset, tokens, valid in seen["chunks"]:
        agent = agents[seg]
        is_solver = seg == len(agents) - 1
        for i, it in enumerate(items):
            msgs = agent_messages(agent, it.question, is_solver=is_solver,
                                  answer_instruction=get_task("comm").answer_instruction if is_solver else "",
                                  has_team=mc.method != "single")
            ids = tokens[i][valid[i]].tolist()
            mask = fact_token_mask(model.tokenizer, msgs, it.meta["facts"], ids)
            slots = offset + np.flatnonzero(valid[i])  # real tokens land in the chunk's valid slots
            out[i, slots] = mask
    return out


def solver_view(model, items, monkeypatch, **kw):
    mc = MethodConfig(method=kw.pop("method", "latent_mas"), roles=ROLES, latent_steps=kw.pop("latent_steps", 3),
                      max_new_tokens=2, **kw)
    seen = capture_trace(monkeypatch)
    with pytest.raises(Captured):
        run_batch(model, [it.question for it in items], get_task("comm").answer_instruction, mc)
    trace = seen["trace"]
    visible = np.asarray(seen["visible"].slot_mask(trace)) & np.asarray(trace.valid)
    return mc, seen, trace, visible, slot_facts(model, items, seen, mc)


def test_latent_only_solver_sees_no_fact_token(tiny_chat, monkeypatch):
    items = get_task("comm", op="mixed").load("test", limit=3)
    mc, seen, trace, visible, facts = solver_view(tiny_chat, items, monkeypatch, visibility="latent_only")
    seg, kind, valid = (np.asarray(x) for x in (trace.segment, trace.kind, trace.valid))
    k = seen["segment"]
    assert k == len(ROLES) - 1
    # The facts are on the trace: in the upstream agents' prompt slots, and only there.
    for i in range(len(items)):
        assert facts[i].sum() >= 10
        assert set(seg[i][facts[i]]) == {0, 1} and set(kind[i][facts[i]]) == {PROMPT}
    # What the solver attends to: its own segment plus upstream latent slots, no fact token.
    assert not (visible & facts).any()
    upstream_visible = visible & (seg != k)
    assert (kind[upstream_visible] == LATENT).all()
    assert set(seg[upstream_visible]) == {0, 1}
    assert (upstream_visible.sum(1) == 2 * 3).all()               # every latent slot, nothing else
    assert (visible == (valid & ((seg == k) | (kind == LATENT)))).all()
    # The check has teeth: the default full-trace rule, on the same trace, shows the fact slots.
    full = methods.solver_visibility(MethodConfig(method="latent_mas", roles=ROLES, latent_steps=3), k, 2 * 3)
    assert ((np.asarray(full.slot_mask(trace)) & valid & facts).sum(1) >= 10).all()
    # The solver's own prompt holds the question alone.
    for i, it in enumerate(items):
        own = seen["chunks"][-1]
        text = tiny_chat.tokenizer.decode(own[2][i][own[3][i]])
        assert str(it.question) in text and "Facts" not in text
        for sentence in it.meta["facts"].split(". "):
            assert sentence.rstrip(".") not in text


def test_single_gets_no_facts(tiny_chat, monkeypatch):
    items = get_task("comm").load("test", limit=2)
    mc, seen, trace, visible, facts = solver_view(tiny_chat, items, monkeypatch, method="single")
    assert not facts.any()
    ((seg, _, tokens, valid),) = seen["chunks"]
    for i, it in enumerate(items):
        text = tiny_chat.tokenizer.decode(tokens[i][valid[i]])
        assert str(it.question) in text and it.meta["facts"] not in text and "Facts" not in text


def test_training_prompts(tiny_chat):
    """DiffMAS training: facts in the upstream prompts only; Single+SFT: nowhere."""
    from diffmas_jax.training import encode_items
    task = get_task("comm")
    items = task.load("train", limit=2)
    tok = tiny_chat.tokenizer
    mc = MethodConfig(method="latent_mas", roles=ROLES, latent_steps=2, visibility="latent_only")
    for method in ("diffmas", "single_sft"):
        data, agents = encode_items(tok, items, task.answer_instruction, mc, method, 32)
        for i, it in enumerate(items):
            solver_text = tok.decode(data.tokens[i][data.valid[i] & ~data.target_mask[i]])
            assert str(it.question) in solver_text and "Facts" not in solver_text
            for t, v in zip(data.up_tokens, data.up_valid):
                assert it.meta["facts"] in tok.decode(t[i][v[i]])
        assert len(data.up_tokens) == (2 if method == "diffmas" else 0)


def test_prompts_by_role():
    q = Question("How many coins does Ava have?", {"upstream": "Ava has 7 coins.", "critic": "Ben has 2 coins."})
    planner, critic, solver = build_agents("sequential", ROLES, 1)
    content = lambda a, **kw: agent_messages(a, q, **kw)[1]["content"]
    assert "Ava has 7 coins." in content(planner) and "Ben has 2 coins." not in content(planner)
    assert "Ben has 2 coins." in content(critic)                  # a role key wins over "upstream"
    for kw in ({"is_solver": True}, {"is_solver": True, "has_team": False}):
        assert "coins." not in content(solver, **kw).replace("Ava have?", "")
    assert "Facts" not in content(solver, is_solver=True)
    # A plain string behaves as before, and a Question is still the question string.
    assert agent_messages(planner, str(q)) == agent_messages(planner, "How many coins does Ava have?")
    assert q == "How many coins does Ava have?"


def test_generator():
    task = get_task("comm", op="mixed", size=50)
    test, train = task.load("test"), task.load("train")
    assert len(test) == 50 and test == get_task("comm", op="mixed", size=50).load("test")  # deterministic
    assert {it.question.context["upstream"] for it in test}.isdisjoint({it.question.context["upstream"] for it in train})
    for it in test:
        assert it.question.context["upstream"] == it.meta["facts"]
        assert not any(ch.isdigit() for ch in it.question)          # the question alone cannot answer
        assert task.score(it, it.target)["correct"]
        assert task.score(it, "\\boxed{999}")["correct"] is False
    kinds = {"together" in it.question for it in test}
    assert kinds == {True, False}
    for bad in ({"op": "product"}, {"n_facts": 0}, {"size": 0}):
        with pytest.raises(TaskError):
            get_task("comm", **bad)

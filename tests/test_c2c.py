"""C2C: layer alignment, closed gates are exact no-ops, the channel between agents,
cross-family shapes, gate schedule, fuser-only training, tokenizer alignment, and the
train / evaluate CLIs.

Compiling is most of the cost here, so tests share shapes and static arguments (one
compiled program serves several tests) and tiny models get numpy weights (no torch).
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmas_jax.c2c import (FuserConfig, FuserConfigError, init_fuser, jit_chain_cache, jit_fuse_kv,
                             layer_alignment, load_fuser, save_fuser)
from diffmas_jax.c2c_training import C2CStepConfig, align_ids, gate_temperature, make_c2c_optimizer, same_tokenizer
from diffmas_jax.model.config import ModelConfig
from diffmas_jax.model.transformer import _is_leaf, jit_forward, param_shapes
from diffmas_jax.stages import jit_solver_prefill
from diffmas_jax.trace import KVTrace

B, N, EXTRA = 2, 7, 5


def with_gates(fuser, logit):
    return {p: dict(fuser[p], gate=jnp.full_like(fuser[p]["gate"], logit)) for p in ("k", "v")}


def random_params(cfg, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray((s[1][-1] == "norm") + rng.normal(0, 0.1, s[0]).astype(np.float32)),
                        param_shapes(cfg), is_leaf=_is_leaf)


def save_random_model(path, family, tokenizer, seed, **overrides):
    """An HF model directory with random weights, written without torch."""
    from conftest import make_hf_config
    from safetensors.numpy import save_file
    from diffmas_jax.model.weights import params_to_hf
    hf = make_hf_config(family, **overrides)
    hf.save_pretrained(path)
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    save_file({k: np.asarray(v, np.float32) for k, v in params_to_hf(cfg, random_params(cfg, seed)).items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def embedded_tokenizer():
    from diffmas_jax.model.loading import load_tokenizer, resolve_model_dir
    return load_tokenizer(resolve_model_dir("embedded"))


@pytest.fixture(scope="module")
def char_tokenizer():
    """A character-level tokenizer: another vocabulary than the receiver's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, embedded_tokenizer, char_tokenizer):
    """Receiver: llama with the embedded model's vocabulary and chat template, 2 layers, 2 kv heads x 16.
    Sharer: qwen3 (q/k norm) with a character vocabulary, 3 layers, 4 kv heads x 32."""
    d = tmp_path_factory.mktemp("models")
    recv = save_random_model(d / "recv", "llama", embedded_tokenizer, 1, vocab_size=49152, pad_token_id=2)
    sharer = save_random_model(d / "sharer", "qwen3", char_tokenizer, 2, num_hidden_layers=3, num_key_value_heads=4,
                               pad_token_id=1, eos_token_id=2)
    return recv, sharer


@pytest.fixture(scope="module")
def pair(model_dirs):
    from diffmas_jax.model.loading import load_model
    r, s = (load_model(str(p), with_tokenizer=False) for p in model_dirs)
    return (r.cfg, r.params), (s.cfg, s.params)


@pytest.fixture(scope="module")
def pair_fuser(pair):
    (rc, _), (sc, _) = pair
    fc = FuserConfig.for_models(sc, rc, hidden=16)
    return fc, init_fuser(fc, 3)


def prompts(seed=0, lengths=(7, 4)):
    rng = np.random.default_rng(seed)
    head = rng.integers(3, 250, size=(B, N)).astype(np.int32)
    valid = np.arange(N)[None] < np.asarray(lengths)[:, None]
    return jnp.asarray(np.where(valid, head, 0)), jnp.asarray(valid), jnp.asarray(rng.integers(3, 250, size=B))


# One small fuser (sharer 6 layers -> receiver 4) for the layer-map and gate tests.
SMALL = FuserConfig(6, 1, 4, 4, 1, 4, hidden=8, dropout=0.0)
KS = jnp.asarray(np.random.default_rng(1).normal(size=(6, 1, 3, 1, 4)), jnp.float32)
KR = jnp.asarray(np.random.default_rng(2).normal(size=(4, 1, 3, 1, 4)), jnp.float32)
MASK = jnp.ones((1, 3), bool)


def small_fuse(fuser, ks=KS, **kw):
    return np.asarray(jit_fuse_kv(fuser, SMALL, ks, KS, KR, KR, MASK, **kw)[0])


def test_layer_alignment_deeper_shallower_equal():
    assert layer_alignment(6, 4).tolist() == [2, 3, 4, 5]          # deeper sharer: last layers line up
    assert layer_alignment(2, 4).tolist() == [0, 0, 0, 1]          # shallower: clamped at its first layer
    assert layer_alignment(3, 3).tolist() == [0, 1, 2]
    assert layer_alignment(6, 4, "proportional").tolist() == [0, 2, 3, 5]
    assert layer_alignment(2, 4, "proportional").tolist() == [0, 0, 1, 1]
    assert layer_alignment(3, 3, "proportional").tolist() == [0, 1, 2]
    with pytest.raises(FuserConfigError, match="layer_map"):
        FuserConfig(3, 1, 4, 3, 1, 4, layer_map="middle").validate()
    with pytest.raises(FuserConfigError, match="depth"):
        FuserConfig(3, 1, 4, 3, 1, 4, depth=2).validate()
    # The fuser reads exactly the mapped sharer layer: perturbing sharer layer l changes
    # only the receiver layers mapped to l (6 -> 4, last aligned: layers 0 and 1 unread).
    fuser = with_gates(init_fuser(SMALL, 0), 1.0)
    base = small_fuse(fuser)
    for layer, want in ((0, []), (1, []), (2, [0]), (5, [3])):
        moved = small_fuse(fuser, KS.at[layer].add(1.0))
        assert [t for t in range(4) if not np.array_equal(moved[t], base[t])] == want, layer


def test_closed_gates_leave_receiver_cache_and_outputs_unchanged(pair, pair_fuser):
    (rc, rp), (sc, sp) = pair
    fc, fresh = pair_fuser
    head, valid, last = prompts()
    own = jit_forward(rp, rc, KVTrace.create(rc, B, N + EXTRA), tokens=head, valid=valid, return_logits=False).trace
    shut = with_gates(jax.tree.map(lambda x: x + 1.0, fresh), -0.5)
    for fuser in (fresh, shut):                          # fresh gate logits are 0: closed at eval
        fused = jit_chain_cache(fuser, fc, rp, rc, sp, sc, [head], [valid], [], extra=EXTRA)
        assert np.array_equal(fused.k, own.k) and np.array_equal(fused.v, own.v)   # bit for bit
        assert np.array_equal(fused.pos, own.pos) and np.array_equal(fused.valid, own.valid)
    ones = jnp.ones((B, 1), bool)
    _, want = jit_solver_prefill(rp, rc, own, last[:, None], ones, segment=0)
    _, got = jit_solver_prefill(rp, rc, fused, last[:, None], ones, segment=0)
    assert np.array_equal(got, want)
    # An open gate does change the cache, on real prompt slots only.
    opened = jit_chain_cache(with_gates(fresh, 0.5), fc, rp, rc, sp, sc, [head], [valid], [], extra=EXTRA)
    diff = np.abs(np.asarray(opened.k - own.k)).max(axis=(0, 3, 4))[:, :N]        # [B, slots]
    assert (diff[np.asarray(valid)] > 0).all() and (diff[~np.asarray(valid)] == 0).all()
    _, moved = jit_solver_prefill(rp, rc, opened, last[:, None], ones, segment=0)
    assert not np.allclose(moved, want)


def test_channel_between_consecutive_agents(pair):
    """Agent 0 -> solver: closed gates give the solver its own cache (positions continuing
    after agent 0); open gates carry agent 0's prompt into the solver's cache."""
    (rc, rp), _ = pair
    fc = FuserConfig.for_models(rc, rc, hidden=16)
    fuser = init_fuser(fc, 4)
    (h0, v0, l0), (h1, v1, _) = prompts(5, (6, 3)), prompts(6)
    chain = lambda f, h: jit_chain_cache(f, fc, rp, rc, rp, rc, [h, h1], [v0, v1], [l0], extra=EXTRA)
    start = v0.sum(1) + 1                                          # agent 0: its head and its last token
    own = jit_forward(rp, rc, KVTrace.create(rc, B, N + EXTRA).replace(next_pos=start), tokens=h1, valid=v1,
                      return_logits=False).trace
    other = (h0 + 1) % 250
    closed = chain(fuser, h0)
    assert np.array_equal(closed.k, own.k) and np.array_equal(closed.pos, own.pos)
    assert np.array_equal(chain(fuser, other).k, closed.k)        # nothing crosses a closed channel
    assert int(closed.pos[0, 0]) == int(start[0]) and closed.segment[0, 0] == 1
    opened = with_gates(fuser, 1.0)
    a, b = chain(opened, h0), chain(opened, other)
    assert not np.allclose(a.k, own.k) and not np.allclose(a.k, b.k)   # agent 0's prompt reaches the solver


def test_shapes_across_families(pair, pair_fuser, tmp_path):
    (rc, rp), (sc, sp) = pair
    fc, fuser = pair_fuser
    assert (rc.model_type, rc.num_kv_heads, rc.head_dim, rc.num_layers) == ("llama", 2, 16, 2)
    assert (sc.model_type, sc.num_kv_heads, sc.head_dim, sc.num_layers) == ("qwen3", 4, 32, 3)
    assert fuser["k"]["in"]["kernel"].shape == (2, 4 * 32 + 2 * 16, 16)
    assert fuser["k"]["proj_out"]["kernel"].shape == (2, 16, 2 * 16)
    assert fuser["v"]["weight_out"]["kernel"].shape == (2, 16, 2) and fuser["k"]["gate"].shape == (2,)
    with pytest.raises(FuserConfigError, match="sharer"):
        fc.check_models(rc, rc)
    head, valid, _ = prompts(1)
    tr = jit_chain_cache(with_gates(fuser, 1.0), fc, rp, rc, sp, sc, [head], [valid], [], extra=EXTRA)
    assert tr.k.shape == (2, B, N + EXTRA, 2, 16) and np.isfinite(np.asarray(tr.k)).all()
    # Optimizer state is built on the fuser alone (Adam's moments, accumulated gradients).
    opt = make_c2c_optimizer(1e-4, 10, grad_accum=2)
    state = opt.init(fuser)
    n_fuser = sum(x.size for x in jax.tree.leaves(fuser))
    assert 3 * n_fuser <= sum(np.size(x) for x in jax.tree.leaves(state)) <= 3 * n_fuser + 8
    save_fuser(tmp_path / "f", fuser, fc, {"note": "x"})
    tree, fc2, meta = load_fuser(tmp_path / "f")
    assert fc2 == fc and meta == {"note": "x"}
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(fuser)))
    # a fuser file that does not hold exactly the tensors fuser.json describes is refused at load
    # (a missing gate or block loaded, then failed mid-evaluation with a KeyError)
    from safetensors.numpy import load_file, save_file
    good = load_file(str(tmp_path / "f" / "fuser.safetensors"))
    for name, change, expect in [("k/gate", None, "missing k/gate"), ("v/trunk/w1", None, "missing v/trunk/w1"),
                                 ("k/junk", np.zeros(2, np.float32), "unexpected k/junk"),
                                 ("k/gate", np.zeros(3, np.float32), r"shape of k/gate \(3,\) \(fuser.json: \(2,\)\)")]:
        bad = {k: v for k, v in good.items() if k != name}
        if change is not None:
            bad[name] = change
        save_file(bad, str(tmp_path / "f" / "fuser.safetensors"))
        with pytest.raises(FuserConfigError, match=f"does not match fuser.json: {expect}"):
            load_fuser(tmp_path / "f")
    save_fuser(tmp_path / "g", fuser, dataclasses.replace(fc, depth=fc.depth + 1), {})
    with pytest.raises(FuserConfigError, match="shape of k/proj_blocks/norm"):
        load_fuser(tmp_path / "g")


def test_gate_anneals_per_step_and_is_hard_at_eval():
    sc = C2CStepConfig(fc=None, anneal_steps=5)
    taus = [float(gate_temperature(i, sc)) for i in range(7)]
    assert taus[0] == pytest.approx(1.0) and taus[4] == pytest.approx(1e-3) and taus[6] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(taus[:5], taus[1:5]))
    assert taus[2] == pytest.approx(np.sqrt(1e-3), rel=1e-5)            # exponential in between
    # (per optimizer step inside the train step: test_shapes_across_families_and_fuser_only_training)
    # Eval gates are hard: any positive logit opens fully, any other closes exactly;
    # training gates are soft and noisy.
    f = init_fuser(SMALL, 1)
    kr = np.asarray(KR)
    assert np.array_equal(small_fuse(with_gates(f, 0.1)), small_fuse(with_gates(f, 7.0)))
    assert not np.array_equal(small_fuse(with_gates(f, 0.1)), kr)
    assert np.array_equal(small_fuse(with_gates(f, 0.0)), kr) and np.array_equal(small_fuse(with_gates(f, -3.0)), kr)
    soft = [small_fuse(f, train=True, temperature=1.0, rng=jax.random.PRNGKey(i)) for i in range(2)]
    assert not np.array_equal(soft[0], soft[1])
    gate = (soft[0] - kr) / (small_fuse(with_gates(f, 1.0)) - kr)     # the gate value of each element
    assert 0 < gate.min() and gate.max() < 1 and gate.std() > 0.01
    cold = small_fuse(with_gates(f, 5.0), train=True, temperature=1e-3, rng=jax.random.PRNGKey(0))
    np.testing.assert_allclose(cold, small_fuse(with_gates(f, 5.0)), atol=1e-6)  # annealed: (almost) hard


def test_tokenizer_alignment(embedded_tokenizer, char_tokenizer):
    recv, sharer = embedded_tokenizer, char_tokenizer
    ids = recv("The cat sat, then 42 cats!", add_special_tokens=False)["input_ids"]
    got = align_ids(ids, recv, sharer)
    assert len(got) == len(ids) and len(set(got)) > 3               # one sharer token per receiver token
    assert got == [ord(recv.decode([i])[0]) - 29 for i in ids]       # the first piece of each re-encoding
    assert same_tokenizer(recv, recv) and not same_tokenizer(recv, sharer)


def test_train_and_evaluate_cli(model_dirs, tmp_path):
    """method=c2c through train (two families, two tokenizers) and evaluate: only the fuser
    trains, the gate anneals per optimizer step, resume is exact; an untrained fuser is the
    receiver alone."""
    import importlib.util
    import shutil
    from diffmas_jax import config_utils, evaluate
    from diffmas_jax.c2c import C2CSystem, load_system
    from diffmas_jax.c2c_training import train_c2c
    from diffmas_jax.cli import UserError
    from diffmas_jax.methods import MethodConfig, run_batch
    from diffmas_jax.model.loading import load_model
    recv, sharer = map(str, model_dirs)
    spec = importlib.util.spec_from_file_location("c2c_cfg", "configs/embedded_c2c_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def config(**kw):
        c = mod.get_config()
        c.update(dict(model=recv, sharer=sharer, roles="solver", limit=8, batch_size=2, steps=4, grad_accum=2,
                      fuser_hidden=8, weight_decay=0.0, max_target_tokens=6, eval_items=0, checkpoint_every=1,
                      keep_checkpoints=5), **kw)
        return c

    run = tmp_path / "run"
    train_c2c(config(), run)
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()]
    assert rows[0][:4] == ["step", "loss", "grad_norm", "gate_temperature"] and len(rows) == 5
    assert [float(r[3]) for r in rows[1:]] == pytest.approx([1.0, 1.0, 1e-3, 1e-3])   # per optimizer step
    trained, fc, meta = load_fuser(run / "fuser")
    assert meta["sharer"] == sharer and (fc.sharer_layers, fc.receiver_layers, fc.hidden) == (3, 2, 8)
    # No weight decay: a leaf moves only if it has a gradient. Every fuser leaf does (gate logits too).
    start = init_fuser(fc, 0)
    assert not any(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(start), jax.tree.leaves(trained)))
    shutil.rmtree(run / "checkpoints" / "4")                     # as if killed before the last save
    train_c2c(config(), run)                                     # resumes from step 3
    resumed, _, _ = load_fuser(run / "fuser")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(trained), jax.tree.leaves(resumed)))
    with pytest.raises(UserError, match="different config"):
        train_c2c(config(lr=1.0), run)
    with pytest.raises(UserError, match="sharer = receiver"):
        train_c2c(config(roles="planner,solver"), tmp_path / "x")
    with pytest.raises(UserError, match="fuser"):
        config_utils.resolve(config_utils.eval_config(method="c2c"))

    cfg = config_utils.eval_config(model=recv, sharer=sharer, method="c2c", roles="solver", task="arith",
                                   split="test", limit=2, batch_size=2, max_new_tokens=4, fuser=str(run / "fuser"))
    summary = evaluate.evaluate(cfg, tmp_path / "eval", progress=False)
    assert summary["complete"] and summary["n"] == 2 and summary["config"]["sharer"] == sharer
    rec = json.loads((tmp_path / "eval" / "items.jsonl").read_text().splitlines()[0])
    assert set(rec["trace_per_agent"]) == {"0:solver"} and rec["generated_tokens"] >= 1

    # With an untrained fuser (every gate closed) C2C answers exactly like Single.
    # (The evaluated items again: same shapes, so the compiled programs are reused.)
    from diffmas_jax.tasks import get_task
    task = get_task("arith")
    qs = [it.question for it in task.load("test", limit=2)]
    m = load_model(recv)
    system = load_system(m, recv, sharer, run / "fuser")
    system = C2CSystem(receiver=m, sharer=system.sharer, fuser=start, fc=fc)
    mc = dict(roles=("solver",), max_new_tokens=4)
    got = run_batch(system, qs, task.answer_instruction, MethodConfig(method="c2c", **mc))
    want = run_batch(m, qs, task.answer_instruction, MethodConfig(method="single", **mc))
    assert [r["generated_ids"] for r in got.records] == [r["generated_ids"] for r in want.records]


def test_accumulated_micro_batches_update_as_one_batch(model_dirs, pair, embedded_tokenizer, char_tokenizer,
                                                       monkeypatch):
    """grad_accum for the fuser: k micro-batches with different target-token counts give the
    update of one batch of all of them (weighted by their share of the window's tokens).
    The gates' Gumbel noise is drawn per batch shape, so it is held at zero here."""
    import optax
    from diffmas_jax import c2c
    monkeypatch.setattr(c2c, "_training_noise", lambda rng, fc, t, b, n: [
        (jnp.full((t, b, n, fc.receiver_kv_heads, 1), 0.5, jnp.float32), None)] * 2)
    from diffmas_jax.agents import build_agents
    from diffmas_jax.c2c_training import encode_training, make_c2c_train_step
    from diffmas_jax.tasks import get_task
    from diffmas_jax.train_loop import accumulation_weight
    (rc, rp), (sc_, sp) = pair
    task = get_task("arith", size=64)
    items = task.load("train", limit=4)
    items = [dataclasses.replace(it, target=it.target * (3 if i == 0 else 1)) for i, it in enumerate(items)]
    data = encode_training(embedded_tokenizer, items, task.answer_instruction, build_agents(roles=("solver",)), 48,
                           sharer_tokenizer=char_tokenizer)
    halves = [np.arange(0, 2), np.arange(2, 4)]
    window = [int(data.n_target[h].sum()) for h in halves]
    assert window[0] > window[1]
    fc = FuserConfig.for_models(sc_, rc, hidden=8, dropout=0.0)
    fuser = init_fuser(fc, 1)
    step_cfg = C2CStepConfig(fc=fc, max_target=int(data.n_target.max()))

    def run(optimizer, parts, weights):
        step = make_c2c_train_step(rc, sc_, step_cfg, optimizer)
        f, opt = jax.tree.map(jnp.copy, fuser), optimizer.init(fuser)
        for idx, w in zip(parts, weights):
            batch = jax.tree.map(jnp.asarray, data.batch(idx))
            f, opt, _ = step(f, opt, rp, sp, batch, jnp.int32(0), w)
        return f

    delta = lambda f: np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                                      for a, b in zip(jax.tree.leaves(f), jax.tree.leaves(fuser))])
    d_big = delta(run(optax.sgd(1.0), [np.arange(4)], [1.0]))
    acc = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
    d_acc = delta(run(acc, halves, [accumulation_weight(window, j) for j in range(2)]))
    d_plain = delta(run(acc, halves, [1.0, 1.0]))
    rel = lambda d: np.linalg.norm(d - d_big) / np.linalg.norm(d_big)
    assert rel(d_acc) < 1e-4, rel(d_acc)
    assert rel(d_plain) > 1e-2, rel(d_plain)

"""DiffMAS training: LoRA semantics, gradient modes, overfitting, exact resume, exports, bad input."""
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import tensorboard_scalars
from diffmas_jax.lora import (LoraConfig, LoraConfigError, export_merged, export_peft, init_lora, load_adapter,
                              save_adapter)
from diffmas_jax.methods import MethodConfig, run_batch
from diffmas_jax.model.loading import load_model
from diffmas_jax.model.transformer import LoraDropout, dense, jit_forward
from diffmas_jax.stages import make_realign
from diffmas_jax.tasks import get_task
from diffmas_jax.trace import KVTrace
from diffmas_jax.training import (StepConfig, batch_of, encode_items, loss_and_grads, make_optimizer,
                                  make_train_step, step_capacity)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, embedded):
    from conftest import save_tiny_model
    path = save_tiny_model(tmp_path_factory.mktemp("chat") / "m", "llama", vocab_size=49152, hidden_size=32,
                           intermediate_size=48, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                           initializer_range=0.5)
    embedded.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat(chat_dir):
    return load_model(str(chat_dir))


def jit_loss_and_grads(model, realign, batch, sc):
    """``loss_and_grads`` compiled once (run eagerly, op by op, it takes about 3x a compile)."""
    return jax.jit(lambda lo: loss_and_grads(lo, model.params, model.cfg, realign, batch, sc))


@pytest.fixture(scope="module")
def full_step(chat):
    """The three-agent step in trace_grad=full, its loss and gradients for a random LoRA: several
    tests compare against it, so it is compiled once."""
    sc, lcfg, batch, realign = setup_step(chat, "full")
    lora = random_lora(chat.cfg, lcfg)
    loss, grads, norms = jit_loss_and_grads(chat, realign, batch, sc)(lora)
    return dict(sc=sc, lcfg=lcfg, batch=batch, realign=realign, lora=lora, loss=float(loss), grads=grads,
                norms=np.asarray(norms))


def random_lora(cfg, lcfg, seed=0):
    lora = init_lora(cfg, lcfg, jax.random.PRNGKey(seed))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), lora)


def setup_step(model, trace_grad, roles=("planner", "critic", "solver"), steps=(2, 2), n=4, method="diffmas",
               notes=None):
    mc = MethodConfig(method="latent_mas", roles=roles, latent_steps=steps)
    task = get_task("arith", size=64)
    items = task.load("train", limit=n)
    data, agents = encode_items(model.tokenizer, items, task.answer_instruction, mc, method, 24, notes=notes)
    latent = tuple(a.latent_steps for a in agents[:-1])
    lcfg = LoraConfig(rank=4, alpha=8.0)
    sc = StepConfig(method=method, trace_grad=trace_grad, roles=tuple(a.role for a in agents), latent_steps=latent,
                    up_lengths=tuple(t.shape[1] for t in data.up_tokens), solver_length=data.tokens.shape[1],
                    capacity=step_capacity(data, latent, None), lora_scale=lcfg.scale)
    batch = jax.tree.map(jnp.asarray, batch_of(data, np.arange(n)))
    return sc, lcfg, batch, make_realign(model.params, model.cfg, "ridge")


def test_teacher_forced_nll_scores_only_the_target(chat):
    from diffmas_jax.stages import teacher_forced_nll
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, 1000, size=(2, 12)))
    valid = jnp.asarray(np.arange(12)[None] < np.array([[12], [9]]))
    target = jnp.asarray((np.arange(12)[None] >= np.array([[7], [5]])) & np.asarray(valid))
    tr = KVTrace.create(chat.cfg, 2, 16)
    got, n = teacher_forced_nll(chat.params, chat.cfg, tr, tokens, valid, target, segment=0, max_target=8)
    logits = np.asarray(jit_forward(chat.params, chat.cfg, tr, tokens=tokens, valid=valid).logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ref, cnt = 0.0, 0
    for b in range(2):
        for t in range(1, 12):
            if target[b, t]:
                ref -= logp[b, t - 1, int(tokens[b, t])]
                cnt += 1
    assert int(n) == cnt == 5 + 4
    assert float(got) == pytest.approx(ref, rel=1e-5)


def test_zero_b_lora_leaves_logits_unchanged(chat):
    lora = init_lora(chat.cfg, LoraConfig(rank=4), jax.random.PRNGKey(0))
    ids = jnp.asarray([[5, 9, 200, 31, 7]])
    tr = KVTrace.create(chat.cfg, 1, 8)
    a = jit_forward(chat.params, chat.cfg, tr, tokens=ids).logits
    b = jit_forward(chat.params, chat.cfg, tr, tokens=ids, lora=lora, lora_scale=2.0).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lora_dropout_drops_the_lora_input_only(chat):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 8))
    p = {"kernel": jax.random.normal(jax.random.PRNGKey(2), (8, 5))}
    lo = {"a": jax.random.normal(jax.random.PRNGKey(3), (8, 2)), "b": jax.random.normal(jax.random.PRNGKey(4), (2, 5))}
    drop = LoraDropout(0.25, jax.random.PRNGKey(5))
    keep = jax.random.bernoulli(drop.key, 0.75, x.shape)
    want = x @ p["kernel"] + 2.0 * (((x * keep) / 0.75) @ lo["a"]) @ lo["b"]  # PEFT: B(A(dropout(x))) * scale
    np.testing.assert_allclose(np.asarray(dense(x, p, lo, 2.0, drop)), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(dense(x, p, None, 2.0, drop)), np.asarray(x @ p["kernel"]))
    # With B = 0 the LoRA branch is zero whatever is dropped: the base path never sees dropout.
    lora = init_lora(chat.cfg, LoraConfig(rank=4), jax.random.PRNGKey(0))
    ids, tr = jnp.asarray([[5, 9, 200, 31, 7]]), KVTrace.create(chat.cfg, 1, 8)
    a = jit_forward(chat.params, chat.cfg, tr, tokens=ids).logits
    b = jit_forward(chat.params, chat.cfg, tr, tokens=ids, lora=lora, dropout=LoraDropout(0.5, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b.logits))


def test_lora_dropout_masks_follow_the_step_rng(chat, full_step):
    import dataclasses
    sc, batch, realign, lora = (full_step[k] for k in ("sc", "batch", "realign", "lora"))
    sc_d = dataclasses.replace(sc, lora_dropout=0.3)
    run = jax.jit(lambda s, rng: loss_and_grads(lora, chat.params, chat.cfg, realign, batch, s, rng)[0],
                  static_argnums=0)
    loss = lambda s, rng: float(run(s, rng))  # noqa: E731
    k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    assert loss(sc_d, k0) == loss(sc_d, k0)               # replayable: resume gives the same masks
    assert loss(sc_d, k0) != loss(sc_d, k1)               # and they really change with the key
    assert loss(sc_d, k0) != full_step["loss"]  # the same step without dropout
    with pytest.raises(ValueError, match="needs an rng"):
        loss(sc_d, None)


def test_gradients_and_optimizer_state_only_for_lora(full_step):
    lora = full_step["lora"]
    opt = make_optimizer(1e-3, 10, 1, 0.0, 1.0, 1)
    state = opt.init(lora)
    # Optimizer state mirrors the LoRA tree only: its leaves are LoRA-shaped (plus scalar counts).
    lora_shapes = {x.shape for x in jax.tree.leaves(lora)}
    assert all(x.shape in lora_shapes or x.shape == () for x in jax.tree.leaves(state))
    assert sum(x.size for x in jax.tree.leaves(state)) < 3 * sum(x.size for x in jax.tree.leaves(lora)) + 10
    assert jax.tree.structure(full_step["grads"]) == jax.tree.structure(lora)


def test_trace_grad_full_reaches_upstream_and_stop_does_not(chat, full_step):
    out = {"full": (full_step["loss"], full_step["grads"], full_step["norms"])}
    sc, _, batch, realign = setup_step(chat, "stop")
    loss, grads, norms = jit_loss_and_grads(chat, realign, batch, sc)(full_step["lora"])
    out["stop"] = (float(loss), grads, np.asarray(norms))
    assert out["full"][0] == pytest.approx(out["stop"][0], rel=1e-5)  # same forward
    assert (out["full"][2] > 0).all() and out["full"][2].shape == (2,)
    assert (out["stop"][2] == 0).all()
    # The upstream agents' use of the shared adapter adds gradient in full mode.
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), out["full"][1], out["stop"][1])
    assert max(jax.tree.leaves(diff)) > 1e-6


def test_remat_policies_give_the_same_loss_and_gradients(chat, full_step):
    """Rematerialising layers (keeping only their inputs, or also the projections' outputs)
    changes what is stored for the backward pass, never the loss or the gradients."""
    import dataclasses
    sc, batch, realign = full_step["sc"], full_step["batch"], full_step["realign"]
    assert sc.remat is False
    out = {False: (full_step["loss"], full_step["grads"])}
    for remat in (True, "dots"):
        loss, grads, _ = jit_loss_and_grads(chat, realign, batch, dataclasses.replace(sc, remat=remat))(full_step["lora"])
        out[remat] = (float(loss), grads)
    for remat in (True, "dots"):
        assert out[remat][0] == pytest.approx(out[False][0], rel=1e-6)
        for g, w in zip(jax.tree.leaves(out[remat][1]), jax.tree.leaves(out[False][1])):
            w = np.asarray(w)  # float32 recompute rounds differently: compare on the leaf's own scale
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-3, atol=1e-4 * np.abs(w).max())


def test_remat_setting_reads_the_config():
    from ml_collections import ConfigDict
    from diffmas_jax.cli import UserError, remat_setting
    assert remat_setting(ConfigDict({"remat": False, "remat_policy": "dots"})) is False
    assert remat_setting(ConfigDict({"remat": True})) is True  # older configs: no policy field
    assert remat_setting(ConfigDict({"remat": True, "remat_policy": "dots"})) == "dots"
    with pytest.raises(UserError, match="config.remat_policy='most': expected 'full' or 'dots'"):
        remat_setting(ConfigDict({"remat": True, "remat_policy": "most"}))


@pytest.mark.parametrize("method", ["single_sft", "text_mas_sft"])
def test_sft_baselines_train_the_solver_without_a_trace(chat, method):
    notes = [[("planner", "First add, then subtract.")]] * 2 if method == "text_mas_sft" else None
    sc, lcfg, batch, realign = setup_step(chat, "full", n=2, method=method, notes=notes)
    assert sc.latent_steps == () and len(sc.roles) == 1 and batch["up_tokens"] == []
    text = chat.tokenizer.decode(np.asarray(batch["tokens"][0]))
    assert ("First add, then subtract." in text) == (method == "text_mas_sft")
    loss, grads, norms = jit_loss_and_grads(chat, realign, batch, sc)(random_lora(chat.cfg, lcfg))
    assert np.isfinite(float(loss)) and norms.shape == (0,)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_per_role_adapters_get_gradient_only_through_the_trace(chat):
    sc, _, batch, realign = setup_step(chat, "stop", roles=("planner", "solver"), steps=(2,), n=2)
    lcfg = LoraConfig(rank=2, alpha=4.0, targets=("q", "v"), per_role=True)
    lora = init_lora(chat.cfg, lcfg, jax.random.PRNGKey(0), roles=sc.roles)
    lora = jax.tree.map(lambda x: x + 0.05, lora)
    assert set(lora["roles"]) == {"planner", "solver"}
    norm = lambda t: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(t))
    for mode in ("stop", "full"):
        sc_m = StepConfig(**{**sc.__dict__, "trace_grad": mode, "lora_scale": lcfg.scale})
        _, grads, _ = jit_loss_and_grads(chat, realign, batch, sc_m)(lora)
        assert norm(grads["roles"]["solver"]) > 0
        # The planner's adapter only matters through the trace it writes.
        assert (norm(grads["roles"]["planner"]) > 0) == (mode == "full")


def test_overfit_one_batch(chat):
    sc, lcfg, batch, realign = setup_step(chat, "stop", roles=("planner", "solver"), steps=(2,), n=2)
    lora = init_lora(chat.cfg, LoraConfig(rank=8, alpha=16.0), jax.random.PRNGKey(0))
    sc = StepConfig(**{**sc.__dict__, "lora_scale": 2.0})
    opt = make_optimizer(2e-2, 400, 0, 0.0, 1.0, 1)
    step = make_train_step(chat.cfg, sc, opt)
    state = opt.init(lora)
    first = None
    for i in range(35):  # 0.07 of the first loss by then on this machine (0.04 at 60 steps)
        lora, state, m = step(lora, state, chat.params, realign, batch)
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < 0.1 * first, (first, float(m["loss"]))


def test_bad_lora_configs():
    with pytest.raises(LoraConfigError, match="unknown LoRA target"):
        LoraConfig(targets=("q", "qkv")).validate()
    with pytest.raises(LoraConfigError, match="rank must be positive, got 0"):
        LoraConfig(rank=0).validate()
    with pytest.raises(LoraConfigError, match=r"dropout must be in \[0, 1\), got 1.0"):
        LoraConfig(dropout=1.0).validate()


def test_peft_export_and_merged_checkpoint_match(chat, chat_dir, tmp_path):
    import peft
    import transformers
    lcfg = LoraConfig(rank=4, alpha=8.0)
    lora = random_lora(chat.cfg, lcfg, seed=3)
    ids = np.asarray([[5, 9, 200, 31, 7, 1000, 4]])
    ours = np.asarray(jit_forward(chat.params, chat.cfg, KVTrace.create(chat.cfg, 1, 8), tokens=jnp.asarray(ids),
                                  lora=lora, lora_scale=lcfg.scale).logits)
    export_peft(tmp_path / "peft", lora, lcfg, chat.cfg)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(chat_dir), dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        ref = pm(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    export_merged(tmp_path / "merged", chat.params, lora, lcfg.scale, chat.cfg, chat_dir)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
    save_adapter(tmp_path / "ad", lora, lcfg)
    back = load_adapter(tmp_path / "ad")
    assert back.config == lcfg
    jax.tree.map(np.testing.assert_array_equal, back.tree, lora)


def test_merged_export_of_a_bfloat16_base_keeps_small_updates(chat_dir, tmp_path):
    """The merge happens in float32 and is written so, in shards past max_shard_size: a small
    update survives (rounded back to bfloat16 most of it would not) and transformers' load of
    the sharded checkpoint matches our model with the adapter on the same base."""
    import json
    import transformers
    from safetensors.numpy import load_file
    bf = load_model(str(chat_dir), dtype="bfloat16")
    lcfg = LoraConfig(rank=4, alpha=8.0)
    lora = init_lora(bf.cfg, lcfg, jax.random.PRNGKey(0))
    lora = jax.tree.map(lambda x: x + 1e-3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), lora)
    out = export_merged(tmp_path / "merged", bf.params, lora, lcfg.scale, bf.cfg, chat_dir, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert json.loads((out / "config.json").read_text()).get("torch_dtype", "float32") == "float32"
    q0 = load_file(str(out / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]))[
        "model.layers.0.self_attn.q_proj.weight"]
    base = np.asarray(bf.params["layers"]["q"]["kernel"][0], np.float32)
    want = lcfg.scale * np.asarray(lora["q"]["a"][0], np.float32) @ np.asarray(lora["q"]["b"][0], np.float32)
    np.testing.assert_allclose(q0.T - base, want, atol=1e-6)
    ids = np.asarray([[5, 9, 200, 31, 7, 1000, 4]])
    up = jax.tree.map(lambda x: x.astype(jnp.float32), bf.params)
    ours = np.asarray(jit_forward(up, bf.cfg, KVTrace.create(bf.cfg, 1, 8), tokens=jnp.asarray(ids),
                                  lora=lora, lora_scale=lcfg.scale).logits)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), ours, atol=2e-5)
    # a later export with one file replaces the shards and their index
    export_merged(out, bf.params, lora, lcfg.scale, bf.cfg, chat_dir)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    # one that fails half way (a full disk on the second shard) leaves the previous export whole
    import safetensors.numpy
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save, calls = safetensors.numpy.save_file, []

    def full_disk(tensors, filename, **kw):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(tensors, filename, **kw)
    safetensors.numpy.save_file = full_disk
    try:
        with pytest.raises(OSError, match="No space left"):
            export_merged(out, bf.params, lora, lcfg.scale, bf.cfg, chat_dir, max_shard_size=20_000)
    finally:
        safetensors.numpy.save_file = real_save
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder left


def test_per_role_adapters_export_one_peft_directory_per_role(chat, chat_dir, tmp_path):
    import peft
    import transformers
    from diffmas_jax import train
    import runpy
    lcfg = LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down"), per_role=True)
    roles = ("planner", "solver")
    one = random_lora(chat.cfg, dataclasses.replace(lcfg, per_role=False), seed=5)
    lora = {"roles": {r: jax.tree.map(lambda x, k=k: x * (1 + k), one) for k, r in enumerate(roles)}}
    c = runpy.run_path(str(REPO / "configs/embedded_train.py"))["get_config"]()
    c.lora_per_role, c.export_peft = True, True
    c.model = "fakeorg/tiny-chat"  # a Hub id: the PEFT adapter names its base by it, not by the local cache path
    train.export_adapter(tmp_path, lora, lcfg, c, chat, roles)
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == list(roles)
    import json
    assert json.loads((tmp_path / "peft" / "solver" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "fakeorg/tiny-chat"
    ids = np.asarray([[5, 9, 200, 31, 7, 1000, 4]])
    for role in roles:
        ours = np.asarray(jit_forward(chat.params, chat.cfg, KVTrace.create(chat.cfg, 1, 8), tokens=jnp.asarray(ids),
                                      lora=lora["roles"][role], lora_scale=lcfg.scale).logits)
        base = transformers.AutoModelForCausalLM.from_pretrained(str(chat_dir), dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft" / role)).eval()
        with torch.no_grad():
            np.testing.assert_allclose(pm(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)
    assert load_adapter(tmp_path / "adapter").config == lcfg


def train_cmd(model_dir, workdir, *extra):
    return [sys.executable, "-m", "diffmas_jax.train", "--config", str(REPO / "configs/embedded_train.py"),
            "--workdir", str(workdir), f"--config.model={model_dir}", "--config.limit=24", "--config.batch_size=2",
            "--config.steps=8", "--config.checkpoint_every=1", "--config.latent_steps=2", "--config.roles=planner,solver",
            "--config.eval_every=4", "--config.max_target_tokens=24", *extra]


def test_kill_and_resume_matches_uninterrupted(chat_dir, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # With LoRA dropout on, resuming must also replay the dropout masks; the merged export is checked too.
    # grad_accum=2: the kill lands mid-window (after micro-batch 3), so the accumulated gradient and
    # the token weights of the window must come back too.
    extra = ("--config.lora_dropout=0.1", "--config.export_merged=True", "--config.grad_accum=2")
    # The uninterrupted reference runs beside the run that is killed (compiling is mostly one thread).
    with open(tmp_path / "ref.err", "w") as ref_err:  # a file, not a pipe nobody reads until the end
        ref = subprocess.Popen(train_cmd(chat_dir, tmp_path / "ref", *extra), stdout=subprocess.DEVNULL,
                               stderr=ref_err, env=env)
    try:
        proc = subprocess.Popen(train_cmd(chat_dir, tmp_path / "run", *extra), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        ck = tmp_path / "run" / "checkpoints"
        deadline = time.time() + 300
        while time.time() < deadline and not (ck.exists() and any(p.name.isdigit() and int(p.name) >= 3
                                                                  for p in ck.iterdir())):
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "run" / "adapter").exists()  # really interrupted
        assert ref.wait(timeout=600) == 0, (tmp_path / "ref.err").read_text()[-2000:]
    finally:  # a failure above must not leave the reference run behind
        if ref.poll() is None:
            ref.kill()
            ref.wait()
    assert [step for step, _ in tensorboard_scalars(tmp_path / "ref" / "tensorboard")["train/loss"]] == list(range(1, 9))
    again = subprocess.run(train_cmd(chat_dir, tmp_path / "run", *extra), capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step" in again.stdout
    a, b = load_adapter(tmp_path / "ref" / "adapter"), load_adapter(tmp_path / "run" / "adapter")
    assert {k: b.meta[k] for k in ("latent_steps", "realign", "communication", "visibility")} == {
        "latent_steps": "2", "realign": "ridge", "communication": "concat", "visibility": "full"}  # Stage I recorded
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6), a.tree, b.tree)
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 9)]  # no duplicate or lost step
    import transformers
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "merged"), dtype=torch.float32)
    lcfg = LoraConfig(rank=a.config.rank, alpha=a.config.alpha)
    ids = np.asarray([[5, 9, 200, 31, 7]])
    chat = load_model(str(chat_dir))
    ours = jit_forward(chat.params, chat.cfg, KVTrace.create(chat.cfg, 1, 8), tokens=jnp.asarray(ids),
                       lora=b.tree, lora_scale=lcfg.scale).logits
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), np.asarray(ours), atol=1e-4)


@pytest.mark.parametrize("flag,message", [
    ("--config.lora_targets=q,qkv", "unknown LoRA target"),
    ("--config.lora_rank=0", "LoRA rank must be positive"),
    ("--config.trace_capacity=16", "KV trace overflow: training needs"),
    ("--config.trace_grad=sideways", "unknown trace_grad 'sideways'"),
])
def test_bad_training_inputs_fail_cleanly(chat_dir, tmp_path, flag, message):
    r = subprocess.run(train_cmd(chat_dir, tmp_path / "w", flag), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in r.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_empty_train_set_and_existing_run_protected(chat_dir, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    r = subprocess.run(train_cmd(chat_dir, tmp_path / "w", "--config.task=jsonl",
                                 f"--config.task_path={data}"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no items" in r.stderr and not (tmp_path / "w").exists()


def test_nan_loss_stops_naming_step_and_checkpoint(chat_dir, tmp_path):
    r = subprocess.run(train_cmd(chat_dir, tmp_path / "w", "--config.lr=1e38", "--config.clip=1e38",
                                 "--config.warmup_steps=0"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-1000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss") and "at step 2" in last and "last good checkpoint: step 1" in last


def test_sigterm_saves_and_exits_cleanly(chat_dir, tmp_path):
    proc = subprocess.Popen(train_cmd(chat_dir, tmp_path / "w", "--config.steps=200", "--config.checkpoint_every=100"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    csv_path = tmp_path / "w" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (csv_path.exists() and len(csv_path.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "SIGTERM: saved checkpoint at step" in out
    steps = [int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 2 and max(steps) < 100


def test_eval_every_zero_means_no_held_out_loss_and_negative_is_an_error():
    import ml_collections
    from diffmas_jax.cli import UserError
    from diffmas_jax.train_loop import validate_loop_fields
    c = ml_collections.ConfigDict(dict(batch_size=2, steps=4, grad_accum=1, checkpoint_every=2, keep_checkpoints=1,
                                       max_target_tokens=8, eval_every=0, lr=1e-3, on_nan="stop"))
    validate_loop_fields(c)  # 0: never
    c.eval_every = -1
    with pytest.raises(UserError, match="eval_every must be >= 0"):
        validate_loop_fields(c)


def test_accumulated_micro_batches_update_as_one_batch(chat):
    """grad_accum: k micro-batches with different target-token counts give the update of one
    batch of all of them (the loss is a per-token mean over the window, not a mean of the
    micro-batches' means)."""
    import optax
    from diffmas_jax.train_loop import accumulation_weight
    sc, lcfg, batch, realign = setup_step(chat, "stop", n=4)
    mask = np.asarray(batch["target_mask"]).copy()
    mask[0, np.flatnonzero(mask[0])[6:]] = False                  # row 0: a short target (6 tokens)
    batch = dict(batch, target_mask=jnp.asarray(mask))
    counts = [int(c) for c in mask.sum(1)]
    halves = [np.arange(0, 2), np.arange(2, 4)]
    window = [sum(counts[i] for i in h) for h in halves]
    assert window[0] < window[1]                                   # unequal token counts
    lora = random_lora(chat.cfg, lcfg)

    def run(optimizer, parts, weights):
        step = make_train_step(chat.cfg, sc, optimizer)
        lo, opt = jax.tree.map(jnp.copy, lora), optimizer.init(lora)
        for idx, w in zip(parts, weights):
            sub = jax.tree.map(lambda x: x[idx], batch)
            lo, opt, _ = step(lo, opt, chat.params, realign, sub, None, jnp.float32(w))
        return lo

    big = run(optax.sgd(1.0), [np.arange(4)], [1.0])
    acc = run(optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2), halves,
              [accumulation_weight(window, j) for j in range(2)])
    plain = run(optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2), halves, [1.0, 1.0])
    delta = lambda lo: np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                                       for a, b in zip(jax.tree.leaves(lo), jax.tree.leaves(lora))])
    d_big, d_acc, d_plain = delta(big), delta(acc), delta(plain)
    rel = lambda d: np.linalg.norm(d - d_big) / np.linalg.norm(d_big)
    assert rel(d_acc) < 1e-4, rel(d_acc)
    assert rel(d_plain) > 1e-2, rel(d_plain)                          # a mean of means is another update


def test_a_target_cut_at_max_target_tokens_ends_without_eos(chat, capsys):
    """A target longer than max_target_tokens is cut there with no EOS after it: cut + EOS would
    teach the solver to stop where the cut fell, before a math target's final answer. Whole
    targets keep their EOS; the run prints how many were cut (DiffMAS and C2C alike)."""
    from diffmas_jax.agents import build_agents
    from diffmas_jax.c2c_training import encode_training
    from diffmas_jax.training import encode_target, warn_cut_targets
    tok = chat.tokenizer
    eos = tok.eos_token_id
    long = "Step one adds two. Step two adds three more. So the answer is \\boxed{5}."
    ids = tok(long, add_special_tokens=False)["input_ids"]
    assert encode_target(tok, long, len(ids) + 1) == (ids + [eos], False)
    assert encode_target(tok, long, len(ids)) == (ids, True)
    assert encode_target(tok, long, 6) == (ids[:6], True)
    task = get_task("arith", size=64)
    short, other = task.load("train", limit=2)
    items = [dataclasses.replace(short, target="7"), dataclasses.replace(other, target=long)]
    mc = MethodConfig(method="latent_mas", roles=("planner", "solver"), latent_steps=(1,))
    data, _ = encode_items(tok, items, task.answer_instruction, mc, "diffmas", 6)
    last = [int(data.tokens[i][np.flatnonzero(data.target_mask[i])[-1]]) for i in range(2)]
    assert data.n_cut == 1 and list(data.n_target) == [len(tok("7", add_special_tokens=False)["input_ids"]) + 1, 6]
    assert last[0] == eos and last[1] == ids[5] != eos
    c2c_data = encode_training(tok, items, task.answer_instruction, build_agents(roles=("solver",)), 6)
    assert c2c_data.n_cut == 1 and int(c2c_data.tail[1][c2c_data.tail_target[1]][-1]) == ids[5]
    warn_cut_targets(data, None, 6)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: 1 of 2 training targets do not fit in max_target_tokens=6 with their EOS; they are "
                   "cut there and end without EOS (raise max_target_tokens to train on whole answers)"]
    with pytest.raises(ValueError, match="max_target_tokens must be at least 1, got 0"):
        encode_target(tok, long, 0)
    whole, _ = encode_items(tok, items, task.answer_instruction, mc, "diffmas", 64)
    warn_cut_targets(whole, whole, 64)
    assert whole.n_cut == 0 and capsys.readouterr().err == ""


def test_the_trained_forward_is_the_evaluated_forward(chat, monkeypatch):
    """What training teacher-forces is what evaluation decodes: with a random adapter, the
    training loss on the tokens `run_batch(method="diffmas")` generated greedily equals minus the
    mean of the log-probabilities it generated them with. Prompts, segments, visibility, RoPE
    positions, realignment, LoRA scale and per-role adapters must all agree for this to hold."""
    from diffmas_jax import training
    roles, steps = ("planner", "critic", "solver"), (2, 3)
    lcfg = LoraConfig(rank=4, alpha=8.0)
    lora = random_lora(chat.cfg, lcfg, seed=3)
    task = get_task("arith", size=64)
    items = [dataclasses.replace(it, target=f"item {i}") for i, it in enumerate(task.load("train", limit=2))]
    mc = MethodConfig(method="diffmas", roles=roles, latent_steps=steps, max_new_tokens=6)
    res = run_batch(chat, [it.question for it in items], task.answer_instruction, mc, lora=lora,
                    lora_scale=lcfg.scale)
    generated = {it.target: rec for it, rec in zip(items, res.records)}
    # the target each item trains on: the ids evaluation generated (no tokenizer round trip)
    monkeypatch.setattr(training, "encode_target", lambda tok, text, n: (list(generated[text]["generated_ids"]), False))
    data, agents = encode_items(chat.tokenizer, items, task.answer_instruction,
                                MethodConfig(method="latent_mas", roles=roles, latent_steps=steps), "diffmas", 64)
    latent = tuple(a.latent_steps for a in agents[:-1])
    sc = StepConfig(method="diffmas", trace_grad="stop", roles=roles, latent_steps=latent,
                    up_lengths=tuple(t.shape[1] for t in data.up_tokens), solver_length=data.tokens.shape[1],
                    capacity=step_capacity(data, latent, None), lora_scale=lcfg.scale)
    realign = make_realign(chat.params, chat.cfg, mc.realign, mc.realign_lambda)
    for i, it in enumerate(items):
        batch = jax.tree.map(jnp.asarray, batch_of(data, np.array([i])))
        loss, _, _ = jit_loss_and_grads(chat, realign, batch, sc)(lora)
        logprobs = generated[it.target]["generated_logprobs"]
        assert int(data.n_target[i]) == len(logprobs) > 0
        np.testing.assert_allclose(float(loss), -np.mean(logprobs), rtol=1e-4, atol=1e-4)

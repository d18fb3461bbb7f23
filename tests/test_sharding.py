"""Sharding on 8 simulated CPU devices (each check runs in a fresh process, since
XLA_FLAGS must be set before jax is imported)."""
import os
import subprocess
import sys
import textwrap


from jax.sharding import PartitionSpec as P

from conftest import xla_env


def device_script(devices: int, model: str, rows: int, length: int, body: str) -> str:
    """A subprocess script (``.format(tests=, tmp=)``) on ``devices`` simulated devices: a tiny
    random model (``model``: the family and its save_tiny_model keywords), ``ids`` [rows, length],
    the unsharded logits ``want`` and an ``out`` dict, then ``body``."""
    return textwrap.dedent(f'''
    import os, sys, json
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == {devices}, jax.devices()
    sys.path.insert(0, {{tests!r}})
    from conftest import save_tiny_model
    from diffmas_jax.model.loading import load_model
    from diffmas_jax.model.transformer import jit_forward
    from diffmas_jax.sharding import (MeshError, bytes_per_device, make_mesh, param_placer, shard_trace)
    from diffmas_jax.trace import KVTrace
    path = save_tiny_model(__import__("pathlib").Path({{tmp!r}}) / "m", {model})
    ref = load_model(str(path), with_tokenizer=False)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 256, size=({rows}, {length})))
    want = np.asarray(jit_forward(ref.params, ref.cfg, KVTrace.create(ref.cfg, {rows}, {length + 8}), tokens=ids).logits)
    out = {{{{}}}}
    ''') + textwrap.dedent(body)


SCRIPT = device_script(8, '"qwen3", num_attention_heads=8, num_key_value_heads=4, hidden_size=64, intermediate_size=128',
                       8, 24, '''
    for shape in [(1, 8, 1), (2, 2, 2), (1, 2, 4)]:
        mesh = make_mesh(shape)
        m = load_model(str(path), with_tokenizer=False, place=param_placer(ref.cfg, mesh))
        tr = shard_trace(KVTrace.create(m.cfg, 8, 32), mesh)
        got = np.asarray(jit_forward(m.params, m.cfg, tr, tokens=ids).logits)
        out[str(shape)] = dict(diff=float(np.abs(got - want).max()), bytes=bytes_per_device(m.params))
    out["single_bytes"] = bytes_per_device(ref.params)

    # A sharded DiffMAS train step (trace_grad=full) equals the single-device one.
    from diffmas_jax.lora import LoraConfig, init_lora
    from diffmas_jax.stages import make_realign
    from diffmas_jax.training import StepConfig, loss_and_grads
    rng = np.random.default_rng(1)
    batch = dict(up_tokens=[jnp.asarray(rng.integers(3, 256, (8, 16)))], up_valid=[jnp.ones((8, 16), bool)],
                 tokens=jnp.asarray(rng.integers(3, 256, (8, 24))), valid=jnp.ones((8, 24), bool),
                 target_mask=jnp.asarray(np.arange(24)[None].repeat(8, 0) >= 16))
    sc = StepConfig(method="diffmas", trace_grad="full", roles=("planner", "solver"), latent_steps=(2,),
                    up_lengths=(16,), solver_length=24, capacity=42, lora_scale=2.0)
    lora = jax.tree.map(lambda x: x + 0.01, init_lora(ref.cfg, LoraConfig(rank=4), jax.random.PRNGKey(0)))
    f = jax.jit(lambda p, lo, b: loss_and_grads(lo, p, ref.cfg, make_realign(p, ref.cfg), b, sc))
    l0, g0, n0 = f(ref.params, lora, batch)
    mesh = make_mesh((2, 4, 1))
    sp = load_model(str(path), with_tokenizer=False, place=param_placer(ref.cfg, mesh)).params
    from jax.sharding import NamedSharding, PartitionSpec as P
    sb = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))), batch)
    l1, g1, n1 = f(sp, lora, sb)
    out["train_loss_diff"] = abs(float(l0) - float(l1))
    out["train_grad_diff"] = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    # The jitted train step with the mesh's output shardings: one executable for every step.
    from diffmas_jax.sharding import replicate
    from diffmas_jax.training import make_optimizer, make_train_step
    opt = make_optimizer(1e-3, 10, 0, 0.0, 1.0, 1)
    step = make_train_step(ref.cfg, sc, opt, mesh)
    lo, st = replicate(lora, mesh), replicate(opt.init(lora), mesh)
    realign = make_realign(sp, ref.cfg)
    losses = []
    for _ in range(3):
        lo, st, met = step(lo, st, sp, realign, sb)
        losses.append(float(met["loss"]))
    out["step_executables"] = [f._cache_size() for f in step.compiled.values()]
    # explicit input shardings: what the compiled step takes, argument by argument
    from diffmas_jax.sharding import spec_for
    ins = step.lower(lo, st, sp, realign, sb).compile().input_shardings[0]
    q_axes = ("layers", "embed", "q_heads")
    out["step_in"] = dict(q=str(ins[2]["layers"]["q"]["kernel"].spec),
                          q_want=str(spec_for(q_axes, sp["layers"]["q"]["kernel"].shape, mesh)),
                          tokens=str(ins[4]["tokens"].spec),
                          lora=sorted(set(str(s.spec) for s in jax.tree.leaves(ins[0]))))
    out["step_first_loss_diff"] = abs(losses[0] - float(l0))
    out["step_losses_fall"] = losses[2] < losses[0]
    # Stages, prefill and decode under an active mesh: each returns its trace with the
    # mesh's explicit sharding (batch over data x fsdp, kv heads over tensor), same results.
    from diffmas_jax.generation import jit_decode_steps, jit_prefill, start_decode
    from diffmas_jax.sharding import active_mesh
    from diffmas_jax.stages import jit_agent_stage
    def chain(p):
        tr = jit_agent_stage(p, ref.cfg, KVTrace.create(ref.cfg, 8, 64), batch["up_tokens"][0],
                             batch["up_valid"][0], make_realign(p, ref.cfg), steps=2, segment=0)
        tr, logits, _ = jit_prefill(p, ref.cfg, tr, batch["tokens"], batch["valid"], segment=1)
        st = jit_decode_steps(p, ref.cfg, start_decode(tr, logits, 6, jax.random.PRNGKey(0)), num_steps=6,
                              eos_ids=())
        return tr, st
    tr0, st0 = chain(ref.params)
    mesh = make_mesh((2, 2, 2))
    sp2 = load_model(str(path), with_tokenizer=False, place=param_placer(ref.cfg, mesh)).params
    norm = lambda spec: [list(a) if isinstance(a, tuple) else a for a in spec] + [None] * (5 - len(spec))
    with active_mesh(mesh):
        tr1, st1 = chain(sp2)
        # params that are not placed yet (one device) are put into their layout per call
        tr2, st2 = chain(ref.params)
        ins = jit_agent_stage.lower(ref.params, ref.cfg, KVTrace.create(ref.cfg, 8, 64), batch["up_tokens"][0],
                                    batch["up_valid"][0], make_realign(sp2, ref.cfg), steps=2,
                                    segment=0).compile().input_shardings[0]
    out["stage_in"] = dict(q=str(ins[0]["layers"]["q"]["kernel"].spec),
                           q_want=str(spec_for(q_axes, sp2["layers"]["q"]["kernel"].shape, mesh)),
                           k=norm(ins[1].k.spec), tokens=str(ins[2].spec))
    out["unplaced_tokens_equal"] = bool((st0.tokens == st2.tokens).all())
    out["stage_executables"] = len(jit_agent_stage.compiled)
    out["stage_trace_spec"] = norm(tr1.k.sharding.spec)
    out["decode_trace_spec"] = norm(st1.trace.k.sharding.spec)
    out["stage_k_diff"] = float(jnp.abs(tr0.k - tr1.k).max())
    out["decode_tokens_equal"] = bool((st0.tokens == st1.tokens).all())
    for bad in [(3, -1, 1), (1, -1, -1), (16, 1, 1)]:
        try:
            make_mesh(bad)
            out[str(bad)] = "no error"
        except MeshError as e:
            out[str(bad)] = str(e)
    print("RESULT" + json.dumps(out))
''')


def test_sharded_forward_equals_unsharded_and_params_shrink(tmp_path):
    env = xla_env("--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    code = SCRIPT.format(tests=os.path.dirname(__file__), tmp=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    for shape in ["(1, 8, 1)", "(2, 2, 2)", "(1, 2, 4)"]:
        assert out[shape]["diff"] < 1e-4, (shape, out[shape])
    # fsdp over 8 devices holds a fraction of the params per device
    assert out["(1, 8, 1)"]["bytes"] < 0.3 * out["single_bytes"]
    assert out["(1, 2, 4)"]["bytes"] < out["(2, 2, 2)"]["bytes"] < out["single_bytes"]
    assert out["train_loss_diff"] < 1e-5 and out["train_grad_diff"] < 1e-5, out
    for key in ("stage_trace_spec", "decode_trace_spec"):
        assert out[key] == [None, ["data", "fsdp"], None, "tensor", None], out[key]
    assert out["stage_k_diff"] < 1e-5 and out["decode_tokens_equal"], out
    # explicit output shardings: steps 2 and 3 reuse step 1's executable, and it trains
    assert out["step_executables"] == [1], out
    # explicit input shardings (mesh_jit): params by logical axes, batch over data x fsdp,
    # LoRA replicated, the trace by its own axes; unplaced params are placed, same tokens
    for key in ("step_in", "stage_in"):
        assert out[key]["q"] == out[key]["q_want"] and "fsdp" in out[key]["q"], out[key]
    assert out["step_in"]["tokens"] == out["stage_in"]["tokens"] == "P(('data', 'fsdp'),)", out
    assert out["step_in"]["lora"] == ["P()"], out
    assert out["stage_in"]["k"] == [None, ["data", "fsdp"], None, "tensor", None], out
    assert out["unplaced_tokens_equal"] and out["stage_executables"] == 1, out
    assert out["step_first_loss_diff"] < 1e-5 and out["step_losses_fall"], out
    assert "does not divide the 8 available devices" in out["(3, -1, 1)"]
    assert "at most one mesh entry may be -1" in out["(1, -1, -1)"]
    assert "does not divide" in out["(16, 1, 1)"] or "uses 16 devices" in out["(16, 1, 1)"]


# 9 heads / 3 KV heads of width 8: q (72) and k/v (24) columns divide by 4, the heads do not
HEADS_SCRIPT = device_script(4, '"qwen2", num_attention_heads=9, num_key_value_heads=3, hidden_size=72, intermediate_size=128',
                             4, 12, '''
    for shape in [(1, 1, 4), (1, 2, 2)]:
        mesh = make_mesh(shape)
        m = load_model(str(path), with_tokenizer=False, place=param_placer(ref.cfg, mesh))
        tr = shard_trace(KVTrace.create(m.cfg, 4, 16), mesh)
        res = jit_forward(m.params, m.cfg, tr, tokens=ids)
        lay = m.params["layers"]
        out[str(shape)] = dict(diff=float(np.abs(np.asarray(res.logits) - want).max()),
                               specs={{f"{{n}}.{{w}}": str(lay[n][w].sharding.spec) for n in ("q", "k", "v", "o")
                                      for w in ("kernel", "bias") if w in lay[n]}},
                               gate=str(lay["gate"]["kernel"].sharding.spec), trace=str(tr.k.sharding.spec))
    print("RESULT" + json.dumps(out))
''')


def test_tensor_axis_splits_attention_only_in_whole_heads(tmp_path):
    """q/k/v/o are split over the tensor axis only when it divides the head count (not just
    heads x head_dim): a forward on such a mesh equals the unsharded one, no head is cut."""
    env = xla_env("--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    code = HEADS_SCRIPT.format(tests=os.path.dirname(__file__), tmp=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    for shape, o in out.items():
        assert o["diff"] < 1e-4, (shape, o)
        assert not any("tensor" in s for s in o["specs"].values()), (shape, o["specs"])
        assert "tensor" in o["gate"] and "tensor" not in o["trace"], (shape, o)  # the MLP still splits
    assert out["(1, 2, 2)"]["specs"]["q.kernel"] == "P(None, 'fsdp', None)", out


def test_head_units_keep_divisible_heads_sharded():
    import types
    from diffmas_jax.memory import model_config_for, param_bytes
    from diffmas_jax.sharding import head_units, spec_for
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 4})
    cfg = types.SimpleNamespace(num_heads=8, num_kv_heads=2)  # q heads divide by 4, kv heads do not
    units = head_units(cfg)
    assert spec_for(("layers", "embed", "q_heads"), (2, 64, 64), mesh, units=units) == P(None, None, "tensor")
    assert spec_for(("layers", "embed", "kv_heads"), (2, 64, 16), mesh, units=units) == P(None, None, None)
    assert spec_for(("layers", "q_heads", "embed"), (2, 64, 64), mesh, units=units) == P(None, "tensor", None)
    # the memory estimate follows: the embedded model (9 / 3 heads) keeps attention whole on tensor=4
    emb = model_config_for("embedded")
    attn = emb.num_layers * 2 * (emb.hidden_size * emb.q_size + emb.hidden_size * emb.kv_size) * 4
    assert param_bytes(emb, (1, 1, 4)) - param_bytes(emb, (1, 1, 1)) // 4 >= attn * 3 // 4

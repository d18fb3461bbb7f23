"""A sharded C2C train step on 8 simulated CPU devices equals the one-device step (in a
fresh process: XLA_FLAGS must be set before jax is imported)."""
import json
import os
import subprocess
import sys
import textwrap

from conftest import xla_env

SCRIPT = textwrap.dedent('''
    import json, sys, time
    t0 = time.time()
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np, optax
    assert jax.device_count() == 8, jax.devices()
    sys.path.insert(0, {tests!r})
    from conftest import TINY
    from safetensors.numpy import save_file
    from diffmas_jax import distributed
    from diffmas_jax.c2c import FuserConfig, init_fuser
    from diffmas_jax.c2c_training import C2CStepConfig, make_c2c_train_step
    from diffmas_jax.model.config import ModelConfig
    from diffmas_jax.model.loading import load_model
    from diffmas_jax.model.transformer import _is_leaf, param_shapes
    from diffmas_jax.model.weights import params_to_hf
    from diffmas_jax.sharding import active_mesh, bytes_per_device, make_mesh, param_placer, replicate, spec_for

    def save_random_model(path, family, seed, **overrides):
        """A model directory with random weights, written with numpy (no torch: seconds saved)."""
        hf = dict(TINY, model_type=family, **overrides)
        cfg = ModelConfig.from_hf_dict(hf)
        rng = np.random.default_rng(seed)
        params = jax.tree.map(lambda s: (s[1][-1] == "norm") + rng.normal(0, 0.1, s[0]).astype(np.float32),
                              param_shapes(cfg), is_leaf=_is_leaf)
        path.mkdir(parents=True)
        save_file({{k: np.asarray(v, np.float32) for k, v in params_to_hf(cfg, params).items()}},
                  str(path / "model.safetensors"), metadata={{"format": "pt"}})
        (path / "config.json").write_text(json.dumps(hf))
        return path

    # Two families and shapes, so each model's weights must be laid out by its own config.
    tmp = Path({tmp!r})
    paths = dict(r=save_random_model(tmp / "recv", "llama", 1),
                 s=save_random_model(tmp / "sharer", "qwen3", 2, num_hidden_layers=3, num_key_value_heads=4,
                                     head_dim=32))
    one = {{k: load_model(str(p), with_tokenizer=False) for k, p in paths.items()}}
    rc, scfg = one["r"].cfg, one["s"].cfg
    fc = FuserConfig.for_models(scfg, rc, hidden=16, dropout=0.1)   # dropout: the step's noise must match too
    sc = C2CStepConfig(fc=fc, anneal_steps=4, compute_dtype="float32", seed=3)
    B, H, T = 8, 12, 6
    rng = np.random.default_rng(0)
    valid = np.arange(H)[None] < rng.integers(6, H + 1, B)[:, None]
    tail_valid = np.arange(T)[None] < rng.integers(3, T + 1, B)[:, None]
    target = tail_valid.copy()
    target[:, 0] = False
    batch = dict(heads=[np.where(valid, rng.integers(3, 256, (B, H)), 0).astype(np.int32)], valids=[valid], lasts=[],
                 s_head=None, tail=rng.integers(3, 256, (B, T)).astype(np.int32), tail_valid=tail_valid,
                 tail_target=target)
    fuser = init_fuser(fc, 0)
    opt = optax.sgd(1.0)   # the update is minus the gradient: the fusers compare the gradients themselves
    f0 = jax.device_get(fuser)

    step = make_c2c_train_step(rc, scfg, sc, opt)
    f1, _, m1 = step(fuser, opt.init(fuser), one["r"].params, one["s"].params, jax.tree.map(jnp.asarray, batch),
                     jnp.int32(1))
    g1 = jax.tree.map(lambda a, b: a - np.asarray(b), f0, f1)

    mesh = make_mesh({shape})
    with active_mesh(mesh):   # as the CLI sets it: traces inside are pinned to the mesh
        placed = {{k: load_model(str(p), with_tokenizer=False, place=param_placer(one[k].cfg, mesh))
                  for k, p in paths.items()}}
        sharded = make_c2c_train_step(rc, scfg, sc, opt, mesh)
        fuser_m = replicate(jax.tree.map(jnp.asarray, f0), mesh)
        opt_m = replicate(opt.init(fuser_m), mesh)
        gbatch = distributed.global_batch(batch, mesh)
        f2, o2, m2 = sharded(fuser_m, opt_m, placed["r"].params, placed["s"].params, gbatch, jnp.int32(1))
        g2 = jax.tree.map(lambda a, b: a - np.asarray(b), f0, f2)
        # A chain of two agents (sharer = receiver): one program, the receiver's params only.
        fcc = FuserConfig.for_models(rc, rc, hidden=16, dropout=0.0)
        scc = C2CStepConfig(fc=fcc, anneal_steps=4, compute_dtype="float32", seed=3)
        chain_batch = dict(batch, heads=[batch["heads"][0], batch["heads"][0][:, ::-1].copy()],
                           valids=[valid, valid[:, ::-1].copy()], lasts=[batch["tail"][:, 1].copy()])
        fc0 = init_fuser(fcc, 1)
        c0 = jax.device_get(fc0)
        chain_ref = make_c2c_train_step(rc, rc, scc, opt)(fc0, opt.init(fc0), one["r"].params, one["r"].params,
                                                          jax.tree.map(jnp.asarray, chain_batch), jnp.int32(1))
        chain_m = make_c2c_train_step(rc, rc, scc, opt, mesh)
        chain_out = chain_m(replicate(jax.tree.map(jnp.asarray, c0), mesh), opt_m, placed["r"].params,
                            placed["r"].params, distributed.global_batch(chain_batch, mesh), jnp.int32(1))
    # What the compiled programs take, argument by argument (one executable each).
    def layouts(program):
        (key,) = program.compiled
        names, leaves, treedef = key[2:5]  # (mesh, static, names, layouts, treedef, compiler options)
        return dict(zip(names, jax.tree.unflatten(treedef, leaves)))
    ins, rins = layouts(sharded.programs["plain"]), layouts(sharded.programs["sharer_reading"])
    q_axes = ("layers", "embed", "q_heads")
    leaves = lambda t: jax.tree.leaves(t)
    out = dict(
        loss_diff=abs(float(m1["loss"]) - float(m2["loss"])), loss=float(m1["loss"]),
        grad_norm_diff=abs(float(m1["grad_norm"]) - float(m2["grad_norm"])), grad_norm=float(m1["grad_norm"]),
        grad_diff=max(float(np.abs(a - b).max()) for a, b in zip(leaves(g1), leaves(g2))),
        fuser_diff=max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(leaves(f1), leaves(f2))),
        grads_nonzero=sum(bool(np.any(g != 0)) for g in leaves(g1)), n_leaves=len(leaves(g1)),
        out_replicated=all(x.sharding.is_fully_replicated for x in leaves((f2, o2, m2))),
        bytes=dict((k, [bytes_per_device(placed[k].params), bytes_per_device(one[k].params)]) for k in placed),
        recv_q=[str(ins["params"]["layers"]["q"]["kernel"].spec),
                str(spec_for(q_axes, placed["r"].params["layers"]["q"]["kernel"].shape, mesh))],
        sharer_q=[str(rins["params"]["layers"]["q"]["kernel"].spec),
                  str(spec_for(q_axes, placed["s"].params["layers"]["q"]["kernel"].shape, mesh))],
        sharer_k=str(ins["trace"].k.spec), tail=str(ins["batch"]["tail"].spec),
        fuser=sorted(set(str(s.spec) for s in leaves(ins["fuser"]))),
        chain_loss_diff=abs(float(chain_ref[2]["loss"]) - float(chain_out[2]["loss"])),
        chain_fuser_diff=max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                             for a, b in zip(leaves(chain_ref[0]), leaves(chain_out[0]))),
        chain_moved=max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(leaves(chain_out[0]), leaves(c0))),
        chain_recv_q=str(layouts(chain_m.programs["chain"])["params"]["layers"]["q"]["kernel"].spec), seconds=round(time.time() - t0, 1),
    )
    print("RESULT" + json.dumps(out))
''')


def test_sharded_c2c_step_equals_one_device(tmp_path):
    """Plain C2C, a llama receiver and a qwen3 sharer of other shapes, on a (2, 2, 2) mesh:
    both models loaded into their shards by their own configs, the batch over data x fsdp,
    the fuser replicated; same loss, gradients and updated fuser as on one device. Then a
    chain of two agents (sharer = receiver): the same updated fuser."""
    env = xla_env("--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    code = SCRIPT.format(tests=os.path.dirname(__file__), tmp=str(tmp_path), shape=(2, 2, 2))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    assert out["loss"] > 0 and out["grad_norm"] > 0
    assert out["grads_nonzero"] == out["n_leaves"], out          # every fuser leaf gets a gradient
    assert out["loss_diff"] < 1e-5 and out["grad_norm_diff"] < 1e-5, out
    assert out["grad_diff"] < 1e-5 and out["fuser_diff"] < 1e-5, out
    # Compiled with explicit shardings: each model's weights in their own layout, not gathered.
    assert out["recv_q"][0] == out["recv_q"][1] and out["recv_q"][0] != "P()", out
    assert out["sharer_q"][0] == out["sharer_q"][1] and out["sharer_q"][0] != "P()", out
    assert all(sharded < 0.6 * full for sharded, full in out["bytes"].values()), out
    # the sharer's reading: batch over data x fsdp, kv heads over tensor; the batch over data x fsdp
    assert out["sharer_k"] == "P(None, ('data', 'fsdp'), None, 'tensor', None)", out
    assert out["tail"] == "P(('data', 'fsdp'),)", out
    assert out["fuser"] == ["P()"] and out["out_replicated"], out
    # the chain of two agents: the same on the mesh, receiver weights in their layout
    assert out["chain_moved"] > 1e-4 and out["chain_recv_q"] == out["recv_q"][1], out
    assert out["chain_loss_diff"] < 1e-5 and out["chain_fuser_diff"] < 1e-5, out

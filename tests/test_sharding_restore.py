"""Orbax checkpoints restore onto a different mesh (8 simulated CPU devices in a fresh
process: XLA_FLAGS must be set before jax is imported)."""
import json
import subprocess
import sys
import textwrap

from conftest import xla_env

SCRIPT = textwrap.dedent('''
    import json, shutil, sys
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert jax.device_count() == 8, jax.devices()
    from diffmas_jax.checkpoint import Checkpointer, abstract_like
    from diffmas_jax.lora import LoraConfig, init_lora
    from diffmas_jax.model.config import ModelConfig
    from diffmas_jax.sharding import make_mesh
    from diffmas_jax.training import make_optimizer

    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    tmp = Path({tmp!r})

    def spec(x, mesh):
        """Shard the largest dimension the whole mesh divides; replicate the rest (and scalars)."""
        n = mesh.devices.size
        dims = [i for i in np.argsort(x.shape)[::-1] if x.shape[i] % n == 0 and n > 1]
        if not dims:
            return P()
        s = [None] * x.ndim
        s[dims[0]] = ("data", "fsdp")
        return P(*s)

    def place(tree, mesh):
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x, mesh))), tree)

    def fresh_state(key):
        lora = init_lora(cfg, LoraConfig(rank=4), jax.random.PRNGKey(key))
        return {{"lora": lora, "opt_state": opt.init(lora)}}

    # LoRA + AdamW state (with gradient accumulation) after two real updates: nothing is zero.
    opt = make_optimizer(1e-2, 100, 1, 0.0, 1.0, 2)
    state = fresh_state(0)
    lora, os_ = state["lora"], state["opt_state"]
    for i in range(2):
        g = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(i), x.shape, x.dtype), lora)
        upd, os_ = opt.update(g, os_, lora)
        lora = jax.tree.map(jnp.add, lora, upd)
    save_mesh = make_mesh((4, 2, 1))
    saved = place({{"lora": lora, "opt_state": os_}}, save_mesh)
    out = {{"saved_spread": len({{s.device for x in jax.tree.leaves(saved) for s in x.addressable_shards}}),
           "saved_sharded_leaves": sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(saved))}}
    ck = Checkpointer(tmp / "save", keep=2)
    ck.save(7, saved, {{"step": 7}})
    ck.close()
    want = jax.tree.map(np.asarray, jax.device_get(saved))

    for name, shape, devices in [("8x1", (8, 1, 1), None), ("1x1", (1, 1, 1), jax.devices()[:1])]:
        mesh = make_mesh(shape, devices=devices)
        d = tmp / name
        shutil.copytree(tmp / "save", d)
        target = place(fresh_state(1), mesh)  # what a resumed run builds on its own mesh
        ck = Checkpointer(d, keep=2)
        got = ck.restore_latest(abstract_like(target))
        ck.close()
        assert got is not None, name
        step, st, meta = got
        leaves_w, leaves_g, leaves_t = jax.tree.leaves(want), jax.tree.leaves(st), jax.tree.leaves(target)
        assert jax.tree.structure(st) == jax.tree.structure(target)
        out[name] = {{
            "step": step, "meta_step": meta.get("step"),
            "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) and np.asarray(a).dtype == np.asarray(b).dtype
                         for a, b in zip(leaves_w, leaves_g)),
            "same_sharding": all(g.sharding == t.sharding for g, t in zip(leaves_g, leaves_t)),
            "devices": sorted({{s.device.id for x in leaves_g for s in x.addressable_shards}}),
            "sharded_leaves": sum(not x.sharding.is_fully_replicated for x in leaves_g),
            "n_leaves": len(leaves_g)}}
    print("RESULT" + json.dumps(out))
''')


def test_checkpoint_saved_on_4x2_restores_on_8x1_and_1x1(tmp_path):
    env = xla_env("--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    code = SCRIPT.format(tmp=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    assert out["saved_spread"] == 8 and out["saved_sharded_leaves"] > 10, out
    for name in ("8x1", "1x1"):
        o = out[name]
        assert o["step"] == 7 and o["meta_step"] == 7, o
        assert o["equal"], (name, o)                 # identical values, dtypes included
        assert o["same_sharding"], (name, o)         # placed as the new mesh asks
    assert out["8x1"]["devices"] == list(range(8)) and out["8x1"]["sharded_leaves"] == out["saved_sharded_leaves"]
    assert out["1x1"]["devices"] == [0] and out["1x1"]["sharded_leaves"] == 0

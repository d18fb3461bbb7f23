"""Mesh presets and the per-device memory estimate (pure Python: no device is used)."""
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffmas_jax import memory, mesh_presets
from diffmas_jax.cli import UserError
from diffmas_jax.mesh_presets import GiB, PAPER_MODELS, PRESETS, paper_model_config, resolve_mesh_config

REPO = Path(__file__).resolve().parents[1]


def test_presets_fill_their_slices_and_shard_every_paper_models_kv_heads():
    assert {"v4-8", "v5e-8", "v5e-16", "v5p-8", "gpu-8"} <= set(PRESETS)
    for p in PRESETS.values():
        assert math.prod(p.mesh) == p.num_devices, p
        assert p.num_devices % p.num_hosts == 0
        for name in PAPER_MODELS:
            cfg = paper_model_config(name)
            assert cfg.num_kv_heads % p.mesh[2] == 0 and cfg.num_heads % p.mesh[2] == 0, (p.name, name)
    # the chips and memory of each slice
    assert (PRESETS["v4-8"].num_devices, PRESETS["v4-8"].memory_gib) == (4, 32.0)
    assert (PRESETS["v5e-8"].num_devices, PRESETS["v5e-8"].memory_gib, PRESETS["v5e-8"].accelerator_type) == \
        (8, 16.0, "v5litepod-8")
    assert (PRESETS["v5e-16"].num_devices, PRESETS["v5e-16"].num_hosts) == (16, 4)
    assert (PRESETS["v5p-8"].num_devices, PRESETS["v5p-8"].memory_gib) == (4, 95.0)
    assert PRESETS["gpu-8"].num_devices == 8


def test_paper_model_shapes_match_their_published_sizes():
    published = {"Qwen/Qwen3-4B": 4.02e9, "Qwen/Qwen3-8B": 8.19e9, "Qwen/Qwen3-14B": 14.77e9,
                 "mistralai/Ministral-8B-Instruct-2410": 8.0198e9,
                 "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": 32.76e9}
    for name, n in published.items():
        assert abs(paper_model_config(name).num_params() / n - 1) < 0.005, name
    # an evaluation and a training config for every paper model
    import importlib.util
    seen = {"eval": set(), "train": set()}
    for f in (REPO / "configs").glob("*.py"):
        spec = importlib.util.spec_from_file_location(f.stem, f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        c = mod.get_config()
        if c.get("model") in PAPER_MODELS:
            seen["train" if f.stem.endswith("_train") else "eval"].add(c.model)
            assert "mesh_preset" in c and "mesh" in c and "device_memory_gib" in c, f
    assert set(PAPER_MODELS) <= seen["eval"] and set(PAPER_MODELS) <= seen["train"], seen


def test_resolve_mesh_config():
    assert resolve_mesh_config({}).shape == (1, 1, 1)
    assert resolve_mesh_config({"mesh_preset": "v5e-8"}, num_devices=8).shape == (1, 2, 4)
    assert resolve_mesh_config({"mesh_preset": "v5e-8", "mesh": "1,-1,1"}, num_devices=8).shape == (1, 8, 1)
    assert resolve_mesh_config({"mesh": "2,-1,2"}, num_devices=8).shape == (2, 2, 2)
    with pytest.raises(UserError, match="is for 8 devices but 1 are available"):
        resolve_mesh_config({"mesh_preset": "v5e-8"}, num_devices=1)
    with pytest.raises(UserError, match="unknown mesh_preset 'v9-8'; known: v4-8"):
        resolve_mesh_config({"mesh_preset": "v9-8"}, num_devices=8)
    with pytest.raises(UserError, match="does not divide the 8 available devices"):
        resolve_mesh_config({"mesh": "3,-1,1"}, num_devices=8)
    for bad in ("1,2", "a,b,c", "1,-1,-1", "0,1,1"):
        with pytest.raises(UserError, match="mesh must be three integers"):
            resolve_mesh_config({"mesh": bad}, num_devices=8)


def test_params_shrink_with_the_mesh_and_remat_shrinks_activations():
    cfg = paper_model_config("Qwen/Qwen3-8B")
    full = memory.param_bytes(cfg, (1, 1, 1), "bfloat16")
    assert abs(full - 2 * cfg.num_params()) < 1e6
    assert memory.param_bytes(cfg, (1, 8, 1), "bfloat16") < full / 7.9
    assert memory.param_bytes(cfg, (1, 2, 4), "bfloat16") < full / 7.9
    kw = dict(batch=2, solver_length=1024, upstream_lengths=(512, 512, 512), latent_steps=(10, 10, 10),
              max_target=512, dtype="bfloat16", grad_accum=64)
    no_remat = memory.estimate_train(cfg, (1, 2, 4), **kw)
    remat = memory.estimate_train(cfg, (1, 2, 4), remat=True, **kw)
    assert remat.components["activations"] < no_remat.components["activations"] / 4
    # remat "dots" keeps every layer's projections but not its scores: between the two
    dots = memory.estimate_train(cfg, (1, 2, 4), remat="dots", **kw)
    assert remat.components["activations"] < dots.components["activations"] < no_remat.components["activations"]
    full_grad = memory.estimate_train(cfg, (1, 2, 4), remat=True, trace_grad="full", **kw)
    assert full_grad.total > remat.total
    # the trace grows with the decoding budget and shrinks with the tensor axis
    ev = lambda mesh, n: memory.estimate_eval(cfg, mesh, batch=4, prompt_tokens=512, num_agents=4,  # noqa: E731
                                              latent_steps=30, max_new_tokens=n, dtype="bfloat16")
    assert ev((1, 1, 1), 32768).components["trace"] > 10 * ev((1, 1, 1), 1024).components["trace"]
    assert ev((1, 1, 4), 32768).components["trace"] < ev((1, 1, 1), 32768).components["trace"] / 3.9
    # Qwen3-8B, 36 layers x 8 kv heads x 128 x 2 (k, v) x 2 bytes = 144 KiB per slot and row
    slots = 4 * 512 + 30 + 32768
    assert abs(ev((1, 1, 1), 32768).components["trace"] - 4 * slots * 36 * 8 * 128 * 2 * 2) < 4 * slots * 16


def test_32b_on_one_v5e_chip_is_refused_and_a_feasible_fit_passes():
    cfg32 = paper_model_config("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")
    one_chip = PRESETS["v5e-8"].memory_bytes
    est = memory.estimate_eval(cfg32, (1, 1, 1), batch=1, prompt_tokens=512, num_agents=4, latent_steps=30,
                               max_new_tokens=4096, dtype="bfloat16")
    with pytest.raises(UserError) as e:
        memory.check_fits(est, one_chip, "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model deepseek-ai/DeepSeek-R1-Distill-Qwen-32B needs ~")
    assert "GiB per device" in msg and "device has 16.0 GiB" in msg and "larger fsdp" in msg
    # ... also before any weights load (the config names no mesh: one device)
    with pytest.raises(UserError, match=r"needs ~6\d\.\d GiB per device .*device has 16\.0 GiB"):
        memory.preflight_model({"device_memory_gib": 16}, "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "bfloat16")
    # feasible: the paper's Qwen3-8B eval rows (batch 4, 32k new tokens) on v5e-8; 32B on v5e-16 at batch 2
    cfg8 = paper_model_config("Qwen/Qwen3-8B")
    ok = memory.estimate_eval(cfg8, PRESETS["v5e-8"].mesh, batch=4, prompt_tokens=512, num_agents=4,
                              latent_steps=30, max_new_tokens=32768, dtype="bfloat16")
    assert memory.check_fits(ok, one_chip, "Qwen/Qwen3-8B") is None
    ok32 = memory.estimate_eval(cfg32, PRESETS["v5e-16"].mesh, batch=2, prompt_tokens=512, num_agents=4,
                                latent_steps=30, max_new_tokens=32768, dtype="bfloat16")
    assert memory.check_fits(ok32, one_chip, "32B") is None
    tr = memory.estimate_train(cfg32, PRESETS["v5e-8"].mesh, batch=1, solver_length=1024,
                               upstream_lengths=(512,) * 3, latent_steps=(10,) * 3, max_target=512,
                               dtype="bfloat16", grad_accum=64, remat=True, trace_grad="full")
    assert memory.check_fits(tr, one_chip, "32B") is None
    # training without remat at a long target does not fit one 80 GiB GPU for 14B
    cfg14 = paper_model_config("Qwen/Qwen3-14B")
    heavy = memory.estimate_train(cfg14, (1, 1, 1), batch=4, solver_length=4096, upstream_lengths=(512,) * 3,
                                  latent_steps=(10,) * 3, max_target=3584, dtype="bfloat16")
    with pytest.raises(UserError, match="turn on --config.remat=True"):
        memory.check_fits(heavy, PRESETS["gpu-1"].memory_bytes, "Qwen/Qwen3-14B")


def test_tight_fit_warns_and_device_memory_sources():
    cfg = paper_model_config("Qwen/Qwen3-4B")
    est = memory.estimate_eval(cfg, (1, 1, 1), batch=1, prompt_tokens=256, num_agents=1, latent_steps=0,
                               max_new_tokens=256, dtype="bfloat16")
    assert "within 10%" in memory.check_fits(est, int(est.total / 0.95), "m")
    assert memory.check_fits(est, None, "m") is None  # unknown memory: no verdict
    assert memory.device_memory_bytes(24) == (24 * GiB, "config device_memory_gib")
    # no stats from the CPU backend: the preset's figure
    assert memory.device_memory_bytes(None, PRESETS["v5p-8"]) == (PRESETS["v5p-8"].memory_bytes, "preset v5p-8")
    with pytest.raises(UserError, match="device_memory_gib must be"):
        memory.device_memory_bytes("lots")
    for bad in (float("nan"), float("inf"), -2):  # NaN used to escape as a ValueError from int()
        with pytest.raises(UserError, match="positive finite number of GiB"):
            memory.device_memory_bytes(bad)
    table = est.table(16 * GiB, "Qwen/Qwen3-4B")
    for part in ("params", "lora", "optimizer", "trace", "activations", "total", "of 16.0 GiB"):
        assert part in table


@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_cli_refuses_a_model_that_cannot_fit_before_writing(tmp_path, module):
    cfg = REPO / "configs" / ("embedded_train.py" if module == "train" else "embedded_eval.py")
    work = tmp_path / "w"
    args = [sys.executable, "-m", f"diffmas_jax.{module}", "--config", str(cfg), "--workdir", str(work),
            "--config.device_memory_gib=0.3", "--config.limit=8"]
    if module == "evaluate":
        args += ["--config.task=arith", "--config.split=test", "--config.data_dir=" + str(tmp_path)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=str(REPO),
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model embedded needs ~0.") and "device has 0.3 GiB" in last, r.stderr[-2000:]
    assert not work.exists()


def test_mesh_and_placer_puts_weights_on_the_configured_mesh():
    import jax
    from jax.sharding import NamedSharding
    assert mesh_presets.mesh_and_placer({}, "embedded") == (None, None)  # no mesh asked for: as before
    mesh, place = mesh_presets.mesh_and_placer({"mesh": "1,-1,1"}, "embedded")
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    import numpy as np
    cfg = memory.model_config_for("embedded")
    x = place("embed", np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32))
    assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh.shape == mesh.shape


def _damaged_model(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    text = '{"model_type": "llama", "hidden_size": 64,\n' if kind == "badjson" else \
        '{"model_type": "llama", "hidden_size": 64}'
    (d / "config.json").write_text(text)
    return d


@pytest.mark.parametrize("kind, says", [("badjson", "is not valid JSON (Expecting property name"),
                                        ("nofield", "lacks the field 'num_attention_heads'")])
def test_a_damaged_model_config_is_one_error_line_with_a_mesh_or_memory_figure(tmp_path, kind, says):
    """The memory preflight and the mesh placer read config.json before load_model_checked
    does: the same one-line diagnosis, not a JSONDecodeError / KeyError traceback."""
    model = _damaged_model(tmp_path, kind)
    for call in (lambda: memory.model_config_for(str(model)),
                 lambda: memory.preflight_model({"device_memory_gib": 16}, str(model), "bfloat16"),
                 lambda: mesh_presets.mesh_and_placer({"mesh": "1,-1,1"}, str(model))):
        with pytest.raises(UserError, match="config.json " + re.escape(says)):
            call()


def test_train_with_a_mesh_and_a_damaged_model_config_exits_with_one_line(tmp_path):
    work, model = tmp_path / "w", _damaged_model(tmp_path, "badjson")
    r = subprocess.run([sys.executable, "-m", "diffmas_jax.train", "--config", str(REPO / "configs/embedded_train.py"),
                        "--workdir", str(work), f"--config.model={model}", "--config.limit=16",
                        "--config.mesh=1,1,1", "--config.device_memory_gib=16"],
                       capture_output=True, text=True, timeout=300, cwd=str(REPO), env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {model / 'config.json'} is not valid JSON"), r.stderr
    assert not work.exists()

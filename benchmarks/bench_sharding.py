#!/usr/bin/env python
"""Sharding overhead on CPU: the DiffMAS train step on 8 simulated devices vs 1 device.

Each mesh runs in its own process with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
set before jax is imported. The 8 "devices" share this machine's cores, so the
total work is the same as on one device: the ratio measures what partitioning
costs (collectives, resharding, smaller kernels), not a speed-up. On real chips
the same meshes split the work; see launch/ and docs/scale_out.md.

One step = a planner prefills a prompt and runs m latent steps onto the shared KV
trace (trace_grad stop or full), the solver's prompt + target is teacher-forced on
top, AdamW updates the LoRA (rank 8, all linear layers). Parameters are placed on
the mesh with ``sharding.param_placer`` (straight into their shards), the batch is
split over (data, fsdp), the trace follows. Losses are checked against the
1-device run (they must agree to 1e-4).

    python benchmarks/bench_sharding.py            # embedded SmolLM2-135M, B=8 (several minutes)
    python benchmarks/bench_sharding.py --quick    # tiny random model, 1 repeat (smoke test)

Writes ``<out>/sharding_<date>.json`` and ``.md`` (out defaults to benchmarks/results).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from machine_load import cpu_model  # noqa: E402
MESHES = [(1, (1, 1, 1)), (8, (1, 8, 1)), (8, (2, 4, 1)), (8, (8, 1, 1)), (8, (1, 2, 4))]
TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
            tie_word_embeddings=True, hidden_act="silu")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny random model, short sequences, trace_grad=stop, meshes 1 and (1, 8, 1), 1 repeat")
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    ap.add_argument("--model", default=None, help="model dir / .gguf / Hub id (default: the embedded model)")
    ap.add_argument("--batch", type=int, default=8, help="global batch (default 8; divisible by 8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="planner prompt tokens (default 64; quick 16)")
    ap.add_argument("--solver-len", type=int, default=None, help="solver prompt + target (default 96; quick 24)")
    ap.add_argument("--target-len", type=int, default=None, help="target tokens (default 32; quick 8)")
    ap.add_argument("--latent-steps", type=int, default=None, help="latent steps m (default 4; quick 2)")
    ap.add_argument("--modes", default="stop,full", help="trace_grad modes (default stop,full)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per mesh (default 3; quick 1)")
    ap.add_argument("--meshes", default=None,
                    help="devices:data,fsdp,tensor;... (default 1:1,1,1;8:1,8,1;8:2,4,1;8:8,1,1;8:1,2,4)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.prompt_len = args.prompt_len or (16 if q else 64)
    args.solver_len = args.solver_len or (24 if q else 96)
    args.target_len = args.target_len or (8 if q else 32)
    args.latent_steps = args.latent_steps if args.latent_steps is not None else (2 if q else 4)
    args.repeats = args.repeats or (1 if q else 3)
    if args.meshes:
        args.mesh_list = [(int(n), tuple(int(x) for x in s.split(","))) for n, s in
                          (part.split(":") for part in args.meshes.split(";"))]
    else:
        args.mesh_list = MESHES if not q else [MESHES[0], MESHES[1]]
    if q and args.modes == "stop,full":
        args.modes = "stop"
    return args


# ------------------------------------------------------------------ one mesh (worker)
def worker(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from diffmas_jax.lora import LoraConfig, init_lora
    from diffmas_jax.sharding import bytes_per_device, make_mesh, param_placer
    from diffmas_jax.stages import make_realign
    from diffmas_jax.training import StepConfig, make_optimizer, make_train_step

    assert jax.device_count() == spec["devices"], jax.devices()
    mesh = make_mesh(spec["mesh"])
    t0 = time.perf_counter()
    if spec["model"] == "tiny":
        from diffmas_jax.model.config import ModelConfig
        from diffmas_jax.model.transformer import init_params
        cfg = ModelConfig.from_hf_dict(dict(TINY))
        host = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
        place = param_placer(cfg, mesh)
        params = {}
        flat = jax.tree_util.tree_flatten_with_path(host)[0]
        placed = [place(".".join(k.key for k in p), a) for p, a in flat]
        params = jax.tree.unflatten(jax.tree.structure(host), placed)
        model_name = "tiny random llama (2 layers, d=64)"
    else:
        from diffmas_jax.model.loading import load_config, load_model, resolve_model_dir
        name = None if spec["model"] == "embedded" else spec["model"]
        cfg = load_config(resolve_model_dir(name))
        m = load_model(name, with_tokenizer=False, place=param_placer(cfg, mesh))
        params, model_name = m.params, str(m.path)
    load_s = time.perf_counter() - t0
    b, tp, ts, tt, m_steps = spec["batch"], spec["prompt_len"], spec["solver_len"], spec["target_len"], \
        spec["latent_steps"]
    rng = np.random.default_rng(0)
    batch = dict(up_tokens=[rng.integers(3, cfg.vocab_size, (b, tp))], up_valid=[np.ones((b, tp), bool)],
                 tokens=rng.integers(3, cfg.vocab_size, (b, ts)), valid=np.ones((b, ts), bool),
                 target_mask=np.arange(ts)[None].repeat(b, 0) >= ts - tt)
    rows = NamedSharding(mesh, P(("data", "fsdp")) if b % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else P())
    batch = jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), rows), batch)
    lcfg = LoraConfig(rank=8, alpha=16.0)
    realign = make_realign(params, cfg)
    out = {"model": model_name, "load_s": load_s, "param_bytes_per_device": bytes_per_device(params),
           "devices": spec["devices"], "mesh": list(spec["mesh"]), "modes": {}}
    for mode in spec["modes"]:
        sc = StepConfig(method="diffmas", trace_grad=mode, roles=("planner", "solver"), latent_steps=(m_steps,),
                        up_lengths=(tp,), solver_length=ts, capacity=tp + m_steps + ts, lora_scale=lcfg.scale,
                        max_target=tt)
        opt = make_optimizer(5e-5, 100, 1, 0.0, 1.0, 1)
        lora = init_lora(cfg, lcfg, jax.random.PRNGKey(1), roles=sc.roles)
        lora = jax.tree.map(lambda x: x + 0.01, lora)  # B = 0 would make every trace gradient vanish
        state = opt.init(lora)
        step = make_train_step(cfg, sc, opt)
        t0 = time.perf_counter()
        lora, state, met = step(lora, state, params, realign, batch)
        first_loss = float(met["loss"])
        compile_s = time.perf_counter() - t0
        # The step's outputs may come back with other shardings than its first inputs had,
        # which compiles it once more: warm that up too before timing.
        t0 = time.perf_counter()
        lora, state, met = step(lora, state, params, realign, batch)
        jax.block_until_ready(met["loss"])
        second_s = time.perf_counter() - t0
        samples = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            lora, state, met = step(lora, state, params, realign, batch)
            jax.block_until_ready(met["loss"])
            samples.append(time.perf_counter() - t0)
        out["modes"][mode] = {"compile_and_first_s": compile_s, "second_call_s": second_s,
                              "step_s": statistics.median(samples),
                              "samples": samples, "first_loss": first_loss}
    return out


def run_worker(args, devices: int, mesh: tuple) -> dict:
    spec = dict(devices=devices, mesh=list(mesh), model="tiny" if args.quick and not args.model else
                (args.model or "embedded"), batch=args.batch, prompt_len=args.prompt_len,
                solver_len=args.solver_len, target_len=args.target_len, latent_steps=args.latent_steps,
                repeats=args.repeats, modes=[m.strip() for m in args.modes.split(",") if m.strip()])
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env, cwd=str(REPO))
    if r.returncode:
        raise RuntimeError(f"mesh {mesh} on {devices} devices failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- report
def fmt(x, unit=""):
    if x is None:
        return "-"
    return f"{x:,.1f}{unit}" if abs(x) >= 10 else f"{x:.2f}{unit}"


def table(results: list, modes: list) -> str:
    base = results[0]
    head = "| devices | mesh (data, fsdp, tensor) | param MiB / device |"
    sep = "|---|---|---|"
    for m in modes:
        head += f" step s ({m}) | vs 1 device ({m}) | compile + first s ({m}) |"
        sep += "---|---|---|"
    lines = [head, sep]
    for r in results:
        row = f"| {r['devices']} | {tuple(r['mesh'])} | {r['param_bytes_per_device'] / 2**20:.1f} |"
        for m in modes:
            s, b0 = r["modes"][m]["step_s"], base["modes"][m]["step_s"]
            row += f" {fmt(s)} | {s / b0:.2f}x | {fmt(r['modes'][m]['compile_and_first_s'])} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.batch % 8:
        print("error: --batch must be divisible by 8 (the batch is split over the 8-device meshes)", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "quick": args.quick, "batch": args.batch, "prompt_len": args.prompt_len, "solver_len": args.solver_len,
            "target_len": args.target_len, "latent_steps": args.latent_steps, "repeats": args.repeats,
            "modes": modes, "lora": "rank 8, alpha 16, q,k,v,o,gate,up,down", "dtype": "float32"}
    info["cpu_model"] = cpu_model()
    results = []
    for devices, mesh in args.mesh_list:
        log(f"mesh {mesh} on {devices} simulated device(s) ...")
        r = run_worker(args, devices, mesh)
        log("  " + ", ".join(f"{m}: {r['modes'][m]['step_s']:.3f} s/step" for m in modes))
        results.append(r)
    for r in results[1:]:
        for m in modes:
            a, b = r["modes"][m]["first_loss"], results[0]["modes"][m]["first_loss"]
            if abs(a - b) > 1e-4 * max(1.0, abs(b)):
                print(f"error: mesh {tuple(r['mesh'])} {m} loss {a} differs from 1 device's {b}", file=sys.stderr)
                return 1
    info["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["model"] = results[0]["model"]
    md = (f"Sharding overhead, DiffMAS train step ({info['model']}; B={args.batch}, planner prompt "
          f"{args.prompt_len}, m={args.latent_steps}, solver {args.solver_len} with {args.target_len} target; "
          f"{info['cpu_count']} CPU cores shared by every simulated device; median of {args.repeats} after 2 warm-up steps; "
          f"load {info['load_avg_start'][0] if info['load_avg_start'] else '?'} -> "
          f"{info['load_avg_end'][0] if info['load_avg_end'] else '?'})\n\n" + table(results, modes) + "\n")
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    name = f"sharding{'_quick' if args.quick else ''}_{stamp}"
    (out / f"{name}.json").write_text(json.dumps({"info": info, "results": results}, indent=2))
    (out / f"{name}.md").write_text(md)
    log(f"wrote {out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

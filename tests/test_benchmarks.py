"""The accelerator benchmark's smoke path on CPU: rows per variant, a failing variant recorded
as an error row (the others go on), and the profile summary read back from a real trace."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import xla_env

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_quick_variants_and_profile(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks/bench_gpu.py"), "--quick", "--shape", "tiny", "--skip-torch",
           "--out", str(tmp_path), "--cases", "sft8", "--attention", "xla,cudnn", "--remat", "dots",
           "--decode-batches", "1", "--profile", str(tmp_path / "prof"), "--label", "dsf"]
    flag = "--xla_gpu_enable_dynamic_slice_fusion=true"  # a GPU flag: XLA:CPU accepts and ignores it
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=xla_env(flag))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("gpu_*_quick_dsf.json")).read_text())
    assert report["label"] == "dsf" and flag in report["xla_flags"].split()  # A/B runs told apart
    md_lines = next(tmp_path.glob("gpu_*_quick_dsf.md")).read_text().splitlines()
    assert md_lines[0].endswith(", dsf)") and flag in md_lines[2]
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_gpu.py"), "--label", "a/b"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "--label 'a/b': use letters, digits, '.', '_' and '-' only (it becomes part of file names)")
    rows = report["shapes"]["tiny"]["train"]
    assert [row["attention"] for row in rows] == ["xla", "cudnn"]
    xla, cudnn = rows
    assert xla["remat"] == "dots" and xla["jax"]["tok_s"] > 0 and 0 < xla["jax"]["mfu"] < 1
    assert xla["jax"]["mfu"] <= xla["jax"]["hfu"] < 1  # FLOPs run include the model's
    prof = xla["jax"]["profile"]
    assert prof["total_ms"] > 0 and prof["kernels_ms"] and prof["planes"] == ["/host:CPU"]
    assert "error" in cudnn and "jax" not in cudnn  # no cuDNN on a CPU: recorded, not fatal
    assert report["shapes"]["tiny"]["decode"][0]["jax"]["s_per_step"] > 0
    assert "| B=2 K=0" in next(tmp_path.glob("gpu_*.md")).read_text()


def test_kernel_floor_fused_chain_holds_the_same_weights():
    """bench_kernels' fused chain is the decode loop's layout: per layer qkv, o, gate_up, down,
    the same numbers as the seven separate matrices, and the LM head last."""
    import jax
    import numpy as np
    from diffmas_jax.model.config import ModelConfig
    from diffmas_jax.model.transformer import init_params
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_kernels import weight_chain
    cfg = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    plain, fused = weight_chain(params), weight_chain(params, fused=True)
    assert len(plain) == 7 * 2 + 1 and len(fused) == 4 * 2 + 1
    assert [m.shape for m in fused[:4]] == [(32, 32 + 2 * 16), (32, 32), (32, 2 * 48), (48, 32)]
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_allclose(x @ fused[0], np.concatenate([x @ plain[0], x @ plain[1], x @ plain[2]], 1), rtol=1e-5)
    np.testing.assert_allclose(x @ fused[2], np.concatenate([x @ plain[4], x @ plain[5]], 1), rtol=1e-5)
    np.testing.assert_array_equal(fused[-1], np.asarray(params["embed"]).T)


def test_pipeline_memory_sweep_and_summary_plots(tmp_path, embedded):
    """bench_pipeline's extra solver lengths (--memory-new-tokens) run once each: they add (d)
    memory rows and a plot point, not (a) timing rows; bench_all's summary keeps them out of (a)
    and (e) and draws targets.png and memory.png. A tiny random llama with the embedded tokenizer
    keeps it quick; greedy tokens must agree with the transformers loop on every run."""
    import shutil
    from conftest import save_tiny_model
    model = save_tiny_model(tmp_path / "tiny", "llama", vocab_size=embedded.cfg.vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(embedded.path) / name, model / name)
    out = tmp_path / "all"
    cmd = [sys.executable, str(REPO / "benchmarks/bench_pipeline.py"), "--model", str(model), "--out", str(out),
           "--batches", "2", "--new-tokens", "4", "--memory-new-tokens", "12", "--latent-steps", "1",
           "--repeats", "2", "--eos-repeats", "0", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(next(out.glob("pipeline_*.json")).read_text())
    assert [(row["batch"], row["new_tokens"]) for row in report["results"]] == [(2, 4)]
    # both sides' processes alive, taking turns over the timed repeats; the memory-only run once each
    assert report["settings"]["turn_order"] == {"B2_N4": ["jax", "torch", "torch", "jax"], "B2_N12": ["jax", "torch"]}
    (row,) = report["results"]
    j_s, t_s = row["diffmas_jax"]["samples_s"], row["transformers"]["samples_s"]
    assert len(j_s) == len(t_s) == 2 and row["ratio_pairs"] == [t / j for j, t in zip(j_s, t_s)]
    assert row["ratio_best"] == min(t_s) / min(j_s)
    assert abs(row["ratio_jax_over_torch"] - (t_s[0] + t_s[1]) / (j_s[0] + j_s[1])) < 1e-9  # median of two
    runs = report["subprocesses"]
    assert sorted(runs) == sorted(f"{s}_B{b}_N{n}" for s in ("jax", "torch") for b in (2,) for n in (4, 12))
    assert runs["jax_B2_N12"]["memory_only"] and not runs["jax_B2_N4"]["memory_only"]
    assert runs["jax_B2_N12"]["slots_per_row"] == runs["jax_B2_N4"]["slots_per_row"] + 8
    agreement = {k: v for k, v in report["checks"].items() if k.endswith("greedy_token_agreement")}
    assert sorted(agreement) == sorted(f"B{b}_N{n}_greedy_token_agreement" for b in (2,) for n in (4, 12))
    assert all(v == 1.0 for v in agreement.values()), agreement
    md = next(out.glob("pipeline_*.md")).read_text()
    assert "| B=2, N=12 |" in md and "N = 12 ran once" in md
    assert "{" not in md  # every f-string filled in
    assert next(out.glob("pipeline_*_memory.png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    busy = report["machine"]["cpu_busy_start"]  # other work at the start, sampled from /proc/stat
    assert busy is None if not Path("/proc/stat").exists() else 0.0 <= busy <= report["machine"]["cpu_count"]
    (out / "pacing.json").write_text(json.dumps({"bench_pipeline": {"cpu_busy_before": 0.12, "waited_s": 4.0}}))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_all.py"), "--from-dir", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    measured = [row["measurement"] for row in summary["rows"]]
    assert len([m for m in measured if m.startswith("(a)")]) == 1
    (a_row,) = [r for r in summary["rows"] if r["measurement"].startswith("(a)")]
    assert a_row["ratio_best"] == row["ratio_best"] and a_row["ratio_pairs"] == row["ratio_pairs"]
    e_rows = {r["measurement"]: r["value"] for r in summary["rows"] if r["measurement"].startswith("(e)")}
    compile_row = "(e) pipeline, jax_B2_N4: first-call compile (trace + lower + XLA compile)"
    whole_row = "(e) pipeline, jax_B2_N4: whole first call (compile + first run)"
    assert sorted(e_rows) == sorted([compile_row, whole_row])
    split = runs["jax_B2_N4"]["forced"]["first_call_split"]  # JAX's own compile durations, inside the call
    assert 0 < split["xla_compile_s"] < split["compile_s"] == e_rows[compile_row] < e_rows[whole_row]
    mem = {m["run"]: m for m in summary["memory"]}
    assert mem["torch_B2_N12"]["slots_per_row"] == mem["jax_B2_N12"]["slots_per_row"] > mem["jax_B2_N4"]["slots_per_row"]
    for png in ("targets.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["pacing"]["bench_pipeline"]["waited_s"] == 4.0
    assert "bench_pipeline 0.12 (4 s waited)" in (out / "summary.md").read_text()
    # the run's host: the CPU with its family and model as the script recorded it; no train run, no peak
    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine_load import cpu_model
    assert report["machine"]["cpu_model"] == cpu_model()
    assert summary["host"] == {"cpu_model": cpu_model(), "matmul_peak_gflop_s": None,
                               "jax_matmul_peak_gflop_s": None, "torch_matmul_peak_gflop_s": None}
    assert (f"Host: {cpu_model() or 'CPU not recorded'}; f32 matmul peak not measured."
            in (out / "summary.md").read_text())


def test_memory_series_places_torch_runs_at_the_jax_trace_length():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from plots import memory_series
    runs = {"jax_B8_N512": {"slots_per_row": 1054, "rss_peak_mb": 3000.0},
            "jax_B8_N128": {"slots_per_row": 670, "rss_peak_mb": 2700.0},
            "torch_B8_N128": {"rss_peak_mb": 1340.0}, "torch_B8_N512": {"rss_peak_mb": 1900.0},
            "jax_B1_N128": {"slots_per_row": 670, "rss_peak_mb": None}}  # a run without a peak is left out
    assert memory_series(runs) == {("jax", 8): [(670, 2700.0), (1054, 3000.0)],
                                   ("torch", 8): [(670, 1340.0), (1054, 1900.0)]}


def _fake_run(results, stamp, *, decode_ratio, stop_ratio, share, legacy=False, quick=False, cpu="AMD EPYC",
              peak=None, best=None):
    """An all_<stamp> folder holding a model and a train JSON in the shape the scripts write."""
    folder = results / f"all_{stamp}"
    folder.mkdir(parents=True)
    machine = dict(quick=quick, load_avg_start=[1.0, 1.0, 1.0], cpu_model=cpu,
                   **({} if peak is None else dict(matmul_peak={"flop_s": peak})))
    model = dict(machine=machine, results=[
        {"measurement": "greedy decode tok/s, end to end (B=8, prompt 64, 128 new)", "ratio_jax_over_torch": decode_ratio}])
    train_row = {"measurement": "train step, trace_grad=stop (B=4)", "ratio_jax_over_torch": stop_ratio,
                 "diffmas_jax": {"mfu": share, "first_call_s": 20.0}}
    if not legacy:  # runs from 2026-12-03 16:25 on record both counts
        train_row["conventional_6n_flops"] = 1.0
    if best is not None:  # runs from 2026-12-08 on: the sides took turns
        train_row.update(ratio_best=best, ratio_pairs=[best, stop_ratio])
        train_row["diffmas_jax"]["mfu_best"] = share * 1.1
    (folder / f"model_{stamp}{'_quick' if quick else ''}.json").write_text(json.dumps(model))
    (folder / f"train_{stamp}.json").write_text(json.dumps(dict(machine=machine, results=[train_row])))


def test_history_names_each_host_briefly():
    """history.md's host row: the Zen generation where named, else vendor, family and model
    (with AMX, whose bfloat16 GEMMs only PyTorch uses); a run that recorded no CPU is '—'."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_history import cpu_generation
    assert cpu_generation("AMD EPYC (Zen 5: family 26, model 2)") == "Zen 5"
    assert cpu_generation("AMD EPYC (Zen 4: family 25, model 17; AVX512-BF16, AVX-512)") == "Zen 4"
    assert (cpu_generation("Intel(R) Xeon(R) Processor (family 6, model 167; AMX-BF16, AVX512-BF16, AVX-512)")
            == "Intel family 6, model 167, AMX")
    assert cpu_generation("Intel(R) Xeon(R) Platinum 8280 (family 6, model 85; AVX-512)") == "Intel family 6, model 85"
    assert cpu_generation("AMD EPYC") == "—" and cpu_generation(None) == "—"


def test_bench_history_spreads_and_met_counts(tmp_path):
    """bench_history lines up every full bench_all run: per-target values in run order, the
    spread and "met in k of n" (6N-counted shares shown but not counted), --quick runs and runs
    before --since left out; no run is one error line and a non-zero exit."""
    results = tmp_path / "results"
    _fake_run(results, "2026-12-01_100000", decode_ratio=2.5, stop_ratio=1.0, share=0.6)  # before --since
    _fake_run(results, "2026-12-03_084852", decode_ratio=1.6, stop_ratio=1.31, share=0.43, legacy=True)
    _fake_run(results, "2026-12-03_120000", decode_ratio=2.2, stop_ratio=1.2, share=0.48, quick=True)
    _fake_run(results, "2026-12-03_223719", decode_ratio=1.4, stop_ratio=1.64, share=0.51)
    _fake_run(results, "2026-12-04_152010", decode_ratio=2.1, stop_ratio=1.29, share=0.45,
              cpu="AMD EPYC (Zen 5: family 26, model 2)", peak=340e9, best=1.33)
    out = tmp_path / "hist"
    cmd = [sys.executable, str(REPO / "benchmarks/bench_history.py"), "--results", str(results),
           "--since", "2026-12-03", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    hist = json.loads((out / "history.json").read_text())
    assert hist["runs"] == ["2026-12-03 08:48", "2026-12-03 22:37", "2026-12-04 15:20"]
    decode = next(row for row in hist["rows"] if row["measurement"].startswith("(b)"))
    assert decode["values"] == [1.6, 1.4, 2.1] and (decode["n"], decode["met"]) == (3, 1)
    assert (decode["min"], decode["median"], decode["max"]) == (1.4, 1.6, 2.1)
    stop = next(row for row in hist["rows"] if row["measurement"].endswith("tok/s vs transformers + peft"))
    assert stop["met"] == 2 and stop["n"] == 3
    assert stop["best"] == [None, None, 1.33]  # each side's best step, where the sides took turns
    share = next(row for row in hist["rows"] if "share of measured" in row["measurement"])
    assert share["values"] == [0.43, 0.51, 0.45] and share["legacy_6n_count"] == [True, False, False]
    assert (share["n"], share["met"], share["min"]) == (2, 1, 0.45)
    first = next(row for row in hist["rows"] if row["measurement"].startswith("(e)"))
    assert first["values"] == [20.0] * 3 and first["met"] == 3  # a time: met when under its limit
    assert [row["measurement"][:3] for row in hist["rows"]] == sorted(row["measurement"][:3] for row in hist["rows"])
    md = (out / "history.md").read_text()
    assert "| in 1 of 3 runs |" in md and "43.0% †" in md and "6N" in md
    assert "| 1.64x | 1.29x (best 1.33x) | 1.29x | 1.31x | 1.64x | in 2 of 3 runs |" in md
    assert "| 51.0% | 45.0% (best 49.5%) |" in md and "(best …)" in md
    # which host each run had: the CPU generation where recorded, the matmul peak where measured
    assert [h["cpu_model"] for h in hist["hosts"]][-1] == "AMD EPYC (Zen 5: family 26, model 2)"
    assert "| host: CPU (recorded from 2026-12-07 14:40 on) | | — | — | Zen 5 |" in md
    assert "| host: f32 matmul peak, GFLOP/s | | — | — | 340 | 340 | 340 | 340 | |" in md
    assert (out / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = subprocess.run(cmd[:-4] + ["--since", "2027-01-01", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: no full bench_all run")


def test_gpu_session_script_runs_its_parts_under_one_deadline(tmp_path):
    """benchmarks/gpu_session.sh, the prepared script for a lent GPU, with a stand-in for python
    that records each call: each part gets its own XLA_FLAGS and label; a failing part makes the
    exit status 1 and the next part still runs; the deadline stops a part that runs on and skips
    one with no time left; bad input is one error line; an earlier log survives. (bench_gpu's own
    handling of --label and XLA_FLAGS is checked by test_bench_gpu_quick_variants_and_profile.)"""
    script = str(REPO / "benchmarks/gpu_session.sh")
    record, fake = tmp_path / "calls.txt", tmp_path / "fake_python"
    fake.write_text('#!/usr/bin/env bash\necho "$XLA_FLAGS|$*" >> "$RECORD"\n'
                    'case "$*" in *"--label sft_dsf"*) exit 1;; *"--label diffmas4"*) exec sleep 60;; esac\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), RECORD=str(record), XLA_FLAGS="--xla_dump_to=/tmp/x")
    out = tmp_path / "out"
    r = subprocess.run([script], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: no OUT_DIR given"
    r = subprocess.run([script, str(out), "--fast"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unknown option '--fast'" in r.stderr
    r = subprocess.run([script, str(out)], capture_output=True, text=True, env=dict(env, PARTS="sft_dsf bogus"))
    assert r.returncode == 2 and "unknown part 'bogus'" in r.stderr and not out.exists() and not record.exists()

    out.mkdir()
    (out / "session.log").write_text("an earlier session\n")
    r = subprocess.run([script, str(out)], capture_output=True, text=True, timeout=60,
                       env=dict(env, DEADLINE_S="5", MIN_PART_S="1"))
    assert r.returncode == 1, r.stdout + r.stderr
    calls = [line.split("|") for line in record.read_text().splitlines()]
    assert [c[1].split("--label ")[1].split()[0] for c in calls] == ["sft_default", "sft_dsf", "diffmas4"]
    assert [c[0] for c in calls] == ["--xla_dump_to=/tmp/x", "--xla_dump_to=/tmp/x --xla_gpu_enable_dynamic_slice_fusion=true",
                                     "--xla_dump_to=/tmp/x"]
    for c in calls:
        assert all(a in c[1] for a in ("--shape qwen3-1.7b", "--repeats 3", "--skip-torch", f"--out {out}")), c
    assert "--cases sft8" in calls[1][1] and "--decode-batches=" in calls[1][1] and "--profile" in calls[1][1]
    log = (out / "session.log").read_text()
    assert log.startswith("an earlier session\n")
    assert "sft_default: done" in log and "sft_dsf: exit 1" in log
    assert "diffmas4: stopped at the deadline" in log and "1 part(s) failed" in log

    record.unlink()
    r = subprocess.run([script, str(out), "--quick"], capture_output=True, text=True,
                       env=dict(env, PARTS="sft_default", DEADLINE_S="0"))
    assert r.returncode == 0 and "sft_default: skipped, 0s left" in r.stdout and not record.exists()


def test_summary_host_peak_is_the_one_the_shares_use():
    """The host line gives the peak the shares of the peak divide by (the faster of JAX's dots
    and torch.mm), with each library's own; runs without torch's figure keep JAX's."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_all import host_of, to_markdown
    train = {"machine": {"cpu_model": "Intel(R) Xeon(R) Processor (family 6, model 167; AMX-BF16)",
                         "matmul_peak": {"flop_s": 295.4e9}, "torch_matmul_peak": {"flop_s": 353.5e9},
                         "peak_flop_s": 353.5e9}}
    host = host_of(train, None, None)
    assert host["matmul_peak_gflop_s"] == 353.5 and host["jax_matmul_peak_gflop_s"] == 295.4
    empty = dict(rows=[], memory=[], kernels=None, memory_touch=[], load_avg_start={}, pacing={}, malloc_hugetlb={})
    md = to_markdown(dict(empty, host=host), "t")
    assert ("f32 matmul peak 353.5 GFLOP/s (the faster library's; JAX's dots 295.4, torch.mm 353.5)." in md)
    older = {"machine": {"cpu_model": "AMD EPYC", "matmul_peak": {"flop_s": 200e9}}}
    assert host_of(older, None, None)["matmul_peak_gflop_s"] == 200.0
    assert "f32 matmul peak 200.0 GFLOP/s." in to_markdown(dict(empty, host=host_of(older, None, None)), "t")


def test_alternating_times_take_turns_and_the_ratios_come_from_the_pairs(monkeypatch):
    """The two sides of a measurement take turns (A B, B A, A B, B A...): with an even number of
    repeats, a machine that slows down linearly over the run leaves the ratio of the medians
    exact, where timing all of A's repeats before B's reads the drift as B's slowness."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_model
    calls, clock = [], [0.0]
    base = {"a": 1.0, "b": 2.0}  # b takes twice a's time; each call is 50% of a base slower than the last

    def side(name):
        def fn():
            clock[0] += base[name] * (1 + 0.5 * len(calls))
            calls.append(name)
            return name
        return fn

    monkeypatch.setattr(bench_model.time, "perf_counter", lambda: clock[0])
    (a_med, a_s, a_out), (b_med, b_s, b_out) = bench_model.alternating_times([side("a"), side("b")], 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"] and (a_out, b_out) == ("a", "b")
    spread = bench_model.ratio_spread(a_s, b_s)
    assert spread["ratio_median"] == b_med / a_med == 2.0  # the true ratio; one side after the other: 4.3
    assert spread["ratio_pairs"] == [b / a for a, b in zip(a_s, b_s)]
    assert spread["ratio_best"] == min(b_s) / min(a_s) == 3.0 / 1.0
    assert bench_model.spread_cells({"ratio_best": 2.0, "ratio_pairs": [1.5, 3.0]}) == "2.00x | 1.50–3.00x"
    assert bench_model.spread_cells({}) == "n/a | n/a"


def test_summary_marks_a_target_whose_pairs_straddle_it(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_all
    rows = [dict(measurement="(c) x", target=1.3, value=1.35, unit="x", met=True, note="", ratio_best=1.28,
                 ratio_pairs=[1.25, 1.4]),
            dict(measurement="(c) y", target=1.3, value=1.5, unit="x", met=True, note="", ratio_best=1.5,
                 ratio_pairs=[1.45, 1.55]),
            dict(measurement="(c) share", target=0.5, value=0.45, unit="", met=False, note="", best=0.48),
            dict(measurement="(a) old run", target=3.0, value=2.0, unit="x", met=False, note="")]
    md = bench_all.to_markdown(dict(rows=rows, memory=[], kernels=None, load_avg_start={}), "t")
    assert "| (c) x | ≥ 1.3x | 1.35x | 1.28x | 1.25–1.40x | yes, close |" in md
    assert "| (c) y | ≥ 1.3x | 1.50x | 1.50x | 1.45–1.55x | yes |" in md
    assert "| (c) share | ≥ 50% | 45% | 48% | — | no |" in md
    assert "| (a) old run | ≥ 3.0x | 2.00x | — | — | no |" in md


def test_pipeline_child_that_fails_is_one_error_with_its_stderr(tmp_path, embedded):
    """A side whose process dies (here: no model there) raises with the tail of its stderr, and
    the other side's process, already loaded and waiting for its turns, is killed with it."""
    import shutil
    import pytest
    from conftest import save_tiny_model
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_pipeline
    model = save_tiny_model(tmp_path / "tiny", "llama", vocab_size=embedded.cfg.vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(embedded.path) / name, model / name)
    qs = ["What is 2 + 3?"]
    spec = {"model": str(model), "questions": qs, "instruction": "", "messages": bench_pipeline.build_messages(qs, ""),
            "latent_steps": 1, "new_tokens": 2, "repeats": 2, "eos_repeats": 0, "threads": 1, "eos_ids": [0]}
    waiting = "bench_pipeline.py --child"
    with pytest.raises(RuntimeError, match=r"\[t\] jax failed \(exit 1\):\n(.|\n)*no-model") as e:
        bench_pipeline.run_config({"torch": dict(spec, side="torch"),
                                   "jax": dict(spec, side="jax", model=str(tmp_path / "no-model"))}, 2, "[t]")
    assert "torch failed" not in str(e.value)
    left = subprocess.run(["pgrep", "-f", waiting], capture_output=True, text=True).stdout
    assert left.strip() == ""  # the torch side, loaded and waiting, went with it

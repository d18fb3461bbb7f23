"""The evaluation CLI: outputs, resume after a kill or a torn line, config checks, errors.

Fast tests swap the model for a fake ``run_batch`` in-process; the subprocess tests run
the real CLI on the embedded model with a few items and a few tokens.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA_DIR, REPO, jsonl_eval_config
from diffmas_jax import config_utils, evaluate as ev
from diffmas_jax.cli import UserError

EMBEDDED_CFG = "configs/embedded_eval.py"
CHOICE_ROWS = [
    {"id": f"q{i}", "question": f"Question {i}?", "choices": ["red", "green", "blue", "gold"], "answer": i % 4}
    for i in range(7)
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------- fast, in-process
@pytest.fixture
def fake_model(monkeypatch):
    """A fake load_model/run_batch: answers depend on the question and (when sampling) the seed."""
    from diffmas_jax import methods
    from diffmas_jax.model import loading
    calls = []

    def fake_run_batch(model, questions, answer_instruction, mc, *, lora=None, lora_scale=1.0, seed=0):
        calls.append({"questions": [q.splitlines()[0] for q in questions], "seed": seed, "lora": lora})
        texts, records = [], []
        for row, q in enumerate(questions):
            k = int(q.split()[1].rstrip("?"))
            if mc.sampling.temperature > 0:
                k += seed[row]
            texts.append(f"The answer is \\boxed{{{'ABCD'[k % 4]}}}")
            lps = [-0.5] * (3 + k % 2)
            records.append(dict(prompt_tokens=100 + k, generated_tokens=len(lps), latent_slots=6,
                                trace_per_agent={"0:planner": 50}, generated_logprobs=lps,
                                generated_ids=[1] * len(lps)))
        return methods.BatchResult(texts=texts, records=records)

    monkeypatch.setattr(methods, "run_batch", fake_run_batch)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: object())
    return calls


def fake_config(path: Path, **kw):
    return jsonl_eval_config(path, **kw)


def test_fake_run_outputs_and_summary(tmp_path, fake_model):
    data = write_jsonl(tmp_path / "d.jsonl", CHOICE_ROWS)
    wd = tmp_path / "run"
    summary = ev.evaluate(fake_config(data), wd, progress=False)
    recs = read_lines(wd / "items.jsonl")
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(5)]
    assert [len(c["questions"]) for c in fake_model] == [2, 2, 1]
    for r in recs:
        for key in ("id", "question", "prediction", "output", "gold", "correct", "prompt_tokens",
                    "generated_tokens", "latent_slots", "trace_per_agent", "latency_s", "generated_logprobs"):
            assert key in r
    # the fake always answers letter (k % 4) and gold is k % 4: all correct
    assert all(r["correct"] and r["prediction"] == r["gold"] for r in recs)
    on_disk = json.loads((wd / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["complete"] and summary["n"] == 5 and summary["accuracy"] == 1.0
    assert summary["accuracy_ci95"] == [pytest.approx(0.5655, abs=1e-4), 1.0]  # 5 of 5: Wilson, not a point
    assert summary["ci_method"].startswith("Wilson score interval")
    assert summary["tokens_per_question"]["prompt"] == pytest.approx(102.0)
    assert summary["decoding"]["perplexity"]["mean"] == pytest.approx(float(__import__("math").exp(0.5)))
    assert summary["decoding"]["surprisal_curve"]["position"] == [0, 1, 2, 3]
    assert summary["config"]["latent_steps"] == 2 and summary["config"]["task_options"]["path"] == str(data)
    assert summary["versions"]["jax"] and "transformers" in summary["versions"]
    assert json.loads((wd / "config.json").read_text()) == summary["config"]


def test_fake_resume_skips_done_and_extends_limit(tmp_path, fake_model):
    data = write_jsonl(tmp_path / "d.jsonl", CHOICE_ROWS)
    wd = tmp_path / "run"
    ev.evaluate(fake_config(data, limit=3), wd, progress=False)
    fake_model.clear()
    ev.evaluate(fake_config(data, limit=3), wd, progress=False)
    assert fake_model == []  # nothing left to do: the model is not even loaded
    s = ev.evaluate(fake_config(data, limit=6, batch_size=4), wd, progress=False)  # limit and batch_size may change
    assert [c["questions"] for c in fake_model] == [["Question 3?"], ["Question 4?", "Question 5?"]]
    ids = [r["id"] for r in read_lines(wd / "items.jsonl")]
    assert ids == [f"q{i}" for i in range(6)] and s["complete"] and s["resumed_with"] == 3


def test_fake_sampling_resume_runs_only_missing_items_with_their_seeds(tmp_path, fake_model):
    """With sampling, each item has its own seed (item_seed(seed, index, sample)): a torn
    batch decodes only its missing item, which gets exactly the sample an uninterrupted run
    gave it, and another batch_size changes no sample."""
    data = write_jsonl(tmp_path / "d.jsonl", CHOICE_ROWS)
    full = tmp_path / "full"
    ev.evaluate(fake_config(data, temperature=0.7, batch_size=2, limit=4, seed=10), full, progress=False)
    seeds = [ev.item_seed(10, i, 0) for i in range(4)]
    assert [c["seed"] for c in fake_model] == [seeds[:2], seeds[2:]]
    assert [r["seed"] for r in read_lines(full / "items.jsonl")] == seeds
    wd = tmp_path / "cut"
    shutil.copytree(full, wd)
    lines = (wd / "items.jsonl").read_text().splitlines(keepends=True)
    (wd / "items.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # torn tail
    fake_model.clear()
    ev.evaluate(fake_config(data, temperature=0.7, batch_size=2, limit=4, seed=10), wd, progress=False)
    assert fake_model == [{"questions": ["Question 3?"], "seed": [seeds[3]], "lora": None}]
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("latency_s", "batch")} for r in recs]
    assert strip(read_lines(wd / "items.jsonl")) == strip(read_lines(full / "items.jsonl"))
    other = tmp_path / "bs3"
    ev.evaluate(fake_config(data, temperature=0.7, batch_size=3, limit=4, seed=10), other, progress=False)
    assert strip(read_lines(other / "items.jsonl")) == strip(read_lines(full / "items.jsonl"))


def test_fake_self_consistency(tmp_path, fake_model):
    data = write_jsonl(tmp_path / "d.jsonl", CHOICE_ROWS)
    s = ev.evaluate(fake_config(data, temperature=0.7, num_samples=3, batch_size=5, limit=5), tmp_path / "r",
                    progress=False)
    assert [c["seed"] for c in fake_model] == [[ev.item_seed(0, i, s) for i in range(5)] for s in range(3)]
    recs = read_lines(tmp_path / "r" / "items.jsonl")
    for r in recs:
        assert len(r["samples"]) == 3 and r["prediction"] == r["samples"][0]["prediction"]
        assert 0 < r["agreement"] <= 1 and r["majority_prediction"] in {x["prediction"] for x in r["samples"]}
        assert r["majority_correct"] == (r["majority_prediction"] == r["gold"])
    sc = s["decoding"]["self_consistency"]
    assert sc["num_samples"] == 3 and sc["n_items"] == 5
    assert sc["majority_vote_accuracy"] == pytest.approx(sum(r["majority_correct"] for r in recs) / 5)
    assert s["decoding"]["perplexity"]["n"] == 15  # every sample's answer


def test_item_seeds_of_different_runs_and_samples_share_no_stream():
    keys = [{ev.item_seed(seed, i, s) for i in range(2000)} for seed, s in ((0, 0), (1, 0), (2, 0), (0, 1))]
    assert all(len(k) == 2000 for k in keys)
    assert all(not (a & b) for j, a in enumerate(keys) for b in keys[j + 1:])
    assert all(0 <= x < 2 ** 32 for x in keys[0])  # jax.random.PRNGKey keeps 32 bits of a seed


def test_fake_sampled_workdir_of_the_per_batch_scheme_is_not_resumed(tmp_path, fake_model):
    """A sampled run from before per-item keys (no sample_keys in its config) drew its items
    from other streams: resuming it with these would mix them."""
    data = write_jsonl(tmp_path / "d.jsonl", CHOICE_ROWS)
    wd = tmp_path / "run"
    ev.evaluate(fake_config(data, temperature=0.7, limit=2), wd, progress=False)
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["sample_keys"] == "per-item"
    del cfg["sample_keys"]
    (wd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="sample_keys"):
        ev.evaluate(fake_config(data, temperature=0.7, limit=4), wd, progress=False)
    greedy = ev.evaluate(fake_config(data, limit=2), tmp_path / "greedy", progress=False)
    assert "sample_keys" not in greedy["config"]


def test_fake_refuses_conflicting_config_before_writing(tmp_path, fake_model):
    data = write_jsonl(tmp_path / "d.jsonl", CHOICE_ROWS)
    wd = tmp_path / "run"
    ev.evaluate(fake_config(data, limit=2), wd, progress=False)
    before = {p.name: p.read_bytes() for p in wd.iterdir()}
    for change in (dict(method="single"), dict(latent_steps=3), dict(max_new_tokens=9), dict(temperature=0.5)):
        with pytest.raises(UserError, match="different configuration"):
            ev.evaluate(fake_config(data, limit=2, **change), wd, progress=False)
    assert {p.name: p.read_bytes() for p in wd.iterdir()} == before


def test_read_items_repairs_only_a_torn_tail(tmp_path):
    p = tmp_path / "items.jsonl"
    good = [{"id": "a", "x": 1}, {"id": "b", "x": 2}]
    body = "".join(json.dumps(r) + "\n" for r in good)
    p.write_text(body + '{"id": "c", "x"')
    done, repair = ev.read_items(p)
    assert list(done) == ["a", "b"] and repair
    p.write_text(body.rstrip("\n"))  # complete JSON but the newline never made it
    done, repair = ev.read_items(p)
    assert list(done) == ["a", "b"] and repair
    ev.rewrite_items(p, done)
    assert p.read_text() == body and ev.read_items(p) == (done, False)
    p.write_text('{"id": "a"\n' + body)
    with pytest.raises(UserError, match=":1: damaged line"):
        ev.read_items(p)
    assert ev.read_items(tmp_path / "missing.jsonl") == ({}, False)


def test_config_resolution():
    cfg = config_utils.resolve(config_utils.eval_config(latent_steps="4, 8,16", roles="planner,critic,refiner,solver",
                                                        data_dir=str(DATA_DIR)))
    assert cfg["latent_steps"] == [4, 8, 16] and cfg["roles"] == ["planner", "critic", "refiner", "solver"]
    assert cfg["task_options"] == {} and Path(cfg["data_dir"]).is_absolute()
    mc = ev.method_config(cfg)
    assert [a.latent_steps for a in mc.agents()] == [4, 8, 16, 0]
    assert config_utils.resolve(config_utils.eval_config(latent_steps=0))["latent_steps"] == 0
    # generated tasks read no files, so a default data_dir that is absent here (a clone
    # without ../shared) does not stop them; a task that reads files still refuses it
    absent = str(DATA_DIR.parent / "no_such_data_dir")
    for task in ("arith", "comm"):
        assert config_utils.resolve(config_utils.eval_config(task=task, data_dir=absent))["task"] == task
    with pytest.raises(UserError, match="data_dir .* does not exist"):
        config_utils.resolve(config_utils.eval_config(task="gsm8k", data_dir=absent))
    for off in ("None", ""):  # what --config.data_dir=None / = give: the Hub instead of local copies
        assert config_utils.resolve(config_utils.eval_config(task="gsm8k", data_dir=off))["data_dir"] is None
    for bad, msg in ((dict(limit=0), "limit"), (dict(batch_size=-1), "batch_size"), (dict(top_p=0.0), "top_p"),
                     (dict(latent_steps="a,b"), "latent_steps"), (dict(realign="x"), "realign"),
                     (dict(lora="/nonexistent/adapter"), "lora is set with method 'latent_mas'")):
        with pytest.raises(UserError, match=msg):
            config_utils.resolve(config_utils.eval_config(**bad))
    with pytest.raises(UserError, match="unknown agent role"):
        ev.method_config(config_utils.resolve(config_utils.eval_config(roles="planner,wizard")))
    for path in ("configs/qwen3_4b.py", "configs/qwen3_8b.py", "configs/qwen3_14b.py", EMBEDDED_CFG):
        import importlib.util
        spec = importlib.util.spec_from_file_location("cfg_under_test", REPO / path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        c = mod.get_config()
        assert set(c.to_dict()) == set(config_utils.DEFAULTS)
        if "qwen3" in path:
            assert c.model.startswith("Qwen/Qwen3-") and c.temperature == 0.6 and c.top_p == 0.95
            assert c.dtype == "bfloat16"


def test_fake_diffmas_with_adapter(tmp_path, fake_model):
    import numpy as np
    from diffmas_jax.lora import LoraConfig, save_adapter
    tree = {"q": {"a": np.zeros((2, 4, 2), np.float32), "b": np.zeros((2, 2, 4), np.float32)}}
    adapter_dir = save_adapter(tmp_path / "adapter", tree, LoraConfig(rank=2, alpha=8.0, targets=("q",)),
                               extra={"model": "embedded", "trace_grad": "stop"})
    data = write_jsonl(tmp_path / "d.jsonl", CHOICE_ROWS)
    s = ev.evaluate(fake_config(data, method="diffmas", lora=str(adapter_dir), lora_scale=0.5, limit=2),
                    tmp_path / "r", progress=False)
    assert s["complete"] and s["config"]["lora"] == str(adapter_dir.resolve())
    assert s["adapter"]["effective_scale"] == pytest.approx(0.5 * 8.0 / 2)
    assert s["adapter"]["meta"]["trace_grad"] == "stop"
    assert set(fake_model[0]["lora"]) == {"q"}


def test_adapter_trained_with_other_stage1_settings_warns(tmp_path, fake_model, capsys):
    """The adapter records its Stage I settings; evaluating it with others says so (it is an
    ablation, not an error) and the summary keeps what it was trained with."""
    import numpy as np
    from diffmas_jax.lora import LoraConfig, save_adapter
    tree = {"q": {"a": np.zeros((2, 4, 2), np.float32), "b": np.zeros((2, 2, 4), np.float32)}}
    trained = {"model": "embedded", "trace_grad": "stop", "latent_steps": "2", "realign": "ridge",
               "realign_lambda": 1e-5, "communication": "concat", "visibility": "full", "enable_thinking": None}
    adapter_dir = save_adapter(tmp_path / "adapter", tree, LoraConfig(rank=2, alpha=8.0, targets=("q",)),
                               extra=trained)
    data = write_jsonl(tmp_path / "d.jsonl", CHOICE_ROWS)
    ev.evaluate(fake_config(data, method="diffmas", lora=str(adapter_dir), limit=1), tmp_path / "a", progress=False)
    assert "warning" not in capsys.readouterr().err          # fake_config runs latent_steps=2, as trained
    s = ev.evaluate(fake_config(data, method="diffmas", lora=str(adapter_dir), limit=1, latent_steps=4,
                                visibility="latent_only", enable_thinking=True), tmp_path / "b", progress=False)
    err = capsys.readouterr().err
    assert ("other Stage I settings: latent_steps: 2 -> 4; visibility: full -> latent_only; "
            "enable_thinking: None -> True") in err, err
    assert s["adapter"]["meta"]["latent_steps"] == "2"


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # inside ml_collections
def test_flags_and_overrides_in_process():
    config, workdir = ev.parse_flags(
        ["evaluate", "--config", str(REPO / "configs/qwen3_8b.py"), "--workdir", "/tmp/w",
         "--config.enable_thinking=False", "--config.roles=planner,solver", "--config.latent_steps=4,5",
         "--config.task_options.path=/tmp/a.jsonl", "--config.limit=5"])
    assert workdir == "/tmp/w" and config.model == "Qwen/Qwen3-8B" and config.limit == 5
    assert config.enable_thinking is False and config.roles == "planner,solver" and config.latent_steps == "4,5"
    assert config.task_options.path == "/tmp/a.jsonl"
    for argv, msg in ((["--workdir", "/tmp/w"], "--config is required"),
                      (["--config", EMBEDDED_CFG], "--workdir is required"),
                      (["--config", "configs/none.py", "--workdir", "w"], "config file configs/none.py not found"),
                      (["--config", str(REPO / EMBEDDED_CFG), "--workdir", "w", "--config.limit=x"], "config.limit"),
                      (["--config", str(REPO / EMBEDDED_CFG), "--workdir", "w", "stray"], "unexpected arguments")):
        with pytest.raises(UserError, match=msg):
            ev.parse_flags(["evaluate", *argv])


def test_lora_needs_the_lora_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffmas_jax.lora", None)  # import fails as if missing
    with pytest.raises(UserError, match="loading adapters needs diffmas_jax.lora"):
        ev.load_adapter(str(tmp_path))


# --------------------------------------------------------------- real CLI, subprocess
def cli(workdir, *overrides, config=EMBEDDED_CFG, timeout=400):
    cmd = [sys.executable, "-m", "diffmas_jax.evaluate", "--config", config, "--workdir", str(workdir), *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


E2E = ("--config.limit=3", "--config.max_new_tokens=8", "--config.task=arc_easy", "--config.batch_size=2",
       "--config.latent_steps=2")


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("e2e") / "run"
    r = cli(wd, *E2E)
    assert r.returncode == 0, r.stderr[-3000:]
    return wd, r


def test_end_to_end_embedded(e2e_run):
    wd, r = e2e_run
    recs = read_lines(wd / "items.jsonl")
    assert len(recs) == 3 and len({x["id"] for x in recs}) == 3
    s = json.loads((wd / "summary.json").read_text())
    assert s["complete"] and s["n"] == 3 and s["n_total"] == 3
    cfg = s["config"]
    assert (cfg["task"], cfg["method"], cfg["limit"], cfg["batch_size"], cfg["latent_steps"], cfg["max_new_tokens"]) \
        == ("arc_easy", "latent_mas", 3, 2, 2, 8)
    assert cfg["model"] == "embedded" and cfg["realign"] == "ridge"
    assert 0.0 <= s["accuracy"] <= 1.0 and s["accuracy_ci95"][0] <= s["accuracy"] <= s["accuracy_ci95"][1]
    assert s["tokens_per_question"]["prompt"] > 100 and 0 < s["tokens_per_question"]["generated"] <= 8
    assert s["tokens_per_question"]["latent_slots"] == 6  # 3 upstream agents x 2 steps
    assert s["seconds_per_question"] > 0 and s["decoding"]["perplexity"]["mean"] >= 1.0
    for x in recs:
        assert x["latent_slots"] == 6 and len(x["trace_per_agent"]) == 4
        assert len(x["generated_logprobs"]) == x["generated_tokens"]
        assert x["gold"] in "ABCDE" and isinstance(x["correct"], bool)
    assert "accuracy" in r.stdout


def test_conflicting_previous_config_is_refused(e2e_run, tmp_path):
    src, _ = e2e_run
    wd = tmp_path / "run"
    shutil.copytree(src, wd)
    before = (wd / "items.jsonl").read_bytes()
    r = cli(wd, *E2E, "--config.method=single")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "different configuration" in last and "method" in last
    assert (wd / "items.jsonl").read_bytes() == before


def test_kill_then_torn_tail_then_resume(tmp_path):
    """SIGKILL mid-run, then tear the last line as an interrupted append would; the
    rerun drops the torn line, redoes that item identically (greedy) and finishes
    with every id exactly once."""
    wd = tmp_path / "run"
    args = ["--config.limit=4", "--config.batch_size=1", "--config.method=single", "--config.task=arc_easy",
            "--config.max_new_tokens=8"]
    cmd = [sys.executable, "-m", "diffmas_jax.evaluate", "--config", EMBEDDED_CFG, "--workdir", str(wd), *args]
    items = wd / "items.jsonl"
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
        deadline = time.time() + 300
        try:
            while time.time() < deadline and proc.poll() is None:
                if items.exists() and items.read_bytes().count(b"\n") >= 1:
                    break
                time.sleep(0.05)
            assert proc.poll() is None or proc.returncode == 0, (tmp_path / "log").read_text()[-2000:]
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    data = items.read_bytes()
    complete = data[: data.rfind(b"\n") + 1].decode().splitlines(keepends=True)  # a kill may also tear a line
    assert len(complete) >= 1
    torn = json.loads(complete[-1])
    items.write_text("".join(complete[:-1]) + complete[-1][:60])
    r = cli(wd, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_lines(items)
    ids = [x["id"] for x in recs]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert ids[: len(complete)] == [json.loads(line)["id"] for line in complete]
    redone = recs[len(complete) - 1]
    assert redone["id"] == torn["id"] and redone["output"] == torn["output"]
    assert redone["generated_logprobs"] == pytest.approx(torn["generated_logprobs"], abs=1e-3)
    s = json.loads((wd / "summary.json").read_text())
    assert s["complete"] and s["n"] == 4 and s["resumed_with"] == len(complete) - 1


def _bad_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n{"question": "3?", "answer": "3"}\n')
    return ["--config.task=jsonl", f"--config.task_options.path={p}"], [f"{p}:2", "malformed JSON"]


def _empty_jsonl(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    return ["--config.task=jsonl", f"--config.task_options.path={p}"], ["no items"]


BAD_INPUTS = {
    "unknown_task": lambda tmp: (["--config.task=nope"], ["unknown task 'nope'"]),
    "unknown_method": lambda tmp: (["--config.method=nope"], ["unknown method 'nope'"]),
    "missing_data_dir": lambda tmp: ([f"--config.data_dir={tmp / 'no_such_dir'}"], ["data_dir", "does not exist"]),
    "malformed_jsonl": _bad_jsonl,
    "empty_dataset": _empty_jsonl,
    "diffmas_without_lora": lambda tmp: (["--config.method=diffmas"], ["diffmas", "lora"]),
    "limit_zero": lambda tmp: (["--config.limit=0"], ["limit must be a positive integer"]),
    "unknown_field": lambda tmp: (["--config.nope=1"], ["unknown config field 'nope'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_one_line_exit_2(case, tmp_path):
    args, expected = BAD_INPUTS[case](tmp_path)
    wd = tmp_path / "run"
    r = cli(wd, *args, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in r.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    assert not wd.exists()  # nothing written when the input is bad


def test_config_file_without_get_config_after_a_good_one(tmp_path):
    # ml_collections reuses one module name for every config file: the second, broken
    # file must not inherit the first one's get_config() in the same process.
    from diffmas_jax import evaluate
    from diffmas_jax.cli import UserError
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("from diffmas_jax.config_utils import eval_config\n\ndef get_config():\n    return eval_config()\n")
    bad.write_text("x = 1\n")
    evaluate.parse_flags(["prog", "--config", str(good), "--workdir", str(tmp_path / "w")])
    with pytest.raises(UserError, match="has no get_config"):
        evaluate.parse_flags(["prog", "--config", str(bad), "--workdir", str(tmp_path / "w")])


def test_embedded_configs_find_the_shared_data_from_any_directory(tmp_path, monkeypatch):
    """../shared/data is beside the clone, not beside the working directory."""
    import runpy
    monkeypatch.chdir(tmp_path)
    want = str((REPO.parent / "shared" / "data").resolve())
    assert runpy.run_path(str(REPO / "configs/embedded_eval.py"))["get_config"]().data_dir == want
    sweep = runpy.run_path(str(REPO / "configs/sweeps/embedded.py"))["get_config"]()
    assert sweep.eval.data_dir == sweep.train.data_dir == sweep.c2c_train.data_dir == want

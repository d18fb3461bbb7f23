"""Bad input to the CLIs (evaluate, generate, demo, the shared config-flag parsing): one clear
error line, non-zero exit, nothing written or half-overwritten.

Most checks run in-process (a fake ``run_batch`` / model where a run is needed); a few run the
real command line where the one-line output and the exit code are themselves the point."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, jsonl_eval_config
from diffmas_jax import config_utils, evaluate as ev
from diffmas_jax.cli import UserError

EMBEDDED_CFG = str(REPO / "configs/embedded_eval.py")
ROWS = [{"id": f"q{i}", "question": f"Question {i}?", "choices": ["red", "green", "blue", "gold"], "answer": i % 4}
        for i in range(5)]
TINY_HF = dict(TINY, model_type="llama")

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # inside ml_collections


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The run failed with exit 2 and ended with exactly one 'error: ' line, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return errors[0]


def tiny_model_cfg(layers: int = 2):
    from diffmas_jax.model.config import ModelConfig
    return ModelConfig.from_hf_dict(dict(TINY_HF, num_hidden_layers=layers))


@pytest.fixture
def fake_model(monkeypatch):
    """load_model gives a stand-in with a tiny ModelConfig (no tokenizer: no memory estimate);
    run_batch answers letter (k % 4) for 'Question k?', which is always correct."""
    from diffmas_jax import methods
    from diffmas_jax.model import loading
    calls = []
    model = types.SimpleNamespace(cfg=tiny_model_cfg())

    def fake_run_batch(model, questions, answer_instruction, mc, *, lora=None, lora_scale=1.0, seed=0):
        calls.append([q.splitlines()[0] for q in questions])
        texts, records = [], []
        for q in questions:
            k = int(q.split()[1].rstrip("?"))
            texts.append(f"The answer is \\boxed{{{'ABCD'[k % 4]}}}")
            records.append(dict(prompt_tokens=100 + k, generated_tokens=3, latent_slots=2,
                                trace_per_agent={"0:planner": 50}, generated_logprobs=[-0.5] * 3,
                                generated_ids=[1] * 3))
        return methods.BatchResult(texts=texts, records=records)

    monkeypatch.setattr(methods, "run_batch", fake_run_batch)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: model)
    return calls


def fake_config(data: Path, **kw):
    return jsonl_eval_config(data, **{"limit": 3, "method": "single", **kw})


# ------------------------------------------------------------ 1, 10: config flags
def test_misspelled_field_is_one_clean_line_with_the_suggestion():
    for flag, want in (("--config.tempreature=0.5", "unknown config field 'tempreature' (did you mean 'temperature'?)"),
                       ("--config.task_options.pth=x",
                        "unknown config field 'task_options.pth' (did you mean 'task_options.path'?)")):
        with pytest.raises(UserError) as e:
            ev.parse_flags(["evaluate", "--config", EMBEDDED_CFG, "--workdir", "/tmp/w", flag])
        msg = str(e.value)
        assert msg.startswith(want), msg
        assert "\\" not in msg and "\n" not in msg and '"' not in msg


def test_misspelled_field_on_the_command_line(tmp_path):
    wd = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "diffmas_jax.evaluate", "--config", EMBEDDED_CFG, "--workdir", str(wd),
                        "--config.tempreature=0.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    line = one_error_line(r)
    assert line.startswith("error: unknown config field 'tempreature' (did you mean 'temperature'?)"), line
    assert not wd.exists()


def _dict_config(tmp_path) -> Path:
    p = tmp_path / "dict_config.py"
    p.write_text("def get_config():\n    return {'model': 'embedded'}\n")
    return p


def test_get_config_returning_a_dict_evaluate(tmp_path):
    p = _dict_config(tmp_path)
    for extra in ([], ["--config.model=x"]):
        with pytest.raises(UserError, match=rf"^get_config\(\) in {p} must return an ml_collections ConfigDict"):
            ev.parse_flags(["evaluate", "--config", str(p), "--workdir", str(tmp_path / "w"), *extra])


def test_get_config_returning_a_dict_shared_parser(tmp_path):
    """cli.parse_config_flags is what train parses its flags with."""
    from absl import flags
    from ml_collections import config_flags
    from diffmas_jax.cli import parse_config_flags
    p = _dict_config(tmp_path)
    argv = ["train", "--config", str(p)]
    fv = flags.FlagValues()
    cf = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    with pytest.raises(UserError, match=r"must return an ml_collections ConfigDict"):
        parse_config_flags(fv, cf, argv)


def test_get_config_returning_a_dict_train_cli(tmp_path):
    wd = tmp_path / "run"
    p = _dict_config(tmp_path)
    r = subprocess.run([sys.executable, "-m", "diffmas_jax.train", "--config", str(p), "--workdir", str(wd)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    line = one_error_line(r)
    assert line == f"error: get_config() in {p} must return an ml_collections ConfigDict, got dict", line
    assert not wd.exists()


# ------------------------------------------------------------ 2: non-finite numbers
@pytest.mark.parametrize("field,value,msg", [
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("temperature", float("inf"), "temperature must be a finite number"),
    ("top_p", float("nan"), "top_p must be in"),
    ("realign_lambda", float("nan"), "realign_lambda must be a finite number >= 0"),
    ("realign_lambda", -1.0, "realign_lambda must be a finite number >= 0"),
    ("lora_scale", float("nan"), "lora_scale must be a finite number"),
    ("lora_scale", float("inf"), "lora_scale must be a finite number"),
    ("device_memory_gib", float("nan"), "device_memory_gib must be a finite positive number"),
])
def test_resolve_refuses_non_finite_numbers(field, value, msg):
    with pytest.raises(UserError, match=msg):
        config_utils.resolve(config_utils.eval_config(**{field: value}))


def test_resolved_config_is_strict_json():
    cfg = config_utils.resolve(config_utils.eval_config(temperature=0.5, realign_lambda=0.0, lora_scale=2.0))
    json.dumps(cfg, allow_nan=False)  # what config.json holds
    assert cfg["realign_lambda"] == 0.0 and cfg["lora_scale"] == 2.0


def test_nan_temperature_is_refused_before_anything_is_written(tmp_path, fake_model):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(UserError, match="temperature"):
        ev.evaluate(fake_config(data, temperature=float("nan")), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() and fake_model == []


@pytest.mark.parametrize("args,msg", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--top-p", "nan"], "--top-p must be in"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
])
def test_generate_refuses_bad_sampling(args, msg, monkeypatch):
    from diffmas_jax import generate
    from diffmas_jax.model import loading
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    with pytest.raises(UserError, match=msg):
        generate.main(["--prompt", "hi", *args])


# ------------------------------------------------------------ 7: records without their fields
def test_record_without_its_fields_is_damage_on_resume(tmp_path, fake_model):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    wd = tmp_path / "run"
    ev.evaluate(fake_config(data), wd, progress=False)
    lines = (wd / "items.jsonl").read_text().splitlines(keepends=True)
    rid = json.loads(lines[1])["id"]
    (wd / "items.jsonl").write_text(lines[0] + json.dumps({"id": rid}) + "\n" + lines[2])
    before = snapshot(wd)
    fake_model.clear()
    with pytest.raises(UserError, match=r"items.jsonl:2: damaged line"):
        ev.evaluate(fake_config(data), wd, progress=False)
    assert snapshot(wd) == before and fake_model == []


def test_record_without_its_fields_at_the_end_is_run_again(tmp_path, fake_model):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    wd = tmp_path / "run"
    ev.evaluate(fake_config(data), wd, progress=False)
    full = (wd / "items.jsonl").read_text().splitlines(keepends=True)
    last = json.loads(full[2])
    (wd / "items.jsonl").write_text(full[0] + full[1] + json.dumps({"id": last["id"], "correct": True}) + "\n")
    fake_model.clear()
    s = ev.evaluate(fake_config(data), wd, progress=False)
    assert fake_model == [["Question 2?"]]
    assert s["complete"] and s["n"] == 3 and s["correct"] == 3
    assert [json.loads(x)["id"] for x in (wd / "items.jsonl").read_text().splitlines()] == ["q0", "q1", "q2"]


def test_record_ok_checks_the_fields_the_summary_reads():
    good = {"id": "a", "correct": True, "prompt_tokens": 3, "generated_tokens": 2, "generated_logprobs": [-0.1]}
    assert ev.record_ok(good)
    for bad in ({"id": "a"}, dict(good, correct="yes"), dict(good, prompt_tokens=None),
                {k: v for k, v in good.items() if k != "generated_tokens"}, dict(good, generated_logprobs="x"),
                dict(good, samples=[{"correct": True}]), dict(good, id=["a"])):
        assert not ev.record_ok(bad), bad


# ------------------------------------------------------------ 8: adapters that do not fit
def _adapter(path: Path, layers: int, cfg=None, **meta_changes) -> Path:
    from diffmas_jax.lora import LoraConfig, _dims, save_adapter
    cfg = cfg or tiny_model_cfg()
    din, dout = _dims(cfg, "q")
    tree = {"q": {"a": np.zeros((layers, din, 2), np.float32), "b": np.zeros((layers, 2, dout), np.float32)}}
    save_adapter(path, tree, LoraConfig(rank=2, alpha=4.0, targets=("q",)), extra={"model": "embedded"})
    if meta_changes:
        meta = json.loads((path / "adapter.json").read_text())
        meta.update(meta_changes)
        (path / "adapter.json").write_text(json.dumps(meta))
    return path


def test_adapter_with_the_wrong_layer_count_is_refused_before_writing(tmp_path, fake_model):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    bad = _adapter(tmp_path / "bad", layers=10)
    wd = tmp_path / "run"
    with pytest.raises(UserError, match=r"does not fit the model: target 'q' .*10 layers, the model has 2"):
        ev.evaluate(fake_config(data, method="diffmas", lora=str(bad), limit=1), wd, progress=False)
    assert not wd.exists() and fake_model == []
    good = _adapter(tmp_path / "good", layers=2)
    s = ev.evaluate(fake_config(data, method="diffmas", lora=str(good), limit=1), wd, progress=False)
    assert s["complete"] and s["n"] == 1


@pytest.mark.parametrize("change,msg", [
    (dict(rank="abc"), "'rank' must be a positive integer"),
    (dict(alpha=None), "'alpha' must be a finite number"),
    (dict(targets="q"), "'targets' must be a list"),
    (dict(targets=["q", "k"]), "the tensors are for target"),
    (dict(rank=4), r"not \[layers, in, 4\]"),
    (dict(per_role="yes"), "'per_role' must be true or false"),
])
def test_adapter_json_fields_are_checked(tmp_path, change, msg):
    path = _adapter(tmp_path / "a", layers=2, **change)
    with pytest.raises(UserError, match=msg):
        ev.load_adapter(str(path))


def test_workdir_without_results_takes_a_changed_config(tmp_path, fake_model):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    wd = tmp_path / "run"
    wd.mkdir()
    # what a first run that failed before its first batch left behind
    old = config_utils.resolve(fake_config(data, max_new_tokens=5))
    (wd / "config.json").write_text(json.dumps(old))
    (wd / "items.jsonl").write_text("")
    s = ev.evaluate(fake_config(data), wd, progress=False)
    assert s["complete"] and json.loads((wd / "config.json").read_text())["max_new_tokens"] == 8
    # with results in it, a changed config is still refused and nothing changes
    before = snapshot(wd)
    with pytest.raises(UserError, match="different configuration"):
        ev.evaluate(fake_config(data, max_new_tokens=5), wd, progress=False)
    assert snapshot(wd) == before


@pytest.mark.parametrize("foreign", [
    TINY_HF,                                                              # a model directory
    {"model": "embedded", "method": "diffmas", "task": "arith", "steps": 2, "lr": 1e-3},  # a training run
    ["not", "a", "dict"],
])
def test_workdir_with_another_tools_config_is_refused(tmp_path, fake_model, foreign):
    """A model's or a training run's config.json is never overwritten by an evaluation."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps(foreign))
    before = snapshot(wd)
    with pytest.raises(UserError, match="not an evaluation's config|not a config object"):
        ev.evaluate(fake_config(data), wd, progress=False)
    assert snapshot(wd) == before


# ------------------------------------------------------------ 11: damaged model and fuser files
def _model_dir(tmp_path, name, config_text=None) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(config_text if config_text is not None else json.dumps(TINY_HF))
    return d


def test_generate_damaged_config_json(tmp_path):
    from diffmas_jax import generate
    d = _model_dir(tmp_path, "m", "{not json")
    with pytest.raises(UserError, match=r"config.json is not valid JSON"):
        generate.main(["--prompt", "hi", "--model", str(d)])


def test_generate_truncated_weights(tmp_path):
    from diffmas_jax import generate
    d = _model_dir(tmp_path, "m")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    with pytest.raises(UserError, match=r"cannot read the weights in .*model.safetensors"):
        generate.main(["--prompt", "hi", "--model", str(d)])


def test_generate_damaged_tokenizer(tiny_model_dir):
    from diffmas_jax import generate
    d = tiny_model_dir("llama")
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match=r"cannot load the tokenizer from"):
        generate.main(["--prompt", "hi", "--model", str(d)])


def _fuser(path: Path, cfg) -> Path:
    import jax
    from diffmas_jax.c2c import FuserConfig, init_fuser, save_fuser
    fc = FuserConfig.for_models(cfg, cfg, hidden=8, depth=3)
    return save_fuser(path, init_fuser(fc, jax.random.PRNGKey(0)), fc)


def test_c2c_damaged_fuser_json(tmp_path):
    from diffmas_jax import c2c
    cfg = tiny_model_cfg()
    f = _fuser(tmp_path / "fuser", cfg)
    receiver = types.SimpleNamespace(cfg=cfg)
    (f / "fuser.json").write_text("{")
    with pytest.raises(UserError, match=r"cannot read fuser .*\(fuser.json\): JSONDecodeError"):
        c2c.load_system(receiver, "r", None, f)
    (f / "fuser.json").write_text(json.dumps({"fuser": {"hidden": "x"}}))
    with pytest.raises(UserError, match=r"\(fuser.json\)"):
        c2c.load_system(receiver, "r", None, f)


def test_c2c_damaged_sharer_and_mismatched_fuser(tmp_path):
    from diffmas_jax import c2c
    cfg = tiny_model_cfg()
    f = _fuser(tmp_path / "fuser", cfg)
    receiver = types.SimpleNamespace(cfg=cfg)
    sharer = _model_dir(tmp_path, "sharer", "{not json")
    with pytest.raises(UserError, match=r"sharer.config.json is not valid JSON"):
        c2c.load_system(receiver, "r", str(sharer), f)
    other = _fuser(tmp_path / "other", tiny_model_cfg(layers=3))
    with pytest.raises(UserError, match=r"the fuser was built for"):
        c2c.load_system(receiver, "r", None, other)


# ------------------------------------------------------------ 12: code-task sandbox options
@pytest.mark.parametrize("options,msg", [
    (dict(timeout_s=-1.0), "timeout_s must be a finite number of seconds > 0"),
    (dict(timeout_s=0.0), "timeout_s must be a finite number of seconds > 0"),
    (dict(timeout_s=float("nan")), "timeout_s must be a finite number of seconds > 0"),
    (dict(timeout_s=float("inf")), "timeout_s must be a finite number of seconds > 0"),
    (dict(memory_mb=0), "memory_mb must be a positive integer"),
    (dict(memory_mb=-5), "memory_mb must be a positive integer"),
])
def test_code_task_options_are_checked(options, msg):
    from diffmas_jax.tasks import TaskError, get_task
    for name in ("mbppplus", "humanevalplus"):
        with pytest.raises(TaskError, match=msg):
            get_task(name, **options)
    assert get_task("mbppplus", timeout_s=5).timeout_s == 5.0


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # inside ml_collections
def test_code_time_limit_options_reach_the_task_from_the_command_line():
    """--config.task_options.limit_factor / reference_cap_s are fields of the eval config (a locked
    ConfigDict refuses unknown ones) and arrive at the code task; unset, the task's defaults hold."""
    from diffmas_jax.tasks import get_task
    config, _ = ev.parse_flags(["evaluate", "--config", EMBEDDED_CFG, "--workdir", "/tmp/w",
                                "--config.task=mbppplus", "--config.task_options.limit_factor=3",
                                "--config.task_options.reference_cap_s=120"])
    opts = config_utils.resolve(config)["task_options"]
    assert opts == {"limit_factor": 3.0, "reference_cap_s": 120.0}
    task = get_task("mbppplus", **opts)
    assert (task.limit_factor, task.reference_cap_s, task.timeout_s) == (3.0, 120.0, 30.0)
    assert config_utils.resolve(config_utils.eval_config(task="mbppplus"))["task_options"] == {}


def test_code_task_options_refused_before_writing(tmp_path, fake_model):
    wd = tmp_path / "run"
    from diffmas_jax.tasks import TaskError
    with pytest.raises(TaskError, match="timeout_s"):
        ev.evaluate(config_utils.eval_config(task="mbppplus", data_dir=None, task_options={"timeout_s": float("nan")},
                                             method="single", limit=1), wd, progress=False)
    assert not wd.exists() and fake_model == []


# ------------------------------------------------------------ 14: the demo's arguments
@pytest.mark.parametrize("args,msg", [
    (["--train-steps", "0"], "--train-steps must be a positive integer"),
    (["--eval-items", "0"], "--eval-items must be a positive integer"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--latent-steps", "-1"], "--latent-steps must be an integer >= 0"),
])
def test_demo_checks_its_arguments_first(tmp_path, monkeypatch, args, msg):
    from diffmas_jax import demo
    monkeypatch.setattr(demo, "run", lambda cmd: pytest.fail("the demo must not start a step"))
    wd = tmp_path / "demo"
    with pytest.raises(UserError, match=msg):
        demo.main(["--workdir", str(wd), *args])
    assert not wd.exists()


def test_demo_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "diffmas_jax.demo", "--workdir", str(f)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    line = one_error_line(r)
    assert "exists and is not a directory" in line, line
    assert f.read_text() == "keep me"
    r = subprocess.run([sys.executable, "-m", "diffmas_jax.demo", "--workdir", str(f / "sub")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert "is not a directory" in one_error_line(r)


def test_workdir_inside_a_file_is_refused_before_the_model_loads(tmp_path, fake_model, monkeypatch):
    from diffmas_jax.model import loading
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    f = tmp_path / "file"
    f.write_text("keep me")
    for wd in (f, f / "sub"):
        with pytest.raises(UserError, match="exists and is not a directory"):
            ev.evaluate(fake_config(data), wd, progress=False)
    from diffmas_jax import train_loop
    with pytest.raises(UserError, match="exists and is not a directory"):
        train_loop.check_workdir(f / "sub" / "deeper", {}, ())
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("rc,expected_rc,expected_lines", [(2, 2, 0), (1, 1, 1), (-9, 1, 1)])
def test_demo_passes_a_failed_steps_exit_code_on(monkeypatch, capsys, rc, expected_rc, expected_lines):
    """A step that failed on bad input printed its one error line; the demo adds none and exits 2.
    A step that crashed gets one line naming it."""
    from diffmas_jax import demo
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd: types.SimpleNamespace(returncode=rc))
    with pytest.raises(SystemExit) as e:
        demo.run([sys.executable, "-m", "diffmas_jax.train", "--config", "x.py"])
    assert e.value.code == expected_rc
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == expected_lines and (not err or err.startswith("error: step failed"))

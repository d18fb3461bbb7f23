"""The training CLI's inputs: a workdir refuses a config that would train something else,
bad numbers and configs of another kind are one clear error, the TextMAS+SFT upstream
text is checked before it is generated and cached under its settings, and a resume
survives an empty metrics.csv."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from diffmas_jax import c2c_training, train, train_loop
from diffmas_jax.cli import UserError
from diffmas_jax.methods import MethodConfig
from diffmas_jax.tasks.base import Item

REPO = Path(__file__).resolve().parents[1]
TRAIN_CFG = REPO / "configs" / "embedded_train.py"
C2C_CFG = REPO / "configs" / "embedded_c2c_train.py"


def load_config(path: Path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_cfg_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def write_jsonl(path: Path, offset: int = 0, n: int = 6) -> Path:
    path.write_text("".join(json.dumps({"question": f"What is {i + offset} + 1?", "answer": str(i + offset + 1)})
                            + "\n" for i in range(n)))
    return path


# ------------------------------------------------------------- workdir identity (3)
def _resolved(path: Path, **changes) -> dict:
    c = load_config(path)
    c.task, c.task_path = "jsonl", "/data/a.jsonl"
    for k, v in changes.items():
        setattr(c, k, v)
    return dict(json.loads(c.to_json()), target_encoding=train_loop.TARGET_ENCODING)  # as a run writes it


DIFFMAS_CHANGES = [("task_path", "/data/b.jsonl"), ("data_dir", "/data"), ("eval_items", 2), ("warmup_steps", 0),
                   ("weight_decay", 0.1), ("clip", 0.5), ("realign_lambda", 1e-3), ("enable_thinking", True),
                   ("text_max_new_tokens", 16)]
C2C_CHANGES = [("task_path", "/data/b.jsonl"), ("data_dir", "/data"), ("eval_items", 2), ("enable_thinking", True)]


@pytest.mark.parametrize("cfg,fields,field,value",
                         [(TRAIN_CFG, train.IDENTITY_FIELDS, f, v) for f, v in DIFFMAS_CHANGES]
                         + [(C2C_CFG, c2c_training.IDENTITY_FIELDS, f, v) for f, v in C2C_CHANGES],
                         ids=[f"diffmas-{f}" for f, _ in DIFFMAS_CHANGES] + [f"c2c-{f}" for f, _ in C2C_CHANGES])
def test_workdir_refuses_a_change_of_what_is_trained(tmp_path, cfg, fields, field, value):
    (tmp_path / "config.json").write_text(json.dumps(_resolved(cfg)))
    train_loop.check_workdir(tmp_path, _resolved(cfg), fields)  # the same config resumes
    with pytest.raises(UserError, match=rf"holds a run with a different config \({field}\)"):
        train_loop.check_workdir(tmp_path, _resolved(cfg, **{field: value}), fields)


@pytest.mark.parametrize("cfg,fields", [(TRAIN_CFG, train.IDENTITY_FIELDS), (C2C_CFG, c2c_training.IDENTITY_FIELDS)],
                         ids=["diffmas", "c2c"])
def test_workdir_begun_with_the_old_target_encoding_is_not_resumed(tmp_path, cfg, fields):
    """A run begun before cut targets lost their EOS has no target_encoding in its config.json:
    resuming it would mix the two encodings in one adapter, so it is refused; the config a run
    writes records the encoding."""
    old = _resolved(cfg)
    del old["target_encoding"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    resolved = {k: v for k, v in _resolved(cfg).items() if k != "target_encoding"}
    with pytest.raises(UserError, match=r"holds a run with a different config \(target_encoding\)"):
        train_loop.check_workdir(tmp_path, resolved, fields)
    assert resolved["target_encoding"] == "cut-without-eos"


@pytest.mark.parametrize("field,value", [("checkpoint_every", 5), ("keep_checkpoints", 4), ("eval_every", 0),
                                         ("export_peft", False), ("export_merged", True), ("remat", True),
                                         ("trace_capacity", 4096), ("on_nan", "skip"), ("mesh", "1,1,1")])
def test_workdir_resumes_across_cadence_and_export_changes(tmp_path, field, value):
    (tmp_path / "config.json").write_text(json.dumps(_resolved(TRAIN_CFG)))
    train_loop.check_workdir(tmp_path, _resolved(TRAIN_CFG, **{field: value}), train.IDENTITY_FIELDS)


# ----------------------------------------------------------------- bad numbers (5)
@pytest.mark.parametrize("field,value,message", [
    ("eval_items", -3, "eval_items must be >= 0"),
    ("clip", -1.0, "clip (the global gradient-norm bound) must be positive"),
    ("clip", 0.0, "clip (the global gradient-norm bound) must be positive"),
    ("clip", float("nan"), "clip must be a finite number"),
    ("warmup_steps", -5, "warmup_steps must be >= 0"),
    ("weight_decay", -0.01, "weight_decay must be >= 0"),
    ("weight_decay", float("inf"), "weight_decay must be a finite number"),
    ("lora_alpha", -16.0, "lora_alpha must be positive"),
    ("lora_alpha", float("nan"), "lora_alpha must be a finite number"),
    ("lr", float("nan"), "lr must be a finite number"),
    ("lr", float("inf"), "lr must be a finite number"),
    ("realign_lambda", -1e-5, "realign_lambda must be >= 0"),
    ("realign_lambda", float("inf"), "realign_lambda must be a finite number"),
    ("lora_dropout", float("nan"), "lora_dropout must be a finite number"),
    ("text_max_new_tokens", 0, "text_max_new_tokens must be positive"),
    ("trace_capacity", 0, "trace_capacity must be positive"),
    ("realign", "cubic", "unknown realign 'cubic'"),
    ("device_memory_gib", float("nan"), "device_memory_gib must be a finite number"),
    ("device_memory_gib", 0.0, "device_memory_gib must be positive"),
])
def test_bad_training_numbers_are_refused(field, value, message):
    c = load_config(TRAIN_CFG)
    train.validate(c)  # the shipped config is fine
    setattr(c, field, value)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.validate(c)


def test_merged_export_needs_a_shared_adapter():
    c = load_config(TRAIN_CFG)
    c.lora_per_role, c.export_merged = True, False
    train.check_config(c)  # per-role adapters export to peft/<role>/
    c.export_merged = True
    with pytest.raises(UserError, match="export_merged needs one shared adapter"):
        train.check_config(c)


def test_multi_host_runs_refuse_a_merged_export(monkeypatch):
    from diffmas_jax import distributed
    c = load_config(TRAIN_CFG)
    c.export_merged = True
    train.check_hosts(c)  # one host: fine
    monkeypatch.setattr(distributed, "process_count", lambda: 4)
    with pytest.raises(UserError, match="export_merged writes the model from one host"):
        train.check_hosts(c)
    c.export_merged = False
    train.check_hosts(c)


def test_remat_policy_is_checked_with_the_config():
    c = load_config(TRAIN_CFG)
    c.method, c.remat, c.remat_policy = "text_mas_sft", True, "foo"
    with pytest.raises(UserError, match="remat_policy='foo'"):
        train.validate(c)  # before the model loads, so before any upstream text is generated


@pytest.mark.parametrize("field,value,message", [
    ("eval_items", -1, "eval_items must be >= 0"),
    ("clip", -1.0, "clip (the global gradient-norm bound) must be positive"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number"),
    ("gate_t0", float("inf"), "gate_t0 must be a finite number"),
    ("warmup_frac", float("nan"), "warmup_frac must be a finite number"),
    ("lr", float("inf"), "lr must be a finite number"),
])
def test_bad_c2c_numbers_are_refused(field, value, message):
    c = load_config(C2C_CFG)
    c2c_training.validate(c)
    setattr(c, field, value)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        c2c_training.validate(c)


# ------------------------------------------------------- configs of another kind (9)
@pytest.mark.parametrize("config,method,missing,use", [
    ("configs/embedded_eval.py", "diffmas", "trace_grad", "use configs/embedded_train.py"),
    ("configs/embedded_train.py", "c2c", "warmup_frac", "use configs/embedded_c2c_train.py"),
    ("configs/embedded_c2c_train.py", "diffmas", "trace_grad", "use configs/embedded_train.py"),
    ("configs/sweeps/embedded.py", None, "method", "use configs/embedded_train.py"),
])
def test_config_of_another_kind_names_the_missing_fields(monkeypatch, config, method, missing, use):
    c = load_config(REPO / config)
    if method is not None:
        c.method = method
    monkeypatch.setattr(sys, "argv", ["train", "--config", config, "--workdir", "w"])
    with pytest.raises(UserError) as e:
        train.check_config_kind(c)
    msg = str(e.value)
    assert msg.startswith(f"{config} is not a ") and "training config: missing field(s) [" in msg
    assert f"'{missing}'" in msg and use in msg and "\n" not in msg


def test_shipped_training_configs_have_every_field(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train"])
    for path in sorted((REPO / "configs").glob("*_train.py")):
        train.check_config_kind(load_config(path))


def test_config_of_another_kind_is_one_error_line_from_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "diffmas_jax.train", "--config", "configs/embedded_eval.py",
                        "--config.method=diffmas", "--workdir", str(tmp_path / "w")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith("error: configs/embedded_eval.py is not a DiffMAS training config: missing field(s)")
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------- task_path wording (16)
def _split_config(**kw):
    base = dict(task="arith", task_path=None, split="train", data_dir=None, limit=10, eval_items=0, batch_size=1)
    return ml_collections.ConfigDict({**base, **kw})


def test_jsonl_without_task_path_names_task_path():
    with pytest.raises(UserError, match=r"--config\.task_path=<file\.jsonl>") as e:
        train_loop.split_items(_split_config(task="jsonl"))
    assert "path=<" not in str(e.value).replace("task_path=<", "")


def test_task_path_on_a_task_without_files_names_task_path(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl")
    with pytest.raises(UserError, match="task 'arith' reads no file, but task_path is set") as e:
        train_loop.split_items(_split_config(task_path=str(data)))
    assert "option(s)" not in str(e.value)
    _, items, _ = train_loop.split_items(_split_config(task="jsonl", task_path=str(data)))
    assert len(items) == 6


# ------------------------------------------------------- upstream notes cache (4b, 4c)
def _items(questions):
    return [Item(id=f"jsonl/{i}", question=q, gold="1", kind="text", target="1") for i, q in enumerate(questions)]


@pytest.fixture
def fake_speaker(monkeypatch):
    """speak_upstream without a model: the notes say which call and settings wrote them."""
    calls = []

    def speak(model, questions, mc, *a, **kw):
        calls.append(list(questions))
        return [[("planner", f"{q} / {mc.text_max_new_tokens} / call {len(calls)}")] for q in questions], None, None
    monkeypatch.setattr("diffmas_jax.methods.speak_upstream", speak)
    return calls


def _notes(tmp_path, items, max_new=4, roles=("planner", "solver"), model="m"):
    mc = MethodConfig(method="latent_mas", roles=roles, latent_steps=1)
    c = ml_collections.ConfigDict(dict(model=model, dtype="float32", layout="sequential", text_max_new_tokens=max_new,
                                       enable_thinking=None))
    return train.upstream_notes(None, mc, items[:-1], items[-1:], tmp_path, max_new, train.notes_settings(c, mc))


def test_notes_are_generated_once_per_setting(tmp_path, fake_speaker):
    items = _items(["q0", "q1", "q2"])
    first = _notes(tmp_path, items)
    assert len(fake_speaker) == 1 and first[0][0] == [("planner", "q0 / 4 / call 1")]
    assert _notes(tmp_path, items) == first and len(fake_speaker) == 1  # cached
    longer = _notes(tmp_path, items, max_new=16)  # other text_max_new_tokens: written again
    assert len(fake_speaker) == 2 and longer[0][0] == [("planner", "q0 / 16 / call 2")]
    _notes(tmp_path, items, max_new=16, model="other")  # another model
    assert len(fake_speaker) == 3
    _notes(tmp_path, items, max_new=16, model="other", roles=("critic", "solver"))  # other roles
    assert len(fake_speaker) == 4
    changed = _items(["q0", "another question", "q2"])  # another task file, same ids
    train_notes, _ = _notes(tmp_path, changed, max_new=16, model="other", roles=("critic", "solver"))
    assert fake_speaker[-1] == ["another question"]
    assert train_notes[1] == [("planner", "another question / 16 / call 5")]
    assert train_notes[0] == [("planner", "q0 / 16 / call 4")]


def test_only_the_main_host_writes_the_notes_cache(tmp_path, fake_speaker, monkeypatch):
    from diffmas_jax import distributed
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    notes, _ = _notes(tmp_path, _items(["q0", "q1"]))
    assert notes == [[("planner", "q0 / 4 / call 1")]] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ['{"settings": {"model": "m", "dty', "", "\0\0\0\0", '["not", "an", "object"]',
                                     '{"jsonl/0": [["planner", "old format"]]}'])
def test_an_unreadable_or_old_notes_cache_is_written_again(tmp_path, fake_speaker, content):
    (tmp_path / "text_notes.json").write_text(content)
    items = _items(["q0", "q1"])
    notes, eval_notes = _notes(tmp_path, items)
    assert len(fake_speaker) == 1 and notes == [[("planner", "q0 / 4 / call 1")]]
    assert eval_notes == [[("planner", "q1 / 4 / call 1")]]
    saved = json.loads((tmp_path / "text_notes.json").read_text())
    assert set(saved["notes"]) == {"jsonl/0", "jsonl/1"}


# ------------------------------------------------------------------ metrics.csv (6)
FIELDS = ["step", "loss", "grad_norm", "tokens_per_s", "eval_loss"]


@pytest.mark.parametrize("content", ["", "\0" * 64, "step,loss\n1,0.5\n", "garbage\n"])
def test_resume_with_an_empty_or_damaged_metrics_file_writes_the_header(tmp_path, content):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(content)
    train_loop.resume_metrics(csv_path, FIELDS, 3)
    assert csv_path.read_text().splitlines() == [",".join(FIELDS)]


def test_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    rows = [",".join(FIELDS)] + [f"{i},0.{i},1.0,10," for i in range(1, 6)]
    csv_path.write_text("\n".join(rows) + "\n3,0.3,1")  # and a torn last row
    train_loop.resume_metrics(csv_path, FIELDS, 3)
    assert csv_path.read_text().splitlines() == rows[:4]
    train_loop.resume_metrics(csv_path, FIELDS, 0)  # a fresh run
    assert csv_path.read_text().splitlines() == rows[:1]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary left


# ------------------------------------------------------------- the CLI end to end
@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tiny llama with the embedded model's tokenizer (chat template), trained in seconds."""
    import transformers
    from conftest import save_tiny_model
    from diffmas_jax.model.loading import resolve_model_dir
    path = save_tiny_model(tmp_path_factory.mktemp("chat") / "m", "llama", vocab_size=49152, hidden_size=32,
                           intermediate_size=48, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                           initializer_range=0.5)
    transformers.AutoTokenizer.from_pretrained(str(resolve_model_dir("embedded"))).save_pretrained(path)
    return path


def cli(model_dir, workdir, data, *extra):
    cmd = [sys.executable, "-m", "diffmas_jax.train", "--config", str(TRAIN_CFG), "--workdir", str(workdir),
           f"--config.model={model_dir}", "--config.task=jsonl", f"--config.task_path={data}", "--config.limit=6",
           "--config.batch_size=1", "--config.roles=planner,solver", "--config.latent_steps=1",
           "--config.max_target_tokens=8", "--config.export_peft=False", "--config.eval_every=0",
           "--config.checkpoint_every=1", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_resume_after_empty_metrics_and_a_changed_data_file_is_refused(chat_dir, tmp_path):
    a, b = write_jsonl(tmp_path / "a.jsonl"), write_jsonl(tmp_path / "b.jsonl", offset=10)
    w = tmp_path / "w"
    r = cli(chat_dir, w, a, "--config.steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    (w / "metrics.csv").write_text("")  # what a crash under delayed allocation leaves
    r = cli(chat_dir, w, a, "--config.steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step 1" in r.stdout and (w / "adapter").exists()
    assert (w / "metrics.csv").read_text().splitlines() == [",".join(FIELDS + ["seg_grad_0_planner"])]
    config = (w / "config.json").read_text()
    r = cli(chat_dir, w, b, "--config.steps=1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"error: {w} holds a run with a different config (task_path); "
                                                 "use a new --workdir")
    assert (w / "config.json").read_text() == config  # still records a.jsonl


def test_text_mas_sft_checks_the_trace_before_generating_text(chat_dir, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl")
    w = tmp_path / "w"
    r = cli(chat_dir, w, a, "--config.steps=1", "--config.method=text_mas_sft", "--config.text_max_new_tokens=4",
            "--config.trace_capacity=10")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: KV trace overflow: training needs")
    assert "upstream text" not in r.stderr and not (w / "text_notes.json").exists() and not w.exists()


def test_every_cli_help_exits_0():
    """--help is a request, not an error: exit 0 with the usage, for every command."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    for module in ("train", "evaluate", "sweep", "tables", "demo"):
        r = subprocess.run([sys.executable, "-m", f"diffmas_jax.{module}", "--help"], cwd=repo,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (module, r.returncode, r.stderr[-500:])
        assert "--workdir" in r.stdout or "--workdirs" in r.stdout, module


def test_steps_must_fill_whole_accumulation_windows():
    """steps=7, grad_accum=4: the last 3 micro-batches would never reach the optimizer."""
    c = load_config(TRAIN_CFG)
    c.steps, c.grad_accum = 7, 4
    with pytest.raises(UserError, match=r"steps \(7 micro-batches\) must be a multiple of grad_accum \(4\)"):
        train.validate(c)
    c.steps = 8
    train.validate(c)


@pytest.mark.parametrize("size", ["4b", "8b", "14b"])
def test_paper_training_renders_the_prompts_it_is_evaluated_on(size):
    """The chat template (thinking on or off) changes every agent's prompt, and with it the
    latent steps an adapter is trained on: training and evaluation rows must agree."""
    train_cfg = load_config(REPO / f"configs/qwen3_{size}_train.py")
    eval_cfg = load_config(REPO / f"configs/qwen3_{size}.py")
    assert train_cfg.model == eval_cfg.model
    assert train_cfg.enable_thinking == eval_cfg.enable_thinking

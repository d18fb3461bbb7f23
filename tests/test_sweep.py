"""Sweep runner: the plan of a small grid, skipping finished cells, rerunning incomplete ones,
sharding. A fake runner stands in for train/evaluate (it writes what they write)."""
import json
import sys
from pathlib import Path

import ml_collections
import pytest

from diffmas_jax import sweep
from diffmas_jax.cli import UserError
from diffmas_jax.sweep import Sweep, parse_shard, plan, shard

REPO = Path(__file__).resolve().parents[1]
# the plan parses each cell's commands with ml_collections, whose config loader calls load_module()
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def small_config(root):
    c = ml_collections.ConfigDict()
    c.root = str(root)
    c.eval_config = "configs/embedded_eval.py"
    c.train_config = "configs/embedded_train.py"
    c.c2c_train_config = "configs/embedded_c2c_train.py"
    c.models = "embedded"
    c.tasks = "arith,comm"
    c.methods = "single,latent_mas,diffmas"
    c.latent_steps = "4"
    c.seeds = "0"
    c.trace_grads = "stop"
    c.communications = "concat"
    c.visibilities = "full"
    c.roles = "planner,solver"
    c.eval = ml_collections.ConfigDict({"limit": 8, "max_new_tokens": 16})
    c.train = ml_collections.ConfigDict({"steps": 3, "limit": 16})
    c.task_eval = ml_collections.ConfigDict({"comm": {"max_new_tokens": 24}})
    c.task_train = ml_collections.ConfigDict({})
    c.grids = ml_collections.ConfigDict({
        "main": {},
        "steps": {"tasks": "arith", "methods": "latent_mas,diffmas", "latent_steps": "0,4"},
        "tg": {"tasks": "arith", "methods": "diffmas", "trace_grads": "full", "seeds": "0,1"},
    })
    return c


def flags_of(cmd):
    return {a.split("=", 1)[0][len("--config."):]: a.split("=", 1)[1] for a in cmd if a.startswith("--config.")}


class FakeRunner:
    """Writes what train / evaluate would: an adapter; a summary (complete unless told otherwise)."""

    def __init__(self, incomplete=(), fail=()):
        self.calls, self.incomplete, self.fail = [], set(incomplete), set(fail)

    def __call__(self, cmd, log):
        module, workdir = cmd[2], Path(cmd[cmd.index("--workdir") + 1])
        self.calls.append((module.rsplit(".", 1)[1], str(workdir)))
        if any(f in str(workdir) for f in self.fail):
            return 1
        f = flags_of(cmd)
        workdir.mkdir(parents=True, exist_ok=True)
        if module == "diffmas_jax.train":
            (workdir / "config.json").write_text(json.dumps(f))
            (workdir / "adapter").mkdir(exist_ok=True)
            (workdir / "adapter" / "adapter.json").write_text("{}")
        else:
            n = int(f["limit"])
            done = n // 2 if any(s in str(workdir) for s in self.incomplete) else n
            (workdir / "summary.json").write_text(json.dumps(
                {"complete": done == n, "n": done, "n_total": n, "accuracy": 0.5, "config": f}))
        return 0


def test_plan_of_a_small_grid(tmp_path):
    cells = plan(small_config(tmp_path))
    ids = [c.id for c in cells]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert ids == [
        "embedded/arith/planner-solver/diffmas_m0_stop_concat_full/seed0",
        "embedded/arith/planner-solver/diffmas_m4_full_concat_full/seed0",
        "embedded/arith/planner-solver/diffmas_m4_full_concat_full/seed1",
        "embedded/arith/planner-solver/diffmas_m4_stop_concat_full/seed0",
        "embedded/arith/planner-solver/latent_mas_m0_concat_full/seed0",
        "embedded/arith/planner-solver/latent_mas_m4_concat_full/seed0",   # in main and steps: runs once
        "embedded/arith/solo/single/seed0",
        "embedded/comm/planner-solver/diffmas_m4_stop_concat_full/seed0",
        "embedded/comm/planner-solver/latent_mas_m4_concat_full/seed0",
        "embedded/comm/solo/single/seed0",
    ]
    single = next(c for c in cells if c.id == "embedded/comm/solo/single/seed0")
    assert (single.latent_steps, single.trace_grad, single.roles, single.train_id) == (None, None, None, None)
    assert dict(single.eval_overrides) == {"limit": 8, "max_new_tokens": 24}      # task_eval wins over eval
    d = next(c for c in cells if c.id.endswith("diffmas_m4_full_concat_full/seed1"))
    assert d.grid == "tg" and d.train_id == "_train/embedded/arith/planner-solver/diffmas_m4_full_concat_full/seed1"
    # only the named grids
    assert {c.grid for c in plan(small_config(tmp_path), ["tg"])} == {"tg"}
    with pytest.raises(UserError, match="unknown grid"):
        plan(small_config(tmp_path), ["nope"])


def test_commands(tmp_path):
    c = small_config(tmp_path)
    s = Sweep(c)
    cell = next(x for x in plan(c) if x.id == "embedded/arith/planner-solver/diffmas_m4_stop_concat_full/seed0")
    train, ev = s.train_command(cell), s.eval_command(cell)
    assert train[:3] == [sys.executable, "-m", "diffmas_jax.train"] and ev[2] == "diffmas_jax.evaluate"
    assert train[train.index("--config") + 1] == str(REPO / "configs/embedded_train.py")
    tf, ef = flags_of(train), flags_of(ev)
    assert tf == {"steps": "3", "limit": "16", "method": "diffmas", "model": "embedded", "task": "arith",
                  "seed": "0", "roles": "planner,solver", "latent_steps": "4", "trace_grad": "stop",
                  "communication": "concat", "visibility": "full"}
    assert ef["method"] == "diffmas" and ef["latent_steps"] == "4" and ef["limit"] == "8"
    assert ef["lora"] == str(tmp_path / cell.train_id / "adapter") and "trace_grad" not in ef
    single = next(x for x in plan(c) if x.method == "single")
    assert "roles" not in flags_of(s.eval_command(single)) and "latent_steps" not in flags_of(s.eval_command(single))


def test_c2c_cells_take_their_own_train_config_and_settings(tmp_path):
    """C2C trains with its own config file and its own --config fields (``c2c_train``):
    the LoRA trainer's fields (e.g. lr, warmup_steps) never reach it."""
    c = small_config(tmp_path)
    c.train.lr = 1e-3
    c.train.warmup_steps = 5
    c.c2c_train = ml_collections.ConfigDict({"steps": 6, "limit": 16})
    c.grids.c2c = {"tasks": "arith", "methods": "c2c"}
    s = Sweep(c)
    cell = next(x for x in plan(c, ["c2c"]))
    train, ev = s.train_command(cell), s.eval_command(cell)
    assert train[train.index("--config") + 1] == str(REPO / "configs/embedded_c2c_train.py")
    tf = flags_of(train)
    assert tf["steps"] == "6" and tf["method"] == "c2c" and "lr" not in tf and "warmup_steps" not in tf
    assert flags_of(ev)["fuser"] == str(tmp_path / cell.train_id / "fuser") and flags_of(ev)["method"] == "c2c"


def test_skips_finished_and_reruns_incomplete(tmp_path):
    c = small_config(tmp_path)
    cells = plan(c)
    fake = FakeRunner(incomplete={"arith/solo/single"})
    s = Sweep(c, runner=fake)
    results = {cell.id: s.run_cell(cell) for cell in cells}
    assert results["embedded/arith/solo/single/seed0"] == "incomplete"
    assert all(v == "ran" for k, v in results.items() if "arith/solo/single" not in k)
    trains = [w for m, w in fake.calls if m == "train"]
    assert len(trains) == 5 and len([1 for m, _ in fake.calls if m == "evaluate"]) == 10
    # train before evaluate, in the cell's own training dir
    i = fake.calls.index(("train", str(tmp_path / "_train/embedded/comm/planner-solver/diffmas_m4_stop_concat_full/seed0")))
    assert fake.calls[i + 1] == ("evaluate", str(tmp_path / "embedded/comm/planner-solver/diffmas_m4_stop_concat_full/seed0/eval"))

    # Second pass: only the incomplete cell runs again (and finishes now).
    fake2 = FakeRunner()
    s2 = Sweep(c, runner=fake2)
    states = {cell.id: s2.status(cell)[0] for cell in cells}
    assert states.pop("embedded/arith/solo/single/seed0") == "incomplete" and set(states.values()) == {"done"}
    for cell in cells:
        if s2.status(cell)[0] != "done":
            assert s2.run_cell(cell) == "ran"
    assert fake2.calls == [("evaluate", str(tmp_path / "embedded/arith/solo/single/seed0/eval"))]
    assert all(s2.status(cell)[0] == "done" for cell in cells)

    # A missing summary reruns the evaluation only: the trained adapter is kept.
    cell = next(x for x in cells if x.id.endswith("comm/planner-solver/diffmas_m4_stop_concat_full/seed0"))
    (s2.cell_dir(cell) / "eval" / "summary.json").unlink()
    fake3 = FakeRunner()
    Sweep(c, runner=fake3).run_cell(cell)
    assert [m for m, _ in fake3.calls] == ["evaluate"]

    # A raised limit extends the cell (evaluate resumes); other changes are conflicts, never mixed.
    replan = lambda: next(x for x in plan(c) if x.id == cell.id)
    c.eval.limit = 12
    assert Sweep(c).status(replan()) == ("extend", "limit 8 -> 12")
    c.eval.limit = 8
    c.eval.batch_size = 3                     # evaluate resumes across batch sizes (greedy): still done
    assert Sweep(c).status(replan())[0] == "done"
    c.task_eval.comm.max_new_tokens = 99
    state, detail = Sweep(c).status(replan())
    assert state == "conflict" and "max_new_tokens" in detail
    c.task_eval.comm.max_new_tokens = 24
    c.train.eval_every = 7                    # bookkeeping, not identity: the adapter stands
    assert Sweep(c).status(replan())[0] == "done"
    c.train.steps = 5
    state, detail = Sweep(c).status(replan())
    assert state == "conflict" and "trained with other values of steps" in detail
    fake4 = FakeRunner()
    assert Sweep(c, runner=fake4).run_cell(replan()) == "conflict" and fake4.calls == []


def test_failures_and_the_cli(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "sweep_cfg.py"
    cfg.write_text("import sys\nsys.path.insert(0, %r)\nfrom test_sweep import small_config\n"
                   "def get_config():\n    return small_config(%r)\n" % (str(Path(__file__).parent), str(tmp_path / "r")))
    assert sweep.main(["--config", str(cfg), "--dry-run", "--grids", "main"]) == 0
    out = capsys.readouterr().out
    assert "6 cells" in out and "plan: 6 todo" in out
    assert out.count("-m diffmas_jax.train") == 2 and out.count("-m diffmas_jax.evaluate") == 6
    fake = FakeRunner(fail={"comm/solo"})
    monkeypatch.setattr(sweep, "run_logged", fake)
    assert sweep.main(["--config", str(cfg), "--grids", "main", "--keep-going"]) == 1   # one cell failed
    out = capsys.readouterr().out
    assert "embedded/comm/solo/single/seed0: failed (eval)" in out
    fake.fail.clear()
    fake.calls.clear()
    assert sweep.main(["--config", str(cfg), "--grids", "main", "--set", "eval.limit=8"]) == 0
    assert fake.calls == [("evaluate", str(tmp_path / "r/embedded/comm/solo/single/seed0/eval"))]
    assert sweep.main(["--config", str(cfg), "--dry-run", "--grids", "main"]) == 0
    assert "plan: 6 done" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown sweep config field"):
        sweep.main(["--config", str(cfg), "--set", "bogus=1"])
    with pytest.raises(UserError, match="not found"):
        sweep.main(["--config", str(tmp_path / "none.py")])


def test_shards_split_the_plan(tmp_path):
    c = small_config(tmp_path)
    c.task_train = ml_collections.ConfigDict({"comm": {"task": "arith"}})   # comm's adapter trains on arith
    cells = plan(c)
    shared = [x for x in cells if x.train_id == "_train/embedded/arith/planner-solver/diffmas_m4_stop_concat_full/seed0"]
    assert [x.task for x in shared] == ["arith", "comm"]
    for n in (2, 3, 5):
        parts = [shard(cells, i, n) for i in range(n)]
        assert sorted(x.id for p in parts for x in p) == sorted(x.id for x in cells)   # every cell exactly once
        assert sum(all(x in p for x in shared) for p in parts) == 1                    # a shared training: one worker
    assert parse_shard("2/4") == (2, 4)
    assert parse_shard("auto", {}) == (0, 1)
    assert parse_shard("auto", {"TPU_WORKER_ID": "3", "TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == (3, 4)
    assert parse_shard("auto", {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_conflicting_grids_are_refused(tmp_path):
    c = small_config(tmp_path)
    c.grids.steps.eval = {"limit": 99}        # the same cell (latent_mas m=4) with another eval limit
    with pytest.raises(UserError, match="latent_mas_m4.* is in grids"):
        plan(c)
    c = small_config(tmp_path)
    c.grids.main.methods = "single,c3po"
    with pytest.raises(UserError, match="unknown method 'c3po'"):
        plan(c)


def test_status_matches_a_real_resolved_eval_config(tmp_path):
    """evaluate.py records resolved values (ints, lists, absolute paths): a finished cell is still 'done'."""
    from diffmas_jax import config_utils
    c = small_config(tmp_path)
    c.eval.data_dir = str(tmp_path)
    s = Sweep(c)
    cell = next(x for x in plan(c) if x.id.endswith("arith/planner-solver/diffmas_m4_stop_concat_full/seed0"))
    adapter = s.train_dir(cell) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter.json").write_text("{}")
    ev = sweep.load_config(str(REPO / "configs/embedded_eval.py"))   # what --config.FIELD=VALUE would set
    for k, v in s.eval_fields(cell).items():
        setattr(ev, k, str(v) if isinstance(ev[k], str) else v)
    resolved = config_utils.resolve(ev)
    assert isinstance(resolved["roles"], list) and resolved["latent_steps"] == 4
    (s.cell_dir(cell) / "eval").mkdir(parents=True)
    (s.cell_dir(cell) / "eval" / "summary.json").write_text(json.dumps(
        {"complete": True, "n": 8, "n_total": 8, "config": resolved}))
    assert s.status(cell)[0] == "done"
    assert sweep.differences({"latent_steps": "4,4", "roles": "planner,solver"},
                             {"latent_steps": [4, 4], "roles": ["planner", "solver"]}) == []


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.eval, "limti", 5), r"sweep config eval: unknown eval field 'limti' \(did you mean 'limit'\?\)"),
    (lambda c: c.task_eval.comm.update({"max_new_tokns": 9}),
     r"sweep config task_eval.comm: unknown eval field 'max_new_tokns' \(did you mean 'max_new_tokens'\?\)"),
    (lambda c: c.grids.tg.update({"eval": {"temprature": 0.5}}),
     r"sweep config grids.tg.eval: unknown eval field 'temprature' \(did you mean 'temperature'\?\)"),
    (lambda c: setattr(c.train, "stpes", 3),
     r"sweep config train: unknown train field 'stpes' of configs/embedded_train.py \(did you mean 'steps'\?\)"),
    # the LoRA trainer has no gate temperature: a field of the C2C trainer's config is not one of its fields
    (lambda c: setattr(c.train, "gate_t0", 1.0), r"unknown train field 'gate_t0' of configs/embedded_train.py"),
    (lambda c: c.task_train.update({"arith": {"max_target_tokns": 9}}),
     r"sweep config task_train.arith: unknown train field 'max_target_tokns'"),
    (lambda c: setattr(c, "tasks", "arith,com"), r"grid 'main': unknown task 'com' \(did you mean 'comm'\?\)"),
    (lambda c: c.task_train.update({"comm": {"task": "arth"}}),
     r"unknown train task 'arth' \(did you mean 'arith'\?\)"),
    (lambda c: c.task_eval.update({"cmm": {"limit": 3}}),
     r"sweep config task_eval: unknown task 'cmm' \(did you mean 'comm'\?\)"),
    (lambda c: setattr(c, "methods", "single,difmas"), r"grid 'main': unknown method 'difmas' \(did you mean 'diffmas'\?\)"),
    (lambda c: setattr(c, "methods", "single,zzz"), r"unknown method 'zzz'; known: single, text_mas, latent_mas"),
], ids=["eval", "task_eval", "grid_eval", "train", "c2c_field_in_train", "task_train", "task", "train_task",
        "task_eval_key", "method", "method_far"])
def test_typos_are_refused_by_the_plan(tmp_path, change, message):
    """A wrong eval / train field, task or method is one error naming it, from the plan: before any
    cell trains (a typo in the eval block used to surface only after the adapter was trained)."""
    c = small_config(tmp_path)
    change(c)
    with pytest.raises(UserError, match=message):
        plan(c)


def test_each_trainer_takes_its_own_fields(tmp_path):
    """train is checked against the LoRA trainer's config file, c2c_train against the C2C trainer's."""
    c = small_config(tmp_path)
    c.c2c_train = ml_collections.ConfigDict({"gate_t0": 1.0, "warmup_frac": 0.1, "steps": 6})
    c.grids.c2c = {"tasks": "arith", "methods": "c2c"}
    assert len(plan(c)) == 11
    c.c2c_train.warmup_steps = 5                # the LoRA trainer's field, not the C2C trainer's
    with pytest.raises(UserError, match=r"sweep config c2c_train: unknown train field 'warmup_steps' "
                                        r"of configs/embedded_c2c_train.py"):
        plan(c)
    assert len(plan(c, ["main"])) == 6          # a grid without C2C cells does not use c2c_train
    # a nested block's keys are fields of that block
    c = small_config(tmp_path)
    c.eval.task_options = {"timeout_s": 5.0}
    assert len(plan(c)) == 10
    c.eval.task_options = {"timeot_s": 5.0}
    with pytest.raises(UserError, match=r"sweep config eval.task_options: unknown eval field 'timeot_s' "
                                        r"\(did you mean 'timeout_s'\?\)"):
        plan(c)
    # the train config file must load
    c = small_config(tmp_path)
    c.train_config = str(tmp_path / "missing_train.py")
    with pytest.raises(UserError, match="train_config .*missing_train.py not found"):
        plan(c)


def sweep_errors(tmp_path, monkeypatch, capsys, flag) -> list[str]:
    """The error line of the small sweep with ``--set flag``, with --dry-run and without; each
    run lists no cell as todo, exits 2, and runs and writes nothing."""
    from diffmas_jax.cli import run_cli
    cfg = tmp_path / "sweep_cfg.py"
    cfg.write_text("import sys\nsys.path.insert(0, %r)\nfrom test_sweep import small_config\n"
                   "def get_config():\n    return small_config(%r)\n" % (str(Path(__file__).parent), str(tmp_path / "r")))
    fake = FakeRunner()
    monkeypatch.setattr(sweep, "run_logged", fake)
    errors = []
    for extra in (["--dry-run"], []):
        with pytest.raises(SystemExit) as e:
            run_cli(sweep.main, ["--config", str(cfg), "--set", "methods=diffmas", "--set", flag, *extra])
        assert e.value.code == 2
        cap = capsys.readouterr()
        assert "todo" not in cap.out
        err = cap.err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        errors.append(err)
    assert fake.calls == [] and not (tmp_path / "r").exists()
    return errors


@pytest.mark.parametrize("flag", ["eval.limti=5", "tasks=arc_esy", "methods=difmas", "train.stpes=1"])
def test_typos_fail_before_anything_runs(tmp_path, monkeypatch, capsys, flag):
    """--dry-run lists no typo'd cell as todo, and a real run trains nothing: one error line, rc 2."""
    key, value = flag.split("=")
    bad = key.split(".")[-1] if "." in key else value          # the field, or the task / method
    for err in sweep_errors(tmp_path, monkeypatch, capsys, flag):
        assert repr(bad) in err, err


@pytest.mark.parametrize("flag,message", [
    ("eval.batch_size=0", r"\(eval\): batch_size must be a positive integer, got 0"),
    ("eval.split=tset", r"\(eval\): task 'arith' has no split 'tset'"),
    ("trace_grads=ful", r"\(train\): unknown trace_grad 'ful'"),
    ("communications=add", r"\(train\): unknown communication 'add'"),
    ("roles=planner,foo", r"\(train\): unknown agent role 'foo'"),
    ("train.lr=-1", r"\(train\): lr must be"),
    ("models=/nonexistent/model", r"\(train\): model /nonexistent/model not found"),
    ("eval_config=configs/embedded_evl.py", r"eval_config configs/embedded_evl.py not found"),
])
def test_bad_values_fail_before_anything_runs(tmp_path, monkeypatch, capsys, flag, message):
    """Every cell's train and eval command is parsed and checked as its CLI will, before any
    cell runs: a bad value is one error line naming the cell, not a failure after a training."""
    import re
    for err in sweep_errors(tmp_path, monkeypatch, capsys, flag):
        assert re.search(message, err), err

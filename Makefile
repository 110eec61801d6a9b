# The whole set-up on a fresh machine: `make run` or `make test`.
# Both create .venv if missing, install torch (CPU wheel) first and then the project, and are
# fast once set up (the install step reruns only when pyproject.toml changes).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cxrtrek-installed
TORCH  ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test lint typecheck clean

DEMO_MODEL ?= cxrtrek/model/checkpoints/demo
DEMO_STUDY ?= cxrtrek/data/studies/phantom_with_prior/phantoms.json

run: $(STAMP)
	$(VENV)/bin/cxrtrek inspect cxrtrek/data/examples
	$(VENV)/bin/cxrtrek run $(DEMO_STUDY) --backend inprocess:$(DEMO_MODEL)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check cxrtrek tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

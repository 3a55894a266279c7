# Two commands: `make run` (set up, then serve; the embedded tiny model when MODEL is empty) and
# `make test` (set up, then run the test suite). Both create .venv on first use.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0   # the CPU build on CI machines; override with a CUDA build on GPU hosts
MODEL ?=
ARGS  ?=

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(foreach w,$(strip $(TORCH)),'$(w)')
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/dsaserve serve $(if $(MODEL),--model-path $(MODEL)) $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

.PHONY: install run test

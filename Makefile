# `make run` runs the main job (the MQAR study, minutes on CPU); `make test` runs the tests.
# Both build .venv on first use; the stamp file keeps later runs from reinstalling
# until setup.py changes.

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test clean

run: $(STAMP)
	$(VENV_PYTHON) -m experiments.mqar_study --config=configs/mqar_study.py --workdir=runs/mqar_study

test: $(STAMP)
	$(VENV_PYTHON) -m pytest tests -q -n 2 --dist worksteal

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install --upgrade pip
	$(VENV_PYTHON) -m pip install -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) *.egg-info

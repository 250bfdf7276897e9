# make demo : set up .venv (if missing) and run the main job on a small real example
# make test : set up .venv (if missing) and run the fast test suite (CI runs exactly this)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(subst =,-,$(subst /,_,$(TORCH)))

.PHONY: install demo test test-all clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (so pip keeps the pinned build), then the suite with its dev extra.
$(STAMP): pyproject.toml requirements/crosscheck.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps -r requirements/crosscheck.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m experiments.run experiment=fig2

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info

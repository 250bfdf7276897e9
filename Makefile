# make demo : set up .venv (if missing) and run the main job on a small real example
# make test : set up .venv (if missing) and run the fast test suite (CI runs exactly this)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(subst =,-,$(subst /,_,$(TORCH)))

.PHONY: install demo test test-all figures gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (so pip keeps the pinned build), then the suite with its dev extra.
$(STAMP): pyproject.toml requirements/crosscheck.txt requirements/peers.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps -r requirements/crosscheck.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/peers.txt
	touch $(STAMP)

install: $(STAMP)

# The main job on a small real example: train a small CNN on the 8x8 digits, then its Hessian and GGN
# spectra by Lanczos beside the exact eigenvalues (about a minute on 2 CPU cores).
DEMO := outputs/demo
demo: install
	$(PY) -m experiments.run experiment=demo_train hydra.run.dir=$(DEMO)/train overwrite=true
	$(PY) -m experiments.run experiment=demo_spectrum analysis.checkpoint=$(DEMO)/train/checkpoint-00010.pt \
		hydra.run.dir=$(DEMO)/spectrum overwrite=true

# Two pytest workers (pytest-xdist), one torch thread each (two workers with two threads each on two cores
# ran tests/test_operators.py 5x slower: 115 s against 23 s), each module's tests on one worker (--dist
# loadscope: its fixtures built once; loadgroup does not group with pytest 9.2). WORKERS=0: one process.
WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadscope)

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

# Every paper artefact: run its presets (skipping runs whose results exist for the same config), draw its
# figure, write paper_figures/REPORT.md. SCALE=smoke (2 CPU cores, < 30 min; figures also to docs/figures)
# or SCALE=paper (a GPU with CIFAR on disk). FORCE=1 reruns every run.
SCALE ?= smoke
FORCE ?=
figures: install
	$(PY) -m paper_figures.make_figures --scale $(SCALE) $(if $(FORCE),--force,) \
		$(if $(filter smoke,$(SCALE)),--gallery docs/figures,)

# One GPU, under 8 minutes: the gpu-marked tests, the product benchmark and the side-by-side Lanczos against
# the peers on VGG16 and PreResNet-20 (fake CIFAR, paper widths) and the cost preset; one table, also in
# outputs/gpu_check/<time>/gpu_check.{md,json}. Without CUDA (or TINY=1) the same steps at tiny sizes (~2 min).
TINY ?=
gpu-check: install
	$(PY) -m experiments.gpu_check $(if $(TINY),--tiny,)

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info

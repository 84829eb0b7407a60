# vitcrs: install, test, demo, sweep. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first so a CPU or CUDA build already chosen by the user is kept.
TORCH_SPEC ?= "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
# dev tools, both sweep launchers and the timm model family, so that every test runs
EXTRAS ?= dev,joblib,slurm,timm
# pytest-xdist workers: one per CPU core (tests that start processes of their own are few)
TEST_WORKERS ?= auto

.PHONY: help install test test-fast lint demo sweep clean

help:
	@echo "make install  create $(VENV) and install vitcrs with its dev tools, sweep launchers and timm"
	@echo "make test     run the test suite (CPU, a few minutes; what CI runs)"
	@echo "make test-fast  the suite without its slow end-to-end tests (the inner loop, about a minute)"
	@echo "make lint     ruff check"
	@echo "make demo     offline CPU demo: synthetic data, vit_micro, WTA-CRS at ratio 0.3"
	@echo "make sweep    the study's sweep (3 datasets x ratios 1.0/0.5/0.3, ViT-B/16 from the Hub)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check src tests tools

demo: install
	$(PY) -m vitcrs.train experiment=demo

sweep: install
	$(PY) -m vitcrs.train -m experiment=study

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache

# dynlab: `make train` and `make test` set everything up themselves (uv, .venv from uv.lock).
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
VENV := .venv
STAMP := $(VENV)/.synced
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers: one per core by default; TEST_WORKERS=1 runs the tests in one process.
TEST_WORKERS ?= auto
PYTEST := WANDB_MODE=offline $(VENV)/bin/python -m pytest -n $(TEST_WORKERS)

COMPARE_ARGS ?=

.PHONY: install train test test-all compare compare-digits lint bench clean

install: $(STAMP)

# Re-sync only when the lock or the project changed; uv comes from pip where it is missing.
$(STAMP): pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $(STAMP)

# The embedded default: S2DNAS on scikit-learn's digits, CPU, W&B offline. Extra overrides: ARGS="...".
train: install
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/dynlab-train $(ARGS)

# The fast tier, after every change: every test not marked slow or slurm.
test: install
	$(PYTEST) -m "not slow and not slurm" $(PYTEST_ARGS)

# Everything (what .ci/run calls): learning tests, the wheel, gloo runs and, with the local Slurm
# cluster started (slurm/local-cluster.sh start), real jobs and job arrays. The Slurm tests share
# one worker (xdist group "slurm"): they queue on the same one-node cluster.
test-all: install
	$(PYTEST) --dist loadgroup $(PYTEST_ARGS)

# Every technique on one chart (experiments/compare/fashion_mnist.yaml), CPU, in two stages into one
# sweep dir: the static networks first, then the techniques (S2DNAS and GFNet start from the
# static ResNet-20 of the same seed), then dynlab-report into docs/compare/ (the README's chart and
# table). Seeds: COMPARE_ARGS="seed=0,1,2". `make compare-digits`: the quick smoke variant on
# scikit-learn's digits (experiments/compare/digits.yaml), reported into experiments/compare/digits/.
COMPARE_STATIC := resnet8,resnet14,baseline,resnet32,resnet20_repvgg
COMPARE_DYNAMIC := s2dnas_from_static,gfnet_from_static,sfr_small,spos_small,anglenas_small,fbnetv2_small
COMPARE_DYNAMIC := $(COMPARE_DYNAMIC),metapruning_small,metapruning_uniform
# MetaPruning against its uniform-width baseline of the same MACs limit, by paired bootstrap.
COMPARE_REPORT := --versus compare=metapruning_uniform
COMPARE_TRAIN := WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/dynlab-train -m

compare: install
	@dir=multirun/compare/$$(date +%Y-%m-%d_%H-%M-%S); \
	$(COMPARE_TRAIN) +experiment=compare/fashion_mnist +compare=$(COMPARE_STATIC) \
		hydra.sweep.dir=$$dir $(COMPARE_ARGS) && \
	$(COMPARE_TRAIN) +experiment=compare/fashion_mnist +compare=$(COMPARE_DYNAMIC) \
		hydra.sweep.dir=$$dir $(COMPARE_ARGS) && \
	$(VENV)/bin/dynlab-report $$dir -o docs/compare $(COMPARE_REPORT)

compare-digits: install
	@dir=multirun/compare-digits/$$(date +%Y-%m-%d_%H-%M-%S); \
	$(COMPARE_TRAIN) +experiment=compare/digits hydra.sweep.dir=$$dir $(COMPARE_ARGS) && \
	$(VENV)/bin/dynlab-report $$dir -o experiments/compare/digits $(COMPARE_REPORT)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: install
	@for script in benchmarks/*.py; do echo "# $$script"; $(VENV)/bin/python $$script || exit 1; done

clean:
	rm -rf outputs multirun .pytest_cache

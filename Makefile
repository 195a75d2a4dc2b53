# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_N ?= 2000

.PHONY: install demo test lint lock clean-demo bench-quality bench-perf

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the locked dependencies

demo: install  ## synthesise the built-in data set and run the retrain flow on it
	test -f demo-data/labels.csv || $(BIN)/autolabel synth demo-data --n $(DEMO_N) --seed 0
	$(BIN)/autolabel run --images demo-data --labels demo-data/labels.csv --workspace workspace

test: install  ## the whole test suite (pytest's "no tests collected", exit 5, is a failure too)
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench-quality: install  ## cluster quality of every embedding/clustering method on DeepPCB patches (QUICK=1: subset)
	$(BIN)/python bench/quality.py $(if $(QUICK),--quick)

bench-perf: install  ## throughput, overhead, memory, clustering scale, refresh cost (QUICK=1: 2k/10k sizes; full ~40 min)
	$(BIN)/python bench/perf.py $(if $(QUICK),--quick)

lint: install
	$(BIN)/ruff check flows tasks tests bench

lock:  ## refresh requirements.lock from the current venv (after changing pyproject.toml)
	$(BIN)/pip freeze --exclude-editable | grep -v '^aoi-autolabel' > requirements.lock

clean-demo:
	rm -rf workspace demo-data

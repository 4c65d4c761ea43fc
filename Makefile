# The README's commands. Every target creates the virtual environment if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench distill-cost benchmarks-doc clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/stepdistill demo --out runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/stepdistill bench --suite eval/toy.yaml --out runs/bench

distill-cost: $(STAMP)
	$(BIN)/stepdistill distill-cost --out runs/distill-cost

# docs/benchmarks.md and README.md's methods table, from the result JSONs under eval/results/
benchmarks-doc: $(STAMP)
	TRANSFORMERS_VERBOSITY=error $(BIN)/python -m stepdistill.eval.benchmarks_doc

clean:
	rm -rf runs

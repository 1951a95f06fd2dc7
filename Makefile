# Set-up and the two main jobs. `make test` and `make demo` work on a fresh machine: they create
# the virtual environment and install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this project is tested with.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
HAM10000_DIR ?= ../shared/data/ham10000
DEMO_DIR ?= runs/demo

.PHONY: install test lint demo clean mutation planted-bugs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: install
	$(VENV)/bin/ruff check src tests bench tools
	$(PY) -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests were collected"; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench tools

# Mutation testing of the core numerical modules ([tool.mutmut] in pyproject.toml: which files,
# which fast tests). Slow (tens of minutes on 2 cores) and never run in CI; niced so that it
# yields to other work. `mutmut results` lists the survivors, `mutmut show NAME` one diff.
mutation: install
	$(PY) -m pip install -q -e '.[mutation]'
	OMP_NUM_THREADS=1 nice -n 10 $(VENV)/bin/mutmut run --max-children $${MUTATION_JOBS:-1}
	$(VENV)/bin/mutmut results

# Known bugs (tools/planted_bugs.py) planted one at a time in a copy of the tree; each must make
# its tests fail. A few minutes on 2 cores; not in CI.
planted-bugs: install
	$(PY) tools/planted_bugs.py

# The packaged model's predictions for a few HAM10000 images (from HAM10000_DIR, else downloaded
# to data/ham10000), then the quick recipe trained and predicting on the same images.
demo: install
	@set -e; root="$(HAM10000_DIR)"; \
	if [ ! -e "$$root/HAM10000_metadata.csv" ] && [ ! -e "$$root/HAM10000_metadata.tab" ]; then \
	  root=data/ham10000; $(VENV)/bin/skinlesion download --dest $$root; fi; \
	rm -rf $(DEMO_DIR); mkdir -p $(DEMO_DIR); \
	imgs=$$(find $$root -name '*.jpg' | sort | head -n 5); \
	echo "== the packaged model (no training needed) =="; \
	$(VENV)/bin/skinlesion models; \
	$(VENV)/bin/skinlesion predict --no-progress $$imgs --output $(DEMO_DIR)/packaged_predictions.csv; \
	cat $(DEMO_DIR)/packaged_predictions.csv; \
	echo; echo "== the quick recipe: train 2 folds on 1,000 images, then predict =="; \
	$(VENV)/bin/skinlesion train --config configs/quick.yaml data.root=$$root output_dir=$(DEMO_DIR); \
	$(VENV)/bin/skinlesion predict --model $(DEMO_DIR) $$imgs --output $(DEMO_DIR)/demo_predictions.csv; \
	echo; echo "run folder:   $(DEMO_DIR) (report: $(DEMO_DIR)/report.md)"; \
	echo "predictions:  $(DEMO_DIR)/demo_predictions.csv"

clean:
	rm -rf $(VENV) runs mutants .pytest_cache .ruff_cache

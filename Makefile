# Two commands matter: `make lab` (set up, open the course) and `make test` (set up, run every
# test and notebook). Each creates the virtual environment $(VENV) on first use and installs
# what pyproject.toml asks for; later runs reuse it and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-mplib
# JupyterLab refuses to run as root unless told; containers and CI often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout=600
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup lab test unit notebooks course bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	@touch $(STAMP)

lab: setup  ## open JupyterLab on the notebooks (LAB_FLAGS="--no-browser --port=8890" to change)
	$(BIN)/jupyter lab --ServerApp.root_dir=notebooks $(ROOT_FLAG) $(LAB_FLAGS)

test: setup  ## unit tests, then every notebook under nbval
	$(BIN)/python -m pytest tests notebooks $(NBVAL) $(PYTEST_FLAGS)

unit: setup
	$(BIN)/python -m pytest tests $(PYTEST_FLAGS)

notebooks: setup
	$(BIN)/python -m pytest notebooks $(NBVAL) $(PYTEST_FLAGS)

# every cell within 600 s, as under nbval: nbclient can miss a reply after widget output
# (jupyter/nbclient#312, seen once in about ten runs of notebook 08) and would otherwise wait forever
course: setup  ## re-execute every notebook in place so stored outputs and plots are fresh
	cd notebooks && for nb in [0-9][0-9]_*.ipynb; do \
		../$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 "$$nb" \
		|| exit 1; done

bench: setup  ## print the benchmark ratios (timings: run on a quiet machine)
	$(BIN)/python -m pip install --quiet --editable '.[test,bench]'
	for b in benchmarks/bench_*.py; do $(BIN)/python "$$b" || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache

# Two commands that work on a fresh machine with Python >= 3.10 and pip:
#   make run   sets up .venv and runs the main job (train the hybrid LM, then sample from it)
#   make test  sets up .venv and runs lint + the whole test suite
# Every install goes through constraints.txt, which pins torch==2.13.0 (the CPU wheel; no CUDA download).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run tour test lint format bench clean

# `make run` needs only torch and the train/plot extras; `make test` adds the test stack (transformers, diffusers,
# ruff, pytest, ...).
$(RUN_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[train,plot]"
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The main job: train the hybrid LM on the standard library's source, then sample from the run.
# A run already in runs/hybrid-lm (perhaps extended with train.steps=N) is continued, never overwritten.
run: $(RUN_STAMP)
	if [ -f runs/hybrid-lm/checkpoints/latest ]; then $(BIN)/vermeil train --resume runs/hybrid-lm; \
	else $(BIN)/vermeil train configs/hybrid-lm.yaml --out runs/hybrid-lm; fi
	$(BIN)/vermeil generate runs/hybrid-lm --prompt "def " --max-new-tokens 300

tour: $(STAMP)
	$(BIN)/python -m vermeil.tour

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/attention.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# The commands a person types. Each target creates .venv and installs what it needs when missing.
# GPU users: `make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" serve`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.rmserve-installed

.PHONY: install serve test test-all soak lint format demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[serve,dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)  ## serve the built-in demo reward model on http://127.0.0.1:8000
	$(BIN)/rmserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)  ## lint + the whole test suite except the long runs (slow: soak, redeploys, start/stop) and multi-node ones (cluster_slow)
	$(BIN)/ruff check .
	$(BIN)/pytest tests -m "not slow and not cluster_slow" $(PYTEST_ARGS)

soak: $(STAMP)  ## the long reliability runs: 20,000-item soak, full bursts, full fuzzing
	$(BIN)/pytest tests/reliability -m slow -s $(PYTEST_ARGS)

test-all: $(STAMP)  ## everything, the soak and the multi-node autoscaling run included
	$(BIN)/pytest tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: $(STAMP)
	$(BIN)/rmserve demo

bench: $(STAMP)
	$(BIN)/rmserve bench --quick

clean:
	rm -rf $(VENV) .cache build *.egg-info

# Two commands set everything up: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')

.PHONY: run test lint format proto migrate bench clean

run: $(VENV)/.installed
	$(BIN)/python -m services.runtime.local_suite

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The figures: `make bench` (minutes, 1,000,000 jobs); `make bench BENCH_ARGS=--quick` (seconds).
bench: $(VENV)/.installed
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: gen/.stamp

# A month's GetCostSummary for a profile with 1,000,000 lines, on $(DATABASE_URL)'s server.
# Applies every service's migrations to $(DATABASE_URL) and exits.
migrate: $(VENV)/.installed
	$(BIN)/python -m services.jobs migrate
	$(BIN)/python -m services.publisher migrate
	$(BIN)/python -m services.costs migrate

$(VENV)/.deps: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Generated code lives in gen/, apart from written code, and is never edited.
gen/.stamp: $(PROTOS) $(VENV)/.deps
	rm -rf gen && mkdir -p gen
	$(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	find gen -type d -exec touch {}/__init__.py \;
	rm gen/__init__.py
	touch $@

# Re-run the editable install once gen/ exists, so its packages are importable.
$(VENV)/.installed: gen/.stamp
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) gen .data *.egg-info

# Two commands set everything up: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')

.PHONY: run test lint format proto migrate bench deploy-check clean

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

# The image and the Kubernetes manifests, checked with no Docker engine and no cluster: the
# Dockerfile linted, every overlay rendered by kubectl's Kustomize into build/deploy/ and
# validated against the schemas of the oldest Kubernetes supported (1.30: the preStop sleep
# action) and the newest known, and the manifests compared with the code.
KUBERNETES_VERSIONS := 1.30 1.37

deploy-check: $(VENV)/.installed
	$(BIN)/hadolint deploy/docker/Dockerfile
	mkdir -p build/deploy
	set -e; for overlay in deploy/k8s/overlays/*/; do \
		rendered=build/deploy/$$(basename $$overlay).yaml; \
		$(BIN)/kubectl kustomize $$overlay > $$rendered; \
		for version in $(KUBERNETES_VERSIONS); do \
			$(BIN)/kubernetes-validate --strict --quiet -k $$version $$rendered; \
			echo "$$rendered: valid for Kubernetes $$version"; \
		done; \
	done
	$(BIN)/python -m pytest tests/test_deploy_manifests.py tests/test_deploy_image.py

# Applies every service's migrations to $(DATABASE_URL) and exits.
migrate: $(VENV)/.installed
	$(BIN)/python -m services.jobs migrate
	$(BIN)/python -m services.publisher migrate
	$(BIN)/python -m services.costs migrate

# uv installs in seconds what pip takes a minute for (the same versions); pip is the way back
# wherever uv cannot be had or cannot reach the index, and then says why (getting uv is quiet:
# pip warns of every index folder a machine's pip.conf names and lacks).
UV_INSTALL := $(BIN)/uv pip install --quiet --native-tls --python $(BIN)/python

$(VENV)/.deps: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	($(BIN)/pip install --quiet uv 2>/dev/null && $(UV_INSTALL) -e '.[dev]') \
		|| $(BIN)/pip install --quiet -e '.[dev]'
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
	$(UV_INSTALL) --no-deps -e . || $(BIN)/pip install --quiet --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) gen .data *.egg-info

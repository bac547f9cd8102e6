# Two commands on a fresh machine:  `make demo` (the main job: the stack on localhost with a demo)
# and `make test` (the whole suite). `make train-demo` trains, evaluates and exports a small model.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := work/demo
MODEL  ?=

.PHONY: setup postgres test check demo train-demo bench clean

# The project's environment: torch pinned to the CPU wheel, every stage's extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[train,export,serve,dev]"
	touch $@

# Triton gets its own small environment (numpy < 2 for its Python backend), created once.
setup: $(VENV)/.installed
	$(BIN)/cdface triton setup

# The PostgreSQL gallery tests start their own throwaway server from Debian's package.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	fi

test: setup postgres
	$(BIN)/python -m pytest -q

# ruff, the import contracts and mypy (also part of `make test`).
check: $(VENV)/.installed
	$(BIN)/python -m cdface.devtools.checks

demo: setup
	$(BIN)/python -m cdface.devtools.stack_demo --workdir $(DEMO) $(if $(MODEL),--model $(MODEL))

train-demo: setup
	$(BIN)/python -m cdface.devtools.train_demo --workdir work/train-demo

bench: setup
	$(BIN)/python -m benchmarks.train_step --quick
	$(BIN)/python -m benchmarks.onnx_vs_torch --quick
	$(BIN)/python -m benchmarks.triton_batching --quick
	$(BIN)/python -m benchmarks.gateway_embeddings --quick
	$(BIN)/python -m benchmarks.identify_scale --quick
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf $(DEMO) work/train-demo .pytest_cache

# Two commands on a fresh machine:  `make demo` (the main job: the stack on localhost with a demo)
# and `make test` (the whole suite). `make train-demo` trains, evaluates and exports a small model.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := work/demo
MODEL  ?=
DEMO_ARGS ?=
# `make demo` runs from its own lean environment: serving never imports torch.
STACK_VENV := .venv-serve
STACK_BIN  := $(STACK_VENV)/bin

.PHONY: setup postgres chromium test check demo train-demo bench clean

# The project's environment: torch pinned to the CPU wheel, every stage's extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[train,export,serve,dev]"
	touch $@

# The stack's environment: the gateway and the torch-free part of export (the `demo` extra), no torch.
$(STACK_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(STACK_VENV)
	$(STACK_BIN)/python -m pip install -q --upgrade pip
	$(STACK_BIN)/python -m pip install -q -e ".[demo]"
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

# The /ui browser tests drive Debian's chromium headless through Playwright (no browser download).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

test: setup postgres chromium
	$(BIN)/python -m pytest -q

# ruff, the import contracts and mypy (also part of `make test`).
check: $(VENV)/.installed
	$(BIN)/python -m cdface.devtools.checks

# DEMO_ARGS=--once runs the demo and stops the stack (CI). SIGTERM to make stops the stack too.
demo: $(STACK_VENV)/.installed
	$(STACK_BIN)/cdface triton setup
	$(STACK_BIN)/python -m cdface.devtools.stack_demo --workdir $(DEMO) $(if $(MODEL),--model $(MODEL)) $(DEMO_ARGS)

train-demo: setup
	$(BIN)/python -m cdface.devtools.train_demo --workdir work/train-demo

bench: setup
	$(BIN)/python -m benchmarks.train_step --quick
	$(BIN)/python -m benchmarks.onnx_vs_torch --quick
	$(BIN)/python -m benchmarks.triton_batching --quick
	$(BIN)/python -m benchmarks.gateway_embeddings --quick
	$(BIN)/python -m benchmarks.identify_scale --quick
	$(BIN)/python -m benchmarks.sharded_head --quick
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf $(DEMO) work/train-demo .pytest_cache

# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := work/demo

.PHONY: setup test demo bench clean

# The project's environment: torch pinned to the CPU wheel, every stage's extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[train,export,serve,dev]"
	touch $@

# Triton gets its own small environment (numpy < 2 for its Python backend), created once.
setup: $(VENV)/.installed
	$(BIN)/cdface triton setup

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m cdface.demo --workdir $(DEMO)

bench: setup
	$(BIN)/python -m benchmarks.train_step --quick
	$(BIN)/python -m benchmarks.onnx_vs_torch --quick
	$(BIN)/python -m benchmarks.triton_batching --quick
	$(BIN)/python -m benchmarks.gateway_embeddings --quick
	$(BIN)/python -m benchmarks.identify_scale --quick
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf $(DEMO) .pytest_cache

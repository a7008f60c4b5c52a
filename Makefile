# sdeks — the two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.14.1
TORCHVISION_VERSION := 0.29.1
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DIFFUSERS_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: install demo test unit lint typecheck synth bench screenshots clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch and torchvision first and pinned together: the one pair whose torchvision imports
	# beside torch here (spandrel and controlnet_aux need torchvision; see docs/models.md);
	# an unpinned torch or torchvision pulls another torch.
	$(PIP) install -q "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m sdeks.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check sdeks dispatcher runtime infra tests benchmarks examples
	$(VENV)/bin/ruff format --check sdeks dispatcher runtime infra tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy sdeks dispatcher runtime infra

# mypy (one core, minutes cold) runs beside the tests, which wait on subprocesses much of the time.
test: $(STAMP) lint
	$(MAKE) --no-print-directory -j2 typecheck unit

# Two workers: much of the suite waits on subprocesses (the embedded AWS, pods, dispatchers).
unit: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist loadgroup

# The console screenshots in docs/local.md, made by its browser test.
screenshots: $(STAMP)
	SDEKS_SCREENSHOTS_DIR=docs/img $(VENV)/bin/pytest -q tests/e2e/test_console.py

synth: $(STAMP)
	$(PY) -m infra.app --check

# Full runs (minutes each); every benchmark also has --quick, run by the tests.
bench: $(STAMP)
	$(PY) benchmarks/scheduling.py
	$(PY) benchmarks/dispatcher_overhead.py
	$(PY) benchmarks/model_switch.py
	$(PY) benchmarks/gpu_inference.py --quick
	$(PY) benchmarks/chaos.py

clean:
	rm -rf $(VENV) outputs cdk.out .pytest_cache .ruff_cache .mypy_cache

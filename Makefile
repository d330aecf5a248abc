# The two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit system-deps clean bench fuzz

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: start vbusd in the foreground with its embedded default topology
run: $(STAMP)
	$(VENV)/bin/vbusd $(ARGS)

## system-deps: Debian packages the tests use (only when run as root)
system-deps:
	@if [ "$$(id -u)" = 0 ] && [ -x .ci/system-deps ]; then .ci/system-deps; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check vbus tests examples benchmarks
	$(VENV)/bin/ruff format --check vbus tests examples benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## test: everything, on both event loops
test: system-deps $(STAMP) lint typecheck
	VBUS_TEST_LOOP=uvloop $(PY) -m pytest -q $(PYTEST_ARGS)
	VBUS_TEST_LOOP=asyncio $(PY) -m pytest -q -m 'asyncio or integration' $(PYTEST_ARGS)

## bench: side-by-side benchmarks (never part of make test); ARGS="--quick --json F --plot F.png"
bench: $(STAMP) $(VENV)/.bench-installed
	$(VENV)/bin/vbus bench $(ARGS)

$(VENV)/.bench-installed: pyproject.toml
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

## fuzz: every parser of north input, FUZZ_SECONDS per target (atheris if it installs, else hypothesis)
FUZZ_SECONDS ?= 120
fuzz: $(STAMP) $(VENV)/.fuzz-installed
	$(PY) -m vbus.soak.fuzz --seconds $(FUZZ_SECONDS) $(ARGS)

$(VENV)/.fuzz-installed: pyproject.toml
	$(PY) -m pip install --quiet -e '.[fuzz]' || echo "atheris did not install: fuzzing with hypothesis"
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

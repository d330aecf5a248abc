# The two commands: `make run` and `make test`. Everything else is a helper.
#
# Installing is quiet: one "vbus: ..." line per step; what pip and the builds
# say goes to $(VENV)/install.log, and is shown whole when a step fails.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOG    := $(VENV)/install.log
PIP_INSTALL := $(PY) -m pip --quiet --disable-pip-version-check --no-input install \
               --no-warn-script-location --progress-bar off
# systemd: where `make install-service` puts the unit, and the vbusd it starts
UNITDIR ?= /etc/systemd/system
VBUSD   ?= $(abspath $(VENV))/bin/vbusd
SYSTEMCTL ?= systemctl
SYSTEMD_RUNNING ?= $(shell test -d /run/systemd/system && echo yes)

# $(call quietly,WHAT,COMMAND): say WHAT, run COMMAND with its output appended
# to $(LOG); on failure show that output and fail with COMMAND's status.
quietly = echo "vbus: $(1)"; { $(2); } >>$(LOG) 2>&1 || { status=$$?; \
          echo "vbus: $(1) failed (exit status $$status); output from $(LOG):" >&2; \
          cat $(LOG) >&2; exit $$status; }

.PHONY: run test test-xen lint typecheck unit system-deps clean bench fuzz install-service

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	@test -x $(PY) || { echo "vbus: creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@: > $(LOG)
	@$(call quietly,upgrading pip,$(PIP_INSTALL) --upgrade pip)
	@$(call quietly,installing Python packages (vbus and its test tools),$(PIP_INSTALL) -e '.[test]')
	@touch $(STAMP)

## run: start vbusd in the foreground with its embedded default topology
run: $(STAMP)
	@echo "vbus: starting $(VENV)/bin/vbusd $(ARGS)"
	@$(VENV)/bin/vbusd $(ARGS)

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

## test-xen: vbus's dom0 side on the real Xen hypervisor under QEMU TCG (also part of test, where QEMU is)
XEN_TESTS := tests/test_xen_real.py tests/test_xen_dom0.py tests/test_xenlab.py \
	tests/test_xen_dom0_connector.py tests/test_xen_netback.py
test-xen: system-deps $(STAMP)
	$(PY) -m pytest -q $(XEN_TESTS) $(PYTEST_ARGS)

## bench: side-by-side benchmarks (never part of make test); ARGS="--quick --json F --plot F.png"
bench: $(STAMP) $(VENV)/.bench-installed
	$(VENV)/bin/vbus bench $(ARGS)

$(VENV)/.bench-installed: pyproject.toml
	@$(call quietly,installing the benchmarks' Python packages,$(PIP_INSTALL) -e '.[bench]')
	@touch $@

## fuzz: every parser of north input, FUZZ_SECONDS per target (atheris if it installs, else hypothesis)
FUZZ_SECONDS ?= 120
fuzz: $(STAMP) $(VENV)/.fuzz-installed
	$(PY) -m vbus.soak.fuzz --seconds $(FUZZ_SECONDS) $(ARGS)

$(VENV)/.fuzz-installed: pyproject.toml
	@echo "vbus: installing atheris"
	@$(PIP_INSTALL) -e '.[fuzz]' >>$(LOG) 2>&1 || echo "vbus: atheris did not install (see $(LOG)): fuzzing with hypothesis"
	@touch $@

## install-service: the systemd unit (contrib/vbusd.service) into UNITDIR, starting this checkout's vbusd
install-service: $(STAMP)
	@echo "vbus: installing $(UNITDIR)/vbusd.service (ExecStart=$(VBUSD))"
	@mkdir -p $(UNITDIR)
	@sed 's|^ExecStart=/usr/local/bin/vbusd|ExecStart=$(VBUSD)|' contrib/vbusd.service > $(UNITDIR)/.vbusd.service.tmp
	@mv $(UNITDIR)/.vbusd.service.tmp $(UNITDIR)/vbusd.service
	@if [ "$(SYSTEMD_RUNNING)" = yes ]; then \
	  $(SYSTEMCTL) daemon-reload && echo "vbus: systemd reloaded; start it with: systemctl enable --now vbusd"; \
	else \
	  echo "vbus: systemd is not running here: the unit is installed, not loaded"; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

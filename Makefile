# The two commands of the README. Each creates .venv (with pip) when it is missing, then does its job.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.robolearn-installed
# pip's output goes to a log (this machine's pip configuration adds ~70 harmless "Location ... is ignored"
# lines per install); on failure the log is shown and make stops.
PIP_LOG := $(VENV)/pip-install.log
export MUJOCO_GL ?= egl
# The suite runs on one pytest worker per core (pytest-xdist), each test file whole on one worker so that its
# module fixtures (small trained policies) are built once; `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= auto

.PHONY: demo test venv bench clean-venv

demo: $(STAMP)
	$(BIN)/robolearn quickstart

# The teleop viewer's tests open a real window on a virtual display: Xvfb and xdotool come from the system's
# packages (about 10 s with apt the first time, nothing after). Where they cannot be installed (no root, no apt, no
# network) the tests still run: only those that need a display fail, each saying what is missing.
test: $(STAMP)
	@bash tools/setup_xvfb.sh || echo "make test: Xvfb/xdotool unavailable (see above): the teleop display tests will fail" >&2
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

venv: $(STAMP)

# The exact versions tested live in constraints.txt (the package metadata has ranges). torch goes first: its CPU
# build is on local disk; anything else pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing robolearn into $(VENV) (about 2 minutes on a fresh machine; log: $(PIP_LOG))"
	@$(BIN)/pip install -c constraints.txt torch > $(PIP_LOG) 2>&1 || (tail -40 $(PIP_LOG); exit 1)
	@$(BIN)/pip uninstall -y robolearn >> $(PIP_LOG) 2>&1 || true  # the distribution's name before 0.2.0
	@$(BIN)/pip install -c constraints.txt -e ".[test]" >> $(PIP_LOG) 2>&1 || (tail -40 $(PIP_LOG); exit 1)
	@touch $(STAMP)

bench: $(STAMP)
	$(BIN)/python tools/bench/data.py

clean-venv:
	rm -rf $(VENV)

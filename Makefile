# The two commands of the README. Each creates .venv (with pip) when it is missing, then does its job.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.robolearn-installed
# This machine's pip configuration prints ~70 harmless "Location ... is ignored" lines per install.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true
export MUJOCO_GL ?= egl

.PHONY: demo test venv bench clean-venv

demo: $(STAMP)
	$(BIN)/robolearn quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing robolearn into $(VENV) (about 2 minutes on a fresh machine)"
	# torch first, pinned: its CPU build is on local disk; anything else pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q -e ".[test]" 2>&1 | $(QUIET_PIP)
	@touch $(STAMP)

bench: $(STAMP)
	$(BIN)/python tools/bench/data.py

clean-venv:
	rm -rf $(VENV)

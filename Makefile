# The two commands of the README. Each creates .venv if missing and installs into it.
# torch==2.13.0 first: on this machine it is the CPU build on local disk; a bare `torch`
# requirement on an empty venv would pull a multi-GB CUDA build instead.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: run test install system-deps reproduce bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/alignsweep sweep

# The tracking tests run a real PostgreSQL on loopback and the UI tests a headless Chromium:
# Debian's packages, installed if missing.
system-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "install PostgreSQL first: sudo apt-get install postgresql" >&2; exit 1; fi; }
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Chromium first: sudo apt-get install chromium" >&2; exit 1; fi; }

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS)

# Issue 5's figures and comparison, regenerated from scratch on this machine (see README "Results").
FIGS ?= docs/figures
reproduce: $(STAMP)
	$(BIN)/alignsweep sweep distill_weight && $(BIN)/alignsweep figures --experiment distill_weight --out $(FIGS)
	$(BIN)/alignsweep sweep budget_precision && $(BIN)/alignsweep figures --experiment budget_precision --out $(FIGS)
	$(BIN)/alignsweep sweep noise_shift && $(BIN)/alignsweep figures --experiment noise_shift --out $(FIGS)
	$(BIN)/alignsweep sweep methods && $(BIN)/alignsweep compare --experiment methods --out $(FIGS)/compare.md
	$(BIN)/alignsweep sweep seed_methods && $(BIN)/alignsweep compare --experiment seed_methods --out $(FIGS)/seed_methods.md
	$(BIN)/alignsweep sweep pareto && $(BIN)/alignsweep figures --experiment pareto --out $(FIGS)

# Issues 6 and 12: measured figures and ratios, printed as one table (~50 minutes here).
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache

# The two commands of the README. Each creates .venv if missing and installs into it.
# torch==2.13.0 first: on this machine it is the CPU build on local disk; a bare `torch`
# requirement on an empty venv would pull a multi-GB CUDA build instead.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: run test install system-deps clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/alignsweep sweep

# The tracking tests run a real PostgreSQL on loopback: Debian's package, installed if missing.
system-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "install PostgreSQL first: sudo apt-get install postgresql" >&2; exit 1; fi; }

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

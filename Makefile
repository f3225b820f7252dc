# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install chromium demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: the local CPU wheel (a bare `torch` would pull CUDA packages)
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP) chromium

# Debian's chromium renders report.html in a test. Installed where apt-get can (as root, or via sudo);
# elsewhere `make` goes on, and that test fails, naming what is missing, rather than being skipped.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  command -v apt-get >/dev/null 2>&1 && { $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium >/dev/null 2>&1; }; }; \
	  command -v chromium >/dev/null 2>&1 || echo "note: chromium is not installed (no apt-get or no rights): tests/test_report.py will fail"; }

demo: $(STAMP)
	$(BIN)/python -m spineseg.demo --out runs/demo

test: $(STAMP) chromium
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks

clean:
	rm -rf runs .pytest_cache

# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NNUNET := $(VENV)/.nnunet-installed

.PHONY: install chromium demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: the local CPU wheel (a bare `torch` would pull CUDA packages)
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# nnU-Net v2 for the comparison row and its tests: --no-deps (its requirements would pull CUDA torch), then its
# needs by hand; timm (only for DNA's Primus networks) is left out because it needs torchvision
$(NNUNET): $(STAMP)
	$(BIN)/pip install -q --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
	$(BIN)/pip install -q acvl-utils==0.2.6 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 pandas graphviz \
		requests seaborn imagecodecs yacs einops blosc2 tifffile
	touch $(NNUNET)

install: $(STAMP) $(NNUNET) chromium

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

test: $(STAMP) $(NNUNET) chromium
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks

clean:
	rm -rf runs .pytest_cache

# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NNUNET := $(VENV)/.nnunet-installed

.PHONY: install demo test bench clean

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

install: $(STAMP) $(NNUNET)

demo: $(STAMP)
	$(BIN)/python -m spineseg.demo --out runs/demo

test: $(STAMP) $(NNUNET)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks

clean:
	rm -rf runs .pytest_cache

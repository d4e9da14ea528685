# Quick start:  make demo   (environment + a real OPD run on the toy world)
#               make test   (environment + the test suite, CPU only)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Without an NVIDIA GPU, pin the CPU build of torch; otherwise pip would pull the CUDA build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints-cpu.txt)

.PHONY: install demo test lint clean

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e ".[dev,eval,async]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/opd train --config configs/toy/opd.yaml --set run.overwrite=true

test: install
	@$(BIN)/python -m pytest -m "not gpu" -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; \
	exit $$rc

lint: install
	$(BIN)/ruff check opdcli diagnostics benchmarks tests

clean:
	rm -rf $(VENV) runs .pytest_cache

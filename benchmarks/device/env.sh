# Sourced by gpu_tests.sh and gpu_bench.sh: the environment vLLM 0.26 (the bundle of vllm_bundle.py) runs in here.
home=${KVBLEND_DEVICE_HOME:-$HOME/kvblend-vllm}
export PYTHONPATH=$PWD:$home/site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
# The bundle leaves flashinfer-python out; vLLM 0.26's GPU sampler imports it unless this is 0 (measured: without
# it every engine fails at load_model with "No module named 'flashinfer'"). Attention runs on FA3 either way.
export VLLM_USE_FLASHINFER_SAMPLER=0
# The tests touch CUDA before they start an engine; a forked engine core then cannot initialise CUDA (measured).
export VLLM_WORKER_MULTIPROC_METHOD=spawn

#!/usr/bin/env bash
# On the GPU device: receive the vLLM parts this call carries (vllm_install.sh), then, once vLLM is unpacked, run
# the GPU tests (tests/test_save_queue.py, tests/test_vllm_gpu.py, tests/test_cuda_graphs.py, the controller's GPU timing,
# the paged KV kernels against their references on the GPU) with the tokenizer folder standing in for the embedded SmolLM2 (the tiny
# checkpoints take its vocabulary and chat template). Log in $OUT/gpu_tests.log.
#   bash benchmarks/device/gpu_tests.sh .device/vllm .device/tok [pytest args...]
set -uo pipefail
parts=${1:?usage: gpu_tests.sh PARTS_DIR TOKENIZER_DIR [pytest args]}
tok=${2:?usage: gpu_tests.sh PARTS_DIR TOKENIZER_DIR [pytest args]}
shift 2
out=${OUT:-/tmp}
bash "$(dirname "$0")/vllm_install.sh" "$parts" || exit 1
source "$(dirname "$0")/env.sh"
[ -e "$home/site/.complete" ] || { echo "vLLM not complete yet: carry the missing parts"; exit 0; }
export KVBLEND_TEST_MODEL_DIR=$PWD/$tok
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" 2>&1 | tail -3 | tee -a "$out/gpu.txt"
timeout "${TESTS_S:-420}" python3 -m pytest -v -p no:cacheprovider -o addopts="" tests/test_save_queue.py tests/test_vllm_gpu.py tests/test_cuda_graphs.py \
    tests/test_blend_controller.py::test_gpu_timed_blend_counts_its_device_time_once_it_has_run tests/test_kernel_paged_kv.py "$@" \
    2>&1 | tee "$out/gpu_tests.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|error|Error" | tail -40

#!/usr/bin/env bash
# On the GPU device, after gpu_tests.sh has unpacked vLLM: install the carried LMCache wheels (if carried) beside it, run
# benchmarks/h2d_bandwidth.py once (about a minute), then benchmarks/vllm_gpu_rag.py, resumable (a later call continues
# with the systems not yet complete). Results and engine logs come back in $OUT/results.tgz.
#   bash benchmarks/device/gpu_bench.sh .device/lmcache .device/tok [vllm_gpu_rag.py args...]
set -uo pipefail
wheels=${1:?usage: gpu_bench.sh LMCACHE_WHEELS TOKENIZER_DIR [args]}
tok=${2:?usage: gpu_bench.sh LMCACHE_WHEELS TOKENIZER_DIR [args]}
shift 2
out=${OUT:-/tmp}
source "$(dirname "$0")/env.sh"
[ -e "$home/site/.complete" ] || { echo "vLLM is not unpacked on this machine: run gpu_tests.sh first"; exit 1; }
lmc=$HOME/kvblend-lmcache
if [ ! -d "$lmc/lmcache" ] && compgen -G "$wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-deps --no-index --no-compile --target "$lmc" "$wheels"/*.whl
fi
export PYTHONPATH=$PYTHONPATH:$lmc
work=$HOME/kvblend-gpu-bench
mkdir -p "$work/results"
[ -e "$work/results/h2d_bandwidth.json" ] || timeout 240 python3 benchmarks/h2d_bandwidth.py --out "$work/results/h2d_bandwidth.json" \
    2>&1 | tee "$out/h2d_bandwidth.log" | tail -12
python3 benchmarks/vllm_gpu_rag.py --tokenizer "$tok" --work "$work" --out "$work/results" \
    --deadline-s "${DEADLINE_S:-520}" "$@" 2>&1 | tee "$out/bench.log" | tail -60
tar -C "$work" -czf "$out/results.tgz" results

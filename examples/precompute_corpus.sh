#!/usr/bin/env bash
# Index a directory of .txt/.md files and precompute every chunk's KV offline with the torch runner (no vLLM
# engine needed), then show what is stored and ask one question through vLLM with the chunks' KV blended.
#
#   examples/precompute_corpus.sh DOCS_DIR [INDEX_DIR] [STORE_DIR]
#
# Run with the project's .venv activated (`source .venv/bin/activate`) so `kvblend` is on PATH. Resumable:
# interrupt it and run it again; indexed documents and stored chunks are skipped.
set -euo pipefail

docs=${1:?usage: $0 DOCS_DIR [INDEX_DIR] [STORE_DIR]}
cache=${KVBLEND_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kvblend}
index=${2:-$cache/index}
store=${3:-$cache/store}

kvblend precompute "$docs" --index "$index" --store "$store"
kvblend stats --index "$index" --store "$store"
kvblend query "What are these documents about?" --index "$index" --store "$store" --max-tokens 64

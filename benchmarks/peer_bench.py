"""One 512-token chunk from another instance: peer fetch over NIXL vs Redis get vs disk get vs recompute.

    python -m benchmarks.transport peer [--tiny] [--reps N] [--json OUT] [--recompute-layers L]

Chunks are the random bf16 K/V of store_bench.py's model shapes (SmolLM2-135M and Llama-3-8B, 512 tokens).
A second process holds the chunk in its peer tier (exported from NIXL-registered host memory, announced in a
private redis-server used as the directory); this process reads it:
- "peer tier get": PeerTier.get, what a store miss costs: directory lookup, NIXL READ over UCX (TCP loopback
  here), entry verification (BLAKE3 layer digests) and decoding into fresh tensors;
- "NIXL read only": the same READ into the registered staging buffer, nothing else (the transport's part);
- "redis tier get" / "disk tier get": the same entry from RedisTier (same server) and DiskTier (page cache);
- "recompute": the chunk's prefill with kvblend's torch runner in float32 (this CPU has no native bf16): the
  embedded SmolLM2 with its real weights; Llama-3-8B shape with random weights on `--recompute-layers` layers
  (vocabulary cut to 1024; it does not touch the chunk's KV), scaled to 32 layers and labelled so.
Every figure is the median of --reps timed calls after one untimed warm-up; GB/s counts the entry's K+V bytes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from gpu_blend import LLAMA3_8B
from store_bench import CHUNKS, Result, random_chunk

from benchmarks.harness import record, result_path, timed, tiny_out, with_tiny, write
from kvblend.model.runner import LlamaModel
from kvblend.model.spec import spec_from_config
from kvblend.model.weights import weights_from_tensors
from kvblend.store import DiskTier, PeerConfig, PeerTier, RedisConfig, RedisTier
from kvblend.transport import BlobRecord

BENCH_CHUNKS = ["SmolLM2 512 tok", "Llama-3-8B 512 tok"]

PEER = """
import sys
sys.path[:0] = sys.argv[3:6]
from store_bench import CHUNKS, random_chunk
from kvblend.store import PeerConfig, PeerTier
url, name = sys.argv[1], sys.argv[2]
kv = random_chunk(*CHUNKS[name])
tier = PeerTier(PeerConfig(url, "bench-holder", 1 << 31, timeout_s=30.0, ttl_s=60.0))
assert tier.put(kv.key, kv)
print("ready", flush=True)
sys.stdin.readline()
tier.close()
"""


def start_holder(url: str, name: str) -> subprocess.Popen:
    paths = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", PEER, url, name, *paths], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # NIXL logs to stdout too
        if line.strip() == "ready":
            return proc
    raise RuntimeError(f"holder process exited with {proc.wait()} before it was ready")


def bits_equal(a, b) -> bool:
    return all(torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
               for x, y in ((a.k, b.k), (a.v, b.v)))


def bench_transfers(name: str, url: str, workdir: Path, reps: int) -> list[Result]:
    kv = random_chunk(*CHUNKS[name])
    holder = start_holder(url, name)
    reader = PeerTier(PeerConfig(url, "bench-reader", 1 << 31, timeout_s=30.0, ttl_s=60.0))
    try:
        got = reader.get(kv.key)
        if got is None or not bits_equal(got, kv):
            raise RuntimeError("the peer tier did not return the chunk bit for bit")
        (source,) = reader.directory.holders(kv.key.digest)
        record = BlobRecord.from_bytes(source.record)
        out = [
            measure(name, "peer tier get", kv.nbytes, lambda: reader.get(kv.key), reps),
            measure(name, "NIXL read only", kv.nbytes,
                    lambda: reader.endpoint.read(record, source.connection_info, 30.0, len), reps),
        ]
    finally:
        reader.close()
        holder.communicate("\n", timeout=60)
    redis = RedisTier(RedisConfig(url, prefix="bench:", timeout_s=60.0, retry_s=0.0))
    disk = DiskTier(workdir / "disk", 1 << 36)
    for tier, impl in ((redis, "redis tier get"), (disk, "disk tier get")):
        assert tier.put(kv.key, kv)
        if not bits_equal(tier.get(kv.key), kv):
            raise RuntimeError(f"{impl} did not return the chunk bit for bit")
        out.append(measure(name, impl, kv.nbytes, lambda tier=tier: tier.get(kv.key), reps))
    return out


def measure(name: str, impl: str, kv_bytes: int, fn, reps: int, scale: float = 1.0) -> Result:
    """Median of `reps` timed calls of `fn` (after a warm-up), times `scale`."""
    samples = [ms * scale for ms in timed(fn, reps)]
    return Result(name, "get", impl, kv_bytes, statistics.median(samples), samples)


def random_model(config: dict, layers: int) -> LlamaModel:
    """Llama weights of `config`'s shape on `layers` layers, random (float32), with a 1024-token vocabulary."""
    cfg = {**config, "num_hidden_layers": layers, "vocab_size": 1024, "architectures": ["LlamaForCausalLM"]}
    spec = spec_from_config(cfg, dtype="float32", weights_id="random")
    g = torch.Generator().manual_seed(0)
    h, f, kv = spec.hidden_size, spec.intermediate_size, spec.num_kv_heads * spec.head_dim
    shapes = {"model.embed_tokens.weight": (1024, h), "model.norm.weight": (h,), "lm_head.weight": (1024, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    return LlamaModel(spec, weights_from_tensors(tensors, spec))


def bench_recompute(name: str, reps: int, layers: int) -> Result:
    """The prefill that computes the chunk's KV, 512 tokens from position 0."""
    _, _, _, tokens = CHUNKS[name]
    kv_bytes = random_chunk(*CHUNKS[name]).nbytes
    if name.startswith("SmolLM2"):
        from kvblend.model.embedded import embedded_model_dir

        model, scale, impl = LlamaModel.from_dir(embedded_model_dir(), dtype="float32"), 1, "recompute (fp32)"
    else:
        model, scale = random_model(LLAMA3_8B, layers), 32 / layers
        impl = f"recompute (fp32, {layers} of 32 layers timed, x{scale:g})"
    ids = torch.randint(0, model.spec.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    return measure(name, impl, kv_bytes, lambda: model.prefill(ids), reps, scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=str(result_path("transport_peer")), help="write the raw results here")
    parser.add_argument("--recompute-layers", type=int, default=2)
    parser.add_argument("--chunks", nargs="*", default=BENCH_CHUNKS, choices=BENCH_CHUNKS)
    args = parser.parse_args(argv)
    from redis_server import RedisServer

    load_before = os.getloadavg()
    results: list[Result] = []
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="kvblend-peer-bench-") as workdir:
        for name in args.chunks:
            results += bench_transfers(name, server.url, Path(workdir), args.reps)
            results.append(bench_recompute(name, max(1, min(args.reps, 3)), args.recompute_layers))
            print(f"done: {name}", file=sys.stderr)
    load_after = os.getloadavg()

    print("| chunk | source | ms (median) | GB/s of K+V |")
    print("|---|---|---:|---:|")
    for r in results:
        print(f"| {r.chunk} ({r.kv_bytes / 2**20:.1f} MiB K+V) | {r.impl} | {r.ms:.1f} | {r.gbps:.2f} |")
    result = record("transport_peer", [{**asdict(r), "gbps": r.gbps} for r in results], reps=args.reps,
                    load_avg_before=load_before, load_avg_after=load_after)
    cpu = result["machine"]["cpu"]
    print(f"\nreps={args.reps} (recompute: {max(1, min(args.reps, 3))}), torch {torch.__version__}, python "
          f"{platform.python_version()}, {os.cpu_count()} cpus ({cpu['model']}; ISA {' '.join(cpu['isa'])}), "
          f"load average {load_before[0]:.2f} before / "
          f"{load_after[0]:.2f} after, {result['date']}")
    write(args.json, result)
    return 0


TINY = ["--reps", "1", "--chunks", "SmolLM2 512 tok", "--json", tiny_out("transport_peer.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))

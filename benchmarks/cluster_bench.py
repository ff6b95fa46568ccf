"""Redis tier on one server vs on a Redis Cluster: put / get throughput at 1 and 8 concurrent clients, and a
shard killed mid-run (errors seen by requests, requests served, worst latency, time until the failover serves).

    python -m benchmarks.store cluster [--tiny] [--seconds S] [--rounds N] [--json OUT]

Private servers on loopback (tests/redis_server.py, tests/redis_cluster.py: 3 masters + 3 replicas). Entries are
random bf16 SmolLM2-135M chunks of 256 tokens (30 layers, 3 kv heads, head_dim 64: 5.9 MB serialised). Each client
is a thread with its own RedisTier (its own connections, as a separate host's); a put phase writes, then a get
phase reads whole entries, each for `--seconds`. The kill run: 8 clients read (and every 4th request rewrites) the
cluster's entries; after a third of the run one master is killed (SIGKILL); its replica takes over after the
cluster's node timeout (1 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from redis_cluster import RedisCluster  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from test_store_helpers import random_chunk  # noqa: E402

from benchmarks.harness import record, result_path, tiny_out, with_tiny, write  # noqa: E402
from kvblend.store import RedisConfig, RedisTier  # noqa: E402

SHAPE = dict(layers=30, tokens=256, heads=3, head_dim=64)
KEYS = 48
TIMEOUT_S = 0.5


def tier(url: str, prefix: str) -> RedisTier:
    return RedisTier(RedisConfig(url, prefix=prefix, timeout_s=TIMEOUT_S, retry_s=1.0))


def run_clients(n: int, seconds: float, request) -> dict:
    """`n` threads call `request(client, i)` for `seconds`; per request its latency and outcome."""
    end = time.monotonic() + seconds
    records: list[list[tuple[float, float, str]]] = [[] for _ in range(n)]

    def loop(c: int) -> None:
        i = c
        while time.monotonic() < end:
            start = time.monotonic()
            try:
                outcome = request(c, i)
            except Exception as exc:  # noqa: BLE001 - an error a request saw: what this benchmark counts
                outcome = f"error {type(exc).__name__}"
            records[c].append((start, time.monotonic() - start, outcome))
            i += n

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    flat = sorted((r for rs in records for r in rs), key=lambda r: r[0])
    return {"wall_s": wall, "records": flat}


def summary(run: dict, entry_bytes: int) -> dict:
    records = run["records"]
    lat = sorted(r[1] for r in records)
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r[2]] = outcomes.get(r[2], 0) + 1
    served = outcomes.get("hit", 0) + outcomes.get("stored", 0)
    return {"requests": len(records), "outcomes": outcomes, "ops_per_s": served / run["wall_s"],
            "MB_per_s": served * entry_bytes / run["wall_s"] / 1e6, "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * lat[int(0.99 * (len(lat) - 1))], "max_ms": 1e3 * lat[-1]}


def throughput(url: str, clients: int, seconds: float, kvs, entry_bytes: int) -> dict:
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    tiers = [tier(url, prefix) for _ in range(clients)]

    def put(c: int, i: int) -> str:
        kv = kvs[i % len(kvs)]
        return "stored" if tiers[c].put(kv.key, kv) else "failed"

    def get(c: int, i: int) -> str:
        return "hit" if tiers[c].get(kvs[i % len(kvs)].key) is not None else "miss"

    out = {"put": summary(run_clients(clients, seconds, put), entry_bytes)}
    for kv in kvs:  # every key present for the get phase, whatever the put phase reached
        tiers[0].put(kv.key, kv)
    out["get"] = summary(run_clients(clients, seconds, get), entry_bytes)
    for kv in kvs:
        tiers[0].delete(kv.key)
    return out


def shard_kill(cluster: RedisCluster, seconds: float, kvs, entry_bytes: int) -> dict:
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    tiers = [tier(cluster.url, prefix) for _ in range(8)]
    for kv in kvs:
        assert tiers[0].put(kv.key, kv)
    cluster.replicate()
    victim = cluster.master_of(tiers[0]._name(kvs[0].key))
    on_victim = {kv.key.digest for kv in kvs if cluster.master_of(tiers[0]._name(kv.key)) is victim}

    def request(c: int, i: int) -> str:
        kv = kvs[i % len(kvs)]
        tag = "dead shard" if kv.key.digest in on_victim else "live shard"
        if i % 4 == 0:
            return f"stored ({tag})" if tiers[c].put(kv.key, kv) else f"failed put ({tag})"
        return f"hit ({tag})" if tiers[c].get(kv.key) is not None else f"miss ({tag})"

    killed = {}

    def kill_later() -> None:
        time.sleep(seconds / 3)
        killed["at"] = time.monotonic()
        cluster.kill(victim)

    killer = threading.Thread(target=kill_later)
    killer.start()
    run = run_clients(8, seconds, request)
    killer.join()
    records = run["records"]
    # requests in flight at the kill or started after it (a short run may start none after it: the tiny smoke run)
    after = [r for r in records if r[0] + r[1] >= killed["at"]]
    recovered = next((r[0] + r[1] - killed["at"] for r in after if r[0] >= killed["at"] and r[2] == "hit (dead shard)"),
                     None)
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r[2]] = outcomes.get(r[2], 0) + 1
    lat = sorted(r[1] for r in records)
    return {"clients": 8, "seconds": seconds, "keys": len(kvs), "keys_on_killed_shard": len(on_victim),
            "requests": len(records), "outcomes": outcomes,
            "errors_seen_by_requests": sum(n for o, n in outcomes.items() if o.startswith("error")),
            "served": sum(n for o, n in outcomes.items() if o.startswith(("hit", "stored"))),
            "worst_latency_ms": 1e3 * lat[-1], "p99_latency_ms": 1e3 * lat[int(0.99 * (len(lat) - 1))],
            "worst_latency_after_kill_ms": 1e3 * max(r[1] for r in after) if after else None,
            "dead_shard_served_again_after_s": recovered}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the throughput runs, each side in turn")
    parser.add_argument("--json", default=str(result_path("store_cluster")), help="write the results here")
    args = parser.parse_args(argv)
    kvs = [random_chunk(seed=i, **SHAPE) for i in range(KEYS)]
    from kvblend.store.entry import serialize

    entry_bytes = len(serialize(kvs[0]))
    results = record("store_cluster", [], entry_bytes=entry_bytes, timeout_s=TIMEOUT_S, throughput={})
    with RedisServer() as server, RedisCluster() as cluster:
        for round_ in range(args.rounds):  # alternated, so a load change on a shared machine hits both sides
            for name, url in (("single server", server.url), ("cluster 3+3", cluster.url)):
                for clients in (1, 8):
                    got = throughput(url, clients, args.seconds, kvs, entry_bytes)
                    results["throughput"][f"round {round_ + 1}, {name}, {clients} clients"] = got
                    results["rows"].append({"round": round_ + 1, "redis": name, "clients": clients, **got})
                    print(f"round {round_ + 1} {name:14s} {clients} clients: put {got['put']['ops_per_s']:6.1f}/s "
                          f"{got['put']['MB_per_s']:6.0f} MB/s  get {got['get']['ops_per_s']:6.1f}/s "
                          f"{got['get']['MB_per_s']:6.0f} MB/s  (p99 put {got['put']['p99_ms']:.0f} ms, "
                          f"get {got['get']['p99_ms']:.0f} ms)", flush=True)
        results["shard_kill"] = shard_kill(cluster, 3 * args.seconds, kvs, entry_bytes)
        print(json.dumps(results["shard_kill"], indent=1))
    write(args.json, results)
    return 0


TINY = ["--seconds", "0.3", "--rounds", "1", "--json", tiny_out("store_cluster.json")]

if __name__ == "__main__":
    raise SystemExit(main(with_tiny(sys.argv[1:], TINY)))

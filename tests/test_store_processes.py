"""The disk tier across processes: entries survive a new process both ways, and processes writing one key at
the same time leave one valid entry (atomic rename), with readers never seeing a torn one. Redis likewise."""

import json
import time

import torch

from kvblend.store import DiskTier, RedisConfig, RedisTier
from test_store_helpers import assert_same_kv, popen_python, random_chunk, run_python

CASES = [(21, "bfloat16"), (22, "float32")]

WRITE = """
import json, sys, torch
from kvblend.store import DiskTier
from test_store_helpers import random_chunk
root, cases = sys.argv[1], json.loads(sys.argv[2])
tier = DiskTier(root, 1 << 30)
digests = []
for seed, dtype in cases:
    kv = random_chunk(seed=seed, dtype=getattr(torch, dtype), base_position=seed)
    assert tier.put(kv.key, kv)
    digests.append(kv.key.digest)
print(json.dumps(digests))
"""

READ = """
import json, sys, torch
from kvblend.store import DiskTier
from test_store_helpers import assert_same_kv, random_chunk
root, cases = sys.argv[1], json.loads(sys.argv[2])
tier = DiskTier(root, 1 << 30)
for seed, dtype in cases:
    kv = random_chunk(seed=seed, dtype=getattr(torch, dtype), base_position=seed)
    assert_same_kv(tier.get(kv.key), kv)
    assert_same_kv(tier.get(kv.key, [2, 0]), kv, layers=[2, 0])
print("verified", len(cases))
"""


def _chunks():
    return [random_chunk(seed=seed, dtype=getattr(torch, dtype), base_position=seed) for seed, dtype in CASES]


def test_disk_entries_written_by_another_process_are_read_here(tmp_path):
    digests = json.loads(run_python(WRITE, str(tmp_path), json.dumps(CASES)))
    tier = DiskTier(tmp_path, 1 << 30)  # opened after the writer exited: a restart
    for kv, digest in zip(_chunks(), digests):
        assert kv.key.digest == digest  # the other process computed the same key
        assert_same_kv(tier.get(kv.key), kv)
    assert tier.stats().entries == 2


def test_disk_entries_written_here_are_read_by_another_process(tmp_path):
    tier = DiskTier(tmp_path, 1 << 30)
    for kv in _chunks():
        assert tier.put(kv.key, kv)
    del tier
    assert run_python(READ, str(tmp_path), json.dumps(CASES)).strip() == "verified 2"


WRITER = """
import json, sys, time
from pathlib import Path
import torch
from kvblend.store import DiskTier, RedisConfig, RedisTier
from test_store_helpers import random_chunk
root, me, rounds, url, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
versions = [random_chunk(seed=300 + w, token_seed=7, base_position=w, layers=2) for w in (0, 1)]  # one key, two KVs
mine = versions[me]
tiers = [DiskTier(root, 1 << 30), RedisTier(RedisConfig(url, prefix=prefix, timeout_s=5.0))]
Path(root, f"ready-{me}").touch()
while not Path(root, "go").exists():
    time.sleep(0.001)
seen = {"disk": [0, 0], "redis": [0, 0]}
for _ in range(rounds):
    for tier in tiers:
        assert tier.put(mine.key, mine)
        got = tier.get(mine.key)
        assert got is not None, f"{tier.name}: the key vanished while being rewritten"
        want = versions[got.base_position]
        assert torch.equal(got.k.view(torch.int16), want.k.view(torch.int16)), f"{tier.name}: torn K"
        assert torch.equal(got.v.view(torch.int16), want.v.view(torch.int16)), f"{tier.name}: torn V"
        seen[tier.name][got.base_position] += 1
print(json.dumps(seen))
"""


def test_two_processes_writing_one_key_leave_one_valid_entry(tmp_path, redis_url, redis_prefix):
    rounds = 80
    versions = [random_chunk(seed=300 + w, token_seed=7, base_position=w, layers=2) for w in (0, 1)]
    key = versions[0].key
    assert versions[1].key == key
    writers = [popen_python(WRITER, str(tmp_path), str(w), str(rounds), redis_url, redis_prefix) for w in (0, 1)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{w}").exists() for w in (0, 1)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in writers), [p.communicate() for p in writers]
        time.sleep(0.01)
    (tmp_path / "go").touch()
    reader = DiskTier(tmp_path, 1 << 30)  # a third process-like reader: this one, while they write
    reads = 0
    while any(p.poll() is None for p in writers):
        got = reader.get(key)
        if got is not None:
            assert_same_kv(got, versions[got.base_position])
            reads += 1
        time.sleep(0.005)
    outputs = [p.communicate(timeout=60) for p in writers]
    for p, (out, err) in zip(writers, outputs):
        assert p.returncode == 0, err[-4000:]
    assert reader.stats().corrupt == 0
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(("ready-", "go"))]
    assert [f.name for f in files] == [reader.path(key).name], "exactly one entry file and no temp files"
    final = DiskTier(tmp_path, 1 << 30).get(key)
    assert_same_kv(final, versions[final.base_position])
    final = RedisTier(RedisConfig(redis_url, prefix=redis_prefix)).get(key)
    assert_same_kv(final, versions[final.base_position])
    print("reads here:", reads, "seen by the writers:", [json.loads(out) for out, _ in outputs])

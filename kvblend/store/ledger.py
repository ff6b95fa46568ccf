"""Counter ledgers: hits, misses, puts and evictions per tier, summed over every process that used the store.

A tier's counters live in one process; `kvblend stats` runs in another. Each TieredStore adds what its tiers
counted since its last record (periodically and at close) to a ledger kept beside the persistent tiers: a JSON
file in the disk tier's directory (updated under an exclusive lock), or a hash on the Redis server.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)
COUNTED = ("hits", "misses", "puts", "evictions", "corrupt", "errors")


class Ledger(Protocol):
    def add(self, deltas: dict[str, dict[str, int]]) -> None: ...

    def read(self) -> dict[str, dict[str, int]]: ...


class FileLedger:
    """{tier: {counter: total}} in one JSON file; read-modify-write under flock, replaced atomically."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def add(self, deltas: dict[str, dict[str, int]]) -> None:
        try:
            with open(self.path.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                totals = self.read()
                for tier, counts in deltas.items():
                    row = totals.setdefault(tier, {})
                    for name, n in counts.items():
                        row[name] = row.get(name, 0) + n
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(totals, sort_keys=True))
                os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("store: cannot record counters in %s: %s", self.path, exc)

    def read(self) -> dict[str, dict[str, int]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("store: unreadable counters file %s (starting again from zero): %s", self.path, exc)
            return {}
        return {tier: {k: int(v) for k, v in row.items() if k in COUNTED} for tier, row in data.items()
                if isinstance(row, dict)}


class RedisLedger:
    """{tier: {counter: total}} as one Redis hash of "tier.counter" fields (HINCRBY: atomic across hosts)."""

    def __init__(self, tier) -> None:
        self.tier = tier
        self.name = tier.config.prefix + "counters"

    def add(self, deltas: dict[str, dict[str, int]]) -> None:
        def run():
            pipe = self.tier.client.pipeline(transaction=False)
            for tier, counts in deltas.items():
                for name, n in counts.items():
                    pipe.hincrby(self.name, f"{tier}.{name}", n)
            return pipe.execute()

        self.tier.call("record counters", run, None)

    def read(self) -> dict[str, dict[str, int]]:
        raw = self.tier.call("read counters", lambda: self.tier.client.hgetall(self.name), {}) or {}
        totals: dict[str, dict[str, int]] = {}
        for field, value in raw.items():
            tier, _, name = field.decode().partition(".")
            if name in COUNTED:
                totals.setdefault(tier, {})[name] = int(value)
        return totals

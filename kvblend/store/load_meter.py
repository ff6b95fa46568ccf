"""Measured read speed of each tier (seconds per byte, a moving average over recent hits), for the loading
controller: what a layer of a request's chunks costs to load from each tier, measured rather than assumed."""

from __future__ import annotations

import threading

SMOOTHING = 0.3  # weight of the newest read in the moving average


class LoadMeter:
    def __init__(self) -> None:
        self._s_per_byte: dict[str, float] = {}
        self._lock = threading.Lock()

    def record(self, tier: str, seconds: float, nbytes: int) -> None:
        """One hit of `nbytes` that took `seconds` (misses are not a read speed)."""
        if nbytes <= 0:
            return
        rate = seconds / nbytes
        with self._lock:
            old = self._s_per_byte.get(tier)
            self._s_per_byte[tier] = rate if old is None else (1 - SMOOTHING) * old + SMOOTHING * rate

    def seconds_per_byte(self) -> dict[str, float]:
        """Each measured tier's moving average (a tier never read from is absent)."""
        with self._lock:
            return dict(self._s_per_byte)

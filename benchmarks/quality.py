"""Suite `quality`: what reusing chunk KV does to the model's output (SmolLM2, fp32, CPU).

    python -m benchmarks.quality [PART] [--tiny] [ARGS]      # no PART: every part in turn

Parts: fidelity (`kvblend eval fidelity`: the KL gap each selection closes against a full prefill, task accuracy
on planted facts, per storage codec), gate (the quality gate's signals calibrated against the blend's KL, and the
gate replayed). Results: benchmarks/results/quality_<part>_cpu.json.
"""

from __future__ import annotations

from benchmarks.harness import run_suite

PARTS = {"fidelity": "fidelity", "gate": "quality_gate"}

if __name__ == "__main__":
    raise SystemExit(run_suite(PARTS))

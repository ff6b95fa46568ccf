"""Blend fidelity against a full prefill: `kvblend eval fidelity` (kvblend.eval.fidelity) as a part of the quality
suite, so its --tiny smoke run and its result file sit with the other benchmarks.

    python -m benchmarks.quality fidelity [--tiny] [kvblend eval fidelity's arguments]
    (the headline run: --corpus pydoc --cases 30 --context both --json benchmarks/results/quality_fidelity_cpu.json)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import tiny_out, with_tiny
from kvblend.cli import main as kvblend_main


def main(argv: list[str] | None = None) -> int:
    """`kvblend eval fidelity ARGV`: KL of each selection's first tokens against a full prefill (SmolLM2)."""
    return kvblend_main(["eval", "fidelity", *(sys.argv[1:] if argv is None else argv)])


TINY = ["--corpus", "pydoc", "--cases", "1", "--chunks", "2", "--chunk-tokens", "32", "--ratios", "0.15",
        "--no-baselines", "--greedy-steps", "1", "--json", tiny_out("quality_fidelity.json")]

if __name__ == "__main__":
    sys.exit(main(with_tiny(sys.argv[1:], TINY)))

"""Quickstart: index a few texts, then answer a question with the retrieved chunks' KV blended, and without.

    python examples/quickstart.py [WORK_DIR]

Index and chunk KV store go to WORK_DIR (default: kvblend's cache dir, `~/.cache/kvblend/examples/quickstart`);
run it twice and the second run finds every chunk already indexed and stored.
"""

import sys
from pathlib import Path

from kvblend.paths import cache_dir
from kvblend.rag.engine import configure_vllm_logging
from kvblend.rag.pipeline import RAGPipeline

TEXTS = [
    ("The Zorblax 3000 is a coffee machine made by Quillon Appliances. It brews at exactly 91 degrees Celsius and "
     "grinds the beans for 14 seconds before every cup. Its water tank holds 1.8 litres."),
    ("Quillon Appliances was founded in 2011 in Tampere, Finland. Besides coffee machines it makes kettles and a "
     "line of toasters called Crisp. The company has 240 employees."),
    ("To descale the Zorblax 3000, fill the tank with one part vinegar and two parts water, hold the steam button "
     "for five seconds, and let the machine run the cleaning cycle, which takes 22 minutes."),
    "The Crisp toaster has six browning levels and a bagel mode that heats only the cut side of the bread.",
]

if __name__ == "__main__":
    configure_vllm_logging("WARNING")  # vLLM logs to stderr, warnings and errors only
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else cache_dir() / "examples" / "quickstart"
    with RAGPipeline.from_defaults(index_dir=work / "index", store_dir=work / "store", top_k=3, max_tokens=48) as rag:
        added = rag.add_documents(TEXTS)
        print(f"{added.documents} texts, {added.chunks_added} new chunks indexed, "
              f"{added.chunks_precomputed} chunk KV computed through vLLM")

        question = "How long does the descaling cycle of the Zorblax 3000 take?"
        for blend in (True, False):
            result = rag.query(question, blend=blend)
            s = result.stats
            label = "kvblend" if blend else "plain vLLM"
            print(f"\n[{label}] TTFT {s.ttft_ms:.0f} ms, {s.prompt_tokens} prompt tokens, "
                  f"{s.tokens_reused} reused, {s.tokens_recomputed} recomputed")
            print(result.answer.strip())
        print("sources:", ", ".join(f"{src.title[:40]!r} ({src.score:.2f})" for src in result.sources))

        print("\nstreamed: ", end="")
        stream = rag.stream("What temperature does the Zorblax 3000 brew at?")
        for delta in stream:
            print(delta, end="", flush=True)
        print(f"\n({stream.result.stats.generated_tokens} tokens, mode {stream.result.stats.mode})")

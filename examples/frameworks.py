"""LangChain and LlamaIndex: kvblend retrievers feed `RAGPipeline.answer`, so generation reuses the chunks' cached KV.

    python examples/frameworks.py [WORK_DIR]

1. `rag.as_retriever()` is a LangChain retriever over the pipeline's own index; its Documents carry each
   chunk's token ids and cache key, and `rag.answer(question, docs)` blends their precomputed KV.
2. `CachedRetriever` wraps any LangChain retriever (here an InMemoryVectorStore's): it cuts every hit into
   kvblend chunks, and `on_new_chunks=rag.precompute` stores the KV of chunks it has not returned before.
3. The same chain batched, and beside its sources in a RunnableParallel.
4. LlamaIndex: `KVBlendLlamaIndexRetriever` over the pipeline's index, `KVBlendQueryEngine` answering with the blend.
(Against `kvblend serve` instead of an in-process pipeline: `KVBlendChatModel`, examples/serve.md.)
"""

import sys
from pathlib import Path

from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from kvblend.paths import cache_dir
from kvblend.rag.engine import configure_vllm_logging
from kvblend.rag.pipeline import RAGPipeline
from kvblend.retrieval import CachedRetriever, KVBlendEmbeddings
from kvblend.retrieval.corpus import Document
from kvblend.retrieval.llama_index import KVBlendLlamaIndexRetriever, KVBlendQueryEngine

MANUAL = [
    Document("manual/brewing", "The Zorblax 3000 brews at exactly 91 degrees Celsius and grinds the beans for 14 "
             "seconds before every cup.", "Brewing"),
    Document("manual/descaling", "To descale the Zorblax 3000, run the cleaning cycle with one part vinegar and two "
             "parts water; it takes 22 minutes.", "Descaling"),
    Document("manual/tank", "The Zorblax 3000 water tank holds 1.8 litres and has a blue light that blinks when it "
             "needs refilling.", "Water tank"),
]
SUPPORT_NOTES = [
    "Support note 17: if the Zorblax 3000 shows error E4, the grinder is jammed; unplug it and remove the hopper.",
    "Support note 23: error E7 means the water tank is not seated; push it down until it clicks.",
]


def show(title: str, result) -> None:
    s = result.stats
    print(f"\n{title}: {result.answer.strip()}")
    print(f"  sources {[src.source for src in result.sources]}; mode {s.mode}, {s.chunks} chunks, "
          f"{s.tokens_reused} tokens reused, TTFT {s.ttft_ms:.0f} ms")


if __name__ == "__main__":
    configure_vllm_logging("WARNING")  # vLLM logs to stderr, warnings and errors only
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else cache_dir() / "examples" / "langchain"
    with RAGPipeline.from_defaults(index_dir=work / "index", store_dir=work / "store", max_tokens=40) as rag:
        rag.add_documents(MANUAL)

        retriever = rag.as_retriever(k=2)
        question = "How long does descaling take?"
        show("KVBlendRetriever -> rag.answer", rag.answer(question, retriever.invoke(question)))

        chain = ({"docs": retriever, "question": RunnablePassthrough()}
                 | RunnableLambda(lambda x: rag.answer(x["question"], x["docs"]).answer.strip()))
        print("\nas a LangChain chain:", chain.invoke("At what temperature does it brew?"))
        for answer in chain.batch(["How big is the water tank?", "How long does it grind the beans?"]):
            print("  batched:", answer)
        both = RunnableParallel(answer=chain, docs=retriever).invoke("How long does descaling take?")
        print("  parallel:", both["answer"], "| from", [d.metadata["source"] for d in both["docs"]])

        store = InMemoryVectorStore(KVBlendEmbeddings(rag.embedder))
        store.add_texts(SUPPORT_NOTES, metadatas=[{"source": "note-17"}, {"source": "note-23"}])
        cached = CachedRetriever.from_vectorstore(store, rag.tokenizer, rag.key_for, k=2, on_new_chunks=rag.precompute)
        question = "What does error E4 mean?"
        show("CachedRetriever(InMemoryVectorStore) -> rag.answer", rag.answer(question, cached.invoke(question)))

        nodes = KVBlendLlamaIndexRetriever(rag.index, rag.embedder, rag.key_for, k=2)
        response = KVBlendQueryEngine(retriever=nodes, pipeline=rag).query("What does the blue light mean?")
        s = response.metadata["stats"]
        print(f"\nLlamaIndex query engine: {response.response.strip()}")
        print(f"  sources {[n.metadata['source'] for n in response.source_nodes]}; mode {s.mode}, {s.chunks} chunks, "
              f"{s.tokens_reused} tokens reused")

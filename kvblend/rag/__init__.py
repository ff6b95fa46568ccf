"""The RAG library: RAGPipeline (pipeline) and its settings (config), the vLLM engine it drives (engine) and its
KV space (kv_space), prompt assembly (prompt), results (answer), accepted inputs (documents), index upkeep
(index_updates) and the torch precompute job (precompute). Import the submodules directly."""

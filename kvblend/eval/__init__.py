"""Evaluation harnesses: blend fidelity against a full prefill (fidelity), TTFT of plain vLLM vs blending through
a RAGPipeline (bench). Import the submodules directly."""

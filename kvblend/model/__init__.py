"""Model side: ModelSpec and fingerprint (spec), safetensors weights (weights), the torch Llama-family runner
(runner) and its op set (ops), the embedded SmolLM2 (embedded). RoPE lives in the leaf module kvblend.rope.
Import the submodules directly: this package imports nothing."""

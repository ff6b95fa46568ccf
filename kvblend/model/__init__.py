"""Model side: ModelSpec and fingerprint (spec), RoPE and rope_shift (rope), safetensors weights (weights), the
torch Llama-family runner (runner), the embedded SmolLM2 (embedded). Import the submodules directly: this
package imports nothing, so kvblend.triton_kernels can use kvblend.model.rope without an import cycle."""

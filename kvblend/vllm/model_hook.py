"""How the connector reaches the model vLLM loaded: a model-loader plugin, vLLM's public extension point.

`pip install kvblend` declares the entry point `vllm.general_plugins: kvblend = kvblend.vllm.model_hook:register`,
which vLLM runs in every process it starts. It registers the load format "kvblend" with
`vllm.model_executor.model_loader.register_model_loader`: vLLM's default safetensors loading, after which the
loaded `nn.Module` is published to this process so the connector's worker side can blend on vLLM's own modules
(one copy of the weights). Turn it on with `LLM(load_format="kvblend", ...)` or `vllm serve --load-format kvblend`.
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

log = logging.getLogger(__name__)

LOAD_FORMAT = "kvblend"
_served: nn.Module | None = None
CONNECTOR_MODULES = {"KVBlendConnector": "kvblend.vllm.connector", "CpuNixlConnector": "kvblend.vllm.nixl_cpu"}


def served_model() -> nn.Module | None:
    """The model vLLM loaded in this process through the "kvblend" load format, or None."""
    return _served


def register() -> None:
    """Register the "kvblend" load format, and kvblend's connectors by name, with vLLM (the `vllm.general_plugins`
    entry point, run in every vLLM process; idempotent). By name: MultiConnector finds its members' stats classes
    in vLLM's connector registry, in the API server process, where no module path is looked at."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.model_executor.model_loader import register_model_loader

    for name, module in CONNECTOR_MODULES.items():
        if name not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(name, module, name)
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    @register_model_loader(LOAD_FORMAT)
    class KVBlendModelLoader(DefaultModelLoader):
        """vLLM's default loader (load format "auto") that publishes the model it loaded to kvblend."""

        def __init__(self, load_config) -> None:
            super().__init__(dataclasses.replace(load_config, load_format="auto"))

        def load_model(self, vllm_config, model_config, prefix: str = "") -> nn.Module:
            global _served
            model = super().load_model(vllm_config, model_config, prefix)
            _served = model
            log.info("kvblend: vLLM's loaded %s is available to the blend", type(model).__name__)
            return model

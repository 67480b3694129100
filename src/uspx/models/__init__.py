"""Model families, loading and fingerprints.

``adapter_for(model)`` is the only way the rest of uspx reaches a model's routers and experts.
"""

from __future__ import annotations

from uspx.models.base import KeptSet, MoEAdapter, MoELayer, Restriction
from uspx.models.gpt_oss import GptOssAdapter
from uspx.models.loading import (
    DEFAULT_MODEL,
    LoadedModel,
    load_model,
    model_fingerprint,
)
from uspx.io import UspxError

ADAPTERS: dict[str, type[MoEAdapter]] = {
    cls.family: cls
    for cls in (
        GptOssAdapter,
    )
}


def supported_families() -> list[str]:
    return sorted(ADAPTERS)


def adapter_class(model_type: str) -> type[MoEAdapter]:
    for cls in ADAPTERS.values():
        if model_type in cls.model_types:
            return cls
    raise UspxError(
        f"unsupported architecture {model_type!r}; uspx supports: {', '.join(supported_families())}"
    )


def adapter_for(model) -> MoEAdapter:
    """The adapter for a loaded transformers model."""
    return adapter_class(getattr(model.config, "model_type", type(model).__name__))(model)


__all__ = [
    "ADAPTERS",
    "DEFAULT_MODEL",
    "KeptSet",
    "LoadedModel",
    "MoEAdapter",
    "MoELayer",
    "Restriction",
    "adapter_class",
    "adapter_for",
    "load_model",
    "model_fingerprint",
    "supported_families",
]

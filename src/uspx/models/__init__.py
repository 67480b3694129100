"""Model families, loading and fingerprints.

``adapter_for(model)`` is the only way the rest of uspx reaches a model's routers and experts.
"""

from __future__ import annotations

from uspx.models.base import KeptSet, MoEAdapter, MoELayer, Restriction
from uspx.models.dbrx import DbrxAdapter
from uspx.models.deepseek_v3 import DeepseekV3Adapter
from uspx.models.gpt_oss import GptOssAdapter
from uspx.models.granitemoe import GraniteMoeAdapter
from uspx.models.jamba import JambaAdapter
from uspx.models.mixtral import MixtralAdapter
from uspx.models.olmoe import OlmoeAdapter
from uspx.models.phimoe import PhimoeAdapter
from uspx.models.qwen2_moe import Qwen2MoeAdapter
from uspx.models.qwen3_moe import Qwen3MoeAdapter
from uspx.models.loading import DEFAULT_MODEL, LoadedModel, load_model, model_fingerprint
from uspx.io import UspxError

ADAPTERS: dict[str, type[MoEAdapter]] = {
    cls.family: cls
    for cls in (GptOssAdapter, MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter, DeepseekV3Adapter,
                GraniteMoeAdapter, PhimoeAdapter, DbrxAdapter, JambaAdapter)
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


def is_mxfp4_tensor(name: str, dtype_tag: str) -> bool:
    """Whether a stored tensor (its name and safetensors dtype tag) holds MXFP4 blocks in the layout
    of some family's checkpoints; a folder is read without knowing its family."""
    return any(cls.mxfp4_scales_name(name, dtype_tag) is not None for cls in ADAPTERS.values())


__all__ = ["ADAPTERS", "DEFAULT_MODEL", "KeptSet", "LoadedModel", "MoEAdapter", "MoELayer", "Restriction",
           "adapter_class", "adapter_for", "is_mxfp4_tensor", "load_model", "model_fingerprint", "supported_families"]

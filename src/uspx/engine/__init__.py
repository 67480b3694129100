"""One engine for every stage: a weight source, batches, and observers.

``open_source(model, streaming=...)`` chooses where the weights come from (the whole model loaded in
memory, or one decoder layer at a time from its safetensors files); ``run`` sends batches through
it with the observers a stage attaches (routing, reconstruction, loss). Stages differ only in which
observers they attach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uspx.engine.batches import Batch, make_batches, pad_id_of
from uspx.engine.runner import RunStats, run
from uspx.engine.source import FromCheckpoint, InMemory, WeightSource
from uspx.io import UspxError

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                  "fp32": torch.float32, "float32": torch.float32}


def compute_dtype(name: str) -> torch.dtype:
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise UspxError(f"compute dtype must be one of bf16, fp16, fp32, not {name!r}") from None


@dataclass
class Opened:
    """A weight source with what the stages record about it."""

    source: WeightSource
    tokenizer: object | None
    path: str
    fingerprint: str
    label: str

    @property
    def streaming(self) -> bool:
        return not self.source.resident

    def loaded(self):
        """The in-memory model as a :class:`~uspx.models.LoadedModel` (resident sources only)."""
        from uspx.models import LoadedModel

        if not self.source.resident:
            raise UspxError("a layer-by-layer source holds no loaded model")
        return LoadedModel(self.source.model, self.tokenizer, self.path, self.fingerprint, self.label)


def open_source(model, *, streaming: bool = False, dtype: str = "bf16", trust_remote_code: bool = False,
                device: str | None = None, device_map=None, max_memory=None) -> Opened:
    """``model`` (a folder, ``"default"``, a :class:`~uspx.models.LoadedModel` or an :class:`Opened`)
    as a weight source.

    ``streaming`` reads one decoder layer at a time from the files, computing in ``dtype``; otherwise
    the model is loaded whole (fp32), on ``device`` or placed by accelerate's ``device_map`` /
    ``max_memory`` (:func:`uspx.models.load_model`; a folder only).
    """
    from uspx.models import LoadedModel, load_model, model_fingerprint
    from uspx.models.loading import resolve_model_path

    if isinstance(model, Opened):  # already opened: its source decides
        return model
    if (device_map is not None or max_memory is not None) and (streaming or isinstance(model, LoadedModel)):
        raise UspxError("a device map places a model loaded whole from its folder; a layer-by-layer run "
                        "(--streaming) and an already loaded model take none")
    if isinstance(model, LoadedModel):
        if streaming:
            raise UspxError("a layer-by-layer run reads the model folder; pass its path, not a loaded model")
        return Opened(InMemory(model.model), model.tokenizer, model.source, model.fingerprint, model.label)
    if not streaming:
        lm = load_model(model, trust_remote_code=trust_remote_code, device=device, device_map=device_map,
                        max_memory=max_memory)
        return Opened(InMemory(lm.model), lm.tokenizer, lm.source, lm.fingerprint, lm.label)
    if trust_remote_code:
        raise UspxError("layer-by-layer runs use transformers' own model classes; remote code is not supported")
    path = resolve_model_path(model)
    source = FromCheckpoint(path, compute_dtype(dtype))
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    from uspx.models.loading import model_label

    return Opened(source, tokenizer, str(path), model_fingerprint(path), model_label(path))


__all__ = ["Batch", "FromCheckpoint", "InMemory", "Opened", "RunStats", "WeightSource", "compute_dtype",
           "make_batches", "open_source", "pad_id_of", "run"]

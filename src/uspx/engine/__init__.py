"""One engine for every stage: a weight source, batches, and observers.

``open_source(model, streaming=...)`` chooses where the weights come from (the whole model loaded in
memory, or one decoder layer at a time from its safetensors files); ``run`` sends batches through
it with the observers a stage attaches (routing, reconstruction, loss). Stages differ only in which
observers they attach.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from uspx.engine.batches import Batch, make_batches, pad_id_of
from uspx.engine.runner import RunStats, run
from uspx.engine.source import FromCheckpoint, InMemory, WeightSource, check_device
from uspx.io import UspxError

from uspx.models.loading import AUTO, DTYPES as COMPUTE_DTYPES, DtypeChoice, dtype_name, parse_dtype, resolve_dtype


def compute_dtype(name: DtypeChoice, model_dir: str | Path | None = None) -> torch.dtype | None:
    """A precision choice (auto, bf16, fp16, fp32) as a torch dtype. ``"auto"`` is the checkpoint's
    stored float type: resolved when ``model_dir`` is given, else None (a source opened on the
    folder resolves it)."""
    return resolve_dtype(name, model_dir) if model_dir is not None else parse_dtype(name)


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

    @property
    def dtype(self) -> torch.dtype:
        """The precision the model computes in."""
        return self.source.dtype

    def loaded(self):
        """The in-memory model as a :class:`~uspx.models.LoadedModel` (resident sources only)."""
        from uspx.models import LoadedModel

        if not self.source.resident:
            raise UspxError("a layer-by-layer source holds no loaded model")
        return LoadedModel(self.source.model, self.tokenizer, self.path, self.fingerprint, self.label)


def open_source(model, *, streaming: bool = False, dtype: DtypeChoice = AUTO, trust_remote_code: bool = False,
                device: str | None = None, device_map=None, max_memory=None) -> Opened:
    """``model`` (a folder, ``"default"``, a :class:`~uspx.models.LoadedModel` or an :class:`Opened`)
    as a weight source.

    Both paths compute in ``dtype``: ``"auto"`` (the default) is the checkpoint's stored float type
    (fp32 stays fp32, bf16 stays bf16; MXFP4 experts decode into the type of the rest), or bf16,
    fp16, fp32. ``streaming`` reads one decoder layer at a time from the files and runs each on
    ``device`` (the CPU by default), moving it and the hidden states it needs there and back;
    otherwise the model is loaded whole on ``device`` or placed by accelerate's ``device_map`` /
    ``max_memory`` (:func:`uspx.models.load_model`; a folder only). A model already loaded keeps
    its own precision and placement.
    """
    from uspx.models import LoadedModel, load_model, model_fingerprint
    from uspx.models.loading import load_tokenizer, model_label, resolve_model_path

    chosen = parse_dtype(dtype)  # a bad name or an absent GPU fails before anything loads
    if device is not None:
        check_device(device)
    if isinstance(model, Opened):  # already opened: its source decides
        return model
    if (device_map is not None or max_memory is not None) and (streaming or isinstance(model, LoadedModel)):
        raise UspxError("a device map places a model loaded whole from its folder; a layer-by-layer run "
                        "(--streaming) and an already loaded model take none")
    if isinstance(model, LoadedModel) and streaming:
        raise UspxError("a layer-by-layer run reads the model folder; pass its path, not a loaded model")
    if not streaming:
        if not isinstance(model, LoadedModel):
            model = load_model(model, dtype=chosen or AUTO, trust_remote_code=trust_remote_code,
                               device=device, device_map=device_map, max_memory=max_memory)
        return Opened(InMemory(model.model), model.tokenizer, model.source, model.fingerprint, model.label)
    if trust_remote_code:
        raise UspxError("layer-by-layer runs use transformers' own model classes; remote code is not supported")
    path = resolve_model_path(model)
    source = FromCheckpoint(path, chosen, device=device)
    return Opened(source, load_tokenizer(path), str(path), model_fingerprint(path), model_label(path))


__all__ = ["AUTO", "Batch", "COMPUTE_DTYPES", "FromCheckpoint", "InMemory", "Opened", "RunStats", "WeightSource",
           "compute_dtype", "dtype_name", "make_batches", "open_source", "pad_id_of", "resolve_dtype", "run"]

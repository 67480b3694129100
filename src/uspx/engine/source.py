"""Where the weights come from: a model in memory, or one decoder layer at a time from its files.

Both sources run a decoder layer with the model's own transformers classes and the arguments the
model's own forward would pass it (attention masks per layer type, rotary embeddings, position
ids). Those arguments are captured by running the base model's forward with every decoder layer
replaced by a recorder that passes the hidden states through: the family's masking, sliding
windows, embedding scale and rotary code run exactly as in a whole-model forward, and nothing here
knows how a family builds them.

A checkpoint source builds the model's skeleton with parameters on the meta device (no memory),
materialises one module at a time from the safetensors files through transformers' own checkpoint
conversion (per-expert tensors on disk become the fused expert parameters of the loaded class),
and puts it back on the meta device when done. Quantized expert tensors are decoded by the
family's adapter, for the experts that will run only.

A checkpoint source given a ``device`` (``"cuda"``) computes there the way llm-compressor's
sequential pipeline onloads layers: each module is read on the CPU, moved to the device for its
block and released from there; the engine moves the hidden states a layer needs to the device and
its outputs back into the store, which stays in CPU memory.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from uspx.engine.checkpoint import Checkpoint
from uspx.io import UspxError
from uspx.models import MoEAdapter, adapter_class, adapter_for
from uspx.models.loading import DtypeChoice, resolve_dtype


class _Stop(Exception):
    """Raised by the last recorder a capture needs: the rest of the forward is not run."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during a capture: keeps its inputs, returns them."""

    def __init__(self, index: int, sink: dict, stop_at: int):
        super().__init__()
        self.index, self.sink, self.stop_at = index, sink, stop_at

    def forward(self, hidden_states, *args, **kwargs):
        self.sink[self.index] = (hidden_states, args, kwargs)
        if self.index >= self.stop_at:
            raise _Stop
        return hidden_states


class WeightSource:
    """What the engine runs: decoder layers, their call arguments, and the LM head."""

    adapter: MoEAdapter
    model: nn.Module
    resident: bool  # every weight is in memory: the engine may run a batch through all layers at once
    dtype: torch.dtype  # what the layers compute in (and the hidden states between them are kept in)

    @property
    def device(self) -> torch.device:
        """Where the layers compute: inputs go there, outputs come back to the CPU."""
        return torch.device("cpu")

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.adapter.decoder_layers(self.model)

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its weights in memory for the duration of the block."""
        yield self.decoder_layers[index]

    @contextmanager
    def head(self) -> Iterator[None]:
        """Final norm and LM head in memory for the duration of the block."""
        yield

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Input of decoder layer 0: the family's embedding and any scale applied to it (inside
        ``with source.embedding()``)."""
        device = self.device
        return self._capture(attention_mask.to(device), 0, input_ids=input_ids.to(device))[0][0]

    def layer_call(self, attention_mask: torch.Tensor, index: int, dtype: torch.dtype) -> tuple[tuple, dict]:
        """(extra positional args, keyword args) the model's forward passes to decoder layer ``index``."""
        hidden = int(self.config.hidden_size)
        embeds = torch.zeros(*attention_mask.shape, hidden, dtype=dtype, device=self.device)
        _, args, kwargs = self._capture(attention_mask.to(self.device), index, inputs_embeds=embeds)[index]
        return args, kwargs

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits of final hidden states (inside ``with source.head()``)."""
        return self.adapter.head_logits(self.model, hidden.to(self.device))

    def _capture(self, attention_mask: torch.Tensor, stop_at: int, **inputs) -> dict:
        layers = self.decoder_layers
        sink: dict = {}
        real = list(layers)
        for i in range(len(layers)):
            layers[i] = _Recorder(i, sink, stop_at)
        try:
            self.model.base_model(attention_mask=attention_mask, use_cache=False, **inputs)
        except _Stop:
            pass
        finally:
            for i, module in enumerate(real):
                layers[i] = module
        return sink

    @contextmanager
    def embedding(self) -> Iterator[None]:
        """The embedding in memory for the duration of the block."""
        yield


class InMemory(WeightSource):
    """A loaded transformers model: every layer is already there."""

    resident = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = adapter_for(model)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        """The embedding's device (a model placed by a device map moves activations between its
        devices itself; one whose embedding sits on disk takes CPU input)."""
        weight = self.model.get_input_embeddings().weight
        return weight.device if weight.device.type != "meta" else torch.device("cpu")


class FromCheckpoint(WeightSource):
    """A model folder read one module at a time, computing in ``dtype`` on ``device``.

    ``dtype``: a torch dtype or its name; None or ``"auto"`` is the checkpoint's stored float type
    (:func:`uspx.models.loading.stored_dtype`). ``device``: where each module computes while it is
    loaded (the CPU when None). ``experts``: per MoE layer, the experts a run can route to (a
    restricted run); quantized experts outside it are never decoded, so they cost no memory.
    ``edit(index, layer)`` changes decoder layer ``index`` once it is read, before it runs (a
    reference with some units zeroed, built one layer at a time).
    """

    resident = False

    def __init__(self, path: str | Path, dtype: DtypeChoice = None,
                 experts: Mapping[int, Sequence[int]] | None = None, device: str | torch.device | None = None,
                 edit: Callable[[int, nn.Module], None] | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt = Checkpoint(path)
        self.path = self.ckpt.path
        self.dtype = resolve_dtype(dtype, self.path)
        self._device = check_device(device)
        self.experts = experts
        self.edit = edit
        cls = adapter_class(str(self.ckpt.config.get("model_type")))
        config = AutoConfig.from_pretrained(self.path)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # decoded per layer by the adapter, not by transformers
        # parameters on the meta device, buffers (rotary tables) computed for real
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        self.adapter = cls(self.model)
        self._targets = self._target_names()
        self._place_buffers()

    @property
    def device(self) -> torch.device:
        return self._device

    def _place_buffers(self) -> None:
        """Computed buffers outside the decoder layers (rotary tables) live on the device for good:
        the argument capture runs there. Layers' buffers travel with their layer."""
        if self._device.type == "cpu":
            return
        inside = {id(m) for layer in self.decoder_layers for m in layer.modules()}
        for module in self.model.modules():
            if id(module) in inside:
                continue
            for name, buf in module._buffers.items():
                if buf is not None and buf.device.type != "meta":
                    module._buffers[name] = buf.to(self._device)

    @contextmanager
    def _onloaded(self, *modules: nn.Module) -> Iterator[None]:
        """``modules``, read from the files, on the device for the block; back on the meta device after."""
        if self._device.type != "cpu":
            for module in modules:
                module.to(self._device)
        try:
            yield
        finally:
            for module in modules:
                module.to("meta")

    def _target_names(self) -> dict[str, str]:
        """Checkpoint tensor name -> the model parameter it becomes (transformers' own renaming)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self._mapping = get_model_conversion_mapping(self.model)
        renamings = [m for m in self._mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self._mapping if isinstance(m, WeightConverter)]
        meta = self.model.state_dict()
        out = {}
        for name in self.ckpt.weight_map:
            decoded = self.adapter.decoded_name(name)
            target, _ = rename_source_key(decoded, renamings, converters, self.model.base_model_prefix, meta)
            if target not in meta and decoded in meta:
                target = decoded
            out[name] = target
        return out

    def target_of(self, name: str) -> str:
        """The model parameter a stored tensor becomes (its first one, for fused conversions)."""
        return self._targets[name]

    def stored_expert_bytes(self) -> list[int]:
        """Per MoE layer, the bytes one expert takes in the files as stored (its slice of every
        expert and router tensor, quantized blocks and scales included): what pruning it saves."""
        total = {l.index: 0 for l in self.adapter.layers}
        for name, target in self._targets.items():
            layer = self.adapter.pruned_with_expert(target)
            if layer is not None:
                total[layer.index] += self.ckpt.spec(name).nbytes
        self.ckpt.close()
        return [total[l.index] // l.num_experts for l in self.adapter.layers]

    def _names_under(self, prefix: str) -> list[str]:
        return [n for n, t in self._targets.items() if t.startswith(prefix)]

    def _materialise(self, prefix: str, experts: Sequence[int] | None = None) -> None:
        """Load every parameter under module path ``prefix`` (with a trailing dot) from the files."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        names = self._names_under(prefix)
        if not names:
            raise UspxError(f"{self.path}: no tensors for {prefix.rstrip('.')}")
        state = self.adapter.read_tensors(self.ckpt, names, self.dtype, experts)
        self.ckpt.close()  # unmap the shards: touched pages would otherwise stay in RSS all run
        cfg = LoadStateDictConfig(dtype=self.dtype, weight_mapping=self._mapping, device_map={"": "cpu"})
        with _quiet():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, cfg)
        missing = sorted(k for k in info.missing_keys if k.startswith(prefix))
        mismatched = sorted(str(k) for k in info.mismatched_keys)
        if missing or mismatched or info.conversion_errors:
            raise UspxError(
                f"{self.path}: tensors for {prefix.rstrip('.')} do not match the model class "
                f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}; wrong shape {mismatched[:4]}; "
                f"errors {info.conversion_errors})"
            )

    def module_prefix(self, module: nn.Module) -> str:
        """``module``'s name in the model with a trailing dot: the prefix of its tensors' names."""
        for name, m in self.model.named_modules():
            if m is module:
                return name + "."
        raise UspxError("module is not part of the model")

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        module = self.decoder_layers[index]
        experts = None if self.experts is None else self.experts.get(index)
        self._materialise(self.module_prefix(module), experts)
        if self.edit is not None:
            self.edit(index, module)
        with self._onloaded(module):
            yield module

    @contextmanager
    def embedding(self) -> Iterator[None]:
        module = self.model.get_input_embeddings()
        self._materialise(self.module_prefix(module))
        with self._onloaded(module):
            yield

    @contextmanager
    def head(self) -> Iterator[None]:
        norm = self.adapter.final_norm(self.model)
        lm_head = self.model.get_output_embeddings()
        self._materialise(self.module_prefix(norm))
        prefix = self.module_prefix(lm_head)
        tied = not self._names_under(prefix)
        with self.embedding() if tied else nullcontext():
            if tied:  # the head is the embedding table, already on the device
                lm_head.weight = self.model.get_input_embeddings().weight
            else:
                self._materialise(prefix)
            with self._onloaded(norm, lm_head):
                yield


def check_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device, refused early when this machine cannot compute there."""
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError):
        raise UspxError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UspxError(f"--device {device}: torch sees no CUDA GPU on this machine")
    if dev.type == "meta":
        raise UspxError("--device meta: layers must compute somewhere real")
    return dev


_M_MMAP_THRESHOLD = -3
_returning = 0  # depth of nested freed_memory_returned blocks


@contextmanager
def freed_memory_returned() -> Iterator[None]:
    """Within the block, have glibc give large freed blocks back to the system at once.

    A layer stored as hundreds of per-expert tensors (Qwen3: 384 of 1.5-3 MiB) is freed into glibc's
    heap, which keeps it: the next layer's load then peaked at 7.6 GiB instead of 5.3 GiB on a
    Qwen3-30B-A3B layer in float32. Serving every allocation above 128 KiB from its own mapping
    (``M_MMAP_THRESHOLD``) returns each layer's memory when it is released. Only for the block:
    outside layer-by-layer runs every allocation and free would cost page faults (a recovery
    training step on the bundled teacher took twice as long, most of it system time), so on leaving
    the threshold goes to 32 MiB, the ceiling glibc's own adaptive threshold grows towards. A no-op
    where the C library is not glibc or the user set ``MALLOC_MMAP_THRESHOLD_``.
    """
    global _returning
    libc = _libc() if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None else None
    if libc is not None and _returning == 0:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    _returning += 1
    try:
        yield
    finally:
        _returning -= 1
        if libc is not None and _returning == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' loader draws a progress bar per call; one per layer would flood the terminal."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


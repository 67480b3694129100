"""Named hook points, and the one place uspx registers forward hooks on a model's modules.

Every MoE layer has the same points whatever its family (names in the spirit of TransformerLens,
``"blocks.3.router"``): ``router``, ``experts``, ``block`` (the MoE block), ``decoder_layer`` and
``attention``. :func:`point` resolves one through the model's adapter, so no caller needs a family's
module names. A :class:`Hook` says what to attach where (forward or forward-pre, with kwargs, first
or last); :func:`hooked` registers hooks for the duration of a ``with`` block and always removes
them, also when the block raises (a hook left behind would change every later forward).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Union

from torch import nn
from torch.utils.hooks import RemovableHandle

from uspx.io import UspxError
from uspx.models.base import MoEAdapter, MoELayer

POINTS = ("router", "experts", "block", "decoder_layer", "attention")
_NAME = re.compile(r"^blocks\.(\d+)\.(\w+)$")


@dataclass(frozen=True)
class Hook:
    """A hook to attach: ``fn(module, args[, kwargs], output)`` after ``module``'s forward, or
    ``fn(module, args[, kwargs])`` before it when ``pre`` (it may return replaced args / output).
    ``prepend`` puts it before hooks already there (restrictions use it, so recorders see their
    routing)."""

    module: nn.Module
    fn: Callable
    pre: bool = False
    with_kwargs: bool = False
    prepend: bool = False


HookLike = Union[Hook, tuple[nn.Module, Callable]]


def forward_hook(module: nn.Module, fn: Callable, *, with_kwargs: bool = False, prepend: bool = False) -> Hook:
    return Hook(module, fn, pre=False, with_kwargs=with_kwargs, prepend=prepend)


def pre_hook(module: nn.Module, fn: Callable, *, with_kwargs: bool = False, prepend: bool = False) -> Hook:
    return Hook(module, fn, pre=True, with_kwargs=with_kwargs, prepend=prepend)


def register(hook: Hook) -> RemovableHandle:
    """Attach one hook now; the caller removes the handle (prefer :func:`hooked`)."""
    if hook.pre:
        return hook.module.register_forward_pre_hook(hook.fn, with_kwargs=hook.with_kwargs, prepend=hook.prepend)
    return hook.module.register_forward_hook(hook.fn, with_kwargs=hook.with_kwargs, prepend=hook.prepend)


class Handles:
    """Handles of attached hooks; ``remove()`` (or leaving the ``with`` block) detaches them all."""

    def __init__(self, handles: Iterable[RemovableHandle] = ()):
        self._handles = list(handles)

    def add(self, hooks: Iterable[HookLike], *, pre: bool = False) -> "Handles":
        """Attach more hooks (pairs are forward hooks, or forward-pre hooks with ``pre``)."""
        for h in hooks:
            self._handles.append(register(_as_hook(h, pre)))
        return self

    def extend(self, handles: Iterable) -> "Handles":
        """Take over handles attached elsewhere (anything with ``remove()``)."""
        self._handles.extend(handles)
        return self

    def remove(self) -> None:
        # detach in reverse order, and all of them even if one fails
        handles, self._handles = self._handles, []
        for h in reversed(handles):
            h.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> "Handles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _as_hook(h: HookLike, pre: bool) -> Hook:
    if isinstance(h, Hook):
        return h
    module, fn = h
    if not isinstance(module, nn.Module) or not callable(fn):
        raise UspxError(f"a hook is a (module, function) pair, not {h!r}")
    return Hook(module, fn, pre=pre)


@contextlib.contextmanager
def hooked(hooks: Iterable[HookLike], *, pre: bool = False) -> Iterator[Handles]:
    """Attach ``hooks`` (:class:`Hook` objects, or ``(module, fn)`` pairs: forward hooks, or
    forward-pre hooks with ``pre``) for the duration of the block; always detached afterwards."""
    handles = Handles()
    try:
        handles.add(hooks, pre=pre)
        yield handles
    finally:
        handles.remove()


def forward_hooks(pairs: Iterable[tuple[nn.Module, Callable]], **kw: bool) -> contextlib.AbstractContextManager:
    """``with forward_hooks([(module, fn), ...]):`` forward hooks for the block."""
    return hooked([forward_hook(m, f, **kw) for m, f in pairs])


def forward_pre_hooks(pairs: Iterable[tuple[nn.Module, Callable]], **kw: bool) -> contextlib.AbstractContextManager:
    """``with forward_pre_hooks([(module, fn), ...]):`` forward-pre hooks for the block."""
    return hooked([pre_hook(m, f, **kw) for m, f in pairs])


# ----- named points ------------------------------------------------------------------------
def decoder_layer(adapter: MoEAdapter, layer: MoELayer | int) -> nn.Module:
    """The decoder layer holding a MoE block (its output is the hidden state after the layer)."""
    index = layer.index if isinstance(layer, MoELayer) else int(layer)
    layers = adapter.decoder_layers(adapter.model)
    if not 0 <= index < len(layers):
        raise UspxError(f"decoder layer {index} outside 0..{len(layers) - 1}")
    return layers[index]


def attention(adapter: MoEAdapter, layer: MoELayer | int) -> nn.Module:
    """The attention module of a decoder layer (asked of the adapter)."""
    obj = adapter.attention(decoder_layer(adapter, layer))
    if obj is None:
        index = layer.index if isinstance(layer, MoELayer) else layer
        raise UspxError(f"{adapter.family}: decoder layer {index} has no attention module {adapter.attention_attr!r}")
    return obj


def point(adapter: MoEAdapter, layer: MoELayer | int, name: str) -> nn.Module:
    """Hook point ``name`` (one of :data:`POINTS`) of the MoE layer ``layer`` (or its index)."""
    if name not in POINTS:
        raise UspxError(f"hook point must be one of {', '.join(POINTS)}, not {name!r}")
    if name == "decoder_layer":
        return decoder_layer(adapter, layer)
    if name == "attention":
        return attention(adapter, layer)
    return getattr(layer if isinstance(layer, MoELayer) else adapter.layer(int(layer)), name)


def named(adapter: MoEAdapter, name: str) -> nn.Module:
    """A point by its full name, ``"blocks.<decoder layer index>.<point>"``."""
    m = _NAME.match(name)
    if m is None:
        raise UspxError(f"hook point names look like 'blocks.3.router', not {name!r}")
    return point(adapter, int(m.group(1)), m.group(2))


def points(adapter: MoEAdapter, name: str) -> list[tuple[MoELayer, nn.Module]]:
    """Point ``name`` of every MoE layer, in layer order."""
    return [(layer, point(adapter, layer, name)) for layer in adapter.layers]


__all__ = ["Handles", "Hook", "POINTS", "attention", "decoder_layer", "forward_hook", "forward_hooks",
           "forward_pre_hooks", "hooked", "named", "point", "points", "pre_hook", "register"]

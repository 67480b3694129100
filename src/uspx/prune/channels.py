"""Narrower experts: keep the same number of intermediate channels in every expert (the width a
config holds for the whole model), each expert its own best ones.

A channel ``c`` of expert ``e`` adds ``g_e(x) * h_c(x) * d_c`` to the MoE block's output (``h_c``
its activation, ``d_c`` its column of the down projection, ``g_e`` the routing weight), so its
score on the user's calibration tokens is ``sum over tokens routed to e of g_e(x) |h_c(x)|``
times ``||d_c||`` per calibration token (the activation-weighted magnitude Wanda and FLAP use,
restricted to the tokens the expert serves; ``uspx.score.units``, method ``activation``). Removing
a channel is exact: the export slices the gate/up rows, their biases and the down columns of the
dropped channels out of every expert and sets the config's expert width; it is reloaded with
stock ``from_pretrained`` and compared with the original whose dropped channels are zeroed in the
down projection (the masked model).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from uspx.engine import InMemory
from uspx.io import UspxError, atomic_folder, write_json
from uspx.models import adapter_for, load_model, model_fingerprint
from uspx.models.base import set_field, submodule
from uspx.models.loading import model_from_state
from uspx.prune.export import RECORD
from uspx.prune.files import copy_tokenizer, weight_files
from uspx.prune.verify import compare_layers, verification_items, within_tolerance
from uspx.score.units import score_units
from uspx.workload import EncodedItem


def channel_scores(model: nn.Module, items: list[EncodedItem], pad_id: int = 0, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Per MoE layer, [E, I] channel scores on ``items`` (see the module doc): the ``activation``
    score of :mod:`uspx.score.units`."""
    us = score_units(model, items, ["channels"], ["activation"], pad_id=pad_id, batch_size=batch_size, bootstrap=0)
    return {l: torch.from_numpy(us.matrix("channel", "activation", l)) for l in us.layers("channel")}


def kept_channels(scores: dict[int, torch.Tensor], width: int) -> dict[int, torch.Tensor]:
    """Per layer, [E, width] channel ids each expert keeps: its ``width`` best, in increasing order."""
    out = {}
    for layer, s in scores.items():
        if not 1 <= width <= s.shape[1]:
            raise UspxError(f"expert width {width} outside 1..{s.shape[1]}")
        out[layer] = torch.topk(s, width, dim=1, sorted=False).indices.sort(dim=1).values
    return out


def mask_expert_channels(adapter, layer, width: int, kept: dict[int, torch.Tensor | list[int]]) -> None:
    """Zero, in place, the down-projection columns of the channels each expert ``e`` of ``kept``
    drops (it keeps ``kept[e]``): those channels then write nothing."""
    dim, index = adapter.expert_down_layout(layer, width)
    down = adapter.expert_down(layer)
    with torch.no_grad():
        for e, channels in kept.items():
            drop = torch.ones(width, dtype=torch.bool)
            drop[torch.as_tensor(channels, dtype=torch.long)] = False
            down[e].index_fill_(dim - 1, index[drop].reshape(-1), 0.0)


def masked(model: nn.Module, kept: dict[int, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose dropped channels write nothing (their down columns zeroed)."""
    out = copy.deepcopy(model)
    adapter = adapter_for(out)
    for layer in adapter.layers:
        mask_expert_channels(adapter, layer, adapter.expert_width(), dict(enumerate(kept[layer.index])))
    return out


def narrowed(model: nn.Module, kept: dict[int, torch.Tensor]) -> nn.Module:
    """A new model of the same family with every expert cut to its kept channels (config width set)."""
    adapter = adapter_for(model)
    width = adapter.expert_width()
    new_width = int(next(iter(kept.values())).shape[1])
    config = copy.deepcopy(model.config)
    set_field(config, adapter.expert_width_field, new_width)
    state = dict(model.state_dict())
    for layer in adapter.layers:
        for name in adapter.channel_layout(layer, width):
            param = getattr(layer.experts, name).detach()
            rows = []
            for e in range(layer.num_experts):
                dim, positions = adapter.channel_positions(layer, width, kept[layer.index][e])[name]
                rows.append(param[e].index_select(dim - 1, positions))
            state[f"{layer.name}.experts.{name}"] = torch.stack(rows)
    return model_from_state(config, state, next(model.parameters()).dtype)


def _dense_modules(model: nn.Module, kind: dict) -> dict[int, nn.Module]:
    """Decoder layer -> the dense MLP a plan's dense kind (``path``, ``kept``) names in it."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    out = {}
    for layer in kind["kept"]:
        mlp = submodule(layers[layer], kind["path"])
        if mlp is None or adapter.dense_down(mlp) is None:
            raise UspxError(f"the plan narrows {kind['path']} of layer {layer}, which this model does not have")
        out[layer] = mlp
    return out


def masked_dense(model: nn.Module, dense: list[dict]) -> nn.Module:
    """A copy of ``model`` whose dense MLP channels not in ``dense[i]["kept"]`` write nothing."""
    out = copy.deepcopy(model)
    adapter = adapter_for(out)
    with torch.no_grad():
        for kind in dense:
            for layer, mlp in _dense_modules(out, kind).items():
                keep = set(kind["kept"][layer])
                down = adapter.dense_down(mlp).weight
                drop = [c for c in range(down.shape[1]) if c not in keep]
                down[:, drop] = 0.0
    return out


def narrowed_dense(model: nn.Module, dense: list[dict]) -> nn.Module:
    """A new model of the same family with every dense MLP of each kind cut to its kept channels
    (the kind's config width field set)."""
    adapter = adapter_for(model)
    config = copy.deepcopy(model.config)
    state = dict(model.state_dict())
    prefix = {id(m): name for name, m in model.named_modules()}
    for kind in dense:
        set_field(config, kind["field"], kind["width"])
        for layer, mlp in _dense_modules(model, kind).items():
            keep = torch.tensor(kind["kept"][layer], dtype=torch.long)
            for proj in (*adapter.dense_in_projs(mlp).values(), adapter.dense_down(mlp)):
                _narrow_linear(state, prefix[id(proj)], proj, keep, proj is adapter.dense_down(mlp))
    return model_from_state(config, state, next(model.parameters()).dtype)


def _narrow_linear(state: dict, name: str, linear: nn.Linear, keep: torch.Tensor, by_columns: bool) -> None:
    """``state``'s entries of ``linear`` (module path ``name``) cut to channels ``keep``: its output
    rows and bias, or (``by_columns``) its input columns, which leaves its bias whole."""
    w = linear.weight.detach()
    state[f"{name}.weight"] = w[:, keep] if by_columns else w[keep]
    if linear.bias is not None and not by_columns:
        state[f"{name}.bias"] = linear.bias.detach()[keep]


def save_verified(lm, narrow: nn.Module, reference: nn.Module, heldout: Callable[[Path], dict] | None,
                  out_dir: str | Path, fields: dict, *, kept: dict[int, list[int]] | None = None,
                  size_check=None) -> dict:
    """Write ``narrow`` (a structurally smaller copy of ``lm``'s model) to ``out_dir`` in the stored
    precision, reload it with stock ``from_pretrained``, compare its logits with ``reference`` (the
    masked original, rounded the same way, restricted to ``kept`` experts when given) and put it in
    place only if they agree and ``size_check(folder)`` (which raises on a mismatch) passes; then
    record ``heldout(folder)`` as its held-out delta when given (evaluation sits above pruning, so
    the caller brings it: ``uspx.narrow.heldout_deltas``). Returns the record (``fields`` plus
    verification, sizes and the held-out delta)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UspxError(f"{out} exists and is not empty; refusing to overwrite it")
    source = weight_files(lm.source)
    if source.is_mxfp4():
        raise UspxError(f"{lm.source}: MXFP4 weights are cut from the files, in whole blocks of 32 channels: "
                        "choose the cut with `uspx select --units` or `uspx extract`")
    stored = source.main_float_dtype()
    with atomic_folder(out) as tmp:
        copy.deepcopy(narrow).to(stored).save_pretrained(tmp)
        copy_tokenizer(Path(lm.source), tmp)
        reloaded = load_model(tmp, with_tokenizer=False).model
        with torch.no_grad():  # the stored precision, parameters only (rotary tables are not saved)
            for p in reference.parameters():
                p.copy_(p.to(stored).to(p.dtype))
        check = compare_layers(InMemory(reference), kept or {}, InMemory(reloaded),
                               verification_items(lm.tokenizer, None, int(lm.model.config.vocab_size)))
        check["reloaded_with"] = "AutoModelForCausalLM.from_pretrained (stored precision)"
        if not within_tolerance(check, 1e-4):
            raise UspxError(f"the export differs from the masked model by {check['max_abs_logit_diff']:.3g} in "
                            f"logits, {max(check['max_abs_hidden_diff'], default=0.0):.3g} in a layer's output; "
                            "nothing was written")
        record = dict(fields, source=str(lm.source), source_fingerprint=lm.fingerprint,
                      family=adapter_for(lm.model).family, verification=check,
                      fingerprint=model_fingerprint(tmp), status="written")
        if size_check is not None:
            record["size"] = size_check(tmp)
        write_json(tmp / RECORD, record)
        if out.exists():
            out.rmdir()
    record["bytes"] = dict(original=source.tensor_bytes, narrowed=weight_files(out).tensor_bytes)
    if heldout is not None:
        record["heldout"] = heldout(out)
    write_json(out / RECORD, record)
    return record

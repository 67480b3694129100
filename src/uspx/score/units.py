"""Scores of the units inside the layers: expert channels, KV groups and query heads.

Every unit writes the residual stream through a block of columns of one projection: channel ``c``
of expert ``e`` through column ``c`` of that expert's down projection (scaled by the routing weight
``g_e``), query head ``h`` through its ``o_proj`` columns, KV group ``k`` through the ``o_proj``
columns of the query heads that read it. Removing a unit alone changes that write by exactly its
contribution, so on the calibration tokens (per real token, the bootstrap unit being the prompt):

- ``reconstruction``: ``sum_t ||contribution_t||^2 / tokens``, the squared output change removing the
  unit causes at its layer. Experts' ``reconstruction`` score (``uspx.score.reconstruction``) is
  the same quantity for whole experts, so the three unit types share one currency and one knapsack
  can weigh them (assuming the removals add: cross terms between removed units are ignored).
- ``activation``: ``sum_t ||contribution_t|| / tokens``, the magnitude Wanda and FLAP rank by
  (``g_e |h_c| ||d_c||`` for a channel).
- ``attribution``: ``-dL/dm`` with the unit's block scaled by ``m``, one forward and backward per
  prompt (first-order Taylor estimate of the loss change of removing it).
- ``fisher``: ``(1/2) mean_i (dL_i/dm)^2`` over prompts ``i`` (``L_i`` the prompt's mean loss), the
  empirical-Fisher estimate of the same change (Theis et al., 2018).
- ``ablation`` (heads only, opt in: one pass over the calibration set per head): the loss change
  when the unit's block is zeroed, measured.

Channels of dense MLPs (a family's shared experts and dense layers, ``dense_mlp_paths`` of its
adapter) are units of kind ``dense_channel`` scored the same way: channel ``c`` writes ``s x_c d_c``
(``x_c`` its activation, ``d_c`` its down-projection column, ``s`` the MLP's output gate, 1 when it
has none); ``index`` is the MLP kind, so each kind keeps its own width.

The loss is uspx's one definition (``uspx.score.loss``). Intervals are bootstrap percentiles over
prompts, drawn with the same resampling as the expert scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from uspx.engine import WeightSource
from uspx.engine.forward import frozen
from uspx.engine.observers import Observer
from uspx.io import UspxError, atomic_path
from uspx.models import adapter_for
from uspx.progress import progress_bar
from uspx.score.bootstrap import resample_counts
from uspx.workload import EncodedItem

UNITS = ("experts", "channels", "heads")
KINDS = ("channel", "dense_channel", "kv_group", "query_head")
METHODS = ("reconstruction", "activation", "attribution", "fisher", "ablation")
LOCAL_METHODS = ("reconstruction", "activation")  # measured inside each layer: they run layer by layer
DEFAULT_METHODS = ("reconstruction", "activation", "attribution", "fisher")
PARQUET = "units.parquet"

SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # channel, kv_group or query_head
        ("layer", pa.int16()),  # decoder layer
        ("index", pa.int32()),  # expert (channels), dense MLP kind (dense channels), KV group or query head
        ("channel", pa.int32()),  # the channel of a channel row; -1 otherwise
        ("method", pa.string()),
        ("value", pa.float64()),  # higher = more important
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n_prompts", pa.int32()),
    ]
)


def parse_units(text: str | Sequence[str]) -> list[str]:
    """``"experts,channels,heads"`` -> the unit types, checked."""
    names = [u.strip() for u in (text.split(",") if isinstance(text, str) else text) if u.strip()]
    bad = [u for u in names if u not in UNITS]
    if bad or not names:
        raise UspxError(f"unknown unit type {', '.join(bad) or repr(text)}; choose from {', '.join(UNITS)}")
    return [u for u in UNITS if u in names]


REPLICATE_BYTES = 16 << 20  # bootstrap replicates kept per layer, method and unit kind, at most


class _Sums:
    """Per-prompt sums of one quantity over many units, kept as their total and as bootstrap
    replicate totals (the per-prompt values themselves would not fit for channels of a large model).

    The replicates of one layer take at most :data:`REPLICATE_BYTES`: a layer with many units keeps
    the first replicates that fit (gpt-oss-20b's 92,160 channels a layer: 22 of 200), and none when
    fewer than 20 fit (its intervals are then NaN), so memory stays bounded on any model."""

    def __init__(self, shape: tuple[int, ...], counts: np.ndarray):
        fit = REPLICATE_BYTES // (8 * int(np.prod(shape)))
        counts = counts[: fit if fit >= 20 else 0]
        self.counts = torch.from_numpy(counts)  # [B, P]
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.rep = torch.zeros((counts.shape[0], *shape), dtype=torch.float64)

    def add(self, per_prompt: torch.Tensor, prompts: torch.Tensor) -> None:
        """``per_prompt`` [n, *shape]: the sums of prompts ``prompts`` (global ids) in this batch."""
        per_prompt = per_prompt.double()
        self.total += per_prompt.sum(0)
        if self.rep.shape[0]:
            self.rep += torch.tensordot(self.counts[:, prompts], per_prompt, dims=1)

    def ratio(self, den_total: float, den_rep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        value = (self.total / max(den_total, 1e-300)).numpy()
        if not self.rep.shape[0]:
            nan = np.full(value.shape, np.nan)
            return value, nan, nan
        den_rep = den_rep[: self.rep.shape[0]]  # the replicates this layer kept
        reps = self.rep.numpy() / np.maximum(den_rep, 1e-300).reshape(-1, *([1] * value.ndim))
        return value, np.percentile(reps, 2.5, axis=0), np.percentile(reps, 97.5, axis=0)


@dataclass
class UnitScores:
    """Unit scores as one table (see :data:`SCHEMA`)."""

    table: pa.Table

    def methods(self) -> list[str]:
        return sorted(set(self.table.column("method").to_pylist()))

    def matrix(self, kind: str, method: str, layer: int) -> np.ndarray:
        """One layer's values: [experts, channels] for channels, [MLP kind, channels] for dense
        channels (rows of kinds the layer lacks are 0), [units] for heads."""
        t = self.table.filter((pc.field("kind") == kind) & (pc.field("method") == method)
                              & (pc.field("layer") == layer))
        if not t.num_rows:
            raise UspxError(f"no {method!r} scores for {kind} units of layer {layer} in this unit table")
        at = (t.column("index").to_numpy(),)
        if kind in ("channel", "dense_channel"):
            at += (t.column("channel").to_numpy(),)
        out = np.zeros([int(a.max()) + 1 for a in at])
        out[at] = t.column("value").to_numpy()
        return out

    def layers(self, kind: str) -> list[int]:
        t = self.table.filter(pc.field("kind") == kind)
        return sorted(set(t.column("layer").to_pylist()))

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / PARQUET
        with atomic_path(path) as tmp:
            pq.write_table(self.table, tmp)
        return path


def load_units(folder: str | Path) -> UnitScores:
    """The unit table of a score folder; an error naming the file when it is missing or damaged."""
    path = Path(folder)
    path = path if path.name == PARQUET else path / PARQUET
    if not path.exists():
        raise UspxError(f"{path}: missing; score channels and heads with `uspx score ... --units experts,channels,heads`")
    try:
        table = pq.read_table(path).select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError, OSError) as exc:
        raise UspxError(f"{path}: not a uspx unit table ({exc})") from None
    kinds = set(table.column("kind").to_pylist()) - set(KINDS)
    if kinds:
        raise UspxError(f"{path}: unknown unit kinds {sorted(kinds)}")
    return UnitScores(table)


def _rows(kind: str, layer: int, method: str, value, low, high, n_prompts: int, first: int = 0) -> pa.Table:
    """Rows of one layer's units; channel kinds are [units, channels] with unit ids from ``first``."""
    value, low, high = (np.asarray(a, np.float64) for a in (value, low, high))
    if kind in ("channel", "dense_channel"):
        e, c = np.indices(value.shape)
        index, channel = e.reshape(-1) + first, c.reshape(-1)
    else:
        index, channel = np.arange(value.size), np.full(value.size, -1)
    n = value.size
    return pa.table(dict(kind=pa.array([kind] * n), layer=pa.array(np.full(n, layer), pa.int16()),
                         index=pa.array(index, pa.int32()), channel=pa.array(channel, pa.int32()),
                         method=pa.array([method] * n), value=pa.array(value.reshape(-1)),
                         ci_low=pa.array(low.reshape(-1)), ci_high=pa.array(high.reshape(-1)),
                         n_prompts=pa.array(np.full(n, n_prompts), pa.int32())), schema=SCHEMA)


# ----- the forward pass: reconstruction and activation ---------------------------------------------
def _down_norms(adapter, layer, width: int) -> torch.Tensor:
    """[E, I]: the norm of each channel's column of the down projection."""
    dim, _ = adapter.expert_down_layout(layer, width)
    down = adapter.expert_down(layer).detach()
    other = [d - 1 for d in range(1, down.dim()) if d != dim]
    # one expert at a time: a float64 copy of a large layer's experts would not fit beside it
    return torch.stack([down[e].double().pow(2).sum(dim=other).sqrt() for e in range(down.shape[0])])


def _check_heads(adapter) -> None:
    if not adapter.heads_prunable:
        raise UspxError(f"{adapter.family}: its attention heads share one compressed key/value (latent "
                        "attention); uspx scores and cuts heads of grouped-query attention only")


def _head_columns(adapter) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Output-projection input columns of every query head [heads, hd] and every KV group [kv, rep*hd]."""
    heads, kv, hd = adapter.head_shape()
    cols = torch.arange(heads * hd).reshape(heads, hd)
    return cols, cols.reshape(kv, (heads // kv) * hd)


class _Contributions(Observer):
    """Per-prompt sums of every unit's contribution, filled by forward hooks during one pass over
    the batches; as the engine's observer, ``state`` holds the current batch's real-token mask and
    prompt ids. The hooks sit on the source's modules, so they see a model run whole or a decoder
    layer at a time, and read weights only when they run (a layer read from the files exists only
    for its turn)."""

    def __init__(self, counts: np.ndarray):
        super().__init__()
        self.counts = counts
        self.sums: dict[tuple[str, str, int, int], _Sums] = {}
        self.state: dict[str, torch.Tensor] = {}

    def begin(self, batch) -> None:
        super().begin(batch)
        real = batch.real
        self.state["real"] = real
        self.state["prompts"] = torch.tensor(batch.rows)
        self.state["local"] = torch.arange(len(batch.rows)).repeat_interleave(batch.input_ids.shape[1])[real]

    def real_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., D] flattened to its real tokens' rows, in float64, on the CPU."""
        return x.reshape(-1, x.shape[-1]).cpu()[self.state["real"]].double()

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(int(self.state["prompts"].numel()), *shape, dtype=torch.float64)

    def add(self, kind: str, layer: int, first: int, sq: torch.Tensor, ab: torch.Tensor) -> None:
        """Per-prompt squared norms ``sq`` and norms ``ab`` [prompts, *units] of units from id ``first``."""
        for method, per_prompt in (("reconstruction", sq), ("activation", ab)):
            key = (kind, method, layer, first)
            if key not in self.sums:
                self.sums[key] = _Sums(tuple(per_prompt.shape[1:]), self.counts)
            self.sums[key].add(per_prompt, self.state["prompts"])

    def add_tokens(self, kind: str, layer: int, first: int, c: torch.Tensor) -> None:
        """Contribution norms ``c`` [real tokens, *units] of units from id ``first``, summed per prompt."""
        local = self.state["local"]
        self.add(kind, layer, first, self.zeros(*c.shape[1:]).index_add_(0, local, c.pow(2)),
                 self.zeros(*c.shape[1:]).index_add_(0, local, c))


def _expert_channel_hooks(adapter, col: _Contributions) -> list:
    """Forward-pre hooks on every MoE layer's experts: ``g_e |h_c| ||d_c||`` per routed token."""
    from uspx.engine.hooks import pre_hook

    width = adapter.expert_width()
    norms: dict[int, torch.Tensor] = {}  # per layer, read once (a layer's weights do not change in a run)

    def hook_for(layer):
        def hook(module, args):
            if layer.index not in norms:
                norms[layer.index] = _down_norms(adapter, layer, width).to(args[0].device)
            hidden, index, weights = args[0], args[1], args[2]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            n = hidden.shape[0]
            keep = col.state["real"].to(hidden.device)
            hidden, index, weights = hidden[keep], index.reshape(n, -1)[keep], weights.reshape(n, -1)[keep]
            local = col.state["local"]
            sq, ab = col.zeros(layer.num_experts, width), col.zeros(layer.num_experts, width)
            for e in index.unique().tolist():
                rows, slot = torch.nonzero(index == e, as_tuple=True)
                h = adapter.expert_intermediate(layer, hidden[rows], e).double()
                c = (weights[rows, slot].double()[:, None] * h.abs() * norms[layer.index][e]).cpu()
                sq[:, e].index_add_(0, local[rows.cpu()], c.pow(2))
                ab[:, e].index_add_(0, local[rows.cpu()], c)
            col.add("channel", layer.index, 0, sq, ab)
        return hook

    return [pre_hook(l.experts, hook_for(l)) for l in adapter.layers]


def _dense_channel_hooks(adapter, model: nn.Module, col: _Contributions) -> list:
    """Hooks on every dense MLP (shared experts, dense layers): ``s |x_c| ||d_c||`` per token, the
    down projection's input ``x`` staged until the output gate ``s`` (when there is one) has run."""
    from uspx.engine.hooks import forward_hook, pre_hook

    def hooks_for(i, k, mlp, gate):
        down = adapter.dense_down(mlp)
        key = f"dense{i}.{k}"

        def down_pre(module, args):
            col.state[key] = col.real_rows(args[0])
            if gate is None:
                record(torch.ones(1, dtype=torch.float64))

        def record(scale):
            norms = down.weight.detach().double().norm(dim=0).cpu()  # [I], read while the layer is in memory
            c = (scale * col.state.pop(key)).abs() * norms
            col.add_tokens("dense_channel", i, k, c[:, None])  # unit id k: this MLP kind

        def gate_hook(module, args, out):  # the gate runs on the block input: sigmoid(out) scales the MLP
            record(torch.sigmoid(col.real_rows(out)))

        return [pre_hook(down, down_pre)] + ([forward_hook(gate, gate_hook)] if gate is not None else [])

    return [h for i, k, mlp, gate in adapter.dense_mlps(model) for h in hooks_for(i, k, mlp, gate)]


def _head_hooks(adapter, model: nn.Module, col: _Contributions) -> list:
    """Forward-pre hooks on every attention output projection: each head's and KV group's write."""
    from uspx.engine.hooks import pre_hook

    _check_heads(adapter)
    head_cols, group_cols = _head_columns(adapter)

    def hook_for(i, o_proj):
        def hook(module, args):
            x, w = col.real_rows(args[0]), o_proj.weight.detach().double().cpu()
            for kind, blocks in (("query_head", head_cols), ("kv_group", group_cols)):
                norms = [(x[:, cols] @ w[:, cols].T).norm(dim=1) for cols in blocks]
                col.add_tokens(kind, i, 0, torch.stack(norms, 1))  # [tokens, units]
        return hook

    outs = [adapter.attention_out(a) for a in adapter.attention_modules(model)]
    return [pre_hook(o, hook_for(i, o)) for i, o in enumerate(outs)]


def _source(model: nn.Module | WeightSource) -> WeightSource:
    from uspx.engine import InMemory

    return model if isinstance(model, WeightSource) else InMemory(model)


@torch.no_grad()
def contribution_sums(model: nn.Module | WeightSource, items: list[EncodedItem], units: Sequence[str], *,
                      pad_id: int = 0, batch_size: int = 8, bootstrap: int = 200, seed: int = 0,
                      progress: bool = False) -> dict[str, pa.Table]:
    """``reconstruction`` and ``activation`` rows of every channel and head unit (module doc), from
    one pass of the engine: ``model`` in memory, or a source read a decoder layer at a time."""
    from uspx.engine import make_batches, run
    from uspx.engine.hooks import hooked

    source = _source(model)
    adapter, net = source.adapter, source.model
    counts = resample_counts(len(items), bootstrap, seed)
    col = _Contributions(counts)
    hooks = []
    if "channels" in units:
        hooks += _expert_channel_hooks(adapter, col) + _dense_channel_hooks(adapter, net, col)
    if "heads" in units:
        hooks += _head_hooks(adapter, net, col)
    tokens = np.array([len(e.input_ids) for e in items], dtype=np.float64)
    batches = make_batches(items, batch_size, pad_id)
    with hooked(hooks):  # no logits needed: the hooks collect inside the layers
        run(source, batches, [col], progress=progress, label="unit contributions")
    den_rep = counts @ tokens
    out: dict[str, list[pa.Table]] = {}
    for (kind, method, layer, first), s in sorted(col.sums.items()):
        out.setdefault(method, []).append(_rows(kind, layer, method, *s.ratio(tokens.sum(), den_rep), len(items), first))
    return {m: pa.concat_tables(t) for m, t in out.items()}


# ----- gradients: attribution and fisher ----------------------------------------------------------
def _blocks(model: nn.Module, units: Sequence[str]) -> list[tuple[str, int, torch.Tensor, Callable, int]]:
    """(kind, layer, weight, per-unit reduction of grad * weight, first unit id) for every unit block."""
    adapter = adapter_for(model)
    out = []
    if "channels" in units:
        width = adapter.expert_width()
        for l in adapter.layers:
            dim, index = adapter.expert_down_layout(l, width)

            def per_channel(gw, dim=dim, index=index):
                other = [d for d in range(1, gw.dim()) if d != dim]
                return gw.sum(dim=other)[:, index[:, 0]]  # [E, I]
            out.append(("channel", l.index, adapter.expert_down(l), per_channel, 0))
        for i, k, mlp, _ in adapter.dense_mlps(model):
            out.append(("dense_channel", i, adapter.dense_down(mlp).weight, lambda gw: gw.sum(0)[None], k))  # [1, I]
    if "heads" in units:
        _check_heads(adapter)
        head_cols, group_cols = _head_columns(adapter)
        for i, a in enumerate(adapter.attention_modules(model)):
            for kind, blocks in (("query_head", head_cols), ("kv_group", group_cols)):
                out.append((kind, i, adapter.attention_out(a).weight,
                            lambda gw, blocks=blocks: torch.stack([gw[:, c].sum() for c in blocks]), 0))
    return out


def gradient_scores(model: nn.Module, items: list[EncodedItem], units: Sequence[str], *, pad_id: int = 0,
                    bootstrap: int = 200, seed: int = 0, progress: bool = False) -> dict[str, pa.Table]:
    """``attribution`` and ``fisher`` rows, from one forward and backward per prompt (module doc)."""
    from uspx.engine import make_batches
    from uspx.engine.batches import n_targets
    from uspx.score.loss import token_losses

    blocks = _blocks(model, units)
    weights = list({id(w): w for _, _, w, _, _ in blocks}.values())
    targets = np.array([n_targets(e) for e in items], dtype=np.float64)
    total = max(targets.sum(), 1.0)
    counts = resample_counts(len(items), bootstrap, seed)
    attr: list[_Sums | None] = [None] * len(blocks)
    fish: list[_Sums | None] = [None] * len(blocks)
    with frozen(model.parameters()):
        for w in weights:
            w.requires_grad_(True)
        batches = make_batches(items, 1, pad_id, by_length=False)
        with progress_bar("unit attribution", len(batches), "prompts", progress) as bar:
            for i, batch in enumerate(batches):
                bar.advance()
                if not targets[i]:
                    continue
                loss = token_losses(model, batch).sum()
                grads = dict(zip(map(id, weights), torch.autograd.grad(loss, weights)))
                prompt = torch.tensor([i])
                for b, (kind, layer, w, reduce, _) in enumerate(blocks):
                    d = reduce((grads[id(w)] * w.detach()).double())  # d(sum loss_i)/dm
                    if attr[b] is None:
                        attr[b], fish[b] = _Sums(tuple(d.shape), counts), _Sums(tuple(d.shape), counts)
                    attr[b].add(-d[None], prompt)
                    fish[b].add((d / targets[i]).pow(2)[None] / 2, prompt)
    tables: dict[str, list[pa.Table]] = {"attribution": [], "fisher": []}
    rep_targets, rep_prompts = counts @ targets, counts.sum(1)
    for b, (kind, layer, _, _, first) in enumerate(blocks):
        if attr[b] is None:
            continue
        tables["attribution"].append(_rows(kind, layer, "attribution", *attr[b].ratio(total, rep_targets), len(items), first))
        tables["fisher"].append(_rows(kind, layer, "fisher", *fish[b].ratio(float(len(items)), rep_prompts), len(items),
                                      first))
    return {m: pa.concat_tables(t) for m, t in tables.items() if t}


# ----- ablation of heads ----------------------------------------------------------------------------
@torch.no_grad()
def head_ablation(model: nn.Module, items: list[EncodedItem], *, pad_id: int = 0, batch_size: int = 8,
                  bootstrap: int = 200, seed: int = 0, progress: bool = False) -> pa.Table:
    """``ablation`` rows of every KV group and query head: the loss change with its output-projection
    columns zeroed, measured (one pass over ``items`` per unit)."""
    from uspx.score.loss import compute_loss

    adapter = adapter_for(model)
    head_cols, group_cols = _head_columns(adapter)
    base = compute_loss(model, items, batch_size, pad_id=pad_id)
    total = max(float(base.n_tokens.sum()), 1.0)
    counts = resample_counts(len(items), bootstrap, seed)
    rep_targets = counts @ base.n_tokens
    attn = adapter.attention_modules(model)
    work = [(i, kind, blocks) for i in range(len(attn)) for kind, blocks in (("kv_group", group_cols), ("query_head", head_cols))]
    tables = []
    with progress_bar("head ablation", sum(len(b) for _, _, b in work), "heads", progress) as bar:
        for i, kind, blocks in work:
            w = adapter.attention_out(attn[i]).weight
            per = np.zeros((len(items), len(blocks)))
            for u, cols in enumerate(blocks):
                saved = w[:, cols].clone()
                w[:, cols] = 0.0
                try:
                    per[:, u] = compute_loss(model, items, batch_size, pad_id=pad_id).sum_loss - base.sum_loss
                finally:
                    w[:, cols] = saved
                bar.advance()
            s = _Sums((len(blocks),), counts)
            s.add(torch.from_numpy(per), torch.arange(len(items)))
            tables.append(_rows(kind, i, "ablation", *s.ratio(total, rep_targets), len(items)))
    return pa.concat_tables(tables)


def score_units(model: nn.Module | WeightSource, items: list[EncodedItem], units: Sequence[str],
                methods: Sequence[str] = DEFAULT_METHODS, *, pad_id: int = 0, batch_size: int = 8,
                bootstrap: int = 200, seed: int = 0, progress: bool = False) -> UnitScores:
    """Every requested method's scores of the channel and head units of ``model`` on ``items``.
    ``reconstruction`` and ``activation`` run on a source read layer by layer too; the gradient
    methods and ablation need the model in memory."""
    units = [u for u in units if u in ("channels", "heads")]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UspxError(f"unknown unit score method {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if not units:
        raise UspxError("no channel or head units to score")
    whole_only = sorted(set(methods) - set(LOCAL_METHODS))
    if whole_only and not _source(model).resident:
        raise UspxError(f"unit scores {', '.join(whole_only)} need the model in memory; layer by layer uspx scores "
                        f"units with {', '.join(LOCAL_METHODS)}")
    if whole_only:
        model = _source(model).model
    got: dict[str, pa.Table] = {}
    if {"reconstruction", "activation"} & set(methods):
        got.update(contribution_sums(model, items, units, pad_id=pad_id, batch_size=batch_size,
                                     bootstrap=bootstrap, seed=seed, progress=progress))
    if {"attribution", "fisher"} & set(methods):
        got.update(gradient_scores(model, items, units, pad_id=pad_id, bootstrap=bootstrap, seed=seed,
                                   progress=progress))
    if "ablation" in methods and "heads" in units:
        got["ablation"] = head_ablation(model, items, pad_id=pad_id, batch_size=batch_size, bootstrap=bootstrap,
                                        seed=seed, progress=progress)
    return UnitScores(pa.concat_tables([t for m, t in got.items() if m in methods]))

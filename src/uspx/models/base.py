"""The one interface every model family implements.

Everything outside ``uspx.models`` talks to a MoE through a :class:`MoEAdapter` and never touches a
family's tensor layout. Transformers 5 stores experts as fused 3-D parameters in every family, every
router module returns ``(logits, topk_weights, topk_index)`` (dbrx: logits only) and every
``*.experts`` module is called as ``experts(hidden [N, H], topk_index [N, k], topk_weights [N, k])``.
The base class builds on those facts; a family module overrides only what differs: how the router
turns logits into weights, which tensors hold the experts, and the config field with the expert count.
The rest of uspx asks the adapter, never the model, for every other name a family chooses: attention
and dense-MLP projections, head counts and width, attention sinks, stored MXFP4 tensors.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from uspx.io import UspxError
from uspx.models.mxfp4 import BLOCK_SIZE

if TYPE_CHECKING:
    from uspx.models.params import ModelParams

KeptSet = Mapping[int, Sequence[int]]
"""Kept experts: MoE layer index (the decoder layer index) -> expert ids to keep."""


@dataclass
class MoELayer:
    """One MoE block of a model."""

    index: int  # decoder layer index
    name: str  # module path of the MoE block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int


class Restriction:
    """Hook handles removed together by ``remove()`` or on leaving the ``with`` block: a mask-only
    restriction's, or the engine's observers' on the layers it runs."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "Restriction":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class MoEAdapter:
    """Access to the routers and experts of one loaded Hugging Face MoE model.

    Subclasses set the class attributes and override :meth:`route` (and :meth:`expert_tensors`
    when the experts are not stored with the expert id on dim 0).
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    expert_count_field: ClassVar[str] = "num_local_experts"  # dotted path inside the config
    router_attr: ClassVar[str] = "gate"
    router_expert_params: ClassVar[tuple[str, ...]] = ("weight",)  # router tensors with dim 0 = expert
    router_returns_tuple: ClassVar[bool] = True
    pad_mechanism: ClassVar[str | None] = None  # how an export's filler experts are made unroutable
    top_k_field: ClassVar[str] = "num_experts_per_tok"  # dotted path inside the config
    layer_pattern: ClassVar[str] = r"layers\.(\d+)\."  # decoder layer index in a module path
    decoder_layers_attr: ClassVar[str] = "layers"  # the decoder layers' ModuleList in the base model
    final_norm_attr: ClassVar[str] = "norm"  # the norm before the LM head, in the base model
    logits_divisor_field: ClassVar[str | None] = None  # config field the LM head's logits are divided by
    per_expert_name: ClassVar[str] = r"\.experts\.(\d+)\."  # a stored tensor of one expert: its id
    attention_projections: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj")  # LoRA targets
    expert_width_field: ClassVar[str] = "intermediate_size"  # an expert's intermediate width in the config
    attention_attr: ClassVar[str] = "self_attn"  # a decoder layer's attention module
    per_head_params: ClassVar[tuple[str, ...]] = ()  # attention parameters with one entry per query head (sinks)
    # whether query heads and KV groups are units uspx can cut (grouped-query attention with o_proj
    # columns per head); False for latent attention, whose heads share compressed K/V
    heads_prunable: ClassVar[bool] = True
    # dense gate/up/down MLPs whose channels are units too: (path under a decoder layer, config field
    # holding their width, path of a sigmoid gate scaling their output or None); a path naming the MoE
    # block in MoE layers is skipped there (it has no down_proj)
    dense_mlp_paths: ClassVar[tuple[tuple[str, str, str | None], ...]] = ()
    # what else the expert width field sizes, when it does (narrower experts would resize it too)
    expert_width_also_sizes: ClassVar[str | None] = None
    # grouped-query attention, as attributes of the attention module: the query, key and value
    # projections (rows per head) and the output projection (columns per head)
    query_proj: ClassVar[str] = "q_proj"
    key_value_projs: ClassVar[tuple[str, str]] = ("k_proj", "v_proj")
    output_proj: ClassVar[str] = "o_proj"
    # config fields of the head layout: query heads, KV heads (absent: one per query head) and head
    # width (absent: hidden size / query heads)
    query_heads_field: ClassVar[str] = "num_attention_heads"
    kv_heads_field: ClassVar[str] = "num_key_value_heads"
    head_dim_field: ClassVar[str] = "head_dim"
    # a dense MLP's gate, up and down projections (attributes of the MLP module)
    dense_mlp_projs: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    # the fused expert parameter holding the down projection (a key of :meth:`channel_layout`)
    expert_down_param: ClassVar[str] = "down_proj"
    # the attention module's parameter of per-head sink logits, None where the family has none
    sinks_param: ClassVar[str | None] = None
    # stored MXFP4 expert tensors: (name suffix of the uint8 blocks, of their uint8 scales); None
    # where the family's checkpoints are never MXFP4
    mxfp4_suffixes: ClassVar[tuple[str, str] | None] = None
    # With one expert chosen top-1 the family's routing weight is exactly 1 whatever the router's logits
    # (softmax over the chosen logits, or over all logits of a single expert): a dense student runs as
    # that family's own model class. False where routing scales the output (sigmoid scores, sampling).
    single_expert_weight_is_one: ClassVar[bool] = False
    # a submodule of the experts module that their forward calls once per expert with tokens, giving
    # that expert's unweighted outputs (where expert output norms are read); None: transformers' kernels
    expert_call_module: ClassVar[str | None] = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.layers = self._find_layers()
        if not self.layers:
            raise UspxError(f"{type(model).__name__}: no MoE layers found for family {self.family}")

    # ----- structure -------------------------------------------------------------------------
    def _find_layers(self) -> list[MoELayer]:
        layers = []
        for name, module in self.model.named_modules():
            experts = getattr(module, "experts", None)
            router = getattr(module, self.router_attr, None)
            if not isinstance(experts, nn.Module) or not isinstance(router, nn.Module):
                continue
            m = re.search(self.layer_pattern, name + ".")
            if m is None:
                continue
            layers.append(
                MoELayer(int(m.group(1)), name, module, router, experts, self.num_experts, self.top_k)
            )
        return layers

    def layer(self, index: int) -> MoELayer:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise UspxError(f"layer {index} is not a MoE layer; MoE layers: {[l.index for l in self.layers]}")

    @property
    def num_experts(self) -> int:
        return self.config_num_experts(self.config)

    @property
    def top_k(self) -> int:
        return int(get_field(self.config, self.top_k_field))

    # ----- parameter counts (config only, no model) ------------------------------------------
    @classmethod
    def count_params(cls, cfg: object) -> "ModelParams":
        """Parameter counts of the model a transformers config describes, without building it.

        Each family writes its formula from its own config fields (``uspx.models.params`` holds
        the shared parts and the result types); the memory planner reaches it only through here.
        """
        raise UspxError(f"{cls.family or cls.__name__}: no parameter formula for this family's config")

    @classmethod
    def config_num_experts(cls, cfg: object) -> int:
        """Routed experts per MoE layer, as the config says (``expert_count_field``)."""
        return int(get_field(cfg, cls.expert_count_field))

    # ----- running the model a layer at a time ---------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model.base_model, self.decoder_layers_attr)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(model.base_model, self.final_norm_attr)

    def head_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the causal-LM forward computes from the last decoder layer's output."""
        logits = model.get_output_embeddings()(self.final_norm(model)(hidden))
        if self.logits_divisor_field is not None:
            logits = logits / float(get_field(self.config, self.logits_divisor_field))
        return logits

    @classmethod
    def decoded_name(cls, name: str) -> str:
        """The checkpoint name a stored tensor has once decoded (quantized tensors: its parameter)."""
        return name

    @classmethod
    def read_tensors(cls, ckpt, names: Sequence[str], dtype: torch.dtype,
                     experts: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Checkpoint tensors ``names`` as the model class loads them (quantized ones decoded to
        ``dtype``; with ``experts``, only those experts need be decoded)."""
        return {n: ckpt.get(n) for n in names}

    def pruned_with_expert(self, param: str) -> MoELayer | None:
        """The MoE layer whose experts parameter ``param`` (a model parameter name) is sliced with:
        its routed experts' tensors and the router's per-expert rows. None for everything else."""
        for layer in self.layers:
            if param.startswith(f"{layer.name}.experts.") or any(
                    param == f"{layer.name}.{self.router_attr}.{p}" for p in self.router_expert_params):
                return layer
        return None

    @classmethod
    def filler_value(cls, param: str) -> float:
        """Every value of parameter ``param``'s rows for a never-routed filler expert (families with
        a ``pad_mechanism``); weights are zero, so nothing of a dropped expert stays in the file."""
        return 0.0

    # ----- routing ---------------------------------------------------------------------------
    def route(self, layer: MoELayer, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's routing: raw router logits [N, E] -> (topk_weights [N, k], topk_index [N, k])."""
        raise NotImplementedError

    def router_logits(self, output: object) -> torch.Tensor:
        """Raw logits from a router module's forward output."""
        return output[0] if self.router_returns_tuple else output  # type: ignore[index]

    def masked_logits(self, layer: MoELayer, logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
        """Logits with banned experts made unroutable (-inf); exact for softmax routers."""
        return logits.masked_fill(banned.to(logits.device), float("-inf"))

    def restrict(self, kept: KeptSet) -> Restriction:
        """Route only among ``kept`` experts, shapes unchanged: the mask-only restriction a pruned export must reproduce.

        The hook is prepended so that transformers' own output recorders (registered lazily) and
        uspx's tracer see the restricted routing, not the original one.
        """
        self.validate_kept(kept, allow_missing=True)
        handles = []
        for layer in self.layers:
            if layer.index in kept:
                banned = torch.ones(layer.num_experts, dtype=torch.bool)
                banned[list(kept[layer.index])] = False
                hook = self.reroute_hook(layer, lambda b=banned: b)  # bound now: each layer its own mask
                handles.append(layer.router.register_forward_hook(hook, prepend=True))
        return Restriction(handles)

    def reroute_hook(self, layer: MoELayer, banned: Callable[[], torch.Tensor]) -> Callable:
        """A router forward hook that routes again without the experts ``banned()`` names: [E] for
        every token, or [N, E] per token (read at each call, so a caller can change it)."""

        def hook(module: nn.Module, args: tuple, output: object) -> object:
            logits = self.masked_logits(layer, self.router_logits(output), banned())
            if not self.router_returns_tuple:
                return logits
            weights, index = self.route(layer, logits)
            return (logits, weights, index)

        return hook

    def validate_kept(self, kept: KeptSet, allow_missing: bool = False) -> None:
        """Refuse kept sets that name unknown layers or experts, or leave fewer than top-k experts."""
        indices = {l.index for l in self.layers}
        for idx, experts in kept.items():
            if idx not in indices:
                raise UspxError(f"kept set names layer {idx}, which is not a MoE layer of this model")
            ids = list(experts)
            if len(set(ids)) != len(ids):
                raise UspxError(f"kept set for layer {idx} repeats an expert: {ids}")
            bad = [e for e in ids if not 0 <= int(e) < self.num_experts]
            if bad:
                raise UspxError(f"kept set for layer {idx} names experts {bad} outside 0..{self.num_experts - 1}")
            if len(ids) < self.top_k:
                raise UspxError(
                    f"kept set for layer {idx} keeps {len(ids)} experts, fewer than top-k = {self.top_k}"
                )
        if not allow_missing:
            missing = sorted(indices - set(kept))
            if missing:
                raise UspxError(f"kept set has no entry for MoE layers {missing}")

    # ----- experts ---------------------------------------------------------------------------
    def expert_tensors(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        """Views of the fused expert tensors, expert id on dim 0 (read-only use)."""
        return dict(layer.experts.named_parameters(recurse=False))

    def capture_expert_norms(self, layer: MoELayer, sink: Callable[[torch.Tensor], None]):
        """Hand ``sink`` each routed expert's output norm [N, k] at every call of ``layer``'s experts,
        read inside the forward (:mod:`uspx.models.expert_norms`); ``.remove()`` detaches it."""
        from uspx.models.expert_norms import NormCapture

        return NormCapture(self, layer, sink)

    def expert_outputs(self, layer: MoELayer, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs f_e(x) for every (token, slot): hidden [N, H], index [N, k] -> [N, k, H].

        Calls the family's own experts forward with one slot of weight 1 per row, so the output is
        exactly what the model computes before gating (biases and clamps included).
        """
        n, k = index.shape
        rows = hidden.repeat_interleave(k, dim=0)
        idx = index.reshape(-1, 1)
        ones = torch.ones(idx.shape, dtype=hidden.dtype, device=hidden.device)
        out = layer.experts.forward(rows, idx, ones)  # .forward: skip hooks, we may be inside one
        return out.reshape(n, k, -1)

    # ----- sizes -----------------------------------------------------------------------------
    def bytes_per_expert(self, layer: MoELayer) -> int:
        total = sum(t.numel() * t.element_size() for t in self.expert_tensors(layer).values())
        for name in self.router_expert_params:
            t = submodule(layer.router, name)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total // layer.num_experts

    def total_bytes(self) -> int:
        """Bytes of the state dict (parameters and persistent buffers), tied tensors counted once.

        Persistent buffers count because some routers keep per-expert state there (deepseek's
        ``e_score_correction_bias``); non-persistent ones (rotary tables) are not in a checkpoint.
        """
        seen = {}
        for t in self.model.state_dict(keep_vars=True).values():
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return sum(seen.values())

    def expert_bytes(self) -> int:
        return sum(self.bytes_per_expert(l) * l.num_experts for l in self.layers)

    def other_bytes(self) -> int:
        """Bytes of everything that is not a routed expert (attention, embeddings, shared experts)."""
        return self.total_bytes() - self.expert_bytes()

    # ----- physical pruning ------------------------------------------------------------------
    def pruned_config(self, n_kept: int):
        """The config of this model with ``n_kept`` experts per MoE layer (a pruned export's)."""
        cfg = copy.deepcopy(self.config)
        set_field(cfg, self.expert_count_field, n_kept)
        return cfg

    # ----- dense students ----------------------------------------------------------------------
    def expert_width(self) -> int:
        return self.config_expert_width(self.config)

    @classmethod
    def config_expert_width(cls, cfg: object) -> int:
        """An expert's intermediate width, as the config says (``expert_width_field``)."""
        return int(get_field(cfg, cls.expert_width_field))

    @classmethod
    def student_config(cls, cfg: object, width: int):
        """The config of a dense student of ``cfg``: every MoE layer one expert of ``width``
        channels, chosen top-1 (its routing weight is then 1, so the layer is one dense MLP)."""
        if not cls.single_expert_weight_is_one:
            raise UspxError(f"{cls.family}: its routing does not give a single expert the weight 1; "
                            "a dense student cannot be expressed in this family's own model class")
        cfg = copy.deepcopy(cfg)
        set_field(cfg, cls.expert_count_field, 1)
        set_field(cfg, cls.top_k_field, 1)
        set_field(cfg, cls.expert_width_field, int(width))
        return cfg

    def merged_experts(self, layer: MoELayer, experts: Sequence[int], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """The fused expert parameters (name under ``experts.`` -> tensor with one expert on dim 0) of
        one MLP computing ``sum_e weights[e] * expert_e(x)`` for ``experts``: channels concatenated
        (gate rows, up rows), down columns scaled by the weights. Layout here: ``gate_up_proj``
        [E, 2I, H] (gate rows then up rows), ``down_proj`` [E, H, I], no biases."""
        gate_up, down = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
        names = sorted(n for n, _ in layer.experts.named_parameters())
        if names != ["down_proj", "gate_up_proj"]:
            raise UspxError(f"{self.family}: expert parameters {names} "
                            "are not the gate_up_proj / down_proj layout a student is built from")
        ids = torch.tensor(list(experts))
        w = torch.tensor(list(weights), dtype=down.dtype)
        inter = gate_up.shape[1] // 2
        gates, ups = gate_up[ids, :inter], gate_up[ids, inter:]  # [M, I, H] each
        hidden = gate_up.shape[2]
        return {
            "gate_up_proj": torch.cat([gates.reshape(-1, hidden), ups.reshape(-1, hidden)]).unsqueeze(0),
            "down_proj": (down[ids] * w[:, None, None]).permute(1, 0, 2).reshape(down.shape[1], -1).unsqueeze(0),
        }

    def dense_mlps(self, model: nn.Module) -> list[tuple[int, int, nn.Module, nn.Module | None]]:
        """(decoder layer, kind: index into ``dense_mlp_paths``, the MLP, its output gate or None) of
        every dense MLP whose channels are units."""
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            for k, (path, _, gate) in enumerate(self.dense_mlp_paths):
                mlp = submodule(layer, path)
                if mlp is not None and all(hasattr(mlp, n) for n in self.dense_mlp_projs):
                    out.append((i, k, mlp, submodule(layer, gate) if gate else None))
        return out

    def dense_down(self, mlp: nn.Module) -> nn.Linear | None:
        """A dense MLP's down projection (its input columns are the MLP's channels); None if it has none."""
        return getattr(mlp, self.dense_mlp_projs[2], None)

    def dense_in_projs(self, mlp: nn.Module) -> dict[str, nn.Linear]:
        """A dense MLP's gate and up projections by attribute name (their output rows are its channels)."""
        return {n: getattr(mlp, n) for n in self.dense_mlp_projs[:2]}

    def expert_down(self, layer: MoELayer) -> torch.Tensor:
        """The fused down projection of a MoE layer's experts (expert id on dim 0)."""
        return getattr(layer.experts, self.expert_down_param)

    def expert_down_layout(self, layer: MoELayer, width: int) -> tuple[int, torch.Tensor]:
        """(dim, [width, 1] positions) of each channel in :meth:`expert_down` (see :meth:`channel_layout`)."""
        return self.channel_layout(layer, width)[self.expert_down_param]

    # ----- attention -----------------------------------------------------------------------------
    @classmethod
    def config_head_shape(cls, cfg: object) -> tuple[int, int, int]:
        """(query heads, KV heads, head width) as the config says."""
        heads = int(get_field(cfg, cls.query_heads_field))
        kv = int(_field_or_none(cfg, cls.kv_heads_field) or heads)
        head_dim = int(_field_or_none(cfg, cls.head_dim_field) or get_field(cfg, "hidden_size") // heads)
        return heads, kv, head_dim

    def head_shape(self) -> tuple[int, int, int]:
        """(query heads, KV heads, head width) of this model."""
        return self.config_head_shape(self.config)

    @classmethod
    def set_head_shape(cls, cfg: object, heads: int, kv_heads: int, head_dim: int) -> None:
        """Write a head layout into ``cfg`` in place (a model with fewer heads keeps its head width)."""
        set_field(cfg, cls.query_heads_field, int(heads))
        set_field(cfg, cls.kv_heads_field, int(kv_heads))
        set_field(cfg, cls.head_dim_field, int(head_dim))

    def attention(self, decoder_layer: nn.Module) -> nn.Module | None:
        """A decoder layer's attention module; None in a layer without one (jamba's mamba layers)."""
        return submodule(decoder_layer, self.attention_attr)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every decoder layer's attention module of ``model`` (this family), in layer order."""
        out = []
        for i, layer in enumerate(self.decoder_layers(model)):
            attn = self.attention(layer)
            if attn is None:
                raise UspxError(f"{self.family}: decoder layer {i} has no attention module {self.attention_attr!r}")
            out.append(attn)
        return out

    def attention_out(self, attn: nn.Module) -> nn.Linear:
        """An attention module's output projection: query head ``h`` reads its columns ``h*hd:(h+1)*hd``."""
        return getattr(attn, self.output_proj)

    def has_attention_sinks(self) -> bool:
        """Whether the model's attention carries per-head sink logits."""
        return self.sinks_param is not None and any(
            n.endswith(self.sinks_param) for n, _ in self.model.named_parameters())

    # ----- stored tensors --------------------------------------------------------------------------
    # whether :meth:`stored_channel_index` knows every stored expert tensor of the family's
    # checkpoints: a narrower-experts plan is then cut file by file in the stored precision
    # (MXFP4 included) instead of through a model loaded whole
    cuts_on_disk: ClassVar[bool] = False

    @classmethod
    def channel_group(cls, mxfp4: bool) -> int:
        """Intermediate channels an export keeps or drops together: 1, or in an MXFP4 checkpoint
        the channels one block of the down projection packs (its input dim is the channels)."""
        return BLOCK_SIZE if mxfp4 and cls.mxfp4_suffixes is not None else 1

    @classmethod
    def stored_channel_index(cls, name: str, channels: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """(dim, positions along it) of stored expert tensor ``name`` ([experts, ...]) that keep one
        expert's sorted ``channels``; None for a stored tensor without a channel dim."""
        raise UspxError(f"{cls.family}: narrower experts are cut from a model in memory, not from the files")

    @classmethod
    def stored_head_index(cls, target: str, heads: torch.Tensor, groups: torch.Tensor,
                          head_dim: int) -> tuple[int, torch.Tensor] | None:
        """(dim, positions) of the stored attention tensor that becomes parameter ``target`` keeping
        query heads ``heads`` and KV groups ``groups`` of its layer (sorted); None for a tensor
        without a head dim. Stored as the parameter is (no conversion), as attention weights are."""
        def rows(units: torch.Tensor) -> torch.Tensor:
            return (units[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)

        module, _, param = target.rpartition(".")
        if module.endswith("." + cls.attention_attr) and param in cls.per_head_params:
            return 0, heads
        attn, _, proj = module.rpartition(".")
        if not attn.endswith("." + cls.attention_attr):
            return None
        if proj == cls.query_proj:
            return 0, rows(heads)
        if proj in cls.key_value_projs:
            return 0, rows(groups)
        if proj == cls.output_proj and param == "weight":
            return 1, rows(heads)
        return None

    @classmethod
    def mxfp4_scales_name(cls, name: str, dtype_tag: str) -> str | None:
        """The scales tensor of stored tensor ``name`` (safetensors dtype tag ``dtype_tag``) when it
        holds MXFP4 blocks; None for any other tensor."""
        if cls.mxfp4_suffixes is None or dtype_tag != "U8":
            return None
        blocks, scales = cls.mxfp4_suffixes
        return name[: -len(blocks)] + scales if name.endswith(blocks) else None

    def expert_intermediate(self, layer: MoELayer, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert``'s intermediate activations (what its down projection reads) for
        ``hidden`` [N, H] -> [N, I]; layout as :meth:`merged_experts`, activation the module's own."""
        gate, up = torch.nn.functional.linear(hidden, layer.experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return layer.experts.act_fn(gate) * up

    def channel_layout(self, layer: MoELayer, width: int) -> dict[str, tuple[int, torch.Tensor]]:
        """Where intermediate channel ``c`` of an expert of ``width`` channels sits: per fused expert
        parameter, (dim, [width, k] positions along that dim). Layout as :meth:`merged_experts`."""
        c = torch.arange(width)
        return {"gate_up_proj": (1, torch.stack([c, width + c], 1)), "down_proj": (2, c[:, None])}

    def channel_positions(self, layer: MoELayer, width: int, channels: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
        """The positions, in the order a narrower expert holds them, that keep ``channels`` (sorted):
        here all kept gate rows, then all kept up rows."""
        return {n: (d, idx[channels].T.reshape(-1)) for n, (d, idx) in self.channel_layout(layer, width).items()}


def submodule(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule (or tensor) at dotted ``path`` under ``module``; None where a part is missing."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def get_field(config: object, dotted: str) -> object:
    """A config field at a dotted path (``ffn_config.moe_num_experts``: dbrx nests its fields)."""
    obj = config
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _field_or_none(config: object, dotted: str) -> object:
    """A config field, None where the config lacks it (optional fields default from others)."""
    try:
        return get_field(config, dotted)
    except (AttributeError, KeyError, TypeError):
        return None


def set_field(config: object, dotted: str, value: object) -> None:
    """Set the config field at a dotted path (see :func:`get_field`)."""
    parent, _, last = dotted.rpartition(".")
    obj = get_field(config, parent) if parent else config
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, then top-k (mixtral, qwen, olmoe, jamba)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, index = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, index


def topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on logits, then softmax over the k (gpt_oss, granitemoe)."""
    values, index = torch.topk(logits, k, dim=-1)
    return torch.softmax(values, dim=-1, dtype=values.dtype), index

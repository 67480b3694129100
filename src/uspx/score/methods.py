"""The score methods, one small object each, listed in :data:`REGISTRY`.

A method declares what it needs (the trace's routing sums, the prompts, a baseline pass of the
whole model, ablation passes, gradients) and whether it streams (runs on a layer-by-layer source);
:func:`uspx.score.api.score` gathers what the chosen methods need once, in an :class:`Inputs`,
then asks each method for its rows. A new method is a :class:`Method` subclass and one
:data:`REGISTRY` entry.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from uspx.dist import Dist
from uspx.engine.batches import pad_id_of
from uspx.io import UspxError
from uspx.models import LoadedModel
from uspx.score.keep import parse_keep
from uspx.progress import progress_bar
from uspx.score.ablation import KINDS as ABLATION_KINDS, AblationResult, run_ablation
from uspx.score.baseline import Baseline, run_baseline
from uspx.score.bootstrap import Factor, estimate
from uspx.score.reconstruction import reconstruction_sums, traced_sums
from uspx.score.sequential import SequentialSums, sequential_sums
from uspx.score.table import build_table
from uspx.score.taylor import run_taylor
from uspx.score.trace_stats import RouterStats, stats_from_trace
from uspx.trace import Trace
from uspx.workload import EncodedItem, Workload, encode


@dataclass(frozen=True)
class Needs:
    """What a method needs before it runs; each part is gathered once for all the chosen methods."""

    trace_stats: bool = False  # per-prompt routing sums read from the trace
    trace_norms: bool = False  # ... with the routed experts' output norms
    prompts: bool = False  # the split's prompts, tokenised as the trace did
    baseline: bool = False  # one forward of the whole model over the prompts: losses and routing
    baseline_norms: bool = False  # ... capturing the routed experts' output norms
    ablations: tuple[str, ...] = ()  # passes removing each (layer, expert): "natural", "interventional"

    def __or__(self, other: Needs) -> Needs:
        merged = {f.name: getattr(self, f.name) or getattr(other, f.name) for f in fields(self) if f.name != "ablations"}
        kinds = tuple(k for k in ABLATION_KINDS if k in self.ablations or k in other.ablations)
        return Needs(**merged, ablations=kinds)


@dataclass
class Inputs:
    """One score run: its settings, what its methods need (gathered by :meth:`gather`), and the
    rows, timings and options the methods leave."""

    lm: LoadedModel
    trace: Trace
    traced: Workload  # the part of the workload the trace covers
    split: str
    dist: Dist
    has_norms: bool  # the trace holds expert output norms
    n_keep: int | None = None  # experts kept per layer while scoring sequentially; None: one pass
    max_tokens: int | None = None
    bootstrap: int = 200
    seed: int = 0
    batch_size: int = 8
    progress: bool = True
    marginal: str = "interventional"
    keep: str | int | None = None
    tool_families: Sequence[str] | None = None
    ablation_budget: float = 0.1
    # gathered
    stats: RouterStats | None = None
    items: list[EncodedItem] = field(default_factory=list)
    pad_id: int = 0
    baseline: Baseline | None = None
    ablations: dict[str, AblationResult] = field(default_factory=dict)
    # left by the methods
    rows: list[pa.Table] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, dict] = field(default_factory=dict)
    options: dict[str, object] = field(default_factory=dict)  # per method, for the table's options
    cost: list[int] = field(init=False)  # bytes of one expert, per layer

    @property
    def adapter(self):
        return self.lm.source.adapter

    @cached_property
    def layers(self) -> list[int]:
        return [l.index for l in self.adapter.layers]

    @property
    def sequential(self) -> bool:
        return self.n_keep is not None

    def __post_init__(self) -> None:  # the cost column, read before any pass touches the model
        source = self.lm.source
        self.cost = [self.adapter.bytes_per_expert(l) for l in self.adapter.layers] if source.resident \
            else source.stored_expert_bytes()

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0

    def add(self, method: str, factors: list[Factor], tokens: np.ndarray, n_prompts: int,
            n_boot: int | None = None) -> None:
        """One method's rows: the ratio estimate of ``factors`` with its bootstrap interval over prompts."""
        est = estimate(factors, self.bootstrap if n_boot is None else n_boot, self.seed)
        tok = np.broadcast_to(tokens, est.value.shape)
        self.add_rows(method, est.value, tok, est.ci_low, est.ci_high, n_prompts)

    def add_rows(self, method: str, value: np.ndarray, tokens: np.ndarray, low: np.ndarray, high: np.ndarray,
                 n_prompts: int) -> None:
        self.rows.append(build_table(self.layers, self.adapter.num_experts, method, value, tokens, low, high,
                                     self.cost, n_prompts))

    def load_prompts(self, why: str) -> None:
        """The split's prompts (subsampled to ``max_tokens``) and the pad id, once."""
        if self.items:
            return
        if self.lm.tokenizer is None:
            raise UspxError(f"{self.lm.path}: no tokenizer; {why} need one")
        self.items = split_items(self.trace, self.traced, self.lm.tokenizer, self.split, self.max_tokens, self.seed)
        self.pad_id = pad_id_of(self.lm.tokenizer)

    def gather(self, needs: Needs) -> None:
        """Run every pass ``needs`` names, once, in the order the later ones build on."""
        if needs.trace_stats:
            with self.timed("trace_stats"):
                self.stats = stats_from_trace(self.trace, self.split, norms=self.has_norms and needs.trace_norms)
        if needs.prompts or needs.baseline:
            self.load_prompts("model-based scores")
        if needs.baseline:
            with self.timed("baseline"):
                self.baseline = run_baseline(self.lm.source.model, self.adapter, self.items, batch_size=self.batch_size,
                                             pad_id=self.pad_id, norms=needs.baseline_norms, progress=self.progress)
        if needs.ablations:
            total = len(needs.ablations) * len(self.layers) * self.adapter.num_experts * len(self.baseline.batches)
            with progress_bar("ablation", total=total, unit="batches", enabled=self.progress) as bar:
                for kind in needs.ablations:
                    with self.timed(f"ablation_{kind}"):
                        res = run_ablation(self.lm.source.model, self.adapter, self.baseline, kind, bar, dist=self.dist)
                    self.ablations[kind] = res
                    self.counts[f"ablation_{kind}"] = dict(forwards=res.forwards, skipped=res.skipped)


@dataclass(frozen=True)
class Method:
    """A score method: its column's name, what it needs, and how it computes the column."""

    name: str
    streams: bool = False  # needs no whole-model forward: scores on a layer-by-layer source
    reads_trace: bool = False  # computable from a trace alone (norms included)
    norms: bool = False  # needs each routed expert's output norm
    gradients: bool = False  # runs backward passes through the whole model
    needs_keep: bool = False  # decides under a kept count per layer (``keep``)
    sequential: bool = False  # can score a model whose earlier layers are pruned as it goes

    def source(self, run: Inputs) -> str:
        """Where this run's values come from: "trace" or "model"."""
        return "model"

    def needs(self, run: Inputs) -> Needs:
        return Needs(prompts=True)

    def compute(self, run: Inputs) -> None:
        raise NotImplementedError

    def sequential_factor(self, sums: SequentialSums) -> tuple[Factor, np.ndarray]:
        """The ratio and the tokens column from a sequential pass's sums (``sequential`` methods)."""
        raise UspxError(f"{self.name} is not scored sequentially")


@dataclass(frozen=True)
class Routing(Method):
    """frequency, reap, ean: ratios of routing sums, from the trace (or a baseline pass when the
    trace holds no norms)."""

    def source(self, run: Inputs) -> str:
        return "trace" if not run.sequential and (run.has_norms or not self.norms) else "model"

    def needs(self, run: Inputs) -> Needs:
        if self.source(run) == "trace":
            return Needs(trace_stats=True, trace_norms=self.norms)
        return Needs(prompts=True, baseline=True, baseline_norms=self.norms)

    def compute(self, run: Inputs) -> None:
        if self.source(run) == "trace":
            stats, n = run.stats, len(run.stats.samples)
        else:
            stats, n = run.baseline.router, run.baseline.n_prompts
        run.add(self.name, [getattr(stats, self.name)()], stats.count.sum(0), n)

    def sequential_factor(self, sums: SequentialSums) -> tuple[Factor, np.ndarray]:
        return getattr(sums.stats, self.name)(), sums.stats.count.sum(0)


@dataclass(frozen=True)
class Capability(Method):
    """Routing frequency on the tokens of the families not handed to tools."""

    def source(self, run: Inputs) -> str:
        return "trace"

    def needs(self, run: Inputs) -> Needs:
        return Needs(trace_stats=True)

    def compute(self, run: Inputs) -> None:
        stats = run.stats
        factor, tool = capability_factor(stats, run.traced, run.tool_families)
        count = stats.count.astype(np.float64)
        run.add(self.name, [factor], factor.num.sum(0), int((~tool).sum()))
        share = estimate([Factor(count * tool, count)], run.bootstrap, run.seed)
        run.options[self.name] = dict(
            tool_families=sorted(run.tool_families), tool_prompts=int(tool.sum()),
            tool_share=np.round(share.value, 4).tolist(),
            tool_share_ci=[np.round(share.ci_low, 4).tolist(), np.round(share.ci_high, 4).tolist()])


def capability_factor(stats: RouterStats, traced: Workload,
                      tool_families: Sequence[str]) -> tuple[Factor, np.ndarray]:
    """capability's ratio (routed counts over tokens, on the prompts of the families not handed to
    tools) and the [P, 1, 1] mask of the prompts that are; an unknown family is refused."""
    families = set(tool_families)
    if unknown := sorted(families - set(traced.families)):
        raise UspxError(f"--tool-families {unknown} are not families of {traced.source} "
                        f"({', '.join(traced.families)})")
    tool = np.array([traced.items[int(i)].family in families for i in stats.samples])[:, None, None]
    count, fluent = stats.count.astype(np.float64), ~tool
    return Factor(count * fluent, (stats.tokens[:, None, None] * fluent).astype(np.float64)), tool


@dataclass(frozen=True)
class Reconstruction(Method):
    """Each expert's share of its layer's output: the block output change when it is banned."""

    def source(self, run: Inputs) -> str:
        """The trace when its tracing pass recorded the sums, else a pass over the model."""
        return "trace" if not run.sequential and run.trace.manifest["options"].get("reconstruction") else "model"

    def compute(self, run: Inputs) -> None:
        items = run.items
        with run.timed(self.name):
            recorded = run.trace.manifest["options"].get("reconstruction")
            sums = traced_sums(run.trace, np.array([e.index for e in items])) if recorded else None
            err, routed = sums if sums is not None else reconstruction_sums(
                run.lm.source, items, pad_id=run.pad_id, batch_size=run.batch_size, progress=run.progress,
                dist=run.dist)
        tokens = np.array([len(e.input_ids) for e in items], dtype=float)
        run.add(self.name, [Factor(err, tokens[:, None, None])], routed.sum(0), len(items))

    def sequential_factor(self, sums: SequentialSums) -> tuple[Factor, np.ndarray]:
        return Factor(sums.err, sums.stats.tokens[:, None, None].astype(float)), sums.routed.sum(0)


@dataclass(frozen=True)
class Ablation(Method):
    """The loss change when one expert is removed ``kind``-ly, per target token."""

    kind: str = "interventional"

    def needs(self, run: Inputs) -> Needs:
        return Needs(prompts=True, baseline=True, ablations=(self.kind,))

    def compute(self, run: Inputs) -> None:
        base = run.baseline
        loss_tokens = base.loss_tokens()
        run.add(self.name, [Factor(run.ablations[self.kind].delta_sum, loss_tokens[:, None, None].astype(float))],
                np.full((len(run.layers), run.adapter.num_experts), loss_tokens.sum()), base.n_prompts)


@dataclass(frozen=True)
class UsageMarginal(Method):
    """Routing frequency times the loss change per routed token (removal chosen by ``marginal``)."""

    def needs(self, run: Inputs) -> Needs:
        return Needs(prompts=True, baseline=True, ablations=(run.marginal,))

    def compute(self, run: Inputs) -> None:
        base = run.baseline
        routed_loss = base.routed_loss_tokens()
        run.add(self.name, [base.router.frequency(),
                            Factor(run.ablations[run.marginal].routed_delta_sum, routed_loss.astype(float))],
                routed_loss.sum(0), base.n_prompts)


@dataclass(frozen=True)
class Taylor(Method):
    """First-order loss change from each prompt's gradient (empirical Fisher)."""

    def needs(self, run: Inputs) -> Needs:
        return Needs(prompts=True, baseline=True)

    def compute(self, run: Inputs) -> None:
        p = run.baseline.n_prompts
        with run.timed(self.name), progress_bar("taylor", total=p, unit="prompts", enabled=run.progress) as bar:
            sal = run_taylor(run.lm.source.model, run.adapter, run.items, run.pad_id, bar, dist=run.dist)
        run.add(self.name, [Factor(sal, np.ones((p, 1, 1)))], run.baseline.router.count.sum(0), p)


@dataclass(frozen=True)
class GuidedAblation(Method):
    """Interventional ablation on a share of exhaustive ablation's forwards, spent near the keep
    boundary; interval: +- 1.96 standard errors."""

    def needs(self, run: Inputs) -> Needs:
        return Needs(prompts=True, baseline=True)

    def compute(self, run: Inputs) -> None:
        from uspx.score.bandit import SURROGATE_FORWARDS, guided_ablation

        base, model = run.baseline, run.lm.source.model
        with run.timed(self.name):
            # one item per pull, as exhaustive ablation's forwards are counted
            single = base if run.batch_size == 1 else run_baseline(model, run.adapter, run.items, batch_size=1,
                                                                   pad_id=run.pad_id, progress=run.progress)
            exhaustive = int(sum(int(r.any(2).any(1).sum()) for r in single.routed))
            budget = max(int(run.ablation_budget * exhaustive), SURROGATE_FORWARDS * len(run.items))
            res = guided_ablation(model, run.adapter, single, parse_keep(run.keep, run.adapter.num_experts),
                                  budget=budget, seed=run.seed)
        run.counts[self.name] = dict(forwards=int(res.forwards), exhaustive_forwards=exhaustive)
        run.add_rows(self.name, res.value, np.full(res.value.shape, base.loss_tokens().sum()),
                     res.value - 1.96 * res.se, res.value + 1.96 * res.se, base.n_prompts)


@dataclass(frozen=True)
class LearnedMasks(Method):
    """P(gate open) of each expert's learned hard-concrete mask under ``keep``: fitted to the whole
    model's output (l0) or to each layer's block output alone (l0_layer, which streams)."""

    def compute(self, run: Inputs) -> None:
        from uspx.score.masks import gate_open_probability, layer_masks, learn_masks

        keep = parse_keep(run.keep, run.adapter.num_experts)
        with run.timed(self.name):
            fit = layer_masks if self.streams else learn_masks
            log_alpha, history = fit(run.lm.source if self.streams else run.lm.source.model, run.items, keep,
                                     batch_size=run.batch_size, seed=run.seed, pad_id=run.pad_id,
                                     progress=run.progress)
        value = gate_open_probability(log_alpha.double()).numpy()
        at_hand = run.stats if run.stats is not None else run.baseline.router if run.baseline is not None else None
        if at_hand is not None:
            tokens = at_hand.count.sum(0)
        else:  # no routed counts at hand: the calibration tokens behind the masks
            tokens = np.full(value.shape, sum(len(e.input_ids) for e in run.items))
        # one learned value per expert (P = 1): nothing to resample, so no bootstrap and NaN CIs
        run.add(self.name, [Factor(value[None], np.ones((1, 1, 1)))], tokens, len(run.items), n_boot=0)
        run.options[self.name] = dict(keep=keep, history=history,
                                      log_alpha=[[round(float(x), 4) for x in row] for row in log_alpha])


def split_items(tr: Trace, traced: Workload, tokenizer, split: str, max_tokens: int | None,
                seed: int) -> list[EncodedItem]:
    """The prompts of ``split`` tokenised exactly as the trace did (same max_length), then checked
    against the trace's token counts, so model-based and trace-based scores see the same tokens."""
    max_length = tr.manifest.get("options", {}).get("max_length") or 2048
    encoded = encode(traced, tokenizer, max_length)
    if split != "all":
        encoded = [e for e in encoded if e.split == split]
    if not encoded:
        raise UspxError(f"the workload has no {split!r} items")
    items_tab = tr.items()
    traced_tokens = dict(zip(items_tab.column("sample").to_pylist(), items_tab.column("tokens").to_pylist()))
    bad = [e.index for e in encoded if traced_tokens.get(e.index) != len(e.input_ids)]
    if bad:
        raise UspxError(
            f"{tr.path}: {len(bad)} items tokenise differently from the trace (first: item {bad[0]}); "
            "was the trace made with another tokenizer?"
        )
    if max_tokens is not None:
        # whole prompts (the bootstrap unit), in a seeded random order, until the budget is reached:
        # each prompt whose predecessors in that order hold fewer than max_tokens tokens
        order = np.random.default_rng(seed).permutation(len(encoded))
        lengths = np.array([len(encoded[i].input_ids) for i in order])
        encoded = [encoded[i] for i in sorted(order[np.cumsum(lengths) - lengths < max_tokens])]
    return encoded


def score_sequential(method: Method, run: Inputs) -> None:
    """``method`` scored on the model whose earlier layers are pruned to ``run.n_keep`` by it."""
    with run.timed(f"sequential_{method.name}"):
        sums = sequential_sums(run.lm.source, run.items, method.name, run.n_keep, pad_id=run.pad_id,
                               batch_size=run.batch_size, progress=run.progress)
    factor, tokens = method.sequential_factor(sums)
    run.add(method.name, [factor], tokens, len(run.items))
    run.options.setdefault("sequential_kept", {})[method.name] = {str(l): v for l, v in sums.kept.items()}


# in the order of the table's rows and of the default method list
REGISTRY: dict[str, Method] = {m.name: m for m in (
    Routing("frequency", streams=True, reads_trace=True, sequential=True),
    Routing("reap", streams=True, reads_trace=True, norms=True, sequential=True),
    Routing("ean", streams=True, reads_trace=True, norms=True, sequential=True),
    Ablation("ablation_natural", kind="natural"),
    Ablation("ablation_interventional", kind="interventional"),
    UsageMarginal("usage_x_marginal"),
    Taylor("taylor", gradients=True),
    Reconstruction("reconstruction", streams=True, sequential=True),
    LearnedMasks("l0", gradients=True, needs_keep=True),
    LearnedMasks("l0_layer", streams=True, gradients=True, needs_keep=True),
    Capability("capability", streams=True, reads_trace=True),
    GuidedAblation("ablation_guided", needs_keep=True),
)}

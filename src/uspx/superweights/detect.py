"""``uspx superweights``: routing-aware super-weight detection for MoE models.

Pipeline:

1. one calibration pass: routing of every MoE layer (p_active, position entropy, overflow), every
   expert's largest routed down-projection output (super-expert candidates), massive activations of
   the residual stream;
2. expert selection by p_active floor or low-entropy positions (replacing a ">50% of samples" filter);
3. per layer, in order, per selected expert: co-spike argmax on routed tokens only, cut at tau,
   micro-ablation proxies (channel energy of H^(l+1) on the expert's tokens, stopword mass skew) as
   gates, then zero the scalar, re-run and look for the next. Accepted scalars stay
   zeroed while later layers are searched, so a spike that is only the downstream echo of an earlier
   super weight is not counted twice;
4. with the model restored: natural and interventional importance of every gated candidate,
   each scalar zeroed alone; super weight = both agree in sign and exceed the effect threshold;
5. held-out loss for the top candidates, super experts against a random control, the validation
   checklist, and a negative verdict with its evidence when nothing qualifies.

The metric is next-token loss in nats/token; every delta is ablated minus baseline, so a positive
I_nat / I_int means the scalar's removal hurts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

import uspx
from uspx.io import UspxError, write_json, write_text
from uspx.models import LoadedModel, adapter_for, load_model
from uspx.models import down_proj as dp
from uspx.progress import Clock, console, progress_bar
from uspx.superweights.cospike import co_spike
from uspx.superweights.experts import super_experts
from uspx.superweights.passes import PassResult, Slice, layer_inputs, make_slice, repetition_rate, run_pass
from uspx.superweights.report import checklist, render_report, scored, strength, verdict
from uspx.superweights.routing import layer_routing, per_prompt_p_active
from uspx.superweights.stopwords import stopword_ids
from uspx.engine.batches import pad_id_of
from uspx.engine.forward import forward
from uspx.engine.hooks import decoder_layer, forward_hook, hooked, pre_hook
from uspx.workload import EncodedItem, Workload, encode, load_workload

FORMAT = "uspx-superweights/1"
PROXIES = ("energy", "stopwords")
SCORE_MODES = ("natural", "interventional")
INDEX_CONVENTION = (
    "row_ff = r* (intermediate / d_ff input channel of W_down), col_model = c* (hidden / d_model output "
    "channel); the scalar is W_down[e][col_model, row_ff] in the Linear [out, in] convention; "
    "'param' and 'storage_index' give its place in the model's own storage"
)
CAPACITY_NOTE = (
    "transformers' MoE blocks have no capacity factor: every token is sent to exactly top-k experts and "
    "none is dropped or rerouted. The overflow rate is measured anyway (tokens whose k slots do not name "
    "k distinct experts) and is 0 unless the model does something non-standard."
)


def detect(
    model: str | Path | LoadedModel,
    workload: str | Path | Workload,
    out_dir: str | Path,
    *,
    p_active_floor: float = 0.01,
    routing_entropy_thr: float | str = "auto",
    co_spike_tau: float | str = "auto",
    router_bias: float = 2.0,
    proxies: tuple[str, ...] | list[str] = PROXIES,
    score_modes: tuple[str, ...] | list[str] = SCORE_MODES,
    max_candidates: int = 128,
    effect_threshold: float = 0.05,
    energy_drop_min: float = 0.05,
    stop_min: float = 1e-3,
    max_iters_per_expert: int = 3,
    min_routed_tokens: int = 8,
    calib_items: int = 48,
    diag_items: int = 16,
    proxy_items: int = 8,
    heldout_items: int = 32,
    max_length: int = 256,
    batch_size: int = 8,
    confirm_top: int = 3,
    super_expert_candidates: int = 3,
    super_expert_break_loss: float = 0.5,
    super_expert_break_rep: float = 0.2,
    super_expert_control_factor: float = 5.0,
    gen_prompts: int = 4,
    gen_tokens: int = 32,
    seed: int = 0,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """Find the super weights and super experts of ``model`` on ``workload``; write
    ``out_dir/superweights.json`` (the catalogue) and ``out_dir/report.md``; return the catalogue."""
    clock = Clock()
    proxies, score_modes = _check_options(proxies, score_modes, routing_entropy_thr, co_spike_tau, p_active_floor, router_bias)
    lm = model if isinstance(model, LoadedModel) else load_model(model, trust_remote_code=trust_remote_code)
    wl = load_workload(workload)
    if lm.tokenizer is None:
        raise UspxError(f"{lm.source}: no tokenizer files; uspx needs one to read a text workload")
    net = lm.model
    net.eval()
    adapter = adapter_for(net)
    for layer in adapter.layers:
        dp.intermediate_size(adapter, layer)  # raises for layouts the detector does not know
    tok, pad = lm.tokenizer, pad_id_of(lm.tokenizer)
    max_length = min(max_length, int(getattr(net.config, "max_position_embeddings", max_length) or max_length))
    sl = _slices(wl, tok, max_length, batch_size, pad, calib_items, diag_items, proxy_items, heldout_items)
    stop_ids = stopword_ids(tok, int(net.config.vocab_size))
    clock.done("setup")

    cal = _calibration_pass(net, adapter, sl.C)
    routing, group_note = _routing(adapter, sl.C, cal, p_active_floor, routing_entropy_thr)
    clock.done("calibration_pass")
    d_base0, candidates, examined, budget_hit = _discovery(
        net, adapter, sl, routing, stop_ids, co_spike_tau, proxies, energy_drop_min, stop_min,
        max_iters_per_expert, min_routed_tokens, max_candidates, seed, progress)
    clock.done("discovery")
    supers = _causal_scores(net, adapter, candidates, sl.D, d_base0, score_modes, router_bias, effect_threshold,
                            confirm_top, progress)
    clock.done("causal_scores")
    heldout = _heldout(net, adapter, sl, candidates, supers, confirm_top)
    clock.done("heldout")
    prompts = [e.input_ids[: min(32, len(e.input_ids))] for e in sl.D.items[:gen_prompts]]
    base_rep = repetition_rate(net, prompts, gen_tokens, pad) if prompts else 0.0
    n_sx = min(super_expert_candidates, len(cal["out_stats"]))
    with progress_bar("super experts", total=2 * n_sx + 2, unit="ablations", enabled=progress) as bar:
        sx = super_experts(
            net, adapter, sl.D, d_base0.loss, base_rep, cal["out_stats"], n_candidates=n_sx, gen_prompts=prompts,
            gen_tokens=gen_tokens, pad_id=pad, break_loss=super_expert_break_loss,
            break_rep=super_expert_break_rep, control_factor=super_expert_control_factor, seed=seed, bar=bar,
        )
    clock.done("super_experts")

    settings = dict(
        p_active_floor=p_active_floor, routing_entropy_thr=routing_entropy_thr, co_spike_tau=co_spike_tau,
        router_bias=router_bias, proxies=list(proxies), score_modes=list(score_modes), max_candidates=max_candidates,
        effect_threshold=effect_threshold, energy_drop_min=energy_drop_min, stop_min=stop_min,
        max_iters_per_expert=max_iters_per_expert, min_routed_tokens=min_routed_tokens, calib_items=len(sl.C.items),
        diag_items=len(sl.D.items), proxy_items=len(sl.P.items), heldout_items=len(sl.H.items), max_length=max_length,
        batch_size=batch_size, confirm_top=confirm_top, seed=seed,
    )
    cat = _catalogue(lm, adapter, wl, sl, settings, group_note, stop_ids, routing, cal, supers, candidates, examined,
                     budget_hit, heldout, sx)
    cat["runtime_s"] = dict(clock.seconds, total=clock.total)
    out = Path(out_dir)
    write_json(out / "superweights.json", cat)
    write_text(out / "report.md", render_report(cat))
    if progress:
        _print_summary(cat)
    return cat


# ----- the steps -------------------------------------------------------------------------------------
@dataclass
class _Slices:
    """The workload items each step reads, batched."""

    held_note: str  # where the held-out items came from
    C: Slice  # calibration: statistics and co-spike
    D: Slice  # diagnostic: causal scores, super experts
    P: Slice  # proxies
    H: Slice  # held-out confirmation


def _slices(wl: Workload, tok, max_length: int, batch_size: int, pad: int, calib_items: int, diag_items: int,
            proxy_items: int, heldout_items: int) -> _Slices:
    calib_all = [e for e in encode(wl.part("calibration"), tok, max_length) if len(e.input_ids) >= 2]
    held_all = [e for e in encode(wl.part("heldout"), tok, max_length) if len(e.input_ids) >= 2] if any(
        i.split == "heldout" for i in wl.items) else []
    if not calib_all:
        raise UspxError(f"{wl.source}: no calibration items with at least 2 tokens")
    calib = _spread(calib_all, calib_items)
    diag = _spread(calib, diag_items)
    prox = _spread(diag, proxy_items)
    held = _spread(held_all, heldout_items)
    held_note = "held-out split"
    if not held:
        rest = [e for e in calib_all if e not in calib]
        held = _spread(rest, heldout_items) if rest else diag
        held_note = "no held-out items: unused calibration items" if rest else "no held-out items: diagnostic slice reused"
    return _Slices(held_note, make_slice("calibration", calib, batch_size, pad),
                   make_slice("diagnostic", diag, batch_size, pad), make_slice("proxy", prox, batch_size, pad),
                   make_slice("heldout", held, batch_size, pad))


def _routing(adapter, C: Slice, cal: dict, p_active_floor: float, entropy_thr) -> tuple[dict, str]:
    """Routing statistics per MoE layer, with stability groups: task families, else even / odd prompts."""
    families = sorted({e.family for e in C.items})
    if len(families) >= 2:
        fam_id = torch.tensor([families.index(e.family) for e in C.items])
        group, group_note = fam_id[C.sample], "task families"
    else:
        group, group_note = C.sample % 2, "even / odd prompts (one task family)"
    routing = {
        l.index: layer_routing(l.index, cal["routing"][l.index], C.position, group, l.num_experts, p_active_floor,
                               entropy_thr)
        for l in adapter.layers
    }
    return routing, group_note


def _discovery(net, adapter, sl: _Slices, routing: dict, stop_ids, tau, proxies, energy_drop_min: float,
               stop_min: float, max_iters: int, min_tokens: int, max_candidates: int, seed: int, progress: bool):
    """Step 3, discovery with iterative suppression: (diagnostic baseline pass, candidates, experts
    examined, whether the candidate budget ran out). The model is restored afterwards."""
    capture = tuple(l.index for l in adapter.layers)
    d_base0 = run_pass(net, adapter, sl.D, routing=True)
    p_base = run_pass(net, adapter, sl.P, stop_ids=stop_ids, capture=capture, routing=True, inputs=True)
    candidates: list[dict] = []
    examined: list[dict] = []
    zeroed: list[tuple] = []  # (layer, expert, row, col, old) kept zeroed during discovery
    n_active = sum(len(r.active) for r in routing.values())
    budget_hit = False
    try:
        with progress_bar("super weights: co-spike + proxies", total=n_active, unit="experts", enabled=progress) as bar:
            for layer in adapter.layers:
                if budget_hit:
                    break
                hidden, index = layer_inputs(net, adapter, sl.C, layer)
                rs = routing[layer.index]
                for e in sorted(rs.active, key=lambda x: -float(rs.p_active[x])):
                    bar.advance(1)
                    if len(candidates) >= max_candidates:
                        budget_hit = True
                        break
                    rec, p_base = _discover_expert(
                        net, adapter, layer, e, hidden, index, sl.P, p_base, stop_ids, rs, tau, proxies,
                        energy_drop_min, stop_min, max_iters, min_tokens, max_candidates - len(candidates),
                        capture, seed, zeroed, candidates,
                    )
                    examined.append(rec)
    finally:
        for l_idx, e, row, col, old in reversed(zeroed):
            dp.set_down_weight(adapter, adapter.layer(l_idx), e, row, col, old)
    return d_base0, candidates, examined, budget_hit


def _causal_scores(net, adapter, candidates: list[dict], D: Slice, d_base0, score_modes, router_bias: float,
                   effect_threshold: float, confirm_top: int, progress: bool) -> list[dict]:
    """Step 4, natural and interventional importance with the model intact; the super weights, ranked."""
    gated = [c for c in candidates if c["proxy_pass"]]
    others = sorted((c for c in candidates if not c["proxy_pass"]), key=lambda c: -c["peak_contribution"])
    to_score = gated + others[: max(0, confirm_top)]  # the largest scalars too: evidence for a negative
    biased_base: dict[tuple[int, int], tuple[float, float]] = {}
    with progress_bar("super weights: causal scores", total=len(to_score), unit="cand", enabled=progress) as bar:
        for c in to_score:
            _score_candidate(net, adapter, c, D, d_base0, score_modes, router_bias, effect_threshold, biased_base)
            bar.advance(1)
    for c in candidates:
        c.setdefault("I_nat", None)
        c.setdefault("I_int", None)
        c.setdefault("is_super_weight", False)
    supers = sorted((c for c in candidates if c["is_super_weight"]), key=lambda c: -strength(c))
    for rank, c in enumerate(supers, 1):
        c["rank"] = rank
    return supers


def _heldout(net, adapter, sl: _Slices, candidates: list[dict], supers: list[dict], confirm_top: int) -> dict:
    """Step 5, held-out confirmation of the top candidates (and of every super weight together)."""
    top = (supers or sorted(scored(candidates), key=lambda c: -strength(c)))[:confirm_top]
    H = sl.H
    h_base = run_pass(net, adapter, H)
    heldout = dict(items=len(H.items), tokens=H.n_tokens, source=sl.held_note, baseline_loss=round(h_base.loss, 6),
                   candidates=[])
    for c in top:
        with _zeroed(adapter, c):
            dl = run_pass(net, adapter, H).loss - h_base.loss
        c["heldout_delta_loss"] = round(dl, 6)
        heldout["candidates"].append({k: c[k] for k in ("layer", "expert", "row_ff", "col_model")}
                                     | dict(delta_loss=round(dl, 6), is_super_weight=c["is_super_weight"]))
    if len(supers) > 1:
        with contextlib.ExitStack() as every:
            for c in supers:
                every.enter_context(_zeroed(adapter, c))
            heldout["all_super_weights_delta_loss"] = round(run_pass(net, adapter, H).loss - h_base.loss, 6)
    return heldout


def _catalogue(lm, adapter, wl, sl: _Slices, settings: dict, group_note: str, stop_ids, routing: dict, cal: dict,
               supers: list[dict], candidates: list[dict], examined: list[dict], budget_hit: bool, heldout: dict,
               sx) -> dict:
    """The catalogue written as superweights.json (its checklist and verdict included)."""
    net = lm.model
    cat = dict(
        format=FORMAT,
        uspx_version=uspx.__version__,
        model=dict(
            source=lm.source, label=lm.label, fingerprint=lm.fingerprint, family=adapter.family,
            model_type=net.config.model_type, moe_layers=[l.index for l in adapter.layers],
            num_experts=adapter.num_experts, top_k=adapter.top_k, hidden_size=int(net.config.hidden_size),
            intermediate_size=dp.intermediate_size(adapter, adapter.layers[0]),
            attention_sinks=adapter.has_attention_sinks(),
        ),
        workload=dict(source=wl.source, fingerprint=wl.fingerprint, calibration_tokens=sl.C.n_tokens,
                      diagnostic_tokens=sl.D.n_tokens, proxy_tokens=sl.P.n_tokens, heldout_tokens=sl.H.n_tokens,
                      stability_groups=group_note),
        settings=settings,
        index_convention=INDEX_CONVENTION,
        metric="next-token loss, nats/token; deltas are ablated - baseline (positive = removal hurts)",
        capacity=dict(capacity_factor=None, note=CAPACITY_NOTE),
        stopwords=dict(count=int(stop_ids.numel()), rule="tokens decoding to English function words or to punctuation/whitespace only"),
        routing=[routing[l.index].as_json(l.top_k) for l in adapter.layers],
        massive_activations=cal["massive"],
        super_weights=[_entry(c) for c in supers],
        candidates=[_entry(c, full=True) for c in candidates],
        experts_examined=examined,
        discovery_budget_exhausted=budget_hit,
        heldout=heldout,
        super_experts=sx,
    )
    cat["checklist"] = checklist(cat)
    cat["verdict"] = verdict(cat)
    return cat


# ----- helpers -------------------------------------------------------------------------------------
def _check_options(proxies, score_modes, entropy_thr, tau, floor, beta) -> tuple[tuple[str, ...], tuple[str, ...]]:
    proxies = tuple(p.strip() for p in proxies if p.strip())
    score_modes = tuple(m.strip() for m in score_modes if m.strip())
    bad = [p for p in proxies if p not in PROXIES]
    if bad:
        raise UspxError(f"unknown proxies {bad}; choose from {', '.join(PROXIES)}")
    bad = [m for m in score_modes if m not in SCORE_MODES]
    if bad or not score_modes:
        raise UspxError(f"score modes must be a non-empty subset of {', '.join(SCORE_MODES)}; got {list(score_modes)}")
    for name, value in (("routing entropy threshold", entropy_thr), ("co-spike tau", tau)):
        if value != "auto" and not isinstance(value, (int, float)):
            raise UspxError(f"{name} must be 'auto' or a number, got {value!r}")
    if not 0.0 <= floor <= 1.0:
        raise UspxError(f"p_active floor must lie in [0, 1], got {floor}")
    if beta < 0:
        raise UspxError(f"router bias must be >= 0 (it pushes tokens towards the expert), got {beta}")
    return proxies, score_modes


def _spread(items: list[EncodedItem], n: int) -> list[EncodedItem]:
    """``n`` items evenly spaced over the list (bundled workloads are ordered by family and source)."""
    if n <= 0 or not items:
        return []
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _calibration_pass(net, adapter, C: Slice) -> dict:
    """Routing, per-expert routed output maxima and residual-stream massive activations."""
    routes = {l.index: [] for l in adapter.layers}
    out_stats: dict[tuple[int, int], dict] = {}
    massive: dict[int, dict] = {}
    state: dict = {}
    hooks = []

    for layer in adapter.layers:
        def experts_hook(module, args, layer=layer):
            flat = args[0].reshape(-1, args[0].shape[-1])
            h = flat[state["real"]].float()
            idx = args[1].reshape(flat.shape[0], -1)[state["real"]]
            routes[layer.index].append(idx.clone())
            for e in torch.unique(idx).tolist():
                rows = (idx == e).any(1)
                _, y = dp.down_proj_io(adapter, layer, e, h[rows])
                a = y.float().abs()
                m = float(a.max())
                st = out_stats.setdefault((layer.index, e), dict(max_abs_out=0.0, channel=-1, tokens=0))
                st["tokens"] += int(rows.sum())
                if m > st["max_abs_out"]:
                    st["max_abs_out"], st["channel"] = m, int(a.max(0).values.argmax())

        def block_hook(module, args, output, layer=layer):
            h = output[0] if isinstance(output, tuple) else output
            h = h.detach().reshape(-1, h.shape[-1])[state["real"]].float().abs()
            flat = int(h.argmax())
            tok, ch = divmod(flat, h.shape[1])
            st = massive.setdefault(layer.index, dict(layer=layer.index, max_abs=0.0, medians=[], n=[]))
            st["medians"].append(float(h.median()))
            st["n"].append(h.shape[0])
            if float(h[tok, ch]) > st["max_abs"]:
                st.update(max_abs=float(h[tok, ch]), channel=ch, position=int(C.position[state["offset"] + tok]),
                          token_id=int(state["ids"][tok]))

        hooks += [pre_hook(layer.experts, experts_hook), forward_hook(decoder_layer(adapter, layer), block_hook)]
    with hooked(hooks), torch.no_grad():
        offset = 0
        for b in C.batches:
            real = b.real
            state.update(real=real, offset=offset, ids=b.input_ids.reshape(-1)[real])
            forward(net, b.input_ids, b.attention_mask, head=False)  # the hooks measure everything: no LM head
            offset += int(real.sum())
    rows = []
    for l in adapter.layers:
        st = massive[l.index]
        med = sum(m * n for m, n in zip(st.pop("medians"), st.pop("n"))) / max(C.n_tokens, 1)
        st["median_abs"] = med
        st["ratio"] = st["max_abs"] / max(med, 1e-12)
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in st.items()})
    return dict(routing={k: torch.cat(v) for k, v in routes.items()}, out_stats=out_stats, massive=rows)


def _discover_expert(
    net, adapter, layer, e, hidden, index, P: Slice, p_base, stop_ids, rs, tau, proxies, energy_drop_min,
    stop_min, max_iters, min_tokens, budget, capture, seed, zeroed, candidates,
) -> tuple[dict, PassResult]:
    """Co-spike -> proxies -> zero -> repeat, for one expert (iterative suppression).

    ``p_base`` is the proxy slice's pass in the current working model (earlier accepted scalars
    zeroed); it is renewed after every acceptance and handed back beside the expert's record.
    """
    routed = (index == e).any(1)
    n = int(routed.sum())
    rec = dict(layer=layer.index, expert=e, p_active=round(float(rs.p_active[e]), 6), routed_tokens=n,
               iterations=0, accepted=0, stop_reason="", suppression_energy=[])
    if n < min_tokens:
        rec["stop_reason"] = f"only {n} routed calibration tokens (< {min_tokens})"
        return rec, p_base
    h = hidden[routed]
    first_channel = None
    for it in range(max_iters):
        if it > 0 and budget <= 0:
            rec["stop_reason"] = "candidate budget exhausted"
            break
        x, y = dp.down_proj_io(adapter, layer, e, h)
        cs = co_spike(x, y, dp.down_matrix(adapter, layer, e), tau, seed=seed + 7919 * layer.index + e)
        rec["iterations"] = it + 1
        if cs.score < cs.tau:
            rec["stop_reason"] = f"co-spike {cs.score:.4f} below tau {cs.tau:.4f}"
            break
        row, col = cs.c, cs.r  # W_down[c*, r*]: Linear row = model channel, column = ff channel
        param, sidx = dp.down_weight_index(adapter, layer, e, row, col)
        w = dp.get_down_weight(adapter, layer, e, row, col)
        yc = y[:, cs.c].float().abs()
        tpk = int(yc.argmax())
        contribution = abs(w) * float(x[tpk, cs.r].abs())
        cand = dict(
            layer=layer.index, expert=e, row_ff=cs.r, col_model=cs.c, param=param, storage_index=list(sidx), value=w,
            score_co_spike=round(cs.score, 6), tau=round(cs.tau, 6), null_q95=round(cs.null_q95, 6),
            n_dominant_pairs=cs.n_dominant, n_pairs=cs.n_pairs, routed_tokens=n, iteration=it,
            p_active=round(float(rs.p_active[e]), 6), low_entropy_positions=rs.traverses.get(e, []),
            capacity_overflow_rate=rs.overflow_rate,
            peak_in=round(float(x[:, cs.r].abs().max()), 6), peak_out=round(float(yc.max()), 6),
            massive_ratio=round(float(yc.max()) / max(float(y.float().abs().median()), 1e-12), 3),
            peak_contribution=round(contribution, 6), contribution_share=round(contribution / max(float(yc[tpk]), 1e-12), 4),
        )
        energy, e_base, e_abl, p_routed = _energy_proxy(adapter, layer, e, row, col, w, p_base)
        gates: dict[str, bool | None] = {}
        detail = dict(energy_base=e_base, energy_ablated=e_abl, proxy_routed_tokens=int(p_routed.sum()))
        if "energy" in proxies:
            gates["energy"] = -energy >= energy_drop_min
        dstop = None
        if "stopwords" in proxies:
            if gates.get("energy", True) and p_routed.any():
                # only now the forward pass: the energy proxy above was exact and free
                with dp.down_weight_zeroed(adapter, layer, e, row, col):
                    abl = run_pass(net, adapter, P, stop_ids=stop_ids)
                s_base, s_abl = p_base.stop_mass[p_routed], abl.stop_mass[p_routed]
                dstop = float(s_abl.mean() - s_base.mean())
                detail.update(stop_base=float(s_base.mean()), stop_ablated=float(s_abl.mean()),
                              stop_consistency=round(float(((s_abl - s_base).sign() == (1 if dstop >= 0 else -1)).double().mean()), 4),
                              delta_loss_working_model=round(abl.loss - p_base.loss, 6))
                gates["stopwords"] = abs(dstop) >= stop_min
            else:
                gates["stopwords"] = None  # not measured: an earlier gate already failed
        detail["gates"] = gates
        cand.update(proxy=dict(energy=round(energy, 6), stop=None if dstop is None else round(dstop, 6)),
                    proxy_detail=detail, proxy_pass=all(v is True for v in gates.values()))
        candidates.append(cand)
        budget -= 1
        if not cand["proxy_pass"]:
            rec["stop_reason"] = "proxy gate failed: " + ", ".join(k for k, v in gates.items() if v is False)
            break
        # accept: zero it for the rest of the search, confirm the spike is gone, look for the next
        old = dp.set_down_weight(adapter, layer, e, row, col, 0.0)
        zeroed.append((layer.index, e, row, col, old))
        _, y2 = dp.down_proj_io(adapter, layer, e, h)
        cand["spike_after"] = round(float(y2[:, cs.c].abs().max()) / max(float(yc.max()), 1e-12), 6)
        p_base = run_pass(net, adapter, P, stop_ids=stop_ids, capture=capture, routing=True, inputs=True)
        if first_channel is None:
            first_channel = cs.c
            rec["suppression_energy"].append(e_base)
        rec["suppression_energy"].append(float(p_base.hidden[layer.index][p_routed, first_channel].pow(2).mean()))
        rec["accepted"] += 1
    else:
        rec["stop_reason"] = f"max iterations ({max_iters})"
    return rec, p_base


def _energy_proxy(adapter, layer, e, row, col, w, p_base) -> tuple[float, float, float, torch.Tensor]:
    """Proxy A: relative change of E_c = mean_t H^(l+1)[t, c]^2 over the proxy tokens routed to e.

    Exact without a forward pass: zeroing W_down[e][c, r] changes layer l's post-block hidden state
    only through this expert's output, by -g_t(e) * W[c, r] * a_t[r] on the tokens routed to e
    (attention runs before the MoE block, so nothing else in H^(l+1) moves).
    """
    hid, idx, gw = p_base.inputs[layer.index]
    slot = idx == e
    routed = slot.any(1)
    if not routed.any():
        return 0.0, 0.0, 0.0, routed
    gate = (gw * slot).sum(1)[routed]
    act, _ = dp.down_proj_io(adapter, layer, e, hid[routed])
    h_c = p_base.hidden[layer.index][routed, row]
    e_base = float(h_c.pow(2).mean())
    e_abl = float((h_c - gate * w * act[:, col].float()).pow(2).mean())
    return (e_abl - e_base) / max(e_base, 1e-30), e_base, e_abl, routed


def _score_candidate(net, adapter, c, D: Slice, base, modes, beta, thr, biased_base) -> None:
    """I_nat (natural routing) and I_int (tokens forced to the expert) of one scalar zeroed alone
    in the intact model."""
    layer = adapter.layer(c["layer"])
    e = c["expert"]
    if "natural" in modes:
        with _zeroed(adapter, c):
            abl = run_pass(net, adapter, D)
        delta = abl.seq_mean() - base.seq_mean()
        weight = per_prompt_p_active(base.routing[layer.index], D.sample, len(D.items), e)
        c["I_nat"] = round(float((weight * delta).mean()), 6)
        c["delta_loss_diag"] = round(abl.loss - base.loss, 6)
    if "interventional" in modes:
        key = (layer.index, e)
        if key not in biased_base:
            with dp.router_biased(adapter, layer, e, beta):
                b = run_pass(net, adapter, D, routing=True)
            biased_base[key] = (b.loss, float((b.routing[layer.index] == e).any(1).double().mean()))
        with dp.router_biased(adapter, layer, e, beta), _zeroed(adapter, c):
            abl = run_pass(net, adapter, D)
        c["I_int"] = round(abl.loss - biased_base[key][0], 6)
        c["forced_share"] = round(biased_base[key][1], 4)
    vals = [c[k] for k, m in (("I_nat", "natural"), ("I_int", "interventional")) if m in modes]
    same_sign = all(v > 0 for v in vals) or all(v < 0 for v in vals)
    c["is_super_weight"] = bool(c["proxy_pass"] and same_sign and all(abs(v) >= thr for v in vals))
    c["direction"] = "removal hurts" if vals and vals[0] > 0 else "removal helps"


def _zeroed(adapter, c: dict) -> contextlib.AbstractContextManager[float]:
    """Candidate ``c``'s scalar zeroed for the duration of the block."""
    return dp.down_weight_zeroed(adapter, adapter.layer(c["layer"]), c["expert"], c["col_model"], c["row_ff"])


SCHEMA_KEYS = ("layer", "expert", "row_ff", "col_model", "score_co_spike", "p_active", "low_entropy_positions",
               "capacity_overflow_rate", "proxy", "I_nat", "I_int")


def _entry(c: dict, full: bool = False) -> dict:
    """A catalogue entry: the schema's fields (``SCHEMA_KEYS``) first, then where the scalar lives."""
    out = {k: c.get(k) for k in SCHEMA_KEYS}
    out.update(param=c["param"], storage_index=c["storage_index"], value=c["value"])
    extra = ("rank", "direction", "delta_loss_diag", "heldout_delta_loss", "forced_share", "massive_ratio",
             "peak_in", "peak_out", "peak_contribution", "contribution_share", "spike_after", "is_super_weight")
    if full:
        extra += ("proxy_pass", "proxy_detail", "tau", "null_q95", "n_dominant_pairs", "n_pairs", "routed_tokens", "iteration")
    for k in extra:
        if k in c:
            out[k] = c[k]
    return out


def _print_summary(cat: dict) -> None:
    v = cat["verdict"]
    console.print(f"[bold]super weights[/]: {v['summary']}")
    for item in cat["checklist"]:
        mark = {"pass": "[green]PASS[/]", "fail": "[red]FAIL[/]"}.get(item["status"], "[yellow]N/A[/]")
        console.print(f"  {mark}  {item['item']}: {item['detail']}")

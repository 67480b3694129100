"""Validation checklist (the checks a catalogue must pass before it is believed), verdict, and the
markdown report of a catalogue."""

from __future__ import annotations

import statistics


def _item(name: str, status: str, detail: str) -> dict:
    return dict(item=name, status=status, detail=detail)


def strength(c: dict) -> float:
    """A candidate's larger effect, max(|I_nat|, |I_int|); a mode not scored counts as 0."""
    return max(abs(c.get("I_nat") or 0.0), abs(c.get("I_int") or 0.0))


def scored(candidates: list[dict]) -> list[dict]:
    """The candidates with a causal score (I_nat or I_int)."""
    return [c for c in candidates if c.get("I_nat") is not None or c.get("I_int") is not None]


def checklist(cat: dict) -> list[dict]:
    out = []
    thr = cat["settings"]["effect_threshold"]
    # 1. sum_e p_active ~= K
    devs = [(r["layer"], r["p_active_sum"], r["top_k"]) for r in cat["routing"]]
    worst = max(devs, key=lambda d: abs(d[1] - d[2]))
    ok = all(abs(s - k) <= 0.01 * k for _, s, k in devs)
    out.append(_item("sum_e p_active = K (top-K routing)", "pass" if ok else "fail",
                     f"worst layer {worst[0]}: sum {worst[1]:.4f} vs K = {worst[2]}"))
    # 2. low-entropy positions stable across prompt classes
    stab = [(r["layer"], r["low_entropy_stability"]) for r in cat["routing"]]
    known = [(l, st["jaccard"]) for l, st in stab if st.get("jaccard") is not None and not st.get("note")]
    if all(st.get("jaccard") is None for _, st in stab):
        out.append(_item("low-entropy positions stable across prompt classes", "n/a", "one prompt class only"))
    elif not known:
        out.append(_item("low-entropy positions stable across prompt classes", "n/a",
                         "no position has routing entropy below the threshold in any class, so there is nothing to compare "
                         f"(thresholds {', '.join(format(r['entropy_threshold'], '.2f') for r in cat['routing'])} nats)"))
    else:
        ok = all(j >= 0.5 for _, j in known)
        out.append(_item("low-entropy positions stable across prompt classes", "pass" if ok else "fail",
                         f"Jaccard per layer ({cat['workload']['stability_groups']}): "
                         + ", ".join(f"L{l}={j:.2f}" for l, j in known) + " (pass: all >= 0.5)"))
    # 3a. very few dominant (r, c) pairs per expert
    # Judged on the experts that hold a super weight; without one, reported over all experts.
    firsts = [c for c in cat["candidates"] if c.get("iteration") == 0]
    sw_experts = {(s["layer"], s["expert"]) for s in cat["super_weights"]}
    rule = "pairs with S >= tau and a peak contribution max|X_r| |W[c, r]| >= half the expert's largest"
    if sw_experts:
        held = [c for c in firsts if (c["layer"], c["expert"]) in sw_experts]
        ok = all(c["n_dominant_pairs"] <= 3 for c in held)
        out.append(_item("per expert: very few dominant (r, c) pairs", "pass" if ok else "fail",
                         "super-weight experts: " + ", ".join(f"L{c['layer']} E{c['expert']}: {c['n_dominant_pairs']}" for c in held)
                         + f" {rule} (pass: <= 3 each)"))
    elif firsts:
        counts = [c["n_dominant_pairs"] for c in firsts]
        out.append(_item("per expert: very few dominant (r, c) pairs", "n/a",
                         f"no super-weight expert; over all {len(firsts)} examined experts median {statistics.median(counts):.0f} "
                         f"(max {max(counts)}) {rule}: no scalar stands out"))
    else:
        out.append(_item("per expert: very few dominant (r, c) pairs", "n/a", "no expert had enough routed tokens"))
    # 3b. iterative suppression reduces E_c* monotonically
    seqs = [(r["layer"], r["expert"], r["suppression_energy"]) for r in cat["experts_examined"] if len(r["suppression_energy"]) >= 2]
    if seqs:
        bad = [(l, e) for l, e, s in seqs if any(b > a * (1 + 1e-6) for a, b in zip(s, s[1:]))]
        out.append(_item("iterative suppression reduces E_c* monotonically", "fail" if bad else "pass",
                         f"{len(seqs) - len(bad)}/{len(seqs)} suppressed experts monotone" + (f"; not: {bad[:5]}" if bad else "")))
    else:
        out.append(_item("iterative suppression reduces E_c* monotonically", "n/a", "no candidate passed the proxy gates, nothing was suppressed"))
    # 4. I_nat and I_int agree on sign and are non-trivial
    modes = cat["settings"]["score_modes"]
    sw = cat["super_weights"]
    if sw:
        out.append(_item("I_nat and I_int agree on sign and are non-trivial", "pass",
                         f"{len(sw)} super weight(s); top: I_nat {sw[0]['I_nat']}, I_int {sw[0]['I_int']} (threshold {thr})"
                         + ("" if len(modes) == 2 else f"; only {modes[0]} scored")))
    elif scored(cat["candidates"]):
        best = max(scored(cat["candidates"]), key=strength)
        out.append(_item("I_nat and I_int agree on sign and are non-trivial", "n/a",
                         f"no candidate qualifies; largest: L{best['layer']} E{best['expert']} I_nat {best['I_nat']}, "
                         f"I_int {best['I_int']} (threshold {thr})"))
    else:
        out.append(_item("I_nat and I_int agree on sign and are non-trivial", "n/a", "no candidate was scored"))
    # 5. full loss on held-out text confirms the proxies for the top candidates
    ho = cat["heldout"]["candidates"]
    if not ho:
        out.append(_item("held-out loss confirms the top candidates", "n/a", "no candidate to confirm"))
    elif sw:
        # confirmed = the held-out delta has I_nat's sign and the effect size
        nat = {(s["layer"], s["expert"], s["row_ff"], s["col_model"]): s.get("I_nat") or s.get("I_int") or 0.0 for s in sw}
        top = [h for h in ho if h["is_super_weight"]]
        ok = all(abs(h["delta_loss"]) >= thr and (h["delta_loss"] > 0) == (nat[(h["layer"], h["expert"], h["row_ff"], h["col_model"])] > 0)
                 for h in top)
        out.append(_item("held-out loss confirms the top candidates", "pass" if ok else "fail",
                         "; ".join(f"L{h['layer']} E{h['expert']} [{h['col_model']},{h['row_ff']}]: {h['delta_loss']:+.4f} nats" for h in top)
                         + f" (baseline {cat['heldout']['baseline_loss']:.4f}; pass: |delta| >= {thr} with I_nat's sign)"))
    else:
        ok = all(abs(h["delta_loss"]) < thr for h in ho)
        out.append(_item("held-out loss confirms the top candidates", "pass" if ok else "fail",
                         ("negative confirmed: " if ok else "held-out loss moves although no candidate was called a "
                          "super weight; look at these: ")
                         + ", ".join(f"L{h['layer']} E{h['expert']} {h['delta_loss']:+.5f}" for h in ho)
                         + f" (pass: every |delta| < {thr})"))
    return out


def verdict(cat: dict) -> dict:
    sw = cat["super_weights"]
    sx = cat["super_experts"]["super_experts"]
    massive = max(cat["massive_activations"], key=lambda m: m["ratio"])
    n_gate = sum(1 for c in cat["candidates"] if c["proxy_pass"])
    ev = dict(
        candidates_evaluated=len(cat["candidates"]),
        passed_proxy_gates=n_gate,
        largest_residual_activation=dict(layer=massive["layer"], ratio_to_median=massive["ratio"], channel=massive.get("channel"),
                                         position=massive.get("position")),
        attention_sinks=cat["model"]["attention_sinks"],
    )
    if scored(cat["candidates"]):
        best = max(scored(cat["candidates"]), key=strength)
        ev["strongest_scored_candidate"] = {k: best.get(k) for k in ("layer", "expert", "row_ff", "col_model", "value", "I_nat", "I_int", "proxy", "heldout_delta_loss")}
    if sw:
        s = sw[0]
        summary = (f"{len(sw)} super weight(s); top: layer {s['layer']} expert {s['expert']} W_down[{s['col_model']}, {s['row_ff']}] "
                   f"= {s['value']:.4g}, I_nat {s['I_nat']}, I_int {s['I_int']} ({s.get('direction', '')})")
    else:
        summary = (f"no super weight: {len(cat['candidates'])} candidates, {n_gate} passed the proxy gates, none has "
                   f"I_nat and I_int of one sign above {cat['settings']['effect_threshold']} nats; largest residual activation "
                   f"is {massive['ratio']:.1f}x the median (layer {massive['layer']})")
        # Massive activations are ~1000x the median (Sun et al. 2024); the sink remark only explains their absence.
        if cat["model"]["attention_sinks"] and massive["ratio"] < 100:
            summary += ("; the model has attention sinks, which can do the job massive activations do in models "
                        "without them (consistent with the small ratio, not a proof)")
    summary += f"; {len(sx)} super expert(s)"
    return dict(found=bool(sw), super_experts_found=bool(sx), summary=summary, evidence=ev)


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _bar(value: float, top: float, width: int = 30) -> str:
    n = 0 if top <= 0 else int(round(width * max(value, 0) / top))
    return "#" * n


def render_report(cat: dict) -> str:
    m, w, v = cat["model"], cat["workload"], cat["verdict"]
    lines = [
        "# Super-weight report (uspx)",
        "",
        f"- model: {m['label']} ({m['family']}, {len(m['moe_layers'])} MoE layers, {m['num_experts']} experts, "
        f"top-{m['top_k']}, hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, attention sinks: {m['attention_sinks']})",
        f"- workload: {w['source']} ({w['calibration_tokens']} calibration, {w['diagnostic_tokens']} diagnostic, "
        f"{w['heldout_tokens']} held-out tokens)",
        f"- metric: {cat['metric']}",
        f"- index convention: {cat['index_convention']}",
        f"- capacity: {cat['capacity']['note']}",
        f"- runtime: {cat['runtime_s']['total']} s ({', '.join(f'{k} {x}' for k, x in cat['runtime_s'].items() if k != 'total')})",
        "",
        f"**Verdict: {v['summary']}.**",
        "",
        "## Validation checklist",
        "",
        "| item | status | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {c['item']} | {c['status'].upper()} | {c['detail']} |" for c in cat["checklist"]]
    lines += ["", "## Super weights", ""]
    if cat["super_weights"]:
        lines += ["| rank | layer | expert | W_down[col_model, row_ff] | value | S | p_active | energy | stop | I_nat | I_int | held-out | direction |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in cat["super_weights"]:
            lines.append(f"| {s['rank']} | {s['layer']} | {s['expert']} | [{s['col_model']}, {s['row_ff']}] | {s['value']:.4g} | "
                         f"{s['score_co_spike']:.4f} | {s['p_active']:.3f} | {s['proxy']['energy']:+.3f} | {s['proxy']['stop']:+.4f} | "
                         f"{s['I_nat']} | {s['I_int']} | {s.get('heldout_delta_loss', '')} | {s.get('direction', '')} |")
    else:
        lines.append("None. Evidence: " + ", ".join(f"{k}: {v_}" for k, v_ in v["evidence"].items()))
    lines += ["", "## Candidates (largest scalar contributions first)", "",
              "| layer | expert | [col_model, row_ff] | value | S | tau | peak out / median | energy | stop | gates | I_nat | I_int |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(cat["candidates"], key=lambda c: -c["peak_contribution"])[:15]:
        gates = ",".join(k for k, ok in c["proxy_detail"]["gates"].items() if ok) or "-"
        lines.append(f"| {c['layer']} | {c['expert']} | [{c['col_model']}, {c['row_ff']}] | {c['value']:.4g} | {c['score_co_spike']:.4f} | "
                     f"{c['tau']:.4f} | {c['massive_ratio']:.1f} | {c['proxy']['energy']:+.4f} | {_num(c['proxy']['stop'], '+.5f')} | {gates} | "
                     f"{c['I_nat']} | {c['I_int']} |")
    lines += ["", "## Residual-stream activations (massive activations?)", "",
              "| layer | max abs | median abs | ratio | channel | position | |", "|---|---|---|---|---|---|---|"]
    top = max(r["ratio"] for r in cat["massive_activations"])
    for r in cat["massive_activations"]:
        lines.append(f"| {r['layer']} | {r['max_abs']:.3g} | {r['median_abs']:.3g} | {r['ratio']:.1f} | {r.get('channel')} | "
                     f"{r.get('position')} | `{_bar(r['ratio'], top)}` |")
    lines += ["", "## Routing statistics", "",
              "| layer | sum p_active | min / max p_active | H threshold | low-entropy positions | active experts | overflow |",
              "|---|---|---|---|---|---|---|"]
    for r in cat["routing"]:
        low = r["low_entropy_positions"]
        lines.append(f"| {r['layer']} | {r['p_active_sum']:.3f} | {min(r['p_active']):.3f} / {max(r['p_active']):.3f} | "
                     f"{r['entropy_threshold']:.3f} (median {r['entropy_median']}) | {len(low)} {low[:8]}{'...' if len(low) > 8 else ''} | "
                     f"{len(r['active_experts'])}/{len(r['p_active'])} | {r['capacity_overflow_rate']} |")
    sx = cat["super_experts"]
    lines += ["", "## Super experts", "", f"{sx['method']}. Baseline loss {sx['baseline']['loss']}, repetition rate "
              f"{sx['baseline']['repetition_rate']}; super expert = breaks the model (delta loss >= {sx['criteria']['break_loss']} "
              f"or delta repetition >= {sx['criteria']['break_repetition']}) and delta loss >= {sx['criteria']['control_factor']}x "
              "the largest control.", "",
              "| set | layer | expert | max abs out (x median) | delta loss | delta repetition | super expert |", "|---|---|---|---|---|---|---|"]
    for r in sx["candidates"]:
        lines.append(f"| candidate | {r['layer']} | {r['expert']} | {r['max_abs_out']} ({r['ratio_to_median']}x) | {r['delta_loss']:+.4f} | "
                     f"{r['delta_repetition']:+.3f} | {'yes' if r['is_super_expert'] else 'no'} |")
    for r in sx["control"]:
        lines.append(f"| random control | {r['layer']} | {r['expert']} | {r['max_abs_out']} | {r['delta_loss']:+.4f} | {r['delta_repetition']:+.3f} | |")
    for key, label in (("candidates", "all candidates together"), ("control", "all controls together")):
        if j := sx["joint"][key]:
            lines.append(f"| {label} | | | | {j['delta_loss']:+.4f} | {j['delta_repetition']:+.3f} | |")
    lines.append("")
    return "\n".join(lines)

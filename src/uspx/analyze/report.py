"""Section 8, the report: ``report.json`` (every number) and ``report.html`` (one self-contained
file: figures embedded as base64 PNG, tables, a short explanation per section). The PNGs are also
saved under ``figures/`` so that documentation can reuse them."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from uspx.io import write_json, write_text


def clean(obj):
    """JSON-safe copy: arrays to lists, NaN/inf to None, numpy scalars to Python numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = clean(report)
    write_json(out / "report.json", data)
    write_text(out / "report.html", render_html(data, out / "figures"))


# ----- HTML ------------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-top:.6em}table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}th{background:#f4f4f4}p.note{color:#555;font-size:.9em}
img{max-width:100%;border:1px solid #eee}.skip{color:#a60}"""


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return html.escape(" ".join(str(x) for x in v))
    return html.escape(str(v))


def table(rows: list[dict], cols: list[str], limit: int = 20) -> str:
    if not rows:
        return "<p class=note>(no rows)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows[:limit])
    more = f"<p class=note>{len(rows) - limit} more rows in report.json</p>" if len(rows) > limit else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


class Figures:
    """The report's matplotlib figures (Agg backend: no display), each kept as a PNG under ``folder``."""

    def __init__(self, folder: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.folder, self.plt = folder, plt

    def subplots(self, *args, **kwargs):
        return self.plt.subplots(*args, **kwargs)

    def img(self, fig, name: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        self.plt.close(fig)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{name}.png").write_bytes(buf.getvalue())
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def render_html(r: dict, fig_dir: Path) -> str:
    figs = Figures(fig_dir)
    m = r["model"]
    parts = [f"<h1>uspx routing introspection</h1><p>model: <b>{_fmt(m.get('label') or m.get('source'))}</b> "
             f"({_fmt(m.get('family'))}, {len(m['moe_layers'])} MoE layers, {m['num_experts']} experts, top-{m['top_k']}); "
             f"workload: {_fmt(r['workload'].get('source'))}; trace: {_fmt(r['trace'])}</p>"
             "<p class=note>Every figure states the tokens behind it. Intervals are 95%: Wilson for proportions "
             "(token level), percentile bootstrap over prompts where prompts are the unit.</p>"]
    for key, why in r.get("skipped", {}).items():
        parts.append(f"<p class=skip>skipped {html.escape(key)}: {html.escape(why)}</p>")
    for name, fn in (("utilisation", _utilisation), ("circuits", _circuits), ("dynamics", _dynamics),
                     ("cooperation", _cooperation), ("similarity", _similarity), ("attention", _attention),
                     ("prefetch", _prefetch)):
        if name in r:
            parts.append(fn(r[name], figs))
    parts.append(f"<h2>Timings</h2>{table([r['timings']], list(r['timings']))}")
    return f"<!doctype html><html><head><meta charset=utf-8><title>uspx analyze</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"


def _some(n: int, most: int = 8) -> list[int]:
    """At most ``most`` evenly spaced layer positions, so a 24-layer model still gives a readable figure."""
    return sorted({round(i * (n - 1) / max(most - 1, 1)) for i in range(min(n, most))}) if n > most else list(range(n))


def _utilisation(u: dict, figs: Figures) -> str:
    p = np.array(u["p_active"], dtype=float)
    cls = np.array(u["classes"])
    fig, ax = figs.subplots(figsize=(max(5, p.shape[1] * 0.35), max(2.5, p.shape[0] * 0.35)))
    im = ax.imshow(p, aspect="auto", cmap="viridis")
    for (l, e), c in np.ndenumerate(cls):
        if c != "not_cold":
            ax.text(e, l, "C" if c == "cold" else "?", ha="center", va="center", color="red", fontsize=8)
    ax.set_xlabel("expert"), ax.set_ylabel("MoE layer"), ax.set_yticks(range(len(u["layers"])), u["layers"])
    ax.set_title(f"p_active per (layer, expert), {u['tokens']} tokens (C cold, ? undetermined)")
    fig.colorbar(im)
    heat = figs.img(fig, "introspection_utilisation")
    pe = u["position_entropy"]
    fig, ax = figs.subplots(figsize=(7, 3))
    pos, tok = np.array(pe["positions"]), np.array(pe["tokens"])
    keep = tok >= 20
    for li, h in enumerate(pe["entropy"]):
        ax.plot(pos[keep], np.array(h, dtype=float)[keep] / pe["max_entropy"], label=f"L{u['layers'][li]}")
    ax.set_xlabel("token position (last bin pools later positions)"), ax.set_ylabel("H(pos) / log E")
    ax.set_title("position entropy (positions with >= 20 tokens)"), ax.legend(fontsize=7, ncol=4)
    ent = figs.img(fig, "introspection_position_entropy")
    bal = u["balance"]
    brows = [dict(layer=u["layers"][i], **{f"{k}": bal[k]["value"][i] for k in bal},
                  **{f"{k}_ci": [round(bal[k]["lo"][i], 3), round(bal[k]["hi"][i], 3)] for k in bal})
             for i in range(len(u["layers"]))]
    frows = [dict(family=f, tokens=v["tokens"], **v["classes"]) for f, v in u["families"].items()]
    return (f"<h2>1. Utilisation</h2><p>p_active = share of tokens routed to the expert (in its top-k), over "
            f"{u['tokens']} tokens from {u['prompts']} prompts. An expert is <b>cold</b> only if the upper 95% bound "
            f"(the larger of Wilson and the prompt bootstrap) is below {u['threshold']}; <b>not cold</b> if the lower bound "
            f"is at or above it; otherwise <b>undetermined</b> (not enough tokens to tell).</p>"
            f"{table([u['class_counts']], ['cold', 'not_cold', 'undetermined'])}{heat}"
            f"<h3>Cold experts</h3>{table(u['cold'], ['layer', 'expert', 'hits', 'upper'])}"
            f"<h3>Undetermined</h3>{table(u['undetermined'], ['layer', 'expert', 'hits', 'upper'], 10)}"
            f"<h3>Per family</h3>{table(frows, ['family', 'tokens', 'cold', 'not_cold', 'undetermined'])}"
            f"<h3>Load balance per layer</h3><p class=note>CV and max/mean of expert counts, normalised entropy of the "
            f"usage distribution (1 = uniform); CIs by bootstrap over prompts.</p>"
            f"{table(brows, ['layer', 'cv', 'cv_ci', 'max_over_mean', 'max_over_mean_ci', 'entropy_norm', 'entropy_norm_ci'])}"
            f"<h3>Position entropy</h3>{ent}")


def _circuits(c: dict, figs: Figures) -> str:
    import matplotlib

    ca = c["coactivation"]
    lift = np.array(ca["lift"], dtype=float)
    show = _some(len(c["layers"]))
    fig, axes = figs.subplots(1, len(show), figsize=(2.6 * len(show), 2.8), squeeze=False)
    # the diagonal (an expert with itself) has no lift: grey, not "strongly apart"
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#bbbbbb")
    for i, ax in zip(show, axes[0]):
        up = np.triu(np.nan_to_num(lift[i], nan=0.0), 1)  # pairs are stored i < j
        sym = up + up.T
        logl = np.log2(np.clip(sym, 1e-3, None))
        np.fill_diagonal(logl, np.nan)
        ax.imshow(logl, cmap=cmap, vmin=-3, vmax=3)
        ax.set_title(f"L{c['layers'][i]}", fontsize=8), ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"co-activation lift (log2, red = together more than independent), {c['tokens']} tokens", fontsize=9)
    heat = figs.img(fig, "introspection_coactivation")
    tr = c["transitions"]
    prow = [dict(pair=f"L{c['layers'][i]}->L{c['layers'][i + 1]}", predictability=v, marginal_baseline=tr["top1_marginal_baseline"][i])
            for i, v in enumerate(tr["top1_predictability"])]
    pa = c["paths"]
    return (f"<h2>2. Circuits</h2><p>Over all {c['tokens']} tokens of all prompts. Co-activation P(i and j in one "
            f"token's top-k) is divided by the tokens routed in that layer (not by the layer count); "
            f"lift = P(i,j) / (P(i) P(j)); its interval is the Wilson interval of P(i,j) over the product of marginals.</p>"
            f"{heat}{table(ca['top_by_lift'], ['layer', 'a', 'b', 'count', 'p', 'lift', 'lift_lo', 'lift_hi'], 12)}"
            f"<h3>Transitions between adjacent layers</h3><p>P(j at l+1 | i at l) for the highest-weight expert "
            f"(\"primary\" = highest routing weight, not the first slot). Expert ids are per layer, so \"E6 at every "
            f"layer\" pipelines are meaningless; what matters is whether layer l's choice predicts layer l+1's: "
            f"predictability = share of tokens whose next primary expert is the most likely one given this layer's, "
            f"against always guessing the next layer's most used expert.</p>"
            f"{table(prow, ['pair', 'predictability', 'marginal_baseline'])}"
            f"{table(tr['top_top1_by_lift'], ['layer', 'next_layer', 'i', 'j', 'count', 'given', 'p', 'p_lo', 'p_hi', 'lift'], 10)}"
            f"<h3>Full paths</h3><p>{html.escape(pa['definition'])}. {pa['distinct']} distinct paths over {pa['tokens']} "
            f"tokens (of {pa['possible']:.3g} possible); {pa['repeated_token_share']:.1%} of tokens "
            f"[{pa['repeated_lo']:.1%}, {pa['repeated_hi']:.1%}] follow a path some other token also follows; "
            f"{pa['paths_in_2plus_prompts']} paths occur in two or more prompts.</p>"
            f"{table(pa['top'], ['path', 'tokens', 'share', 'share_lo', 'share_hi', 'prompts'], 10)}")


def _dynamics(d: dict, figs: Figures) -> str:
    if not d.get("step_pairs"):
        return f"<h2>3. Generation dynamics</h2><p>{_fmt(d.get('note'))}</p>"
    x = np.arange(len(d["layers"]))
    fig, ax = figs.subplots(figsize=(7, 3))
    for key, lab in (("stability", "top-1 kept"), ("jaccard", "top-k Jaccard")):
        v = np.array(d[key], float)
        ax.errorbar(x, v, yerr=[v - np.array(d[key + "_lo"], float), np.array(d[key + "_hi"], float) - v], marker="o", label=lab, capsize=3)
        ax.plot(x, d[key + "_chance"], ls=":", color="gray")
    ax.set_xticks(x, [f"L{l}" for l in d["layers"]]), ax.set_ylim(0, 1), ax.legend(), ax.set_title(
        f"consecutive generated tokens, {d['step_pairs']} step pairs from {d['prompts']} prompts (dotted: chance)")
    img = figs.img(fig, "introspection_dynamics")
    rows = [dict(layer=l, stability=d["stability"][i], chance=d["stability_chance"][i], jaccard=d["jaccard"][i],
                 jaccard_chance=d["jaccard_chance"][i]) for i, l in enumerate(d["layers"])]
    return (f"<h2>3. Generation dynamics</h2><p>Greedy decoding, {d['new_tokens']} new tokens per prompt, KV cache, "
            f"routing of each new position. Stability = share of consecutive steps keeping the highest-weight expert; "
            f"Jaccard = overlap of consecutive top-k sets; CIs by bootstrap over prompts; {d['handoffs_per_step']:.2f} "
            f"handoffs per step summed over layers.</p>{img}{table(rows, list(rows[0]))}"
            f"{table(d['top_handoffs'], ['layer', 'src', 'dst', 'count'], 10)}")


def _cooperation(c: dict, figs: Figures) -> str:
    # the paired change in loss, not the absolute loss: the absolute loss's prompt-bootstrap interval is
    # dominated by how hard the prompts are and overlaps across k even where the paired change is certain
    ks = [r["k"] for r in c["rows"]]
    delta = np.array([r["delta"] for r in c["rows"]])
    agree = np.array([r["top1_agreement"] for r in c["rows"]])
    fig, ax = figs.subplots(figsize=(5.5, 3))
    ax.errorbar(ks, delta, yerr=[delta - [r["delta_lo"] for r in c["rows"]], [r["delta_hi"] for r in c["rows"]] - delta],
                marker="o", capsize=3, color="C0", label="loss change vs full k (paired 95% CI)")
    ax.axhline(0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("experts per token (k)"), ax.set_ylabel("held-out loss change (nats/token)", color="C0"), ax.set_xticks(ks)
    ax2 = ax.twinx()
    ax2.plot(ks, agree, marker="s", color="C1", label="top-1 agreement with full model")
    ax2.set_ylim(0, 1.02), ax2.set_ylabel("top-1 agreement", color="C1")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
    ax.set_title(f"k ablation, {c['tokens']} tokens, {c['items']} items (unablated loss {c['unablated_loss']:.3f})", fontsize=9)
    img = figs.img(fig, "introspection_k_ablation")
    return (f"<h2>4. Cooperation (k ablation)</h2><p>Mechanism: {html.escape(c['mechanism'])}. Loss on held-out "
            f"completion tokens; top-1 agreement with the unablated model's next-token prediction. Unablated loss "
            f"{c['unablated_loss']:.4f}; the hook at full k reproduces it exactly: {c['full_k_equals_unablated']}.</p>{img}"
            f"{table(c['rows'], ['k', 'loss', 'loss_lo', 'loss_hi', 'delta', 'delta_lo', 'delta_hi', 'top1_agreement', 'agreement_boot_lo', 'agreement_boot_hi', 'tokens'])}")


def _similarity(s: dict, figs: Figures) -> str:
    layers = s["layers"]
    show = _some(len(layers))
    fig, axes = figs.subplots(1, len(show), figsize=(2.6 * len(show), 2.8), squeeze=False)
    for ax, row in zip(axes[0], [layers[i] for i in show]):
        ax.imshow(np.array(row["weight_cosine"], float), cmap="magma", vmin=-0.2, vmax=1)
        ax.set_title(f"L{row['layer']} max {row['max_cosine']:.2f}", fontsize=8), ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("expert weight cosine per layer", fontsize=9)
    img = figs.img(fig, "introspection_similarity")
    rows = [dict(layer=r["layer"], most_similar=r["most_similar"], max_cosine=r["max_cosine"], mean_offdiag=r["mean_offdiag"],
                 pair_output_cosine=r.get("pair_output_cosine")) for r in layers]
    merges = table(s.get("merges", []), ["kind", "layer", "a", "b", "weight_cosine", "delta_loss", "lo", "hi", "tokens"])
    return (f"<h2>5. Expert similarity and merging</h2><p>Weight cosine over all fused expert tensors flattened per "
            f"expert; output cosine of two experts run on the same tokens (those routed to either). The merge test "
            f"averages a pair's weights into both slots and measures the held-out loss change (bootstrap over prompts, "
            f"paired), for the most similar pair and for random pairs.</p>{img}{table(rows, list(rows[0]))}{merges}")


def _attention(a: dict, figs: Figures) -> str:
    out = ["<h2>6. Attention vs routing</h2>"]
    p = a.get("probe")
    if p and "rows" in p:
        rows = p["rows"]
        x = np.arange(len(rows))
        fig, ax = figs.subplots(figsize=(6, 3))
        ax.bar(x - 0.2, [r["accuracy"] for r in rows], 0.4, label="probe (attention output)")
        ax.bar(x + 0.2, [r["majority"] for r in rows], 0.4, label="majority baseline")
        ax.set_xticks(x, [f"L{r['layer']}" for r in rows]), ax.set_ylim(0, 1), ax.legend(fontsize=8)
        ax.set_title(f"top-1 expert from attention output, {rows[0]['test_tokens']} held-out tokens")
        out.append(f"<p>Linear probe (logistic regression) from {html.escape(p['features'])} to the {html.escape(p['target'])}; "
                   f"trained on {html.escape(p['train'])}, measured on {html.escape(p['test'])}.</p>{figs.img(fig, 'introspection_attention')}"
                   f"{table(rows, ['layer', 'train_tokens', 'test_tokens', 'accuracy', 'lo', 'hi', 'majority', 'chance'])}")
    elif p:
        out.append(f"<p>{_fmt(p.get('note'))}</p>")
    c = a.get("contexts")
    if c:
        out.append(f"<h3>Same token, different contexts</h3><p>{html.escape(c['definition'])}, against two random tokens.</p>"
                   f"{table(c['rows'], ['layer', 'token_ids_seen_twice', 'occurrences', 'pair_differ', 'random_pair_differ', 'ids_with_several_experts'])}")
    return "".join(out)


def _prefetch(p: dict, figs: Figures) -> str:
    out = ["<h2>7. Early prediction and expert cache</h2>"]
    pred = p.get("prediction")
    if pred:
        out.append(f"<p>Predict layer l+{pred['distance']}'s top-k set from the router input at layer l, on held-out "
                   f"tokens: the next router applied early, a linear probe fitted on calibration tokens, and the most "
                   f"frequent experts. Recall = share of needed experts predicted; precision = share of predicted "
                   f"experts needed (budget = experts predicted).</p>"
                   f"{table(pred['rows'], ['source', 'target', 'method', 'budget', 'tokens', 'recall', 'recall_lo', 'recall_hi', 'precision'], 40)}")
    cache = p.get("cache")
    if cache:
        rows = cache["rows"]
        fig, ax = figs.subplots(figsize=(7, 3))
        for pol in ("lru", "lfu", "belady"):
            for cap in cache["capacities"]:
                v = [r["hit_rate"] for r in rows if r["policy"] == pol and r["capacity"] == cap]
                ax.plot(range(len(v)), v, marker="o", label=f"{pol} C={cap}")
        ax.set_xlabel("MoE layer (index in trace)"), ax.set_ylabel("hit rate"), ax.legend(fontsize=6, ncol=3), ax.set_ylim(0, 1)
        ax.set_title(f"per-layer expert cache, first {cache['tokens']} trace tokens")
        out.append(f"<h3>Cache simulation (trace)</h3><p>Each layer caches C experts; a token needs its k experts "
                   f"resident. Belady's MIN is the offline optimum.</p>{figs.img(fig, 'introspection_cache')}"
                   f"{table(rows, ['layer', 'capacity', 'policy', 'tokens', 'accesses', 'hits', 'hit_rate', 'lo', 'hi'], 60)}")
    wp = p.get("cache_with_prefetch")
    if wp:
        out.append(f"<h3>With prefetch (router applied one layer early), {wp['tokens']} held-out tokens</h3>"
                   f"{table(wp['rows'], ['layer', 'capacity', 'policy', 'hit_rate_without', 'hit_rate', 'lo', 'hi', 'prefetch_loads', 'accesses'], 60)}")
    return "".join(out)

"""Print every figure that docs/introspection.md ("On the teacher") quotes, from the two reports.

Reads REPORT/report.json (python_dev, all sections, made with --model) and MIXED/report.json
(mixed workload, --only utilisation,circuits) and prints, section by section: tokens and items,
cold / undetermined experts, load balance, per-family usage and total-variation distances,
co-activation lifts, transitions, paths, generation dynamics, the k ablation table, similarity and
merges, the attention probe, the early prediction table, the cache hit rates and the timings.
No figure is written; the token lists behind these numbers come from token_lists.py.

    python bench/introspection/doc_numbers.py [--report runs/analyze_teacher/report]
        [--mixed runs/analyze_teacher/report_mixed]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def rng(values, fmt="{:.2f}") -> str:
    v = [x for x in values if x is not None]
    return f"{fmt.format(min(v))}-{fmt.format(max(v))}"


def pct(x) -> str:
    return f"{100 * x:.1f}%"


def utilisation(u: dict, name: str) -> None:
    p = np.array(u["p_active"], float)
    n = u["tokens"]
    print(f"\n== utilisation ({name}): {u['prompts']} prompts, {n} tokens, classes {u['class_counts']}")
    print("cold:", u["cold"])
    print("undetermined:", u["undetermined"])
    order = np.argsort(p, axis=None)
    k = u["top_k"]
    for i in list(order[:4]) + list(order[-3:]):
        l, e = np.unravel_index(i, p.shape)
        print(f"  L{l} E{e}: p_active {pct(p[l, e])} ({int(round(p[l, e] * n))} tokens, {pct(p[l, e] / k)} of routed slots), "
              f"Wilson [{pct(u['wilson_lo'][l][e])}, {pct(u['wilson_hi'][l][e])}], "
              f"bootstrap [{pct(u['boot_lo'][l][e])}, {pct(u['boot_hi'][l][e])}]")
    b = u["balance"]
    for key in ("cv", "max_over_mean", "entropy_norm"):
        val = b[key]["value"]
        print(f"  {key}: {rng(val, '{:.3f}')}; per layer " + ", ".join(
            f"L{l} {v:.3f} [{lo:.3f}, {hi:.3f}]" for l, (v, lo, hi) in enumerate(zip(val, b[key]["lo"], b[key]["hi"]))))
    pe = u["position_entropy"]
    ent = np.array(pe["entropy"], float) / pe["max_entropy"]
    print(f"  position entropy / log E: {ent.min():.3f}-{ent.max():.3f}; per layer min "
          + ", ".join(f"{x:.3f}" for x in ent.min(1)) + f" (positions {pe['positions'][0]}..{pe['positions'][-1]}, "
          f"last bin pools later: {pe.get('last_bin_pools_later')})")
    # top-k overlap of two independent tokens (the 'independent tokens' cache reference)
    print("  independent-token top-k overlap / k (sum p^2 / k):", ", ".join(f"{x:.3f}" for x in (p ** 2).sum(1) / k))


def families(u: dict) -> None:
    fams = u["families"]
    names = sorted(fams)
    print("\n== families (mixed):", ", ".join(f"{f} {fams[f]['tokens']} tokens" for f in names))
    from uspx.analyze.stats import balance
    share = {}
    for f in names:
        p = np.array(fams[f]["p_active"], float)
        hits = np.rint(p * fams[f]["tokens"]).astype(int)
        bal = balance(hits)
        hi = np.array(fams[f]["wilson_hi"], float)
        cold = [(l, e, int(hits[l, e])) for (l, e), v in np.ndenumerate(hi) if v < u["threshold"]]
        share[f] = p / p.sum(1, keepdims=True)
        print(f"  {f}: classes {fams[f]['classes']}; CV {rng(bal['cv'])}; max p_active per layer "
              + ", ".join(f"{x:.2f}" for x in p.max(1)) + f"; argmax " + ", ".join(str(int(x)) for x in p.argmax(1)))
        print(f"     cold (Wilson hi < {u['threshold']}): {cold}")
        und = [(l, e, int(hits[l, e])) for (l, e), v in np.ndenumerate(hi) if v >= u["threshold"] and fams[f]["wilson_lo"][l][e] < u["threshold"]]
        print(f"     undetermined-like (lo < thr <= hi): {und}")
    print("  total-variation distance of expert usage per layer (min-max over layers):")
    for i, a in enumerate(names):
        for b_ in names[i + 1:]:
            tv = 0.5 * np.abs(share[a] - share[b_]).sum(1)
            print(f"     {a} vs {b_}: {tv.min():.2f}-{tv.max():.2f}  ({', '.join(f'{x:.2f}' for x in tv)})")


def circuits(c: dict, name: str, n_top: int = 6) -> None:
    co = c["coactivation"]
    print(f"\n== circuits ({name}): {c['tokens']} tokens")
    print("  max lift per layer:", ", ".join(f"{x:.2f}" for x in co["max_lift_per_layer"]))
    med = []
    for l in range(len(co["lift"])):
        lift, cnt = np.array(co["lift"][l], float), np.array(co["count"][l], float)
        iu = np.triu_indices(lift.shape[0], 1)
        ok = cnt[iu] >= 5
        med.append(np.median(lift[iu][ok]))
    print("  median lift per layer (pairs >= 5 tokens):", ", ".join(f"{x:.2f}" for x in med))
    for t in co["top_by_lift"][:n_top]:
        print(f"  pair L{t['layer']} E{t['a']}+E{t['b']}: lift {t['lift']:.2f} [{t['lift_lo']:.2f}, {t['lift_hi']:.2f}], {t['count']} tokens")
    tr = c["transitions"]
    print("  top-1 predictability l->l+1:", ", ".join(pct(x) for x in tr["top1_predictability"]))
    print("  marginal baseline:        ", ", ".join(pct(x) for x in tr["top1_marginal_baseline"]))
    for t in tr["top_top1_by_lift"][:n_top]:
        print(f"  top1 L{t['layer']} E{t['i']} -> L{t['next_layer']} E{t['j']}: P {t['p']:.2f} [{t['p_lo']:.2f}, {t['p_hi']:.2f}], "
              f"lift {t['lift']:.1f}, {t['count']} of {t['given']}")
    for t in tr["top_set_by_lift"][:n_top]:
        print(f"  set  L{t['layer']} E{t['i']} -> L{t['next_layer']} E{t['j']}: P {t['p']:.2f} [{t['p_lo']:.2f}, {t['p_hi']:.2f}], "
              f"lift {t['lift']:.1f}, {t['count']} of {t['given']}")
    p = c["paths"]
    print(f"  paths: {p['distinct']} distinct of {p['possible']:.0f}; repeated share {pct(p['repeated_token_share'])} "
          f"[{pct(p['repeated_lo'])}, {pct(p['repeated_hi'])}]; in 2+ prompts {p['paths_in_2plus_prompts']}")
    for t in p["top"][:8]:
        print(f"    {t['path']} {t['tokens']} tokens ({pct(t['share'])}), {t['prompts']} prompts")


def dynamics(d: dict) -> None:
    print(f"\n== dynamics: {d['prompts']} prompts x {d['new_tokens']} tokens, {d['step_pairs']} step pairs")
    for l in d["layers"]:
        i = d["layers"].index(l)
        print(f"  L{l}: jaccard {d['jaccard'][i]:.3f} [{d['jaccard_lo'][i]:.3f}, {d['jaccard_hi'][i]:.3f}] chance {d['jaccard_chance'][i]:.3f}"
              f" (lo - chance {d['jaccard_lo'][i] - d['jaccard_chance'][i]:+.3f}); stability {d['stability'][i]:.3f} "
              f"[{d['stability_lo'][i]:.3f}, {d['stability_hi'][i]:.3f}] chance {d['stability_chance'][i]:.3f}")
    print(f"  jaccard {rng(d['jaccard'])} vs chance {rng(d['jaccard_chance'])}; stability {rng(d['stability'])} vs chance "
          f"{rng(d['stability_chance'])}; handoffs per step {d['handoffs_per_step']:.2f}")


def cooperation(c: dict) -> None:
    print(f"\n== cooperation: {c['items']} items, {c['tokens']} tokens; unablated {c['unablated_loss']:.3f} "
          f"[{c['unablated_lo']:.3f}, {c['unablated_hi']:.3f}]; full k reproduces: {c['full_k_equals_unablated']}")
    for r in c["rows"]:
        print(f"  | {r['k']} | {r['loss']:.3f} | {r['delta']:+.3f} [{r['delta_lo']:+.3f}, {r['delta_hi']:+.3f}] | "
              f"{pct(r['top1_agreement'])} [{100 * r['agreement_boot_lo']:.1f}, {100 * r['agreement_boot_hi']:.1f}] |")


def similarity(s: dict) -> None:
    print(f"\n== similarity: base loss {s['base_loss']:.4f}")
    for r in s["layers"]:
        print(f"  L{r['layer']}: mean off-diag {r['mean_offdiag']:.3f}, max {r['max_cosine']:.3f} pair {r['most_similar']}, "
              f"pair output cosine {r['pair_output_cosine']:.2f}")
    for m in s["merges"]:
        print(f"  merge {m['kind']} L{m['layer']} {m['a']}+{m['b']} (cos {m['weight_cosine']:.3f}): "
              f"{m['delta_loss']:+.4f} [{m['lo']:+.4f}, {m['hi']:+.4f}]")


def attention(a: dict) -> None:
    p = a["probe"]["rows"]
    print(f"\n== attention probe: train {p[0]['train_tokens']} tokens, test {p[0]['test_tokens']}")
    print("  accuracy:", ", ".join(pct(r["accuracy"]) for r in p))
    print("  half-width:", ", ".join(f"{100 * (r['hi'] - r['lo']) / 2:.1f}" for r in p))
    print("  majority:", ", ".join(pct(r["majority"]) for r in p), f"(chance {pct(p[0]['chance'])})")
    c = a["contexts"]["rows"]
    print("  same token, different primary expert:", ", ".join(pct(r["pair_differ"]) for r in c),
          "; random pair", rng([r["random_pair_differ"] for r in c], "{:.3f}"),
          f"; {c[0]['token_ids_seen_twice']} ids seen twice+, {c[0]['occurrences']} occurrences")


def prefetch(p: dict) -> None:
    rows = p["prediction"]["rows"]
    print(f"\n== prediction (distance {p['prediction']['distance']}, {rows[0]['tokens']} tokens): recall (precision)")
    by = {}
    for r in rows:
        by[(r["source"], r["method"], r["budget"])] = r
    for s in sorted({r["source"] for r in rows}):
        cells = []
        for m in sorted({r["method"] for r in rows}):
            for bud in sorted({r["budget"] for r in rows if r["method"] == m}):
                r = by.get((s, m, bud))
                if r:
                    cells.append(f"{m}/{bud} {pct(r['recall'])} ({pct(r['precision'])})")
        print(f"  {s} -> {s + 1}: " + "; ".join(cells))
    cache = p["cache"]["rows"]
    print(f"\n== cache ({p['cache']['tokens']} tokens)")
    for cap in p["cache"]["capacities"]:
        for pol in ("lru", "lfu", "belady"):
            hr = [r["hit_rate"] for r in cache if r["capacity"] == cap and r["policy"] == pol]
            print(f"  C={cap} {pol}: {rng(hr, '{:.3f}')} (" + ", ".join(f"{x:.3f}" for x in hr) + ")")
    print(f"== cache with prefetch ({p['cache_with_prefetch']['tokens']} tokens)")
    for r in p["cache_with_prefetch"]["rows"]:
        ratio = (r["prefetch_loads"] + r["misses"]) / max(1, r["accesses"] * (1 - r["hit_rate_without"]))
        print(f"  L{r['layer']} C={r['capacity']} {r['policy']}: {r['hit_rate_without']:.3f} -> {r['hit_rate']:.3f}; "
              f"loads+misses / misses without {ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default="runs/analyze_teacher/report")
    ap.add_argument("--mixed", default="runs/analyze_teacher/report_mixed")
    a = ap.parse_args()
    r = json.loads((Path(a.report) / "report.json").read_text())
    print("model:", r["model"]["label"], r["model"]["fingerprint"][:12], "| workload:", r["workload"]["source"],
          r["workload"]["items"], "items | settings", r["settings"])
    utilisation(r["utilisation"], "python_dev")
    circuits(r["circuits"], "python_dev")
    if r.get("dynamics"):
        dynamics(r["dynamics"])
    if r.get("cooperation"):
        cooperation(r["cooperation"])
    if r.get("similarity"):
        similarity(r["similarity"])
    if r.get("attention"):
        attention(r["attention"])
    if r.get("prefetch"):
        prefetch(r["prefetch"])
    print("\n== timings:", r["timings"])
    mixed = Path(a.mixed) / "report.json"
    if mixed.exists():
        m = json.loads(mixed.read_text())
        utilisation(m["utilisation"], "mixed")
        families(m["utilisation"])
        circuits(m["circuits"], "mixed")


if __name__ == "__main__":
    main()

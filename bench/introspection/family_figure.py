"""docs/img/introspection_families.png: p_active per (layer, expert) for each family of a mixed-workload
report (`uspx analyze TRACE_MIXED --only utilisation,circuits`), experts cold for that family marked C
(token-level Wilson upper bound below the report's cold threshold).

Also prints, per family, the cold experts with their hit counts, the load-balance CV per layer and the
largest p_active per layer. The report's family cold calls use the token-level Wilson bound only; with
--trace (the mixed trace) each family-cold expert also gets a 95% upper bound from a Poisson bootstrap
over that family's prompts (2,000 replicates), the check the overall classification makes.

    python bench/introspection/family_figure.py [--report runs/analyze_teacher/report_mixed]
        [--out docs/img/introspection_families.png] [--trace runs/analyze_teacher/trace_mixed]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from uspx.analyze.stats import balance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default="runs/analyze_teacher/report_mixed")
    ap.add_argument("--out", default="docs/img/introspection_families.png")
    ap.add_argument("--trace", default=None, help="mixed trace: prompt-bootstrap check of the family-cold experts")
    a = ap.parse_args()

    u = json.loads((Path(a.report) / "report.json").read_text())["utilisation"]
    fams = u["families"]
    names = sorted(fams)
    vmax = max(float(np.max(fams[f]["p_active"])) for f in names)
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 2.6), squeeze=False)
    for ax, f in zip(axes[0], names):
        p = np.array(fams[f]["p_active"], float)
        im = ax.imshow(p, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        for (l, e), v in np.ndenumerate(np.array(fams[f]["wilson_hi"], float)):
            if v < u["threshold"]:
                ax.text(e, l, "C", ha="center", va="center", color="red", fontsize=7)
        ax.set_title(f"{f}: {fams[f]['tokens']} tokens", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(u["layers"])), u["layers"], fontsize=7)
        ax.set_xticks(range(0, u["num_experts"], 3))
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].set_ylabel("MoE layer", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
    fig.suptitle("teacher, mixed workload: p_active per family (C = cold for that family: Wilson upper bound "
                 f"< {u['threshold']:.0%})", fontsize=9, y=1.04)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=80, bbox_inches="tight")
    print(f"wrote {a.out} (colour scale 0-{vmax:.2f})")
    for f in names:
        p = np.array(fams[f]["p_active"], float)
        hits = np.rint(p * fams[f]["tokens"]).astype(int)
        b = balance(hits)
        cold = [(l, e, int(hits[l, e])) for (l, e), v in np.ndenumerate(np.array(fams[f]["wilson_hi"])) if v < u["threshold"]]
        print(f, fams[f]["tokens"], fams[f]["classes"], "CV", np.round(b["cv"], 2), "max p", np.round(p.max(1), 2),
              "cold (layer, expert, hits)", cold)
        if a.trace and cold:
            prompt_bootstrap(a.trace, f, [(l, e) for l, e, _ in cold])


def prompt_bootstrap(trace: str, family: str, experts: list[tuple[int, int]], reps: int = 2000) -> None:
    from uspx.analyze.blocks import Vocab, iter_blocks
    from uspx.trace import Trace

    vocab, samples, ids = Vocab(), [], []
    for b in iter_blocks(Trace(trace), vocab):
        keep = np.array([vocab.families[c] == family for c in b.family], dtype=bool)
        samples.append(b.sample[keep]), ids.append(b.ids[keep])
    samples, ids = np.concatenate(samples), np.concatenate(ids)
    prompts, idx = np.unique(samples, return_inverse=True)
    tokens = np.bincount(idx)
    w = np.random.default_rng(0).poisson(1.0, (reps, len(prompts)))
    for l, e in experts:
        hits = np.bincount(idx, weights=(ids[:, l] == e).any(-1), minlength=len(prompts))
        rep = (w @ hits) / (w @ tokens)
        print(f"   {family} L{l} E{e}: {int(hits.sum())} hits in {int((hits > 0).sum())} of {len(prompts)} prompts, "
              f"p {hits.sum() / tokens.sum():.4f}, prompt-bootstrap upper bound {np.quantile(rep, 0.975):.4f}")


if __name__ == "__main__":
    main()

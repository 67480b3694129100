"""Token-id control for the attention probe of `uspx analyze` (no figure; the "token id alone" row
of docs/introspection.md, "Attention vs routing").

Predicts each layer's highest-weight expert from the token id alone: the most common primary expert
of that id on the calibration prompts the analyzer's probe was trained on (the first --max-items
calibration items; ids never seen there get the layer's majority expert), measured on all held-out
prompts, as the probe is.

    python bench/introspection/token_id_baseline.py [--trace runs/analyze_teacher/trace] [--max-items 64]
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import numpy as np

from uspx.analyze.blocks import Vocab, iter_blocks
from uspx.trace import Trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="runs/analyze_teacher/trace")
    ap.add_argument("--max-items", type=int, default=64, help="calibration items the probe saw (uspx analyze --max-items)")
    a = ap.parse_args()

    tr = Trace(a.trace)
    items = tr.items().to_pandas()
    split = dict(zip(items["sample"] if "sample" in items else items.index, items["split"]))
    S, T, P = [], [], []
    for b in iter_blocks(tr, Vocab()):
        S.append(b.sample), T.append(b.token), P.append(b.top1)
    S, T, P = map(np.concatenate, (S, T, P))
    sp = np.array([split[int(s)] for s in S])
    cal = sorted({int(s) for s in S[sp == "calibration"]})[: a.max_items]
    train, test = np.isin(S, cal), sp == "heldout"
    print(f"train tokens {int(train.sum())} ({len(cal)} items), test tokens {int(test.sum())}")
    for l in range(P.shape[1]):
        table: dict[int, Counter] = defaultdict(Counter)
        for t, e in zip(T[train], P[train, l]):
            table[int(t)][int(e)] += 1
        major = Counter(P[train, l].tolist()).most_common(1)[0][0]
        pred = np.array([table[int(t)].most_common(1)[0][0] if int(t) in table else major for t in T[test]])
        seen = np.mean([int(t) in table for t in T[test]])
        print(f"layer {l}: token-id lookup accuracy {np.mean(pred == P[test, l]):.3f} (held-out ids seen in training: {seen:.3f})")


if __name__ == "__main__":
    main()

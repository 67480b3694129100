"""Which tokens stand behind the routing structures of a report (no figure; the token lists quoted in
docs/introspection.md, "On the teacher").

For the trace and its report.json this prints the most common tokens of: the most and least used
experts, the strongest co-activation pairs, the strongest transitions (highest-weight expert at l ->
l+1, and top-k sets), and the most common full paths (highest-weight expert of every layer), with the
family mix of each path (useful on the mixed workload).

    python bench/introspection/token_lists.py [--trace runs/analyze_teacher/trace]
        [--report runs/analyze_teacher/report] [--model default] [--n 6]
    python bench/introspection/token_lists.py --trace runs/analyze_teacher/trace_mixed \
        --report runs/analyze_teacher/report_mixed
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from uspx.analyze.blocks import Vocab, iter_blocks
from uspx.models import load_model
from uspx.trace import Trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="runs/analyze_teacher/trace")
    ap.add_argument("--report", default="runs/analyze_teacher/report")
    ap.add_argument("--model", default="default", help="for the tokenizer")
    ap.add_argument("--n", type=int, default=6, help="entries per list")
    a = ap.parse_args()

    tok = load_model(a.model).tokenizer
    report = json.loads((Path(a.report) / "report.json").read_text())
    vocab = Vocab()
    ids, top1, toks, fam = [], [], [], []
    for b in iter_blocks(Trace(a.trace), vocab):
        ids.append(b.ids), top1.append(b.top1), toks.append(b.token), fam.append(b.family)
    ids, top1, toks, fam = map(np.concatenate, (ids, top1, toks, fam))
    n = a.n

    def show(name: str, mask: np.ndarray) -> None:
        c = Counter(toks[mask].tolist())
        fams = Counter(vocab.families[f] for f in fam[mask].tolist())
        print(f"  {name}: {int(mask.sum())} tokens {dict(fams) if len(vocab.families) > 1 else ''}",
              [(tok.decode([t]), k) for t, k in c.most_common(n)])

    def has(l: int, e: int) -> np.ndarray:
        return (ids[:, l] == e).any(-1)

    u = report["utilisation"]
    p = np.array(u["p_active"], float)
    order = np.argsort(p, axis=None)
    print("== most / least used experts (in the top-k)")
    for i in list(order[-3:][::-1]) + list(order[:3]):
        l, e = np.unravel_index(i, p.shape)
        show(f"L{l} E{e} (p_active {p[l, e]:.3f})", has(int(l), int(e)))

    c = report["circuits"]
    print("== co-activation pairs (highest lift)")
    for t in c["coactivation"]["top_by_lift"][:n]:
        show(f"L{t['layer']} E{t['a']}+E{t['b']} lift {t['lift']:.2f}", has(t["layer"], t["a"]) & has(t["layer"], t["b"]))
    print("== transitions of the highest-weight expert (highest lift)")
    for t in c["transitions"]["top_top1_by_lift"][:n]:
        show(f"L{t['layer']} E{t['i']} -> L{t['next_layer']} E{t['j']} P {t['p']:.2f} lift {t['lift']:.1f}",
             (top1[:, t["layer"]] == t["i"]) & (top1[:, t["next_layer"]] == t["j"]))
    print("== transitions of top-k sets (highest lift)")
    for t in c["transitions"]["top_set_by_lift"][:n]:
        show(f"L{t['layer']} E{t['i']} -> L{t['next_layer']} E{t['j']} P {t['p']:.2f} lift {t['lift']:.1f}",
             has(t["layer"], t["i"]) & has(t["next_layer"], t["j"]))

    print("== most common paths")
    paths = Counter(map(tuple, top1.tolist()))
    ptok, pfam = defaultdict(Counter), defaultdict(Counter)
    keys = {k for k, _ in paths.most_common(max(n, 8))}
    for row, t, f in zip(map(tuple, top1.tolist()), toks.tolist(), fam.tolist()):
        if row in keys:
            ptok[row][t] += 1
            pfam[row][vocab.families[f]] += 1
    for key, cnt in paths.most_common(max(n, 8)):
        print(f"  {list(key)} {cnt} tokens {dict(pfam[key])}", [(tok.decode([t]), k) for t, k in ptok[key].most_common(5)])


if __name__ == "__main__":
    main()

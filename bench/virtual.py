"""Virtual experts on the bundled teacher: does handing arithmetic to a calculator pay, and which
experts can go when it does?

    python bench/virtual.py [--keep 50%] [--threads 1]

1. The trigger detector (``uspx probe`` on the ``mixed`` workload, family ``arith``): precision and
   recall on held-out tokens with 95% intervals, for the probe and for the regular expression.
2. Exact-match accuracy on held-out arithmetic lines (``a op b = c`` in the ``mixed`` workload's
   held-out ``arith`` items, the 4 last complete lines of each, everything before the result as
   context): the original alone, the pruned model alone, each with the calculator (``uspx generate
   --virtual-experts calc``; the pruned model with the original's probe and with its own). Greedy
   decoding; the answer is the first integer after ``=``.
3. At the same keep share on ``mixed``, three selections: ``frequency``, ``capability``
   (``--tool-families arith``: routing frequency on the other families' tokens) and uspx's default
   (``reconstruction``): held-out delta per family. The pruned model of (2) is the capability one.

Writes ``<out>/results.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(-?\d+ [-+*] -?\d+) = (-?\d+)$")


def arith_cases(workload, per_item: int = 4) -> list[tuple[str, str]]:
    """(context ending in '=', exact result) for the last complete lines of each held-out arith item."""
    cases = []
    for item in workload.part("heldout").items:
        if item.family != "arith":
            continue
        text = item.prompt + (item.completion or "")
        lines = text.split("\n")[:-1]  # the last line may be cut
        found = []
        for i, line in enumerate(lines):
            m = LINE.match(line)
            if m and i > 0:
                context = "\n".join(lines[:i] + [m.group(1) + " ="])
                found.append((context, m.group(2)))
        cases += found[-per_item:]
    return cases


def answer(continuation: str) -> str:
    """The number a continuation gives as the result: the first integer after '=' (what follows
    it on the line, a pruned model's stray text, is not part of the answer)."""
    m = re.match(r"\s*(-?\d+)", continuation)
    return m.group(1) if m else ""


def model_answer(model, tokenizer, context: str) -> str:
    ids = torch.tensor([tokenizer.encode(context, add_special_tokens=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    return answer(tokenizer.decode(out[0, ids.shape[1]:]))


def main() -> None:
    from uspx.extract import extract
    from uspx.io import write_json
    from uspx.models import load_model
    from uspx.virtual.generate import generate_with_tools
    from uspx.virtual.probe import train_probe
    from uspx.virtual.probe import wilson
    from uspx.workload import load_workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", default="50%")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_virtual")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    wl = load_workload("mixed")
    teacher = load_model("default")

    probe, report = train_probe(teacher.model, teacher.tokenizer, wl)
    probe.save(args.out / "probe", record=dict(report=report))
    print(f"probe: {report['probe']}\nregex: {report['regex']}", flush=True)

    runs = {}
    for method in ("frequency", "capability", "reconstruction"):
        run = args.out / f"mixed-{args.keep.strip('%')}-{method}"
        if not (run / "report.json").exists():
            extract("default", wl, run, keep=args.keep, method=method, speed=False, progress=False,
                    tool_families=["arith"] if method == "capability" else None)
        ev = json.loads((run / "evaluation.json").read_text())
        runs[method] = {f: v["delta"] for f, v in {**ev["families"], "all": ev["overall"]}.items()}
        print(method, runs[method], flush=True)

    cases = arith_cases(wl)
    pruned = load_model(args.out / f"mixed-{args.keep.strip('%')}-capability" / "model")
    # a probe reads the hidden states of the model that generates: the pruned model gets its own
    pruned_probe, pruned_report = train_probe(pruned.model, teacher.tokenizer, wl)
    print(f"pruned model's probe: {pruned_report['probe']}", flush=True)
    correct = {"original": 0, "original + calculator": 0, "pruned (capability)": 0,
               "pruned + calculator (the original's probe)": 0, "pruned + calculator (its own probe)": 0}
    calls = dict.fromkeys(correct, 0)
    for context, want in cases:
        correct["original"] += model_answer(teacher.model, teacher.tokenizer, context) == want
        correct["pruned (capability)"] += model_answer(pruned.model, teacher.tokenizer, context) == want
        for name, lm, p in (("original + calculator", teacher, probe),
                            ("pruned + calculator (the original's probe)", pruned, probe),
                            ("pruned + calculator (its own probe)", pruned, pruned_probe)):
            g = generate_with_tools(lm.model, teacher.tokenizer, context, p, max_new_tokens=12)
            calls[name] += bool(g.calls)
            correct[name] += answer(g.text) == want
    accuracy = {k: dict(correct=v, cases=len(cases), accuracy=v / len(cases), ci=wilson(v, len(cases)))
                for k, v in correct.items()}
    for k, v in accuracy.items():
        print(f"{k:44s} exact match {v['correct']}/{v['cases']} = {v['accuracy']:.3f} {v['ci']}", flush=True)

    write_json(args.out / "results.json", dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/virtual.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        seconds=round(time.perf_counter() - started, 1), probe=report, pruned_probe=pruned_report, selections=runs,
        exact_match=accuracy, calculator_calls=calls))
    fams = [f for f in runs["frequency"] if f != "all"] + ["all"]
    print("\n| selection (keep %s of mixed) | " % args.keep + " | ".join(fams) + " |")
    print("|---|" + "---:|" * len(fams))
    for m, row in runs.items():
        print(f"| {m} | " + " | ".join(f"{row[f]:+.3f}" for f in fams) + " |")


if __name__ == "__main__":
    main()

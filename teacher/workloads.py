"""Cut the bundled user workloads out of the corpus.

Usage::

    python -m teacher.workloads --corpus data/corpus --tokenizer data/tokenizer \\
        --out src/uspx/data/workloads

Each workload is JSONL, one item per line::

    {"id": "python_dev-c-0007", "family": "python", "split": "calibration",
     "prompt": "...", "completion": "...", "source": "stdlib:json/decoder.py"}

An item is a chunk of one document: the first 64-128 tokens are the prompt,
the next 64-128 the completion (quality is measured on completion tokens).
Cuts fall just before a token that starts with a space or newline, so that
tokenising prompt and completion separately gives back the same tokens.

User workloads (``python_dev``, ``shell_user``, ``docs_writer``, ``arith``)
come from the corpus **test** split, which the teacher never trained on.
Calibration and held-out items come from disjoint documents, so a selection
calibrated on one user's calibration set is judged on text it has not seen.
The generic ``mixed`` workload (all families) is cut from the **validation**
split, so it overlaps no user's held-out set either.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from teacher.corpus import FAMILIES, read_split

#: Token lengths (min, max) of prompt and of completion. The prose test split
#: is the smallest (docstrings and pydoc topics are short), so docs_writer
#: items are a little shorter to get 180 of them from disjoint documents.
LENGTHS: dict[str, tuple[int, int]] = {"docs_writer": (64, 96)}
DEFAULT_LENGTH: tuple[int, int] = (64, 128)

#: workload name -> (families, corpus split)
WORKLOADS: dict[str, tuple[tuple[str, ...], str]] = {
    "python_dev": (("python",), "test"),
    "shell_user": (("shell",), "test"),
    "docs_writer": (("prose",), "test"),
    "arith": (("arith",), "test"),
    "mixed": (FAMILIES, "validation"),
}
SPLIT_VALUES: tuple[str, ...] = ("calibration", "heldout")
REQUIRED_FIELDS: tuple[str, ...] = ("id", "prompt", "completion", "family", "split")


@dataclass
class Chunk:
    family: str
    source: str
    prompt_ids: list[int]
    completion_ids: list[int]


def _starts_word(tok_str: str) -> bool:
    # Byte-level BPE spells a leading space as "Ġ" and a newline as "Ċ".
    return tok_str[:1] in ("Ġ", "Ċ", "ĉ")


def _cut(ids: list[int], strs: list[str], lo: int, hi: int, rng: random.Random) -> int | None:
    """A cut position in [lo, hi] just before a word-initial token (None if none)."""
    want = rng.randint(lo, hi)
    for delta in range(0, hi - lo + 1):
        for pos in (want - delta, want + delta):
            if lo <= pos <= min(hi, len(ids) - 1) and _starts_word(strs[pos]):
                return pos
    return None


def chunk_document(ids: list[int], strs: list[str], family: str, source: str, rng: random.Random,
                   prompt_len: tuple[int, int] = (64, 128), completion_len: tuple[int, int] = (64, 128)) -> list[Chunk]:
    """Consecutive, non-overlapping prompt+completion chunks of one tokenised document."""
    out: list[Chunk] = []
    start = 0
    while len(ids) - start >= prompt_len[0] + completion_len[0]:
        rel_ids, rel_strs = ids[start:], strs[start:]
        p = _cut(rel_ids, rel_strs, *prompt_len, rng)
        if p is None:
            start += prompt_len[1]
            continue
        c = _cut(rel_ids, rel_strs, p + completion_len[0], p + completion_len[1], rng)
        if c is None:
            # No word boundary in range (long token runs): end the completion
            # at the range's end; the next chunk starts there anyway.
            c = min(p + completion_len[1], len(rel_ids))
            if c - p < completion_len[0]:
                break
        out.append(Chunk(family, source, rel_ids[:p], rel_ids[p:c]))
        start += c
    return out


def build_workload(name: str, corpus: Path, tokenizer: "transformers.PreTrainedTokenizerBase",  # noqa: F821
                   n_calibration: int = 120, n_heldout: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """Items of one workload: calibration and held-out from disjoint documents."""
    families, split = WORKLOADS[name]
    docs = [d for d in read_split(corpus, split) if d["family"] in families]
    if not docs:
        raise ValueError(f"workload {name}: no {families} documents in the {split} split of {corpus}")
    rng = random.Random(f"{name}:{seed}")
    # Per family: documents in hash order, each assigned to the pool that is
    # furthest below its target share (2:1), so both pools span many documents.
    pools: dict[str, dict[str, list[list[Chunk]]]] = {s: {f: [] for f in families} for s in SPLIT_VALUES}
    for f in families:
        fdocs = sorted((d for d in docs if d["family"] == f), key=lambda d: hashlib.sha256(d["text"].encode()).hexdigest())
        counts = {"calibration": 0, "heldout": 0}
        for d in fdocs:
            enc = tokenizer(d["text"], add_special_tokens=False)["input_ids"]
            strs = tokenizer.convert_ids_to_tokens(enc)
            span = LENGTHS.get(name, DEFAULT_LENGTH)
            chunks = chunk_document(enc, strs, f, d["source"], rng, span, span)
            if not chunks:
                continue
            dest = "heldout" if counts["heldout"] * n_calibration < counts["calibration"] * n_heldout else "calibration"
            pools[dest][f].append(chunks)
            counts[dest] += len(chunks)
    items: list[dict[str, str]] = []
    for s, n in (("calibration", n_calibration), ("heldout", n_heldout)):
        picked: list[Chunk] = []
        # Equal share per family; round-robin over documents so no single
        # long document supplies most of the items.
        per_fam = [n // len(families) + (1 if i < n % len(families) else 0) for i in range(len(families))]
        for f, k in zip(families, per_fam):
            queues = [list(c) for c in pools[s][f]]
            got: list[Chunk] = []
            while len(got) < k and any(queues):
                for q in queues:
                    if q and len(got) < k:
                        got.append(q.pop(0))
            if len(got) < k:
                raise ValueError(f"workload {name}: only {len(got)} {s} chunks for family {f}, need {k}; "
                                 "use a larger corpus (--mb-per-family) or fewer items")
            picked.extend(got)
        rng.shuffle(picked)
        for i, ch in enumerate(picked):
            items.append({
                "id": f"{name}-{s[0]}-{i:04d}",
                "family": ch.family,
                "split": s,
                "prompt": tokenizer.decode(ch.prompt_ids),
                "completion": tokenizer.decode(ch.completion_ids),
                "source": ch.source,
            })
    return items


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """Atomic JSONL write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_workload(path: Path, split: str | None = None) -> list[dict[str, str]]:
    """Read a workload JSONL, checking the fields (optionally one split only)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            missing = [k for k in ("prompt", "completion", "family", "split") if k not in r]
            if missing:
                raise ValueError(f"{path}:{n}: missing fields {missing}")
            if r["split"] not in SPLIT_VALUES:
                raise ValueError(f"{path}:{n}: split {r['split']!r} not in {SPLIT_VALUES}")
            if split is None or r["split"] == split:
                rows.append(r)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the bundled workloads.")
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer"))
    ap.add_argument("--out", type=Path, default=Path("src/uspx/data/workloads"))
    ap.add_argument("--calibration", type=int, default=120)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(a.tokenizer))
    for name in WORKLOADS:
        items = build_workload(name, a.corpus, tok, a.calibration, a.heldout, a.seed)
        write_jsonl(a.out / f"{name}.jsonl", items)
        n_docs = len({(i["split"], i["source"]) for i in items})
        print(f"{name}: {len(items)} items from {n_docs} documents -> {a.out / (name + '.jsonl')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

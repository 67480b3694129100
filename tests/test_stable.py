"""uspx trace-stable: the kept set after each block, recounted from the block traces, and the stop rule."""

import json
import random

import numpy as np
import pytest

from conftest import write_jsonl
from uspx.io import UspxError
from uspx.score import load_scores
from uspx.stable import jaccard, kept_mask, trace_until_stable
from uspx.trace import Trace
from uspx.workload import load_workload

ROWS = [{"prompt": f"{w} {i}:", "completion": f" {w} {i * 7}", "family": w, "split": "calibration"}
        for i in range(12) for w in ("def", "ls")]


def counts_of(path):
    """[L, E] routed tokens and the tokens of a block trace, counted from its rows."""
    rows = Trace(path).table().to_pandas()
    count = np.zeros((2, 8))
    for layer, ids in zip(rows["layer"], rows["expert_ids"]):
        np.add.at(count[layer], ids.astype(int), 1)
    return count, len(rows) // 2


def test_kept_set_helpers():
    value = np.array([[3.0, 1.0, 2.0, 2.0]])
    assert kept_mask(value, 2).tolist() == [[True, False, True, False]]  # a tie goes to the lower index
    a, b = np.array([[True, True, False, False]]), np.array([[True, False, True, False]])
    assert jaccard(a, b) == pytest.approx(1 / 3)


def test_trace_until_stable_by_hand(tmp_path, tiny_gpt_oss_dir, one_thread):
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    res = trace_until_stable(tiny_gpt_oss_dir, wl, tmp_path / "s", keep="50%", block=6, tolerance=0.2, patience=2,
                             bootstrap=20, progress=False)
    assert json.loads((tmp_path / "s" / "stable.json").read_text())["kept"] == res["kept"]
    # each block's frequency, summed over the blocks so far, gives the kept sets; recount them
    count, tokens, prev, calm, stop = np.zeros((2, 8)), 0, None, 0, None
    for h in res["history"]:
        c, t = counts_of(tmp_path / "s" / "blocks" / f"block-{h['block']:04d}")
        count, tokens = count + c, tokens + t
        kept = kept_mask(count / tokens, 4)
        if prev is None:
            assert h["jaccard_previous"] is None
        else:
            assert h["jaccard_previous"] == pytest.approx(float(jaccard(kept, prev)))
            calm = calm + 1 if h["jaccard_previous"] >= 0.8 else 0
        prev = kept
        if calm >= 2:
            stop = h["block"]
            break
    assert res["stable"] == (stop is not None) and res["stable"]  # these items settle before they run out
    assert res["history"][-1]["block"] == (stop if stop is not None else len(ROWS) // 6 - 1)
    assert res["kept"] == {str(l): np.flatnonzero(prev[l]).tolist() for l in (0, 1)}
    # the scores are the traced items' frequency, and name those items' workload
    table = load_scores(tmp_path / "s" / "scores")
    assert table.matrix("frequency")[1] == pytest.approx(count / tokens)
    items = load_workload(wl).part("calibration").items
    random.Random(0).shuffle(items)
    assert table.meta["workload"]["items"] == res["items"] == len(res["history"]) * 6
    # the blocks were traced in the seeded order: block 0 holds the first six shuffled items
    first = Trace(tmp_path / "s" / "blocks" / "block-0000").items().to_pandas()["id"].tolist()
    assert first == [i.id for i in items[:6]]


def test_trace_until_stable_runs_out(tmp_path, tiny_gpt_oss_dir, one_thread):
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS[:8])
    res = trace_until_stable(tiny_gpt_oss_dir, wl, tmp_path / "s", keep=4, block=4, tolerance=0.0, patience=5,
                             bootstrap=10, progress=False)
    assert not res["stable"] and res["items"] == 8 and len(res["history"]) == 2
    with pytest.raises(UspxError, match="exactly one of --keep"):
        trace_until_stable(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)
    with pytest.raises(UspxError, match="a stable trace scores with"):
        trace_until_stable(tiny_gpt_oss_dir, wl, tmp_path / "t", keep=4, method="taylor", progress=False)

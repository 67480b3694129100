"""uspx trace-stable: the kept set after each block, recounted from the block traces, and the stop rule."""

import json
import random

import numpy as np
import pytest

from conftest import write_jsonl
from uspx.io import UspxError
from uspx.score import load_scores
from uspx.stable import jaccard, kept_mask, score_until_stable, trace_until_stable
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


def test_the_blocks_traced_are_one_trace_scored_as_uspx_score_does(tmp_path, tiny_gpt_oss_dir, one_thread):
    from uspx.score import score

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    res = trace_until_stable(tiny_gpt_oss_dir, wl, tmp_path / "s", keep="50%", block=6, tolerance=0.2, patience=2,
                             bootstrap=20, progress=False)
    traced = load_workload(tmp_path / "s" / "workload.jsonl")
    assert len(traced.items) == res["items"] and Trace(tmp_path / "s" / "trace").manifest["summary"]["tokens"] == res["tokens"]
    fresh = score(tiny_gpt_oss_dir, tmp_path / "s" / "trace", traced, tmp_path / "f", methods=["frequency"],
                  split="all", bootstrap=20, progress=False).to_pandas()
    mine = load_scores(tmp_path / "s" / "scores").to_pandas()
    for col in ("value", "tokens", "ci_low", "ci_high"):
        np.testing.assert_allclose(mine[col].to_numpy(), fresh[col].to_numpy(), rtol=1e-9)


def test_score_until_stable_by_hand(tmp_path, tiny_gpt_oss_dir, one_thread):
    from uspx.score import score
    from uspx.trace import trace

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    trace(tiny_gpt_oss_dir, wl, tmp_path / "t", split="calibration", progress=False)
    res = score_until_stable(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "s", keep=4, block=5, tolerance=0.2,
                             patience=2, bootstrap=20, progress=False)
    # per prompt routed counts from the rows; blocks of the seeded order; the rule replayed by hand
    rows = Trace(tmp_path / "t").table().to_pandas()
    count, tokens = np.zeros((len(ROWS), 2, 8)), np.zeros(len(ROWS))
    for sample, layer, ids in zip(rows["sample"], rows["layer"], rows["expert_ids"]):
        np.add.at(count[sample, layer], ids.astype(int), 1)
        tokens[sample] += layer == 0
    order = random.Random(0).sample(range(len(ROWS)), len(ROWS))
    prev, calm, used = None, 0, []
    for b in range(0, len(ROWS), 5):
        used += order[b : b + 5]
        kept = kept_mask(count[used].sum(0) / tokens[used].sum(), 4)
        calm = calm + 1 if prev is not None and float(jaccard(kept, prev)) >= 0.8 else 0
        prev = kept
        if calm >= 2:
            break
    assert res["items"] == len(used) and res["samples"] == sorted(used)
    assert res["kept"] == {str(l): np.flatnonzero(prev[l]).tolist() for l in (0, 1)}
    assert load_scores(tmp_path / "s").matrix("frequency")[1] == pytest.approx(count[used].sum(0) / tokens[used].sum())

    # taylor, a model pass per block: when the prompts run out, the table is uspx score's on all of them
    full = score_until_stable(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "ty", method="taylor", keep=4, block=7,
                              tolerance=0.0, patience=9, bootstrap=20, progress=False)
    assert not full["stable"] and full["items"] == len(ROWS)
    ref = score(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "ref", methods=["taylor"], progress=False)
    np.testing.assert_allclose(load_scores(tmp_path / "ty").matrix("taylor")[1], ref.matrix("taylor")[1], rtol=1e-5)
    # reconstruction from a trace without its sums: model passes, recorded as uspx score records them
    score_until_stable(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "rc", method="reconstruction", keep=4,
                       block=7, tolerance=0.0, patience=9, bootstrap=20, progress=False)
    ref = score(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "ref_rc", methods=["reconstruction"], progress=False)
    assert load_scores(tmp_path / "rc").meta["method_source"] == ref.meta["method_source"] == {"reconstruction": "model"}
    with pytest.raises(UspxError, match="scoring until stable uses"):
        score_until_stable(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "x", method="l0", keep=4, progress=False)
    with pytest.raises(UspxError, match="covers split 'calibration', not 'heldout'"):
        score_until_stable(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "x", keep=4, split="heldout", progress=False)


def test_trace_and_score_take_until_stable(tmp_path, tiny_gpt_oss_dir, one_thread):
    from typer.testing import CliRunner

    from uspx.cli import app

    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    model = str(tiny_gpt_oss_dir)
    out = CliRunner().invoke(app, ["trace", model, str(wl), "-o", str(tmp_path / "s"), "--until-stable", "--keep", "4",
                                   "--block", "6", "--tolerance", "0.2"])
    assert out.exit_code == 0, out.output
    alias = CliRunner().invoke(app, ["trace-stable", model, str(wl), "-o", str(tmp_path / "a"), "--keep", "4",
                                     "--block", "6", "--tolerance", "0.2"])
    assert alias.exit_code == 0, alias.output
    a, b = (json.loads((tmp_path / d / "stable.json").read_text()) for d in ("s", "a"))
    assert a["kept"] == b["kept"] and a["history"] == b["history"]
    scored = CliRunner().invoke(app, ["score", model, str(tmp_path / "s" / "trace"), str(tmp_path / "s" / "workload.jsonl"),
                                      "--split", "all", "-o", str(tmp_path / "sc"), "--until-stable", "--keep", "4",
                                      "--methods", "frequency", "--block", "4"])
    assert scored.exit_code == 0, scored.output
    direct = score_until_stable(model, tmp_path / "s" / "trace", tmp_path / "s" / "workload.jsonl", tmp_path / "sd",
                                keep=4, block=4, split="all", progress=False)
    cli = json.loads((tmp_path / "sc" / "stable.json").read_text())
    assert (cli["kept"], cli["history"], cli["samples"]) == (direct["kept"], direct["history"], direct["samples"])
    refused = CliRunner().invoke(app, ["trace", model, str(wl), "-o", str(tmp_path / "x"), "--keep", "4"])
    assert isinstance(refused.exception, UspxError) and "--until-stable" in str(refused.exception)

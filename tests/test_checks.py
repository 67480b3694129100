"""Task checks: the statistics against closed forms and hand counts, each check kind against
hand-made generations, the loop rule on constructed cycles, bad checks named by file and line, and
an end-to-end evaluation whose pass rates are known in advance."""

from __future__ import annotations

import json
import math
import sys
from fractions import Fraction

import numpy as np
import pytest

from conftest import write_jsonl
from uspx.evaluate.checks import answer_matches, cut_at_stop, judge, loop_period, parse_number
from uspx.evaluate.stats import mcnemar_exact, paired_bootstrap, pass_at_k, wilson
from uspx.io import UspxError
from uspx.workload import Checks, WorkloadItem, load_workload


def item(prompt: str = "q", **checks) -> WorkloadItem:
    checks.setdefault("stop", ())
    return WorkloadItem("i", "f", "heldout", prompt, checks=Checks(**checks))


# ----- statistics --------------------------------------------------------------------------------
def test_pass_at_k_is_the_closed_form():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2), counted by hand
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share that passed
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_wilson_interval_matches_the_published_worked_example():
    lo, hi = wilson(8, 10)  # 8 of 10: the textbook 95% Wilson interval is [0.490, 0.943]
    assert lo == pytest.approx(0.4902, abs=5e-4) and hi == pytest.approx(0.9433, abs=5e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) is None


def test_mcnemar_exact_from_a_hand_count():
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # five discordant pairs all one way
    assert mcnemar_exact(3, 1) == pytest.approx(2 * (1 + 4) / 16)
    assert mcnemar_exact(2, 2) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_bootstrap_brackets_the_mean_and_weights_by_tokens():
    assert paired_bootstrap([0.25] * 6) == pytest.approx((0.25, 0.25))
    lo, hi = paired_bootstrap([0.0, 1.0] * 20)
    assert lo < 0.5 < hi
    # weighted: an item with 9 tokens at 1.0 and one with 1 token at 0.0 -> a ratio of sums of 0.9
    lo, hi = paired_bootstrap([1.0, 0.0] * 30, [9, 1] * 30)
    assert lo < 0.9 < hi and hi - lo < 0.2
    assert paired_bootstrap([1.0]) is None


# ----- checks on hand-made generations -----------------------------------------------------------
def test_answer_check_normalises_and_compares_numbers():
    assert parse_number("1,234") == 1234 and parse_number("-0.50") == Fraction(-1, 2)
    assert parse_number("3/4") == Fraction(3, 4) and parse_number("12 apples") is None
    assert answer_matches(" 1,000\n2 + 2 = 4", "1000")
    assert answer_matches("1e3", "1000.0")
    assert answer_matches("\n  The  Capital is PARIS.\nmore", "the capital is paris")
    assert not answer_matches(" 999\n1000", "1000")  # only the first non-empty line counts
    assert not answer_matches("10000", "1000")


def test_regex_json_and_stop_strings():
    assert cut_at_stop("abc'rest\nmore", ["\n", "'"]) == "abc"
    assert judge(item(regex=r"-?\d+", stop=("\n",)), " -42\nnext").passed
    partial = judge(item(regex=r"\d+"), "42 and more")
    assert not partial.passed and partial.format_valid is False  # a full match, not a search
    ok = judge(item(json=True, stop=("'",)), '{"a": [1, 2]}\')')
    assert ok.passed and ok.format_valid
    bad = judge(item(json=True), '{"a": ')
    assert not bad.passed and bad.failed[0].startswith("json: does not parse")
    both = judge(item(answer="7", regex=r"\d"), "7")
    assert both.passed and both.format_valid


def test_json_schema_check():
    pytest.importorskip("jsonschema")
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    assert judge(item(json=schema), '{"name": "spam"}').passed
    wrong = judge(item(json=schema), '{"name": 3}')
    assert not wrong.passed and wrong.format_valid is False and "schema" in wrong.failed[0]


def test_tests_check_refuses_without_a_sandbox():
    with pytest.raises(UspxError, match="sandbox"):
        judge(item("def f():\n    return", tests="assert f() == 1"), " 1")


def test_loop_detector_on_constructed_cycles():
    assert loop_period("the cat " * 4) == 8  # a cycle of 8 characters, 4 times
    assert loop_period("ab" * 8) == 2
    assert loop_period("a" * 16) == 1 and loop_period("a" * 15) is None  # shorter than the span
    assert loop_period("intro text, then " + "xyz" * 6) == 3
    assert loop_period("name, " * 5 + ")") == 6  # broken off with one token: still a loop
    assert loop_period("xyz" * 6 + "done.") is None  # the repetition ended well before the end
    assert loop_period("abcdefgh" * 2) is None  # twice is not a loop
    assert loop_period(list(range(40))) is None
    assert loop_period([5, 6, 7] * 7) == 3  # token ids work the same


# ----- bad checks are named by file and line -----------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    ({"regex": "("}, "'regex' does not compile"),
    ({"tests": "assert ("}, "'tests' is not valid Python"),
    ({"answer": True}, "'answer' must be a string or a number"),
    ({"answer": "1", "max_new_tokens": 0}, "'max_new_tokens' must be a whole number"),
    ({"answer": "1", "stop": [""]}, "'stop' must be"),
    ({"json": "yes"}, "'json' must be true"),
    ({"max_new_tokens": 5}, "without a check"),
])
def test_bad_checks_are_named_by_file_and_line(tmp_path, extra, message):
    path = write_jsonl(tmp_path / "w.jsonl", [{"prompt": "fine", "answer": "1"}, {"prompt": "x", **extra}])
    with pytest.raises(UspxError, match=message) as exc:
        load_workload(path)
    assert f"{path}:2:" in str(exc.value)


def test_a_schema_without_jsonschema_is_refused_with_the_remedy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # as if the extra were not installed
    path = write_jsonl(tmp_path / "w.jsonl", [{"prompt": "x", "json": {"type": "object"}}])
    with pytest.raises(UspxError, match=r"w.jsonl:1: .*pip install 'uspx\[checks\]'"):
        load_workload(path)


def test_items_without_checks_keep_their_fingerprint(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(3)]
    plain = load_workload(write_jsonl(tmp_path / "a.jsonl", rows))
    checked = load_workload(write_jsonl(tmp_path / "b.jsonl", rows[:2] + [{**rows[2], "answer": "c2"}]))
    assert plain.items[0].checks is None and checked.items[2].checks.answer == "c2"
    assert [i.split for i in plain.items] == [i.split for i in checked.items]  # checks never move an item
    assert plain.fingerprint == load_workload(write_jsonl(tmp_path / "c.jsonl", rows)).fingerprint
    assert plain.fingerprint != checked.fingerprint
    assert checked.summary.checks == {"answer": 1}


# ----- end to end --------------------------------------------------------------------------------
def _greedy(folder, prompt: str, n: int) -> str:
    """The tiny model's greedy continuation computed directly with transformers, one prompt alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import make_tokenizer

    tok = make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_evaluation_judges_checked_items_end_to_end(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.evaluate import evaluate

    prompts = ["12 + 30 =", "def f(x):\n    return", "x"]
    truth = next((line.strip() for line in _greedy(tiny_gpt_oss_dir, prompts[0], 6).splitlines() if line.strip()), "")
    if not truth:
        pytest.skip("the tiny model's greedy answer is blank")
    rows = [
        {"id": "right", "family": "arith", "split": "heldout", "prompt": prompts[0], "answer": truth,
         "max_new_tokens": 6},
        {"id": "wrong", "family": "arith", "split": "heldout", "prompt": prompts[1], "answer": "no such answer",
         "regex": ".*", "max_new_tokens": 6},
        {"id": "fmt", "family": "data", "split": "heldout", "prompt": prompts[2], "json": True, "max_new_tokens": 4},
        {"id": "plain", "family": "data", "split": "heldout", "prompt": "abc", "completion": " def"},
    ]
    res = evaluate(tiny_gpt_oss_dir, None, write_jsonl(tmp_path / "w.jsonl", rows), speed=False, out=tmp_path,
                   max_pass_drop={"*": 0.0}, batch_size=2)
    fam = res["tasks"]["families"]
    # the batched, left-padded generation gives the same greedy answer as the model alone
    assert fam["arith"]["teacher"]["pass@1"] == 0.5 and fam["arith"]["items"] == 2
    assert fam["arith"]["teacher"]["format_valid"] == 1.0  # ".*" matches anything
    lo, hi = wilson(1, 2)
    assert fam["arith"]["teacher"]["pass@1_ci95"] == pytest.approx([lo, hi])
    assert fam["arith"]["difference"]["pass@1"] == 0.0 and fam["arith"]["difference"]["mcnemar_p"] == 1.0
    assert res["tasks"]["overall"]["items"] == 3  # the unchecked item keeps only its loss
    assert res["families"]["data"]["items"] == 2
    assert res["acceptance"]["verdict"] == "pass"
    assert {c["rule"] for c in res["acceptance"]["checks"]} == {"delta_loss", "pass_drop"}
    lines = [json.loads(x) for x in (tmp_path / "evaluation.items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["right", "wrong", "fmt"]
    assert lines[0]["teacher"]["passed"] == [True] and lines[1]["teacher"]["passed"] == [False]
    assert lines[0]["flip"] is None


def test_sampling_gives_pass_at_k_and_the_pass_drop_rule_names_itself(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.evaluate import evaluate

    rows = [{"id": f"s{i}", "family": "f", "split": "heldout", "prompt": f"{i} +", "regex": "(?s).*[0-9].*",
             "max_new_tokens": 5} for i in range(4)]
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    with pytest.raises(UspxError, match="temperature"):
        evaluate(tiny_gpt_oss_dir, None, wl, speed=False, samples=3)
    res = evaluate(tiny_gpt_oss_dir, None, wl, speed=False, samples=4, temperature=1.0, pass_k=[1, 2], seed=3,
                   max_pass_drop=-0.5)  # a negative allowance cannot be met: the rule must fail by name
    t = res["tasks"]["families"]["f"]["teacher"]
    assert 0.0 <= t["pass@1"] <= t["pass@2"] <= 1.0
    assert res["acceptance"]["verdict"] == "fail" and res["acceptance"]["failed_rules"] == ["pass_drop"]
    assert res["tasks"]["families"]["f"]["difference"]["mcnemar_p"] is None  # several samples: bootstrap only


# ----- honest summaries --------------------------------------------------------------------------
def _evaluation(deltas: list[float], tokens: int = 10) -> dict:
    """An evaluation record of held-out items whose loss deltas are ``deltas``."""
    items = [dict(tokens=tokens, loss_teacher=2.0, loss_candidate=2.0 + d) for d in deltas]
    return dict(items=items, overall=dict(delta=float(np.mean(deltas))))


@pytest.mark.parametrize("deltas, shared", [
    ([0.0001 + 0.01 * (-1) ** i for i in range(40)], False),  # +0.0001 on average: noise
    ([-0.2 + 0.01 * (-1) ** i for i in range(40)], False),  # pruning helped: nothing to recover
    ([0.3 + 0.05 * (-1) ** i for i in range(40)], True),
])
def test_recovered_share_is_given_only_for_a_gap_that_is_surely_there(deltas, shared, monkeypatch):
    from uspx.recover import run as rr

    before, after = _evaluation(deltas), _evaluation([0.0003] * 40)
    share, gap = rr._recovered_share(before, after)
    assert (share is not None) is shared
    if shared:
        assert share == pytest.approx(1 - 0.0003 / 0.3) and gap["before_ci95"][0] > 0
    printed: list[str] = []
    monkeypatch.setattr(rr.console, "print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    fams = {"all": dict(delta=gap["before"], top1_agreement=0.9, kl=0.1, tokens=400)}
    rr._print(dict(history=dict(step=1, tokens_seen=1, seconds=1, best_val=1.0, best_step=1, stopped="steps"),
                   streaming=False, settings=dict(train="full"), heldout=dict(before=fams, after=fams),
                   recovered_share=share, gap=gap, overfitting_gap=dict(before=0.0, after=0.0), elsewhere=None,
                   acceptance=dict(verdict="pass", rule="r")))
    text = "\n".join(printed)
    assert ("% of the loss pruning cost" in text) is shared
    if not shared:
        assert "no share" in text or "no cost to share out" in text


def test_a_restricted_candidate_answers_under_its_restriction(tiny_gpt_oss_dir, tmp_path, one_thread):
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import make_tokenizer
    from uspx.evaluate import evaluate
    from uspx.models import adapter_for

    prompts = [f"{i} * {i} =" for i in range(3)]
    rows = [{"id": f"r{i}", "family": "f", "split": "heldout", "prompt": p, "regex": "(?s).*", "max_new_tokens": 8}
            for i, p in enumerate(prompts)]
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss_dir)
    kept = {layer.index: [0, 1] for layer in adapter_for(model).layers}
    res = evaluate(tiny_gpt_oss_dir, None, write_jsonl(tmp_path / "w.jsonl", rows), kept=kept, speed=False,
                   out=tmp_path)
    got = [json.loads(x) for x in (tmp_path / "evaluation.items.jsonl").read_text().splitlines()]
    tok = make_tokenizer()
    for prompt, row in zip(prompts, got):
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad(), adapter_for(model).restrict(kept):  # the candidate, computed directly
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        assert row["candidate"]["first"]["text"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert res["candidate"]["kind"] == "restricted"


def test_a_generation_ends_at_the_end_token_or_before_the_padding():
    from uspx.evaluate.tasks import _ended

    assert _ended([5, 6, 2, 7, 2], {2}, 2) == [5, 6]  # the first end-of-sequence token ends it
    assert _ended([5, 0, 6, 0, 0], set(), 0) == [5, 0, 6]  # no end token: only the trailing padding goes
    assert loop_period(_ended([9] * 4 + [0] * 20, set(), 0)) is None  # padding after a stop is no loop


def test_a_model_read_layer_by_layer_is_loaded_whole_to_answer(tiny_gpt_oss_dir, tmp_path, one_thread):
    from uspx.engine import open_source
    from uspx.evaluate import evaluate

    rows = [{"id": f"q{i}", "family": "f", "split": "heldout", "prompt": f"{i} - 1 =", "regex": r"\S*",
             "max_new_tokens": 5} for i in range(3)]
    wl = write_jsonl(tmp_path / "w.jsonl", rows)
    whole = evaluate(tiny_gpt_oss_dir, None, wl, speed=False, out=tmp_path / "a")
    layered = evaluate(open_source(tiny_gpt_oss_dir, streaming=True, dtype="fp32"), None, wl, speed=False,
                       out=tmp_path / "b")
    assert "skipped" not in layered["tasks"]
    assert (tmp_path / "a" / "evaluation.items.jsonl").read_text() == (tmp_path / "b" / "evaluation.items.jsonl").read_text()
    assert layered["tasks"]["families"] == whole["tasks"]["families"]

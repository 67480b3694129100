"""Distillation into a dense base of another family: each objective against hand-computed values,
nats per character from hand-counted characters, and ``uspx student --base`` end to end on tiny
models, with the same and with a different tokenizer, exporting a stock-loadable folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from uspx.io import UspxError
from uspx.student.objectives import aligned_targets, kd_loss, uld_loss, uld_per_token
from uspx.student.text import TextLosses, compare_text, encode_scored

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


def test_kd_on_a_three_token_vocabulary_by_hand():
    # logits = log-probabilities, so softmax returns them exactly
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    student = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    # KL = 0.5 ln(0.5/0.2) + 0.3 ln(1) + 0.2 ln(0.2/0.5) = 0.3 ln 2.5
    assert float(kd_loss(student, teacher)) == pytest.approx(0.3 * math.log(2.5), abs=1e-6)
    # tau = 2: p ~ sqrt(p); sqrt(.5), sqrt(.3), sqrt(.2) over their sum 1.702044 = .415446, .321803, .262751;
    # the student's is the reverse, so KL = (.415446 - .262751) ln(.415446 / .262751) = .069957, times tau^2
    assert float(kd_loss(student, teacher, tau=2.0)) == pytest.approx(4 * 0.069957, abs=2e-5)


def test_uld_on_two_vocabularies_by_hand():
    teacher = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))  # 3 tokens
    student = torch.log(torch.tensor([[0.1, 0.3, 0.4, 0.2]]))  # 4 tokens, another order
    # sorted: teacher .7 .2 .1 0 (padded), student .4 .3 .2 .1 -> .3 + .1 + .1 + .1
    assert float(uld_loss(student, teacher)) == pytest.approx(0.6, abs=1e-6)
    assert float(uld_loss(teacher, student)) == pytest.approx(0.6, abs=1e-6)  # symmetric
    two = uld_per_token(torch.cat([student, student]), torch.cat([teacher, torch.log(torch.tensor([[0.4, 0.35, 0.25]]))]))
    # second row: .4 .35 .25 0 against .4 .3 .2 .1 -> 0 + .05 + .05 + .1
    torch.testing.assert_close(two, torch.tensor([0.6, 0.2]), atol=1e-6, rtol=0)
    empty = torch.zeros((0, 4), requires_grad=True)
    assert float(uld_loss(empty, torch.zeros((0, 3))).detach()) == 0.0


def test_uld_with_one_tokenizer_is_the_sorted_l1_under_pinsker():
    """Same vocabulary: ULD = L1 distance (2 TV) when the student ranks tokens as the teacher does,
    never more than the L1 distance, which Pinsker bounds by sqrt(2 KL); 0 for a permutation."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 11, generator=g)
    s = torch.randn(64, 11, generator=g)
    pt, ps = torch.softmax(t, -1), torch.softmax(s, -1)
    l1 = (pt - ps).abs().sum(-1)
    kl = (pt * (pt.log() - ps.log())).sum(-1)
    uld = uld_per_token(s, t)
    assert (uld <= l1 + 1e-6).all() and (l1 <= torch.sqrt(2 * kl) + 1e-6).all()
    assert (uld < l1 - 1e-3).any()  # a different ranking: strictly below L1 somewhere
    # the student ranks the tokens as the teacher: put the student's sorted values in the teacher's order
    same_rank = torch.empty_like(ps).scatter_(-1, pt.argsort(-1, descending=True), ps.sort(-1, descending=True).values)
    torch.testing.assert_close(uld_per_token(same_rank.log(), t), (pt - same_rank).abs().sum(-1), atol=1e-6, rtol=0)
    assert float(uld_per_token(t[:, torch.randperm(11, generator=g)], t).max()) < 1e-6


def test_aligned_targets_by_hand():
    # text "abcdef": teacher tokens a|bc|d|ef, student ab|c|def -> shared starts 0 and 3
    assert aligned_targets([0, 2, 3], [0, 1, 3, 4]) == [(0, 0), (2, 2)]
    assert aligned_targets([0, 1, 2], [0, 1, 2]) == [(0, 0), (1, 1), (2, 2)]
    # two byte tokens of one character start at 2: only the first is aligned, on both sides
    assert aligned_targets([0, 2, 2, 3], [0, 2, 2, 3]) == [(0, 0), (1, 1), (3, 3)]


def test_nats_per_character_by_hand():
    t = TextLosses(np.array([2.0, 3.0]), np.array([4, 6]), np.array([10, 20]), ["a", "b"])
    c = TextLosses(np.array([3.0, 3.0]), np.array([2, 5]), np.array([10, 20]), ["a", "b"])
    rows = compare_text(t, c, same_tokenizer=False)
    # all: teacher 5 nats / 30 chars, candidate 6 / 30 -> delta 1/30 per char; teacher 30/10 chars per token
    a = rows["all"]
    assert a["loss_teacher_per_char"] == pytest.approx(5 / 30) and a["loss_candidate_per_char"] == pytest.approx(6 / 30)
    assert a["delta_per_char"] == pytest.approx(1 / 30)
    assert a["delta_per_teacher_token"] == pytest.approx(1 / 30 * 30 / 10)
    assert a["loss_candidate_per_token"] == pytest.approx(6 / 7)
    assert rows["a"]["delta_per_char"] == pytest.approx(0.1) and rows["b"]["delta_per_char"] == pytest.approx(0.0)
    lo, hi = a["delta_per_char_ci95"]
    assert lo < a["delta_per_char"] < hi


def test_scored_characters_are_counted_by_hand(tmp_path):
    from conftest import make_tokenizer, write_jsonl
    from uspx.workload import load_workload

    wl = load_workload(write_jsonl(tmp_path / "w.jsonl", [
        {"prompt": "def f(x):", "completion": " return x", "family": "code"},  # 9 characters scored
        {"text": "héllo", "family": "prose"},  # no completion: the 4 characters after the first token
    ]))
    bpe = _bpe(["return x", "def f(x):", "héllo"], 40)
    for tok in (make_tokenizer(), bpe):  # characters, and bytes (é is two byte tokens of the BPE)
        scored = encode_scored(wl, tok, 64)
        assert [s.chars for s in scored] == [9, 4] and scored[0].starts[0] == 0
    chars = encode_scored(wl, make_tokenizer(), 64)
    assert chars[0].starts == list(range(9))  # one character a token
    # "héllo" in bytes: h, é's two bytes, l, l, o; counted from the end of h, the targets start at 0 (é),
    # inside é (no offset), 1, 2, 3
    starts = encode_scored(wl, bpe, 64)[1].starts
    assert starts[0] == 0 and starts[1] < 0 and starts[2:] == [1, 2, 3]
    # 6 tokens at most: 1 of the prompt's, 5 of the completion's, whose characters are the 5 scored
    assert encode_scored(wl, make_tokenizer(), 6)[0].chars == 5


# ----- end to end -----------------------------------------------------------------------------------
ROWS = [{"prompt": f"def f{i}(x):", "completion": f" return x * {i} + {i % 3}", "family": "code",
         "split": "heldout" if i >= 10 else "calibration"} for i in range(13)]
# checks whose outcome no answer can change: any text matches the first, no 3-token answer the second
ROWS[10].update(regex="(?s).*", max_new_tokens=3)
ROWS[11].update(regex=r"\d{40}", max_new_tokens=3)


def _bpe(texts, vocab: int):
    """A byte-level BPE trained here: another tokenizer than the teacher's characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")


def _dense_base(path, tokenizer, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(tiny_gpt_oss_dir, tmp_path_factory):
    from conftest import write_jsonl
    from uspx.extract import extract

    tmp = tmp_path_factory.mktemp("dense")
    wl = write_jsonl(tmp / "w.jsonl", ROWS)
    extract(tiny_gpt_oss_dir, wl, tmp / "run", keep="50%", speed=False, progress=False)
    return tmp / "run"


def test_dense_student_with_another_tokenizer_end_to_end(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from uspx.cli import app

    bpe = _bpe([r["prompt"] + r["completion"] for r in ROWS], 300)  # 256 bytes and merges
    base = _dense_base(tmp_path / "tiny-llama", bpe, len(bpe))
    res = CliRunner().invoke(app, ["student", str(run), "--base", str(base), "--steps", "3", "--generated", "1",
                                   "--no-speed", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "dense.json").read_text())
    assert report["tokenizer"] == "different" and "ULD" in report["objectives"]
    assert report["history"]["step"] == 3
    # the teacher reads one character a token, so every BPE token starts where a teacher token does
    assert report["aligned_share"]["share"] == 1.0 and report["aligned_share"]["targets"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")  # stock loading, LoRA merged
    assert model.config.model_type == "llama" and not any("lora" in n for n in model.state_dict())
    assert AutoTokenizer.from_pretrained(tmp_path / "out" / "model").get_vocab() == bpe.get_vocab()
    # LoRA trained something: the merged weights differ from the base's
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert any(not torch.equal(before[n], t) for n, t in model.state_dict().items())
    rows = report["heldout"]
    assert {"dense base (not distilled)", "dense student", "pruned MoE"} <= set(rows)
    code = rows["dense student"]["code"]
    assert code["teacher_chars"] == code["candidate_chars"] == sum(len(r["completion"]) for r in ROWS[10:])
    assert not code["same_tokenizer"] and code["candidate_tokens"] < code["candidate_chars"]
    # the checked items are answered by each model with its own tokenizer and judged: one of two passes
    for name in ("dense base (not distilled)", "dense student", "pruned MoE"):
        row = report["tasks"][name]["code"]
        assert row["items"] == 2 and row["teacher"]["pass@1"] == row["candidate"]["pass@1"] == 0.5, name
    # the verdict checks each family's delta per token of the original against --epsilon (0.05)
    for name, fams in rows.items():
        per_teacher_token = {f: r["delta_per_char"] * r["teacher_chars"] / r["teacher_tokens"]
                             for f, r in fams.items() if f != "all"}
        assert fams["code"]["delta_per_teacher_token"] == pytest.approx(per_teacher_token["code"], rel=1e-9)
        expected = "pass" if all(d <= 0.05 for d in per_teacher_token.values()) else "fail"
        assert report["acceptance"][name]["verdict"] == expected, name


def test_dense_student_with_the_same_tokenizer_matches_eval(run, tmp_path):
    from conftest import make_tokenizer
    from uspx.recover import Settings
    from uspx.student.dense import dense_student

    base = _dense_base(tmp_path / "same", make_tokenizer(), 128)
    report = dense_student(run, base, settings=Settings(train="full", steps=2, generated=0, ce=1.0), speed=False,
                           progress=False)
    assert report["tokenizer"] == "same" and "token KD" in report["objectives"]
    assert report["aligned_share"]["share"] == 1.0
    # one tokenizer, completion items: the text delta per teacher token is uspx eval's delta per token
    ev = json.loads((run / "evaluation.json").read_text())
    pruned = report["heldout"]["pruned MoE"]["all"]
    assert pruned["same_tokenizer"]
    assert pruned["delta_per_teacher_token"] == pytest.approx(ev["overall"]["delta"], abs=1e-5)
    assert pruned["loss_teacher_per_token"] == pytest.approx(ev["overall"]["loss_teacher"], abs=1e-5)
    assert report["acceptance"]["pruned MoE"]["verdict"] == ev["acceptance"]["verdict"]  # the same epsilon, 0.05
    # a second call with the same settings reuses the export (no training)
    again = dense_student(run, base, settings=Settings(train="full", steps=2, generated=0, ce=1.0), speed=False,
                          progress=False)
    assert again["history"] == report["history"]


def test_bad_input_is_refused_clearly(run, tmp_path):
    from typer.testing import CliRunner

    from uspx.cli import app
    from uspx.recover import Settings
    from uspx.student.dense import dense_student

    with pytest.raises(UspxError, match="config.json"):
        dense_student(run, tmp_path / "nothing", progress=False)
    with pytest.raises(UspxError, match="CUDA GPU" if not torch.cuda.is_available() else "bitsandbytes|GPU"):
        dense_student(run, tmp_path / "nothing", four_bit=True, progress=False)
    with pytest.raises(UspxError, match="lora or full"):
        dense_student(run, tmp_path / "nothing", settings=Settings(train="router"), progress=False)
    res = CliRunner().invoke(app, ["student", str(run), "-m", "2", "--base", str(tmp_path)])
    assert res.exit_code != 0 and "exactly one of" in str(res.exception)

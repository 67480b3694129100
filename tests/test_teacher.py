"""Tests of the bundled teacher, its workloads, and its build code in teacher/ (fast, CPU)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from teacher.corpus import (
    SPLITS,
    Doc,
    arith_document,
    arith_line,
    parse_arith_line,
    shell_script_docs,
    split_docs,
    split_of,
    write,
)
from teacher.workloads import REQUIRED_FIELDS, SPLIT_VALUES, WORKLOADS
from uspx.models.loading import BUNDLED_TEACHER as TEACHER_DIR
from uspx.workload import BUNDLED_WORKLOADS as WORKLOADS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

FAMILIES = {"python", "shell", "prose", "arith"}


# --------------------------------------------------------------------------- corpus


def test_split_puts_each_document_in_exactly_one_split() -> None:
    docs = [Doc("python", f"s{i}", f"document number {i}\n" * (1 + i % 7)) for i in range(2000)]
    docs += docs[:50]  # exact duplicates must be dropped, not split
    splits = split_docs(docs)
    assert set(splits) == set(SPLITS)
    texts = [d.text for s in SPLITS for d in splits[s]]
    assert len(texts) == len(set(texts)) == 2000
    for s in SPLITS:
        for d in splits[s]:
            assert split_of(d.text) == s  # deterministic: a pure function of the content
    # every split is used, and train is the largest
    sizes = {s: len(splits[s]) for s in SPLITS}
    assert all(sizes.values()) and sizes["train"] > sizes["test"] and sizes["train"] > sizes["validation"]


def test_split_does_not_depend_on_order() -> None:
    docs = [Doc("prose", f"s{i}", f"text {i}") for i in range(300)]
    a = split_docs(docs)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    b = split_docs(shuffled)
    for s in SPLITS:
        assert {d.text for d in a[s]} == {d.text for d in b[s]}


def test_arith_results_are_exact() -> None:
    rng = random.Random(123)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    seen = set()
    for _ in range(2000):
        a, op, b, c = parse_arith_line(arith_line(rng))
        assert c == ops[op](a, b)
        seen.add(op)
    assert seen == set(ops)
    for line in arith_document(7).splitlines():
        a, op, b, c = parse_arith_line(line)
        assert c == ops[op](a, b)
    assert arith_document(7) == arith_document(7)  # reproducible from its seed
    with pytest.raises(ValueError):
        parse_arith_line("1 + 1 = two")


def test_shell_scripts_come_only_from_listed_package_files(tmp_path) -> None:
    body = "echo hello\n" * 40
    (tmp_path / "a.sh").write_text("#!/bin/sh\n" + body)
    (tmp_path / "b").write_text("#!/usr/bin/env bash\n" + body)
    (tmp_path / "c.py").write_text("#!/usr/bin/python3\n" + body)  # not a shell
    (tmp_path / "tiny").write_text("#!/bin/sh\necho\n")  # below the minimum size
    (tmp_path / "link").symlink_to(tmp_path / "a.sh")  # would duplicate a.sh
    (tmp_path / "unlisted.sh").write_text("#!/bin/sh\n" + body)  # on disk, in no package
    files = {"pkg": sorted(tmp_path / n for n in ("a.sh", "b", "c.py", "tiny", "link"))}
    docs = shell_script_docs(files, roots=(str(tmp_path),))
    assert sorted(d.source for d in docs) == [f"script:pkg:{tmp_path / 'a.sh'}", f"script:pkg:{tmp_path / 'b'}"]
    assert shell_script_docs(files, roots=("/nowhere/",)) == []


def test_training_resumes_bit_identically(tmp_path) -> None:
    """A run paused and resumed from its checkpoint ends with the same weights as one that never stopped."""
    from teacher import train

    rng = random.Random(0)
    docs = {
        "python": "def f(x):\n    return x + 1\n\n" * 30,
        "shell": "ls -la /tmp | grep foo && echo done\n" * 30,
        "prose": "The quick brown fox jumps over the lazy dog. " * 30,
        "arith": "\n".join(arith_line(rng) for _ in range(60)) + "\n",
    }
    corpus = tmp_path / "corpus"
    write({s: [Doc(f, f"{s}:{f}", f"{s}\n" + t) for f, t in docs.items()] for s in SPLITS}, corpus)
    common = ["--corpus", str(corpus), "--tokenizer", str(TEACHER_DIR), "--steps", "6", "--batch", "2",
              "--seq-len", "32", "--warmup", "2", "--save-every", "100", "--eval-every", "2",
              "--threads", "1", "--no-export"]
    old = torch.get_num_threads()
    try:
        assert train.main([*common, "--work", str(tmp_path / "straight")]) == 0
        assert train.main([*common, "--work", str(tmp_path / "paused"), "--pause-at", "3"]) == 3
        assert json.loads((tmp_path / "paused" / "latest.json").read_text())["step"] == 3
        assert train.main([*common, "--work", str(tmp_path / "paused")]) == 0
    finally:
        torch.set_num_threads(old)
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((tmp_path / "paused" / "summary.json").read_text())
    assert a["steps"] == b["steps"] == 6
    assert a["weights_fp32_sha256"] == b["weights_fp32_sha256"]
    assert a["final_valid"] == b["final_valid"]

    def log(run: str) -> list[tuple]:
        rows = [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["valid"]) for r in rows]

    assert [r[0] for r in log("straight")] == [2, 4, 6]
    assert log("paused") == log("straight")  # no step logged twice, same values
    # and the weights did move: the digest is not that of the initial model
    init = train.build_model(train.teacher_config(4096, 0), 0)
    assert a["weights_fp32_sha256"] != train._weights_sha(init)


# --------------------------------------------------------------------------- workloads


def _rows(name: str) -> list[dict]:
    path = WORKLOADS_DIR / f"{name}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_parses(name: str) -> None:
    rows = _rows(name)
    for r in rows:
        for k in REQUIRED_FIELDS:
            assert k in r, (name, k)
        assert isinstance(r["prompt"], str) and r["prompt"]
        assert isinstance(r["completion"], str) and r["completion"]
        assert r["split"] in SPLIT_VALUES
        assert r["family"] in FAMILIES
    cal = {r["id"] for r in rows if r["split"] == "calibration"}
    held = {r["id"] for r in rows if r["split"] == "heldout"}
    assert len(cal) >= 100 and len(held) >= 50
    assert not cal & held
    assert len(cal) + len(held) == len(rows)  # ids unique
    # calibration and held-out items come from different documents
    src_cal = {r["source"] for r in rows if r["split"] == "calibration"}
    src_held = {r["source"] for r in rows if r["split"] == "heldout"}
    assert not src_cal & src_held
    families, _ = WORKLOADS[name]
    assert {r["family"] for r in rows} == set(families)


def test_user_heldout_sets_do_not_overlap_mixed() -> None:
    mixed = {r["prompt"] for r in _rows("mixed")}
    for name in ("python_dev", "shell_user", "docs_writer"):
        held = {r["prompt"] for r in _rows(name) if r["split"] == "heldout"}
        assert not held & mixed


# --------------------------------------------------------------------------- teacher


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One thread: on a shared 2-core machine a 2-thread forward is several
    # times slower (OpenMP oversubscription). Restore the setting afterwards.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(TEACHER_DIR), dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(TEACHER_DIR))
    yield model, tok
    torch.set_num_threads(old)


def test_teacher_files_are_small_safetensors() -> None:
    assert (TEACHER_DIR / "config.json").exists()
    w = TEACHER_DIR / "model.safetensors"
    assert w.exists() and w.stat().st_size <= 25_000_000
    assert not list(TEACHER_DIR.glob("*.bin")) and not list(TEACHER_DIR.glob("*.pt"))


def test_teacher_is_stock_gpt_oss(teacher) -> None:
    from transformers import GptOssForCausalLM

    model, tok = teacher
    assert isinstance(model, GptOssForCausalLM)
    cfg = model.config
    assert cfg.model_type == "gpt_oss"
    assert cfg.num_local_experts >= 12 and cfg.num_experts_per_tok >= 2
    assert len(tok) == cfg.vocab_size
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id is not None
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok(text)["input_ids"]) == text


@torch.no_grad()
def test_teacher_loss_far_below_uniform(teacher) -> None:
    model, tok = teacher
    for name in ("python_dev", "shell_user", "docs_writer"):
        items = [r for r in _rows(name) if r["split"] == "heldout"][:3]
        enc = [(tok(it["prompt"], add_special_tokens=False)["input_ids"],
                tok(it["completion"], add_special_tokens=False)["input_ids"]) for it in items]
        # One right-padded batch: causal attention keeps pads invisible to real tokens.
        T = max(len(p) + len(c) for p, c in enc)
        x = torch.full((len(enc), T), tok.pad_token_id)
        for r, (p, c) in enumerate(enc):
            x[r, : len(p) + len(c)] = torch.tensor(p + c)
        logits = model(input_ids=x, use_cache=False).logits
        tot, n = 0.0, 0
        for r, (p, c) in enumerate(enc):
            lg = logits[r, len(p) - 1 : len(p) + len(c) - 1]
            tot += float(torch.nn.functional.cross_entropy(lg, torch.tensor(c), reduction="sum"))
            n += len(c)
        # ln(vocab) is what a model that knows nothing would score; a trained
        # teacher must be far below it (an independent bound, not a snapshot).
        assert tot / n < 0.6 * math.log(model.config.vocab_size), (name, tot / n)


@torch.no_grad()
def test_router_bias_restriction_is_exact(teacher) -> None:
    """Banning experts with a -inf router bias never routes to them (the report relies on it)."""
    model, tok = teacher
    x = torch.tensor([tok("import os\nprint(os.getcwd())\n")["input_ids"]])
    router = model.model.layers[0].mlp.router
    old = router.bias.data.clone()
    try:
        router.bias.data[: model.config.num_local_experts // 2] = float("-inf")
        out = model(input_ids=x, output_router_logits=True)
        idx = out.router_logits[0].topk(model.config.num_experts_per_tok, dim=-1).indices
        assert int(idx.min()) >= model.config.num_local_experts // 2
        assert torch.isfinite(out.logits).all()
    finally:
        router.bias.data.copy_(old)


# --------------------------------------------------------------------------- teacher losses


class _FixedLogits(torch.nn.Module):
    """A stand-in model predicting p = [1/4, 3/4] over a two-token vocabulary at every position."""

    def forward(self, input_ids, **_):
        logits = torch.tensor([0.0, math.log(3.0)]).expand(*input_ids.shape, 2)
        return type("Out", (), {"logits": logits})()


class _CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - ord("a") for c in text]}


def test_teacher_training_loss_is_mean_next_token_cross_entropy() -> None:
    from teacher.train import lm_loss

    # targets are x[:, 1:] = 1, 0: -log(3/4) and -log(1/4)
    loss, aux = lm_loss(_FixedLogits(), torch.tensor([[1, 1, 0]]), with_router=False)
    assert aux is None
    assert float(loss) == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, abs=1e-6)


def test_teacher_report_scores_completion_tokens_only() -> None:
    from teacher.report import completion_ce

    # "ab" + "b": one completion target (id 1); "a" + "aa": two (id 0); prompts never count
    items = [{"prompt": "ab", "completion": "b"}, {"prompt": "a", "completion": "aa"}]
    got = completion_ce(_FixedLogits(), _CharTokenizer(), items)
    assert got == pytest.approx((math.log(4 / 3) + 2 * math.log(4)) / 3, abs=1e-6)

"""Export (prune) and evaluation: exports reload with stock transformers and match the restriction;
evaluation numbers match a hand computation; bad input is refused with the file named."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tokenizer, save_tiny, write_jsonl
from uspx.io import UspxError
from uspx.models import adapter_for, load_model
from uspx.prune import RECORD, export, restrict_model
from uspx.testing import tiny_model

UNIFORM = {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}
UNEVEN = {0: [0, 2, 4, 6, 7], 1: [1, 3]}  # top-k is 2 in the tiny configs


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n: int = 3, length: int = 20) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 97, (1, length), generator=g) for _ in range(n)]


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return torch.cat([model(input_ids=x).logits for x in ids], dim=1)


def _stock(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return {k: v for k, v in json.loads(raw[8 : 8 + n]).items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_tiny("gpt_oss", tmp_path_factory.mktemp("gpt_oss"))


# ----- export ------------------------------------------------------------------------------------
def test_export_matches_restriction_and_a_hand_made_bias_mask(src, tmp_path):
    record = export(src, UNIFORM, tmp_path / "out")
    assert record["verification"]["max_abs_logit_diff"] <= 1e-4
    assert json.loads((tmp_path / "out" / RECORD).read_text())["kept"] == {"0": [0, 2, 4, 6], "1": [1, 3, 5, 7]}
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json", RECORD}
    assert not list((tmp_path / "out").glob("*.bin"))

    exported = _stock(tmp_path / "out")
    assert exported.config.num_local_experts == 4
    original = load_model(src, with_tokenizer=False).model
    ids = _ids()
    full = _logits(original, ids)
    with restrict_model(original, UNIFORM):
        restricted = _logits(original, ids)
    # Independent of uspx: ban experts by setting gpt_oss's router bias to -inf by hand.
    with torch.no_grad():
        for i, layer in enumerate(original.model.layers):
            banned = [e for e in range(8) if e not in UNIFORM[i]]
            layer.mlp.router.bias[banned] = float("-inf")
    by_hand = _logits(original, ids)
    small = _logits(exported, ids)
    assert (restricted - full).abs().max() > 1e-3  # the restriction does change the model
    assert (by_hand - restricted).abs().max() <= 1e-5
    assert (small - by_hand).abs().max() <= 1e-5


def test_export_mixtral_layout(tmp_path):
    src = save_tiny("mixtral", tmp_path / "src")
    record = export(src, UNIFORM, tmp_path / "out")
    assert record["verification"]["max_abs_logit_diff"] <= 1e-4
    original, exported = load_model(src, with_tokenizer=False).model, _stock(tmp_path / "out")
    assert exported.config.num_local_experts == 4
    ids = _ids(2)
    with restrict_model(original, UNIFORM):
        restricted = _logits(original, ids)
    assert (_logits(exported, ids) - restricted).abs().max() <= 1e-5
    with pytest.raises(UspxError, match="non-uniform"):  # no router bias to disable padded experts
        export(src, UNEVEN, tmp_path / "uneven")
    assert not (tmp_path / "uneven").exists()


def test_non_uniform_export_is_padded_with_dead_experts(src, tmp_path):
    record = export(src, UNEVEN, tmp_path / "out")
    assert record["padding"] == {"1": [0, 2, 4]}  # layer 1 filled up to 5 with never-routed experts
    exported = _stock(tmp_path / "out")
    assert exported.config.num_local_experts == 5
    bias = exported.model.layers[1].mlp.router.bias
    assert torch.isinf(bias).sum() == 3 and torch.isfinite(bias[[1, 3]]).all()  # slots 0,2,4 dead
    original = load_model(src, with_tokenizer=False).model
    ids = _ids()
    with restrict_model(original, UNEVEN):
        restricted = _logits(original, ids)
    assert (_logits(exported, ids) - restricted).abs().max() <= 1e-5


def test_same_shape_export_disables_banned_experts(src, tmp_path):
    record = export(src, {1: [1, 3]}, tmp_path / "out", physical=False)  # layer 0 keeps all
    exported = _stock(tmp_path / "out")
    assert exported.config.num_local_experts == 8 and record["padding"] == {"1": [0, 2, 4, 5, 6, 7]}
    original = load_model(src, with_tokenizer=False).model
    with restrict_model(original, {1: [1, 3]}):
        restricted = _logits(original, _ids())
    assert (_logits(exported, _ids()) - restricted).abs().max() <= 1e-5


def test_bf16_source_stays_bf16(tmp_path):
    model = tiny_model("gpt_oss", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    record = export(tmp_path / "src", UNIFORM, tmp_path / "out")
    assert record["dtype"] == "bfloat16"
    header = _header(tmp_path / "out" / "model.safetensors")
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    from safetensors.torch import load_file

    kept = load_file(tmp_path / "out" / "model.safetensors")["model.layers.1.mlp.experts.down_proj"]
    assert torch.equal(kept, model.model.layers[1].mlp.experts.down_proj[[1, 3, 5, 7]])  # bit for bit
    # the config is the source's but for the count: a stock load comes back in bf16, not fp32
    src_cfg, out_cfg = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("src", "out"))
    assert out_cfg.pop("num_local_experts") == 4 and src_cfg.pop("num_local_experts") == 8
    assert out_cfg == src_cfg
    from transformers import AutoModelForCausalLM

    assert next(AutoModelForCausalLM.from_pretrained(tmp_path / "out").parameters()).dtype == torch.bfloat16


def test_failed_export_leaves_nothing(src, tmp_path, monkeypatch):
    import uspx.prune.slicing as slicing

    def broken_write(path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(slicing, "write_safetensors", broken_write)
    with pytest.raises(OSError, match="disk full"):
        export(src, UNIFORM, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary folder


def test_failed_verification_fails_and_keeps_the_users_folder(src, tmp_path, monkeypatch):
    """A wrong byte in a kept expert fails the export; an occupied -o is refused, nothing deleted."""
    import uspx.prune.slicing as slicing

    real = slicing.write_safetensors

    def corrupting(path, specs, produce, *a, **k):
        def bad(spec):
            for chunk in produce(spec):
                if spec.name.endswith("experts.down_proj"):
                    chunk = chunk.clone()
                    chunk.view(-1)[0] += 1.0
                yield chunk
        return real(path, specs, bad, *a, **k)

    monkeypatch.setattr(slicing, "write_safetensors", corrupting)
    with pytest.raises(UspxError, match="verification failed"):
        export(src, UNIFORM, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(slicing, "write_safetensors", real)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UspxError, match="refusing to overwrite"):
        export(src, UNIFORM, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1


def test_occupied_folder_is_refused_and_same_export_is_up_to_date(src, tmp_path):
    other = save_tiny("gpt_oss", tmp_path / "other", seed=1)
    with pytest.raises(UspxError, match="already holds another model"):
        export(src, UNIFORM, other)
    export(src, UNIFORM, tmp_path / "out")
    assert export(src, UNIFORM, tmp_path / "out")["status"] == "up-to-date"
    with pytest.raises(UspxError, match="different export"):
        export(src, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, tmp_path / "out")
    assert json.loads((tmp_path / "out" / RECORD).read_text())["kept"]["0"] == [0, 2, 4, 6]


def test_size_prediction_is_checked(src, tmp_path):
    with pytest.raises(UspxError, match=r"take \d+ bytes on disk but 1000 were predicted"):
        export(src, UNIFORM, tmp_path / "bad", predicted_bytes=1000)
    assert not (tmp_path / "bad").exists()
    # exact prediction: fixed parameters + 4 kept experts per layer, fp32
    adapter = adapter_for(load_model(src, with_tokenizer=False).model)
    predicted = adapter.other_bytes() + sum(4 * adapter.bytes_per_expert(l) for l in adapter.layers)
    record = export(src, UNIFORM, tmp_path / "ok", predicted_bytes=predicted)
    assert abs(record["size"]["relative_error"]) < 1e-9
    # the same prediction from a plan file (its KV cache and reserve are not weights)
    from uspx.plan import Plan

    plan = Plan(kept={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, method="uniform", uniform=True, top_k=2, num_experts=8,
                predicted_bytes=predicted + 5000, sizes={"kv_cache": 4000, "reserve": 1000})
    plan.save(tmp_path / "plan.json")
    record = export(src, tmp_path / "plan.json", tmp_path / "from_plan")
    assert record["plan"] == str(tmp_path / "plan.json") and record["size"]["predicted_bytes"] == predicted


def test_bad_input_is_named(src, tmp_path):
    broken = save_tiny("gpt_oss", tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(UspxError, match="model.safetensors: truncated"):
        export(broken, UNIFORM, tmp_path / "a")
    plan = tmp_path / "plan.json"
    plan.write_text('{"format": "uspx-plan/1", "kept": ')
    with pytest.raises(UspxError, match="plan.json: not valid JSON"):
        export(src, plan, tmp_path / "b")
    with pytest.raises(UspxError, match="fewer than top-k"):
        export(src, {0: [0], 1: [0, 1]}, tmp_path / "c")
    with pytest.raises(UspxError, match="model.safetensors: truncated"):
        evaluate(src, broken, tmp_path / "w.jsonl")
    assert not any((tmp_path / n).exists() for n in "abc")


# ----- evaluation --------------------------------------------------------------------------------
from uspx.evaluate import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> Path:
    rows = [
        {"prompt": f"def f{i}(x):", "completion": f" return x * {i} + {i + 1}", "family": "code", "split": "heldout"}
        for i in range(5)
    ] + [
        {"text": f"the quick brown fox {i} jumps over the dog", "family": "prose", "split": "heldout"} for i in range(4)
    ] + [{"prompt": "calibration only", "completion": " x", "family": "code", "split": "calibration"}]
    return write_jsonl(tmp_path_factory.mktemp("w") / "w.jsonl", rows)


@torch.no_grad()
def _by_hand(src: Path, workload: Path, kept: dict) -> dict:
    """Per family: token-pooled loss of teacher and candidate, top-1 agreement and KL, item by item,
    with the restriction made by hand (router bias -inf) and plain torch cross-entropy."""
    tok = make_tokenizer()
    teacher = load_model(src, with_tokenizer=False).model
    cand = load_model(src, with_tokenizer=False).model
    for i, layer in enumerate(cand.model.layers):
        layer.mlp.router.bias[[e for e in range(8) if e not in kept[i]]] = float("-inf")
    acc: dict = {}
    for row in map(json.loads, workload.read_text().splitlines()):
        if row["split"] != "heldout":
            continue
        prompt = tok.encode(row.get("prompt", row.get("text")), add_special_tokens=False)
        comp = tok.encode(row["completion"], add_special_tokens=False) if "completion" in row else []
        ids = torch.tensor([prompt + comp])
        first = len(prompt) if comp else 1  # first scored token
        lt = teacher(input_ids=ids).logits[0, first - 1 : -1]
        lc = cand(input_ids=ids).logits[0, first - 1 : -1]
        y = ids[0, first:]
        a = acc.setdefault(row["family"], dict(t=0.0, c=0.0, agree=0, kl=0.0, n=0))
        a["t"] += F.cross_entropy(lt, y, reduction="sum").item()
        a["c"] += F.cross_entropy(lc, y, reduction="sum").item()
        a["agree"] += int((lt.argmax(-1) == lc.argmax(-1)).sum())
        a["kl"] += F.kl_div(F.log_softmax(lc, -1), F.log_softmax(lt, -1), log_target=True, reduction="sum").item()
        a["n"] += len(y)
    return {f: dict(loss_teacher=a["t"] / a["n"], delta=(a["c"] - a["t"]) / a["n"], top1_agreement=a["agree"] / a["n"],
                    kl=a["kl"] / a["n"], tokens=a["n"]) for f, a in acc.items()}


def test_evaluation_matches_hand_computation(src, workload, tmp_path):
    kept = {0: [0, 1, 2], 1: [2, 3, 4, 5]}
    result = evaluate(src, None, workload, kept=kept, speed=False, batch_size=4, out=tmp_path)
    assert json.loads((tmp_path / "evaluation.json").read_text())["families"] == result["families"]
    expected = _by_hand(src, workload, kept)
    assert set(result["families"]) == set(expected) == {"code", "prose"}
    for family, want in expected.items():
        got = result["families"][family]
        assert got["tokens"] == want["tokens"]
        for key in ("loss_teacher", "delta", "top1_agreement", "kl"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (family, key)
        assert got["perplexity_ratio"] == pytest.approx(torch.tensor(want["delta"]).exp().item(), rel=1e-5)
    assert result["candidate"]["kind"] == "restricted"


def test_teacher_against_itself_passes(src, workload):
    result = evaluate(src, src, workload, decode_tokens=4, memory_budget="1GiB", epsilon=0.0)
    for row in result["families"].values():
        assert row["delta"] == 0 and row["top1_agreement"] == 1 and row["kl"] == 0
    assert result["acceptance"]["verdict"] == "pass"
    assert result["memory"]["fits"] and result["size"]["ratio"] == 1
    assert result["speed"]["teacher"]["decode_tokens_per_s"] > 0 and result["speed"]["candidate"]["prefill_tokens_per_s"] > 0


def test_bad_kept_set_fails_and_export_evaluates_like_its_restriction(src, workload, tmp_path):
    kept = {0: [0, 1], 1: [6, 7]}
    restricted = evaluate(src, None, workload, kept=kept, speed=False, epsilon={"*": 1e-3})
    assert restricted["acceptance"]["verdict"] == "fail"
    assert any(">" in r for r in restricted["acceptance"]["reasons"])
    export(src, kept, tmp_path / "out")
    exported = evaluate(src, tmp_path / "out", workload, speed=False, epsilon=1e-3, memory_budget=10)
    assert exported["candidate"]["kind"] == "export"
    for f, row in exported["families"].items():
        assert row["delta"] == pytest.approx(restricted["families"][f]["delta"], abs=1e-5)
    assert exported["memory"]["fits"] is False and exported["acceptance"]["verdict"] == "fail"
    assert exported["size"]["candidate"]["parameter_bytes"] == restricted["size"]["candidate"]["parameter_bytes"]
    with pytest.raises(UspxError, match="fewer than top-k"):
        evaluate(src, None, workload, kept={0: [0]}, speed=False)
    other = save_tiny("gpt_oss", tmp_path / "other", seed=1)
    with pytest.raises(UspxError, match="exported from another model"):
        evaluate(other, tmp_path / "out", workload, speed=False)

"""uspx channels / uspx heads end to end (uspx.narrow): the narrowed checkpoint is written, and its
recorded held-out delta is the one transformers' own forwards give on the held-out items."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tokenizer, save_tiny
from uspx.io import read_json
from uspx.models import adapter_for
from uspx.narrow import export_channels, export_heads
from uspx.prune.export import RECORD
from uspx.workload import default_max_length, encode, load_workload


def _target_nll(folder, items) -> tuple[float, int]:
    """Summed next-token cross-entropy on the targets, from the spec: token j of an item with
    completion start s is a target for max(s, 1) <= j <= n - 1, predicted at position j - 1."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in items:
            ids = torch.tensor([e.input_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for j in range(max(e.completion_start, 1), len(e.input_ids)):
                total -= float(logp[j - 1, e.input_ids[j]])
                count += 1
    return total, count


def _heldout_delta(original, narrowed, workload) -> dict[str, float]:
    wl = load_workload(workload)
    items = encode(wl.part("heldout"), make_tokenizer(), default_max_length())
    out = {}
    for fam in sorted({e.family for e in items}) + ["all"]:
        chosen = [e for e in items if fam in ("all", e.family)]
        (t, n), (c, _) = _target_nll(original, chosen), _target_nll(narrowed, chosen)
        out[fam] = (c - t) / n
    return out


@pytest.mark.parametrize("command", ["channels", "heads"])
def test_narrowed_export_records_the_heldout_delta(command, tmp_path, small_workload, one_thread):
    src = save_tiny("qwen3_moe", tmp_path / "m")
    out = tmp_path / "out"
    if command == "channels":
        rec = export_channels(src, small_workload, out, width="50%")
        written = adapter_for(AutoModelForCausalLM.from_pretrained(out)).expert_width()
        assert (rec["width"], written) == (rec["original_width"] // 2, rec["original_width"] // 2)
    else:
        rec = export_heads(src, small_workload, out, groups="50%")
        _, kv, _ = adapter_for(AutoModelForCausalLM.from_pretrained(out)).head_shape()
        assert (rec["kv_groups"], kv) == (rec["original_kv_groups"] // 2, rec["original_kv_groups"] // 2)
    want = _heldout_delta(src, out, small_workload)
    assert set(rec["heldout"]) == set(want)
    for fam, delta in want.items():
        assert rec["heldout"][fam] == pytest.approx(delta, abs=1e-4)
    assert read_json(out / RECORD)["heldout"] == rec["heldout"]


def test_prune_records_what_the_callers_measure_returns(tmp_path, one_thread):
    """Pruning never evaluates: the held-out measure is the caller's, called on the written folder."""
    from uspx.models import load_model
    from uspx.prune.channels import masked, narrowed, save_verified

    lm = load_model(save_tiny("qwen3_moe", tmp_path / "m"))
    adapter = adapter_for(lm.model)
    kept = {layer.index: torch.arange(adapter.expert_width() // 2).repeat(adapter.num_experts, 1)
            for layer in adapter.layers}
    seen = []
    rec = save_verified(lm, narrowed(lm.model, kept), masked(lm.model, kept),
                        lambda folder: seen.append(folder) or {"all": 0.25}, tmp_path / "out", {"format": "x"})
    assert seen == [tmp_path / "out"] and rec["heldout"] == {"all": 0.25}
    assert read_json(tmp_path / "out" / RECORD)["heldout"] == {"all": 0.25}

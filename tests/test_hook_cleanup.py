"""Unit scoring, super-weight calibration and analysis capture attach their forward hooks through
uspx.engine.hooks: a forward that fails part-way leaves no hook on the model."""

from __future__ import annotations

import pytest

from uspx.models import adapter_for
from uspx.testing import tiny_model
from uspx.workload import EncodedItem


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _items(bad: bool) -> list[EncodedItem]:
    ids = [3, 4, 5, 6, 7, 8]
    good = EncodedItem(0, "a", "f", "calibration", ids, 0)
    # a token id past the tiny vocabulary (128) makes the embedding raise after the hooks are on
    return [good, EncodedItem(1, "b", "f", "calibration", [3, 4, 999], 0)] if bad else [good]


@pytest.mark.parametrize("units", [["channels"], ["heads"], ["channels", "heads"]])
def test_unit_contributions_remove_their_hooks(units):
    from uspx.score.units import contribution_sums

    model = tiny_model("qwen2_moe")  # expert, shared-expert (gated) and attention hooks
    before = _hooks(model)
    contribution_sums(model, _items(False), units, bootstrap=0)
    assert _hooks(model) == before
    with pytest.raises(IndexError):
        contribution_sums(model, _items(True), units, bootstrap=0, batch_size=1)
    assert _hooks(model) == before


def test_superweight_calibration_removes_its_hooks():
    from uspx.superweights.detect import _calibration_pass
    from uspx.superweights.passes import make_slice

    model = tiny_model("mixtral")
    before = _hooks(model)
    with pytest.raises(IndexError):
        _calibration_pass(model, adapter_for(model), make_slice("c", _items(True), 1, 0))
    assert _hooks(model) == before


def test_analysis_capture_removes_its_hooks():
    from types import SimpleNamespace

    from uspx.analyze.collect import capture
    from uspx.testing import char_tokenizer

    model = tiny_model("mixtral")
    lm = SimpleNamespace(model=model, tokenizer=char_tokenizer())
    before = _hooks(model)
    got = capture(lm, adapter_for(model), _items(False))
    assert got.attn_out is not None and got.attn_out.shape[:2] == (6, 2)
    assert _hooks(model) == before
    with pytest.raises(IndexError):
        capture(lm, adapter_for(model), _items(True), batch_size=1)
    assert _hooks(model) == before

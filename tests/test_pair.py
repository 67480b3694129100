"""Two models in lockstep (uspx.engine.pair): whole or layer by layer, both give the KL and losses
that transformers' own forwards of the two models give, and a fit sees the original layer's output
as its target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny
from uspx.engine import FromCheckpoint, InMemory, make_batches
from uspx.engine.pair import LayerStep, PairObserver, run_pair
from uspx.models import adapter_for
from uspx.testing import tiny_model
from uspx.workload import EncodedItem



def kept_of(adapter) -> dict[int, list[int]]:
    return {layer.index: [0, 2, 5][: max(layer.top_k, 3)] for layer in adapter.layers}


def _items(n: int = 5) -> list[EncodedItem]:
    gen = torch.Generator().manual_seed(3)
    items = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(2, 90, (length,), generator=gen).tolist()
        items.append(EncodedItem(i, f"i{i}", "f", "calibration", ids, 2))
    return items


class KL(PairObserver):
    def __init__(self):
        self.kl: list[torch.Tensor] = []

    def pair_logits(self, batch, teacher, candidate, start=0):
        self.kl.append(F.kl_div(F.log_softmax(candidate, -1), F.log_softmax(teacher, -1), log_target=True,
                                reduction="none").sum(-1))


def _reference_kl(teacher, candidate, items) -> float:
    """Per-item forwards of both models by transformers, KL(teacher || candidate) at every target."""
    total, n = 0.0, 0
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([item.input_ids])
            lt = F.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
            with adapter_for(candidate).restrict(kept_of(adapter_for(candidate))):
                lc = F.log_softmax(candidate(input_ids=ids).logits[0].float(), -1)
            span = slice(item.completion_start - 1, len(item.input_ids) - 1)
            total += float((lt.exp() * (lt - lc)).sum(-1)[span].sum())
            n += len(item.input_ids) - item.completion_start
    return total / n


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_pair_kl_whole_and_layer_by_layer_equal_transformers(family, tmp_path, one_thread):
    folder = save_tiny(family, tmp_path / family)
    teacher, candidate = tiny_model(family), tiny_model(family)
    items = _items()
    reference = _reference_kl(teacher, candidate, items)
    assert reference > 1e-4  # the restriction changes the predictions: the check has something to see

    batches = make_batches(items, 2)
    results = {}
    for name, (t, c) in {"whole": (InMemory(teacher), InMemory(candidate)),
                         "layers": (FromCheckpoint(folder, torch.float32), FromCheckpoint(folder, torch.float32)),
                         "mixed": (InMemory(teacher), FromCheckpoint(folder, torch.float32))}.items():
        kl = KL()
        run_pair(t, c, batches, [kl], candidate_context=lambda c=c: c.adapter.restrict(kept_of(c.adapter)), progress=False)
        values = torch.cat(kl.kl)
        results[name] = float(values.sum()) / len(values)
    for name, value in results.items():
        assert value == pytest.approx(reference, abs=1e-5), name


def test_a_fit_sees_the_original_layers_output_and_changes_what_follows(tmp_path, one_thread):
    folder = save_tiny("qwen3_moe", tmp_path / "m")
    teacher = tiny_model("qwen3_moe")
    items = _items(3)
    batches = make_batches(items, 3)
    seen: dict[int, float] = {}

    def fit(step: LayerStep) -> None:
        # the targets are the original layer's output on the original's own stream: check against
        # a forward of transformers' model with output_hidden_states
        with torch.no_grad():
            for b in step.batches:
                out = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
                want = out.hidden_states[step.index + 1]
                real = b.attention_mask.bool()
                if step.index + 1 < len(out.hidden_states) - 1:  # the last entry has the final norm applied
                    seen[step.index] = float((step.targets(b)[real] - want[real]).abs().max())

    run_pair(FromCheckpoint(folder, torch.float32), FromCheckpoint(folder, torch.float32), batches, fit=fit,
             progress=False)
    assert seen and max(seen.values()) < 1e-4

    def scale_down(step: LayerStep) -> None:  # a "fit" that changes the candidate layer
        with torch.no_grad():
            for p in step.layer.parameters():
                p.mul_(0.5)

    kl = KL()
    run_pair(FromCheckpoint(folder, torch.float32), FromCheckpoint(folder, torch.float32), batches, [kl],
             fit=scale_down, progress=False)
    assert float(torch.cat(kl.kl).mean()) > 1e-3  # the candidate ran the changed layers


def test_a_killed_pair_run_resumes_to_the_same_result(tmp_path, one_thread, monkeypatch):
    folder = save_tiny("qwen3_moe", tmp_path / "m")
    batches = make_batches(_items(), 2)
    restrict = lambda c: (lambda: c.adapter.restrict(kept_of(c.adapter)))  # noqa: E731
    full = KL()
    t, c = FromCheckpoint(folder, torch.float32), FromCheckpoint(folder, torch.float32)
    run_pair(t, c, batches, [full], candidate_context=restrict(c), progress=False)

    calls = {"n": 0}

    def dies_at_layer_1(step: LayerStep) -> None:
        calls["n"] += 1
        if step.index == 1:
            raise KeyboardInterrupt

    t, c = FromCheckpoint(folder, torch.float32), FromCheckpoint(folder, torch.float32)
    with pytest.raises(KeyboardInterrupt):
        run_pair(t, c, batches, [KL()], fit=dies_at_layer_1, candidate_context=restrict(c),
                 state_dir=tmp_path / "state", state_key="k", progress=False)
    resumed = KL()
    t, c = FromCheckpoint(folder, torch.float32), FromCheckpoint(folder, torch.float32)
    done = run_pair(t, c, batches, [resumed], fit=lambda step: None, candidate_context=restrict(c),
                    state_dir=tmp_path / "state", state_key="k", progress=False)
    assert done == t.n_layers - 1  # layer 0 was not run again
    np.testing.assert_allclose(torch.cat(resumed.kl).numpy(), torch.cat(full.kl).numpy(), atol=1e-6)

"""The losses module against hand computations and torch.nn.functional's own definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from uspx.engine import losses
from uspx.workload import EncodedItem


def _item(n: int, start: int) -> EncodedItem:
    return EncodedItem(index=0, id="x", family="f", split="calibration", input_ids=list(range(10, 10 + n)), completion_start=start)


def test_cross_entropy_hand_case():
    # softmax([0, log 3]) = [1/4, 3/4]
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    targets = torch.tensor([1, 0])
    got = losses.token_nll(logits, targets)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([math.log(4 / 3), math.log(4)], abs=1e-6)
    assert float(losses.token_nll(logits, targets, "sum")) == pytest.approx(math.log(4 / 3) + math.log(4), abs=1e-6)
    assert float(losses.token_nll(logits, targets, "mean")) == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="'max'"):
        losses.token_nll(logits, targets, "max")


def test_cross_entropy_keeps_leading_shape_and_computes_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7).bfloat16()
    targets = torch.randint(0, 7, (2, 3))
    got = losses.token_nll(logits, targets)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    ref = -torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(losses.nll_of(losses.log_probs(logits), targets), ref)


def test_target_mask_hand_case():
    # item 0: 4 tokens, completion from token 2 -> targets x2, x3, predicted at positions 1, 2
    # item 1: 3 tokens, no completion -> targets x1, x2, at positions 0, 1
    # item 2: 2 tokens, completion starts past the end -> no target
    mask = losses.target_mask([_item(4, 2), _item(3, 0), _item(2, 2)], 5)
    assert mask.tolist() == [[False, True, True, False, False],
                             [True, True, False, False, False],
                             [False] * 5]
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 0, 0], [8, 9, 0, 0, 0]])
    assert losses.next_tokens(ids, mask).tolist() == [3, 4, 6, 7]


def test_real_pair_mask():
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert losses.real_pair_mask(att).tolist() == [[True, True, False, False], [True, True, True, False]]


def test_masked_token_nll_only_at_targets():
    # position 1 of row 0 predicts id 2 with logits favouring id 2 as 3:1
    logits = torch.zeros(1, 3, 3)
    logits[0, 1] = torch.tensor([0.0, 0.0, math.log(3.0)])  # p = [1/5, 1/5, 3/5]
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[False, True, False]])
    got = losses.masked_token_nll(logits, ids, mask)
    assert got[0].tolist() == pytest.approx([0.0, math.log(5 / 3), 0.0], abs=1e-6)
    assert losses.masked_token_nll(logits, ids, torch.zeros_like(mask)).tolist() == [[0.0, 0.0, 0.0]]


def test_kl_direction_hand_case():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # [1/4, 3/4]
    candidate = torch.tensor([[0.0, 0.0]])  # [1/2, 1/2]
    kl_tc = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl_ct = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_tc != pytest.approx(kl_ct)  # the case tells the directions apart
    assert float(losses.token_kl(teacher, candidate)[0]) == pytest.approx(kl_tc, abs=1e-6)
    # torch's kl_div(input, target) is KL(target || input), input as log-probabilities
    ref = F.kl_div(F.log_softmax(candidate, -1), F.log_softmax(teacher, -1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(losses.token_kl(teacher, candidate), ref)
    assert float(losses.token_kl(teacher, teacher)[0]) == pytest.approx(0.0, abs=1e-7)


def test_temperature_divides_logits_and_kd_scales_by_tau_squared():
    # at tau = 2, logits [0, 2 log 3] give the distribution [1/4, 3/4]
    teacher = torch.tensor([[0.0, 2 * math.log(3.0)], [0.0, 2 * math.log(3.0)]])
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert losses.token_kl(teacher, student, tau=2.0).tolist() == pytest.approx([kl, kl], abs=1e-6)
    assert float(losses.kd_loss(student, teacher, tau=2.0)) == pytest.approx(4 * kl, abs=1e-6)
    assert losses.log_probs(teacher, 2.0).exp()[0].tolist() == pytest.approx([0.25, 0.75], abs=1e-6)


def test_kd_loss_gradient_and_empty_batch():
    student = torch.zeros(0, 5, requires_grad=True)
    zero = losses.kd_loss(student, torch.zeros(0, 5))
    assert float(zero.detach()) == 0.0
    zero.backward()  # attached to the graph, so a step with no targets still runs
    s = torch.tensor([[0.0, 0.0]], requires_grad=True)
    losses.kd_loss(s, torch.tensor([[0.0, math.log(3.0)]])).backward()
    # d KL(p || softmax(s)) / ds = softmax(s) - p
    assert s.grad[0].tolist() == pytest.approx([0.5 - 0.25, 0.5 - 0.75], abs=1e-6)

"""The engine's whole-model passes (uspx.engine.forward) give what transformers' own forward and
generate give on the same model: target logits, gradients, extra outputs, greedy and sampled
continuations, and cached greedy decoding."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny
from uspx.engine import FromCheckpoint, InMemory, make_batches
from uspx.engine.forward import (Sampling, decode_step, decode_steps, device_of, forward, generate, logits,
                                 model_of, prefill)
from uspx.io import UspxError
from uspx.models import LoadedModel
from uspx.testing import tiny_model
from uspx.workload import EncodedItem

FAMILIES = ["qwen3_moe", "gpt_oss"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, one_thread):
    return tiny_model(request.param, seed=1)


def _items() -> list[EncodedItem]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for i, (length, start) in enumerate([(9, 4), (5, 0), (12, 7), (3, 3)]):  # the last has no target
        out.append(EncodedItem(i, f"i{i}", "f", "calibration", torch.randint(2, 90, (length,), generator=gen).tolist(), start))
    return out


def _reference_target_logits(model, batch) -> torch.Tensor:
    """Every position through the head, then the targets picked by hand from the spec: position
    p of row r when max(s, 1) <= p + 1 <= n - 1."""
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = []
    for r, item in enumerate(batch.items):
        for p in range(max(item.completion_start, 1) - 1, len(item.input_ids) - 1):
            rows.append(full[r, p])
    return torch.stack(rows) if rows else full[:0, 0]


def test_logits_are_the_models_own_at_the_target_positions(model):
    for batch in make_batches(_items(), 2):
        with torch.no_grad():
            want = _reference_target_logits(model, batch)
        got = logits(model, batch)
        assert got.device.type == "cpu" and not got.requires_grad
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_logits_accept_a_loaded_model_and_a_resident_source(model):
    batch = make_batches(_items(), 4)[0]
    want = logits(model, batch)
    torch.testing.assert_close(logits(InMemory(model), batch), want, rtol=0, atol=0)
    torch.testing.assert_close(logits(LoadedModel(model, None, "x", "f", "x"), batch), want, rtol=0, atol=0)


def test_logits_with_gradients_match_autograd_on_the_full_forward(model):
    batch = make_batches(_items(), 4)[0]
    weight = model.get_output_embeddings().weight
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # grad=True overrides the caller's mode
        got = logits(model, batch, grad=True)
    assert got.requires_grad
    got.float().pow(2).mean().backward()
    ours = weight.grad.clone()
    model.zero_grad(set_to_none=True)
    _reference_target_logits(model, batch).float().pow(2).mean().backward()
    torch.testing.assert_close(ours, weight.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():  # grad=False holds whatever the caller's mode
        assert not logits(model, batch).requires_grad


def test_forward_outputs_and_decoder_stack(model):
    ids = torch.tensor([[5, 17, 33, 2, 41, 8], [9, 9, 12, 60, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_router_logits=True)
    got = forward(model, ids, mask, output_hidden_states=True, output_router_logits=True)
    assert got.cache is None  # no KV cache is built for a plain forward
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert len(got.hidden_states) == len(want.hidden_states) == model.config.num_hidden_layers + 1
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    body = forward(model, ids, mask, head=False)
    assert getattr(body, "logits", None) is None
    torch.testing.assert_close(body.last_hidden_state, want.hidden_states[-1], rtol=1e-6, atol=1e-6)


def _greedy_without_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding from the spec: each token is the argmax of a full forward over all so far."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_greedy_generation_and_cached_decoding_follow_the_argmax(model):
    prompt = torch.tensor([[5, 17, 33, 2, 41]])
    want = _greedy_without_cache(model, prompt, 6)
    got = generate(model, prompt, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, want)
    step = prefill(model, prompt)
    tokens = [step.next_ids]
    for _ in range(5):
        step = decode_step(model, step)
        tokens.append(step.next_ids)
    assert torch.equal(torch.cat([prompt] + tokens, dim=1), want)
    with torch.no_grad():
        last = model(input_ids=want[:, :-1], use_cache=False).logits[:, -1]
    torch.testing.assert_close(step.logits, last, rtol=1e-4, atol=1e-4)
    assert torch.equal(decode_steps(model, prefill(model, prompt), 5).next_ids, want[:, -1:])


def test_prefill_without_cache_cannot_decode(model):
    step = prefill(model, torch.tensor([[5, 17, 33]]), cache=False)
    assert step.cache is None
    with pytest.raises(UspxError, match="cache"):
        decode_step(model, step)


def test_sampled_generation_is_transformers_own(model):
    ids = torch.tensor([[0, 0, 5, 17, 33], [4, 8, 15, 16, 23]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.manual_seed(11)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                              max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(11)
    got = generate(model, ids, mask, max_new_tokens=8, sampling=Sampling(), eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, want)
    assert got.shape == (2, 13)


def test_generation_stops_at_the_end_token(model):
    prompt = torch.tensor([[5, 17, 33, 2, 41]])
    greedy = _greedy_without_cache(model, prompt, 6)
    eos = int(greedy[0, 6])  # the second generated token: the row ends at its first occurrence
    end = 5 + greedy[0, 5:].tolist().index(eos) + 1
    got = generate(model, prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, greedy[:, :end])


def test_what_cannot_run_whole_is_refused(tmp_path):
    folder = save_tiny("qwen3_moe", tmp_path / "m")
    with pytest.raises(UspxError, match="layer-by-layer"):
        model_of(FromCheckpoint(folder))
    with pytest.raises(UspxError, match="str"):
        model_of("a path")


def test_device_is_the_first_parameters():
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_inputs_follow_a_model_on_the_gpu():
    cpu = tiny_model("qwen3_moe", seed=1)
    gpu = tiny_model("qwen3_moe", seed=1).cuda()
    batch = make_batches(_items(), 4)[0]
    got = logits(gpu, batch)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, logits(cpu, batch), rtol=1e-4, atol=1e-4)
    prompt = torch.tensor([[5, 17, 33, 2, 41]])
    out = generate(gpu, prompt, max_new_tokens=4, eos_token_id=None, pad_token_id=0)
    assert out.device.type == "cpu" and torch.equal(out, _greedy_without_cache(cpu, prompt, 4))
    assert forward(gpu, prompt).logits.device.type == "cuda"

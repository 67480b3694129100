"""MXFP4 codec against an independent spec decoder, against transformers' own dequantization, and
encode/decode round trips."""

from __future__ import annotations

import pytest
import torch

from uspx.io import UspxError
from uspx.models import mxfp4


def _spec_fp4(nibble: int) -> float:
    """E2M1 from the OCP MX spec: 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit."""
    sign = -1.0 if nibble & 0b1000 else 1.0
    exp = (nibble >> 1) & 0b11
    man = nibble & 0b1
    if exp == 0:  # subnormal: 2**(1 - bias) * (0.m)
        return sign * 0.5 * man
    return sign * 2.0 ** (exp - 1) * (1.0 + 0.5 * man)


def _spec_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Scalar reference: blocks [E, rows, G, 16] -> float64 [E, G*32, rows] (transformers' layout)."""
    n_e, rows, groups, nbytes = blocks.shape
    out = torch.zeros(n_e, groups * 32, rows, dtype=torch.float64)
    for e in range(n_e):
        for r in range(rows):
            for g in range(groups):
                scale = 2.0 ** (int(scales[e, r, g]) - 127)  # E8M0
                for j in range(nbytes):
                    byte = int(blocks[e, r, g, j])
                    out[e, g * 32 + 2 * j, r] = _spec_fp4(byte & 0xF) * scale
                    out[e, g * 32 + 2 * j + 1, r] = _spec_fp4(byte >> 4) * scale
    return out


def _random_pair(shape: tuple[int, ...], seed: int = 0, lo: int = 110, hi: int = 140):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(lo, hi, shape, dtype=torch.uint8, generator=g)
    return blocks, scales


def test_fp4_table_matches_spec():
    assert [_spec_fp4(n) for n in range(16)] == list(mxfp4.FP4_VALUES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_spec_reference(dtype):
    blocks, scales = _random_pair((2, 3, 2))  # 2 experts, 3 rows, 64 values per row
    ref = _spec_decode(blocks, scales)
    got = mxfp4.decode(blocks, scales, dtype=dtype)
    assert got.shape == (2, 64, 3) and got.dtype == dtype
    # every decoded value is exactly representable in both dtypes for these scales
    assert torch.equal(got.to(torch.float64), ref)


def test_decode_matches_transformers_dequantization():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # gate_up_proj-like: [E, 2I, H/32, 16] with H = 64, I = 8 -> [E, H, 2I]
    blocks, scales = _random_pair((4, 16, 2), seed=1, lo=100, hi=150)
    for dtype in (torch.bfloat16, torch.float32):
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        ours = mxfp4.decode(blocks, scales, dtype=dtype)
        assert theirs.shape == ours.shape == (4, 64, 16)
        assert torch.equal(theirs, ours)
    # full E8M0 range except NaN (255): overflow / subnormal handling must agree too
    blocks, scales = _random_pair((2, 4, 3), seed=2, lo=0, hi=255)
    assert torch.equal(
        convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), mxfp4.decode(blocks, scales, torch.float32)
    )


def test_decode_into_chunks_equal_decode():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_pair((5, 8, 2), seed=3, lo=0, hi=255)
    for dtype in (torch.bfloat16, torch.float32):
        out = torch.empty(5, 64, 8, dtype=dtype)
        mxfp4.decode_into(out, blocks, scales)
        assert torch.equal(out, mxfp4.decode(blocks, scales, dtype))
        assert torch.equal(out, convert_moe_packed_tensors(blocks, scales, dtype=dtype))


def test_round_trip_exact_on_grid():
    g = torch.Generator().manual_seed(4)
    lut = torch.tensor(mxfp4.FP4_VALUES, dtype=torch.float32)
    codes = torch.randint(0, 16, (3, 96, 5), generator=g)  # weight layout [E, K, rows], K = 3 blocks
    exps = torch.randint(-20, 10, (3, 3, 5), generator=g).to(torch.float32)  # one exponent per block
    weight = lut[codes] * torch.pow(2.0, exps).repeat_interleave(32, dim=1)
    weight[0, :32, 0] = 0.0  # an all-zero block
    blocks, scales = mxfp4.encode(weight)
    assert blocks.shape == (3, 5, 3, 16) and scales.shape == (3, 5, 3)
    assert torch.equal(mxfp4.decode(blocks, scales, torch.float32), weight)
    # and bytes decoded from a checkpoint re-encode to values that decode identically
    b2, s2 = _random_pair((2, 4, 2), seed=5)
    w2 = mxfp4.decode(b2, s2, torch.float32)
    assert torch.equal(mxfp4.decode(*mxfp4.encode(w2), torch.float32), w2)


def test_encode_rounds_to_nearest_even():
    # block 0: amax 7.9 -> shared exponent floor(log2 7.9) - 2 = 0, so values are rounded as they are
    block0 = [4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.3, -2.9, 7.9] + [0.0] * 21
    # block 1: amax 100 -> exponent floor(log2 100) - 2 = 4 (scale 16): -100 / 16 saturates to -6
    block1 = [-100.0, 8.0, 24.0] + [0.0] * 29
    blocks, scales = mxfp4.encode_rows(torch.tensor([block0 + block1]))
    assert scales[0].tolist() == [127, 131]
    got = mxfp4.decode_rows(blocks, scales, torch.float32)[0].tolist()
    # ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4; 7.9 saturates
    assert got[:11] == [4.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, -3.0, 6.0]
    assert got[32:35] == [-96.0, 8.0, 24.0]


def test_errors_and_helpers():
    blocks, scales = _random_pair((4, 2, 1))
    with pytest.raises(UspxError):
        mxfp4.decode(blocks, scales[:, :1])
    with pytest.raises(UspxError):
        mxfp4.encode_rows(torch.zeros(2, 33))
    with pytest.raises(UspxError):
        mxfp4.encode_rows(torch.full((1, 32), float("nan")))
    kept = mxfp4.select_experts(blocks, [3, 1])
    assert torch.equal(kept[0], blocks[3]) and torch.equal(kept[1], blocks[1])
    with pytest.raises(UspxError):
        mxfp4.select_experts(scales, [4])
    assert mxfp4.mxfp4_bytes(2880, 2880) == 2880 * 90 * 17

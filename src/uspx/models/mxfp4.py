"""MXFP4 (OCP Microscaling, FP4 E2M1 elements, E8M0 scales) as gpt-oss checkpoints store it.

Layout, as read from transformers' own ``integrations/mxfp4.py`` (``_convert_moe_packed_tensors``):

* ``*_blocks`` uint8 ``[E, rows, G, 16]``: each byte holds two FP4 codes, the **low nibble first**
  (value ``2j`` = ``byte & 0x0F``, value ``2j + 1`` = ``byte >> 4``); 16 bytes = one block of 32.
* ``*_scales`` uint8 ``[E, rows, G]``: one E8M0 exponent per block, ``2 ** (byte - 127)``.
* FP4 code: bit 3 sign, bits 2-1 exponent, bit 0 mantissa: 0, .5, 1, 1.5, 2, 3, 4, 6 and negatives.
* Decoded rows are ``[E, rows, G * 32]``, then transposed to ``[E, G * 32, rows]``: the stored
  ``gate_up_proj_blocks [E, 2I, H/32, 16]`` becomes the parameter ``gate_up_proj [E, H, 2I]`` and
  ``down_proj_blocks [E, H, I/32, 16]`` becomes ``down_proj [E, I, H]``.

Decoding computes ``lut[code] * 2.0 ** (scale - 127)`` in float32 and rounds once to ``dtype``,
which is what transformers' ``torch.ldexp(..., out=bf16)`` does, so both give identical bits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from uspx.io import UspxError

BLOCK_SIZE = 32  # values per E8M0 scale (OCP MX spec)
BYTES_PER_BLOCK = BLOCK_SIZE // 2
SCALE_BIAS = 127
FP4_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
FP4_MAX = 6.0
_EMAX_ELEM = 2  # exponent of FP4's largest normal (6 = 1.5 * 2**2), used by the spec's scale rule
# Midpoints between neighbouring non-negative FP4 values, for round-to-nearest.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _check_pair(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise UspxError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise UspxError(f"MXFP4 blocks must end in a dim of {BYTES_PER_BLOCK} bytes, got shape {tuple(blocks.shape)}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise UspxError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} disagree: "
            "scales must equal blocks' shape without its last dim"
        )


def _luts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Byte -> value tables: low-nibble value, high-nibble value, and both as a pair [256, 2].

    One gather per byte through a 256-entry table is about twice as fast as masking, shifting and
    gathering each nibble separately.
    """
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    lo, hi = lut.repeat(16), lut.repeat_interleave(16)  # byte b: lo = lut[b & 15], hi = lut[b >> 4]
    return lo, hi, torch.stack([lo, hi], dim=1)


def _scale_factors(scales: torch.Tensor) -> torch.Tensor:
    return torch.exp2(scales.to(torch.float32) - SCALE_BIAS)  # E8M0: exact powers of two in float32


def decode_rows(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[..., rows, G, 16]`` + ``[..., rows, G]`` -> ``[..., rows, G * 32]``, stored order (no transpose)."""
    _check_pair(blocks, scales)
    *prefix, groups, nbytes = blocks.shape
    _, _, pair = _luts()
    # pair[byte] = (low-nibble value, high-nibble value): the low nibble is the earlier value
    out = pair.index_select(0, blocks.reshape(-1).to(torch.int32)).reshape(*prefix, groups, nbytes * 2)
    out *= _scale_factors(scales).unsqueeze(-1)
    return out.reshape(*prefix, groups * nbytes * 2).to(dtype)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize to the layout of transformers' parameter: ``[..., rows, G, 16]`` -> ``[..., G * 32, rows]``."""
    return decode_rows(blocks, scales, dtype).transpose(-1, -2).contiguous()


def decode_into(out: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decode ``[E, rows, G, 16]`` into a preallocated ``out [E, G * 32, rows]``, one expert at a time.

    Writes straight into the transposed parameter layout (bytes are transposed first, which is
    cheap, instead of the float values), and bounds float32 temporaries to half an expert: this is
    what lets a gpt-oss-20b layer (32 experts, 1.6 GB in bf16) be built without a second copy.
    """
    _check_pair(blocks, scales)
    n, rows, groups, nbytes = blocks.shape
    want = (n, groups * BLOCK_SIZE, rows)
    if tuple(out.shape) != want or not out.is_contiguous():
        raise UspxError(f"decode_into: output must be a contiguous tensor of shape {want}, got {tuple(out.shape)}")
    lo, hi, _ = _luts()
    for e in range(n):
        idx = blocks[e].permute(1, 2, 0).reshape(-1).to(torch.int32)  # [G, 16, rows] byte order
        factor = _scale_factors(scales[e].t()).unsqueeze(1)  # [G, 1, rows]
        # out[e] row k = g * 32 + 2 * j + nibble, i.e. out[e].view(G, 16, 2, rows)[g, j, nibble]
        view = out[e].view(groups, nbytes, 2, rows)
        view[:, :, 0, :] = lo.index_select(0, idx).view(groups, nbytes, rows) * factor
        view[:, :, 1, :] = hi.index_select(0, idx).view(groups, nbytes, rows) * factor
    return out


def _fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already divided by their block scale) to FP4 codes, nearest, ties to even.

    Values beyond +-6 saturate to +-6, as the MX spec's conversion does.
    """
    mag = x.abs().clamp(max=FP4_MAX).contiguous()
    bounds = torch.tensor(_MIDPOINTS, dtype=torch.float32)
    down = torch.bucketize(mag, bounds, right=False)  # a tie goes to the smaller value
    up = torch.bucketize(mag, bounds, right=True)  # a tie goes to the larger value
    # On a tie the two candidates are neighbouring codes; keep the even one (mantissa bit 0).
    code = torch.where((down != up) & (down % 2 == 0), down, up)
    sign = (torch.signbit(x) & (code != 0)).to(torch.uint8) << 3
    return code.to(torch.uint8) | sign


def encode_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[..., rows, K]`` (K a multiple of 32) to blocks ``[..., rows, K/32, 16]`` + scales.

    The shared exponent follows the OCP MX spec: ``floor(log2(amax)) - 2`` (2 = FP4's largest
    exponent), so values already on an MXFP4 grid come back exactly.
    """
    x = rows.detach().to(torch.float32)
    if x.shape[-1] % BLOCK_SIZE:
        raise UspxError(f"MXFP4 needs the last dim to be a multiple of {BLOCK_SIZE}, got {x.shape[-1]}")
    if not torch.isfinite(x).all():
        raise UspxError("cannot encode NaN or infinite values to MXFP4")
    *prefix, k = x.shape
    x = x.reshape(*prefix, k // BLOCK_SIZE, BLOCK_SIZE)
    amax = x.abs().amax(dim=-1)
    # frexp: amax = m * 2**e with m in [0.5, 1), so floor(log2(amax)) = e - 1 exactly (no log2 rounding).
    _, e = torch.frexp(amax)
    shared = torch.where(amax > 0, e.to(torch.int32) - 1 - _EMAX_ELEM, torch.zeros_like(e, dtype=torch.int32))
    shared = shared.clamp(-SCALE_BIAS, SCALE_BIAS)  # E8M0 255 is NaN; 0 means 2**-127
    scaled = x * torch.pow(2.0, -shared.to(torch.float32)).unsqueeze(-1)
    codes = _fp4_codes(scaled)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # low nibble first
    return blocks.contiguous(), (shared + SCALE_BIAS).to(torch.uint8)


def encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`decode`: a parameter ``[..., K, rows]`` -> blocks ``[..., rows, K/32, 16]`` + scales."""
    return encode_rows(weight.transpose(-1, -2))


def select_experts(tensor: torch.Tensor, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Keep experts ``ids`` (dim 0) of a blocks, scales, bias or router tensor, in the order given."""
    index = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= tensor.shape[0]):
        raise UspxError(f"expert ids {index.tolist()} outside 0..{tensor.shape[0] - 1}")
    return tensor.index_select(0, index).contiguous()


def mxfp4_bytes(rows: int, cols: int) -> int:
    """Bytes of one ``[rows, cols]`` matrix in MXFP4: half a byte per value plus one scale per 32."""
    if cols % BLOCK_SIZE:
        raise UspxError(f"MXFP4 needs {cols} to be a multiple of {BLOCK_SIZE}")
    return rows * cols // 2 + rows * cols // BLOCK_SIZE

"""Block-scaled low-precision weights of the DeepSeek releases, and their exact dequantisation.

- FP8 E4M3 with one scale per 128x128 block (V3: `<name>_scale_inv` fp32; V4: `<name>.scale` E8M0):
  W[i, j] = q[i, j] * scale[i // 128, j // 128].
- MXFP4 (V4 routed experts): int8 [out, in / 2] holding two E2M1 values per byte (element 2j in the low nibble,
  2j+1 in the high nibble) and one E8M0 scale per 32 consecutive inputs: W[i, j] = e2m1(q)[i, j] * scale[i, j // 32].
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
MXFP4_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    return scale.float().repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """fp32 weight from an FP8 weight [M, N] and its block scales [ceil(M/block), ceil(N/block)]."""
    rows, cols = weight.shape
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP8 scale shape {tuple(scale.shape)} does not match weight {tuple(weight.shape)} "
                         f"(expected {expected} for {block}x{block} blocks)")
    return weight.float() * _expand_blocks(scale, rows, cols, block, block)


def quantize_fp8(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 E4M3 weight, fp32 block scales): the format of the V3 release, for tests and benchmarks."""
    rows, cols = weight.shape
    padded = torch.zeros(-(-rows // block) * block, -(-cols // block) * block)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(padded.shape[0] // block, block, padded.shape[1] // block, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    quantized = weight.float() / _expand_blocks(scale, rows, cols, block, block)
    return quantized.to(torch.float8_e4m3fn), scale


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """int8 / uint8 [..., n] with two E2M1 codes per byte -> fp32 [..., 2n]."""
    codes = packed.view(torch.uint8)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    low, high = table[(codes & 0x0F).long()], table[(codes >> 4).long()]
    return torch.stack([low, high], dim=-1).flatten(-2)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, block: int = MXFP4_BLOCK) -> torch.Tensor:
    """fp32 weight [M, 2n] from packed MXFP4 [M, n] and E8M0 scales [M, 2n / block]."""
    values = unpack_e2m1(packed)
    rows, cols = values.shape
    if tuple(scale.shape) != (rows, cols // block):
        raise ValueError(f"MXFP4 scale shape {tuple(scale.shape)} does not match weight {(rows, cols)} "
                         f"(expected {(rows, cols // block)} for 1x{block} blocks)")
    return values * scale.float().repeat_interleave(block, dim=1)


def quantize_mxfp4(weight: torch.Tensor, block: int = MXFP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int8 [M, N/2], E8M0 scales [M, N/block]) rounding each value to the nearest E2M1 code."""
    rows, cols = weight.shape
    groups = weight.float().view(rows, cols // block, block)
    amax = groups.abs().amax(dim=-1).clamp(min=2.0**-126)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 6.0)))  # power of two, so E8M0 holds it exactly
    scaled = (groups / scale.unsqueeze(-1)).view(rows, cols)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    codes = (scaled.unsqueeze(-1) - table).abs().argmin(dim=-1).to(torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu)

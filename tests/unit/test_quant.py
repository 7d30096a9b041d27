"""Block-scaled FP8 and MXFP4 formats: exact dequantisation and format details (nibble order, E2M1 values)."""

from __future__ import annotations

import pytest
import torch

from polytrain.models.hf.quant import (
    dequantize_fp8,
    dequantize_mxfp4,
    quantize_fp8,
    quantize_mxfp4,
    unpack_e2m1,
)


def test_fp8_block_scale_applies_per_128x128_block_with_partial_edges():
    weight = torch.randn(200, 300).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0, 4.0], [0.5, 8.0, 16.0]])
    out = dequantize_fp8(weight, scale)
    for i, j in [(0, 0), (127, 128), (128, 0), (199, 299), (150, 260)]:
        assert out[i, j] == weight[i, j].float() * scale[i // 128, j // 128]


def test_fp8_round_trip_error_is_within_e4m3_precision():
    weight = torch.randn(256, 384)
    quantised, scale = quantize_fp8(weight)
    restored = dequantize_fp8(quantised, scale)
    assert ((restored - weight).abs() / weight.abs().clamp(min=1e-3)).median() < 0.07  # 3 mantissa bits


def test_fp8_scale_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="does not match weight"):
        dequantize_fp8(torch.zeros(256, 256).to(torch.float8_e4m3fn), torch.ones(3, 2))


def test_e2m1_codes_low_nibble_first():
    packed = torch.tensor([[0x21, 0xF7]], dtype=torch.uint8).view(torch.int8)
    # 0x21: low nibble 1 (0.5), high nibble 2 (1.0); 0xF7: low 7 (6.0), high 15 (-6.0)
    assert unpack_e2m1(packed).tolist() == [[0.5, 1.0, 6.0, -6.0]]


def test_mxfp4_scale_applies_per_32_inputs():
    packed = torch.full((2, 32), 0x22, dtype=torch.uint8).view(torch.int8)  # every value 1.0
    scale = torch.tensor([[1.0, 4.0], [0.25, 2.0]]).to(torch.float8_e8m0fnu)
    out = dequantize_mxfp4(packed, scale)
    assert out.shape == (2, 64)
    assert out[0, :32].eq(1.0).all() and out[0, 32:].eq(4.0).all() and out[1, :32].eq(0.25).all()


def test_mxfp4_round_trip_of_representable_values_is_exact():
    values = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, 0] * 4).view(1, 64) * 8
    packed, scale = quantize_mxfp4(values)
    assert torch.equal(dequantize_mxfp4(packed, scale), values)

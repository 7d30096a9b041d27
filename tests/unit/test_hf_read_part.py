"""Sharded loading reads from a safetensors file only the block a rank holds, dequantising FP8 (128 x 128 blocks)
and MXFP4 (32-element groups) per slice: any index set per dimension (ranges that do not start on a block
boundary, strided and scattered rows as expert or strided sharding produce) gives exactly the elements of the
whole dequantised tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from polytrain.models.hf.checkpoint import HFCheckpoint
from polytrain.models.hf.quant import quantize_fp8, quantize_mxfp4
from polytrain.models.hf.safetensors_io import BlockReader


@pytest.fixture
def checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(0)
    plain = torch.randn(300, 70, generator=generator)
    fp8, fp8_scale = quantize_fp8(torch.randn(300, 260, generator=generator))
    fp4, fp4_scale = quantize_mxfp4(torch.randn(40, 192, generator=generator))
    save_file({"plain.weight": plain, "fp8.weight": fp8, "fp8.weight_scale_inv": fp8_scale,
               "fp4.weight": fp4, "fp4.scale": fp4_scale, "ids": torch.arange(12).view(3, 4)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    return HFCheckpoint(tmp_path)


INDEX_SETS = [
    lambda n: torch.arange(n),  # whole
    lambda n: torch.arange(n // 3, n // 3 + n // 4),  # a contiguous range off the block grid
    lambda n: torch.arange(1, n, 3),  # strided
    lambda n: torch.tensor([0, n // 2, n - 1]),  # scattered
    lambda n: torch.arange(0),  # empty
]


@pytest.mark.parametrize("name", ["plain.weight", "fp8.weight", "fp4.weight", "ids"])
def test_read_part_equals_the_whole_tensor_indexed(checkpoint, name):
    whole = checkpoint.read(name)
    for rows in INDEX_SETS:
        for cols in INDEX_SETS:
            indices = [rows(whole.shape[0]), cols(whole.shape[1])]
            expected = whole[torch.meshgrid(*indices, indexing="ij")]
            got = checkpoint.read_part(name, indices)
            assert got.dtype == expected.dtype and torch.equal(got, expected), (name, indices)


def test_block_reader_reads_only_the_block_and_reports_truncation(tmp_path):
    tensor = torch.arange(6 * 5 * 4, dtype=torch.float32).view(6, 5, 4)
    save_file({"t": tensor}, str(tmp_path / "a.safetensors"))
    reader = BlockReader(tmp_path / "a.safetensors")
    assert torch.equal(reader.read("t", [(1, 4), (2, 5), (0, 4)]), tensor[1:4, 2:5])
    assert torch.equal(reader.read("t", [(2, 3), (0, 5), (1, 3)]), tensor[2:3, :, 1:3])
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[:-40])
    with pytest.raises(ValueError, match="truncated inside tensor `t`"):
        BlockReader(tmp_path / "b.safetensors").read("t", [(5, 6), (0, 5), (0, 4)])

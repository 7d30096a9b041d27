"""Regional compilation: `torch.compile` on each decoder block (and MTP module), not on the whole model.

Blocks of one kind share their compiled code, so the compile cost is that of one dense and one MoE block however
deep the model, and FSDP / activation-checkpointing wrappers stay outside the compiled regions. What it buys is
fusion of the elementwise work between the matmuls (norms, SwiGLU, rotary, router scoring), for a compile at the
first step; off by default (`python benchmarks/vs_transformers.py --compile` measures it against eager).
"""

from __future__ import annotations

from torch import nn

from polytrain.models.common.moe import keep_grouped_gemm_out_of_graphs
from polytrain.parallel.fsdp import blocks_of

BACKEND = "inductor"


def apply_compile(model: nn.Module) -> int:
    """Compile every block of `model` in place (module names, hence checkpoints, unchanged); returns the count."""
    keep_grouped_gemm_out_of_graphs()
    blocks = blocks_of(model)
    for block in blocks:
        block.compile(backend=BACKEND)
    return len(blocks)

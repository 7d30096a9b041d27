"""Attention and a fused norm the CUDA way: flash-attn, a JIT-built CUDA kernel, a compute-capability check.

For `polytrain audit examples/audit/` (see the README): none of this is rewritten automatically.
"""

import torch
import torch.nn.functional as F
from flash_attn import flash_attn_func
from torch.utils.cpp_extension import load

rmsnorm_cuda = load(name="rmsnorm_cuda", sources=["rmsnorm.cpp", "rmsnorm_kernel.cu"])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if torch.cuda.get_device_capability()[0] >= 8:
        return flash_attn_func(q, k, v, causal=True)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)

"""The policy's weights as an engine loads them: buckets of (Hugging Face name, tensor), one polytrain tensor per
bucket, each gathered whole on every rank only when asked for (extra memory: the largest tensor)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def hf_buckets(model: nn.Module, dtype: torch.dtype) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The model's weights as the engine loads them: Hugging Face names and layout (one tensor per routed expert),
    floating-point tensors in `dtype` except those the releases keep in fp32; one polytrain tensor per bucket,
    gathered (sharded ones: a collective) only when its bucket is asked for."""
    from torch.distributed.tensor import DTensor

    from polytrain.models.hf.checkpoint import KEEP_FP32
    from polytrain.models.hf.names import names_for

    config = model.config
    names = names_for(config)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
        yield [(hf, t.to("cpu", torch.float32 if KEEP_FP32.search(hf) else dtype).contiguous()
                if t.is_floating_point() else t.to("cpu").contiguous()) for hf, t in names.to_hf(name, full)]
        del full

"""Tensor names, polytrain's state dict <-> a Hugging Face release: what every family's mapping shares.

Routed experts are stacked per layer here (`...mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]); the
releases store one tensor per expert and projection. `StackedExperts` moves between the two; a family's subclass
(`models/<family>/hf.py`) names everything else.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from polytrain.models.common.config import ModelConfig

MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")

Read = Callable[[str, list[torch.Tensor], tuple[int, ...]], torch.Tensor]
"""(HF tensor name, global indices to read per dimension, its expected global shape) -> those elements."""


class StackedExperts:
    """Moves stacked expert weights to and from the release's one-tensor-per-expert-and-projection layout; a
    subclass names the projections (`EXPERT_PROJ`: gate, up, down) and maps everything else (`hf_name`)."""

    EXPERT_PROJ: tuple[str, str, str]
    config: ModelConfig

    def hf_name(self, name: str) -> str:
        raise NotImplementedError

    def _expert_prefix(self, name: str) -> tuple[str, str] | None:
        raise NotImplementedError

    def _per_expert(self, prefix: str, kind: str, experts: int,
                    first_expert: int) -> Iterator[tuple[str, tuple[int | slice, ...]]]:
        """(release name, region of the stack) for every expert in a stack of `experts`, numbered from
        first_expert; a region indexes the stack's leading dimensions (expert, then gate / up rows)."""
        hidden = self.config.moe_intermediate_size
        gate, up, down = self.EXPERT_PROJ
        for local in range(experts):
            expert = first_expert + local
            if kind == "down_proj":
                yield f"{prefix}.{expert}.{down}.weight", (local,)
            else:
                yield f"{prefix}.{expert}.{gate}.weight", (local, slice(0, hidden))
                yield f"{prefix}.{expert}.{up}.weight", (local, slice(hidden, 2 * hidden))

    def load_into(self, name: str, dest: torch.Tensor, read: Read, indices: list[torch.Tensor] | None = None,
                  shape: tuple[int, ...] | None = None) -> None:
        """Fill `dest` from HF tensors, one at a time, reading of each only the elements `dest` holds.

        `dest` is the local part of polytrain tensor `name` (global shape `shape`, default `dest`'s), holding its
        elements at global `indices` per dimension (default: all). `read(hf_name, indices, shape)` returns the
        HF tensor `hf_name` (whose global shape is `shape`) at `indices`."""
        shape = tuple(shape or dest.shape)
        indices = indices if indices is not None else [torch.arange(n) for n in shape]
        expert = self._expert_prefix(name)
        if expert is None:
            dest.copy_(read(self.hf_name(name), indices, shape))
            return
        prefix, kind = expert
        hidden = self.config.moe_intermediate_size
        gate, up, down = self.EXPERT_PROJ
        for row, number in enumerate(indices[0].tolist()):
            if kind == "down_proj":
                dest[row].copy_(read(f"{prefix}.{number}.{down}.weight", indices[1:], shape[1:]))
                continue
            rows, columns = indices[1], indices[2]
            for part, selected, offset in ((gate, rows < hidden, 0), (up, rows >= hidden, hidden)):
                if bool(selected.any()):
                    dest[row][selected.to(dest.device)] = read(f"{prefix}.{number}.{part}.weight",
                                                               [rows[selected] - offset, columns],
                                                               (hidden, shape[2])).to(dest.device, dest.dtype)

    def hf_regions(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[str, tuple[int | slice, ...]]]:
        """(HF name, region) of each HF tensor that polytrain tensor `name` (global `shape`) holds: the region
        indexes its leading dimensions (empty: the whole tensor)."""
        expert = self._expert_prefix(name)
        if expert is None:
            yield self.hf_name(name), ()
        else:
            yield from self._per_expert(*expert, shape[0], 0)

    def to_hf(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The HF tensors of one polytrain tensor (views where possible; no copy of the whole stack)."""
        for hf, region in self.hf_regions(name, tuple(tensor.shape)):
            yield hf, tensor[region]

    def candidates(self, hf_name: str) -> list[str]:
        """Names under which a checkpoint may hold `hf_name`, the release name first."""
        return [hf_name]

    def shared_copies(self, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors the release repeats (e.g. the embedding inside MTP modules), as (HF name, source tensor)."""
        return iter(())

    def is_shared_copy(self, hf_name: str) -> bool:
        return False

    def is_mtp_tensor(self, hf_name: str) -> bool:
        return False


def names_for(config: ModelConfig) -> StackedExperts:
    """The tensor-name mapping of `config`'s family."""
    from polytrain.models.registry import spec_for

    return spec_for(config).hf.names(config)

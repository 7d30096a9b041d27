"""Expert parallelism: routed experts split by expert over the `ep` mesh, tokens sent to their experts and back by
differentiable all-to-all with uneven splits.

Expert weights become DTensors sharded on dim 0 (the expert index) over the ep mesh, so checkpoints and exports still
see every expert. Each rank routes its own tokens; the all-to-all sends each (token, expert) pair to the rank owning
the expert, that rank runs one grouped GEMM over everything it received, and a second all-to-all brings the results
home. Gradients return along the same path, so each expert's gradient sums over every ep rank's tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from polytrain.models.common.moe import (
    GroupedExperts,
    expert_order,
    from_expert_order,
    grouped_swiglu,
    inverse_permutation,
    to_expert_order,
)


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def receive_order(counts: torch.Tensor) -> torch.Tensor:
    """Permutation that regroups received rows from (source rank, local expert) order into (local expert, source)
    order. `counts` [sources, local experts] holds how many rows each source sent for each local expert."""
    flat = counts.flatten()
    starts = (torch.cumsum(flat, 0) - flat).view_as(counts)
    seg_start = starts.t().flatten()
    seg_len = counts.t().flatten()
    total = int(seg_len.sum())
    seg_offset = torch.cumsum(seg_len, 0) - seg_len
    within = torch.arange(total, device=counts.device) - torch.repeat_interleave(seg_offset, seg_len)
    return torch.repeat_interleave(seg_start, seg_len) + within


class AllToAllDispatch:
    """The `GroupedExperts.dispatcher` for expert parallelism over one process group."""

    def __init__(self, group: dist.ProcessGroup, ep: int) -> None:
        self.group = group
        self.ep = ep

    def exchange_counts(self, counts: torch.Tensor, local_experts: int) -> tuple[torch.Tensor, list[int], list[int]]:
        """(rows each source rank sends for each of this rank's experts [ep, local experts], rows sent to each
        rank, rows received from each rank), from this rank's rows per expert `counts` [experts]."""
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)
        received_counts = received_counts.view(self.ep, local_experts)
        return (received_counts, counts.view(self.ep, local_experts).sum(1).tolist(),
                received_counts.sum(1).tolist())

    def receive_order(self, received_counts: torch.Tensor, total: int) -> torch.Tensor:
        """The permutation of the `total` received rows into (local expert, source) order."""
        return receive_order(received_counts)

    def __call__(self, experts: GroupedExperts, x: torch.Tensor, weights: torch.Tensor,
                 indices: torch.Tensor) -> torch.Tensor:
        num_experts, ep = experts.num_experts, self.ep
        local_experts = num_experts // ep
        top_k = indices.shape[1]
        order, inverse, counts = expert_order(indices, num_experts)
        received_counts, send_splits, recv_splits = self.exchange_counts(counts, local_experts)

        received = all_to_all_single_autograd(to_expert_order(x, order, inverse, top_k), recv_splits, send_splits,
                                              self.group)
        # The routing weights travel with their rows (N*k scalars) so the owner applies them at the experts'
        # intermediate width before the down projection, as the single-process path does, not at hidden width.
        received_scale = all_to_all_single_autograd(weights.flatten()[order], recv_splits, send_splits, self.group)
        regroup = self.receive_order(received_counts, sum(recv_splits))
        out = grouped_swiglu(received[regroup], received_counts.sum(0), _local(experts.gate_up_proj),
                             _local(experts.down_proj), experts.limit, scale=received_scale[regroup])
        out = out[inverse_permutation(regroup)]  # back to (source, expert) order
        returned = all_to_all_single_autograd(out, send_splits, recv_splits, self.group)
        return from_expert_order(returned, order, inverse, top_k).to(x.dtype)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> int:
    """Shard every GroupedExperts by expert over `ep_mesh` and install the all-to-all dispatcher.
    Returns how many expert modules were parallelised."""
    group = ep_mesh.get_group()
    count = 0
    for module in model.modules():
        if not isinstance(module, GroupedExperts):
            continue
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(module, name)
            sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.dispatcher = AllToAllDispatch(group, ep_mesh.size())
        count += 1
    return count

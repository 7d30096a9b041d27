"""A small classifier trained the NVIDIA way: .cuda(), torch.cuda.amp, NCCL, torch.cuda runtime calls.

It runs only on an NVIDIA GPU. `polytrain audit examples/audit/train_cuda.py` lists what ties it to NVIDIA;
`polytrain audit --fix` on a copy of it makes it run on any accelerator, or on the CPU (see the README).
Single process: `python train_cuda.py`; several: `torchrun --nproc-per-node 2 train_cuda.py`.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.cuda.amp import GradScaler, autocast
from torch.nn.parallel import DistributedDataParallel as DDP


class MLP(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def setup() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    dist.init_process_group(backend="nccl")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rank, world_size, local_rank = setup()
    torch.manual_seed(0)
    torch.cuda.manual_seed_all(0)
    torch.backends.cudnn.benchmark = True
    print(f"rank {rank}/{world_size}: {torch.cuda.device_count()} GPUs, available {torch.cuda.is_available()}")

    model = MLP().cuda()
    if dist.is_initialized():
        model = DDP(model, device_ids=[local_rank])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = GradScaler()
    data = torch.randn(512, 32)
    labels = (data[:, 0] > 0).long() + 2 * (data[:, 1] > 0).long()

    losses = []
    start = time.time()
    for _ in range(args.steps):
        index = torch.randint(0, len(data), (64,))
        x = data[index].cuda(non_blocking=True)
        y = labels[index].to("cuda")
        with autocast(dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    torch.cuda.synchronize()
    if torch.cuda.is_available():
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    if dist.is_initialized():
        total = torch.tensor([losses[-1]], device=torch.device("cuda", local_rank))
        dist.all_reduce(total)
        dist.destroy_process_group()
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.time() - start:.2f} s")


if __name__ == "__main__":
    main()

"""Data-parallel training under torchrun (DDP), configured nanoGPT-style: module-level settings overridden on the
command line as --key=value. `python train_ddp.py` runs one process; `torchrun --nproc_per_node 2 train_ddp.py`
two (launch.sh)."""

import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import all_reduce, destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from devices import synchronize

# ----------------------------------------------------------------------------- settings
steps = 6
batch_size = 16
learning_rate = 1e-2
backend = "nccl"  # 'nccl', 'gloo', etc.  # [cuda-only]
device = "cuda"  # 'cpu', 'cuda', 'cuda:0', 'cuda:1', ...  # [cuda-only]
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"  # [cuda-only]
for argument in sys.argv[1:]:
    key, value = argument.removeprefix("--").split("=")
    globals()[key] = type(globals()[key])(value)
# -----------------------------------------------------------------------------

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # [cuda-only]
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    init_process_group(backend=backend)
    ddp_rank = int(os.environ["RANK"])
    ddp_local_rank = int(os.environ["LOCAL_RANK"])
    ddp_world_size = int(os.environ["WORLD_SIZE"])
    if device == "cuda":  # [cuda-only]
        device = f"cuda:{ddp_local_rank}"  # [cuda-only]
        torch.cuda.set_device(device)  # [cuda-only]
    master_process = ddp_rank == 0
else:
    ddp_rank, ddp_world_size, master_process = 0, 1, True
torch.manual_seed(1337)
device_type = "cuda" if "cuda" in device else "cpu"  # [cuda-only]
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
ctx = nullcontext() if device_type == "cpu" else torch.amp.autocast(device_type=device_type, dtype=ptdtype)

data = torch.randn(steps * batch_size * ddp_world_size, 24, generator=torch.Generator().manual_seed(0))
targets = torch.sin(data[:, 0]) + 0.5 * data[:, 1]


def get_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    start = (step * ddp_world_size + ddp_rank) * batch_size
    x, y = data[start:start + batch_size], targets[start:start + batch_size]
    if device_type == "cuda":  # [cuda-only]
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y


model = nn.Sequential(nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 1)).to(device)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)  # [cuda-only]
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)

start = time.time()
for step in range(steps):
    x, y = get_batch(step)
    with ctx:
        loss = F.mse_loss(model(x).squeeze(-1), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if master_process:
        print(f"step {step} loss {loss.item():.6f}")
synchronize(torch.device(device))
if ddp:
    mean = loss.detach().clone()
    all_reduce(mean)
    if master_process:
        print(f"mean final loss {mean.item() / ddp_world_size:.6f} over {ddp_world_size} ranks")
    destroy_process_group()
if master_process:
    print(f"{steps} steps in {time.time() - start:.2f} s")

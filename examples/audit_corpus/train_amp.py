"""Mixed-precision training: bf16 where the GPU supports it, else fp16 with a gradient scaler; bf16 autocast on the
CPU (--cpu, or no GPU)."""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from devices import memory_allocated, synchronize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available() and not args.cpu  # [cuda-only]
    device = torch.device("cuda" if use_cuda else "cpu")  # [cuda-only]
    if use_cuda and torch.cuda.is_bf16_supported():  # [cuda-only]
        amp_dtype = torch.bfloat16
    elif use_cuda:
        amp_dtype = torch.float16
    else:
        amp_dtype = torch.bfloat16
    print(f"autocast {amp_dtype} on {device.type}")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=use_cuda)
    scaler = torch.cuda.amp.GradScaler(enabled=amp_dtype == torch.float16)  # [cuda-only]
    data = torch.randn(256, 32)
    labels = data[:, :8].argmax(dim=1)
    for step in range(args.steps):
        index = torch.arange(step * 32, (step + 1) * 32) % len(data)
        x, y = data[index].to(device, non_blocking=True), labels[index].to(device)
        with torch.autocast(device_type=device.type, dtype=amp_dtype):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        print(f"step {step} loss {loss.item():.6f}")
    synchronize(device)
    print(f"memory {memory_allocated(device)} bytes")


if __name__ == "__main__":
    main()

"""Train a small classifier on one NVIDIA GPU (in the style of pytorch/examples): --no-cuda trains on the CPU."""

import argparse
import shutil
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from devices import describe, seed_everything


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def batches(steps: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(steps * batch_size, 16, generator=generator)
    labels = (data[:, 0] > 0).long() + 2 * (data[:, 1] > 0).long()
    return list(zip(data.split(batch_size), labels.split(batch_size)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-cuda", action="store_true", help="train on the CPU")
    parser.add_argument("--checkpoint", default="single.pt")
    args = parser.parse_args()

    use_cuda = not args.no_cuda and torch.cuda.is_available()  # [cuda-only]
    seed_everything(args.seed)
    if use_cuda:
        torch.cuda.manual_seed(args.seed)  # [cuda-only]
        torch.backends.cudnn.benchmark = True
    device = torch.device("cuda" if use_cuda else "cpu")  # [cuda-only]
    print(f"training on {describe(device)}")
    if use_cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)}")  # [cuda-only]
    if shutil.which("nvidia-smi"):  # [cuda-only]
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used", "--format=csv"], check=False)  # [cuda-only]

    model = Net().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = time.time()
    for step, (data, target) in enumerate(batches(args.steps, 32, args.seed)):
        if use_cuda:
            data, target = data.cuda(non_blocking=True), target.cuda(non_blocking=True)  # [cuda-only]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
        print(f"step {step} loss {loss.item():.6f}")
    if use_cuda:
        torch.cuda.synchronize()  # [cuda-only]
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")  # [cuda-only]
    print(f"{args.steps} steps in {time.time() - start:.2f} s")

    torch.save(model.state_dict(), args.checkpoint)
    state = torch.load(args.checkpoint, map_location="cuda:0" if use_cuda else "cpu")  # [cuda-only]
    model.load_state_dict(state)


if __name__ == "__main__":
    main()

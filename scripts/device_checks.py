"""What `scripts/accelerator_check.sh` checks in Python on one accelerator (CUDA or Ascend NPU; `--device cpu`
runs the same checks on the CPU): each line prints `ok` or `FAIL` with the figure it measured; the exit status is
the number of failures.

1. collectives: a 1-rank process group on the device's own backend (NCCL / HCCL, plus gloo for host tensors, as the
   trainer creates it) runs every reduction the trainer makes (polytrain's float64 sums, agreement flags, gradient
   norms) and the collectives FSDP and expert parallelism use, under the placement checker;
2. kernels: the grouped expert GEMM and the fused output-head loss on the device against their references;
3. models: tiny DeepSeek-V3 and V4 forward / backward on the device in bf16 against fp32 on the CPU;
4. Hugging Face parity: transformers' tiny DeepSeek-V3 and polytrain give the same logits on the device.

Usage: python scripts/device_checks.py --device cuda|npu|cpu
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def collectives(device: torch.device) -> str:
    import torch.distributed as dist

    from polytrain.backends import get_backend
    from polytrain.parallel.collectives import CHECK_ENV, install_check, sum_
    from polytrain.parallel.grad_norm import global_grad_norm

    backend = get_backend(device.type)
    os.environ.setdefault(CHECK_ENV, backend.dist_backend)
    install_check(device.type)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    dist.init_process_group(backend.process_group_backend, rank=0, world_size=1)
    try:
        counts = torch.tensor([1.5, 2.0**40 + 3], dtype=torch.float64)
        sum_(counts, None, device)
        flag = torch.tensor([0], dtype=torch.int64)
        sum_(flag, None, device)
        weight = torch.nn.Parameter(torch.ones(4, 4, device=device))
        weight.grad = torch.full((4, 4), 2.0, device=device)
        norm = float(global_grad_norm([weight], dist.group.WORLD, device))
        x = torch.arange(8, dtype=torch.float32, device=device)
        out = torch.empty_like(x)
        dist.all_gather_into_tensor(out, x)
        dist.reduce_scatter_tensor(out, x)
        dist.all_to_all_single(out, x)
        dist.all_reduce(x.to(torch.bfloat16))
        assert counts.tolist() == [1.5, 2.0**40 + 3] and int(flag) == 0 and abs(norm - 8.0) < 1e-5, (counts, norm)
        return f"{backend.process_group_backend}: float64 sums exact, gradient norm {norm:.6f}"
    finally:
        dist.destroy_process_group()


def kernels(device: torch.device) -> str:
    from polytrain.models.common.moe import grouped_swiglu, grouped_swiglu_reference
    from polytrain.models.common.output_head import fused_linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=generator)
    gate_up, down = torch.randn(4, 48, 32, generator=generator) * 0.1, torch.randn(4, 32, 24, generator=generator) * 0.1
    counts = torch.tensor([10, 0, 30, 24])
    expected = grouped_swiglu_reference(x, counts.tolist(), gate_up, down)
    got = grouped_swiglu(x.to(device), counts.to(device), gate_up.to(device), down.to(device)).cpu()
    gemm = float((got - expected).abs().max())
    hidden, weight = torch.randn(40, 32, generator=generator), torch.randn(100, 32, generator=generator)
    labels = torch.randint(0, 100, (40,), generator=generator)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    fused = float(fused_linear_cross_entropy(hidden.to(device), weight.to(device), labels.to(device)).cpu())
    assert gemm < 1e-4 and abs(fused - float(plain)) < 1e-3 * abs(float(plain)), (gemm, fused, float(plain))
    return f"grouped GEMM max diff {gemm:.1e}; fused head loss {fused:.4f} vs {float(plain):.4f}"


def models(device: torch.device) -> str:
    from polytrain.models import build_model, preset

    out = []
    for name in ("tiny-v3", "tiny-v4"):
        reference = build_model(preset(name), "cpu", seed=0)
        on_device = build_model(preset(name), device, seed=0)
        ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
        expected = reference(ids).float()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type != "cpu"):
            logits = on_device(ids.to(device))
        logits.float().pow(2).mean().backward()
        diff = float((logits.detach().float().cpu() - expected).abs().max())
        assert diff < 0.1, (name, diff)
        assert all(p.grad is not None for p in on_device.embed_tokens.parameters()), name
        out.append(f"{name} bf16 logits within {diff:.3f} of fp32 CPU")
    return "; ".join(out)


def hf_parity(device: torch.device) -> str:
    sys.path.insert(0, str(ROOT))
    from tests.integration.hf_fixtures import make_hf_v3

    from polytrain.models import build_model
    from polytrain.models.hf import HFCheckpoint, load_hf_weights

    with tempfile.TemporaryDirectory() as tmp:
        reference = make_hf_v3(Path(tmp), yarn=True).to(device)
        checkpoint = HFCheckpoint(tmp)
        model = build_model(replace(checkpoint.model_config, num_nextn_predict_layers=0), device, seed=None)
        load_hf_weights(model, checkpoint)
        ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2)).to(device)
        with torch.no_grad():
            diff = float((model(ids) - reference(ids).logits).abs().max())
    assert diff <= 1e-3, diff
    return f"tiny DeepSeek-V3 (YaRN) logits max diff {diff:.1e} against transformers"


CHECKS: list[tuple[str, Callable[[torch.device], str]]] = [
    ("collectives", collectives), ("kernels", kernels), ("models", models), ("hf parity", hf_parity)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", required=True, choices=("cuda", "npu", "cpu"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renamed collectives, which FSDP still uses
    from polytrain.backends import get_backend

    backend = get_backend(args.device)
    device = backend.device()
    failures = 0
    for name, check in CHECKS:
        try:
            print(f"ok   {name}: {check(device)}", flush=True)
        except Exception as err:  # report every check, then fail
            failures += 1
            print(f"FAIL {name}: {type(err).__name__}: {err}", flush=True)
            traceback.print_exc()
    return failures


if __name__ == "__main__":
    raise SystemExit(main())

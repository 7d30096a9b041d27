"""Benchmark a job config: the real training step (data, forward, backward, clipping, optimizer), timed.

The job is built exactly as `polytrain sft|dpo|... CONFIG` builds it (same Trainer, same parallel layout, same
precision), in a temporary run directory. The first `warmup` steps (allocation, autotuning, first-touch) are not
timed; each measured step is bracketed by device synchronisation.
"""

from __future__ import annotations

import datetime
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from polytrain.bench.measure import matmul_peak, summarize
from polytrain.config import JobConfig
from polytrain.errors import ConfigError
from polytrain.plan.flops import flops_per_token

SCHEMA = "polytrain.bench/1"


def bench_job(
    config: JobConfig,
    steps: int = 10,
    warmup: int = 3,
    peak_flops: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run `warmup` + `steps` optimizer steps of the job; return the figures (see docs/performance.md)."""
    from polytrain.train.trainer import Trainer

    if steps < 2:
        raise ConfigError("--steps must be >= 2 (the spread of step times needs several steps)")
    if warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    with tempfile.TemporaryDirectory(prefix="polytrain-bench-") as tmp:
        config.run.output_dir = tmp
        config.checkpoint.async_save = False
        trainer = Trainer(config, overwrite=True)
        try:
            backend, runtime = trainer.backend, trainer.runtime
            precision = trainer.amp_dtype or torch.float32
            # measured before and after the steps, the higher taken: MFU against the machine as fast as it was
            # during the run (a shared host can run at half speed for minutes)
            peaks = [matmul_peak(backend, precision)] if peak_flops is None else []
            times: list[float] = []
            tokens = 0
            for index in range(warmup + steps):
                backend.synchronize()
                start = time.perf_counter()
                stats = trainer.train_step()
                backend.synchronize()
                elapsed = time.perf_counter() - start
                measured = index >= warmup
                if measured:
                    times.append(elapsed)
                    tokens += stats["tokens"]
                if progress is not None:
                    kind = "step" if measured else "warm-up"
                    progress(f"{kind} {index + 1}/{warmup + steps}: {elapsed:.3f} s, loss {stats['loss']:.4f}")
            memory = backend.memory_stats()
            source = "given (--peak-flops)"
            if peak_flops is None:
                peak_flops = max(*peaks, matmul_peak(backend, precision)) * runtime.world_size
                source = (f"measured {str(precision).replace('torch.', '')} matmul (higher of before / after the "
                          f"steps), x {runtime.world_size} devices")
            layout = runtime.describe()
            world = runtime.world_size
            params = sum(p.numel() for p in trainer.model.parameters())
        finally:
            trainer.runtime.close()

    seq_len = config.data.max_seq_len
    per_token = flops_per_token(config.model, seq_len).total
    timing = summarize(times)
    # headline from the median step (robust to a stray slow step); the mean over all measured steps beside it
    tokens_per_s = tokens / steps / timing["median"]
    achieved = tokens_per_s * per_token
    return {
        "schema": SCHEMA,
        "backend": backend.name,
        "device": backend.describe(),
        "world_size": world,
        "layout": layout,
        "algorithm": config.run.algorithm,
        "model": {"preset": config.model.preset, "parameters": params, "seq_len": seq_len},
        "precision": str(precision).replace("torch.", ""),
        "global_batch_size": config.train.global_batch_size,
        "micro_batch_size": config.train.micro_batch_size,
        "steps": steps,
        "warmup": warmup,
        "tokens_per_step": tokens / steps,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / world,
        "tokens_per_s_mean": tokens / sum(times),
        "step_time_s": timing,
        "model_flops_per_token": per_token,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak_flops,
        "peak_flops_source": source,
        "mfu": achieved / peak_flops,
        "peak_device_memory_bytes": memory.device_peak_allocated,
        "peak_host_memory_bytes": memory.host_peak_rss,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

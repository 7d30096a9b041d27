"""Layout search: enumerate TP / PP / EP / DP / CP, ZeRO level, offload, recomputation, micro-batch and schedule;
keep the layouts that fit; rank them by predicted throughput."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from polytrain.errors import ConfigError
from polytrain.models.registry import spec_for
from polytrain.parallel.validate import ENGINE_SCHEDULES, MULTI_STAGE
from polytrain.plan.hardware import Chip
from polytrain.plan.layout import Job, Layout
from polytrain.plan.memory import GiB, Memory, device_memory
from polytrain.plan.timing import StepTime, step_time

USABLE_FRACTION = 0.92
"""Share of device memory a training process can allocate (runtime context, allocator fragmentation)."""
HOST_USABLE_FRACTION = 0.8


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: Memory
    time: StepTime
    fits: bool
    engine_gaps: tuple[str, ...]

    def as_dict(self) -> dict:
        lay = self.layout
        return {
            "layout": {k: getattr(lay, k) for k in ("dp", "tp", "pp", "ep", "cp", "zero", "offload", "recompute",
                                                    "micro_batch", "schedule", "experts_over_tp")},
            "memory_gib": {k: round(v / GiB, 3) for k, v in self.memory.as_dict().items() if k != "stage"},
            "memory_stage": self.memory.stage,
            "time": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.time.as_dict().items()},
            "fits": self.fits,
            "runs_on_polytrain": not self.engine_gaps,
            "engine_gaps": list(self.engine_gaps),
        }


@dataclass(frozen=True)
class SearchResult:
    plans: list[Plan]
    """Fitting layouts, fastest first."""
    evaluated: int
    seconds: float
    closest: Plan | None
    """When nothing fits: the layout needing the least memory."""


def pressure(memory: Memory, chip: Chip) -> float:
    """Need over capacity of the tighter of device and host memory (<= 1: fits)."""
    device = memory.device / (chip.memory_bytes * USABLE_FRACTION)
    host = memory.host * chip.devices_per_node / (chip.host_memory_gb * 1e9 * HOST_USABLE_FRACTION)
    return max(device, host)


def fits(memory: Memory, chip: Chip) -> bool:
    return pressure(memory, chip) <= 1


def evaluate(job: Job, layout: Layout, chip: Chip) -> Plan:
    problems = layout.problems(job.model)
    if problems:
        raise ConfigError(f"layout {layout.short()}: " + "; ".join(problems))
    memory = device_memory(job, layout)
    return Plan(layout, memory, step_time(job, layout, chip), fits(memory, chip), tuple(layout.job_gaps(job)))


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def candidates(job: Job, devices: int, chip: Chip, *, engine_only: bool = True) -> list[Layout]:
    c = job.model
    tps = [t for t in _powers_of_two(min(chip.devices_per_node, 8)) if c.num_attention_heads % t == 0]
    if engine_only and (spec_for(c).tensor_parallel is None or not spec_for(c).sequence_parallel):
        tps = [1]  # the planner models tensor parallelism with sequence parallelism
    pps = [p for p in _powers_of_two(min(64, c.num_hidden_layers)) if devices % p == 0]
    cps = [1] if job.seq_len < 16384 or (engine_only and not spec_for(c).context_parallel) else [1, 2, 4, 8]
    eps = [e for e in range(1, c.n_routed_experts + 1) if c.n_routed_experts % e == 0 and e <= 512]
    out = []
    for tp, pp, cp in itertools.product(tps, pps, cps):
        if devices % (tp * pp * cp):
            continue
        dp = devices // (tp * pp * cp)
        seqs_per_rank = job.global_batch_sequences / dp
        if seqs_per_rank < 1:
            continue
        schedules = ["1f1b"] if pp == 1 else [s for s in ("1f1b", "interleaved_1f1b", "zbv", "dualpipev", "dualpipe")
                                               if not engine_only or s in ENGINE_SCHEDULES]
        for ep in eps:
            if (dp * cp) % ep:
                continue
            for zero, offload, recompute, mb, schedule in itertools.product(
                    (1, 2, 3), ("none", "optimizer", "all"), ("none", "selective", "full"), (1, 2, 4), schedules):
                if mb > seqs_per_rank or (offload == "all" and zero != 3):
                    continue
                if engine_only and (zero == 1 or offload == "optimizer"):
                    continue
                if schedule in ("dualpipe", "dualpipev") and pp % 2:
                    continue
                if pp * (2 if schedule in MULTI_STAGE else 1) > c.num_hidden_layers:  # a stage without layers
                    continue
                out.append(Layout(dp=dp, tp=tp, pp=pp, ep=ep, cp=cp, zero=zero, offload=offload,
                                  recompute=recompute, micro_batch=mb, schedule=schedule))
    return out


def rank(plans: list[Plan], tie: float = 0.005) -> list[Plan]:
    """Fastest first; plans within `tie` of a faster one's throughput are ordered by the memory they need."""
    plans = sorted(plans, key=lambda p: -p.time.tokens_per_s_per_device)
    out: list[Plan] = []
    while plans:
        lead = plans[0].time.tokens_per_s_per_device
        group = [p for p in plans if p.time.tokens_per_s_per_device >= lead * (1 - tie)]
        out += sorted(group, key=lambda p: p.memory.device)
        plans = plans[len(group):]
    return out


def check_devices(job: Job, devices: int) -> None:
    if devices < 1:
        raise ConfigError("--devices must be >= 1")
    if job.global_batch_sequences < 1:
        raise ConfigError("--global-batch-tokens is smaller than one sequence (--seq-len)")


def search(job: Job, devices: int, chip: Chip, *, engine_only: bool = True) -> SearchResult:
    check_devices(job, devices)
    job.shape, job.flops  # noqa: B018  (the model is counted once on the meta device, before the timed search)
    start = time.perf_counter()
    layouts = candidates(job, devices, chip, engine_only=engine_only)
    if not layouts:
        raise ConfigError(
            f"no layout splits {devices} devices for this model and batch: use a device count with more factors "
            f"of 2 (e.g. {2 ** max(0, devices.bit_length() - 1)} or {2 ** devices.bit_length()}) and at least one "
            "sequence per data-parallel rank")
    fitting, best_miss = [], None
    for layout in layouts:
        memory = device_memory(job, layout)
        if not fits(memory, chip):
            if best_miss is None or pressure(memory, chip) < pressure(best_miss.memory, chip):
                best_miss = Plan(layout, memory, step_time(job, layout, chip), False, ())
            continue
        fitting.append(Plan(layout, memory, step_time(job, layout, chip), True, tuple(layout.job_gaps(job))))
    fitting = rank(fitting)
    return SearchResult(fitting, len(layouts), time.perf_counter() - start, best_miss)


def minimum_devices(job: Job, chip: Chip, start: int, *, engine_only: bool = True, limit: int = 1 << 17) -> int | None:
    """The smallest power-of-two multiple of the node size >= start on which some layout fits."""
    devices = max(chip.devices_per_node, 2 ** max(0, (start - 1).bit_length()))
    while devices <= limit:
        if search(job, devices, chip, engine_only=engine_only).plans:
            return devices
        devices *= 2
    return None

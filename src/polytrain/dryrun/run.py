"""One training step of a job at its real size and world size, in one CPU process, for chosen ranks."""

from __future__ import annotations

import contextlib
import copy
import math
import multiprocessing
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from polytrain.backends import get_backend
from polytrain.config import JobConfig
from polytrain.dryrun.fake import balance_expert_routing, fake_world
from polytrain.dryrun.tracking import StepObserver, group_names, local_bytes, watching_unsharded_gradients
from polytrain.errors import ConfigError, PolytrainError
from polytrain.models.common.moe import update_router_biases
from polytrain.objectives import registry
from polytrain.objectives.context import ObjectiveContext
from polytrain.parallel.mesh import ParallelDims
from polytrain.parallel.runtime import ParallelRuntime
from polytrain.parallel.shards import materialize
from polytrain.train.frozen import frozen_run_model, reference_model
from polytrain.train.optim import build_optimizer


@dataclass
class RankReport:
    """What one rank holds and sends during one training step."""

    rank: int
    role: str
    parameter_bytes: int
    """This rank's parameters as laid out (its shards), in their storage dtype."""
    optimizer_bytes: int
    """This rank's optimizer state after the step."""
    peak_bytes: int
    """The tracker's peak of all live tensors, and each category's bytes at that moment."""
    peak_by_category: dict[str, int]
    collectives: list[dict[str, Any]]
    seconds: float
    notes: list[str] = field(default_factory=list)
    device_peak_bytes: int | None = None
    """With parallel.cpu_offload: the peak without what FSDP keeps in host memory (sharded parameters, their
    gradients, optimizer state); None without offload (everything is on the device: `peak_bytes`)."""

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "role": self.role, "parameter_bytes": self.parameter_bytes,
                "optimizer_bytes": self.optimizer_bytes, "peak_bytes": self.peak_bytes,
                "peak_by_category": self.peak_by_category, "collectives": self.collectives,
                "seconds": round(self.seconds, 2), "notes": self.notes, "device_peak_bytes": self.device_peak_bytes}


def roles(dims: ParallelDims) -> list[tuple[int, str]]:
    """One rank per distinct role: every rank alike without pipelining; else the first and the last stage's."""
    if dims.pp == 1:
        return [(0, "every rank alike: no pipeline stages")]
    per_stage = dims.world_size // dims.pp
    return [(0, "pipeline rank 0"), ((dims.pp - 1) * per_stage, f"pipeline rank {dims.pp - 1}")]


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0]


def _frozen_models(objective: Any, model: torch.nn.Module) -> list[torch.nn.Module]:
    """The models the objective keeps besides the one it trains (a DPO reference, distillation teachers)."""
    found = []
    for value in vars(objective).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.nn.Module) and item is not model:
                found.append(item)
    return found


def _create_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The state the optimizer holds from its first step on (moments), so the tracked step is a steady one."""
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def dry_run_config(config: JobConfig) -> JobConfig:
    """The job as the dry run runs it: no starting weights to read (values do not matter), one step."""
    job = copy.copy(config)  # not dataclasses.replace: the algorithm sections are not __init__ fields
    job.init = replace(config.init, hf_path="", from_run="")
    return job


def run_rank(config: JobConfig, world: int, rank: int, role: str, fake_tensors: bool = True) -> RankReport:
    """One training step of `config` as rank `rank` of `world` (see the package docstring). `fake_tensors` =
    False runs the same step on real tensors (small models: to check the dry run against itself)."""
    started = time.perf_counter()
    config = dry_run_config(config)
    with fake_world(world, rank):
        backend = get_backend("cpu")
        runtime = ParallelRuntime(config.parallel, config.model, backend)
        runtime.all_agree = lambda ok: ok  # every rank of the fake world is this one (see fake.py)
        device = backend.device()
        amp = torch.float32 if config.run.precision == "fp32" else torch.bfloat16  # "auto": an accelerator's
        from polytrain.train.trainer import batch_maker, check_job, lay_out

        train = config.train
        ctx = ObjectiveContext(
            config=config, device=device, tokenizer=None, template=None,
            batches=batch_maker(config, runtime, device),
            collectives=runtime, autocast=lambda: backend.autocast(amp), warn=lambda message: None,
            info=lambda message: None, rollouts=False,
            reference_model=lambda: reference_model(config, runtime, device),
            frozen_run_model=lambda run_dir: frozen_run_model(run_dir, config, runtime, device),
        )
        objective = registry.objective_class(config.run.algorithm)(ctx)
        check_job(objective, config, runtime.dims)
        model, full_model = lay_out(objective, runtime)
        ctx.pipeline = runtime.pipeline
        balance_expert_routing(model)
        items = objective.dry_run_items(train.global_batch_size, torch.Generator().manual_seed(0))
        step, mine = objective.dry_run_step(items, torch.Generator().manual_seed(1))
        tensors = FakeTensorMode(allow_non_fake_inputs=True) if fake_tensors else contextlib.nullcontext()
        with tensors:
            materialize(model, full_model, device, seed=None if fake_tensors else config.run.seed)
            model.train()
            setup = StepObserver({}, placeholders=fake_tensors, record=False)
            with setup:  # set-up reads values too (e.g. a consistency check of the reference model)
                objective.after_parallelize(model)
            optimizer = build_optimizer(model, train, foreach=not runtime.dims.enabled)  # as the trainer
            parameter_bytes = local_bytes(list(model.parameters()))
            with setup:
                _create_optimizer_state(model, optimizer)
            observer = StepObserver(group_names(runtime.meshes), placeholders=fake_tensors,
                                    offload=config.parallel.cpu_offload)
            memory = observer.memory
            memory.tag(model.parameters(), "parameters")
            memory.tag(model.buffers(), "parameters")
            memory.tag(_state_tensors(optimizer), "optimizer state")
            for frozen in _frozen_models(objective, model):  # a reference model, teachers
                memory.tag([*frozen.parameters(), *frozen.buffers()], "frozen models")
            memory.watch_gradients(model.parameters())
            with observer.watching_resizes(), watching_unsharded_gradients(memory), observer:
                sums = objective.forward_backward(model, mine, step, 1.0)
                runtime.dp_sum(sums)
                runtime.clip_grad_norm(model, train.grad_clip if train.grad_clip > 0 else math.inf)
                with observer.phase("optimizer"):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                update_router_biases(model, train.router_bias_update_rate, all_reduce=runtime.dp_sum)
            optimizer_bytes = local_bytes(_state_tensors(optimizer))
    return RankReport(rank, role, parameter_bytes, optimizer_bytes, memory.peak, memory.peak_by_category,
                      observer.collectives.table(), time.perf_counter() - started,
                      device_peak_bytes=memory.device_peak if memory.offload else None)


_ran_here = False  # a fake world ran in this process (`dry_run` runs a lone rank here only the first time)


def dry_run(config: JobConfig, world: int, ranks: list[int] | None = None,
            progress: Any = None) -> list[RankReport]:
    """Reports for `ranks` (default: one per distinct role) of `config` on `world` ranks."""
    dims = ParallelDims.resolve(config.parallel, world, config.model)
    chosen = [(r, f"rank {r}") for r in ranks] if ranks else roles(dims)
    for rank, _ in chosen:
        if not 0 <= rank < world:
            raise ConfigError(f"--rank {rank} is outside the world of {world} ranks")
    global _ran_here
    if len(chosen) == 1 and not _ran_here:
        _ran_here = True
        if progress is not None:
            progress(f"rank {chosen[0][0]} ({chosen[0][1]}) ...")
        return [run_rank(config, world, *chosen[0])]
    # one process per rank: torch keeps process groups and meshes of a destroyed world in module-level caches (a
    # second fake world in one process saw the first one's rank in its meshes' coordinates)
    reports = []
    context = multiprocessing.get_context("spawn")
    for rank, role in chosen:
        if progress is not None:
            progress(f"rank {rank} ({role}) ...")
        with context.Pool(1) as pool:
            outcome = pool.apply(_run_rank_reporting, (config, world, rank, role))
        if isinstance(outcome, RankReport):
            reports.append(outcome)
            continue
        kind, message = outcome
        if kind == "config":
            raise ConfigError(message)
        raise RuntimeError(f"rank {rank}: {message}")
    return reports


def _run_rank_reporting(config: JobConfig, world: int, rank: int, role: str) -> RankReport | tuple[str, str]:
    """`run_rank` in a worker process: its report, or its error as text (not every exception pickles)."""
    try:
        return run_rank(config, world, rank, role)
    except PolytrainError as err:
        return "config", str(err)
    except Exception as err:
        return "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"

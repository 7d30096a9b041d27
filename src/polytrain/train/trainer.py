"""The one training loop, for every objective: data, optimizer steps with gradient accumulation and clipping, eval,
metrics, checkpoints, resume, the guard and the hang watchdog; single process or one rank of a torchrun job
(layout = `[parallel]`). The objective (objectives/) sees the job only through its ObjectiveContext."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from polytrain.backends import Backend, get_backend
from polytrain.config import JobConfig
from polytrain.data.batches import BatchMaker
from polytrain.data.chat import get_template
from polytrain.data.loader import StepLoader
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import BackendError, CheckpointError, ConfigError, RunDirError
from polytrain.models.common.moe import Router, update_router_biases
from polytrain.objectives import registry
from polytrain.objectives.base import Objective
from polytrain.objectives.context import ObjectiveContext
from polytrain.parallel.fsdp import reshard_all
from polytrain.parallel.mesh import ParallelDims
from polytrain.parallel.pp import split_layers
from polytrain.parallel.runtime import ParallelRuntime
from polytrain.parallel.shards import materialize, tensors_to_initialise
from polytrain.parallel.validate import MULTI_STAGE, pipeline_problems
from polytrain.plan.flops import flops_per_token
from polytrain.plan.hardware import chip_for_device_name
from polytrain.schema import to_dict
from polytrain.train.checkpoint import Checkpointer, checkpoint_root, latest_checkpoint, load_checkpoint
from polytrain.train.faults import Faults
from polytrain.train.frozen import frozen_run_model, reference_model
from polytrain.train.guard import EVENTS_FILE, Guard, GuardEvent
from polytrain.train.metrics import MetricsWriter
from polytrain.train.optim import build_optimizer, lr_at, set_lr
from polytrain.train.plot import plot_run
from polytrain.train.progress import Progress as StepProgress
from polytrain.train.run_dir import CONFIG_FILE, check_run_dir, write_run_dir
from polytrain.train.signals import StopRequest, TrainingInterrupted
from polytrain.train.trackers import check_trackers, open_trackers
from polytrain.train.watchdog import Watchdog

SUMMARY_FILE = "summary.json"

__all__ = ["Trainer", "TrainingInterrupted"]


def resolve_precision(precision: str, backend: Backend) -> torch.dtype | None:
    """The autocast dtype for `run.precision` (None = fp32), failing loudly if the backend lacks it."""
    if precision == "fp32":
        return None
    if precision == "auto":
        return backend.amp_dtype
    if not backend.capabilities.bf16:
        raise BackendError(f"run.precision = \"bf16\" but the {backend.name} backend has no bf16 support here")
    return torch.bfloat16


def check_job(objective: type[Objective] | Objective, config: JobConfig, dims: ParallelDims) -> None:
    """What the engine checks before it builds anything, beyond the layout against the model (`ParallelDims.resolve`):
    the step's batch against the layout, the objective under pipeline parallelism, the pipeline's stages. The
    planner marks a layout runnable only if the same functions (parallel/validate.py) accept it, and a test holds
    the two to it (tests/unit/test_plan_engine_agree.py)."""
    objective.check_config(config, dims.dp)
    objective.check_world(config, dims.world_size)
    parallel, train = config.parallel, config.train
    if dims.cp > 1 and not objective.supports_context_parallel:
        raise ConfigError(f"parallel.cp > 1 is not supported for {objective.name} yet")
    if dims.tp > 1 and parallel.sequence_parallel and objective.decodes_in_process(config):
        raise ConfigError(f"{objective.name} samples with the built-in engine (rollouts, or evaluation with "
                          f"data.eval_path), whose one-token decoding steps cannot be split by sequence position over "
                          f"parallel.tp = {dims.tp} ranks: set parallel.sequence_parallel = false")
    if dims.pp > 1:
        if not objective.supports_pipeline:
            raise ConfigError(f"parallel.pp > 1 is not supported for {objective.name} yet")
        if objective.items_split_into_micro_batches:
            found = pipeline_problems(parallel.pp_schedule, dims.pp,
                                      train.global_batch_size // (dims.dp * train.micro_batch_size))
            if found:
                raise ConfigError("; ".join(found))
        stages = dims.pp * (2 if parallel.pp_schedule in MULTI_STAGE else 1)
        split_layers(config.model.num_hidden_layers, stages, parallel.pp_first_stage_layers)
    if dims.cp > 1 and dims.pp > 1 and config.data.max_seq_len % (2 * dims.cp):
        raise ConfigError(f"data.max_seq_len = {config.data.max_seq_len} must be a multiple of 2 x parallel.cp = "
                          f"{2 * dims.cp} for context parallelism inside pipeline stages (every micro-batch is "
                          "one max_seq_len-wide shape, split into 2 x cp chunks)")
    if dims.tp > 1 and dims.pp > 1 and parallel.sequence_parallel and config.data.max_seq_len % (dims.tp * dims.cp):
        what = f"parallel.tp = {dims.tp}" + (f" x parallel.cp = {dims.cp}" if dims.cp > 1 else "")
        raise ConfigError(f"data.max_seq_len = {config.data.max_seq_len} must be a multiple of {what} for "
                          "sequence parallelism inside pipeline stages")


def lay_out(objective: Objective, runtime: ParallelRuntime) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module to train: this rank's part of the model, laid out, still on the meta device; the whole model on
    the meta device). Nothing is allocated."""
    config = objective.config
    train = config.train
    per_rank = train.global_batch_size // runtime.dp_size
    full_model = objective.build_model("meta")
    width = config.data.max_seq_len // runtime.dims.cp  # a pipeline stage's rows hold this rank's chunks
    rows = objective.ctx.batches.rows = objective.pipeline_rows()
    model = runtime.parallelize(full_model, per_rank // train.micro_batch_size, rows, width, objective.train_outputs)
    return model, full_model


def batch_maker(config: JobConfig, runtime: ParallelRuntime, device: torch.device) -> BatchMaker:
    """Device batches as the layout takes them: widths a multiple of tp (sequence parallelism), this rank's chunks
    of each row (context parallelism)."""
    data = config.data
    multiple = runtime.dims.tp if config.parallel.sequence_parallel else 1
    return BatchMaker(data.max_seq_len, data.packing, config.train.micro_batch_size, multiple, device,
                      runtime.context_split)


def restarted_by_launcher() -> bool:
    """True in a job torchrun restarted after a failure (--max-restarts): such a job resumes by itself."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


class Trainer:
    """Runs one Objective: set-up, the optimizer-step loop, eval, checkpoints, guard, watchdog, metrics.
    `objective`: the Objective class (default: the one registered for `run.algorithm`)."""

    def __init__(self, config: JobConfig, objective: type[Objective] | None = None, resume: bool | str = False,
                 overwrite: bool = False, console: Console | None = None,
                 stop_at_step: int | None = None) -> None:
        self.config = config
        self.stop_at_step = stop_at_step
        self._stop: StopRequest | None = None  # set while train() runs: it shields checkpoint writes
        self.backend = get_backend(config.run.device)
        self.backend.prepare_training()
        self.runtime = ParallelRuntime(config.parallel, config.model, self.backend)
        main = self.runtime.is_main
        # soft_wrap: lines are never cut at 80 columns where the console is a file or a cluster log
        self.console = ((console or Console(stderr=True, soft_wrap=True)) if main
                        else Console(file=io.StringIO(), quiet=True))
        self.device = self.backend.device()
        self.amp_dtype = resolve_precision(config.run.precision, self.backend)
        self.per_rank = config.train.global_batch_size // self.runtime.dp_size

        data = config.data
        tokenizer = Tokenizer.load(data.tokenizer)
        self.ctx = ObjectiveContext(
            config=config, device=self.device, tokenizer=tokenizer,
            template=get_template(data.chat_template, tokenizer),
            batches=batch_maker(config, self.runtime, self.device),
            collectives=self.runtime, autocast=self.autocast, warn=self.warn, info=self.console.print,
            reference_model=lambda: reference_model(config, self.runtime, self.device),
            frozen_run_model=lambda run_dir: frozen_run_model(run_dir, config, self.runtime, self.device),
        )
        objective = objective or registry.objective_class(config.run.algorithm)
        self.objective = objective(self.ctx)
        self._check_layout()
        check_trackers(config.log.trackers)
        self.objective.load_data()
        # All inputs are valid: only now touch the run directory (checked on every rank, written by one).
        # resume=True (--resume) continues a run or refuses; "or-start" (--resume-or-start), and a job the launcher
        # restarts (torchrun --max-restarts), continue the run if it checkpointed, else start it.
        if resume == "or-start" and overwrite:
            raise RunDirError("--resume-or-start and --overwrite contradict each other: choose one")
        lenient = resume == "or-start" or (not resume and restarted_by_launcher())
        resume = resume is True
        check_run_dir(config, resume or lenient, overwrite, must_hold_a_run=resume)
        self.run_dir = Path(config.run.output_dir)
        self.ctx.run_dir = self.run_dir
        self.faults = Faults(self.runtime.rank)
        ckpt = config.checkpoint
        self.checkpointer = Checkpointer(
            checkpoint_root(self.run_dir, ckpt.dir), ckpt.keep_last, ckpt.keep_every, ckpt.async_save,
            report=self._warn, before_commit=self.faults.before_commit, during_save=self.faults.during_save,
            device=self.device,
        )
        self.resume_from = (self.checkpointer.latest_valid(ckpt.verify_on_resume) if resume or lenient
                            else None)
        if resume and self.resume_from is None:
            raise RunDirError(f"--resume: no usable checkpoint in {self.checkpointer.root}; nothing was changed "
                              "(--overwrite starts the run again from step 0)")
        if lenient and self.resume_from is None and (self.run_dir / CONFIG_FILE).is_file():
            self._warn(f"no usable checkpoint in {self.checkpointer.root}: starting the run from step 0")
        self.runtime.barrier()
        if main:
            write_run_dir(config, overwrite)
        self.runtime.barrier()
        self.guard = Guard(config.guard, self.run_dir / EVENTS_FILE, watch_spikes=self.objective.watch_loss_spikes)
        wd = config.watchdog
        self.watchdog = Watchdog(self.run_dir / f"hang_rank{self.runtime.rank}.txt", wd.step_timeout_s > 0)

        self.backend.manual_seed(config.run.seed)
        # Built on the meta device and laid out there; then only this rank's shards are allocated, initialised
        # (as a function of seed, name and global index: the same values under any layout) and loaded.
        train = config.train
        self.model, full_model = lay_out(self.objective, self.runtime)
        only = tensors_to_initialise(full_model, bool(config.init.hf_path or config.init.from_run),
                                     resumes=self.resume_from is not None)
        materialize(self.model, full_model, self.device, config.run.seed, only)
        if self.resume_from is None:
            self._load_initial_weights(full_model)
        self.ctx.pipeline = self.runtime.pipeline
        self.model.train()
        self.objective.after_parallelize(self.model)
        reshard_all(self.model)  # the optimizer takes the shards, whatever forwards the set-up ran
        self.optimizer = build_optimizer(self.model, train, foreach=not self.runtime.dims.enabled)
        self.loader = StepLoader(len(self.objective.train_items), train.global_batch_size, config.run.seed,
                                 data.shuffle)
        self.step = 0
        self.tokens_seen = 0
        self.eval_history: list[tuple[int, dict[str, float]]] = []

    def _check_layout(self) -> None:
        check_job(self.objective, self.config, self.runtime.dims)

    def warn(self, message: str) -> None:
        """A yellow console line, never re-wrapped or read as markup (messages quote user text)."""
        self.console.print(f"[yellow]{escape(message)}[/]", soft_wrap=True)

    _warn = warn

    def autocast(self):
        return self.backend.autocast(self.amp_dtype)

    # ----------------------------------------------------------------------------------------------- state
    def _load_initial_weights(self, full_model: torch.nn.Module) -> None:
        """Weights of init.hf_path or init.from_run, for a run that starts at step 0 (each rank its shards)."""
        from polytrain.train.init_weights import load_initial_weights

        message = load_initial_weights(self.config.init, self.model, full_model, self.runtime.all_agree)
        if message:
            self.console.print(message)

    def _trainer_state(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "tokens_seen": self.tokens_seen,
                "eval_history": self.eval_history, "guard": self.guard.state_dict(),
                "objective": self.objective.state_dict()}

    def save(self) -> bool:
        """Checkpoint this step (a second Ctrl-C waits for it: `StopRequest.shield`); False if it failed."""
        self.watchdog.arm(self.config.watchdog.checkpoint_timeout_s, f"checkpoint of step {self.step}")
        with self._stop.shield() if self._stop is not None else contextlib.nullcontext():
            ok = self.checkpointer.save(self.step, self.model, self.optimizer, self._trainer_state(),
                                        self.backend.get_rng_state())
        self.watchdog.disarm()
        return ok

    def _wait_for_saves(self) -> bool:
        """Let an asynchronous checkpoint finish (shielded like `save`); False if it failed."""
        with self._stop.shield() if self._stop is not None else contextlib.nullcontext():
            return self.checkpointer.wait()

    def _restore(self, path: Path, rollback: bool = False) -> None:
        state = load_checkpoint(path, self.model, self.optimizer)
        if state["loader"]["num_samples"] != len(self.objective.train_items):
            raise CheckpointError(
                f"{path} was trained on {state['loader']['num_samples']} samples but {self.config.data.train_path} "
                f"now has {len(self.objective.train_items)}: the data changed, so the data position cannot be "
                "restored"
            )
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.tokens_seen = state["tokens_seen"]
        self.eval_history = [(e[0], e[1] if isinstance(e[1], dict) else {"eval_loss": e[1]})
                             for e in state["eval_history"]]
        self.objective.load_state_dict(state.get("objective", {}))
        if not rollback:  # a rollback keeps the guard's own record of what just happened
            self.guard.load_state_dict(state.get("guard", {}))
        if state["rng"] is not None:
            self.backend.set_rng_state(state["rng"])
        for module in self.model.modules():  # counts from a discarded step must not leak into the next update
            if isinstance(module, Router):
                module.expert_load.zero_()

    # ------------------------------------------------------------------------------------------------ steps
    def train_step(self) -> dict[str, Any]:
        cfg = self.config.train
        objective = self.objective
        batch_position = self.loader.position
        items = None
        if objective.takes_items(self.step):
            items = [objective.train_items[i] for i in self.loader.next_step()]
        step = objective.begin_step(self.step, items)
        factor = self.faults.loss_factor(self.step + 1)
        sums = objective.forward_backward(self.model, objective.my_share(items), step, factor)
        self.faults.during_step(self.step + 1)
        self.runtime.dp_sum(sums)
        stats = objective.stats(dict(zip(objective.sum_keys, sums.tolist())), step)
        tokens = int(sums[-1])
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = self.runtime.clip_grad_norm(self.model, max_norm)
        lr = lr_at(self.step + 1, cfg)
        event = self.guard.check(self.step + 1, stats["loss"], grad_norm)
        if event is not None:
            return self._handle(event, batch_position, lr, tokens)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance = update_router_biases(self.model, cfg.router_bias_update_rate, all_reduce=self.runtime.dp_sum)
        load = self.runtime.pp_sum(torch.tensor([balance["load_ratio_sum"], balance["layers"]], dtype=torch.float64))
        self.step += 1
        objective.end_step(self.step)
        self.tokens_seen += tokens
        stats.update(lr=lr, grad_norm=grad_norm, tokens=tokens)
        if load[1] > 0:
            stats["moe_load_max_over_mean"] = float(load[0] / load[1])
        return stats

    def _handle(self, event: GuardEvent, batch_position: int, lr: float, tokens: int) -> dict[str, Any]:
        """A guarded step: nothing reaches the optimizer. skip: the step counts, its batch is consumed. rollback:
        back to the newest valid checkpoint, with this batch marked never to be trained on."""
        self.optimizer.zero_grad(set_to_none=True)
        for module in self.model.modules():
            if isinstance(module, Router):
                module.expert_load.zero_()
        target = self.checkpointer.latest_valid(check_sums=False) if event.action == "rollback" else None
        if event.action == "rollback" and target is None:
            event.detail += "; no checkpoint to roll back to, skipped instead"
        self._warn(f"guard: {event.kind} at step {event.step} (loss {event.loss:.4g}, grad norm "
                   f"{event.grad_norm:.4g}) -> {event.action}{': ' + event.detail if event.detail else ''}")
        self.guard.record(event, write=self.runtime.is_main)
        if target is not None:
            self._restore(target, rollback=True)
            self.loader.skipped.add(batch_position)
            return {"loss": event.loss, "lr": lr, "grad_norm": event.grad_norm, "tokens": 0, "guard": event.kind,
                    "rolled_back_to": self.step}
        self.step += 1
        self.tokens_seen += tokens
        return {"loss": event.loss, "lr": lr, "grad_norm": event.grad_norm, "tokens": tokens, "guard": event.kind}

    def evaluate(self) -> dict[str, float]:
        return self.objective.evaluate(self.model)

    # ------------------------------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.watchdog.close()
            try:
                self.checkpointer.close()
            finally:
                self.runtime.close()

    def _banner(self) -> str:
        cfg = self.config
        params = sum(p.numel() for p in self.model.parameters())
        precision = str(self.amp_dtype or torch.float32).replace("torch.", "")
        return (f"polytrain {self.objective.name}: {self.backend.describe()}, {self.runtime.describe()}, model "
                f"{cfg.model.preset} ({params / 1e6:.2f}M params), {self.objective.describe_data()}, precision "
                f"{precision} -> {self.run_dir}")

    def _log_eval(self, writer: MetricsWriter | None, console: Console) -> None:
        metrics = self.evaluate()
        if not metrics:
            return
        self.eval_history.append((self.step, metrics))
        if writer:
            writer.write({"step": self.step, **metrics})
        console.print(f"step {self.step}: " + ", ".join(f"{k.replace('eval_', 'eval ')} {v:.4f}"
                                                      for k, v in metrics.items()))

    def _progress(self, start_step: int) -> StepProgress:
        log = self.config.log
        peak = log.peak_tflops * 1e12  # one device's dense BF16 peak; 0: the chip's, if its name pins it down
        if not peak:
            chip = chip_for_device_name(self.backend.chip_name())
            peak = chip.peak_flops("bf16") if chip else 0.0
        return StepProgress(
            total_steps=self.config.train.steps, start_step=start_step, headline=self.objective.headline,
            flops_per_token=flops_per_token(self.config.model, self.config.data.max_seq_len).total,
            peak_flops=peak * self.runtime.world_size or None, every_steps=log.print_every,
            every_s=log.print_every_s,
        )

    def _open_metrics(self) -> MetricsWriter | None:
        """The metrics sinks (one process writes them): metrics.jsonl, TensorBoard, the chosen trackers."""
        if not self.runtime.is_main:
            return None
        log = self.config.log
        trackers = open_trackers(log.trackers, self.run_dir, log.project, to_dict(self.config))
        return MetricsWriter(self.run_dir, log.tensorboard, resume_step=self.step, headline=self.objective.headline,
                             trackers=trackers)

    def _run(self) -> dict[str, Any]:
        if self.resume_from is not None:
            self._restore(self.resume_from)
            self.console.print(f"resumed from {self.resume_from} (step {self.step}, sample {self.loader.position})")
        self.console.print(self._banner())
        with contextlib.ExitStack() as closing:
            writer = self._open_metrics()
            if writer is not None:
                closing.callback(writer.close)
            return self._loop(writer)

    def _loop(self, writer: MetricsWriter | None) -> dict[str, Any]:
        cfg = self.config
        start_time = time.perf_counter()
        start_step = self.step
        if self.step == 0:
            self._log_eval(writer, self.console)
        last_saved = self.step
        interactive = cfg.log.progress and self.console.is_terminal
        lines = self._progress(start_step)
        device_memory = self.backend.capabilities.device_memory_stats
        progress = Progress(
            TextColumn(f"[bold]{self.objective.name}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            disable=not interactive,
        )
        with StopRequest() as stop, progress:
            self._stop = stop
            task = progress.add_task("", total=cfg.train.steps, completed=self.step)
            window_start, window_tokens = time.perf_counter(), 0
            first = True
            while self.step < cfg.train.steps:
                timeout = cfg.watchdog.first_step_timeout_s if first else cfg.watchdog.step_timeout_s
                self.watchdog.arm(timeout, f"step {self.step + 1}")
                step_start = time.perf_counter()
                stats = self.train_step()
                self.watchdog.disarm()
                first = False
                self.checkpointer.poll()
                window_tokens += stats["tokens"]
                progress.update(task, completed=self.step, description=lines.headline_text(stats))
                if "rolled_back_to" in stats:
                    if writer:
                        writer.rewind(self.step)
                    continue
                logs = self.step % cfg.log.every == 0 or self.step == cfg.train.steps or "guard" in stats
                prints = not interactive and lines.due(self.step, force="guard" in stats)
                if logs or prints:
                    self.backend.synchronize()
                lines.step_done(time.perf_counter() - step_start, stats["tokens"])
                memory = self.backend.memory_stats() if logs or prints else None
                if logs:
                    now = time.perf_counter()
                    record = {"step": self.step, **stats, "tokens_per_s": window_tokens / (now - window_start),
                              "epoch": self.loader.epoch, "elapsed_s": now - start_time,
                              "peak_device_mem_gib": memory.device_peak_allocated / 2**30,
                              "peak_host_mem_gib": memory.host_peak_rss / 2**30}
                    if lines.mfu is not None:
                        record["mfu"] = lines.mfu
                    if writer:
                        writer.write(record)
                    window_start, window_tokens = now, 0
                if prints:
                    self.console.print(lines.line(self.step, stats, memory, device_memory), soft_wrap=True)
                is_last = self.step == cfg.train.steps
                if is_last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                    self._log_eval(writer, progress.console)
                boundary = self.objective.can_stop_after(self.step)
                stopping = (self.stop_at_step is not None and self.step >= self.stop_at_step and not is_last
                            and boundary)
                if is_last or stopping or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    saved = self.save()
                    if is_last and not (saved and self._wait_for_saves()):
                        raise CheckpointError(f"the final checkpoint (step {self.step}) could not be saved; see the "
                                              "messages above for the cause")
                    if saved:
                        last_saved = self.step
                if stopping:
                    self._wait_for_saves()
                    self.console.print(f"stopped after step {self.step} (--stop-at-step); continue with --resume")
                    break
                # every rank must agree to stop at the same step, or the final save would not match up
                if boundary and not is_last and not self.runtime.all_agree(stop.signal_name is None):
                    saved = self.step == last_saved or self.save()
                    saved = self._wait_for_saves() and saved
                    why = stop.signal_name or "a signal on another rank"
                    if not saved:
                        raise TrainingInterrupted(
                            f"{why}: stopped after step {self.step}, but its checkpoint could NOT be saved (see the "
                            "messages above); --resume continues from the newest checkpoint that was")
                    raise TrainingInterrupted(f"{why}: stopped after step {self.step} and saved a checkpoint; "
                                              "continue with the same command plus --resume")
        self.checkpointer.wait()
        elapsed = time.perf_counter() - start_time
        summary = self._summary(elapsed, start_step)
        if writer:
            writer.close()
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            plot_run(self.run_dir, objective=type(self.objective))
        return summary

    def _summary(self, elapsed: float, start_step: int) -> dict[str, Any]:
        memory = self.backend.memory_stats()
        evals = self.eval_history
        first_last = {}
        for key in evals[0][1] if evals else {}:
            first_last[f"{key}_first"] = evals[0][1][key]
            first_last[f"{key}_last"] = evals[-1][1].get(key)
        if "eval_loss_first" in first_last:
            first_last["eval_loss_ratio"] = first_last["eval_loss_last"] / first_last["eval_loss_first"]
        return {
            "algorithm": self.objective.name,
            "steps": self.step,
            "steps_this_session": self.step - start_step,
            "wall_time_s": round(elapsed, 2),
            "tokens_seen": self.tokens_seen,
            **first_last,
            "guard_events": self.guard.total,
            "device": self.backend.describe(),
            "layout": self.runtime.describe(),
            "precision": str(self.amp_dtype or torch.float32).replace("torch.", ""),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "peak_device_mem_gib": memory.device_peak_allocated / 2**30,
            "peak_host_mem_gib": memory.host_peak_rss / 2**30,
            "checkpoint": str(latest_checkpoint(self.checkpointer.root)),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        }

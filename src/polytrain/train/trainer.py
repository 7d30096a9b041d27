"""The SFT training loop: data, optimizer steps with gradient accumulation and clipping, eval, metrics,
checkpoints, resume."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from polytrain.algorithms.sft import StepTokens, needs_document_mask, sft_loss, token_loss_sum
from polytrain.backends import Backend, get_backend
from polytrain.config import JobConfig
from polytrain.data.chat import get_template
from polytrain.data.dataset import SFTDataset, load_sft_dataset
from polytrain.data.loader import StepLoader
from polytrain.data.packing import collate
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import BackendError, CheckpointError
from polytrain.models.moe import update_router_biases
from polytrain.models.transformer import CausalLM, build_model
from polytrain.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from polytrain.train.metrics import MetricsWriter
from polytrain.train.optim import build_optimizer, lr_at, set_lr
from polytrain.train.plot import plot_run
from polytrain.train.run_dir import prepare_run_dir

SUMMARY_FILE = "summary.json"


class TrainingInterrupted(Exception):
    """Ctrl-C / SIGTERM during training; the last completed step was checkpointed."""


class StopRequest:
    """SIGINT / SIGTERM handler that asks the loop to stop at the next step boundary (where the model, optimizer
    and data position agree, so the checkpoint is exact). A second SIGINT interrupts at once, without saving."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def resolve_precision(precision: str, backend: Backend) -> torch.dtype | None:
    """The autocast dtype for `run.precision` (None = fp32), failing loudly if the backend lacks it."""
    if precision == "fp32":
        return None
    if precision == "auto":
        return backend.amp_dtype
    if not backend.capabilities.bf16:
        raise BackendError(f"run.precision = \"bf16\" but the {backend.name} backend has no bf16 support here")
    return torch.bfloat16


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class SFTTrainer:
    def __init__(self, config: JobConfig, resume: bool = False, overwrite: bool = False,
                 console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console(stderr=True)
        self.backend = get_backend(config.run.device)
        self.device = self.backend.device()
        self.amp_dtype = resolve_precision(config.run.precision, self.backend)

        data = config.data
        self.tokenizer = Tokenizer.load(data.tokenizer)
        self.template = get_template(data.chat_template, self.tokenizer)
        vocab = config.model.vocab_size
        self.train_set = load_sft_dataset(data.train_path, self.tokenizer, self.template, data.max_seq_len,
                                          data.loss_on, vocab)
        self.eval_set: SFTDataset | None = None
        if data.eval_path:
            self.eval_set = load_sft_dataset(data.eval_path, self.tokenizer, self.template, data.max_seq_len,
                                             data.loss_on, vocab)
        # All inputs are valid: only now touch the run directory.
        self.run_dir = prepare_run_dir(config, resume, overwrite)
        self.resume = resume

        self.backend.manual_seed(config.run.seed)
        self.model: CausalLM = build_model(config.model, self.device, seed=config.run.seed)
        self.model.train()
        self.optimizer = build_optimizer(self.model, config.train)
        self.loader = StepLoader(len(self.train_set), config.train.global_batch_size, config.run.seed,
                                 data.shuffle)
        self.step = 0
        self.tokens_seen = 0
        self.eval_history: list[tuple[int, float]] = []

    # ----------------------------------------------------------------------------------------------- state
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "loader": self.loader.state_dict(),
            "tokens_seen": self.tokens_seen,
            "eval_history": self.eval_history,
        }

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self._trainer_state(),
                               self.backend.get_rng_state(), self.config.checkpoint.keep_last)

    def _load_initial_weights(self) -> None:
        """Weights of init.hf_path, for a run that starts at step 0."""
        from polytrain.models.hf.checkpoint import HFCheckpoint, load_hf_weights

        path = self.config.init.hf_path
        if path:
            started = time.perf_counter()
            stats = load_hf_weights(self.model, HFCheckpoint(path))
            seconds = time.perf_counter() - started
            self.console.print(f"loaded {stats['tensors']} tensors from {path} in {seconds:.1f} s")

    def _maybe_resume(self) -> None:
        if not self.resume:
            self._load_initial_weights()
            return
        path = latest_checkpoint(self.run_dir)
        if path is None:
            self.console.print(f"[yellow]--resume: no checkpoint in {self.run_dir}; starting from step 0[/]")
            self._load_initial_weights()
            return
        state = load_checkpoint(path, self.model, self.optimizer)
        if state["loader"]["num_samples"] != len(self.train_set):
            raise CheckpointError(
                f"{path} was trained on {state['loader']['num_samples']} samples but {self.config.data.train_path} "
                f"now has {len(self.train_set)}: the data changed, so the data position cannot be restored"
            )
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.tokens_seen = state["tokens_seen"]
        self.eval_history = [tuple(e) for e in state["eval_history"]]
        if state["rng"] is not None:
            self.backend.set_rng_state(state["rng"])
        self.console.print(f"resumed from {path} (step {self.step}, sample {self.loader.position})")

    # ------------------------------------------------------------------------------------------------ steps
    def train_step(self) -> dict[str, float]:
        cfg = self.config.train
        samples = [self.train_set.samples[i] for i in self.loader.next_step()]
        step_tokens = StepTokens.of(samples, self.config.model.num_nextn_predict_layers)
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in chunks(samples, cfg.micro_batch_size):
            batch = collate(micro, self.config.data.max_seq_len, self.config.data.packing).to(self.device)
            with self.backend.autocast(self.amp_dtype):
                loss, parts = sft_loss(self.model, batch, step_tokens, cfg.mtp_loss_weight)
            loss.backward()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            tokens += batch.num_tokens
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        lr = lr_at(self.step + 1, cfg)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance = update_router_biases(self.model, cfg.router_bias_update_rate)
        self.step += 1
        self.tokens_seen += tokens
        stats = {"loss": float(sums["loss_sum"]) / step_tokens.main, "lr": lr, "grad_norm": float(grad_norm),
                 "tokens": tokens, "trained_tokens": step_tokens.main, **balance}
        if "mtp_loss_sum" in sums:
            stats["mtp_loss"] = float(sums["mtp_loss_sum"]) / max(sum(step_tokens.mtp), 1)
        if "aux_loss_weighted" in sums:
            stats["aux_loss"] = float(sums["aux_loss_weighted"])
        return stats

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per trained token over the eval set (or its first `eval.max_batches` micro-batches)."""
        if self.eval_set is None:
            return None
        self.model.eval()
        batches = chunks(self.eval_set.samples, self.config.train.micro_batch_size)
        if self.config.eval.max_batches:
            batches = batches[: self.config.eval.max_batches]
        total, count = 0.0, 0
        for micro in batches:
            batch = collate(micro, self.config.data.max_seq_len, self.config.data.packing).to(self.device)
            doc_ids = batch.doc_ids if needs_document_mask(batch) else None
            with self.backend.autocast(self.amp_dtype):
                hidden = self.model.hidden_states(batch.input_ids, batch.position_ids, doc_ids)
                total += float(token_loss_sum(self.model, hidden, batch.labels))
            count += batch.num_loss_tokens
        self.model.train()
        return total / count

    # ------------------------------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        self._maybe_resume()
        cfg = self.config
        self.console.print(
            f"polytrain sft: {self.backend.describe()}, model {cfg.model.preset} "
            f"({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params), "
            f"{len(self.train_set)} train conversations ({self.train_set.num_tokens} tokens)"
            + (f", {len(self.eval_set)} eval" if self.eval_set else "")
            + f", precision {self.amp_dtype or torch.float32}".replace("torch.", "")
            + f" -> {self.run_dir}"
        )
        for name, ds in (("train", self.train_set), ("eval", self.eval_set)):
            if ds is not None and (ds.truncated or ds.dropped):
                self.console.print(f"[yellow]{name}: {ds.truncated} conversations cut to data.max_seq_len="
                                   f"{cfg.data.max_seq_len}, {ds.dropped} dropped (no trained token left)[/]")
        writer = MetricsWriter(self.run_dir, cfg.log.tensorboard, resume_step=self.step)
        start_time = time.perf_counter()
        start_step = self.step
        if self.step == 0 and self.eval_set is not None:
            initial = self.evaluate()
            self.eval_history.append((0, initial))
            writer.write({"step": 0, "eval_loss": initial})
            self.console.print(f"step 0: eval loss {initial:.4f}")
        last_saved = self.step
        interactive = cfg.log.progress and self.console.is_terminal
        quiet_every = max(cfg.log.every, math.ceil(cfg.train.steps / 20))
        progress = Progress(
            TextColumn("[bold]sft"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, disable=not interactive,
        )
        with StopRequest() as stop, progress:
            task = progress.add_task("", total=cfg.train.steps, completed=self.step)
            window_start, window_tokens = time.perf_counter(), 0
            while self.step < cfg.train.steps:
                stats = self.train_step()
                window_tokens += stats["tokens"]
                progress.update(task, completed=self.step, description=f"loss {stats['loss']:.4f}")
                if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                    self.backend.synchronize()
                    now = time.perf_counter()
                    memory = self.backend.memory_stats()
                    record = {"step": self.step, **stats, "tokens_per_s": window_tokens / (now - window_start),
                              "epoch": self.loader.epoch, "elapsed_s": now - start_time,
                              "peak_device_mem_gib": memory.device_peak_allocated / 2**30,
                              "peak_host_mem_gib": memory.host_peak_rss / 2**30}
                    writer.write(record)
                    window_start, window_tokens = now, 0
                    if not interactive and (self.step % quiet_every == 0 or self.step == cfg.train.steps):
                        self.console.print(f"step {self.step}/{cfg.train.steps}: loss {stats['loss']:.4f}, "
                                           f"lr {stats['lr']:.2e}, grad norm {stats['grad_norm']:.3f}, "
                                           f"{record['tokens_per_s']:.0f} tok/s")
                is_last = self.step == cfg.train.steps
                if self.eval_set is not None and (is_last or (cfg.eval.every and self.step % cfg.eval.every == 0)):
                    eval_loss = self.evaluate()
                    self.eval_history.append((self.step, eval_loss))
                    writer.write({"step": self.step, "eval_loss": eval_loss})
                    progress.console.print(f"step {self.step}: eval loss {eval_loss:.4f}")
                if is_last or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save()
                    last_saved = self.step
                if stop.signal_name is not None and not is_last:
                    if self.step > last_saved:
                        self.save()
                    writer.close()
                    raise TrainingInterrupted(
                        f"{stop.signal_name}: stopped after step {self.step} and saved a checkpoint; "
                        "continue with the same command plus --resume"
                    )
        writer.close()
        elapsed = time.perf_counter() - start_time
        summary = self._summary(elapsed, start_step)
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        plot_run(self.run_dir)
        return summary

    def _summary(self, elapsed: float, start_step: int) -> dict[str, Any]:
        memory = self.backend.memory_stats()
        evals = self.eval_history
        return {
            "steps": self.step,
            "steps_this_session": self.step - start_step,
            "wall_time_s": round(elapsed, 2),
            "tokens_seen": self.tokens_seen,
            "eval_loss_first": evals[0][1] if evals else None,
            "eval_loss_last": evals[-1][1] if evals else None,
            "eval_loss_ratio": evals[-1][1] / evals[0][1] if evals else None,
            "device": self.backend.describe(),
            "precision": str(self.amp_dtype or torch.float32).replace("torch.", ""),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "peak_device_mem_gib": memory.device_peak_allocated / 2**30,
            "peak_host_mem_gib": memory.host_peak_rss / 2**30,
            "checkpoint": str(latest_checkpoint(self.run_dir)),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        }

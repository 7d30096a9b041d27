"""On-policy distillation (`polytrain distill`): the student samples completions of the prompts, the teachers score
every sampled position, and the student minimises its reverse KL to the teacher on its own samples.

Teachers are run directories (any size or architecture) whose tokenizer and chat template equal the student's;
they are loaded once, frozen, and laid out like the student. Their log-probabilities are computed in the same
micro-batch as the student's forward, so nothing vocabulary-sized is ever stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.algorithms.distill import mean_teacher_logprobs, reverse_kl
from polytrain.algorithms.grpo import aggregate
from polytrain.config import JobConfig, read_run_config
from polytrain.data.chat import Template, get_template
from polytrain.data.dataset import IGNORE
from polytrain.data.prompts import PromptItem
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import ConfigError
from polytrain.objectives.base import Metric
from polytrain.objectives.context import ObjectiveContext
from polytrain.objectives.rollout import Rollout, RolloutObjective
from polytrain.rollout.generate import SamplingConfig


def parse_teachers(specs: list[str]) -> dict[str, str]:
    """{name: run_dir} from 'run_dir' or 'name=run_dir' entries."""
    teachers: dict[str, str] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        if name in teachers:
            raise ConfigError(f"distill.teachers: two teachers are named `{name}`; name them 'name=run_dir'")
        teachers[name] = path
    return teachers


def check_same_tokenizer(student: Tokenizer, student_template: Template, student_template_name: str, teacher_cfg: Any,
                         name: str) -> None:
    """The teacher's tokenizer has the student's vocabulary and its chat template renders like the student's (a
    Jinja template compares by its text and special tokens, wherever the file lies)."""
    teacher = Tokenizer.load(teacher_cfg.data.tokenizer)
    if teacher.vocab() != student.vocab():
        raise ConfigError(
            f"distill teacher `{name}` uses the tokenizer {teacher.path}, whose vocabulary differs from the "
            f"student's ({student.path}): on-policy distillation scores the student's token ids with the teacher, so "
            "both must share one tokenizer"
        )
    if get_template(teacher_cfg.data.chat_template, teacher) != student_template:
        raise ConfigError(f"distill teacher `{name}` was trained with chat template "
                          f"`{teacher_cfg.data.chat_template}`, the student with `{student_template_name}`, and they "
                          "render differently")


class DistillObjective(RolloutObjective):
    name = "distill"
    headline = (Metric("reverse_kl", "reverse KL"), Metric("completion_len", "response len", ".1f"))
    loss_label = "reverse-KL loss per completion token"
    sum_keys = ("loss_sum", "kl_sum", "k1_sum")

    def __init__(self, ctx: ObjectiveContext) -> None:
        cfg = ctx.config.section("distill")
        self.cfg = cfg
        super().__init__(ctx)
        if not cfg.teachers:
            raise ConfigError("distill.teachers is empty: name at least one teacher run directory")
        self.teacher_dirs = parse_teachers(cfg.teachers)
        self.teachers: dict[str, nn.Module] = {}

    @classmethod
    def rollout_shape(cls, config: JobConfig) -> tuple[int, int, int]:
        return config.section("distill").group_size, 1, 1

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p, self.config.run.seed)

    def load_data(self) -> None:
        super().load_data()
        names = set(self.teacher_dirs)
        for items, path in ((self.train_items, self.config.data.train_path),
                            (self.eval_items or [], self.config.data.eval_path)):
            unknown = {p.teacher for p in items if p.teacher is not None and p.teacher not in names}
            if unknown:
                raise ConfigError(f"{path}: prompts name teacher(s) {', '.join(sorted(unknown))}, but "
                                  f"distill.teachers has {', '.join(sorted(names))}")

    def after_parallelize(self, model: nn.Module) -> None:
        super().after_parallelize(model)
        ctx = self.ctx
        for name, run_dir in self.teacher_dirs.items():
            teacher_cfg = read_run_config(run_dir, f"distill teacher `{name}`")
            check_same_tokenizer(ctx.tokenizer, ctx.template, self.config.data.chat_template, teacher_cfg, name)
            if teacher_cfg.model.vocab_size != self.config.model.vocab_size:
                raise ConfigError(f"distill teacher `{name}` has vocab_size {teacher_cfg.model.vocab_size}, the "
                                  f"student {self.config.model.vocab_size}")
            _, teacher, step = ctx.frozen_run_model(run_dir)
            self.teachers[name] = teacher
            ctx.info(f"teacher `{name}`: {run_dir} (step {step}, {teacher_cfg.model.preset})")

    def describe_data(self) -> str:
        return super().describe_data() + f", {len(self.teacher_dirs)} teacher(s)"

    # ------------------------------------------------------------------------------------------- rollouts
    def rollout(self, prompts: list[PromptItem], step: int) -> list[Rollout]:
        collectives = self.ctx.collectives
        per_rank = len(prompts) // collectives.dp_size
        first = collectives.dp_rank * per_rank
        return [self.make_rollout(p, c) for p, c in self.sample_completions(prompts[first : first + per_rank], step,
                                                                           first)]

    @torch.no_grad()
    def teacher_logprobs(self, rollouts: list[Rollout], batch: Any) -> torch.Tensor:
        """[R, T, V] log-probs of each row's teacher (the named one, else the mean of all)."""
        per_teacher = {}
        for name, teacher in self.teachers.items():
            with self.ctx.autocast():
                logits = teacher(batch.input_ids, position_ids=batch.position_ids)
            per_teacher[name] = F.log_softmax(logits.float(), dim=-1)
        mean = mean_teacher_logprobs(list(per_teacher.values()))
        if all(r.prompt.teacher is None for r in rollouts):
            return mean
        rows = [per_teacher[r.prompt.teacher][i] if r.prompt.teacher else mean[i] for i, r in enumerate(rollouts)]
        return torch.stack(rows)

    # ----------------------------------------------------------------------------------------------- loss
    def divergences(self, model: nn.Module, micro: list[Rollout]) -> tuple[torch.Tensor, ...]:
        """(student logits, full reverse KL per position, k1 of the sampled token, mask, batch)."""
        batch = self.batch(micro)
        logits = self.logits(model, micro, batch)
        teacher = self.teacher_logprobs(micro, batch)
        mask = (batch.labels != IGNORE).float()
        kl = reverse_kl(logits, teacher) * mask
        safe = batch.labels.clamp(min=0).unsqueeze(-1)
        student_lp = F.log_softmax(logits.float(), dim=-1).gather(-1, safe).squeeze(-1)
        k1 = (student_lp - teacher.gather(-1, safe).squeeze(-1)) * mask
        return student_lp, kl, k1, mask, batch

    def loss(self, model: nn.Module, micro: list[Rollout], ctx: dict) -> tuple[torch.Tensor, dict, int]:
        student_lp, kl, k1, mask, batch = self.divergences(model, micro)
        if self.cfg.mode == "loss":
            per_token = kl
        else:  # policy gradient with per-token advantage -k1 (importance ratio 1 on fresh samples)
            advantage = -k1.detach()
            per_token = -advantage * torch.exp(student_lp - student_lp.detach())
        loss = aggregate(per_token, mask, "token-mean", ctx["tokens"], ctx["sequences"], self.cfg.max_new_tokens)
        parts = {"loss_sum": loss.detach(), "kl_sum": kl.detach().sum(), "k1_sum": k1.detach().sum()}
        return loss, parts, batch.num_tokens

    def stats(self, sums: dict[str, float], ctx: dict) -> dict[str, Any]:
        tokens = max(ctx["tokens"], 1.0)
        return {"loss": sums["loss_sum"], "reverse_kl": sums["kl_sum"] / tokens, "k1": sums["k1_sum"] / tokens,
                "completion_len": ctx["tokens"] / max(ctx["sequences"], 1.0)}

    # ------------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Reverse KL to the teacher(s) per completion token, on the student's samples of the eval prompts (fixed
        seeds, so every evaluation draws comparable samples)."""
        if not self.eval_items:
            return {}
        collectives, mbs = self.ctx.collectives, self.config.train.micro_batch_size
        items = self.eval_items
        if self.config.eval.max_batches:
            items = items[: self.config.eval.max_batches * mbs]
        per_rank = -(-len(items) // collectives.dp_size)
        first = collectives.dp_rank * per_rank
        mine = items[first : first + per_rank]
        prompts = mine + items[: per_rank - len(mine)]  # equal shares: every rank runs the same forwards
        real = len(mine) * self.group_size
        model.eval()
        rollouts = [self.make_rollout(p, c) for p, c in self.sample_completions(prompts, -1, first)]
        sums = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(rollouts), mbs):
            micro = rollouts[start : start + mbs]
            _, kl, _, mask, _ = self.divergences(model, micro)
            keep = torch.tensor([float(start + i < real) for i in range(len(micro))], device=kl.device)[:, None]
            sums += torch.tensor([float((kl * keep).sum()), float((mask * keep).sum())], dtype=torch.float64)
        collectives.dp_sum(sums)
        model.train()
        return {"eval_reverse_kl": float(sums[0]) / max(float(sums[1]), 1.0)}

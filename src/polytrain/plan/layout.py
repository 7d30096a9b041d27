"""What the planner plans: a job (model, sequence length, batch, algorithm) and a layout (how the devices split it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from functools import cached_property
from typing import Literal

from polytrain.models.common.config import ModelConfig
from polytrain.parallel.validate import Degrees, engine_gaps, precision_gaps, problems, step_problems

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev", "dualpipe")
RECOMPUTE = ("none", "selective", "full")
OFFLOAD = ("none", "optimizer", "all")


@dataclass(frozen=True)
class Job:
    model: ModelConfig
    seq_len: int
    global_batch_tokens: int
    algorithm: Literal["sft", "dpo", "grpo"] = "sft"
    precision: Literal["bf16", "fp16", "fp8"] = "bf16"
    """Dtype of the matrix products (fp8: linear layers at the FP8 peak, attention in bf16)."""
    activation_bytes: int = 2
    """Bytes per stored activation element (2: bf16 autocast; 4: fp32 as on the CPU)."""
    moment_bytes: int = 4
    """Bytes per AdamW moment (4: fp32; 2: bf16 moments as DeepSeek-V3 trained)."""
    fused_attention: bool | None = None
    """Flash-style attention (no seq x seq matrix kept) or not; None: the attention polytrain's engine runs for the
    model family (its planner hooks' `fused_attention`; see `attention_fused`)."""
    mtp: bool = True
    # GRPO
    group_size: int = 8
    prompt_len: int = 1024
    response_len: int = 2048
    rollout_devices: int = 0
    """GRPO, disaggregated: devices set apart for the rollout engine (`grpo.rollout_ranks` with vLLM servers on
    them); the training layout spans the others. 0: the training devices sample (colocated)."""

    @cached_property
    def key(self) -> str:
        """Identifies the job for caches (ModelConfig is mutable, so the job is not hashable)."""
        fields = {f.name: getattr(self, f.name) for f in dataclass_fields(self) if f.name != "model"}
        return json.dumps([asdict(self.model), sorted(fields.items())], sort_keys=True, default=str)

    @cached_property
    def shape(self):  # -> ModelShape (imported lazily: layout.py stays free of model building)
        from polytrain.plan.shapes import model_shape

        return model_shape(self.model)

    @cached_property
    def flops(self):  # -> Flops of one token of this job: the model's work (causal attention), what MFU counts
        from polytrain.plan.flops import flops_per_token

        return flops_per_token(self.model, self.seq_len, mtp=self.mtp)

    @property
    def attention_fused(self) -> bool:
        """Whether the attention keeps no seq x seq scores: as set, else as the engine runs the family."""
        if self.fused_attention is not None:
            return self.fused_attention
        from polytrain.models.registry import spec_for

        return spec_for(self.model).planner.fused_attention

    @cached_property
    def executed_flops(self):  # -> Flops the engine computes per token, masked attention products included
        from polytrain.models.registry import spec_for
        from polytrain.plan.flops import flops_per_token

        if self.attention_fused and spec_for(self.model).planner.executes_model_flops:
            return self.flops
        return flops_per_token(self.model, self.seq_len, mtp=self.mtp, attention="dense")

    def attention_note(self) -> str:
        """One line on the attention the prediction assumes."""
        if self.attention_fused and self.executed_flops is self.flops:
            return "attention: fused (no seq x seq scores kept)"
        if self.attention_fused:
            return (f"attention: block by block (no seq x seq scores kept; {self.executed_flops.total / 1e9:,.0f} "
                    f"GFLOP/token computed for {self.flops.total / 1e9:,.0f} of model work)")
        return (f"attention: as polytrain runs {self.model.architecture} now, materialising the seq x seq scores "
                f"(kept for backward; {self.executed_flops.total / 1e9:,.0f} GFLOP/token computed for "
                f"{self.flops.total / 1e9:,.0f} of model work)")

    @cached_property
    def stage_params(self) -> dict[tuple, object]:
        """Per-job cache: (pp, stage) -> (dense, expert) parameters, filled on demand (and the largest layer's per
        device: plan/memory.py)."""
        return {}

    def params_of_stage(self, pp: int, stage: int) -> tuple[int, int]:
        key = (pp, stage)
        if key not in self.stage_params:
            dense, experts = self.shape.stage_params(pp, stage)
            if not self.mtp and stage == pp - 1:
                dense, experts = dense - self.shape.mtp_dense, experts - self.shape.mtp_experts
            self.stage_params[key] = (dense, experts)
        return self.stage_params[key]

    @property
    def global_batch_sequences(self) -> int:
        return max(1, self.global_batch_tokens // self.seq_len)


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    """Data-parallel size: devices / (tp x pp x cp). Dense weights are ZeRO-sharded over dp x cp."""
    tp: int = 1
    pp: int = 1
    ep: int = 1
    """Expert-parallel size. polytrain draws it from the data-parallel ranks and keeps experts whole on the
    tensor-parallel ranks (expert-data-parallel group dp x cp / ep); with `experts_over_tp` (Megatron's expert
    tensor parallel 1, MindSpeed's --moe-tp-extend-ep) it spans dp x tp x cp ranks (group (dp x tp x cp) / ep)."""
    experts_over_tp: bool = False
    cp: int = 1
    zero: int = 3
    """1: optimizer state sharded; 2: + gradients; 3: + parameters (FSDP)."""
    offload: str = "none"
    """optimizer: master weights and moments in host memory (swap-optimizer); all: parameters, gradients and
    optimizer state in host memory (FSDP CPU offload)."""
    recompute: str = "none"
    micro_batch: int = 1
    """Sequences per micro-batch."""
    schedule: str = "1f1b"
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def expert_dp(self) -> int:
        ranks = self.dp * self.cp * (self.tp if self.experts_over_tp else 1)
        return max(1, ranks // self.ep)

    def with_(self, **changes) -> Layout:
        return replace(self, **changes)

    def short(self) -> str:
        parts = [f"DP{self.dp}"]
        for name in ("tp", "pp", "ep", "cp"):
            value = getattr(self, name)
            if value > 1:
                parts.append(f"{name.upper()}{value}")
        return " ".join(parts)

    def degrees(self) -> Degrees:
        ranks = self.dp * self.cp * (self.tp if self.experts_over_tp else 1)
        return Degrees(dp=self.dp, expert_ranks=ranks, tp=self.tp, pp=self.pp, ep=self.ep, cp=self.cp,
                       schedule=self.schedule, zero=self.zero, offload=self.offload,
                       experts_over_tp=self.experts_over_tp)

    def problems(self, model: ModelConfig) -> list[str]:
        """Why the layout cannot run this model at all (empty: it can)."""
        return problems(model, self.degrees())

    def engine_gaps(self, model: ModelConfig) -> list[str]:
        """What polytrain's engine does not run yet (the layout may still be valid for other frameworks)."""
        return engine_gaps(model, self.degrees())

    def step_sequences(self, job: Job) -> int:
        """The job's sequences per step, rounded to whole micro-batches on every data-parallel rank (what the
        emitted config's train.global_batch_size says, and what the planner times)."""
        unit = self.dp * self.micro_batch
        return max(unit, round(job.global_batch_sequences / unit) * unit)

    def job_gaps(self, job: Job) -> list[str]:
        """Everything the engine's start-up checks would refuse in this layout for `job`: the layout against the
        model, the precision, the objective under pipeline parallelism and the step's batch against the layout
        (the functions the engine runs: train/trainer.py `check_job`)."""
        from polytrain.objectives import registry  # lazily: the planner's model stays free of the engine's imports

        objective = registry.objective_class(job.algorithm)
        gaps = [*engine_gaps(job.model, self.degrees()), *precision_gaps(job.precision)]
        if self.pp > 1 and not objective.supports_pipeline:
            gaps.append(f"pipeline parallelism for {job.algorithm}")
        if self.cp > 1 and not objective.supports_context_parallel:
            gaps.append(f"context parallelism for {job.algorithm}")
        if self.tp > 1 and objective.decodes_in_process(None):  # the planner's tp splits the sequence too
            gaps.append(f"sequence parallelism while {job.algorithm} samples with the built-in engine")
        if objective.items_split_into_micro_batches:
            gaps += step_problems(self.degrees(), self.step_sequences(job), self.micro_batch)
        return gaps

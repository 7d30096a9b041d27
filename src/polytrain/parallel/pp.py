"""Pipeline parallelism with torch.distributed.pipelining.

The decoder layers are split into consecutive stages (one per rank, or two per rank for the interleaved / V-shaped
schedules). The first stage also holds the embedding, the last the final norm and the output head. A stage passes
(hidden states, position ids, document ids) to the next, so packed-document masks and rotary positions work on every
stage. All of a rank's stage modules share their submodules with one `StageGroup`, whose parameter names equal the
full model's, so optimizer, checkpoints (DCP reshards between layouts) and clipping see one ordinary module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from polytrain.data.dataset import IGNORE
from polytrain.data.packing import Batch
from polytrain.errors import ConfigError
from polytrain.models.transformer import attention_mask
from polytrain.parallel.config import ParallelConfig

# schedule -> (its class in torch.distributed.pipelining, stage placement). By name: that package imports
# torch._dynamo (1-2 s), which only pipeline-parallel jobs should pay for.
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", "loop"),
    "1f1b": ("Schedule1F1B", "loop"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
    "dualpipev": ("ScheduleDualPipeV", "v"),
}
MULTI_STAGE = {"interleaved_1f1b", "zbv", "dualpipev"}


def split_layers(layers: int, stages: int, first_stage_layers: int = -1) -> list[range]:
    """Consecutive layer ranges, as even as possible (or `first_stage_layers` on stage 0, the rest even)."""
    if stages > layers:
        raise ConfigError(f"{stages} pipeline stages need at least {stages} layers; the model has {layers}")
    if first_stage_layers >= 0:
        if not 1 <= first_stage_layers <= layers - (stages - 1):
            raise ConfigError(f"parallel.pp_first_stage_layers = {first_stage_layers} leaves no layer for some of "
                              f"the other {stages - 1} stages ({layers} layers)")
        rest = split_layers(layers - first_stage_layers, stages - 1) if stages > 1 else []
        return [range(0, first_stage_layers)] + [range(r.start + first_stage_layers, r.stop + first_stage_layers)
                                                 for r in rest]
    base, extra = divmod(layers, stages)
    out, start = [], 0
    for s in range(stages):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def stages_of_rank(rank: int, pp: int, schedule: str) -> list[int]:
    if schedule not in MULTI_STAGE:
        return [rank]
    if SCHEDULES[schedule][1] == "v":
        return [rank, 2 * pp - 1 - rank]
    return [rank, rank + pp]


class StageModule(nn.Module):
    """One pipeline stage: [embedding] -> layers -> [norm -> head]. Submodules are shared with the full model."""

    def __init__(self, model: nn.Module, layer_ids: range, first: bool, last: bool) -> None:
        super().__init__()
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.rotary = model.rotary

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor):
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        multi_doc = bool((doc_ids.amax(dim=1) > 0).any())
        mask = attention_mask(doc_ids if multi_doc else None, None, 0, x.shape[1])
        rope = self.rotary(position_ids)
        token_mask = doc_ids >= 0
        for layer in self.layers.values():
            x = layer(x, rope, mask, None, token_mask=token_mask)
        if self.lm_head is not None:
            return self.lm_head(self.norm(x))
        return x, position_ids.contiguous(), doc_ids.contiguous()  # p2p sends need contiguous tensors


class StageGroup(nn.Module):
    """Everything this rank holds, under the full model's parameter names."""

    def __init__(self, model: nn.Module, stages: list[StageModule]) -> None:
        super().__init__()
        self.config = model.config
        self.layers = nn.ModuleDict()
        for stage in stages:
            self.layers.update(stage.layers)
            for name in ("embed_tokens", "norm", "lm_head"):
                if getattr(stage, name) is not None:
                    setattr(self, name, getattr(stage, name))
        self.mtp = nn.ModuleList()


def _example(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)


def stage_io(first: bool, last: bool, shape: MicroBatchShape) -> tuple[tuple, tuple]:
    """Example (inputs, outputs) of a stage: given up front, so no forward pass runs just to infer shapes (one
    would also count its tokens in the experts' load)."""
    rows, width = shape.rows, shape.width
    ids = _example((rows, width), torch.long)
    hidden = _example((rows, width, shape.hidden), shape.activation_dtype)
    inputs = (ids, ids, ids) if first else (hidden, ids, ids)
    outputs = (_example((rows, width, shape.vocab), shape.logits_dtype),) if last else (hidden, ids, ids)
    return inputs, outputs


@dataclass(frozen=True)
class MicroBatchShape:
    rows: int
    width: int
    hidden: int
    vocab: int
    activation_dtype: torch.dtype
    logits_dtype: torch.dtype


class Pipeline:
    """The stages of this rank and the schedule that drives them."""

    def __init__(self, model: nn.Module, pp_group: dist.ProcessGroup, pp_rank: int, pp: int, cfg: ParallelConfig,
                 n_microbatches: int, shape: MicroBatchShape, device: torch.device,
                 wrap_stage: Callable[[StageModule], None] = lambda stage: None) -> None:
        config = model.config
        if config.num_nextn_predict_layers or config.is_v4 or config.aux_loss_alpha > 0:
            raise ConfigError("pipeline parallelism supports DeepSeek-V3-style models without MTP modules and "
                              "without the balance loss for now: set model.num_nextn_predict_layers = 0 and "
                              "model.aux_loss_alpha = 0, or parallel.pp = 1")
        from torch.distributed import pipelining

        schedule_cls = getattr(pipelining, SCHEDULES[cfg.pp_schedule][0])
        total_stages = pp * (2 if cfg.pp_schedule in MULTI_STAGE else 1)
        if n_microbatches < total_stages:
            raise ConfigError(
                f"the {cfg.pp_schedule} pipeline schedule needs at least {total_stages} micro-batches per step and "
                f"rank; there are {n_microbatches} (= global_batch_size / data-parallel ranks / micro_batch_size): "
                "lower train.micro_batch_size or raise train.global_batch_size"
            )
        if cfg.pp_schedule == "interleaved_1f1b" and n_microbatches % pp:
            raise ConfigError(
                f"interleaved_1f1b needs micro-batches per step ({n_microbatches}) divisible by pp ({pp})"
            )
        ranges = split_layers(config.num_hidden_layers, total_stages, cfg.pp_first_stage_layers)
        self.stage_ids = stages_of_rank(pp_rank, pp, cfg.pp_schedule)
        self.modules = [StageModule(model, ranges[s], s == 0, s == total_stages - 1) for s in self.stage_ids]
        self.group = StageGroup(model, self.modules)
        for module in self.modules:
            wrap_stage(module)
        self.stages = []
        for module, stage in zip(self.modules, self.stage_ids):
            inputs, outputs = stage_io(stage == 0, stage == total_stages - 1, shape)
            self.stages.append(pipelining.PipelineStage(module, stage, total_stages, device, input_args=inputs,
                                                        output_args=outputs, group=pp_group))
        self.is_last = total_stages - 1 in self.stage_ids
        self.is_first = 0 in self.stage_ids
        self.normalizer = 1.0
        self.n_microbatches = n_microbatches
        stage_arg = self.stages if cfg.pp_schedule in MULTI_STAGE else self.stages[0]
        self.schedule = schedule_cls(stage_arg, n_microbatches=n_microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return total / self.normalizer

    def _run(self, batch: Batch, normalizer: float, train: bool) -> float:
        """One pass over this rank's micro-batches; returns the summed token loss (0 where not the last stage)."""
        self.normalizer = normalizer
        losses: list[torch.Tensor] = []
        inputs = (batch.input_ids, batch.position_ids, batch.doc_ids) if self.is_first else ()
        target = batch.labels if self.is_last else None
        run = self.schedule.step if train else self.schedule.eval
        if self.is_first or self.is_last:
            run(*inputs, target=target, losses=losses)
        else:
            run()
        return float(sum(loss.detach() for loss in losses)) * normalizer if losses else 0.0

    def train_step(self, batch: Batch, normalizer: float) -> float:
        return self._run(batch, normalizer, train=True)

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> float:
        return self._run(batch, 1.0, train=False)

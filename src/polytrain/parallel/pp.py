"""Pipeline parallelism with torch.distributed.pipelining, for any model family and any objective's loss.

The decoder layers are split into consecutive stages (one per rank, or two per rank for the interleaved / V-shaped
schedules). The first stage also holds the embedding; the last the modules between the last layer and the output
head, the head and the MTP modules. A stage runs the model's own hooks (`DecoderLM.embed`, `layer_inputs`,
`run_block`, `head_input`, `run_mtp`), so it works for every family, and passes to the next stage:

  (residual state, position ids, document ids, token ids[, balance-loss sum][, MTP embeddings per depth])

so packed-document masks, rotary positions and hash routing work on every stage, the balance losses of every
stage's routers reach the loss (and their gradients flow back through the same sends), and the MTP modules on the
last stage combine the state with embeddings computed on the first. The last stage returns the final hidden
states (and the MTP hidden states and the summed balance loss) to the objective's loss function, which the
schedule calls once per micro-batch with that micro-batch's index: the objective owns the loss, its auxiliary
terms and their normalisers, exactly as without pipelining.

All of a rank's stage modules share their submodules with one `StageGroup`, whose parameter names equal the full
model's, so optimizer, checkpoints (DCP reshards between layouts) and clipping see one ordinary module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from polytrain.errors import ConfigError
from polytrain.models.common.decoder import DecoderLM, TrainOutput, aux_loss_sum
from polytrain.models.common.output_head import SPLIT_BACKWARD
from polytrain.parallel.config import ParallelConfig
from polytrain.parallel.validate import MULTI_STAGE, pipeline_problems

# schedule -> (its class in torch.distributed.pipelining, stage placement). By name: that package imports
# torch._dynamo (1-2 s), which only pipeline-parallel jobs should pay for.
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", "loop"),
    "1f1b": ("Schedule1F1B", "loop"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
    "dualpipev": ("ScheduleDualPipeV", "v"),
}

LossFn = Callable[[TrainOutput, int], torch.Tensor]
"""(the last stage's outputs for one micro-batch, the micro-batch's index) -> the loss to backpropagate."""


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


SPLIT_SCHEDULES = ("zbv", "dualpipev")
"""Schedules that run a backward as input gradients first and weight gradients later (zero-bubble)."""


def split_backward(cfg: ParallelConfig) -> bool:
    """Whether the schedule's backwards are split in two: a zero-bubble schedule without activation recomputation
    (with it, each backward runs whole: see `Pipeline`). Context parallelism recomputes each layer's attention over
    the whole row in backward (models/deepseek_v3/attention.py), so it counts as recomputation: split, every
    layer's recomputed keys and values would stay alive until the weight pass."""
    recomputes = cfg.activation_checkpointing != "none" or cfg.cp > 1
    return cfg.pp_schedule in SPLIT_SCHEDULES and not recomputes


def _no_weight_pass() -> Callable[[], None]:
    """`PipelineStage(dw_builder=...)`: the stage's B runs the whole backward; its W runs this, nothing."""
    return lambda: None


@dataclass(frozen=True)
class StageIO:
    """What travels between stages of one micro-batch of [rows, width] tokens."""

    rows: int
    width: int
    """Tokens per row: the token ids, position ids and document ids travel whole, [rows, width]."""
    local_width: int
    """Positions per row of the activations that travel (the residual state, the MTP embeddings, the last stage's
    hidden states): `width` / tp under sequence parallelism, whose tensor-parallel plan leaves each rank its slice of
    the sequence outside attention and MLP (from the embedding to the final norm), else `width`."""
    state: tuple[int, ...]
    """Shape of the residual state (`DecoderLM.state_shape` of [rows, local_width])."""
    hidden: int
    activation_dtype: torch.dtype
    mtp_depth: int
    """MTP depths whose embeddings travel to, and hidden states come out of, the last stage (0: none)."""
    aux: bool
    """Whether a running balance-loss sum travels along."""


class StageModule(nn.Module):
    """One pipeline stage: [embedding] -> layers -> [head input, MTP]. Submodules are shared with the full model;
    the computation is the model's own (its DecoderLM hooks)."""

    def __init__(self, model: DecoderLM, layer_ids: range, first: bool, last: bool, io: StageIO) -> None:
        super().__init__()
        self.config = model.config
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        for name, module in model.stage_modules(first, last).items():
            setattr(self, name, module)
        self.first, self.last, self.io = first, last, io
        self._model = (model,)  # the hooks' owner, not a submodule of the stage
        self.multi_document = False
        """Whether the rows of the current pass pack several documents (set by `Pipeline.run`, from the batch
        every rank holds: no stage reads it back from the device)."""

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, io = self._model[0], self.io
        if self.first:
            input_ids, position_ids, doc_ids = args
            state = model.embed(input_ids)
            aux = None
            mtp = model.mtp_embeddings(input_ids) if io.mtp_depth else []
        else:
            state, position_ids, doc_ids, input_ids, *rest = args
            aux = rest[0] if io.aux else None
            mtp = rest[1:] if io.aux else rest
        inputs = model.layer_inputs(input_ids, position_ids, doc_ids if self.multi_document else None, doc_ids >= 0)
        layers = list(self.layers.values())
        state = model.run_layers(state, inputs, layers)
        if self.last:
            mtp_hidden = model.mtp_hidden(state, list(mtp), inputs) if io.mtp_depth else []
            hidden = model.head_input(state)
            aux_out = self._aux(aux, [*layers, *self.mtp] if io.mtp_depth else layers, hidden.device)
            return (hidden, *aux_out, *mtp_hidden)
        aux_out = self._aux(aux, layers, state.device)
        carried = (position_ids.contiguous(), doc_ids.contiguous(), input_ids.contiguous())
        # p2p sends need contiguous tensors; a received tensor sent on is copied (the schedule detaches stage outputs
        # in place after their backward, which a view or the stage's own input must not be)
        return (state, *carried, *aux_out, *(m if self.first else m.clone() for m in mtp))

    def _aux(self, incoming: torch.Tensor | None, modules: list[nn.Module],
             device: torch.device) -> tuple[torch.Tensor, ...]:
        """The running balance-loss sum after this stage's routers: () when it does not travel."""
        if not self.io.aux:
            return ()
        local = aux_loss_sum(modules)
        total = incoming if incoming is not None else torch.zeros(1, device=device)
        if local is None:  # a stage without routers sends on a copy (see `forward`)
            return (total.clone() if incoming is not None else total,)
        return (total + local.reshape(1),)


class StageGroup(nn.Module):
    """Everything this rank holds, under the full model's parameter names."""

    def __init__(self, model: DecoderLM, stages: list[StageModule]) -> None:
        super().__init__()
        self.config = model.config
        self.layers = nn.ModuleDict()
        for stage in stages:
            self.layers.update(stage.layers)
            for name, module in stage.named_children():
                if name != "layers":
                    setattr(self, name, module)
        if not hasattr(self, "mtp"):
            self.mtp = nn.ModuleList()


def _example(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)


def stage_io(first: bool, last: bool, io: StageIO) -> tuple[tuple, tuple]:
    """Example (inputs, outputs) of a stage: given up front, so no forward pass runs just to infer shapes (one
    would also count its tokens in the experts' load)."""
    ids = _example((io.rows, io.width), torch.long)
    activation = (io.rows, io.local_width, io.hidden)
    embeddings = tuple(_example(activation, io.activation_dtype) for _ in range(io.mtp_depth))
    aux = (_example((1,), torch.float32),) if io.aux else ()
    carried = (_example(io.state, io.activation_dtype), ids, ids, ids, *aux, *embeddings)
    inputs = (ids, ids, ids) if first else carried
    hidden = _example(activation, io.activation_dtype)
    outputs = (hidden, *aux, *(hidden for _ in range(io.mtp_depth))) if last else carried
    return inputs, outputs


class Pipeline:
    """The stages of this rank and the schedule that drives them."""

    def __init__(self, model: DecoderLM, pp_group: dist.ProcessGroup, pp_rank: int, pp: int, cfg: ParallelConfig,
                 n_microbatches: int, io: StageIO, device: torch.device,
                 wrap_stage: Callable[[StageModule], None] = lambda stage: None) -> None:
        from torch.distributed import pipelining

        found = pipeline_problems(cfg.pp_schedule, pp, n_microbatches)
        if found:
            raise ConfigError("; ".join(found))
        schedule_cls = getattr(pipelining, SCHEDULES[cfg.pp_schedule][0])
        total_stages = pp * (2 if cfg.pp_schedule in MULTI_STAGE else 1)
        ranges = split_layers(model.config.num_hidden_layers, total_stages, cfg.pp_first_stage_layers)
        self.io = io
        self.stage_ids = stages_of_rank(pp_rank, pp, cfg.pp_schedule)
        self.modules = [StageModule(model, ranges[s], s == 0, s == total_stages - 1, io) for s in self.stage_ids]
        self.group = StageGroup(model, self.modules)
        for module in self.modules:
            wrap_stage(module)
        # Zero-bubble schedules (zbv, dualpipev) split each backward into input gradients (B) and weight gradients
        # (W, later). Under activation recomputation that split runs the recomputation twice and keeps the first
        # one's tensors (autograd.grad with retain_graph) until W: a stage's memory grows with every micro-batch
        # in flight (DeepSeek-V4-Flash, 4 layers, pp=2 dualpipev: 154 GiB of temporaries instead of 12 under 1F1B;
        # pytorch/pytorch#136766). With recomputation, B runs the whole backward and W has nothing left to do.
        self.split_backward = split_backward(cfg)
        whole = None if self.split_backward else _no_weight_pass
        self.stages = []
        for module, stage in zip(self.modules, self.stage_ids):
            inputs, outputs = stage_io(stage == 0, stage == total_stages - 1, io)
            self.stages.append(pipelining.PipelineStage(module, stage, total_stages, device, input_args=inputs,
                                                        output_args=outputs, group=pp_group, dw_builder=whole))
        self.is_last = total_stages - 1 in self.stage_ids
        self.is_first = 0 in self.stage_ids
        self.n_microbatches = n_microbatches
        self._loss_fn: LossFn | None = None
        stage_arg = self.stages if cfg.pp_schedule in MULTI_STAGE else self.stages[0]
        self.schedule = schedule_cls(stage_arg, n_microbatches=n_microbatches, loss_fn=self._loss, scale_grads=False)
        self.schedule_name = cfg.pp_schedule

    def _loss(self, outputs: tuple[torch.Tensor, ...], index: torch.Tensor) -> torch.Tensor:
        hidden, *rest = outputs if isinstance(outputs, tuple) else (outputs,)
        aux = rest[0].sum() if self.io.aux else None
        mtp_hidden = list(rest[1:] if self.io.aux else rest)
        return self._loss_fn(TrainOutput(hidden, mtp_hidden, aux), int(index))

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor, loss_fn: LossFn,
            multi_document: bool, train: bool = True) -> None:
        """One pass over this rank's micro-batches (the [n_microbatches x rows, width] inputs, stacked): forward
        and, with `train`, backward. `loss_fn` runs on the last stage, once per micro-batch. `multi_document`:
        whether rows pack several documents (attention then stays inside each)."""
        self._loss_fn = loss_fn
        for stage in self.stages:
            stage.submod.multi_document = multi_document
        inputs = (input_ids, position_ids, doc_ids) if self.is_first else ()
        target = torch.arange(self.n_microbatches) if self.is_last else None
        run = self.schedule.step if train else self.schedule.eval
        split = SPLIT_BACKWARD.set(self.split_backward)
        try:
            if self.is_first or self.is_last:
                run(*inputs, target=target, losses=[])
            else:
                run()
        finally:
            self._loss_fn = None
            SPLIT_BACKWARD.reset(split)

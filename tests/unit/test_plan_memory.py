"""The planner's per-device memory against what polytrain itself allocates on the CPU.

"Measured" here is the peak of live tensor bytes during one full training step (forward, backward, AdamW step)
of the real model, tracked in-process by a dispatch mode that records every storage an operator creates and
frees it when its last reference dies: the CPU equivalent of a device allocator's peak-allocated counter
(without allocator rounding). Peak RSS is not used: it mixes in the Python heap, the allocator's caching and
libraries, which no planner models. The model states of multi-process layouts are compared with
benchmarks/results/parallel_memory.json (gloo, measured by benchmarks/parallel_memory.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from polytrain.config import TrainConfig
from polytrain.models import build_model, preset, spec_for
from polytrain.parallel.checkpointing import apply_activation_checkpointing
from polytrain.parallel.config import ParallelConfig
from polytrain.plan.layout import Job, Layout
from polytrain.plan.memory import device_memory
from polytrain.train.optim import build_optimizer
from tests.conftest import ROOT

# benchmarks/parallel_memory.py's tiny-but-not-trivial preset: 10.8M parameters, 16 experts, MLA, dense first layer
MODEL = dict(hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=512,
             n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=256, n_group=4, topk_group=2)
# tiny-v4 widened so activations are not lost in the model states: CSA / HCA / window layers, indexer, mHC
MODEL_V4 = dict(hidden_size=128, head_dim=64, num_attention_heads=4, q_lora_rank=64, o_lora_rank=32,
                moe_intermediate_size=128, n_routed_experts=16, index_topk=8, sliding_window=32,
                num_nextn_predict_layers=0)
PRESETS = {"tiny": MODEL, "tiny-v4": MODEL_V4}


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages, and their peak, while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def track(self, tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.live and not self.live[key][0].expired():
            return
        self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.current += storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        self.peak = max(self.peak, self.current)
        return out


def measured_peak(name: str, recompute: str, rows: int, seq: int) -> int:
    torch.manual_seed(0)
    config = preset(name, **PRESETS[name])
    model = build_model(config, "cpu", seed=0)
    modules = ["mla_up_proj", "norm"] if recompute == "selective" else []
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=recompute, ac_modules=modules))
    optimizer = build_optimizer(model, TrainConfig(), foreach=False)
    tokens = torch.randint(0, config.vocab_size, (rows, seq))

    def step() -> None:  # the SFT objective's path: hidden states, then the fused chunked head loss
        model.lm_head.loss_sum(model.forward_train(tokens).hidden, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW state exists from here on, as in any step after the first
    mode = LiveBytes()
    for tensor in [*model.parameters(), *model.buffers(), tokens]:
        mode.track(tensor)
    for state in optimizer.state.values():
        for value in state.values():
            mode.track(value)
    with mode:
        step()
    return mode.peak


@pytest.mark.parametrize("name, recompute, rows, seq", [
    ("tiny", "none", 2, 256), ("tiny", "full", 4, 256), ("tiny", "selective", 4, 256), ("tiny-v4", "none", 2, 256)])
def test_predicted_peak_within_15_percent_of_measured(name, recompute, rows, seq):
    config = preset(name, **PRESETS[name])
    # fp32 activations; attention as polytrain's implementation of the family computes it
    job = Job(config, seq, rows * seq, activation_bytes=4, fused_attention=spec_for(config).planner.fused_attention,
              mtp=False)
    predicted = device_memory(job, Layout(micro_batch=rows, recompute=recompute)).device
    measured = measured_peak(name, recompute, rows, seq)
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)


def test_model_states_match_measured_gloo_layouts():
    """Per-rank parameter + gradient + AdamW bytes of FSDP / EP / TP / PP layouts (4 gloo processes) against the
    planner's ZeRO-3 model states (fp32 weights are the master copy, as in polytrain's FSDP)."""
    rows = json.loads((ROOT / "benchmarks/results/parallel_memory.json").read_text())["rows"]
    config = preset("tiny", **MODEL)
    job = Job(config, 64, 64 * 8, activation_bytes=4, fused_attention=False, mtp=False)
    layouts = {"single process": Layout(), "dp_shard=2": Layout(dp=2), "dp_shard=4": Layout(dp=4),
               "dp_shard=4, ep=2": Layout(dp=4, ep=2), "dp_shard=4, ep=4": Layout(dp=4, ep=4),
               "dp_shard=2, tp=2": Layout(dp=2, tp=2), "dp_shard=2, pp=2": Layout(dp=2, pp=2)}
    for row in rows:
        memory = device_memory(job, layouts[row["layout"]])
        predicted = memory.parameters + memory.gradients + memory.optimizer
        measured = max(r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] for r in row["ranks"])
        # 10%: tensor parallelism keeps norms and the router whole on every rank, the planner splits all dense
        assert abs(predicted / measured - 1) <= 0.10, (row["layout"], predicted, measured)


@pytest.mark.parametrize("schedule", ["dualpipev", "zbv"])
@pytest.mark.parametrize(("pp", "microbatches"), [(2, 4), (4, 8), (4, 16), (8, 64)])
def test_v_schedule_in_flight_micro_batches_are_torchs(schedule, pp, microbatches):
    """The planner's count of the micro-batches a V-schedule rank holds at its peak, per stage, is what torch's
    schedule does: each rank's actions replayed (a forward adds a micro-batch to its stage, a backward frees one;
    DualPipeV's overlapped forward + backward runs the forward first)."""
    from types import SimpleNamespace

    from torch.distributed.pipelining import schedules

    from polytrain.parallel.pp import SCHEDULES, stages_of_rank
    from polytrain.plan.memory import v_in_flight

    cls = getattr(schedules, SCHEDULES[schedule][0])
    for rank in range(pp):
        state = SimpleNamespace(pp_group_size=pp, _n_microbatches=microbatches, n_local_stages=2, rank=rank,
                                num_stages=2 * pp)
        live = dict.fromkeys(stages_of_rank(rank, pp, schedule), 0)
        peak: dict[int, int] = {}
        for action in cls._calculate_single_rank_operations(state, rank):
            if action is None:
                continue
            steps = action.sub_actions if action.computation_type == schedules.OVERLAP_F_B else (action,)
            for step in steps:
                if step.computation_type == schedules.FORWARD:
                    live[step.stage_index] += 1
                elif step.computation_type in (schedules.BACKWARD_INPUT, schedules.FULL_BACKWARD):
                    live[step.stage_index] -= 1
                if sum(live.values()) > sum(peak.values()):
                    peak = dict(live)
        assert tuple(peak.values()) == v_in_flight(schedule, pp, rank, microbatches), (rank, peak)


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_attention_memory_against_the_benchmark(cp):
    """The planner's MLA under context parallelism against benchmarks/context_parallel.py's measured bytes per rank
    (V3 architecture, fp32, its longest row): what the attention keeps for backward (the whole row's gathered
    latents instead of per-head keys; the benchmark's `attention` tag, which leaves the input norm to `other`) and
    what its backward adds at the step's peak (the recomputed expansion of the whole row and SDPA's additive mask:
    the `backward` tag), both within 15%."""
    from polytrain.models import model_config_from_table
    from polytrain.plan.memory import _norm

    results = json.loads((ROOT / "benchmarks" / "results" / "context_parallel.json").read_text())["models"]["v3"]
    config = model_config_from_table(results["config"]["model"])
    row = max((r for r in results["rows"] if r["case"] == f"cp={cp}"), key=lambda r: r["tokens"])
    rank = max(row["ranks"], key=lambda r: r["peak_bytes"])
    hooks, seq = spec_for(config).planner, row["local_tokens"]
    layers = range(config.num_hidden_layers)
    kept = seq * sum(hooks.attention_activation_bytes(config, i, seq, 4, True, 1, lambda d: _norm(d, 4), cp)
                     - _norm(config.hidden_size, 4) for i in layers)
    backward = seq * max(hooks.attention_backward_bytes(config, i, seq, 4, True, 1, cp) for i in layers)
    assert kept == pytest.approx(rank["activation_bytes"]["attention"], rel=0.15)
    assert backward == pytest.approx(rank["peak_by_tag"]["backward"], rel=0.15)

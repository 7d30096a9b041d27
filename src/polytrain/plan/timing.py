"""Step time of a job under a layout on a chip: compute, pipeline bubble, exposed communication, optimizer.

Assumptions (stated once, used everywhere):
- matrix work splits evenly over the devices (balanced routing, even pipeline stages) and runs at
  `chip.compute_efficiency` of the dense peak; recomputation adds forward work (full: one forward, polytrain's
  selective: half of one);
- collectives move bytes at `chip.comm_efficiency` of the link bandwidth, with the bus-bandwidth factor (n - 1) / n;
  a group that fits in one node uses the intra-node links, otherwise the inter-node ones;
- overlap: data-parallel gradient / parameter collectives hide behind compute (only what exceeds the compute time,
  plus the last bucket, 5%, is exposed); the MoE all-to-all is hidden behind compute only under the DualPipe
  schedules (their forward / backward chunk pairing), otherwise fully exposed; tensor- and context-parallel
  collectives and host transfers of offloaded state are exposed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from polytrain.errors import ConfigError
from polytrain.models.registry import spec_for
from polytrain.plan.hardware import Chip
from polytrain.plan.layout import Job, Layout
from polytrain.plan.memory import microbatches, runs_mtp

HOST_LINK_GBPS = 25.0  # assumption: effective PCIe Gen4 x16 / Gen5 host <-> device bandwidth per device
DP_EXPOSED_TAIL = 0.05


@dataclass(frozen=True)
class StepTime:
    compute: float
    recompute: float
    bubble: float
    expert_all_to_all: float
    tensor_parallel: float
    """Tensor- and context-parallel collectives (exposed)."""
    pipeline_p2p: float
    data_parallel: float
    offload: float
    optimizer: float
    tokens_per_step: float
    devices: int
    flops_per_token: float
    peak_flops: float

    @property
    def step(self) -> float:
        return (self.compute + self.recompute + self.bubble + self.expert_all_to_all + self.tensor_parallel
                + self.pipeline_p2p + self.data_parallel + self.offload + self.optimizer)

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.tokens_per_step / self.step / self.devices

    @property
    def mfu(self) -> float:
        """Model FLOPs (no recomputation) per second per device over the dense BF16 peak."""
        return self.tokens_per_s_per_device * self.flops_per_token / self.peak_flops

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_step / self.step * 86400

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "step": self.step, "tokens_per_s_per_device": self.tokens_per_s_per_device,
                "mfu": self.mfu, "tokens_per_day": self.tokens_per_day}


def _bandwidth(chip: Chip, group: int, stride: int) -> float:
    """Bytes/s per device for a collective over `group` ranks spaced `stride` apart."""
    in_node = group * stride <= chip.devices_per_node
    return (chip.intra_node_gbps if in_node else chip.inter_node_gbps) * 1e9 * chip.comm_efficiency


def _collective(size: float, group: int, bandwidth: float) -> float:
    return 0.0 if group <= 1 else size * (group - 1) / group / bandwidth


def _all_to_all(job: Job, layout: Layout, chip: Chip, tokens: float, element_bytes: int) -> float:
    """One dispatch (or combine) of `tokens` tokens to their top-k experts over the expert-parallel group. Each
    token goes to k experts; across nodes at most to the routing's node limit (group-limited routing: topk_group
    groups), the copies inside a node forwarded over the intra-node links (DeepSeek-V3 section 3.2.2)."""
    c = job.model
    k = c.num_experts_per_tok
    nodes = layout.ep * layout.tp / chip.devices_per_node
    remote = (layout.ep - 1) / layout.ep
    if nodes <= 1:
        return tokens * k * c.hidden_size * element_bytes * remote / _bandwidth(chip, layout.ep, layout.tp)
    node_copies = min(k, nodes, c.topk_group if c.n_group > 1 else k) * (nodes - 1) / nodes
    inter = tokens * node_copies * c.hidden_size * element_bytes / (chip.inter_node_gbps * 1e9 * chip.comm_efficiency)
    intra = tokens * k * c.hidden_size * element_bytes / (chip.intra_node_gbps * 1e9 * chip.comm_efficiency)
    return max(inter, intra)


def bubble_fraction(layout: Layout, m: int) -> float:
    """Idle time over busy time of a pipeline with m micro-batches (F = 1, B = 2, W = 1 units). Under activation
    recomputation polytrain runs the zero-bubble schedules' backwards whole (parallel/pp.py): no W is left to fill
    the bubble, which is then that of two interleaved stages per device."""
    p = layout.pp
    if p == 1:
        return 0.0
    if layout.schedule in ("zbv", "dualpipev") and layout.recompute != "none":
        return (p - 1) / (2 * m)
    return {
        "gpipe": (p - 1) / m,
        "1f1b": (p - 1) / m,
        "interleaved_1f1b": (p - 1) / (2 * m),
        "zbv": (p - 1) / (3 * m),
        "dualpipev": 2 * (p - 1) / (3 * m) / 2,
        "dualpipe": 2 * (p / 2 - 1) / (3 * m),
    }[layout.schedule]


def step_time(job: Job, layout: Layout, chip: Chip) -> StepTime:
    c = job.model
    flops = job.flops
    tokens = layout.step_sequences(job) * job.seq_len
    devices = layout.devices
    peak = chip.peak_flops("bf16")
    eff = chip.compute_efficiency
    linear_peak = chip.peak_flops(job.precision) if job.precision != "bf16" else peak
    per_device = tokens / devices
    executed = job.executed_flops  # what the engine computes (a materialised attention scores every key)
    compute = per_device * (executed.linear / (linear_peak * eff) + executed.attention_core / (peak * eff))
    if job.algorithm == "dpo":  # + the reference model's forward over the same pairs (none when precomputed)
        compute *= 4 / 3
    recompute = {"none": 0.0, "selective": 0.5 / 3, "full": 1 / 3}[layout.recompute] * compute
    m = microbatches(job, layout)
    bubble = bubble_fraction(layout, m) * (compute + recompute)

    b = 2  # activations travel in bf16
    mb_tokens = layout.micro_batch * job.seq_len / layout.cp
    shape = job.shape
    layers_per_stage = c.num_hidden_layers / layout.pp + (c.num_nextn_predict_layers if job.mtp else 0) / layout.pp
    moe_share = sum(1 for x in shape.layer_experts if x) / c.num_hidden_layers
    # expert all-to-all: dispatch + combine in forward and backward (again in the recomputed forward)
    a2a = 0.0
    if layout.ep > 1:
        per_a2a = _all_to_all(job, layout, chip, mb_tokens / layout.tp, 1 if job.precision == "fp8" else b)
        per_a2a += _all_to_all(job, layout, chip, mb_tokens / layout.tp, b)  # combine in bf16
        passes = 2 + (1 if layout.recompute == "full" else 0)
        a2a = passes * per_a2a * m * layers_per_stage * moe_share
        if layout.schedule in ("dualpipe", "dualpipev") and layout.pp > 1:
            a2a = max(0.0, a2a - compute)  # overlapped with the paired chunk's compute
    tp_time = 0.0
    if layout.tp > 1:  # 2 all-gathers + 2 reduce-scatters per layer forward, the same backward
        per_layer = 8 * _collective(mb_tokens * c.hidden_size * b, layout.tp, _bandwidth(chip, layout.tp, 1))
        tp_time = per_layer * layers_per_stage * m
    if layout.cp > 1:  # context parallel: all-gather each layer's key series forward (again when the layer is
        # recomputed), reduce-scatter their gradients backward
        hooks = spec_for(c).planner
        layers = range(c.num_hidden_layers + (c.num_nextn_predict_layers if runs_mtp(job) else 0))
        widths = [hooks.context_gather_width(c, i) for i in layers]
        forwards = {"none": 1.0, "selective": 1.5, "full": 2.0}[layout.recompute]
        width = sum(forwards * f + back for f, back in widths) / layout.pp  # per stage, summed over its layers
        sequence = layout.micro_batch * job.seq_len
        tp_time += _collective(sequence * width * b, layout.cp, _bandwidth(chip, layout.cp, layout.tp)) * m
    p2p = 0.0
    if layout.pp > 1:
        width = spec_for(c).planner.residual_width(c)
        p2p = 2 * m * mb_tokens * width * b / layout.tp / (chip.inter_node_gbps * 1e9 * chip.comm_efficiency)

    local_dense = max(job.params_of_stage(layout.pp, s)[0] for s in range(layout.pp)) / layout.tp
    local_experts = max(job.params_of_stage(layout.pp, s)[1] for s in range(layout.pp)) / layout.ep
    dp_time = 0.0
    per_param = 4 + 2 + (2 if layout.zero == 3 else 0)  # fp32 reduce-scatter, bf16 all-gather(s)
    for count, group, stride in ((local_dense, layout.dp * layout.cp, layout.tp * layout.pp),
                                 (local_experts, layout.expert_dp, layout.ep * layout.pp)):
        dp_time += _collective(count * per_param, group, _bandwidth(chip, group, stride))
    dp_exposed = max(0.0, dp_time - compute) + DP_EXPOSED_TAIL * dp_time

    local = local_dense / (layout.dp * layout.cp) + local_experts / layout.expert_dp
    offload = 0.0
    host = HOST_LINK_GBPS * 1e9
    if layout.offload == "optimizer":  # gradients down, updated bf16 weights up, update on the host
        offload = local * (4 + 2) / host + local * 16 / (50e9)
    elif layout.offload == "all":  # + parameters up for forward and backward, gradients down
        offload = local * (4 + 2 * 2) / host + local * 16 / (50e9)
    optimizer = 0.0 if layout.offload != "none" else local * 16 * 3 / (chip.hbm_tbps * 1e12)
    return StepTime(compute, recompute, bubble, a2a, tp_time, p2p, dp_exposed, offload, optimizer, tokens, devices,
                    flops.total, peak)


@dataclass(frozen=True)
class GRPOPhases:
    """One GRPO step (MindSpeed-RL's time_all without overlap): sampling, the old-policy and reference
    log-probabilities, the policy update, and the weight sync from trainer to sampler. Colocated: every phase on the
    training devices. Disaggregated (`Job.rollout_devices`): sampling on devices of its own, the rest on the
    training devices, the weights crossing the network between them."""

    rollout: float
    log_probs: float
    update: float
    weight_sync: float
    rollout_instances: int = 0
    """Disaggregated: engine replicas on the rollout devices (0: colocated)."""
    devices_per_instance: int = 0
    rollout_memory: float = 0.0
    """Disaggregated: bytes per rollout device (bf16 weights and KV cache)."""

    @property
    def step(self) -> float:
        return self.rollout + self.log_probs + self.update + self.weight_sync

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "step": self.step}


DECODE_EFFICIENCY = 0.5
"""Share of HBM bandwidth a decode step reaches while streaming weights and the KV cache."""
DECODE_A2A_LATENCY_S = 0.4e-3
"""Dispatch + combine latency per MoE layer of one decode step with expert parallelism: DeepEP's low-latency kernels
(128 tokens, EP8-256) take 77-194 us to dispatch and 114-360 us to combine (DeepEP README)."""
ENGINE_WEIGHT_SHARE = 0.5
"""Disaggregated: the largest share of a rollout device's usable memory its weights may take; the rest holds the
KV cache (an engine replica spans the fewest devices, a power of two, that keep to it)."""


def _samples(job: Job) -> int:
    return max(1, job.global_batch_tokens // (job.prompt_len + job.response_len))


def _generation(job: Job, chip: Chip, dense: float, experts: float, batch: float, kv_split: int, pp: int,
                shards: int, ep: int, devices: int) -> float:
    """Sampling time: `response_len` decode steps of `batch` sequences per replica (each device streaming `dense`
    + the touched share of `experts` parameters and its 1 / `kv_split` of the KV cache, or compute-bound over
    `shards` devices), plus the prefill of every prompt over `devices`."""
    c = job.model
    length = job.prompt_len + job.response_len
    touched = 1 - (1 - c.num_experts_per_tok / c.n_routed_experts) ** batch  # share of experts a step reads
    weight_bytes = 2 * (dense + experts * touched)
    kv_per_token = spec_for(c).planner.kv_width(c) * 2
    kv_bytes = batch * length / 2 * kv_per_token * c.num_hidden_layers / kv_split
    memory_time = (weight_bytes + kv_bytes) / (chip.hbm_tbps * 1e12 * DECODE_EFFICIENCY)
    flops_time = batch * job.flops.total / 3 / shards / (chip.peak_flops("bf16") * chip.compute_efficiency)
    moe_layers = sum(1 for x in job.shape.layer_experts if x)
    latency = moe_layers * DECODE_A2A_LATENCY_S if ep > 1 else 0.0
    # a token passes every stage in turn: a decode step costs all stages' time, whatever the pipelining
    rollout = job.response_len * (max(memory_time, flops_time) * pp + latency)
    return rollout + _samples(job) * job.prompt_len * job.flops.total / 3 / devices / (
        chip.peak_flops("bf16") * chip.compute_efficiency)  # prefill


def _served(job: Job) -> tuple[int, int]:
    """(dense, expert) parameters a rollout engine serves: the model without its MTP modules."""
    shape = job.shape
    return sum(shape.layer_dense) + shape.embedding + shape.head, sum(shape.layer_experts)


def rollout_group(job: Job, chip: Chip, dp: int | None = None) -> tuple[int, int, float]:
    """Disaggregated sampling on `job.rollout_devices`: (replicas that sample, devices per replica, bytes per
    device). A replica shards the bf16 model over its devices (experts and dense layers alike, as vLLM's tensor +
    expert parallelism does) and its KV cache with them (data-parallel attention, as DeepSeek's own MLA deployments
    run; under plain tensor parallelism MLA's latent cache would be copied on every device), on the fewest devices
    whose weights keep to ENGINE_WEIGHT_SHARE of usable memory and whose KV cache fits beside them. With the
    training layout's `dp`: polytrain hands each replica whole data-parallel groups (grpo.rollout_ranks), so at most
    `dp` replicas sample and the busiest holds ceil(dp / replicas) groups' samples."""
    from polytrain.plan.search import USABLE_FRACTION

    c, n = job.model, job.rollout_devices
    weights = 2.0 * sum(_served(job))
    usable = chip.memory_bytes * USABLE_FRACTION
    kv_per_sample = (job.prompt_len + job.response_len) * spec_for(c).planner.kv_width(c) * 2 * c.num_hidden_layers
    k = 1
    while k <= n:
        replicas = n // k if dp is None else min(n // k, dp)
        need = weights / k + kv_per_sample * busiest_batch(job, replicas, dp) / k
        if weights / k <= ENGINE_WEIGHT_SHARE * usable and need <= usable:
            return replicas, k, need
        k *= 2
    raise ConfigError(f"--rollout-devices {n}: the bf16 model ({weights / 1e9:,.0f} GB) and the KV cache of "
                      f"{_samples(job)} samples do not fit on {n} x {chip.name}; set more rollout devices")


def busiest_batch(job: Job, replicas: int, dp: int | None) -> float:
    """Samples the busiest of `replicas` engine replicas decodes together (whole data-parallel groups each)."""
    if dp is None:
        return _samples(job) / replicas
    return -(-dp // replicas) * _samples(job) / dp


def grpo_phases(job: Job, layout: Layout, chip: Chip, update: StepTime) -> GRPOPhases:
    """Rollout: decode is memory-bound: every decode step streams the device's share of the weights its tokens
    touch (all dense weights; the experts its batch routes to) and the KV cache, or is compute-bound when the batch
    is large, plus the all-to-all latency of every MoE layer; generation runs to the longest response.
    Colocated, it runs on the training layout; disaggregated, on `rollout_group`'s replicas.
    Log-probs: two forwards (old policy, reference) over every sample, on the training devices.
    Weight sync: colocated, each device reads and rewrites its bf16 weights and exchanges them once over the
    intra-node links; disaggregated, the bf16 weights cross the inter-node links from the training ranks onto the
    rollout ranks (a reduce, or for several an all-reduce: twice the bytes), then from each rollout rank to its
    engine (replicas in parallel), at link speed (the push goes through host memory, which can be slower)."""
    samples = _samples(job)
    log_probs = 2 * (update.compute / 3)  # two forwards, no backward
    if job.rollout_devices:
        replicas, k, memory = rollout_group(job, chip, layout.dp)
        dense, experts = _served(job)
        rollout = _generation(job, chip, dense / k, experts / k, busiest_batch(job, replicas, layout.dp), k, 1, k,
                              k, replicas * k)
        # the trainer's reduce of each bucket onto one rollout rank (an all-reduce, twice the bytes, for several),
        # then the rollout ranks' push to their engines
        passes = (2 if replicas > 1 else 1) + 1
        sync = passes * 2 * (dense + experts) / (chip.inter_node_gbps * 1e9 * chip.comm_efficiency)
        return GRPOPhases(rollout, log_probs, update.step, sync, replicas, k, memory)
    dense = max(job.params_of_stage(layout.pp, s)[0] for s in range(layout.pp)) / layout.tp
    experts = max(job.params_of_stage(layout.pp, s)[1] for s in range(layout.pp)) / layout.ep
    batch = samples / (layout.dp * layout.cp)  # sequences decoded together by one model replica
    rollout = _generation(job, chip, dense, experts, batch, layout.pp, layout.pp, layout.tp * layout.ep * layout.pp,
                          layout.ep, layout.devices)
    sync = 2 * (dense + experts) * 2 / (chip.hbm_tbps * 1e12) + (dense + experts) * 2 / (
        chip.intra_node_gbps * 1e9 * chip.comm_efficiency)
    return GRPOPhases(rollout, log_probs, update.step, sync)

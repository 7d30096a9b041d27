"""Memory per device of a training job under a layout: model states, activations, buffers, RL extras.

Model states, bytes per parameter (w = 2-byte working weights, g = 4-byte fp32 gradients, o = fp32 master + two
moments = 4 + 2 x moment_bytes), sharded over the data-parallel group G of the weight (dense: dp x cp; routed
experts: the expert-data-parallel group (dp x tp x cp) / ep):
  ZeRO-1: w + g + o / G          ZeRO-2: w + (g + o) / G          ZeRO-3 (FSDP): (g + o) / G, fp32 master = weight
ZeRO-3 also holds the gathered working copy of the layer being computed and the next one (prefetch); in backward,
FSDP adds the unit's unsharded gradients and the previous unit's fp32 reduce-scatter copy (see `_stage_memory`).
With gradient accumulation (more than one micro-batch per step) ZeRO-2 / 3 gradients are reduced after the last
micro-batch only, so they are held unsharded (g) through the step (in the peak; `gradients` reports the sharded ones
kept between steps). Pipeline schedules hold their in-flight micro-batches per stage; DualPipeV and ZBV place two
stages on each rank (`v_in_flight`).
Offload `optimizer` moves o to host memory; `all` moves everything sharded to host memory.

Activations are counted tensor by tensor from what autograd keeps in polytrain's blocks (the family's attention and
residual streams through its spec's `attention_activation_bytes`, models/common/moe.py here), per token and layer;
see `layer_activation_bytes`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from polytrain.algorithms.grpo import GRPOConfig
from polytrain.models.common.config import ModelConfig
from polytrain.models.registry import spec_for
from polytrain.parallel.validate import MULTI_STAGE
from polytrain.plan.layout import Job, Layout

GiB = 2**30
HEAD_CHUNK_BYTES = 256 * 2**20  # models/output_head.py CHUNK_BYTES
SYNC_BUCKET_BYTES = GRPOConfig().sync_bucket_mb * 2**20  # one weight-sync bucket (parallel/weight_sync.py)


@dataclass(frozen=True)
class Memory:
    """Bytes on the most loaded device (and in host memory per device)."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    transient: float
    """Working set that comes and goes: gathered ZeRO-3 weights, one layer's recomputation, logits, buffers."""
    peak: float
    """Device bytes at the peak: parameters + optimizer state + the larger of the end-of-forward working set
    (activations, logits, buffers) and the end-of-backward one (gradients, the last layer's recomputation,
    buffers); gradients held in persistent buffers (ZeRO-1 / 2) count in both."""
    rl: float
    """DPO and GRPO: the frozen reference model (on the device through the update step, counted in `peak`)."""
    host: float
    """Host memory per device holding offloaded state."""
    stage: int
    """The pipeline stage this is (the most loaded one)."""
    rollout: float = 0.0
    """GRPO, outside the update step: device bytes while sampling (the state kept on the device, the reference
    model, the KV cache of this device's samples, one gathered layer at a time) or while syncing weights to an
    engine (one bucket instead of the KV cache), whichever is more; 0 for other algorithms."""

    @property
    def device(self) -> float:
        """The device's peak over the whole step: the update step's, or for GRPO the rollout's if larger."""
        return max(self.peak, self.rollout)

    def as_dict(self) -> dict[str, float]:
        return {**{k: v for k, v in asdict(self).items()}, "device": self.device}


def _norm(d: float, b: int) -> float:
    """RMSNorm of width d: fp32 input copy + normalised value + the output its consumer keeps."""
    return (4 + b) * d + b * d


def layer_activation_bytes(config: ModelConfig, layer: int, seq_len: int, b: int, *, fused: bool = True,
                           tp: int = 1, recompute_norms: bool = False, rows_kept: bool = False,
                           cp: int = 1) -> float:
    """Bytes autograd keeps per token of one decoder layer without recomputation.

    b: bytes per activation element. fused: flash-style attention (keeps q, k, v, output, log-sum-exp); otherwise
    the reference attention keeps the seq x seq probabilities. tp divides the per-head tensors.
    recompute_norms: RMSNorm internals are recomputed (only input and output kept). rows_kept: the routed experts
    keep their [tokens x top-k, hidden] input rows, as under expert parallelism (the rows they received) and inside
    a checkpointed region; otherwise backward gathers them again from the layer's tokens. cp: seq_len is a
    context-parallel rank's share of rows cp times as long (the attention keeps what it gathers of them).
    """
    c, h = config, config.hidden_size

    def norm(d: float) -> float:
        return 2 * b * d if recompute_norms else _norm(d, b)

    attn = spec_for(c).planner.attention_activation_bytes(c, layer, seq_len, b, fused, tp, norm, cp)
    if not c.is_moe_layer(layer):
        return attn + norm(h) + 4 * b * c.intermediate_size / tp
    k, moe_i = c.num_experts_per_tok, c.moe_intermediate_size
    router = 5 * c.n_routed_experts + 32 * k
    clamped = c.swiglu_limit > 0  # V4 clamps the shared experts' gate and up: two more tensors kept
    # per routed slot: gate|up and the down projection's input (the activation is differentiated from gate|up),
    # plus the token row where it is kept (`rows_kept`); routing indices and weights
    routed = b * k * ((h if rows_kept else 0) + 3 * moe_i) + 40 * k
    shared = (6 if clamped else 4) * b * moe_i * c.n_shared_experts
    return attn + norm(h) + router + routed + shared


def _in_flight(layout: Layout, microbatches: int, stage: int) -> float:
    """Micro-batches whose activations a stage holds at its peak, in units of the stage's layers."""
    p, m = layout.pp, microbatches
    if p == 1:
        return 1.0
    if layout.schedule == "gpipe":
        return float(m)
    if layout.schedule == "interleaved_1f1b":
        return min(m, p - stage) * (1 + (p - 1) / (2 * p))
    if layout.schedule == "dualpipe":
        return float(min(m, p + 1))  # DualPipe README: p + 1 micro-batches of a stage
    return float(min(m, p - stage))


V_SCHEDULES = ("zbv", "dualpipev")
"""Schedules that place stages r and 2 pp - 1 - r of 2 pp on pipeline rank r (torch's "v" placement)."""


def v_in_flight(schedule: str, pp: int, rank: int, microbatches: int) -> tuple[int, int]:
    """Micro-batches whose activations pipeline rank `rank` holds at its peak under torch's ScheduleDualPipeV or
    ScheduleZBVZeroBubble, for each of its two stages (stage `rank`, stage 2 pp - 1 - `rank` of 2 pp). Both run
    2 pp - rank - 1 forwards of the first stage and rank + 1 of the second before the rank's first backward;
    DualPipeV's overlapped steps then run the next forward of the first stage before that backward: 2 pp + 1 in all
    (ZBV: 2 pp)."""
    first = 2 * pp - rank - (0 if schedule == "dualpipev" else 1)
    return min(microbatches, first), min(microbatches, rank + 1)


_CACHE: dict[tuple, tuple[float, float, int]] = {}


def _largest_layer(job: Job, layout: Layout) -> tuple[float, float]:
    """(dense, routed-expert) parameters on one device of the largest decoder layer (what FSDP gathers at once)."""
    key = ("largest", layout.tp, layout.ep)
    if key not in job.stage_params:
        shape = job.shape
        job.stage_params[key] = max(((d / layout.tp, e / layout.ep) for d, e in zip(shape.layer_dense,
                                                                                   shape.layer_experts)), key=sum)
    return job.stage_params[key]


def runs_mtp(job: Job) -> bool:
    """Whether the step runs the MTP modules: SFT's does; the preference and RL objectives score the main head only
    (the modules' weights and optimizer state are still held)."""
    return job.mtp and job.algorithm == "sft"


def _stage_activations(job: Job, layout: Layout, stage: int, stages: int) -> tuple[float, float, int]:
    """(bytes kept per token by the layers of stage `stage` of `stages` under the layout's recompute choice,
    excluding the layer inputs kept by checkpointed blocks; the largest layer's bytes per token (its recomputation
    working set); number of layers). Cached: the search evaluates thousands of layouts over the same few stage
    splits."""
    c = job.model
    key = (job.key, stages, stage, layout.tp, layout.ep > 1, layout.cp, layout.recompute, runs_mtp(job))
    if key not in _CACHE:
        layers = list(job.shape.stage_layers(stages)[stage])
        if stage == stages - 1 and runs_mtp(job):
            layers += range(c.num_hidden_layers, c.num_hidden_layers + c.num_nextn_predict_layers)
        seq = job.seq_len // layout.cp

        def per_layer(i: int, norms: bool = False, recomputed: bool = False) -> float:
            return layer_activation_bytes(c, i, seq, job.activation_bytes, fused=job.attention_fused, tp=layout.tp,
                                          recompute_norms=norms, rows_kept=layout.ep > 1 or recomputed, cp=layout.cp)

        # a checkpointed block's recomputation keeps its experts' token rows (polytrain.parallel.checkpointing)
        full = [per_layer(i, recomputed=layout.recompute != "none") for i in layers]
        hooks = spec_for(c).planner
        backward = [hooks.attention_backward_bytes(c, i, seq, job.activation_bytes, job.attention_fused, layout.tp,
                                                   layout.cp) for i in layers]
        if layout.recompute == "none":
            kept = sum(full)
        elif layout.recompute == "selective":
            # polytrain's selective: every other block whole (ac_every = 2), the others with their norms recomputed
            kept = sum(per_layer(i, True) for j, i in enumerate(layers) if j % 2)
        else:
            kept = 0.0
        # the working set of a layer's backward: what it keeps (recomputed) and what its backward adds
        _CACHE[key] = (kept, max((f + w for f, w in zip(full, backward)), default=0.0), len(layers))
    return _CACHE[key]


def microbatches(job: Job, layout: Layout) -> int:
    """Micro-batches per data-parallel rank per step."""
    return layout.step_sequences(job) // (layout.dp * layout.micro_batch)


def device_memory(job: Job, layout: Layout) -> Memory:
    """The most loaded device's memory: the first stage (embedding, the most micro-batches in flight, the extra
    layers of an uneven split) or the last (output head, MTP modules, logits); middle stages hold less. Under
    the V-shaped schedules (DualPipeV, ZBV) every pipeline rank holds about 2 pp half-stages of micro-batches in
    flight and rank 0 both ends of the model: each rank is counted."""
    ranks = range(layout.pp) if layout.schedule in V_SCHEDULES else {0, layout.pp - 1}
    return max((_stage_memory(job, layout, s) for s in ranks), key=lambda m: m.device)


def _chunks(job: Job, layout: Layout, rank: int) -> list[tuple[int, int, float]]:
    """The pipeline stages pipeline rank `rank` runs, as (stage, number of stages, micro-batches in flight at the
    rank's peak). DualPipeV, ZBV: stages `rank` and 2 pp - 1 - `rank` of 2 pp (torch's V placement); otherwise
    the layout's stage `rank` of pp, in flight as `_in_flight` counts in units of that stage."""
    m = microbatches(job, layout)
    if layout.schedule in V_SCHEDULES and layout.pp > 1:
        first, second = v_in_flight(layout.schedule, layout.pp, rank, m)
        return [(rank, 2 * layout.pp, float(first)), (2 * layout.pp - 1 - rank, 2 * layout.pp, float(second))]
    return [(rank, layout.pp, _in_flight(layout, m, rank))]


def _stage_memory(job: Job, layout: Layout, stage: int) -> Memory:
    """Memory of pipeline rank `stage` (the stage it runs; under DualPipeV and ZBV its two stages)."""
    c = job.model
    chunks = _chunks(job, layout, stage)
    holds_first = any(s == 0 for s, _, _ in chunks)  # the embedding, the MTP embeddings it makes
    holds_last = any(s == n - 1 for s, n, _ in chunks)  # the head, the MTP modules, the logits
    dense = experts = 0
    for s, n, _ in chunks:
        d, e = job.params_of_stage(n, s)
        dense, experts = dense + d, experts + e
    local_dense = dense / layout.tp
    local_experts = experts / layout.ep
    if layout.schedule == "dualpipe":  # DualPipe keeps two copies of the parameters
        local_dense, local_experts = 2 * local_dense, 2 * local_experts
    groups = ((local_dense, layout.dp * layout.cp), (local_experts, layout.expert_dp))
    w, g, o = 2.0, 4.0, 4.0 + 2 * job.moment_bytes
    m = microbatches(job, layout)
    # FSDP (ZeRO-2 / 3) with several micro-batches reduces gradients after the last one only (parallel/runtime.py
    # gradient_sync; always under pipeline schedules, and without pipelining unless gradients are offloaded):
    # each rank accumulates its stage's gradients unsharded on the device.
    accumulate = layout.zero in (2, 3) and m > 1 and (layout.pp > 1 or layout.offload != "all")
    params = grads = optim = host = unsharded_grads = 0.0
    for count, group in groups:
        if layout.zero == 1:
            p_b, g_b, o_b = w, g, o / group
        elif layout.zero == 2:
            p_b, g_b, o_b = w, g / group, o / group
        else:
            p_b, g_b, o_b = 0.0, g / group, o / group
        if layout.offload in ("optimizer", "all"):
            host += count * o_b
            o_b = 0.0
        if layout.offload == "all":
            host += count * g_b
            g_b = 0.0
        params += count * p_b
        grads += count * g_b
        unsharded_grads += count * g
        optim += count * o_b

    b = job.activation_bytes
    tokens = layout.micro_batch * job.seq_len / layout.cp
    seq_tokens = tokens / (layout.tp if layout.tp > 1 else 1)  # sequence parallel splits the residual stream
    stream = spec_for(c).planner.residual_width(c) * b  # a layer's input, kept under full recompute
    mtp_layers = c.num_nextn_predict_layers if runs_mtp(job) else 0
    fsdp_pipeline = layout.pp > 1 and layout.zero in (2, 3)
    activations = working = 0.0
    in_flight = 0.0
    for s, n, count in chunks:
        kept_per_token, working_per_token, layer_count = _stage_activations(job, layout, s, n)
        if layout.recompute == "full":
            kept = layer_count * stream * seq_tokens
        elif layout.recompute == "selective":
            kept = kept_per_token * tokens + (layer_count + 1) // 2 * stream * seq_tokens
        else:
            kept = kept_per_token * tokens
        if fsdp_pipeline and s == 0:
            # the MTP modules' token embeddings are made on the first stage and sent on with each micro-batch
            kept += mtp_layers * tokens * c.hidden_size * b
        activations += kept * count
        in_flight += count
        last_share = kept  # one micro-batch of the rank's second stage: the V schedules differentiate it first
        if layout.recompute != "none":
            working = max(working, working_per_token * tokens)
    if layout.pp == 1:
        activations += tokens * c.hidden_size * b  # embedding output
    logits = 0.0
    buffers = 0.0
    if holds_last:
        heads = 1 + mtp_layers
        if layout.tp > 1:  # plain head: logits (b) and their fp32 copy kept for the loss, the fp32 gradient
            logits = tokens * c.vocab_size / layout.tp * ((b + 4) * heads + 4)
        else:  # fused, chunked head (models/output_head.py): one chunk of fp32 logits (and its cast) at a time,
            # each head's input gradient kept, and the head's weight gradient allocated in forward
            chunk = min(HEAD_CHUNK_BYTES, tokens * c.vocab_size * 4) * (1 + (b / 4 if b < 4 else 0))
            # (preference and RL objectives: per-token log-probs, each chunk recomputed in backward, whose weight
            # gradient autograd makes there, counted with the head's backward unit below)
            weight_grad = 4 * c.vocab_size * c.hidden_size if job.algorithm == "sft" else 0.0
            logits = chunk + heads * tokens * c.hidden_size * b + weight_grad
    gathered = gathered_forward = 0.0
    if layout.zero == 3 and layout.dp * layout.cp > 1:
        if fsdp_pipeline:
            # torch.distributed.pipelining keeps a stage's FSDP units unsharded from their first backward to the
            # step's end (reshard_after_backward off between micro-batches): the whole stage, gathered
            gathered = w * (local_dense + local_experts)
        else:  # the gathered layer and the prefetched next (forward; backward: below)
            gathered_forward = 2 * w * sum(_largest_layer(job, layout))
            # the root unit (the embedding) stays gathered from its forward to the step's end (parallel/fsdp.py)
            buffers += w * job.shape.embedding / layout.tp
    if layout.ep > 1:  # all-to-all send / receive buffers of one MoE layer
        buffers += 2 * tokens * c.num_experts_per_tok * c.hidden_size * b
    width = spec_for(c).planner.residual_width(c)
    if fsdp_pipeline:
        # polytrain's pipelines (torch.distributed.pipelining over FSDP stages) allocate one receive buffer per
        # micro-batch for each tensor crossing a stage boundary (the residual stream and the MTP embeddings):
        # activations coming in (all but the first stage), gradients coming back (all but the last), kept for the
        # whole step; the last stage's outputs are kept too (the schedule returns them merged)
        crossing = (1 + mtp_layers) * seq_tokens * width * b
        directions = (stage > 0) + (stage < layout.pp - 1) + holds_last
        if layout.schedule in MULTI_STAGE:  # two virtual stages per device: stage s and 2p - 1 - s
            directions = 2 + holds_last
        buffers += m * crossing * directions
    elif layout.pp > 1:  # ZeRO-1 pipelines (Megatron-style engines): one send and one receive buffer
        buffers += 2 * tokens * width * b
    rl = 0.0
    if job.algorithm in ("dpo", "grpo"):
        rl = _reference_memory(groups)
    forward_end = activations + logits + gathered_forward
    if fsdp_pipeline and holds_first:
        # the embedding's backward: a dense [vocab, hidden] gradient per use (the MTP modules share the
        # embedding), their sum, in the unsharded parameters' dtype
        uses = 1 + mtp_layers
        working = max(working, (2 * uses - 1) * c.vocab_size * c.hidden_size * w)
    # a stage's first backward: under full recomputation every in-flight micro-batch's kept activations (the
    # other layers' inputs) are still there beside the recomputed layer's working set; otherwise the layer
    # differentiated first holds its own share of them
    if layout.recompute == "full":
        others = activations
    elif len(chunks) > 1:
        others = activations - last_share
    else:
        others = activations * (1 - 1 / in_flight if in_flight > 1 else 0.0)
    layer_grads = 0.0
    if layout.zero in (2, 3) and layout.dp * layout.cp > 1 and not fsdp_pipeline:
        # FSDP's backward, one unit at a time: the unit being differentiated is gathered (ZeRO-3) with the next one
        # prefetched, and makes its unsharded gradients (in the parameters' dtype; already counted when accumulated
        # over micro-batches), while the previous unit's gradients are reduce-scattered from an fp32 copy
        # (reduce_dtype), which FSDP keeps until the next reduction. The units, in backward order: the output head,
        # then the decoder layers (the largest one counted for all), each layer's routed experts a unit of their
        # own under expert parallelism. This is near the start of backward, where the other layers' activations
        # are still kept.
        dense_part, expert_part = _largest_layer(job, layout)
        made = 0.0 if accumulate else w
        gather = w if layout.zero == 3 else 0.0
        units = [expert_part, dense_part] if layout.ep > 1 else [expert_part + dense_part]
        order = [job.shape.head / layout.tp] + units * 3  # the head, then the units of the next layers
        layer_grads = max(
            max(4 * order[k] + made * order[k] + gather * order[k + 1],  # a unit reduced beside its own gradients
                4 * order[k] + made * order[k + 1] + gather * (order[k + 1] + order[k + 2]))  # ... the next unit's
            for k in range(len(order) - 2))
        others = activations
    backward_end = working + gathered + others + layer_grads
    persistent = layout.zero in (1, 2) and layout.offload != "all"
    if accumulate:  # the unsharded gradients live from the first micro-batch's backward to the step's end
        dynamic = unsharded_grads + max(forward_end, backward_end)
    elif persistent:
        dynamic = grads + max(forward_end, backward_end)
    else:
        # gradients made during backward and not kept unsharded (ZeRO-3 in one micro-batch; a single process;
        # with everything offloaded `grads` is 0): a unit's gradients appear as backward reaches it while the
        # activations behind it are freed, so the peak is at backward's start (`backward_end`: the state when the
        # first layer is differentiated, no sharded gradients yet) or at its end (all of them beside the last
        # unit's working set), not at their sum
        dynamic = max(forward_end, backward_end, grads + working + layer_grads)
    peak = params + optim + rl + buffers + dynamic
    transient = working + logits + buffers + gathered + max(gathered_forward, layer_grads)
    rollout = 0.0
    if job.algorithm == "grpo":  # outside the update step: the rollout, the weight sync (gradients are freed)
        kept = params + optim + rl + w * job.shape.embedding / layout.tp  # + the gathered root unit
        one_layer = 2 * w * sum(_largest_layer(job, layout)) if layout.zero == 3 else 0.0
        kv_cache = 0.0 if job.rollout_devices else _kv_cache(job, layout)  # disaggregated: on the rollout devices
        rollout = kept + one_layer + max(kv_cache, SYNC_BUCKET_BYTES)
    return Memory(params, grads, optim, activations, transient, peak, rl, host, stage, rollout)


def _reference_memory(groups: tuple[tuple[float, int], ...]) -> float:
    """A frozen reference model (train/frozen.py): laid out like the policy, its parameters sharded by FSDP as
    the policy's are (dense over the data-parallel ranks, experts over the expert-data-parallel ones), on the
    device even when the policy is offloaded, in the training weights' dtype (fp32)."""
    return sum(4.0 * count / group for count, group in groups)


def _kv_cache(job: Job, layout: Layout) -> float:
    """The built-in sampler's KV cache (bf16) of this device's share of the rollout's samples, to full length."""
    c = job.model
    samples = max(1, job.global_batch_tokens // (job.prompt_len + job.response_len)) / layout.dp
    length = job.prompt_len + job.response_len
    per_token_layer = spec_for(c).planner.kv_width(c) * 2  # bf16
    return samples * length * per_token_layer * c.num_hidden_layers / layout.pp

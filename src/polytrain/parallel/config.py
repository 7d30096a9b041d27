"""ParallelConfig: the `[parallel]` section of a job config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from polytrain.schema import option

AC_MODULES = ("mla_up_proj", "norm", "experts", "mlp")


@dataclass
class ParallelConfig:
    dp_replicate: int = option(1, "Data-parallel replicas (HSDP: parameters replicated across them).", ge=1)
    dp_shard: int = option(
        -1, "Data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2 / ZeRO-3); -1 = all "
        "ranks left after the other degrees.", ge=-1,
    )
    ep: int = option(
        1, "Expert-parallel degree: routed experts split over ep ranks (taken from the dp_shard ranks); tokens "
        "travel to their experts by all-to-all.", ge=1,
    )
    tp: int = option(1, "Tensor-parallel degree (attention heads, dense MLP, vocabulary).", ge=1)
    sequence_parallel: bool = option(
        True, "With tp > 1: split the residual stream and its norms by sequence position across the tp ranks "
        "(activation memory / tp; all-gather before, reduce-scatter after attention and MLP)."
    )
    pp: int = option(1, "Pipeline-parallel stages.", ge=1)
    cp: int = option(
        1, "Context-parallel degree: each row's tokens split over cp ranks in 2 x cp load-balanced chunks (rank r "
        "holds chunks r and 2cp-1-r); attention all-gathers the keys' compact form (MLA: latent + rotary key). "
        "Activation memory per rank / cp. SFT and DPO on DeepSeek-V3-family models.", ge=1)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev"] = option(
        "1f1b", "Pipeline schedule (torch.distributed.pipelining); interleaved_1f1b / zbv / dualpipev use 2 stages "
        "per rank. The micro-batches are the train.micro_batch_size-sized pieces of each rank's share of the step."
    )
    pp_first_stage_layers: int = option(
        -1, "Decoder layers on the first stage (which also holds the embedding); -1 = an even split. The last stage "
        "holds the final norm, the output head and the MTP modules.", ge=-1,
    )
    activation_checkpointing: Literal["none", "full", "selective"] = option(
        "none", "Recompute activations in backward: none, full (every block), selective (every `ac_every`-th block "
        "plus the modules in `ac_modules`)."
    )
    ac_every: int = option(2, "Selective: checkpoint every N-th block (0 = no whole blocks).", ge=0)
    ac_modules: list[str] = option(
        [], "Selective: modules recomputed inside every block: mla_up_proj (q_b_proj, kv_b_proj), norm, experts "
        "(routed experts), mlp (dense MLP and shared experts).",
        choices=AC_MODULES,
    )
    compile: bool = option(False, "torch.compile each decoder block (regional: one compile per block kind, reused "
                           "across layers). Costs a compile at the first step; fuses the elementwise work between "
                           "matmuls.")
    sync_every_microbatch: bool = option(
        False, "FSDP: reduce-scatter the gradients after every micro-batch (gradient memory stays sharded) instead "
        "of once per step after the last one (less data-parallel traffic; each FSDP unit keeps its unsharded "
        "gradients until then). Always on with cpu_offload; pipeline schedules reduce once per step."
    )
    reshard_after_forward: bool = option(True, "FSDP: free gathered parameters after forward (ZeRO-3); false keeps "
                                         "them until backward (ZeRO-2-like, more memory, less communication).")
    param_dtype: Literal["fp32", "bf16"] = option("fp32", "FSDP mixed precision: dtype of gathered parameters.")
    reduce_dtype: Literal["fp32", "bf16"] = option("fp32", "FSDP mixed precision: dtype of gradient reduction.")
    cpu_offload: bool = option(False, "FSDP: keep sharded parameters, gradients and optimizer state in host memory.")
    collective_timeout_s: int = option(600, "Timeout of every collective; a missed one fails instead of hanging.",
                                       ge=1)

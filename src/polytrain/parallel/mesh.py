"""Parallel degrees -> validated layout -> DeviceMeshes with named dimensions.

Two meshes over the same ranks:
- dense: (pp, dp_replicate, dp_shard, cp, tp) for attention, dense MLPs, norms, embedding and head;
- moe:   (pp, dp_replicate, efsdp, ep, tp) for routed experts, where ep ranks are taken out of the dp_shard x cp
  ranks (efsdp = dp_shard x cp / ep shards each expert-parallel rank's experts further, as FSDP).
Every strategy asks for its mesh by name. Context-parallel ranks hold different tokens of the same rows, so FSDP
shards (and reduces gradients) over dp_shard x cp, and the sums of losses, token counts and expert loads run over
dp_replicate x dp_shard x cp; only the data (which rows a rank reads) follows the data-parallel ranks alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from polytrain.errors import ConfigError
from polytrain.models.common.config import ModelConfig
from polytrain.parallel.config import ParallelConfig
from polytrain.parallel.context import ContextSplit
from polytrain.parallel.validate import Degrees, check


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    ep: int
    tp: int
    pp: int
    world_size: int
    cp: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def token_ranks(self) -> int:
        """Ranks of one pipeline stage and tensor-parallel slot that hold different tokens (dp x cp)."""
        return self.dp * self.cp

    @property
    def efsdp(self) -> int:
        return self.dp_shard * self.cp // self.ep

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int, model: ModelConfig | None = None) -> ParallelDims:
        """Fill dp_shard = -1 and check every degree against the world size and the model."""
        others = cfg.dp_replicate * cfg.cp * cfg.tp * cfg.pp
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"world size {world_size} is not divisible by dp_replicate x cp x tp x pp = {cfg.dp_replicate} "
                    f"x {cfg.cp} x {cfg.tp} x {cfg.pp} = {others}; {suggest(world_size)}"
                )
            dp_shard = world_size // others
        if dp_shard < 1 or others * dp_shard != world_size:
            raise ConfigError(
                f"dp_replicate x dp_shard x cp x tp x pp = {cfg.dp_replicate} x {dp_shard} x {cfg.cp} x {cfg.tp} x "
                f"{cfg.pp} = {others * max(dp_shard, 1)}, but {world_size} processes are running; "
                f"{suggest(world_size)}"
            )
        dims = cls(cfg.dp_replicate, dp_shard, cfg.ep, cfg.tp, cfg.pp, world_size, cfg.cp)
        if model is not None:
            dims.check_model(model, cfg.pp_schedule, cfg.sequence_parallel)
        return dims

    def degrees(self, schedule: str = "1f1b", sequence_parallel: bool = True) -> Degrees:
        return Degrees(dp=self.dp, expert_ranks=self.dp_shard * self.cp, tp=self.tp, pp=self.pp, ep=self.ep,
                       cp=self.cp, schedule=schedule, sequence_parallel=sequence_parallel)

    def check_model(self, model: ModelConfig, schedule: str = "1f1b", sequence_parallel: bool = True) -> None:
        check(model, self.degrees(schedule, sequence_parallel))


def suggest(world_size: int) -> str:
    """A few valid (dp_shard, tp, pp) layouts for this world size."""
    layouts = []
    for tp, pp in itertools.product((1, 2, 4, 8), repeat=2):
        if world_size % (tp * pp) == 0:
            layouts.append(f"dp_shard={world_size // (tp * pp)} tp={tp} pp={pp}")
    return "valid layouts include: " + "; ".join(layouts[:5])


@dataclass
class Meshes:
    dims: ParallelDims
    dense: DeviceMesh
    moe: DeviceMesh
    shard_cp: DeviceMesh | None = None
    """dp_shard and cp flattened into one dimension (cp > 1): FSDP's mesh without replicas."""

    def token_group(self) -> dist.ProcessGroup:
        """All ranks that hold different tokens (data- and context-parallel): for sums of losses, token counts and
        expert loads."""
        return self.dense["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp").get_group()

    @property
    def dp_rank(self) -> int:
        return self.dense["dp_replicate", "dp_shard"]._flatten("dp").get_local_rank()


    def shard_mesh(self) -> DeviceMesh:
        """The mesh FSDP shards the dense parameters over: (dp_replicate,) dp_shard x cp."""
        if self.dims.dp_replicate > 1:
            return self.dense["dp_replicate", "dp_shard_cp" if self.dims.cp > 1 else "dp_shard"]
        return self.shard_cp if self.shard_cp is not None else self.dense["dp_shard"]

    def context_split(self) -> ContextSplit | None:
        if self.dims.cp == 1:
            return None
        mesh = self.dense["cp"]
        return ContextSplit(self.dims.cp, mesh.get_local_rank(), mesh.get_group())


def build_meshes(dims: ParallelDims, device_type: str) -> Meshes:
    dense = init_device_mesh(
        device_type,
        (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp),
        mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp", "tp"),
    )
    shard_cp = dense["dp_shard", "cp"]._flatten("dp_shard_cp") if dims.cp > 1 else None
    moe = init_device_mesh(
        device_type,
        (dims.pp, dims.dp_replicate, dims.efsdp, dims.ep, dims.tp),
        mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep", "tp"),
    )
    return Meshes(dims, dense, moe, shard_cp)

"""The process's place in the job: torch.distributed set-up from the launcher's environment (torchrun sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), the meshes, and the few collectives the trainer needs.

A single process (no launcher) gets a runtime with world size 1 and no process group, so the same trainer code
runs either way.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from polytrain.backends import Backend
from polytrain.models.common.config import ModelConfig
from polytrain.models.common.decoder import DecoderLM
from polytrain.parallel.collectives import install_check, sum_
from polytrain.parallel.config import ParallelConfig
from polytrain.parallel.context import ContextSplit
from polytrain.parallel.grad_norm import clip_grad_norm, reduce_partial_grads
from polytrain.parallel.mesh import Meshes, ParallelDims, build_meshes

_joined = False  # this process joined a process group (init_process_group)


def init_process_group(dist_backend: str, timeout: timedelta) -> None:
    """torch.distributed from the launcher's environment. In a job torchrun restarted (--max-restarts), the
    rendezvous store can still hold the dead attempt's addresses, so the keys of each attempt get their own prefix."""
    global _joined
    _joined = True
    atexit.register(_destroy_at_exit)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0:
        dist.init_process_group(dist_backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=not agent_store)
    dist.init_process_group(dist_backend, store=dist.PrefixStore(f"polytrain/restart{restart}", store),
                            rank=rank, world_size=world, timeout=timeout)


def _destroy_at_exit() -> None:
    """A process that leaves with its process group alive can abort at interpreter shutdown (gloo's worker threads
    still hold finished work whose tensors need the interpreter: "terminate called without an active exception"):
    destroy it while the interpreter is whole, whatever path the process takes out."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Leave the process with exit status `code`. A process that joined a process group leaves without the
    interpreter's final clean-up: the atexit handlers run (the process group destroyed, a vLLM server stopped), the
    standard streams are flushed, then `os._exit`. The object that holds a gloo process group (FSDP's state, a
    device mesh) outlives `destroy_process_group` until that clean-up, and with it the group's worker threads; one
    still letting go of a finished collective's tensors needs the interpreter, which by then refuses it: the
    process aborts ("terminate called without an active exception", SIGABRT) after a run that succeeded (about 1 run
    in 60 of two ranks on a loaded 2-core machine, torch 2.13). Everything a run writes is closed before this."""
    if not _joined:
        raise SystemExit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`polytrain ... | head`), a closed stream
            stream.flush()
    os._exit(code)


def _alone(any_left: bool) -> bool:
    return any_left


class ParallelRuntime:
    def __init__(self, cfg: ParallelConfig, model_config: ModelConfig, backend: Backend) -> None:
        self.cfg = cfg
        self.backend = backend
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dims = ParallelDims.resolve(cfg, world, model_config)  # validate before touching the network
        self.meshes: Meshes | None = None
        self.pipeline = None
        self.rank = 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if world > 1:
            backend.set_device(self.local_rank)
            install_check(backend.device_type)
            if not dist.is_initialized():
                init_process_group(backend.process_group_backend, timedelta(seconds=cfg.collective_timeout_s))
            self.rank = dist.get_rank()
            self.meshes = build_meshes(self.dims, backend.device_type)
            self._token_group = self.meshes.token_group()

    # ------------------------------------------------------------------------------------------- identity
    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.meshes.dp_rank if self.meshes is not None else 0

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def describe(self) -> str:
        d = self.dims
        if not d.enabled:
            return "1 process"
        cp = f" x cp {d.cp}" if d.cp > 1 else ""
        return (f"{d.world_size} processes: dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard}{cp} (ep {d.ep}) "
                f"x tp {d.tp} x pp {d.pp}")

    @property
    def context_split(self) -> ContextSplit | None:
        """This rank's context-parallel group (None without context parallelism)."""
        return self.meshes.context_split() if self.meshes is not None else None

    # ---------------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.dims.enabled:
            dist.barrier()

    def dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold different tokens: data-parallel x context-parallel (in place, any device
        and element type: parallel/collectives.py); identity for one process."""
        if self.dims.enabled and self.dims.token_ranks > 1:
            sum_(tensor, self._token_group, self.backend.device())
        return tensor

    def all_agree(self, ok: bool) -> bool:
        """True only if every rank passes `ok` (so a check that fails on one rank stops all of them)."""
        if not self.dims.enabled:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        return int(sum_(flag, None, self.backend.device())) == 0

    def any_rank(self, flag: bool) -> bool:
        """True if any rank passes `flag` (e.g. still has rows to decode)."""
        return not self.all_agree(not flag)

    def all_gather_objects(self, obj: object) -> list[object]:
        """Every rank's picklable `obj`, in rank order (one process: [obj])."""
        if not self.dims.enabled:
            return [obj]
        out: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def scatter_objects(self, objs: list[object] | None, src: int) -> object:
        """Rank r receives `objs[r]` of rank `src` (where `objs` is ignored elsewhere)."""
        if not self.dims.enabled:
            return objs[0] if objs else None
        out: list[object] = [None]
        dist.scatter_object_list(out, objs if dist.get_rank() == src else None, src=src)
        return out[0]

    def broadcast_object(self, obj: object, src: int) -> object:
        """Rank `src`'s picklable `obj` on every rank."""
        if not self.dims.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    @contextmanager
    def decoding(self, model: nn.Module, weights: str = "auto") -> Iterator[Callable[[bool], bool]]:
        """Around a rollout of many decoding steps; yields the KeepGoing its sampler should use.

        `weights` = gathered (or auto, when the unsharded parameters fit in half the free memory): every FSDP module
        is all-gathered once and kept until the rollout ends, instead of once per decoded token; with no other
        collective in the forward (no expert or tensor parallelism), each rank then decodes alone, without a
        per-token agreement. sharded: FSDP gathers layer by layer at every step, so every rank runs the same number
        of forwards (an all-ranks 'any' per token)."""
        groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
        lockstep = self.dims.ep > 1 or self.dims.tp > 1  # cached decoding never splits rows over cp ranks
        if weights == "auto":
            full = sum(p.numel() * p.element_size() for p in model.parameters())  # global sizes: an upper bound
            weights = "gathered" if full <= self.backend.free_memory() // 2 else "sharded"
        if not groups or weights == "sharded":
            yield self.any_rank if self.world_size > 1 else _alone
            return
        # FSDP2 reshards after each forward per param group (`post_forward_mesh_info`; the root is specially
        # exempt): switch that off for the rollout and restore each group's own setting afterwards.
        if isinstance(model, FSDPModule):
            model._get_fsdp_state()._lazy_init()  # where the root's own setting is made: make it first
        saved = [(g, g.post_forward_mesh_info) for m in groups for g in m._get_fsdp_state()._fsdp_param_groups]
        for module in groups:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            yield self.any_rank if lockstep else _alone
        finally:
            for group, info in saved:
                group.post_forward_mesh_info = info
            for module in groups:
                module.reshard()

    def weight_buckets(self, model: nn.Module, dtype: torch.dtype, bucket_bytes: int,
                       receives: bool) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """`model`'s weights in Hugging Face names and layouts, one bucket at a time, assembled on the ranks that
        pass `receives` (parallel/weight_sync.py); collective: every rank iterates to the end."""
        from polytrain.parallel.weight_sync import hf_weight_buckets, receiving_ranks

        device = self.backend.device()  # where the collectives run, also when the parameters live in host memory
        return hf_weight_buckets(model, model.config, dtype, bucket_bytes, receiving_ranks(receives, device), device)

    # --------------------------------------------------------------------------------------------- model
    def parallelize(self, model: DecoderLM, n_microbatches: int = 1, rows: int = 1, width: int = 1,
                    train_outputs: bool = False) -> nn.Module:
        """Apply the layout; returns the module to optimise and checkpoint. With pp > 1, `self.pipeline` then
        drives forward and backward on micro-batches of [rows, width] tokens; `train_outputs`: the last stage
        also returns the MTP hidden states and the balance loss (see `DecoderLM.forward_train`)."""
        from polytrain.parallel.fsdp import DTYPES
        from polytrain.parallel.plan import apply_parallelism
        from polytrain.parallel.pp import StageIO

        config = model.config
        activation = DTYPES[self.cfg.param_dtype] if self.dims.token_ranks > 1 else torch.float32
        # sequence parallelism hands each tensor-parallel rank 1 / tp of every row's positions (the width is a
        # multiple of tp: trainer.check_job)
        local_width = width // self.dims.tp if self.cfg.sequence_parallel else width
        io = StageIO(rows, width, local_width, model.state_shape(rows, local_width), config.hidden_size, activation,
                     config.num_nextn_predict_layers if train_outputs else 0,
                     train_outputs and config.aux_loss_alpha > 0)
        model, self.pipeline = apply_parallelism(model, self.meshes, self.cfg, n_microbatches,
                                                 self.backend.device(), io)
        return model

    @property
    def _pp_group(self) -> dist.ProcessGroup | None:
        return self.meshes.dense["pp"].get_group() if self.meshes is not None and self.dims.pp > 1 else None

    def pp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over pipeline stages (in place): losses exist only on the last stage."""
        if self._pp_group is not None:
            sum_(tensor, self._pp_group, self.backend.device())
        return tensor

    def gradient_sync(self, model: nn.Module, last: bool) -> None:
        """Before a micro-batch's backward: reduce its gradients over the data-parallel ranks only on the last
        micro-batch of the step (FSDP accumulates the others unsharded on the device), unless
        parallel.sync_every_microbatch or cpu_offload (whose point is to keep gradients off the device). Pipeline
        schedules make the same choice themselves (always once per step)."""
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last or self.cfg.sync_every_microbatch or self.cfg.cpu_offload)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Once per step, after the last backward: reduce the gradients tensor parallelism left as partial sums,
        then clip them all to `max_norm`; returns their global norm before clipping."""
        params = [p for p in model.parameters() if p.requires_grad]
        reduce_partial_grads(params)
        return clip_grad_norm(params, max_norm, self._pp_group, self.backend.device())

    def close(self) -> None:
        if self.dims.enabled and dist.is_initialized():
            dist.destroy_process_group()

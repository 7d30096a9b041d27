"""Where rollouts are sampled: on every rank (colocated, the default) or on a few ranks that host the engine for all
of them (`grpo.rollout_ranks`).

With rollout ranks, only those ranks construct an external engine (a vLLM server next to them, or a connection to
one on other hosts: disaggregated placement) and only they receive the weight sync. Every rank still samples its own
data-parallel share of the prompts through `PlacedEngine`: at each rollout the requests of all ranks are gathered
(token ids and seeds, small), each data-parallel group's request is generated once, by host
`hosts[dp_rank % len(hosts)]`, in one batch with the other groups it serves, and the completions are scattered back
to the ranks that asked. Ranks that share a data-parallel rank (tensor / context / pipeline parallel ones) send the
same request, so it is generated once and answered to each of them. Since every completion row is seeded on its
own, the completions are the same as with an engine on every rank.

Decisions that follow from the engine (its weight dtype, a sync's timings, the probe's log-probs) are broadcast from
the first host, so that every rank takes the same branch of a collective sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from polytrain.errors import ConfigError, PolytrainError
from polytrain.objectives.context import Collectives
from polytrain.rollout.engine import Bucket, Completion, RolloutEngine, weight_dtype
from polytrain.rollout.generate import SamplingConfig

T = TypeVar("T")


def rollout_hosts(ranks: list[int], world_size: int) -> list[int]:
    """The ranks that host an engine for `grpo.rollout_ranks = ranks` (checked); [] means every rank."""
    if not ranks:
        return []
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise ConfigError(f"grpo.rollout_ranks = {ranks}: rank {bad[0]} is not among the job's {world_size} ranks")
    if len(set(ranks)) != len(ranks):
        raise ConfigError(f"grpo.rollout_ranks = {ranks} names a rank twice")
    return list(ranks)


def together(collectives: Collectives, work: Callable[[], T] | None, what: str) -> T | None:
    """Run `work` on this rank (None: nothing to do here), then agree on the outcome: when it raised on any rank,
    every rank raises (a failed rank its own error, the others the first failure's message), rather than the others
    waiting in their next collective for a rank that is gone. Collective: every rank calls it."""
    result, failure, caught = None, None, None
    if work is not None:
        try:
            result = work()
        except Exception as err:
            caught, failure = err, f"{what} on rank {collectives.rank}: {type(err).__name__}: {err}"
    failures = [f for f in collectives.all_gather_objects(failure) if f]
    if caught is not None:
        raise caught  # the rank that failed: its own error, traceback and all
    if failures:
        raise PolytrainError(failures[0])
    return result


class PlacedEngine:
    """A `RolloutEngine` on every rank, backed by the engines of the host ranks (module docstring)."""

    def __init__(self, local: RolloutEngine | None, hosts: list[int], collectives: Collectives) -> None:
        self.local = local
        self.hosts = hosts
        self.collectives = collectives
        self.receives_weights = local is not None
        dtype = weight_dtype(local) if local is not None else None
        self.weight_dtype: torch.dtype = collectives.broadcast_object(dtype, hosts[0])
        self.timings: dict[str, float] = {}
        can = (callable(getattr(local, "probe_logprobs", None)), callable(getattr(local, "restart_next_sync", None)))
        self.probes, self.restarts = collectives.broadcast_object(can, hosts[0])
        """Whether the hosts' engine scores probe batches / restarts on request (what check_sync asks)."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
                 record_routing: bool = False, row_seeds: list[int] | None = None) -> list[Completion]:
        if record_routing:
            raise ConfigError("grpo.routing_replay is not available with grpo.rollout_ranks")
        c = self.collectives
        if row_seeds is None:
            row_seeds = [sampling.seed + i for i in range(len(prompts))]
        requests: list[Any] = c.all_gather_objects((c.dp_rank, prompts, row_seeds))
        first_of = {}  # data-parallel rank -> its request (the first rank that sent it)
        for dp_rank, rows, seeds in requests:
            first_of.setdefault(dp_rank, (rows, seeds))
        served = {h: sorted(d for d in first_of if self.hosts[d % len(self.hosts)] == h) for h in self.hosts}
        mine = served.get(c.rank, [])

        def serve() -> dict[int, list[Completion]]:
            rows = [p for d in mine for p in first_of[d][0]]
            seeds = [s for d in mine for s in first_of[d][1]]
            out = self.local.generate(rows, sampling, stop_ids, row_seeds=seeds)
            if len(out) != len(rows):
                raise PolytrainError(f"the engine returned {len(out)} completions for {len(rows)} prompts")
            answers, start = {}, 0
            for d in mine:
                answers[d] = out[start : start + len(first_of[d][0])]
                start += len(first_of[d][0])
            return answers

        answers = together(c, serve if mine else None, "sampling") or {}
        mine_back: list[Completion] | None = None
        for host in self.hosts:
            objs = [answers.get(dp_rank) for dp_rank, _, _ in requests] if c.rank == host else None
            got = c.scatter_objects(objs, host)
            if got is not None:
                mine_back = got
        if mine_back is None:
            raise PolytrainError(f"rank {c.rank}: no rollout rank answered its prompts")
        return mine_back

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Hosts load the buckets; every rank iterates them to the end (the sync is collective: the caller)."""
        if self.local is not None:
            self.local.update_weights(buckets)

    def after_sync(self) -> None:
        """Every rank takes the first host's sync timings (whether it restarted decides the check's fallback)."""
        timings = dict(getattr(self.local, "timings", {})) if self.local is not None else {}
        self.timings = self.collectives.broadcast_object(timings, self.hosts[0])

    def restart_next_sync(self) -> None:
        if self.local is not None and self.restarts:
            self.local.restart_next_sync()

    def probe_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Each host's engine scores the probe batch (the caller takes the largest gap over the ranks, so every
        engine is checked); the other ranks take the first host's log-probs."""
        c = self.collectives
        local = self.local
        out = together(c, (lambda: local.probe_logprobs(sequences)) if local is not None else None, "sync check")
        first = c.broadcast_object(out, self.hosts[0])
        return out if local is not None else first

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

from collections.abc import Iterable
from typing import Any

import torch

from polytrain.errors import ConfigError, PolytrainError
from polytrain.objectives.context import Collectives
from polytrain.rollout.engine import Bucket, Completion, RolloutEngine, weight_dtype
from polytrain.rollout.generate import SamplingConfig


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
        answers: dict[int, list[Completion]] = {}
        mine, failure = served.get(c.rank, []), None
        if mine:
            rows = [p for d in mine for p in first_of[d][0]]
            seeds = [s for d in mine for s in first_of[d][1]]
            try:
                out = self.local.generate(rows, sampling, stop_ids, row_seeds=seeds)
            except Exception as err:  # every rank stops with it, rather than waiting for answers that never come
                failure = f"rollout rank {c.rank}: {type(err).__name__}: {err}"
            else:
                start = 0
                for d in mine:
                    count = len(first_of[d][0])
                    answers[d] = out[start : start + count]
                    start += count
        failures = [f for f in c.all_gather_objects(failure) if f]
        if failures:
            raise PolytrainError(failures[0])
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
        """Hosts load the buckets; the caller iterates them to the end on every rank (the sync is collective)."""
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
        """The first host's engine scores the probe batch; every rank gets its log-probs."""
        c = self.collectives
        out = self.local.probe_logprobs(sequences) if c.rank == self.hosts[0] else None
        return c.broadcast_object(out, self.hosts[0])

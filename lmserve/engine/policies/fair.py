"""Fair sharing between tenants by tokens served (virtual token counters). Pure Python."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

from lmserve.engine.policies.base import Rank, SchedulingPolicy
from lmserve.engine.sequence import Sequence


class FairPolicy(SchedulingPolicy):
    """Weighted fair queuing over tokens (the virtual token counter of Sheng et al., OSDI 2024).

    Each tenant has a counter that grows by the tokens it is served (its prompt when a sequence
    starts, then one per generated token) divided by its weight; the tenant with the smallest
    counter starts its oldest queued sequence next. Under block pressure the most-served tenant's
    latest sequence is preempted first.

    Invariants: `_num_live[t]` counts tenant t's unfinished sequences and has no zero entries; a
    tenant that becomes live again starts no lower than the smallest live counter (or, when none
    is live, the counter of the last tenant served), so a tenant cannot bank credit while idle and
    a tenant that floods cannot starve one that sends a little.
    """

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        self._counters: dict[str, float] = {}
        self._num_live: dict[str, int] = {}
        self._last_served = 0.0

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, self._floor())

    def rank(self, seq: Sequence) -> Rank:
        return (self.counter(seq.tenant), seq.arrival_time, seq.seq_id)

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        """Merges the tenants' arrival-ordered queues as their counters would grow if each started."""
        queues: dict[str, list[Sequence]] = {}
        for seq in sorted(seqs, key=lambda s: (s.arrival_time, s.seq_id)):
            queues.setdefault(seq.tenant, []).append(seq)
        heap = [(self.counter(t), q[0].arrival_time, q[0].seq_id, t, 0) for t, q in queues.items()]
        heapq.heapify(heap)
        ordered = []
        while heap:
            counter, _, _, tenant, i = heapq.heappop(heap)
            queue = queues[tenant]
            seq = queue[i]
            ordered.append(seq)
            if i + 1 < len(queue):
                # Sequences that already started were charged for their prompt; new ones will be.
                cost = 0 if seq.first_scheduled_time is not None else seq.num_prompt_tokens
                counter += cost / self._weight(tenant)
                nxt = queue[i + 1]
                heapq.heappush(heap, (counter, nxt.arrival_time, nxt.seq_id, tenant, i + 1))
        return ordered

    def on_add(self, seq: Sequence) -> None:
        tenant = seq.tenant
        if tenant not in self._num_live:
            self._counters[tenant] = max(self._counters.get(tenant, 0.0), self._floor())
        self._num_live[tenant] = self._num_live.get(tenant, 0) + 1

    def on_served(self, seq: Sequence, num_tokens: int) -> None:
        counter = self._counters.get(seq.tenant, 0.0) + num_tokens / self._weight(seq.tenant)
        self._counters[seq.tenant] = self._last_served = counter

    def on_finish(self, seq: Sequence) -> None:
        tenant = seq.tenant
        self._num_live[tenant] -= 1
        if self._num_live[tenant] == 0:
            del self._num_live[tenant]
            self._forget_idle()

    def _floor(self) -> float:
        live = [self._counters[t] for t in self._num_live if t in self._counters]
        return min(live) if live else self._last_served

    def _forget_idle(self) -> None:
        """Drops counters of idle tenants that would be lifted on return anyway: memory stays
        bounded by the live tenants plus the idle ones that were served more than the floor."""
        floor = self._floor()
        for tenant in [t for t, c in self._counters.items() if t not in self._num_live and c <= floor]:
            del self._counters[tenant]

    def _weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

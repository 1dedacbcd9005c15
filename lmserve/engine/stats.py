"""Counters the scheduler keeps for metrics, overall and per tenant label. Pure Python."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from lmserve.engine.config import PreemptionMode
from lmserve.engine.sequence import FinishReason, Sequence, SequenceStatus

OTHER_TENANTS = "other"
"""The label shared by every tenant beyond the first `max_tenant_labels` seen."""


@dataclass
class TenantStats:
    """One tenant label's share. The `num_running/waiting/swapped` gauges are filled when a snapshot
    is taken; every other field only grows."""

    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    num_started: int = 0
    """Sequences that left the queue for the first time."""
    queue_time_seconds_sum: float = 0.0
    """Summed over started sequences: first scheduled minus arrival."""
    num_prompt_tokens: int = 0
    """Prompt tokens of started sequences."""
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    num_timeouts: int = 0
    num_rejected: int = 0
    """Requests refused by admission control."""


@dataclass
class SchedulerStats:
    """What the scheduler did since it started; every field only grows.

    Tenant labels are the first `max_tenant_labels` tenants seen, then OTHER_TENANTS for all the
    rest: first-seen rather than top-N, so a tenant's label never changes and the counters behind
    a Prometheus series stay monotonic.
    """

    max_tenant_labels: int = 16
    num_recompute_preemptions: int = 0
    num_swap_preemptions: int = 0
    num_blocks_swapped_out: int = 0
    num_blocks_swapped_in: int = 0
    num_finished: int = 0
    num_timeouts: int = 0
    num_rejected: int = 0
    num_started: int = 0
    queue_time_seconds_sum: float = 0.0
    tenants: dict[str, TenantStats] = field(default_factory=dict)

    @property
    def num_preemptions(self) -> int:
        return self.num_recompute_preemptions + self.num_swap_preemptions

    def label(self, tenant: str) -> str:
        """The stats label of a tenant (bounded set)."""
        if tenant in self.tenants or len(self.tenants) < self.max_tenant_labels:
            return tenant
        return OTHER_TENANTS

    def tenant(self, tenant: str) -> TenantStats:
        return self.tenants.setdefault(self.label(tenant), TenantStats())

    def record_add(self, seq: Sequence) -> None:
        """Claims the tenant's label when it is first seen, so every live sequence has one."""
        self.tenant(seq.tenant)

    def record_start(self, seq: Sequence, queue_time: float) -> None:
        self.num_started += 1
        self.queue_time_seconds_sum += queue_time
        stats = self.tenant(seq.tenant)
        stats.num_started += 1
        stats.queue_time_seconds_sum += queue_time
        stats.num_prompt_tokens += seq.num_prompt_tokens

    def record_token(self, seq: Sequence) -> None:
        self.tenant(seq.tenant).num_generation_tokens += 1

    def record_preemption(self, seq: Sequence, mode: PreemptionMode, num_blocks_swapped: int = 0) -> None:
        if mode is PreemptionMode.SWAP:
            self.num_swap_preemptions += 1
            self.num_blocks_swapped_out += num_blocks_swapped
        else:
            self.num_recompute_preemptions += 1
        self.tenant(seq.tenant).num_preemptions += 1

    def record_finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.num_finished += 1
        if reason is FinishReason.TIMEOUT:
            self.num_timeouts += 1
            self.tenant(seq.tenant).num_timeouts += 1

    def record_rejection(self, tenant: str) -> None:
        self.num_rejected += 1
        self.tenant(tenant).num_rejected += 1

    def tenant_snapshot(self, live: list[Sequence]) -> dict[str, TenantStats]:
        """A copy of the per-tenant counters with the gauges filled from the live sequences."""
        snapshot = copy.deepcopy(self.tenants)
        for seq in live:
            stats = snapshot[self.label(seq.tenant)]
            if seq.status is SequenceStatus.RUNNING:
                stats.num_running += 1
            elif seq.status is SequenceStatus.SWAPPED:
                stats.num_swapped += 1
            else:
                stats.num_waiting += 1
        return snapshot

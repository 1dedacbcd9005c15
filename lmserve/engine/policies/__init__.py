"""Scheduling policies, one per module, behind `SchedulingPolicy`; `make_policy` picks by name."""

from __future__ import annotations

from lmserve.engine.config import SchedulerConfig
from lmserve.engine.policies.base import Rank, SchedulingPolicy
from lmserve.engine.policies.deadline import DeadlinePolicy
from lmserve.engine.policies.fair import FairPolicy
from lmserve.engine.policies.fcfs import FcfsPolicy
from lmserve.engine.policies.priority import PriorityPolicy

__all__ = [
    "DeadlinePolicy", "FairPolicy", "FcfsPolicy", "PriorityPolicy", "Rank", "SchedulingPolicy", "make_policy",
]


def make_policy(config: SchedulerConfig) -> SchedulingPolicy:
    """The policy `config.scheduling_policy` names (validated by the config)."""
    name = config.scheduling_policy
    if name == "priority":
        return PriorityPolicy()
    if name == "fair":
        return FairPolicy(config.tenant_weights)
    if name == "deadline":
        return DeadlinePolicy()
    return FcfsPolicy()

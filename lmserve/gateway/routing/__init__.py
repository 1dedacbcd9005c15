"""Routing strategies: one small file each, all behind `RoutingStrategy`.

A strategy picks one backend from `candidates`, the backends of a pool that are available now and
not yet tried by this request (the caller filters health, breakers, draining and retries).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lmserve.gateway.backends import Backend
from lmserve.gateway.config import ModelConfig


class RoutingStrategy(Protocol):
    def choose(self, candidates: Sequence[Backend], affinity_key: str | None) -> Backend:
        """Returns one of `candidates` (never empty). `affinity_key` is the session id or prompt
        prefix; only prefix_affinity uses it."""
        ...


def make_strategy(config: ModelConfig) -> RoutingStrategy:
    """The strategy named in the model's config, fresh state per model."""
    from lmserve.gateway.routing.latency import LatencyStrategy
    from lmserve.gateway.routing.least_outstanding import LeastOutstandingStrategy
    from lmserve.gateway.routing.prefix_affinity import PrefixAffinityStrategy
    from lmserve.gateway.routing.round_robin import RoundRobinStrategy
    from lmserve.gateway.routing.weighted import WeightedStrategy

    if config.strategy == "round_robin":
        return RoundRobinStrategy()
    if config.strategy == "least_outstanding":
        return LeastOutstandingStrategy()
    if config.strategy == "latency":
        return LatencyStrategy()
    if config.strategy == "prefix_affinity":
        return PrefixAffinityStrategy(load_factor=config.load_factor)
    if config.strategy == "weighted":
        return WeightedStrategy()
    raise ValueError(f"unknown routing strategy {config.strategy!r}")

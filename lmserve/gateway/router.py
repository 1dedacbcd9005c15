"""Model resolution (names, aliases, canaries, fallback chains), backend choice, load shedding and
the retry budget.

Invariant: `names` maps every model name and alias to a key of `pools`; `in_flight[m]` counts the
requests admitted for model `m` and not yet finished (`acquire_slot` / `release_slot`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

from lmserve.gateway.backends import Backend, ModelPool
from lmserve.gateway.config import BackendConfig, GatewayConfig, HealthConfig, RetryConfig
from lmserve.gateway.routing import RoutingStrategy, make_strategy


class RetryBudget:
    """Retries allowed: max(min_retries, ratio * requests) over a sliding window (two half-windows),
    so retries add at most `ratio` extra load when many requests fail (as in Envoy's retry budget)."""

    def __init__(self, config: RetryConfig) -> None:
        self.ratio = config.budget_ratio
        self.min_retries = config.min_retries_per_window
        self.half = config.window_seconds / 2
        self.epoch = 0
        self.requests = [0, 0]
        self.retries = [0, 0]

    def _rotate(self) -> int:
        epoch = int(time.monotonic() / self.half)
        if epoch != self.epoch:
            if epoch == self.epoch + 1:
                self.requests = [self.requests[1], 0]
                self.retries = [self.retries[1], 0]
            else:
                self.requests = [0, 0]
                self.retries = [0, 0]
            self.epoch = epoch
        return 1

    def record_request(self) -> None:
        self.requests[self._rotate()] += 1

    def try_retry(self) -> bool:
        slot = self._rotate()
        allowed = max(self.min_retries, self.ratio * sum(self.requests))
        if sum(self.retries) >= allowed:
            return False
        self.retries[slot] += 1
        return True


class Router:
    def __init__(self, config: GatewayConfig, rng: random.Random | None = None) -> None:
        self.health = config.health
        self.shedding = config.shedding
        self.rng = rng or random.Random()
        self.pools: dict[str, ModelPool] = {}
        self.names: dict[str, str] = {}
        self.strategies: dict[str, RoutingStrategy] = {}
        self.in_flight: dict[str, int] = {}
        for model in config.models:
            # `discovery: dns` backends are templates: discovery.py fills the pool from their addresses.
            backends = [Backend.from_config(b, config.health) for b in model.backends if b.discovery == "static"]
            self.pools[model.name] = ModelPool(model, backends)
            self.strategies[model.name] = make_strategy(model)
            self.in_flight[model.name] = 0
            for name in (model.name, *model.aliases):
                self.names[name] = model.name
        self.canaries = {name: (list(split), list(split.values())) for name, split in config.canaries.items()}
        self.retry_budget = RetryBudget(config.retries)

    def resolve(self, requested: str) -> ModelPool | None:
        """The pool serving `requested`; a canary name picks one of its models by weight."""
        canonical = self.names.get(requested)
        if canonical is None:
            split = self.canaries.get(requested)
            if split is None:
                return None
            canonical = self.names[self.rng.choices(split[0], weights=split[1])[0]]
        return self.pools[canonical]

    def chain(self, pool: ModelPool) -> Iterator[ModelPool]:
        """The pool, then its fallbacks (and theirs), each once."""
        seen = {pool.name}
        queue = [pool]
        while queue:
            current = queue.pop(0)
            yield current
            for name in current.config.fallbacks:
                fallback = self.pools[self.names[name]]
                if fallback.name not in seen:
                    seen.add(fallback.name)
                    queue.append(fallback)

    def pick(self, pool: ModelPool, tried: set[Backend], affinity_key: str | None) -> Backend | None:
        candidates = [b for b in pool.backends if b not in tried and b.is_available()]
        if not candidates:
            return None
        return self.strategies[pool.name].choose(candidates, affinity_key)

    def acquire_slot(self, pool: ModelPool, priority: str) -> bool:
        """Admits a request under the model's in-flight cap; lower priorities hit their share first."""
        cap = pool.config.max_in_flight
        count = self.in_flight[pool.name]
        if cap is not None:
            share = getattr(self.shedding, priority, self.shedding.normal)
            if count >= cap * share:
                return False
        self.in_flight[pool.name] = count + 1
        return True

    def release_slot(self, pool: ModelPool) -> None:
        self.in_flight[pool.name] -= 1

    def all_backends(self) -> Iterator[tuple[ModelPool, Backend]]:
        for pool in self.pools.values():
            for backend in pool.backends:
                yield pool, backend

    # Run-time changes from the admin API.
    def add_backend(self, model: str, backend: BackendConfig, health: HealthConfig | None = None) -> Backend:
        pool = self._pool(model)
        if pool.find(backend.url) is not None:
            raise ValueError(f"{backend.url} is already a backend of {pool.name!r}")
        added = Backend.from_config(backend, health or self.health)
        pool.backends = [*pool.backends, added]
        return added

    def drain_backend(self, model: str, url: str) -> Backend:
        backend = self._backend(model, url)
        backend.is_draining = True
        return backend

    def undrain_backend(self, model: str, url: str) -> Backend:
        """Takes a drained backend back into routing (the last step of drain and roll)."""
        backend = self._backend(model, url)
        backend.is_draining = False
        return backend

    def remove_backend(self, model: str, url: str) -> Backend:
        """Removes at once from routing; requests already sent to it finish."""
        pool = self._pool(model)
        backend = self._backend(model, url)
        pool.backends = [b for b in pool.backends if b is not backend]
        return backend

    def _pool(self, model: str) -> ModelPool:
        canonical = self.names.get(model)
        if canonical is None:
            raise KeyError(f"no model named {model!r}")
        return self.pools[canonical]

    def _backend(self, model: str, url: str) -> Backend:
        backend = self._pool(model).find(url)
        if backend is None:
            raise KeyError(f"{url} is not a backend of {model!r}")
        return backend

"""Run-time state of backends and model pools.

Invariant: `Backend.num_outstanding` counts requests sent to the backend whose response has not
finished; it is incremented and decremented only by `Backend.begin` / `Backend.end`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmserve.gateway.breaker import BreakerState, CircuitBreaker
from lmserve.gateway.config import BackendConfig, HealthConfig, ModelConfig

_EWMA_ALPHA = 0.3


@dataclass(eq=False)
class Backend:
    """One upstream server as the gateway sees it."""

    url: str
    weight: float
    api_key: str | None
    breaker: CircuitBreaker
    is_healthy: bool = True
    """Last active probes succeeded (starts optimistic so a fresh gateway serves at once)."""
    is_ready: bool = True
    """`/ready` answered 200 (or the backend has no `/ready`)."""
    is_draining: bool = False
    """Set by the admin API: no new requests, in-flight ones finish."""
    num_outstanding: int = 0
    num_probe_failures: int = 0
    """Hard probe failures (refused, 5xx) since the last good probe."""
    num_probe_timeouts: int = 0
    """Probes that timed out since the last good probe."""
    ewma_ttfb: float | None = None
    """Exponentially weighted time to first byte in seconds (None until measured)."""
    auth_header: bytes | None = field(default=None)
    discovered_from: str | None = None
    """The `discovery: dns` URL this backend's address was resolved from (None: configured as is)."""

    def __post_init__(self) -> None:
        if self.api_key:
            self.auth_header = b"Bearer " + self.api_key.encode()

    @classmethod
    def from_config(cls, config: BackendConfig, health: HealthConfig) -> Backend:
        breaker = CircuitBreaker(health.consecutive_failures, health.error_rate, health.window_size,
                                 health.cooldown)
        return cls(config.url, config.weight, config.api_key, breaker)

    def is_available(self) -> bool:
        """Eligible for new traffic: healthy, ready, not draining, breaker lets it pass."""
        return self.is_healthy and self.is_ready and not self.is_draining and self.breaker.can_pass()

    def begin(self) -> None:
        self.num_outstanding += 1

    def end(self, is_success: bool | None, ttfb: float | None) -> None:
        """`is_success` None: the outcome says nothing about the backend (e.g. the client left)."""
        self.num_outstanding -= 1
        if is_success is not None:
            self.breaker.record(is_success)
        else:
            self.breaker.cancel()
        if ttfb is not None:
            prev = self.ewma_ttfb
            self.ewma_ttfb = ttfb if prev is None else prev + _EWMA_ALPHA * (ttfb - prev)

    def describe(self) -> dict[str, object]:
        return {
            "url": self.url, "weight": self.weight, "healthy": self.is_healthy, "ready": self.is_ready,
            "draining": self.is_draining, "breaker": self.breaker.state.name.lower(),
            "outstanding": self.num_outstanding, "probe_failures": self.num_probe_failures,
            "probe_timeouts": self.num_probe_timeouts, "discovered_from": self.discovered_from,
            "ewma_ttfb_ms": None if self.ewma_ttfb is None else round(self.ewma_ttfb * 1000, 3),
        }


@dataclass(eq=False)
class ModelPool:
    """A model's backends plus its routing settings; `backends` may change at run time (admin API)."""

    config: ModelConfig
    backends: list[Backend]
    name: str = field(init=False)
    """`config.name`, read on every request."""

    def __post_init__(self) -> None:
        self.name = self.config.name

    def available(self) -> list[Backend]:
        return [b for b in self.backends if b.is_available()]

    def find(self, url: str) -> Backend | None:
        url = url.rstrip("/")
        for backend in self.backends:
            if backend.url == url:
                return backend
        return None


def breaker_state_value(backend: Backend) -> int:
    return {BreakerState.CLOSED: 0, BreakerState.OPEN: 1, BreakerState.HALF_OPEN: 2}[backend.breaker.state]


"""Circuit breaker per backend: closed -> open -> half-open -> closed.

Opens on `consecutive_failures` failures in a row, or when the error rate over the last
`window_size` outcomes reaches `error_rate` (once that many outcomes are known). After `cooldown`
seconds an open breaker lets exactly one trial request through (half-open); its success closes the
breaker, its failure opens it again for another cooldown. A trial stream closes it as soon as the
backend answers 200 (`record_answer`): a long stream must not hold every other request off a backend
that has come back; its end is then recorded like any other outcome.

Invariant: in HALF_OPEN at most one trial is outstanding (`is_trial_out`).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(self, consecutive_failures: int, error_rate: float, window_size: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.consecutive_limit = consecutive_failures
        self.error_rate = error_rate
        self.window_size = window_size
        self.cooldown = cooldown
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.num_consecutive_failures = 0
        self.outcomes: deque[bool] = deque(maxlen=window_size)
        self.num_window_failures = 0
        self.opened_at = 0.0
        self.is_trial_out = False

    def can_pass(self) -> bool:
        """Whether a request may be routed here now (does not reserve the half-open trial)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return self.clock() - self.opened_at >= self.cooldown
        return not self.is_trial_out

    def acquire(self) -> bool:
        """Called when a request is actually sent; takes the trial slot when half-open."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self.clock() - self.opened_at < self.cooldown:
                return False
            self.state = BreakerState.HALF_OPEN
            self.is_trial_out = False
        if self.is_trial_out:
            return False
        self.is_trial_out = True
        return True

    def record(self, is_success: bool) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.is_trial_out = False
            if is_success:
                self._close()
            else:
                self._open()
            return
        if len(self.outcomes) == self.window_size and not self.outcomes[0]:
            self.num_window_failures -= 1
        self.outcomes.append(is_success)
        if is_success:
            self.num_consecutive_failures = 0
            return
        self.num_window_failures += 1
        self.num_consecutive_failures += 1
        if self.state is BreakerState.CLOSED and (
            self.num_consecutive_failures >= self.consecutive_limit
            or (len(self.outcomes) == self.window_size
                and self.num_window_failures >= self.error_rate * self.window_size)
        ):
            self._open()

    def record_answer(self) -> None:
        """The backend answered a request with 200 and is streaming it: closes a half-open breaker."""
        if self.state is BreakerState.HALF_OPEN:
            self.is_trial_out = False
            self._close()

    def cancel(self) -> None:
        """A request ended without an outcome (the client left): frees the half-open trial slot."""
        if self.state is BreakerState.HALF_OPEN:
            self.is_trial_out = False

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = self.clock()

    def _close(self) -> None:
        self.state = BreakerState.CLOSED
        self.num_consecutive_failures = 0
        self.outcomes.clear()
        self.num_window_failures = 0

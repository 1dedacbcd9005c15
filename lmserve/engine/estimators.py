"""Online estimates of how fast the engine works, from what it measured. Pure Python.

The deadline policy asks "when would this prompt's first token come?" and admission control asks
"when will a queued request start?"; both answer from the engine clock, never from a guess.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from lmserve.engine.sequence import Sequence


class StepCostModel:
    """Seconds one step takes, fitted online as `fixed + per_token * num_tokens`.

    Exponentially weighted least squares over recent steps (`decay` per step), so the fit follows
    the machine when load changes. Until it has seen two steps of different sizes, `per_token` is
    the plain ratio of seconds to tokens and `fixed` is 0.
    """

    def __init__(self, decay: float = 0.97) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self._weight = 0.0
        self._sum_x = self._sum_y = self._sum_xx = self._sum_xy = 0.0

    @property
    def is_calibrated(self) -> bool:
        return self._sum_x > 0 and self._sum_y > 0

    def observe(self, num_tokens: int, seconds: float) -> None:
        """Records one step; steps that computed nothing or took no measurable time teach nothing."""
        if num_tokens <= 0 or seconds <= 0:
            return
        d = self.decay
        self._weight = self._weight * d + 1
        self._sum_x = self._sum_x * d + num_tokens
        self._sum_y = self._sum_y * d + seconds
        self._sum_xx = self._sum_xx * d + num_tokens * num_tokens
        self._sum_xy = self._sum_xy * d + num_tokens * seconds

    def coefficients(self) -> tuple[float, float] | None:
        """(fixed seconds per step, seconds per token), both >= 0; None before any observation."""
        if not self.is_calibrated:
            return None
        w, x, y = self._weight, self._sum_x, self._sum_y
        variance = self._sum_xx * w - x * x
        if variance > 1e-9 * self._sum_xx * w:
            per_token = (self._sum_xy * w - x * y) / variance
            fixed = (y - per_token * x) / w
            if per_token > 0 and fixed >= 0:
                return fixed, per_token
        return 0.0, y / x

    def step_seconds(self, num_tokens: int) -> float | None:
        """One step of `num_tokens` tokens; None when nothing was measured yet."""
        coefficients = self.coefficients()
        if coefficients is None:
            return None
        fixed, per_token = coefficients
        return fixed + per_token * num_tokens

    def seconds_to_compute(self, num_tokens: int, num_decodes: int, budget: int) -> float | None:
        """Time until `num_tokens` of prefill are computed, `budget` tokens a step of which
        `num_decodes` go to running sequences' decodes; None when nothing was measured yet."""
        coefficients = self.coefficients()
        if coefficients is None:
            return None
        fixed, per_token = coefficients
        per_step = max(1, budget - num_decodes)
        num_steps = max(1, math.ceil(num_tokens / per_step))
        return num_steps * fixed + (num_tokens + num_steps * min(num_decodes, budget)) * per_token


class RateMeter:
    """Events per second over the last `window` events (e.g. queued requests starting)."""

    def __init__(self, window: int = 64) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self._times: deque[float] = deque(maxlen=window)

    def record(self, now: float) -> None:
        self._times.append(now)

    def rate(self, now: float) -> float | None:
        """Events per second from the oldest remembered event until `now` (so the rate falls when
        events stop coming); None with fewer than two events."""
        if len(self._times) < 2:
            return None
        elapsed = now - self._times[0]
        return len(self._times) / elapsed if elapsed > 0 else None


class PrefillLine:
    """Queued sequences lined up in start order, to tell when a sequence's first token would come.

    Two things hold a queued sequence back: the prefill tokens lined up before it (starting with
    those still owed to running sequences that have not sampled), computed `budget` tokens a step
    of which `num_decodes` go to running decodes; and, when every sequence slot is taken, the
    steps until a running sequence leaves (`seat_free_steps`, at the latest: when it reaches
    max_tokens). Both are converted to seconds with the measured step cost.
    """

    def __init__(
        self,
        cost: StepCostModel,
        budget: int,
        num_decodes: int,
        tokens_to_compute: Callable[[Sequence], int],
        num_tokens_ahead: int = 0,
        num_free_seats: int | None = None,
        seat_free_steps: list[int] | None = None,
    ) -> None:
        self.cost = cost
        self.budget = budget
        self.num_decodes = num_decodes
        self.tokens_to_compute = tokens_to_compute
        self.num_tokens_ahead = num_tokens_ahead
        self.num_free_seats = num_free_seats
        self.seat_free_steps = sorted(seat_free_steps or [])
        self.num_lined_up = 0

    def seconds_until_first_token(self, seq: Sequence) -> float | None:
        """If `seq` were next in line; None when no step has been measured yet."""
        own = self.tokens_to_compute(seq)
        behind_prefills = self.cost.seconds_to_compute(self.num_tokens_ahead + own, self.num_decodes, self.budget)
        alone = self.cost.seconds_to_compute(own, self.num_decodes, self.budget)
        seat = self._seconds_until_seat()
        if behind_prefills is None or alone is None or seat is None:
            return None
        return max(behind_prefills, seat + alone)

    def append(self, seq: Sequence) -> None:
        self.num_tokens_ahead += self.tokens_to_compute(seq)
        self.num_lined_up += 1

    def _seconds_until_seat(self) -> float | None:
        """When the next in line gets a sequence slot. Slots freed by sequences that started from
        this line are not foreseen: beyond the running ones, the last known slot is assumed."""
        if self.num_free_seats is None or self.num_lined_up < self.num_free_seats or not self.seat_free_steps:
            return 0.0
        i = min(self.num_lined_up - self.num_free_seats, len(self.seat_free_steps) - 1)
        step = self.cost.step_seconds(self.num_decodes)
        return None if step is None else self.seat_free_steps[i] * step

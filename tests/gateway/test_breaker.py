from lmserve.gateway.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, consecutive: int = 3, rate: float = 0.5, window: int = 10) -> CircuitBreaker:
    return CircuitBreaker(consecutive, rate, window, cooldown=5.0, clock=clock)


def test_opens_after_consecutive_failures_then_half_open_trial_closes_it() -> None:
    clock = Clock()
    breaker = make(clock)
    breaker.record(False)
    breaker.record(False)
    assert breaker.state is BreakerState.CLOSED
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.can_pass() and not breaker.acquire()
    clock.now += 5.0
    assert breaker.can_pass()
    assert breaker.acquire()  # the one trial
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.acquire() and not breaker.can_pass()  # only one trial at a time
    breaker.record(True)
    assert breaker.state is BreakerState.CLOSED and breaker.acquire()


def test_failed_trial_reopens_for_another_cooldown() -> None:
    clock = Clock()
    breaker = make(clock, consecutive=1)
    breaker.record(False)
    clock.now += 5.0
    assert breaker.acquire()
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN
    clock.now += 4.9
    assert not breaker.can_pass()
    clock.now += 0.1
    assert breaker.can_pass()


def test_opens_on_error_rate_without_consecutive_run() -> None:
    breaker = make(Clock(), consecutive=100, rate=0.5, window=10)
    for i in range(9):
        breaker.record(i % 2 == 0)  # 5 ok, 4 failed, alternating
    assert breaker.state is BreakerState.CLOSED
    breaker.record(False)  # 5 of the last 10 failed
    assert breaker.state is BreakerState.OPEN


def test_error_rate_window_slides() -> None:
    breaker = make(Clock(), consecutive=100, rate=0.5, window=4)
    for outcome in (False, False, True, True, True, True, False):
        breaker.record(outcome)
    assert breaker.state is BreakerState.CLOSED  # last 4: T T T F


def test_cancelled_trial_frees_the_slot() -> None:
    clock = Clock()
    breaker = make(clock, consecutive=1)
    breaker.record(False)
    clock.now += 5.0
    assert breaker.acquire()
    breaker.cancel()
    assert breaker.acquire()


def test_a_trial_that_the_backend_answers_closes_the_breaker_at_once() -> None:
    clock = Clock()
    breaker = make(clock, consecutive=1)
    breaker.record(False)
    clock.now += 5.0
    assert breaker.acquire()
    breaker.record_answer()  # a stream's 200 head: the backend is back
    assert breaker.state is BreakerState.CLOSED and breaker.acquire() and breaker.acquire()
    breaker.record(True)  # the trial's own end then counts like any outcome
    assert breaker.state is BreakerState.CLOSED
    breaker.record_answer()  # closed: nothing changes
    assert breaker.state is BreakerState.CLOSED

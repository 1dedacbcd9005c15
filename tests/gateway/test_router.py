from lmserve.gateway.auth import Principal
from lmserve.gateway.config import GatewayConfig, ModelConfig, RetryConfig
from lmserve.gateway.handler import _priority
from lmserve.gateway.router import RetryBudget, Router


def config() -> GatewayConfig:
    return GatewayConfig(
        models=[ModelConfig("a", [{"url": "http://a1"}, {"url": "http://a2"}], aliases=["a-latest"],
                            fallbacks=["b"], max_in_flight=4),
                ModelConfig("b", [{"url": "http://b1"}], fallbacks=["c"]),
                ModelConfig("c", [{"url": "http://c1"}], fallbacks=["a"])],
        canaries={"canary": {"a": 1, "b": 3}})


def test_names_aliases_canaries_and_fallback_chain() -> None:
    router = Router(config())
    assert router.resolve("a-latest").name == "a"
    assert router.resolve("nope") is None
    picks = [router.resolve("canary").name for _ in range(400)]
    assert 60 <= picks.count("a") <= 140  # 25%
    assert [p.name for p in router.chain(router.resolve("a"))] == ["a", "b", "c"]  # the cycle back to a is cut


def test_pick_skips_tried_unavailable_and_draining() -> None:
    router = Router(config())
    pool = router.resolve("a")
    a1, a2 = pool.backends
    assert router.pick(pool, {a1}, None) is a2
    a2.is_draining = True
    assert router.pick(pool, {a1}, None) is None
    a1.is_healthy = False
    assert router.pick(pool, set(), None) is None


def test_slots_by_priority() -> None:
    router = Router(config())  # cap 4; normal 0.8 -> 3.2, low 0.5 -> 2
    pool = router.resolve("a")
    assert router.acquire_slot(pool, "low") and router.acquire_slot(pool, "low")
    assert not router.acquire_slot(pool, "low")
    assert router.acquire_slot(pool, "normal") and router.acquire_slot(pool, "normal")
    assert not router.acquire_slot(pool, "normal")
    assert not router.acquire_slot(pool, "high")  # 4 in flight = cap
    router.release_slot(pool)
    assert router.acquire_slot(pool, "high")
    assert router.in_flight["a"] == 4


def test_retry_budget_ratio_with_a_floor() -> None:
    budget = RetryBudget(RetryConfig(budget_ratio=0.2, min_retries_per_window=3, window_seconds=1000))
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]
    for _ in range(30):
        budget.record_request()
    assert budget.try_retry() and budget.try_retry() and budget.try_retry()  # 0.2 * 30 = 6 in all
    assert not budget.try_retry()


def test_priority_header_may_only_lower() -> None:
    normal = Principal("k", "k", None, None, None, None, None, "normal")
    high = Principal("k", "k", None, None, None, None, None, "high")
    assert _priority(None, normal) == "normal"
    assert _priority(b"low", normal) == "low"
    assert _priority(b"high", normal) == "normal"
    assert _priority(b"HIGH", high) == "high"
    assert _priority(b"bogus", high) == "high"

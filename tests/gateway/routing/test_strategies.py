"""Each strategy's distribution over fixed candidates (the end-to-end check is in test_proxy.py)."""

from collections import Counter

from lmserve.gateway.backends import Backend
from lmserve.gateway.breaker import CircuitBreaker
from lmserve.gateway.routing.latency import LatencyStrategy
from lmserve.gateway.routing.least_outstanding import LeastOutstandingStrategy
from lmserve.gateway.routing.prefix_affinity import PrefixAffinityStrategy
from lmserve.gateway.routing.round_robin import RoundRobinStrategy
from lmserve.gateway.routing.weighted import WeightedStrategy


def backend(name: str, weight: float = 1.0) -> Backend:
    return Backend(f"http://{name}", weight, None, CircuitBreaker(5, 0.5, 20, 10.0))


def test_round_robin_is_exactly_even() -> None:
    pool = [backend("a"), backend("b"), backend("c")]
    strategy = RoundRobinStrategy()
    picks = [strategy.choose(pool, None).url for _ in range(30)]
    assert Counter(picks) == {"http://a": 10, "http://b": 10, "http://c": 10}
    assert picks[:3] == ["http://a", "http://b", "http://c"]


def test_weighted_follows_weights_and_interleaves() -> None:
    pool = [backend("a", 3), backend("b", 1)]
    strategy = WeightedStrategy()
    picks = [strategy.choose(pool, None).url for _ in range(40)]
    assert Counter(picks) == {"http://a": 30, "http://b": 10}
    assert "http://b" in picks[:4]  # smooth: b is not starved until the end of a cycle


def test_least_outstanding_prefers_the_idle_backend() -> None:
    a, b = backend("a"), backend("b")
    a.num_outstanding = 3
    strategy = LeastOutstandingStrategy()
    assert {strategy.choose([a, b], None).url for _ in range(5)} == {"http://b"}
    b.num_outstanding = 3
    assert {strategy.choose([a, b], None).url for _ in range(10)} == {"http://a", "http://b"}


def test_latency_prefers_the_fast_backend_and_tries_unmeasured_ones() -> None:
    fast, slow, fresh = backend("fast"), backend("slow"), backend("fresh")
    fast.ewma_ttfb, slow.ewma_ttfb = 0.01, 0.5
    strategy = LatencyStrategy()
    picks = Counter(strategy.choose([fast, slow], None).url for _ in range(100))
    assert picks == {"http://fast": 100}  # two choices out of two: always compared
    picks = Counter(strategy.choose([fast, slow, fresh], None).url for _ in range(300))
    assert picks["http://slow"] == 0
    assert picks["http://fresh"] > 0


def test_latency_accounts_for_load() -> None:
    fast, slow = backend("fast"), backend("slow")
    fast.ewma_ttfb, slow.ewma_ttfb = 0.01, 0.05
    fast.num_outstanding = 10  # 0.01 * 11 > 0.05 * 1
    assert LatencyStrategy().choose([fast, slow], None).url == "http://slow"


def test_prefix_affinity_is_sticky_and_spreads_keys() -> None:
    pool = [backend("a"), backend("b"), backend("c")]
    strategy = PrefixAffinityStrategy(load_factor=1.25)
    owners = {f"session-{i}": strategy.choose(pool, f"session-{i}").url for i in range(300)}
    for key, url in owners.items():
        assert strategy.choose(pool, key).url == url
    counts = Counter(owners.values())
    assert len(counts) == 3 and min(counts.values()) > 50


def test_prefix_affinity_moves_only_the_removed_backends_keys() -> None:
    pool = [backend("a"), backend("b"), backend("c")]
    strategy = PrefixAffinityStrategy()
    before = {f"k{i}": strategy.choose(pool, f"k{i}").url for i in range(300)}
    after = {k: strategy.choose(pool[:2], k).url for k in before}
    moved = [k for k in before if before[k] != after[k]]
    assert moved and all(before[k] == "http://c" for k in moved)


def test_prefix_affinity_hot_key_spills_over_under_bounded_load() -> None:
    pool = [backend("a"), backend("b"), backend("c")]
    strategy = PrefixAffinityStrategy(load_factor=1.25)
    home = strategy.choose(pool, "hot")
    home.num_outstanding = 4  # bound = ceil(1.25 * 5 / 3) = 3
    other = strategy.choose(pool, "hot")
    assert other is not home
    for b in pool:
        b.num_outstanding = 1  # bound = ceil(1.25 * 4 / 3) = 2: home has room again
    assert strategy.choose(pool, "hot") is home

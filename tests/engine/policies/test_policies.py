"""Each policy's order and preemption choice, on hand-made sequences (no scheduler)."""

from lmserve.engine.policies import DeadlinePolicy, FairPolicy, FcfsPolicy, PriorityPolicy

from ..helpers import make_seq


def test_fcfs_orders_by_arrival():
    a, b = make_seq(2), make_seq(2)
    b.arrival_time, a.arrival_time = 1.0, 2.0
    assert FcfsPolicy().order([a, b]) == [b, a]
    assert not FcfsPolicy().may_preempt(b, a)


def test_priority_orders_by_value_then_arrival_and_preempts_only_strictly_lower():
    policy = PriorityPolicy()
    late_urgent, early_low, early_urgent = make_seq(2, priority=0), make_seq(2, priority=3), make_seq(2, priority=0)
    late_urgent.arrival_time, early_low.arrival_time, early_urgent.arrival_time = 5.0, 1.0, 2.0
    assert policy.order([late_urgent, early_low, early_urgent]) == [early_urgent, late_urgent, early_low]
    assert policy.may_preempt(late_urgent, early_low)
    assert not policy.may_preempt(late_urgent, early_urgent)


def test_deadline_orders_pending_deadlines_first_then_arrival():
    policy = DeadlinePolicy()
    none, late, soon, done = make_seq(2), make_seq(2, deadline=9.0), make_seq(2, deadline=3.0), make_seq(2, deadline=1.0)
    done.first_token_time = 0.5  # its deadline is met: it no longer counts
    assert policy.order([none, late, soon, done]) == [soon, late, none, done]


def test_fair_counter_of_a_returning_tenant_starts_at_the_live_minimum():
    policy = FairPolicy()
    a1, a2 = make_seq(10, tenant="a"), make_seq(10, tenant="a")
    for seq in (a1, a2):
        policy.on_add(seq)
    policy.on_served(a1, 10)
    policy.on_served(a2, 30)
    b = make_seq(4, tenant="b")
    policy.on_add(b)
    assert policy.counter("b") == policy.counter("a") == 40
    policy.on_finish(a1)
    policy.on_finish(a2)
    policy.on_finish(b)
    # Idle tenants at or below the floor are forgotten; a new one starts where the last served stood.
    assert policy.counter("c") == 40


def test_fair_order_projects_prompt_costs_and_weights():
    policy = FairPolicy({"heavy": 2.0})
    heavy = [make_seq(10, tenant="heavy") for _ in range(3)]
    light = [make_seq(10, tenant="light") for _ in range(3)]
    for seq in heavy + light:
        policy.on_add(seq)
    order = [s.tenant for s in policy.order(light + heavy)]
    # heavy pays 5 per request, light 10: heavy gets two starts for each of light's.
    assert order == ["heavy", "light", "heavy", "heavy", "light", "light"]


def test_fair_preempts_the_most_served_tenant_first():
    policy = FairPolicy()
    a, b = make_seq(4, tenant="a"), make_seq(4, tenant="b")
    for seq in (a, b):
        policy.on_add(seq)
    policy.on_served(b, 100)
    assert max([a, b], key=policy.rank) is b

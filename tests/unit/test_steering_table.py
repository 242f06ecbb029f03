"""Steering decisions without a kernel: weights to bucket tables, UDP bucket stability,
exclusion and overload hysteresis, and the rule that never leaves every slot out."""

from __future__ import annotations

from collections import Counter

import pytest

from portshard.steering.cbpf import table_program
from portshard.steering.policy import Health, Observation, Policy
from portshard.steering.table import BUCKETS, Buckets, apportion, contiguous, runs

# ---- weights -> bucket counts -------------------------------------------------------------------


def test_equal_weights_split_the_buckets_evenly() -> None:
    counts = apportion({0: 1.0, 1: 1.0, 2: 1.0})
    assert sum(counts.values()) == BUCKETS
    assert max(counts.values()) - min(counts.values()) <= 1
    assert counts[0] == 342  # the remainder goes to the lowest slot: deterministic


def test_counts_follow_the_weights_and_a_tiny_weight_still_gets_a_bucket() -> None:
    counts = apportion({0: 1.0, 1: 0.25, 2: 1e-9})
    assert counts[2] == 1
    assert counts[0] + counts[1] + counts[2] == BUCKETS
    assert abs(counts[1] / counts[0] - 0.25) < 0.01


def test_zero_weights_get_nothing_and_no_weight_at_all_is_refused() -> None:
    assert apportion({0: 1.0, 1: 0.0}) == {0: BUCKETS}
    with pytest.raises(ValueError, match="at least one slot"):
        apportion({0: 0.0})


def test_contiguous_tables_and_their_runs() -> None:
    table = contiguous({2: 2, 0: 3})
    assert table == [0, 0, 0, 2, 2]
    assert runs(table) == [(3, 0), (5, 2)]
    assert runs([1, 1, 0, 1]) == [(2, 1), (3, 0), (4, 1)]


# ---- UDP: a table that moves as few buckets as it can -------------------------------------------


def equal(slots: list[int]) -> dict[int, int]:
    return apportion(dict.fromkeys(slots, 1.0))


def test_excluding_a_slot_moves_only_its_buckets_and_they_come_back() -> None:
    b = Buckets(range(4))
    before = list(b.owner)
    moved = b.assign(equal([0, 1, 3]))
    assert sorted(moved) == [i for i, s in enumerate(before) if s == 2]
    assert 2 not in b.owner
    spread = Counter(b.owner[i] for i in moved)
    assert set(spread) == {0, 1, 3} and max(spread.values()) - min(spread.values()) <= 1
    b.assign(equal([0, 1, 2, 3]))
    assert b.owner == before


def test_a_second_exclusion_moves_only_that_slots_buckets() -> None:
    b = Buckets(range(4))
    b.assign(equal([0, 1, 3]))
    after_first = list(b.owner)
    moved = b.assign(equal([0, 3]))
    assert all(after_first[i] == 1 for i in moved)
    # Slot 1 comes back while 2 is still out: only buckets that were 1's or 2's move, and all of
    # slot 1's home buckets are its own again.
    before = list(b.owner)
    moved = b.assign(equal([0, 1, 3]))
    assert all(b.home[i] in (1, 2) for i in moved), "a healthy slot's flow moved"
    assert all(b.owner[i] == 1 for i, h in enumerate(b.home) if h == 1)
    assert all(b.owner[i] == before[i] for i in range(BUCKETS) if b.home[i] in (0, 3))


@pytest.mark.parametrize("out", [[1], [0, 2], [1, 2, 3]])
def test_homes_of_healthy_slots_never_move_whatever_is_excluded(out: list[int]) -> None:
    b = Buckets(range(5))
    keep = [s for s in range(5) if s not in out]
    b.assign(equal(keep))
    assert all(b.owner[i] == h for i, h in enumerate(b.home) if h in keep)
    b.assign(equal(list(range(5))))
    assert b.owner == b.home


def test_scale_down_moves_only_the_removed_slots_flows_and_scale_up_takes_a_fair_part() -> None:
    b = Buckets(range(3))
    before = list(b.owner)
    b.assign(equal([0, 1]))  # slot 2 excluded first (removing)
    b.remove_slot(2)
    assert b.slots == [0, 1]
    assert all(b.owner[i] == before[i] for i in range(BUCKETS) if before[i] != 2)
    assert b.owner == b.home  # what it got became home: nothing moves later
    b.add_slot(5)
    assert b.home.count(5) == BUCKETS // 3
    moved = b.assign(equal([0, 1, 5]))
    assert len(moved) == BUCKETS // 3 and all(b.owner[i] == 5 for i in moved)


def test_removing_a_slot_that_still_owns_buckets_spreads_them() -> None:
    b = Buckets(range(3))
    b.remove_slot(1)
    assert set(b.owner) == {0, 2} and b.owner == b.home
    with pytest.raises(ValueError, match="last slot"):
        Buckets([4]).remove_slot(4)


def test_weighted_assignment_keeps_unchanged_buckets() -> None:
    b = Buckets(range(2))
    b.assign(apportion({0: 1.0, 1: 0.5}))
    before = list(b.owner)
    moved = b.assign(apportion({0: 1.0, 1: 0.4}))
    assert all(before[i] == 1 and b.owner[i] == 0 for i in moved)
    assert b.owner.count(1) == apportion({0: 1.0, 1: 0.4})[1]


def test_bad_counts_are_refused_and_change_nothing() -> None:
    b = Buckets(range(2))
    before = list(b.owner)
    with pytest.raises(ValueError, match="sum to"):
        b.assign({0: 5})
    with pytest.raises(ValueError, match="not in the table"):
        b.assign({0: BUCKETS - 1, 7: 1})
    assert b.owner == before


# ---- the classic BPF program -------------------------------------------------------------------


def test_classic_program_is_a_jump_chain_over_the_runs() -> None:
    prog = table_program([(600, 1), (BUCKETS, 0)], BUCKETS, flow_hash=False)
    assert len(prog) == 2 + 2 + 1  # ld rand; mod; jge/ret; ret
    assert prog[1] == (0x94, 0, 0, BUCKETS)
    assert prog[2] == (0x35, 1, 0, 600) and prog[3] == (0x06, 0, 0, 1)
    assert prog[-1] == (0x06, 0, 0, 0)
    with pytest.raises(ValueError, match="cover all"):
        table_program([(10, 0)], BUCKETS, flow_hash=True)


# ---- the policy ----------------------------------------------------------------------------------


def step(p: Policy, health: dict[int, Health], queues: dict[int, int] | None = None) -> list[str]:
    obs = [
        Observation(s, 100 + s, h, None if queues is None else queues.get(s))
        for s, h in health.items()
    ]
    return [c.text for c in p.observe(obs)]


R = Health.READY


def test_a_dead_slot_is_out_at_once_until_its_replacement_is_ready() -> None:
    p = Policy()
    step(p, {0: R, 1: R})
    assert set(p.tcp_weights()) == {0, 1}
    assert step(p, {0: R, 1: Health.DOWN}) == ["excluded: no worker"]
    assert set(p.tcp_weights()) == {0} and set(p.udp_weights()) == {0}
    step(p, {0: R, 1: Health.STARTING})
    assert p.verdicts()[1].reason == "starting"
    changes = step(p, {0: R, 1: R})
    assert changes == ["back in: its worker is ready (was starting)"]
    assert set(p.tcp_weights()) == {0, 1}


def test_never_every_slot_out() -> None:
    p = Policy()
    step(p, {0: R, 1: R, 2: Health.REMOVING})
    changes = step(p, {0: Health.DOWN, 1: Health.STARTING, 2: Health.REMOVING})
    assert set(p.tcp_weights()) == {1}, "the starting slot beats the dead one"
    assert any("no slot is ready" in c for c in changes)
    step(p, {0: Health.DOWN, 1: Health.DOWN, 2: Health.REMOVING})
    assert set(p.tcp_weights()) == {0, 1} and 2 not in p.udp_weights()
    assert p.verdicts()[0].included and "in anyway" in (p.verdicts()[0].reason or "")
    step(p, {0: Health.DRAINING, 1: Health.DOWN, 2: Health.REMOVING})
    assert set(p.tcp_weights()) == {0}


def test_overload_has_hysteresis() -> None:
    p = Policy()
    ready = {0: R, 1: R}
    step(p, ready, {0: 0, 1: 0})
    step(p, ready, {0: 2, 1: 7})  # long-ish, but under the threshold: stays in
    assert p.verdicts()[1].included
    changes = step(p, ready, {0: 2, 1: 30})
    assert changes == [
        "excluded: overloaded: 30 queued for 50.0% of new connections, 2 for the rest"
    ]
    assert p.tcp_weights() == {0: 1.0}
    assert p.udp_weights() == {0: 1.0, 1: 1.0}, "UDP follows hard exclusions only"
    for q in (20, 5, 2):  # draining, but not down to 1 yet: still out (hysteresis)
        step(p, ready, {0: 2, 1: q})
        assert not p.verdicts()[1].included
    assert step(p, ready, {0: 2, 1: 1}) == ["back in: its queue drained"]
    assert p.verdicts()[1].included and p.verdicts()[1].weight == 1.0, "one hiccup costs no weight"


def test_the_only_serving_slot_is_never_excluded_for_overload() -> None:
    p = Policy()
    step(p, {0: R, 1: Health.STARTING}, {0: 0})
    step(p, {0: R, 1: Health.STARTING}, {0: 500})
    assert p.verdicts()[0].included


def stall_cycle(p: Policy, slow: int, epochs: int, n: int = 2) -> list[str]:
    """``slow`` is overloaded most of each epoch (the others keep up)."""
    ready = dict.fromkeys(range(n), R)
    texts = []
    for i in range(epochs * p.params.epoch):
        q = 30 if i % 10 < 8 else 0  # stalls, then drains
        texts += step(p, ready, {s: (q if s == slow else 3) for s in range(n)})
    return texts


def test_a_slot_out_for_overload_most_of_the_time_loses_weight_and_regains_it() -> None:
    p = Policy()
    texts = stall_cycle(p, slow=1, epochs=1)
    assert p.verdicts()[1].weight == 0.25  # out 60-90% of the epoch: x1/4
    assert any(t.startswith("weight down to 0.250: out for overload") for t in texts)
    assert p.verdicts()[0].weight == 1.0
    stall_cycle(p, slow=1, epochs=5)
    assert p.verdicts()[1].weight == p.params.min_weight
    ready = {0: R, 1: R}
    for _ in range(3 * p.params.epoch):
        step(p, ready, {0: 3, 1: 0})
    assert p.verdicts()[1].weight == pytest.approx(p.params.min_weight * p.params.grow**3)
    assert p.verdicts()[1].included


def test_equal_slots_with_noisy_queues_keep_full_weight() -> None:
    p = Policy()
    ready = {0: R, 1: R, 2: R}
    pattern = [(20, 25, 30), (30, 20, 25), (25, 30, 20), (28, 22, 26), (40, 3, 30)]
    for i in range(300):
        q = pattern[i % len(pattern)]
        step(p, ready, dict(enumerate(q)))
    assert all(v.weight == 1.0 for v in p.verdicts().values())


def test_slots_that_take_turns_being_overloaded_keep_full_weight() -> None:
    p = Policy()
    ready = {0: R, 1: R}
    for i in range(10 * p.params.epoch):
        hot = (i // 7) % 2
        step(p, ready, {hot: 30, 1 - hot: 0})
    assert all(v.weight == 1.0 for v in p.verdicts().values())


def test_a_slot_handing_over_takes_no_new_tcp_but_keeps_its_udp_flows() -> None:
    # Reload: the new worker is ready and the old one is being retired. Out for TCP so that
    # the queue empties and the old worker is caught idle; UDP stays (same socket).
    p = Policy()
    step(p, {0: R, 1: R})
    assert step(p, {0: R, 1: Health.HANDOVER}) == ["excluded: handing over"]
    assert set(p.tcp_weights()) == {0} and set(p.udp_weights()) == {0, 1}
    assert step(p, {0: R, 1: R}) == ["back in: handover done"]
    assert set(p.tcp_weights()) == {0, 1}


def test_every_slot_handing_over_at_once_keeps_one_in_and_the_others_take_turns() -> None:
    # A reload with --surge covering every slot: the old workers hand over one after the
    # other, never all at once (nobody shielded) and never all out (nobody to serve).
    p = Policy()
    step(p, {0: R, 1: R, 2: R})
    H = Health.HANDOVER
    assert step(p, {0: H, 1: H, 2: H}) == ["excluded: handing over"] * 2
    assert set(p.tcp_weights()) == {2} and p.fallback == ""
    assert set(p.udp_weights()) == {0, 1, 2}
    assert step(p, {0: R, 1: H, 2: H}) == ["back in: handover done", "excluded: handing over"]
    assert set(p.tcp_weights()) == {0}
    assert step(p, {0: R, 1: R, 2: H}) == ["back in: handover done"]
    assert set(p.tcp_weights()) == {0, 1}
    # One went out first (its new worker was ready first): it stays out, the other stays in.
    p = Policy()
    step(p, {0: R, 1: R})
    assert step(p, {0: H, 1: R}) == ["excluded: handing over"]
    assert step(p, {0: H, 1: H}) == []
    assert set(p.tcp_weights()) == {1}


def test_a_slot_handing_over_back_in_because_no_other_is_ready_says_so() -> None:
    # Two slots, a reload's handover, and the other slot's worker dies: the handing-over slot
    # takes new connections (its new worker is ready) while its old worker may still be
    # shutting down on the same socket. A lost request must be traceable to this moment: it
    # read "back in: its worker is ready (was starting)" before.
    p = Policy()
    step(p, {0: R, 1: R})
    assert step(p, {0: Health.HANDOVER, 1: R}) == ["excluded: handing over"]
    fallback = "no other slot is ready: the handing-over slot takes new connections"
    assert step(p, {0: Health.HANDOVER, 1: Health.DOWN}) == [fallback, "excluded: no worker"]
    assert set(p.tcp_weights()) == {0} and p.fallback == fallback
    assert p.verdicts()[0].reason == f"handing over; in anyway: {fallback}"
    assert step(p, {0: Health.HANDOVER, 1: R}) == [
        "excluded: handing over",
        "back in: its worker is ready (was no worker)",
    ]
    assert set(p.tcp_weights()) == {1} and p.fallback == ""


def test_a_single_slot_handing_over_stays_in_without_a_warning() -> None:
    p = Policy()
    step(p, {0: R})
    assert step(p, {0: Health.HANDOVER}) == []
    assert p.tcp_weights() == {0: 1.0} and p.fallback == ""
    assert p.verdicts()[0].reason is None


def test_a_slot_back_in_as_another_goes_out_takes_its_own_buckets_and_both_end_at_home() -> None:
    # An adopter seeded with a table from mid-handover (slot 3's buckets lent out) that finds
    # slot 1 with no worker assigns "3 in, 1 out" at once. Slot 3 took slot 1's buckets and
    # left its own lent; with both back in, slots 1 and 3 had swapped 342 buckets for good
    # (the fault campaign: a third of two healthy UDP slots' flows moved after an adoption).
    b = Buckets(range(4))
    b.assign(equal([0, 1, 2]))  # slot 3 handing over
    b.assign(equal([0, 2, 3]))  # the adopter: slot 3 back, slot 1 empty
    lent = [i for i in range(BUCKETS) if b.home[i] == 1]
    assert all(b.owner[i] != 1 for i in lent)  # only the empty slot's flows are away
    b.assign(equal([0, 1, 2, 3]))  # slot 1 respawned
    assert b.owner == b.home

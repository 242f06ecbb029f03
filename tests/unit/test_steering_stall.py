"""The stall rule without a kernel: a slot whose queue holds connections while it accepted none
since the last look is out whatever the depth, and back once its queue is empty."""

from __future__ import annotations

from portshard.steering.policy import Health, Observation, Policy

R = Health.READY


def look(p: Policy, seen: dict[int, tuple[int, int | None]]) -> list[str]:
    """One sample: slot -> (queued, handed so far or None)."""
    obs = [Observation(s, 100 + s, R, q, h) for s, (q, h) in seen.items()]
    return [c.text for c in p.observe(obs)]


def test_a_slot_with_queued_connections_and_no_accept_since_the_last_look_is_out() -> None:
    p = Policy()
    look(p, {0: (0, 0), 1: (0, 0), 2: (0, 0), 3: (0, 0)})
    # Slot 3 was handed 2 and both still wait: it accepted none. 2 queued, far below the 8
    # the overload rule needs (8 clients in flight can never put 8 there).
    changes = look(p, {0: (0, 50), 1: (0, 50), 2: (0, 50), 3: (2, 2)})
    assert changes == ["excluded: stalled: 2 queued and none accepted since the last look"]
    assert set(p.tcp_weights()) == {0, 1, 2}
    assert set(p.udp_weights()) == {0, 1, 2, 3}, "UDP follows hard exclusions only"
    # Out while it holds any: a queue of 1 is not enough to come back.
    look(p, {0: (0, 90), 1: (0, 90), 2: (0, 90), 3: (1, 2)})
    assert 3 not in p.tcp_weights()
    assert look(p, {0: (0, 99), 1: (0, 99), 2: (0, 99), 3: (0, 2)}) == [
        "back in: its queue drained"
    ]


def test_a_worker_waiting_for_a_cpu_is_descheduled_not_stalled() -> None:
    p = Policy()
    look(p, {0: (0, 0), 1: (0, 0), 2: (0, 0), 3: (0, 0)})
    # Slot 3 accepted none of its 2, but its worker waited for a CPU for 40% of the look:
    # the machine's; the kernel's two choices already send new connections elsewhere.
    seen = {0: (0, 50), 1: (0, 50), 2: (0, 50), 3: (2, 2)}
    obs = [
        Observation(s, 100 + s, R, q, h, waited=0.4 if s == 3 else 0.0)
        for s, (q, h) in seen.items()
    ]
    assert [c.text for c in p.observe(obs)] == []
    assert set(p.tcp_weights()) == {0, 1, 2, 3}
    # The next look it still took none and ran as much as it wanted: stalled.
    assert look(p, {0: (0, 90), 1: (0, 90), 2: (0, 90), 3: (2, 2)}) == [
        "excluded: stalled: 2 queued and none accepted since the last look"
    ]


def test_a_busy_slot_that_accepts_is_not_stalled_however_long_its_queue() -> None:
    p = Policy()
    look(p, {0: (5, 0), 1: (6, 0)})
    # Slot 1 was handed 40 and its queue grew by 1: it accepted 39.
    look(p, {0: (5, 40), 1: (7, 40)})
    look(p, {0: (4, 80), 1: (7, 80)})
    assert set(p.tcp_weights()) == {0, 1}


def test_the_first_look_after_a_worker_became_ready_judges_nothing() -> None:
    p = Policy()
    p.observe([Observation(0, 100, R, 0, 0), Observation(1, 101, Health.STARTING)])
    # Slot 1 serves now: 3 queued from while it was starting; nothing to compare with yet.
    look(p, {0: (0, 10), 1: (3, 10)})
    assert set(p.tcp_weights()) == {0, 1}
    assert look(p, {0: (0, 20), 1: (3, 10)}) == [
        "excluded: stalled: 3 queued and none accepted since the last look"
    ]


def test_the_last_serving_slot_is_never_out_for_a_stall() -> None:
    p = Policy()
    look(p, {0: (0, 0), 1: (0, 0)})
    look(p, {0: (2, 2), 1: (0, 9)})
    assert set(p.tcp_weights()) == {1}
    look(p, {0: (2, 2), 1: (3, 12)})  # slot 1 now looks stalled too: it stays in
    assert set(p.tcp_weights()) == {1}


def test_without_handed_counts_a_growing_queue_well_above_the_rest_is_a_stall() -> None:
    # Classic BPF: no count of what a slot was handed, so "accepted none" is inferred from a
    # queue that grew while the rest's stayed short.
    p = Policy()
    look(p, {0: (0, None), 1: (0, None), 2: (0, None), 3: (0, None)})
    look(p, {0: (0, None), 1: (0, None), 2: (0, None), 3: (1, None)})
    assert 3 in p.tcp_weights()  # one queued: could be a connection just arriving
    changes = look(p, {0: (0, None), 1: (0, None), 2: (0, None), 3: (3, None)})
    assert changes == ["excluded: stalled: its queue grew from 1 to 3, the rest shorter"]
    look(p, {0: (0, None), 1: (0, None), 2: (0, None), 3: (0, None)})
    changes = look(p, {0: (0, None), 1: (0, None), 2: (0, None), 3: (2, None)})
    assert changes == ["excluded: stalled: its queue grew from 0 to 2, the rest shorter"]


def test_without_handed_counts_equal_busy_queues_or_a_steady_one_are_no_stall() -> None:
    p = Policy()
    for queues in ((5, 6), (6, 7), (7, 6), (8, 9), (6, 6)):  # busy, both moving
        look(p, {0: (queues[0], None), 1: (queues[1], None)})
    assert set(p.tcp_weights()) == {0, 1}
    p = Policy()
    for _ in range(30):  # a steady queue of 3 beside an empty one: it keeps up
        look(p, {0: (3, None), 1: (0, None)})
    assert set(p.tcp_weights()) == {0, 1}


def test_a_stall_never_hands_a_full_share_to_slots_cut_for_falling_behind() -> None:
    # Slot 1 was cut to the least weight; slot 0, healthy, accepted nothing for one look (a
    # busy machine descheduled it): out, it would send every connection to slot 1.
    p = Policy()
    look(p, {0: (0, 0), 1: (0, 0)})
    p._tracks[1].weight = p.params.min_weight  # as epochs of falling behind leave it
    p._decide([])
    look(p, {0: (5, 100), 1: (0, 100)})
    assert look(p, {0: (9, 104), 1: (0, 100)}) == []
    assert set(p.tcp_weights()) == {0, 1}


def test_a_slot_the_kernel_holds_back_takes_no_one_elses_share() -> None:
    # Slot 1 is capped (or weighted by its cost) in the kernel, so slot 0 holds all the rest
    # of what is in flight: neither a long queue nor a look without an accept takes slot 0
    # out, which would send every new connection to slot 1 (they took turns being out, and
    # slot 1 got 15 at a time).
    p = Policy()

    def held_back(seen: dict[int, tuple[int, int]]) -> list[str]:
        obs = [Observation(s, 100 + s, R, q, h, limited=s == 1) for s, (q, h) in seen.items()]
        return [c.text for c in p.observe(obs)]

    held_back({0: (0, 0), 1: (0, 0)})
    assert held_back({0: (15, 100), 1: (0, 10)}) == []
    assert held_back({0: (15, 100), 1: (0, 20)}) == []  # accepted none: no stall either
    assert set(p.tcp_weights()) == {0, 1}
    # Not held back any more: the same queues are an overload.
    assert look(p, {0: (15, 150), 1: (0, 30)})[0].startswith("excluded: overloaded: 15 queued")


def test_a_queue_that_sat_while_nobody_got_through_is_no_stall() -> None:
    # Every slot holds queued connections and none accepted any: the client (or the machine)
    # paused, each worker blocked reading a request that did not come. Out, equal workers
    # took turns being out and were capped (4 workers / 64 in flight, load ~10).
    p = Policy()
    look(p, {0: (10, 100), 1: (12, 100), 2: (9, 100), 3: (11, 100)})
    assert look(p, {0: (15, 105), 1: (12, 100), 2: (14, 105), 3: (11, 101)}) == []
    assert set(p.tcp_weights()) == {0, 1, 2, 3}
    # A few got through elsewhere, fewer than slot 0 holds: still the pause.
    assert look(p, {0: (15, 105), 1: (11, 102), 2: (14, 106), 3: (11, 102)}) == []
    assert set(p.tcp_weights()) == {0, 1, 2, 3}
    # The others serve again while slot 0's queue sits: a stall.
    assert look(p, {0: (15, 105), 1: (10, 140), 2: (13, 146), 3: (12, 140)}) == [
        "excluded: stalled: 15 queued and none accepted since the last look"
    ]


def test_every_client_stuck_on_one_slot_is_a_stall() -> None:
    # The other slots hold nothing and were handed nothing: every client waits on slot 1.
    p = Policy()
    look(p, {0: (0, 40), 1: (0, 40)})
    assert look(p, {0: (0, 40), 1: (3, 43)}) == [
        "excluded: stalled: 3 queued and none accepted since the last look"
    ]

"""Steering changes carry an enum kind: which ones can flap (and are rate-limited in the log)
comes from the kind, never from the English of the text."""

from __future__ import annotations

from portshard.steering.policy import ChangeKind, Health, Observation, Policy

R = Health.READY


def kinds(p: Policy, health: dict[int, Health], queues: dict[int, int] | None = None) -> list:
    obs = [Observation(s, 100 + s, h, (queues or {}).get(s)) for s, h in health.items()]
    return [(c.kind, c.moves) for c in p.observe(obs)]


def test_death_and_readiness_are_out_and_in_and_never_rate_limited() -> None:
    p = Policy()
    kinds(p, {0: R, 1: R})
    assert kinds(p, {0: R, 1: Health.DOWN}) == [(ChangeKind.OUT, True)]
    assert kinds(p, {0: R, 1: R}) == [(ChangeKind.IN, True)]
    assert not ChangeKind.OUT.frequent and not ChangeKind.IN.frequent


def test_overload_and_recovery_are_their_own_kinds_and_rate_limited() -> None:
    p = Policy()
    ready = {0: R, 1: R}
    kinds(p, ready, {0: 0, 1: 0})
    assert kinds(p, ready, {0: 2, 1: 30}) == [(ChangeKind.OVERLOADED, True)]
    assert kinds(p, ready, {0: 2, 1: 1}) == [(ChangeKind.RECOVERED, True)]
    assert ChangeKind.OVERLOADED.frequent and ChangeKind.RECOVERED.frequent
    assert ChangeKind.WEIGHT.frequent


def test_a_fallback_is_not_a_slot_move() -> None:
    p = Policy()
    kinds(p, {0: R, 1: R})
    changes = kinds(p, {0: Health.DOWN, 1: Health.STARTING})
    assert (ChangeKind.ALL_OUT, False) in changes

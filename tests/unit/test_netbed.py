"""The test bed's pure parts: the stand-in agent's reading of a status, the endpoints
controller's reading of an agent line (bench/netbed/, issue 16)."""

from __future__ import annotations

from typing import Any

import pytest
from bench.netbed.agent import snapshot
from bench.netbed.bed import _ready

from portshard.health import HostState, Snapshot, agent_reply


def _status(*states: str, stopping: bool = False) -> dict[str, Any]:
    return {"stopping": stopping, "slots": [{"slot": i, "state": s} for i, s in enumerate(states)]}


@pytest.mark.parametrize(
    ("status", "draining", "expected"),
    [
        (_status("ready", "ready"), False, Snapshot(HostState.SERVING, 2, 2)),
        (_status("ready", "starting"), False, Snapshot(HostState.SERVING, 1, 2)),
        (_status("ready", "ready"), True, Snapshot(HostState.DRAINING, 2, 2)),
        (_status("ready", "ready", stopping=True), True, Snapshot(HostState.STOPPING, 2, 2)),
        (None, False, Snapshot(HostState.STOPPING, 0, 0)),  # no supervisor answers
    ],
)
def test_agent_reads_the_status(
    status: dict[str, Any] | None, draining: bool, expected: Snapshot
) -> None:
    assert snapshot(status, draining) == expected


@pytest.mark.parametrize(
    ("reply", "ready"),
    [
        ("ready 100%\n", True),
        ("ready 50%\n", True),
        ("ready 0%\n", False),
        ("drain\n", False),
        ("maint\n", False),
        ("", False),  # no agent: the host is not there
    ],
)
def test_endpoints_controller_keeps_ready_hosts_only(reply: str, ready: bool) -> None:
    assert _ready(reply) is ready


def test_controller_and_agent_agree() -> None:
    for state in HostState:
        for ready_slots in (0, 1, 2):
            snap = Snapshot(state, ready_slots, 2)
            assert _ready(agent_reply(snap)) is snap.healthy, snap

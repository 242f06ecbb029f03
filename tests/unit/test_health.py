"""Health for balancers: /healthz and HAProxy's agent check from one snapshot (issue 16)."""

from __future__ import annotations

import json
import selectors
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest

from portshard.errors import ConfigError, SupervisorError
from portshard.health import (
    LIMITS,
    HealthServer,
    HostState,
    Snapshot,
    agent_reply,
    healthz,
    respond,
    weight_percent,
)
from portshard.supervisor.config import load
from portshard.supervisor.settings import BY_FIELD
from portshard.supervisor.state import SupervisorState
from portshard.supervisor.status import SlotStatus, Status, shown_state

SERVING, DRAINING, STOPPING = HostState.SERVING, HostState.DRAINING, HostState.STOPPING


@pytest.mark.parametrize(
    ("snap", "status"),
    [
        (Snapshot(SERVING, 2, 2), 200),
        (Snapshot(SERVING, 1, 4), 200),  # any slot ready: the host serves
        (Snapshot(SERVING, 0, 4), 503),  # none ready (all restarting)
        (Snapshot(DRAINING, 4, 4), 503),  # fails at once, while it still accepts
        (Snapshot(STOPPING, 4, 4), 503),
        (Snapshot(SERVING, 0, 0), 503),
    ],
)
def test_healthz_status(snap: Snapshot, status: int) -> None:
    assert healthz(snap).status == status


def test_healthz_body_says_state_ready_and_capacity() -> None:
    reply = healthz(Snapshot(DRAINING, 1, 4))
    assert json.loads(reply.body) == {"state": "draining", "ready": 1, "slots": 4, "capacity": 0.25}
    wire = reply.encode()
    head, _, body = wire.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"Connection: close" in head and b"Content-Type: application/json" in head


@pytest.mark.parametrize(
    ("ready", "slots", "percent"),
    [(2, 2, 100), (1, 2, 50), (2, 3, 66), (0, 2, 0), (1, 200, 1), (199, 200, 99)],
)
def test_weight_is_the_share_of_slots_ready(ready: int, slots: int, percent: int) -> None:
    assert weight_percent(Snapshot(SERVING, ready, slots)) == percent


def test_agent_reply_words_are_haproxys() -> None:
    assert agent_reply(Snapshot(SERVING, 2, 2)) == "ready 100%\n"
    assert agent_reply(Snapshot(SERVING, 1, 2)) == "ready 50%\n"
    assert agent_reply(Snapshot(SERVING, 0, 2)) == "ready 0%\n"
    assert agent_reply(Snapshot(DRAINING, 2, 2)) == "drain\n"
    assert agent_reply(Snapshot(STOPPING, 2, 2)) == "maint\n"


def test_agent_reply_is_one_line_haproxy_can_parse() -> None:
    for state in HostState:
        line = agent_reply(Snapshot(state, 1, 2))
        assert line.endswith("\n") and "\n" not in line[:-1] and "\r" not in line
        for word in line.split():
            assert word in {"ready", "drain", "maint"} or (
                word.endswith("%") and word[:-1].isdigit()
            ), word


def test_one_port_answers_http_and_the_agent_by_the_first_line() -> None:
    snap = Snapshot(SERVING, 1, 2)
    assert respond(b"agent\n", snap) == b"ready 50%\n"  # HAProxy's agent-send "agent\n"
    assert respond(b"", snap) == b"ready 50%\n"
    ok = respond(b"GET /healthz HTTP/1.1\r\n", snap)
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b'"capacity":0.5}\n')
    assert respond(b"GET /healthz?verbose=1 HTTP/1.0\r\n", snap).startswith(b"HTTP/1.1 200")
    assert respond(b"GET / HTTP/1.1\r\n", snap).startswith(b"HTTP/1.1 404")
    head = respond(b"HEAD /healthz HTTP/1.1\r\n", Snapshot(DRAINING, 1, 2))
    assert head.startswith(b"HTTP/1.1 503") and head.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(("ready", "slots"), [(3, 2), (-1, 2), (0, -1)])
def test_impossible_snapshot_is_refused(ready: int, slots: int) -> None:
    with pytest.raises(ValueError, match="not possible"):
        Snapshot(SERVING, ready, slots)


class Served:
    """A HealthServer in a selector loop of the test's own (as the supervisor runs it)."""

    def __init__(self, snap: list[Snapshot], **limits: float) -> None:
        self.sel = selectors.DefaultSelector()
        self.server = HealthServer(
            ("127.0.0.1", 0), self.sel, lambda: snap[0], limits=replace(LIMITS, **limits)
        )
        self.address = self.server.sock.getsockname()[:2]

    def ask(self, send: bytes, *, close_write: bool = False, timeout: float = 5) -> bytes:
        """Connect, send ``send``, turn the loop until the server closes; what came back."""
        with socket.create_connection(self.address, timeout=timeout) as c:
            c.setblocking(False)
            c.sendall(send)
            data, deadline = b"", time.monotonic() + timeout
            while time.monotonic() < deadline:
                for key, mask in self.sel.select(0.02):
                    key.data(mask)
                self.server.expire(time.monotonic())
                try:
                    chunk = c.recv(4096)
                except BlockingIOError:
                    continue
                if not chunk:
                    return data
                data += chunk
        raise AssertionError(f"no close within {timeout}s; got {data!r}")

    def close(self) -> None:
        self.server.close_all()
        self.sel.close()


def test_health_server_answers_http_and_the_agent_on_one_port() -> None:
    snap = [Snapshot(SERVING, 1, 2)]
    served = Served(snap)
    try:
        assert served.server.url.startswith("http://127.0.0.1:")
        assert served.ask(b"agent\n") == b"ready 50%\n"  # HAProxy's agent-send
        reply = served.ask(b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["ready"] == 1
        snap[0] = Snapshot(DRAINING, 2, 2)
        assert served.ask(b"agent\n") == b"drain\n"
        assert served.ask(b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 503 ")
        assert served.ask(b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    finally:
        served.close()


def test_health_server_answers_a_silent_agent_check_after_its_idle_time() -> None:
    served = Served([Snapshot(STOPPING, 2, 2)], idle=0.2)
    try:
        assert served.ask(b"") == b"maint\n"  # an agent-check without agent-send
        assert served.ask(b"GET /heal") == b""  # half a request: closed, no answer
        assert not served.server.peers
    finally:
        served.close()


def test_health_server_refuses_a_port_in_use_with_the_fix() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with selectors.DefaultSelector() as sel, pytest.raises(SupervisorError, match="--health"):
            HealthServer(("127.0.0.1", port), sel, lambda: Snapshot(SERVING, 1, 1))


def _status(state: SupervisorState, *shown: str) -> Status:
    slots = tuple(SlotStatus(i, 100 + i, shown_state(s)) for i, s in enumerate(shown))
    return Status("n", 1, 0.0, 1, False, True, 0, 0, (), len(slots), slots, state=state)


@pytest.mark.parametrize(
    ("state", "shown", "expected"),
    [
        (SupervisorState.RUNNING, ("ready", "ready"), Snapshot(SERVING, 2, 2)),
        (SupervisorState.BOOTING, ("ready", "starting"), Snapshot(SERVING, 1, 2)),
        (SupervisorState.CHANGING, ("ready", "backoff"), Snapshot(SERVING, 1, 2)),
        (SupervisorState.RUNNING, ("ready", "removing"), Snapshot(SERVING, 1, 1)),  # scale down
        (SupervisorState.DRAINING, ("ready", "ready"), Snapshot(DRAINING, 2, 2)),
        (SupervisorState.STOPPING, ("draining", "ready"), Snapshot(STOPPING, 1, 2)),
    ],
)
def test_the_supervisors_status_says_its_health(
    state: SupervisorState, shown: tuple[str, ...], expected: Snapshot
) -> None:
    st = _status(state, *shown)
    assert st.health_snapshot() == expected
    assert Status.from_json(st.to_json()).health_snapshot() == expected  # status --json too


def test_health_setting_comes_from_the_schema_like_metrics(tmp_path: Path) -> None:
    cli = {"command": ("srv",), "listen": ("tcp://:0",)}
    assert load({**cli, "health": "0.0.0.0:9100"}).health == "0.0.0.0:9100"
    conf = tmp_path / "ps.toml"
    conf.write_text('command = ["srv"]\nlisten = ["tcp://:0"]\nhealth = 9100\n')
    assert load({"config": str(conf)}).health == "9100"  # a port: loopback
    with pytest.raises(ConfigError, match="--health 'nope:x'"):
        load({**cli, "health": "nope:x"})
    assert not BY_FIELD["health"].reloadable

"""Health for balancers: /healthz and HAProxy's agent check from one snapshot (issue 16)."""

from __future__ import annotations

import json
import selectors
import socket
import time

import pytest

from portshard.health import (
    AgentServer,
    HostState,
    Snapshot,
    agent_reply,
    healthz,
    respond,
    weight_percent,
)

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


def _serve(server: AgentServer, answered: int) -> None:
    """Run a selector loop until ``answered`` connections have been answered (5 s at most)."""
    with selectors.DefaultSelector() as sel:
        sel.register(server.fileno(), selectors.EVENT_READ)
        deadline = time.monotonic() + 5
        while server.answered < answered and time.monotonic() < deadline:
            if sel.select(0.1):
                server.on_readable()  # serves the whole queue, never blocks
    assert server.answered == answered


def _read_all(c: socket.socket) -> bytes:
    data = b""
    while chunk := c.recv(100):
        data += chunk
    return data


def test_agent_server_answers_every_connection_from_a_selector() -> None:
    server = AgentServer.listen("127.0.0.1", 0, lambda: agent_reply(Snapshot(SERVING, 2, 2)))
    clients = [socket.create_connection(server.address, timeout=5) for _ in range(3)]
    try:
        clients[0].sendall(b"backend/host1\n")  # agent-send: read and dropped, not a reset
        _serve(server, 3)
        assert [_read_all(c) for c in clients] == [b"ready 100%\n"] * 3
    finally:
        for c in clients:
            c.close()
        server.close()


def test_agent_server_follows_the_snapshot() -> None:
    snap = [Snapshot(SERVING, 1, 2)]
    server = AgentServer.listen("127.0.0.1", 0, lambda: agent_reply(snap[0]))
    try:
        with socket.create_connection(server.address, timeout=5) as c:
            _serve(server, 1)
            assert _read_all(c) == b"ready 50%\n"
        snap[0] = Snapshot(DRAINING, 1, 2)
        with socket.create_connection(server.address, timeout=5) as c:
            _serve(server, 2)
            assert _read_all(c) == b"drain\n"
        server.on_readable()  # an empty queue: returns at once
    finally:
        server.close()

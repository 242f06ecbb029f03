"""The web endpoint's Host check (DNS rebinding), as a pure function."""

from __future__ import annotations

import socket

import pytest

from portshard.supervisor.web import host_allowed, host_of


@pytest.mark.parametrize(
    "request_head,host",
    [
        (b"GET / HTTP/1.0\r\nHost: Example.COM:9100\r\n\r\n", "example.com"),
        (b"GET / HTTP/1.0\r\nhost:[::1]:9100\r\n\r\n", "::1"),
        (b"GET / HTTP/1.0\r\nHOST: localhost.\r\n\r\n", "localhost"),
        (b"GET / HTTP/1.0\r\nX-Host: evil\r\n\r\n", None),
        (b"GET / HTTP/1.0\r\n\r\n", None),
    ],
)
def test_host_of(request_head: bytes, host: str | None) -> None:
    assert host_of(request_head) == host


@pytest.mark.parametrize(
    "host,bound,allowed",
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.2", "127.0.0.1", True),
        ("::1", "127.0.0.1", True),
        ("localhost", "127.0.0.1", True),
        ("app.localhost", "127.0.0.1", True),
        (None, "127.0.0.1", True),
        ("evil.example", "127.0.0.1", False),
        ("localhost.evil.example", "127.0.0.1", False),
        ("10.0.0.5", "127.0.0.1", False),
        ("10.0.0.5", "10.0.0.5", True),
        ("10.0.0.5", "0.0.0.0", True),
        ("evil.example", "0.0.0.0", False),
        (socket.gethostname().lower(), "0.0.0.0", True),
    ],
)
def test_host_allowed(host: str | None, bound: str, allowed: bool) -> None:
    assert host_allowed(host, bound) is allowed

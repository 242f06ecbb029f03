"""The --health and --metrics listeners (endpoint.listen_tcp): the URL they report, and a port
they cannot take named with the option, the reason and the fix, with nothing left open."""

from __future__ import annotations

import os
import selectors
import socket
from typing import NoReturn

import pytest

from portshard.endpoint import StreamServer
from portshard.errors import SupervisorError
from portshard.health import HealthServer
from portshard.supervisor.web import WebServer


def never() -> NoReturn:
    raise AssertionError("nothing asks for the status while the server is built")


def make(option: str, address: tuple[str, int], sel: selectors.BaseSelector) -> StreamServer:
    if option == "--health":
        return HealthServer(address, sel, never)
    return WebServer(address, sel, never, lambda _since: never())


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("option", ["--health", "--metrics"])
def test_a_port_in_use_is_refused_naming_the_option_and_the_fix(option: str) -> None:
    with socket.socket() as held, selectors.DefaultSelector() as sel:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        before = fds()
        with pytest.raises(SupervisorError) as err:
            make(option, ("127.0.0.1", port), sel)
        assert str(err.value) == (
            f"{option}: cannot listen on 127.0.0.1:{port}: Address already in use; "
            "pick a free port (0 = any)"
        )
        assert fds() == before, "the socket it opened is closed"


@pytest.mark.parametrize("option", ["--health", "--metrics"])
def test_an_address_not_of_this_machine_is_named_as_such(option: str) -> None:
    # "Cannot assign requested address; pick a free port": the port was not the problem
    with selectors.DefaultSelector() as sel, pytest.raises(SupervisorError) as err:
        make(option, ("192.0.2.1", 0), sel)  # TEST-NET-1: never an address of this machine
    assert str(err.value) == (
        f"{option}: cannot listen on 192.0.2.1:0: Cannot assign requested address; use an "
        "address of this machine ('ip addr'), e.g. 127.0.0.1"
    )


@pytest.mark.parametrize("option", ["--health", "--metrics"])
@pytest.mark.parametrize("host,shown", [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
def test_the_url_names_the_bound_address(option: str, host: str, shown: str) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with selectors.DefaultSelector() as sel:
        server = make(option, (host, 0), sel)
        sock = server.sock
        try:
            port = sock.getsockname()[1]
            assert isinstance(server, HealthServer | WebServer)
            assert server.url == f"http://{shown}:{port}"
            assert sock.family == (socket.AF_INET6 if ":" in host else socket.AF_INET)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        finally:
            server.close_all()

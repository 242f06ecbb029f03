"""Listen address parsing: every accepted form, and every rejection with what its message says."""

from __future__ import annotations

import socket

import pytest

from portshard import Address, AddressError, PortshardError, Proto, parse
from portshard.address import resolve

TCP, UDP = Proto.TCP, Proto.UDP


@pytest.mark.parametrize(
    ("text", "proto", "host", "port"),
    [
        ("tcp://127.0.0.1:8080", TCP, "127.0.0.1", 8080),
        ("tcp://localhost:80", TCP, "localhost", 80),
        ("udp://127.0.0.1:53", UDP, "127.0.0.1", 53),
        ("UDP://10.0.0.1:5353", UDP, "10.0.0.1", 5353),
        ("tcp://[::1]:8080", TCP, "::1", 8080),
        ("udp://[::1]:0", UDP, "::1", 0),
        ("[::1]:8080", TCP, "::1", 8080),
        ("tcp://[fe80::1%lo]:8080", TCP, "fe80::1%lo", 8080),
        ("tcp://[::]:8080", TCP, "::", 8080),
        ("tcp://:8080", TCP, "", 8080),
        ("udp://:8080", UDP, "", 8080),
        (":8080", TCP, "", 8080),
        ("8080", TCP, "", 8080),
        ("tcp://8080", TCP, "", 8080),
        ("0", TCP, "", 0),
        ("*:8080", TCP, "", 8080),
        ("tcp://*:0", TCP, "", 0),
        ("udp://*:9000", UDP, "", 9000),
        ("tcp://0.0.0.0:65535", TCP, "0.0.0.0", 65535),
        ("  tcp://127.0.0.1:1  ", TCP, "127.0.0.1", 1),
    ],
)
def test_accepted_forms(text: str, proto: Proto, host: str, port: int) -> None:
    addr = parse(text)
    assert addr == Address(proto, host, port)
    assert addr.wildcard is (host == "")
    # The canonical form parses back to the same address.
    assert parse(str(addr)) == addr


def test_canonical_form_brackets_ipv6_and_names_the_scheme() -> None:
    assert str(parse("[::1]:80")) == "tcp://[::1]:80"
    assert str(parse("udp://*:53")) == "udp://:53"
    assert str(parse("8080")) == "tcp://:8080"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        # bad scheme: names it, says which exist, shows the forms
        (
            "http://127.0.0.1:80",
            ["'http'", "unknown scheme", "only tcp and udp", "tcp://HOST:PORT"],
        ),
        ("unix:///tmp/sock", ["'unix'", "unknown scheme"]),
        # no port
        ("127.0.0.1", ["'127.0.0.1'", "has no port", "tcp://HOST:PORT"]),
        ("tcp://localhost", ["has no port"]),
        ("*", ["'*'", "has no port"]),
        ("tcp://:", ["has no port", "port 0 = any free port"]),
        ("tcp://127.0.0.1:", ["has no port"]),
        ("tcp://[::1]", ["has no port", "tcp://[::1]:8080"]),
        # port out of range
        ("tcp://127.0.0.1:65536", ["port 65536 is out of range", "0-65535"]),
        ("70000", ["port 70000 is out of range", "0-65535"]),
        ("-1", ["port -1 is out of range"]),
        ("tcp://127.0.0.1:-5", ["port -5 is out of range"]),
        # non-numeric port, including forms int() would take
        ("tcp://127.0.0.1:http", ["port 'http' is not a number", "write the port in digits"]),
        ("tcp://127.0.0.1:8o8o", ["port '8o8o' is not a number"]),
        ("tcp://127.0.0.1:8_080", ["port '8_080' is not a number"]),
        ("tcp://127.0.0.1:+80", ["port '+80' is not a number"]),
        ("8_080", ["port '8_080' is not a number"]),
        ("\u0668\u0660", ["is not a number"]),  # Arabic-Indic digits: int() takes them
        # IPv6 without brackets: says so and shows the bracketed form
        ("::1:8080", ["must be in brackets", "tcp://[::1]:8080"]),
        ("udp://fe80::1:53", ["must be in brackets", "udp://[fe80::1]:53"]),
        ("::1", ["must be in brackets", "[::1]:PORT"]),
        # bad brackets
        ("tcp://[::1:80", ["'[' is never closed"]),
        ("tcp://[::1]80", ["'80' after ']' is not ':PORT'"]),
        ("tcp://[localhost]:80", ["'localhost' in brackets is not an IPv6 address"]),
        ("tcp://[127.0.0.1]:80", ["'127.0.0.1' in brackets is not an IPv6 address"]),
        # IPv6 literals the kernel refuses with a bare EINVAL at bind()
        (
            "tcp://[::ffff:127.0.0.1]:80",
            ["::ffff:127.0.0.1 is an IPv4-mapped", "tcp://127.0.0.1:80"],
        ),
        ("udp://[fe80::1]:53", ["fe80::1 is link-local", "udp://[fe80::1%eth0]:53"]),
        ("udp://[ff02::1]:53", ["ff02::1 is link-local", "[ff02::1%eth0]:53"]),
        ("tcp://[::1%lo]:80", ["a zone ('%lo') only goes with a link-local", "tcp://[::1]:80"]),
        # whitespace inside (outside is stripped)
        ("tcp://127.0.0.1 :80", ["host '127.0.0.1 ' holds whitespace", "tcp://127.0.0.1:80"]),
        ("tcp://\t127.0.0.1:80", ["holds whitespace"]),
        # empty
        ("", ["empty listen address", "tcp://HOST:PORT"]),
        ("   ", ["empty listen address"]),
        # a path
        ("tcp://127.0.0.1:80/index.html", ["has a path"]),
        # very long: int() raised ValueError past 4,300 digits (a traceback), and a long host
        # was echoed whole, three times in one line
        ("9" * 5000, ["'" + "9" * 40 + "'...", "5,000 characters long", "tcp://HOST:PORT"]),
        ("tcp://:" + "9" * 293, ["port of 293 digits is out of range", "0-65535"]),
        ("tcp://" + "a" * 5000 + ":80", ["5,009 characters long", "no host name"]),
        ("tcp://:0065536", ["port 0065536 is out of range"]),
    ],
)
def test_rejections_say_what_why_and_how(text: str, says: list[str]) -> None:
    with pytest.raises(AddressError) as info:
        parse(text)
    message = str(info.value)
    for part in says:
        assert part in message, f"{part!r} not in {message!r}"


def test_a_long_address_is_refused_in_a_short_line() -> None:
    for text in ("9" * 5000, "tcp://" + "a" * 5000 + ":80", "tcp://:" + "9" * 293):
        with pytest.raises(AddressError) as info:
            parse(text)
        assert len(str(info.value)) < 600, str(info.value)[:200]


def test_address_error_is_a_value_error_and_a_portshard_error() -> None:
    with pytest.raises(ValueError):
        parse("nope")
    with pytest.raises(PortshardError):
        parse("nope")
    assert AddressError.exit_code == 2


def test_not_a_string() -> None:
    with pytest.raises(AddressError, match="must be a string, not 8080"):
        parse(8080)  # type: ignore[arg-type]


def test_resolve_wildcard_is_one_dual_stack_ipv6_socket() -> None:
    target = resolve(parse("tcp://:8080"))
    assert target.family == socket.AF_INET6
    assert target.sockaddr[:2] == ("::", 8080)
    assert target.dualstack


def test_resolve_explicit_ipv6_any_is_ipv6_only() -> None:
    target = resolve(parse("tcp://[::]:8080"))
    assert target.family == socket.AF_INET6
    assert not target.dualstack


def test_resolve_literals() -> None:
    four = resolve(parse("udp://127.0.0.1:53"))
    assert (four.family, four.sockaddr, four.dualstack) == (
        socket.AF_INET,
        ("127.0.0.1", 53),
        False,
    )
    six = resolve(parse("tcp://[::1]:80"))
    assert six.family == socket.AF_INET6
    assert six.sockaddr[:2] == ("::1", 80)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("tcp://..:80", ["'..' is not a valid host name", "1-63 characters"]),
        ("tcp://" + "a" * 64 + ".example:80", ["is not a valid host name"]),
        ("tcp://[fe80::1%no-such-if]:80", ["no network interface 'no-such-if'", "ip link"]),
        # an index no interface has: bind() said "No such device", naming nothing
        ("tcp://[fe80::1%99999]:80", ["no network interface '99999'", "ip link"]),
        ("tcp://[fe80::1%9999999999999999999]:80", ["no network interface", "ip link"]),
    ],
)
def test_resolve_refuses_bad_names_and_zones_without_a_traceback(
    text: str, says: list[str]
) -> None:
    with pytest.raises(AddressError) as info:
        resolve(parse(text))
    for part in says:
        assert part in str(info.value), f"{part!r} not in {info.value}"


def test_resolve_keeps_a_link_local_zone_that_names_an_interface() -> None:
    target = resolve(parse("tcp://[fe80::1%lo]:80"))
    assert target.family == socket.AF_INET6
    assert target.sockaddr[3] == socket.if_nametoindex("lo")
    by_index = resolve(parse(f"tcp://[fe80::1%{socket.if_nametoindex('lo')}]:80"))
    assert by_index.sockaddr[3] == socket.if_nametoindex("lo")

"""The platform table: which option shares a port on each OS, and what happens where none does."""

from __future__ import annotations

import socket
import sys

import pytest

from portshard import ReuseportUnsupported
from portshard.sockets import PLATFORMS, _option_value, decide, platform_key

NOT_BALANCED = ReuseportUnsupported

# sys.platform value -> (option with balance=True, option with balance=False); an exception
# class where portshard must refuse.
TABLE: dict[str, tuple[str | type[Exception], str | type[Exception]]] = {
    "linux": ("SO_REUSEPORT", "SO_REUSEPORT"),
    "freebsd14": ("SO_REUSEPORT_LB", "SO_REUSEPORT_LB"),
    "freebsd12": ("SO_REUSEPORT_LB", "SO_REUSEPORT_LB"),
    "dragonfly": ("SO_REUSEPORT", "SO_REUSEPORT"),
    "dragonfly6": ("SO_REUSEPORT", "SO_REUSEPORT"),
    "netbsd10": (NOT_BALANCED, "SO_REUSEPORT"),
    "openbsd7": (NOT_BALANCED, "SO_REUSEPORT"),
    "darwin": (NOT_BALANCED, "SO_REUSEPORT"),
    "win32": (ReuseportUnsupported, ReuseportUnsupported),
    "cygwin": (ReuseportUnsupported, ReuseportUnsupported),
    "sunos5": (ReuseportUnsupported, ReuseportUnsupported),
}


@pytest.mark.parametrize("balance", [True, False], ids=["balance", "no-balance"])
@pytest.mark.parametrize("system", sorted(TABLE))
def test_decision_table(system: str, balance: bool) -> None:
    expected = TABLE[system][0 if balance else 1]
    if isinstance(expected, str):
        assert decide(system, balance=balance) == expected
    else:
        with pytest.raises(expected):
            decide(system, balance=balance)


@pytest.mark.parametrize("system", ["netbsd", "openbsd", "darwin"])
def test_unbalanced_systems_say_why_and_offer_balance_false(system: str) -> None:
    with pytest.raises(ReuseportUnsupported) as info:
        decide(system)
    message = str(info.value)
    assert PLATFORMS[system].name in message
    assert "last bound socket" in message
    assert "balance=False" in message
    assert "Linux, FreeBSD or DragonFly BSD" in message


@pytest.mark.parametrize(("system", "name"), [("win32", "Windows"), ("cygwin", "Cygwin")])
def test_no_port_sharing_names_the_system_and_the_way_out(system: str, name: str) -> None:
    for balance in (True, False):
        with pytest.raises(ReuseportUnsupported) as info:
            decide(system, balance=balance)
        message = str(info.value)
        assert name in message and repr(system) in message
        assert "reuseport=False" in message


def test_unknown_system_is_refused_not_guessed() -> None:
    with pytest.raises(ReuseportUnsupported) as info:
        decide("sunos5", balance=False)
    message = str(info.value)
    assert "'sunos5'" in message and "unknown" in message
    assert "portshard doctor" in message and "reuseport=False" in message


@pytest.mark.parametrize(
    ("system", "key"),
    [
        ("linux", "linux"),
        ("freebsd14", "freebsd"),
        ("dragonfly6", "dragonfly"),
        ("netbsd10", "netbsd"),
        ("openbsd7", "openbsd"),
        ("darwin", "darwin"),
        ("win32", "win32"),
        ("cygwin", "cygwin"),
        ("sunos5", "sunos5"),
    ],
)
def test_platform_key(system: str, key: str) -> None:
    assert platform_key(system) == key


def test_table_matches_the_design() -> None:
    balanced = {key for key, plat in PLATFORMS.items() if plat.balanced}
    assert balanced == {"linux", "freebsd", "dragonfly"}
    assert {key for key, plat in PLATFORMS.items() if plat.option is None} == {"win32", "cygwin"}
    for plat in PLATFORMS.values():
        assert plat.behaviour, plat


def test_this_machine_decides_by_its_own_platform() -> None:
    assert decide() == decide(sys.platform)


def test_freebsd_option_value_is_known_even_where_python_lacks_it() -> None:
    # FreeBSD's <sys/socket.h>: #define SO_REUSEPORT_LB 0x00010000
    assert _option_value("SO_REUSEPORT_LB") == getattr(socket, "SO_REUSEPORT_LB", 0x00010000)
    if hasattr(socket, "SO_REUSEPORT"):
        assert _option_value("SO_REUSEPORT") == socket.SO_REUSEPORT

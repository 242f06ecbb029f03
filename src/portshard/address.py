"""Parse and resolve listen addresses.

Forms accepted (the scheme defaults to tcp, as for gunicorn's ``-b``)::

    tcp://HOST:PORT   udp://HOST:PORT   tcp://[::1]:PORT   tcp://:PORT   :PORT   PORT   *:PORT

An empty host (or ``*``) means every interface: one dual-stack IPv6 socket where the OS allows,
else IPv4 ``0.0.0.0``. Port 0 asks the kernel for an ephemeral port. A port is written in ASCII
digits only: ``int()`` would also take "8_080", "+80" or "٨٠", which nobody means.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass

from .errors import AddressError

__all__ = ["Address", "Proto", "Resolved", "parse", "resolve"]


class Proto(enum.Enum):
    TCP = "tcp"
    UDP = "udp"

    @property
    def socktype(self) -> int:
        return socket.SOCK_STREAM if self is Proto.TCP else socket.SOCK_DGRAM


@dataclass(frozen=True)
class Address:
    """A listen address as the user wrote it (host not yet resolved)."""

    proto: Proto
    host: str  # "" = every interface; IPv6 literals without brackets
    port: int

    @property
    def wildcard(self) -> bool:
        return self.host == ""

    def __str__(self) -> str:
        return format_address(self.proto, self.host, self.port)


@dataclass(frozen=True)
class Resolved:
    """One concrete socket address an :class:`Address` resolved to."""

    address: Address
    family: int
    sockaddr: tuple[str, int] | tuple[str, int, int, int]
    dualstack: bool  # an IPv6 wildcard socket that also accepts IPv4


def format_address(proto: Proto, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{proto.value}://{shown}:{port}"


_HINT = "write it as tcp://HOST:PORT, udp://HOST:PORT, tcp://[::1]:PORT or tcp://:PORT"
# The longest address that can mean something: a DNS name is at most 253 characters, an IPv6
# literal with its zone ~60. A 5,000-character one was echoed three times in one error line,
# and one of 5,000 digits raised int()'s ValueError (a traceback).
MAX_LENGTH = 300


def parse(text: str) -> Address:
    """Parse ``text`` into an :class:`Address`; raise :class:`AddressError` saying what is wrong."""
    if not isinstance(text, str):
        raise AddressError(f"listen address must be a string, not {text!r}; {_HINT}")
    raw = text.strip()
    if not raw:
        raise AddressError(f"empty listen address; {_HINT}")
    if len(raw) > MAX_LENGTH:
        raise AddressError(
            f"listen address {raw[:40]!r}... is {len(raw):,} characters long: no host name "
            f"is longer than 253; {_HINT}"
        )
    proto = Proto.TCP
    rest = raw
    if "://" in raw:
        scheme, rest = raw.split("://", 1)
        try:
            proto = Proto(scheme.lower())
        except ValueError:
            raise AddressError(
                f"listen address {text!r}: unknown scheme {scheme!r} (only tcp and udp); {_HINT}"
            ) from None
    if _is_number(rest):
        host, port_text = "", rest
    elif rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise AddressError(
                f"listen address {text!r}: '[' is never closed; write an IPv6 host in "
                f"brackets followed by the port, as in tcp://[::1]:8080"
            )
        if not rest[end + 1 :]:
            raise AddressError(
                f"listen address {text!r} has no port; write it after the brackets, "
                f"as in {proto.value}://{rest}:8080 (port 0 = any free port)"
            )
        if not rest[end + 1 :].startswith(":"):
            raise AddressError(
                f"listen address {text!r}: {rest[end + 1 :]!r} after ']' is not ':PORT'; "
                f"write it as {proto.value}://[::1]:8080"
            )
        host, port_text = rest[1:end], rest[end + 2 :]
        _check_ipv6(text, host)
        _check_scope(text, proto, host, port_text)
    else:
        if ":" not in rest:
            if rest and all(c.isdigit() or c in "+-_" for c in rest):
                _parse_port(text, rest)  # a port in a form int() takes but we refuse: "8_080"
            raise AddressError(f"listen address {text!r} has no port; {_HINT}")
        host, port_text = rest.rsplit(":", 1)
        if ":" in host:
            # "::1" alone is an address with no port; "::1:8080" most likely means [::1]:8080.
            if _is_ipv6(host) or not _is_ipv6(rest):
                example = f"[{host}]:{port_text}"
            else:
                example = f"[{rest}]:PORT"
            raise AddressError(
                f"listen address {text!r}: an IPv6 host must be in brackets, "
                f"as in {proto.value}://{example}"
            )
    if "/" in port_text or "/" in host:
        raise AddressError(f"listen address {text!r} has a path; {_HINT}")
    if any(c.isspace() for c in host):
        raise AddressError(
            f"listen address {text!r}: host {host!r} holds whitespace; remove it, "
            f"as in {proto.value}://{''.join(host.split())}:{port_text or 'PORT'}"
        )
    if host == "*":
        host = ""
    return Address(proto, host, _parse_port(text, port_text))


def _is_number(text: str) -> bool:
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit()


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _check_ipv6(text: str, host: str) -> None:
    if host != "" and not _is_ipv6(host):
        raise AddressError(
            f"listen address {text!r}: {host!r} in brackets is not an IPv6 address; "
            f"put only IPv6 literals in brackets, as in tcp://[::1]:8080, and write IPv4 "
            f"addresses and names without them"
        )


def _check_scope(text: str, proto: Proto, host: str, port_text: str) -> None:
    """Refuse IPv6 literals the kernel would refuse with a bare EINVAL at bind().

    An IPv4-mapped address (::ffff:a.b.c.d) cannot be bound by an IPv6-only socket, and a
    link-local one (fe80::/10, ff02::/16) means nothing without the interface it is on.
    """
    addr_text, percent, zone = host.partition("%")
    if not host or not _is_ipv6(host):
        return
    addr = ipaddress.IPv6Address(addr_text)
    port = port_text or "PORT"
    if addr.ipv4_mapped is not None:
        raise AddressError(
            f"listen address {text!r}: {addr_text} is an IPv4-mapped IPv6 address, which "
            f"an IPv6 socket cannot bind; write the IPv4 address, as in "
            f"{proto.value}://{addr.ipv4_mapped}:{port}"
        )
    link_local = addr.is_link_local or (addr.is_multicast and addr.packed[1] & 0x0F == 2)
    if link_local and not zone:
        raise AddressError(
            f"listen address {text!r}: {addr_text} is link-local, so it needs the interface "
            f"it is on after a '%', as in {proto.value}://[{addr_text}%eth0]:{port} "
            f"(see 'ip -6 addr')"
        )
    if percent and not link_local:
        raise AddressError(
            f"listen address {text!r}: a zone ('%{zone}') only goes with a link-local address "
            f"(fe80::/10); remove it, as in {proto.value}://[{addr_text}]:{port}"
        )


def _parse_port(text: str, port_text: str) -> int:
    if not port_text:
        raise AddressError(f"listen address {text!r} has no port; {_HINT} (port 0 = any free port)")
    if not _is_number(port_text):
        raise AddressError(
            f"listen address {text!r}: port {port_text!r} is not a number; "
            f"write the port in digits (service names such as 'http' are not accepted)"
        )
    port = int(port_text, 10) if len(port_text) <= 8 else 1 << 32  # 5,000 digits: no int()
    if not 0 <= port <= 65535:
        shown = port_text if len(port_text) <= 12 else f"of {len(port_text)} digits"
        raise AddressError(
            f"listen address {text!r}: port {shown} is out of range; use 0-65535 "
            f"(0 = any free port)"
        )
    return port


def has_ipv6() -> bool:
    """Whether this host can create an IPv6 socket at all."""
    if not socket.has_ipv6:
        return False
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        return False
    return True


def _check_zone(address: Address) -> None:
    """An IPv6 zone must name an interface of this machine (or be its index)."""
    _, percent, zone = address.host.partition("%")
    if not percent:
        return
    try:
        if zone.isascii() and zone.isdigit():  # an index: bind() said only "No such device"
            socket.if_indextoname(int(zone[:12]))
        else:
            socket.if_nametoindex(zone)
    except (OSError, OverflowError):
        raise AddressError(
            f"cannot listen on {address}: there is no network interface {zone!r} here; "
            f"name one shown by 'ip link' (or its index), as in %lo or %eth0"
        ) from None


def resolve(address: Address) -> Resolved:
    """Resolve ``address`` to one concrete socket address.

    A hostname that resolves to several addresses gives the first one getaddrinfo prefers;
    listen on each literal address separately to get them all.
    """
    if address.wildcard:
        if has_ipv6():
            return Resolved(address, socket.AF_INET6, ("::", address.port, 0, 0), True)
        return Resolved(address, socket.AF_INET, ("0.0.0.0", address.port), False)
    _check_zone(address)
    try:
        infos = socket.getaddrinfo(
            address.host,
            address.port,
            type=address.proto.socktype,
            flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV,
        )
    except socket.gaierror as exc:
        raise AddressError(
            f"cannot listen on {address}: host {address.host!r} does not resolve "
            f"({exc.strerror}); use an IP address, or fix the name in DNS or /etc/hosts"
        ) from None
    except UnicodeError as exc:
        # The IDNA codec refuses a name with an empty label ("a..b") or one over 63 characters.
        raise AddressError(
            f"cannot listen on {address}: {address.host!r} is not a valid host name ({exc}); "
            f"use an IP address or a name whose dot-separated parts are 1-63 characters"
        ) from None
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            host = str(sockaddr[0])
            if family == socket.AF_INET6:
                # An explicit [::] is IPv6 only, as in nginx; the empty host is dual-stack.
                six = (host, int(sockaddr[1]), int(sockaddr[2]), int(sockaddr[3]))  # type: ignore[misc]
                return Resolved(address, family, six, False)
            return Resolved(address, family, (host, int(sockaddr[1])), False)
    raise AddressError(
        f"cannot listen on {address}: {address.host!r} has no IPv4 or IPv6 address; "
        f"use an IP address"
    )

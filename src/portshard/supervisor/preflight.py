"""Before the supervisor opens a socket: is a --listen port already served by someone else?

With SO_REUSEPORT a second server on a served port starts without a word and takes a share of
its connections (issue 12: a second ``portshard run`` on a running supervisor's port got 10 of
10 requests). So ``portshard run`` refuses, naming the holder, unless ``--join-existing`` says
sharing is meant. Sockets handed over by systemd (socket activation, the fd store) are ours.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Collection

from ..address import Address
from ..errors import PortInUse
from ..linux import cgroup, sockdiag
from ..sockets import join_refusal
from .config import Config

__all__ = ["PortLocks", "refuse_served_ports"]

log = logging.getLogger(__name__)

LOCK_WAIT = 30.0  # seconds a start waits for another start on the same port to bind


class PortLocks:
    """One abstract Unix socket per fixed --listen port, held from the check until our
    sockets are bound (``release``), so two `portshard run` started together on one port
    cannot both pass the check before either binds: both started, and the kernel split the
    port's connections between them without a word (1 of 1 such starts by hand, 1 of 3 in
    test_run_cli).

    An abstract name is per network namespace, as ports are, and goes with its process;
    a name held longer than LOCK_WAIT (another user may bind it too) is passed by with a
    warning: the check then runs as before."""

    def __init__(self, cfg: Config) -> None:
        self.held: list[socket.socket] = []
        ports = sorted({(s.address.proto.value, s.address.port) for s in cfg.listen})
        for proto, port in ports:
            if port:
                self._take(f"\0portshard/port/{proto}/{port}")

    def _take(self, name: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                sock.bind(name)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                    time.sleep(0.05)  # another start checks or binds this port now
                    continue
                log.warning(
                    "%s: held for %gs by another process; checking the port without it",
                    name[1:],
                    LOCK_WAIT,
                )
                sock.close()
                return
            self.held.append(sock)
            return

    def release(self) -> None:
        for sock in self.held:
            sock.close()
        self.held.clear()


def _ips(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses ``host`` stands for; None for every interface (or if unknown)."""
    if host in ("", "*"):
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return None  # cannot tell: treat as every interface (binding will say more)
        return {ipaddress.ip_address(info[4][0]) for info in infos}
    return None if ip.is_unspecified else {ip}


def _overlaps(ours: str, local: str) -> bool:
    """Do our host and a holder's local address ("1.2.3.4:80", "[::]:80") share traffic?"""
    theirs_text = local.rsplit(":", 1)[0].strip("[]")
    theirs = _ips(theirs_text)
    mine = _ips(ours)
    if mine is None or theirs is None:
        return True
    return bool({_plain(ip) for ip in mine} & {_plain(ip) for ip in theirs})


def _plain(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """::ffff:1.2.3.4 is 1.2.3.4."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped or ip


def _who(holder: sockdiag.Holder) -> str:
    text = holder.describe()
    if holder.pid is not None:
        try:
            with open(f"/proc/{holder.pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return text
        if any(b"portshard" in arg for arg in argv[:4]):
            text += ", a portshard supervisor or its worker"
    return text


def refuse_served_ports(cfg: Config, *, skip: Collection[Address] = ()) -> None:
    """Raise PortInUse naming the holders if a --listen port is served already (see above).

    ``skip``: addresses whose sockets we are handed (systemd): their holders are us."""
    if cfg.join_existing:
        return
    me = os.getpid()
    # What a supervisor of this name left when it died with its warden: this start kills it
    # (the sweep). Refused, the start that sweeps them never came: `portshard run` on a fixed
    # port after both died said the port was served, by the very workers it would kill.
    swept: set[int] | None = None
    for spec in cfg.listen:
        addr = spec.address
        if addr.port == 0 or addr in skip:
            continue
        holders = [
            h
            for h in sockdiag.port_holders(addr.proto, addr.port)
            if h.pid != me and _overlaps(addr.host, h.local)
        ]
        if holders and swept is None:
            swept = cgroup.stale_members(cfg.name)
        holders = [h for h in holders if h.pid is None or h.pid not in (swept or ())]
        if not holders:
            continue
        seen: dict[int | None, sockdiag.Holder] = {}
        for h in holders:
            seen.setdefault(h.pid, h)
        refusal = join_refusal(addr)
        if refusal is not None:
            # Nothing could be shared (a holder without SO_REUSEPORT, another user's): the
            # bind's own reason, not "starting would share ... pass --join-existing", which
            # then failed with that reason.
            raise refusal
        named = "; ".join(_who(h) for h in list(seen.values())[:3])
        more = f" and {len(seen) - 3} more" if len(seen) > 3 else ""
        raise PortInUse(
            errno.EADDRINUSE,
            f"{addr} is already served by {named}{more}. Starting would share the port with "
            f"it (the kernel would split new connections between them). Stop it, pick "
            f"another port, or pass --join-existing to share it on purpose",
        )

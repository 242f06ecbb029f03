"""The supervisor as a systemd service: socket activation, the fd store, and sd_notify.

- Socket activation: sockets systemd passes (LISTEN_FDS) become slot 0's sockets for the
  --listen addresses they match (by LISTEN_FDNAMES name, else by address); with no --listen at
  all, every passed socket is a listen address. SO_REUSEPORT is set on them (it works after
  listen(): the first socket that joins creates the group), so the other slots' sockets join.
  They outlive a supervisor restart, queue included.
- The fd store: each other slot socket is sent to systemd with FDSTORE=1 and
  FDNAME=portshard.LISTEN.SLOT (kept while the service has FileDescriptorStoreMax=); on the
  next start systemd passes them back and each slot gets its own socket again, queue included.
- sd_notify: READY=1 after boot and after each reload, RELOADING=1 (with MONOTONIC_USEC, as
  Type=notify-reload wants), STOPPING=1, STATUS=.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from .. import activation
from ..address import Address, Proto, format_address
from ..steering import cbpf

log = logging.getLogger("portshard.supervisor")

__all__ = ["Activated", "Notifier", "store_name"]


def store_name(listen_name: str, slot: int) -> str:
    return f"portshard.{listen_name}.{slot}"


class Activated:
    """Sockets passed to the supervisor itself (systemd socket activation or fd store)."""

    def __init__(self) -> None:
        names = os.environ.get("LISTEN_FDNAMES", "")
        self.socks = activation.inherited()  # validates, removes LISTEN_* from our environment
        count = len(self.socks)
        split = names.split(":") if names else []
        self.names = split if len(split) == count else [f"fd{3 + i}" for i in range(count)]
        self.used: set[int] = set()
        for sock in self.socks:
            # A previous supervisor may have left a SYN filter or a steering program on it.
            cbpf.undrop_syns(sock)
            cbpf.detach(sock)

    def __bool__(self) -> bool:
        return bool(self.socks)

    def addresses(self) -> list[str]:
        """``NAME=ADDR`` for each passed socket that is not one of our fd-store entries."""
        out = []
        for name, sock in zip(self.names, self.socks, strict=True):
            if name.startswith("portshard."):
                continue
            out.append(f"{_plain(name)}={address_of(sock)}")
        return out

    def take(self, listen_name: str, address: Address, slot: int) -> socket.socket | None:
        """The passed socket for this listen address and slot, if there is one."""
        wanted = store_name(listen_name, slot)
        for i, (name, sock) in enumerate(zip(self.names, self.socks, strict=True)):
            if i in self.used:
                continue
            if name == wanted or (
                slot == 0
                and not name.startswith("portshard.")
                and (_plain(name) == listen_name or _same_address(sock, address))
            ):
                self.used.add(i)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.setblocking(True)
                log.info(
                    "slot %d: using the socket passed by systemd (%s) for %s",
                    slot,
                    name,
                    address_of(sock),
                )
                return sock
        return None

    def close_unused(self) -> None:
        for i, (name, sock) in enumerate(zip(self.names, self.socks, strict=True)):
            if i not in self.used:
                log.warning(
                    "closing the passed socket %s (%s): no slot or --listen matches it",
                    name,
                    address_of(sock),
                )
                sock.close()


def _plain(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)[:64] or "listen"


def address_of(sock: socket.socket) -> str:
    """The exact address of a passed socket, so the other slots' sockets join the same group
    (a group never mixes IPv4 and IPv6 sockets): a dual-stack [::] is our empty host."""
    proto = Proto.TCP if sock.type == socket.SOCK_STREAM else Proto.UDP
    host, port = sock.getsockname()[:2]
    if host == "::" and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
        host = ""
    return format_address(proto, host, port)


def _same_address(sock: socket.socket, address: Address) -> bool:
    proto = Proto.TCP if sock.type == socket.SOCK_STREAM else Proto.UDP
    host, port = sock.getsockname()[:2]
    if proto is not address.proto or (address.port and port != address.port):
        return False
    return (address.wildcard and host in ("::", "0.0.0.0")) or host == address.host


class Notifier:
    """sd_notify to the service manager that started us, if any (NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        self.path = os.environ.pop("NOTIFY_SOCKET", "")
        # systemd >= 254 tells a service its fd store size; older ones don't say.
        fdstore = os.environ.pop("FDSTORE", "")
        self.store_known = bool(self.path) and fdstore.isdigit() and int(fdstore) > 0

    def __bool__(self) -> bool:
        return bool(self.path)

    def send(self, *fields: str, fds: list[int] | None = None) -> None:
        if not self.path:
            return
        target = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        data = "\n".join(fields).encode()
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _pack_fds(fds))]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendmsg([data], ancillary, 0, target)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.path, exc.strerror)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def store(self, name: str, sock: socket.socket) -> None:
        self.send("FDSTORE=1", f"FDNAME={name}", fds=[sock.fileno()])

    def unstore(self, name: str) -> None:
        self.send("FDSTOREREMOVE=1", f"FDNAME={name}")


def _pack_fds(fds: list[int]) -> bytes:
    import array

    return array.array("i", fds).tobytes()

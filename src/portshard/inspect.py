"""Look at sockets and processes from the outside: who holds a port, how deep a queue is.

Everything here reads /proc or asks the kernel about a socket; nothing changes state.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from .address import Proto

__all__ = ["Holder", "port_holders", "pids_by_inode", "program_name"]

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"


@dataclass(frozen=True)
class Holder:
    """A socket bound to a port, and the process holding it if we can see it."""

    inode: int
    uid: int
    local: str
    pid: int | None
    program: str | None

    def describe(self) -> str:
        if self.pid is None:
            return f"a socket on {self.local} (inode {self.inode}) of a process this user cannot see"
        return f"pid {self.pid} ({self.program or '?'}) on {self.local}"


def _decode_addr(hexaddr: str) -> str:
    host_hex, port_hex = hexaddr.split(":")
    port = int(port_hex, 16)
    raw = bytes.fromhex(host_hex)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{port}"
    # /proc prints IPv6 as four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{port}"


def _proc_net_rows(proto: Proto) -> Iterator[list[str]]:
    for name in (proto.value, proto.value + "6"):
        try:
            with open(f"/proc/net/{name}") as f:
                next(f, None)
                for line in f:
                    yield line.split()
        except OSError:
            continue


def pids_by_inode(inodes: set[int]) -> dict[int, int]:
    """Map socket inodes to the first pid found holding each (scans /proc/*/fd)."""
    found: dict[int, int] = {}
    if not inodes:
        return found
    wanted = {f"socket:[{i}]": i for i in inodes}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                inode = wanted.get(target)
                if inode is not None and inode not in found:
                    found[inode] = int(entry.name)
        if len(found) == len(wanted):
            break
    return found


def program_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def port_holders(proto: Proto, port: int) -> list[Holder]:
    """Sockets bound to ``port`` (TCP: listening; UDP: unconnected), with their owner pids."""
    rows: list[tuple[int, int, str]] = []
    state = _TCP_LISTEN if proto is Proto.TCP else _UDP_UNCONNECTED
    for cols in _proc_net_rows(proto):
        if len(cols) < 10 or cols[3] != state:
            continue
        if int(cols[1].rsplit(":", 1)[1], 16) != port:
            continue
        rows.append((int(cols[9]), int(cols[7]), _decode_addr(cols[1])))
    pids = pids_by_inode({inode for inode, _, _ in rows})
    holders = []
    for inode, uid, local in rows:
        pid = pids.get(inode)
        holders.append(Holder(inode, uid, local, pid, program_name(pid) if pid else None))
    return holders

"""The sysctls portshard reads (and, for --migrate only, writes), under /proc/sys.

Paths are named once here. A sysctl is per network namespace where the kernel says so
(tcp_migrate_req, ip_unprivileged_port_start, somaxconn): reading /proc/sys answers for the
caller's namespace.
"""

from __future__ import annotations

import os

__all__ = [
    "MIGRATE_REQ",
    "SOMAXCONN",
    "UNPRIVILEGED_PORT_START",
    "migrate_req",
    "path",
    "read_int",
    "somaxconn",
    "unprivileged_port_start",
    "writable",
    "write_int",
]

MIGRATE_REQ = "net.ipv4.tcp_migrate_req"  # Linux 5.14
SOMAXCONN = "net.core.somaxconn"
UNPRIVILEGED_PORT_START = "net.ipv4.ip_unprivileged_port_start"  # Linux 4.11


def path(name: str) -> str:
    """/proc/sys/... for a dotted sysctl name."""
    return "/proc/sys/" + name.replace(".", "/")


def read_int(name: str) -> int | None:
    """The sysctl's value, None where it does not exist or cannot be read."""
    try:
        with open(path(name)) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def write_int(name: str, value: int) -> None:
    """Set the sysctl; raises OSError (FileNotFoundError: no such sysctl; EACCES/EPERM: needs
    root or CAP_NET_ADMIN; EROFS: /proc/sys is read-only, e.g. in a container)."""
    with open(path(name), "w") as f:
        f.write(str(value))


def writable(name: str) -> bool:
    return os.access(path(name), os.W_OK)


def migrate_req() -> int | None:
    """net.ipv4.tcp_migrate_req in this network namespace (None: no such sysctl)."""
    return read_int(MIGRATE_REQ)


def somaxconn() -> int | None:
    """The kernel's cap on a listen backlog, or None where it can't be read."""
    return read_int(SOMAXCONN)


def unprivileged_port_start() -> int | None:
    """The lowest port a user without CAP_NET_BIND_SERVICE may bind (None: no such sysctl)."""
    return read_int(UNPRIVILEGED_PORT_START)

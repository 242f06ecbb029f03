"""Network namespaces for the test bed: made with `ip netns`, always deleted, entered per thread.

Every link is created inside the namespaces (``ip -n A link add X type veth peer name Y netns
B``), so nothing ever appears in the host's namespace, and every sysctl the bed sets is one of
the namespace's own (``ip netns exec NS sysctl``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class NetnsError(Exception):
    """A namespace command failed (the message has the command and its error output)."""


def ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if res.returncode:
        raise NetnsError(f"{' '.join(cmd)}: {res.stderr.strip()}")


def run_in(ns: str, *cmd: str, input: str | None = None) -> str:
    """Run a command in namespace ``ns``; its stdout (raises NetnsError if it fails)."""
    full = ["ip", "netns", "exec", ns, *cmd]
    res = subprocess.run(full, capture_output=True, text=True, timeout=30, input=input)
    if res.returncode:
        raise NetnsError(f"{' '.join(full)}: {res.stderr.strip()}")
    return res.stdout


def exec_prefix(ns: str) -> list[str]:
    """Prefix for a long-running process started in ``ns``."""
    return ["ip", "netns", "exec", ns]


@contextlib.contextmanager
def namespaces(names: list[str]) -> Iterator[None]:
    """Create these namespaces (loopback up); delete every one that was made, whatever
    happens. A process still inside one keeps it alive: stop processes first."""
    made: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            made.append(name)
            ip("link", "set", "lo", "up", ns=name)
        yield
    finally:
        for name in reversed(made):
            with contextlib.suppress(NetnsError):
                ip("netns", "del", name)


def leftover(prefix: str) -> list[str]:
    """Namespaces whose name starts with ``prefix`` (a test checks none is left)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def remove_stale(root: str) -> list[str]:
    """Delete the namespaces named ``<root><pid>-...`` whose process is gone (a bed killed
    before it could clean up); the names deleted."""
    gone = []
    for name in leftover(root):
        pid = name[len(root) :].partition("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(NetnsError):
                ip("netns", "del", name)
                gone.append(name)
    return gone


def enter(ns: str) -> None:
    """Move the calling thread into namespace ``ns`` (setns(2) is per thread for the network
    namespace): sockets it creates from then on live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a short-lived thread inside ``ns``; its result (or its exception)."""
    import threading

    box: dict[str, object] = {}

    def target() -> None:
        try:
            enter(ns)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]

"""The worker side of the systemd protocols: inherited sockets (LISTEN_FDS) and sd_notify.

portshard's supervisor speaks the same protocol as systemd, so a worker written for one works
under the other.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping, MutableMapping

from .errors import ActivationError

__all__ = ["LISTEN_FDS_START", "inherited", "notify", "notify_ready"]

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_ENV_KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _env_int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        number = int(value, 10)
    except ValueError:
        raise ActivationError(
            f"{key}={value!r} is not a number; whoever started this process set it wrong "
            f"(systemd and portshard set it to a whole number)"
        ) from None
    return number


def inherited(
    name: str | None = None,
    *,
    unset_environment: bool = True,
    environ: MutableMapping[str, str] | None = None,
) -> list[socket.socket]:
    """Return the sockets this process inherited through LISTEN_FDS, in order.

    Returns [] when LISTEN_FDS is absent or LISTEN_PID names another process (the variables
    were meant for a parent). With ``name``, return only the sockets LISTEN_FDNAMES names so.
    The variables are removed from the environment by default, so children don't see them;
    the sockets are marked close-on-exec. Raises ActivationError if the variables are
    malformed or name an fd that is not an open socket.
    """
    env = os.environ if environ is None else environ
    if "LISTEN_FDS" not in env:
        return []
    pid_text = env.get("LISTEN_PID")
    if pid_text is not None and _env_int(env, "LISTEN_PID") != os.getpid():
        return []
    count = _env_int(env, "LISTEN_FDS")
    if count < 0 or count > 4096:
        raise ActivationError(f"LISTEN_FDS={count} is out of range (0-4096)")
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text else ["unknown"] * count
    if len(names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES={names_text!r} names {len(names)} sockets but LISTEN_FDS={count}; "
            f"they must match (one name per fd, separated by ':')"
        )
    socks: list[socket.socket] = []
    for offset, fd_name in enumerate(names):
        fd = LISTEN_FDS_START + offset
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            raise ActivationError(
                f"LISTEN_FDS={count} but fd {fd} is not open; the parent did not pass it "
                f"(check that it was not opened close-on-exec)"
            ) from None
        if not stat.S_ISSOCK(mode):
            raise ActivationError(f"LISTEN_FDS={count} but fd {fd} is not a socket")
        if name is None or fd_name == name:
            os.set_inheritable(fd, False)
            socks.append(socket.socket(fileno=fd))
    if unset_environment:
        for key in _ENV_KEYS:
            env.pop(key, None)
    return socks


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to NOTIFY_SOCKET. Return False if there is none."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path[0] not in "/@":
        raise ActivationError(
            f"NOTIFY_SOCKET={path!r} is neither a path nor an abstract name (@...); "
            f"whoever started this process set it wrong"
        )
    target = "\0" + path[1:] if path[0] == "@" else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), target)
        except OSError as exc:
            raise ActivationError(
                f"cannot notify {path!r}: {exc.strerror}; is the supervisor still running?"
            ) from None
    return True


def notify_ready(*, environ: Mapping[str, str] | None = None) -> bool:
    """Tell the supervisor (portshard or systemd) this process is ready; no-op without one."""
    return notify("READY=1", environ=environ)

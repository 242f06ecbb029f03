"""The worker side of the systemd protocols: inherited sockets (LISTEN_FDS) and sd_notify.

portshard's supervisor speaks the same protocol as systemd, so a worker written for one works
under the other.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import weakref
from collections.abc import Mapping, MutableMapping

from .errors import ActivationError

__all__ = ["LISTEN_FDS_START", "inherited", "notify", "notify_ready"]

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_ENV_KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_SUN_PATH_MAX = 108  # sockaddr_un.sun_path; Linux takes a path that fills it without a NUL
_MAX_FDS = 4096  # far above any real use; catches garbage before fstat()ing thousands of fds

# fd -> (socket inode, the socket object inherited() returned for it). A second call hands back
# the same object: two objects on one fd would each close it, the second closing whatever the
# process opened on that number in between. Weak: the caller owns the socket.
_TAKEN: dict[int, tuple[int, weakref.ref[socket.socket]]] = {}

log = logging.getLogger("portshard")
_GONE: set[str] = set()  # NOTIFY_SOCKET values already warned about: nobody listened
_FULL: set[str] = set()  # NOTIFY_SOCKET values whose queue stayed full for NOTIFY_WAIT
NOTIFY_WAIT = 5.0  # s a notification other than READY=1 waits for room in a full queue


def _env_int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    # Digits only: int() would also take " 3", "+3" or "3_0", which no supervisor writes.
    if not (value.isascii() and value.isdigit()):
        raise ActivationError(
            f"{key}={value!r} is not a whole number; whoever started this process set it wrong "
            f"(systemd and portshard write a number such as 2); unset LISTEN_FDS, LISTEN_PID "
            f"and LISTEN_FDNAMES to run without inherited sockets"
        )
    return int(value, 10)


def _kind(mode: int) -> str:
    kinds = [
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((what for test, what in kinds if test(mode)), "not a socket")


def _check_fds(count: int) -> list[int]:
    """Check that fds 3 .. 3+count-1 are open sockets, before touching any of them."""
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + count))
    for fd in fds:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = None
        if fd in _TAKEN and (mode is None or not stat.S_ISSOCK(mode)):
            raise ActivationError(
                f"fd {fd} of LISTEN_FDS was taken by an earlier inherited() call in this "
                f"process, and its socket has since been closed (by close(), a 'with' block, "
                f"or garbage collection when nothing kept a reference); keep the sockets the "
                f"first call returned instead of calling inherited() again"
            )
        if mode is None:
            raise ActivationError(
                f"LISTEN_FDS={count} but fd {fd} is not open; the parent did not pass it "
                f"(check that it was not opened close-on-exec, and that LISTEN_FDS counts "
                f"only the sockets it passed from fd {LISTEN_FDS_START})"
            ) from None
        if not stat.S_ISSOCK(mode):
            raise ActivationError(
                f"LISTEN_FDS={count} but fd {fd} is {_kind(mode)}, not a socket; the parent "
                f"must pass exactly LISTEN_FDS sockets at fds {LISTEN_FDS_START} to "
                f"{LISTEN_FDS_START + count - 1} (fix the parent, or unset LISTEN_FDS)"
            )
    return fds


def _wrap(fd: int) -> socket.socket:
    """The socket object for inherited ``fd``: the one an earlier call returned, if still open."""
    inode = os.fstat(fd).st_ino
    taken = _TAKEN.get(fd)
    if taken is not None and taken[0] == inode:
        sock = taken[1]()
        if sock is not None and sock.fileno() == fd:
            return sock
    sock = socket.socket(fileno=fd)
    _TAKEN[fd] = (inode, weakref.ref(sock))
    return sock


def inherited(
    name: str | None = None,
    *,
    unset_environment: bool = True,
    environ: MutableMapping[str, str] | None = None,
) -> list[socket.socket]:
    """Return the sockets this process inherited through LISTEN_FDS, in order.

    Returns [] when LISTEN_FDS is absent or LISTEN_PID names another process (the variables
    were meant for a parent). A missing LISTEN_PID is accepted, for launchers that cannot know
    the pid before exec. With ``name``, return only the sockets LISTEN_FDNAMES names so; the
    others stay open, unwrapped. Every passed fd is marked close-on-exec, as sd_listen_fds does,
    so a program this process runs does not hold them.

    The variables are removed from the environment by default, so children don't see them;
    to pick several names one call at a time, pass ``unset_environment=False``: a later call
    returns the same socket objects for the fds an earlier one returned. Raises ActivationError
    if the variables are malformed or name an fd that is not an open socket; then no fd is
    touched.
    """
    if name is not None and not isinstance(name, str):
        # inherited(5) returned [] as if nothing had been passed
        raise ActivationError(
            f"inherited() takes a LISTEN_FDNAMES name (a string, e.g. 'web'), not {name!r}"
        )
    env = os.environ if environ is None else environ
    if "LISTEN_FDS" not in env:
        return []
    if "LISTEN_PID" in env and _env_int(env, "LISTEN_PID") != os.getpid():
        return []
    count = _env_int(env, "LISTEN_FDS")
    if count > _MAX_FDS:
        raise ActivationError(
            f"LISTEN_FDS={count} is out of range (0-{_MAX_FDS}); whoever started this "
            f"process set it wrong"
        )
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text else ["unknown"] * count
    if len(names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES={names_text!r} names {len(names)} sockets but LISTEN_FDS={count}; "
            f"they must match (one name per fd, separated by ':')"
        )
    fds = _check_fds(count)
    for fd in fds:
        os.set_inheritable(fd, False)
    socks = [
        _wrap(fd) for fd, fd_name in zip(fds, names, strict=True) if name is None or fd_name == name
    ]
    if unset_environment:
        for key in _ENV_KEYS:
            env.pop(key, None)
    return socks


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to NOTIFY_SOCKET. Return False if there is none,
    or nobody listens there any more (one warning a process and address).

    Nobody listening is not an error the worker can act on: its supervisor is gone (a
    `portshard run --orphan-timeout 0` killed: no warden keeps the socket for the next one;
    systemd restarting). It raised, and a worker that outlived its supervisor (a pre-fork
    server's child, which the parent-death signal does not reach) died of it, as libsystemd's
    ``sd_notify`` callers, which ignore its error, do not. What the caller can fix still
    raises: an address that cannot be one, a stream socket, a permission."""
    if not isinstance(state, str):
        # notify(None) was an AttributeError under a supervisor and False without one
        raise ActivationError(
            f"notify() takes the state as a string, e.g. 'READY=1' or 'STATUS=warming up', "
            f"not {state!r}"
        )
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("vsock:"):
        raise ActivationError(
            f"NOTIFY_SOCKET={path!r} is a VSOCK address (systemd notifying from outside a VM), "
            f"which portshard does not speak; unset NOTIFY_SOCKET, or give it a path"
        )
    if path[0] not in "/@":
        raise ActivationError(
            f"NOTIFY_SOCKET={path!r} is neither a path nor an abstract name (@...); "
            f"whoever started this process set it wrong"
        )
    target = "\0" + path[1:] if path[0] == "@" else path
    size = len(os.fsencode(target))
    if size > _SUN_PATH_MAX:
        raise ActivationError(
            f"NOTIFY_SOCKET={path!r} is {size} bytes, longer than the {_SUN_PATH_MAX} an "
            f"AF_UNIX address holds; whoever started this process must use a shorter path"
        )
    # Connected, so that a full queue makes the send wait (the peer's queue counts only for a
    # connected datagram socket) and the wait can be bounded: nobody reads while a warden keeps
    # the socket for an adopter, and a `STATUS=` a second from a serving loop blocked it at the
    # 12th (`net.unix.max_dgram_qlen`, 10). READY=1 waits as long as it takes: the adopter reads
    # the queue and needs it. Anything else waits NOTIFY_WAIT once, then is dropped at once
    # while the queue stays full.
    ready = "READY=1" in state.splitlines()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(target)
            sock.settimeout(None if ready else 0.0 if path in _FULL else NOTIFY_WAIT)
            sock.send(state.encode())
        except (TimeoutError, BlockingIOError):
            _nobody_reads(path)
            return False
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                _nobody_listens(path, exc)
                return False
            raise ActivationError(f"cannot notify {path!r}: {_notify_why(exc)}") from None
    _FULL.discard(path)
    return True


def _nobody_reads(path: str) -> None:
    if path in _FULL:
        return
    _FULL.add(path)
    log.warning(
        "pid %d: NOTIFY_SOCKET=%r has been full for %g s: nobody reads it (its supervisor is "
        "gone and the next one has not come, or it is stopped); this process goes on, and its "
        "notifications other than READY=1 are dropped while the queue stays full (said once "
        "a spell)",
        os.getpid(),
        path,
        NOTIFY_WAIT,
    )


def _nobody_listens(path: str, exc: OSError) -> None:
    if path in _GONE:
        return
    _GONE.add(path)
    log.warning(
        "pid %d: nobody listens on NOTIFY_SOCKET=%r (%s): the supervisor that set it is gone "
        "(`portshard run --orphan-timeout 0` leaves no warden to keep it for the next one); "
        "this process goes on, and its notifications are dropped while nobody listens (said "
        "once)",
        os.getpid(),
        path,
        exc.strerror,
    )


def _notify_why(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{exc.strerror}: user {os.geteuid()} may not write to it or search a directory "
            f"on its path; the supervisor must make it reachable by the user the worker runs "
            f"as (portshard run --user does)"
        )
    if exc.errno == errno.EPROTOTYPE:
        return f"{exc.strerror}: it is not a datagram socket; NOTIFY_SOCKET must name one"
    if exc.errno == errno.EMSGSIZE:
        return f"{exc.strerror}: send a shorter state (it must fit in one datagram)"
    return f"{exc.strerror or exc}"


def notify_ready(*, environ: Mapping[str, str] | None = None) -> bool:
    """Tell the supervisor (portshard or systemd) this process is ready; no-op without one."""
    return notify("READY=1", environ=environ)

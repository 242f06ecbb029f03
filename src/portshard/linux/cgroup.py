"""A worker is its whole process tree: one cgroup2 group per worker, or the subreaper fallback.

Why a cgroup: a process group (setpgid) is left by ``setsid()``, and /proc/PID/task/*/children
loses a process whose parent exited; a setuid child cannot be signalled by an unprivileged
supervisor. A cgroup keeps every descendant whatever it does, and the kernel can kill it
(``cgroup.kill``, Linux 5.14: the whole tree, daemonized children included), freeze it
(``cgroup.freeze``, 5.2; ``cgroup.events`` says ``frozen 1`` once every task is), list it
(``cgroup.procs``) and say whether anything is left (``populated``). The child joins its
group between fork and exec (``Cgroup.join_self``), so nothing it starts can escape.

Where the groups live (:func:`detect`, in order):

1. ``delegated``: the host runs the unified hierarchy (cgroup2 at /sys/fs/cgroup, e.g.
   systemd) and our own cgroup is writable (root, or a unit with ``Delegate=yes``): groups
   go under our own cgroup. If controllers are enabled there, the kernel's "no internal
   processes" rule requires the supervisor itself to sit in a leaf, so it moves itself into
   ``supervisor/`` first.
2. ``mounted``: root on a host with cgroup v1 at /sys/fs/cgroup (this CI machine): a cgroup2
   hierarchy (no controllers needed) is mounted at ``/run/portshard/cgroup2``, once, shared by
   every supervisor on the host (flock on /run/portshard serialises mount and unmount; the
   last supervisor to leave unmounts it). Groups: ``portshard/NAME.PID/slotN-M`` under it.
3. ``subreaper``: neither is possible (not root, no delegation): the supervisor becomes a
   child subreaper (PR_SET_CHILD_SUBREAPER), so orphaned descendants are re-parented to it
   instead of init; the process tree and process group remain the tree. A descendant that
   calls ``setsid()`` escapes the group's signals then.

A supervisor that was SIGKILLed leaves its groups: the next supervisor of the same name
kills what is still running in them (old code holding the port) and removes them.

The home also has a ``listen`` group, never holding a process but for the moment the supervisor
creates a listening socket (:func:`made_in`): the kernel fixes a socket's cgroup when it is
created, from the creating task, and accepted connections inherit their listener's, so the
SOCK_OPS program attached there (steering/inflight.py) runs for our slots' connections only,
not for every TCP socket of the supervisor's cgroup (on a cgroup v1 host that is the root of
the hierarchy: the whole host, clients included). Empty, it goes with the home.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import fcntl
import functools
import logging
import os
import re
import signal
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from .syscalls import set_child_subreaper

__all__ = [
    "MOUNT_POINT",
    "Cgroup",
    "Detected",
    "Mechanism",
    "Trees",
    "detect",
    "made_in",
    "stale_members",
]

log = logging.getLogger("portshard.cgroup")

RUN_DIR = "/run/portshard"
MOUNT_POINT = RUN_DIR + "/cgroup2"
_UNIFIED = "/sys/fs/cgroup"
_TOP = "portshard"  # our directory under the mount (mounted mode)
_KILL_WAIT = 2.0  # seconds to wait for a killed group to empty
WARDEN = "warden"  # the warden's group in a home (issue 15)
LISTEN = "listen"  # the group our listening sockets are created in (made_in)


class Mechanism(enum.Enum):
    DELEGATED = "cgroup2 (delegated subtree)"
    MOUNTED = "cgroup2 (mounted by portshard)"
    SUBREAPER = "child subreaper"


@dataclass(frozen=True)
class Detected:
    mechanism: Mechanism
    base: str | None  # the directory groups are created under (cgroup2 only)
    why: str


class Cgroup:
    """One cgroup2 directory."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"Cgroup({self.path!r})"

    def _write(self, name: str, value: str) -> None:
        fd = os.open(os.path.join(self.path, name), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def join_self(self) -> None:
        """Move the calling process into this group (between fork and exec)."""
        self._write("cgroup.procs", "0")

    def join(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))

    def members(self) -> list[int]:
        """Pids in this group and its sub-groups (empty once removed)."""
        pids: list[int] = []
        for directory, _dirs, _files in os.walk(self.path):
            with contextlib.suppress(OSError), open(os.path.join(directory, "cgroup.procs")) as f:
                pids.extend(int(line) for line in f.read().split())
        return pids

    def events(self) -> dict[str, int]:
        try:
            text = self._read("cgroup.events")
        except OSError:
            return {}
        return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line)}

    def populated(self) -> bool:
        """Any process left in the group (or its sub-groups)."""
        return self.events().get("populated", 0) == 1

    def frozen(self) -> bool:
        return self.events().get("frozen", 0) == 1

    def freeze(self, on: bool = True) -> None:
        """Freeze (or thaw) every process of the group; :meth:`frozen` says when done."""
        self._write("cgroup.freeze", "1" if on else "0")

    def thaw(self) -> None:
        self.freeze(False)

    def kill(self) -> None:
        """SIGKILL every process of the group, at once, forks in flight included."""
        try:
            self._write("cgroup.kill", "1")
            return
        except FileNotFoundError:  # before Linux 5.14: freeze, kill each member, thaw
            pass
        with contextlib.suppress(OSError):
            self.freeze()
        for _ in range(100):
            pids = self.members()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.thaw()

    def remove(self, wait: float = 0.0) -> bool:
        """Remove the (empty) group and its sub-groups; True once gone. With ``wait``, kill
        what is left first and wait up to that long for it to exit."""
        if not os.path.isdir(self.path):
            return True
        if wait:
            if self.populated():
                self.kill()
            deadline = time.monotonic() + wait
            while self.populated() and time.monotonic() < deadline:
                time.sleep(0.005)
        for directory, _dirs, _files in sorted(os.walk(self.path), key=lambda t: -len(t[0])):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                continue
            except OSError:
                return False
        return True


# --- detection ------------------------------------------------------------------------------


def _is_cgroup2(path: str) -> bool:
    """Whether a cgroup2 hierarchy is mounted exactly at ``path`` (from mountinfo)."""
    real = os.path.realpath(path)
    found = False
    for point, fstype in _mountinfo():
        if point == real:
            found = fstype == "cgroup2"  # the last mount on a point is the visible one
    return found


def _mountinfo() -> Iterator[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        left, _, right = line.partition(" - ")
        parts = left.split()
        if len(parts) > 4 and right:
            yield _unescape(parts[4]), right.split()[0]


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def own_cgroup2_path() -> str | None:
    """Our cgroup in the unified hierarchy ("0::/path" in /proc/self/cgroup)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def _cgroup2_available() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "cgroup2" for line in f if line.strip())
    except OSError:
        return False


def detect() -> Detected:
    """Which mechanism this supervisor can use, and why (see the module doc).
    ``PORTSHARD_CGROUP=off`` in the environment asks for the subreaper fallback."""
    if os.environ.get("PORTSHARD_CGROUP", "").lower() in ("off", "0", "no"):
        return Detected(Mechanism.SUBREAPER, None, "PORTSHARD_CGROUP=off")
    if _is_cgroup2(_UNIFIED):
        own = own_cgroup2_path()
        base = os.path.join(_UNIFIED, (own or "/").lstrip("/"))
        if own is not None and os.access(base, os.W_OK):
            return Detected(
                Mechanism.DELEGATED, base, f"unified hierarchy; our cgroup {own} is writable"
            )
        why = f"unified hierarchy, but our cgroup {own} is not writable (no Delegate=yes)"
    elif not _cgroup2_available():
        why = "this kernel has no cgroup2"
    elif os.geteuid() != 0:
        why = f"cgroup v1 at {_UNIFIED}; mounting a cgroup2 hierarchy needs root"
    else:
        return Detected(
            Mechanism.MOUNTED,
            os.path.join(MOUNT_POINT, _TOP),
            f"cgroup v1 at {_UNIFIED}; a cgroup2 hierarchy is mounted at {MOUNT_POINT}",
        )
    return Detected(Mechanism.SUBREAPER, None, why)


# --- mounting (root, cgroup v1 hosts) -------------------------------------------------------


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount_cgroup2(target: str) -> None:
    ret = _libc().mount(b"cgroup2", target.encode(), b"cgroup2", ctypes.c_ulong(0), None)
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount -t cgroup2 {target}: {os.strerror(code)}")


def _umount(target: str) -> None:
    if _libc().umount2(target.encode(), 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"umount {target}: {os.strerror(code)}")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    fd = os.open(RUN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # flock the directory
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _subgroups(path: str) -> list[str]:
    """Child groups of a cgroup directory (its other entries are the kernel's files)."""
    with os.scandir(path) as entries:
        return [e.name for e in entries if e.is_dir(follow_symlinks=False)]


def _ensure_mounted() -> None:
    """Under the lock: the shared cgroup2 mount exists (mounting it if not)."""
    if _is_cgroup2(MOUNT_POINT):
        return
    os.makedirs(MOUNT_POINT, mode=0o755, exist_ok=True)
    _mount_cgroup2(MOUNT_POINT)
    log.info("mounted a cgroup2 hierarchy at %s (a cgroup per worker)", MOUNT_POINT)


def _unmount_if_unused() -> None:
    """Under the lock: unmount the shared hierarchy if no supervisor uses it any more."""
    top = os.path.join(MOUNT_POINT, _TOP)
    with contextlib.suppress(FileNotFoundError):
        if not _subgroups(top):
            os.rmdir(top)
    if os.path.exists(top) or not _is_cgroup2(MOUNT_POINT):
        return  # another supervisor's groups are there, or it is not ours to unmount
    try:
        _umount(MOUNT_POINT)
        os.rmdir(MOUNT_POINT)
    except OSError as exc:
        log.warning("cannot unmount %s: %s", MOUNT_POINT, exc.strerror or exc)


# --- a supervisor's groups ------------------------------------------------------------------


class Trees:
    """The groups of one supervisor: ``BASE/NAME.PID/`` with one ``slotN-M`` per worker.

    With the subreaper mechanism there are no groups: :meth:`create` returns None and the
    caller keeps using the process group and tree.
    """

    def __init__(self, detected: Detected, home: str | None) -> None:
        self.detected = detected
        self.home = home
        self._serial = 0
        self._pending: list[Cgroup] = []  # released while still emptying
        self._no_listen = False  # the listen group could not be created

    @property
    def mechanism(self) -> Mechanism:
        return self.detected.mechanism

    @classmethod
    def open(cls, name: str, detected: Detected | None = None) -> Trees:
        """Set up this supervisor's home, falling back to the subreaper with the reason."""
        found = detected or detect()
        if found.mechanism is not Mechanism.SUBREAPER:
            try:
                return cls._open_cgroups(name, found)
            except OSError as exc:
                why = f"{found.why}, but {exc.strerror or exc}"
                found = Detected(Mechanism.SUBREAPER, None, why)
        with contextlib.suppress(OSError):
            set_child_subreaper()
        return cls(found, None)

    @classmethod
    def _open_cgroups(cls, name: str, found: Detected) -> Trees:
        assert found.base is not None
        safe = _safe(name)
        if found.mechanism is Mechanism.MOUNTED:
            with _locked():
                _ensure_mounted()
                os.makedirs(found.base, exist_ok=True)
                _sweep_stale(found.base, safe)
                home = os.path.join(found.base, f"{safe}.{os.getpid()}")
                os.mkdir(home)
        else:
            home = _delegated_home(found.base, safe)
        return cls(found, home)

    @classmethod
    def adopt(cls, name: str, home: str | None) -> Trees:
        """The groups of a supervisor that is gone (issue 15): its home becomes ours as it is
        (cgroup v2 cannot rename a group); its warden's group keeps sweeps away from it."""
        if home is None or not os.path.isdir(home):
            return cls.open(name)
        trees = cls(detect(), home)
        serials = [g.rpartition("-")[2] for g in _subgroups(home)]
        trees._serial = max((int(n) for n in serials if n.isdigit()), default=0)
        return trees

    def listen_group(self) -> Cgroup | None:
        """The group our listening sockets are created in (:func:`made_in`; None under the
        subreaper mechanism, or if it cannot be created: logged once)."""
        if self.home is None or self._no_listen:
            return None
        group = self._made(LISTEN)
        self._no_listen = group is None
        return group

    def warden_group(self) -> Cgroup | None:
        """The group the warden (supervisor/warden.py) lives in: while a process is in it, no
        supervisor of the same name sweeps this home, even after our pid is gone."""
        return None if self.home is None else self._made(WARDEN)

    def _made(self, name: str) -> Cgroup | None:
        """The home's group ``name``, created if need be (None, logged, if it cannot be)."""
        assert self.home is not None
        group = Cgroup(os.path.join(self.home, name))
        try:
            os.makedirs(group.path, exist_ok=True)
        except OSError as exc:
            log.warning("cannot create the cgroup %s: %s", group.path, exc.strerror or exc)
            return None
        return group

    def create(self, label: str) -> Cgroup | None:
        """A new, empty group for one worker (None under the subreaper mechanism, or if it
        cannot be created: logged, never raised)."""
        if self.home is None:
            return None
        self._retry_pending()
        self._serial += 1
        group = Cgroup(os.path.join(self.home, f"{label}-{self._serial}"))
        try:
            os.mkdir(group.path)
        except OSError as exc:  # the worker still runs, as its process group and tree
            log.warning("cannot create the cgroup %s: %s", group.path, exc.strerror or exc)
            return None
        return group

    def release(self, group: Cgroup | None) -> None:
        """The worker has exited: kill what is left of its tree, remove the group (later, if
        it still empties)."""
        if group is None:
            return
        try:
            if group.populated():
                group.kill()
            removed = group.remove()
        except OSError as exc:
            log.warning("cannot empty the cgroup %s: %s", group.path, exc.strerror or exc)
            removed = False
        if not removed:
            self._pending.append(group)

    def _retry_pending(self) -> None:
        self._pending = [g for g in self._pending if not g.remove()]

    def reap_orphans(self, workers: Collection[int]) -> list[int]:
        """Subreaper: reap our children that are not ``workers`` and have exited (orphaned
        descendants of a worker are re-parented to us); their pids."""
        if self.mechanism is not Mechanism.SUBREAPER:
            return []
        reaped = []
        for pid in _our_children():
            if pid in workers:
                continue
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped.append(pid)
        return reaped

    def close(self) -> None:
        """Kill whatever is left in our groups and remove them; unmount if we were the last.
        Subreaper: kill and reap every child left (orphans of workers that have gone)."""
        if self.mechanism is Mechanism.SUBREAPER:
            _kill_children()
        if self.home is None:
            return
        home = Cgroup(self.home)
        ours = _our_group()
        if ours is not None and (ours.path + "/").startswith(self.home + "/"):
            # made_in could not bring us back: removing the home would kill us too
            log.warning("cannot remove %s: this process is still in %s", self.home, ours.path)
            return
        if not home.remove(wait=_KILL_WAIT):
            log.warning("cannot remove %s: processes are still in it", self.home)
        self._pending = []
        if self.mechanism is Mechanism.MOUNTED:
            with _locked():
                _unmount_if_unused()
        self.home = None


def remove_home(home: str, wait: float = _KILL_WAIT) -> bool:
    """The warden, once nobody adopted the workers: kill what is left in the home, move
    ourselves out of it (to the hierarchy's root, or the home's parent), remove it, and
    unmount the shared hierarchy if it was the last."""
    for entry in _subgroups(home):
        if entry != WARDEN:
            Cgroup(os.path.join(home, entry)).remove(wait=wait)
    for out in (MOUNT_POINT, os.path.dirname(home)):
        if home.startswith(out + "/"):
            with contextlib.suppress(OSError):
                Cgroup(out).join(os.getpid())
                break
    removed = Cgroup(home).remove(wait=wait)
    if home.startswith(MOUNT_POINT + "/"):
        with _locked():
            _unmount_if_unused()
    return removed


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "portshard"


def _stale_groups(base: str, safe: str) -> Iterator[tuple[str, str, Cgroup]]:
    """Groups of a supervisor of the same name that is gone and has no warden: (directory
    name, the dead pid, the group)."""
    with contextlib.suppress(OSError):
        for entry in _subgroups(base):
            stem, _, pid_text = entry.rpartition(".")
            if stem != safe or not pid_text.isdigit() or _alive(int(pid_text)):
                continue
            stale = Cgroup(os.path.join(base, entry))
            if Cgroup(os.path.join(stale.path, WARDEN)).members():
                continue  # a warden keeps its workers for the next supervisor to adopt
            yield entry, pid_text, stale


def stale_members(name: str) -> set[int]:
    """The processes a start of supervisor ``name`` kills as left by one of that name that
    died with its warden (the sweep in :meth:`Trees.open`): the preflight check must not
    refuse the port they hold, or the start that would sweep them never comes."""
    found = detect()
    if found.mechanism is not Mechanism.MOUNTED or found.base is None:
        return set()
    return {
        pid for _, _, group in _stale_groups(found.base, _safe(name)) for pid in group.members()
    }


def _sweep_stale(base: str, safe: str) -> None:
    """Groups of a supervisor of the same name that is gone: kill what they hold, remove."""
    with contextlib.suppress(OSError):
        for entry, pid_text, stale in _stale_groups(base, safe):
            left = stale.members()
            if left:
                log.warning(
                    "killing %d process(es) left by supervisor pid %s (%s): %s",
                    len(left),
                    pid_text,
                    entry,
                    " ".join(map(str, left[:10])),
                )
            stale.remove(wait=_KILL_WAIT)


def _our_children() -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    return pids


def _kill_children() -> None:
    """SIGKILL and reap every child of ours (at stop, after the workers have gone)."""
    deadline = time.monotonic() + _KILL_WAIT
    while (children := _our_children()) and time.monotonic() < deadline:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    if children:
        log.warning("processes still left after the stop: %s", " ".join(map(str, children)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delegated_home(base: str, safe: str) -> str:
    """Our groups under our own (delegated) cgroup; we move into a leaf if controllers are
    enabled there (no internal processes)."""
    with open(os.path.join(base, "cgroup.subtree_control")) as f:
        controllers = f.read().split()
    if controllers:
        leaf = os.path.join(base, "supervisor")
        os.makedirs(leaf, exist_ok=True)
        Cgroup(leaf).join(os.getpid())
    home = os.path.join(base, f"portshard.{safe}.{os.getpid()}")
    os.mkdir(home)
    return home


def _our_group() -> Cgroup | None:
    """The group this process is in, as a directory of a mounted cgroup2 hierarchy."""
    own = own_cgroup2_path()
    if own is None:
        return None
    for root in (MOUNT_POINT, _UNIFIED):
        path = os.path.join(root, own.lstrip("/"))
        if _is_cgroup2(root) and os.path.isdir(path):
            return Cgroup(path)
    return None


@contextlib.contextmanager
def made_in(group: Cgroup | None) -> Iterator[None]:
    """Run the body with this process in ``group``, then put it back where it was: a socket
    created in the body belongs to ``group`` for its whole life (and so do the connections it
    accepts). Two writes to cgroup.procs, ~40 µs on this machine (a fork of a helper to
    create the socket there: ~4 ms). The supervisor is single-threaded and starts nothing in
    the body, so nothing else lands in the group. If this process cannot move (or come back),
    the body runs where it is and the failure is logged: the SOCK_OPS program then covers the
    socket's own cgroup (inflight.py checks every listener's)."""
    back = _our_group() if group is not None else None
    if group is None or back is None or back.path == group.path:
        yield
        return
    try:
        group.join_self()
    except OSError as exc:
        log.warning("cannot enter the cgroup %s: %s", group.path, exc.strerror or exc)
        yield
        return
    try:
        yield
    finally:
        try:
            back.join_self()
        except OSError as exc:  # Trees.close() will not remove a home we are in
            log.warning("cannot return to the cgroup %s: %s", back.path, exc.strerror or exc)


def tree_members(group: Cgroup | None, pid: int) -> list[int] | None:
    """The worker's processes if a group holds them (None: walk the tree from ``pid``)."""
    if group is None:
        return None
    members = group.members()
    return members if members else None

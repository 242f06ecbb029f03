"""A supervisor hands itself over (issue 15): to its own upgrade, or to the next one after a crash.

What survives is one thing, the *manifest* (plain JSON) plus fds named by keys (``sock:S:I``:
slot S's socket for --listen address I; ``out:PID:STREAM``: a worker's stdout/stderr read
end). Two ways carry it:

- ``portshard upgrade``: the supervisor writes the manifest into a memfd, makes the fds it
  names inheritable and execs the portshard on disk (same pid: the workers stay its children,
  systemd's main pid and a terminal's job do not change). The new image finds the memfd in
  ``$PORTSHARD_RESUME`` and resumes.
- a crash: the warden (``warden.py``) holds copies of the fds and the latest manifest; the
  next ``portshard run`` with the same control socket adopts them (``adopt``), opens pidfds
  of the workers (not its children), and tells the warden it is done.

Either way, :func:`restore` rebuilds the slots and workers, and the loop resumes: steering
is set up again over the same sockets (a UDP group's bucket table is in the manifest, so no
flow moves), readiness goes on by observation, and nothing is spawned that still runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..address import Address, parse
from ..control.paths import warden_address
from ..errors import ConfigError, SupervisorError
from ..linux import tcpinfo
from ..linux.cgroup import Cgroup
from ..linux.proc import env_values, running_with_args, stat
from ..linux.syscalls import pidfd_open
from ..sockets import listen
from ..steering import cbpf
from . import warden as wire
from .drain import DrainRequest
from .state import SLOT_TABLE, Lifecycle, Machine, SlotState, State
from .worker import TREE_ENV, Slot, Worker

if TYPE_CHECKING:
    from .config import Config
    from .loop import Supervisor

__all__ = ["RESUME_ENV", "Resume", "adopt", "export", "from_env", "restore", "running_settings"]

log = logging.getLogger("portshard.supervisor")

RESUME_ENV = "PORTSHARD_RESUME"  # the upgrade's memfd: "FD"
# The fds a successor takes that an older portshard did not: an adopter says so in "adopt",
# the upgrade's check (`run --check`) in a line of its output. Without it, the notify socket
# is not handed over (an older one binds its address itself, and found it held: EADDRINUSE).
TAKES = ("notify",)
TAKES_LINE = "resume takes: "
VERSION = 1
ADOPT_WAIT = 10.0  # s to wait for a warden's answer


@dataclass
class Resume:
    """What a new supervisor starts from instead of nothing."""

    how: str  # "upgrade" or "adoption"
    manifest: dict[str, Any]
    fds: dict[str, int]  # key -> fd in this process
    warden: socket.socket | None = None  # adoption: the old warden, told "adopted" at the end
    channel: int | None = None  # upgrade: our warden's channel, inherited
    warden_pid: int = 0  # ... and its pid
    used: set[str] = field(default_factory=set)

    def take(self, key: str) -> int | None:
        fd = self.fds.get(key)
        if fd is not None:
            self.used.add(key)
        return fd

    def close_unused(self) -> None:
        for key, fd in self.fds.items():
            if key not in self.used:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def done(self) -> None:
        """Restored: the old warden may go (adoption)."""
        self.close_unused()
        if self.warden is not None:
            with contextlib.suppress(OSError):
                wire.send(self.warden, {"op": "adopted"})
            self.warden.close()
            self.warden = None


# ---- the manifest ----------------------------------------------------------------------------


def _start_ticks(pid: int) -> int:
    st = stat(pid)
    return st.start if st is not None else 0


def slot_keys(slot: Slot) -> list[str]:
    """The keys of ``slot``'s sockets in the manifest, one per --listen address."""
    return [f"sock:{slot.index}:{i}" for i in range(len(slot.socks))]


def export(sup: Supervisor) -> tuple[dict[str, Any], dict[str, int]]:
    """The manifest of ``sup`` now, and the fds it names."""
    fleet, fx, cfg = sup.fleet, sup.fx, sup.cfg
    now = time.monotonic()
    fds: dict[str, int] = {}
    out = fx.output.keys() if fx.output is not None else {}
    home = fx.trees.home if fx.trees is not None else None
    slots = []
    for slot in fleet.slots:
        keys = slot_keys(slot)
        fds.update({key: sock.fileno() for key, sock in zip(keys, slot.socks, strict=True)})
        workers = []
        for w in slot.live():
            streams = [k for k in (f"out:{w.pid}:stdout", f"out:{w.pid}:stderr") if k in out]
            fds.update({k: out[k] for k in streams})
            workers.append(
                {
                    "pid": w.pid,
                    "start": _start_ticks(w.pid),
                    "generation": w.generation,
                    "role": w.role,
                    "state": w.state.value,
                    "age": round(now - w.started, 3),
                    "ready_age": None if w.life.ready_at is None else now - w.life.ready_at,
                    "mode": w.mode,
                    "cgroup": os.path.basename(w.cgroup.path) if w.cgroup and home else None,
                    "token": w.token,
                    "adopted": w.adopted,
                }
            )
        slots.append(
            {
                "index": slot.index,
                "generation": slot.generation,
                "restarts": slot.restarts,
                "state": slot.state.value,
                "socks": keys,
                "workers": workers,
            }
        )
    if fx.steering is not None:  # by listen key: an upgrade may change --listen
        keys = listen_keys(cfg)
        for gi, fd in fx.steering.handoff_fds().items():
            fds[f"bpf:socks:{keys[gi]}"] = fd
    # The workers' NOTIFY_SOCKET itself, not only its address: a READY=1 sent while no
    # supervisor listened (after a SIGKILL, during an upgrade's exec) waits in it for the
    # next one. Before, it was lost; the adopter waited --ready-timeout for a worker that
    # had said it was ready, then killed it, serving (a reload's gunicorn replacement:
    # adopters took 30 s to be ready in a fault campaign).
    fds["notify"] = sup.notify_socket.fileno()
    endpoints = {}  # --metrics and --health: the same port after the handover (port 0 too)
    for name, server, value in (
        ("metrics", sup.web, cfg.metrics),
        ("health", sup.health, cfg.health),
    ):
        if server is not None and value:
            fds[f"endpoint:{name}"] = server.sock.fileno()
            endpoints[name] = value
    manifest = {
        "version": VERSION,
        "endpoints": endpoints,
        "name": cfg.name,
        "pid": os.getpid(),
        "lineage": sup.succession.lineage.to_json(),
        "generation": fleet.generation,
        "reloads": dict(fleet.reloads),
        "listen": listen_keys(cfg),
        "bound": [str(a) for a in fx.bound],
        "via": cfg.via,
        "trees": {"home": home},
        "notify": fx.notify_name[1:],
        "stop": {
            "signal": int(cfg.stop_signal),
            "grace": cfg.grace,
            "orphan_timeout": cfg.orphan_timeout,
        },
        "steering": fx.steering.export() if fx.steering is not None else None,
        "slots": slots,
        "file": dict(cfg.file_data) if cfg.file_data is not None else None,
        "drain": fleet.draining.export(now) if fleet.draining is not None else None,
    }
    return manifest, fds


def unfinished_drain(resume: Resume) -> DrainRequest | None:
    """The drain the supervisor that died had under way (what was left of its settle time
    and deadline), for its adopter to carry on: before, the adopter served as if none had
    been asked, its health said serving again, and the balancers sent the leaving host new
    connections until whatever stops it (a preStop, ExecStop) killed it."""
    left = resume.manifest.get("drain")
    if resume.how != "adoption" or not isinstance(left, dict):
        return None
    settle, deadline = left.get("settle"), left.get("deadline")
    if not isinstance(settle, (int, float)) or not isinstance(deadline, (int, float, type(None))):
        return None
    return DrainRequest(max(0.0, float(settle)), deadline)


def running_settings(cli: Mapping[str, Any], resume: Resume | None) -> Config:
    """The settings of a supervisor starting: its command line over its --config file. The
    new image of an upgrade whose file has turned invalid since the upgrade's check (an edit
    between the check and the exec: the chaos soak found it, and the new image exited and left
    the workers to the warden) keeps the file's values the old image ran with, and says so;
    the next reload reads the file again."""
    from .config import load

    try:
        return load(cli)
    except ConfigError as exc:
        kept = (
            resume.manifest.get("file") if resume is not None and resume.how == "upgrade" else None
        )
        if not isinstance(kept, dict):
            raise
        log.warning(
            "upgrade: %s; keeping the settings the old supervisor ran with (fix the file, "
            "then reload)",
            exc,
        )
        return load(cli, file_data=kept)


def steering_seed(resume: Resume, cfg: Config) -> list[dict[str, Any]]:
    """The predecessor's steering tables for the current --listen, group by group ({} for a
    new address: it starts afresh)."""
    old, saved = resume.manifest["listen"], resume.manifest.get("steering") or []
    return [
        saved[old.index(key)] if key is not None and old.index(key) < len(saved) else {}
        for key in kept_keys(resume, cfg)
    ]


def inherited_maps(resume: Resume, cfg: Config) -> dict[int, int]:
    """The predecessor's eBPF sockarray fds by group: the sockets are in them already, and a
    socket can be in one sockarray only."""
    maps = {}
    for gi, key in enumerate(kept_keys(resume, cfg)):
        fd = resume.fds.get(f"bpf:socks:{key}") if key is not None else None
        if fd is not None:
            maps[gi] = fd
    return maps


def endpoint(resume: Resume | None, name: str, value: str) -> socket.socket | None:
    """The predecessor's --metrics or --health listener, if it was given the same value."""
    if resume is None or resume.manifest.get("endpoints", {}).get(name) != value:
        return None
    fd = resume.take(f"endpoint:{name}")
    return socket.socket(fileno=fd) if fd is not None else None


def listen_keys(cfg: Config) -> list[str]:
    """What names a --listen address across a handover: its name and its address as given
    (port 0 included): the same key keeps its sockets, a new one gets new ones."""
    return [f"{spec.name}={spec.address}" for spec in cfg.listen]


def kept_keys(resume: Resume, cfg: Config) -> list[str | None]:
    """For each current --listen address, the predecessor's key whose sockets it keeps, or
    None for a new address. The same key, or the same name given the address the predecessor
    had bound: `tcp://127.0.0.1:0` run again as `tcp://127.0.0.1:43039` (the port its log and
    status show) is the same socket. Before, that was a new address: new sockets beside the
    adopted ones, a reload of every worker, and the old sockets closed with connections in
    their queues (1 reset in each of 3 runs, steering off)."""
    old: list[str] = resume.manifest["listen"]
    bound: list[str] = resume.manifest.get("bound", [])
    kept: list[str | None] = []
    for key, spec in zip(listen_keys(cfg), cfg.listen, strict=True):
        if key in old:
            kept.append(key)
            continue
        same = [
            k
            for k, b in zip(old, bound, strict=False)
            if k.partition("=")[0] == spec.name and b == str(spec.address)
        ]
        kept.append(same[0] if same else None)
    return kept


# ---- the two ways in ---------------------------------------------------------------------------


def write_memfd(manifest: dict[str, Any]) -> int:
    """The manifest in an inheritable memfd (for the upgrade's exec)."""
    fd = os.memfd_create("portshard-resume", 0)  # no MFD_CLOEXEC: the new image reads it
    os.write(fd, json.dumps(manifest).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def from_env() -> Resume | None:
    """The upgrade's resume data, if this process is the new image of an upgrade."""
    value = os.environ.pop(RESUME_ENV, None)
    if not value:
        return None
    try:
        fd = int(value)
        if fd < 3:
            raise ValueError("not the upgrade's memfd (fds 0-2 are stdin, stdout, stderr)")
        with os.fdopen(fd, "rb") as f:
            data = json.load(f)
        manifest = data["manifest"]
        fds = {key: int(n) for key, n in data["fds"].items()}
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise SupervisorError(
            f"${RESUME_ENV}={value!r}: cannot read the manifest ({exc!r}); only `portshard "
            f"upgrade` sets it, for the new image it execs: unset it"
        ) from None
    for n in fds.values():
        os.set_inheritable(n, False)
    channel = data.get("channel")
    if channel is not None:
        os.set_inheritable(channel, False)
    return Resume("upgrade", manifest, fds, channel=channel, warden_pid=data.get("warden_pid") or 0)


def takes(check_output: str) -> set[str]:
    """What the portshard that printed ``check_output`` (``run --check``) takes."""
    for line in check_output.splitlines():
        if line.startswith(TAKES_LINE):
            return set(line[len(TAKES_LINE) :].split())
    return set()


def adopt(control_path: str) -> Resume | None:
    """Ask a warden for the workers of a supervisor with this control socket that is gone;
    None if there is no warden. Raises SupervisorError if it refuses (its supervisor runs)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + ADOPT_WAIT
    while True:
        try:
            sock.connect(warden_address(control_path))
            break
        except (ConnectionRefusedError, FileNotFoundError):
            # A warden that has not bound its address yet (a supervisor killed within a
            # moment of starting it, before its interpreter was up: 0.2 s idle, seconds
            # under load) is waited for. Before, the next start found nobody, booted anew
            # beside the workers it should have adopted (which the late warden then kept
            # until --orphan-timeout), and served with new ones.
            if time.monotonic() >= deadline or not _warden_starting(control_path):
                sock.close()
                return None
            time.sleep(0.05)
    sock.settimeout(ADOPT_WAIT)
    fds: dict[str, int] = {}
    manifest: dict[str, Any] | None = None
    try:
        # "takes": what an older warden does not expect us to (a newer one lets go of the
        # notify socket for an adopter that does not say it takes it: warden.py)
        wire.send(sock, {"op": "adopt", "takes": list(TAKES)})
        while True:
            msg, got = wire.recv(sock)
            if msg is None:
                raise SupervisorError("the warden of the previous supervisor hung up")
            if msg["op"] == "refused":
                raise SupervisorError(
                    f"a supervisor is already running on {control_path!r} ({msg['why']}); "
                    f"stop it, or give this one another --name or --control"
                )
            if msg["op"] == "manifest":
                manifest = msg["manifest"]
            elif msg["op"] == "put":
                fds.update(zip(msg["keys"], got, strict=True))
            elif msg["op"] == "end":
                break
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        sock.close()
        raise
    if manifest is None or manifest.get("version") != VERSION:
        for fd in fds.values():
            os.close(fd)
        sock.close()
        raise SupervisorError(
            "the warden of the previous supervisor holds a state this portshard cannot read; "
            "it stops its workers after --orphan-timeout"
        )
    return Resume("adoption", manifest, fds, warden=sock)


def _warden_starting(control_path: str) -> bool:
    """A warden process of this control socket runs (supervisor/wardenlink.py starts it as
    ``python -m portshard.supervisor.warden CONTROL ...``)."""
    return running_with_args("portshard.supervisor.warden", control_path)


# ---- restoring -------------------------------------------------------------------------------


def restored_sockets(resume: Resume, sup: Supervisor) -> Iterator[tuple[int, list[socket.socket]]]:
    """Each slot's sockets for the current --listen: the same one where the address is the
    same (its queue with it), a new one where the address is new (an upgrade may change
    --listen: then the workers get the new set by a reload, which ``Supervisor`` starts)."""
    old = resume.manifest["listen"]
    cfg, fx = sup.cfg, sup.fx
    if not fx.owns_sockets:  # --via reuseport: each worker binds its own; the slots hold none
        for slot in resume.manifest["slots"]:
            yield slot["index"], []
        fx.bound = [spec.address for spec in cfg.listen]
        return
    keys = kept_keys(resume, cfg)
    bound: list[Address | None] = [
        parse(resume.manifest["bound"][old.index(key)]) if key is not None else None for key in keys
    ]
    for slot in resume.manifest["slots"]:
        socks = []
        for i, spec in enumerate(cfg.listen):
            key = keys[i]
            if key is not None and old.index(key) >= len(slot["socks"]):
                key = None  # a predecessor under --via reuseport held no socket: a new one
            if key is not None:
                fd = resume.take(slot["socks"][old.index(key)])
                if fd is None:
                    raise SupervisorError(f"the manifest names no socket for slot {slot['index']}")
                sock = socket.socket(fileno=fd)
                if sock.type == socket.SOCK_STREAM:
                    # A predecessor that died holding new connections off this slot (a hold,
                    # its stop) left its SYN-drop filter: nothing of ours holds it now.
                    cbpf.undrop_syns(sock)
                socks.append(sock)
                continue
            addr = bound[i] or spec.address
            sock = listen(addr, backlog=cfg.backlog)
            if bound[i] is None:
                bound[i] = Address(addr.proto, addr.host, sock.getsockname()[1])
            socks.append(sock)
        yield slot["index"], socks
    fx.bound = [a for a in bound if a is not None]


def restore(resume: Resume, sup: Supervisor) -> list[Slot]:
    """The slots and their live workers, from the manifest (sockets restored by the caller
    through :func:`restored_sockets`)."""
    fleet = sup.fleet
    m = resume.manifest
    now = time.monotonic()
    wall = time.time()
    fleet.generation = m["generation"]
    fleet.reloads.update(m.get("reloads", {}))
    slots = []
    for (index, socks), data in zip(restored_sockets(resume, sup), m["slots"], strict=True):
        slot = Slot(index, socks, sup.cfg)
        slot.generation = data["generation"]
        slot.restarts = data["restarts"]
        slot.machine = Machine(SLOT_TABLE, SlotState.SERVING)
        gone = []
        for wd in data["workers"]:
            if not wire.same_process(wd["pid"], wd["start"]):
                gone.append(wd)
                continue
            w = _restore_worker(resume, sup, slot, wd, now, wall)
            if w is not None:
                slot.workers.append(w)
        _log_gone(slot, gone)
        if not slot.live():
            slot.machine = Machine(SLOT_TABLE, SlotState.EMPTY)
        slots.append(slot)
    return slots


def adopt_unrecorded(resume: Resume, sup: Supervisor, slots: list[Slot]) -> None:
    """What the supervisor that died had started but not yet recorded (it tells the warden at
    once after a spawn, at most every 0.1 s otherwise: a kill in that window).

    A new worker of a slot the manifest names (a reload's, a respawn's) shares that slot's
    socket and may have accepted connections on it: it is adopted as a worker the reload was
    retiring, and drained like one once every slot serves. Before, it was killed, and the
    connections it held were lost (1 reset or empty answer in ~6,000 requests, in 3 runs of
    30 of test_upgrade's kill during a reload beside 3 busy loops).

    A scale up's new slot is in the manifest before its worker is forked (``WardenLink.
    revive``), so its worker is the slot's, as a respawn's. A slot the manifest does not name
    (the warden could not be given it) leaves the port's group, and its worker is killed.
    Before, such a worker served on, in no status, past every reload (a kill 0.6 s into a
    scale 2 -> 4: 144 of 400 requests went to it). The cgroup mechanism finds the workers by
    their groups, the subreaper one by their $PORTSHARD_TREE."""
    named = {s.index: s for s in slots}
    for key in [k for k in resume.fds if k.startswith("sock:") and k not in resume.used]:
        if int(key.split(":")[1]) in named:
            continue
        fd = resume.take(key)
        if fd is None:
            continue
        sock = socket.socket(fileno=fd)
        if sock.type == socket.SOCK_STREAM:
            tcpinfo.stop_listening(sock)  # out of the group for whoever holds a copy
        sock.close()
    for index, pids, group, token in _unrecorded_trees(resume):
        slot = named.get(index)
        w = _adopt_tree(resume, sup, slot, pids, group, token) if slot is not None else None
        if w is not None:
            log.warning(
                "slot %d pid %d: a worker the supervisor that died had started and not yet "
                "recorded (a reload or a respawn under way); %s",
                w.slot.index,
                w.pid,
                "retiring it once every slot serves" if w.resume_retiring else "adopted",
                extra=w.fields,
            )
            continue
        if pids:  # (an empty group: its worker exited meanwhile)
            log.warning(
                "killing pid(s) %s: a worker of slot %d, which the supervisor that died had "
                "started and not yet recorded (the warden could not be given its slot)",
                " ".join(map(str, pids)),
                index,
            )
        if group is not None:
            group.remove(wait=2.0)
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _unrecorded_trees(resume: Resume) -> list[tuple[int, list[int], Cgroup | None, str | None]]:
    """(slot index, pids, its cgroup or None, its $PORTSHARD_TREE or None) of each worker tree
    of this lineage the manifest does not name."""
    m = resume.manifest
    home = m.get("trees", {}).get("home")
    trees: list[tuple[int, list[int], Cgroup | None, str | None]] = []
    if home:
        known = {w.get("cgroup") for s in m["slots"] for w in s["workers"]}
        if not os.path.isdir(home):
            return []
        with os.scandir(home) as entries:
            names = [e.name for e in entries if e.is_dir() and e.name.startswith("slot")]
        for name in names:
            index = name[4:].partition("-")[0]
            group = Cgroup(os.path.join(home, name))
            if name not in known and index.isdigit():
                trees.append((int(index), group.members(), group, None))
        return trees
    lineage = m.get("notify")
    if not isinstance(lineage, str) or not lineage:
        return []
    known = {w.get("token") for s in m["slots"] for w in s["workers"]}
    by_token: dict[str, list[int]] = {}
    for pid, token in env_values(TREE_ENV, f"{lineage}#").items():
        if token not in known:
            by_token.setdefault(token, []).append(pid)
    for token, pids in sorted(by_token.items()):
        index = token.rpartition("#")[2].partition(".")[0]
        trees.append((int(index) if index.isdigit() else -1, sorted(pids), None, token))
    return trees


def _adopt_tree(
    resume: Resume,
    sup: Supervisor,
    slot: Slot,
    pids: list[int],
    group: Cgroup | None,
    token: str | None,
) -> Worker | None:
    """The worker of an unrecorded tree of ``slot``, adopted as one being retired; None if
    its tree is empty or its root is gone. The root is the tree's first process (its
    children, and their forks, started after it)."""
    started = {pid: st.start for pid in pids if (st := stat(pid)) is not None}
    if not started:
        return None
    pid = min(started, key=lambda p: (started[p], p))
    try:
        pidfd = pidfd_open(pid)
    except OSError:
        return None
    alone = not slot.live()  # a respawn's: it is the slot's worker
    role = "respawn" if alone else "reload"
    w = Worker(slot, pid, pidfd, resume.manifest["generation"], role, time.monotonic())
    w.life = Lifecycle(State.READY)  # it serves, or will: the slot's own worker is preferred
    w.mode = next((x.mode for x in slot.workers), sup.cfg.via)
    w.child = False
    w.adopted = time.time()
    w.cgroup = group
    w.token = token
    w.resume_retiring = not alone
    sup.fx.watch_exit(w)
    slot.workers.insert(0, w)  # older than the recorded ones: Slot.serving() takes those
    if alone:
        slot.machine = Machine(SLOT_TABLE, SlotState.SERVING)
    return w


def _log_gone(slot: Slot, gone: list[dict[str, Any]]) -> None:
    """The workers of ``slot`` that exited while no supervisor ran. Only a slot left with no
    worker starts a new one; one that kept a worker (a reload's old worker whose stop was
    under way, or ended, when the supervisor died) lost nothing. Said otherwise before: "its
    slot starts a new one" for a retired worker whose replacement was adopted and served."""
    kept = [w.pid for w in slot.workers]
    for wd in gone:
        pid = wd["pid"]
        extra = {"slot": slot.index, "pid": pid}
        if not kept:
            log.warning(
                "slot %d pid %d: gone while the supervisor was away; its slot starts a new one",
                slot.index,
                pid,
                extra=extra,
            )
        else:
            log.info(
                "slot %d pid %d: exited while the supervisor was away (it was %s); the slot "
                "keeps pid %s",
                slot.index,
                pid,
                wd["state"],
                " ".join(map(str, kept)),
                extra=extra,
            )


def _restore_worker(
    resume: Resume, sup: Supervisor, slot: Slot, wd: dict[str, Any], now: float, wall: float
) -> Worker | None:
    fx = sup.fx
    pid = wd["pid"]
    try:
        pidfd = pidfd_open(pid)
    except OSError:
        return None
    state = State(wd["state"])
    w = Worker(slot, pid, pidfd, wd["generation"], wd["role"], now - wd["age"])
    w.mode = wd["mode"]
    w.life = Lifecycle(State.READY if state is State.READY else State.STARTING)
    if wd.get("ready_age") is not None and state is State.READY:
        w.life.ready_at = now - wd["ready_age"]
    w.adopted = wd.get("adopted")
    w.token = wd.get("token")
    if resume.how == "adoption":
        w.adopted = wall
        w.child = False
    home = fx.trees.home if fx.trees is not None else None
    if home and wd.get("cgroup"):
        from ..linux.cgroup import Cgroup

        w.cgroup = Cgroup(os.path.join(home, wd["cgroup"]))
    if fx.output is not None:
        for stream in ("stdout", "stderr"):
            fd = resume.take(f"out:{pid}:{stream}")
            if fd is not None:
                fx.output.adopt(fd, slot.index, pid, stream)
    fx.watch_exit(w)
    if state in (State.DRAINING, State.STOPPING):
        w.resume_retiring = True  # it was being retired when the supervisor went
    return w

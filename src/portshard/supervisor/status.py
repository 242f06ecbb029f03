"""The supervisor's status as a typed, immutable value, serialised once.

Built once per request by the supervisor (``Supervisor.status``) and read by the control
reply (``status --json``: :meth:`Status.to_json`, whose keys and values are an interface that
scripts and tests read), ``/metrics`` and ``/api/status`` (``web.py``) and the status table
(``render.py``, which gets the JSON back over the control socket: :meth:`Status.from_json`).
The state vocabulary is the enums' (``state.SHOWN_STATES``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..health import HostState, Snapshot
from .state import SHOWN_STATES, SlotState, State, SupervisorState

__all__ = [
    "ListenStatus",
    "QueueStatus",
    "SlotStatus",
    "Status",
    "Totals",
    "WorkerStatus",
    "healthy",
    "shown_state",
    "totals",
    "worst_first",
]

_BY_VALUE: dict[str, State | SlotState] = {s.value: s for s in SHOWN_STATES}


def shown_state(value: str) -> State | SlotState:
    """A slot state as status shows it, from its JSON value."""
    try:
        return _BY_VALUE[value]
    except KeyError:
        raise ValueError(f"unknown slot state {value!r}") from None


@dataclass(frozen=True)
class QueueStatus:
    queued: int
    backlog: int


@dataclass(frozen=True)
class WorkerStatus:
    pid: int
    state: State
    generation: int
    adopted: float | None = None  # wall clock: adopted from a supervisor that died


@dataclass
class Lineage:
    """The supervisor's own life across upgrades and adoptions (issue 15)."""

    generation: int = 1  # 1 at the first start; +1 at each upgrade and each adoption
    began: str = "start"  # how the running one began: start, upgrade or adoption
    since: float = 0.0  # wall clock when the running one began
    first: float = 0.0  # wall clock when the first one started
    upgrades: int = 0
    adoptions: int = 0
    version: str = ""
    upgrade_error: str = ""  # why the last upgrade was refused ("" if none was)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Lineage:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})

    def successor(self, how: str, version: str, now: float) -> Lineage:
        """The lineage of the supervisor that takes over by ``how`` (upgrade, adoption)."""
        return Lineage(
            generation=self.generation + 1,
            began=how,
            since=now,
            first=self.first or now,
            upgrades=self.upgrades + (how == "upgrade"),
            adoptions=self.adoptions + (how == "adoption"),
            version=version,
        )


@dataclass(frozen=True)
class ListenStatus:
    name: str
    address: str
    proto: str
    port: int


@dataclass(frozen=True)
class SlotStatus:
    slot: int
    pid: int | None
    state: State | SlotState
    restarts: int = 0
    generation: int = 0
    uptime: float | None = None
    mode: str | None = None
    queue: Mapping[str, QueueStatus] | None = None  # per TCP listen name
    connections: int | None = None
    new_per_s: float | None = None
    new_total: int | None = None
    steering: Mapping[str, Any] | None = None  # steering's own view (controller.slot_status)
    workers: tuple[WorkerStatus, ...] = ()
    failures: int = 0  # quick failures of its program in a row (it backs off; 0 = healthy)

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "pid": self.pid,
            "state": self.state.value,
            "restarts": self.restarts,
            "generation": self.generation,
            "uptime": self.uptime,
            "mode": self.mode,
            "queue": {
                name: {"queued": q.queued, "backlog": q.backlog}
                for name, q in (self.queue or {}).items()
            },
            "connections": self.connections,
            "new_per_s": self.new_per_s,
            "new_total": self.new_total,
            "steering": dict(self.steering) if self.steering is not None else None,
            "workers": [
                {
                    "pid": w.pid,
                    "state": w.state.value,
                    "generation": w.generation,
                    **({"adopted": w.adopted} if w.adopted is not None else {}),
                }
                for w in self.workers
            ],
            "failures": self.failures,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SlotStatus:
        return cls(
            slot=d["slot"],
            pid=d.get("pid"),
            state=shown_state(d["state"]),
            restarts=d.get("restarts", 0),
            generation=d.get("generation", 0),
            uptime=d.get("uptime"),
            mode=d.get("mode"),
            queue={
                name: QueueStatus(q["queued"], q["backlog"])
                for name, q in (d.get("queue") or {}).items()
            },
            connections=d.get("connections"),
            new_per_s=d.get("new_per_s"),
            new_total=d.get("new_total"),
            steering=d.get("steering"),
            workers=tuple(
                WorkerStatus(w["pid"], State(w["state"]), w["generation"], w.get("adopted"))
                for w in d.get("workers", ())
            ),
            failures=d.get("failures", 0),
        )


@dataclass(frozen=True)
class Status:
    name: str
    pid: int
    uptime: float | None
    generation: int
    stopping: bool
    ready: bool
    reloads_ok: int
    reloads_failed: int
    listen: tuple[ListenStatus, ...]
    workers: int  # slots not being removed
    slots: tuple[SlotStatus, ...]
    metrics: str | None = None  # the /metrics URL
    dashboard: str | None = None
    kernel: Mapping[str, int] | None = None  # ListenOverflows, ListenDrops
    steering: Mapping[str, Any] | None = None  # steering's own view (controller.status)
    steering_changes: int = 0
    state: SupervisorState = SupervisorState.RUNNING  # the supervisor machine's state
    health: str | None = None  # the --health URL (/healthz and the agent check)
    supervisor: Lineage | None = None  # its own generation, uptime, upgrades, adoptions

    def health_snapshot(self) -> Snapshot:
        """The host's health for the balancers in front (health.py): draining from the moment
        a drain is asked; the ready share counts slots whose serving worker is ready."""
        if self.state in (SupervisorState.STOPPING, SupervisorState.STOPPED):
            host = HostState.STOPPING
        elif self.state is SupervisorState.DRAINING:
            host = HostState.DRAINING
        else:
            host = HostState.SERVING
        counted = [s for s in self.slots if s.state is not SlotState.REMOVING]
        ready = sum(1 for s in counted if s.state is State.READY)
        return Snapshot(host, ready, len(counted))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.pid,
            "uptime": self.uptime,
            "generation": self.generation,
            "stopping": self.stopping,
            "ready": self.ready,
            "reloads": {"ok": self.reloads_ok, "failed": self.reloads_failed},
            "listen": [
                {"name": x.name, "address": x.address, "proto": x.proto, "port": x.port}
                for x in self.listen
            ],
            "workers": self.workers,
            "slots": [slot.to_json() for slot in self.slots],
            "metrics": self.metrics,
            "dashboard": self.dashboard,
            "kernel": dict(self.kernel or {}),
            "steering": dict(self.steering) if self.steering is not None else None,
            "steering_changes": self.steering_changes,
            "health": self.health,
            "supervisor": self.supervisor.to_json() if self.supervisor else None,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Status:
        """Read a ``status --json`` reply back (missing optional keys take defaults)."""
        reloads = d.get("reloads", {})
        return cls(
            name=d["name"],
            pid=d["pid"],
            uptime=d.get("uptime"),
            generation=d.get("generation", 0),
            stopping=d.get("stopping", False),
            ready=d.get("ready", False),
            reloads_ok=reloads.get("ok", 0),
            reloads_failed=reloads.get("failed", 0),
            listen=tuple(
                ListenStatus(x.get("name", ""), x["address"], x.get("proto", ""), x.get("port", 0))
                for x in d.get("listen", ())
            ),
            workers=d.get("workers", len(d.get("slots", ()))),
            slots=tuple(SlotStatus.from_json(s) for s in d.get("slots", ())),
            metrics=d.get("metrics"),
            dashboard=d.get("dashboard"),
            kernel=d.get("kernel"),
            steering=d.get("steering"),
            steering_changes=d.get("steering_changes", 0),
            state=SupervisorState(d.get("state", "running")),
            health=d.get("health"),
            supervisor=Lineage.from_json(d["supervisor"]) if d.get("supervisor") else None,
        )


# Summaries for many slots (issue 17: status, /metrics and the dashboard readable at 128 slots).
# Pure functions of the status; the dashboard (dashboard.html) ranks slots the same way.

_NO_WORKER = (SlotState.BACKOFF, SlotState.EMPTY)


def _excluded(slot: SlotStatus) -> bool:
    return bool(slot.steering and slot.steering.get("excluded"))


def _queued(slot: SlotStatus) -> int:
    return sum(q.queued for q in (slot.queue or {}).values())


def healthy(slot: SlotStatus) -> bool:
    """Ready, steered to, nothing waiting in its queue, not failing: a row a compact view may
    leave out (past restarts alone do not make a slot unhealthy; they rank it higher)."""
    return (
        slot.state is State.READY
        and not _excluded(slot)
        and _queued(slot) == 0
        and slot.failures == 0
    )


def _badness(slot: SlotStatus) -> tuple[int, int, int, int, int, int]:
    """Sort key, worst first: no worker (backing off, empty), then not ready (starting,
    draining, ...), then excluded by steering, then the most queued, the most restarts, the
    most quick failures; ties by slot number."""
    rank = 0 if slot.state in _NO_WORKER else 1 if slot.state is not State.READY else 2
    return (
        rank,
        0 if _excluded(slot) else 1,
        -_queued(slot),
        -slot.restarts,
        -slot.failures,
        slot.slot,
    )


def worst_first(slots: tuple[SlotStatus, ...] | list[SlotStatus]) -> list[SlotStatus]:
    """The slots, the worst first (see :func:`_badness`)."""
    return sorted(slots, key=_badness)


@dataclass(frozen=True)
class Totals:
    """Supervisor-wide figures summed over the slots."""

    slots: int
    by_state: Mapping[str, int]  # shown state value -> slots in it (only states present)
    ready: int  # slots whose worker is ready
    connections: int  # client connections the workers hold (slots that report them)
    queued: int  # connections waiting in every accept queue
    restarts: int
    excluded: int  # slots steering keeps new connections away from
    unhealthy: int  # slots not :func:`healthy`


def totals(slots: tuple[SlotStatus, ...] | list[SlotStatus]) -> Totals:
    by_state: dict[str, int] = {}
    for slot in slots:
        by_state[slot.state.value] = by_state.get(slot.state.value, 0) + 1
    return Totals(
        slots=len(slots),
        by_state={s.value: by_state[s.value] for s in SHOWN_STATES if s.value in by_state},
        ready=by_state.get(State.READY.value, 0),
        connections=sum(s.connections or 0 for s in slots),
        queued=sum(_queued(s) for s in slots),
        restarts=sum(s.restarts for s in slots),
        excluded=sum(1 for s in slots if _excluded(s)),
        unhealthy=sum(1 for s in slots if not healthy(s)),
    )

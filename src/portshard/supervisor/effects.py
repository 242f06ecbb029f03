"""The effects layer's interface: everything the lifecycle does to the world goes through it.

``Fleet`` (the lifecycle) decides; an :class:`Effects` carries out: it signals and reaps
processes, spawns, opens and closes sockets, asks the kernel what a worker holds, talks to
systemd and steering, replies to control clients, and tells the time. The real one is
``system.SystemEffects``; tests pass a fake one and a fake clock, so a reload's, a scale's, a
stop's and a crash's decisions are tested without processes (tests/unit/test_procedures.py).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..control.server import Connection
    from .config import Config
    from .worker import Slot, Worker

__all__ = ["Effects"]


class Effects(Protocol):
    # ---- time -------------------------------------------------------------------------------
    def now(self) -> float: ...

    # ---- processes --------------------------------------------------------------------------
    def spawn(self, slot: Slot, role: str, cfg: Config, generation: int) -> Worker:
        """Start a worker on ``slot``'s sockets (raises PortshardError if it cannot)."""
        ...

    def signal(self, w: Worker, sig: int) -> None: ...

    def reap(self, w: Worker) -> None:
        """Collect ``w``'s exit status, stop watching it, kill what is left of its group."""
        ...

    def is_ready(self, w: Worker, now: float) -> bool:
        """Readiness by observation (--ready accept/delay; notify arrives as an event)."""
        ...

    def became_ready(self, w: Worker) -> None:
        """After READY: what its --via mode needs (the backlog a trapped listen() changed)."""
        ...

    def tree_stopped(self, w: Worker, spin: float) -> bool:
        """Its whole process tree is stopped (or gone); ``spin``: wait that long inline."""
        ...

    def holds_connections(self, w: Worker) -> bool:
        """Its process tree holds a client connection on a served port."""
        ...

    # ---- sockets ----------------------------------------------------------------------------
    def open_slot(self, index: int) -> list[socket.socket]: ...

    def close_slot(self, slot: Slot) -> None: ...

    def queue_empty(self, slot: Slot) -> bool: ...

    def steers(self) -> bool:
        """Steering is on (it can keep new connections off a slot)."""
        ...

    def shielded(self, slot: Slot) -> bool:
        """Steering keeps new TCP connections off ``slot`` right now."""
        ...

    def can_hold(self, slot: Slot) -> bool:
        """``hold`` can keep every new connection off ``slot`` (its sockets are ours, TCP)."""
        ...

    def hold(self, slot: Slot, on: bool) -> None:
        """Retirement with nothing to shield the slot: drop new SYNs on its TCP sockets (the
        clients retry), or stop dropping them (unless the stop drops them anyway)."""
        ...

    def tree_listens(self, w: Worker) -> bool:
        """A process of ``w``'s tree still has one of its slot's sockets open."""
        ...

    def drop_syns(self) -> list[socket.socket]:
        """Stop: a SYN-drop filter on every TCP slot socket we close; returns them."""
        ...

    def queues_empty(self, socks: list[socket.socket]) -> bool: ...

    def store(self, slots: list[Slot]) -> None:
        """Give systemd a copy of the slots' sockets (its fd store)."""
        ...

    # ---- steering ---------------------------------------------------------------------------
    def steer(self) -> None:
        """Tell steering each slot's health now."""
        ...

    def add_to_steering(self, slot: Slot) -> None: ...

    def rescue(self, slot: Slot, pid: int) -> None:
        """``slot`` lost its only worker: hand its queue to the other slots where possible."""
        ...

    def first_k(self, count: int) -> None:
        """Steering off, scale down: new connections to the first ``count`` slots only."""
        ...

    def all_slots(self) -> None:
        """Steering off, scale down done: remove the first-k program."""
        ...

    # ---- systemd and the control socket -----------------------------------------------------
    def notify(self, what: str, text: str = "") -> None:
        """sd_notify: ``ready`` (with a status text), ``reloading`` or ``stopping``."""
        ...

    def reply(self, conn: Connection, data: bytes) -> None: ...

    def clients_gone(self, conns: list[Connection]) -> bool:
        """The processes behind these control connections have exited."""
        ...

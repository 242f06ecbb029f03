"""What makes the supervisor replaceable (issue 15): its lineage, its warden, its upgrade, and
how it dies of a bug. The loop owns one ``Succession`` and calls it at set-up, every turn
(``sync``, ``poll_upgrade``), on ``upgrade``/SIGUSR2 and when it dies.

The mechanisms are in ``handoff.py`` (the manifest), ``warden.py``/``wardenlink.py`` (the
process that outlives us) and ``upgrade.py`` (check, then exec); docs/ARCHITECTURE.md, "No
single point of failure", has the rules.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..control import protocol
from ..control.server import Connection
from ..errors import ControlError
from . import handoff
from .handoff import Resume
from .state import SupervisorState
from .status import Lineage
from .upgrade import Upgrade, answer
from .wardenlink import WardenLink

if TYPE_CHECKING:
    from .loop import Supervisor

__all__ = ["Succession"]

log = logging.getLogger("portshard.supervisor")

SYNC_EVERY = 0.1  # s between updates of the warden's manifest (only if something changed)


class Succession:
    def __init__(self, sup: Supervisor, resume: Resume | None, log_format: str) -> None:
        self.sup = sup
        self.resume = resume
        now = time.time()
        self.lineage = (
            Lineage.from_json(resume.manifest["lineage"]).successor(resume.how, __version__, now)
            if resume is not None
            else Lineage(since=now, first=now, version=__version__)
        )
        self.warden = WardenLink(
            sup.sel, sup.control_path, log_format, lambda: handoff.export(self.sup)
        )
        self.upgrade: Upgrade | None = None
        self.abandoned = False  # the loop died of a bug and left the workers to the warden
        self._due = 0.0
        self._seen: object = None

    @property
    def keeps_orphans(self) -> bool:
        return self.sup.cfg.orphan_timeout > 0

    # ---- set-up -----------------------------------------------------------------------------

    def start_warden(self) -> None:
        """The warden: the same one after an upgrade, a new one otherwise. After an adoption
        the new one starts (in the home's warden group) before the old one is let go: a warden
        is in the group at every moment, so no sweep takes the adopted workers."""
        sup, resume = self.sup, self.resume
        if self.keeps_orphans:
            if sup.fx.trees is not None:
                self.warden.group = sup.fx.trees.warden_group()
            if resume is not None and resume.channel is not None and resume.warden_pid:
                self.warden.attach(resume.channel, resume.warden_pid)
            else:
                self.warden.start(time.monotonic())
        # else: the workers die with the supervisor (their parent-death signal)
        if resume is not None:
            self._resumed(resume)

    def _resumed(self, resume: Resume) -> None:
        """Say what was recovered; answer the client that asked for the upgrade."""
        fleet = self.sup.fleet
        workers = [w for s in fleet.slots for w in s.live()]
        old = resume.manifest.get("pid")
        if resume.how == "adoption":
            log.warning(
                "adopted %d running worker(s) and %d slot(s) of supervisor pid %s (it died); "
                "supervisor generation %d",
                len(workers),
                len(fleet.slots),
                old,
                self.lineage.generation,
            )
            fleet.history.event("adopted", f"{len(workers)} workers of pid {old}")
        else:
            log.info(
                "upgraded to portshard %s: %d worker(s) kept, supervisor generation %d",
                __version__,
                len(workers),
                self.lineage.generation,
            )
            fleet.history.event("upgrade", f"generation {self.lineage.generation}")
        client = resume.take("client")
        resume.done()
        if client is not None:
            answer(client, {"upgraded": True, "supervisor": self.lineage.to_json()})

    def inherited_maps(self) -> dict[int, int]:
        return handoff.inherited_maps(self.resume, self.sup.cfg) if self.resume else {}

    def steering_seed(self) -> list[dict[str, Any]] | None:
        return handoff.steering_seed(self.resume, self.sup.cfg) if self.resume else None

    # ---- every turn -------------------------------------------------------------------------

    def sync(self, now: float) -> None:
        """Give the warden the manifest when something it names changed."""
        sup = self.sup
        fx = sup.fx
        # At once, not up to SYNC_EVERY later: a slot socket we replaced (a rescue) or closed
        # (a scale down) stays open in the warden until it syncs (a removed slot's UDP socket
        # takes its flows' datagrams until then; a TCP one was stopped); a worker spawned is
        # one an adopter must know (it may accept on its slot's socket within milliseconds).
        urgent, fx.sync_now = fx.sync_now, False
        urgent = urgent or self.warden.due(now)  # one lost: the next starts this turn
        if (now < self._due and not urgent) or not self.keeps_orphans:
            return
        self._due = now + SYNC_EVERY
        seen = (
            sup.fleet.generation,
            tuple(
                (
                    s.index,
                    s.generation,
                    tuple(id(x) for x in s.socks),
                    *((w.pid, w.state) for w in s.live()),
                )
                for s in sup.fleet.slots
            ),
            len(fx.output.open) if fx.output is not None else 0,
            fx.steering.exported if fx.steering is not None else 0,
            self.warden.alive,
            id(sup.fleet.draining),  # a drain begun: an adopter carries it on
        )
        if seen == self._seen and self.warden.alive:
            return
        manifest, fds = handoff.export(sup)
        self.warden.sync(now, manifest, fds)
        self._seen = seen if self.warden.alive else None

    # ---- upgrade ----------------------------------------------------------------------------

    def begin_upgrade(self, conn: Connection | None) -> None:
        """portshard upgrade / SIGUSR2: check the new portshard, then exec it (upgrade.py)."""
        if self.upgrade is not None:
            raise ControlError("an upgrade is already in progress; wait for it to finish")
        state = self.sup.fleet.state
        if state is not SupervisorState.RUNNING:
            raise ControlError(
                f"the supervisor is {state.value}; upgrade when status says running "
                "(after the boot, a reload or a scale)"
            )
        self.upgrade = Upgrade(self.sup, conn)

    def poll_upgrade(self) -> None:
        upgrade = self.upgrade
        assert upgrade is not None

        def refuse(why: str) -> None:
            log.error("upgrade refused: %s", why)
            self.lineage.upgrade_error = why
            self.sup.fleet.history.event("upgrade_failed", why)
            if upgrade.conn is not None:
                self.sup.fx.reply(upgrade.conn, protocol.reply_error(why))

        try:
            if upgrade.poll(refuse):
                self.upgrade = None
        except BaseException:
            self.upgrade = None
            raise

    # ---- dying ------------------------------------------------------------------------------

    def abandon(self, exc: BaseException) -> bool:
        """The loop is dying of a bug: with a warden, leave the workers serving for the next
        supervisor instead of killing them (True); without one, they go with us (False)."""
        adopting = self.resume is not None and self.resume.warden is not None
        if not (adopting or (self.warden.alive and self.keeps_orphans)):
            return False
        log.critical(
            "the supervisor failed (%r); its workers keep serving: %s keeps them for the next "
            "`portshard run` with this control socket, within --orphan-timeout (%gs)",
            exc,
            "the previous supervisor's warden"
            if adopting
            else f"the warden (pid {self.warden.pid})",
            self.sup.cfg.orphan_timeout,
        )
        self.abandoned = True
        return True

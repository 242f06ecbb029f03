"""Which slots get new connections, and with what weight. Pure: observations in, verdicts out.

Everything that decides steering lives here; the kernel side (classic or eBPF programs) only
carries the result out, and the supervisor only reports what it sees.

Inputs, per slot, at every step: its health (from the supervisor's worker states) and, when the
queues were sampled, the accept-queue depth of its TCP listeners.

- Hard exclusions, from health: no worker (it died; until its replacement is ready), starting
  (a worker is there but not ready yet), draining (its only worker is being retired), removing
  (scale down: the socket closes soon).
- Handing over (reload: the new worker is ready, the old one is being retired; the supervisor
  says so for at most a second): out for new TCP connections only, for the moment it takes the
  two workers to empty the queue, so that the old one is soon caught waiting in accept()
  holding nothing and can go; its UDP flows stay (the socket is the same, and the new worker
  reads it). Under a saturating load with the slot in, its queue never emptied and retiring the
  old worker took 6-14 s instead of about one.
- Overload (TCP only): the expected wait in slot i's queue is ``q_i / (s_i x R)`` (Little's
  law; R, the arrival rate, is the same for all), so a slot whose queue is long both in absolute
  terms and per unit of its share compared with the rest (``q_i >= 8`` and
  ``q_i / s_i >= 4 x (Q_rest + 1) / S_rest``) is out at once; it is back when its queue has
  drained (``q_i <= 1``): the gap between 8 and 1 is the hysteresis. Slots the kernel holds
  back (an in-flight cap or a cost, speed.py) are not in "the rest": they cannot take more,
  so the others hold all the rest of what is in flight. This alone is a
  join-the-shorter-queue: equal workers take turns, which shortens the tail and keeps the
  balance, so it does not touch weights.
- Weights (TCP only) follow what a slot can serve, over epochs of ~0.3 s: a slot that was out
  for overload much more than the rest (>= 30% of the epoch and >= 3x the rest's share + 10%)
  did not keep up with its share: its weight is cut (x1/2, x1/4 above 60%, x1/8 above 90%);
  one that was out no more than the rest (+10%) grows by a quarter, up to a full share. A slow
  slot thus settles just under what it can serve instead of stalling again at a full share
  (growing by halves or doubling made it swing around that point, and every swing up is a
  stall with a queue behind it), while a hiccup of an equal worker (a descheduled process)
  costs it a few epochs at a lower share.
- UDP has no accept queue: its tables follow the hard exclusions only (a weight change would
  move flows).
- Never every slot out: if no slot qualifies, the best class present goes in (overloaded but
  ready, then draining, then starting, then those with no worker); removing slots never.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .speed import WAITED

__all__ = ["Change", "Health", "Observation", "Params", "Policy", "Verdict"]


class Health(enum.Enum):
    READY = "ready"
    STARTING = "starting"  # its worker is not ready yet
    DRAINING = "draining"  # its only worker is being retired
    DOWN = "no worker"  # died; waiting for the replacement
    REMOVING = "removing"  # scale down: its socket closes soon
    HANDOVER = "handing over"  # reload: new worker ready, the old one being retired


# Who goes in when no slot qualifies, best first.
_FALLBACK = (Health.DRAINING, Health.STARTING, Health.DOWN)


@dataclass(frozen=True)
class Params:
    overload_queue: int = 8  # an overloaded slot has at least this many queued connections
    overload_ratio: float = 4.0  # ... and this many times the rest's queue per unit of share
    recover_queue: int = 1  # an overloaded slot is back once its queue is down to this
    stall_ratio: float = 3.0  # without handed counts: a stall needs this x the rest's queue
    stall_rest: float = 0.5  # ... and the slots left must have this x its share between them
    stall_waited: float = WAITED  # out for a stall or an overload only if its worker waited
    # for a CPU less than this part of the look: more is the machine's descheduling
    epoch: int = 15  # samples (of 20 ms) between weight decisions
    cut_out: float = 0.3  # weights are cut for a slot out at least this part of the epoch
    cut_rest: float = 3.0  # ... and this many times the rest's part (+ margin)
    margin: float = 0.1
    grow: float = 1.25  # per epoch, for a slot that kept up
    min_weight: float = 1 / 256  # relative to a full share: a slow slot still gets a trickle


@dataclass(frozen=True)
class Observation:
    slot: int
    pid: int | None
    health: Health
    queued: int | None = None  # TCP accept-queue depth now; None when not sampled
    handed: int | None = None  # new TCP connections handed to it so far (eBPF counts them)
    limited: bool = False  # the kernel holds it back: an in-flight cap or a cost (speed.py)
    waited: float = 0.0  # the part of the time since the last look its worker was runnable but
    # waiting for a CPU (/proc schedstat, or all of it if runnable now and it hardly ran; read
    # with eBPF counts)


@dataclass(frozen=True)
class Verdict:
    included: bool  # gets new TCP connections
    reason: str | None  # why it is out (or why it is in although it should be out)
    weight: float  # relative capacity, 0..1 (a full share is 1)
    udp_included: bool  # gets new UDP flows (hard exclusions only)


class ChangeKind(enum.Enum):
    OUT = "out"  # a slot stops getting new connections (its worker died, drains, starts)
    IN = "in"  # ... gets them again
    OVERLOADED = "overloaded"  # out because its queue grows (slot -1: every ready slot is)
    RECOVERED = "recovered"  # back in because its queue drained
    WEIGHT = "weight"  # its share of new connections changed
    ALL_OUT = "all_out"  # no slot qualifies: a fallback picks some
    RESCUE = "rescue"  # a dead slot's listener was replaced: its queue went to the others

    @property
    def frequent(self) -> bool:
        """It can change many times a second under load (the log shows at most one a second)."""
        return self in (ChangeKind.OVERLOADED, ChangeKind.RECOVERED, ChangeKind.WEIGHT)


@dataclass(frozen=True)
class Change:
    """A change worth a log line: ``slot N pid P: steering: TEXT``."""

    slot: int
    pid: int | None
    text: str
    kind: ChangeKind
    warn: bool = False

    @property
    def moves(self) -> bool:
        """A slot went out or came back in (counted as a steering change)."""
        return self.slot >= 0 and self.kind in (
            ChangeKind.OUT,
            ChangeKind.IN,
            ChangeKind.OVERLOADED,
            ChangeKind.RECOVERED,
        )


@dataclass
class _Track:
    pid: int | None = None
    health: Health = Health.STARTING
    weight: float = 1.0
    overloaded: bool = False
    overload_why: str = ""
    back_why: str = ""  # why it came back in, for the log line
    recovered: bool = False  # ... because its queue drained (not because a worker is ready)
    queued: int = 0
    last: tuple[int, int | None] | None = None  # (queued, handed) at the last look
    stalled: bool = False  # out until its queue is empty
    limited: bool = False  # held back by the kernel: it cannot take another's share
    samples: int = 0  # in this epoch, while ready
    out: int = 0  # ... of which overloaded
    verdict: Verdict | None = None


class Policy:
    """The steering state of every slot; :meth:`observe` advances it one step."""

    def __init__(self, params: Params | None = None) -> None:
        self.params = params or Params()
        self._tracks: dict[int, _Track] = {}
        self._fallback = ""
        self._samples = 0
        self.version = 0  # goes up whenever a verdict or weight changes

    # ---- inputs -----------------------------------------------------------------------------

    def forget(self, slot: int) -> None:
        self._tracks.pop(slot, None)

    def observe(self, observations: Iterable[Observation]) -> list[Change]:
        """Take this step's observations; return the changes worth logging."""
        obs = list(observations)
        changes: list[Change] = []
        for o in obs:
            t = self._tracks.setdefault(o.slot, _Track())
            if t.health is not o.health:
                t.samples = t.out = 0  # an epoch counts only what a ready worker did
                t.last = None  # "since the last look" starts again
            t.pid = o.pid
            t.limited = o.limited
            if o.health is not t.health and o.health is Health.READY:
                t.recovered = False
                t.back_why = (
                    "handover done"
                    if t.health is Health.HANDOVER
                    else f"its worker is ready (was {t.health.value})"
                )
            t.health = o.health
            if o.health is not Health.READY:
                t.overloaded = t.stalled = False  # judged afresh once a worker serves it again
        sampled = [o for o in obs if o.queued is not None and o.health is Health.READY]
        if sampled:
            self._sample(sampled, changes)
        self._decide(changes)
        return changes

    def _sample(self, sampled: Sequence[Observation], changes: list[Change]) -> None:
        p = self.params
        weights = {s: t.weight for s, t in self._tracks.items() if t.verdict and t.verdict.included}
        total = sum(weights.values())
        shares = {s: w / total for s, w in weights.items()}
        for o in sampled:
            t = self._tracks[o.slot]
            t.queued = o.queued or 0
            if t.overloaded and t.queued <= (0 if t.stalled else p.recover_queue):
                t.overloaded = t.stalled = False
                t.recovered = True
                t.back_why = "its queue drained"
        # Compare each serving slot with the rest of the serving slots.
        serving = [
            o.slot for o in sampled if o.slot in shares and not self._tracks[o.slot].overloaded
        ]
        waited = {o.slot: o.waited for o in sampled}
        for slot in list(serving):
            t = self._tracks[slot]
            if waited[slot] >= p.stall_waited:
                continue  # descheduled for the look: the machine's (the stall rule, below)
            # Not against slots the kernel holds back (a cap, a cost): they hold at most their
            # cap, or a fraction of their share, so the others hold the rest of what is in
            # flight; out, they would hand all of it to the one held back (2 workers, one
            # capped: the two took turns being out, and the capped one, alone in the table,
            # got 15 at a time).
            rest = [s for s in serving if s != slot and not self._tracks[s].limited]
            share, rest_share = shares[slot], sum(shares[s] for s in rest)
            if not rest or rest_share <= 0:
                continue  # never the last one out
            rest_queue = sum(self._tracks[s].queued for s in rest)
            if (
                t.queued >= p.overload_queue
                and t.queued / share >= p.overload_ratio * (rest_queue + 1) / rest_share
            ):
                t.overloaded = True
                t.overload_why = (
                    f"overloaded: {t.queued} queued for {share:.1%} of new connections, "
                    f"{rest_queue} for the rest"
                )
                serving.remove(slot)
        self._stalls(sampled, shares)
        for o in sampled:
            t = self._tracks[o.slot]
            t.samples += 1
            t.out += t.overloaded
            t.last = (t.queued, o.handed)
        self._samples += 1
        if self._samples >= p.epoch:
            self._samples = 0
            self._weigh([o.slot for o in sampled], changes)

    def _stalls(self, sampled: Sequence[Observation], shares: dict[int, float]) -> None:
        """Out at once: a slot whose queue holds connections while it accepted none since the
        last look (with handed counts: ``handed - handed' - (queued - queued')`` is what it
        accepted; without, a queue that grew to 2 or more and is ``stall_ratio`` x the rest's
        per unit of share, so that equal busy workers or a steady queue are not taken for a
        stall; with, not in a pause that stopped every slot: :meth:`_paused`). Not when the
        slots left have less than ``stall_rest`` x its share between them: a healthy worker
        descheduled for a look (a busy machine) would hand its whole share to a slow one whose
        weight was cut (measured: 0.44x of a shared queue), or to ones the kernel holds back
        (a cap or a cost: they cannot take it)."""
        p = self.params
        for o in sampled:
            t = self._tracks[o.slot]
            if t.overloaded or t.last is None or not t.queued or o.slot not in shares:
                continue
            serving = [
                s
                for s in shares
                if s != o.slot and not self._tracks[s].overloaded and not self._tracks[s].limited
            ]
            if sum(shares[s] for s in serving) < p.stall_rest * shares[o.slot]:
                continue  # its share would go to slots cut for falling behind: worse
            was_queued, _ = t.last
            accepted = self._accepted(o)
            if accepted is not None:
                if accepted > 0:
                    continue  # it accepted some
                if self._paused(o.slot, sampled):
                    continue  # nobody got through: the load's pause or the machine's
            else:
                rest = [s for s in shares if s != o.slot and s in self._tracks]
                rest_share = sum(shares[s] for s in rest)
                rest_queue = sum(self._tracks[s].queued for s in rest)
                if t.queued <= max(was_queued, 1) or rest_share <= 0:
                    continue
                if t.queued / shares[o.slot] < p.stall_ratio * (rest_queue + 1) / rest_share:
                    continue
            if o.waited >= p.stall_waited:
                continue  # descheduled: the machine's, and two choices already send new
                # connections to the slots with fewer in flight (out, an equal worker the
                # scheduler starved for 0.1 s kept none of 200 long-lived connections opened
                # then, and 2 or 3 of 4 did at load 4-7: 186, 5, 4, 5)
            if not self._others_serve(o.slot):
                continue  # never the last one out
            t.overloaded = t.stalled = True
            t.overload_why = (
                f"stalled: {t.queued} queued and none accepted since the last look"
                if o.handed is not None
                else f"stalled: its queue grew from {was_queued} to {t.queued}, the rest shorter"
            )

    def _paused(self, slot: int, sampled: Sequence[Observation]) -> bool:
        """With handed counts: did the other slots, holding connections too, accept fewer
        between the two looks than ``slot`` holds queued? Then its queue sat untouched in a
        pause that stopped everyone, not a stall of its own. Equal workers blocked reading
        requests from a client that was descheduled (4 workers / 64 in flight, load ~10) all
        held 8-20 queued and accepted none: two slots at a time were out 2-5 times a second
        each, and those caught twice were capped at 1 in flight (3 of 4 slots for 17% of a
        run). A stalled worker's queue sits while the rest serve: they accept hundreds in
        that time (a look is 20 ms; a request a fraction of a millisecond). If no other slot
        holds or was handed any, every client is stuck on this one: a stall."""
        accepted, holding = 0, False
        for o in sampled:
            got = self._accepted(o) if o.slot != slot else None
            if got is None:
                continue
            t = self._tracks[o.slot]
            was_queued = t.last[0] if t.last is not None else 0
            accepted += max(0, got)
            # with both queues empty, what it accepted is what it was handed
            holding = holding or bool(t.queued or was_queued or got)
        return holding and accepted < self._tracks[slot].queued

    def _accepted(self, o: Observation) -> int | None:
        """What ``o``'s slot accepted since the last look: handed less the growth of its queue
        (exact but for handshakes in flight); None without handed counts."""
        t = self._tracks[o.slot]
        if t.last is None or o.handed is None:
            return None
        was_queued, was_handed = t.last
        if was_handed is None:
            return None
        return o.handed - was_handed - (t.queued - was_queued)

    def _others_serve(self, slot: int) -> bool:
        return any(
            s != slot and t.health is Health.READY and not t.overloaded
            for s, t in self._tracks.items()
        )

    def _weigh(self, slots: list[int], changes: list[Change]) -> None:
        """End of an epoch: cut the weight of a slot that was out much more than the rest,
        raise that of one that was not."""
        p = self.params
        part = {s: self._tracks[s].out / self._tracks[s].samples for s in slots}
        for slot in slots:
            t = self._tracks[slot]
            rest = [part[s] for s in slots if s != slot]
            if rest:
                rest_part = sum(rest) / len(rest)
                mine = part[slot]
                old = t.weight
                if mine >= p.cut_out and mine >= p.cut_rest * rest_part + p.margin:
                    factor = 0.125 if mine >= 0.9 else 0.25 if mine >= 0.6 else 0.5
                    t.weight = max(p.min_weight, t.weight * factor)
                    why = f"out for overload {mine:.0%} of the last epoch, the rest {rest_part:.0%}"
                elif mine <= rest_part + p.margin:
                    t.weight = min(1.0, t.weight * p.grow)
                    why = "it kept up with its share"
                if t.weight != old:
                    text = f"weight {'down' if t.weight < old else 'up'} to {t.weight:.3f}: {why}"
                    changes.append(Change(slot, t.pid, text, ChangeKind.WEIGHT))
        for t in self._tracks.values():
            t.samples = t.out = 0

    # ---- decisions --------------------------------------------------------------------------

    def _decide(self, changes: list[Change]) -> None:
        tracks = self._tracks
        ready = {s for s, t in tracks.items() if t.health is Health.READY}
        handover = {s for s, t in tracks.items() if t.health is Health.HANDOVER}
        tcp_in = {s for s in ready if not tracks[s].overloaded}
        udp_in = ready | handover
        fallback = ""
        fallback_kind = ChangeKind.ALL_OUT
        if not tcp_in and ready:
            tcp_in = set(ready)
            fallback = "every ready slot is overloaded: steering to all of them"
            fallback_kind = ChangeKind.OVERLOADED
        if not tcp_in and len(handover) > 1:
            # Every slot hands over at once (a reload whose --surge covers them all): one
            # stays in and takes the new connections while the others hand over, and goes out
            # once one of them is back. All in, no old worker would be shielded: each waited
            # the freeze-check's GRACEFUL_WAIT (1 s) and then dropped SYNs for up to 0.8 s
            # (hypercorn, --surge 2 of 2: a reload's handover took 3 s, not 0.7 s).
            was_in = [s for s in handover if (v := tracks[s].verdict) is not None and v.included]
            tcp_in = {max(was_in or handover)}
        elif not tcp_in:
            tcp_in = set(handover)  # one slot, reloading: normal, not worth a warning
            if len(tracks) > 1 and handover:
                # Its old worker may still be shutting down on the shared socket (one that
                # handles its stop signal can accept there): said, so that a lost request
                # can be traced to it. It read "back in: its worker is ready" before.
                fallback = "no other slot is ready: the handing-over slot takes new connections"
        for health in _FALLBACK:
            if udp_in:
                break
            udp_in = {s for s, t in tracks.items() if t.health is health}
            tcp_in = set(udp_in)
            if udp_in:
                fallback = f"no slot is ready: steering to the {health.value} ones"
        if not tcp_in and tracks:  # only removing slots are left (not while serving)
            tcp_in = udp_in = set(tracks)
            fallback = "only removing slots are left"
        if fallback and fallback != self._fallback:
            changes.append(Change(-1, None, fallback, fallback_kind, warn=True))
        self._fallback = fallback
        for slot, t in sorted(tracks.items()):
            reason = None
            if t.health is not Health.READY:
                reason = t.health.value
            elif t.overloaded:
                reason = t.overload_why
            included = slot in tcp_in
            if included and reason:
                reason = f"{reason}; in anyway: {fallback}" if fallback else None
            verdict = Verdict(included, reason, t.weight, slot in udp_in)
            old, t.verdict = t.verdict, verdict
            if old != verdict:
                self.version += 1
            if old is None or (old.included, old.udp_included) == (included, slot in udp_in):
                continue
            if not included:
                warn = t.health is Health.DOWN or t.overloaded
                overload = t.health is Health.READY and t.overloaded
                kind = ChangeKind.OVERLOADED if overload else ChangeKind.OUT
                changes.append(Change(slot, t.pid, f"excluded: {reason}", kind, warn=warn))
            elif reason is None:
                kind = ChangeKind.RECOVERED if t.recovered else ChangeKind.IN
                changes.append(Change(slot, t.pid, f"back in: {t.back_why}", kind))

    # ---- outputs ----------------------------------------------------------------------------

    @property
    def fallback(self) -> str:
        """Why slots that should be out are in (every slot would be out), or ""."""
        return self._fallback

    def stalled(self) -> set[int]:
        """The slots out now as stalled (their queue holds connections they do not take)."""
        return {s for s, t in self._tracks.items() if t.stalled and t.overloaded}

    def verdicts(self) -> dict[int, Verdict]:
        return {s: t.verdict for s, t in sorted(self._tracks.items()) if t.verdict is not None}

    def tcp_weights(self) -> dict[int, float]:
        """Weights of the slots that get new TCP connections (never empty once observed)."""
        return {s: v.weight for s, v in self.verdicts().items() if v.included}

    def udp_weights(self) -> dict[int, float]:
        """Equal weights for the slots that get new UDP flows."""
        return {s: 1.0 for s, v in self.verdicts().items() if v.udp_included}

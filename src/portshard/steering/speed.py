"""How fast each slot serves, measured from the kernel's counts: the cost the TCP program weighs
connections in flight by (issue 11). Pure: samples in, costs out.

Two choices by connections in flight alone give a worker that is always 3x slower as many
connections in flight as the others, each waiting 3x longer; nothing stalls and its queue stays
short, so neither the stall rule nor the overload rule (policy.py) sees it, and long-lived
connections opened at once spread evenly whatever their workers can do. Here each slot gets a
service rate from what the kernel already counts at every sample (eBPF, SOCK_OPS):

- ``completed``: connections its worker let go since the last look, the growth of
  ``handed - in_flight`` (handed: the steering program's per-slot counter; in flight: queued +
  held, inflight.py), which never goes back (see Limits);
- ``busy``: the time it held at least ``SATURATED`` (2) connections, one served and one
  waiting, from the looks (the trapezoid rule over each pair of looks: unbiased over many
  looks). Saturated, a worker completes at its own speed; with one connection in flight
  it also waits for its client, so a lightly loaded worker would look slower than a busy
  one, get less for it and look slower still;
- ``running``: that time less the part its worker spent runnable but waiting for a CPU
  (``waited``, its main thread's run-queue wait, read by the supervisor from
  /proc/PID/schedstat, or the whole look while it is runnable and hardly ran; at most half of
  it): the machine's time, not its worker's speed;
- ``rate = sum(completed while saturated) / sum(running)`` over the recent looks, each older
  look counting ``DECAY`` as much as the next (a window of about 50 looks, 1 s at 20 ms):
  completions per second of work, that is what its worker can serve, not what it was given.
  A rate counts once the slot was found saturated (``busy``) for ``EARLY_BUSY`` (two looks, ~40 ms),
  at first only for a slot far slower than the band (below).

A slot's cost is ``UNIT x reference / its rate``, the reference being the fastest counted
rate or what any slot served per second of the window (a floor of its rate: a fast worker at
low load is too rarely found busy for its own rate to count). The program sends a new
connection to the drawn slot with the smaller ``(in flight + 1) x cost``, the expected wait
of that connection (join the shortest expected delay), so a slot 3x slower holds a third of
the others' in flight. Slots within ``BAND`` (2.5x) of the reference cost ``UNIT``: on this
2-vCPU machine at load 10-14, equal workers measured up to 1.8x apart over 0.2 s windows and
3.4x over 0.4 s (a worker descheduled for a while is slower while it lasts); weighing that
would trade their balance for noise. A slot with no news (no busy look) keeps what was
measured while the window fades (``FADE`` per look: 0.5-1.2 s), then its cost drifts back
to ``UNIT`` (half-way in ``FORGET`` seconds), so a worker that recovered is tried again; a
new worker starts at ``UNIT``.

A worker that turns slower mid-run would wait for the window to forget its fast past (one
turning 3x slower: weighted 0.35-2.4 s after, issue 11). So each slot also keeps the last
~0.1 s (``RECENT`` per look) of the same sums and of its worker's CPU time (its main thread's,
from the supervisor's run-queue reads) against completions; when its worker burned
``CHANGE`` x the CPU a completion of the window, and the recent rate, with ``MIN_BUSY`` of
evidence, is ``CHANGE`` x slower than the window and ``BAND`` x slower than the fastest, the
window starts again from the recent looks (:meth:`Speeds._changed`). A worker that turns
slower without burning more (waiting on its own I/O) is found by the window, as before.

A worker that is slow only sometimes (it stalls 50 ms every 10th request) is the case a rate
cannot weigh: its rate is a mean over stalls and fast stretches; weighted down, it is rarely
found saturated, what was measured fades, its cost drifts back and two choices give it 2-3
connections again, and the next stall catches them all (issue 11: p99 2.6-7.2x a shared
queue's at 2 workers / 16 in flight, the tail its own requests). A shared queue loses one
request to such a stall, the one being served. So a slot the policy catches stalling (its
queue holds connections and it accepted none since the last look) twice within ``SUSPECT``
gets an in-flight cap of ``CAP`` (1) in the kernel program (programs.py: a slot at its cap
is taken only when both draws are at theirs). Once is any hiccup of an equal worker, and
capped for it, that worker lost a share it could serve.

Capped, its queue stays empty and the policy's rule cannot see the next stall, so here a
slot holding no more than its cap, with a connection in flight at two looks and nothing
completed between them (held a whole look, ~20 ms, where a request takes < 1 ms), is
stalled again, unless its worker waited for a CPU for a good part of that time (a busy
machine's descheduling, ``waited``: the supervisor reads it from /proc, and then the
policy's catch does not count either). That renews the cap for ``CAP_HOLD``; with no such
look for that long the cap goes. The cap doubles every ``CAP_STEP`` since the policy last
caught the slot, and goes above ``CAP_MAX``: a worker holding one idle long-lived connection
looks stalled at every look, and a worker that still stalls is caught again by the policy as
soon as its cap lets a second connection queue behind a stall (2 caught, not the 7-8 that a
cap lifted at once let in).

A slot caught stalling but not twice within ``SUSPECT`` is not capped; its cost fades and two
choices give it one connection at a time, never saturated and with an empty queue, so neither
the rate nor the policy sees its next stall. So within ``STALL_MEMORY`` of being seen stalling,
a look it held a connection through and completed none, while another slot got through, gives
it the cost of a stall at once (:meth:`Speeds._again`).

Limits: in flight is not busy for a worker that holds idle long-lived connections while it
serves short ones (it looks slower than it is), and long-lived connections alone complete
nothing, so they say nothing about speed: what was measured before they opened is what
places them. So that they say nothing wrong either: what a slot let go (handed - in flight)
never goes back (the two are read one after the other, and a SYN between them is a dip, not
a completion to count when it ends), and a rate assumes at least ``DOUBT`` completions (one
client leaving made every other slot holding idle connections 64x slower).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["UNIT", "WAITED", "Speeds", "cost_word", "split_word"]

UNIT = 1024  # the cost of a full-speed slot (integers in the kernel)
MAX_COST = 64 * UNIT  # 64x slower or worse: the same (it still gets a trickle)
DECAY = 0.98  # per look: the weight of older looks in the rate
BAND = 2.5  # a slot within this factor of the fastest is as fast
FADE = 0.9  # per look not saturated: the weight of what was measured (gone in ~25 looks)
FORGET = 0.5  # seconds without a rate for half of a slot's extra cost to go
SATURATED = 2  # in flight: one being served, one waiting (its rate is its worker's speed)
MIN_BUSY = 0.08  # seconds of work (decayed) for a rate to count at the full BAND: four looks
EARLY_BUSY = 0.04  # ... and the least: two looks, where the band is BAND x MIN_BUSY / busy (5x)
CAP = 1  # in flight, for a slot caught stalling: a stall catches the one it serves
CAP_HOLD = 0.25  # seconds a cap stays after the last stall seen
CAP_STEP = 2.0  # seconds after the policy caught it, the cap doubles ...
CAP_MAX = 8  # ... and above this, goes
SUSPECT = 1.0  # seconds: caught twice within this, a slot is capped (once is any hiccup)
STALL_MEMORY = 4.0  # seconds after a slot was last seen stalling: stuck again, it costs the most
WAITED = 0.25  # a worker that waited for a CPU this part of a look was descheduled, not stalled
DOUBT = 1.0  # completions a rate assumes at least: none in 40 ms says < 25/s, not 0
RECENT = 0.8  # per look: the weight of older looks in the recent rate (~5 looks, 0.1 s)
CHANGE = 2.0  # the recent CPU a completion this many times the window's: the worker changed
MIN_DONE = 10  # completions for the recent CPU a completion to count


def cost_word(cost: int, cap: int) -> int:
    """What the kernel program reads for a slot (programs.py): the cap (0: none) above the
    cost, in one u64, so that one memory write changes both."""
    return cap << 32 | cost


def split_word(word: int) -> tuple[int, int]:
    """(cost, cap) of a :func:`cost_word`."""
    return word & 0xFFFFFFFF, word >> 32


@dataclass
class _Slot:
    inflight: int
    let_go: int  # the most handed - in flight seen: connections its worker let go
    completed: float = 0.0  # decayed sums: completed while saturated, and that time
    busy: float = 0.0
    running: float = 0.0  # ... of which its worker was not waiting for a CPU
    served: float = 0.0  # completed in all
    elapsed: float = 0.0
    cost: float = UNIT
    late: bool = False  # joined while the others served: its first rate needs MIN_BUSY
    recent: tuple[float, float, float] = (0.0, 0.0, 0.0)  # completed, busy, running: ~0.1 s
    cpu: tuple[float, float] = (0.0, 0.0)  # its worker's CPU seconds and completions: ~1 s
    cpu_recent: tuple[float, float] = (0.0, 0.0)  # ... ~0.1 s
    capped_until: float = 0.0  # capped until then (renewed by each stall seen)
    caught: float = 0.0  # when the policy last caught it stalling, capped
    suspected: float = -SUSPECT  # ... or not yet (a first time)
    stalling: float = -math.inf  # last seen stalling: caught by the policy, or stuck again
    stuck: bool = False  # at the last look: held what it held through a look, completed none


class Speeds:
    """Per-slot service rates and the costs that follow; :meth:`observe` at every sample."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        self._last = 0.0

    def restart(self) -> None:
        """The load starts now (the supervisor was woken by its first connection): the next
        look is where the window starts, not the end of an idle interval that the trapezoid
        rule would count up to half of as work."""
        self._last = 0.0

    def forget(self, slot: int) -> None:
        """A new worker (or none): nothing known about it."""
        self._slots.pop(slot, None)

    def stalled(self, slot: int, now: float) -> None:
        """The policy caught ``slot`` stalling: connections queued, none accepted. Capped if
        it is already, or was caught once before in the last ``SUSPECT`` seconds."""
        if (s := self._slots.get(slot)) is None:
            return
        if self._cap(s, now) or now - s.suspected <= SUSPECT:
            s.caught, s.capped_until = now, now + CAP_HOLD
        s.suspected = s.stalling = now

    def caps(self, now: float) -> dict[int, int]:
        """Each known slot's in-flight cap (0: none). Never a slot without another, not
        capped, at least as fast: what it cannot take must go somewhere that serves it. A
        fast worker caught twice on a busy machine, capped beside a 3x slower one, sent it
        every new connection until its queue overflowed (2 workers, 64 in flight: 259
        requests a second, p99 2.5 s of SYN retransmits)."""
        caps = {slot: self._cap(s, now) for slot, s in self._slots.items()}
        for slot in sorted((s for s in caps if caps[s]), key=lambda s: self._slots[s].cost):
            cost = self._slots[slot].cost
            if not any(not caps[o] and t.cost <= cost for o, t in self._slots.items()):
                caps[slot] = 0
        return caps

    @staticmethod
    def _cap(s: _Slot, now: float) -> int:
        if s.capped_until <= now:
            return 0
        cap = CAP << int((now - s.caught) / CAP_STEP)
        return cap if cap <= CAP_MAX else 0

    def observe(
        self,
        now: float,
        counts: dict[int, tuple[int, int]],
        waited: Mapping[int, float] | None = None,
        looks: float = 1.0,
        cpu: Mapping[int, float] | None = None,
    ) -> dict[int, int]:
        """``counts``: slot -> (handed so far, in flight now) of the slots serving; ``waited``:
        the part of the time since the last look each one's worker was runnable but waiting
        for a CPU (descheduled: not its speed); ``looks``: how many looks of the usual
        cadence this one stands for (a steady supervisor looks less often: the window stays
        ~1 s of time, not 50 looks). Returns every known slot's cost (``UNIT`` x how much
        slower than the fastest)."""
        waited = waited or {}
        dt = now - self._last if self._last else 0.0
        self._last = now
        for slot in [s for s in self._slots if s not in counts]:
            del self._slots[slot]
        again: set[int] = set()  # stalling again (:meth:`_again`)
        done = {  # completed since the last look, per known slot
            slot: max(0, handed - inflight - s.let_go)
            for slot, (handed, inflight) in counts.items()
            if (s := self._slots.get(slot)) is not None
        }
        for slot, (handed, inflight) in counts.items():
            s = self._slots.get(slot)
            if s is None:
                # A worker that joins under load (a respawn) is cold: weighted on 40 ms of
                # evidence, it served less, warmed up later and left its survivors overloaded
                # for longer (a SIGKILL with a 500 ms respawn: +166 ms max, against +90 ms).
                late = any(t.served > 0 for t in self._slots.values())
                self._slots[slot] = _Slot(inflight, handed - inflight, late=late)
                continue
            # Let go so far (handed - in flight) never goes back: a dip is a SYN that came
            # between the two reads (handed first), not a completion to count when it ends.
            let_go = max(s.let_go, handed - inflight)
            completed = let_go - s.let_go
            s.let_go = let_go
            cap = self._cap(s, now - dt)  # at the last look
            # Held what it holds through the look and completed none (a request takes < 1
            # ms), its worker not waiting for a CPU: stalled again, or an idle long-lived
            # connection (so both uses below are bounded in time).
            stuck = s.inflight >= 1 and inflight >= 1 and completed == 0
            stuck = stuck and waited.get(slot, 0.0) < WAITED
            if cap and stuck and s.inflight <= cap:
                s.capped_until = now + CAP_HOLD  # held one a whole look: stalled again
            # ... while the others got through: not a pause of everyone's (a client
            # descheduled before it sent its request holds every worker it talks to)
            others = any(n for o, n in done.items() if o != slot)
            if self._again(s, now, stuck and others):
                again.add(slot)
            if 0.0 < dt < 1.0:
                # The time it had a connection waiting behind the one it serves, from the two
                # looks (trapezoid rule). Not "holds one": a connection is in flight from its
                # SYN, so a lightly loaded worker also holds the client's time to send its
                # request, and looked up to 2x slower than a busy one, got less for it, and
                # looked slower still (equal workers: one of 2 got nothing at 4 in flight).
                busy = dt * ((s.inflight >= SATURATED) + (inflight >= SATURATED)) / 2
                # Not saturated at all: no news of its speed, and what was measured fades
                # faster (a worker stalled for seconds was otherwise kept out for 6-10 s after).
                decay = (DECAY if busy else FADE) ** looks
                # Its time on a run queue is the machine's, not its speed: counted, an equal
                # worker the scheduler starved for a while measured slower, got less, woke up
                # for each request (1.6-2x the CPU per request) and stayed weighted for whole
                # runs (Jain 0.63-0.76). A worker slow on I/O or asleep is not runnable.
                # At most half: a rate from a sliver of running time is mostly noise, and it
                # could become the reference that every other slot is measured against.
                running = max(0.5, 1.0 - waited.get(slot, 0.0))
                s.completed = decay * s.completed + completed * busy / dt  # while saturated
                s.served = DECAY**looks * s.served + completed
                s.busy = decay * s.busy + busy  # the evidence (wall time: found as soon)
                s.running = decay * s.running + busy * running  # the rate's denominator
                s.late = s.late and s.busy < MIN_BUSY
                s.elapsed = DECAY**looks * s.elapsed + dt
                # The recent looks, but for one its worker was descheduled for (it completed
                # next to nothing, and the window would start again from that).
                r = RECENT**looks
                new = (completed * busy / dt, busy, busy * running)
                s.recent = (
                    r * s.recent[0] + new[0],
                    r * s.recent[1] + new[1],
                    r * s.recent[2] + new[2],
                )
                if cpu is not None and slot in cpu:  # CPU a completion, whatever it waited
                    d = DECAY**looks
                    s.cpu = (d * s.cpu[0] + cpu[slot], d * s.cpu[1] + completed)
                    s.cpu_recent = (
                        r * s.cpu_recent[0] + cpu[slot],
                        r * s.cpu_recent[1] + completed,
                    )
            s.inflight = inflight
        rates = {slot: rate for slot, rate in self.rates().items() if rate is not None}
        # The reference: the fastest measured rate, or what a slot served per second of
        # the window (a floor of its rate: a fast worker at low load is mostly idle, too
        # rarely found busy for its rate to count).
        served = [s.served / s.elapsed for s in self._slots.values() if s.elapsed > 0]
        fastest = max([*rates.values(), *served], default=0.0)
        for slot, s in self._slots.items():
            if slot in rates and self._changed(s, fastest):
                rates[slot] = _rate(s.completed, s.running)
            rate = rates.get(slot)
            if slot in again:
                s.cost = MAX_COST  # what a stall measures: nothing completed
                continue
            if rate is None or fastest <= 0:
                if dt > 0:
                    s.cost = UNIT + (s.cost - UNIT) * 0.5 ** (dt / FORGET)
                    if s.cost < BAND * UNIT:  # as fast as the rest (not 1025 forever: ties
                        s.cost = UNIT  # go to the first draw, so it would get nothing)
                continue
            slower = fastest / rate if rate > 0 else MAX_COST / UNIT
            # Little evidence, a wider band: two looks catch a worker 5x slower or worse
            # (issue 11: found within 100 ms of the load starting) and not an equal one
            # descheduled for most of 40 ms; four looks catch one 2.5x slower.
            band = BAND * max(1.0, MIN_BUSY / s.busy)
            s.cost = min(MAX_COST, UNIT * slower) if slower >= band else UNIT
        return {slot: round(s.cost) for slot, s in self._slots.items()}

    @staticmethod
    def _again(s: _Slot, now: float, stuck: bool) -> bool:
        """A slot seen stalling within ``STALL_MEMORY`` and stuck now: it stalls again. A
        rate cannot say so (one connection in flight is not saturated), nor the policy (its
        queue is empty): a worker that stalls 50 ms every 10th request, caught when a second
        connection queued behind a stall, had its cost fade in ~2 s to where two choices gave
        it one at a time, and served on, each tenth request caught by a stall (14 stalls in
        0.75 s, until a second one queued again; 4.5 a second in all, 0.25 of the 8 clients
        stuck on it, issue 11). Stuck again after it completed some (a new stall, not the same
        one) renews what is remembered; one stuck look after another does not: a worker
        holding an idle long-lived connection, caught once, is held back ``STALL_MEMORY``
        at most."""
        again = stuck and now - s.stalling <= STALL_MEMORY
        if again and not s.stuck:
            s.stalling = now
        s.stuck = stuck
        return again

    @staticmethod
    def _changed(s: _Slot, fastest: float) -> bool:
        """A worker that turns slower mid-run: the window (~1 s) must forget the fast past
        before its rate is ``BAND`` behind, which took 0.35-2.4 s (median 0.77) for one
        turning 3x slower. So when over the last ~0.1 s its worker burned ``CHANGE`` x the
        CPU a completion of the window (it changed, whatever the machine did: a worker
        descheduled takes longer, not more CPU, a request), and its rate then, with
        ``MIN_BUSY`` of evidence, is ``CHANGE`` x slower than the window and ``BAND`` x
        slower than the fastest, the window starts again from the last ~0.1 s. Returns
        whether it did.

        Not the rate alone: on a busy machine an equal worker's rate over 0.1 s is 3x off
        its window now and then (its clients starved of a CPU send their requests late;
        tried: equal workers weighted in 5 of 8 runs). Only slower, and only to be weighed:
        a window started again is short and changes fast while it grows, and one started
        faster could raise the reference the others are measured against. A worker that
        recovered comes back as before (no news: it fades)."""
        completed, busy, running = s.recent
        if busy < MIN_BUSY or s.busy <= busy:
            return False
        recent = _rate(completed, running)
        window = _rate(s.completed, s.running)
        if recent * CHANGE >= window or recent * BAND > fastest:
            return False
        cpu, done = s.cpu_recent
        window_cpu, window_done = s.cpu
        if done < MIN_DONE or window_done < 2 * done or window_cpu <= 0:
            return False
        if cpu / done < CHANGE * window_cpu / window_done:
            return False
        s.completed, s.busy, s.running = s.recent
        return True

    def even(self, spread: float) -> bool:
        """Every slot has a rate, none ``spread`` x slower than the fastest, none costs more
        than ``UNIT`` nor is capped: nothing being learned or held back (the supervisor may
        look less often)."""
        rates = self.rates().values()
        known = [r for r in rates if r is not None]
        if len(known) < len(rates) or any(round(s.cost) != UNIT for s in self._slots.values()):
            return False
        if any(s.capped_until > self._last for s in self._slots.values()):
            return False
        return not known or max(known) <= spread * min(known)

    def rates(self) -> dict[int, float | None]:
        """Completions per second of work per slot (None: not measured yet)."""
        slots = self._slots.items()
        return {
            s: (
                _rate(t.completed, t.running)
                if t.busy >= (MIN_BUSY if t.late else EARLY_BUSY)
                else None
            )
            for s, t in slots
        }


def _rate(completed: float, running: float) -> float:
    """Completions per second of running time; a slot that completed less than ``DOUBT`` in
    it counts as ``DOUBT`` (none in 40 ms says < 25/s, not 0)."""
    return max(completed, DOUBT) / max(running, 1e-9)

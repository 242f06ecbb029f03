"""How fast each slot serves, measured from the kernel's counts: the cost the TCP program weighs
connections in flight by (issue 11). Pure: samples in, costs out.

Two choices by connections in flight alone give a worker that is always 3x slower as many
connections in flight as the others, each waiting 3x longer; nothing stalls and its queue stays
short, so neither the stall rule nor the overload rule (policy.py) sees it, and long-lived
connections opened at once spread evenly whatever their workers can do. Here each slot gets a
service rate from what the kernel already counts at every sample (eBPF, SOCK_OPS):

- ``completed = handed - handed' - (in_flight - in_flight')``: connections its worker let go
  since the last look (handed: the steering program's per-slot counter; in flight: queued +
  held, inflight.py);
- ``busy``: the time it held at least ``SATURATED`` (2) connections, one served and one
  waiting, from the looks (the trapezoid rule over each pair of looks: unbiased over many
  looks). Saturated, a worker completes at its own speed; with one connection in flight
  it also waits for its client, so a lightly loaded worker would look slower than a busy
  one, get less for it and look slower still;
- ``rate = sum(completed while saturated) / sum(busy)`` over the recent looks, each older
  look counting ``DECAY`` as much as the next (a window of about 50 looks, 1 s at 20 ms):
  completions per second of work, that is what its worker can serve, not what it was given.
  A rate counts once the slot was found saturated for ``EARLY_BUSY`` (two looks, ~40 ms),
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

Limits: in flight is not busy for a worker that holds idle long-lived connections while it
serves short ones (it looks slower than it is), and long-lived connections alone complete
nothing, so they say nothing about speed: what was measured before they opened is what
places them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["UNIT", "Speeds"]

UNIT = 1024  # the cost of a full-speed slot (integers in the kernel)
MAX_COST = 64 * UNIT  # 64x slower or worse: the same (it still gets a trickle)
DECAY = 0.98  # per look: the weight of older looks in the rate
BAND = 2.5  # a slot within this factor of the fastest is as fast
FADE = 0.9  # per look not saturated: the weight of what was measured (gone in ~25 looks)
FORGET = 0.5  # seconds without a rate for half of a slot's extra cost to go
SATURATED = 2  # in flight: one being served, one waiting (its rate is its worker's speed)
MIN_BUSY = 0.08  # seconds of work (decayed) for a rate to count at the full BAND: four looks
EARLY_BUSY = 0.04  # ... and the least: two looks, where the band is BAND x MIN_BUSY / busy (5x)


@dataclass
class _Slot:
    handed: int
    inflight: int
    completed: float = 0.0  # decayed sums: completed while saturated, and that time
    busy: float = 0.0
    served: float = 0.0  # completed in all
    elapsed: float = 0.0
    cost: float = UNIT
    late: bool = False  # joined while the others served: its first rate needs MIN_BUSY


class Speeds:
    """Per-slot service rates and the costs that follow; :meth:`observe` at every sample."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        self._last = 0.0

    def forget(self, slot: int) -> None:
        """A new worker (or none): nothing known about it."""
        self._slots.pop(slot, None)

    def observe(self, now: float, counts: dict[int, tuple[int, int]]) -> dict[int, int]:
        """``counts``: slot -> (handed so far, in flight now) of the slots serving; returns
        every known slot's cost (``UNIT`` x how much slower than the fastest)."""
        dt = now - self._last if self._last else 0.0
        self._last = now
        for slot in [s for s in self._slots if s not in counts]:
            del self._slots[slot]
        for slot, (handed, inflight) in counts.items():
            s = self._slots.get(slot)
            if s is None:
                # A worker that joins under load (a respawn) is cold: weighted on 40 ms of
                # evidence, it served less, warmed up later and left its survivors overloaded
                # for longer (a SIGKILL with a 500 ms respawn: +166 ms max, against +90 ms).
                late = any(t.served > 0 for t in self._slots.values())
                self._slots[slot] = _Slot(handed, inflight, late=late)
                continue
            completed = max(0, handed - s.handed - (inflight - s.inflight))
            if 0.0 < dt < 1.0:
                # The time it had a connection waiting behind the one it serves, from the two
                # looks (trapezoid rule). Not "holds one": a connection is in flight from its
                # SYN, so a lightly loaded worker also holds the client's time to send its
                # request, and looked up to 2x slower than a busy one, got less for it, and
                # looked slower still (equal workers: one of 2 got nothing at 4 in flight).
                busy = dt * ((s.inflight >= SATURATED) + (inflight >= SATURATED)) / 2
                # Not saturated at all: no news of its speed, and what was measured fades
                # faster (a worker stalled for seconds was otherwise kept out for 6-10 s after).
                decay = DECAY if busy else FADE
                s.completed = decay * s.completed + completed * busy / dt  # while saturated
                s.served = DECAY * s.served + completed
                s.busy = decay * s.busy + busy
                s.late = s.late and s.busy < MIN_BUSY
                s.elapsed = DECAY * s.elapsed + dt
            s.handed, s.inflight = handed, inflight
        rates = {slot: rate for slot, rate in self.rates().items() if rate is not None}
        # The reference: the fastest measured rate, or what a slot served per second of
        # the window (a floor of its rate: a fast worker at low load is mostly idle, too
        # rarely found busy for its rate to count).
        served = [s.served / s.elapsed for s in self._slots.values() if s.elapsed > 0]
        fastest = max([*rates.values(), *served], default=0.0)
        for slot, s in self._slots.items():
            rate = rates.get(slot)
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

    def rates(self) -> dict[int, float | None]:
        """Completions per second of work per slot (None: not measured yet)."""
        slots = self._slots.items()
        return {
            s: (t.completed / t.busy if t.busy >= (MIN_BUSY if t.late else EARLY_BUSY) else None)
            for s, t in slots
        }

"""Which slot each of K buckets sends to: weights in, a bucket table out. Pure; no kernel.

A steering program maps every new connection (or UDP datagram) to one of ``BUCKETS`` buckets
(TCP: a random or hash value, UDP: a hash of the flow's source address and port) and sends it to
the slot that owns the bucket. A slot's share of new connections is the number of buckets it owns
over ``BUCKETS``, so weights become bucket counts (:func:`apportion`).

UDP needs more than counts: a flow stays on its bucket, so the table must change as little as
possible. Each bucket has a *home* slot (its owner when every slot is in). :meth:`Buckets.assign`
moves a bucket only if its owner has more buckets than it should:

- a slot excluded: only its buckets move, spread over the others; no other flow moves;
- the slot back: the others give back first the buckets whose home it is, so its flows return
  (even if another slot goes out at the same time: those who held them get that one's);
- a slot removed (scale down): its home buckets get new homes where they are now, so nothing
  moves when it goes; a slot added takes a fair part of every other slot's home buckets.

TCP has no flows to keep (a new connection may go anywhere), but the same table keeps eBPF map
updates few; the classic BPF program for TCP is built from counts as contiguous runs
(:func:`contiguous`), which is shorter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["BUCKETS", "Buckets", "apportion", "contiguous", "runs"]

BUCKETS = 1024  # >= the most slots (1024); a share resolution of 0.1%


def apportion(weights: Mapping[int, float], total: int = BUCKETS) -> dict[int, int]:
    """Bucket counts proportional to ``weights`` (largest remainder), summing to ``total``.

    Every slot with a weight > 0 gets at least one bucket; slots with weight 0 get none. Ties go
    to the lower slot number, so the result is deterministic.
    """
    live = {slot: w for slot, w in weights.items() if w > 0}
    if not live:
        raise ValueError("no slot has a weight above 0: a table needs at least one slot")
    if len(live) > total:
        raise ValueError(f"{len(live)} slots do not fit in {total} buckets")
    # One bucket each first, the rest in proportion.
    rest = total - len(live)
    whole = sum(live.values())
    exact = {slot: rest * w / whole for slot, w in live.items()}
    counts = {slot: 1 + int(x) for slot, x in exact.items()}
    left = total - sum(counts.values())
    by_remainder = sorted(live, key=lambda s: (-(exact[s] - int(exact[s])), s))
    for slot in by_remainder[:left]:
        counts[slot] += 1
    return counts


def contiguous(counts: Mapping[int, int]) -> list[int]:
    """The table with each slot's buckets in one run, slots in ascending order."""
    table: list[int] = []
    for slot in sorted(counts):
        table += [slot] * counts[slot]
    return table


def runs(table: Sequence[int]) -> list[tuple[int, int]]:
    """``(end, slot)`` for each run of equal owners: buckets ``[previous end, end)`` go to slot."""
    out: list[tuple[int, int]] = []
    for bucket, slot in enumerate(table):
        if out and out[-1][1] == slot:
            out[-1] = (bucket + 1, slot)
        else:
            out.append((bucket + 1, slot))
    return out


class Buckets:
    """A bucket table that changes as little as it can (see the module notes)."""

    def __init__(self, slots: Iterable[int], size: int = BUCKETS) -> None:
        order = sorted(slots)
        if not order:
            raise ValueError("a bucket table needs at least one slot")
        if len(order) > size:
            raise ValueError(f"{len(order)} slots do not fit in {size} buckets")
        self.size = size
        self.home = [order[b * len(order) // size] for b in range(size)]
        self.owner = list(self.home)

    @property
    def slots(self) -> list[int]:
        return sorted(set(self.home))

    def count(self, slot: int) -> int:
        return self.owner.count(slot)

    def add_slot(self, slot: int) -> None:
        """Give a new slot a fair part of the others' home buckets (its owner changes when the
        table is next assigned with the slot in)."""
        if slot in self.home:
            raise ValueError(f"slot {slot} is already in the table")
        others = self.slots
        if len(others) + 1 > self.size:
            raise ValueError(f"{len(others) + 1} slots do not fit in {self.size} buckets")
        want = self.size // (len(others) + 1)
        homes = {s: [b for b, h in enumerate(self.home) if h == s] for s in others}
        # Take from the slots with the most home buckets, from the end of their ranges.
        for _ in range(want):
            richest = max(others, key=lambda s: (len(homes[s]), -s))
            self.home[homes[richest].pop()] = slot

    def remove_slot(self, slot: int) -> None:
        """Forget a slot. Its home buckets get the slot that owns them now as their home (so no
        flow moves when it goes); buckets it still owns are spread like an exclusion."""
        if slot not in self.home:
            raise ValueError(f"slot {slot} is not in the table")
        others = [s for s in self.slots if s != slot]
        if not others:
            raise ValueError("cannot remove the last slot of a table")
        if slot in self.owner:  # normally excluded first; else spread its buckets now
            counts = {s: self.count(s) for s in others}
            spread = self.count(slot)
            for i, s in enumerate(others):
                counts[s] += spread // len(others) + (1 if i < spread % len(others) else 0)
            self.assign(counts)
        for bucket, home in enumerate(self.home):
            if home == slot:
                self.home[bucket] = self.owner[bucket]

    def assign(self, counts: Mapping[int, int]) -> list[int]:
        """Make each slot own ``counts[slot]`` buckets (0 if absent), moving as few as possible.

        Returns the buckets whose owner changed.
        """
        if sum(counts.values()) != self.size or any(c < 0 for c in counts.values()):
            raise ValueError(f"bucket counts must be >= 0 and sum to {self.size}: {counts}")
        unknown = set(counts) - set(self.home)
        if unknown:
            raise ValueError(f"slots {sorted(unknown)} are not in the table")
        held: dict[int, list[int]] = {}
        for bucket, slot in enumerate(self.owner):
            held.setdefault(slot, []).append(bucket)
        deficit = {s: counts.get(s, 0) - len(held.get(s, [])) for s in set(self.home)}
        free: list[int] = []
        for slot, buckets in held.items():
            surplus = -deficit[slot]
            if surplus <= 0:
                continue

            def give_first(b: int, slot: int = slot) -> tuple[int, int]:
                home = self.home[b]
                if home != slot and deficit.get(home, 0) > 0:
                    return (0, b)  # its home slot wants it back
                return (1, b) if home != slot else (2, -b)  # then borrowed ones, then our own

            free += sorted(buckets, key=give_first)[:surplus]
        free.sort()
        moved: list[int] = []
        need = {s: d for s, d in deficit.items() if d > 0}
        # Home buckets go home first.
        rest: list[int] = []
        for bucket in free:
            home = self.home[bucket]
            if need.get(home, 0) > 0:
                need[home] -= 1
                self._move(bucket, home, moved)
            else:
                rest.append(bucket)
        # A slot that still needs buckets takes back its home buckets from a slot whose own
        # home buckets are free now: a swap, each back home. Without it, a slot back in as
        # another went out in the same assignment (an adopter seeded mid-handover, finding a
        # slot with no worker) kept the outgoing slot's buckets and left its own lent; once
        # both were in, they had swapped a third of their buckets for good (the flows of two
        # healthy slots moved).
        spare: dict[int, list[int]] = {}
        for bucket in rest:
            spare.setdefault(self.home[bucket], []).append(bucket)
        swapped: set[int] = set()
        for bucket, home in enumerate(self.home):
            holder = self.owner[bucket]
            if need.get(home, 0) > 0 and holder != home and spare.get(holder):
                need[home] -= 1
                self._move(bucket, home, moved)
                back = spare[holder].pop()
                self._move(back, holder, moved)
                swapped.add(back)
        rest = [b for b in rest if b not in swapped]
        # The rest in contiguous runs, to the slots that still need buckets, lowest slot first.
        takers = iter(sorted((s, n) for s, n in need.items() if n > 0))
        slot, n = next(takers, (-1, 0))
        for bucket in rest:
            while n == 0:
                slot, n = next(takers)
            self._move(bucket, slot, moved)
            n -= 1
        return moved

    def _move(self, bucket: int, slot: int, moved: list[int]) -> None:
        if self.owner[bucket] != slot:
            self.owner[bucket] = slot
            moved.append(bucket)

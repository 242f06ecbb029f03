"""Which slots get new connections, and with what weight. Pure: observations in, verdicts out.

Everything that decides steering lives here; the kernel side (classic or eBPF programs) only
carries the result out, and the supervisor only reports what it sees.

Inputs, per slot, at every step: its health (from the supervisor's worker states) and, when the
queues were sampled, the accept-queue depth of its TCP listeners.

- Hard exclusions, from health: no worker (it died; until its replacement is ready), starting
  (a worker is there but not ready yet), draining (its only worker is being retired), removing
  (scale down: the socket closes soon). During a reload the new worker is ready before the old
  one drains, so the slot stays in.
- Overload (TCP only): a slot whose queue is long both in absolute terms and per unit of its
  share compared with the rest (``q_i / s_i >= 4 x (Q_rest + 1) / S_rest``, ``q_i >= 8``) is out
  at once; it is back when its queue has drained (``q_i <= 1``): the gap between 8 and 1 is the
  hysteresis. Each overload halves the slot's weight, so it comes back at half its share.
- Weights (TCP only): the expected wait in slot i's queue is ``q_i / (s_i x R)`` (Little's law,
  R the arrival rate, the same for all), so ``q_i / s_i`` compared with the rest's says whether
  a slot serves its share. A slot whose smoothed ratio is >= 2 (and queue >= 2) loses 20% of its
  weight per sample; one at <= 1.25 (or with an empty queue) gains 5%, up to full weight. So a
  slow slot settles near what it can serve instead of stalling again at a full share.
- UDP has no accept queue: its tables follow the hard exclusions only (a weight change would
  move flows).
- Never every slot out: if no slot qualifies, the best class present goes in (overloaded but
  ready, then draining, then starting, then those with no worker); removing slots never.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Change", "Health", "Observation", "Params", "Policy", "Verdict"]


class Health(enum.Enum):
    READY = "ready"
    STARTING = "starting"  # its worker is not ready yet
    DRAINING = "draining"  # its only worker is being retired
    DOWN = "no worker"  # died; waiting for the replacement
    REMOVING = "removing"  # scale down: its socket closes soon


# Who goes in when no slot qualifies, best first.
_FALLBACK = (Health.DRAINING, Health.STARTING, Health.DOWN)


@dataclass(frozen=True)
class Params:
    overload_queue: int = 8  # an overloaded slot has at least this many queued connections
    overload_ratio: float = 4.0  # ... and this many times the rest's queue per unit of share
    recover_queue: int = 1  # an overloaded slot is back once its queue is down to this
    slow_queue: float = 2.0  # weights go down only for a smoothed queue at least this long
    slow_ratio: float = 2.0  # ... whose wait ratio to the rest is at least this
    fast_ratio: float = 1.25  # weights go up below this ratio (or with a nearly empty queue)
    decrease: float = 0.8  # per sample, while slow
    increase: float = 1.05  # per sample, while keeping up
    min_weight: float = 1 / 256  # relative to a full share: a slow slot still gets a trickle
    smoothing: float = 0.25  # EWMA weight of the newest queue sample


@dataclass(frozen=True)
class Observation:
    slot: int
    pid: int | None
    health: Health
    queued: int | None = None  # TCP accept-queue depth now; None when not sampled


@dataclass(frozen=True)
class Verdict:
    included: bool  # gets new TCP connections
    reason: str | None  # why it is out (or why it is in although it should be out)
    weight: float  # relative capacity, 0..1 (a full share is 1)
    udp_included: bool  # gets new UDP flows (hard exclusions only)


@dataclass(frozen=True)
class Change:
    """A change worth a log line: ``slot N pid P: steering: TEXT``."""

    slot: int
    pid: int | None
    text: str
    kind: str  # out | in | weight | all_out
    warn: bool = False


@dataclass
class _Track:
    pid: int | None = None
    health: Health = Health.STARTING
    weight: float = 1.0
    overloaded: bool = False
    overload_why: str = ""
    back_why: str = ""  # why it came back in, for the log line
    smoothed: float = 0.0  # EWMA of the queue depth
    queued: int = 0
    level: int = 0  # weight band last reported: floor(log2(1 / weight))
    verdict: Verdict | None = None


class Policy:
    """The steering state of every slot; :meth:`observe` advances it one step."""

    def __init__(self, params: Params | None = None) -> None:
        self.params = params or Params()
        self._tracks: dict[int, _Track] = {}
        self._fallback = ""

    # ---- inputs -----------------------------------------------------------------------------

    def forget(self, slot: int) -> None:
        self._tracks.pop(slot, None)

    def observe(self, observations: Iterable[Observation]) -> list[Change]:
        """Take this step's observations; return the changes worth logging."""
        obs = list(observations)
        changes: list[Change] = []
        for o in obs:
            t = self._tracks.setdefault(o.slot, _Track())
            t.pid = o.pid
            if o.health is not t.health and o.health is Health.READY:
                t.back_why = f"its worker is ready (was {t.health.value})"
            t.health = o.health
            if o.health is not Health.READY:
                t.overloaded = False  # judged afresh once a worker serves it again
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
            t.smoothed += p.smoothing * (t.queued - t.smoothed)
            if t.overloaded and t.queued <= p.recover_queue:
                t.overloaded = False
                t.back_why = f"its queue drained; at weight {t.weight:.2f}"
        # Compare each serving slot with the rest of the serving slots.
        serving = [
            o.slot for o in sampled if o.slot in shares and not self._tracks[o.slot].overloaded
        ]
        for slot in list(serving):
            t = self._tracks[slot]
            rest = [s for s in serving if s != slot]
            share, rest_share = shares[slot], sum(shares[s] for s in rest)
            if not rest or rest_share <= 0:
                self._raise(t)  # nothing to compare with
                continue
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
                t.weight = max(p.min_weight, t.weight * 0.5)
                t.level = _level(t.weight)  # the exclusion's own line says so
                serving.remove(slot)
                continue
            rest_smoothed = sum(self._tracks[s].smoothed for s in rest)
            ratio = (t.smoothed / share) / ((rest_smoothed + 1) / rest_share)
            if t.smoothed >= p.slow_queue and ratio >= p.slow_ratio:
                t.weight = max(p.min_weight, t.weight * p.decrease)
            elif ratio <= p.fast_ratio or t.smoothed < 1:
                self._raise(t)
        for o in sampled:
            t = self._tracks[o.slot]
            level = _level(t.weight)
            if level != t.level:
                if level > t.level:
                    text = f"weight down to {t.weight:.3f}: it serves less than its share"
                else:
                    text = f"weight up to {t.weight:.3f}: it keeps up with its share"
                changes.append(Change(o.slot, t.pid, text, "weight"))
                t.level = level

    def _raise(self, t: _Track) -> None:
        t.weight = min(1.0, t.weight * self.params.increase)

    # ---- decisions --------------------------------------------------------------------------

    def _decide(self, changes: list[Change]) -> None:
        tracks = self._tracks
        ready = {s for s, t in tracks.items() if t.health is Health.READY}
        tcp_in = {s for s in ready if not tracks[s].overloaded}
        udp_in = set(ready)
        fallback = ""
        if not tcp_in and ready:
            tcp_in = set(ready)
            fallback = "every ready slot is overloaded: steering to all of them"
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
            changes.append(Change(-1, None, fallback, "all_out", warn=True))
        self._fallback = fallback
        for slot, t in sorted(tracks.items()):
            reason = None
            if t.health is not Health.READY:
                reason = t.health.value
            elif t.overloaded:
                reason = t.overload_why
            included = slot in tcp_in
            if included and reason:
                reason = f"{reason}; in anyway: {fallback}"
            verdict = Verdict(included, reason, t.weight, slot in udp_in)
            old, t.verdict = t.verdict, verdict
            if old is None or (old.included, old.udp_included) == (included, slot in udp_in):
                continue
            if not included:
                warn = t.health is Health.DOWN or t.overloaded
                changes.append(Change(slot, t.pid, f"excluded: {reason}", "out", warn=warn))
            elif reason is None:
                changes.append(Change(slot, t.pid, f"back in: {t.back_why}", "in"))

    # ---- outputs ----------------------------------------------------------------------------

    @property
    def fallback(self) -> str:
        """Why slots that should be out are in (every slot would be out), or ""."""
        return self._fallback

    def verdicts(self) -> dict[int, Verdict]:
        return {s: t.verdict for s, t in sorted(self._tracks.items()) if t.verdict is not None}

    def tcp_weights(self) -> dict[int, float]:
        """Weights of the slots that get new TCP connections (never empty once observed)."""
        return {s: v.weight for s, v in self.verdicts().items() if v.included}

    def udp_weights(self) -> dict[int, float]:
        """Equal weights for the slots that get new UDP flows."""
        return {s: 1.0 for s, v in self.verdicts().items() if v.udp_included}


def _level(weight: float) -> int:
    return math.floor(math.log2(1 / weight) + 1e-9) if weight < 1 else 0

"""/metrics at many slots (issue 17): per-slot families stay a fixed number of series per
slot, and supervisor-wide totals (slots by state, ready, connections, queued) sum them.
Rendered from a Status built here through the same registry the supervisor serves."""

from __future__ import annotations

import re

from prometheus_client import generate_latest

from portshard.supervisor.web import metrics_registry

from .test_render_compact import many, ready, status


def scrape(n: int | None = None) -> str:
    slots = many() if n is None else tuple(ready(i) for i in range(n))
    st = status(slots)
    return generate_latest(metrics_registry(lambda: st)).decode()


def series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_totals_by_state_and_sums() -> None:
    text = scrape()
    assert 'portshard_slots{state="ready"} 126.0' in text
    assert 'portshard_slots{state="starting"} 1.0' in text
    assert 'portshard_slots{state="backoff"} 1.0' in text
    assert 'portshard_slots{state="draining"} 0.0' in text
    assert "portshard_workers_ready 126.0" in text
    assert "portshard_connections 126.0" in text
    assert "portshard_accept_queue 17.0" in text
    assert "portshard_slots_excluded 1.0" in text


def test_series_grow_by_a_fixed_count_per_slot() -> None:
    small, large = series(scrape(4)), series(scrape(128))
    per_slot = (len(large) - len(small)) / 124
    assert per_slot == len([s for s in small if 'slot="0"' in s])
    # every per-slot series names one slot; the rest do not grow with slots
    unlabelled = [s for s in large if "slot=" not in s]
    assert len(unlabelled) == len([s for s in small if "slot=" not in s])
    assert len({re.sub(r'slot="\d+"', "", s.rsplit(" ", 1)[0]) for s in large}) == len(
        {re.sub(r'slot="\d+"', "", s.rsplit(" ", 1)[0]) for s in small}
    )

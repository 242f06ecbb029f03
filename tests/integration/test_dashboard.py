"""Metrics, the status API and the live dashboard, served by a real supervisor."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.load.loadgen import Load

from tests.conftest import wait_until
from tests.supervisor_fixture import FDWORKER, PORTSHARD, Running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def sup() -> Iterator[Running]:
    """One supervisor for this file's tests: each reload they make is counted from the status
    it finds, so they hold in any order."""
    with tempfile.TemporaryDirectory(prefix="ps-", dir="/tmp") as d:
        running = Running(
            ["-w", "3", "--metrics", "0", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER],
            Path(d) / "m.sock",
        )
        try:
            running.wait_ready()
            yield running
        finally:
            running.close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_on_a_loopback_port_given_by_status(sup: Running) -> None:
    st = sup.status()
    assert st["metrics"].startswith("http://127.0.0.1:") and st["metrics"].endswith("/metrics")
    with Load("127.0.0.1", sup.port, concurrency=4, max_requests=100) as load:
        load.wait_for(100)
    sup.ctl("reload", "--wait")
    reloads = st["reloads"]["ok"] + 1
    code, text = get(st["metrics"])
    assert code == 200
    for slot in range(3):
        assert f'portshard_slot_state{{slot="{slot}",state="ready"}} 1.0' in text
        assert f'portshard_slot_restarts_total{{slot="{slot}"}} 0.0' in text
        assert f'portshard_slot_backlog{{listen="tcp0",slot="{slot}"}}' in text
    assert f'portshard_reloads_total{{result="ok"}} {reloads}.0' in text
    assert "portshard_kernel_listen_overflows_total" in text
    assert "portshard_kernel_listen_drops_total" in text
    assert "portshard_workers 3.0" in text

    def handed() -> list[float]:
        text = get(st["metrics"])[1]
        prefix = "portshard_slot_new_connections_total{"
        return [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(prefix)]

    if st["steering"]["backend"] == "ebpf":  # counted by its program (sampled once a second)
        counts = wait_until(lambda: (c := handed()) and sum(c) >= 100 and c, 5, "the counts")
        assert len(counts) == 3
    else:
        assert handed() == []


def test_status_api_history_and_bad_requests(sup: Running) -> None:
    base = sup.status()["dashboard"]
    wait_until(
        lambda: len(json.loads(get(base + "api/status")[1])["history"]["samples"]) >= 2,
        10,
        "two samples",
    )
    code, body = get(base + "api/status")
    data = json.loads(body)
    assert code == 200 and data["status"]["workers"] == 3
    sample = data["history"]["samples"][-1]
    assert {s["slot"] for s in sample["slots"]} == {0, 1, 2}
    assert {"queued", "connections", "pid", "state"} <= set(sample["slots"][0])
    assert any(e["kind"] == "boot" for e in data["history"]["events"])
    later = json.loads(get(base + f"api/status?since={sample['t']}")[1])
    assert all(s["t"] > sample["t"] for s in later["history"]["samples"])
    assert get(base + "api/status?since=soon")[0] == 400
    assert get(base + "nope")[0] == 404
    code, page = get(base)
    assert code == 200 and "<title>portshard</title>" in page


def test_metrics_address_errors_are_clear(short_tmp: Path) -> None:
    res = subprocess.run(
        [
            *PORTSHARD,
            "run",
            "--metrics",
            "127.0.0.1:99999",
            "--listen",
            "tcp://127.0.0.1:0",
            "--control",
            str(short_tmp / "x.sock"),
            "--",
            *FDWORKER,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0 and "port 99999 is out of range" in res.stderr
    assert "Traceback" not in res.stderr


def chromium(*args: str, profile: Path) -> str:
    assert CHROMIUM is not None
    res = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=4000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    return res.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_dashboard_in_a_real_browser_shows_every_worker_and_updates(
    sup: Running, short_tmp: Path
) -> None:
    url = sup.status()["dashboard"]
    dom = chromium("--dump-dom", url, profile=short_tmp / "chrome")
    for pid in sup.pids():
        assert f'data-pid="{pid}"' in dom, dom[:2000]
    updates = int(dom.split('data-updates="', 1)[1].split('"', 1)[0])
    assert updates >= 2  # it polled again by itself
    sup.ctl("reload", "--wait")
    dom = chromium("--dump-dom", url, profile=short_tmp / "chrome")
    for pid in sup.pids():  # the new workers
        assert f'data-pid="{pid}"' in dom
    assert 'data-kind="reload"' in dom
    counted = sup.status()["steering"]["backend"] == "ebpf"
    assert ("share of new connections" in dom) == counted
    # The new-connections-per-second chart: a line per slot where eBPF steering counts them,
    # else a note saying they are not counted.
    rate = dom.split('id="rate-chart"', 1)[1].split("</svg>", 1)[0]
    note = dom.split('id="rate-note">', 1)[1].split("</div>", 1)[0]
    if counted:
        assert rate.count("<polyline") == 3 and note == ""
    else:
        assert "<polyline" not in rate and "not counted under this steering backend" in note
    # Clock times are 24-hour: no AM/PM anywhere, HH:MM:SS in the events and on the charts.
    assert not re.search(r"\d{1,2}:\d{2}(:\d{2})?\s?[AaPp]\.?[Mm]\b", dom), dom[-3000:]
    assert re.search(r'<li data-kind="reload"><b>\d{2}:\d{2}:\d{2} </b>', dom)
    assert re.search(r'class="clock">\d{2}:\d{2}:\d{2}<', dom)
    shot = short_tmp / "dashboard.png"
    chromium("--window-size=1200,760", f"--screenshot={shot}", url, profile=short_tmp / "chrome")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

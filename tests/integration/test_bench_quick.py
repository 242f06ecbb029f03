"""`make bench-quick`, as a test, so the benchmark suite cannot rot.

It runs the quick suite for real (every scenario, real servers and loads on loopback) and checks
what it writes: the report, every figure in the JSON, the plots. It never checks a timing or a
ratio: on a shared 2-vCPU machine those belong in the report, not in an assertion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.supervisor_fixture import no_process_left

SCENARIOS = ["s1_accept", "s2_nginx", "s3_overhead", "s4_reload", "s5_slow", "s6_udp"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench")
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert res.returncode == 0, f"bench --quick exited {res.returncode}:\n{res.stderr[-4000:]}"
    return out, json.loads((out / "results.json").read_text()), res.stderr


@pytest.mark.timeout(300)
def test_quick_bench_writes_every_scenario(quick: tuple[Path, dict[str, Any], str]) -> None:
    _, data, _ = quick
    assert set(SCENARIOS) <= set(data["scenarios"])
    for key in ("cpus", "kernel", "steal_at_start", "cpu_model"):
        assert key in data["machine"], key
    assert data["quick"] is True and data["interrupted"] is False
    assert {"runs", "repeated", "steal_median", "others_median"} <= set(data["noise"])
    assert data["headline"], "no headline rows"
    for key in SCENARIOS:
        sc = data["scenarios"][key]
        assert sc["configs"] and sc["metrics"], key
        ran = {r["config"] for r in sc["runs"]}
        for cfg in sc["configs"]:
            assert cfg["key"] in ran or cfg["skip"], f"{key}/{cfg['key']} neither ran nor skipped"
        for run in sc["runs"]:
            assert run["error"] is None, f"{key}/{run['config']}: {run['error']}"
            assert run["metrics"], f"{key}/{run['config']}: no figures"
            assert run["cpu"] is not None and "steal" in run["cpu"], f"{key}/{run['config']}"


@pytest.mark.timeout(300)
def test_quick_bench_figures_have_the_expected_keys(
    quick: tuple[Path, dict[str, Any], str],
) -> None:
    _, data, _ = quick
    http = {"rps", "p50_ms", "p99_ms", "max_ms", "jain", "failed", "cpu_server", "cpu_wrk"}
    for key in ("s1_accept", "s2_nginx", "s3_overhead", "s5_slow"):
        for run in data["scenarios"][key]["runs"]:
            assert http <= set(run["metrics"]), (key, run["config"], sorted(run["metrics"]))
            assert run["detail"]["shares"], (key, run["config"])
            assert run["detail"]["probe_cdf_ms"], (key, run["config"])
    for run in data["scenarios"]["s4_reload"]["runs"]:
        assert {"failed_per_reload", "requests", "reload_s"} <= set(run["metrics"])
    s6 = {r["config"]: r["metrics"] for r in data["scenarios"]["s6_udp"]["runs"]}
    assert "dgrams" in s6["tp/single"] and "moved" in s6["fl/portshard"]
    # Ratios against the baseline, paired within rounds, for the figures that have them.
    s1 = {c["key"]: c for c in data["scenarios"]["s1_accept"]["configs"]}
    assert {"rps", "p99_ms"} <= set(s1["close/reuseport"]["ratios"])
    assert {"median", "min", "max", "n"} <= set(s1["close/reuseport"]["summary"]["rps"])


@pytest.mark.timeout(300)
def test_quick_bench_tools_present_were_used(quick: tuple[Path, dict[str, Any], str]) -> None:
    """A tool installed here (make test installs them) is never silently skipped."""
    _, data, _ = quick
    s2 = {c["key"]: c for c in data["scenarios"]["s2_nginx"]["configs"]}
    if shutil.which("nginx"):
        assert s2["close/nginx-reuseport"]["skip"] is None
    if shutil.which("haproxy"):
        assert s2["close/haproxy"]["skip"] is None
    if os.geteuid() == 0 and shutil.which("unshare"):
        s4 = {c["key"]: c for c in data["scenarios"]["s4_reload"]["configs"]}
        assert s4["naive-migrate"]["skip"] is None


@pytest.mark.timeout(300)
def test_quick_bench_report_and_plots(quick: tuple[Path, dict[str, Any], str]) -> None:
    out, data, stderr = quick
    report = (out / "report.md").read_text()
    assert "## Headline" in report and "## How these figures were measured" in report
    for sc in data["scenarios"].values():
        assert f"## {sc['title']}" in report
        assert sc["plots"], f"{sc['title']}: no plot"
        for name in sc["plots"]:
            assert (out / name).read_bytes()[:8] == PNG, name
            assert f"]({name})" in report, name
    headline = (out / "headline.md").read_text()
    assert headline.count("\n|") >= 3, headline
    assert "left]" in stderr, "no progress lines"  # "[ 3/20 0:04 elapsed, ~0:30 left] ..."


@pytest.mark.timeout(300)
def test_quick_bench_leaves_no_process(quick: tuple[Path, dict[str, Any], str]) -> None:
    out, _, _ = quick
    # The HTTP workers and the reload runs carry the results directory in their arguments
    # (--stats, --log): a marker that other benchmarks running meanwhile do not match.
    assert no_process_left(str(out))

"""The soak's report: JSON (everything) and Markdown (what a reader needs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["failure_message", "write"]


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"soak-{report['seed']}"
    js = out / f"{stem}.json"
    md = out / f"{stem}.md"
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md.write_text(markdown(report))
    for name, path in (("latest.json", js), ("latest.md", md)):
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(path.name, link)
    return js, md


def failure_message(report: dict[str, Any]) -> str:
    """The violated properties, the seed and how to rerun (for a test's assertion)."""
    bad = [c for c in report["checks"] if not c["ok"]]
    seed, seconds = report["seed"], round(report["config"]["seconds"])
    lines = [
        f"chaos soak failed (seed {seed}; rerun: make soak SOAK_SEED={seed} SOAK_SECONDS={seconds})"
    ]
    lines += [f"  VIOLATED {c['name']}: {c['detail']}" for c in bad]
    lines.append(f"  operations: {report['operations']}")
    lines.append(f"  requests: {report['requests']}")
    if report.get("lost_traces"):
        lines += ["  lost requests, whose hands (times in s from the start):"]
        lines += [f"    {x}" for x in report["lost_traces"]]
    if report.get("supervisor_log_lost"):
        lines += [
            "  supervisor log, the lines naming a process that held a lost request (or its "
            "worker, or what forked it) and those of the seconds around it:"
        ]
        lines += [f"    {x}" for x in report["supervisor_log_lost"][-80:]]
    lines += ["  supervisor log (tail):"] + [
        f"    {x}" for x in report["supervisor_log_tail"][-15:]
    ]
    if report.get("supervisor_log_file"):
        lines.append(f"  the whole supervisor log: {report['supervisor_log_file']}")
    return "\n".join(lines)


def markdown(r: dict[str, Any]) -> str:
    req = r["requests"]
    lines = [
        f"# portshard chaos soak, seed {r['seed']}",
        "",
        f"{'PASSED' if r['passed'] else 'FAILED'}: {r['seconds']} s, "
        f"{r['operations_total']} operations, {req['ok']} requests ok ({req['per_s']}/s). "
        f"Machine load at the start: {r.get('uptime_before', '?')}; at the end: "
        f"{r.get('uptime_after', '?')}.",
        "",
        "## Properties",
        "",
        "| property | | detail |",
        "|---|---|---|",
    ]
    lines += [
        f"| {c['name']} | {'ok' if c['ok'] else '**VIOLATED**'} | {c['detail']} |"
        for c in r["checks"]
    ]
    lines += _requests(r) + _operations(r) + _resources(r.get("resources") or {})
    lines += ["", "## Left behind after the stop", ""]
    lines += [f"- {k}: {v or 'none'}" for k, v in r["leftovers"].items()]
    if r["lost"]:
        lines += ["", "## Lost requests (first 50)", ""]
        lines += [f"- {f}" for f in r["lost"]]
        lines += ["", "Whose hands:", ""] + [f"- {x}" for x in r.get("lost_traces", [])]
        lines += ["", "The supervisor's lines about them, and around them:", "", "```"]
        lines += [*r.get("supervisor_log_lost", []), "```"]
    lines += ["", "## Supervisor log (tail)", "", "```"] + r["supervisor_log_tail"] + ["```", ""]
    return "\n".join(lines)


def _requests(r: dict[str, Any]) -> list[str]:
    req = r["requests"]
    return [
        "",
        "## Requests",
        "",
        "| ok | failed | in flight at a SIGKILL | in flight at a SIGKILL (unnamed) | lost |",
        "|---|---|---|---|---|",
        f"| {req['ok']} | {req['failed']} | {req['in_flight_at_kill']} | "
        f"{req['in_flight_at_kill_unnamed']} | {req['lost']} |",
        "",
        f"Failed by kind: {req['failed_by_kind'] or 'none'}. Workers SIGKILLed: {len(r['kills'])}; "
        f"children forked on demand: {r['forked']}.",
    ]


def _operations(r: dict[str, Any]) -> list[str]:
    lines = ["", "## Operations", "", "| operation | outcomes |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(r["operations"].items())]
    waits = r.get("flood_probe_wait_s") or {}
    if waits:
        lines += [
            "",
            "A real request behind a flood (it waits for the endpoint's connection cap "
            "and idle timeout) was answered after, in seconds: "
            + "; ".join(
                f"{k}: median {w['median']}, max {w['max']} over {w['floods']:.0f} floods"
                for k, w in waits.items()
            )
            + ".",
        ]
    return lines


def _resources(res: dict[str, Any]) -> list[str]:
    if not res:
        return []
    lines = [
        "",
        "## Supervisor resources (sampled every 0.5 s from /proc)",
        "",
        "| | first | last | max | first third (median) | last third (median) | slope/min |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in (("fds", "fds"), ("rss_kb", "RSS KiB")):
        s = res[key]
        lines.append(
            f"| {label} | {s['first']} | {s['last']} | {s['max']} | "
            f"{s['first_third_median']} | {s['last_third_median']} | "
            f"{s['slope_per_min']:.2f} |"
        )
    lines += [
        "",
        "fds at quiet checkpoints (after an operation, no flood open), by worker count:",
        "",
        "| workers | checkpoints | first third median | last third median | max |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c} | {g['samples']} | {g['first_third_median']} | {g['last_third_median']} "
        f"| {g['max']} |"
        for c, g in res["checkpoint_fds"].items()
    ]
    return lines

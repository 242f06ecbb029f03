"""The portshard benchmark suite: ``python -m bench`` (``make bench``) or ``--quick``
(``make bench-quick``). Writes results.json, report.md, PNG plots and headline.md.

    python -m bench                       every scenario, 3 rounds (about 12 minutes on 2 vCPU)
    python -m bench --quick               a small version of each (under a minute)
    python -m bench --only s1,s5 --rounds 5
    python -m bench --update-readme       also put the headline table into README.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.procs import ROOT, kill_all
from bench.suite import report
from bench.suite.harness import Scenario, ScenarioResult, Settings, plan, run_all
from bench.suite.machine import machine_info
from bench.suite.scenarios import s1_accept, s2_nginx, s3_overhead, s4_reload, s5_slow, s6_udp
from bench.suite.scenarios.common import Env

SCENARIOS: dict[str, Callable[[Settings, Env], Scenario]] = {
    "s1": s1_accept.scenario,
    "s2": s2_nginx.scenario,
    "s3": s3_overhead.scenario,
    "s4": s4_reload.scenario,
    "s5": s5_slow.scenario,
    "s6": s6_udp.scenario,
}
README_START = "<!-- bench:headline:start -->"
README_END = "<!-- bench:headline:end -->"


def settings_from(a: argparse.Namespace) -> Settings:
    cpus = os.cpu_count() or 2
    workers = a.workers or max(2, cpus)
    quick = a.quick
    out = a.out or (ROOT / "bench" / "results" / ("quick" if quick else ""))
    return Settings(
        quick=quick,
        rounds=a.rounds or (1 if quick else 3),
        overhead_rounds=a.rounds or (1 if quick else 5),
        seconds=a.seconds or (1.0 if quick else 3.0),
        workers=workers,
        wrk_connections=max(32, 8 * workers),
        wrk_threads=min(cpus, 4),
        probe_clients=6,
        probe_pause=0.01,
        reloads=1 if quick else 3,
        retries=0 if quick else a.retries,
        retry_budget_s=0.0 if quick else 150.0,
        max_steal=0.02,
        max_foreign=0.10,
        out=out,
        logs=out / "logs",
    )


def portshard_meta(env: Env) -> dict[str, Any]:
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10)
        return res.stdout.strip() if res.returncode == 0 else ""

    try:
        version = metadata.version("portshard")
    except metadata.PackageNotFoundError:
        version = "not installed"
    return {
        "version": version,
        "git": git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--", "src")),
        "options": env.portshard,
    }


def update_readme(headline: str) -> bool:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{headline}{README_END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small version (under a minute)")
    p.add_argument("--only", default="", help="scenarios to run, e.g. s1,s5 (default: all)")
    p.add_argument("--rounds", type=int, default=0, help="rounds (default 3; quick 1)")
    p.add_argument("--seconds", type=float, default=0.0, help="length of one load run")
    p.add_argument("--workers", type=int, default=0, help="workers (default: CPUs, at least 2)")
    p.add_argument("--retries", type=int, default=2, help="repeats of a noisy run")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--update-readme", action="store_true", help="put the headline in README.md")
    a = p.parse_args(argv)
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = [x for x in only if x not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {unknown}; choose from {', '.join(SCENARIOS)}")
    # SIGTERM ends the bench like Ctrl-C: the report of what was measured, no child left.
    signal.signal(signal.SIGTERM, lambda _s, _f: (_ for _ in ()).throw(KeyboardInterrupt()))

    settings = settings_from(a)
    shutil.rmtree(settings.logs, ignore_errors=True)
    settings.logs.mkdir(parents=True, exist_ok=True)
    for old in settings.out.glob("*.png"):
        old.unlink()
    started = time.monotonic()
    machine = machine_info()
    env = Env.probe()
    scenarios = [make(settings, env) for key, make in SCENARIOS.items() if not only or key in only]
    steps = plan(scenarios)
    say = report_line
    say(
        f"portshard bench{' (quick)' if settings.quick else ''}: {len(scenarios)} scenarios, "
        f"{len(steps)} runs, about {sum(c.expect_s for _, c in steps) / 60:.1f} min "
        f"({settings.workers} workers, {machine['cpus']} CPUs, Linux {machine['kernel']}, "
        f"steal {float(str(machine['steal_at_start'])):.1%}); results in {settings.out}"
    )
    for sc in scenarios:
        for cfg in sc.configs:
            if cfg.skip:
                say(f"  {sc.title}: {cfg.label} will not run: {cfg.skip}")
    results: list[ScenarioResult] = []
    interrupted = False
    try:
        run_all(scenarios, settings, results)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: writing the report of what was measured")
    finally:
        kill_all()
    elapsed = round(time.monotonic() - started, 1)
    meta: dict[str, Any] = {
        "version": 1,
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "quick": settings.quick,
        "interrupted": interrupted,
        "finished": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": elapsed,
        "machine": machine,
        "portshard": portshard_meta(env),
    }
    data = report.write(results, settings, meta, settings.out)
    say(f"\nwrote {settings.out}/report.md, results.json, headline.md and the plots")
    say(f"{data['noise']['runs']} runs in {elapsed / 60:.1f} min\n")
    headline = (settings.out / "headline.md").read_text()
    print(headline)
    if a.update_readme:
        if settings.quick or only:
            say("not updating README.md from a quick or partial run")
        elif not update_readme(headline):
            say(f"README.md has no {README_START} ... {README_END} section to update")
        else:
            say("README.md: headline table updated")
    return 130 if interrupted else 0


def report_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

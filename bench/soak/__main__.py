"""python -m bench.soak [--seconds S] [--seed N] [--out DIR]: the chaos soak (make soak)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .report import failure_message, write
from .run import SoakConfig, run_soak

ROOT = Path(__file__).resolve().parent.parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=None, help="replay a run (default: a fresh one)")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak")
    p.add_argument("-v", "--verbose", action="store_true", help="log every operation")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    report = run_soak(
        SoakConfig(
            seconds=args.seconds,
            seed=args.seed,
            workers=args.workers,
            concurrency=args.concurrency,
            keep=args.out,
        )
    )
    js, md = write(report, args.out)
    print(f"soak: {'PASSED' if report['passed'] else 'FAILED'}; report {md} and {js}")
    if not report["passed"]:
        print(failure_message(report), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

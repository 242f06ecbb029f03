"""`python -m bench`: the benchmark suite (bench/suite/cli.py)."""

import sys

from bench.suite.cli import main

sys.exit(main())

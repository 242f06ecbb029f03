"""The chaos soak (issue 14; bench/README.md, "Chaos soak"): a supervisor under load while
random reloads, scale changes, worker SIGKILLs, forking and setsid workers, floods of the
control socket and the metrics endpoint, bad config files and signals hit it, driven only
through public interfaces. ``make soak`` runs it; tests/integration/test_chaos.py runs a short
one."""

from .report import failure_message, write
from .run import SoakConfig, run_soak

__all__ = ["SoakConfig", "failure_message", "run_soak", "write"]

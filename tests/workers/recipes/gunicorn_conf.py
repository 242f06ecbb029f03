"""gunicorn settings for the recipes: the hooks that show a graceful shutdown ran
(worker_exit in each gunicorn worker, on_exit in the master)."""

from __future__ import annotations

import os
from typing import Any


def mark(event: str) -> None:
    """Record that a hook ran: an empty file $PS_MARKERS/EVENT.PID (the tests count them)."""
    if directory := os.environ.get("PS_MARKERS"):
        open(os.path.join(directory, f"{event}.{os.getpid()}"), "w").close()


def worker_exit(server: Any, worker: Any) -> None:
    mark("worker_exit")


def on_exit(server: Any) -> None:
    mark("on_exit")

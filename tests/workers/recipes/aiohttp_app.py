"""An aiohttp server for the recipes: takes the slot's socket at fd 3 (LISTEN_FDS), "pid N" per
request; its on_shutdown hook writes a marker. aiohttp's web.run_app stops gracefully on
SIGTERM (GracefulExit): it stops accepting, finishes requests, runs the hooks."""

from __future__ import annotations

import os
import socket

from aiohttp import web


def mark(event: str) -> None:
    """Record that a hook ran: an empty file $PS_MARKERS/EVENT.PID (the tests count them)."""
    if directory := os.environ.get("PS_MARKERS"):
        open(os.path.join(directory, f"{event}.{os.getpid()}"), "w").close()


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"pid {os.getpid()}\n")


async def on_shutdown(app: web.Application) -> None:
    mark("shutdown")


def main() -> None:
    app = web.Application()
    app.router.add_get("/", hello)
    app.on_shutdown.append(on_shutdown)
    web.run_app(app, sock=socket.socket(fileno=3), print=None, shutdown_timeout=5)


if __name__ == "__main__":
    main()

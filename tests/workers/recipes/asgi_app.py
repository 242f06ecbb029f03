"""An ASGI app for the uvicorn and hypercorn recipes: "pid N" per request, and its lifespan
shutdown writes a marker (what a real app does there: close a database pool, flush logs)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any


def mark(event: str) -> None:
    """Record that a hook ran: an empty file $PS_MARKERS/EVENT.PID (the tests count them)."""
    if directory := os.environ.get("PS_MARKERS"):
        open(os.path.join(directory, f"{event}.{os.getpid()}"), "w").close()


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                mark("startup")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                mark("shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = f"pid {os.getpid()}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})

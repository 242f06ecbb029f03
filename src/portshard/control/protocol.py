"""The control protocol: one JSON object per line, versioned, size-limited.

Request:  {"v": 1, "cmd": "status" | "reload" | "scale" | "stop", ...arguments}
Reply:    {"v": 1, "ok": true, "result": {...}}  or  {"v": 1, "ok": false, "error": "..."}
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ControlError

__all__ = [
    "COMMANDS",
    "MAX_FRAME",
    "VERSION",
    "decode_request",
    "encode",
    "reply_error",
    "reply_ok",
]

VERSION = 1
MAX_FRAME = 64 * 1024
COMMANDS = ("status", "reload", "scale", "stop")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def reply_ok(result: dict[str, Any]) -> bytes:
    return encode({"v": VERSION, "ok": True, "result": result})


def reply_error(message: str) -> bytes:
    return encode({"v": VERSION, "ok": False, "error": message})


def decode_request(line: bytes) -> dict[str, Any]:
    """Parse one request line; raise ControlError with a message fit to send back."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"request is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError("request must be a JSON object")
    version = message.get("v")
    if version != VERSION:
        raise ControlError(
            f"protocol version {version!r} is not supported; this supervisor speaks v{VERSION}"
        )
    cmd = message.get("cmd")
    if cmd not in COMMANDS:
        raise ControlError(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
    return message

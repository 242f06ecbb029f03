"""The control protocol: one JSON object per line, versioned, size-limited.

Request:  {"v": 1, "cmd": "status" | "reload" | "scale" | "stop" | "drain" | "upgrade",
           ...arguments}
          (drain: "settle" and "deadline" in seconds, "wait": reply once stopped)
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
COMMANDS = ("status", "reload", "scale", "stop", "drain", "upgrade")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def reply_ok(result: dict[str, Any]) -> bytes:
    return encode({"v": VERSION, "ok": True, "result": result})


def reply_error(message: str) -> bytes:
    return encode({"v": VERSION, "ok": False, "error": message})


MAX_DIGITS = 18  # no field takes a longer number (scale's workers is 1-1024)
MAX_DEPTH = 32  # arrays and objects nested deeper are refused before json recurses


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ControlError(
            f"request has a number of {len(text.lstrip('-'))} digits: out of range (no field "
            f"takes more than {MAX_DIGITS}; scale's workers is 1-1024)"
        )
    return int(text)


def _too_deep(line: bytes) -> bool:
    """Nesting deeper than MAX_DEPTH outside strings (a request is at most MAX_FRAME)."""
    depth, in_string, escaped = 0, False, False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif byte in b"]}":
            depth -= 1
    return False


def decode_request(line: bytes) -> dict[str, Any]:
    """Parse one request line; raise ControlError with a message fit to send back."""
    if _too_deep(line):  # json.loads would hit the recursion limit (RecursionError)
        raise ControlError(f"request nests arrays or objects deeper than {MAX_DEPTH}")
    try:
        message = json.loads(line, parse_int=_bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"request is not JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a number json cannot take, say
        raise ControlError(f"request is not usable JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError("request must be a JSON object")
    version = message.get("v")
    if type(version) is not int or version != VERSION:  # true == 1.0 == 1 in Python
        raise ControlError(
            f"protocol version {version!r} is not supported; this supervisor speaks v{VERSION}"
        )
    cmd = message.get("cmd")
    if cmd not in COMMANDS:
        raise ControlError(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
    return message

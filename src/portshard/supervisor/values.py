"""The value types of the supervisor's settings and their parsers, one per kind of value.

Every parser takes the raw value (from click, already a str/int/float/tuple, or from the TOML
file, any TOML type) and an ``Origin`` that says where it came from, so that every error names
the setting as the user wrote it (``--workers 0`` or ``workers = true in 'ps.toml'``), the
value, what was expected and the fix. Used by ``settings.py`` (the schema) and ``config.py``.
"""

from __future__ import annotations

import datetime
import grp
import json
import os
import pwd
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..address import Address, parse
from ..errors import AddressError, ConfigError

if TYPE_CHECKING:  # spawn pulls in the seccomp plumbing; the CLI needs only the schema
    from .spawn import Credentials

__all__ = [
    "ListenSpec",
    "Origin",
    "ReadyMode",
    "parse_listen",
    "parse_ready",
    "parse_signal",
    "resolve_user",
]

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
Parser = Callable[[Any, "Origin"], Any]
# The longest string the kernel passes to a program, NUL included (execve(2): 32 pages): a
# longer argument or NAME=value failed every spawn with E2BIG, "Argument list too long",
# found only once the sockets were open, and `run --check` said the settings were fine.
MAX_ARG_STRLEN = 32 * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ListenSpec:
    name: str  # LISTEN_FDNAMES entry and {fd:NAME} placeholder
    address: Address


@dataclass(frozen=True)
class ReadyMode:
    kind: str  # "accept" | "notify" | "delay"
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"delay:{self.seconds:g}" if self.kind == "delay" else self.kind


def _kind(value: Any) -> str:
    """What a TOML (or JSON) value is, in words."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date or time"
    return f"a {type(value).__name__}"


def shown(value: Any) -> str:
    """A value as TOML would write it, cut short (a 5,000-digit number is not repeated)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)  # TOML's basic strings escape the same
    elif isinstance(value, int):
        text = str(value) if abs(value) < 10**60 else "<a number of more than 60 digits>"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(shown(v) for v in list(value)[:8]) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k} = {shown(v)}" for k, v in list(value.items())[:8]) + "}"
    elif isinstance(value, (datetime.date, datetime.time)):  # TOML dates: as written
        text = value.isoformat()
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Origin:
    """Where a value came from: the command line (``file`` None) or a TOML file."""

    key: str  # the long option name without dashes = the TOML key, e.g. "ready-timeout"
    file: str | None = None

    def show(self, value: Any) -> str:
        if self.file is None:
            if isinstance(value, (list, tuple)):
                return " ".join(f"--{self.key} {v!r}" for v in value) or f"--{self.key}"
            return f"--{self.key} {value!r}"
        return f"{self.key} = {shown(value)} in {self.file!r}"

    def example(self, literal: str) -> str:
        """How the user would write ``literal`` (a TOML literal) where this value came from."""
        if self.file is None:
            return f"--{self.key} {literal.strip(chr(34))}"
        return f"{self.key} = {literal}"

    def error(self, value: Any, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.show(value)}: {problem}; {fix}")

    def wrong_type(self, value: Any, expected: str, example: str) -> ConfigError:
        return self.error(
            value, f"expected {expected}, not {_kind(value)}", f"e.g. {self.example(example)}"
        )


# ---- generic kinds -----------------------------------------------------------------------


def text(example: str) -> Parser:
    def parse_text(value: Any, origin: Origin) -> str:
        if not isinstance(value, str):
            raise origin.wrong_type(value, "a string", f'"{example}"')
        return value

    return parse_text


def whole(low: int, high: int, example: int) -> Parser:
    def parse_whole(value: Any, origin: Origin) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise origin.wrong_type(value, f"a whole number {low}-{high}", str(example))
        if not low <= value <= high:
            raise origin.error(
                value, f"out of range ({low}-{high})", f"e.g. {origin.example(str(example))}"
            )
        return value

    return parse_whole


def real(low: float, high: float, example: float) -> Parser:
    def parse_real(value: Any, origin: Origin) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise origin.wrong_type(value, f"seconds ({low:g}-{high:g})", f"{example:g}")
        if not low <= value <= high:  # also refuses nan
            raise origin.error(
                value,
                f"out of range ({low:g}-{high:g} seconds)",
                f"e.g. {origin.example(format(example, 'g'))}",
            )
        return float(value)

    return parse_real


def flag(value: Any, origin: Origin) -> bool:
    if not isinstance(value, bool):
        raise origin.wrong_type(value, "true or false", "true")
    return value


def choice(choices: dict[str, str]) -> Parser:
    """One of ``choices`` (name -> what it means, for the error message)."""

    def parse_choice(value: Any, origin: Origin) -> str:
        if not isinstance(value, str):
            raise origin.wrong_type(value, "a string", f'"{next(iter(choices))}"')
        picked = value.strip().lower()
        if picked not in choices:
            known = "; ".join(f"{k} ({v})" if v else k for k, v in choices.items())
            raise origin.error(value, "not a known choice", f"use one of: {known}")
        return picked

    return parse_choice


def strings(value: Any, origin: Origin) -> tuple[str, ...]:
    """A list of strings (a single string is a list of one)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise origin.wrong_type(value, "a string or a list of strings", '["..."]')
    return tuple(items)


# ---- the settings' own kinds --------------------------------------------------------------


def parse_command(value: Any, origin: Origin) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ConfigError(
            f"{origin.show(value)}: command must be a list of arguments, "
            f"e.g. command = ['./server', '-v']"
        )
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise origin.wrong_type(value, "a list of strings", "['./server', '-v']")
    if any("\0" in arg for arg in value):
        raise origin.error(value, "an argument holds a NUL byte", "no program can receive one")
    if value and not value[0].strip():
        # exec refused it later, once the sockets were open, as "ValueError: execve: argv
        # first element cannot be empty"
        raise origin.error(
            value, "the program's name is empty", "give the program first, e.g. ./server -v"
        )
    for i, arg in enumerate(value):
        _fits_exec(value, origin, arg, f"argument {i}", "argument")
    return tuple(value)


def _fits_exec(
    value: Any, origin: Origin, string: str, label: str, kind: str, of: str = ""
) -> None:
    """Refuse a string exec would refuse (E2BIG): ``label`` names it, ``of`` what it counts."""
    if (size := len(string.encode(errors="surrogateescape"))) >= MAX_ARG_STRLEN:
        raise origin.error(
            value,
            f"{label} is {size:,} bytes{of}; the kernel passes no {kind} of {MAX_ARG_STRLEN:,} or "
            f"more to a program (MAX_ARG_STRLEN: exec fails with E2BIG)",
            "pass it in a file",
        )


def parse_env(value: Any, origin: Origin) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise origin.wrong_type(value, "a table of NAME = 'value'", '{ GREETING = "hi" }')
    env: dict[str, str] = {}
    for name, item in value.items():
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise origin.error(
                value, f"env {name} is {_kind(item)}", f'write it as a string, {name} = "..."'
            )
        if not name or "=" in name or "\0" in name:
            raise origin.error(value, f"{name!r} is not an environment variable name", "rename it")
        if "\0" in str(item):  # was "not an environment variable name", naming the name
            raise origin.error(
                value, f"env {name} holds a NUL byte", "no program can receive one: remove it"
            )
        _fits_exec(value, origin, f"{name}={item}", f"env {name}", "variable", " with its name")
        env[name] = str(item)
    return tuple(sorted(env.items()))


def parse_name(value: Any, origin: Origin) -> str:
    name = text("web")(value, origin)
    if not NAME_RE.match(name):
        raise origin.error(value, "may use only letters, digits, '_', '.', '-'", "rename it")
    return str(name)


def parse_user(value: Any, origin: Origin) -> str:
    user = text("www-data")(value, origin)
    if not user or user.startswith(":") or "\0" in user:
        raise origin.error(value, "no user name", 'e.g. user = "www-data" or "www-data:www"')
    return str(user)


def parse_optional_path(value: Any, origin: Origin) -> str:
    path = text("/run/portshard/web.sock")(value, origin)
    if not path or "\0" in path:
        raise origin.error(value, "not a path", "give a file name, e.g. /run/portshard/web.sock")
    return str(path)


def parse_metrics(value: Any, origin: Origin) -> str:
    return _endpoint_address(value, origin, "metrics")


def parse_health(value: Any, origin: Origin) -> str:
    return _endpoint_address(value, origin, "health")


def _endpoint_address(value: Any, origin: Origin, key: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # metrics = 9100: a port on loopback
    address = text("127.0.0.1:9100")(value, origin)
    from .web import parse_metrics_address

    try:
        parse_metrics_address(address, f"--{key}")  # a bad address fails before any worker
    except ConfigError as exc:
        if origin.file is None:
            raise
        raise ConfigError(f"{exc} ({key} in {origin.file!r})") from None
    return str(address)


def parse_signal(value: str | int, origin: Origin | None = None) -> int:
    origin = origin or Origin("stop-signal")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise origin.wrong_type(value, "a signal name or number", '"TERM"')
    if isinstance(value, int):
        number = value
    else:
        name = value.strip().upper()
        if name.isdigit() and len(name) < 5:
            number = int(name)
        else:
            sig = getattr(signal.Signals, name if name.startswith("SIG") else "SIG" + name, None)
            if sig is None:
                raise origin.error(value, "not a signal name", "use e.g. TERM, INT, QUIT")
            number = int(sig)
    if number not in {int(s) for s in signal.Signals} or number == signal.SIGSTOP:
        raise origin.error(value, "cannot be used to stop a worker", "use e.g. TERM, INT, QUIT")
    if number in _NEVER_STOPS:
        raise origin.error(value, _NEVER_STOPS[number], "use e.g. TERM, INT, QUIT")
    return number


# Signals that never make a program exit by themselves: with one, every retirement (a
# reload, a scale down, a stop) waited out --grace and then SIGKILLed the worker.
_NEVER_STOPS = {
    int(signal.SIGCONT): "SIGCONT only resumes a stopped process, and a frozen worker is "
    "already resumed by the retirement",
    int(signal.SIGCHLD): "SIGCHLD is ignored unless the program handles it, and it means "
    "a child changed state",
    int(signal.SIGTSTP): "SIGTSTP stops (pauses) a process, it does not end it",
    int(signal.SIGTTIN): "SIGTTIN stops (pauses) a process, it does not end it",
    int(signal.SIGTTOU): "SIGTTOU stops (pauses) a process, it does not end it",
}


def parse_ready(value: Any, origin: Origin | None = None) -> ReadyMode:
    origin = origin or Origin("ready")
    kind = text("accept")(value, origin).strip()
    if kind in ("accept", "notify"):
        return ReadyMode(kind)
    if kind.startswith("delay:"):
        try:
            seconds = float(kind[6:])
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= 3600:
            raise origin.error(value, "the delay must be seconds (0-3600)", "e.g. delay:0.5")
        return ReadyMode("delay", seconds)
    raise origin.error(
        value,
        "not a readiness mode",
        "use accept (waiting for connections, no cooperation needed), notify (sd_notify "
        "READY=1) or delay:SECONDS",
    )


def parse_listen(values: Any, origin: Origin | None = None) -> tuple[ListenSpec, ...]:
    origin = origin or Origin("listen")
    specs: list[ListenSpec] = []
    for i, value in enumerate(strings(values, origin)):
        name, sep, addr_text = value.partition("=")
        if not sep:
            name, addr_text = "", value
        try:
            address = parse(addr_text)
        except AddressError as exc:
            raise ConfigError(f"{origin.show(value)}: {exc}") from None
        if not name:
            name = f"{address.proto.value}{i}"
        if not NAME_RE.match(name):
            raise origin.error(
                value, f"name {name!r} may use only letters, digits, '_', '.', '-'", "rename it"
            )
        if any(s.name == name for s in specs):
            raise origin.error(value, f"the name {name!r} is used twice", "name each address")
        twin = next((s for s in specs if address.port and s.address == address), None)
        if twin is not None:
            # One group in the kernel, two sockets a slot: new connections went to whichever
            # socket the last steering program picked, and a program serving fd 3 only
            # (most do) never accepted them: every request timed out, and nothing said why.
            raise origin.error(
                value,
                f"{address} is given twice (as {twin.name} and {name}): both would be one "
                f"port group, and a worker serving one of its sockets would not get the "
                f"other's connections",
                "give each address once",
            )
        specs.append(ListenSpec(name, address))
    return tuple(specs)


def resolve_user(user: str) -> Credentials | None:
    """The credentials workers switch to; None when portshard already runs as that user."""
    from .spawn import Credentials

    name, _, group = user.partition(":")
    try:
        pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except (KeyError, OverflowError, ValueError):
        raise ConfigError(
            f"--user {user!r}: no such user; create it or pick one from /etc/passwd"
        ) from None
    gid = pw.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except (KeyError, ValueError):
            gid = -1
        if not 0 <= gid < 2**32 - 1:
            raise ConfigError(f"--user {user!r}: no such group {group!r}; pick one from /etc/group")
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise ConfigError(f"--user {user!r} needs root: run portshard as root to drop to it")
    if os.geteuid() != 0:
        # Already this user: nothing to drop, and setgroups() would fail with EPERM at
        # every spawn ("cannot run worker command: Operation not permitted").
        if gid != os.getegid():
            raise ConfigError(
                f"--user {user!r}: changing the group to {gid} needs root (portshard runs as "
                f"uid {os.geteuid()}, gid {os.getegid()}); drop the group, or run as root"
            )
        return None
    groups = tuple(sorted({gid, *os.getgrouplist(pw.pw_name, gid)}))
    return Credentials(pw.pw_uid, gid, groups)

"""Supervisor settings: from the command line and/or a TOML file, validated in one place.

A TOML file uses the long option names (``workers = 4``, ``listen = ["tcp://:8080"]``,
``command = ["./server", "--flag"]``, ``stop-signal = "SIGINT"``). Options given on the
command line win over the file. ``reload`` re-reads the file.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..address import Address, parse
from ..errors import AddressError, ConfigError
from .spawn import Credentials

__all__ = ["Config", "ListenSpec", "ReadyMode", "load", "parse_ready", "parse_signal"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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


@dataclass(frozen=True)
class Config:
    command: tuple[str, ...]
    listen: tuple[ListenSpec, ...]
    workers: int
    name: str = "portshard"
    control: str | None = None
    user: str | None = None
    ready: ReadyMode = ReadyMode("accept")
    ready_timeout: float = 30.0
    stop_signal: int = signal.SIGTERM
    grace: float = 30.0
    drain: str = "freeze"
    surge: int = 1
    backlog: int = 0xFFFF
    metrics: str | None = None  # HOST:PORT of the metrics and dashboard endpoint
    steering: str = "auto"  # auto | cbpf | ebpf | off (steering/controller.py)
    migrate: bool = False  # set net.ipv4.tcp_migrate_req=1 in our network namespace
    config_file: str | None = None
    env: tuple[tuple[str, str], ...] = field(default=())
    via: str = "auto"  # how a worker gets its sockets: see VIA

    def credentials(self) -> Credentials | None:
        return resolve_user(self.user) if self.user else None


def parse_signal(value: str | int) -> int:
    if isinstance(value, int):
        number = value
    else:
        text = value.strip().upper()
        if text.isdigit():
            number = int(text)
        else:
            name = text if text.startswith("SIG") else "SIG" + text
            sig = getattr(signal.Signals, name, None)
            if sig is None:
                raise ConfigError(
                    f"--stop-signal {value!r} is not a signal name; use e.g. TERM, INT, QUIT"
                )
            number = int(sig)
    if number not in {int(s) for s in signal.Signals} or number in (signal.SIGSTOP,):
        raise ConfigError(f"--stop-signal {value!r} cannot be used to stop a worker")
    return number


def parse_ready(value: str) -> ReadyMode:
    text = value.strip()
    if text in ("accept", "notify"):
        return ReadyMode(text)
    if text.startswith("delay:"):
        try:
            seconds = float(text[6:])
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= 3600:
            raise ConfigError(f"--ready {value!r}: the delay must be seconds, e.g. delay:0.5")
        return ReadyMode("delay", seconds)
    raise ConfigError(
        f"--ready {value!r} is not a readiness mode; use accept (waiting for connections, no "
        f"cooperation needed), notify (sd_notify READY=1) or delay:SECONDS"
    )


def parse_listen(values: list[str]) -> tuple[ListenSpec, ...]:
    specs: list[ListenSpec] = []
    for i, value in enumerate(values):
        name, sep, addr_text = value.partition("=")
        if not sep:
            name, addr_text = "", value
        try:
            address = parse(addr_text)
        except AddressError as exc:
            raise ConfigError(f"--listen: {exc}") from None
        if not name:
            name = f"{address.proto.value}{i}"
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"--listen {value!r}: name {name!r} may use only letters, digits, '_', '.', '-'"
            )
        if any(s.name == name for s in specs):
            raise ConfigError(f"--listen {value!r}: the name {name!r} is used twice")
        specs.append(ListenSpec(name, address))
    return tuple(specs)


def resolve_user(user: str) -> Credentials:
    name, _, group = user.partition(":")
    try:
        pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        raise ConfigError(
            f"--user {user!r}: no such user; create it or pick one from /etc/passwd"
        ) from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise ConfigError(f"--user {user!r}: no such group {group!r}") from None
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise ConfigError(f"--user {user!r} needs root: run portshard as root to drop to it")
    groups = tuple(sorted({gid, *os.getgrouplist(pw.pw_name, gid)}))
    return Credentials(pw.pw_uid, gid, groups)


# How a worker gets its slot's sockets (docs/ARCHITECTURE.md, "Interposition").
VIA = {
    "auto": "preload for a dynamically linked program, seccomp for a static or Go one",
    "fds": "the systemd way only (LISTEN_FDS, fds from 3), for programs that use it",
    "preload": "an LD_PRELOAD shim gives the program the socket when it binds the address",
    "seccomp": "the supervisor answers the program's bind() (static binaries, Go)",
    "reuseport": "each copy binds its own socket, portshard only sets SO_REUSEPORT on it "
    "(libreuseport); no supervisor-owned sockets: no steering, and a copy that exits resets "
    "what is queued on its socket unless net.ipv4.tcp_migrate_req is 1 (--migrate)",
}

_KEYS = {
    "via",
    "command",
    "listen",
    "workers",
    "name",
    "control",
    "user",
    "ready",
    "ready-timeout",
    "stop-signal",
    "grace",
    "drain",
    "surge",
    "backlog",
    "env",
    "metrics",
    "steering",
    "migrate",
}


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(
            f"config file {path!r}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_KEYS))}"
        )
    return data


def _number(key: str, value: Any, kind: type, low: float, high: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, not {value!r}") from None
    if kind is int and value != int(value):
        raise ConfigError(f"{key} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{key}={value!r} is out of range ({low:g}-{high:g})")
    return kind(value)


def load(cli: dict[str, Any]) -> Config:
    """Build a Config from CLI values (None = not given) over the optional file's values."""
    path = cli.get("config")
    data: dict[str, Any] = read_file(path) if path else {}
    merged: dict[str, Any] = {k.replace("_", "-"): v for k, v in data.items()}
    for key, value in cli.items():
        if key == "config" or value is None or value == ():
            continue
        merged[key.replace("_", "-")] = value
    command = merged.get("command")
    if isinstance(command, str):
        raise ConfigError("command must be a list of arguments, e.g. command = ['./server', '-v']")
    if not command:
        raise ConfigError(
            "no worker command; give it after '--', e.g. portshard run -w 4 --listen tcp://:8080 "
            "-- python3 -m http.server --bind 127.0.0.1 8000"
        )
    listen_values = merged.get("listen") or []
    if isinstance(listen_values, str):
        listen_values = [listen_values]
    if not listen_values:
        raise ConfigError("no --listen address; e.g. --listen tcp://:8080 (repeat for more)")
    env = merged.get("env") or {}
    if not isinstance(env, dict):
        raise ConfigError("env must be a table of NAME = 'value'")
    drain = str(merged.get("drain", "freeze"))
    if drain not in ("freeze", "signal"):
        raise ConfigError(f"--drain {drain!r}: use freeze (no cooperation) or signal")
    name = str(merged.get("name", "portshard"))
    via = str(merged.get("via", "auto"))
    if via not in VIA:
        raise ConfigError(
            f"--via {via!r}: use one of " + "; ".join(f"{k} ({v})" for k, v in VIA.items())
        )
    if not _NAME_RE.match(name):
        raise ConfigError(f"--name {name!r} may use only letters, digits, '_', '.', '-'")
    cfg = Config(
        command=tuple(str(a) for a in command),
        listen=parse_listen([str(v) for v in listen_values]),
        workers=_number("workers", merged.get("workers", os.cpu_count() or 1), int, 1, 1024),
        name=name,
        control=merged.get("control"),
        user=merged.get("user"),
        ready=parse_ready(str(merged.get("ready", "accept"))),
        ready_timeout=_number("ready-timeout", merged.get("ready-timeout", 30.0), float, 0.1, 3600),
        stop_signal=parse_signal(merged.get("stop-signal", "TERM")),
        grace=_number("grace", merged.get("grace", 30.0), float, 0, 3600),
        drain=drain,
        surge=_number("surge", merged.get("surge", 1), int, 1, 1024),
        backlog=_number("backlog", merged.get("backlog", 0xFFFF), int, 1, 0xFFFF),
        metrics=_metrics(merged.get("metrics")),
        steering=_steering(merged.get("steering", "auto")),
        migrate=_flag("migrate", merged.get("migrate", False)),
        config_file=str(Path(path).resolve()) if path else None,
        env=tuple(sorted((str(k), str(v)) for k, v in env.items())),
        via=via,
    )
    if cfg.user:
        cfg.credentials()  # validate now, not at the first spawn
    if via == "reuseport":
        cfg = _reuseport_mode(cfg)
    return cfg


def _reuseport_mode(cfg: Config) -> Config:
    """--via reuseport: each copy binds its own socket (docs/ARCHITECTURE.md, "--via
    reuseport"); the supervisor holds none, so what needs its sockets is refused here."""
    for spec in cfg.listen:
        if spec.address.port == 0:
            raise ConfigError(
                f"--listen {spec.address}: port 0 does not work with --via reuseport: each copy "
                f"binds the port itself, so they must all be told the same one; give a port"
            )
    for arg in cfg.command:
        if "{fd" in arg:
            raise ConfigError(
                f"argument {arg!r}: with --via reuseport the workers get no socket from "
                f"portshard (each binds its own), so there is no {{fd}}; use {{port}}"
            )
    if cfg.steering in ("cbpf", "ebpf"):
        raise ConfigError(
            f"--steering {cfg.steering} needs the supervisor's sockets, and with --via "
            f"reuseport each copy owns its socket; use --via auto for steering, or "
            f"--steering off"
        )
    return replace(cfg, steering="off")


def _steering(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("auto", "cbpf", "ebpf", "off"):
        raise ConfigError(
            f"--steering {value!r}: use auto (eBPF if allowed, else classic BPF), cbpf, ebpf "
            f"or off (the kernel's plain hashing)"
        )
    return text


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    return value


def _metrics(value: Any) -> str | None:
    if value is None:
        return None
    from .web import parse_metrics_address

    parse_metrics_address(str(value))  # validate now: a bad address fails before any worker
    return str(value)


def reloaded(current: Config, cli: dict[str, Any]) -> Config:
    """Settings for a reload: the file is read again; listen addresses, name, control socket
    and worker count stay (change the count with ``portshard scale``)."""
    fresh = load(cli)
    if (fresh.via == "reuseport") != (current.via == "reuseport"):
        raise ConfigError(
            f"via {fresh.via!r} in the reloaded settings: switching to or from --via reuseport "
            f"changes who owns the sockets (the program or portshard); stop and start instead"
        )
    return replace(
        fresh,
        listen=current.listen,
        name=current.name,
        control=current.control,
        workers=current.workers,
        metrics=current.metrics,
        steering=current.steering,
        migrate=current.migrate,
    )

"""Every setting of ``portshard run``, once: name, parser (its type and checks), default,
choices, help and whether a reload may change it.

From this table come the click options of ``portshard run`` (cli.py), the TOML keys and the
defaults (config.py ``load``), the ``Config`` field defaults and the reload rules
(config.py ``plan_reload``). A new setting is one entry here and one ``Config`` field.
"""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import values as v
from .values import Origin, ReadyMode

__all__ = ["BY_FIELD", "KEYS", "SETTINGS", "VIA", "Setting", "default", "example_toml"]

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
DRAIN = {
    "freeze": "SIGSTOP, check it holds no connection, then --stop-signal while still frozen and "
    "--grace to exit: its shutdown runs, and a program that dies on the signal loses nothing",
    "freeze-kill": "as freeze, but SIGKILL once it holds nothing: fastest, skips its shutdown",
    "signal": "send --stop-signal and wait, for programs that stop gracefully",
}
STEERING = {
    "auto": "ebpf if allowed, else cbpf",
    "cbpf": "classic BPF, no privilege",
    "ebpf": "needs CAP_BPF or root",
    "off": "the kernel's plain hashing",
}
# steering/controller.py's BACKENDS must be these (a unit test checks; not imported here so
# that the CLI starts without loading the BPF code)


@dataclass(frozen=True)
class Setting:
    field: str  # the Config field; the option is --field-with-dashes, the TOML key the same
    help: str
    parse: Callable[[Any, Origin], Any]  # raw value -> Config value, or ConfigError
    default: Any  # the Config value when nobody gives one (a callable: computed at load)
    shown: str  # the default, as --help shows it
    reloadable: bool = True
    fixed_because: str = ""  # why a reload cannot change it (reloadable False)
    choices: tuple[str, ...] = ()
    click_type: Any = None  # None: a string (or the choices)
    short: str = ""
    metavar: str = ""
    multiple: bool = False
    flag: bool = False
    option: bool = True  # False: TOML only (command comes as arguments, env as a table)
    example: str = ""  # a TOML value for the example file (examples/portshard.toml)
    required: bool = False  # the example file sets it (else it shows it commented out)

    @property
    def key(self) -> str:
        return self.field.replace("_", "-")

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


_BOUND = "the sockets are bound once, at start (their queues are the point of portshard)"
_AT_START = "it is chosen once, at start"

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen",
        "Address to share, e.g. tcp://:8080, udp://127.0.0.1:5353, tcp://[::1]:0. "
        "Repeat for more; each worker gets one socket per address (fd 3, 4, ...).",
        v.parse_listen,
        (),
        "none",
        reloadable=False,
        fixed_because=_BOUND,
        short="-l",
        metavar="[NAME=]ADDR",
        multiple=True,
        example='["tcp://:8080"]',
        required=True,
    ),
    Setting(
        "workers",
        "Number of workers. Change it while running with 'portshard scale N'.",
        v.whole(1, 1024, 4),
        lambda: os.cpu_count() or 1,
        "number of CPUs",
        reloadable=False,
        fixed_because="the count is changed by 'portshard scale N'",
        click_type=int,
        short="-w",
        metavar="N",
        example="4",
    ),
    Setting(
        "name",
        "Name of this supervisor; picks the control socket.",
        v.parse_name,
        "portshard",
        "portshard",
        reloadable=False,
        fixed_because="the control socket is open under it",
        example='"portshard"',
    ),
    Setting(
        "control",
        "Control socket path (default: /run/portshard/NAME.sock as root, else "
        "$XDG_RUNTIME_DIR/portshard/NAME.sock). Never replaces anything but a stale socket.",
        v.parse_optional_path,
        None,
        "by --name",
        reloadable=False,
        fixed_because="the control socket is open",
        metavar="PATH",
        example='"/run/portshard/web.sock"',
    ),
    Setting(
        "user",
        "Run workers as this user; sockets are still bound by the supervisor (root).",
        v.parse_user,
        None,
        "the supervisor's user",
        metavar="USER[:GROUP]",
        example='"www-data"',
    ),
    Setting(
        "ready",
        "When a worker counts as ready: accept (it waits for connections on its socket or "
        "holds one it accepted, no cooperation needed), notify (sd_notify READY=1), "
        "delay:SECONDS.",
        v.parse_ready,
        ReadyMode("accept"),
        "accept",
        metavar="MODE",
        example='"accept"',
    ),
    Setting(
        "ready_timeout",
        "Seconds a new worker has to become ready.",
        v.real(0.1, 3600, 30),
        30.0,
        "30",
        click_type=float,
        metavar="SECONDS",
        example="30",
    ),
    Setting(
        "stop_signal",
        "Signal that stops a worker.",
        v.parse_signal,
        int(signal.SIGTERM),
        "TERM",
        metavar="SIG",
        example='"TERM"',
    ),
    Setting(
        "grace",
        "Seconds a stopping worker gets before SIGKILL.",
        v.real(0, 3600, 30),
        30.0,
        "30",
        click_type=float,
        metavar="SECONDS",
        example="30",
    ),
    Setting(
        "orphan_timeout",
        "If the supervisor dies (SIGKILL, the OOM killer, a bug), its workers keep serving "
        "this many seconds for the next `portshard run` of the same name to adopt them (by "
        "hand or systemd's Restart=); then they get their stop signal and --grace, and go. "
        "0: they go at once.",
        v.real(0, 86400, 120),
        120.0,
        "120",
        click_type=float,
        metavar="SECONDS",
        example="120",
    ),
    Setting(
        "drain",
        "How an old worker is retired: " + "; ".join(f"{k} ({d})" for k, d in DRAIN.items()) + ".",
        v.choice(DRAIN),
        "freeze",
        "freeze",
        choices=tuple(DRAIN),
        example='"freeze"',
    ),
    Setting(
        "surge",
        "Slots replaced at once during a reload.",
        v.whole(1, 1024, 1),
        1,
        "1",
        click_type=int,
        example="1",
    ),
    Setting(
        "backlog",
        "Listen backlog per socket (clamped by net.core.somaxconn).",
        v.whole(1, 0xFFFF, 4096),
        0xFFFF,
        "65535",
        click_type=int,
        example="65535",
    ),
    Setting(
        "via",
        "How a worker gets its socket: "
        + "; ".join(f"{k} ({d})" for k, d in VIA.items())
        + ". Use {port} in the command. A reload cannot switch to or from reuseport.",
        v.choice(VIA),
        "auto",
        "auto",
        choices=tuple(VIA),
        example='"auto"',
    ),
    Setting(
        "nonblocking",
        "Set O_NONBLOCK on the sockets handed to the workers (fd 3, 4, ...), as systemd's "
        "NonBlocking=. For servers whose processes share an inherited socket and take it to "
        'be non-blocking: nginx told about fd 3 with NGINX="3;" needs it, or a worker '
        "that loses the race for a connection blocks in accept() and serves nothing. Off: "
        "the sockets are blocking, as systemd passes them. The flag belongs to the socket, so "
        "every process holding it sees it; the preload shim and the seccomp trap give a "
        "program that binds the address the flags it asked for.",
        v.flag,
        False,
        "off",
        reloadable=False,
        fixed_because="it is a flag of the open sockets, shared by every worker holding them",
        flag=True,
        example="false",
    ),
    Setting(
        "metrics",
        "Serve Prometheus metrics (/metrics) and a live dashboard (/) on this address. "
        "Loopback (127.0.0.1) unless a host is given; port 0 picks a free one (see status "
        "--json).",
        v.parse_metrics,
        None,
        "off",
        reloadable=False,
        fixed_because="the endpoint is bound once, at start",
        metavar="[HOST:]PORT",
        example='"127.0.0.1:9100"',
    ),
    Setting(
        "health",
        "Serve health for load balancers on this address: HTTP /healthz (200 while serving "
        "with a worker ready, 503 while draining, stopping or with none ready; a JSON body) "
        "and HAProxy's agent check (ready N%, drain, maint) on the same port. Loopback "
        "unless a host is given (a probe from another machine needs one, e.g. "
        "0.0.0.0:9100); port 0 picks a free one (see status --json).",
        v.parse_health,
        None,
        "off",
        reloadable=False,
        fixed_because="the endpoint is bound once, at start",
        metavar="[HOST:]PORT",
        example='"127.0.0.1:9101"',
    ),
    Setting(
        "steering",
        "Keep new connections away from dead, starting, draining and overloaded workers, and "
        "weight the rest by what they serve: "
        + "; ".join(f"{k} ({d})" for k, d in STEERING.items())
        + ".",
        v.choice(STEERING),
        "auto",
        "auto",
        reloadable=False,
        fixed_because=_AT_START,
        choices=tuple(STEERING),
        example='"auto"',
    ),
    Setting(
        "migrate",
        "Set net.ipv4.tcp_migrate_req=1 in this network namespace (root): a closing "
        "listener hands its queued connections to the others. With cbpf steering, a slot "
        "whose worker dies then hands its queue over at once (eBPF steering does that anyway).",
        v.flag,
        False,
        "off",
        reloadable=False,
        fixed_because="it is set once, at start",
        flag=True,
        example="false",
    ),
    Setting(
        "join_existing",
        "Start even if another process (another supervisor included) already serves a "
        "--listen port, and join its SO_REUSEPORT group. With steering on, this supervisor's "
        "program then decides for the whole group (with eBPF it takes every new connection); "
        "--steering off leaves the kernel's hashing. Without it, portshard refuses and names "
        "the holder.",
        v.flag,
        False,
        "off",
        reloadable=False,
        fixed_because="it is checked once, at start",
        flag=True,
        example="false",
    ),
    Setting(
        "command",
        "The worker's command (the arguments after the options).",
        v.parse_command,
        (),
        "none",
        option=False,
        example='["python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]',
        required=True,
    ),
    Setting(
        "env",
        "Environment variables for the workers (a TOML table).",
        v.parse_env,
        (),
        "none",
        option=False,
        example='{ PYTHONUNBUFFERED = "1" }',
        required=True,
    ),
)

BY_FIELD = {s.field: s for s in SETTINGS}
KEYS = frozenset(s.key for s in SETTINGS)


def example_toml() -> str:
    """examples/portshard.toml: every key with its help and default (a test keeps it equal)."""
    lines = [
        "# Settings of `portshard run -c portshard.toml`: every key is a long option of",
        "# `portshard run` (the command line wins over the file); `portshard reload` re-reads",
        "# the file. Generated from src/portshard/supervisor/settings.py (example_toml()).",
    ]
    for setting in SETTINGS:
        fixed = "" if setting.reloadable else f" A reload keeps it: {setting.fixed_because}."
        text = f"{setting.help} Default: {setting.shown}.{fixed}"
        lines += [
            "",
            *textwrap.wrap(
                text, 98, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
            ),
        ]
        value = f"{setting.key} = {setting.example}"
        lines.append(value if setting.required else f"# {value}")
    return "\n".join(lines) + "\n"


def default(field: str) -> Any:
    """The default of a setting (for the Config dataclass)."""
    return BY_FIELD[field].default_value()

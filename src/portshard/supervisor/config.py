"""Supervisor settings: from the command line and/or a TOML file, validated in one place.

A TOML file uses the long option names (``workers = 4``, ``listen = ["tcp://:8080"]``,
``command = ["./server", "--flag"]``, ``stop-signal = "SIGINT"``); every key, its type, default
and whether a reload may change it are in ``settings.py``. Options given on the command line win
over the file. ``reload`` re-reads the file and says which changes it cannot apply, and why.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .settings import BY_FIELD, KEYS, SETTINGS, VIA, default
from .spawn import Credentials
from .values import (
    ListenSpec,
    Origin,
    ReadyMode,
    parse_listen,
    parse_ready,
    parse_signal,
    resolve_user,
    shown,
)

log = logging.getLogger(__name__)

__all__ = [
    "VIA",
    "Config",
    "ListenSpec",
    "ReadyMode",
    "ReloadPlan",
    "load",
    "parse_listen",
    "parse_ready",
    "parse_signal",
    "plan_reload",
    "reloaded",
    "resolve_user",
]


@dataclass(frozen=True)
class Config:
    command: tuple[str, ...]
    listen: tuple[ListenSpec, ...]
    workers: int
    name: str = default("name")
    control: str | None = default("control")
    user: str | None = default("user")
    ready: ReadyMode = default("ready")  # noqa: RUF009 (a frozen ReadyMode: shared safely)
    ready_timeout: float = default("ready_timeout")
    stop_signal: int = default("stop_signal")
    grace: float = default("grace")
    orphan_timeout: float = default("orphan_timeout")
    drain: str = default("drain")  # freeze | signal (settings.DRAIN)
    surge: int = default("surge")
    backlog: int = default("backlog")
    metrics: str | None = default("metrics")  # HOST:PORT of the metrics and dashboard endpoint
    health: str | None = default("health")  # HOST:PORT of /healthz and the agent check
    steering: str = default("steering")  # auto | cbpf | ebpf | off (steering/controller.py)
    migrate: bool = default("migrate")  # set net.ipv4.tcp_migrate_req=1 in our netns
    config_file: str | None = None
    env: tuple[tuple[str, str], ...] = field(default=())
    via: str = default("via")  # how a worker gets its sockets: see settings.VIA
    join_existing: bool = default("join_existing")  # share a port someone already serves
    nonblocking: bool = default("nonblocking")  # O_NONBLOCK on the sockets handed over
    file_workers: int | None = None  # `workers` as the file said it at this load (for reload)
    # the file's values as loaded (an upgrade hands them on: handoff.export, running_settings)
    file_data: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def credentials(self) -> Credentials | None:
        return resolve_user(self.user) if self.user else None


MAX_FILE = 1 << 20  # bytes; every setting written out with its comments is ~10 KiB


def read_file(path: str) -> dict[str, Any]:
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            # A FIFO blocked open() and /dev/zero read() forever: `run -c` hung, and a
            # reload would hang the supervisor with it. A reload re-reads the file, so a
            # pipe (`-c <(...)`) could not work anyway.
            raise ConfigError(
                f"config file {path!r} is {_kind_of_file(mode)}, not a regular file; a reload "
                f"reads it again, so save the settings in a file and give its path"
            )
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
        if len(raw) > MAX_FILE:
            raise ConfigError(
                f"config file {path!r} is larger than {MAX_FILE // 1024} KiB: not a settings "
                f"file (every setting with its comments is ~10 KiB); check the path"
            )
        data = tomllib.loads(raw.decode())
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a directory; give the TOML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path!r} is not UTF-8 text (byte {exc.start}); TOML files are UTF-8: "
            f"save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    except ValueError as exc:  # a number of more than 4,300 digits (int() refuses it)
        raise ConfigError(
            f"config file {path!r}: a number is out of range: {str(exc).split(';')[0]}; no "
            f"setting takes one that large (workers is 1-1024, seconds 0-3600)"
        ) from None
    except RecursionError:
        raise ConfigError(f"config file {path!r}: arrays or tables nested too deep") from None
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise ConfigError(
            f"config file {path!r}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(KEYS))}"
        )
    return data


def _kind_of_file(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _given(value: Any) -> bool:
    return value is not None and value != ()


_PLACEHOLDER = re.compile(r"\{(fd|port):([^}]*)\}")


def _check_placeholders(command: Any, names: list[str]) -> None:
    """``{fd:NAME}`` and ``{port:NAME}`` must name a --listen address. Found only at the
    first spawn before: after the sockets were open, and `run --check` (an upgrade's check)
    passed a command whose next reload could not start a worker."""
    for arg in command:
        for kind, name in _PLACEHOLDER.findall(str(arg)):
            if name not in names:
                raise ConfigError(
                    f"command argument {arg!r}: {{{kind}:{name}}} names no --listen address "
                    f"(known: {', '.join(names)}); name the address (--listen "
                    f"{name}=tcp://...) or use one of those"
                )


def load(cli: Mapping[str, Any], file_data: Mapping[str, Any] | None = None) -> Config:
    """Build a Config from CLI values (None = not given) over the optional file's values
    (``file_data``: those values as an earlier load read them, instead of reading the file).

    Every value the file gives is checked, also those the command line overrides."""
    path = cli.get("config")
    data = dict(file_data) if file_data is not None else read_file(path) if path else {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.key in data:
            values[setting.field] = setting.parse(data[setting.key], Origin(setting.key, path))
        if _given(cli.get(setting.field)):
            values[setting.field] = setting.parse(cli[setting.field], Origin(setting.key))
        elif setting.field not in values:
            values[setting.field] = setting.default_value()
    if not values["command"]:
        raise ConfigError(
            "no worker command; give it after the options, e.g. portshard run -w 4 --listen "
            "tcp://:8080 python3 -m http.server --bind 127.0.0.1 8000"
        )
    if not values["listen"]:
        command = list(values["command"])
        late = next((a for a in command[1:] if a == "--listen" or a.startswith("--listen=")), None)
        if late is not None:  # `run -w 2 python3 app.py --listen tcp://:8080`: the program's
            raise ConfigError(
                f"no --listen address before the command: {late!r} comes after "
                f"{command[0]!r}, where portshard's options end, so it is the program's; "
                f"put portshard's options first, e.g. portshard run --listen tcp://:8080 "
                f"{command[0]} ..."
            )
        raise ConfigError("no --listen address; e.g. --listen tcp://:8080 (repeat for more)")
    _check_placeholders(values["command"], [spec.name for spec in values["listen"]])
    file_workers = (
        BY_FIELD["workers"].parse(data["workers"], Origin("workers", path))
        if "workers" in data
        else None
    )
    cfg = Config(
        **values,
        config_file=str(Path(path).resolve()) if path else None,
        file_workers=file_workers,
        file_data=data if path else None,
    )
    if cfg.user:
        cfg.credentials()  # validate now, not at the first spawn
    if cfg.via == "reuseport":
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
    if cfg.nonblocking:
        raise ConfigError(
            "--nonblocking sets a flag on the sockets portshard hands over, and with --via "
            "reuseport it hands over none (each copy binds its own); drop --nonblocking, or "
            "use --via fds"
        )
    if cfg.steering in ("cbpf", "ebpf"):
        raise ConfigError(
            f"--steering {cfg.steering} needs the supervisor's sockets, and with --via "
            f"reuseport each copy owns its socket; use --via auto for steering, or "
            f"--steering off"
        )
    return replace(cfg, steering="off")


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload applies, and what it cannot.

    ``config``: the settings the new workers get (the settings a reload cannot change keep
    their running values). ``kept``: one line per setting the file changed but the reload cannot
    apply, with the reason. ``scale_to``: the file's ``workers`` changed (and the command line
    did not fix it): the supervisor should scale to this count once the reload is done.
    """

    config: Config
    kept: tuple[str, ...] = ()
    scale_to: int | None = None


def plan_reload(current: Config, cli: Mapping[str, Any]) -> ReloadPlan:
    """Read the settings again for a reload (the file may have changed) and decide."""
    fresh = load(cli)
    if (fresh.via == "reuseport") != (current.via == "reuseport"):
        raise ConfigError(
            f"via {fresh.via!r} in the reloaded settings: switching to or from --via reuseport "
            f"changes who owns the sockets (the program or portshard); stop and start instead"
        )
    kept: list[str] = []
    where = f" in {current.config_file!r}" if current.config_file else ""
    for setting in SETTINGS:
        if setting.reloadable or setting.field == "workers":
            continue
        old, new = getattr(current, setting.field), getattr(fresh, setting.field)
        if old != new:
            kept.append(
                f"{setting.key} changed{where} from {_show(old)} to {_show(new)}: a reload "
                f"cannot change it ({setting.fixed_because}); it stays {_show(old)} until "
                f"the supervisor is restarted"
            )
    scale_to = None
    if fresh.file_workers is not None and fresh.file_workers != current.file_workers:
        if _given(cli.get("workers")):
            kept.append(
                f"workers changed{where} to {fresh.file_workers}, but --workers "
                f"{cli['workers']} on the command line wins; use 'portshard scale "
                f"{fresh.file_workers}' to change the count"
            )
        else:
            scale_to = fresh.file_workers
    frozen = {s.field: getattr(current, s.field) for s in SETTINGS if not s.reloadable}
    config = replace(fresh, **frozen, file_workers=fresh.file_workers)
    return ReloadPlan(config, tuple(kept), scale_to)


def _show(value: Any) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], ListenSpec):
        return shown([f"{s.name}={s.address}" for s in value])
    return shown(value)


def reloaded(current: Config, cli: Mapping[str, Any], *, scales: bool = False) -> Config:
    """Settings for a reload, with what it cannot change logged (``plan_reload`` decides).

    ``scales``: the caller scales to ``plan.scale_to`` after the reload (and says so); without
    it, a changed ``workers`` in the file is logged as not applied, with the command to apply.
    """
    plan = plan_reload(current, cli)
    for line in plan.kept:
        log.warning("reload: %s", line)
    if plan.scale_to is not None and not scales:
        log.warning(
            "reload: workers changed in %r from %s to %d: a reload keeps the running count "
            "(%d; 'portshard scale' may have changed it since start); run 'portshard scale %d' "
            "to apply it",
            current.config_file,
            current.file_workers,
            plan.scale_to,
            current.workers,
            plan.scale_to,
        )
    return plan.config

"""Command line. The only place that turns exceptions into messages and exit codes."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, NoReturn

import click

from . import __version__
from .errors import PortshardError

log = logging.getLogger("portshard")


class Seconds(click.ParamType[float]):
    """A number of seconds in [low, high] (above ``low`` if ``above``). click's FloatRange
    lets nan through (every comparison with it is false), and `--timeout nan`, `inf` or
    `1e309` reached socket.settimeout(): a ValueError or OverflowError traceback."""

    name = "seconds"

    def __init__(self, low: float, high: float, *, above: bool = False) -> None:
        self.low, self.high, self.above = low, high, above

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds; e.g. 30", param, ctx)
        low_ok = seconds > self.low if self.above else seconds >= self.low
        if not (low_ok and seconds <= self.high):  # also false for nan
            bound = "more than " if self.above else ""
            self.fail(
                f"{value} is out of range: give {bound}{self.low:g} to {self.high:g} seconds",
                param,
                ctx,
            )
        return seconds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="portshard")
def cli() -> None:
    """Run many processes on one port, with the kernel balancing (SO_REUSEPORT), safely.

    \b
    portshard doctor                      what this machine supports
    portshard run -w 4 --listen tcp://:8080 -- CMD [ARGS...]
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Probe what this machine supports, for real, and what each feature enables."""
    from . import doctor as doctor_mod

    checks = doctor_mod.probe_all()
    if as_json:
        click.echo(json.dumps(doctor_mod.to_json(checks), indent=2))
    else:
        click.echo(doctor_mod.render(checks))


def _setup_logging(level: str, fmt: str = "text") -> None:
    from .logfmt import JsonFormatter, TextFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def control_options(f: Any) -> Any:
    """--name and --control of the commands that talk to a supervisor (the schema's defaults)."""
    from .supervisor.settings import BY_FIELD

    name, control = BY_FIELD["name"], BY_FIELD["control"]
    f = click.option(
        "--control",
        metavar=control.metavar,
        help="The supervisor's control socket (default: by --name: /run/portshard/NAME.sock as "
        "root, else $XDG_RUNTIME_DIR/portshard/NAME.sock). Also $PORTSHARD_CONTROL.",
    )(f)
    return click.option(
        "--name",
        default=name.default,
        show_default=True,
        callback=_check_name,
        help="The supervisor's name (its --name; picks its control socket).",
    )(f)


def _check_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """The rule `run --name` applies: `status --name ../../x` asked /run/x.sock."""
    from .supervisor.values import NAME_RE

    if not NAME_RE.match(value):
        raise click.BadParameter(
            f"{value!r} is not a supervisor name: a name uses only letters, digits, '_', '.' "
            f"and '-' (1-64 of them); give its --name, or its socket with --control"
        )
    return value


def _setting_options(f: Any) -> Any:
    """The options of `portshard run`, one per setting of the schema (supervisor/settings.py)."""
    from .supervisor.settings import SETTINGS

    for setting in reversed(SETTINGS):
        if not setting.option:
            continue
        names = [setting.short] if setting.short else []
        fixed = "" if setting.reloadable else "; a reload keeps it"
        kind: Any = click.Choice(setting.choices) if setting.choices else setting.click_type
        f = click.option(
            f"--{setting.key}",
            *names,
            setting.field,
            type=kind,
            multiple=setting.multiple,
            is_flag=setting.flag,
            default=None,
            metavar=setting.metavar or None,
            help=f"{setting.help}  [default: {setting.shown}{fixed}]",
        )(f)
    return f


# Options end at the first word of the program's command (allow_interspersed_args False): in
# `portshard run -w 2 --listen tcp://:8000 gunicorn -w 4 app:app` the second -w is gunicorn's,
# and `... python3 -m http.server` runs as written. `--` before the command still works.
@cli.command(context_settings={"allow_interspersed_args": False})
@_setting_options
@click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False),
    help="TOML file with the same settings (long option names); re-read on reload.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object per line for log shippers (worker lines carry slot and pid).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--check",
    is_flag=True,
    help="Check the settings, the --config file and the command, then exit (0: fine); "
    "`portshard upgrade` runs it first.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(log_level: str, log_format: str, check: bool, **options: Any) -> None:
    """Run N copies of COMMAND sharing the --listen addresses.

    \b
    portshard run -w 4 --listen tcp://:8080 python3 app.py
    portshard run -w 2 --listen tcp://:8080 -- ./server --fd {fd}

    portshard's options end at the first word of COMMAND: what follows is the program's
    (a `--` before COMMAND is allowed, never needed). Every option can also be given in the
    --config file, as `long-option-name = value`.

    The supervisor opens one socket per worker slot and keeps it for the slot's life; each
    worker gets its slot's sockets the systemd way (LISTEN_FDS, fds from 3, {fd} and
    {fd:NAME} in the arguments, PORTSHARD_SLOT). SIGHUP or 'portshard reload' replaces
    workers one at a time, each new one ready before the old one goes. SIGTERM/SIGINT stop
    gracefully; a second one kills. SIGUSR2 or 'portshard upgrade' replaces the supervisor
    itself, keeping every socket and worker.

    If the supervisor dies (SIGKILL, the OOM killer), its workers keep serving; running the
    same command again (same --name/--control) within --orphan-timeout adopts them.
    """
    from dataclasses import replace

    from .supervisor import handoff
    from .supervisor.loop import Supervisor
    from .supervisor.preflight import PortLocks, refuse_served_ports
    from .supervisor.systemd import Activated

    _setup_logging(log_level, log_format)
    resume = handoff.from_env()  # we are the new image of `portshard upgrade`
    cli_values = dict(options)
    cli_values["command"] = tuple(options["command"]) or None
    cli_values["listen"] = tuple(options["listen"]) or None
    activated = None if resume is not None else Activated()  # systemd's sockets
    if activated and not cli_values["listen"] and not options.get("config"):
        cli_values["listen"] = tuple(activated.addresses()) or None
    cfg = handoff.running_settings(cli_values, resume)
    _fd_limit(cfg, captured=log_format == "json")
    if cfg.metrics:
        from .supervisor.web import require_exposition

        require_exposition()
    if check:
        _check(cfg)
        return
    if resume is None:  # the workers of a supervisor of ours that died: adopt them
        # The socket this supervisor binds (loop.py): $PORTSHARD_CONTROL is the client
        # commands'. Set in the shell, it made `run --name api` adopt the workers of the dead
        # supervisor it named, or refuse to start beside that one while it lived.
        from .control.paths import default_path

        resume = handoff.adopt(cfg.control or default_path(cfg.name))
        if resume is not None and activated:  # systemd's fd store has copies: ours win
            for sock in activated.socks:
                sock.close()
            activated = None
    locks = PortLocks(cfg if not activated and resume is None else replace(cfg, listen=()))
    try:
        if not activated and resume is None:  # systemd's sockets are held by systemd
            refuse_served_ports(cfg)  # another server on a --listen port: say who
        # JSON logs: the workers' stdout/stderr lines come back as JSON records too
        code = Supervisor(
            cfg,
            cli_values,
            activated,
            capture_output=log_format == "json",
            resume=resume,
            log_format=log_format,
            on_bound=locks.release,
        ).run()
    finally:
        locks.release()
    if code:
        sys.exit(code)


def _fd_limit(cfg: Any, *, captured: bool) -> None:
    """Raise our soft RLIMIT_NOFILE to the hard one (the workers keep the operator's); refuse
    --workers that still do not fit (linux/fdlimit.py)."""
    from .errors import ConfigError
    from .linux import fdlimit

    fdlimit.raise_soft()
    too_few = fdlimit.refusal(cfg.workers, len(cfg.listen), captured=captured)
    if too_few is not None:
        raise ConfigError(too_few)


def _check(cfg: Any) -> None:
    """run --check: what a start would refuse before it opens anything."""
    from .address import resolve
    from .errors import ConfigError
    from .supervisor.spawn import program_problem

    problem = program_problem(cfg.command[0], dict(cfg.env).get("PATH"))
    if problem is not None:
        raise ConfigError(problem)
    for spec in cfg.listen:  # a name that does not resolve passed; the start refused it
        resolve(spec.address)
    click.echo(
        f"portshard {__version__}: the settings are fine: {cfg.workers} workers of "
        f"{' '.join(cfg.command)!r} on {', '.join(str(s.address) for s in cfg.listen)}"
    )
    from .supervisor.handoff import TAKES, TAKES_LINE

    click.echo(TAKES_LINE + " ".join(TAKES))  # for `portshard upgrade`: what it hands over


def _client(name: str, control: str | None) -> str:
    from .control.client import resolve_path

    return resolve_path(control, name)


# --watch: below 0.1 s it asks the supervisor for its status without pause (each answer costs
# it a /proc read of every worker); time.sleep() refuses NaN and overflows on inf.
_WATCH_MIN = 0.1
_WATCH_MAX = 86400.0


@cli.command()
@control_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (for scripts).")
@click.option(
    "--watch",
    "-W",
    "watch",
    type=float,
    default=None,
    is_flag=False,
    flag_value=1.0,
    metavar="[SECONDS]",
    help="Refresh in place every SECONDS (default 1) until Ctrl-C; with --json, one object a line.",
)
@click.option(
    "--compact",
    "layout",
    flag_value="compact",
    help="Totals, then the worst slots first (the default when the slots do not fit the terminal).",
)
@click.option("--all", "layout", flag_value="all", help="Every slot, in slot order.")
def status(
    name: str, control: str | None, as_json: bool, watch: float | None, layout: str | None
) -> None:
    """Show the workers of a running supervisor.

    \b
    SLOT      the worker slot (owns one socket per --listen address)
    STATE     starting, ready, draining, stopping, backoff (waiting to respawn)
    QUEUE     connections waiting in the slot's accept queue / its backlog
    CONNS     client connections the worker holds right now
    STEERING  whether new connections are steered to the slot, and its weight

    With more slots than the terminal has lines (or --compact), it shows totals (slots by
    state, workers ready, connections, queued, restarts), then the worst slots first: no
    worker, not ready, excluded by steering, the most queued, the most restarts.
    """
    import shutil
    import time

    from .control.client import request
    from .render import compact_rows, render_status

    path = _client(name, control)
    if watch is not None and not _WATCH_MIN <= watch < _WATCH_MAX:
        raise click.BadParameter(
            f"{watch:g} is not a refresh interval: give {_WATCH_MIN:g} to {_WATCH_MAX:g} seconds",
            param_hint="--watch",
        )
    tty = sys.stdout.isatty()
    try:
        while True:
            result = request(path, "status")
            if as_json:
                # Under --watch, one object a line (JSON Lines), so a script can read each.
                text = json.dumps(result, indent=None if watch else 2)
            else:
                lines = shutil.get_terminal_size().lines  # $LINES, else 24 off a terminal
                rows = compact_rows(len(result.get("slots", ())), lines, layout)
                text = render_status(result, colour=tty, rows=rows)
            if watch is None:
                click.echo(text)
                return
            if as_json:
                click.echo(text)
            elif tty:
                stamp = time.strftime("%H:%M:%S")
                click.echo(f"\x1b[H\x1b[2J{text}\n\n{stamp}, every {watch:g}s; Ctrl-C to quit")
            else:  # a file or a pipe: no screen to clear
                click.echo(f"{time.strftime('%H:%M:%S')}\n{text}\n")
            sys.stdout.flush()
            time.sleep(watch)
    except KeyboardInterrupt:
        click.echo()


# reload and scale agree: both wait by default (a deploy script learns from the exit status
# whether the change worked); --no-wait returns once the supervisor has started it.
_wait_options = [
    click.option(
        "--wait/--no-wait",
        default=True,
        show_default=True,
        help="Wait until it is done and exit non-zero if it failed; --no-wait returns once "
        "it has started.",
    ),
    click.option(
        "--timeout",
        type=Seconds(0, 86400, above=True),
        default=600,
        show_default=True,
        help="With --wait: give up waiting after this many seconds.",
    ),
]


def wait_options(f: Any) -> Any:
    for option in reversed(_wait_options):
        f = option(f)
    return f


@cli.command()
@control_options
@wait_options
def reload(name: str, control: str | None, wait: bool, timeout: float) -> None:
    """Rolling reload: replace workers one slot at a time, each new one ready first.

    Waits until every slot runs a new worker (like scale); --no-wait returns at once.
    """
    from .control.client import request

    result = request(_client(name, control), "reload", timeout=timeout if wait else 30, wait=wait)
    for line in result.get("kept", []):  # settings the reload could not change, and why
        click.echo(f"portshard: note: {line}", err=True)
    click.echo("reload done" if wait else "reload started")


@cli.command()
@control_options
@click.argument("workers", type=click.IntRange(1, 1024))
@wait_options
def scale(name: str, control: str | None, workers: int, wait: bool, timeout: float) -> None:
    """Change the number of workers without failing a connection.

    Waits until the new count serves (like reload); --no-wait returns at once.
    """
    from .control.client import request

    request(
        _client(name, control),
        "scale",
        timeout=timeout if wait else 30,
        workers=workers,
        wait=wait,
    )
    click.echo(f"scaled to {workers} workers" if wait else f"scaling to {workers} workers")


@cli.command()
@control_options
@click.option(
    "--timeout",
    type=Seconds(0, 86400, above=True),
    default=120,
    show_default=True,
    help="Give up waiting for the new supervisor's answer after this many seconds.",
)
def upgrade(name: str, control: str | None, timeout: float) -> None:
    """Replace the running supervisor with the portshard on disk, keeping every socket,
    worker and connection (as SIGUSR2).

    The new portshard first checks the current settings (`run --check`): if it would not
    start (a broken --config file, a broken install), the running supervisor goes on and this
    says why. Settings a reload cannot change (--listen) change here; the workers keep
    running (a reload replaces them, and does so by itself if --listen changed).
    """
    from .control.client import request

    result = request(_client(name, control), "upgrade", timeout=timeout)
    lineage = result.get("supervisor", {})
    click.echo(
        f"upgraded: supervisor generation {lineage.get('generation')}, "
        f"portshard {lineage.get('version')}"
    )


@cli.command()
@control_options
def stop(name: str, control: str | None) -> None:
    """Stop a running supervisor gracefully (like SIGTERM)."""
    from .control.client import request

    request(_client(name, control), "stop")
    click.echo("stopping")


@cli.command()
@control_options
@click.option(
    "--wait/--no-wait",
    default=False,
    show_default=True,
    help="Return once the supervisor has stopped (exit non-zero if the deadline passed).",
)
@click.option(
    "--deadline",
    type=Seconds(0.1, 86400),
    default=None,
    metavar="SECONDS",
    help="Kill what is left this long after the drain began; the supervisor then exits 1.  "
    "[default: none; --grace bounds each worker]",
)
@click.option(
    "--settle",
    type=Seconds(0, 86400),
    default=None,
    metavar="SECONDS",
    help="How long new connections are still taken after health turns to draining, for "
    "those the balancers send before they notice.  [default: 5, or half the deadline]",
)
def drain(
    name: str, control: str | None, wait: bool, deadline: float | None, settle: float | None
) -> None:
    """Take this host out of its load balancers, then stop (systemd ExecStop, k8s preStop).

    \b
    At once:            --health says draining (/healthz 503, agent check "drain").
    For --settle s:     new connections are still served (the balancers notice late).
    Then:               new connections are refused, the workers finish what they hold
                        (as in a reload), and the supervisor exits 0.
    After --deadline s: what is left is killed; the supervisor exits 1.
    """
    from .control.client import request

    if deadline is not None and settle is not None and settle > deadline:
        raise click.BadParameter(
            f"{settle:g} is longer than --deadline {deadline:g}: the deadline would kill the "
            f"workers before they stop taking connections",
            param_hint="--settle",
        )
    args: dict[str, Any] = {"wait": wait}
    if deadline is not None:
        args["deadline"] = deadline
    if settle is not None:
        args["settle"] = settle
    # --wait: the answer comes when the supervisor has stopped; with a deadline that is
    # bounded (kill, reap, reply), without one only --grace bounds it.
    timeout = (deadline + 30 if deadline is not None else None) if wait else 30
    result = request(_client(name, control), "drain", timeout=timeout, **args)
    if wait:
        click.echo(f"drained in {result.get('seconds', 0):.1f}s; the supervisor has stopped")
    else:
        click.echo("draining: health says so now; 'portshard status' shows the rest")


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  eval "$(portshard completion bash)"     (e.g. in ~/.bashrc)
    zsh:   eval "$(portshard completion zsh)"      (e.g. in ~/.zshrc)
    fish:  portshard completion fish > ~/.config/fish/completions/portshard.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # the choices above are click's built-in shells
    click.echo(cls(cli, {}, "portshard", "_PORTSHARD_COMPLETE").source())


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--ports",
    metavar="P,...",
    help="Only these ports (default: every port the program binds).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def preload(ports: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND with SO_REUSEPORT set on the sockets it binds (libreuseport-compatible).

    \b
    portshard preload --ports 9090 -- nc -k -l 9090     (twice: both share port 9090)

    No supervisor: each copy binds its own socket, so a copy that exits resets the
    connections queued on it. For zero-loss restarts use 'portshard run'. A static or Go
    program (which LD_PRELOAD cannot reach) runs as a child whose bind() is trapped with
    seccomp instead.
    """
    import os

    from .interpose import elf, shim

    listed = shim.parse_ports(ports) if ports else []
    env = dict(os.environ)
    shim.remove_shim(env)
    program = elf.inspect_command(command, env)
    if not program.libc_binds:
        # Static or Go: LD_PRELOAD cannot reach its bind(); we stay as its parent and answer
        # its bind() calls through seccomp instead.
        from .interpose.seccomp import run_reuseport

        try:
            code = run_reuseport(command, env, frozenset(listed))
        except OSError as exc:
            raise click.ClickException(str(exc.strerror or exc)) from None
        sys.exit(code)
    shim.add_shim(env, shim.shim_path())
    env.update(shim.reuseport_env(listed))
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        raise click.ClickException(f"cannot run {command[0]!r}: {exc.strerror}") from None


@cli.command("shim-path")
def shim_path() -> None:
    """Print the LD_PRELOAD shim's path: LD_PRELOAD=$(portshard shim-path) PORTSHARD_SHIM=..."""
    from .interpose.shim import shim_path as path

    click.echo(path())


def main(argv: list[str] | None = None) -> NoReturn:
    try:
        cli.main(args=argv, prog_name="portshard", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("portshard: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except PortshardError as exc:
        click.echo(f"portshard: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)

"""Supervisor settings: CLI values over a TOML file, every bad value named with its fix."""

from __future__ import annotations

import os
import signal
import tomllib
from pathlib import Path
from typing import Any

import pytest

from portshard.errors import ConfigError
from portshard.supervisor.config import load, parse_ready, parse_signal, reloaded
from portshard.supervisor.loop import expand_placeholders

BASE: dict[str, Any] = {"command": ("srv",), "listen": ("tcp://:0",)}


def test_defaults() -> None:
    cfg = load(dict(BASE, workers=2))
    assert cfg.workers == 2 and cfg.command == ("srv",)
    assert cfg.listen[0].name == "tcp0" and cfg.listen[0].address.port == 0
    assert cfg.ready.kind == "accept" and cfg.stop_signal == signal.SIGTERM
    assert cfg.drain == "freeze" and cfg.surge == 1


def test_the_same_address_twice_is_refused_only_when_it_is_one_group() -> None:
    # Port 0 twice is two ports; one port as TCP and UDP, or on two hosts, is two groups.
    listen = ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "udp://127.0.0.1:53", "tcp://:53")
    cfg = load(dict(BASE, listen=(*listen, "tcp://127.0.0.1:53")))
    assert len(cfg.listen) == 5


def test_named_listen_addresses() -> None:
    cfg = load(dict(BASE, listen=("http=tcp://:0", "dns=udp://127.0.0.1:0")))
    assert [s.name for s in cfg.listen] == ["http", "dns"]


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"command": None}, "no worker command"),
        ({"listen": None}, "no --listen address"),
        ({"command": ("srv", "--fd", "{fd:web}")}, "'{fd:web}': {fd:web} names no --listen"),
        ({"command": ("srv", "{port:tcp1}")}, "{port:tcp1} names no --listen address"),
        (  # the options after the command are the program's
            {"listen": None, "command": ("python3", "app.py", "--listen", "tcp://:8080")},
            "no --listen address before the command: '--listen' comes after 'python3'",
        ),
        ({"listen": ("tcp://:99999",)}, "port 99999 is out of range"),
        ({"listen": ("a=tcp://:0", "a=tcp://:0")}, "name 'a' is used twice"),
        ({"listen": ("tcp://[::1]:8080", "w=tcp://[::1]:8080")}, "tcp://[::1]:8080 is given twice"),
        ({"listen": ("bad name=tcp://:0",)}, "may use only letters"),
        ({"workers": 0}, "--workers 0: out of range"),
        ({"ready": "sometimes"}, "not a readiness mode"),
        ({"ready": "delay:x"}, "the delay must be seconds"),
        ({"stop_signal": "SIGNOPE"}, "not a signal name"),
        ({"grace": -1.0}, "--grace -1.0: out of range"),
        ({"user": "no-such-user-xyz"}, "no such user"),
        ({"drain": "maybe"}, "--drain 'maybe'"),
        ({"name": "a/b"}, "--name 'a/b'"),
    ],
)
def test_bad_values_are_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load({**BASE, **changes})


def test_file_and_cli_precedence(tmp_path: Path) -> None:
    path = tmp_path / "ps.toml"
    path.write_text(
        'command = ["srv", "-v"]\nlisten = ["tcp://:0"]\nworkers = 3\n'
        'stop-signal = "INT"\ngrace = 5\n[env]\nGEN = "1"\n'
    )
    cfg = load({"config": str(path), "workers": 2, "command": None, "listen": None})
    assert cfg.workers == 2  # the command line wins
    assert cfg.command == ("srv", "-v") and cfg.stop_signal == signal.SIGINT and cfg.grace == 5
    assert dict(cfg.env) == {"GEN": "1"}
    path.write_text(
        path.read_text().replace('GEN = "1"', 'GEN = "2"').replace("workers = 3", "workers = 9")
    )
    again = reloaded(cfg, {"config": str(path), "workers": 2})
    assert dict(again.env) == {"GEN": "2"}
    assert again.workers == 2  # the command line's count wins over the file's


def test_reuseport_mode_turns_steering_off_and_cannot_be_switched_by_a_reload(
    tmp_path: Path,
) -> None:
    cfg = load(dict(BASE, listen=("tcp://127.0.0.1:8080",), via="reuseport"))
    assert cfg.via == "reuseport" and cfg.steering == "off"
    path = tmp_path / "ps.toml"
    path.write_text('command = ["srv"]\nlisten = ["tcp://127.0.0.1:8080"]\nvia = "reuseport"\n')
    cli = {"config": str(path), "command": None, "listen": None}
    mode = load(cli)
    path.write_text(path.read_text().replace('"reuseport"', '"auto"'))
    with pytest.raises(ConfigError, match="switching to or from --via reuseport"):
        reloaded(mode, cli)


def test_nonblocking_is_refused_where_portshard_hands_over_no_socket() -> None:
    base = dict(BASE, listen=("tcp://127.0.0.1:8080",), nonblocking=True)
    assert load(dict(base, via="fds")).nonblocking
    with pytest.raises(ConfigError, match=r"--nonblocking .* --via reuseport it hands over none"):
        load(dict(base, via="reuseport"))


@pytest.mark.parametrize(
    "text,message",
    [
        ("workers = ", "not valid TOML"),
        ("wrokers = 2", "unknown setting(s) wrokers"),
        ('command = "srv -v"', "must be a list of arguments"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "ps.toml"
    path.write_text(text + '\nlisten = ["tcp://:0"]\n')
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load({"config": str(path)})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load({"config": "/nonexistent/ps.toml"})


def test_a_pipe_a_device_or_a_huge_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    # A FIFO blocked open() and /dev/zero read() forever: `run -c` hung, and a reload (which
    # reads the file again, in the supervisor's one thread) would have hung the supervisor.
    fifo = tmp_path / "ps.toml"
    os.mkfifo(fifo)  # nobody ever writes it: open() would block
    with pytest.raises(ConfigError, match=r"'.*ps.toml' is a pipe \(FIFO\), not a regular file"):
        load({"config": str(fifo)})
    with pytest.raises(ConfigError, match="'/dev/zero' is a device, not a regular file"):
        load({"config": "/dev/zero"})
    big = tmp_path / "big.toml"
    big.write_text("# x\n" * 300_000)
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load({"config": str(big)})


def test_parsers() -> None:
    assert parse_signal("term") == signal.SIGTERM and parse_signal("SIGQUIT") == signal.SIGQUIT
    assert parse_signal("2") == signal.SIGINT
    with pytest.raises(ConfigError):
        parse_signal("STOP")
    assert parse_ready("delay:0.5").seconds == 0.5 and str(parse_ready("notify")) == "notify"


def test_placeholders() -> None:
    assert expand_placeholders("--fd={fd}", ["http"]) == "--fd=3"
    assert expand_placeholders("{fd:dns}", ["http", "dns"]) == "4"
    assert expand_placeholders("plain", ["http"]) == "plain"
    with pytest.raises(Exception, match="known: http"):
        expand_placeholders("{fd:nope}", ["http"])


# ---- issue 14 item 8: every TOML value type-checked, the error names key, value, type and fix


def _file(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "ps.toml"
    path.write_text(text)
    return {"config": str(path)}


@pytest.mark.parametrize(
    "line,message",
    [
        ("command = 5", r"command = 5 in .*: expected a list of strings, not a whole number; "
         r"e.g. command = \["),
        ("listen = 5", r"listen = 5 in .*: expected a string or a list of strings"),
        ("user = 5", r'user = 5 in .*: expected a string, not a whole number; e.g. user = "'),
        ("control = 5", r"control = 5 in .*: expected a string"),
        ("workers = true", r"workers = true in .*: expected a whole number 1-1024, not a "
         r"boolean; e.g. workers = 4"),
        ("workers = 2.5", r"workers = 2.5 in .*: expected a whole number"),
        ('workers = "4"', r'workers = "4" in .*: expected a whole number'),
        ("workers = " + "9" * 5000, r"a number is out of range.*workers is 1-1024"),
        ("workers = " + "9" * 100, r"workers = <a number of more than 60 digits> in .*: out of "
         r"range \(1-1024\)"),
        ("grace = nan", r"grace = nan in .*: out of range"),
        ('migrate = "yes"', r'migrate = "yes" in .*: expected true or false, not a string'),
        ("stop-signal = true", r"stop-signal = true in .*: expected a signal name or number"),
        ("env = 5", r"env = 5 in .*: expected a table"),
        ("env = { A = [1] }", r"env A is a list"),
        ('env = { A = "x\\u0000y" }', r"env A holds a NUL byte; no program can receive one"),
        ('env = { A = "' + "x" * 200_000 + '" }',
         r"env A is 200,002 bytes with its name; the kernel passes no variable of [\d,]+ or "
         r"more to a program \(MAX_ARG_STRLEN"),
        ('command = ["srv", "' + "x" * 200_000 + '"]',
         r"argument 1 is 200,000 bytes; the kernel passes no argument of [\d,]+ or more"),
        ('steering = "fast"', r'steering = "fast" in .*: not a known choice; use one of: auto'),
        ("ready = 3", r"ready = 3 in .*: expected a string"),
        # a TOML date was shown as datetime.datetime(1979, 5, 27, ...), "not a datetime"
        ("grace = 1979-05-27T07:32:00Z", r"grace = 1979-05-27T07:32:00\+00:00 in .*: expected "
         r"seconds \(0-3600\), not a date or time; e.g. grace = 30"),
        # exec refused it once the sockets were open: "ValueError: execve: argv first element"
        ('command = [""]', r'command = \[""\] in .*: the program\'s name is empty; give the '
         r"program first"),
        ('command = [" ", "-v"]', r"the program's name is empty"),
        # signals that never end a program: each retirement waited out --grace, then SIGKILL
        ('stop-signal = "CONT"', r'stop-signal = "CONT" in .*: SIGCONT only resumes a stopped '
         r"process.*; use e.g. TERM"),
        ('stop-signal = "SIGCHLD"', r"SIGCHLD is ignored unless the program handles it"),
        ("stop-signal = 20", r"stop-signal = 20 in .*: SIGTSTP stops \(pauses\) a process, it "
         r"does not end it"),
    ],
)  # fmt: skip
def test_toml_values_are_type_checked(tmp_path: Path, line: str, message: str) -> None:
    text = "\n".join(
        [line]
        + ['command = ["srv"]'] * (not line.startswith("command"))
        + ['listen = ["tcp://:0"]'] * (not line.startswith("listen"))
    )
    with pytest.raises(ConfigError, match=message):
        load(_file(tmp_path, text))


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ps.toml"
    path.write_bytes(b'command = ["\xff\xfe"]\n')
    with pytest.raises(ConfigError, match=r"is not UTF-8 text .*save it as UTF-8"):
        load({"config": str(path)})


def test_a_bad_file_value_is_reported_even_when_the_command_line_overrides_it(
    tmp_path: Path,
) -> None:
    cli = _file(tmp_path, 'workers = true\ncommand = ["srv"]\nlisten = ["tcp://:0"]')
    with pytest.raises(ConfigError, match="workers = true"):
        load({**cli, "workers": 2})


# ---- the schema: one table makes the CLI, the TOML keys, the defaults and the reload rules


def test_every_setting_is_an_option_of_run_with_its_default_in_the_help() -> None:
    from click.testing import CliRunner

    from portshard.cli import cli
    from portshard.supervisor.settings import SETTINGS

    run = cli.commands["run"]
    params = {p.name for p in run.params}
    page = " ".join(CliRunner().invoke(cli, ["run", "--help"]).output.split())
    for setting in SETTINGS:
        if setting.option:
            assert setting.field in params, setting.field
            assert f"--{setting.key}" in page
            assert f"[default: {setting.shown}" in page, setting.key


def test_config_defaults_are_the_schemas() -> None:
    from portshard.supervisor.config import Config
    from portshard.supervisor.settings import SETTINGS

    cfg = load(dict(BASE, workers=1))
    for setting in SETTINGS:
        if setting.field not in ("command", "listen", "workers"):
            assert getattr(cfg, setting.field) == setting.default_value(), setting.field
            assert Config.__dataclass_fields__[setting.field].default == setting.default_value()


def test_steering_choices_are_the_controllers() -> None:
    from portshard.steering.controller import BACKENDS
    from portshard.supervisor.settings import STEERING

    assert tuple(STEERING) == BACKENDS


# ---- issue 12 item 4: options stop at the first word of the program's command


@pytest.mark.parametrize(
    "args,workers,command",
    [
        (["-w", "2", "--listen", "tcp://:8000", "gunicorn", "-w", "4", "app:app"], 2,
         ("gunicorn", "-w", "4", "app:app")),
        (["-w", "2", "--listen", "tcp://:8000", "python3", "-m", "http.server"], 2,
         ("python3", "-m", "http.server")),
        (["-w", "2", "--listen", "tcp://:8000", "--", "gunicorn", "-w", "4"], 2,
         ("gunicorn", "-w", "4")),
        (["--listen", "tcp://:8000", "srv", "--", "-w", "3"], None, ("srv", "--", "-w", "3")),
    ],
)  # fmt: skip
def test_options_stop_at_the_programs_first_word(
    args: list[str], workers: int | None, command: tuple[str, ...]
) -> None:
    from portshard.cli import cli

    ctx = cli.commands["run"].make_context("run", list(args))
    assert ctx.params["workers"] == workers
    assert tuple(ctx.params["command"]) == command


def test_reload_and_scale_both_wait_by_default() -> None:
    from portshard.cli import cli

    for name, args in (("reload", []), ("scale", ["2"])):
        ctx = cli.commands[name].make_context(name, list(args))
        assert ctx.params["wait"] is True, name
        ctx = cli.commands[name].make_context(name, [*args, "--no-wait"])
        assert ctx.params["wait"] is False, name


# ---- reload: what it cannot change is said, with the reason; a new `workers` is a decision


def _reload_files(tmp_path: Path, before: str, after: str) -> tuple[Any, dict[str, Any]]:
    from portshard.supervisor.config import plan_reload

    path = tmp_path / "ps.toml"
    base = 'command = ["srv"]\n'
    path.write_text(base + before)
    cli = {"config": str(path)}
    cfg = load(cli)
    path.write_text(base + after)
    return plan_reload(cfg, cli), cfg


def test_a_reload_says_which_settings_it_cannot_change_and_why(tmp_path: Path) -> None:
    plan, cfg = _reload_files(
        tmp_path,
        'listen = ["tcp://127.0.0.1:0"]\ngrace = 5\n',
        'listen = ["tcp://127.0.0.1:8080"]\ngrace = 7\nsteering = "off"\n',
    )
    assert plan.config.grace == 7  # reloadable: applied
    assert plan.config.listen == cfg.listen and plan.config.steering == "auto"
    assert len(plan.kept) == 2
    listen, steering = plan.kept
    assert listen.startswith("listen changed in ")
    assert "tcp://127.0.0.1:8080" in listen and "the sockets are bound once" in listen
    assert steering.startswith("steering changed") and "restarted" in steering


def test_a_reload_logs_what_it_keeps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ps.toml"
    path.write_text('command = ["srv"]\nlisten = ["tcp://127.0.0.1:0"]\n')
    cli = {"config": str(path)}
    cfg = load(cli)
    path.write_text('command = ["srv"]\nlisten = ["tcp://127.0.0.1:1"]\nworkers = 3\n')
    with caplog.at_level("WARNING"):
        again = reloaded(cfg, cli)
    assert again.listen == cfg.listen and again.workers == cfg.workers
    assert "reload: listen changed" in caplog.text
    assert "run 'portshard scale 3'" in caplog.text


def test_a_workers_change_in_the_file_is_a_scale_decision(tmp_path: Path) -> None:
    plan, cfg = _reload_files(
        tmp_path, 'listen = ["tcp://:0"]\nworkers = 2\n', 'listen = ["tcp://:0"]\nworkers = 3\n'
    )
    assert plan.scale_to == 3 and plan.kept == ()
    assert plan.config.workers == cfg.workers == 2  # the loop scales after the reload
    # unchanged in the file (say `scale 5` ran since): a reload does not scale back
    plan, _ = _reload_files(
        tmp_path, 'listen = ["tcp://:0"]\nworkers = 2\n', 'listen = ["tcp://:0"]\nworkers = 2\n'
    )
    assert plan.scale_to is None


def test_the_command_lines_workers_wins_over_a_reloaded_file(tmp_path: Path) -> None:
    from portshard.supervisor.config import plan_reload

    path = tmp_path / "ps.toml"
    path.write_text('command = ["srv"]\nlisten = ["tcp://:0"]\nworkers = 2\n')
    cli = {"config": str(path), "workers": 4}
    cfg = load(cli)
    path.write_text(path.read_text().replace("workers = 2", "workers = 3"))
    plan = plan_reload(cfg, cli)
    assert plan.scale_to is None and plan.config.workers == 4
    assert "--workers 4 on the command line wins" in plan.kept[0]


# ---- the example file: every key, derived from the schema, and it loads


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "portshard.toml"


def test_the_example_file_is_the_schemas() -> None:
    from portshard.supervisor.settings import example_toml

    assert EXAMPLE.read_text() == example_toml(), (
        "examples/portshard.toml is stale: write example_toml() to it"
    )


def test_the_example_file_loads_as_it_is_and_with_every_key_set(tmp_path: Path) -> None:
    from portshard.supervisor.settings import KEYS

    cfg = load({"config": str(EXAMPLE)})
    assert cfg.listen[0].address.port == 8080 and cfg.command[0] == "python3"
    every = tmp_path / "every.toml"
    lines = EXAMPLE.read_text().splitlines()
    every.write_text(
        "\n".join(
            line[2:] if line.startswith("# ") and line[2:].split(" = ")[0] in KEYS else line
            for line in lines
        )
    )
    data = tomllib.loads(every.read_text())
    assert set(data) == KEYS
    full = load({"config": str(every)})
    assert full.workers == 4 and full.metrics == "127.0.0.1:9100" and full.user == "www-data"

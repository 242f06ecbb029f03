"""Supervisor settings: CLI values over a TOML file, every bad value named with its fix."""

from __future__ import annotations

import signal
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


def test_named_listen_addresses() -> None:
    cfg = load(dict(BASE, listen=("http=tcp://:0", "dns=udp://127.0.0.1:0")))
    assert [s.name for s in cfg.listen] == ["http", "dns"]


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"command": None}, "no worker command"),
        ({"listen": None}, "no --listen address"),
        ({"listen": ("tcp://:99999",)}, "port 99999 is out of range"),
        ({"listen": ("a=tcp://:0", "a=tcp://:0")}, "name 'a' is used twice"),
        ({"listen": ("bad name=tcp://:0",)}, "may use only letters"),
        ({"workers": 0}, "workers=0 is out of range"),
        ({"ready": "sometimes"}, "not a readiness mode"),
        ({"ready": "delay:x"}, "the delay must be seconds"),
        ({"stop_signal": "SIGNOPE"}, "not a signal name"),
        ({"grace": -1.0}, "grace=-1.0 is out of range"),
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
    assert again.workers == 2  # reload never changes the count: that is `scale`


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

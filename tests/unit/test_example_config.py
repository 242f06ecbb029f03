"""examples/portshard.toml: every setting `portshard run --config` knows, and it loads."""

from __future__ import annotations

import pwd
import tomllib
from pathlib import Path

import pytest

from portshard.supervisor import config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "portshard.toml"


def test_the_example_sets_or_shows_every_key() -> None:
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    shown = {line.lstrip("# ").split(" =", 1)[0] for line in text.splitlines() if " = " in line}
    missing = sorted(config._KEYS - set(data) - shown)
    assert not missing, f"examples/portshard.toml does not show {missing}"


def test_the_example_loads() -> None:
    try:
        pwd.getpwnam("www-data")
    except KeyError:
        pytest.skip("no user www-data here (the example runs its workers as www-data)")
    cfg = config.load({"config": str(EXAMPLE)})
    assert cfg.command[0] == "gunicorn"
    assert cfg.workers == 4 and cfg.name == "web" and cfg.drain == "signal"
    assert str(cfg.ready) == "notify"
    assert [spec.name for spec in cfg.listen] == ["web"]
    assert dict(cfg.env) == {"GUNICORN_CMD_ARGS": "--timeout 60"}

"""examples/portshard.toml: every setting `portshard run --config` knows, and it loads.

(tests/unit/test_config.py checks that the file is what the settings schema writes.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

from portshard.supervisor import config
from portshard.supervisor.settings import KEYS

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "portshard.toml"


def test_the_example_sets_or_shows_every_key() -> None:
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    shown = {line.lstrip("# ").split(" =", 1)[0] for line in text.splitlines() if " = " in line}
    missing = sorted(set(KEYS) - set(data) - shown)
    assert not missing, f"examples/portshard.toml does not show {missing}"


def test_the_example_loads() -> None:
    cfg = config.load({"config": str(EXAMPLE)})
    assert cfg.command and cfg.listen
    assert cfg.config_file == str(EXAMPLE)

"""Property-based fuzzing (hypothesis) of what reaches the supervisor from outside: the control
protocol decoder and the TOML loader. Any input gives a valid value or a clean ControlError /
ConfigError, never another exception (issue 14). Bounded: a fixed number of examples each."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portshard.control import protocol
from portshard.errors import ConfigError, ControlError
from portshard.supervisor.config import Config, load
from portshard.supervisor.settings import SETTINGS

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written to the tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**17, max_value=10**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1", None, True]) | json_values,
        "cmd": st.sampled_from([*protocol.COMMANDS, "boom", ""]) | json_values,
        "workers": json_values,
        "wait": json_values,
    },
)


def _decodes_cleanly(line: bytes) -> None:
    try:
        message = protocol.decode_request(line)
    except ControlError:
        return
    assert isinstance(message, dict) and message["cmd"] in protocol.COMMANDS


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_request_or_a_control_error(line: bytes) -> None:
    _decodes_cleanly(line)


@FUZZ
@given(requests | json_values)
def test_any_json_decodes_to_a_request_or_a_control_error(value: Any) -> None:
    _decodes_cleanly(json.dumps(value).encode())


@FUZZ
@given(st.integers(min_value=1, max_value=6000), st.sampled_from(["[", '{"a":', "-", "9"]))
def test_deep_or_huge_input_is_a_control_error(n: int, piece: str) -> None:
    _decodes_cleanly((piece * n).encode())
    _decodes_cleanly(b'{"v":1,"cmd":"scale","workers":' + b"9" * n + b"}")


# ---- the TOML loader ---------------------------------------------------------------------


def toml(value: Any) -> str:
    """A value as TOML (inline), for the generated files."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml(v)}" for k, v in value.items()) + "}"


toml_values = st.recursive(
    st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["tcp://127.0.0.1:0", "udp://[::1]:0", "tcp://:0", "accept", "notify",
                       "delay:0.5", "TERM", "9", "freeze", "auto", "off", "nobody", "0",
                       "a\0b", "0:99999999999999999999", "root:root", "9" * 30, ":9100",
                       "[::1]:0", "delay:nan", "SIGSTOP"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=6,
)  # fmt: skip
KEYS = [s.key for s in SETTINGS]
files = st.dictionaries(st.sampled_from([*KEYS, "bogus"]), toml_values, max_size=6)
# ... and files that get past the command and listen checks, so the other values are reached
valid_base = {"command": ["srv"], "listen": ["tcp://127.0.0.1:0"]}
nearly_valid = st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=4).map(
    lambda d: {**valid_base, **{k: v for k, v in d.items() if k not in valid_base}}
)


def _loads_cleanly(path: Path) -> None:
    try:
        cfg = load({"config": str(path)})
    except ConfigError:
        return
    assert isinstance(cfg, Config) and cfg.command and cfg.listen
    assert 1 <= cfg.workers <= 1024


@FUZZ
@given(files | nearly_valid)
def test_any_settings_file_loads_or_is_a_config_error(tmp_path: Path, data: dict[str, Any]) -> None:
    path = tmp_path / "ps.toml"
    path.write_text("\n".join(f"{json.dumps(k)} = {toml(v)}" for k, v in data.items()))
    _loads_cleanly(path)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_file_content_loads_or_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ps.toml"
    path.write_bytes(content)
    _loads_cleanly(path)

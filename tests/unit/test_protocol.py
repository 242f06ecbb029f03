from __future__ import annotations

import json

import pytest

from portshard.control import protocol
from portshard.errors import ControlError


def test_round_trip() -> None:
    line = protocol.encode({"v": 1, "cmd": "scale", "workers": 2})
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    assert protocol.decode_request(line)["workers"] == 2
    assert json.loads(protocol.reply_error("no"))["ok"] is False


@pytest.mark.parametrize(
    "line,message",
    [
        (b"garbage", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"cmd": "status"}', "version None is not supported"),
        (b'{"v": 2, "cmd": "status"}', "version 2"),
        # true and 1.0 equal 1 in Python: they passed as version 1
        (b'{"v": true, "cmd": "status"}', "version True is not supported"),
        (b'{"v": 1.0, "cmd": "status"}', "version 1.0 is not supported"),
        (b'{"v": 1, "cmd": "explode"}', "unknown command 'explode'"),
    ],
)
def test_bad_requests(line: bytes, message: str) -> None:
    with pytest.raises(ControlError, match=message):
        protocol.decode_request(line)

"""Bad input to the CLI as a careless or hostile user types it: each is refused with one
error line that names the value, the reason and the fix, a non-zero status and no
traceback, before anything is opened or asked of a supervisor."""

from __future__ import annotations

import pytest

from portshard.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    code = info.value.code
    return int(code) if isinstance(code, int) else 1, capsys.readouterr().err


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "rror" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        # nan, inf and 1e309 passed click's FloatRange and reached socket.settimeout(): a
        # ValueError or OverflowError traceback
        (["reload", "--timeout", "nan"], ["'--timeout'", "nan is out of range", "86400"]),
        (["reload", "--timeout", "inf"], ["inf is out of range"]),
        (["reload", "--timeout", "1e309"], ["1e309 is out of range"]),
        (["reload", "--timeout", "0"], ["0 is out of range", "more than 0"]),
        (["reload", "--timeout", "soon"], ["'soon' is not a number of seconds"]),
        (["scale", "2", "--timeout", "nan"], ["nan is out of range"]),
        (["upgrade", "--timeout", "inf"], ["inf is out of range"]),
        (["drain", "--wait", "--deadline", "nan"], ["'--deadline'", "nan is out of range"]),
        (["drain", "--settle", "nan"], ["'--settle'", "nan is out of range"]),
        (["drain", "--settle", "-1"], ["-1 is out of range", "0 to 86400"]),
        # `run --name` refuses these; `status --name ../../x` asked /run/x.sock
        (["status", "--name", "../../x"], ["'../../x' is not a supervisor name", "--control"]),
        (["stop", "--name", ""], ["'' is not a supervisor name"]),
        (["status", "--watch", "nan"], ["nan is not a refresh interval"]),
    ],
)
def test_bad_numbers_and_names_of_the_client_commands(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: list[str]
) -> None:
    code, err = run_cli(capsys, *argv, "--control", "/nonexistent/portshard-test.sock")
    line = error_line(err)
    assert code == 2, err
    for part in says:
        assert part in line, f"{part!r} not in {line!r}"


def test_good_seconds_still_parse() -> None:
    from portshard.cli import cli

    ctx = cli.commands["reload"].make_context("reload", ["--timeout", "0.5"])
    assert ctx.params["timeout"] == 0.5
    ctx = cli.commands["drain"].make_context("drain", ["--deadline", "30", "--settle", "0"])
    assert (ctx.params["deadline"], ctx.params["settle"]) == (30.0, 0.0)

"""Bad input to the CLI as a careless or hostile user types it: each is refused with one
error line that names the value, the reason and the fix, a non-zero status and no
traceback, before anything is opened or asked of a supervisor."""

from __future__ import annotations

from pathlib import Path

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


def _program(tmp_path: Path, name: str, text: str, mode: int = 0o755) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_run_check_names_what_exec_would_refuse(tmp_path: Path) -> None:
    # `run --check` (and so `portshard upgrade`) said "the settings are fine" for a directory
    # and for a script whose '#!' interpreter does not exist; the start then failed.
    from portshard.supervisor.spawn import program_problem

    cases = {
        str(tmp_path): "is a directory, not a program; give the program's path",
        _program(tmp_path, "plain", "#!/bin/sh\n", 0o644): "is not executable; chmod +x it",
        _program(tmp_path, "lost", "#!/nonexistent/bin/python3 -u\n"): (
            "is a script for '/nonexistent/bin/python3' (its '#!' line), which does not exist"
        ),
        str(tmp_path / "absent"): "is not an executable file; check the path",
        "no-such-program-anywhere": "is not an executable file on PATH; check the path",
        "": "is not an executable file on PATH",
    }
    for program, says in cases.items():
        problem = program_problem(program)
        assert problem is not None and says in problem, (program, problem)
    assert program_problem(_program(tmp_path, "fine", "#!/bin/sh\nexit 0\n")) is None
    assert program_problem("sh") is None
    assert program_problem("sh", path=str(tmp_path)) is not None  # the workers' own PATH


def test_run_check_refuses_a_script_with_a_missing_interpreter(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = _program(tmp_path, "srv", "#!/nonexistent/interp\n")
    code, err = run_cli(capsys, "run", "--check", "--listen", "tcp://127.0.0.1:0", script)
    line = error_line(err)
    assert code == 2 and "'/nonexistent/interp' (its '#!' line), which does not exist" in line


def test_run_check_resolves_the_listen_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    # `run --check` said "the settings are fine" for hosts the start then could not resolve.
    for host, says in (
        ("256.1.1.1", "host '256.1.1.1' does not resolve"),
        ("no-such-host.invalid", "host 'no-such-host.invalid' does not resolve"),
        ("[fe80::1%99999]", "no network interface '99999'"),
    ):
        code, err = run_cli(capsys, "run", "--check", "--listen", f"tcp://{host}:0", "sh")
        assert code == 2 and says in error_line(err), err
    code, err = run_cli(capsys, "run", "--check", "--listen", "tcp://localhost:0", "sh")
    assert code == 0, err

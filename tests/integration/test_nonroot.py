"""`portshard run` by a user without root, as a stranger runs it: setpriv to nobody, the
system's Python (a pyenv or /root venv is not readable by nobody), this tree on PYTHONPATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from portshard.control.client import request
from tests.conftest import ROOT, Procs, needs_root

from ._util import nobody_uid

SYSTEM_PYTHON = "/usr/bin/python3"
APP = """
import portshard
sock = portshard.inherited()[0]
while True:
    conn, _ = sock.accept()
    conn.close()
"""


def _as_nobody(procs: Procs, home: Path, *args: str) -> subprocess.Popen[bytes]:
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON}")
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} is {version}, not this venv's Python (click from it)")
    uid = nobody_uid()
    os.chown(home, uid, -1)
    click_dir = str(Path(click.__file__).parent.parent)  # pure Python: any 3.x of this minor
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{ROOT / 'src'}:{click_dir}",
        "XDG_RUNTIME_DIR": str(home),
    }
    wrap = ["setpriv", "--reuid", str(uid), "--regid", "nogroup", "--clear-groups"]
    return procs.start(
        [*wrap, SYSTEM_PYTHON, "-m", "portshard", *args],
        env=env,
        stderr=subprocess.PIPE,
        bufsize=0,
    )


def _lines_until(proc: subprocess.Popen[bytes], wanted: str, deadline: float) -> list[str]:
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    seen = b""
    while time.monotonic() < deadline:
        chunk = proc.stderr.read() or b""
        seen += chunk
        if wanted.encode() in seen or (not chunk and proc.poll() is not None):
            break
        time.sleep(0.05)
    return seen.decode(errors="replace").splitlines()


@needs_root
def test_user_naming_the_user_portshard_runs_as_is_no_change(procs: Procs, short_tmp: Path) -> None:
    # Before: config accepted it, then every spawn failed at setgroups() with "cannot run
    # worker command '/usr/bin/python3': Operation not permitted".
    sup = _as_nobody(
        procs,
        short_tmp,
        "run",
        "--user",
        "nobody",
        "-w",
        "1",
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        SYSTEM_PYTHON,
        "-c",
        APP,
    )
    lines = _lines_until(sup, "ready after", time.monotonic() + 30)
    text = "\n".join(lines)
    assert "ready after" in text, text
    assert "Operation not permitted" not in text
    sup.terminate()
    assert sup.wait(timeout=30) == 0


@needs_root
def test_user_with_another_group_when_not_root_is_refused_at_once(
    procs: Procs, short_tmp: Path
) -> None:
    sup = _as_nobody(
        procs,
        short_tmp,
        "run",
        "--user",
        "nobody:root",
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        SYSTEM_PYTHON,
        "-c",
        APP,
    )
    assert sup.wait(timeout=30) != 0
    assert sup.stderr is not None
    text = sup.stderr.read().decode()
    assert "--user 'nobody:root': changing the group to 0 needs root" in text, text
    assert "Traceback" not in text


@needs_root
def test_an_unreaped_child_does_not_hold_up_a_retirement(procs: Procs, short_tmp: Path) -> None:
    """`sh -c 'helper & exec server'` leaves the helper a zombie the server never reaps; its
    /proc files are root's, so a non-root supervisor once took it as "cannot see what it
    holds; assuming it holds a connection", and every retirement waited --grace."""
    control = short_tmp / "c.sock"
    sup = _as_nobody(
        procs,
        short_tmp,
        "run",
        "--control",
        str(control),
        "--grace",
        "5",
        "-w",
        "1",
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        "sh",
        "-c",
        'true & exec "$0" -c "$1"',
        SYSTEM_PYTHON,
        APP,
    )
    lines = _lines_until(sup, "ready after", time.monotonic() + 30)
    assert "ready after" in "\n".join(lines), lines
    request(str(control), "reload", timeout=60, wait=True)
    lines += _lines_until(sup, "retired", time.monotonic() + 30)
    text = "\n".join(lines)
    assert "pid" in text and " idle" in text, text  # one slot, no CAP_NET_ADMIN: killed frozen
    assert "cannot see what it holds" not in text and "still holds" not in text, text
    sup.terminate()
    assert sup.wait(timeout=30) == 0


HIDDEN_HELPER = "import ctypes, time; ctypes.CDLL(None).prctl(4, 0); time.sleep(600)"


@needs_root
def test_a_helper_we_cannot_look_into_is_said_once(procs: Procs, short_tmp: Path) -> None:
    """A helper that made itself non-dumpable (PR_SET_DUMPABLE 0, as sshd or gpg-agent do) has
    /proc files that only root may read: the retirement assumes it holds a connection until
    --grace, and says so once, not at each of the freeze-check's looks (hundreds before)."""
    control = short_tmp / "c.sock"
    sup = _as_nobody(
        procs,
        short_tmp,
        "run",
        "--control",
        str(control),
        "--grace",
        "2",
        "-w",
        "1",
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        "sh",
        "-c",
        '"$0" -c "$2" & exec "$0" -c "$1"',
        SYSTEM_PYTHON,
        APP,
        HIDDEN_HELPER,
    )
    lines = _lines_until(sup, "ready after", time.monotonic() + 30)
    assert "ready after" in "\n".join(lines), lines
    request(str(control), "reload", timeout=60, wait=True)
    lines += _lines_until(sup, "retired", time.monotonic() + 30)
    text = "\n".join(lines)
    assert "still holds connections after 2s" in text, text
    assert text.count("cannot see what it holds") == 1, text
    sup.terminate()
    assert sup.wait(timeout=30) == 0

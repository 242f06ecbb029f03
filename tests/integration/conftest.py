"""Fixtures shared by the integration tests: the supervisor (`start`), and the unmodified
servers the interposition tests build once per session (static C, Go)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.supervisor_fixture import FDWORKER, Running, start

__all__ = ["need", "start"]  # `start`: the supervisor fixture, shared by the supervisor tests

WORKERS = ROOT / "tests" / "workers"


def need(tool: str) -> str:
    """The tool's path; fail in CI (make deps-test installs it), skip elsewhere."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (make deps-test installs the test packages)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on loopback, port 0, backlog 16."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


@pytest.fixture(scope="session")
def shared_sup() -> Iterator[Running]:
    """One `portshard run -w 1 --metrics` for the whole session, for the tests that only look
    at it or send it what it must refuse (each boot costs 1-3 s). A test that changes it
    (reload, scale, drain, stop, signals, limits) starts its own with ``start``."""
    with tempfile.TemporaryDirectory(prefix="ps-", dir="/tmp") as d:
        args = ["-w", "1", "--metrics", "127.0.0.1:0", "--listen", "tcp://127.0.0.1:0"]
        sup = Running([*args, "--", *FDWORKER], Path(d) / "shared.sock")
        try:
            sup.wait_ready()
            yield sup
        finally:
            sup.close()


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interpose-build")


@pytest.fixture(scope="session")
def static_server(build_dir: Path) -> str:
    out = build_dir / "static_server"
    subprocess.run(
        [need("gcc"), "-static", "-O2", "-o", str(out), str(WORKERS / "static_server.c")],
        check=True,
        timeout=120,
    )
    return str(out)


@pytest.fixture(scope="session")
def go_server(build_dir: Path) -> str:
    """hello.go built with CGO_ENABLED=0 (Go's build cache makes later sessions fast)."""
    out = build_dir / "hello"
    env = {**os.environ, "CGO_ENABLED": "0", "GO111MODULE": "off"}
    if not env.get("HOME") and not env.get("GOCACHE"):
        env["GOCACHE"] = str(build_dir / "gocache")
        env["GOPATH"] = str(build_dir / "gopath")
    subprocess.run(
        [need("go"), "build", "-o", str(out), str(WORKERS / "hello.go")],
        check=True,
        timeout=300,
        env=env,
        cwd=build_dir,
    )
    return str(out)

"""The matching rules of the shim and the trap, the sockaddr parser, and the per-spawn plan."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from portshard.errors import ConfigError
from portshard.interpose import plan, seccomp, shim
from portshard.interpose.seccomp import Target, match, parse_sockaddr

V4_ANY = bytes(4)
V6_ANY = bytes(16)
LOOP4 = socket.inet_pton(socket.AF_INET, "127.0.0.1")
LOOP6 = socket.inet_pton(socket.AF_INET6, "::1")
TCP = (socket.SOCK_STREAM, socket.IPPROTO_TCP)
UDP = (socket.SOCK_DGRAM, socket.IPPROTO_UDP)


_UNUSED = socket.socket()  # match() never touches a Target's socket


def teardown_module() -> None:
    _UNUSED.close()


def target(
    family: int, host: bytes, port: int, kind: tuple[int, int] = TCP, *, dual: bool = False
) -> Target:
    return Target(_UNUSED, family, kind[0], kind[1], host, port, dual)


def test_exact_address_wins_over_a_wildcard_match() -> None:
    any6 = target(socket.AF_INET6, V6_ANY, 80)
    loop4 = target(socket.AF_INET, LOOP4, 80)
    assert match([any6, loop4], socket.AF_INET, LOOP4, 80, *TCP) is loop4
    assert match([any6, loop4], socket.AF_INET6, V6_ANY, 80, *TCP) is any6


def test_a_wildcard_gets_the_same_family_first_then_the_other() -> None:
    loop4 = target(socket.AF_INET, LOOP4, 80)
    loop6 = target(socket.AF_INET6, LOOP6, 80)
    assert match([loop6, loop4], socket.AF_INET, V4_ANY, 80, *TCP) is loop4
    assert match([loop4], socket.AF_INET6, V6_ANY, 80, *TCP) is loop4
    assert match([loop6], socket.AF_INET, V4_ANY, 80, *TCP) is loop6


def test_other_addresses_ports_and_protocols_are_not_managed() -> None:
    loop4 = target(socket.AF_INET, LOOP4, 80)
    any4 = target(socket.AF_INET, V4_ANY, 80)
    other = socket.inet_pton(socket.AF_INET, "127.0.0.2")
    assert match([loop4], socket.AF_INET, other, 80, *TCP) is None
    assert match([any4], socket.AF_INET, LOOP4, 81, *TCP) is None
    assert match([loop4], socket.AF_INET, LOOP4, 81, *TCP) is None
    assert match([loop4], socket.AF_INET, LOOP4, 80, *UDP) is None
    assert match([loop4], socket.AF_INET, LOOP4, 80, socket.SOCK_STREAM, 262) is None  # MPTCP


def test_one_address_gets_the_wildcard_socket_that_receives_it() -> None:
    """uvicorn binds 127.0.0.1:P by default; with --listen tcp://:P it gets that socket (and
    a log line) instead of EADDRINUSE; never a socket that cannot receive its family."""
    any4 = target(socket.AF_INET, V4_ANY, 80)
    dual = target(socket.AF_INET6, V6_ANY, 80, dual=True)
    v6only = target(socket.AF_INET6, V6_ANY, 80)
    assert match([any4], socket.AF_INET, LOOP4, 80, *TCP) is any4
    assert match([dual], socket.AF_INET, LOOP4, 80, *TCP) is dual
    assert match([dual], socket.AF_INET6, LOOP6, 80, *TCP) is dual
    assert match([v6only, any4], socket.AF_INET, LOOP4, 80, *TCP) is any4
    assert match([dual, any4], socket.AF_INET, LOOP4, 80, *TCP) is any4  # same family first
    assert match([v6only], socket.AF_INET, LOOP4, 80, *TCP) is None  # IPv6 only: no IPv4
    assert match([any4], socket.AF_INET6, LOOP6, 80, *TCP) is None  # IPv4 cannot take ::1
    assert match([any4], socket.AF_INET, LOOP4, 80, *UDP) is None
    loop4 = target(socket.AF_INET, LOOP4, 80)
    assert match([dual, loop4], socket.AF_INET, LOOP4, 80, *TCP) is loop4  # exact first
    note = seccomp.widened(any4, socket.AF_INET, LOOP4, 80)
    assert note is not None and "127.0.0.1:80" in note and "0.0.0.0:80" in note
    assert "--listen tcp://127.0.0.1:80" in note
    assert seccomp.widened(loop4, socket.AF_INET, LOOP4, 80) is None
    assert seccomp.widened(any4, socket.AF_INET, V4_ANY, 80) is None


def test_a_mismatch_names_both_addresses_and_the_fix() -> None:
    loop4 = target(socket.AF_INET, LOOP4, 80)
    other = socket.inet_pton(socket.AF_INET, "127.0.0.2")
    why = seccomp.mismatch([loop4], socket.AF_INET, other, 80, *TCP)
    assert why is not None
    assert "127.0.0.2:80" in why and "127.0.0.1:80" in why
    assert "--listen tcp://127.0.0.2:80" in why
    assert seccomp.mismatch([loop4], socket.AF_INET, other, 81, *TCP) is None  # not managed
    udp = seccomp.mismatch([loop4], socket.AF_INET, LOOP4, 80, *UDP)
    assert udp is not None and "protocol" in udp
    note = seccomp.unmanaged([loop4], 9090)
    assert "port 9090" in note and "80" in note and "{port}" in note


def test_parse_sockaddr() -> None:
    sin = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + LOOP4 + bytes(8)
    assert parse_sockaddr(sin) == (socket.AF_INET, LOOP4, 8080)
    sin6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 53, 0) + LOOP6 + bytes(4)
    assert parse_sockaddr(sin6) == (socket.AF_INET6, LOOP6, 53)
    assert parse_sockaddr(sin[:10]) is None  # too short for its family
    assert parse_sockaddr(struct.pack("=H", socket.AF_UNIX) + b"/tmp/x") is None
    assert parse_sockaddr(b"") is None


def test_copied_options_cover_what_the_docs_list() -> None:
    names = {row[-1] for row in seccomp.COPIED_OPTIONS}
    assert {"TCP_DEFER_ACCEPT", "TCP_FASTOPEN", "SO_RCVBUF", "TCP_NODELAY"} <= names
    preload_c = (Path(seccomp.__file__).parent / "preload.c").read_text()
    assert all(f'"{name}"' in preload_c for name in names)  # the shim copies the same list


def test_plan_edits_the_environment_for_each_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"LD_PRELOAD": "/x/libportshard_preload.so /opt/other.so", "PORTSHARD_SHIM": "x"}
    got = plan.plan("fds", ["/bin/true"], env, inodes=[11], ports=[80], uid=None)
    assert got.mode == "fds" and env == {"LD_PRELOAD": "/opt/other.so"}
    got = plan.plan("preload", ["/bin/true"], env, inodes=[11, 12], ports=[80], uid=None)
    assert got.mode == "preload" and not got.seccomp
    assert env["LD_PRELOAD"].split() == [shim.shim_path(), "/opt/other.so"]
    assert env["PORTSHARD_SHIM"] == "inherit" and env["PORTSHARD_SHIM_FDS"] == "3:11,4:12"
    got = plan.plan("seccomp", ["/bin/true"], env, inodes=[11], ports=[80], uid=None)
    assert got.seccomp and "PORTSHARD_SHIM" not in env
    got = plan.plan("reuseport", ["/bin/true"], env, inodes=[], ports=[80, 8080], uid=None)
    assert got.mode == "reuseport+preload" and got.reuseport and not got.seccomp
    assert env["PORTSHARD_SHIM"] == "reuseport" and env["PORTSHARD_SHIM_PORTS"] == "80,8080"

    def missing(_uid: int | None) -> str:
        raise ConfigError("the LD_PRELOAD shim is missing")

    monkeypatch.setattr(shim, "shim_for", missing)
    got = plan.plan("auto", ["/bin/true"], env, inodes=[11], ports=[80], uid=None)
    assert got.mode == "fds" and "missing" in got.why  # auto never breaks a LISTEN_FDS program
    with pytest.raises(ConfigError):
        plan.plan("preload", ["/bin/true"], env, inodes=[11], ports=[80], uid=None)


def test_port_lists_are_validated() -> None:
    assert shim.parse_ports("80, 8080") == [80, 8080]
    for bad in ("0", "65536", "http", "80,,81", "+80", "9" * 5000, "80," + "0" * 5000):
        with pytest.raises(ConfigError, match="not a port") as err:  # 5,000 digits: int() raised
            shim.parse_ports(bad)
        assert len(str(err.value)) < 200


def test_a_worker_user_gets_a_shim_it_can_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    installed = private / shim.SHIM_NAME
    installed.write_bytes(b"\x7fELF...")
    monkeypatch.setattr(shim, "shim_path", lambda: str(installed))
    monkeypatch.setattr(shim, "_copies", {})
    copy = Path(shim.shim_for(65534))
    assert copy != installed and copy.read_bytes() == installed.read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o644 and copy.parent.stat().st_mode & 0o777 == 0o755
    assert shim.shim_for(65534) == str(copy)  # one copy per supervisor
    assert shim.shim_for(None) == str(installed)  # our own user reads the installed one


@pytest.mark.parametrize(
    "argv",
    [
        ["gunicorn", "--bind", "fd://3", "app:app"],
        ["/venv/bin/gunicorn", "-b", "fd://3", "app:app"],
        ["gunicorn", "--bind=fd://4", "app:app"],
        ["gunicorn", "-bfd://3", "app:app"],
        ["python3", "-m", "gunicorn", "-w", "2", "--bind", "fd://3", "app:app"],
    ],
)
def test_gunicorn_with_a_bind_to_an_inherited_fd_is_refused(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"gunicorn --bind fd://\d.*EBADF.*Drop --bind"):
        plan.refuse_double_take(argv, {})


def test_other_gunicorn_forms_and_other_programs_pass() -> None:
    plan.refuse_double_take(["gunicorn", "--bind", "0.0.0.0:8000", "app:app"], {})
    plan.refuse_double_take(["gunicorn", "app:app"], {})
    plan.refuse_double_take(["hypercorn", "--bind", "fd://3", "app:app"], {})  # no LISTEN_FDS
    with pytest.raises(ConfigError, match="fd://3"):
        plan.refuse_double_take(["gunicorn", "app:app"], {"GUNICORN_CMD_ARGS": "--bind fd://3"})

"""Property-based fuzzing (hypothesis) of the LD_PRELOAD shim's environment (issue 14).

preload.c reads PORTSHARD_SHIM, PORTSHARD_SHIM_FDS (FD:INODE,...), PORTSHARD_SHIM_PORTS
(PORT,...) and PORTSHARD_SHIM_DEBUG once; anything malformed must switch it off with one line on
stderr, and the program runs as it would without it. A small C program (workers/
shim_env_probe.c: binds a free port P, then the port Q of the listening socket on its fd 3) runs
under the shim with generated environments: random bytes, huge, negative and overflowing
numbers, odd separators, thousands of entries. For each, against a model of the documented
grammar (below): never a signal; P binds as without the shim; Q binds only when the settings
are valid and say so (fd 3 adopted, or SO_REUSEPORT for a listed port), else EADDRINUSE as
without the shim; stderr is the one warning line naming the variable for a malformed setting,
nothing for a valid one but the documented note naming P as a port it does not manage when it
holds fd 3 (PORTSHARD_SHIM_DEBUG=1 adds lines, all the shim's).
Both on the installed shim and on the same source built with UBSan. Bounded: 75 examples each
(a few ms each) plus the explicit ones, about 20 s in all."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portshard.interpose.shim import shim_path

ROOT = Path(__file__).resolve().parent.parent.parent
PROBE_C = ROOT / "tests" / "workers" / "shim_env_probe.c"
MAX_FDS = 64  # preload.c PORTSHARD_MAX_FDS
MAX_PORTS = 256  # PORTSHARD_MAX_PORTS
ENV_MAX = 100_000  # one environment string may not exceed 128 KiB (MAX_ARG_STRLEN)

FUZZ = settings(
    max_examples=75,  # for each of the two builds
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (make deps-test installs it)")
    out = tmp_path_factory.mktemp("shimfuzz") / "shim_env_probe"
    subprocess.run([gcc, "-O1", "-o", str(out), str(PROBE_C)], check=True, timeout=60)
    return str(out)


@pytest.fixture(scope="module", params=["installed", "ubsan"])
def shim(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The installed shim, and the same source built with UBSan (undefined behaviour, such as
    a signed overflow in the parser, aborts the program: a failure here, not a silent wrong
    value)."""
    if request.param == "installed":
        return shim_path()
    out = tmp_path_factory.mktemp("shimubsan") / "libportshard_preload.so"
    source = ROOT / "src" / "portshard" / "interpose" / "preload.c"
    flags = ["-O1", "-g", "-fsanitize=undefined", "-fno-sanitize-recover=all", "-shared", "-fPIC"]
    res = subprocess.run(
        ["gcc", *flags, "-fvisibility=hidden", "-o", str(out), str(source), "-ldl", "-pthread"],
        capture_output=True,
        timeout=120,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot build the shim with UBSan (libubsan missing?): {res.stderr[-300:]!r}")
    return str(out)


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    """fd 3 of every run: a listening socket with SO_REUSEPORT, as a supervisor passes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


# ---- the documented grammar, as a model -----------------------------------------------------


def number(text: bytes, low: int, high: int) -> int | None:
    """preload.c portshard_number: 1-20 ASCII digits, within [low, high]."""
    if not 1 <= len(text) <= 20 or any(c not in b"0123456789" for c in text):
        return None
    value = int(text)
    return value if low <= value <= high else None


def entries(text: bytes) -> list[bytes]:
    """The comma-separated entries; a trailing comma ends the list."""
    parts = text.split(b",")
    return parts[:-1] if parts and parts[-1] == b"" else parts if text else []


def fds_setting(text: bytes | None, inode: int) -> tuple[bool, bool]:
    """(valid, fd 3 named with its inode). Entries naming anything but our socket are ignored;
    more than MAX_FDS matches is malformed."""
    if text is None:
        return False, False
    matched = 0
    for entry in entries(text):
        fd_text, colon, ino_text = entry.partition(b":")
        fd = number(fd_text, 0, 1 << 20)
        ino = number(ino_text, 1, 1 << 62)
        if not colon or fd is None or ino is None or matched >= MAX_FDS:
            return False, False
        matched += fd == 3 and ino == inode
    return True, matched > 0


def ports_setting(text: bytes | None, port: int) -> tuple[bool, bool]:
    """(valid, ``port`` gets SO_REUSEPORT): unset or empty is every port."""
    if text is None:
        return True, True
    ports = [number(e, 1, 65535) for e in entries(text)]
    if any(p is None for p in ports) or len(ports) > MAX_PORTS:
        return False, False
    return True, not ports or port in ports


def expect(env: dict[bytes, bytes], inode: int, port: int) -> tuple[str | None, bool]:
    """(the variable the one warning names, or None; whether Q binds)."""
    mode = env.get(b"PORTSHARD_SHIM")
    if not mode:
        return None, False
    if mode == b"inherit":
        valid, adopt = fds_setting(env.get(b"PORTSHARD_SHIM_FDS"), inode)
        return (None if valid else "PORTSHARD_SHIM_FDS"), adopt
    if mode == b"reuseport":
        valid, listed = ports_setting(env.get(b"PORTSHARD_SHIM_PORTS"), port)
        return (None if valid else "PORTSHARD_SHIM_PORTS"), listed
    return "PORTSHARD_SHIM", False


def mode_inherit_adopting(env: dict[bytes, bytes], inode: int) -> bool:
    """Inherit mode holding the supervisor's socket: the shim names an unmanaged listener."""
    return env.get(b"PORTSHARD_SHIM") == b"inherit" and fds_setting(
        env.get(b"PORTSHARD_SHIM_FDS"), inode
    ) == (True, True)


# ---- generated environments -----------------------------------------------------------------

no_nul = st.binary(max_size=64).map(lambda b: b.replace(b"\0", b""))
digits = st.integers(min_value=-(2**70), max_value=2**70).map(lambda n: str(n).encode())
odd_numbers = st.sampled_from(
    [b"", b"-0", b"+3", b" 3", b"3 ", b"0x3", b"\xef\xbc\x93", b"03", b"00000000000000000003",
     b"4611686018427387904", b"4611686018427387905", b"18446744073709551616",
     b"99999999999999999999", b"40000000000000000000", b"1048576", b"1048577", b"65535",
     b"65536", b"0"]
)  # fmt: skip
separators = st.sampled_from([b",", b",,", b";", b" ", b":", b"\n", b", "])


def fd_entries(inode: int) -> st.SearchStrategy[bytes]:
    real = st.just(f"3:{inode}".encode())
    number_ = digits | odd_numbers | st.integers(0, 70).map(lambda n: str(n).encode())
    made = st.tuples(number_, st.sampled_from([b":", b"::", b""]), number_ | st.just(b"%d" % inode))
    return real | made.map(b"".join) | no_nul


def joined(entry: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    listed = st.tuples(st.lists(entry, max_size=6), separators, st.booleans()).map(
        lambda t: t[1].join(t[0]) + (t[1] if t[2] else b"")
    )
    # thousands of entries: one entry repeated
    many = st.tuples(entry, st.integers(60, 5000)).map(lambda t: b",".join([t[0]] * t[1]))
    return (listed | many | no_nul).map(lambda b: b[:ENV_MAX])


def environments(inode: int, port: int) -> st.SearchStrategy[dict[bytes, bytes]]:
    ports = st.integers(0, 70000).map(lambda n: str(n).encode()) | st.just(b"%d" % port)
    return st.fixed_dictionaries(
        {
            b"PORTSHARD_SHIM": st.sampled_from([b"inherit", b"reuseport", b"", b"INHERIT"])
            | no_nul,
        },
        optional={
            b"PORTSHARD_SHIM_FDS": joined(fd_entries(inode)),
            b"PORTSHARD_SHIM_PORTS": joined(ports | odd_numbers),
            b"PORTSHARD_SHIM_DEBUG": st.sampled_from([b"1", b"0", b"", b"11"]) | no_nul,
        },
    )


# ---- the property ---------------------------------------------------------------------------


def run(probe: str, shim: str, listener: socket.socket, env: dict[bytes, bytes]) -> None:
    full = {b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin"), **env}
    fd = listener.fileno()
    res = subprocess.run(
        [probe, str(fd), shim], env=full, pass_fds=[fd], capture_output=True, timeout=20
    )
    inode = os.fstat(fd).st_ino
    port = listener.getsockname()[1]
    shown = {k.decode(): v[:200] for k, v in env.items()}
    assert res.returncode == 0, f"exit {res.returncode} (signal if < 0) for {shown}: {res.stderr!r}"
    warned, q_binds = expect(env, inode, port)
    out = res.stdout.decode().split()
    assert out[0] == "P=0", f"the program's own bind failed ({out}) for {shown}"
    want_q = "Q=0" if q_binds else f"Q={-errno.EADDRINUSE}"
    assert out[1] == want_q, f"{out[1]} != {want_q} for {shown}; stderr {res.stderr!r}"
    # The shim ends each line with "\n" and echoes what it was given: splitlines() also breaks
    # at U+0085 and the like, which Hypothesis drew once (a "line" that did not start with
    # portshard-shim[)
    text = res.stderr.decode(errors="replace")
    lines = text.removesuffix("\n").split("\n") if text else []
    assert all(line.startswith("portshard-shim[") for line in lines), (shown, lines)
    if env.get(b"PORTSHARD_SHIM_DEBUG") == b"1":
        assert warned is None or any(warned + "=" in line for line in lines), (shown, lines)
    elif warned is None and mode_inherit_adopting(env, inode):
        # documented: a listen() on a port portshard does not manage (P) is named once
        assert len(lines) == 1 and "does not manage" in lines[0], f"{shown}: {lines}"
    elif warned is None:
        assert lines == [], f"a warning for valid settings {shown}: {lines}"
    else:
        assert len(lines) == 1 and f"{warned}=" in lines[0], f"{shown}: {lines}"
        assert lines[0].endswith("the shim is off"), lines


@pytest.fixture(scope="module")
def ids(listener: socket.socket) -> tuple[int, int]:
    return os.fstat(listener.fileno()).st_ino, listener.getsockname()[1]


@FUZZ
@given(data=st.data())
def test_the_shim_switches_itself_off_for_any_malformed_environment(
    probe: str, shim: str, listener: socket.socket, ids: tuple[int, int], data: st.DataObject
) -> None:
    inode, port = ids
    run(probe, shim, listener, data.draw(environments(inode, port)))


@pytest.mark.parametrize(
    "env",
    [
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b"3:{ino}"},
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b"3:{ino},"},
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b""},
        {b"PORTSHARD_SHIM": b"inherit"},
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b",3:{ino}"},
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b"3:{ino}," * 64},
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b"3:{ino}," * 65},
        # 20 digits above 2**62: an overflow in the parser must not make them a valid inode
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b"3:40000000000000000000"},
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b"3:99999999999999999999"},
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b"1048577:5"},
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b"3:-5"},
        {b"PORTSHARD_SHIM": b"inherit", b"PORTSHARD_SHIM_FDS": b"3:5\nPORTSHARD: forged"},
        {b"PORTSHARD_SHIM": b"reuseport", b"PORTSHARD_SHIM_PORTS": b"{port}"},
        {b"PORTSHARD_SHIM": b"reuseport", b"PORTSHARD_SHIM_PORTS": b""},
        {b"PORTSHARD_SHIM": b"reuseport", b"PORTSHARD_SHIM_PORTS": b"1," * 257},
        {b"PORTSHARD_SHIM": b"reuseport", b"PORTSHARD_SHIM_PORTS": b"65536"},
        {b"PORTSHARD_SHIM": b"reuseport\nsecond line"},
        {b"PORTSHARD_SHIM": b"x" * 5000},
    ],
)
def test_known_edges(
    probe: str,
    shim: str,
    listener: socket.socket,
    ids: tuple[int, int],
    env: dict[bytes, bytes],
) -> None:
    inode, port = ids
    filled = {
        k: v.replace(b"{ino}", b"%d" % inode).replace(b"{port}", b"%d" % port)
        for k, v in env.items()
    }
    run(probe, shim, listener, filled)

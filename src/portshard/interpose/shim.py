"""The LD_PRELOAD shim from Python: where it is, and the environment that drives it.

The shim itself is ``preload.c`` (built by ``pip install`` into ``libportshard_preload.so``
beside this file); its header comment says exactly what it does.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, MutableMapping, Sequence
from pathlib import Path

from ..errors import ConfigError

__all__ = ["SHIM_ENV", "add_shim", "inherit_env", "remove_shim", "reuseport_env", "shim_path"]

SHIM_NAME = "libportshard_preload.so"
SHIM_ENV = ("PORTSHARD_SHIM", "PORTSHARD_SHIM_FDS", "PORTSHARD_SHIM_PORTS")
_copies: dict[str, str] = {}


def shim_path() -> str:
    """The built shim; ConfigError saying how to build it if it is missing."""
    path = Path(__file__).with_name(SHIM_NAME)
    if not path.is_file():
        raise ConfigError(
            f"the LD_PRELOAD shim {path} is missing: it is compiled from preload.c when "
            f"portshard is installed; reinstall with gcc available (pip install -e .), or use "
            f"--via fds or --via seccomp"
        )
    return str(path)


def _readable_by_anyone(path: str) -> bool:
    """Whether any user can open ``path``: o+r on the file, o+x on every directory above."""
    p = Path(path).resolve()
    try:
        if not p.stat().st_mode & stat.S_IROTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in p.parents)
    except OSError:
        return False


def shim_for(uid: int | None) -> str:
    """The shim path a worker running as ``uid`` can load (ld.so ignores one it cannot read,
    with only a warning). If the installed copy is private (e.g. under /root), a copy goes
    into a fresh world-readable temporary directory, removed when the supervisor exits."""
    path = shim_path()
    if uid is None or uid == os.geteuid() or _readable_by_anyone(path):
        return path
    if path not in _copies:
        directory = tempfile.mkdtemp(prefix="portshard-shim-")
        os.chmod(directory, 0o755)
        copy = os.path.join(directory, SHIM_NAME)
        shutil.copyfile(path, copy)
        os.chmod(copy, 0o644)
        atexit.register(shutil.rmtree, directory, True)
        _copies[path] = copy
    return _copies[path]


def remove_shim(env: MutableMapping[str, str]) -> None:
    """Take our settings and our shim out of an environment (a worker of another mode, or a
    supervisor that itself runs under `portshard preload`)."""
    for key in SHIM_ENV:
        env.pop(key, None)
    preload = env.get("LD_PRELOAD")
    if preload is not None:
        kept = [p for p in preload.replace(":", " ").split() if os.path.basename(p) != SHIM_NAME]
        if kept:
            env["LD_PRELOAD"] = " ".join(kept)
        else:
            del env["LD_PRELOAD"]


def add_shim(env: MutableMapping[str, str], path: str) -> None:
    """Load the shim first, keeping whatever the program preloads already."""
    others = [
        p
        for p in env.get("LD_PRELOAD", "").replace(":", " ").split()
        if os.path.basename(p) != SHIM_NAME
    ]
    env["LD_PRELOAD"] = " ".join([path, *others])


def inherit_env(inodes: Sequence[int], first_fd: int = 3) -> dict[str, str]:
    """Settings for inherit mode: the passed sockets, as FD:INODE."""
    fds = ",".join(f"{first_fd + i}:{ino}" for i, ino in enumerate(inodes))
    return {"PORTSHARD_SHIM": "inherit", "PORTSHARD_SHIM_FDS": fds}


def reuseport_env(ports: Iterable[int]) -> dict[str, str]:
    """Settings for reuseport mode: SO_REUSEPORT for these ports (none given: every port)."""
    listed = sorted(set(ports))
    for port in listed:
        if not 1 <= port <= 65535:
            raise ConfigError(f"port {port} is out of range; use 1-65535")
    env = {"PORTSHARD_SHIM": "reuseport"}
    if listed:
        env["PORTSHARD_SHIM_PORTS"] = ",".join(map(str, listed))
    return env


def parse_ports(text: str) -> list[int]:
    """``--ports 80,8080`` → [80, 8080]; ConfigError naming the bad entry."""
    ports: list[int] = []
    for item in text.split(","):
        item = item.strip()
        # at most 5 digits before int(): 5,000 of them raised its ValueError (a traceback)
        if not (item.isascii() and item.isdigit() and len(item) <= 5) or not (
            1 <= int(item) <= 65535
        ):
            shown = text if len(text) <= 60 else f"{text[:40]}... ({len(text):,} characters)"
            item = item if len(item) <= 20 else f"{item[:12]}..."
            raise ConfigError(
                f"--ports {shown!r}: {item!r} is not a port (1-65535); write them as 80,8080"
            )
        ports.append(int(item))
    return ports

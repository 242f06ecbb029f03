"""What kind of program a command runs: dynamic ELF, static ELF, Go, or something else.

``--via auto`` needs one fact: will an LD_PRELOAD shim see the program's bind() calls? It will
for a dynamically linked program that calls libc (it has a PT_INTERP segment: the dynamic
loader). It won't for a static binary, nor for Go, whose net package makes raw system calls
even when the binary is dynamically linked (cgo is used for DNS, not for sockets).

A ``#!`` script is judged by its interpreter (``/usr/bin/env NAME`` is followed to NAME).
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["Program", "inspect_command", "inspect_file"]

_PT_INTERP = 3
_PT_NOTE = 4
_GO_SECTIONS = (b".go.buildinfo", b".note.go.buildid", b".gopclntab")
_MAX_HEADERS = 4096


@dataclass(frozen=True)
class Program:
    path: str | None  # the file that will be executed (after following a #! line), or None
    kind: str  # "dynamic" | "static" | "go" | "unknown"
    why: str  # one line for the log

    @property
    def libc_binds(self) -> bool:
        """Whether an LD_PRELOAD shim sees this program's bind() calls."""
        return self.kind in ("dynamic", "unknown")


def _which(name: str, env: Mapping[str, str]) -> str | None:
    if "/" in name:
        return name if os.path.exists(name) else None
    return shutil.which(name, path=env.get("PATH", os.defpath))


def inspect_command(argv: Sequence[str], env: Mapping[str, str]) -> Program:
    """Inspect what ``argv[0]`` (searched on the worker's PATH) will run."""
    path = _which(argv[0], env)
    if path is None:
        return Program(None, "unknown", f"{argv[0]!r} not found on PATH")
    for _ in range(4):  # a #! chain (rare beyond one level)
        try:
            with open(path, "rb") as f:
                head = f.read(256)
        except OSError as exc:
            return Program(path, "unknown", f"cannot read {path}: {exc.strerror}")
        if not head.startswith(b"#!"):
            return inspect_file(path)
        line = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
        if not line:
            return Program(path, "unknown", f"{path}: empty #! line")
        interpreter = line[0]
        if os.path.basename(interpreter) == "env" and len(line) > 1:
            args = [a for a in line[1:] if not a.startswith("-")]
            found = _which(args[0], env) if args else None
            if found is None:
                return inspect_file(interpreter)
            path = found
        else:
            path = interpreter
    return Program(path, "unknown", f"{argv[0]}: #! chain too long")


def inspect_file(path: str) -> Program:
    """Read the ELF headers of ``path`` (no execution)."""
    try:
        with open(path, "rb") as f:
            return _inspect(path, f)
    except OSError as exc:
        return Program(path, "unknown", f"cannot read {path}: {exc.strerror}")
    except (struct.error, ValueError, IndexError) as exc:
        return Program(path, "unknown", f"{path}: malformed ELF ({exc})")


def _inspect(path: str, f: BinaryIO) -> Program:
    ident = f.read(64)
    if ident[:4] != b"\x7fELF" or len(ident) < 52:
        return Program(path, "unknown", f"{path} is not an ELF file")
    is64 = ident[4] == 2
    end = "<" if ident[5] == 1 else ">"
    if is64:
        phoff, shoff = struct.unpack_from(end + "QQ", ident, 0x20)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(end + "5H", ident, 0x36)
    else:
        phoff, shoff = struct.unpack_from(end + "II", ident, 0x1C)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from(end + "5H", ident, 0x2A)
    if phnum > _MAX_HEADERS or shnum > _MAX_HEADERS:
        raise ValueError("too many headers")
    interp = False
    notes: list[tuple[int, int]] = []
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type = struct.unpack_from(end + "I", table, i * phentsize)[0]
        if is64:
            offset, _, _, filesz = struct.unpack_from(end + "QQQQ", table, i * phentsize + 8)
        else:
            offset, _, _, filesz = struct.unpack_from(end + "IIII", table, i * phentsize + 4)
        if p_type == _PT_INTERP:
            interp = True
        elif p_type == _PT_NOTE:
            notes.append((offset, filesz))
    if _is_go(f, end, is64, shoff, shentsize, shnum, shstrndx, notes):
        return Program(path, "go", f"{path} is a Go program (raw system calls)")
    if interp:
        return Program(path, "dynamic", f"{path} is dynamically linked")
    return Program(path, "static", f"{path} is statically linked")


def _is_go(
    f: BinaryIO,
    end: str,
    is64: bool,
    shoff: int,
    shentsize: int,
    shnum: int,
    shstrndx: int,
    notes: list[tuple[int, int]],
) -> bool:
    # Section names first (present unless deliberately stripped), then the build-id note.
    if shoff and shnum and shstrndx < shnum:
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        fmt = end + ("IIQQQQ" if is64 else "IIIIII")
        _, _, _, _, str_off, str_size = struct.unpack_from(fmt, table, shstrndx * shentsize)
        f.seek(str_off)
        names = f.read(min(str_size, 1 << 16))
        if any(name in names for name in _GO_SECTIONS):
            return True
    for offset, size in notes:
        f.seek(offset)
        data = f.read(min(size, 4096))
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, _ = struct.unpack_from(end + "III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Go":
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False

"""Builds the LD_PRELOAD shim (src/portshard/interpose/preload.c) during a plain `pip install`.

Everything else is in pyproject.toml. The shim is a plain shared library, not a Python
extension: it is compiled with our own flags only (hardening, -Werror, hidden visibility), not
with the interpreter's CFLAGS, and it is named libportshard_preload.so, with no ABI tag, so
that one file serves every Python and `portshard shim-path` can find it.
"""

from __future__ import annotations

import os
import shlex
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SHIM = "portshard.interpose.libportshard_preload"
SHIM_SOURCE = "src/portshard/interpose/preload.c"

CFLAGS = [
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fstack-protector-strong",
    "-U_FORTIFY_SOURCE",
    "-D_FORTIFY_SOURCE=2",
    "-fPIC",
    "-fvisibility=hidden",
]
LDFLAGS = ["-shared", "-Wl,-z,relro,-z,now", "-Wl,--no-undefined", "-ldl", "-pthread"]


class BuildShim(build_ext):
    """Compile the shim with exactly our flags; leave any real extension to setuptools."""

    def get_ext_filename(self, fullname: str) -> str:
        # distutils asks with the last component only, setuptools' in-place copy with the
        # full dotted name.
        if fullname in (SHIM, SHIM.rsplit(".", 1)[1]):
            return os.path.join(*fullname.split(".")) + ".so"
        return str(super().get_ext_filename(fullname))

    def build_extension(self, ext: Extension) -> None:
        if ext.name != SHIM:
            super().build_extension(ext)
            return
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        extra = shlex.split(os.environ.get("PORTSHARD_SHIM_CFLAGS", ""))
        self.spawn([*cc, *CFLAGS, *extra, "-o", target, *ext.sources, *LDFLAGS])


setup(
    ext_modules=[Extension(SHIM, sources=[SHIM_SOURCE])],
    cmdclass={"build_ext": BuildShim},
)

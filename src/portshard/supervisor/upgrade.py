"""``portshard upgrade`` (and SIGUSR2): the supervisor replaces itself by exec, keeping every
socket, worker and connection (issue 15).

1. Check: the portshard on disk runs ``portshard run --check`` with this supervisor's own
   command line (the settings, the --config file as it is now, the command). A failure (a
   broken config file, a broken install) refuses the upgrade with its output: the running
   supervisor goes on (tableflip's rule: never none). The check runs as a child process the
   loop polls: nothing blocks.
2. Hand over: the manifest and its fds (``handoff.export``), the control socket (connections
   made meanwhile wait in its queue) and the client's connection (the new image answers it)
   go into a memfd named by ``$PORTSHARD_RESUME``; those fds become inheritable.
3. exec the same command line. Same pid: the workers stay our children, their parent-death
   signal does not fire, systemd's main pid and a shell's job are unchanged.

If the exec itself fails, everything is put back and the upgrade is refused. If the new image
fails after the exec (it passed the check, so: rare), the warden sees its supervisor gone,
keeps the workers serving, and the next ``portshard run`` adopts them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..control import protocol
from ..control.server import Connection
from ..errors import ControlError
from ..linux import fdlimit
from . import handoff

if TYPE_CHECKING:
    from .loop import Supervisor

__all__ = ["CHECK_TIMEOUT", "Upgrade", "command_line"]

log = logging.getLogger("portshard.supervisor")

CHECK_TIMEOUT = 30.0  # s the new portshard has to check the settings
_OUTPUT_TAIL = 1500  # characters of the check's output kept for the reply


def command_line() -> list[str]:
    """This process's own command line, runnable again (the interpreter by full path)."""
    return [sys.executable, *sys.orig_argv[1:]]


def check_command(argv: list[str]) -> list[str]:
    """``argv`` with ``--check`` after the ``run`` subcommand."""
    if "run" not in argv:
        raise ControlError(
            f"cannot upgrade: this supervisor's command line has no 'run' ({' '.join(argv)!r}); "
            "it was not started as `portshard run`: stop it and start the new one"
        )
    at = argv.index("run")
    return [*argv[: at + 1], "--check", *argv[at + 1 :]]


class Upgrade:
    """One upgrade in progress: its check, then the exec."""

    def __init__(self, sup: Supervisor, conn: Connection | None) -> None:
        self.sup = sup
        self.conn = conn
        self.argv = command_line()
        self.started = sup.fx.now()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env.pop("NOTIFY_SOCKET", None)
        self.check = subprocess.Popen(
            check_command(self.argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.info("upgrade: checking the portshard on disk with the current settings")

    def poll(self, refuse: Callable[[str], None]) -> bool:
        """True once done (refused, or it never returns: exec)."""
        code = self.check.poll()
        if code is None:
            if self.sup.fx.now() - self.started < CHECK_TIMEOUT:
                return False
            self.check.kill()
            code = self.check.wait()
            output = f"no answer within {CHECK_TIMEOUT:g}s"
        else:
            assert self.check.stdout is not None
            output = self.check.stdout.read().decode(errors="replace").strip()
        if self.check.stdout is not None:
            self.check.stdout.close()
        if code != 0:
            refuse(
                "the new supervisor would not start: "
                + (output[-_OUTPUT_TAIL:] or f"exit status {code}")
                + "; the running one goes on"
            )
            return True
        self.exec(refuse, handoff.takes(output))
        return True

    def exec(self, refuse: Callable[[str], None], takes: set[str]) -> None:
        sup = self.sup
        manifest, fds = handoff.export(sup)
        if "notify" not in takes:
            self._let_go_of_notify(manifest, fds)
        if sup.fx.control is not None:
            fds["control"] = sup.fx.control.sock.fileno()
        if self.conn is not None and self.conn.open:  # it may have hung up (Ctrl-C) meanwhile:
            fds["client"] = self.conn.sock.fileno()  # its fd was -1, and the upgrade raised
        channel = sup.succession.warden.inherit()
        data: dict[str, Any] = {
            "manifest": manifest,
            "fds": fds,
            "channel": channel[0] if channel else None,
            "warden_pid": channel[1] if channel else None,
        }
        memfd = handoff.write_memfd(data)
        for fd in fds.values():
            os.set_inheritable(fd, True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env[handoff.RESUME_ENV] = str(memfd)
        fdlimit.successor_env(env)  # it inherits our raised limit: the workers' goes with it
        log.info(
            "upgrade: exec %s (pid %d, supervisor generation %d -> %d)",
            " ".join(self.argv[:4]),
            os.getpid(),
            sup.succession.lineage.generation,
            sup.succession.lineage.generation + 1,
        )
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        # A signal that arrives while the new image starts must wait for its handlers (exec
        # resets them to the defaults: a SIGHUP or SIGTERM would kill it): the mask survives
        # exec, and the new supervisor unblocks once its handlers are in (loop._setup).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, self.sup.signals())
        try:
            os.execve(self.argv[0], self.argv, env)
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(memfd)
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
            if channel is not None:
                os.set_inheritable(channel[0], False)
            refuse(f"cannot exec {self.argv[0]!r}: {exc.strerror}; the running supervisor goes on")

    def _let_go_of_notify(self, manifest: dict[str, Any], fds: dict[str, int]) -> None:
        """An older portshard on disk (a downgrade) binds the workers' notify address
        itself: our socket is not handed over (it closes at the exec) and the warden lets go
        of its copy first. Before, the new image found the address held, died of EADDRINUSE
        in its set-up and killed every worker. A READY=1 sent until it binds is lost."""
        log.warning(
            "upgrade: the portshard on disk does not take the workers' notify socket (an "
            "older one): it binds the address itself (a READY=1 sent meanwhile is lost)"
        )
        fds.pop("notify", None)
        warden = self.sup.succession.warden
        if warden.alive:
            warden.sync(self.sup.fx.now(), manifest, fds)


def answer(fd: int, result: dict[str, Any]) -> None:
    """The new image answers the client that asked for the upgrade, then lets it go."""
    import socket

    sock = socket.socket(fileno=fd)
    try:
        sock.settimeout(2.0)
        sock.sendall(protocol.reply_ok(result))
    except OSError:
        pass
    finally:
        sock.close()

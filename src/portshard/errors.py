"""One exception family. Every message says what is wrong, why, and how to fix it.

Library code raises these and never prints or exits; only ``cli.py`` turns them into exit codes.
"""

from __future__ import annotations


class PortshardError(Exception):
    """Base of every error portshard raises on purpose."""

    exit_code = 1


class AddressError(PortshardError, ValueError):
    """A listen address that cannot be parsed or resolved."""

    exit_code = 2


class BindError(PortshardError, OSError):
    """A socket could not be bound or put in listening state.

    Raised as ``BindError(errno, message)``: ``.errno`` keeps the kernel's code for callers that
    branch on it, and ``str()`` is the message alone (OSError would prefix "[Errno 98] ").
    """

    def __str__(self) -> str:
        return self.strerror if self.strerror is not None else super().__str__()


class PortInUse(BindError):
    """The port is held by a socket we may not share with."""


class ReuseportUnsupported(PortshardError):
    """This OS has no load-balancing port sharing (or none at all)."""


class ActivationError(PortshardError):
    """LISTEN_FDS / LISTEN_FDNAMES / NOTIFY_SOCKET are present but wrong."""


class ConfigError(PortshardError, ValueError):
    """A bad command-line option or configuration file value."""

    exit_code = 2


class SupervisorError(PortshardError):
    """The supervisor cannot start or keep its workers running."""


class ControlError(PortshardError):
    """Talking to a running supervisor failed."""


class InspectError(PortshardError):
    """The kernel would not show us what we asked about a socket or a process."""


class NotListening(InspectError, ValueError):
    """A socket that has no accept queue: not TCP, or not (or no longer) listening."""


class NoAccess(InspectError, PermissionError):
    """This user may not look into that process (its fd table, its threads' syscalls)."""

"""portshard: many processes serving one port, with the kernel balancing, made safe to operate.

Public API (nothing else is public)::

    sock = portshard.listen("tcp://:8080")  # a reuseport listener; call again to join
    socks = portshard.inherited()  # sockets passed by portshard run or systemd
    portshard.notify_ready()  # tell the supervisor this worker is ready
"""

from .activation import inherited, notify, notify_ready
from .address import Address, Proto, parse
from .errors import (
    ActivationError,
    AddressError,
    BindError,
    ConfigError,
    ControlError,
    PortInUse,
    PortshardError,
    ReuseportUnsupported,
    SupervisorError,
)
from .sockets import listen

__version__ = "0.1.0"

__all__ = [
    "ActivationError",
    "Address",
    "AddressError",
    "BindError",
    "ConfigError",
    "ControlError",
    "PortInUse",
    "PortshardError",
    "Proto",
    "ReuseportUnsupported",
    "SupervisorError",
    "inherited",
    "listen",
    "notify",
    "notify_ready",
    "parse",
]

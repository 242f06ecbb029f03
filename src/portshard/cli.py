"""Command line. The only place that turns exceptions into messages and exit codes."""

from __future__ import annotations

import json
import logging
import sys
from typing import NoReturn

import click

from . import __version__
from .errors import PortshardError

log = logging.getLogger("portshard")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="portshard")
def cli() -> None:
    """Run many processes on one port, with the kernel balancing (SO_REUSEPORT), safely.

    \b
    portshard doctor                      what this machine supports
    portshard run -w 4 --listen tcp://:8080 -- CMD [ARGS...]
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Probe what this machine supports, for real, and what each feature enables."""
    from . import doctor as doctor_mod

    checks = doctor_mod.probe_all()
    if as_json:
        click.echo(json.dumps(doctor_mod.to_json(checks), indent=2))
    else:
        click.echo(doctor_mod.render(checks))


def main(argv: list[str] | None = None) -> NoReturn:
    try:
        cli.main(args=argv, prog_name="portshard", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("portshard: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except PortshardError as exc:
        click.echo(f"portshard: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)

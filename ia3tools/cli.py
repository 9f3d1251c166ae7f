"""The ``ia3tools`` command line: options in, one library call, rendering out.

Library failures are ``Ia3Error``s: printed as ``Error: <one line>`` on stderr with exit 1.
Usage errors keep click's exit 2.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from ia3tools import __version__
from ia3tools.errors import Ia3Error


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(f)


def reports_errors(f):
    """Turn typed library errors into one clean line and their exit code; never a traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except Ia3Error as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            sys.exit(130)

    return wrapper


def emit(report: dict, as_json: bool, render) -> None:
    click.echo(json.dumps(report, indent=2) if as_json else render(report))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ia3tools")
def cli():
    """Inspect, check and merge PEFT IA3 adapters offline, on saved checkpoints."""


@cli.command("inspect")
@click.argument("path", type=click.Path(exists=True))
@click.option("--near-zero", type=float, default=1e-3, show_default=True,
              help="Count adapter entries with |x| below this as near zero.")
@json_option
@reports_errors
def inspect_cmd(path, near_zero, as_json):
    """Show what an adapter directory, checkpoint directory or single weights file holds.

    Reads headers and adapter vectors only, never base weights.
    """
    from ia3tools.inspection import inspect_path
    from ia3tools.render import render_inspect

    emit(inspect_path(path, near_zero=near_zero), as_json, render_inspect)


@cli.command("check")
@click.argument("base", type=click.Path(exists=True))
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@json_option
@reports_errors
def check_cmd(base, adapter, as_json):
    """Check that ADAPTER fits BASE: every vector mapped, shaped and oriented right.

    Exit 0 when it fits, 1 with one line per problem when it does not.
    """
    from ia3tools.check import check
    from ia3tools.render import render_check

    plan, report = check(base, adapter)
    emit(report, as_json, render_check)
    sys.exit(0 if plan.ok else 1)


def main() -> None:
    cli(prog_name="ia3tools")


if __name__ == "__main__":
    main()

"""What every ``funcx-endpoint`` command shares: the global options, failing, the NAME argument."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Optional, TypeVar

import click

from funcx_endpoint.config import Config, ConfigFileError, load_runnable_config
from funcx_endpoint.endpoint.layout import BadEndpointName, EndpointDir, resolve_config_dir
from funcx_endpoint.lifecycle import EX_CONFIG, EX_DATAERR, EX_NOINPUT

# Refusals that are not sysexits-worthy errors (e.g. already running).

EX_ALREADY = 1

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What the global options set, passed to every command."""

    def __init__(self, config_dir: Optional[str], debug: bool) -> None:
        self.config_dir = resolve_config_dir(config_dir)
        self.debug = debug

    def endpoint(self, name: str) -> EndpointDir:
        try:
            return EndpointDir(self.config_dir, name)
        except BadEndpointName as e:
            fail(str(e), EX_DATAERR)
            raise  # unreachable

    def existing(self, name: str) -> EndpointDir:
        ep = self.endpoint(name)
        if not ep.exists():
            fail(
                f"there is no endpoint {name!r} in {self.config_dir}; "
                f"create it with: funcx-endpoint{self.dir_option()} configure {name}",
                EX_NOINPUT,
            )
        return ep

    def dir_option(self) -> str:
        default = resolve_config_dir(None)
        return "" if self.config_dir == default else f" -c {self.config_dir}"


def fail(message: str, code: int = 1) -> None:
    """Print ``Error: message`` to stderr and exit with ``code``."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def pass_context(f: F) -> F:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return f(click.get_current_context().find_object(Context), *args, **kwargs)

    return wrapper  # type: ignore[return-value]


name_argument = click.argument("name", default="default", metavar="[NAME]")


def load_checked(ep: EndpointDir) -> Config:
    try:
        return load_runnable_config(ep.config_file)
    except ConfigFileError as e:
        fail(f"bad configuration: {e}", EX_CONFIG)
        raise  # unreachable

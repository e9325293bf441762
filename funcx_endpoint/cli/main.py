"""``funcx-endpoint``: configure, start, stop and inspect funcX endpoints.

The commands are in the modules of their concern: :mod:`~funcx_endpoint.cli.profiles`
(``init``, ``configure``), :mod:`~funcx_endpoint.cli.running` (``start``, ``stop``,
``restart``, ``delete``), :mod:`~funcx_endpoint.cli.account` (``whoami``, ``logout``)
:mod:`~funcx_endpoint.cli.status` (``list``, ``status``),
:mod:`~funcx_endpoint.cli.remote_endpoints` (``list --remote``, ``delete --remote``)
:mod:`~funcx_endpoint.cli.boot` (``enable-on-boot``, ``disable-on-boot``)
and :mod:`~funcx_endpoint.cli.diagnose` (``diagnose``).
"""

from __future__ import annotations

from typing import Optional

import click

from funcx_endpoint.cli import (
    account,
    boot,
    completion,
    diagnose,
    profiles,
    remote_endpoints,
    running,
    status,
    tasks,
)
from funcx_endpoint.cli.context import Context
from funcx_endpoint.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-c",
    "--config-dir",
    default=None,
    envvar="FUNCX_ENDPOINT_CONFIG_DIR",
    metavar="DIR",
    help="Directory of endpoint profiles [default: ~/.funcx; env FUNCX_ENDPOINT_CONFIG_DIR].",
)
@click.option("--debug", is_flag=True, help="Debug output, and debug logging in the daemon.")
@click.version_option(__version__, "--version", prog_name="funcx-endpoint")
@click.option(
    "--install-completion",
    type=click.Choice(["bash", "zsh", "fish"]),
    callback=completion.install_callback,
    expose_value=False,
    is_eager=True,
    help="Install shell completion for SHELL, say where, and exit.",
)
@click.pass_context
def cli(ctx: click.Context, config_dir: Optional[str], debug: bool) -> None:
    """Run a funcX endpoint: this machine runs Python functions that authorized
    users send through a funcX web service, with no inbound port opened.

    Each endpoint is a profile NAME (default: "default") in the config directory:
    DIR/NAME/config.py is its configuration.  Typical use:

    \b
      funcx-endpoint configure            # write ~/.funcx/default/config.py
      funcx-endpoint start                # register and run as a daemon
      funcx-endpoint list                 # name, status, endpoint id
      funcx-endpoint stop
    """
    ctx.obj = Context(config_dir, debug)


for command in (
    profiles.init,
    profiles.configure,
    running.start,
    running.stop,
    running.restart,
    remote_endpoints.with_remote_delete(running.delete),
    account.whoami,
    account.logout,
    remote_endpoints.with_remote_list(status.list_command),
    status.status,
    tasks.tasks,
    boot.enable_on_boot,
    boot.disable_on_boot,
    diagnose.diagnose,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="funcx-endpoint")

"""``funcx-endpoint init`` and ``configure``: endpoint profiles and their config.py."""

from __future__ import annotations

import os
from string import Template
from typing import Optional

import click

from funcx_endpoint.cli.context import Context, fail, name_argument, pass_context
from funcx_endpoint.config import DEFAULT_SERVICE_ADDRESS, ConfigFileError, load_config
from funcx_endpoint.endpoint.layout import EndpointDir, ensure_private_dir
from funcx_endpoint.lifecycle import EX_CANTCREAT, EX_CONFIG


@click.command()
@pass_context
def init(ctx: Context) -> None:
    """Create the config directory (mode 0700) and the "default" profile.

    Running it again changes nothing that exists.
    """
    ensure_private_dir(ctx.config_dir)
    ep = ctx.endpoint("default")
    if ep.exists():
        click.echo(f"{ctx.config_dir} is initialized; the default profile is {ep.config_file}")
        return
    write_profile(ep, render_template(ep.name))
    click.echo(f"Initialized {ctx.config_dir}; created {ep.config_file}")


def render_template(
    name: str,
    service_address: str = DEFAULT_SERVICE_ADDRESS,
    service_ca_file: Optional[str] = None,
    amqp_ca_file: Optional[str] = None,
) -> str:
    """The documented config.py template with these values filled in."""
    from importlib.resources import files

    template = files("funcx_endpoint.config").joinpath("templates/config.py.tmpl").read_text()
    return Template(template).substitute(
        name=name,
        service_address=repr(service_address),
        service_ca_file=repr(service_ca_file),
        amqp_ca_file=repr(amqp_ca_file),
    )


def write_profile(ep: EndpointDir, text: str) -> None:
    """Create the profile directory (0700) and its config.py (0600)."""
    ensure_private_dir(ep.config_dir)
    ensure_private_dir(ep.path)
    fd = os.open(ep.config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@click.command()
@name_argument
@click.option(
    "--endpoint-config",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    help="Use this config.py instead of the template (it is checked first).",
)
@click.option(
    "--service-address",
    default=DEFAULT_SERVICE_ADDRESS,
    show_default=True,
    envvar="FUNCX_SERVICE_ADDRESS",
    metavar="URL",
    help="funcX web service base URL to write into the template [env FUNCX_SERVICE_ADDRESS].",
)
@click.option(
    "--service-ca-file",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FUNCX_SERVICE_CA_FILE",
    help="CA certificate of a private service, written into the template "
    "[env FUNCX_SERVICE_CA_FILE].",
)
@click.option(
    "--amqp-ca-file",
    type=click.Path(exists=True, dir_okay=False),
    help="CA certificate of the broker, if it differs from the service's.",
)
@pass_context
def configure(
    ctx: Context,
    name: str,
    endpoint_config: Optional[str],
    service_address: str,
    service_ca_file: Optional[str],
    amqp_ca_file: Optional[str],
) -> None:
    """Create the endpoint profile NAME: DIR/NAME/config.py.

    The file comes from a documented template (every field explained), or is
    a copy of --endpoint-config.  An existing profile is never overwritten.
    """
    ep = ctx.endpoint(name)
    if os.path.exists(ep.path):
        fail(
            f"endpoint {name!r} already exists at {ep.path}; edit {ep.config_file}, "
            f"or remove the profile first with: funcx-endpoint{ctx.dir_option()} delete {name}",
            EX_CANTCREAT,
        )
    if endpoint_config is not None:
        try:
            load_config(endpoint_config)
        except ConfigFileError as e:
            fail(f"not copying a broken config: {e}", EX_CONFIG)
        with open(endpoint_config) as f:
            text = f.read()
    else:
        text = render_template(
            name,
            service_address.rstrip("/"),
            os.path.abspath(service_ca_file) if service_ca_file else None,
            os.path.abspath(amqp_ca_file) if amqp_ca_file else None,
        )
    write_profile(ep, text)

    click.echo(f"Created endpoint {name!r}: {ep.config_file}")
    click.echo(f"Review it, then start it with: funcx-endpoint{ctx.dir_option()} start {name}")

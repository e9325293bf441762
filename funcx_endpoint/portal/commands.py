"""``funcx-service portal-link NAME`` and ``funcx-service portal-revoke NAME``.

Like the client commands, they use the service's storage directly (the service
need not run): a link is a random token whose hash is stored, good for one
sign-in within :data:`~funcx_endpoint.portal.sessions.LINK_SECONDS`.
"""

from __future__ import annotations

import time
from typing import Optional

import click

from funcx_endpoint.webservice.cli import (
    EX_NOINPUT,
    _open,
    _settings,
    cli,
    fail,
    state_dir_option,
)
from funcx_endpoint.webservice.settings import ServiceSettings

__all__ = ["portal_link", "portal_revoke"]


def portal_root(settings: ServiceSettings) -> str:
    """The portal's address: the running service's, else the one the settings give."""
    root = (settings.read_runtime() or {}).get("root_url")
    if not root:
        root = f"{settings.scheme}://{settings.public_host}:{settings.port}"
    return str(root) + "/portal/"


@cli.command("portal-link")
@state_dir_option
@click.argument("name")
@click.pass_context
def portal_link(ctx: click.Context, state_dir: Optional[str], name: str) -> None:
    """Print a one-time link that signs the client NAME (name or id) in to the portal.

    The link works once, for 15 minutes.
    """
    from funcx_endpoint.portal.sessions import LINK_SECONDS, new_link

    settings = _settings(ctx, state_dir)
    connection, call = _open(settings)
    try:
        made = new_link(call, name, time.time())
    finally:
        connection.close()
    if made is None:
        fail(f"no active client {name!r} (see `funcx-service list-clients`)", EX_NOINPUT)
        return
    token, client = made
    click.echo(f"{portal_root(settings)}link/{token}")
    click.echo(
        f"Opens the portal as {client.name!r} once, within {LINK_SECONDS // 60} minutes.",
        err=True,
    )


@cli.command("portal-revoke")
@state_dir_option
@click.argument("name")
@click.pass_context
def portal_revoke(ctx: click.Context, state_dir: Optional[str], name: str) -> None:
    """End every portal session of the client NAME (name or id) at once."""
    from funcx_endpoint.portal import store

    settings = _settings(ctx, state_dir)
    connection, call = _open(settings)
    try:
        client = call(store.active_client_named)(name)
        count = None if client is None else call(store.revoke_sessions)(client.identity_id)
    finally:
        connection.close()
    if client is None or count is None:
        fail(f"no active client {name!r} (see `funcx-service list-clients`)", EX_NOINPUT)
        return
    click.echo(f"Ended {count} portal session(s) of {client.name!r}")

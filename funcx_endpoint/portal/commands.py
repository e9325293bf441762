"""``funcx-service portal-link NAME`` and ``funcx-service portal-revoke NAME``.

Like the client commands, they use the service's storage directly (the service
need not run): a link is a random token whose hash is stored, good for one
sign-in within :data:`~funcx_endpoint.portal.sessions.LINK_SECONDS`.
"""

from __future__ import annotations

import time

import click

from funcx_endpoint.webservice.cli import fail_no_client, settings_command, storage_calls
from funcx_endpoint.webservice.settings import ServiceSettings

__all__ = ["portal_link", "portal_revoke"]


def portal_root(settings: ServiceSettings) -> str:
    """The portal's address: the running service's, else the one the settings give."""
    root = (settings.read_runtime() or {}).get("root_url")
    if not root:
        root = f"{settings.scheme}://{settings.public_host}:{settings.port}"
    return str(root) + "/portal/"


@settings_command("portal-link")
@click.argument("name")
def portal_link(settings: ServiceSettings, name: str) -> None:
    """Print a one-time link that signs the client NAME (name or id) in to the portal.

    The link works once, for 15 minutes.
    """
    from funcx_endpoint.portal.sessions import LINK_SECONDS, new_link

    with storage_calls(settings) as call:
        made = new_link(call, name, time.time())
    if made is None:
        fail_no_client(name)
        return
    token, client = made
    click.echo(f"{portal_root(settings)}link/{token}")
    click.echo(
        f"Opens the portal as {client.name!r} once, within {LINK_SECONDS // 60} minutes.",
        err=True,
    )


@settings_command("portal-revoke")
@click.argument("name")
def portal_revoke(settings: ServiceSettings, name: str) -> None:
    """End every portal session of the client NAME (name or id) at once."""
    from funcx_endpoint.portal import store

    with storage_calls(settings) as call:
        client = call(store.active_client_named)(name)
        count = None if client is None else call(store.revoke_sessions)(client.identity_id)
    if client is None or count is None:
        fail_no_client(name)
        return
    click.echo(f"Ended {count} portal session(s) of {client.name!r}")

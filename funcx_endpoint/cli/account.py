"""``funcx-endpoint whoami`` and ``logout``: the credentials at an endpoint's service."""

from __future__ import annotations

from typing import Optional

import click

from funcx_endpoint.cli.context import Context, fail, load_checked, pass_context
from funcx_endpoint.config import Config
from funcx_endpoint.endpoint.layout import EndpointState, list_endpoints
from funcx_endpoint.lifecycle import EX_NOINPUT


def _config_for_login(ctx: Context, name: Optional[str]) -> Config:
    """The config whose service the login commands talk to."""
    names = [name] if name else [ep.name for ep in list_endpoints(ctx.config_dir)]
    if not names:
        fail(
            f"no endpoint in {ctx.config_dir} says which service to use; create one with: "
            f"funcx-endpoint{ctx.dir_option()} configure",
            EX_NOINPUT,
        )
    return load_checked(ctx.existing(names[0]))


@click.command()
@click.argument("name", required=False, metavar="[NAME]")
@pass_context
def whoami(ctx: Context, name: Optional[str]) -> None:
    """Show who the credentials belong to, at the service of endpoint NAME.

    Credentials: FUNCX_SDK_CLIENT_ID / FUNCX_SDK_CLIENT_SECRET, or the token
    saved in DIR/tokens.json by an earlier start.
    """
    from funcx_endpoint.cli import remote

    config = _config_for_login(ctx, name)
    try:
        info = remote.run_in_reactor(lambda r: remote.whoami(r, config, ctx.config_dir))
    except remote.RemoteError as e:
        fail(str(e), 77)
    for key in ("preferred_username", "name", "email", "sub"):
        if info.get(key):
            click.echo(f"{key.replace('_', ' ')}: {info[key]}")


@click.command()
@click.option("--force", is_flag=True, help="Log out even while endpoints run.")
@pass_context
def logout(ctx: Context, force: bool) -> None:
    """Revoke the saved token and remove DIR/tokens.json.

    Running endpoints keep their connections but could not register again;
    logging out while any runs is refused unless --force.
    """
    from funcx_endpoint.cli import remote

    running = [
        ep.name for ep in list_endpoints(ctx.config_dir) if ep.state() is EndpointState.RUNNING
    ]
    if running and not force:
        fail(f"endpoints are running ({', '.join(running)}); stop them or use --force", 1)
    config = _config_for_login(ctx, None) if list_endpoints(ctx.config_dir) else None
    if config is None:
        from funcx_endpoint.endpoint.auth import TokenStore

        removed = TokenStore(ctx.config_dir).remove()
    else:
        try:
            removed = remote.run_in_reactor(lambda r: remote.logout(r, config, ctx.config_dir))
        except Exception as e:  # revoking is best effort; the file is removed anyway
            click.echo(f"Warning: could not revoke the token at the service: {e}", err=True)
            removed = True
    click.echo("Logged out." if removed else "Not logged in (no saved token).")

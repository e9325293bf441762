"""``funcx-endpoint list --remote`` and ``delete --remote ID`` (or ``delete ID``).

The local ``list`` and ``delete`` commands stay what they are; this module
gives them an option ``--remote`` that asks the service instead: the
endpoints registered for these credentials (whatever machine runs them), and
deleting one of them by id.  The service is the one of the profiles in the
config directory (each distinct one, for ``list``).
"""

from __future__ import annotations

import inspect
import json
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import click

from funcx_endpoint.cli.context import Context, fail
from funcx_endpoint.config import Config, ConfigFileError, load_config
from funcx_endpoint.endpoint.layout import EndpointDir, list_endpoints
from funcx_endpoint.lifecycle import EX_NOINPUT

UUID = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
EX_UNAVAILABLE = 69


def _profiles(ctx: Context) -> List[Tuple[EndpointDir, Config]]:
    """The profiles whose config loads (a broken one is skipped, with a warning)."""
    found = []
    for ep in list_endpoints(ctx.config_dir):
        try:
            found.append((ep, load_config(ep.config_file)))
        except ConfigFileError as e:
            click.echo(f"Warning: skipping profile {ep.name!r}: {e}", err=True)
    return found


def services(ctx: Context, name: Optional[str]) -> List[Config]:
    """One config per distinct service (address, CA file, auth address) of the
    profiles; only profile ``name``'s if given."""
    profiles = _profiles(ctx)
    if name is not None:
        profiles = [(ep, config) for ep, config in profiles if ep.name == name]
        if not profiles:
            fail(f"there is no usable endpoint profile {name!r} in {ctx.config_dir}", EX_NOINPUT)
    if not profiles:
        fail(
            f"no endpoint profile in {ctx.config_dir} says which service to ask; create one "
            f"with: funcx-endpoint{ctx.dir_option()} configure",
            EX_NOINPUT,
        )
    seen: Dict[Tuple[Any, ...], Config] = {}
    for _, config in profiles:
        key = (config.funcx_service_address, config.service_ca_file, config.auth_address)
        seen.setdefault(key, config)
    return list(seen.values())


def local_names(ctx: Context) -> Dict[str, str]:
    """Endpoint id -> name of the local profile registered with it."""
    names = {}
    for ep in list_endpoints(ctx.config_dir):
        endpoint_id = ep.endpoint_id()
        if endpoint_id:
            names[endpoint_id] = ep.name
    return names


def _ago(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "never"
    age = max(0.0, time.time() - seconds)
    if age < 120:
        return f"{age:.0f} s ago"
    if age < 7200:
        return f"{age / 60:.0f} min ago"
    return f"{age / 3600:.1f} h ago"


def show_remote_list(ctx: Context, as_json: bool, profile: Optional[str]) -> None:
    """Print the endpoints of each service; exit 69 (77: credentials) if one failed."""
    from funcx_endpoint.cli import remote

    configs = services(ctx, profile)

    async def ask_all(reactor: Any) -> List[Tuple[Config, Any]]:
        answers: List[Tuple[Config, Any]] = []
        for config in configs:
            try:
                answers.append(
                    (config, await remote.list_endpoints(reactor, config, ctx.config_dir))
                )
            except remote.RemoteError as e:
                answers.append((config, e))
        return answers

    answers = remote.run_in_reactor(ask_all)
    names = local_names(ctx)
    failed: Optional[remote.RemoteError] = None
    rows: List[Dict[str, Any]] = []
    for config, answer in answers:
        if isinstance(answer, remote.RemoteError):
            click.echo(f"Error: {answer}", err=True)
            failed = answer
            continue
        for entry in answer:
            endpoint_id = str(entry.get("endpoint_id"))
            rows.append(
                {
                    "endpoint_id": endpoint_id,
                    "name": entry.get("endpoint_name"),
                    "status": entry.get("status"),
                    "locked": bool(entry.get("locked")),
                    "host": entry.get("hostname"),
                    "last_seen": entry.get("last_seen"),
                    "endpoint_version": entry.get("endpoint_version"),
                    "service": config.funcx_service_address,
                    "local_profile": names.get(endpoint_id),
                }
            )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        table = [("ENDPOINT ID", "NAME", "STATUS", "HOST", "LAST SEEN", "PROFILE")]
        for row in rows:
            status = str(row["status"] or "-") + (" (locked)" if row["locked"] else "")
            table.append(
                (
                    row["endpoint_id"],
                    str(row["name"] or "-"),
                    status,
                    str(row["host"] or "-"),
                    _ago(row["last_seen"]),
                    row["local_profile"] or "-",
                )
            )
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if len(configs) > 1:
            click.echo(f"(from {len(configs) - (failed is not None)} services)")
    else:
        answered = [c for c, a in answers if not isinstance(a, remote.RemoteError)]
        if answered:
            where = ", ".join(c.funcx_service_address for c in answered)
            click.echo(f"No endpoints are registered for these credentials at {where}.")
    if failed is not None:
        raise SystemExit(failed.exit_code)


def delete_remote(ctx: Context, endpoint_id: str, yes: bool, profile: Optional[str]) -> None:
    """Delete endpoint ``endpoint_id`` at the service (only there)."""
    from funcx_endpoint.cli import remote

    if not UUID.fullmatch(endpoint_id):
        fail(f"--remote takes an endpoint id (a UUID), not {endpoint_id!r}", 65)
    configs = services(ctx, profile)
    if len(configs) > 1:
        fail(
            "the profiles here use several services; name the profile whose service to "
            "ask: funcx-endpoint delete --remote ID NAME",
            64,
        )
    config = configs[0]
    if not yes:
        click.confirm(
            f"Delete endpoint {endpoint_id} at {config.funcx_service_address}?", abort=True
        )
    try:
        remote.run_in_reactor(
            lambda reactor: remote.delete_endpoint(reactor, config, ctx.config_dir, endpoint_id)
        )
    except remote.RemoteError as e:
        fail(f"{e}; nothing deleted", e.exit_code)
    click.echo(f"Deleted endpoint {endpoint_id} at {config.funcx_service_address}.")
    holder = local_names(ctx).get(endpoint_id)
    if holder is not None:
        click.echo(
            f"The local profile {holder!r} was registered as this endpoint: it cannot start "
            f"again under that id; remove it with `funcx-endpoint{ctx.dir_option()} delete "
            f"--force {holder}`, or its endpoint.json to register anew."
        )


def profile_with_id(ctx: Context, endpoint_id: str) -> Optional[str]:
    """The name of the profile registered as ``endpoint_id``, if any."""
    return local_names(ctx).get(endpoint_id.lower()) or local_names(ctx).get(endpoint_id)


def _with_remote(
    local: click.Command, callback: Callable[..., Any], extra: List[click.Parameter], more: str
) -> click.Command:
    """``local`` with the ``extra`` options, run by ``callback``; its help says ``more``."""
    return click.Command(
        name=local.name,
        callback=callback,
        params=list(local.params) + extra,
        help=inspect.cleandoc(local.help or "") + "\n\n" + more,
        short_help=local.short_help,
    )


def with_remote_list(local: click.Command) -> click.Command:
    """``local`` (the ``list`` command) with ``--remote``, ``--json`` and ``--profile``."""
    own = {p.name for p in local.params}
    extra: List[click.Parameter] = [
        click.Option(
            ["--remote"],
            is_flag=True,
            help="List the endpoints registered at the service for these credentials "
            "(wherever they run), with status and host, instead of the local profiles.",
        ),
        click.Option(
            ["--profile"],
            metavar="NAME",
            default=None,
            help="With --remote: ask only the service of profile NAME [default: the "
            "service of every profile].",
        ),
    ]
    # The local list may come to have a JSON option of its own: then it serves both.
    json_param = next((n for n in ("as_json", "json") if n in own), None)
    if json_param is None:
        extra.append(
            click.Option(["--json", "as_json"], is_flag=True, help="With --remote: print JSON.")
        )

    def callback(remote: bool, profile: Optional[str], **kwargs: Any) -> None:
        click_ctx = click.get_current_context()
        if json_param is None:
            as_json = bool(kwargs.pop("as_json", False))
        else:
            as_json = bool(kwargs.get(json_param))
        if remote:
            show_remote_list(click_ctx.find_object(Context), as_json, profile)  # type: ignore[arg-type]
            return
        if profile is not None or (json_param is None and as_json):
            raise click.UsageError("--profile and --json go with --remote")
        click_ctx.invoke(local, **kwargs)

    return _with_remote(
        local,
        callback,
        extra,
        "With --remote, the service is asked instead: every endpoint registered "
        "for these credentials (FUNCX_SDK_CLIENT_ID / FUNCX_SDK_CLIENT_SECRET, or the "
        "saved token), its status (online/offline, locked if stopped remotely), host, "
        "last report, and the local profile registered as it.  Exit 69 if a service "
        "cannot be asked, 77 if it refuses the credentials.",
    )


def with_remote_delete(local: click.Command) -> click.Command:
    """``local`` (the ``delete`` command) with ``--remote ID``, and NAME that may be an id."""
    extra: List[click.Parameter] = [
        click.Option(
            ["--remote", "remote_id"],
            metavar="ID",
            default=None,
            help="Delete endpoint ID at the service only (any of these credentials' "
            "endpoints, as `list --remote` shows them); NAME then only picks whose "
            "service to ask.",
        )
    ]

    def callback(remote_id: Optional[str], **kwargs: Any) -> None:
        click_ctx = click.get_current_context()
        ctx = click_ctx.find_object(Context)
        assert ctx is not None
        name = kwargs.get("name") or "default"
        if remote_id is not None:
            explicit = (
                click_ctx.get_parameter_source("name") is not click.core.ParameterSource.DEFAULT
            )
            delete_remote(ctx, remote_id, bool(kwargs.get("yes")), name if explicit else None)
            return
        if UUID.fullmatch(name) and not ctx.endpoint(name).exists():
            holder = profile_with_id(ctx, name)
            if holder is None:
                fail(
                    f"no local profile is registered as endpoint {name}; to delete it at the "
                    f"service only: funcx-endpoint{ctx.dir_option()} delete --remote {name}",
                    EX_NOINPUT,
                )
            click.echo(f"Endpoint {name} is the local profile {holder!r}.")
            kwargs["name"] = holder
        click_ctx.invoke(local, **kwargs)
        from funcx_endpoint.cli.boot import existing_units

        for unit in existing_units(ctx.endpoint(kwargs["name"])):
            click.echo(
                f"Its systemd unit {unit} is still there: remove it with "
                f"funcx-endpoint{ctx.dir_option()} disable-on-boot {kwargs['name']}"
            )

    return _with_remote(
        local,
        callback,
        extra,
        "NAME may also be the endpoint id of a local profile.  With --remote ID, "
        "only the service is told (exit 69 if it cannot be, 77 if it refuses the "
        "credentials); a local profile registered as ID is left as it is.",
    )

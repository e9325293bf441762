"""``funcx-endpoint diagnose [NAME]``: what an endpoint needs, checked; a redacted bundle."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import click

from funcx_endpoint.cli.context import Context, fail, name_argument, pass_context
from funcx_endpoint.config import ConfigFileError, load_config
from funcx_endpoint.diagnostics import checks as c
from funcx_endpoint.endpoint.layout import EndpointState

MARKS = {c.OK: "ok", c.WARN: "WARN", c.FAIL: "FAIL", c.SKIP: "skip"}


def _daemon_status(ep: Any) -> tuple[Optional[Dict[str, Any]], str]:
    """The running daemon's status from its control socket (blocking, bounded)."""
    from funcx_endpoint.endpoint.control import ControlError, ask

    if ep.state() is not EndpointState.RUNNING:
        return None, ""
    try:
        return ask(ep.control_socket, "status", timeout=5.0), ""
    except ControlError as e:
        return None, str(e)


def print_checks(checks: List[c.Check]) -> None:
    width = max(len(check.name) for check in checks)
    for check in checks:
        lines = check.detail.splitlines() or [""]
        click.echo(f"  {MARKS[check.outcome]:<4}  {check.name:<{width}}  {lines[0]}")
        for extra in lines[1:]:
            click.echo(f"  {'':<4}  {'':<{width}}    {extra.strip()}")
        if check.advice and check.outcome != c.OK:
            click.echo(f"  {'':<4}  {'':<{width}}  -> {check.advice}")


@click.command()
@name_argument
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="How long each network step (connecting, an answer) may take.",
)
@click.option(
    "--bundle",
    "bundle_path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    metavar="PATH",
    help="Also write a redacted tar.gz for a bug report to PATH.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@pass_context
def diagnose(
    ctx: Context, name: str, timeout: float, bundle_path: Optional[str], as_json: bool
) -> None:
    """Check what the endpoint NAME needs and print a check list.

    \b
    config       config.py loads
    daemon       its state; a running daemon's broker connections
    service      the service answers over HTTPS (TLS verified against
                 service_ca_file), and its API version
    clock        this clock against the service's (HTTP Date header)
    credentials  a token for these credentials, and the endpoint's record
                 at the service (status, locked)
    broker       TCP, TLS (amqp_ca_file) and an AMQP answer from the broker
                 the last registration named (endpoint.json)
    spool disk   free space where unconfirmed results are kept
    log          the last errors in endpoint.log

    Each is ok, WARN (worth a look), FAIL (with what to do) or skip.  Exit
    status 1 if any check failed, else 0.  --bundle PATH writes config.py,
    the end of the log, the status, the checks and versions into a tar.gz
    with every secret (client secret, tokens, broker and manager passwords)
    replaced by ***, to attach to a bug report.
    """
    ep = ctx.existing(name)
    checks: List[c.Check] = []
    config = None
    try:
        config = load_config(ep.config_file)
        checks.append(c.Check("config", c.OK, f"{ep.config_file} loads"))
    except ConfigFileError as e:
        checks.append(c.Check("config", c.FAIL, str(e), "fix config.py"))
    status, status_error = _daemon_status(ep)
    checks.append(c.check_daemon(ep, status, status_error))
    if config is not None:
        from funcx_endpoint.cli import remote

        urls = c.broker_urls(ep)
        checks.extend(
            remote.run_in_reactor(
                lambda reactor: c.network_checks(reactor, config, ep, urls, timeout)
            )
        )
    else:
        for what in ("service", "clock", "credentials", "broker"):
            checks.append(c.Check(what, c.SKIP, "config.py does not load"))
    checks.append(c.check_spool(ep))
    log_file = ep.log_file(config.log_dir if config is not None else None)
    checks.append(c.check_log(log_file))

    failed, warned, ok = c.summarize(checks)
    if as_json:
        click.echo(json.dumps([check.as_dict() for check in checks], indent=2))
    else:
        click.echo(f"Endpoint {name!r} ({ep.path}):")
        print_checks(checks)
        click.echo(f"{failed} failed, {warned} warning(s), {ok} ok.")
    if bundle_path is not None:
        from funcx_endpoint.diagnostics.bundle import (
            SecretLeak,
            bundle_members,
            known_secrets,
            write_bundle,
        )

        daemon = {
            "state": ep.state().value,
            "pid": ep.read_pid(),
            "endpoint_id": ep.endpoint_id(),
            "status": status,
            "status_error": status_error or None,
        }
        members = bundle_members(ep, log_file, [x.as_dict() for x in checks], daemon)
        try:
            names = write_bundle(bundle_path, ep, members, known_secrets(ep))
        except (SecretLeak, OSError) as e:
            fail(f"no bundle written: {e}", 73)
        click.echo(
            f"Wrote {bundle_path} ({', '.join(names)}; secrets redacted): attach it to "
            f"the bug report",
            err=as_json,
        )
    if failed:
        raise SystemExit(1)

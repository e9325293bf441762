"""``funcx-endpoint list`` and ``status``: what endpoints there are and how they run."""

from __future__ import annotations

import json

import click

from funcx_endpoint.cli.context import Context, fail, name_argument, pass_context
from funcx_endpoint.endpoint.control import ControlError, ask
from funcx_endpoint.endpoint.layout import EndpointDir, EndpointState, list_endpoints


@click.command(name="list")
@pass_context
def list_command(ctx: Context) -> None:
    """List the endpoints: name, status and endpoint id.

    Status: Initialized (never registered), Running, Stopped, Disconnected
    (the daemon died; `start` or `stop` cleans up), or Running on HOST (its
    daemon runs on another host sharing this directory).
    """
    endpoints = list_endpoints(ctx.config_dir)
    if not endpoints:
        click.echo(
            f"No endpoints in {ctx.config_dir}; create one with: "
            f"funcx-endpoint{ctx.dir_option()} configure"
        )
        return
    rows = [("NAME", "STATUS", "ENDPOINT ID")]
    for ep in endpoints:
        rows.append((ep.name, _state_text(ep), ep.endpoint_id() or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _state_text(ep: EndpointDir) -> str:
    state = ep.state()
    if state is EndpointState.ELSEWHERE:
        return f"Running on {ep.runs_elsewhere()}"
    return state.value


def _status_object(ep: EndpointDir, name: str) -> dict:
    """``status --json``: the state, and the daemon's details if it runs."""
    state = ep.state()
    found: dict = {"name": name, "state": _state_text(ep), "endpoint_id": ep.endpoint_id()}
    if state is EndpointState.RUNNING:
        try:
            found["details"] = ask(ep.control_socket, "status")
        except ControlError as e:
            fail(f"the daemon (pid {ep.read_pid()}) did not answer: {e}", 1)
    return found


def format_status(details: dict) -> str:
    """The daemon's status as indented ``key: value`` lines (nested dicts inline)."""
    lines = []
    for key, value in details.items():
        if key == "uptime" and isinstance(value, (int, float)):
            value = _duration(value)
        elif isinstance(value, float):
            value = f"{value:.1f}"
        elif isinstance(value, dict):
            value = _inline(value)
        lines.append(f"  {key.replace('_', ' ')}: {value}")
    return "\n".join(lines)


def _inline(value: dict) -> str:
    parts = []
    for key, item in value.items():
        if isinstance(item, dict):
            item = "(" + _inline(item) + ")" if item else "-"
        elif isinstance(item, float):
            item = f"{item:g}"
        parts.append(f"{key.replace('_', ' ')} {item}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@click.command()
@name_argument
@click.option(
    "--json", "as_json", is_flag=True, help="Print the state and live details as one JSON object."
)
@pass_context
def status(ctx: Context, name: str, as_json: bool = False) -> None:
    """Show the state of the endpoint NAME; live details if it runs.

    A running daemon is asked over its control socket (owner only) for its
    uptime, pid, broker connection, managers, workers and tasks in flight,
    and, with containers, its routing: warm workers by container type and
    cold starts (in all and of the managers that made the most).
    """
    ep = ctx.existing(name)
    state = ep.state()
    if as_json:
        click.echo(json.dumps(_status_object(ep, name), indent=1, sort_keys=True))
        return
    click.echo(f"Endpoint {name!r}: {_state_text(ep)}")
    endpoint_id = ep.endpoint_id()
    if endpoint_id:
        click.echo(f"  endpoint id: {endpoint_id}")
    if state is EndpointState.DISCONNECTED:
        click.echo(f"  the daemon (pid {ep.read_pid()}) is gone; `start` or `stop` cleans up")
    if state is EndpointState.ELSEWHERE:
        click.echo(
            f"  the daemon (pid {ep.read_pid()}) runs on host {ep.runs_elsewhere()}: "
            f"ask there for its details"
        )
    if state is not EndpointState.RUNNING:
        return
    try:
        details = ask(ep.control_socket, "status")
    except ControlError as e:
        fail(f"the daemon (pid {ep.read_pid()}) did not answer: {e}", 1)
    click.echo(format_status(details))

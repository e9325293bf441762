"""``funcx-endpoint tasks``: the tasks a live endpoint holds, and the last finished."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence

import click

from funcx_endpoint.cli.context import Context, fail, name_argument, pass_context
from funcx_endpoint.endpoint.control import ControlError, ask
from funcx_endpoint.endpoint.layout import EndpointState


def _age(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _table(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]


def format_tasks(listing: Dict[str, Any]) -> str:
    """The listing as two tables: tasks held (oldest first), then finished (newest first)."""
    held = listing.get("tasks") or []
    lines = [
        f"Tasks held: {listing.get('queued', 0)} queued, {listing.get('sent', 0)} sent to managers"
    ]
    if held:
        rows: List[Sequence[str]] = [
            ("TASK ID", "STATE", "AGE", "ATTEMPTS", "MANAGER", "BLOCK", "WORKER")
        ]
        for task in held:
            rows.append(
                (
                    str(task.get("task_id")),
                    str(task.get("state")),
                    _age(task.get("age")),
                    str(task.get("attempts")),
                    str(task.get("manager") or "-"),
                    str(task.get("block") if task.get("block") is not None else "-"),
                    str(task.get("worker") or "-"),
                )
            )
        lines.extend("  " + line for line in _table(rows))
        total = listing.get("queued", 0) + listing.get("sent", 0)
        if len(held) < total:
            lines.append(f"  ... and {total - len(held)} more")
    finished = listing.get("finished") or []
    lines.append(f"Last finished: {len(finished)}")
    if finished:
        rows = [("TASK ID", "OUTCOME", "AGO")]
        for task in finished:
            rows.append((str(task.get("task_id")), str(task.get("outcome")), _age(task.get("ago"))))
        lines.extend("  " + line for line in _table(rows))
    return "\n".join(lines)


@click.command()
@name_argument
@click.option(
    "-n",
    "--finished",
    type=click.IntRange(0, 1000),
    default=20,
    show_default=True,
    help="How many of the last finished tasks to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the listing as one JSON object.")
@pass_context
def tasks(ctx: Context, name: str, finished: int, as_json: bool = False) -> None:
    """Show the tasks the running endpoint NAME holds, and the last finished.

    A task held is `queued` (waiting here for a worker) or `sent` (at its
    manager: running, or waiting in the manager's prefetch), with its age
    since the endpoint took it, its attempts (times sent to a manager) and
    its manager and block.  Finished tasks show their outcome (success or
    the error code) and how long ago.  Asked over the daemon's control
    socket (owner only).
    """
    ep = ctx.existing(name)
    if ep.state() is not EndpointState.RUNNING:
        fail(f"endpoint {name!r} is not running ({ep.state().value}): no tasks to show", 1)
    try:
        listing = ask(ep.control_socket, "tasks", args={"finished": finished})
    except ControlError as e:
        fail(f"the daemon (pid {ep.read_pid()}) did not answer: {e}", 1)
    if as_json:
        click.echo(json.dumps(listing, indent=1, sort_keys=True))
    else:
        click.echo(format_tasks(listing))

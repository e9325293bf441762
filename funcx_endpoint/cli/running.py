"""``funcx-endpoint start``, ``stop``, ``restart`` and ``delete``: an endpoint's daemon."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Optional

import click

from funcx_endpoint.cli.context import (
    EX_ALREADY,
    Context,
    fail,
    load_checked,
    name_argument,
    pass_context,
)
from funcx_endpoint.cli.daemon import run_foreground, start_daemon, stop_daemon
from funcx_endpoint.config import Config, ConfigFileError, load_config
from funcx_endpoint.endpoint.layout import EndpointDir, EndpointState
from funcx_endpoint.lifecycle import EX_CONFIG
from funcx_endpoint.manager.containers import find_engine, missing_engine_message


def elsewhere_message(ctx: Context, ep: EndpointDir, what: str) -> str:
    """Why ``what`` is refused here: the daemon runs on another host."""
    return (
        f"endpoint {ep.name!r} is running on host {ep.runs_elsewhere()} (pid {ep.read_pid()}), "
        f"which shares {ep.path} with this host; {what} there "
        f"(e.g. ssh {ep.runs_elsewhere()} funcx-endpoint{ctx.dir_option()} stop {ep.name}). "
        f"If that host's daemon is gone for good, forget it here with: "
        f"funcx-endpoint{ctx.dir_option()} stop --forget {ep.name}"
    )


def clean_stale(ep: EndpointDir) -> None:
    """Remove a dead daemon's pidfile (and any process it left), saying so."""
    result = stop_daemon(ep, grace=0)
    extra = f"; killed {len(result.killed)} leftover process(es)" if result.killed else ""
    click.echo(
        f"Endpoint {ep.name!r} was Disconnected: its daemon (pid {result.pid}) died "
        f"without cleaning up; removed the stale pidfile{extra}."
    )


def missing_engine(config: Config, path: Optional[str] = None) -> Optional[str]:
    """What to fix when an executor's workers run in containers of an engine that is
    not installed here (None: nothing).  Only executors whose managers run on
    this machine (a local provider) are checked: other nodes may have it; a
    manager without it there quits with the same message."""
    for executor in config.executors:
        engine = getattr(executor, "container_engine", None)
        if engine is None or type(executor.provider).__name__ != "LocalProvider":
            continue
        if find_engine(engine, path) is None:
            return missing_engine_message(engine)
    return None


@click.command()
@name_argument
@click.option("--foreground", is_flag=True, help="Run attached to this terminal (Ctrl-C stops).")
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the daemon to report ready.",
)
@click.option(
    "--keep-lock",
    is_flag=True,
    help="Keep a remote stop's lock: the service keeps refusing this endpoint until its "
    "owner starts it without this flag (refused once more, which clears the lock).  "
    "Implied under systemd (the on-boot unit).",
)
@pass_context
def start(ctx: Context, name: str, foreground: bool, timeout: float, keep_lock: bool) -> None:
    """Start the endpoint NAME as a daemon and wait until it is ready.

    The configuration is checked first; a broken config.py is reported with
    its file, line and problem.  An endpoint already running is left alone.
    The daemon writes DIR/NAME/daemon.pid and logs to DIR/NAME/endpoint.log
    (rotated).  Exit status: 0 when ready; else the daemon's failure code
    (65: bad registration data, 69: the service or broker refused, 70: internal
    error, 75: temporary failure, 77: credentials refused or missing, 78: bad
    configuration or untrusted certificate); nothing is left running, except
    when --timeout passes first: then (exit 75) the daemon may still be
    starting, and `status` tells.


    """
    ep = ctx.existing(name)
    config = load_checked(ep)
    # systemd sets INVOCATION_ID in every unit's environment: a start on boot (or
    # a restart by systemd) is no owner's decision to lift a remote stop.
    clear_lock = not keep_lock and "INVOCATION_ID" not in os.environ
    problem = missing_engine(config)
    if problem is not None:
        fail(f"bad configuration: {problem}", EX_CONFIG)
    state = ep.state()
    if state is EndpointState.ELSEWHERE:
        fail(elsewhere_message(ctx, ep, "start it"), EX_ALREADY)
    if state is EndpointState.RUNNING:
        fail(
            f"endpoint {name!r} is already running (pid {ep.read_pid()}); "
            f"stop it first with: funcx-endpoint{ctx.dir_option()} stop {name}",
            EX_ALREADY,
        )
    if state is EndpointState.DISCONNECTED:
        clean_stale(ep)
    if foreground or not config.detach_endpoint:
        click.echo(f"Starting endpoint {name!r} in the foreground (Ctrl-C stops it)")
        sys.exit(run_foreground(ep, debug=ctx.debug, clear_lock=clear_lock))
    click.echo(f"Starting endpoint {name!r} ...")
    started = time.monotonic()
    result = start_daemon(
        ep,
        debug=ctx.debug,
        timeout=timeout,
        log_file=ep.log_file(config.log_dir),
        command=f"funcx-endpoint{ctx.dir_option()}",
        clear_lock=clear_lock,
    )

    elapsed = time.monotonic() - started
    # The pidfile is read once: the daemon that failed may be removing it now.
    winner = ep.read_pid() if not result.ok and not result.timed_out else None
    if (
        winner is not None
        and winner != result.info.get("pid")
        and ep.state() is EndpointState.RUNNING
        and ep.read_pid() == winner
    ):
        # Another `start` won the race: its daemon holds the endpoint's lock.
        fail(
            f"endpoint {name!r} is already running (pid {winner}), started by "
            f"another `start` at the same time",
            EX_ALREADY,
        )
    if not result.ok:
        fail(f"endpoint {name!r} did not start: {result.message}", result.exit_code)

    endpoint_id = result.info.get("endpoint_id")
    click.echo(
        f"Endpoint {name!r} is running (pid {result.info.get('pid')}, ready in {elapsed:.2f} s)"
    )
    if endpoint_id:
        click.echo(f"Endpoint id: {endpoint_id}")
    click.echo(f"Log: {ep.log_file(config.log_dir)}")


def _stop(ctx: Context, ep: EndpointDir, timeout: Optional[float], forget: bool = False) -> None:
    elsewhere = ep.runs_elsewhere()
    if elsewhere is not None:
        if not forget:
            fail(elsewhere_message(ctx, ep, "stop it"), EX_ALREADY)
        ep.remove_pidfile()
        ep.remove_daemon_info()
        click.echo(
            f"Forgot the daemon of endpoint {ep.name!r} on host {elsewhere}: its pidfile "
            f"is removed (a daemon still alive there keeps running)."
        )
        return
    grace = timeout
    if grace is None:
        try:
            grace = load_config(ep.config_file).stop_grace_period + 5.0
        except ConfigFileError:
            grace = 15.0
    result = stop_daemon(ep, grace)
    if result.stale_pidfile:
        extra = f"; killed {len(result.killed)} leftover process(es)" if result.killed else ""
        click.echo(
            f"Endpoint {ep.name!r} was not running: removed the stale pidfile of pid "
            f"{result.pid}{extra}."
        )
    elif result.lock_held_without_pidfile:
        fail(
            f"endpoint {ep.name!r} has no pidfile ({ep.pidfile}), yet a daemon of it holds "
            f"{ep.lock_file}: find it with `fuser {ep.lock_file}` and stop it with kill",
            EX_ALREADY,
        )
    elif not result.was_running:
        extra = (
            f" Killed {len(result.killed)} process(es) an earlier daemon left behind."
            if result.killed
            else ""
        )
        click.echo(f"Endpoint {ep.name!r} is not running.{extra}")
    elif result.clean:
        extra = f"; killed {len(result.killed)} process(es) it left behind" if result.killed else ""
        click.echo(
            f"Endpoint {ep.name!r} stopped (pid {result.pid}, {result.seconds:.2f} s){extra}."
        )
    else:
        click.echo(
            f"Endpoint {ep.name!r} did not stop within {grace:g} s; killed its "
            f"{len(result.killed)} process(es) (pid {result.pid})."
        )


timeout_option = click.option(
    "--timeout",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Grace period after TERM before everything left is killed "
    "[default: the config's stop_grace_period + 5].",
)


@click.command()
@name_argument
@timeout_option
@click.option(
    "--forget",
    is_flag=True,
    help="If the daemon runs on another host sharing this directory (a second "
    "login node) that is gone for good: remove its pidfile here.",
)
@click.option(
    "--remote",
    is_flag=True,
    help="Stop it through the service (from any machine): NAME is a profile here or an "
    "endpoint id.  The running endpoint drains and exits, and the service refuses it "
    "until its owner starts it again on its host.",
)
@pass_context
def stop(ctx: Context, name: str, timeout: Optional[float], forget: bool, remote: bool) -> None:
    """Stop the endpoint NAME, its managers and workers.

    One stop is always enough: the daemon gets TERM and stops its children;
    after the grace period every process left of its tree is killed.  A stale
    pidfile (daemon gone) is removed.  A daemon that runs on another host
    sharing this directory is stopped there, not from here (or with --remote).
    """
    if remote:
        _stop_remote(ctx, name)
        return
    _stop(ctx, ctx.existing(name), timeout, forget)


def _stop_remote(ctx: Context, name: str) -> None:
    """``stop --remote``: ask the service to stop endpoint NAME (a profile or an id)."""
    from funcx_endpoint.cli import remote
    from funcx_endpoint.cli.remote_endpoints import UUID, services

    if UUID.fullmatch(name) and not ctx.endpoint(name).exists():
        endpoint_id = name.lower()
        configs = services(ctx, None)
        if len(configs) > 1:
            fail(
                "the profiles here use several services; name a profile instead of the id",
                64,
            )
        config = configs[0]
    else:
        ep = ctx.existing(name)
        config = load_checked(ep)
        registered = ep.endpoint_id()
        if registered is None:
            fail(f"endpoint {name!r} was never registered (no endpoint.json)", 66)
        assert registered is not None
        endpoint_id = registered
    try:
        answer = remote.run_in_reactor(
            lambda reactor: remote.stop_endpoint(reactor, config, ctx.config_dir, endpoint_id)
        )
    except remote.RemoteError as e:
        fail(f"{e}; not stopped", e.exit_code)
    how = (
        "it drains and exits"
        if answer.get("stop_sent")
        else "if it runs, it cannot be told (an older endpoint, or the broker is away)"
    )
    click.echo(
        f"Endpoint {endpoint_id} stopped remotely at {config.funcx_service_address}: {how}; "
        f"the service refuses it until its owner starts it on its host (funcx-endpoint start, "
        f"refused once more: that clears the lock)."
    )


@click.command()
@name_argument
@timeout_option
@click.option(
    "--start-timeout",
    default=120.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the daemon to report ready.",
)
@click.pass_context
def restart(
    click_ctx: click.Context, name: str, timeout: Optional[float], start_timeout: float
) -> None:
    """Stop the endpoint NAME (if running), then start it again."""
    ctx = click_ctx.find_object(Context)
    assert ctx is not None
    ep = ctx.existing(name)
    load_checked(ep)
    _stop(ctx, ep, timeout)
    click_ctx.invoke(start, name=name, foreground=False, timeout=start_timeout)


@click.command()
@name_argument
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Delete the local profile even if the service cannot be told (or its config is broken).",
)
@timeout_option
@pass_context
def delete(ctx: Context, name: str, yes: bool, force: bool, timeout: Optional[float]) -> None:
    """Delete the endpoint NAME: at its service (if it was registered), then the profile.

    The service is asked first: if it cannot be reached or refuses, nothing is
    stopped or deleted (exit 69) unless --force.  Then the endpoint is stopped
    if it runs, and its directory removed.
    """
    from funcx_endpoint.cli import remote

    ep = ctx.existing(name)
    if ep.runs_elsewhere() is not None and not force:
        fail(elsewhere_message(ctx, ep, "stop it") + " (or delete with --force)", EX_ALREADY)
    if not yes:
        click.confirm(f"Delete endpoint {name!r} and everything in {ep.path}?", abort=True)
    endpoint_id = ep.endpoint_id()
    config: Optional[Config] = None
    try:
        config = load_config(ep.config_file)
    except ConfigFileError as e:
        if not force:
            fail(f"bad configuration, cannot reach the service: {e} (use --force)", EX_CONFIG)
    if endpoint_id and config is not None:
        try:
            remote.run_in_reactor(
                lambda reactor: remote.delete_endpoint(reactor, config, ctx.config_dir, endpoint_id)
            )
            click.echo(f"Deleted endpoint {endpoint_id} at {config.funcx_service_address}.")
        except remote.RemoteError as e:
            if not force:
                fail(f"{e}; nothing deleted (use --force to delete the local profile)", 69)
            click.echo(f"Warning: {e}; deleting the local profile anyway (--force)", err=True)
    if ep.read_pid() is not None:
        _stop(ctx, ep, timeout, forget=force)
    shutil.rmtree(ep.path)

    click.echo(f"Deleted endpoint {name!r} ({ep.path}).")

"""``funcx-endpoint``: configure, start, stop and inspect funcX endpoints."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from string import Template
from typing import Any, Callable, Optional, TypeVar

import click

from funcx_endpoint.cli import completion
from funcx_endpoint.cli.daemon import run_foreground, start_daemon, stop_daemon
from funcx_endpoint.config import (
    DEFAULT_SERVICE_ADDRESS,
    Config,
    ConfigFileError,
    load_config,
)
from funcx_endpoint.endpoint.control import ControlError, ask
from funcx_endpoint.endpoint.layout import (
    BadEndpointName,
    EndpointDir,
    EndpointState,
    ensure_private_dir,
    list_endpoints,
    resolve_config_dir,
)
from funcx_endpoint.lifecycle import EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_NOINPUT
from funcx_endpoint.version import __version__

# Refusals that are not sysexits-worthy errors (e.g. already running).

EX_ALREADY = 1

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What the global options set, passed to every command."""

    def __init__(self, config_dir: Optional[str], debug: bool) -> None:
        self.config_dir = resolve_config_dir(config_dir)
        self.debug = debug

    def endpoint(self, name: str) -> EndpointDir:
        try:
            return EndpointDir(self.config_dir, name)
        except BadEndpointName as e:
            fail(str(e), EX_DATAERR)
            raise  # unreachable

    def existing(self, name: str) -> EndpointDir:
        ep = self.endpoint(name)
        if not ep.exists():
            fail(
                f"there is no endpoint {name!r} in {self.config_dir}; "
                f"create it with: funcx-endpoint{self.dir_option()} configure {name}",
                EX_NOINPUT,
            )
        return ep

    def dir_option(self) -> str:
        default = resolve_config_dir(None)
        return "" if self.config_dir == default else f" -c {self.config_dir}"


def fail(message: str, code: int = 1) -> None:
    """Print ``Error: message`` to stderr and exit with ``code``."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def pass_context(f: F) -> F:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return f(click.get_current_context().find_object(Context), *args, **kwargs)

    return wrapper  # type: ignore[return-value]


name_argument = click.argument("name", default="default", metavar="[NAME]")


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


@cli.command()
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


@cli.command()
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


def load_checked(ep: EndpointDir) -> Config:
    try:
        return load_config(ep.config_file)
    except ConfigFileError as e:
        fail(f"bad configuration: {e}", EX_CONFIG)
        raise  # unreachable


def clean_stale(ep: EndpointDir) -> None:
    """Remove a dead daemon's pidfile (and any process it left), saying so."""
    result = stop_daemon(ep, grace=0)
    extra = f"; killed {len(result.killed)} leftover process(es)" if result.killed else ""
    click.echo(
        f"Endpoint {ep.name!r} was Disconnected: its daemon (pid {result.pid}) died "
        f"without cleaning up; removed the stale pidfile{extra}."
    )


@cli.command()
@name_argument
@click.option("--foreground", is_flag=True, help="Run attached to this terminal (Ctrl-C stops).")
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the daemon to report ready.",
)
@pass_context
def start(ctx: Context, name: str, foreground: bool, timeout: float) -> None:
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
    state = ep.state()
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
        sys.exit(run_foreground(ep, debug=ctx.debug))
    click.echo(f"Starting endpoint {name!r} ...")
    started = time.monotonic()
    result = start_daemon(
        ep,
        debug=ctx.debug,
        timeout=timeout,
        log_file=ep.log_file(config.log_dir),
        command=f"funcx-endpoint{ctx.dir_option()}",
    )

    elapsed = time.monotonic() - started
    if (
        not result.ok
        and not result.timed_out
        and ep.state() is EndpointState.RUNNING
        and ep.read_pid() != result.info.get("pid")
    ):
        # Another `start` won the race: its daemon holds the endpoint's lock.
        fail(
            f"endpoint {name!r} is already running (pid {ep.read_pid()}), started by "
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


def _stop(ctx: Context, ep: EndpointDir, timeout: Optional[float]) -> None:
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


@cli.command()
@name_argument
@timeout_option
@pass_context
def stop(ctx: Context, name: str, timeout: Optional[float]) -> None:
    """Stop the endpoint NAME, its managers and workers.

    One stop is always enough: the daemon gets TERM and stops its children;
    after the grace period every process left of its tree is killed.  A stale
    pidfile (daemon gone) is removed.
    """
    _stop(ctx, ctx.existing(name), timeout)


@cli.command()
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


@cli.command()
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
        _stop(ctx, ep, timeout)
    shutil.rmtree(ep.path)

    click.echo(f"Deleted endpoint {name!r} ({ep.path}).")


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


@cli.command()
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


@cli.command()
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


@cli.command(name="list")
@pass_context
def list_command(ctx: Context) -> None:
    """List the endpoints: name, status and endpoint id.

    Status: Initialized (never registered), Running, Stopped, or Disconnected
    (the daemon died; `start` or `stop` cleans up).
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
        rows.append((ep.name, ep.state().value, ep.endpoint_id() or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


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


@cli.command()
@name_argument
@pass_context
def status(ctx: Context, name: str) -> None:
    """Show the state of the endpoint NAME; live details if it runs.

    A running daemon is asked over its control socket (owner only) for its
    uptime, pid, broker connection, managers, workers and tasks in flight.
    """
    ep = ctx.existing(name)
    state = ep.state()
    click.echo(f"Endpoint {name!r}: {state.value}")
    endpoint_id = ep.endpoint_id()
    if endpoint_id:
        click.echo(f"  endpoint id: {endpoint_id}")
    if state is EndpointState.DISCONNECTED:
        click.echo(f"  the daemon (pid {ep.read_pid()}) is gone; `start` or `stop` cleans up")
    if state is not EndpointState.RUNNING:
        return
    try:
        details = ask(ep.control_socket, "status")
    except ControlError as e:
        fail(f"the daemon (pid {ep.read_pid()}) did not answer: {e}", 1)
    click.echo(format_status(details))


def main() -> None:
    cli(prog_name="funcx-endpoint")

"""``funcx-service``: run a private funcX web service, and manage its clients.

::

    funcx-service start [--state-dir DIR] [options]   # daemonize, wait until ready
    funcx-service status | stop | restart
    funcx-service create-client NAME                  # FUNCX_SDK_CLIENT_ID/SECRET lines
    funcx-service list-clients | revoke-client ID_OR_NAME
    funcx-service env                                 # export lines for clients
    funcx-service portal-link NAME | portal-revoke NAME   # the web portal's sign-in

The client commands work whether the service runs or not: they use its
storage directly, with the settings the last start saved in the state
directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import ssl
import sys
import time
import uuid
from typing import Any, Callable, Dict, Iterator, Optional, TypeVar
from urllib.error import HTTPError
from urllib.request import urlopen

import click

from funcx_endpoint.cli.daemon import (
    StopResult,
    kill_all,
    launch_daemon,
    stop_process_tree,
)
from funcx_endpoint.procs import (
    command_line_has,
    pid_alive,
    processes,
    read_daemon_session,
    read_pidfile,
)
from funcx_endpoint.version import __version__
from funcx_endpoint.webservice.settings import (
    OPTIONS,
    ServiceSettings,
    client_env_lines,
    resolve_state_dir,
)

LOGGER = "funcx_endpoint.endpoint.logs.make_observer"
EX_USAGE = 64
EX_NOINPUT = 66
EX_SOFTWARE = 70
EX_CONFIG = 78
NOT_RUNNING = 3  # as LSB status commands say it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}\Z")

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["main"]


def fail(message: str, code: int = 1) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def is_service_process(pid: int) -> bool:
    """True if ``pid`` is alive and runs funcx-service (guards against pid reuse)."""
    return pid > 0 and command_line_has(pid, b"funcx-service")


def read_pid(settings: ServiceSettings) -> Optional[int]:
    return read_pidfile(settings.pidfile)


def running_pid(settings: ServiceSettings) -> Optional[int]:
    pid = read_pid(settings)
    return pid if pid is not None and is_service_process(pid) else None


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def state_dir_option(f: F) -> F:
    return click.option(
        "--state-dir",
        "-d",
        "state_dir",
        default=None,
        help="State directory (default ~/.funcx-service; env FUNCX_SERVICE_STATE_DIR).",
    )(f)


def _settings(ctx: click.Context, state_dir: Optional[str], **overrides: Any) -> ServiceSettings:
    chosen = state_dir or (ctx.obj or {}).get("state_dir")
    try:
        return ServiceSettings.load(resolve_state_dir(chosen), overrides)
    except ValueError as e:
        fail(str(e), EX_CONFIG)
        raise  # unreachable


def settings_command(name: Optional[str] = None) -> Callable[[Callable[..., None]], click.Command]:
    """A ``funcx-service`` command that takes ``--state-dir``: its function is called
    with the loaded settings first (then its own arguments and options)."""

    def decorate(fn: Callable[..., None]) -> click.Command:
        @functools.wraps(fn)
        def command(ctx: click.Context, state_dir: Optional[str], **kwargs: Any) -> None:
            fn(_settings(ctx, state_dir), **kwargs)

        return cli.command(name)(state_dir_option(click.pass_context(command)))

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="funcx-service")
@state_dir_option
@click.pass_context
def cli(ctx: click.Context, state_dir: Optional[str]) -> None:
    """A private funcX web service (REST API v2, auth, broker provisioning)."""
    ctx.obj = {"state_dir": state_dir}


# -- start / stop / status ------------------------------------------------------------


def _setting_options(f: F) -> F:
    for option in reversed(OPTIONS):
        if option.is_flag:
            # --x/--no-x: a saved flag can be turned off again.
            f = click.option(
                f"--{option.flag}/--no-{option.flag}",
                option.attribute,
                default=None,
                help=option.help,
            )(f)
        else:
            f = click.option(
                f"--{option.flag}",
                option.attribute,
                default=None,
                help=option.help,
                envvar=option.env,
                show_envvar=option.env is not None,
                callback=_coerce(option.kind, option.flag),
            )(f)
    return f


def _coerce(kind: Callable[[str], Any], flag: str) -> Callable[..., Any]:
    def callback(ctx: click.Context, param: Any, value: Any) -> Any:
        if value is None:
            return None
        try:
            return kind(value)
        except (TypeError, ValueError) as e:
            raise click.BadParameter(str(e), param_hint=f"--{flag}") from None

    return callback


def _print_ready(info: Dict[str, Any]) -> None:
    broker = info.get("broker") or {}
    if broker.get("embedded"):
        broker_text = (
            f"embedded RabbitMQ node {broker.get('node')} (endpoints: {broker.get('public_url')})"
        )
    else:
        broker_text = f"{broker.get('service_url')} (endpoints: {broker.get('public_url')})"
    click.echo(f"funcx-service is running (pid {info.get('pid')})")
    click.echo(f"  API (funcX base URL):   {info.get('base_url')}")
    click.echo(f"  auth (Globus Auth URL): {info.get('auth_url')}")
    if info.get("portal_url"):
        click.echo(f"  web portal:             {info.get('portal_url')}")
    click.echo(f"  CA file to trust:       {info.get('ca_file') or '(system CAs)'}")
    click.echo(f"  broker:                 {broker_text}")
    if info.get("broker_ca_file") and info.get("broker_ca_file") != info.get("ca_file"):
        click.echo(f"  broker CA file:         {info.get('broker_ca_file')}")
    click.echo(f"  database:               {info.get('database')}")
    click.echo(f"  log:                    {info.get('log_file')}")
    click.echo(f"  state directory:        {info.get('state_dir')}")
    click.echo("Environment for clients (credentials from `funcx-service create-client NAME`):")
    for line in info.get("env") or client_env_lines(info):
        click.echo(f"  {line}")


@cli.command()
@state_dir_option
@click.option("--foreground", is_flag=True, help="Stay attached to the terminal (twistd -n).")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for ready.")
@click.option("--debug", is_flag=True, help="Log debug messages.")
@_setting_options
@click.pass_context
def start(
    ctx: click.Context,
    state_dir: Optional[str],
    foreground: bool,
    timeout: float,
    debug: bool,
    **overrides: Any,
) -> None:
    """Start the service (as a daemon) and wait until it answers.

    Settings given here are saved in the state directory and used by later
    starts; with no broker URL an embedded RabbitMQ node runs under the state
    directory, with no database URL SQLite does.
    """
    settings = _settings(ctx, state_dir, **overrides)
    pid = running_pid(settings)
    if pid is not None:
        info = settings.read_runtime()
        fail(
            f"funcx-service is already running (pid {pid}) at {info.get('base_url', '?')}; "
            f"`funcx-service stop` first",
            1,
        )
    stale = read_pid(settings)
    if stale is not None:
        cleaned = _stop(settings, grace=5.0)
        click.echo(
            f"Cleaned up after a service that died (pid {stale}); "
            f"killed {cleaned.killed or 'nothing'}"
        )
    os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
    settings.save()
    argv = [
        "--pidfile",
        settings.pidfile,
        "--rundir",
        settings.state_dir,
        "--umask",
        "0077",
    ]
    plugin = ["funcx-service", "--state-dir", settings.state_dir] + (["--debug"] if debug else [])
    if foreground:
        from funcx_endpoint.twistd import run_app
        from funcx_endpoint.webservice.service import exit_status

        run_app(argv + ["--nodaemon"] + plugin + ["--log-stdout"])
        sys.exit(exit_status.code)
    click.echo(f"Starting funcx-service in {settings.state_dir} ...")
    result = launch_daemon(
        lambda fd: argv + ["--logger", LOGGER] + plugin + ["--ready-fd", str(fd)],
        cwd=settings.state_dir,
        timeout=timeout,
        read_pid=lambda: read_pid(settings),
        status_hint="`funcx-service status`",
        log_hint=settings.log_file,
        on_progress=lambda message: click.echo(f"  {message.get('message')}"),
    )
    if not result.ok:
        if result.info or "exited before" in result.message:
            # A daemon that failed stops itself; make sure nothing of it is left.
            # (One that is only slow to report is left running, as the message says.)
            _wait_gone(result.info.get("pid"), 15.0)
            _stop(settings, grace=15.0)
        fail(
            f"funcx-service did not start: {result.message} (log: {settings.log_file})",
            result.exit_code,
        )
    _print_ready(result.info)


def _wait_gone(pid: Any, timeout: float) -> None:
    if not isinstance(pid, int) or pid <= 0:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid) and is_service_process(pid):
        kill_all(processes([pid]))


def _stop(settings: ServiceSettings, grace: float) -> StopResult:
    from funcx_endpoint.webservice.embedded_broker import leftover_processes

    pid = read_pid(settings)
    if pid is None:
        result = StopResult(False, None)
    else:
        result = stop_process_tree(
            pid,
            read_daemon_session(settings.daemon_info_file, pid),
            grace,
            is_ours=is_service_process,
        )
    # The embedded broker's processes run in sessions of their own: find them by
    # the marker in their environment, whatever happened to the service.
    leftovers = leftover_processes(settings.broker_dir)
    if leftovers:
        result.killed += kill_all(leftovers)
    _remove(settings.pidfile, settings.daemon_info_file, settings.runtime_file)
    return result


@settings_command()
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds to wait for a clean stop before killing what is left.",
)
def stop(settings: ServiceSettings, timeout: float) -> None:
    """Stop the service and its embedded broker; nothing of them is left running."""
    result = _stop(settings, timeout)
    if not result.was_running and not result.stale_pidfile:
        if result.killed:
            click.echo(f"funcx-service was not running; killed leftover processes {result.killed}")
        else:
            click.echo("funcx-service is not running")
        return
    if result.stale_pidfile:
        click.echo(f"funcx-service (pid {result.pid}) had died; cleaned up {result.killed or ''}")
        return
    how = "cleanly" if result.clean else "by force"
    extra = f"; killed leftover processes {result.killed}" if result.killed else ""
    click.echo(f"funcx-service (pid {result.pid}) stopped {how} in {result.seconds:.1f} s{extra}")


@cli.command()
@state_dir_option
@click.option(
    "--timeout",
    default=180.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the service to answer again.",
)
@click.pass_context
def restart(ctx: click.Context, state_dir: Optional[str], timeout: float) -> None:
    """Stop, then start with the saved settings."""
    ctx.invoke(stop, state_dir=state_dir)
    ctx.invoke(start, state_dir=state_dir, foreground=False, timeout=timeout, debug=False)


def _get(info: Dict[str, Any], path: str) -> Any:
    """The JSON answer of ``GET <base URL><path>`` (an error answer's body too)."""
    url = info.get("base_url")
    if not url:
        raise ValueError("no URL recorded")
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=info.get("ca_file") or None)
    try:
        with urlopen(f"{url}{path}", timeout=5, context=context) as response:
            return json.loads(response.read())
    except HTTPError as e:
        return json.loads(e.read())


def _ping(info: Dict[str, Any]) -> Optional[str]:
    """None if the API answers ``GET /version``, else why not."""
    try:
        _get(info, "/version")
        return None
    except Exception as e:
        return str(e)


def _health(info: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    try:
        answer = _get(info, "/health")
    except Exception:
        return None
    return answer if isinstance(answer, dict) and "broker" in answer else None


@settings_command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def status(settings: ServiceSettings, as_json: bool) -> None:
    """Whether it runs: pid, URLs, broker, database, endpoints online.

    Exit 0 if all is well, 3 if stopped, 1 if it does not answer, 2 if its broker is
    down (or the service is not connected to it).
    """
    from funcx_endpoint.webservice.health import broker_problem

    pid = running_pid(settings)
    info = settings.read_runtime() if pid is not None else {}
    report: Dict[str, Any] = {"state_dir": settings.state_dir, "running": pid is not None}
    if pid is not None:
        problem = _ping(info)
        health = _health(info) if problem is None else None
        report.update({"pid": pid, "answering": problem is None, "problem": problem, **info})
        report["broker_problem"] = broker_problem(settings, health)
        report["health"] = health
    try:
        report.update(_storage_summary(settings))
    except Exception as e:
        report["storage_error"] = str(e)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif pid is None:
        click.echo(f"funcx-service is not running (state directory {settings.state_dir})")
    else:
        _print_ready(info)
        answering = "yes" if report["answering"] else f"NO ({report['problem']})"
        click.echo(f"  answering:              {answering}")
        broker_up = (
            "yes" if report["broker_problem"] is None else f"NO ({report['broker_problem']})"
        )
        click.echo(f"  broker up:              {broker_up}")
        node = ((report.get("health") or {}).get("broker") or {}).get("embedded") or {}
        if node.get("restarts"):
            click.echo(
                f"  broker restarts:        {node['restarts']} (last: {node.get('last_exit')})"
            )
    if not as_json and "endpoints_online" in report:
        click.echo(
            f"  endpoints online:       {report['endpoints_online']} of "
            f"{report['counts']['endpoints']}; clients {report['counts']['clients']}, "
            f"functions {report['counts']['functions']}, containers "
            f"{report['counts']['containers']}, tasks {report['counts']['tasks']}"
        )
    if pid is None:
        sys.exit(NOT_RUNNING)
    if not report.get("answering"):
        sys.exit(1)
    if report.get("broker_problem") is not None:
        sys.exit(2)


def _storage_summary(settings: ServiceSettings) -> Dict[str, Any]:
    from funcx_endpoint.webservice import storage

    if not settings.database_url and not os.path.exists(settings.sqlite_path):
        return {}
    connection, call = storage.open_sync(settings.effective_database_url)
    try:
        since = time.time() - settings.heartbeat_threshold
        return {
            "counts": call(storage.counts)(),
            "endpoints_online": call(storage.count_online_candidates)(since),
        }
    finally:
        connection.close()


@settings_command()
def env(settings: ServiceSettings) -> None:
    """Print the `export` lines a client of the running service needs."""
    if running_pid(settings) is None:
        fail("funcx-service is not running", NOT_RUNNING)
    for line in client_env_lines(settings.read_runtime()):
        click.echo(line)


# -- clients --------------------------------------------------------------------------


def _open(settings: ServiceSettings) -> Any:
    from funcx_endpoint.webservice import storage
    from funcx_endpoint.webservice.db import DatabaseError

    try:
        return storage.open_sync(settings.effective_database_url)
    except DatabaseError as e:
        fail(str(e), EX_CONFIG)
    except Exception as e:
        fail(f"cannot open the service's database: {e}", EX_SOFTWARE)


@contextlib.contextmanager
def storage_calls(settings: ServiceSettings) -> Iterator[Any]:
    """The service's storage for one command: yields its ``call`` and closes it after."""
    connection, call = _open(settings)
    try:
        yield call
    finally:
        connection.close()


def fail_no_client(name: str) -> None:
    """Exit: no active client is called (or has the id) ``name``."""
    fail(f"no active client {name!r} (see `funcx-service list-clients`)", EX_NOINPUT)


@settings_command("create-client")
@click.argument("name")
@click.option("--export", "export", is_flag=True, help="Prefix the lines with `export `.")
def create_client(settings: ServiceSettings, name: str, export: bool) -> None:
    """Create a client (a user identity) and print its credentials.

    Prints FUNCX_SDK_CLIENT_ID=... and FUNCX_SDK_CLIENT_SECRET=...
    (ready for `export`); the secret is stored only as a hash, so this is
    the only time it is shown.
    """
    from funcx_endpoint.webservice import accounts
    from funcx_endpoint.webservice.auth import hash_secret, new_secret

    if not _NAME.match(name):
        fail(
            f"bad client name {name!r}: 1-64 letters, digits and _.@+- (starting with a "
            f"letter or digit)",
            EX_USAGE,
        )
    client_id, secret = str(uuid.uuid4()), new_secret()
    with storage_calls(settings) as call:
        try:
            client = call(accounts.create_client)(client_id, name, hash_secret(secret), time.time())
        except accounts.NameTaken:
            fail(f"a client named {name!r} exists already (see `funcx-service list-clients`)", 1)
            raise  # unreachable
    prefix = "export " if export else ""
    click.echo(f"{prefix}FUNCX_SDK_CLIENT_ID={client.client_id}")
    click.echo(f"{prefix}FUNCX_SDK_CLIENT_SECRET={secret}")
    click.echo(
        f"Created client {name!r} (identity {client.identity_id}, username "
        f"{client.username}). The secret is shown only now.",
        err=True,
    )


@settings_command("list-clients")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_clients(settings: ServiceSettings, as_json: bool) -> None:
    """List the clients: id, name, identity, created, whether revoked."""
    from funcx_endpoint.webservice import accounts

    with storage_calls(settings) as call:
        clients = call(accounts.list_clients)()
    rows = [
        {
            "client_id": c.client_id,
            "name": c.name,
            "identity_id": c.identity_id,
            "username": c.username,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.created)),
            "status": "active"
            if c.revoked_at is None
            else "revoked " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.revoked_at)),
        }
        for c in clients
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No clients; create one with `funcx-service create-client NAME`")
        return
    columns = ("client_id", "name", "created", "status")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        click.echo("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


@settings_command("revoke-client")
@click.argument("client")
def revoke_client(settings: ServiceSettings, client: str) -> None:
    """Revoke a client (by id or name) and every token it holds."""
    from funcx_endpoint.webservice import accounts

    with storage_calls(settings) as call:
        revoked = call(accounts.revoke_client)(client, time.time())
    if revoked is None:
        fail_no_client(client)
        return
    click.echo(
        f"Revoked client {revoked.name!r} ({revoked.client_id}); its tokens stop working "
        f"within seconds"
    )


# The portal's commands (portal-link, portal-revoke) join the group.
from funcx_endpoint.portal import commands as _portal_commands  # noqa: E402, F401


def main() -> None:
    cli(prog_name="funcx-service")

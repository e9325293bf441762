"""``funcx-endpoint enable-on-boot`` and ``disable-on-boot``: a systemd unit per endpoint.

The unit runs ``funcx-endpoint start --foreground NAME`` (twistd without
daemonizing, the log on standard output: the journal), restarted on failure
except for the exit codes that a restart cannot cure (bad configuration,
credentials refused, stopped remotely).  It is a system unit
(``/etc/systemd/system``, running as the owner of the endpoint's directory)
when made by root, else a user unit (``~/.config/systemd/user``).

No secret is written into the unit: the client credentials are read, as
everywhere else, from ``FUNCX_SDK_CLIENT_ID`` / ``FUNCX_SDK_CLIENT_SECRET``,
which the unit takes from the optional ``DIR/NAME/endpoint.env`` (the
owner's file, 0600), and from the token cache ``DIR/tokens.json``.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

import attr
import click

from funcx_endpoint.cli.context import Context, fail, load_checked, name_argument, pass_context
from funcx_endpoint.endpoint.layout import EndpointDir, EndpointState, resolve_config_dir
from funcx_endpoint.lifecycle import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_UNAVAILABLE,
)

#: Exit codes a restart cannot cure: bad data or configuration, credentials
#: refused, endpoint refused (locked: stopped remotely, deleted, running elsewhere).
NO_RESTART_CODES = (EX_DATAERR, EX_UNAVAILABLE, EX_NOPERM, EX_CONFIG)
ENV_FILE = "endpoint.env"
#: Settings (no secrets) that change where the endpoint logs in; the unit keeps
#: the values they have when it is written.
PASSED_ENVIRONMENT = ("GLOBUS_SDK_SERVICE_URL_AUTH", "FUNCX_SCOPE")
SYSTEM_UNIT_DIR = "/etc/systemd/system"


@attr.s(auto_attribs=True, frozen=True)
class UnitPlace:
    """Where a unit goes and how systemctl is called for it."""

    directory: str
    user_unit: bool

    @property
    def target(self) -> str:
        return "default.target" if self.user_unit else "multi-user.target"

    def systemctl(self, *args: str) -> List[str]:
        return ["systemctl", *(["--user"] if self.user_unit else []), *args]


def unit_name(ep: EndpointDir) -> str:
    """``funcx-endpoint-NAME.service``; a config directory other than
    ``~/.funcx`` adds a short hash of it, so two directories' "default" differ."""
    if ep.config_dir == resolve_config_dir(None):
        return f"funcx-endpoint-{ep.name}.service"
    digest = hashlib.sha256(ep.config_dir.encode()).hexdigest()[:8]
    return f"funcx-endpoint-{ep.name}-{digest}.service"


def default_place(user_unit: Optional[bool] = None) -> UnitPlace:
    """A system unit for root, a user unit otherwise (unless ``user_unit`` says)."""
    if user_unit is None:
        user_unit = os.geteuid() != 0
    if not user_unit:
        return UnitPlace(SYSTEM_UNIT_DIR, False)
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return UnitPlace(os.path.join(config_home, "systemd", "user"), True)


def quote_word(word: str) -> str:
    """``word`` as one argument of a systemd command line (``%`` and ``$`` kept literal)."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("%", "%%").replace("$", "$$")
    if escaped == word and word and not any(c.isspace() or c in "'\";" for c in word):
        return word
    return f'"{escaped}"'


def quote_path(path: str) -> str:
    """A path for settings such as ``WorkingDirectory=`` (specifiers escaped)."""
    if any(c.isspace() or c in "\"'\\" for c in path):
        raise click.UsageError(f"systemd cannot take this path unquoted: {path!r}")
    return path.replace("%", "%%")


def render_unit(
    ep: EndpointDir,
    *,
    user_unit: bool,
    stop_grace_period: float,
    python: str = sys.executable,
    environment: Optional[Dict[str, str]] = None,
    run_as: Optional[str] = None,
) -> str:
    """The text of the unit that runs endpoint ``ep`` in the foreground."""
    argv = [python, "-m", "funcx_endpoint.cli", "-c", ep.config_dir, "start", "--foreground"]
    argv.append(ep.name)
    env = environment or {}
    lines = [
        "# Written by `funcx-endpoint enable-on-boot`; `disable-on-boot` removes it.",
        "# No secrets here: they come from the EnvironmentFile (0600) or DIR/tokens.json.",
        "[Unit]",
        f"Description=funcX endpoint {ep.name} ({ep.path})",
        "Documentation=https://funcx.readthedocs.io/",
        "Wants=network-online.target",
        "After=network-online.target",
        "StartLimitIntervalSec=600",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=simple",
    ]
    if run_as is not None:
        lines.append(f"User={run_as}")
    lines += [
        f"WorkingDirectory={quote_path(ep.path)}",
        f"EnvironmentFile=-{quote_path(os.path.join(ep.path, ENV_FILE))}",
        *(f"Environment={quote_word(f'{k}={v}')}" for k, v in sorted(env.items())),
        "Environment=PYTHONUNBUFFERED=1",
        f"ExecStart={' '.join(quote_word(a) for a in argv)}",
        "Restart=on-failure",
        "RestartSec=10",
        f"RestartPreventExitStatus={' '.join(str(c) for c in NO_RESTART_CODES)}",
        # TERM to the daemon alone: it drains and stops its managers and workers
        # itself; what is left after the timeout is killed.
        "KillMode=mixed",
        # twistd ends by re-raising the TERM it stopped for: systemd counts that
        # as a clean exit (SuccessExitStatus's default), so no restart follows.
        f"TimeoutStopSec={int(stop_grace_period) + 30}",
        "",
        "[Install]",
        f"WantedBy={'default.target' if user_unit else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def existing_units(ep: EndpointDir) -> List[str]:
    """The units enable-on-boot wrote for ``ep`` in the usual places (system, this user)."""
    unit = unit_name(ep)
    places = [default_place(False), default_place(True)]
    return [
        os.path.join(p.directory, unit)
        for p in places
        if os.path.exists(os.path.join(p.directory, unit))
    ]


def systemd_running() -> bool:
    """Whether this machine was booted with systemd (``sd_booted()``)."""
    return os.path.isdir("/run/systemd/system")


def _run(argv: List[str]) -> Optional[str]:
    """Run ``argv``; None if it worked, else what went wrong."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if done.returncode != 0:
        return (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
    return None


def _owner(path: str) -> str:
    uid = os.stat(path).st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


unit_dir_option = click.option(
    "--unit-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write the unit here instead, and do not call systemctl [default: "
    "/etc/systemd/system as root, else ~/.config/systemd/user].",
)
user_option = click.option(
    "--user/--system",
    "user_unit",
    default=None,
    help="A user unit or a system unit [default: system unit as root, else user unit].",
)


@click.command(name="enable-on-boot")
@name_argument
@user_option
@unit_dir_option
@pass_context
def enable_on_boot(
    ctx: Context, name: str, user_unit: Optional[bool], unit_dir: Optional[str]
) -> None:
    """Write a systemd unit that starts the endpoint NAME at boot.

    The unit runs `funcx-endpoint start --foreground NAME` (log in the journal)
    and restarts it on failure, except after exit 65, 69, 77 or 78 (bad data,
    refused or stopped remotely, credentials refused, bad configuration).
    As root it is a system unit run as the owner of DIR/NAME; otherwise a user
    unit (for it to start at boot, run `loginctl enable-linger`).  Credentials
    are never written into the unit: put FUNCX_SDK_CLIENT_ID and
    FUNCX_SDK_CLIENT_SECRET in DIR/NAME/endpoint.env (mode 0600), which the
    unit reads.  Where systemd runs, the unit is enabled (and started unless
    the endpoint runs now); elsewhere the commands to run are printed.
    """
    ep = ctx.existing(name)
    config = load_checked(ep)
    place = default_place(user_unit)
    if unit_dir is not None:
        place = UnitPlace(os.path.abspath(unit_dir), place.user_unit)
    environment = {k: os.environ[k] for k in PASSED_ENVIRONMENT if os.environ.get(k)}
    text = render_unit(
        ep,
        user_unit=place.user_unit,
        stop_grace_period=config.stop_grace_period,
        environment=environment,
        run_as=None if place.user_unit else _owner(ep.path),
    )
    unit = unit_name(ep)
    path = os.path.join(place.directory, unit)
    try:
        os.makedirs(place.directory, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)
    except OSError as e:
        fail(f"cannot write {path}: {e}", 73)
    click.echo(f"Wrote {path}")
    env_file = os.path.join(ep.path, ENV_FILE)
    if not os.path.exists(env_file):
        click.echo(
            f"Credentials: the unit reads FUNCX_SDK_CLIENT_ID and FUNCX_SDK_CLIENT_SECRET "
            f"from {env_file} (create it, mode 0600, as KEY=VALUE lines); without it only "
            f"a saved token (valid until it expires) logs in."
        )
    elif os.stat(env_file).st_mode & 0o077:
        click.echo(f"Warning: {env_file} is readable by others; chmod 600 it", err=True)
    running = ep.state() is EndpointState.RUNNING
    enable = (
        place.systemctl("enable", unit) if running else place.systemctl("enable", "--now", unit)
    )
    commands = [place.systemctl("daemon-reload"), enable]
    if unit_dir is None and systemd_running() and shutil.which("systemctl"):
        for argv in commands:
            error = _run(argv)
            if error is not None:
                fail(f"`{' '.join(argv)}` failed: {error}", EX_UNAVAILABLE)
        click.echo(f"Enabled {unit}" + ("" if running else " and started it") + ".")
    else:
        why = "--unit-dir given" if unit_dir is not None else "systemd is not running here"
        click.echo(f"Not calling systemctl ({why}); to enable it, run:")
        click.echo("  " + " && ".join(" ".join(argv) for argv in commands))
    if running:
        click.echo(
            f"Endpoint {name!r} runs now outside systemd: to hand it over, run "
            f"`funcx-endpoint{ctx.dir_option()} stop {name}` then "
            f"`{' '.join(place.systemctl('start', unit))}`."
        )
    if place.user_unit:
        click.echo(
            "A user unit starts at boot only with lingering on: loginctl enable-linger "
            + pwd.getpwuid(os.getuid()).pw_name
        )


@click.command(name="disable-on-boot")
@name_argument
@user_option
@unit_dir_option
@pass_context
def disable_on_boot(
    ctx: Context, name: str, user_unit: Optional[bool], unit_dir: Optional[str]
) -> None:
    """Remove the systemd unit of the endpoint NAME written by enable-on-boot.

    Where systemd runs, the unit is disabled first; an endpoint it runs keeps
    running until stopped (`funcx-endpoint stop NAME`).
    """
    ep = ctx.endpoint(name)
    place = default_place(user_unit)
    if unit_dir is not None:
        place = UnitPlace(os.path.abspath(unit_dir), place.user_unit)
    unit = unit_name(ep)
    path = os.path.join(place.directory, unit)
    if not os.path.exists(path):
        fail(f"there is no unit {path} (nothing to disable)", 1)
    use_systemctl = unit_dir is None and systemd_running() and shutil.which("systemctl")
    if use_systemctl:
        error = _run(place.systemctl("disable", unit))
        if error is not None:
            fail(f"`{' '.join(place.systemctl('disable', unit))}` failed: {error}", EX_UNAVAILABLE)
    # What `systemctl enable` links (run by hand where systemd did not run).
    link = os.path.join(place.directory, f"{place.target}.wants", unit)
    if os.path.islink(link):
        os.unlink(link)
    os.unlink(path)
    click.echo(f"Removed {path}")
    if use_systemctl:
        _run(place.systemctl("daemon-reload"))
    else:
        click.echo(f"Then run: {' '.join(place.systemctl('daemon-reload'))}")

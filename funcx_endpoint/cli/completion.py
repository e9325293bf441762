"""``--install-completion``: write click's completion script where the shell finds it."""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import click
from click.shell_completion import get_completion_class

PROG = "funcx-endpoint"
COMPLETE_VAR = "_FUNCX_ENDPOINT_COMPLETE"


def completion_target(shell: str, home: str) -> Tuple[str, Optional[str]]:
    """Where the script goes for ``shell``, and a note if the shell needs more set-up."""
    if shell == "bash":
        data = os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
        # bash-completion (>= 2.2) loads completions from here on demand.
        return os.path.join(data, "bash-completion", "completions", PROG), None
    if shell == "zsh":
        path = os.path.join(home, ".zfunc", f"_{PROG}")
        note = (
            "add these lines to ~/.zshrc (before compinit) if they are not there:\n"
            "  fpath+=~/.zfunc\n  autoload -Uz compinit && compinit"
        )
        return path, note
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return os.path.join(config, "fish", "completions", f"{PROG}.fish"), None


def completion_source(cli: click.Command, shell: str) -> str:
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click knows all three
        raise click.UsageError(f"no completion support for {shell}")
    return cls(cli, {}, PROG, COMPLETE_VAR).source()


def install_callback(ctx: click.Context, param: Any, shell: Optional[str]) -> None:
    if not shell or ctx.resilient_parsing:
        return
    path, note = completion_target(shell, os.path.expanduser("~"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(completion_source(ctx.command, shell))
    click.echo(f"Installed {shell} completion for {PROG} in {path}")
    if note:
        click.echo(note)
    else:
        click.echo("It takes effect in new shells.")
    ctx.exit(0)

"""Command-line help rendered from the code at build time.

``.. click-command:: funcx_endpoint.cli.main:cli start``
    The ``--help`` text of the ``start`` command of the click group ``cli``
    (no command: the group's own help), exactly as the program prints it.
    Options: ``:prog:`` (the program name, default: the group's name).

``.. twistd-options:: funcx_endpoint.endpoint.tap.Options``
    The options of a twistd plugin, as ``twistd PLUGIN --help`` prints them.
    Option ``:name:`` (the plugin's name).

A command of a group that some page documents with ``click-command`` but
that no ``click-command`` directive shows is reported as a warning (an error
with ``sphinx-build -W``), so a new command cannot go undocumented.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Set, Tuple

import click
from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

WIDTH = 80
logger = logging.getLogger(__name__)

# env.clidoc_seen: docname -> {(group path, prog, command name)}
Seen = Dict[str, Set[Tuple[str, str, str]]]


def _load(path: str) -> Any:
    module_name, sep, name = path.partition(":")
    if not sep:
        module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _context(command: click.Command, name: str, parent: Any = None) -> click.Context:
    """A context as click makes it for ``--help`` (the command's context_settings
    apply, e.g. ``-h``), at a fixed width so the output does not depend on the terminal."""
    settings = dict(command.context_settings)
    settings.update(terminal_width=WIDTH, max_content_width=WIDTH)
    return click.Context(command, info_name=name, parent=parent, **settings)


def click_help(group: click.Group, prog: str, names: List[str]) -> str:
    """The help text of ``prog NAMES... --help``."""
    ctx = _context(group, prog)
    command: click.Command = group
    for name in names:
        if not isinstance(command, click.Group):
            raise ValueError(f"{ctx.command_path} has no subcommands")
        found = command.get_command(ctx, name)
        if found is None:
            raise ValueError(f"{ctx.command_path} has no command {name!r}")
        command = found
        ctx = _context(command, name, ctx)
    return command.get_help(ctx)


class ClickCommand(SphinxDirective):
    required_arguments = 1
    optional_arguments = 5
    option_spec = {"prog": directives.unchanged}

    def run(self) -> List[nodes.Node]:
        path, names = self.arguments[0], self.arguments[1:]
        try:
            group = _load(path)
            prog = self.options.get("prog") or group.name
            text = click_help(group, prog, names)
        except Exception as e:
            raise self.error(f"click-command: {' '.join(self.arguments)}: {e}") from None
        if names:
            seen: Seen = getattr(self.env, "clidoc_seen", {})
            setattr(self.env, "clidoc_seen", seen)  # noqa: B010 (an attribute of our own)
            seen.setdefault(self.env.docname, set()).add((path, prog, names[0]))
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


class TwistdOptions(SphinxDirective):
    required_arguments = 1
    option_spec = {"name": directives.unchanged_required}

    def run(self) -> List[nodes.Node]:
        try:
            options = _load(self.arguments[0])()
            usage = options.getUsage(width=WIDTH)
        except Exception as e:
            raise self.error(f"twistd-options: {self.arguments[0]}: {e}") from None
        name = self.options.get("name", "PLUGIN")
        text = f"Usage: twistd [options] {name} [options]\n{usage}".rstrip() + "\n"
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def _purge(app: Sphinx, env: BuildEnvironment, docname: str) -> None:
    seen: Seen = getattr(env, "clidoc_seen", {})
    seen.pop(docname, None)


def _merge(app: Sphinx, env: BuildEnvironment, docnames: Any, other: BuildEnvironment) -> None:
    seen: Seen = getattr(env, "clidoc_seen", {})
    setattr(env, "clidoc_seen", seen)  # noqa: B010 (an attribute of our own)
    for docname, entries in getattr(other, "clidoc_seen", {}).items():
        seen.setdefault(docname, set()).update(entries)


def _check(app: Sphinx, env: BuildEnvironment) -> None:
    seen: Seen = getattr(env, "clidoc_seen", {})
    shown: Dict[Tuple[str, str], Set[str]] = {}
    for entries in seen.values():
        for path, prog, name in entries:
            shown.setdefault((path, prog), set()).add(name)
    for (path, prog), names in sorted(shown.items()):
        group = _load(path)
        ctx = _context(group, prog)
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            if command is None or getattr(command, "hidden", False):
                continue
            if name not in names:
                logger.warning(
                    f"`{prog} {name}` is not documented: add `.. click-command:: {path} {name}` "
                    f"(and a few words about it) to the CLI reference"
                )


def setup(app: Sphinx) -> dict:
    app.add_directive("click-command", ClickCommand)
    app.add_directive("twistd-options", TwistdOptions)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-check-consistency", _check)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

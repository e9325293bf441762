"""The programs a node runs, and finding a node's processes wherever they are.

A node's processes are not all children of whoever started it:
``erl_child_setup`` and ``inet_gethost`` call ``setsid()``, and a node whose
owner died is re-parented to init.  Every one of them carries
``FUNCX_RABBITMQ_NODE=<node name>`` in its environment (set when ``epmd`` and
``rabbitmq-server`` are started, inherited by the rest), and that marker is how
they are found and killed: :class:`MarkedProcessTable`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

import psutil
from zope.interface import Interface, implementer

from funcx_endpoint.procs import marked_processes
from funcx_endpoint.rabbitmq.node import (
    LISTEN_IP,
    MARKER_ENV,
    NodeDirectory,
    NodeIdentity,
    RabbitMQNotInstalled,
)

__all__ = [
    "DEFAULT_SERVER",
    "IProcessTable",
    "MarkedProcessTable",
    "Programs",
    "node_processes",
]

DEFAULT_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"

_INSTALL_HINT = "Install RabbitMQ (`apt-get install rabbitmq-server`)."


def node_processes(name: str) -> list[psutil.Process]:
    """Every live (non-zombie) OS process marked as belonging to node ``name``."""
    return marked_processes(MARKER_ENV, name)


class IProcessTable(Interface):
    """The OS processes of nodes, found by the node name in their marker."""

    def find(name: str) -> list[int]:
        """Pids of the live processes of node ``name``."""

    def signal_all(name: str, signum: int, exclude: Iterable[int] = ()) -> list[int]:
        """Send ``signum`` to every live process of node ``name`` but ``exclude``;
        return the pids signalled."""


@implementer(IProcessTable)
class MarkedProcessTable:
    """:class:`IProcessTable` over ``/proc`` (a few milliseconds per call)."""

    def find(self, name: str) -> list[int]:
        return [p.pid for p in node_processes(name)]

    def signal_all(self, name: str, signum: int, exclude: Iterable[int] = ()) -> list[int]:
        skip = set(exclude)
        signalled = []
        for proc in node_processes(name):
            if proc.pid in skip:
                continue
            try:
                # psutil refuses (NoSuchProcess) if the pid was reused meanwhile.
                proc.send_signal(signum)
            except psutil.Error:
                continue
            signalled.append(proc.pid)
        return signalled


def _find_epmd() -> str | None:
    found = shutil.which("epmd")
    if found:
        return found
    for candidate in ("/usr/lib/erlang/bin/epmd", "/usr/local/lib/erlang/bin/epmd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass(frozen=True)
class Programs:
    """The programs of a node, and the command lines to run them.

    ``setsid`` (util-linux), when there is one, starts ``epmd`` and
    ``rabbitmq-server`` in a session of their own, so that a terminal's Ctrl-C
    reaches only whoever owns the node, which then stops it in order.
    """

    server: str
    ctl: str
    epmd: str
    setsid: str | None = None

    @classmethod
    def find(cls, server: str | None = None, hint: str = _INSTALL_HINT) -> Programs:
        """The programs next to ``server`` (default: Debian's ``rabbitmq-server``).

        Raises :class:`RabbitMQNotInstalled`, with ``hint``, if one is missing.
        """
        server = server or DEFAULT_SERVER
        if not os.access(server, os.X_OK):
            raise RabbitMQNotInstalled(f"RabbitMQ server program {server} not found. {hint}")
        ctl = os.path.join(os.path.dirname(server), "rabbitmqctl")
        if not os.access(ctl, os.X_OK):
            raise RabbitMQNotInstalled(f"{ctl} not found. {hint}")
        epmd = _find_epmd()
        if epmd is None:
            raise RabbitMQNotInstalled(
                f"epmd (part of Erlang) was not found next to {server} or on PATH. {hint}"
            )
        return cls(server, ctl, epmd, shutil.which("setsid"))

    def _in_session(self, argv: list[str]) -> list[str]:
        return [self.setsid, *argv] if self.setsid else argv

    def epmd_argv(self, identity: NodeIdentity) -> list[str]:
        """Our own epmd on the node's private port, in the foreground.

        The system-wide one (port 4369) would be started as a daemon by the first
        Erlang node and outlive it; this one is a child and stops with the node.
        """
        return self._in_session(
            [self.epmd, "-port", str(identity.ports.epmd), "-address", LISTEN_IP]
        )

    def epmd_names_argv(self, identity: NodeIdentity) -> list[str]:
        """Ask the node's epmd which names are registered (exits 0 if it answers)."""
        return [self.epmd, "-port", str(identity.ports.epmd), "-names"]

    def server_argv(self) -> list[str]:
        return self._in_session([self.server])

    def ctl_argv(self, identity: NodeIdentity, *args: str) -> list[str]:
        """``rabbitmqctl -n NAME ARGS`` (run it with :meth:`NodeDirectory.ctl_env`)."""
        return [self.ctl, "-n", identity.name, *args]

    def wait_argv(
        self, directory: NodeDirectory, identity: NodeIdentity, timeout: float
    ) -> list[str]:
        """``rabbitmqctl wait``: returns once the node (the VM whose pid is in the pid
        file) has started RabbitMQ and its plugins; fails if that VM exits first.
        It waits for the pid file forever if the node dies before writing it:
        whoever runs it must watch the server process too."""
        return self.ctl_argv(
            identity, "wait", directory.pid_file, "--timeout", str(max(1, int(timeout)))
        )

"""A fake :class:`~funcx_endpoint.rabbitmq.processes.IProcessTable` for unit tests.

:class:`FakeProcessTable` sees two kinds of "processes" of a node:

- the running :class:`~funcx_endpoint.testing.procreactor.FakeProcess`\\ es of a
  :class:`~funcx_endpoint.testing.procreactor.MemoryProcessReactor` whose
  environment carries the node's marker (as a real ``epmd`` or
  ``rabbitmq-server`` does); SIGKILL makes them die at once
  (``simulate_killed``);
- *extra* processes the test adds (:meth:`FakeProcessTable.add`), standing for
  the helpers a real node starts itself (``erl_child_setup``, ``inet_gethost``)
  or for leftovers of an earlier run; SIGKILL removes them unless they are
  :attr:`~FakeProcessTable.immortal`.

Every signal sent is recorded in :attr:`~FakeProcessTable.signals`.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Iterable

from zope.interface import implementer

from funcx_endpoint.rabbitmq.node import MARKER_ENV
from funcx_endpoint.rabbitmq.processes import IProcessTable
from funcx_endpoint.testing.procreactor import FakeProcess, MemoryProcessReactor

__all__ = ["FakeProcessTable"]


@implementer(IProcessTable)
class FakeProcessTable:
    """Processes of nodes: marked fake children of ``reactor`` plus extras."""

    def __init__(self, reactor: MemoryProcessReactor | None = None) -> None:
        self.reactor = reactor
        #: pid -> node name of the extra processes.
        self.extra: dict[int, str] = {}
        #: Extra pids that SIGKILL does not remove (a process stuck in the kernel).
        self.immortal: set[int] = set()
        #: (pid, signal number) for every signal sent, in order.
        self.signals: list[tuple[int, int]] = []
        self.scans = 0

    def add(self, name: str, pid: int) -> None:
        """An extra process of node ``name``."""
        self.extra[pid] = name

    def _children(self, name: str) -> list[FakeProcess]:
        if self.reactor is None:
            return []
        found = []
        for process in self.reactor.running_processes():
            env = process.env or {}
            marker = env.get(MARKER_ENV, env.get(MARKER_ENV.encode()))
            if marker in (name, name.encode()):
                found.append(process)
        return found

    def find(self, name: str) -> list[int]:
        self.scans += 1
        pids = [p.original_pid for p in self._children(name)]
        return pids + [pid for pid, owner in self.extra.items() if owner == name]

    def signal_all(self, name: str, signum: int, exclude: Iterable[int] = ()) -> list[int]:
        skip = set(exclude)
        signalled = []
        for process in self._children(name):
            pid = process.original_pid
            if pid in skip:
                continue
            self.signals.append((pid, signum))
            signalled.append(pid)
            if signum == _signal.SIGKILL:
                process.simulate_killed(_signal.SIGKILL)
        for pid, owner in list(self.extra.items()):
            if owner != name or pid in skip:
                continue
            self.signals.append((pid, signum))
            signalled.append(pid)
            if signum == _signal.SIGKILL and pid not in self.immortal:
                del self.extra[pid]
        return signalled

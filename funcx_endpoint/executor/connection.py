"""The interchange's end of one manager connection: AMP I/O and the registration gate.

A :class:`ManagerConnection` does no policy.  Its lifecycle is a small
state machine:

``unregistered``
    Only ``Register`` is allowed, and at most :data:`MAX_UNREGISTERED_BYTES`
    (a stranger cannot fill the interchange's memory with an endless AMP box
    before proving it knows the secret); anything else, or silence past the
    registration deadline, drops the connection.
``registered``
    Every box counts as a sign of life; result batches take a fast path
    straight to the registry's listener (no Deferred per batch).
``closed``
    The connection is gone; the registry has been told.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Type

from automat import MethodicalMachine
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from funcx_endpoint.wire.amp import (
    Heartbeat,
    Quitting,
    Register,
    SendResults,
    TasksStarted,
    WarmContainers,
    read_unanswered,
    set_no_delay,
)

if TYPE_CHECKING:
    from funcx_endpoint.executor.registry import Manager, ManagerRegistry

__all__ = ["MAX_UNREGISTERED_BYTES", "ManagerConnection", "ManagerConnectionFactory"]

#: Bytes a connection may send before it has registered (a Register box is
#: well under 1 KiB); past this it is dropped.
MAX_UNREGISTERED_BYTES = 64 * 1024

#: What AMP raises for a box it cannot read (a missing or ill-typed argument, an
#: answer to nothing asked, no command at all): the peer is dropped with one warning.
MALFORMED_ERRORS = (KeyError, ValueError, TypeError, OverflowError, amp.AmpError)


def describe_peer(transport: Any) -> str:
    """``host:port`` of the other end, for messages."""
    try:
        peer: Any = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "an unknown peer"


class ManagerConnection(amp.AMP):
    """One manager's AMP connection; events go to the :class:`ManagerRegistry`."""

    log = Logger()
    _machine = MethodicalMachine()

    def __init__(self, registry: ManagerRegistry) -> None:
        super().__init__()
        self._registry = registry
        self.manager: Optional[Manager] = None
        self.peer = "an unknown peer"
        self.unregistered_bytes = 0
        self._deadline: Any = None

    # -- states (described in the module docstring) ------------------------------

    @_machine.state(initial=True)
    def _unregistered(self) -> None: ...
    @_machine.state()
    def _registered(self) -> None: ...
    @_machine.state()
    def _closed(self) -> None: ...

    # -- inputs -------------------------------------------------------------------

    @_machine.input()
    def accepted(self, manager: Manager) -> None:
        """The registry accepted the registration."""

    @_machine.input()
    def deadline_passed(self) -> None:
        """The registration deadline passed."""

    @_machine.input()
    def overflowed(self) -> None:
        """Too many bytes before registering."""

    @_machine.input()
    def closed(self, reason: Failure) -> None:
        """The connection closed."""

    # -- outputs ------------------------------------------------------------------

    @_machine.output()
    def _remember(self, manager: Manager) -> None:
        self._cancel_deadline()
        self.manager = manager

    @_machine.output()
    def _drop_for_silence(self) -> None:
        self._deadline = None
        self.log.warn(
            "Dropped a connection from {peer}: it did not register within {timeout} s",
            peer=self.peer,
            timeout=self._registry.registration_timeout,
        )
        self.drop()

    @_machine.output()
    def _drop_for_size(self) -> None:
        self.log.warn(
            "Dropped a connection from {peer}: it sent more than {limit} bytes without registering",
            peer=self.peer,
            limit=MAX_UNREGISTERED_BYTES,
        )
        self.drop()

    @_machine.output()
    def _forget_stranger(self, reason: Failure) -> None:
        self._cancel_deadline()
        self._registry.connection_closed(self, None, reason)

    @_machine.output()
    def _report_manager_gone(self, reason: Failure) -> None:
        self._registry.connection_closed(self, self.manager, reason)

    _unregistered.upon(accepted, enter=_registered, outputs=[_remember])
    _unregistered.upon(deadline_passed, enter=_unregistered, outputs=[_drop_for_silence])
    _unregistered.upon(overflowed, enter=_unregistered, outputs=[_drop_for_size])
    _unregistered.upon(closed, enter=_closed, outputs=[_forget_stranger])
    _registered.upon(deadline_passed, enter=_registered, outputs=[])
    _registered.upon(closed, enter=_closed, outputs=[_report_manager_gone])
    _closed.upon(deadline_passed, enter=_closed, outputs=[])
    _closed.upon(overflowed, enter=_closed, outputs=[])

    # -- I/O ----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = describe_peer(self.transport)
        set_no_delay(self.transport)
        self._deadline = self._registry.clock.callLater(
            self._registry.registration_timeout, self.deadline_passed
        )
        self._registry.connection_made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.closed(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def dataReceived(self, data: bytes) -> None:
        if self.manager is None:
            if self.unregistered_bytes > MAX_UNREGISTERED_BYTES:
                return  # dropped already
            self.unregistered_bytes += len(data)
            if self.unregistered_bytes > MAX_UNREGISTERED_BYTES:
                self.overflowed()
                return
        try:
            super().dataReceived(data)
        except MALFORMED_ERRORS as exc:
            # A box AMP cannot take (an answer to nothing asked, no command,
            # bad framing): the peer does not speak our protocol.
            self._drop_malformed("an unreadable AMP box", exc)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        manager = self.manager
        if manager is not None:
            manager.last_heard = self._registry.clock.seconds()
            # The frequent unanswered commands skip AMP's dispatch (a Deferred
            # and an answer path per box).
            fast = _FAST_COMMANDS.get(box.get(b"_command"))
            if fast is not None:
                command, deliver, what = fast
                try:
                    argument = read_unanswered(command, box, self)
                except (ValueError, KeyError) as exc:
                    self.log.warn(
                        "Dropped {manager}: it sent an unreadable {what} ({error})",
                        manager=manager.describe(),
                        what=what,
                        error=exc,
                    )
                    self.drop()
                    return
                if argument is not None:
                    deliver(self._registry, manager, argument)
                    return
        super().ampBoxReceived(box)

    def locateResponder(self, name: bytes) -> Any:
        if self.manager is None and name != Register.commandName:
            return self._refuse_unregistered
        responder = super().locateResponder(name)
        if responder is None:
            return lambda box: self._refuse_malformed(box, "an unknown command")

        def checked(box: amp.AmpBox) -> Any:
            # AMP's responder parses the arguments before it calls ours, and
            # raises there: a box with a missing or ill-typed argument.
            try:
                return responder(box)
            except MALFORMED_ERRORS as exc:
                what = name.decode("ascii", "replace")[:40]
                return self._refuse_malformed(box, f"a malformed {what}", exc)

        return checked

    def _refuse_malformed(
        self, box: amp.AmpBox, what: str, error: Optional[BaseException] = None
    ) -> Deferred[Any]:
        """Drop a peer that sent ``what``: one warning, no traceback; answered
        (if it asked) with a fatal error, which closes the connection."""
        self._drop_malformed(what, error, quietly_if_asked=b"_ask" in box)
        if b"_ask" not in box:
            return succeed(amp.AmpBox())
        return fail(amp.RemoteAmpError(b"MALFORMED", what, fatal=True))

    def _drop_malformed(
        self, what: str, error: Optional[BaseException] = None, quietly_if_asked: bool = False
    ) -> None:
        who = self.manager.describe() if self.manager is not None else self.peer
        detail = f" ({type(error).__name__}: {str(error)[:120]})" if error is not None else ""
        self.log.warn(
            "Dropped {who}: it sent {what}{detail}",
            who=who if self.manager is not None else f"a connection from {who}",
            what=what,
            detail=detail,
        )
        if not quietly_if_asked:
            self.drop()

    def _refuse_unregistered(self, box: amp.AmpBox) -> Deferred[Any]:
        command = box.get(b"_command", b"?").decode("ascii", "replace")
        self.log.warn(
            "Dropped a connection from {peer}: it sent {command} before registering",
            peer=self.peer,
            command=command,
        )
        if b"_ask" not in box:
            self.drop()
            return succeed(amp.AmpBox())
        # A fatal error is answered, then the connection is closed.
        return fail(amp.RemoteAmpError(b"NOT_REGISTERED", "register first", fatal=True))

    def drop(self) -> None:
        """Close the connection at once, without waiting for buffers to drain."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    @Register.responder
    def register(self, **details: Any) -> Dict[str, Any]:
        """Register: checked and recorded by the registry."""
        return self._registry.register(self, details)

    @SendResults.responder
    def send_results(self, results: List[bytes]) -> Dict[str, Any]:
        """Results sent with callRemote (the fast path in ampBoxReceived takes most)."""
        if self.manager is not None:
            self._registry.results_received(self.manager, results)
        return {}

    @Heartbeat.responder
    def heartbeat(self) -> Dict[str, Any]:
        """Nothing to do: receiving any box counts as a sign of life."""
        return {}

    @TasksStarted.responder
    def tasks_started(self, started: List[Tuple[str, int]]) -> Dict[str, Any]:
        """Workers of the manager started these tasks."""
        if self.manager is not None:
            self._registry.tasks_started(self.manager, started)
        return {}

    @WarmContainers.responder
    def warm_containers(self, warm: Dict[str, int], cold_starts: int) -> Dict[str, Any]:
        """The manager's warm workers per container type and its cold starts (soft routing)."""
        if self.manager is not None:
            self._registry.warm_containers(self.manager, warm, cold_starts)
        return {}

    @Quitting.responder
    def quitting(self, reason: str) -> Dict[str, Any]:
        """The manager is about to exit."""
        if self.manager is not None:
            self.manager.quit_announced(reason)
        return {}


class ManagerConnectionFactory(Factory):
    """Builds a :class:`ManagerConnection` per accepted connection."""

    noisy = False

    def __init__(self, registry: ManagerRegistry) -> None:
        self._registry = registry

    def buildProtocol(self, addr: Any) -> ManagerConnection:
        return ManagerConnection(self._registry)


def _results(registry: ManagerRegistry, manager: Any, results: Any) -> None:
    registry.results_received(manager, results)


def _started(registry: ManagerRegistry, manager: Any, started: Any) -> None:
    registry.tasks_started(manager, started)


#: Unanswered commands read without AMP's dispatch: the command, what gives
#: the registry ``(manager, its argument)``, and what it is (for the warning
#: when a box cannot be read).
_FAST_COMMANDS: Dict[Any, Tuple[Type[amp.Command], Callable[..., None], str]] = {
    SendResults.commandName: (SendResults, _results, "batch of results"),
    TasksStarted.commandName: (TasksStarted, _started, "report of started tasks"),
}

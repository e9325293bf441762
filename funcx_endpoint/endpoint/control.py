"""The daemon's local control socket, and the client the CLI uses.

One JSON object per line each way.  The socket is a UNIX socket, 0600 in a
0700 directory, so only the endpoint's owner can ask.  Commands:

``{"command": "status"}``
    -> ``{"ok": true, "status": {...}}``: uptime, pid, broker connection,
    managers, workers, tasks in flight.

``{"command": "tasks", "args": {"finished": N}}``
    -> ``{"ok": true, "tasks": {...}}``: the tasks held and the last N
    finished (:class:`~funcx_endpoint.executor.listing.TaskListing`).

A request's ``args`` (an object, optional) are the command's keyword arguments.

Anything else gets ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Awaitable, Callable, Dict, Optional, Union

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IReactorUNIX
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

StatusSource = Callable[..., Union[Dict[str, Any], Awaitable[Dict[str, Any]]]]

MAX_REQUEST = 64 * 1024


class ControlProtocol(LineOnlyReceiver):
    """Answers one JSON request per line."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST
    log = Logger()

    def __init__(self, commands: Dict[str, StatusSource]) -> None:
        self._commands = commands

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            command = request["command"]
            handler = self._commands[command]
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise TypeError("args must be an object")
        except (ValueError, TypeError, KeyError, AttributeError):
            self._reply(
                {
                    "ok": False,
                    "error": f"bad request; send one JSON object per line with "
                    f"'command' one of {sorted(self._commands)} (and 'args', an object)",
                }
            )
            return

        def answer(result: Dict[str, Any]) -> None:
            self._reply({"ok": True, command: result})

        def failed(failure: Any) -> None:
            self.log.failure("Control command {command} failed", failure, command=command)
            self._reply({"ok": False, "error": f"{command} failed: {failure.getErrorMessage()}"})

        # maybeDeferred also turns a coroutine into a Deferred.
        maybeDeferred(handler, **args).addCallbacks(answer, failed)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._reply({"ok": False, "error": "request too long"})
        if self.transport is not None:
            self.transport.loseConnection()

    def _reply(self, message: Dict[str, Any]) -> None:
        if self.transport is not None and self.connected:
            self.sendLine(json.dumps(message, default=str).encode())


class ControlFactory(Factory):
    noisy = False

    def __init__(self, commands: Dict[str, StatusSource]) -> None:
        self.commands = commands

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        p = ControlProtocol(self.commands)
        p.factory = self
        return p


def control_service(
    reactor: IReactorUNIX, path: str, commands: Dict[str, StatusSource]
) -> StreamServerEndpointService:
    """A service listening on the UNIX socket ``path`` (mode 0600).

    A stale socket left by a killed daemon is replaced (``wantPID`` keeps a
    lock file next to it).
    """
    endpoint = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)
    service = StreamServerEndpointService(endpoint, ControlFactory(commands))
    service.setName("control")
    return service


class ControlError(Exception):
    """The daemon could not be asked (not running, or no answer)."""


def ask(
    path: str, command: str, timeout: float = 10.0, args: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """Blocking client for the CLI: send ``command`` (with ``args``), return its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise ControlError(f"cannot reach the daemon at {path}: {e.strerror}") from None
        request: Dict[str, Any] = {"command": command}
        if args:
            request["args"] = args
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                raise ControlError(f"the daemon did not answer within {timeout:g} s") from None
            if not chunk:
                raise ControlError("the daemon closed the control connection")
            data += chunk
    finally:
        sock.close()
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    result = reply[command]
    assert isinstance(result, dict)
    return result

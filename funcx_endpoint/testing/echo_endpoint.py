"""A process running only the endpoint's transport with the echo interchange.

For fault tests that kill an endpoint with ``kill -9``::

    python -m funcx_endpoint.testing.echo_endpoint BROKER_INFO_JSON SPOOL_DIR [CA_FILE [DELAY]]

``BROKER_INFO_JSON`` is a registration answer.  Prints ``ready`` once both
connections are set up, and runs until killed (TERM stops it cleanly).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, List

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.internet.threads import deferToThread

from funcx_endpoint.amqp.spool import ResultSpool
from funcx_endpoint.endpoint.transport import BrokerInfo, build_transport
from funcx_endpoint.testing.interchanges import EchoInterchange


async def main(reactor: Any, argv: List[str]) -> None:
    log_file = os.environ.get("FUNCX_ECHO_ENDPOINT_LOG")
    if log_file:
        from twisted.logger import globalLogBeginner, textFileLogObserver

        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(open(log_file, "a"))], redirectStandardIO=False
        )

    with open(argv[0]) as f:
        info = BrokerInfo.from_registration(json.load(f))
    delay = float(argv[3]) if len(argv) > 3 else 0.0
    transport, _ = build_transport(
        reactor,
        lambda: info,
        ResultSpool(argv[1], deferToThread),
        lambda results: EchoInterchange(reactor, results, delay=delay),
        ca_file=argv[2] if len(argv) > 2 else None,
        heartbeat=10,
    )
    transport.startService()
    await transport.when_ready()
    print("ready", flush=True)
    if log_file:
        from twisted.internet.task import LoopingCall

        LoopingCall(
            lambda: transport.log.info(
                "{counts} {fields} acks={acks}",
                counts=transport.counts,
                fields=transport.status_fields(),
                acks=transport.ledger.unacked,
            )
        ).start(1.0)

    stopped: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: transport.stopService())
    await stopped


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1:])))

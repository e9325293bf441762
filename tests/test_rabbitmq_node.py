"""Integration test of funcx_endpoint.rabbitmq: a real node, supervised on the real reactor.

One node: it starts and is usable (AMQP login, AMQPS verified against the
given CA, the management API), survives ``kill -9`` of its Erlang VM (the
service starts it again, with the same name, ports and credentials, and it
is usable again), and a stop leaves no process of it behind.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import time
import urllib.request
from typing import Any

import pika
import psutil
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from funcx_endpoint import tls
from funcx_endpoint.rabbitmq.node import MARKER_ENV, NodeDirectory, NodeIdentity
from funcx_endpoint.rabbitmq.processes import node_processes
from funcx_endpoint.rabbitmq.service import NodeState, RabbitMQNodeService


def roundtrip(url: str, ca_file: str | None = None) -> bytes | None:
    """Log in, publish a persistent message to a durable queue, get it back."""
    params = pika.URLParameters(url)
    if ca_file is not None:
        params.ssl_options = pika.SSLOptions(
            ssl.create_default_context(cafile=ca_file), "localhost"
        )
    params.connection_attempts = 1
    params.socket_timeout = 10
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare("supervised-q", durable=True)
        channel.basic_publish("", "supervised-q", b"hello", pika.BasicProperties(delivery_mode=2))
        for _ in range(50):
            _method, _props, body = channel.basic_get("supervised-q", auto_ack=True)
            if body is not None:
                return body
            time.sleep(0.05)
        return None
    finally:
        connection.close()


def overview(identity: NodeIdentity) -> Any:
    request = urllib.request.Request(identity.management_url() + "api/overview")
    credentials = f"{identity.admin_user}:{identity.admin_password}".encode()
    request.add_header("Authorization", "Basic " + base64.b64encode(credentials).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


class SupervisedNodeTests(TestCase):
    timeout = 240

    async def test_start_kill_restart_stop(self) -> None:
        base_dir = os.path.abspath(self.mktemp())
        tls_files = await deferToThread(
            tls.ensure_ca_and_server_cert, os.path.join(base_dir, "tls"), ["localhost"]
        )
        service = RabbitMQNodeService(
            NodeDirectory(base_dir), tls_files, reactor=reactor, retry_policy=lambda n: 0.5
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())

        started = time.monotonic()
        await service.when_ready()
        boot = time.monotonic() - started
        self.assertLess(boot, 60)
        identity = service.identity
        self.assertEqual(await deferToThread(roundtrip, identity.amqp_url()), b"hello")
        self.assertEqual(
            await deferToThread(roundtrip, identity.amqps_url(), tls_files.ca_cert), b"hello"
        )
        self.assertEqual((await deferToThread(overview, identity))["node"], identity.name)

        # The process started is the Erlang VM itself; it and its helpers carry
        # the marker.
        beam = service.server_pid
        assert beam is not None
        self.assertEqual(psutil.Process(beam).name(), "beam.smp")
        processes = await deferToThread(node_processes, identity.name)
        self.assertTrue({"beam.smp", "epmd"} <= {p.name() for p in processes})
        for process in processes:
            self.assertEqual(process.environ()[MARKER_ENV], identity.name)
        epmd_pid = service.status().epmd_pid

        os.kill(beam, signal.SIGKILL)
        while service.state is NodeState.RUNNING:
            await deferLater(reactor, 0.05)
        self.assertIn(service.state, (NodeState.RESTARTING, NodeState.STARTING))
        await service.when_ready()
        status = service.status()
        self.assertEqual(status.restarts, 1)
        self.assertEqual(status.last_exit, "died (killed by signal 9)")
        self.assertNotIn(status.server_pid, (None, beam))
        self.assertEqual(status.epmd_pid, epmd_pid)
        self.assertEqual(service.identity, identity)
        self.assertEqual(await deferToThread(roundtrip, identity.amqp_url()), b"hello")
        self.assertEqual((await deferToThread(overview, identity))["node"], identity.name)

        await service.stopService()
        self.assertIs(service.state, NodeState.STOPPED)
        self.assertEqual(await deferToThread(node_processes, identity.name), [])
        self.assertFalse(psutil.pid_exists(beam) and psutil.Process(beam).status() != "zombie")

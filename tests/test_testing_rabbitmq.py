"""Integration tests for funcx_endpoint.testing.rabbitmq: a real RabbitMQ node.

Tests that only use the broker share the process-wide node (one boot for all of
them); tests that stop, restart or kill a node run one of their own.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pika
import pika.exceptions
import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

import funcx_endpoint
from funcx_endpoint import tls
from funcx_endpoint.testing import rabbitmq
from funcx_endpoint.testing.rabbitmq import (
    MARKER_ENV,
    RabbitMQCtlError,
    RabbitMQNode,
    RabbitMQNotInstalled,
    RabbitMQStartError,
    node_processes,
    reap_stale_nodes,
    shared_node,
    shared_node_async,
)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(funcx_endpoint.__file__)))
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
# Method frame on channel 0 carrying Connection.Start (class 10, method 10).
CONNECTION_START = b"\x01\x00\x00"


class AMQPGreeting(Protocol):
    """Sends the AMQP 0-9-1 protocol header, reads the server's first frame header,
    closes; ``received`` fires with those bytes once the connection is closed, or
    fails with the reason the connection was lost."""

    def __init__(self) -> None:
        self.received: Deferred[bytes] = Deferred()
        self.buffer = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(AMQP_HEADER)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= 11:
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if len(self.buffer) >= 11:
            self.received.callback(self.buffer)
        else:
            self.received.errback(reason)


async def amqps_greeting(port: int, hostname: str, ca_pem: bytes) -> bytes:
    """Open a TLS connection to 127.0.0.1:port verifying the certificate for
    ``hostname`` against ``ca_pem``; return the broker's first AMQP bytes."""
    options = optionsForClientTLS(hostname, trustRoot=Certificate.loadPEM(ca_pem))
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10))
    protocol = AMQPGreeting()
    await connectProtocol(endpoint, protocol)
    return await protocol.received


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def blocking_connection(
    url: str, ca_path: str | None = None, name: str | None = None
) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    if name is not None:
        params.client_properties = {"connection_name": name}
    if ca_path is not None:
        context = ssl.create_default_context(cafile=ca_path)
        params.ssl_options = pika.SSLOptions(context, "localhost")
    params.connection_attempts = 1
    params.socket_timeout = 10
    return pika.BlockingConnection(params)


def management_get(node: RabbitMQNode, path: str, password: str | None = None) -> Any:
    request = urllib.request.Request(node.management_url + path.lstrip("/"))
    credentials = f"{node.admin_user}:{password or node.admin_password}".encode()
    request.add_header("Authorization", "Basic " + base64.b64encode(credentials).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def listening_addresses(node: RabbitMQNode) -> set[tuple[str, int]]:
    addresses = set()
    for proc in node.processes():
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                addresses.add((conn.laddr.ip, conn.laddr.port))
    return addresses


class SharedNodeTests(TestCase):
    """Behaviour of a running node, checked on the shared node."""

    timeout = 180

    async def node(self) -> RabbitMQNode:
        return await shared_node_async(reactor)

    async def test_shared(self) -> None:
        """shared_node returns the same running node every time."""
        node = await self.node()
        self.assertIs(shared_node(), node)
        self.assertTrue(node.running)

    async def test_plain_amqp(self) -> None:
        """A client logs in over plain AMQP with the admin URL, publishes and gets."""
        node = await self.node()

        def roundtrip() -> bytes:
            connection = blocking_connection(node.amqp_url)
            try:
                channel = connection.channel()
                queue = channel.queue_declare("", exclusive=True).method.queue
                channel.basic_publish("", queue, b"hello")
                for _ in range(50):
                    _method, _props, body = channel.basic_get(queue, auto_ack=True)
                    if body is not None:
                        return body
                    time.sleep(0.05)
                raise AssertionError("message not delivered")
            finally:
                connection.close()

        self.assertEqual(await deferToThread(roundtrip), b"hello")

    async def test_amqps_verified(self) -> None:
        """A TLS connection verifying the generated CA and the name 'localhost'
        succeeds, and the broker answers the AMQP header with Connection.Start."""
        node = await self.node()
        greeting = await amqps_greeting(node.amqps_port, "localhost", read(node.ca_cert_path))
        self.assertEqual(greeting[:3], CONNECTION_START)
        self.assertEqual(greeting[7:11], b"\x00\x0a\x00\x0a")

    async def test_amqps_login(self) -> None:
        """pika logs in with amqps_url, verifying the certificate."""
        node = await self.node()

        def login() -> bool:
            connection = blocking_connection(node.amqps_url, node.ca_cert_path)
            is_open = connection.is_open
            connection.close()
            return is_open

        self.assertTrue(await deferToThread(login))

    async def test_amqps_wrong_hostname(self) -> None:
        """Verifying the certificate for another host name fails the connection."""
        node = await self.node()
        with self.assertRaises(Exception) as caught:
            await amqps_greeting(node.amqps_port, "wrong.example", read(node.ca_cert_path))
        self.assertIn("wrong.example", str(caught.exception))

    async def test_amqps_untrusted_ca(self) -> None:
        """A client trusting another CA refuses the broker's certificate."""
        node = await self.node()
        other_ca = tls.make_ca("Some other CA")
        with self.assertRaises(Exception) as caught:
            await amqps_greeting(node.amqps_port, "localhost", other_ca.cert_pem)
        self.assertIn("certificate verify failed", str(caught.exception))

    async def test_management_api(self) -> None:
        """GET /api/overview with the admin's basic auth answers for this node;
        a wrong password gets 401."""
        node = await self.node()
        overview = await deferToThread(management_get, node, "/api/overview")
        self.assertEqual(overview["node"], node.name)
        self.assertTrue(overview["rabbitmq_version"].startswith("3."))
        with self.assertRaises(urllib.error.HTTPError) as caught:
            await deferToThread(management_get, node, "/api/overview", "wrong")
        self.assertEqual(caught.exception.code, 401)

    async def test_admin_user(self) -> None:
        """The admin user has the administrator tag and full permissions on /."""
        node = await self.node()
        users = await node.rabbitmqctl_async(
            reactor, "list_users", "--quiet", "--formatter", "json"
        )
        tags = {u["user"]: u["tags"] for u in json.loads(users)}
        self.assertEqual(tags[node.admin_user], ["administrator"])
        perms = await node.rabbitmqctl_async(
            reactor, "list_permissions", "--quiet", "--formatter", "json", "-p", "/"
        )
        entry = {p["user"]: p for p in json.loads(perms)}[node.admin_user]
        self.assertEqual((entry["configure"], entry["write"], entry["read"]), (".*", ".*", ".*"))

    async def test_urls_and_ports(self) -> None:
        """URLs use host localhost and the node's ports; every listener of the node
        (AMQP, AMQPS, management, Erlang distribution, epmd) is on 127.0.0.1 only."""
        node = await self.node()
        self.assertEqual(
            node.amqps_url,
            f"amqps://{node.admin_user}:{node.admin_password}@localhost:{node.amqps_port}/%2F",
        )
        self.assertTrue(node.amqp_url.endswith(f"@localhost:{node.amqp_port}/%2F"))
        self.assertEqual(node.management_url, f"http://localhost:{node.management_port}/")
        ports = node.ports
        self.assertEqual(
            len({ports.amqp, ports.amqps, ports.management, ports.dist, ports.epmd}), 5
        )
        addresses = await deferToThread(listening_addresses, node)
        for port in (ports.amqp, ports.amqps, ports.management, ports.dist, ports.epmd):
            self.assertIn(("127.0.0.1", port), addresses)
        # epmd always adds the IPv6 loopback; nothing listens on a wildcard address.
        self.assertEqual({ip for ip, _port in addresses} - {"127.0.0.1", "::1"}, set())

    async def test_processes_marked(self) -> None:
        """The node's processes (beam.smp, epmd, helpers) carry the marker."""
        node = await self.node()
        procs = await deferToThread(node.processes)
        names = {p.name() for p in procs}
        self.assertTrue({"beam.smp", "epmd", "erl_child_setup"} <= names, names)
        for proc in procs:
            self.assertEqual(proc.environ()[MARKER_ENV], node.name)
        self.assertIn(node.beam_pid, [p.pid for p in procs])

    async def test_close_all_connections(self) -> None:
        """close_all_connections really closes a connected client."""
        node = await self.node()
        connection = await deferToThread(blocking_connection, node.amqp_url)
        self.addCleanup(deferToThread, lambda: connection.is_open and connection.close())
        await node.close_all_connections_async(reactor, "test says bye")

        def wait_closed() -> pika.exceptions.ConnectionClosedByBroker | None:
            try:
                for _ in range(100):
                    connection.process_data_events(time_limit=0.1)
            except pika.exceptions.ConnectionClosedByBroker as e:
                return e
            return None

        closed = await deferToThread(wait_closed)
        assert isinstance(closed, pika.exceptions.ConnectionClosedByBroker), closed
        self.assertEqual(closed.reply_code, 320)
        self.assertIn("test says bye", closed.reply_text)

    async def test_close_connection(self) -> None:
        """close_connection closes the named connection and no other."""
        node = await self.node()
        # Other clients of the shared node may come and go meanwhile: find ours
        # by the name it gives itself.
        label = f"close-connection-test-{os.getpid()}-{id(self)}"
        first = await deferToThread(blocking_connection, node.amqp_url, None, label)
        self.addCleanup(deferToThread, lambda: first.is_open and first.close())
        connections = await deferToThread(node.list_connections, ("name", "client_properties"))

        def named(connection: dict) -> bool:
            properties = connection.get("client_properties") or []
            return ["connection_name", "longstr", label] in properties

        [target] = [c for c in connections if named(c)]

        second = await deferToThread(blocking_connection, node.amqp_url)

        self.addCleanup(deferToThread, lambda: second.is_open and second.close())
        await node.close_connection_async(reactor, target["name"], "only you")

        def poll(connection: pika.BlockingConnection) -> bool:
            try:
                for _ in range(30):
                    connection.process_data_events(time_limit=0.1)
            except pika.exceptions.ConnectionClosedByBroker:
                return False
            return True

        self.assertFalse(await deferToThread(poll, first))
        self.assertTrue(await deferToThread(poll, second))

    async def test_rabbitmqctl_error(self) -> None:
        """A failing rabbitmqctl command raises RabbitMQCtlError with its output."""
        node = await self.node()
        with self.assertRaises(RabbitMQCtlError) as caught:
            await node.rabbitmqctl_async(reactor, "delete_queue", "no-such-queue-here")
        self.assertNotEqual(caught.exception.returncode, 0)
        self.assertIn("no-such-queue-here", str(caught.exception))


class DedicatedNodeTests(TestCase):
    """Stop, start and restart, each on a node of its own."""

    timeout = 180

    async def own_node(self, base_dir: str | None = None) -> RabbitMQNode:
        node = RabbitMQNode(base_dir)
        self.addCleanup(node.destroy_async, reactor, False)
        await node.start_async(reactor)
        return node

    async def test_restart_keeps_durable_data_and_ports(self) -> None:
        """Persistent messages in a durable queue survive restart() and a crash
        (stop(graceful=False)); ports, name and credentials stay the same, also for
        a new RabbitMQNode on the same base_dir, which resumes the node."""
        base_dir = os.path.abspath(self.mktemp())
        node = await self.own_node(base_dir)
        identity = lambda n: (  # noqa: E731
            n.name,
            n.ports,
            n.amqp_url,
            n.amqps_url,
            n.management_url,
            n.admin_password,
        )
        before = identity(node)

        def publish(url: str) -> None:
            connection = blocking_connection(url)
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare("durable-q", durable=True)
            for body in (b"one", b"two"):
                channel.basic_publish("", "durable-q", body, pika.BasicProperties(delivery_mode=2))
            connection.close()

        def get(url: str) -> bytes | None:
            connection = blocking_connection(url)
            channel = connection.channel()
            _method, _props, body = channel.basic_get("durable-q", auto_ack=True)
            connection.close()
            return body

        await deferToThread(publish, node.amqp_url)
        await node.restart_async(reactor)
        self.assertEqual(identity(node), before)
        self.assertEqual(await deferToThread(get, node.amqp_url), b"one")
        greeting = await amqps_greeting(node.amqps_port, "localhost", read(node.ca_cert_path))
        self.assertEqual(greeting[:3], CONNECTION_START)

        # A second node object cannot take a base_dir in use...
        other = RabbitMQNode(base_dir)
        with self.assertRaises(rabbitmq.RabbitMQError) as caught:
            await other.start_async(reactor)
        self.assertIn("in use", str(caught.exception))

        # ...but resumes it once the first is gone, here after a crash.
        await node.stop_async(reactor, graceful=False)
        resumed = await self.own_node(base_dir)
        self.assertEqual(identity(resumed), before)

        def drain(url: str) -> list[bytes]:
            bodies = []
            while (body := get(url)) is not None:
                bodies.append(body)
            return bodies

        # After a crash the broker may deliver "one" again: its ack was not yet
        # on disk (at-least-once). "two" was never taken and must be there.
        self.assertIn(b"two", await deferToThread(drain, resumed.amqp_url))

    async def test_start_failure(self) -> None:
        """A node that cannot boot raises RabbitMQStartError quoting its log, and
        leaves no process behind."""
        node = RabbitMQNode(extra_config={"no_such_setting.at_all": "1"})
        self.addCleanup(node.destroy_async, reactor)
        with self.assertRaises(RabbitMQStartError) as caught:
            await node.start_async(reactor)
        self.assertIn("no_such_setting", str(caught.exception))
        self.assertFalse(node.running)
        self.assertEqual(await deferToThread(node_processes, node.name), [])
        self.assertFalse(os.path.exists(node._registry_path()))

    async def test_stop_start_destroy(self) -> None:
        """stop() leaves no process of the node (beam.smp, epmd, erl_child_setup,
        inet_gethost), no listener and no registry entry but keeps the data;
        start() brings it back; destroy() removes everything."""
        node = await self.own_node()
        procs = await deferToThread(node.processes)
        self.assertTrue({"beam.smp", "epmd"} <= {p.name() for p in procs})
        registry_entry = node._registry_path()
        self.assertTrue(os.path.exists(registry_entry))

        await node.stop_async(reactor)
        self.assertFalse(node.running)
        for proc in procs:
            self.assertFalse(
                proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE, f"{proc} survived"
            )
        self.assertEqual(await deferToThread(node_processes, node.name), [])
        self.assertFalse(os.path.exists(registry_entry))
        self.assertFalse(rabbitmq._port_accepts(node.amqp_port))
        self.assertTrue(os.path.isdir(node.base_dir))

        await node.start_async(reactor)
        overview = await deferToThread(management_get, node, "/api/overview")
        self.assertEqual(overview["node"], node.name)

        # destroy() stops the node and removes its temporary directory.
        base_dir, name = node.base_dir, node.name
        await node.destroy_async(reactor)
        self.assertFalse(os.path.exists(base_dir))
        self.assertEqual(await deferToThread(node_processes, name), [])


OWNER_SCRIPT = """
import sys, time
from funcx_endpoint.testing.rabbitmq import shared_node
node = shared_node()
print(node.name, node.base_dir, flush=True)
time.sleep(600)
"""


class OwnerDeathTests(TestCase):
    """The node of a process that dies is stopped anyway."""

    timeout = 180

    def run_owner(self) -> tuple[subprocess.Popen[str], str, str]:
        env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
        stderr_path = os.path.abspath(self.mktemp())
        with open(stderr_path, "w") as stderr:
            owner = subprocess.Popen(
                [sys.executable, "-c", OWNER_SCRIPT],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                text=True,
            )
        assert owner.stdout is not None
        line = owner.stdout.readline()
        if not line:
            owner.wait()
            raise AssertionError(
                f"owner process exited with {owner.returncode}:\n{read(stderr_path).decode()}"
            )
        name, base_dir = line.split()
        return owner, name, base_dir

    def wait_node_gone(self, name: str, timeout: float) -> float:
        started = time.monotonic()
        while node_processes(name):
            if time.monotonic() - started > timeout:
                raise AssertionError(f"node {name} still running after {timeout} s")
            time.sleep(0.2)
        return time.monotonic() - started

    async def owner_dies(self, sig: int, within: float) -> None:
        owner, name, base_dir = await deferToThread(self.run_owner)

        def kill_owner() -> None:
            if owner.poll() is None:
                owner.kill()
                owner.wait()

        self.addCleanup(kill_owner)
        self.addCleanup(deferToThread, rabbitmq._kill_node_processes, name)
        self.assertTrue(await deferToThread(node_processes, name))
        owner.send_signal(sig)
        returncode = await deferToThread(owner.wait, 30)
        self.assertEqual(returncode, -sig)
        await deferToThread(self.wait_node_gone, name, within)
        for _ in range(50):
            if not os.path.exists(base_dir):
                break
            await deferToThread(time.sleep, 0.1)
        self.assertFalse(os.path.exists(base_dir))
        registry = os.path.join(rabbitmq._registry_dir(), f"{name}.json")
        self.assertFalse(os.path.exists(registry))

    async def test_sigkill_watchdog(self) -> None:
        """When the owner is SIGKILLed, its watchdog stops the node and removes
        its files."""
        await self.owner_dies(signal.SIGKILL, within=30)

    async def test_sigterm(self) -> None:
        """When the owner gets SIGTERM, the node dies with it at once (the signal
        handler kills it) and the owner still dies of SIGTERM."""
        await self.owner_dies(signal.SIGTERM, within=5)


class ReaperTests(SynchronousTestCase):
    """reap_stale_nodes, with stand-in processes instead of real nodes."""

    def setUp(self) -> None:
        self.registry = self.mktemp()
        os.makedirs(self.registry)

    def fake_node(self, name: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["sleep", "300"], env=dict(os.environ, **{MARKER_ENV: name}), start_new_session=True
        )

        def kill() -> None:
            proc.kill()
            proc.wait()

        self.addCleanup(kill)
        return proc

    def entry(self, name: str, owner: psutil.Process | int, base_dir: str) -> str:
        if isinstance(owner, psutil.Process):
            pid, created = owner.pid, owner.create_time()
        else:
            pid, created = owner, 0.0
        path = os.path.join(self.registry, f"{name}.json")
        data = {
            "name": name,
            "owner_pid": pid,
            "owner_create_time": created,
            "base_dir": base_dir,
            "remove_base_dir": True,
        }
        tls.write_private_file(path, json.dumps(data).encode())
        return path

    def dead_pid(self) -> int:
        proc = subprocess.Popen(["true"])
        proc.wait()
        return proc.pid

    def test_dead_owner_reaped(self) -> None:
        """A node whose owner is dead is killed, its directory and entry removed."""
        name = "funcx-reap-test-dead@localhost"
        fake = self.fake_node(name)
        base_dir = self.mktemp()
        os.makedirs(base_dir)
        path = self.entry(name, self.dead_pid(), base_dir)
        self.assertEqual(reap_stale_nodes(self.registry), [name])
        fake.wait(timeout=5)
        self.assertEqual(fake.returncode, -signal.SIGKILL)
        self.assertFalse(os.path.exists(base_dir))
        self.assertFalse(os.path.exists(path))

    def test_live_owner_kept(self) -> None:
        """A node whose owner is alive is left alone."""
        name = "funcx-reap-test-live@localhost"
        fake = self.fake_node(name)
        base_dir = self.mktemp()
        os.makedirs(base_dir)
        path = self.entry(name, psutil.Process(), base_dir)
        self.assertEqual(reap_stale_nodes(self.registry), [])
        self.assertIsNone(fake.poll())
        self.assertTrue(os.path.exists(base_dir))
        self.assertTrue(os.path.exists(path))

    def test_reused_owner_pid(self) -> None:
        """An owner pid now used by another process (other start time) counts as dead."""
        name = "funcx-reap-test-reused@localhost"
        fake = self.fake_node(name)
        base_dir = self.mktemp()
        path = os.path.join(self.registry, f"{name}.json")
        me = psutil.Process()
        data = {
            "name": name,
            "owner_pid": me.pid,
            "owner_create_time": me.create_time() - 1000,
            "base_dir": base_dir,
        }
        tls.write_private_file(path, json.dumps(data).encode())
        self.assertEqual(reap_stale_nodes(self.registry), [name])
        fake.wait(timeout=5)

    def test_empty_registry(self) -> None:
        self.assertEqual(reap_stale_nodes(os.path.join(self.registry, "missing")), [])


class NotInstalledTests(SynchronousTestCase):
    def test_missing_server(self) -> None:
        """A missing rabbitmq-server gives an error that says how to install it."""
        node = RabbitMQNode(server_path="/nonexistent/rabbitmq-server")
        with self.assertRaises(RabbitMQNotInstalled) as caught:
            node.start()
        self.assertIn("make test", str(caught.exception))
        self.assertIn("apt-get install rabbitmq-server", str(caught.exception))

    def test_env_knob(self) -> None:
        """FUNCX_TEST_RABBITMQ_SERVER names the server program."""
        self.patch(
            os, "environ", dict(os.environ, FUNCX_TEST_RABBITMQ_SERVER="/nope/rabbitmq-server")
        )
        with self.assertRaises(RabbitMQNotInstalled) as caught:
            RabbitMQNode().start()
        self.assertIn("/nope/rabbitmq-server", str(caught.exception))

    def test_not_started(self) -> None:
        """Properties that need a started node say so."""
        node = RabbitMQNode()
        with self.assertRaises(rabbitmq.RabbitMQError):
            getattr(node, "amqp_url")  # noqa: B009
        self.assertFalse(node.running)
        self.assertEqual(node.processes(), [])

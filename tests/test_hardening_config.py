"""Config values that used to pass validation and then hang or exhaust the
machine, CA files that gave tracebacks, and a TLS host-name mismatch that was
retried as "cannot reach the service" (issue 12, "Config")."""

from __future__ import annotations

import os
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from funcx_endpoint.config import (
    Config,
    ConfigError,
    ConfigFileError,
    HighThroughputExecutor,
    LocalProvider,
    load_runnable_config,
)
from funcx_endpoint.config.bounds import MAX_WORKERS_PER_NODE, host_address
from funcx_endpoint.endpoint.auth import http_client
from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.endpoint.registration import Registration
from funcx_endpoint.lifecycle import EX_CONFIG, StartupError
from funcx_endpoint.tls import make_ca, make_server_cert
from tests.support import run_cli


class AMQPShortFieldTests(SynchronousTestCase):
    def test_prefetch_and_heartbeat_fit_in_16_bits(self) -> None:
        for name in ("amqp_prefetch", "amqp_heartbeat"):
            self.assertEqual(getattr(Config(**{name: 65535}), name), 65535)
            for value in (65536, 10**6, 2**64):
                with self.assertRaises(ConfigError) as cm:
                    Config(**{name: value})
                self.assertIn(f"Config.{name}", str(cm.exception))
                self.assertIn("<= 65535", str(cm.exception))


class WorkerCountTests(SynchronousTestCase):
    def test_tiny_cores_per_worker_refused(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            HighThroughputExecutor(cores_per_worker=1e-9)
        self.assertIn("cores_per_worker=1e-09 gives", str(cm.exception))
        self.assertIn(f"more than {MAX_WORKERS_PER_NODE}", str(cm.exception))

    def test_tiny_cores_per_worker_with_a_cap_is_fine(self) -> None:
        executor = HighThroughputExecutor(cores_per_worker=1e-9, max_workers_per_node=8)
        self.assertEqual(executor.max_workers_per_node, 8)

    def test_max_workers_per_node_bounded(self) -> None:
        HighThroughputExecutor(max_workers_per_node=MAX_WORKERS_PER_NODE)
        with self.assertRaises(ConfigError):
            HighThroughputExecutor(max_workers_per_node=MAX_WORKERS_PER_NODE + 1)

    def test_the_manager_never_counts_more(self) -> None:
        from funcx_endpoint.manager.workers_env import count_workers
        from funcx_endpoint.wire.info import ManagerSettings

        settings = ManagerSettings(cores_per_worker=1e-9)
        self.assertEqual(count_workers(settings, cpu_count=4), MAX_WORKERS_PER_NODE)


class LocalProviderBoundsTests(SynchronousTestCase):
    def test_huge_nodes_per_block_refused(self) -> None:
        LocalProvider(nodes_per_block=64)
        for value in (65, 10**6):
            with self.assertRaises(ConfigError) as cm:
                LocalProvider(nodes_per_block=value)
            self.assertIn("LocalProvider.nodes_per_block: at most 64", str(cm.exception))

    def test_managers_in_all_blocks_bounded(self) -> None:
        LocalProvider(nodes_per_block=4, max_blocks=64)
        with self.assertRaises(ConfigError) as cm:
            LocalProvider(nodes_per_block=4, max_blocks=65)
        self.assertIn("260 managers", str(cm.exception))


class AddressTests(SynchronousTestCase):
    def test_good(self) -> None:
        for value in (
            "127.0.0.1",
            "10.1.2.3",
            "::1",
            "fe80::1",
            "localhost",
            "node-1.cluster",
            "login_2.example.org",
            "0.0.0.0",
            "example.org.",
        ):
            self.assertEqual(host_address(value), value)
            HighThroughputExecutor(address=value)

    def test_bad(self) -> None:
        for value in (
            "999.1.1.1",
            "1.2.3",
            "256.0.0.1",
            "",
            " ",
            "a..b",
            "-x.org",
            "x y",
            "a/b",
            "1.2.3.4:80",
            "\x00",
            "é.org",
            "x" * 64,
        ):
            with self.assertRaises(ConfigError, msg=repr(value)) as cm:
                HighThroughputExecutor(address=value)
            self.assertIn("expected an IP address or host name", str(cm.exception))


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _config_file(directory: str, **files: str) -> str:
    lines = [f"    {name}={path!r}," for name, path in files.items()]
    text = (
        "from funcx_endpoint.config import Config\n"
        "config = Config(\n"
        "    funcx_service_address='https://localhost:1/v2',\n" + "\n".join(lines) + "\n)\n"
    )
    return _write(os.path.join(directory, "config.py"), text.encode())


class CAFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="funcx-cafile-")
        self.good = _write(os.path.join(self.dir, "ca.pem"), make_ca("test").cert_pem)

    def test_good_file(self) -> None:
        path = _config_file(self.dir, service_ca_file=self.good, amqp_ca_file=self.good)
        self.assertEqual(load_runnable_config(path).service_ca_file, self.good)

    def test_bad_files(self) -> None:
        missing = os.path.join(self.dir, "missing.pem")
        text = _write(os.path.join(self.dir, "text.pem"), b"not a certificate\n")
        broken = _write(
            os.path.join(self.dir, "broken.pem"),
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        for name in ("service_ca_file", "amqp_ca_file"):
            for bad, reason in ((missing, "cannot read"), (text, "no PEM"), (broken, "no valid")):
                path = _config_file(self.dir, **{name: bad})
                with self.assertRaises(ConfigFileError) as cm:
                    load_runnable_config(path)
                self.assertIn(f"{name}: ", str(cm.exception))
                self.assertIn(reason, str(cm.exception))

    def test_start_exits_78_in_one_line(self) -> None:
        config_dir = tempfile.mkdtemp(prefix="funcx-cafile-cli-")
        result = run_cli(
            config_dir, "configure", "ep", "--service-address", "https://localhost:1/v2"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        ep = EndpointDir(config_dir, "ep")
        _config_file(ep.path, amqp_ca_file=os.path.join(self.dir, "nope.pem"))
        result = run_cli(config_dir, "start", "ep")
        self.assertEqual(result.returncode, EX_CONFIG, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("amqp_ca_file: cannot read", result.stderr)


class _Token:
    async def token(self, force_new: bool = False) -> str:
        return "token"


class HostNameMismatchTests(TestCase):
    """A service whose certificate is for another host: exit 78 at once."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="funcx-mismatch-")
        ca = make_ca("mismatch CA")
        cert, key = make_server_cert(ca, ["other.example"], [])
        self.ca_file = _write(os.path.join(directory, "ca.pem"), ca.cert_pem)
        options = PrivateCertificate.loadPEM(cert + key).options()
        self.port = reactor.listenSSL(0, Site(Resource()), options, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.ep = EndpointDir(directory, "ep")
        os.makedirs(self.ep.path)

    async def _register(self) -> StartupError:
        http, pool = http_client(reactor, self.ca_file)
        self.addCleanup(pool.closeCachedConnections)
        config = Config(
            funcx_service_address=f"https://127.0.0.1:{self.port.getHost().port}/v2",
            service_ca_file=self.ca_file,
        )
        # Retries would wait on this clock forever: the answer must come without.
        registration = Registration(Clock(), self.ep, config, http, _Token())
        try:
            await registration.register()
        except StartupError as e:
            return e
        raise AssertionError("registration succeeded")

    def test_exit_78_with_the_reason(self) -> Deferred[None]:
        async def check() -> None:
            error = await self._register()
            self.assertEqual(error.exit_code, EX_CONFIG, error.message)
            self.assertIn("is not for that host name", error.message)
            self.assertIn("127.0.0.1", error.message)
            self.assertNotIn("cannot reach", error.message)

        return Deferred.fromCoroutine(check())

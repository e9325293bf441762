"""Small pieces of the web service, without processes: settings, parsing, permissions."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from typing import Any, List, Tuple

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.webservice.api_checks import (
    allowed_functions_of,
    canonical_uuid,
    positive_number,
)
from funcx_endpoint.webservice.api_context import BrokerAddress
from funcx_endpoint.webservice.db import DatabaseConfig, DatabaseError, redact_url
from funcx_endpoint.webservice.http import APIError, Router, parse_json
from funcx_endpoint.webservice.ingest import ResultIngest
from funcx_endpoint.webservice.management import endpoint_permissions, user_permissions
from funcx_endpoint.webservice.records import StoredOutcome
from funcx_endpoint.webservice.settings import MIB, ServiceSettings, client_env_lines
from funcx_endpoint.webservice.tap import Options
from funcx_endpoint.wire import Result, pack
from tests.support import child_env


class SettingsTests(SynchronousTestCase):
    def test_defaults_save_and_load(self) -> None:
        state = os.path.abspath(self.mktemp())
        settings = ServiceSettings.load(state)
        self.assertEqual(
            (settings.port, settings.interface, settings.public_host), (0, "127.0.0.1", "localhost")
        )
        self.assertEqual(settings.max_request_size, 10 * MIB)
        self.assertTrue(settings.embedded_broker)
        self.assertEqual(settings.effective_database_url, f"sqlite://{state}/funcx-service.sqlite3")
        settings.port = 8443
        settings.save()
        self.assertEqual(os.stat(settings.settings_file).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(state).st_mode & 0o777, 0o700)
        again = ServiceSettings.load(state, {"public_host": "example.org", "port": None})
        self.assertEqual((again.port, again.public_host), (8443, "example.org"))

    def test_inconsistent_settings(self) -> None:
        state = os.path.abspath(self.mktemp())
        for overrides in (
            {"tls_cert": "/x"},
            {"management_url": "http://h/"},
            {"amqp_url": "http://nope"},
            {"database_url": "mysql://x"},
        ):
            self.assertRaises(ValueError, ServiceSettings.load, state, overrides)
        os.makedirs(state)
        with open(os.path.join(state, "service.json"), "w") as f:
            f.write("{broken")
        error = self.assertRaises(ValueError, ServiceSettings.load, state)
        self.assertIn("service.json", str(error))

    def test_twistd_options(self) -> None:
        state = os.path.abspath(self.mktemp())
        options = Options()
        options.parseOptions(
            ["--state-dir", state, "--port", "0", "--max-request-size", "2M", "--insecure-http"]
        )
        self.assertEqual(options.settings.max_request_size, 2 * MIB)
        self.assertTrue(options.settings.insecure_http)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--port", "70000"])
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--max-request-size", "-1"])

    def test_secret_urls_from_the_environment(self) -> None:
        state = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "FUNCX_SERVICE_AMQP_URL": "amqps://a:b@h:1/v"})
        options = Options()
        options.parseOptions(["--state-dir", state])
        self.assertEqual(options.settings.amqp_url, "amqps://a:b@h:1/v")
        self.assertFalse(options.settings.embedded_broker)

    def test_client_env_lines(self) -> None:
        lines = client_env_lines(
            {"base_url": "https://h:1/v2", "auth_url": "https://h:1/", "ca_file": "/ca.pem",
             "broker_ca_file": "/b.pem"}
        )  # fmt: skip
        self.assertIn("export GLOBUS_SDK_VERIFY_SSL=/ca.pem", lines)
        self.assertIn("export FUNCX_SERVICE_CA_FILE=/ca.pem", lines)
        self.assertIn("export SSL_CERT_FILE=/b.pem", lines)
        self.assertIn("export GLOBUS_SDK_SERVICE_URL_AUTH=https://h:1/", lines)


class ParsingTests(SynchronousTestCase):
    def test_database_urls(self) -> None:
        self.assertEqual(DatabaseConfig.from_url("sqlite:///tmp/x.db").path, "/tmp/x.db")
        self.assertEqual(DatabaseConfig.from_url("postgresql://u:p@h/db").kind, "postgresql")
        self.assertRaises(DatabaseError, DatabaseConfig.from_url, "sqlite://host/x")
        self.assertRaises(DatabaseError, DatabaseConfig.from_url, "oracle://x")
        self.assertEqual(redact_url("postgresql://u:secret@h:5/db"), "postgresql://u:***@h:5/db")
        self.assertNotIn("secret", DatabaseConfig.from_url("postgres://u:secret@h/d").describe())

    def test_uuids(self) -> None:
        value = str(uuid.uuid4())
        self.assertEqual(canonical_uuid(value.upper(), "x"), value)
        for bad in ("x", 7, None, value + "0", "{" * 70):
            error = self.assertRaises(APIError, canonical_uuid, bad, "the id")
            self.assertEqual((error.status, error.code), (400, "INVALID_UUID"))

    def test_allowed_functions(self) -> None:
        a, b = str(uuid.uuid4()), str(uuid.uuid4())
        self.assertIsNone(allowed_functions_of({}))
        self.assertIsNone(allowed_functions_of({"config": {"allowed_functions": "None"}}))
        self.assertEqual(allowed_functions_of({"allowed_functions": [a, b]}), [a, b])
        self.assertEqual(allowed_functions_of({"config": {"allowed_functions": f"['{a}']"}}), [a])
        self.assertEqual(allowed_functions_of({"allowed_functions": []}), [])
        error = self.assertRaises(APIError, allowed_functions_of, {"allowed_functions": 3})
        self.assertEqual(error.status, 422)

    def test_allowed_functions_strings_are_read_cheaply(self) -> None:
        ids = [str(uuid.uuid4()) for _ in range(5000)]
        self.assertEqual(allowed_functions_of({"allowed_functions": repr(ids)}), ids)
        self.assertEqual(allowed_functions_of({"allowed_functions": repr(tuple(ids[:2]))}), ids[:2])
        self.assertEqual(allowed_functions_of({"allowed_functions": json.dumps(ids[:1])}), ids[:1])
        for text in ("-" * 100_000 + "1", "1+" * 100_000 + "1", "[" * 5000 + "]" * 5000):
            error = self.assertRaises(APIError, allowed_functions_of, {"allowed_functions": text})
            self.assertEqual(error.status, 422)
        # Short texts that exhaust the parser are refused too, not a 500.
        for text in ("-" * 4000 + "1", "(" * 4000, "[" * 300):
            try:
                allowed_functions_of({"allowed_functions": text})
            except APIError as e:
                self.assertEqual(e.status, 422)

    def test_numbers(self) -> None:
        for value in (10**400, "1e400", "inf", "-inf", "nan", float("nan"), True, 0, -1, "x", None):
            self.assertIsNone(positive_number(value), value)
        self.assertEqual((positive_number("2.5"), positive_number(30)), (2.5, 30.0))

    def test_json_bodies(self) -> None:
        self.assertEqual(parse_json(b'{"a": [1, "\\ud83d\\ude00"]}'), {"a": [1, "\U0001f600"]})
        for raw, code in (
            (b'{"a": NaN}', "INVALID_JSON"),
            (b'{"a": -Infinity}', "INVALID_JSON"),
            (b'{"a": Infinity}', "INVALID_JSON"),
            (b'{"a": 1e400}', "INVALID_JSON"),
            (b"[-2.5e999]", "INVALID_JSON"),
            (b'{"a": "\\ud800"}', "INVALID_TEXT"),
            (b'{"\\udfff": 1}', "INVALID_TEXT"),
            (b'["x\\ud83d"]', "INVALID_TEXT"),
            (b'{"a": "\xed\xa0\x80"}', "INVALID_TEXT"),
        ):
            error = self.assertRaises(APIError, parse_json, raw)
            self.assertEqual((error.status, error.code), (400, code), raw)
        # Unchecked text is the handler's to check.
        self.assertEqual(parse_json(b'["\\ud800"]', check_text=False), ["\ud800"])

    def test_permanent_storage_errors_by_class_chain(self) -> None:
        from funcx_endpoint.webservice.ingest import _permanent

        class IntegrityError(Exception):
            pass

        class UniqueViolation(IntegrityError):  # as psycopg2.errors names it
            pass

        class OperationalError(Exception):
            pass

        self.assertTrue(_permanent(UniqueViolation("duplicate key")))
        self.assertTrue(_permanent(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate")))
        self.assertFalse(_permanent(OperationalError("server closed the connection")))

    def test_broker_urls(self) -> None:

        address = BrokerAddress("amqps", "example.org", 5671, "/")
        self.assertEqual(address.url("u@x", "p/w"), "amqps://u%40x:p%2Fw@example.org:5671/%2F")

    def test_router(self) -> None:
        router = Router()

        async def handler(call):  # pragma: no cover - not called
            return 200, {}

        router.add("GET", "/v2/tasks/(?P<task_id>[^/]+)", handler)
        route, params = router.match("GET", "/v2/tasks/abc/")
        self.assertEqual(params, {"task_id": "abc"})
        error = self.assertRaises(APIError, router.match, "POST", "/v2/tasks/abc")
        self.assertEqual((error.status, error.headers["Allow"]), (405, "GET"))
        self.assertEqual(self.assertRaises(APIError, router.match, "GET", "/v2/x").status, 404)


class PermissionTests(SynchronousTestCase):
    def test_endpoint_permissions_are_anchored_and_escaped(self) -> None:
        eid = "0c1d2e3f-0000-4000-8000-000000000001"
        rules = endpoint_permissions(eid)
        read = re.compile(rules["permissions"]["read"])
        self.assertTrue(read.match(f"{eid}.tasks"))
        self.assertFalse(read.match(f"{eid}xtasks"))
        self.assertFalse(read.match(f"{eid}.tasks.more"))
        self.assertFalse(read.match("results"))
        self.assertEqual(rules["permissions"]["configure"], "^$")
        self.assertTrue(re.match(rules["topic"]["write"], f"{eid}.results"))
        self.assertFalse(re.match(rules["topic"]["write"], "other.results"))
        prefix = "taskgroup.abc."
        user = re.compile(user_permissions(prefix)["read"])
        self.assertTrue(user.match(prefix + "tg"))
        self.assertFalse(user.match("taskgroup.abcd.tg"))


class PluginTests(SynchronousTestCase):
    def test_twistd_lists_the_service(self) -> None:
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
        )
        self.assertIn("funcx-service", result.stdout)

    def test_cli_help(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "funcx_endpoint.webservice", "--help"],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
        )
        self.assertEqual(result.returncode, 0)
        for command in (
            "start",
            "stop",
            "status",
            "create-client",
            "list-clients",
            "revoke-client",
        ):
            self.assertIn(command, result.stdout)


class _Channel:
    closed = False

    def __init__(self) -> None:
        self.acks: List[Tuple[int, bool]] = []

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))


class _Sender:
    def send_copies(self, copies: Any) -> None:
        pass


class _Storage:
    """Refuses (as the database would) any batch holding a result whose data is ``bad``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.stored: List[str] = []
        self.calls = 0

    def store_results(self, results: Any, now: Any = None) -> Any:
        self.calls += 1
        if any(r.data == "00\nbad" for r in results):
            return fail(self.error)
        self.stored.extend(r.task_id for r in results)
        return succeed([StoredOutcome(r.task_id, "stored") for r in results])

    def record_reports(self, reports: Any, size: int) -> Any:
        return succeed(0)


class ResultIngestTests(SynchronousTestCase):
    def deliveries(self, channel: _Channel, datas: List[str]) -> List[str]:
        self.endpoint_id = str(uuid.uuid4())
        ids = []
        for tag, data in enumerate(datas, 1):
            task_id = str(uuid.uuid4())
            ids.append(task_id)
            delivery = Delivery("c", tag, False, "results", f"{self.endpoint_id}.results")
            delivery.body = pack(Result.success(task_id, data))
            self.ingest.on_delivery(delivery, channel)  # type: ignore[arg-type]
        return ids

    def test_one_unstorable_message_is_dropped_alone(self) -> None:
        clock = Clock()
        storage = _Storage(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
        self.ingest = ResultIngest(clock, storage, _Sender())  # type: ignore[arg-type]
        channel = _Channel()
        ids = self.deliveries(channel, ["00\nok1", "00\nbad", "00\nok2"])
        clock.advance(0)
        self.assertEqual(storage.stored, [ids[0], ids[2]])
        self.assertEqual(channel.acks, [(1, True), (2, False), (3, True)])
        self.assertEqual((self.ingest.stored, self.ingest.dropped), (2, 1))
        self.assertFalse(self.ingest._busy)
        self.assertEqual(self.ingest._pending, [])
        self.assertEqual(len(self.flushLoggedErrors(UnicodeEncodeError)), 1)

    def test_transient_errors_are_retried(self) -> None:
        clock = Clock()
        storage = _Storage(sqlite3.OperationalError("database is locked"))
        self.ingest = ResultIngest(clock, storage, _Sender())  # type: ignore[arg-type]
        channel = _Channel()
        self.deliveries(channel, ["00\nok1", "00\nbad"])
        clock.advance(0)
        self.assertEqual((storage.calls, channel.acks), (1, []))
        self.assertEqual(len(self.ingest._pending), 2)
        clock.advance(1)
        self.assertEqual((storage.calls, channel.acks), (2, []))
        # The database recovers: everything is stored and acknowledged.
        storage.error = None  # type: ignore[assignment]
        storage.store_results = lambda results, now=None: succeed(  # type: ignore[method-assign]
            [StoredOutcome(r.task_id, "stored") for r in results]
        )
        clock.advance(1)
        self.assertEqual(channel.acks, [(2, True)])
        self.assertEqual(self.ingest._pending, [])
        self.flushLoggedErrors(sqlite3.OperationalError)

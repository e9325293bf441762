"""``funcx-endpoint diagnose``: the checks with the real service up and down, the
redacted bundle, and the parts on their own."""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import time
import uuid
from typing import Dict, List

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from funcx_endpoint.diagnostics import checks as c
from funcx_endpoint.diagnostics.bundle import known_secrets, redact
from funcx_endpoint.endpoint.layout import EndpointDir
from tests.support import configure_endpoint, run_cli

BROKER_PASSWORD = "brokerPw-9f8e7d6c5b"
MANAGER_SECRET = "managerSecret-0a1b2c3d4e"


def parse_checks(stdout: str) -> Dict[str, str]:
    """check name -> outcome, from the JSON output."""
    return {check["name"]: check["outcome"] for check in json.loads(stdout)}


class DiagnoseServiceTests(SynchronousTestCase):
    """Against a real service of this test's own (so it can be stopped)."""

    def setUp(self) -> None:
        from funcx_endpoint.testing.service import ServiceProcess

        self.service = ServiceProcess()
        self.service.start()
        self.addCleanup(self.service.destroy)
        self.client = self.service.create_client(f"diag-{uuid.uuid4().hex[:8]}")
        self.env = self.service.client_env(self.client)
        self.config_dir = os.path.abspath(self.mktemp())
        result = configure_endpoint(self.config_dir, "diag", self.service, self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.ep = EndpointDir(self.config_dir, "diag")

    def fx(self, *args: str, env=None):
        return run_cli(self.config_dir, *args, env=env or self.env)

    def diagnose_json(self, *extra: str, env=None):
        result = self.fx("diagnose", "diag", "--json", *extra, env=env)
        return result, parse_checks(result.stdout)

    def test_service_up_then_down(self) -> None:
        started = self.fx("start", "diag")
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        self.addCleanup(self.fx, "stop", "diag")

        result, outcomes = self.diagnose_json()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for name in ("config", "daemon", "service", "clock", "credentials", "broker", "spool disk"):
            self.assertEqual(outcomes[name], c.OK, result.stdout)
        self.assertIn(outcomes["log"], (c.OK, c.WARN))
        details = {x["name"]: x["detail"] for x in json.loads(result.stdout)}
        self.assertIn("TLS verified", details["service"])
        self.assertIn("TLS verified", details["broker"])
        self.assertIn("is online", details["credentials"])
        self.assertIn("tasks connected", details["daemon"])

        # The human-readable list says the same.
        text = self.fx("diagnose", "diag")
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertIn("0 failed", text.stdout)

        # Credentials refused: a FAIL and exit 1 (the saved token is dropped first).
        self.assertEqual(self.fx("stop", "diag").returncode, 0)
        os.unlink(os.path.join(self.config_dir, "tokens.json"))
        wrong = dict(self.env, FUNCX_SDK_CLIENT_SECRET="not-the-secret")
        result, outcomes = self.diagnose_json(env=wrong)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(outcomes["credentials"], c.FAIL)
        self.assertEqual(outcomes["service"], c.OK)

        # The service down: its checks fail, the broker (still up) is checked all the same.
        self.service.stop()
        began = time.monotonic()
        result, outcomes = self.diagnose_json("--timeout", "5")
        self.assertLess(time.monotonic() - began, 30)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertEqual(outcomes["service"], c.FAIL)
        self.assertEqual(outcomes["credentials"], c.SKIP)
        self.assertEqual(outcomes["clock"], c.SKIP)
        self.assertEqual(outcomes["broker"], c.OK)
        text = self.fx("diagnose", "diag", "--timeout", "5")
        self.assertIn("FAIL  service", text.stdout)
        self.assertIn("-> is the service running", text.stdout)

    def test_untrusted_service_certificate(self) -> None:
        with open(self.ep.config_file) as f:
            config = f.read()
        with open(self.ep.config_file, "w") as f:
            f.write(config.replace(repr(self.service.ca_file), "None", 1))
        result, outcomes = self.diagnose_json()
        self.assertEqual(result.returncode, 1)
        self.assertEqual(outcomes["service"], c.FAIL)
        self.assertIn("TLS verification failed", result.stdout)

    def test_broker_untrusted(self) -> None:
        """The broker's certificate checked against the wrong CA (the service's)."""
        started = self.fx("start", "diag")
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        self.assertEqual(self.fx("stop", "diag").returncode, 0)
        self.assertIn("amqps://", json.dumps(self.ep.read_endpoint_json()["broker"]))
        with open(self.ep.config_file) as f:
            config = f.read()
        with open(self.ep.config_file, "w") as f:
            f.write(config.replace(repr(self.service.broker_ca_file), repr(self.service.ca_file)))
        result, outcomes = self.diagnose_json()
        self.assertEqual(result.returncode, 1)
        self.assertEqual(outcomes["broker"], c.FAIL)
        self.assertEqual(outcomes["service"], c.OK)
        self.assertIn("TLS verification failed", result.stdout)
        self.assertIn("amqp_ca_file", result.stdout)

    def test_broker_unreachable(self) -> None:
        self.ep.write_endpoint_json(
            {"broker": {"tasks": "amqps://u:***@127.0.0.1:9/%2F", "results": "x"}}
        )
        result, outcomes = self.diagnose_json("--timeout", "5")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(outcomes["broker"], c.FAIL)
        self.assertIn("cannot reach amqps://127.0.0.1:9", result.stdout)

    def test_bundle_has_no_secrets(self) -> None:
        started = self.fx("start", "diag")
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        self.addCleanup(self.fx, "stop", "diag")
        with open(os.path.join(self.config_dir, "tokens.json")) as f:
            token = json.load(f)["access_token"]
        client_secret = self.client[1]
        # The daemon's log file writes over what others append: stopped first.
        self.assertEqual(self.fx("stop", "diag").returncode, 0)
        # Secrets where they may end up: the log (a broker URL, a password field,
        # a bearer token), config.py, the managers' info file.
        with open(self.ep.log_file(), "a") as f:
            f.write(
                f"2026-01-01T00:00:00+0000 [error] [test] connecting to "
                f"amqps://funcx-ep-x:{BROKER_PASSWORD}@localhost:5671/ failed\n"
                f"2026-01-01T00:00:00+0000 [info] [test] password={BROKER_PASSWORD}x "
                f"Authorization: Bearer {token} secret: {client_secret}\n"
            )
        with open(self.ep.config_file, "a") as f:
            f.write(f'\n# client_secret = "{client_secret}"\n')
        work = os.path.join(self.ep.path, "diag-work")
        os.makedirs(work)
        with open(os.path.join(work, "manager-info.json"), "w") as f:
            json.dump({"address": "127.0.0.1", "secret": MANAGER_SECRET}, f)
        with open(os.path.join(self.ep.path, "notes.txt"), "w") as f:
            f.write(MANAGER_SECRET)  # not bundled at all
        bundle = os.path.abspath(self.mktemp()) + ".tar.gz"
        result = self.fx("diagnose", "diag", "--bundle", bundle)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(f"Wrote {bundle}", result.stdout)
        self.assertEqual(os.stat(bundle).st_mode & 0o777, 0o600)
        secrets = [client_secret, token, BROKER_PASSWORD, MANAGER_SECRET]
        raw = gzip.decompress(open(bundle, "rb").read())
        with tarfile.open(bundle) as tar:
            members = {
                m.name.split("/", 1)[1]: tar.extractfile(m).read().decode()  # type: ignore[union-attr]
                for m in tar.getmembers()
            }
        for name in ("config.py", "endpoint.log", "status.json", "versions.json", "diagnose.json"):
            self.assertIn(name, members)
        for i, secret in enumerate(secrets):
            self.assertFalse(secret.encode() in raw, f"secret {i} is in the archive")
            for name, text in members.items():
                self.assertFalse(secret in text, f"secret {i} is in {name}")
        self.assertIn("connecting to amqps://funcx-ep-x:***@localhost", members["endpoint.log"])
        self.assertIn('"state": "Stopped"', members["status.json"])
        self.assertIn("twisted", members["versions.json"])
        self.assertIn("funcx_service_address", members["config.py"])


class LogErrorsTests(SynchronousTestCase):
    def write(self, lines: List[str]) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def test_text_log_with_traceback(self) -> None:
        path = self.write(
            [
                "2026-01-01T00:00:00+0000 [info] [a] fine",
                "2026-01-01T00:00:01+0000 [error] [a] broke",
                "\tTraceback (most recent call last):",
                "\tValueError: x",
                "2026-01-01T00:00:02+0000 [info] [a] fine again",
                "2026-01-01T00:00:03+0000 [critical] [b] worse",
            ]
        )
        errors = c.log_errors(path)
        self.assertEqual(len(errors), 2)
        self.assertIn("broke", errors[0])
        self.assertIn("ValueError: x", errors[0])
        self.assertNotIn("fine again", errors[0])
        self.assertIn("worse", errors[1])
        self.assertEqual(c.check_log(path).outcome, c.WARN)

    def test_json_log(self) -> None:
        error = {"log_level": {"name": "error"}, "text": "json broke"}
        info = {"log_level": {"name": "info"}, "text": "ok"}
        path = self.write([json.dumps(info), json.dumps(error), "{garbled"])
        self.assertEqual(c.log_errors(path), ["[error] json broke"])

    def test_limit_and_clean_log(self) -> None:
        path = self.write([f"t [error] [a] e{i}" for i in range(9)])
        self.assertEqual([e[-2:] for e in c.log_errors(path, limit=3)], ["e6", "e7", "e8"])
        clean = self.write(["t [info] [a] fine"])
        self.assertEqual(c.check_log(clean).outcome, c.OK)
        self.assertEqual(c.check_log(self.mktemp()).outcome, c.SKIP)


class PartsTests(SynchronousTestCase):
    def test_skew(self) -> None:
        self.assertEqual(c.skew_check(0.5).outcome, c.OK)
        self.assertEqual(c.skew_check(-20).outcome, c.WARN)
        failed = c.skew_check(600)
        self.assertEqual(failed.outcome, c.FAIL)
        self.assertIn("600.0 s ahead of", failed.detail)
        self.assertIn("behind", c.skew_check(-600).detail)

    def test_clock_from_date_header(self) -> None:
        class Response:
            headers = Headers({b"date": [b"Mon, 07 Dec 2026 10:00:00 GMT"]})

        import email.utils

        stamp = email.utils.parsedate_to_datetime("Mon, 07 Dec 2026 10:00:00 GMT").timestamp()
        self.assertEqual(c.clock_check(Response(), stamp + 100, stamp + 100.2).outcome, c.FAIL)
        self.assertEqual(c.clock_check(Response(), stamp + 0.4, stamp + 0.6).outcome, c.OK)

        class NoDate:
            headers = Headers({})

        self.assertEqual(c.clock_check(NoDate(), 0, 0).outcome, c.SKIP)

    def test_connection_start(self) -> None:
        self.assertIsNone(c.parse_connection_start(b"\x01\x00\x00\x00\x00\x01\x00\x00\x0a\x00\x0a"))
        self.assertIn("another AMQP version", c.parse_connection_start(b"AMQP\x00\x00\x09\x01abc"))
        self.assertIn("not an AMQP", c.parse_connection_start(b"HTTP/1.1 400 Bad"))

    def test_broker_check_is_bounded_by_the_clock(self) -> None:
        """A broker that never answers fails the check after the timeout, on the
        injected clock (nothing waits on a socket)."""
        from twisted.internet.defer import Deferred
        from twisted.internet.testing import MemoryReactorClock

        from funcx_endpoint.amqp.connection import AMQPURL

        reactor = MemoryReactorClock()
        url = AMQPURL.parse("amqp://u:p@127.0.0.1:5672/%2F")
        d = Deferred.fromCoroutine(c.check_broker(reactor, url, None, 10.0))
        self.assertNoResult(d)
        reactor.advance(10.1)
        check = self.successResultOf(d)
        self.assertEqual(check.outcome, c.FAIL)
        self.assertIn("no answer within 10 s", check.detail)

    def test_redact(self) -> None:
        text = (
            "amqps://user:pw1234567@host/ Bearer abc.def-123 client_secret = 'zzz' "
            '"password": "hunter22" plainsecretvalue'
        )
        out = redact(text, {"plainsecretvalue"})
        for secret in ("pw1234567", "abc.def-123", "zzz", "hunter22", "plainsecretvalue"):
            self.assertNotIn(secret, out)
        self.assertIn("amqps://user:***@host/", out)

    def test_known_secrets(self) -> None:
        config_dir = os.path.abspath(self.mktemp())
        ep = EndpointDir(config_dir, "x")
        os.makedirs(os.path.join(ep.path, "work"))
        with open(os.path.join(config_dir, "tokens.json"), "w") as f:
            json.dump({"access_token": "tok-123456", "client_id": "not-secret"}, f)
        with open(os.path.join(ep.path, "work", "info.json"), "w") as f:
            json.dump({"nested": {"secret": "mgr-654321"}, "port": 1}, f)
        found = known_secrets(ep, {"FUNCX_SDK_CLIENT_SECRET": "cs-abcdef", "HOME": "/root"})
        self.assertEqual(found, {"tok-123456", "mgr-654321", "cs-abcdef"})

"""Managers and workers do not inherit the owner's client secret, nor any other
credential of the daemon or the service (issue 12: any function could read
FUNCX_SDK_CLIENT_SECRET from os.environ)."""

from __future__ import annotations

from typing import Any, Dict

import psutil
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.executor.providers.local import LocalProvider
from funcx_endpoint.manager.workers_env import worker_environment
from funcx_endpoint.testing.procreactor import MemoryProcessReactor
from funcx_endpoint.wire.environment import (
    is_credential,
    take_credentials,
    without_credentials,
)
from funcx_endpoint.wire.info import ManagerSettings

DAEMON_ENV = {
    "PATH": "/usr/bin",
    "HOME": "/home/owner",
    "FUNCX_SDK_CLIENT_ID": "0b0e6b4e-client",
    "FUNCX_SDK_CLIENT_SECRET": "s3cret-value",
    "FUNCX_SERVICE_DATABASE_URL": "postgresql://funcx:dbpass@localhost/funcx",
    "FUNCX_SERVICE_AMQP_URL": "amqps://admin:brokerpass@localhost:5671/",
    "FUNCX_BROKER_PASSWORD": "x",
    "GLOBUS_COMPUTE_CLIENT_SECRET": "y",
    "FUNCX_ACCESS_TOKEN": "z",
    "FUNCX_SERVICE_ADDRESS": "https://funcx.example/v2",
    "FUNCX_ENDPOINT_CONFIG_DIR": "/home/owner/.funcx",
    "GITHUB_TOKEN": "the user's own business",
}
KEPT = {
    "PATH",
    "HOME",
    "FUNCX_SERVICE_ADDRESS",
    "FUNCX_ENDPOINT_CONFIG_DIR",
    "GITHUB_TOKEN",
}


class CredentialNamesTests(SynchronousTestCase):
    def test_which_are_credentials(self) -> None:
        found = {name for name, value in DAEMON_ENV.items() if is_credential(name, value)}
        self.assertEqual(found, set(DAEMON_ENV) - KEPT)

    def test_without_credentials(self) -> None:
        self.assertEqual(set(without_credentials(DAEMON_ENV)), KEPT)

    def test_take_credentials_empties_the_environment(self) -> None:
        environ = dict(DAEMON_ENV)
        taken = take_credentials(environ)
        self.assertEqual(set(environ), KEPT)
        self.assertEqual(taken["FUNCX_SDK_CLIENT_SECRET"], "s3cret-value")


class SpawnedEnvironmentTests(SynchronousTestCase):
    def test_local_provider_passes_no_credentials_to_managers(self) -> None:
        reactor = MemoryProcessReactor()
        provider = LocalProvider(
            reactor, self.mktemp(), env=DAEMON_ENV, process_groups=False, python="/bin/true"
        )
        provider.submit("funcx-manager", 1)
        [process] = reactor.processes
        env: Dict[Any, Any] = dict(process.env)
        self.assertEqual(KEPT - set(env), set())
        self.assertEqual([n for n in env if is_credential(n, env[n])], [])
        self.assertNotIn("s3cret-value", repr(env))

    def test_manager_passes_no_credentials_to_workers(self) -> None:
        settings = ManagerSettings(worker_environment={"MY_TOKEN_FOR_TASKS": "given on purpose"})
        env = worker_environment(DAEMON_ENV, settings, 0)
        self.assertEqual([n for n in env if is_credential(n, env[n])], [])
        self.assertEqual(env["MY_TOKEN_FOR_TASKS"], "given on purpose")
        self.assertEqual(env["PATH"], "/usr/bin")


def environment() -> dict:
    import os

    return dict(os.environ)


class EndToEndEnvironmentTests(SynchronousTestCase):
    """A function run on a real endpoint (started with the owner's client id and
    secret in its environment) reads os.environ: no credential in it."""

    def test_function_sees_no_secret(self) -> None:
        from tests.test_end_to_end import shared_endpoint, wait_result

        endpoint = shared_endpoint()
        secret = endpoint.env["FUNCX_SDK_CLIENT_SECRET"]
        client = endpoint.client()
        self.addCleanup(client.close)
        fid = client.register_function(environment)
        task = client.run(endpoint_id=endpoint.endpoint_id, function_id=fid)
        env = wait_result(client, task)
        self.assertIn("FUNCX_WORKER_ID", env)  # it did run on a worker
        self.assertNotIn("FUNCX_SDK_CLIENT_SECRET", env)
        self.assertNotIn("FUNCX_SDK_CLIENT_ID", env)
        self.assertEqual([n for n in env if is_credential(n, env[n])], [])
        self.assertFalse(any(secret in value for value in env.values()))
        # Nor were the managers started with it.  (The daemon's own
        # /proc/PID/environ keeps what it was started with: its os.environ no
        # longer has it, but the kernel shows the initial block.)
        from tests.support import endpoint_processes

        daemon = endpoint.ep.read_pid()
        processes = [p for p in endpoint_processes(endpoint.ep, daemon) if p.pid != daemon]
        self.assertNotEqual(processes, [])
        for process in processes:
            try:
                process_env = process.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.assertNotIn("FUNCX_SDK_CLIENT_SECRET", process_env, process.cmdline())

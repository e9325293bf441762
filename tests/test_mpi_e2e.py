"""ShellFunction and MPIFunction end to end: SDK -> private service -> broker ->
endpoint daemon -> manager -> worker -> MPICH's mpiexec, and back; all real processes.

The endpoint has the default LocalProvider (a block is this host) and
``mpi_launcher="auto"`` (``mpiexec`` outside a Slurm job).  The resource
specification goes from ``FuncXExecutor.resource_specification`` through
``POST /v2/submit``, the service's task message and the endpoint's intake to
the worker, which starts the ranks.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.endpoint.layout import EndpointDir
from tests.support import run_cli, wait_for
from tests.test_end_to_end import wait_result
from tests.test_mpi_slurm import build_hello, shell_ranks


class MPIEndpoint:
    """A running endpoint daemon for these tests, and an SDK client's environment."""

    def __init__(self) -> None:
        from funcx_endpoint.testing.service import shared_service

        self.service = shared_service()
        self.env = self.service.client_env(self.service.create_client())
        self.config_dir = tempfile.mkdtemp(prefix="funcx-mpi-e2e-")
        result = run_cli(
            self.config_dir,
            "configure",
            "mpi",
            "--service-address",
            self.service.base_url,
            "--service-ca-file",
            self.service.ca_file,
            "--amqp-ca-file",
            self.service.broker_ca_file,
            env=self.env,
        )
        assert result.returncode == 0, result.stderr
        self.ep = EndpointDir(self.config_dir, "mpi")
        with open(self.ep.config_file) as f:
            text = f.read()
        text = text.replace('max_workers_per_node=float("inf"),', "max_workers_per_node=2,")
        with open(self.ep.config_file, "w") as f:
            f.write(text)
        started = run_cli(self.config_dir, "start", "mpi", env=self.env)
        assert started.returncode == 0, started.stdout + started.stderr
        self.endpoint_id = self.ep.endpoint_id()
        assert wait_for(
            lambda: "workers: 2" in run_cli(self.config_dir, "status", "mpi", env=self.env).stdout,
            60,
        ), run_cli(self.config_dir, "status", "mpi", env=self.env).stdout

    def client(self) -> Any:
        from funcx_endpoint.sdk import FuncXClient

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return FuncXClient()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def stop(self) -> None:
        run_cli(self.config_dir, "stop", "mpi", env=self.env)


_endpoint: Optional[MPIEndpoint] = None


def mpi_endpoint() -> MPIEndpoint:
    global _endpoint
    if _endpoint is None:
        _endpoint = MPIEndpoint()
        atexit.register(_endpoint.stop)
    return _endpoint


class MPIEndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.program = build_hello(os.path.abspath(self.mktemp()))  # skips without MPICH
        self.endpoint = mpi_endpoint()
        self.client = self.endpoint.client()
        self.addCleanup(self.client.close)

    def test_mpi_function_with_a_resource_specification(self) -> None:
        from funcx_endpoint.sdk import FuncXExecutor, MPIFunction, TaskExecutionFailed

        with FuncXExecutor(self.endpoint.endpoint_id, funcx_client=self.client) as fx:
            fx.resource_specification = {"num_ranks": 2}
            good = fx.submit(MPIFunction(self.program, walltime=60))
            fx.resource_specification = {"num_nodes": 2}
            too_big = fx.submit(MPIFunction("hostname"))
            result = good.result(timeout=120)
            with self.assertRaises(TaskExecutionFailed) as caught:
                too_big.result(timeout=120)
        self.assertEqual(result.cmd, f"$PARSL_MPI_PREFIX {self.program}")
        got = shell_ranks(result)
        self.assertEqual([(r, s, t) for r, s, _, t in got], [(0, 2, 1), (1, 2, 1)])
        self.assertEqual(caught.exception.error_code, "InvalidResourceSpecification")
        self.assertIn("num_nodes=2 but its block has 1 node", str(caught.exception))

    def test_shell_function(self) -> None:
        from funcx_endpoint.sdk import ShellFunction

        function_id = self.client.register_function(ShellFunction("echo $FUNCX_TASK_ID; exit 5"))
        task_id = self.client.run(endpoint_id=self.endpoint.endpoint_id, function_id=function_id)
        shell = wait_result(self.client, task_id)
        self.assertEqual((shell.returncode, shell.stdout), (5, f"{task_id}\n"))

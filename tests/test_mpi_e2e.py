"""ShellFunction and MPIFunction end to end: SDK -> private service -> broker ->
endpoint daemon -> manager -> worker -> MPICH's mpiexec, and back; all real processes.

The endpoint has the default LocalProvider (a block is this host) and
``mpi_launcher="auto"`` (``mpiexec`` outside a Slurm job).  The resource
specification goes from ``FuncXExecutor.resource_specification`` through
``POST /v2/submit``, the service's task message and the endpoint's intake to
the worker, which starts the ranks.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from tests.support import CLIEndpoint, replacing, shared_running_endpoint
from tests.test_end_to_end import wait_result
from tests.test_mpi_slurm import build_hello, shell_ranks


def mpi_endpoint() -> CLIEndpoint:
    """This module's endpoint daemon (2 workers), started once."""
    return shared_running_endpoint(
        "mpi", replacing({'max_workers_per_node=float("inf"),': "max_workers_per_node=2,"})
    )


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

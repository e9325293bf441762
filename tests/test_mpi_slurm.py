"""Real MPI across the Slurm test cluster's two nodes (Debian's MPICH).

A block of ``nodes_per_block=2`` (Parsl's SlurmProvider and SrunLauncher, as
in :mod:`tests.test_slurm`) runs a manager on each node; an ``MPIFunction``
task with ``num_nodes=2`` runs a small MPI program (compiled here with
``mpicc``: ``MPI_Init``, an ``MPI_Allreduce`` of the ranks, each rank prints its
host) under the executor's launcher: ``srun`` (Slurm's PMI2) and MPICH's
``mpiexec`` (Hydra, which starts its proxies with srun inside the job).  The
ranks run on both nodes (each in its own network namespace, so they talk over
the bridge) and agree on the sum.  Skipped, with the reason, where the cluster
cannot run (no root, no namespaces, no Slurm packages) or MPICH is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from typing import Any, Dict, List

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SkipTest, TestCase

from funcx_endpoint.functions import MPIFunction, ShellFunction
from funcx_endpoint.wire import Result, Task, deserialize, pack_function, pack_payload
from funcx_endpoint.wire.errors import ErrorCode
from funcx_endpoint.wire.resources import add_resources_header, check_resource_specification
from tests.test_slurm import Rig, get_cluster, parsl_modules, slurm_provider, wait_until

HELLO_C = r"""
#include <mpi.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int rank, size, sum = 0;
    char host[256];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("rank %d of %d on %s sum %d\n", rank, size, host, sum);
    MPI_Finalize();
    return 0;
}
"""

RANK_LINE = re.compile(r"^rank (\d+) of (\d+) on (\S+) sum (\d+)$")


def build_hello(directory: str) -> str:
    """The MPI program, compiled with MPICH's mpicc into ``directory``."""
    missing = [tool for tool in ("mpicc", "mpiexec") if shutil.which(tool) is None]
    if missing:
        raise SkipTest(
            f"MPI is not installed ({', '.join(missing)} missing; "
            f"scripts/bootstrap-system.sh mpi installs MPICH)"
        )
    os.makedirs(directory, exist_ok=True)
    source = os.path.join(directory, "hello.c")
    with open(source, "w") as f:
        f.write(HELLO_C)
    program = os.path.join(directory, "hello")
    done = subprocess.run(
        ["mpicc", "-o", program, source], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise AssertionError(f"mpicc failed: {done.stderr}")
    return program


def mpi_task(fn: Any, spec: Dict[str, int], **kwargs: Any) -> Task:
    """A task with a resource specification, as the endpoint's intake passes it on."""
    task = Task(
        str(uuid.uuid4()),
        pack_function(fn) + pack_payload((), kwargs),
        resource_specification=spec,
    )
    task.task_buffer = add_resources_header(task.task_buffer, check_resource_specification(spec))
    return task


def plain_task(fn: Any, **kwargs: Any) -> Task:
    return Task(str(uuid.uuid4()), pack_function(fn) + pack_payload((), kwargs))


def ranks(result: Result) -> List[tuple]:
    """``(rank, size, host, sum)`` of each line the MPI program printed."""
    assert not result.is_error, result.data
    return shell_ranks(deserialize(result.data))


def shell_ranks(shell: Any) -> List[tuple]:
    """``(rank, size, host, sum)`` of each line the MPI program printed (a ShellResult)."""
    assert shell.returncode == 0, (shell.returncode, shell.stdout, shell.stderr)
    found = []
    for line in shell.stdout.splitlines():
        match = RANK_LINE.match(line.strip())
        if match:
            rank, size, host, total = match.groups()
            found.append((int(rank), int(size), host, int(total)))
    return sorted(found)


class MPIOnSlurmTests(TestCase):
    timeout = 180

    async def rig(self, **executor_options: Any) -> Rig:
        cluster = await get_cluster()
        parsl_modules()
        # Slurm's PMI2 for srun-started ranks (the cluster's MpiDefault is none),
        # as a site without a default would set it.
        options = {"worker_environment": {"SLURM_MPI_TYPE": "pmi2"}, **executor_options}
        rig = Rig(self, cluster, slurm_provider(cluster), executor_options=options)
        await wait_until(lambda: len(rig.managers()) == 2, 90, "a manager on each node")
        self.assertEqual(rig.hostnames(), ["node0", "node1"])
        return rig

    def test_srun(self) -> Deferred[None]:
        return ensureDeferred(self._srun())

    async def _srun(self) -> None:
        program = build_hello(os.path.abspath(self.mktemp()))
        rig = await self.rig()  # mpi_launcher "auto": srun in a Slurm job
        hello = mpi_task(MPIFunction(program, walltime=60), {"num_nodes": 2, "ranks_per_node": 1})
        hosts = mpi_task(MPIFunction("hostname", walltime=60), {"num_nodes": 2})
        too_big = mpi_task(MPIFunction("hostname"), {"num_nodes": 3})
        shell = plain_task(ShellFunction("hostname; echo $SLURM_JOB_ID"))
        rig.interchange.submit([hello, hosts, too_big, shell])
        await wait_until(lambda: len(rig.results) == 4, 120, "every result")
        results = rig.results_by_id()

        got = ranks(results[hello.task_id])
        self.assertEqual([(r, s, t) for r, s, _, t in got], [(0, 2, 1), (1, 2, 1)])
        self.assertEqual(sorted(host for _, _, host, _ in got), ["node0", "node1"])
        hosts_result = deserialize(results[hosts.task_id].data)
        self.assertTrue(hosts_result.cmd.startswith("$PARSL_MPI_PREFIX "))
        self.assertEqual(sorted(hosts_result.stdout.split()), ["node0", "node1"])

        refused = results[too_big.task_id]
        assert refused.error_details is not None
        self.assertEqual(refused.error_details.code, ErrorCode.RESOURCE_SPECIFICATION_ERROR)
        self.assertIn("num_nodes=3 but its block has 2 nodes", refused.data)

        node, job_id = deserialize(results[shell.task_id].data).stdout.split()
        self.assertIn(node, ("node0", "node1"))
        [block] = rig.scaler.blocks()
        self.assertEqual(job_id, str(block.job_id))

    def test_mpiexec(self) -> Deferred[None]:
        return ensureDeferred(self._mpiexec())

    async def _mpiexec(self) -> None:
        program = build_hello(os.path.abspath(self.mktemp()))
        rig = await self.rig(mpi_launcher="mpiexec")
        hello = mpi_task(MPIFunction(program, walltime=60), {"num_nodes": 2, "ranks_per_node": 2})
        rig.interchange.submit([hello])
        await wait_until(lambda: len(rig.results) == 1, 120, "the result")
        got = ranks(rig.results_by_id()[hello.task_id])
        self.assertEqual([(r, s, t) for r, s, _, t in got], [(r, 4, 6) for r in range(4)])
        self.assertEqual(
            sorted(host for _, _, host, _ in got), ["node0", "node0", "node1", "node1"]
        )

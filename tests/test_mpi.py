"""ShellFunction, MPIFunction and resource specifications, on fakes.

The launch prefixes of every launcher, the block's nodes from each scheduler's
variables, the resource specification from the task message through the intake
to the worker, and ShellFunction/MPIFunction run by a real TaskRunner (with a
fake ``mpiexec`` on the PATH).  Real MPI across the Slurm test cluster's two
nodes is in :mod:`tests.test_mpi_slurm`.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from typing import Any, Dict

import dill
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.config.fields import ConfigError
from funcx_endpoint.config.model import HighThroughputExecutor
from funcx_endpoint.functions import MPIFunction, ShellFunction, ShellResult
from funcx_endpoint.wire import ErrorCode, Result, Task, deserialize, pack, unpack
from funcx_endpoint.wire.resources import (
    ResourceSpecificationError,
    add_resources_header,
    check_resource_specification,
    split_resources_header,
)
from funcx_endpoint.worker.execute import TaskRunner
from funcx_endpoint.worker.mpi import (
    block_nodes,
    choose_launcher,
    expand_slurm_nodelist,
    mpi_environment,
    mpi_prefix,
)
from tests.test_transport_units import TransportTestCase, error_code, user_message
from tests.test_worker import run, task_buffer

TWO = {"num_nodes": 2, "ranks_per_node": 2, "num_ranks": 4}


class ResourceSpecificationTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        check = check_resource_specification
        self.assertEqual(check({}), {"num_nodes": 1, "ranks_per_node": 1, "num_ranks": 1})
        self.assertEqual(check({"num_nodes": 2, "ranks_per_node": 2}), TWO)
        self.assertEqual(
            check({"num_nodes": 2, "num_ranks": 3}),
            {"num_nodes": 2, "ranks_per_node": 2, "num_ranks": 3},
        )
        self.assertEqual(
            check({"num_ranks": 4}), {"num_nodes": 1, "ranks_per_node": 4, "num_ranks": 4}
        )

    def test_refused(self) -> None:
        for spec, words in [
            ([2], "must be a dict"),
            ({"nodes": 2}, "unknown resource_specification keys ['nodes']"),
            ({"num_nodes": 0}, "positive integer"),
            ({"num_nodes": "2"}, "positive integer"),
            ({"num_nodes": True}, "positive integer"),
            ({"num_nodes": 2, "ranks_per_node": 1, "num_ranks": 3}, "more than num_nodes"),
            ({"num_nodes": 3, "num_ranks": 2}, "without a rank"),
        ]:
            with self.assertRaises(ResourceSpecificationError) as caught:
                check_resource_specification(spec)
            self.assertIn(words, str(caught.exception))

    def test_header(self) -> None:
        buffer = "12\nsome payload"
        with_header = add_resources_header(buffer, TWO)
        self.assertTrue(with_header.startswith("#resources:{"))
        self.assertEqual(split_resources_header(with_header), (TWO, buffer))
        self.assertEqual(split_resources_header(buffer), (None, buffer))
        self.assertRaises(ResourceSpecificationError, split_resources_header, "#resources:{")
        self.assertRaises(ResourceSpecificationError, split_resources_header, "#resources:{\n1")

    def test_task_message_field(self) -> None:
        task_id = str(uuid.uuid4())
        plain = Task(task_id, "b")
        self.assertNotIn("resource_specification", plain.to_wire())
        task = Task(task_id, "b", resource_specification={"num_nodes": 2})
        self.assertEqual(task.to_wire()["resource_specification"], {"num_nodes": 2})
        self.assertIn("resource_specification={'num_nodes': 2})", repr(task))
        self.assertNotIn("resource_specification", repr(plain))
        again = unpack(pack(task))
        assert isinstance(again, Task)
        self.assertEqual(again.resource_specification, {"num_nodes": 2})
        self.assertIsNone(unpack(pack(plain)).resource_specification)  # type: ignore[union-attr]


class NodesTests(SynchronousTestCase):
    def test_slurm_nodelist(self) -> None:
        expand = expand_slurm_nodelist
        self.assertEqual(expand("node[0-1]"), ["node0", "node1"])
        self.assertEqual(expand("a[01-03,7],b5"), ["a01", "a02", "a03", "a7", "b5"])
        self.assertEqual(expand("single"), ["single"])
        self.assertEqual(expand("r[1-2]-n[1-2]"), ["r1-n1", "r1-n2", "r2-n1", "r2-n2"])
        self.assertEqual(expand(""), [])
        self.assertRaises(ValueError, expand, "a[1-2")

    def test_block_nodes_from_each_scheduler(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("n1\nn1\nn2\nn2\n")
        for env, nodes in [
            ({"FUNCX_BLOCK_NODES": "x,y", "SLURM_JOB_NODELIST": "n[1-2]"}, ["x", "y"]),
            ({"SLURM_JOB_NODELIST": "n[1-3]"}, ["n1", "n2", "n3"]),
            ({"PBS_NODEFILE": path}, ["n1", "n2"]),
            ({"LSB_MCPU_HOSTS": "n1 4 n2 4"}, ["n1", "n2"]),
            ({"LSB_HOSTS": "n1 n1 n2"}, ["n1", "n2"]),
            ({"COBALT_NODEFILE": path}, ["n1", "n2"]),
            ({}, ["here"]),
        ]:
            self.assertEqual(block_nodes(env, "here"), nodes, env)

    def test_this_host_first(self) -> None:
        env = {"SLURM_JOB_NODELIST": "n[1-3]"}
        self.assertEqual(block_nodes(env, "n2"), ["n2", "n1", "n3"])
        self.assertEqual(block_nodes(env, "n3.cluster.example"), ["n3", "n1", "n2"])


class PrefixTests(SynchronousTestCase):
    nodes = ["n1", "n2", "n3"]

    def test_every_launcher(self) -> None:
        expected = {
            "srun": "srun --overlap --nodes 2 --ntasks 4 --ntasks-per-node 2 --nodelist n1,n2",
            "mpiexec": "mpiexec -n 4 -ppn 2 -hosts n1,n2",
            "mpirun": "mpirun -np 4 --map-by ppr:2:node --host n1:2,n2:2",
            "aprun": "aprun -n 4 -N 2 -L n1,n2",
        }
        for launcher, prefix in expected.items():
            self.assertEqual(mpi_prefix(launcher, TWO, self.nodes), prefix)

    def test_more_nodes_than_the_block_has(self) -> None:
        spec = check_resource_specification({"num_nodes": 4})
        with self.assertRaises(ResourceSpecificationError) as caught:
            mpi_prefix("srun", spec, self.nodes)
        self.assertIn("num_nodes=4 but its block has 3 nodes (n1, n2, n3)", str(caught.exception))
        self.assertIn("nodes_per_block >= 4", str(caught.exception))

    def test_unknown_launcher(self) -> None:
        self.assertRaises(ResourceSpecificationError, mpi_prefix, "qsub", TWO, self.nodes)
        self.assertRaises(ResourceSpecificationError, choose_launcher, "qsub", {})

    def test_auto(self) -> None:
        self.assertEqual(choose_launcher("auto", {"SLURM_JOB_ID": "7"}), "srun")
        self.assertEqual(choose_launcher(None, {}), "mpiexec")
        self.assertEqual(choose_launcher("mpirun", {"SLURM_JOB_ID": "7"}), "mpirun")

    def test_environment(self) -> None:
        env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-3]", "FUNCX_MPI_LAUNCHER": "auto"}
        got = mpi_environment(TWO, env, "n2")
        self.assertEqual(
            got,
            {
                "PARSL_MPI_PREFIX": "srun --overlap --nodes 2 --ntasks 4 --ntasks-per-node 2 "
                "--nodelist n2,n1",
                "PARSL_NUM_NODES": "2",
                "PARSL_RANKS_PER_NODE": "2",
                "PARSL_NUM_RANKS": "4",
                "PARSL_MPI_NODELIST": "n2,n1",
                "SLURM_OVERLAP": "1",
                "SLURM_LABELIO": None,
            },
        )
        outside = mpi_environment(TWO, {"FUNCX_BLOCK_NODES": "a,b"}, "a")
        self.assertEqual(outside["PARSL_MPI_PREFIX"], "mpiexec -n 4 -ppn 2 -hosts a,b")
        self.assertNotIn("SLURM_OVERLAP", outside)

    def test_executor_option(self) -> None:
        self.assertEqual(
            HighThroughputExecutor().manager_worker_environment(), {"FUNCX_MPI_LAUNCHER": "auto"}
        )
        executor = HighThroughputExecutor(mpi_launcher="mpiexec", worker_environment={"A": "1"})
        self.assertEqual(
            executor.manager_worker_environment(), {"A": "1", "FUNCX_MPI_LAUNCHER": "mpiexec"}
        )
        self.assertRaises(ConfigError, HighThroughputExecutor, mpi_launcher="qsub")


class _Environment:
    """Set variables for a test, and put them back after it."""

    def __init__(self, test: SynchronousTestCase, **values: str) -> None:
        saved = {name: os.environ.get(name) for name in values}
        os.environ.update(values)

        def restore() -> None:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

        test.addCleanup(restore)


class ShellFunctionTests(SynchronousTestCase):
    """ShellFunction and MPIFunction run by the worker's TaskRunner, as on an endpoint."""

    def setUp(self) -> None:
        self.sandbox_base = os.path.abspath(self.mktemp())
        os.makedirs(self.sandbox_base)
        cwd = os.getcwd()
        os.chdir(self.sandbox_base)  # where tasks_working_dir/<task id> goes
        self.addCleanup(os.chdir, cwd)
        for name in ("GC_TASK_SANDBOX_DIR", "FUNCX_TASK_SANDBOX_DIR"):
            if name in os.environ:
                _Environment(self, **{name: os.environ[name]})
                del os.environ[name]

    def run_task(self, fn: Any, buffer_header: Any = None, **kwargs: Any) -> Result:
        buffer = task_buffer(fn, **kwargs)
        if buffer_header is not None:
            buffer = add_resources_header(buffer, buffer_header)
        return run(TaskRunner(), buffer)

    def test_shell_result(self) -> None:
        fn = ShellFunction("echo hello {name}; pwd; echo oops >&2; exit 3")
        self.assertEqual(fn.__name__, "ShellFunction")
        task_id = str(uuid.uuid4())
        result = run(TaskRunner(), task_buffer(fn, name="world"), task_id)
        self.assertIsNone(result.error_details)
        shell = deserialize(result.data)
        self.assertIsInstance(shell, ShellResult)
        self.assertEqual(shell.returncode, 3)
        self.assertEqual(shell.cmd, "echo hello world; pwd; echo oops >&2; exit 3")
        sandbox = os.path.join(self.sandbox_base, "tasks_working_dir", task_id)
        self.assertEqual(shell.stdout, f"hello world\n{sandbox}\n")
        self.assertEqual(shell.stderr, "oops\n")
        self.assertIsNone(shell.exception_name)
        with open(os.path.join(sandbox, "ShellFunction.stdout")) as f:
            self.assertEqual(f.read(), shell.stdout)
        self.assertNotIn("FUNCX_TASK_ID", os.environ)  # only while the task runs

    def test_snippet_lines_and_files(self) -> None:
        fn = ShellFunction("seq 1 50", stdout="out.txt", snippet_lines=3, name="counting")
        self.assertEqual(fn.__name__, "counting")
        shell = deserialize(self.run_task(fn).data)
        self.assertEqual(shell.stdout, "48\n49\n50\n")
        self.assertEqual(
            deserialize(self.run_task(ShellFunction("true", snippet_lines=0)).data).stdout, ""
        )

    def test_sandbox_variable(self) -> None:
        sandbox = os.path.abspath(self.mktemp())
        _Environment(self, GC_TASK_SANDBOX_DIR=sandbox)
        shell = deserialize(self.run_task(ShellFunction("pwd")).data)
        self.assertEqual(shell.stdout, sandbox + "\n")

    def test_walltime(self) -> None:
        fn = ShellFunction("echo started; sleep 30 & sleep 30; echo never", walltime=0.5)
        started = time.monotonic()
        shell = deserialize(self.run_task(fn).data)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(shell.returncode, 124)
        self.assertEqual(shell.exception_name, "subprocess.TimeoutExpired")
        self.assertEqual(shell.stdout, "started\n")

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, ShellFunction, "")
        self.assertRaises(ValueError, ShellFunction, "true", walltime=0)
        result = self.run_task(ShellFunction("echo {missing}"))
        self.assertEqual(result.error_details.code, ErrorCode.REMOTE_EXECUTION_ERROR)
        self.assertIn("KeyError: 'missing'", result.data)

    def test_serialized_by_reference(self) -> None:
        fn = MPIFunction("hostname", walltime=3)
        again = dill.loads(dill.dumps(fn))
        self.assertIs(type(again), MPIFunction)
        self.assertEqual((again.cmd, again.walltime), ("hostname", 3))

    def fake_launcher(self) -> str:
        """A directory with an ``mpiexec`` that prints what it was asked to run."""
        bin_dir = os.path.abspath(self.mktemp())
        os.makedirs(bin_dir)
        path = os.path.join(bin_dir, "mpiexec")
        with open(path, "w") as f:
            f.write('#!/bin/sh\necho "mpiexec $*"\necho "ranks=$PARSL_NUM_RANKS"\n')
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
        return bin_dir

    def test_mpi_function(self) -> None:
        bin_dir = self.fake_launcher()
        _Environment(
            self,
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
            FUNCX_MPI_LAUNCHER="mpiexec",
            FUNCX_BLOCK_NODES="n1,n2,n3",
        )
        spec = check_resource_specification({"num_nodes": 2, "ranks_per_node": 2})
        result = self.run_task(MPIFunction("./app --size {size}"), spec, size=8)
        self.assertIsNone(result.error_details)
        shell = deserialize(result.data)
        self.assertEqual(shell.returncode, 0)
        self.assertEqual(shell.cmd, "$PARSL_MPI_PREFIX ./app --size 8")
        self.assertEqual(
            shell.stdout.splitlines(),
            ["mpiexec -n 4 -ppn 2 -hosts n1,n2 ./app --size 8", "ranks=4"],
        )
        # The variables are the task's only.
        self.assertNotIn("PARSL_MPI_PREFIX", os.environ)

    def test_mpi_function_without_a_specification(self) -> None:
        result = self.run_task(MPIFunction("hostname"))
        self.assertEqual(result.error_details.code, ErrorCode.REMOTE_EXECUTION_ERROR)
        self.assertIn("MPIFunction needs a resource specification", result.data)

    def test_more_nodes_than_the_block(self) -> None:
        _Environment(self, FUNCX_BLOCK_NODES="n1,n2", FUNCX_MPI_LAUNCHER="srun")
        result = self.run_task(MPIFunction("hostname"), {"num_nodes": 3})
        self.assertEqual(result.error_details.code, ErrorCode.RESOURCE_SPECIFICATION_ERROR)
        self.assertIn("num_nodes=3 but its block has 2 nodes", result.data)
        self.assertIn("nodes_per_block >= 3", result.data)
        bad = run(TaskRunner(), "#resources:not json\n" + task_buffer(MPIFunction("x")))
        self.assertEqual(bad.error_details.code, ErrorCode.RESOURCE_SPECIFICATION_ERROR)


class IntakeTests(TransportTestCase):
    """The intake checks a task's resource specification and hands it to the worker."""

    def test_resource_specification(self) -> None:
        self.start()
        good = Task(str(uuid.uuid4()), "9\nsomething", resource_specification={"num_nodes": 2})
        bad = Task(str(uuid.uuid4()), "9\nsomething", resource_specification={"nodes": 2})
        plain = Task(str(uuid.uuid4()), "9\nsomething")
        self.publish_tasks([good, bad, plain])
        held: Dict[str, Task] = self.interchange.held
        self.assertEqual(sorted(held), sorted([good.task_id, plain.task_id]))
        spec, buffer = split_resources_header(held[good.task_id].task_buffer)
        self.assertEqual(spec, {"num_nodes": 2, "ranks_per_node": 1, "num_ranks": 2})
        self.assertEqual(buffer, "9\nsomething")
        self.assertEqual(held[plain.task_id].task_buffer, "9\nsomething")
        [result] = self.results()[bad.task_id]
        self.assertEqual(error_code(result), "InvalidResourceSpecification")
        self.assertIn("unknown resource_specification keys ['nodes']", user_message(result))


class LocalMPITests(SynchronousTestCase):
    """A real MPI program (MPICH) on this host alone: a block without a scheduler."""

    def test_mpiexec_here(self) -> None:
        from tests.test_mpi_slurm import build_hello, ranks

        program = build_hello(os.path.abspath(self.mktemp()))
        for name in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "FUNCX_BLOCK_NODES"):
            if name in os.environ:
                _Environment(self, **{name: os.environ[name]})
                del os.environ[name]
        _Environment(self, FUNCX_MPI_LAUNCHER="auto")  # mpiexec outside a Slurm job
        spec = check_resource_specification({"num_ranks": 2})
        buffer = add_resources_header(task_buffer(MPIFunction(program, walltime=60)), spec)
        result = run(TaskRunner(), buffer)
        got = ranks(result)
        self.assertEqual([(r, s, t) for r, s, _, t in got], [(0, 2, 1), (1, 2, 1)])
        self.assertEqual(deserialize(result.data).cmd, f"$PARSL_MPI_PREFIX {program}")

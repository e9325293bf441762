"""Blocks on a real Slurm cluster, through Parsl's SlurmProvider (unchanged).

The cluster (:mod:`funcx_endpoint.testing.slurm`) has two compute nodes, each a
``slurmd`` in a network namespace of its own with its own address and host name;
the controller and the interchange are on the host side of the bridge.  A block is
one Slurm job of ``nodes_per_block=2`` launched with ``SrunLauncher``: a manager
starts on each node and connects back to the interchange over the bridge.

These tests build the interchange, the block scaler and the strategy directly (on
the real reactor, with short polling intervals); ``SlurmEndpointTests`` runs the
endpoint daemon through the real CLI with a real service.  One cluster serves the
whole test process; it is torn down when the process exits.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from funcx_endpoint.config import model as config_model
from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.endpoint.tap import manager_command
from funcx_endpoint.executor.blocks import BlockScaler
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.executor.providers import JobState, ProviderAdapter
from funcx_endpoint.executor.strategy import ScalingService, SimpleStrategy
from funcx_endpoint.executor.walltime import WalltimeWatch
from funcx_endpoint.testing.interchanges import CollectingSink
from funcx_endpoint.testing.slurm import SlurmCluster, SlurmUnavailable, shared_cluster_async
from funcx_endpoint.wire import Result, Task, deserialize, pack_function, pack_payload
from funcx_endpoint.wire.errors import ErrorCode
from tests.support import CLIEndpoint, alive, endpoint_processes, wait_for
from tests.test_end_to_end import wait_result

log = Logger(namespace="tests.test_slurm")

# -- functions the workers run (sent as source) ------------------------------------


def where(seconds):
    import socket
    import time

    time.sleep(seconds)
    return socket.gethostname()


def outlast(job_id):
    """Sleep until killed in Slurm job ``job_id``; elsewhere return this job's id."""
    import os
    import time

    if os.environ.get("SLURM_JOB_ID") == job_id:
        time.sleep(3600)
    return os.environ.get("SLURM_JOB_ID")


# -- helpers ------------------------------------------------------------------------


def parsl_modules() -> Any:
    try:
        from parsl.addresses import address_by_interface
        from parsl.channels import LocalChannel
        from parsl.launchers import SrunLauncher
        from parsl.providers import SlurmProvider
    except ImportError as e:
        raise SkipTest(f"Parsl is not installed (pip install -e '.[parsl]'): {e}") from None
    return SlurmProvider, SrunLauncher, LocalChannel, address_by_interface


async def get_cluster() -> SlurmCluster:
    try:
        return await shared_cluster_async(reactor)
    except SlurmUnavailable as e:
        raise SkipTest(str(e)) from None


def slurm_provider(cluster: SlurmCluster, **settings: Any) -> Any:
    """Parsl's SlurmProvider, as a user would configure it, for this cluster."""
    SlurmProvider, SrunLauncher, LocalChannel, _ = parsl_modules()
    options: Dict[str, Any] = dict(
        partition=cluster.partition,
        nodes_per_block=2,
        init_blocks=1,
        min_blocks=0,
        max_blocks=1,
        walltime="00:10:00",
        exclusive=False,  # two blocks share the two nodes
        launcher=SrunLauncher(),
        # The default channel is made when Parsl is imported: before the
        # cluster's SLURM_CONF exists.
        channel=LocalChannel(envs=cluster.env),
        cmd_timeout=30,
    )
    options.update(settings)
    return SlurmProvider(**options)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await sleep(0.05)


def task(fn: Any, *args: Any) -> Task:
    return Task(str(uuid.uuid4()), pack_function(fn) + pack_payload(args, {}))


class Rig:
    """An interchange on the cluster's bridge address and the scaling of blocks
    on the cluster, with test-sized timings."""

    def __init__(
        self,
        test: TestCase,
        cluster: SlurmCluster,
        provider: Any,
        *,
        address: Optional[str] = None,
        executor_options: Optional[Dict[str, Any]] = None,
        max_retries: int = 1,
        max_idletime: float = 60.0,
        give_up_after: Optional[int] = None,
        drain_margin: Optional[float] = None,
    ) -> None:
        self.cluster = cluster
        self.results: List[Result] = []
        work = os.path.abspath(test.mktemp())
        os.makedirs(work)
        self.work = work
        self.executor = config_model.HighThroughputExecutor(
            provider=config_model.LocalProvider(),  # unused: the Parsl provider is below
            address=address or cluster.address,
            max_workers_per_node=1,
            prefetch_capacity=0,
            max_retries_on_system_failure=max_retries,
            **(executor_options or {}),
        )
        self.interchange = Interchange(
            reactor,
            os.path.join(work, "interchange"),
            self.executor,
            CollectingSink(self.results.extend),
            heartbeat_period=1.0,
            heartbeat_threshold=10.0,
            stop_grace_period=3.0,
        )
        self.adapter = ProviderAdapter(provider, reactor, working_dir=work)
        self.interchange.startService()
        self.scaler = BlockScaler(
            self.adapter,
            self.interchange,
            reactor,
            manager_command(self.interchange),
            job_name_prefix="funcx.test",
            prompt_poll_interval=0.5,
            first_poll_delay=1.0,
        )
        self.strategy = SimpleStrategy(
            self.scaler,
            self.interchange,
            reactor,
            interval=0.3,
            max_idletime=max_idletime,
            backoff_base=0.5,
            backoff_cap=2.0,
            give_up_after=give_up_after,
        )
        self.walltimes: Optional[WalltimeWatch] = None
        if drain_margin is not None:
            assert self.adapter.walltime is not None
            self.walltimes = WalltimeWatch(
                self.scaler,
                self.interchange,
                reactor,
                self.adapter.walltime,
                drain_margin,
                interval=0.3,
            )
            self.strategy.walltimes = self.walltimes
        self.service = ScalingService(self.scaler, self.strategy, self.walltimes)
        self.started = time.monotonic()
        self.service.startService()
        test.addCleanup(self.stop)

    async def stop(self) -> None:
        if self.service.running:
            await self.service.stopService()
        if self.interchange.running:
            await self.interchange.stopService()

    def managers(self) -> List[Any]:
        return self.interchange.managers()

    def hostnames(self) -> List[str]:
        return sorted(m.hostname for m in self.managers())

    def results_by_id(self) -> Dict[str, Result]:
        return {r.task_id: r for r in self.results}

    async def our_jobs(self) -> List[Dict[str, str]]:
        """Our jobs as ``squeue`` lists them (asked in a thread)."""
        jobs = await self.cluster.in_thread(reactor, self.cluster.jobs)
        return [j for j in jobs if j["name"].startswith("funcx.test.block-")]

    async def wait_for_jobs(
        self, predicate: Callable[[List[Dict[str, str]]], bool], timeout: float, what: str
    ) -> List[Dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = await self.our_jobs()
            if predicate(jobs):
                return jobs
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: squeue says {jobs}")
            await sleep(0.1)


def manager_processes(cluster: SlurmCluster) -> List[psutil.Process]:
    """The manager processes on the cluster's nodes."""
    found = []
    for proc in cluster.node_processes():
        try:
            if "funcx_endpoint.manager" in proc.cmdline():
                found.append(proc)
        except psutil.Error:
            pass
    return found


class SlurmBlockTests(TestCase):
    timeout = 120

    def test_two_nodes_run_tasks(self) -> Deferred[None]:
        return ensureDeferred(self._two_nodes())

    async def _two_nodes(self) -> None:
        cluster = await get_cluster()
        _, _, _, address_by_interface = parsl_modules()
        # As a config.py on a cluster says where managers connect back to.
        address = address_by_interface(cluster.bridge)
        self.assertEqual(address, cluster.address)
        rig = Rig(self, cluster, slurm_provider(cluster), address=address)
        await wait_until(lambda: len(rig.managers()) == 2, 60, "a manager on each node")
        managers_up = time.monotonic() - rig.started
        self.assertEqual(rig.hostnames(), ["node0", "node1"])
        # They came over the bridge, from the nodes' own addresses.
        peers = sorted(
            m.connection.peer.rsplit(":", 1)[0] for m in rig.interchange.registry.managers.values()
        )
        self.assertEqual(peers, sorted(n.address for n in cluster.nodes))
        [block] = rig.scaler.blocks()
        [job] = await rig.our_jobs()
        self.assertEqual(job["id"], str(block.job_id))
        self.assertEqual(job["nodes"], "node[0-1]")

        # The secret is only in the info file: not on the managers' command lines
        # or in their environments, not in the submit script or the launcher's
        # script (written in the job's working directory, ours).
        secret = rig.interchange.registry.secret
        processes = manager_processes(cluster)
        self.assertEqual(len(processes), 2)
        for proc in processes:
            self.assertIn("--info-file", proc.cmdline())
            self.assertNotIn(secret, " ".join(proc.cmdline()))
            self.assertNotIn(secret, repr(proc.environ()))
        scripts = [
            os.path.join(rig.work, "submit_scripts", n)
            for n in os.listdir(os.path.join(rig.work, "submit_scripts"))
        ]
        scripts += [n for n in os.listdir(".") if n.startswith("cmd_funcx.test.block-")]
        self.assertGreaterEqual(len(scripts), 2)
        for path in scripts:
            with open(path, errors="replace") as f:
                self.assertNotIn(secret, f.read())

        submitted = time.monotonic()
        tasks = [task(where, 1.0) for _ in range(6)]
        rig.interchange.submit(tasks)
        await wait_until(lambda: rig.results, 60, "a first result")
        first_result = time.monotonic() - submitted
        await wait_until(lambda: len(rig.results) == 6, 60, "every result")
        self.assertFalse([r for r in rig.results if r.is_error])
        self.assertEqual({deserialize(r.data) for r in rig.results}, {"node0", "node1"})

        # The scheduler's accounting (what Parsl's provider reads) may say
        # PENDING for a moment after the job's processes run, on a slow machine.
        async def running() -> bool:
            await rig.scaler.poll()
            return bool(rig.scaler.describe_blocks()[0]["state"] == "RUNNING")

        deadline = time.monotonic() + 30
        while not await running() and time.monotonic() < deadline:
            await deferLater(reactor, 1.0, lambda: None)
        [described] = rig.scaler.describe_blocks()
        self.assertEqual(described["job_id"], str(block.job_id))
        self.assertEqual(described["state"], "RUNNING")
        self.assertEqual(described["nodes"], ["node0", "node1"])
        self.assertEqual(described["managers"], "2/2")
        self.assertGreater(described["walltime_left"], 500)
        self.assertLessEqual(described["walltime_left"], 600)
        await rig.stop()
        # Cancelled at the stop (they take a moment to leave squeue).
        await rig.wait_for_jobs(lambda jobs: not jobs, 30, "the job to end")
        log.info(
            "Timings: cluster start {cluster:.1f}s; block submitted to two managers "
            "connected {managers:.1f}s; tasks submitted to first result {first:.1f}s",
            cluster=cluster.started_in or 0.0,
            managers=managers_up,
            first=first_result,
        )

    def test_scale_out_under_load_and_in_when_idle(self) -> Deferred[None]:
        return ensureDeferred(self._scale())

    async def _scale(self) -> None:
        cluster = await get_cluster()
        provider = slurm_provider(cluster, init_blocks=0, max_blocks=2)
        rig = Rig(self, cluster, provider, max_idletime=1.0)
        # One worker per manager, two per block: 10 tasks of 1.5 s want 5 blocks.
        rig.interchange.submit([task(where, 1.5) for _ in range(10)])
        await wait_until(lambda: len(rig.managers()) == 4, 60, "two blocks' managers")
        self.assertEqual(len(rig.scaler.active_blocks()), 2)
        jobs = await rig.wait_for_jobs(lambda jobs: len(jobs) == 2, 10, "two jobs")
        self.assertEqual({j["state"] for j in jobs}, {"RUNNING"})
        self.assertEqual(sorted(h for h in rig.hostnames()), ["node0", "node0", "node1", "node1"])
        await wait_until(lambda: len(rig.results) == 10, 60, "every result")
        self.assertFalse([r for r in rig.results if r.is_error])
        # Idle for max_idletime: both blocks are cancelled (min_blocks 0), with scancel.
        await wait_until(lambda: not rig.scaler.active_blocks(), 30, "scale-in")
        await rig.wait_for_jobs(lambda jobs: not jobs, 30, "the jobs to end")
        await wait_until(lambda: not rig.managers(), 30, "the managers to leave")
        self.assertEqual(
            sorted(b.state.name for b in rig.scaler.ended_blocks()), ["CANCELLED", "CANCELLED"]
        )
        self.assertEqual(rig.scaler.failed_starts, 0)

    def test_scancel_gives_a_retry_then_manager_lost(self) -> Deferred[None]:
        return ensureDeferred(self._scancel())

    async def _scancel(self) -> None:
        cluster = await get_cluster()
        rig = Rig(self, cluster, slurm_provider(cluster), max_retries=1)
        long_task = task(where, 300.0)
        rig.interchange.submit([long_task])
        record = rig.interchange.dispatcher.record(long_task.task_id)
        assert record is not None
        for attempt in (1, 2):
            # The task runs on a manager of a block; an administrator cancels the job.
            await wait_until(
                lambda: record.attempts == attempt and record.slot,  # noqa: B023
                60,
                f"attempt {attempt} to start",
            )
            [block] = rig.scaler.active_blocks()
            await wait_until(lambda: block.job_id is not None, 10, "the job id")  # noqa: B023
            await cluster.in_thread(reactor, cluster.scancel, str(block.job_id))
            if attempt == 1:
                # Lost with its managers: queued again, for a new block.
                await wait_until(
                    lambda: record.slot is None or record.attempts == 2,
                    30,
                    "the task to be queued again",
                )
                self.assertEqual(rig.results, [])
        await wait_until(lambda: rig.results, 30, "the task's result")
        [result] = rig.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.MANAGER_LOST)
        self.assertIn("tried 2 time(s)", result.data)
        self.assertIn("max_retries_on_system_failure is 1", result.data)
        # The scheduler said the jobs were cancelled: not failed starts.
        await wait_until(lambda: len(rig.scaler.ended_blocks()) == 2, 30, "both blocks' ends")
        self.assertEqual(
            [b.state for b in rig.scaler.ended_blocks()], [JobState.CANCELLED, JobState.CANCELLED]
        )
        self.assertEqual(rig.scaler.failed_starts, 0)

    def test_bad_partition_backs_off_and_fails_waiting_tasks(self) -> Deferred[None]:
        return ensureDeferred(self._bad_partition())

    async def _bad_partition(self) -> None:
        cluster = await get_cluster()
        provider = slurm_provider(cluster, partition="nosuch", init_blocks=0, min_blocks=0)
        rig = Rig(self, cluster, provider, give_up_after=3)
        waiting = [task(where, 0.0) for _ in range(3)]
        rig.interchange.submit(waiting)
        await wait_until(lambda: rig.results, 60, "the waiting tasks to fail")
        self.assertEqual(len(rig.results), 3)
        for result in rig.results:
            assert result.error_details is not None
            self.assertEqual(result.error_details.code, ErrorCode.BLOCK_START_FAILED)
            self.assertIn("Invalid partition name specified", result.data)
            self.assertIn("3 failed start(s) in a row with the slurm provider", result.data)
        error = rig.scaler.last_error or ""
        self.assertIn("sbatch: error: invalid partition specified: nosuch", error)
        self.assertEqual(rig.scaler.status_fields()["blocks"]["last_error"], error)
        # Backed off: 0.5, 1, 2 s between attempts, not a submission per tick (0.3 s).
        ended = rig.scaler.ended_blocks()
        self.assertEqual(len(ended), 3)
        gaps = [b.submitted_at - a.submitted_at for a, b in zip(ended, ended[1:])]
        self.assertGreaterEqual(gaps[0], 0.5)
        self.assertGreaterEqual(gaps[1], 1.0)
        self.assertEqual(await rig.our_jobs(), [])


class SlurmWalltimeTests(TestCase):
    timeout = 200

    def test_stream_across_a_walltime(self) -> Deferred[None]:
        """Blocks of a one-minute walltime: a stream of short tasks goes on
        across the first block's end with no task lost or failed.  The block
        drains 15 s before its walltime ends, its replacement is running by
        then; a task still running when Slurm kills the job at its walltime
        is retried on the replacement without counting an attempt
        (``max_retries_on_system_failure=0``: counted, it would fail)."""
        return ensureDeferred(self._stream())

    async def _stream(self) -> None:
        cluster = await get_cluster()
        provider = slurm_provider(cluster, walltime="00:01:00", init_blocks=1, max_blocks=1)
        rig = Rig(self, cluster, provider, max_retries=0, drain_margin=15.0)
        await wait_until(lambda: len(rig.managers()) == 2, 60, "block 0's managers")
        [first] = rig.scaler.blocks()
        # A task that runs as long as block 0 does, then quickly elsewhere.
        stuck = task(outlast, str(first.job_id))
        rig.interchange.submit([stuck])
        submitted = 1
        while stuck.task_id not in rig.results_by_id():
            if rig.interchange.outstanding_tasks() < 4:
                rig.interchange.submit([task(where, 0.01) for _ in range(2)])
                submitted += 2
            await sleep(0.02)
            self.assertLess(time.monotonic() - rig.started, 180, "the stream takes too long")
        await wait_until(lambda: len(rig.results) == submitted, 30, "every result")
        failed = [r for r in rig.results if r.is_error]
        self.assertEqual(failed, [])
        result = rig.results_by_id()[stuck.task_id]
        self.assertNotEqual(deserialize(result.data), str(first.job_id))
        # Block 0 drained, and Slurm ended it at its walltime (TIMEOUT).
        await wait_until(
            lambda: any(b.block_id == "0" for b in rig.scaler.ended_blocks()), 30, "block 0's end"
        )
        [ended] = [b for b in rig.scaler.ended_blocks() if b.block_id == "0"]
        self.assertTrue(ended.draining)
        self.assertEqual(ended.state, JobState.TIMEOUT)
        self.assertEqual(rig.scaler.failed_starts, 0)
        log.info(
            "Walltime stream: {n} tasks, {failed} failed, across block 0's end",
            n=submitted,
            failed=len(failed),
        )


# -- the endpoint daemon through the real CLI, with a real service --------------------


def slurm_config(text: str, cluster: SlurmCluster, partition: str, **executor: str) -> str:
    """``config.py`` as ``configure`` wrote it, with Parsl's SlurmProvider for the cluster."""
    provider = (
        "provider=SlurmProvider(\n"
        f"                partition={partition!r},\n"
        "                nodes_per_block=2,\n"
        "                init_blocks=1,\n"
        "                min_blocks=1,\n"
        "                max_blocks=1,\n"
        '                walltime="00:10:00",\n'
        "                exclusive=False,\n"
        "                launcher=SrunLauncher(),\n"
        "            ),\n"
    )
    start = text.index("provider=LocalProvider(")
    end = text.index("# Scale out under load")
    text = text[:start] + provider + "            " + text[end:]
    text = (
        "from parsl.launchers import SrunLauncher\nfrom parsl.providers import SlurmProvider\n"
        + text
    )
    changes = {
        'address="127.0.0.1"': f"address={cluster.address!r}",
        'max_workers_per_node=float("inf")': "max_workers_per_node=1",
        "strategy=SimpleStrategy(interval=5,": "strategy=SimpleStrategy(interval=1,",
        "stop_grace_period=10,": "stop_grace_period=3,",
    }
    changes.update(executor)
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


class SlurmEndpointTests(SynchronousTestCase):
    """``funcx-endpoint start`` with Parsl's SlurmProvider in ``config.py``."""

    def setUp(self) -> None:
        from funcx_endpoint.testing.slurm import shared_cluster

        parsl_modules()
        try:
            self.cluster = shared_cluster()
        except SlurmUnavailable as e:
            raise SkipTest(str(e)) from None
        self.config_dir = os.path.abspath(self.mktemp())
        self.endpoints: Dict[str, CLIEndpoint] = {}

    def start(self, name: str, partition: str) -> EndpointDir:
        # The daemon's sbatch, squeue, sacct and scancel in the user's environment.
        endpoint = self.endpoints[name] = CLIEndpoint(self.config_dir, name, self.cluster.env)
        endpoint.configure(lambda text: slurm_config(text, self.cluster, partition))
        started = endpoint.start()
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        self.addCleanup(self.stop, name, endpoint.ep)
        return endpoint.ep

    def stop(self, name: str, ep: EndpointDir) -> None:
        pid = ep.read_pid()
        stopped = self.endpoints[name].stop()
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        if pid is not None:
            self.assertEqual(alive(endpoint_processes(ep, pid)), [])
        # The daemon cancelled its jobs (scancel) as it stopped.
        self.assertTrue(
            wait_for(lambda: not self.jobs_of(ep), 30), f"jobs left: {self.jobs_of(ep)}"
        )

    def jobs_of(self, ep: EndpointDir) -> List[Dict[str, str]]:
        return [job for job in self.cluster.jobs() if job["name"].startswith("funcx.htex.block-")]

    def status(self, name: str) -> str:
        return self.endpoints[name].status()

    def client(self) -> Any:
        return self.endpoints["slurm"].client()

    def test_tasks_run_on_both_nodes(self) -> None:
        ep = self.start("slurm", "debug")
        self.assertTrue(
            wait_for(lambda: "managers: 2" in self.status("slurm"), 60), self.status("slurm")
        )
        client = self.client()
        self.addCleanup(client.close)
        function_id = client.register_function(where)
        endpoint_id = ep.endpoint_id()
        tasks = [
            client.run(1.0, endpoint_id=endpoint_id, function_id=function_id) for _ in range(6)
        ]
        hosts = {wait_result(client, t) for t in tasks}
        self.assertEqual(hosts, {"node0", "node1"})
        [job] = self.jobs_of(ep)
        status = self.status("slurm")
        self.assertIn("blocks: provider slurm, active 1", status)
        self.assertRegex(
            status,
            rf"block 0, job {job['id']}, (RUNNING|PENDING), nodes node0 node1, managers 2/2, "
            r"walltime left (9m|10m)",
        )

    def test_bad_partition_is_reported_and_backs_off(self) -> None:
        ep = self.start("badpart", "nosuch")
        scheduler_said = "sbatch: error: Batch job submission failed: Invalid partition name"
        self.assertTrue(
            wait_for(lambda: scheduler_said in self.status("badpart"), 30),
            self.status("badpart"),
        )
        asked = time.monotonic()
        status = self.status("badpart")
        # One failed start, or two on a slow machine (the backoff is 10 s, then 20 s).
        failures = int(re.search(r"failed starts in a row (\d+)", status).group(1))
        self.assertIn(failures, (1, 2), status)
        self.assertIn("last error", status)
        self.assertIn("sbatch: error: invalid partition specified: nosuch", status)
        held = re.search(r"backoff remaining ([\d.]+)", status)
        remaining = float(held.group(1)) if held else 0.0
        time.sleep(3)  # min_blocks=1 asks for a block every second: held back
        status = self.status("badpart")
        if time.monotonic() - asked < remaining:
            # Still within the backoff the first answer named: no new attempt.
            self.assertIn(f"failed starts in a row {failures}", status)
            self.assertRegex(status, r"backoff remaining [1-9]")
        else:  # a slow machine: at most the one attempt the backoff allowed
            self.assertRegex(status, rf"failed starts in a row ({failures}|{failures + 1})\b")
            failures = int(re.search(r"failed starts in a row (\d+)", status).group(1))
        with open(ep.log_file(None)) as f:
            log = f.read()
        # Parsl's own records, in the endpoint's log under their logger's name.
        self.assertRegex(log, r"\[error\] \[parsl\.providers\.slurm\.slurm\] Submit command failed")
        self.assertIn("STDERR:sbatch: error: invalid partition specified: nosuch", log)
        # Ours: the block's failure with the scheduler's words, and the hold.
        self.assertRegex(
            log,
            r"Block 0 could not be submitted to the slurm provider: .*Invalid "
            r"partition name specified",
        )
        self.assertIn("Not starting blocks for", log)
        # One submission per backoff period, not one per strategy tick (the
        # next period may have ended since status was read).
        submitted = len(re.findall(r"\] Block \d+ could not be submitted", log))
        self.assertIn(submitted, (failures, failures + 1))
        self.assertEqual(self.jobs_of(ep), [])

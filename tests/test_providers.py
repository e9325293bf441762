"""Tests for funcx_endpoint.executor.providers: the interface, the adapter, LocalProvider.

Unit tests run LocalProvider on the fake process reactor with a fake
``killpg``; integration tests (``RealProcessTests``) spawn real processes and
check the process table with psutil.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, cast

import psutil
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from funcx_endpoint.config import model as config_model
from funcx_endpoint.executor.providers import (
    IAsyncProvider,
    IExecutionProvider,
    INonBlockingProvider,
    JobState,
    JobStatus,
    LocalProvider,
    ProviderAdapter,
    SubmitError,
    parse_walltime,
    provider_from_config,
    scheduler_message,
)
from funcx_endpoint.executor.providers.base import read_tail
from funcx_endpoint.executor.providers.local import FINISHED_KEPT, SETSID_SHIM
from funcx_endpoint.executor.providers.ranks import (
    GROUP_POLL_INTERVAL,
    GROUP_POLL_MAX_INTERVAL,
    KILL_WAIT,
    IProcessGroups,
)
from funcx_endpoint.testing.procreactor import FakeProcess, MemoryProcessReactor


def _make_dir(test: Any) -> str:
    """A new empty directory under trial's temporary directory."""
    path = test.mktemp()
    os.makedirs(path)
    return os.path.abspath(path)


@implementer(IProcessGroups)
class FakeGroups:
    """Fake process groups (``ProcessGroups``) over the fake reactor's processes.

    A group is alive while its leader runs, or while the test keeps
    ``remnants`` in it (processes the leader left behind); it exists (``killpg(pgid, 0)``
    succeeds) also while the test keeps ``zombies`` in it.  ``scans`` has the
    clock's time of each (slow) ``alive`` call.
    """

    def __init__(self, reactor: MemoryProcessReactor) -> None:
        self.reactor = reactor
        self.sent: List[Tuple[int, int]] = []
        self.remnants: Set[int] = set()
        self.zombies: Set[int] = set()
        self.not_yet: Set[int] = set()  # leaders that have not called setsid()
        self.scans: List[float] = []

    def _leader(self, pgid: int) -> Optional[FakeProcess]:
        for process in self.reactor.processes:
            if process.original_pid == pgid:
                return process
        return None

    def _live(self, pgid: int) -> bool:
        leader = self._leader(pgid)
        return (leader is not None and not leader.exited and pgid not in self.not_yet) or (
            pgid in self.remnants
        )

    def exists(self, pgid: int) -> bool:
        return self._live(pgid) or pgid in self.zombies

    def alive(self, pgid: int) -> bool:
        self.scans.append(self.reactor.seconds())
        return self._live(pgid)

    def signal(self, pgid: int, signum: int) -> None:
        if not self.exists(pgid):
            raise ProcessLookupError(pgid)
        self.sent.append((pgid, signum))


class LocalProviderUnitTests(SynchronousTestCase):
    """LocalProvider on the fake process reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryProcessReactor()
        self.groups = FakeGroups(self.reactor)
        self.dir = _make_dir(self)
        self.addCleanup(self.assertNoDelayedCalls)

    def assertNoDelayedCalls(self) -> None:
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def provider(self, **kwargs: Any) -> LocalProvider:
        kwargs.setdefault("groups", self.groups)
        kwargs.setdefault("stop_grace_period", 10.0)
        kwargs.setdefault("python", "/usr/bin/python3")
        return LocalProvider(self.reactor, os.path.join(self.dir, "blocks"), **kwargs)

    def test_interfaces(self) -> None:
        provider = self.provider()
        self.assertTrue(verifyObject(INonBlockingProvider, provider))
        self.assertTrue(verifyObject(IExecutionProvider, provider))
        adapter = ProviderAdapter(provider, self.reactor)
        self.assertTrue(verifyObject(IAsyncProvider, adapter))
        self.assertFalse(adapter.blocking)
        self.assertEqual(adapter.label, "local")
        self.assertEqual(adapter.status_polling_interval, 1.0)

    def test_submit_spawns_in_own_session(self) -> None:
        provider = self.provider(worker_init="module load x", nodes_per_block=1)
        job_id = provider.submit("funcx-manager --block-id 3", 1, job_name="funcx.block-3")
        self.assertEqual(job_id, "local.0")
        [process] = self.reactor.processes
        self.assertEqual(process.executable, "/usr/bin/python3")
        self.assertEqual(
            process.args,
            [
                "/usr/bin/python3",
                "-S",
                "-c",
                SETSID_SHIM,
                "/bin/sh",
                "-c",
                "module load x\nfuncx-manager --block-id 3",
            ],
        )
        self.assertEqual(process.env["FUNCX_JOB_ID"], "local.0")
        self.assertEqual(process.env["FUNCX_JOB_NAME"], "funcx.block-3")
        self.assertEqual(process.env["FUNCX_JOB_RANK"], "0")
        # stdout/stderr go to files, not pipes, so nothing waits on them.
        self.assertEqual(process.open_pipes, {})
        for suffix in ("stdout", "stderr"):
            path = os.path.join(self.dir, "blocks", f"local.0.0.{suffix}")
            self.assertTrue(os.path.exists(path))
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        [status] = provider.status([job_id])
        self.assertEqual(status.state, JobState.RUNNING)
        self.assertEqual(status.stderr_path, os.path.join(self.dir, "blocks", "local.0.0.stderr"))
        self.assertEqual(provider.submit("x", 1), "local.1")

    def test_without_process_groups(self) -> None:
        provider = self.provider(process_groups=False)
        provider.submit("run", 1)
        [process] = self.reactor.processes
        self.assertEqual(process.args, ["/bin/sh", "-c", "run"])

    def test_copies(self) -> None:
        """nodes_per_block * tasks_per_node processes, as Parsl's SingleNodeLauncher."""
        provider = self.provider(nodes_per_block=2)
        provider.submit("run", 1)
        self.assertEqual(len(self.reactor.processes), 2)
        provider.submit("run", 2)
        self.assertEqual(len(self.reactor.processes), 6)
        ranks = [p.env["FUNCX_JOB_RANK"] for p in self.reactor.processes[2:]]
        self.assertEqual(ranks, ["0", "1", "2", "3"])
        self.assertEqual(self.reactor.processes[2].env["FUNCX_JOB_SIZE"], "4")

    def test_completed(self) -> None:
        provider = self.provider()
        job_id = provider.submit("run", 1)
        self.reactor.processes[0].simulate_exit(0)
        [status] = provider.status([job_id])
        self.assertEqual((status.state, status.exit_code), (JobState.COMPLETED, 0))
        self.assertTrue(status.terminal)
        self.successResultOf(provider.when_gone(job_id))

    def test_ended_jobs_are_dropped_once_reported(self) -> None:
        provider = self.provider()
        done = provider.submit("run", 1)
        cancelled = provider.submit("run", 1)
        first, second = self.reactor.processes
        first.simulate_exit(0)
        self.assertIn(done, provider.resources)  # ended, not reported yet
        [status] = provider.status([done])
        self.assertEqual(status.state, JobState.COMPLETED)
        self.assertNotIn(done, provider.resources)
        self.assertEqual(provider.status([done])[0].state, JobState.COMPLETED)  # remembered
        self.successResultOf(provider.when_gone(done))
        self.assertEqual(provider.cancel([cancelled]), [True])
        provider.status([])
        self.assertIn(cancelled, provider.resources)  # still stopping
        second.simulate_killed(signal.SIGTERM)
        self.reactor.advance(GROUP_POLL_INTERVAL)
        provider.status([])
        self.assertEqual(provider.resources, {})
        self.assertEqual(provider.status([cancelled])[0].state, JobState.CANCELLED)

    def test_finished_statuses_are_bounded(self) -> None:
        provider = self.provider()
        ids = []
        for index in range(FINISHED_KEPT + 5):
            ids.append(provider.submit("run", 1))
            self.reactor.processes[index].simulate_exit(1)
            provider.status([ids[-1]])
        self.assertEqual(provider.resources, {})
        self.assertEqual(provider.status([ids[0]])[0].state, JobState.MISSING)
        self.assertEqual(provider.status([ids[-1]])[0].state, JobState.FAILED)
        self.assertEqual(len(provider._finished), FINISHED_KEPT)

    def test_failed_with_code(self) -> None:
        provider = self.provider()
        job_id = provider.submit("run", 1)
        self.reactor.processes[0].simulate_exit(3)
        [status] = provider.status([job_id])
        self.assertEqual((status.state, status.exit_code), (JobState.FAILED, 3))
        self.assertIn("exited with code 3", status.message)
        self.assertTrue(str(status.stderr_path).endswith("local.0.0.stderr"))

    def test_failed_by_signal(self) -> None:
        provider = self.provider()
        job_id = provider.submit("run", 1)
        self.reactor.processes[0].simulate_killed(signal.SIGSEGV)
        [status] = provider.status([job_id])
        self.assertEqual((status.state, status.exit_code), (JobState.FAILED, -signal.SIGSEGV))
        self.assertIn("killed by SIGSEGV", status.message)

    def test_partial_failure(self) -> None:
        """The job runs while any rank runs; it failed if any rank failed."""
        provider = self.provider(nodes_per_block=2)
        job_id = provider.submit("run", 1)
        first, second = self.reactor.processes
        second.simulate_exit(2)
        self.assertEqual(provider.status([job_id])[0].state, JobState.RUNNING)
        first.simulate_exit(0)
        [status] = provider.status([job_id])
        self.assertEqual((status.state, status.exit_code), (JobState.FAILED, 2))
        self.assertIn("rank 1", status.message)
        self.assertIn("1 of 2 processes failed", status.message)
        self.assertTrue(str(status.stderr_path).endswith("local.0.1.stderr"))

    def test_unknown_job_is_missing(self) -> None:
        provider = self.provider()
        [status] = provider.status(["nope"])
        self.assertEqual(status.state, JobState.MISSING)
        self.assertEqual(provider.cancel(["nope"]), [False])

    def test_cancel_terms_the_group(self) -> None:
        provider = self.provider()
        job_id = provider.submit("run", 1)
        process = self.reactor.processes[0]
        self.assertEqual(provider.cancel([job_id]), [True])
        self.assertEqual(self.groups.sent, [(process.original_pid, signal.SIGTERM)])
        self.assertEqual(provider.status([job_id])[0].state, JobState.CANCELLED)
        self.assertEqual(provider.cancel([job_id]), [False])
        gone = provider.when_gone(job_id)
        self.assertNoResult(gone)
        process.simulate_killed(signal.SIGTERM)
        self.reactor.advance(GROUP_POLL_INTERVAL)
        self.successResultOf(gone)
        self.assertEqual(provider.status([job_id])[0].state, JobState.CANCELLED)

    def test_cancel_kills_after_grace(self) -> None:
        provider = self.provider(stop_grace_period=3.0)
        job_id = provider.submit("run", 1)
        process = self.reactor.processes[0]
        pgid = process.original_pid
        provider.cancel([job_id])
        gone = provider.when_gone(job_id)
        self.reactor.advance(2.9)
        self.assertEqual(self.groups.sent, [(pgid, signal.SIGTERM)])
        self.reactor.advance(0.1)
        self.assertEqual(self.groups.sent, [(pgid, signal.SIGTERM), (pgid, signal.SIGKILL)])
        self.assertNoResult(gone)
        process.simulate_killed(signal.SIGKILL)
        self.reactor.advance(GROUP_POLL_INTERVAL)
        self.successResultOf(gone)

    def test_kill_ignored_gives_up(self) -> None:
        """A process that survives KILL (stuck in the kernel) does not hang the stop forever."""
        provider = self.provider(stop_grace_period=1.0)
        job_id = provider.submit("run", 1)
        events: List[Dict[str, Any]] = []
        provider.reaper.log = Logger(observer=cast(ILogObserver, events.append))
        provider.cancel([job_id])
        gone = provider.when_gone(job_id)
        stopped = provider.stopService()
        self.reactor.advance(1.0)
        self.reactor.pump([GROUP_POLL_INTERVAL] * int(KILL_WAIT / GROUP_POLL_INTERVAL + 2))
        self.successResultOf(stopped)
        self.assertNoResult(gone)  # when_gone waits for real; stopService gave up
        self.assertTrue(any("giving up" in e["log_format"] for e in events))
        self.reactor.processes[0].simulate_killed(signal.SIGKILL)
        self.reactor.advance(GROUP_POLL_INTERVAL)
        self.successResultOf(gone)

    def test_signal_before_setsid(self) -> None:
        """If the group does not exist yet, the process itself is signalled."""
        provider = self.provider()
        job_id = provider.submit("run", 1)
        process = self.reactor.processes[0]
        self.groups.not_yet.add(process.original_pid)
        provider.cancel([job_id])
        self.assertEqual(self.groups.sent, [])
        self.assertEqual(process.signals, ["TERM"])
        process.simulate_killed(signal.SIGTERM)
        self.reactor.advance(GROUP_POLL_INTERVAL)
        self.successResultOf(provider.when_gone(job_id))

    def test_leftovers_are_stopped(self) -> None:
        """When a rank's process exits, what it left in its group gets TERM, then KILL."""
        provider = self.provider(stop_grace_period=2.0)
        job_id = provider.submit("run", 1)
        process = self.reactor.processes[0]
        pgid = process.original_pid
        self.groups.remnants.add(pgid)
        process.simulate_exit(0)
        self.assertEqual(self.groups.sent, [(pgid, signal.SIGTERM)])
        self.assertEqual(provider.status([job_id])[0].state, JobState.COMPLETED)
        gone = provider.when_gone(job_id)
        self.reactor.advance(2.0)
        self.assertEqual(self.groups.sent[-1], (pgid, signal.SIGKILL))
        self.groups.remnants.clear()
        self.reactor.advance(GROUP_POLL_INTERVAL)
        self.successResultOf(gone)

    def test_poll_backs_off(self) -> None:
        """A stopping group is checked after 0.1 s, then at doubling intervals up to 1 s."""
        provider = self.provider(stop_grace_period=10.0)
        provider.submit("run", 1)
        process = self.reactor.processes[0]
        pgid = process.original_pid
        self.groups.remnants.add(pgid)
        process.simulate_exit(0)
        self.assertEqual(self.groups.sent, [(pgid, signal.SIGTERM)])
        delays = []
        while self.groups.sent[-1][1] != signal.SIGKILL:
            [call] = self.reactor.getDelayedCalls()
            delay = call.getTime() - self.reactor.seconds()
            delays.append(round(delay, 6))
            self.reactor.advance(delay + 1e-9)
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8] + [GROUP_POLL_MAX_INTERVAL] * 8 + [0.5])
        # One scan of the process table per check (the first two when the
        # rank ended: is something left? has TERM done it?), not every 0.1 s.
        self.assertEqual(len(self.groups.scans), 2 + len(delays) + 1)
        self.groups.remnants.clear()
        self.reactor.advance(GROUP_POLL_INTERVAL)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_no_scan_while_the_leader_runs_or_once_the_group_is_gone(self) -> None:
        """The process table is scanned only while the group still exists after
        its leader ended; otherwise ``killpg(pgid, 0)`` answers."""
        provider = self.provider(stop_grace_period=3.0)
        job_id = provider.submit("run", 1)
        process = self.reactor.processes[0]
        provider.cancel([job_id])
        gone = provider.when_gone(job_id)
        self.reactor.advance(2.0)  # TERM ignored for a while
        process.simulate_killed(signal.SIGTERM)
        self.successResultOf(gone)
        self.assertEqual(self.groups.scans, [])

    def test_group_scan_runs_in_a_thread(self) -> None:
        """The scan runs through ``run_in_thread``; the polls of a rank share one scan."""
        scans: List[Tuple[Any, Tuple[Any, ...], Deferred[bool]]] = []

        def in_thread(f: Any, *args: Any) -> Deferred[bool]:
            d: Deferred[bool] = Deferred()
            scans.append((f, args, d))
            return d

        provider = self.provider(run_in_thread=in_thread)
        job_id = provider.submit("run", 1)
        process = self.reactor.processes[0]
        pgid = process.original_pid
        self.groups.remnants.add(pgid)
        process.simulate_exit(0)
        [(f, args, scan)] = scans
        self.assertEqual((f, args), (self.groups.alive, (pgid,)))
        self.assertEqual(self.groups.scans, [])  # not on the reactor thread
        self.assertEqual(self.groups.sent, [])  # nothing stopped before the answer
        gone = provider.when_gone(job_id)
        self.assertEqual(len(scans), 1)  # shared
        scan.callback(f(*args))
        self.assertEqual(self.groups.sent, [(pgid, signal.SIGTERM)])
        self.assertEqual(len(scans), 2)  # the stop's first check
        self.assertNoResult(gone)
        self.groups.remnants.clear()
        self.groups.zombies.add(pgid)  # killed, not reaped yet
        scans[1][2].callback(scans[1][0](*scans[1][1]))
        self.successResultOf(gone)  # the stop's check found it gone: when_gone's poll too
        self.assertEqual(len(scans), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_failed_scan_counts_as_alive(self) -> None:
        scans: List[Deferred[bool]] = []

        def in_thread(f: Any, *args: Any) -> Deferred[bool]:
            scans.append(Deferred())
            return scans[-1]

        provider = self.provider(run_in_thread=in_thread)
        events: List[Dict[str, Any]] = []
        provider.reaper.log = Logger(observer=cast(ILogObserver, events.append))
        provider.submit("run", 1)
        process = self.reactor.processes[0]
        self.groups.remnants.add(process.original_pid)
        process.simulate_exit(0)
        scans[0].errback(psutil.AccessDenied())
        self.assertEqual(self.groups.sent, [(process.original_pid, signal.SIGTERM)])
        [event] = [e for e in events if "Could not check" in e["log_format"]]
        self.assertIsInstance(event["log_failure"].value, psutil.AccessDenied)
        self.groups.remnants.clear()
        scans[1].callback(False)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_zombies_only_are_not_stopped(self) -> None:
        """A group holding only zombies after its leader ended counts as gone."""
        provider = self.provider()
        job_id = provider.submit("run", 1)
        process = self.reactor.processes[0]
        self.groups.zombies.add(process.original_pid)
        process.simulate_exit(0)
        self.assertEqual(self.groups.sent, [])
        self.successResultOf(provider.when_gone(job_id))
        self.assertEqual(provider.status([job_id])[0].state, JobState.COMPLETED)
        self.assertNotIn(job_id, provider.resources)

    def test_stop_service_waits_for_every_process(self) -> None:
        provider = self.provider(nodes_per_block=2)
        provider.startService()
        first = provider.submit("run", 1)
        second = provider.submit("run", 1)
        self.reactor.processes[0].simulate_exit(0)  # one rank had already ended
        stopped = provider.stopService()
        running = self.reactor.running_processes()
        self.assertEqual(len(running), 3)
        self.assertEqual(
            sorted(pgid for pgid, _ in self.groups.sent), sorted(p.original_pid for p in running)
        )
        self.assertEqual(provider.status([first, second])[1].state, JobState.CANCELLED)
        for process in running[:-1]:
            process.simulate_killed(signal.SIGTERM)
        self.reactor.advance(GROUP_POLL_INTERVAL)
        self.assertNoResult(stopped)
        running[-1].simulate_exit(0)
        self.reactor.advance(GROUP_POLL_INTERVAL)
        self.successResultOf(stopped)
        self.assertRaises(SubmitError, provider.submit, "run", 1)

    def test_job_ids_go_on_after_a_restart(self) -> None:
        """A new run does not overwrite the output of the blocks of an earlier one."""
        blocks = os.path.join(self.dir, "blocks")
        os.makedirs(blocks)
        for name in ("local.7.0.stdout", "local.12.1.stderr", "other.99.0.stdout", "local.x"):
            with open(os.path.join(blocks, name), "w"):
                pass
        provider = self.provider()
        provider.startService()
        self.assertEqual(provider.submit("run", 1), "local.13")
        stopped = provider.stopService()
        self.reactor.processes[0].simulate_killed(signal.SIGTERM)
        self.reactor.advance(GROUP_POLL_INTERVAL)
        self.successResultOf(stopped)

    def test_stop_with_nothing_running(self) -> None:
        provider = self.provider()
        provider.startService()
        self.successResultOf(provider.stopService())

    def test_spawn_error(self) -> None:
        provider = self.provider(nodes_per_block=2)
        self.reactor.spawn_error = OSError("fork failed")
        error = self.assertRaises(SubmitError, provider.submit, "run", 1)
        self.assertIn("fork failed", str(error))

    def test_spawn_error_stops_started_ranks(self) -> None:
        provider = self.provider(nodes_per_block=2)
        real_spawn = self.reactor.spawnProcess
        calls = []

        def spawn(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:
                raise OSError("out of processes")
            return real_spawn(*args, **kwargs)

        self.reactor.spawnProcess = spawn  # type: ignore[method-assign]
        self.assertRaises(SubmitError, provider.submit, "run", 1)
        [process] = self.reactor.processes
        self.assertEqual(self.groups.sent, [(process.original_pid, signal.SIGTERM)])
        stopped = provider.stopService()
        process.simulate_killed(signal.SIGTERM)
        self.reactor.advance(GROUP_POLL_INTERVAL)
        self.successResultOf(stopped)

    def test_unwritable_working_dir(self) -> None:
        path = os.path.join(self.dir, "file")
        with open(path, "w"):
            pass
        provider = LocalProvider(self.reactor, os.path.join(path, "blocks"), groups=self.groups)
        self.assertRaises(SubmitError, provider.submit, "run", 1)
        self.assertEqual(self.reactor.processes, [])


class FakeParslStatus:
    """A status object of another library (as Parsl's JobStatus)."""

    class _State:
        def __init__(self, name: str) -> None:
            self.name = name

    def __init__(self, name: str, exit_code: Optional[int] = None) -> None:
        self.state = self._State(name)
        self.message = "from parsl"
        self.exit_code = exit_code
        self.stdout_path = None
        self.stderr_path = "/x/err"


class BlockingProvider:
    """A provider in Parsl's style: not marked non-blocking; records its threads."""

    label = "blocking"
    init_blocks = 1
    min_blocks = 0
    max_blocks = 4
    nodes_per_block = 2
    parallelism = 0.5
    status_polling_interval = 7
    cores_per_node = 16

    def __init__(self) -> None:
        self.resources: Dict[Any, Any] = {}
        self.script_dir: Optional[str] = None
        self.threads: List[threading.Thread] = []
        self.release = threading.Event()
        self.release.set()
        self.concurrent = 0
        self.most_concurrent = 0
        self.lock = threading.Lock()
        self.job_id: Any = "123"

    def _enter(self) -> None:
        with self.lock:
            self.threads.append(threading.current_thread())
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        self.release.wait(10)
        time.sleep(0.01)
        with self.lock:
            self.concurrent -= 1

    def submit(self, command: str, tasks_per_node: int, job_name: str = "parsl.auto") -> Any:
        self._enter()
        return self.job_id

    def status(self, job_ids: Sequence[Any]) -> List[Any]:
        self._enter()
        return [FakeParslStatus("FAILED", 3) for _ in job_ids]

    def cancel(self, job_ids: Sequence[Any]) -> List[bool]:
        self._enter()
        return [True for _ in job_ids]


class AdapterUnitTests(SynchronousTestCase):
    """ProviderAdapter's attributes and conversions (no threads needed)."""

    def test_attributes(self) -> None:
        adapter = ProviderAdapter(BlockingProvider(), MemoryProcessReactor())
        self.assertTrue(verifyObject(IAsyncProvider, adapter))
        self.assertTrue(adapter.blocking)
        self.assertEqual(
            (
                adapter.label,
                adapter.init_blocks,
                adapter.min_blocks,
                adapter.max_blocks,
                adapter.nodes_per_block,
                adapter.parallelism,
                adapter.status_polling_interval,
                adapter.cores_per_node,
            ),
            ("blocking", 1, 0, 4, 2, 0.5, 7.0, 16),
        )

    def test_not_a_provider(self) -> None:
        self.assertRaises(TypeError, ProviderAdapter, object(), MemoryProcessReactor())

    def test_foreign_status(self) -> None:
        status = JobStatus.from_foreign(FakeParslStatus("TIMEOUT"))
        self.assertEqual(status.state, JobState.TIMEOUT)
        self.assertEqual(status.message, "from parsl")
        self.assertEqual(status.stderr_path, "/x/err")
        self.assertEqual(
            JobStatus.from_foreign(FakeParslStatus("NEW_STATE")).state, JobState.UNKNOWN
        )
        same = JobStatus(JobState.RUNNING)
        self.assertIs(JobStatus.from_foreign(same), same)

    def test_states(self) -> None:
        self.assertEqual(
            [s.name for s in JobState if s.terminal],
            ["CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", "MISSING", "SCALED_IN"],
        )
        self.assertEqual(int(JobState.HELD), 7)

    def test_script_dir(self) -> None:
        provider = BlockingProvider()
        work = _make_dir(self)
        adapter = ProviderAdapter(provider, MemoryProcessReactor(), working_dir=work)
        adapter.startService()
        self.assertEqual(provider.script_dir, os.path.join(work, "submit_scripts"))
        self.assertTrue(os.path.isdir(str(provider.script_dir)))

    def test_read_tail(self) -> None:
        path = os.path.join(_make_dir(self), "err")
        with open(path, "w") as f:
            f.write("a" * 100 + "the end\n")
        self.assertEqual(read_tail(path, 8), "...the end\n")
        self.assertEqual(read_tail(path, 1000), "a" * 100 + "the end\n")
        self.assertIsNone(read_tail(path + ".missing"))
        self.assertIsNone(read_tail(None))

    def test_non_blocking_called_directly(self) -> None:
        reactor = MemoryProcessReactor()
        provider = LocalProvider(reactor, _make_dir(self), process_groups=False)
        adapter = ProviderAdapter(provider, reactor)
        job_id = self.successResultOf(adapter.submit("run", 1, "job"))
        [status] = self.successResultOf(adapter.status([job_id]))
        self.assertEqual(status.state, JobState.RUNNING)
        self.assertEqual(self.successResultOf(adapter.cancel([job_id])), [True])
        self.assertEqual(reactor.processes[0].signals, ["TERM"])
        reactor.processes[0].simulate_killed(signal.SIGTERM)
        reactor.advance(GROUP_POLL_INTERVAL)
        self.assertEqual(self.successResultOf(adapter.status([])), [])
        self.assertIsNone(self.successResultOf(adapter.read_tail(None)))

    def test_false_job_id(self) -> None:
        @implementer(INonBlockingProvider)
        class Refuses(BlockingProvider):
            def submit(self, command: str, tasks_per_node: int, job_name: str = "") -> Any:
                return None

        adapter = ProviderAdapter(Refuses(), MemoryProcessReactor())
        self.failureResultOf(adapter.submit("run", 1, "job"), SubmitError)

    def test_wrong_number_of_statuses(self) -> None:
        @implementer(INonBlockingProvider)
        class Short(BlockingProvider):
            def status(self, job_ids: Sequence[Any]) -> List[Any]:
                return []

        adapter = ProviderAdapter(Short(), MemoryProcessReactor())
        self.failureResultOf(adapter.status(["1"]))


class AdapterThreadTests(TestCase):
    """A blocking provider is called in a thread, one call at a time."""

    timeout = 30

    async def _calls(self) -> None:
        provider = BlockingProvider()
        adapter = ProviderAdapter(provider, global_reactor)
        adapter.startService()
        provider.release.clear()
        submitted = adapter.submit("run", 1, "job")
        statuses = adapter.status(["123"])
        cancelled = adapter.cancel(["123"])
        self.assertNoResult(submitted)  # the reactor is not blocked meanwhile
        global_reactor.callLater(0.1, provider.release.set)
        self.assertEqual(await submitted, "123")
        [status] = await statuses
        self.assertEqual((status.state, status.exit_code), (JobState.FAILED, 3))
        self.assertEqual(await cancelled, [True])
        self.assertEqual(len(provider.threads), 3)
        self.assertNotIn(threading.main_thread(), provider.threads)
        self.assertEqual(provider.most_concurrent, 1)
        provider.release.clear()
        pending = adapter.status(["123"])
        stopped = adapter.stopService()
        await deferLater(global_reactor, 0.05)
        self.assertNoResult(stopped)  # waits for the call in its thread
        provider.release.set()
        await pending
        await stopped

    def test_calls(self) -> Deferred[None]:
        return ensureDeferred(self._calls())

    async def _errors(self) -> None:
        provider = BlockingProvider()
        provider.job_id = None
        adapter = ProviderAdapter(provider, global_reactor)
        with self.assertRaises(SubmitError):
            await adapter.submit("run", 1, "job")

    def test_errors(self) -> Deferred[None]:
        return ensureDeferred(self._errors())


class ProviderFromConfigTests(SynchronousTestCase):
    def test_local(self) -> None:
        config = config_model.LocalProvider(
            init_blocks=2,
            min_blocks=1,
            max_blocks=5,
            nodes_per_block=3,
            parallelism=0.25,
            worker_init="source env",
            cmd_timeout=12,
        )
        work = _make_dir(self)
        adapter = provider_from_config(config, MemoryProcessReactor(), work, stop_grace_period=4)
        self.assertFalse(adapter.blocking)
        native = adapter.provider
        self.assertIsInstance(native, LocalProvider)
        self.assertEqual(native.working_dir, os.path.join(work, "blocks"))
        self.assertEqual(
            (
                adapter.init_blocks,
                adapter.min_blocks,
                adapter.max_blocks,
                adapter.nodes_per_block,
                adapter.parallelism,
                native.worker_init,
                native.cmd_timeout,
                native.stop_grace_period,
            ),
            (2, 1, 5, 3, 0.25, "source env", 12, 4),
        )

    def test_other(self) -> None:
        provider = BlockingProvider()
        adapter = provider_from_config(provider, MemoryProcessReactor(), _make_dir(self))
        self.assertTrue(adapter.blocking)
        self.assertIs(adapter.provider, provider)


# -- real processes ------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_members(pgid: int) -> List[int]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            pass
    return members


class RealProcessTests(TestCase):
    """LocalProvider with real processes (the real reactor)."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = _make_dir(self)
        self.providers: List[LocalProvider] = []

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        # Whatever a failed test left running goes now.
        return ensureDeferred(self._stop_all())

    async def _stop_all(self) -> None:
        for provider in self.providers:
            if provider.running:
                await provider.stopService()

    def provider(self, **kwargs: Any) -> LocalProvider:
        kwargs.setdefault("stop_grace_period", 2.0)
        provider = LocalProvider(global_reactor, os.path.join(self.dir, "blocks"), **kwargs)
        provider.startService()
        self.providers.append(provider)
        return provider

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    async def wait_for_file(self, path: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with open(path) as f:
                    text = f.read()
                if text.endswith("\n"):
                    return text
            await deferLater(global_reactor, 0.02)
        raise AssertionError(f"{path} did not appear")

    async def wait_for_state(
        self, provider: LocalProvider, job_id: str, state: JobState, timeout: float = 10.0
    ) -> JobStatus:
        deadline = time.monotonic() + timeout
        while True:
            [status] = provider.status([job_id])
            if status.state == state:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"{job_id} is {status}, not {state.name}")
            await deferLater(global_reactor, 0.02)

    def run_async(self, f: Any) -> Deferred[None]:
        return ensureDeferred(f())

    def test_submit_status_cancel(self) -> Deferred[None]:
        async def go() -> None:
            provider = self.provider()
            pidfile = self.path("pid")
            job_id = provider.submit(f"echo $$ > {pidfile}; sleep 60", 1)
            pid = int(await self.wait_for_file(pidfile))
            self.assertEqual(os.getpgid(pid), pid)  # its own process group
            self.assertEqual(os.getsid(pid), pid)  # and session
            self.assertEqual(provider.status([job_id])[0].state, JobState.RUNNING)
            members = _group_members(pid)
            self.assertEqual(len(members), 2)  # the shell and its sleep
            started = time.monotonic()
            self.assertEqual(provider.cancel([job_id]), [True])
            await provider.when_gone(job_id)
            self.assertLess(time.monotonic() - started, 1.5)  # TERM was enough
            self.assertEqual([p for p in members if _alive(p)], [])
            self.assertEqual(provider.status([job_id])[0].state, JobState.CANCELLED)

        return self.run_async(go)

    def test_term_ignored_gets_kill(self) -> Deferred[None]:
        async def go() -> None:
            provider = self.provider(stop_grace_period=0.5)
            pidfile = self.path("pid")
            job_id = provider.submit(
                f"trap '' TERM; echo $$ > {pidfile}; while true; do sleep 0.05; done", 1
            )
            pid = int(await self.wait_for_file(pidfile))
            started = time.monotonic()
            provider.cancel([job_id])
            await deferLater(global_reactor, 0.3)
            self.assertTrue(_alive(pid))  # TERM is ignored
            await provider.when_gone(job_id)
            self.assertGreaterEqual(time.monotonic() - started, 0.5)
            self.assertFalse(_alive(pid))
            self.assertEqual(_group_members(pid), [])

        return self.run_async(go)

    def test_stop_service_leaves_nothing(self) -> Deferred[None]:
        async def go() -> None:
            provider = self.provider(nodes_per_block=2, stop_grace_period=1.0)
            command = (
                f"sleep 60 & echo $! > {self.dir}/child.$FUNCX_JOB_ID.$FUNCX_JOB_RANK; "
                f"echo $$ > {self.dir}/pid.$FUNCX_JOB_ID.$FUNCX_JOB_RANK; wait"
            )
            jobs = [provider.submit(command, 1), provider.submit(command, 1)]
            # One that ignores TERM, and a grandchild that escapes into the background.
            ignoring = provider.submit(
                f"trap '' TERM; (sleep 60 &); echo $$ > {self.dir}/pid.ignoring; "
                "while true; do sleep 0.05; done",
                1,
            )
            pids = []
            for job_id in jobs:
                for rank in (0, 1):
                    pids.append(int(await self.wait_for_file(self.path(f"pid.{job_id}.{rank}"))))
                    pids.append(int(await self.wait_for_file(self.path(f"child.{job_id}.{rank}"))))
            leader = int(await self.wait_for_file(self.path("pid.ignoring")))
            groups = {os.getpgid(p) for p in pids} | {leader}
            self.assertEqual(len(groups), 5)
            everything = [m for g in groups for m in _group_members(g)]
            self.assertGreaterEqual(len(everything), 10)
            await provider.stopService()
            self.assertEqual([p for p in everything if _alive(p)], [])
            self.assertEqual([m for g in groups for m in _group_members(g)], [])
            statuses = provider.status(jobs + [ignoring])
            self.assertEqual({s.state for s in statuses}, {JobState.CANCELLED})

        return self.run_async(go)

    def test_two_nodes_and_worker_init(self) -> Deferred[None]:
        async def go() -> None:
            provider = self.provider(
                nodes_per_block=2,
                worker_init=f"echo init-$FUNCX_JOB_RANK >> {self.dir}/order.$FUNCX_JOB_RANK; "
                "export GREETING=hello",
            )
            job_id = provider.submit(
                f"echo $GREETING-$$ >> {self.dir}/order.$FUNCX_JOB_RANK", 1, job_name="two"
            )
            status = await self.wait_for_state(provider, job_id, JobState.COMPLETED)
            self.assertEqual(status.exit_code, 0)
            lines = [
                (await self.wait_for_file(self.path(f"order.{rank}"))).split() for rank in (0, 1)
            ]
            self.assertEqual([line[0] for line in lines], ["init-0", "init-1"])
            pids = [int(line[1].split("-")[1]) for line in lines]
            self.assertTrue(all(line[1].startswith("hello-") for line in lines))
            self.assertNotEqual(pids[0], pids[1])

        return self.run_async(go)

    def test_failure_and_output(self) -> Deferred[None]:
        async def go() -> None:
            provider = self.provider()
            job_id = provider.submit("echo to-out; echo oops >&2; exit 3", 1)
            status = await self.wait_for_state(provider, job_id, JobState.FAILED)
            self.assertEqual(status.exit_code, 3)
            self.assertEqual(read_tail(status.stderr_path), "oops\n")
            self.assertEqual(read_tail(status.stdout_path), "to-out\n")

        return self.run_async(go)

    def test_leftover_child_is_stopped(self) -> Deferred[None]:
        async def go() -> None:
            provider = self.provider(stop_grace_period=1.0)
            childfile = self.path("child")
            job_id = provider.submit(f"sleep 60 & echo $! > {childfile}", 1)
            child = int(await self.wait_for_file(childfile))
            await self.wait_for_state(provider, job_id, JobState.COMPLETED)
            await provider.when_gone(job_id)
            self.assertFalse(_alive(child))

        return self.run_async(go)

    def test_environment(self) -> Deferred[None]:
        async def go() -> None:
            provider = self.provider(env={"PATH": os.environ["PATH"], "ONLY": "this"})
            out = self.path("env")
            job_id = provider.submit(f"echo $ONLY $HOME $FUNCX_JOB_ID > {out}", 1)
            await self.wait_for_state(provider, job_id, JobState.COMPLETED)
            self.assertEqual((await self.wait_for_file(out)).split(), ["this", job_id])

        return self.run_async(go)


class ParslLocalProviderTests(TestCase):
    """The adapter with Parsl's own LocalProvider, when parsl is importable.

    Parsl is not a dependency; run with parsl on ``sys.path`` (appended after
    the project's venv) to include this test.
    """

    timeout = 60

    def setUp(self) -> None:
        try:
            from parsl.providers import LocalProvider as ParslLocalProvider
        except ImportError:
            raise self.skipTest("parsl is not installed") from None
        self.provider = ParslLocalProvider(init_blocks=0, max_blocks=1)

    def test_submit_status_cancel(self) -> Deferred[None]:
        async def go() -> None:
            work = _make_dir(self)
            adapter = ProviderAdapter(self.provider, global_reactor, working_dir=work)
            adapter.startService()
            self.assertTrue(adapter.blocking)
            pidfile = os.path.join(work, "pid")
            job_id = await adapter.submit(f"echo $$ > {pidfile}; sleep 60", 1, "parsl-test")
            deadline = time.monotonic() + 20
            while not os.path.exists(pidfile) and time.monotonic() < deadline:
                await deferLater(global_reactor, 0.05)
            [status] = await adapter.status([job_id])
            self.assertEqual(status.state, JobState.RUNNING)
            self.assertEqual(await adapter.cancel([job_id]), [True])
            while time.monotonic() < deadline:
                [status] = await adapter.status([job_id])
                if status.terminal:
                    break
                await deferLater(global_reactor, 0.1)
            self.assertEqual(status.state, JobState.CANCELLED)
            await adapter.stopService()
            sys.stdout.write(f"parsl LocalProvider via the adapter: {status!r}\n")

        return ensureDeferred(go())


class ParslSubmitException(Exception):
    """What Parsl's providers raise when ``sbatch`` (or ``qsub``...) fails: its
    output and exit code as attributes, its ``str`` not for people."""

    def __init__(self, job_name: str, message: str, stdout: Any, stderr: Any, retcode: int) -> None:
        self.job_name = job_name
        self.message = message
        self.stdout = stdout
        self.stderr = stderr
        self.retcode = retcode

    def __str__(self) -> str:
        return f"Cannot launch job {self.job_name}: {self.message}; recode={self.retcode}"


class SchedulerMessageTests(SynchronousTestCase):
    """A failed submit says what the batch scheduler said."""

    SBATCH = (
        "sbatch: error: invalid partition specified: nosuch\n"
        "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
    )

    def test_scheduler_message(self) -> None:
        error = ParslSubmitException("j", "Could not read job ID", "", self.SBATCH, 1)
        self.assertEqual(
            scheduler_message(error),
            "sbatch: error: invalid partition specified: nosuch; "
            "sbatch: error: Batch job submission failed: Invalid partition name specified",
        )
        only_stdout = ParslSubmitException("j", "m", b"qsub: Unknown queue\n", None, 2)
        self.assertEqual(scheduler_message(only_stdout), "qsub: Unknown queue")
        self.assertIsNone(scheduler_message(RuntimeError("no output")))
        many = ParslSubmitException("j", "m", "", "\n".join(f"line {i}" for i in range(20)), 1)
        self.assertEqual(scheduler_message(many), "; ".join(f"line {i}" for i in range(14, 20)))

    def test_adapter_submit_error_names_the_scheduler_message(self) -> None:
        @implementer(INonBlockingProvider)
        class Refused(BlockingProvider):
            def submit(self, command: str, tasks_per_node: int, job_name: str = "") -> Any:
                raise ParslSubmitException(
                    job_name, "Could not read job ID", "", SchedulerMessageTests.SBATCH, 1
                )

        adapter = ProviderAdapter(Refused(), MemoryProcessReactor())
        failure = self.failureResultOf(adapter.submit("run", 1, "funcx.block-3"), SubmitError)
        error = failure.value
        self.assertEqual(
            str(error),
            "the blocking scheduler refused funcx.block-3 (exit code 1): sbatch: error: invalid "
            "partition specified: nosuch; sbatch: error: Batch job submission failed: Invalid "
            "partition name specified",
        )
        self.assertIn("Invalid partition name specified", error.scheduler_message)
        self.assertIsInstance(error.__cause__, ParslSubmitException)

    def test_other_submit_errors(self) -> None:
        @implementer(INonBlockingProvider)
        class Broken(BlockingProvider):
            def submit(self, command: str, tasks_per_node: int, job_name: str = "") -> Any:
                raise OSError("sbatch: not found")

        adapter = ProviderAdapter(Broken(), MemoryProcessReactor())
        error = self.failureResultOf(adapter.submit("run", 1, "job"), SubmitError).value
        self.assertEqual(str(error), "OSError: sbatch: not found")
        self.assertIsNone(error.scheduler_message)


class WalltimeTests(SynchronousTestCase):
    def test_parse_walltime(self) -> None:
        for text, seconds in (
            ("00:10:00", 600.0),
            ("01:00:30", 3630.0),
            ("30", 1800.0),
            ("10:30", 630.0),
            ("2-00", 2 * 86400.0),
            ("1-02:03", 86400.0 + 2 * 3600 + 3 * 60),
            ("1-00:00:10", 86410.0),
            (15, 900.0),
        ):
            self.assertEqual(parse_walltime(text), seconds, text)
        for bad in (None, "", "soon", "1:2:3:4", "x-01:00", 0, "00:00:00", True):
            self.assertIsNone(parse_walltime(bad), bad)

    def test_adapter_walltime(self) -> None:
        provider = BlockingProvider()
        adapter = ProviderAdapter(provider, MemoryProcessReactor())
        self.assertIsNone(adapter.walltime)  # none given
        provider.walltime = "00:30:00"  # type: ignore[attr-defined]
        self.assertEqual(adapter.walltime, 1800.0)

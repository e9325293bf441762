"""Idle shutdown as funcX 1.0 defines it: the counts (IdleClock), the daemon's part
on a Clock (IdleShutdown), the transport's activity, the clean shutdown, and a
real daemon that exits by itself once idle."""

from __future__ import annotations

import os
import time
from typing import Any, List

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.endpoint.idle import Activity, Change, IdleClock, IdleShutdown, IdleState
from funcx_endpoint.endpoint.layout import EndpointDir, EndpointState
from funcx_endpoint.endpoint.service import EndpointService, StartupReporter
from funcx_endpoint.lifecycle import IStatusPart
from tests.support import (
    alive,
    configure_endpoint,
    endpoint_processes,
    run_cli,
    sdk_client,
    wait_for,
)
from tests.test_transport_units import TransportTestCase, make_tasks

# Activity values: nothing done yet; work done and nothing outstanding; work outstanding.
NOTHING = Activity(moved=0, outstanding=0)


def done(moved: int) -> Activity:
    return Activity(moved=moved, outstanding=0)


def busy(moved: int, outstanding: int = 1) -> Activity:
    return Activity(moved=moved, outstanding=outstanding)


class IdleClockTests(SynchronousTestCase):
    """The counts of funcX 1.0.13's endpoint interchange, heartbeat by heartbeat."""

    def test_off_by_default(self) -> None:
        clock = IdleClock(0, 5760)
        self.assertFalse(clock.enabled)
        self.assertEqual(clock.state, IdleState.OFF)
        for _ in range(10_000):
            self.assertIsNone(clock.beat(NOTHING))
        self.assertEqual((clock.soft, clock.hard), (0, 0))
        self.assertIsNone(clock.heartbeats_left())

    def test_soft_limit_after_work_when_nothing_is_outstanding(self) -> None:
        clock = IdleClock(3, 5760)
        self.assertEqual(clock.beat(busy(2)), None)  # a task came: active
        self.assertEqual(clock.beat(done(4)), None)  # its result went: still moving
        self.assertEqual(clock.state, IdleState.ACTIVE)
        self.assertEqual(clock.beat(done(4)), Change.BECAME_IDLE)
        self.assertEqual((clock.soft, clock.hard, clock.heartbeats_left()), (1, 1, 2))
        self.assertEqual(clock.beat(done(4)), None)
        self.assertEqual(clock.beat(done(4)), Change.SOFT_LIMIT)
        self.assertEqual(clock.state, IdleState.SHUTTING_DOWN)
        self.assertEqual(clock.heartbeats_left(), 0)
        self.assertIsNone(clock.beat(done(4)))  # said once

    def test_movement_resets_both_counts(self) -> None:
        clock = IdleClock(3, 10)
        clock.beat(done(2))
        clock.beat(done(2))
        clock.beat(done(2))
        self.assertEqual((clock.soft, clock.hard), (2, 2))
        self.assertEqual(clock.beat(busy(3)), Change.BECAME_ACTIVE)
        self.assertEqual((clock.soft, clock.hard, clock.state), (0, 0, IdleState.ACTIVE))
        self.assertIsNone(clock.beat(busy(4)))  # moving again: nothing to say

    def test_no_soft_count_before_any_work(self) -> None:
        """Never idle before the first task; only the hard count runs (funcX 1.0)."""
        clock = IdleClock(2, 5)
        self.assertIsNone(clock.beat(NOTHING))
        self.assertIsNone(clock.beat(NOTHING))
        self.assertEqual(clock.beat(NOTHING), Change.BECAME_POSSIBLY_IDLE)  # hard 3 > soft 2
        self.assertEqual(clock.state, IdleState.POSSIBLY_IDLE)
        self.assertEqual(clock.soft, 0)
        self.assertIsNone(clock.beat(NOTHING))
        self.assertIsNone(clock.beat(NOTHING))
        self.assertEqual(clock.heartbeats_left(), 1)
        self.assertEqual(clock.beat(NOTHING), Change.HARD_LIMIT)  # hard 6 > limit 5
        self.assertEqual(clock.hard, 6)

    def test_hard_limit_with_work_outstanding(self) -> None:
        """A task that never comes back: the hard count ends it, the soft one never runs."""
        clock = IdleClock(1, 4)
        clock.beat(busy(1))
        changes = [clock.beat(busy(1)) for _ in range(5)]
        self.assertEqual(
            changes, [None, Change.BECAME_POSSIBLY_IDLE, None, None, Change.HARD_LIMIT]
        )
        self.assertEqual(clock.soft, 0)

    def test_hard_limit_is_at_least_soft_plus_one(self) -> None:
        self.assertEqual(IdleClock(10, 3).hard_limit, 11)
        self.assertEqual(IdleClock(10, 5760).hard_limit, 5760)
        clock = IdleClock(2, 0)
        changes = [clock.beat(busy(1)) for _ in range(5)]
        # moved; then hard 1, 2, 3 (> soft 2: possibly idle), 4 (> limit 3: shut down)
        self.assertEqual(
            changes, [None, None, None, Change.BECAME_POSSIBLY_IDLE, Change.HARD_LIMIT]
        )

    def test_results_from_an_earlier_run_count_as_work(self) -> None:
        """A result sent from the spool moves like any other (funcX 1.0 counted it too)."""
        clock = IdleClock(1, 10)
        clock.beat(done(1))  # the spooled result went out: moved
        self.assertEqual(clock.beat(done(1)), Change.SOFT_LIMIT)

    def test_soft_limit_one(self) -> None:
        clock = IdleClock(1, 5760)
        clock.beat(done(2))
        self.assertEqual(clock.beat(done(2)), Change.SOFT_LIMIT)


class IdleShutdownTests(SynchronousTestCase):
    """The daemon's idle part on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.activity = NOTHING
        self.reasons: List[str] = []
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def part(self, soft: int, hard: int = 5760, period: float = 30.0) -> IdleShutdown:
        return IdleShutdown(
            self.clock, period, IdleClock(soft, hard), lambda: self.activity, self.reasons.append
        )

    def logged(self) -> List[str]:
        from twisted.logger import formatEvent

        return [
            formatEvent(e) for e in self.events if e.get("log_namespace", "").endswith("Shutdown")
        ]

    def test_off_schedules_nothing(self) -> None:
        part = self.part(0)
        part.startService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(part.status_fields(), {"idle_shutdown": {"state": "off"}})
        self.assertTrue(IStatusPart.providedBy(part))
        part.stopService()

    def test_shuts_down_once_after_soft_limit(self) -> None:
        part = self.part(2, period=10)
        part.startService()
        self.activity = done(2)
        self.clock.advance(10)  # moved since start
        self.assertEqual(part.status_fields()["idle_shutdown"]["state"], "active")
        self.clock.advance(10)  # idle 1/2
        self.assertEqual(
            part.status_fields(),
            {
                "idle_shutdown": {
                    "state": "idle",
                    "idle_heartbeats": "1/2",
                    "no_movement_heartbeats": "1/5760",
                    "shut_down_in": "10s",
                }
            },
        )
        self.assertEqual(self.reasons, [])
        self.clock.advance(10)  # idle 2/2
        self.assertEqual(len(self.reasons), 1)
        self.assertIn("idle_heartbeats_soft=2", self.reasons[0])
        self.assertEqual(part.status_fields()["idle_shutdown"]["state"], "shutting down")
        # The loop ended: no further beats, no second shutdown.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        logged = self.logged()
        self.assertIn("In idle state", logged[0])
        self.assertIn("shutting down in 10s", logged[0])
        self.assertIn("Shutting down: idle for 2 heartbeats of 10s", logged[1])
        part.stopService()

    def test_hard_limit_is_a_warning(self) -> None:
        part = self.part(1, hard=3, period=1)
        part.startService()
        self.activity = busy(1)
        self.clock.pump([1] * 5)
        self.assertEqual(len(self.reasons), 1)
        self.assertIn("idle_heartbeats_hard=3", self.reasons[0])
        warnings = [e for e in self.events if e.get("log_level") is LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        part.stopService()

    def test_becoming_active_is_logged(self) -> None:
        part = self.part(3, period=1)
        part.startService()
        self.activity = done(1)
        self.clock.pump([1, 1])
        self.activity = done(2)
        self.clock.advance(1)
        self.assertIn("Moved to active state", self.logged()[-1])
        part.stopService()

    def test_stop_ends_the_loop(self) -> None:
        part = self.part(5)
        part.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        part.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TransportActivityTests(TransportTestCase):
    """The transport counts tasks taken and results confirmed, and what is outstanding."""

    def test_activity(self) -> None:
        self.start()
        self.assertEqual(self.transport.activity(), Activity(0, 0))
        tasks = make_tasks(2)
        self.publish_tasks(tasks)
        self.assertEqual(self.transport.activity(), Activity(2, 2))
        self.interchange.answer([tasks[0].task_id])
        self.settle()
        # Published, not yet confirmed: still outstanding, not yet moved.
        activity = self.transport.activity()
        self.assertEqual(activity.moved, 2)
        self.assertGreater(activity.outstanding, 0)
        self.confirm_all()
        self.assertEqual(self.transport.activity(), Activity(3, 1))
        self.interchange.answer([tasks[1].task_id])
        self.settle()
        self.confirm_all()
        self.assertEqual(self.transport.activity(), Activity(4, 0))


class FakeReactor:
    def __init__(self, running: bool) -> None:
        self.running = running
        self.stopped = 0
        self.when_running: List[Any] = []

    def stop(self) -> None:
        self.stopped += 1

    def callWhenRunning(self, f: Any) -> None:
        self.when_running.append(f)


class ShutDownTests(SynchronousTestCase):
    def test_shut_down_stops_the_reactor(self) -> None:
        ep = EndpointDir(os.path.abspath(self.mktemp()), "t")
        reactor = FakeReactor(running=True)
        EndpointService(ep, reactor, StartupReporter(None)).shut_down("idle")  # type: ignore[arg-type]
        self.assertEqual(reactor.stopped, 1)
        later = FakeReactor(running=False)
        EndpointService(ep, later, StartupReporter(None)).shut_down("idle")  # type: ignore[arg-type]
        self.assertEqual((later.stopped, later.when_running), (0, [later.stop]))


class IdleDaemonTests(SynchronousTestCase):
    """A real endpoint daemon with idle_heartbeats_soft runs a task, shows its idle
    clock in `status`, then exits by itself, cleanly."""

    def test_daemon_exits_when_idle(self) -> None:
        from funcx_endpoint.testing.service import shared_service
        from tests.test_end_to_end import add, wait_result

        service = shared_service()
        env = service.client_env(service.create_client())
        config_dir = os.path.abspath(self.mktemp())
        configured = configure_endpoint(config_dir, "idle", service, env)
        self.assertEqual(configured.returncode, 0, configured.stderr)
        ep = EndpointDir(config_dir, "idle")
        with open(ep.config_file) as f:
            text = f.read()
        # funcX 1.0's fields, as a funcX 1.0 config.py would set them.
        text = text.replace("heartbeat_period=30,", "heartbeat_period=1,")
        text = text.replace("heartbeat_threshold=120,", "heartbeat_threshold=10,")
        text = text.replace("idle_heartbeats_soft=0,", "idle_heartbeats_soft=4,")
        # A funcX 1.0 field without effect here: one warning in the log at start.
        text = text.replace("worker_debug=False,", "worker_debug=False, poll_period=100,")
        with open(ep.config_file, "w") as f:
            f.write(text)
        started = run_cli(config_dir, "start", "idle", env=env)
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        pid = ep.read_pid()
        assert pid is not None
        self.addCleanup(run_cli, config_dir, "stop", "idle", env=env)

        def status() -> str:
            return run_cli(config_dir, "status", "idle", env=env).stdout

        # Before any task: only the catch-all count runs ("possibly idle" once
        # idle_heartbeats_soft heartbeats have passed: 4 s, shorter than a slow
        # machine may take to get here).
        self.assertRegex(status(), r"idle shutdown: state (active|possibly idle)")
        client = sdk_client(env)
        function_id = client.register_function(add)
        task_id = client.run(1, 2, endpoint_id=ep.endpoint_id(), function_id=function_id)
        self.assertEqual(wait_result(client, task_id), 3)
        # The idle clock shows in `status` while it runs down.
        self.assertTrue(
            wait_for(lambda: "idle shutdown: state idle, idle heartbeats" in status(), 20),
            status(),
        )
        processes = endpoint_processes(ep, pid)
        # Then the daemon exits by itself.
        deadline = time.monotonic() + 60
        while ep.state() is EndpointState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertEqual(ep.state(), EndpointState.STOPPED, status())
        self.assertTrue(wait_for(lambda: not alive(processes), 20))
        with open(ep.log_file()) as f:
            log = f.read()
        self.assertIn("In idle state", log)
        self.assertIn("Shutting down: idle for 4 heartbeats of 1s (idle_heartbeats_soft=4)", log)
        self.assertIn("Endpoint idle stopped", log)
        self.assertEqual(log.count("HighThroughputExecutor.poll_period=100: this endpoint"), 1)
        self.assertIn("Stopped", run_cli(config_dir, "list", env=env).stdout)

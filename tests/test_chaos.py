"""The chaos suite's short variant: every fault once on the whole real stack.

The same code as ``benchmarks/chaos/run`` (:func:`funcx_endpoint.testing.chaos.run_chaos`)
with a few thousand tasks: a real RabbitMQ node, the partitionable proxy,
``funcx-service``, an endpoint daemon with two managers of two workers, and
the SDK.  The delivery promise must hold under each fault: nothing lost,
nothing answered twice, nothing hung.  Functions that ran twice are allowed
(at-least-once after a kill) and only shown.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from funcx_endpoint.testing.chaos import FAULTS, ChaosResult, format_report, run_chaos

#: Tasks of the short variant, and of the stream's window and submit batches.
TASKS = int(os.environ.get("FUNCX_CHAOS_TASKS", "5000"))
SEED = int(os.environ.get("FUNCX_CHAOS_SEED", "12"))


class ShortChaosTests(TestCase):
    # Stack start (~25 s), nine faults (the two broker ones ~15 s each here).
    timeout = 400

    def setUp(self) -> None:
        if not shutil.which("rabbitmq-server") and not os.path.exists(
            "/usr/lib/rabbitmq/bin/rabbitmq-server"
        ):
            raise SkipTest("RabbitMQ is not installed")
        self.base_dir = tempfile.mkdtemp(prefix="funcx-chaos-test-")
        self.addCleanup(shutil.rmtree, self.base_dir, True)
        self.lines: list[str] = []

    def test_every_fault_once(self) -> Deferred[None]:
        d = deferToThread(
            run_chaos,
            reactor,
            self.base_dir,
            tasks=TASKS,
            seed=SEED,
            window=400,
            batch=100,
            partition_seconds=4.0,
            recovery_timeout=90.0,
            drain_timeout=60.0,
            progress=self.lines.append,
        )
        d.addCallback(self.check)
        return d

    def check(self, result: ChaosResult) -> None:
        # The figures on the console; the run's progress too if an assertion fails.
        print("\n" + format_report(result))
        report = "\n".join(self.lines) + "\n" + format_report(result)
        struck = [r for r in result.faults if r.name != "none"]
        self.assertEqual(sorted(r.name for r in struck), sorted(FAULTS), report)
        for r in struck:
            self.assertFalse(r.detail.startswith("FAILED"), report)
            self.assertIsNotNone(r.recovery_seconds, f"{r.name} did not recover\n{report}")
        if result.spool_fs == "tmpfs":
            # The full disk was met: results went to the spool and could not be written.
            (spool,) = [r for r in struck if r.name == "spool-disk-full"]
            failed = re.search(r"(\d+) spool writes failed", spool.detail)
            self.assertTrue(failed and int(failed.group(1)) > 0, report)
        self.assertEqual(result.total("submitted"), TASKS, report)
        self.assertEqual(result.total("answered"), TASKS, report)
        self.assertEqual(result.total("lost"), 0, report)
        self.assertEqual(result.total("duplicates"), 0, report)
        self.assertEqual(result.total("hung"), 0, report)
        self.assertEqual(result.answered_without_run, 0, report)

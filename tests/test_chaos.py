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

from twisted.internet.defer import Deferred

from funcx_endpoint.testing.chaos import FAULTS, ChaosResult
from tests.support import ChaosRunTestCase

#: Tasks of the short variant, and of the stream's window and submit batches.
TASKS = int(os.environ.get("FUNCX_CHAOS_TASKS", "5000"))
SEED = int(os.environ.get("FUNCX_CHAOS_SEED", "12"))


class ShortChaosTests(ChaosRunTestCase):
    # Stack start (~25 s), nine faults (the two broker ones ~15 s each here).
    timeout = 400

    def test_every_fault_once(self) -> Deferred[None]:
        d = self.run_chaos(
            tasks=TASKS,
            seed=SEED,
            window=400,
            batch=100,
            partition_seconds=4.0,
            recovery_timeout=90.0,
            drain_timeout=60.0,
        )
        d.addCallback(self.check)
        return d

    def check(self, result: ChaosResult) -> None:
        report = self.report(result)
        struck = [r for r in result.faults if r.name != "none"]
        self.assertEqual(sorted(r.name for r in struck), sorted(FAULTS), report)
        if result.spool_fs == "tmpfs":
            # The full disk was met: results went to the spool and could not be written.
            (spool,) = [r for r in struck if r.name == "spool-disk-full"]
            failed = re.search(r"(\d+) spool writes failed", spool.detail)
            self.assertTrue(failed and int(failed.group(1)) > 0, report)
        self.assert_promise_kept(result, TASKS, report)

"""The service beyond one machine: three RabbitMQ nodes, two service instances.

The chaos suite's cluster topology (:mod:`funcx_endpoint.testing.chaos_cluster`):
a real three-node RabbitMQ cluster started by this test (quorum queues), two
``funcx-service`` instances over one PostgreSQL database, each kind of client
given one address (a failover proxy, as a TCP load balancer would be), a real
endpoint daemon, and the SDK streaming tasks.  One broker node is killed
(``kill -9``), then one service instance; every task must be answered once:
0 lost, 0 duplicated, 0 hung.  Unit tests of the parts are in
``tests/test_service_instances.py``.
"""

from __future__ import annotations

import os
import re

from twisted.internet.defer import Deferred

from funcx_endpoint.testing.chaos import ChaosResult
from tests.support import ChaosRunTestCase

TASKS = int(os.environ.get("FUNCX_CLUSTER_TASKS", "2000"))


class ClusterTests(ChaosRunTestCase):
    # Cluster (~40 s), PostgreSQL, two instances, an endpoint; two faults of ~20 s each.
    timeout = 300
    prefix = "funcx-cluster-test-"

    def test_a_broker_node_and_a_service_instance_lost(self) -> Deferred[None]:
        d = self.run_chaos(
            tasks=TASKS,
            seed=3,
            faults=["broker-kill", "service-kill"],
            window=400,
            batch=100,
            recovery_timeout=90.0,
            drain_timeout=60.0,
            topology="cluster",
        )
        d.addCallback(self.check)
        return d

    def check(self, result: ChaosResult) -> None:
        report = self.report(result)
        # Every queue the services declared is a quorum queue (replicated on the nodes).
        [queues] = [line for line in self.lines if line.startswith("queues: ")]
        self.assertIn("results quorum", queues, report)
        self.assertIn(".tasks quorum", queues, report)
        self.assertNotIn("classic", queues, report)
        struck = [r for r in result.faults if r.name != "none"]
        self.assertEqual(sorted(r.name for r in struck), ["broker-kill", "service-kill"], report)
        for r in struck:
            # The rest of the cluster served while the node (the instance) was down.
            served = re.search(r"\((\d+) tasks finished meanwhile\)", r.detail)
            self.assertTrue(served and int(served.group(1)) > 0, f"{r.name}: {r.detail}")
        self.assert_promise_kept(result, TASKS, report)

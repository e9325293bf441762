"""What each process of the endpoint imports of the project.

A manager runs on compute nodes, often many: it imports only the wire
formats, the worker package and its own (no daemon, interchange, AMQP or web
service code).  A worker imports no Twisted at all.
"""

from __future__ import annotations

import json
import subprocess
import sys

from twisted.trial.unittest import TestCase

ALLOWED_IN_MANAGER = ("funcx_endpoint.wire", "funcx_endpoint.worker", "funcx_endpoint.manager")


def imported_by(*modules: str) -> list:
    """The funcx_endpoint modules and Twisted imported by importing ``modules``, in a
    fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.startswith(('funcx_endpoint', 'twisted')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return json.loads(out.stdout)


class ProcessImportTests(TestCase):
    def test_manager_imports_only_wire_and_worker(self) -> None:
        found = imported_by("funcx_endpoint.manager.main", "funcx_endpoint.manager.service")
        ours = [m for m in found if m.startswith("funcx_endpoint")]
        others = [
            m
            for m in ours
            if m not in ("funcx_endpoint", "funcx_endpoint.version")
            and not m.startswith(ALLOWED_IN_MANAGER)
        ]
        self.assertEqual(others, [])
        self.assertIn("funcx_endpoint.wire.amp", ours)

    def test_worker_imports_no_twisted(self) -> None:
        found = imported_by("funcx_endpoint.worker.main")
        self.assertEqual([m for m in found if m.startswith("twisted")], [])
        self.assertEqual(
            [
                m
                for m in found
                if m.startswith("funcx_endpoint.")
                and not m.startswith(
                    ("funcx_endpoint.wire", "funcx_endpoint.worker", "funcx_endpoint.version")
                )
            ],
            [],
        )

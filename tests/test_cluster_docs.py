"""The example configurations of docs/cluster.rst load and build.

Each ``.. code-block:: python`` of the guide is written as an endpoint's
``config.py`` (the site's interface names replaced by ``lo``, the one every
machine has), loaded with the endpoint's loader and built into the daemon's
services on a memory reactor: the provider, its blocks' walltime and the
drain margin are what the guide says.  Nothing is submitted.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from funcx_endpoint.config import load_config
from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.endpoint.tap import build_endpoint

GUIDE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cluster.rst"
)

#: provider label, nodes_per_block, walltime (s), drain margin (s), by the section's title.
EXPECTED: Dict[str, Tuple[str, int, float, float]] = {
    "Slurm with ``SrunLauncher``": ("slurm", 2, 3600.0, 120.0),
    "PBS Pro with ``MpiExecLauncher``": ("pbspro", 2, 3600.0, 60.0),
    "Torque with ``AprunLauncher`` (Cray)": ("torque", 2, 1800.0, 60.0),
    "LSF with ``JsrunLauncher``": ("LSF", 2, 3600.0, 60.0),
    "Grid Engine": ("grid_engine", 1, 7200.0, 60.0),
    "HTCondor": ("condor", 1, 14400.0, 60.0),
    "Cobalt": ("cobalt", 2, 1800.0, 60.0),
}


def examples() -> List[Tuple[str, str]]:
    """``(section title, code)`` of every Python block of the guide."""
    with open(GUIDE) as f:
        text = f.read()
    found = []
    title = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and re.fullmatch(r"\^+", lines[i + 1]) and line.strip():
            title = line.strip()
        if line.strip() == ".. code-block:: python":
            i += 2
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
                block.append(lines[i][3:])
                i += 1
            found.append((title, "\n".join(block).strip() + "\n"))
            continue
        i += 1
    return found


class ClusterGuideExampleTests(SynchronousTestCase):
    def setUp(self) -> None:
        try:
            import parsl  # noqa: F401
        except ImportError:
            raise SkipTest("Parsl is not installed (pip install -e '.[parsl]')") from None

    def test_every_scheduler_has_an_example(self) -> None:
        self.assertEqual([title for title, _ in examples()], list(EXPECTED))

    def test_examples_load_and_build(self) -> None:
        for title, code in examples():
            label, nodes, walltime, margin = EXPECTED[title]
            code = re.sub(r'address_by_interface\("\w+"\)', 'address_by_interface("lo")', code)
            config_dir = os.path.abspath(self.mktemp())
            ep = EndpointDir(config_dir, "cluster")
            os.makedirs(ep.path)
            with open(ep.config_file, "w") as f:
                f.write(code)
            config = load_config(ep.config_file)
            service = build_endpoint(ep, config, MemoryReactorClock())
            scaling = service.getServiceNamed("providers")
            provider = scaling.scaler.provider
            self.assertEqual(provider.label, label, title)
            self.assertTrue(provider.blocking, title)  # Parsl's calls go to a thread
            self.assertEqual(provider.nodes_per_block, nodes, title)
            self.assertEqual(provider.walltime, walltime, title)
            assert scaling.walltimes is not None, title
            self.assertEqual(scaling.walltimes.margin, margin, title)
            self.assertIs(scaling.strategy.walltimes, scaling.walltimes, title)

"""Config fields for task sandboxes and the endpoint's shell hooks (Globus Compute's names).

``HighThroughputExecutor(run_in_sandbox=True)``: each task runs in its own
directory, ``<tasks_working_dir>/<task id>``, made by the worker before the
task starts (its working directory while it runs; left in place afterwards).
``tasks_working_dir`` (relative: to the endpoint directory) is
``tasks_working_dir`` by default.  The workers learn it from the variable
:data:`SANDBOX_VARIABLE` of their environment.

``Config(endpoint_setup=..., endpoint_teardown=...)``: shell commands run
before the endpoint starts serving and after it stops (see
:mod:`funcx_endpoint.endpoint.hooks`).
"""

from __future__ import annotations

import os
from typing import Dict

from funcx_endpoint.config.fields import Field, boolean, number, optional, string
from funcx_endpoint.worker.execute import SANDBOX_VARIABLE

__all__ = ["CONFIG_FIELDS", "EXECUTOR_FIELDS", "SANDBOX_VARIABLE", "sandbox_environment"]

EXECUTOR_FIELDS = {
    "run_in_sandbox": Field(
        False,
        boolean,
        "Run each task in its own directory, tasks_working_dir/<task id> (made for it).",
    ),
    "tasks_working_dir": Field(
        "tasks_working_dir",
        string(r".+", "a directory path"),
        "Directory of the task sandboxes (relative: to the endpoint directory).",
    ),
}

CONFIG_FIELDS = {
    "endpoint_setup": Field(
        None,
        optional(string()),
        "Shell command run before the endpoint registers and serves (in the endpoint "
        "directory; output in endpoint.log); a failure stops the start (exit code 78).",
    ),
    "endpoint_teardown": Field(
        None,
        optional(string()),
        "Shell command run after the endpoint has stopped (output in endpoint.log).",
    ),
    "hook_timeout": Field(
        600.0,
        number(0, exclusive_minimum=True),
        "Seconds endpoint_setup or endpoint_teardown may run before it is killed.",
    ),
}


def sandbox_environment(run_in_sandbox: bool, tasks_working_dir: str) -> Dict[str, str]:
    """The workers' variable for the sandboxes (none without them); a relative
    directory is taken from the daemon's working directory, the endpoint's."""
    if not run_in_sandbox:
        return {}
    return {SANDBOX_VARIABLE: os.path.abspath(tasks_working_dir)}

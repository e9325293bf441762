"""Callable objects to register as functions: command lines and MPI programs.

:class:`ShellFunction` runs a command line in a shell on the endpoint and
returns a :class:`ShellResult`; :class:`MPIFunction` runs it under the
endpoint's MPI launcher with the nodes and ranks of the task's resource
specification.  They follow Globus Compute's classes of the same names and
are importable from :mod:`funcx_endpoint.sdk` too.  Only the standard
library is needed where they run (the worker).
"""

from __future__ import annotations

from funcx_endpoint.functions.shell import MPIFunction, ShellFunction, ShellResult

__all__ = ["MPIFunction", "ShellFunction", "ShellResult"]

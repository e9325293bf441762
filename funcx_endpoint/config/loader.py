"""Loading ``config.py`` and reporting its problems with file and line."""

from __future__ import annotations

import os
import traceback
from typing import Any, Dict, Optional

from funcx_endpoint.config.bounds import ca_file_problem
from funcx_endpoint.config.model import Config, ConfigError


class ConfigFileError(Exception):
    """``config.py`` could not be loaded; says where and why.

    ``str()`` gives ``<file>, line <n>: <problem>`` ready to show a user.
    """

    def __init__(self, path: str, line: Optional[int], problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}, line {self.line}"
        return f"{where}: {self.problem}"


def _line_in(path: str, tb: Any) -> Optional[int]:
    """The deepest line of ``tb`` that is in the file ``path``."""
    line = None
    for frame in traceback.extract_tb(tb):
        if frame.filename == path:
            line = frame.lineno
    return line


def load_config(path: str) -> Config:
    """Run ``config.py`` at ``path`` and return the ``Config`` it defines.

    Raises :class:`ConfigFileError` for a missing or unreadable file, a syntax
    error, an exception while running it, a missing ``config`` name or one
    that is not a :class:`Config`.
    """
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as e:
        raise ConfigFileError(path, None, f"cannot read the file: {e.strerror}") from None
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise ConfigFileError(path, e.lineno, f"syntax error: {e.msg}") from None
    except ValueError as e:  # e.g. null bytes
        raise ConfigFileError(path, None, f"not a Python file: {e}") from None
    namespace: Dict[str, Any] = {"__file__": path, "__name__": "funcx_endpoint_config"}
    try:
        exec(code, namespace)
    except ConfigError as e:
        raise ConfigFileError(path, _line_in(path, e.__traceback__), str(e)) from None
    except SystemExit as e:
        raise ConfigFileError(
            path, _line_in(path, e.__traceback__), f"it called exit({e.code!r})"
        ) from None
    except Exception as e:
        raise ConfigFileError(
            path, _line_in(path, e.__traceback__), f"{type(e).__name__}: {e}"
        ) from None

    if "config" not in namespace:
        raise ConfigFileError(
            path, None, "defines no 'config'; it must assign config = Config(...)"
        )
    config = namespace["config"]
    if not isinstance(config, Config):
        raise ConfigFileError(
            path,
            None,
            f"'config' must be a Config(...), got a {type(config).__name__}",
        )
    return config


def check_files(path: str, config: Config) -> None:
    """Raise :class:`ConfigFileError` if a file ``config`` names cannot be used:
    a CA file (``service_ca_file``, ``amqp_ca_file``) that is missing,
    unreadable or holds no PEM certificate.  Run before the endpoint starts, so
    a bad file is one line and exit 78, not a traceback from a TLS handshake."""
    for name in ("service_ca_file", "amqp_ca_file"):
        ca_file = getattr(config, name)
        if ca_file:
            problem = ca_file_problem(ca_file)
            if problem:
                raise ConfigFileError(os.path.abspath(path), None, f"{name}: {problem}")


def load_runnable_config(path: str) -> Config:
    """:func:`load_config`, then :func:`check_files`: a config to start an endpoint with."""
    config = load_config(path)
    check_files(path, config)
    return config

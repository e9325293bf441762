"""A redacted tar.gz for a bug report: ``funcx-endpoint diagnose --bundle PATH``.

It holds the check list, ``config.py``, the end of the log, the daemon's
status, ``endpoint.json`` and the versions of what runs the endpoint.  Secrets
never go in: the values of every secret this machine knows of (the client
secret and other secret-looking variables of the environment, the saved
access token, every secret, password or token field of the endpoint's JSON
files, such as the managers' secret) are replaced by ``***`` wherever they
appear, and so are secrets by their shape (passwords in URLs, bearer tokens,
``secret = ...`` assignments, private keys).  The archive is checked for the
known values before it is kept.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import sys
import tarfile
import time
from typing import Any, Dict, Iterable, List, Optional, Set

from funcx_endpoint.endpoint.layout import EndpointDir

REDACTED = "***"
SECRET_KEY = re.compile(r"secret|passw|token|private|credential|api_?key", re.IGNORECASE)
#: Values shorter than this are not searched for (they would redact ordinary words).
MIN_SECRET = 6
MAX_JSON_FILE = 1024 * 1024
LOG_TAIL_BYTES = 1024 * 1024

_PATTERNS = [
    # scheme://user:password@host
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
    (re.compile(r"(\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]+"), r"\1" + REDACTED),
    # secret = "...", "password": "...", token=..., client_secret: ...
    (
        re.compile(
            r"((?:[A-Za-z_]*(?:secret|passw(?:or)?d?|token|api_?key)[A-Za-z_]*)['\"]?\s*[:=]\s*"
            r"['\"]?)([^'\"\s,}]+)",
            re.IGNORECASE,
        ),
        r"\1" + REDACTED,
    ),
    (
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
        "-----PRIVATE KEY " + REDACTED + "-----",
    ),
]


class SecretLeak(Exception):
    """A known secret survived redaction (the bundle is not written)."""


def _secret_values(data: Any, found: Set[str], under_secret_key: bool = False) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            _secret_values(value, found, under_secret_key or bool(SECRET_KEY.search(str(key))))
    elif isinstance(data, list):
        for value in data:
            _secret_values(value, found, under_secret_key)
    elif isinstance(data, str) and under_secret_key and len(data) >= MIN_SECRET:
        found.add(data)


def known_secrets(ep: EndpointDir, environ: Optional[Dict[str, str]] = None) -> Set[str]:
    """Every secret value this machine holds for the endpoint: secret-looking
    variables of the environment, and the secret fields of the JSON files of the
    config directory (tokens.json) and of the endpoint's directory tree."""
    environ = dict(os.environ if environ is None else environ)
    found: Set[str] = set()
    for name, value in environ.items():
        if SECRET_KEY.search(name) and len(value) >= MIN_SECRET:
            found.add(value)
    paths = [os.path.join(ep.config_dir, "tokens.json")]
    for root, _dirs, files in os.walk(ep.path):
        paths.extend(os.path.join(root, f) for f in files if f.endswith(".json"))
    for path in paths:
        try:
            if os.path.getsize(path) > MAX_JSON_FILE:
                continue
            with open(path) as f:
                _secret_values(json.load(f), found)
        except (OSError, ValueError):
            continue
    return found


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every value of ``secrets`` and every secret-shaped part replaced."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def versions() -> Dict[str, Any]:
    """What runs the endpoint: Python, OS, and the packages that matter."""
    from importlib import metadata

    packages: Dict[str, Optional[str]] = {}
    for name in (
        "funcx-endpoint",
        "twisted",
        "treq",
        "dill",
        "pyopenssl",
        "cryptography",
        "globus-sdk",
        "parsl",
        "psutil",
    ):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "python": sys.version,
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": packages,
    }


def _read_tail(path: str, size: int) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _read(path: str) -> Optional[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read(MAX_JSON_FILE)
    except OSError:
        return None


def bundle_members(
    ep: EndpointDir,
    log_file: str,
    checks: List[Dict[str, Any]],
    status: Dict[str, Any],
) -> Dict[str, Optional[str]]:
    """The files of the bundle (name -> text, None when absent), not yet redacted."""
    return {
        "diagnose.json": json.dumps(checks, indent=2),
        "status.json": json.dumps(status, indent=2, default=str),
        "versions.json": json.dumps(versions(), indent=2),
        "config.py": _read(ep.config_file),
        "endpoint.json": _read(ep.endpoint_json),
        "daemon.json": _read(ep.daemon_info_file),
        "endpoint.log": _read_tail(log_file, LOG_TAIL_BYTES),
    }


def write_bundle(
    path: str,
    ep: EndpointDir,
    members: Dict[str, Optional[str]],
    secrets: Set[str],
) -> List[str]:
    """Write the redacted tar.gz at ``path`` (0600); the names of its files.

    Raises SecretLeak (and writes nothing) should a known secret survive."""
    prefix = f"funcx-diagnose-{ep.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    texts = {name: redact(text, secrets) for name, text in members.items() if text is not None}
    for name, text in texts.items():
        for secret in secrets:
            if secret in text:
                raise SecretLeak(f"a secret survived redaction in {name}; bundle not written")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(buffer.getvalue())
    return sorted(texts)

"""A worker image's root filesystem, made from this machine's own Python.

No registry can be reached where the tests run, so the container images of the
tests are built locally: a tar of a minimal tree that ``podman import`` and
``docker import`` turn into an image.  The tree holds this process's Python
(its installation prefix at the same path, so that the worker in a container
is the same Python and dill as the SDK that serialized the functions), the
shared libraries it and its extension modules link, and, in its
``site-packages``, the two packages a worker imports: ``funcx_endpoint`` (this
source tree) and ``dill``.  ``python3`` is on the image's PATH
(``/usr/local/bin``), so the image runs ``python3 -m funcx_endpoint.worker``
as any worker image does.  About 60 MB; written in a few seconds.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from typing import Dict, Iterable, List, Set

import dill

import funcx_endpoint

__all__ = ["ROOTFS_EXCLUDED", "shared_libraries", "write_worker_rootfs"]

#: Parts of the standard library a worker never needs.
ROOTFS_EXCLUDED = frozenset(
    {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages"}
)
#: Extension modules a worker never needs (they link large libraries: Tk, X11).
_SKIPPED_MODULES = ("_tkinter",)

_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def shared_libraries(binaries: Iterable[str]) -> Set[str]:
    """The shared libraries (paths as the loader finds them) that ``binaries`` link."""
    found: Set[str] = set()
    for binary in binaries:
        result = subprocess.run(
            ["ldd", binary], capture_output=True, text=True, check=False, timeout=30
        )
        for line in result.stdout.splitlines():
            match = _LDD_LINE.search(line)
            if match:
                found.add(match.group(1))
    return found


def _tree(root: str, skip_top: Iterable[str] = ()) -> Iterable[str]:
    skip = set(skip_top)
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            yield os.path.join(dirpath, name)


def _package_files(package_dir: str) -> Iterable[str]:
    for path in _tree(package_dir):
        if "__pycache__" not in path and not path.endswith((".pyc", ".so.lock")):
            yield path


def write_worker_rootfs(path: str) -> Dict[str, int]:
    """Write the tar of a worker image's root filesystem to ``path``.

    Returns counts (``files``, ``bytes``) for logs.
    """
    prefix = sys.base_prefix
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = sysconfig.get_paths()["stdlib"]
    dynload = os.path.join(stdlib, "lib-dynload")
    site = os.path.join(prefix, "lib", version, "site-packages")
    python = os.path.realpath(os.path.join(prefix, "bin", version))

    files: Dict[str, str] = {}  # path in the image -> path here
    files[python] = python
    for real in _tree(stdlib, ROOTFS_EXCLUDED):
        if os.path.basename(real).startswith(_SKIPPED_MODULES) or real.endswith(".a"):
            continue
        files[real] = real
    for name in os.listdir(os.path.join(prefix, "lib")):
        if name.startswith("libpython") and ".so" in name:
            real = os.path.join(prefix, "lib", name)
            files[real] = real
    modules = [
        os.path.join(dynload, n)
        for n in os.listdir(dynload)
        if n.endswith(".so") and not n.startswith(_SKIPPED_MODULES)
    ]
    for library in shared_libraries([python, *modules]):
        files[library] = os.path.realpath(library)
    for package in (funcx_endpoint, dill):
        package_dir = os.path.dirname(os.path.abspath(package.__file__ or ""))
        name = os.path.basename(package_dir)
        for real in _package_files(package_dir):
            files[os.path.join(site, name, os.path.relpath(real, package_dir))] = real

    links = {
        "/usr/local/bin/python3": python,
        "/usr/local/bin/python": python,
        "/usr/bin/python3": python,
    }
    directories: List[str] = ["/tmp", "/etc", "/root", "/dev", "/proc", "/sys"]
    total = 0
    made: Set[str] = set()
    with tarfile.open(path, "w") as tar:

        def parents(inside: str) -> None:
            parent = os.path.dirname(inside)
            if parent in ("/", "") or parent in made:
                return
            parents(parent)
            info = tarfile.TarInfo(parent.lstrip("/"))
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
            made.add(parent)

        for directory in directories:
            info = tarfile.TarInfo(directory.lstrip("/"))
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if directory == "/tmp" else 0o755
            tar.addfile(info)
            made.add(directory)
        for inside, real in sorted(files.items()):
            parents(inside)
            info = tar.gettarinfo(real, arcname=inside.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isfile():
                total += info.size
                with open(real, "rb") as handle:
                    tar.addfile(info, handle)
            elif info.isdir():
                continue
            else:
                tar.addfile(info)
        for inside, target in links.items():
            parents(inside)
            info = tarfile.TarInfo(inside.lstrip("/"))
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
        for name, text in (
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return {"files": len(files), "bytes": total}

"""Sphinx configuration of the funcx-endpoint documentation.

Build from the repository root (warnings are errors)::

    sphinx-build -W -b html docs docs/_build/html

The package is imported from this checkout (installed or not): the
configuration tables, the command-line help and the SDK reference are made
from the code at build time.  Nothing here needs the network.
"""

from __future__ import annotations

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, os.path.join(DOCS, "_ext"))
sys.path.insert(0, ROOT)

from funcx_endpoint.version import __version__  # noqa: E402

project = "funcx-endpoint"
author = "the funcx-endpoint developers"
copyright = "the funcx-endpoint developers"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "configfields",
    "moduledocs",
    "clidoc",
]

root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list = []
html_static_path: list = []

html_theme = "alabaster"
html_title = f"funcx-endpoint {release}"
html_show_sourcelink = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
# The modules' own cross-references name private helpers and third-party
# objects (globus-sdk, Twisted) that these pages do not document.
nitpicky = False

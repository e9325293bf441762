"""Lists made from the repository's files at build time, so they cannot go stale.

``.. module-summaries:: tests/test_*.py``
    A definition list: for each file matching the pattern (relative to the
    repository root), its module name and the first paragraph of its
    docstring.  The files are read, not imported.  An ``__init__.py``
    without a docstring is left out.

``.. script-comments:: benchmarks/*/run``
    A definition list: for each matching script, the name of its directory
    and the comment block at its top (after the ``#!`` line).

Text is shown as written; only ````literals```` and Sphinx roles
(``:class:`x```) are turned into literals.
"""

from __future__ import annotations

import ast
import glob
import os
import re
from typing import List, Tuple

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

_INLINE = re.compile(r"(?::[a-z:]+:)?`{1,2}~?([^`]+?)`{1,2}")


def _inline(text: str) -> List[nodes.Node]:
    """Text with ``literals`` and roles as literal nodes, the rest as plain text."""
    result: List[nodes.Node] = []
    position = 0
    for found in _INLINE.finditer(text):
        if found.start() > position:
            result.append(nodes.Text(text[position : found.start()]))
        result.append(nodes.literal(text=found.group(1)))
        position = found.end()
    if position < len(text):
        result.append(nodes.Text(text[position:]))
    return result


def _definition_list(items: List[Tuple[str, str]]) -> nodes.definition_list:
    dl = nodes.definition_list()
    for term, text in items:
        item = nodes.definition_list_item()
        term_node = nodes.term()
        term_node += nodes.literal(text=term)
        item += term_node
        definition = nodes.definition()
        for block in [b for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]:
            paragraph = nodes.paragraph()
            paragraph.extend(_inline(" ".join(block.split())))
            definition += paragraph
        item += definition
        dl += item
    return dl


class _RepoFiles(SphinxDirective):
    required_arguments = 1

    def files(self) -> List[Tuple[str, str]]:
        root = os.path.dirname(os.path.abspath(self.env.app.confdir))
        found = sorted(glob.glob(os.path.join(root, self.arguments[0])))
        if not found:
            raise self.error(f"no file matches {self.arguments[0]!r} in {root}")
        for path in found:
            self.env.note_dependency(path)
        return [(path, os.path.relpath(path, root)) for path in found]


class ModuleSummaries(_RepoFiles):
    def run(self) -> List[nodes.Node]:
        items = []
        for path, relative in self.files():
            with open(path, encoding="utf-8") as f:
                docstring = ast.get_docstring(ast.parse(f.read()))
            module = relative[: -len(".py")].replace(os.sep, ".")
            if module.endswith(".__init__"):
                if not docstring:
                    continue  # an empty package marker says nothing
                module = module[: -len(".__init__")]
            first = (docstring or "(no docstring)").split("\n\n")[0]
            items.append((module, first))
        return [_definition_list(items)]


class ScriptComments(_RepoFiles):
    def run(self) -> List[nodes.Node]:
        items = []
        for path, relative in self.files():
            lines = []
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f):
                    if number == 0 and line.startswith("#!"):
                        continue
                    if not line.startswith("#"):
                        break
                    lines.append(line[1:].strip())
            items.append((os.path.dirname(relative), "\n".join(lines) or "(no comment)"))
        return [_definition_list(items)]


def setup(app: Sphinx) -> dict:
    app.add_directive("module-summaries", ModuleSummaries)
    app.add_directive("script-comments", ScriptComments)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

"""``.. config-fields::``: a table of the fields of a config class, made from the code.

::

    .. config-fields:: funcx_endpoint.config.model.Config

renders one row per field of the class's ``fields`` (through
``ConfigObject.describe_fields()``): the field's name, what it accepts, its
default and its documentation.  What a field accepts is asked of the field's
own check: the check is given values it must refuse, and its error message
("expected an integer >= 1, got ...") says what it expects; then it is given
``None``, ``float("inf")`` and an integer to see whether it takes those too.
So the table says what ``config.py`` really accepts, and cannot go stale.

``.. funcx10-fields:: Config`` makes the table of funcX 1.0.13's fields of
that class, their default there and their fate here, from
:data:`funcx_endpoint.config.funcx10.FUNCX10_FIELDS` and the fields themselves.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any, List, Optional, Tuple

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

MiB = 1024 * 1024
_EXPECTED = re.compile(r"^expected (.*?)(?:, got |$)", re.DOTALL)


class _Probe:
    """A value no check accepts."""

    def __repr__(self) -> str:
        return "<probe>"


def _import(path: str) -> Any:
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"config-fields needs module.Class, got {path!r}")
    return getattr(importlib.import_module(module_name), name)


def _refusal(check: Any, value: Any) -> Optional[str]:
    """What ``check`` says it expected when it refuses ``value`` (None: it accepts it)."""
    try:
        check(value)
    except (TypeError, ValueError) as e:
        found = _EXPECTED.match(str(e))
        return found.group(1).strip() if found else str(e)
    return None


def _accepts(check: Any, value: Any) -> bool:
    try:
        check(value)
    except (TypeError, ValueError):
        return False
    return True


def accepted(check: Any) -> str:
    """A description of the values ``check`` accepts, from its own error messages."""
    said = [text for text in (_refusal(check, _Probe()), _refusal(check, "\x00probe")) if text]
    text = max(said, key=len) if said else "any value"
    extras = []
    if "integer" not in text and "number" not in text and _accepts(check, 2):
        extras.append("an integer")
    if _accepts(check, math.inf) and "inf" not in text:
        extras.append('float("inf")')
    if _accepts(check, None):
        extras.append("None")
    if extras:
        text = ", or ".join([text, *extras])
    return text


def format_default(value: Any) -> str:
    """The default as it would be written in ``config.py``."""
    if isinstance(value, float) and math.isinf(value):
        return 'float("inf")'
    if isinstance(value, int) and not isinstance(value, bool) and value >= MiB and not value % MiB:
        return f"{value} ({value // MiB} MiB)"
    return repr(value)


def _paragraph(text: str, literal: bool = False) -> nodes.paragraph:
    paragraph = nodes.paragraph()
    paragraph += nodes.literal(text=text) if literal else nodes.Text(text)
    return paragraph


def _row(cells: List[Tuple[str, bool]]) -> nodes.row:
    row = nodes.row()
    for text, literal in cells:
        entry = nodes.entry()
        entry += _paragraph(text, literal)
        row += entry
    return row


class ConfigFields(SphinxDirective):
    """Renders :meth:`ConfigObject.describe_fields` of a class as a table."""

    required_arguments = 1
    has_content = False

    def run(self) -> List[nodes.Node]:
        path = self.arguments[0]
        try:
            cls = _import(path)
            described = list(cls.describe_fields())
        except Exception as e:  # an import error is a build error, said clearly
            raise self.error(f"config-fields: cannot read the fields of {path}: {e}") from None
        headers = ["Field", "Accepts", "Default", "Meaning"]
        table = nodes.table(classes=["config-fields"])
        table += nodes.title(text=f"{cls.__name__}(...) fields")
        group = nodes.tgroup(cols=len(headers))
        table += group
        for width in (18, 26, 16, 40):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        head += _row([(h, False) for h in headers])
        group += head
        body = nodes.tbody()
        for name, default, doc in described:
            check = cls.fields[name].check
            body += _row(
                [
                    (name, True),
                    (accepted(check), False),
                    (format_default(default), True),
                    (doc, False),
                ]
            )
        group += body
        return [table]


def fate(field: Any) -> str:
    """What becomes of a funcX 1.0 field here, from the field itself."""
    unused = field.unused
    if unused is None:
        return f"Honoured. {field.doc}"
    quiet = [format_default(value) for value in unused.quiet]
    if unused.partly:
        other = f" other than {', '.join(quiet)}" if quiet else ""
        return f"Honoured. {field.doc} A warning at start for a value{other}: {unused.meaning}."
    text = f"Accepted; a warning at start: {unused.meaning}."
    if quiet:
        text += f" No warning for {', '.join(quiet)}."
    return text


class Funcx10Fields(SphinxDirective):
    """``.. funcx10-fields:: Config``: each keyword argument funcX 1.0.13's class
    took (:data:`funcx_endpoint.config.funcx10.FUNCX10_FIELDS`), its default
    there, and what becomes of it here."""

    required_arguments = 1
    has_content = False
    classes = {
        "Config": "funcx_endpoint.config.model.Config",
        "HighThroughputExecutor": "funcx_endpoint.config.model.HighThroughputExecutor",
        "SimpleStrategy": "funcx_endpoint.config.model.SimpleStrategy",
    }

    def run(self) -> List[nodes.Node]:
        owner = self.arguments[0]
        try:
            from funcx_endpoint.config.funcx10 import FUNCX10_FIELDS

            cls = _import(self.classes[owner])
            names = FUNCX10_FIELDS[owner]
        except Exception as e:
            raise self.error(f"funcx10-fields: {owner}: {e}") from None
        headers = ["Field", "funcX 1.0.13 default", "Here"]
        table = nodes.table(classes=["funcx10-fields"])
        table += nodes.title(text=f"funcX 1.0.13's {owner}(...) fields")
        group = nodes.tgroup(cols=len(headers))
        table += group
        for width in (22, 20, 58):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        head += _row([(h, False) for h in headers])
        group += head
        body = nodes.tbody()
        for name, default in names.items():
            if name not in cls.fields:
                raise self.error(f"funcx10-fields: {owner}.{name} is not a field of {cls}")
            # The table writes objects as text ("SimpleStrategy()").
            shown = default if isinstance(default, str) and "(" in default else None
            body += _row(
                [
                    (name, True),
                    (shown or format_default(default), True),
                    (fate(cls.fields[name]), False),
                ]
            )
        group += body
        return [table]


def setup(app: Sphinx) -> dict:
    app.add_directive("config-fields", ConfigFields)
    app.add_directive("funcx10-fields", Funcx10Fields)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

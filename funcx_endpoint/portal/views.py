"""What the portal shows of stored values: results, tracebacks, times, and charts.

Results are funcX-serialized (``00\\n`` and base64 of a pickle).  Loading an
arbitrary pickle runs code of the pickle's choosing, so the portal loads only
plain data (numbers, strings, bytes, and lists, tuples, dicts and sets of
them): :class:`_PlainUnpickler` refuses every class and function a pickle
names.  Anything else is described, and the SDK reads it.

Charts are inline SVG drawn here from numbers (no script, no style attribute:
the Content-Security-Policy allows neither).
"""

from __future__ import annotations

import io
import pickle
import re
import time
from typing import Any, List, Optional, Sequence, Tuple

from markupsafe import Markup, escape

from funcx_endpoint.wire.serialize import METHOD_DATA

__all__ = ["ago", "describe_error", "duration", "line_chart", "show_result", "when"]

#: Results larger than this (serialized) are not loaded for display.
MAX_SHOWN_BYTES = 1 << 20
#: Text longer than this is cut for display.
MAX_SHOWN_CHARS = 20_000
_HEADER = re.compile(r"\A(\d\d)\n")


class _NotPlain(Exception):
    """The pickle names a class or function: not plain data."""


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain data only: any global a pickle asks for is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise _NotPlain(f"{module}.{name}")


def _cut(text: str) -> str:
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return text[:MAX_SHOWN_CHARS] + f"\n... ({len(text) - MAX_SHOWN_CHARS} more characters)"


def load_plain(serialized: str) -> Tuple[bool, Any]:
    """``(True, value)`` if ``serialized`` is plain data; ``(False, why)`` otherwise."""
    import base64
    import binascii

    found = _HEADER.match(serialized)
    if found is None:
        return False, "not a funcX-serialized value"
    if found.group(1) != METHOD_DATA:
        return False, f"serialized with method {found.group(1)} (code, not data)"
    if len(serialized) > MAX_SHOWN_BYTES:
        return False, f"{len(serialized)} bytes serialized: too big to show here"
    try:
        raw = base64.b64decode(serialized[3:])
        return True, _PlainUnpickler(io.BytesIO(raw)).load()
    except _NotPlain as e:
        return False, f"a Python object of a non-plain type ({e})"
    except (binascii.Error, ValueError, EOFError, pickle.UnpicklingError, RecursionError) as e:
        return False, f"cannot be read: {e}"
    except Exception as e:  # a malformed pickle can fail in many ways
        return False, f"cannot be read: {type(e).__name__}"


def show_result(serialized: Optional[str]) -> str:
    """A task's result as text to show (the value's repr, when it is plain data)."""
    if serialized is None:
        return ""
    plain, value = load_plain(serialized)
    if not plain:
        return f"({value}; read it with the SDK: FuncXClient().get_result(task_id))"
    return _cut(repr(value))


def describe_error(exception: Optional[str], message: Optional[str]) -> str:
    """A failed task's traceback (or error message) as text."""
    if exception:
        if _HEADER.match(exception):
            plain, value = load_plain(exception)
            if plain:
                return _cut(value if isinstance(value, str) else repr(value))
        else:
            return _cut(exception)
    return _cut(message or "")


def when(timestamp: Optional[float]) -> str:
    """A time as UTC date and time."""
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def ago(timestamp: Optional[float], now: float) -> str:
    """How long before ``now``: ``12 s ago``, ``3 min ago``, ``never``."""
    if timestamp is None:
        return "never"
    seconds = max(0.0, now - timestamp)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def duration(start: Optional[float], end: Optional[float]) -> str:
    if start is None or end is None:
        return "-"
    seconds = max(0.0, end - start)
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


# ---------------------------------------------------------------------------
# charts

_W, _H = 560, 160
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 10, 24
_COLOURS = ("#1f6feb", "#d1242f", "#1a7f37")
#: Series of at most this many points also get a dot per point.
_DOTS = 120


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    for step in (1, 2, 5):
        for power in range(0, 12):
            candidate = step * 10**power
            if candidate >= value:
                return float(candidate)
    return value


def line_chart(
    title: str,
    series: Sequence[Tuple[str, Sequence[Tuple[float, float]]]],
    start: float,
    end: float,
    unit: str = "",
    dots: bool = True,
) -> Markup:
    """An SVG line chart of ``series`` (``(label, [(time, value), ...])``) from
    ``start`` to ``end``, its axes labelled; an empty chart says there is no data.
    With ``dots``, a series of few points marks each (one report is a dot)."""
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    top = _nice_max(max((v for _, points in series for _, v in points), default=0.0))
    span = max(end - start, 1e-9)

    def x(t: float) -> float:
        return _LEFT + (t - start) / span * plot_w

    def y(v: float) -> float:
        return _TOP + plot_h - v / top * plot_h

    parts: List[str] = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="#f6f8fa" '
        f'stroke="#d0d7de"/>',
    ]
    for fraction in (0.5, 1.0):
        value = top * fraction
        parts.append(
            f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            f'stroke="#d0d7de" stroke-dasharray="3 3"/>'
            f'<text x="{_LEFT - 4}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#57606a">{value:g}{escape(unit)}</text>'
        )
    parts.append(
        f'<text x="{_LEFT - 4}" y="{_TOP + plot_h + 4}" text-anchor="end" font-size="11" '
        f'fill="#57606a">0</text>'
    )
    minutes = span / 60
    for i in range(5):
        t = start + span * i / 4
        label = "now" if i == 4 else f"-{minutes * (4 - i) / 4:.0f} min"
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        parts.append(
            f'<text x="{x(t):.1f}" y="{_H - 6}" text-anchor="{anchor}" font-size="11" '
            f'fill="#57606a">{label}</text>'
        )
    has_data = False
    for index, (label, points) in enumerate(series):
        colour = _COLOURS[index % len(_COLOURS)]
        inside = [(t, v) for t, v in points if start <= t <= end]
        if inside:
            has_data = True
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in inside)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
            if dots and len(inside) <= _DOTS:  # few reports: each seen, even a lone one
                parts.extend(
                    f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>'
                    for t, v in inside
                )
        parts.append(
            f'<text x="{_LEFT + 8 + 150 * index}" y="{_TOP + 14}" font-size="12" '
            f'fill="{colour}">{escape(label)}</text>'
        )
    if not has_data:
        parts.append(
            f'<text x="{_LEFT + plot_w / 2}" y="{_TOP + plot_h / 2}" text-anchor="middle" '
            f'font-size="13" fill="#57606a">no reports in this hour</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))

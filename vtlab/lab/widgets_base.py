"""What every vtlab widget shares: its CSS classes, its display, and small parsers.

Each widget object has a ``.widget`` (the ipywidgets container) and displays itself in
a notebook (:class:`_Base`); every interactive element carries a stable CSS class
(``vtlab-...``, added by :func:`_css`) so that browser tests can find it.
"""
from __future__ import annotations

import ipywidgets as W


def _css(widget: W.Widget, *names: str) -> W.Widget:
    for n in names:
        widget.add_class(n)
    return widget


def parse_ranges(text: str, maximum: int | None = None, max_count: int = 0x10000) -> list[int]:
    """``"0x3f8-0x3ff, 0x60"`` -> [0x3f8, ..., 0x3ff, 0x60] (hex or decimal, inclusive ranges).

    ValueError for a value above ``maximum`` or more than ``max_count`` values in all.
    """
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        lo, sep, hi = part.partition("-")
        a = int(lo.strip(), 0)
        b = int(hi.strip(), 0) if sep else a
        if b < a:
            raise ValueError(f"range {part!r} ends before it starts")
        if maximum is not None and b > maximum:
            raise ValueError(f"{b:#x} in {part!r} is above {maximum:#x}")
        if len(out) + b - a + 1 > max_count:
            raise ValueError(f"{part!r}: more than {max_count:,} values in all")
        out.extend(range(a, b + 1))
    return out


class _FlagMap(dict):
    """A dict keyed by control flag that keeps ProcBased.HLT_EXITING and
    ProcBased2.UNRESTRICTED_GUEST apart (both are the int 0x80)."""

    def __getitem__(self, flag):
        return super().__getitem__((type(flag), int(flag)))

    def __setitem__(self, flag, value):
        super().__setitem__((type(flag), int(flag)), value)

    def __contains__(self, flag):
        return super().__contains__((type(flag), int(flag)))

    def items(self):
        return [(cls(v), w) for (cls, v), w in super().items()]


class _Base:
    widget: W.Widget

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)

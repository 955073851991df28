"""What every vtlab widget shares: its CSS classes, its display, and small parsers.

Each widget object has a ``.widget`` (the ipywidgets container) and displays itself in
a notebook (:class:`_Base`); every interactive element carries a stable CSS class
(``vtlab-...``, added by :func:`_css`) so that browser tests can find it.
"""
from __future__ import annotations

import html

import ipywidgets as W


# ------------------------------------------------------------------ colours
#: JupyterLab's own text colour: follows the light and the dark theme.
TEXT = "var(--jp-content-font-color1, currentColor)"
#: A quieter text colour for notes (still the theme's, so still readable in both).
TEXT_QUIET = "var(--jp-content-font-color2, currentColor)"
#: The background colour of a cell's output area in the two stock JupyterLab themes
#: (--jp-layout-color0: white in "JupyterLab Light", #111111 in "JupyterLab Dark").
THEME_BACKGROUNDS = {"light": "#FFFFFF", "dark": "#111111"}

#: State badges: (symbol, text colour, background) - both colours fixed, so the
#: contrast does not depend on the theme; the symbol and the word carry the state for
#: readers who cannot tell the colours apart (the Okabe-Ito colour-blind-safe palette).
BADGES: dict[str, tuple[str, str, str]] = {
    "error": ("\u2716", "#000000", "#D55E00"),     # heavy X, on vermillion
    "ok": ("\u2714", "#000000", "#009E73"),        # check mark, on bluish green
    "guest": ("\u25B6", "#FFFFFF", "#0072B2"),     # play triangle, on blue (non-root)
    "root": ("\u25A0", "#000000", "#E69F00"),      # square, on orange (root operation)
    "changed": ("\u0394", "#000000", "#F0E442"),   # Delta, on yellow
    "note": ("\u2139", "#000000", "#56B4E9"),      # information sign, on sky blue
    "off": ("\u25CB", "#000000", "#BBBBBB"),       # white circle, on grey
}


def badge(kind: str, text: str, css_class: str = "") -> str:
    """``text`` (escaped here) as an inline badge of state ``kind`` (see :data:`BADGES`).

    The badge starts with its symbol, so the state is never told by colour alone.
    """
    symbol, fg, bg = BADGES[kind]
    cls = f"vtlab-badge vtlab-badge-{kind} {css_class}".strip()
    return (f"<span class='{cls}' style='color:{fg};background:{bg};padding:1px 6px;border-radius:4px;"
            f"font-weight:bold;white-space:normal'>{symbol} {html.escape(text)}</span>")


def error_html(text: str) -> str:
    """An error message for the learner: the error badge, the text in full (never cut)."""
    return f"<div class='vtlab-error' style='white-space:normal;overflow-wrap:anywhere'>{badge('error', text)}</div>"


def relative_luminance(colour: str) -> float:
    """WCAG 2 relative luminance of a ``#RRGGBB`` colour (0 = black, 1 = white)."""
    rgb = [int(colour.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast_ratio(fg: str, bg: str) -> float:
    """WCAG 2 contrast ratio of two ``#RRGGBB`` colours (1 to 21; text needs >= 4.5)."""
    a, b = sorted((relative_luminance(fg), relative_luminance(bg)), reverse=True)
    return (a + 0.05) / (b + 0.05)


def parse_number(text: str, what: str, maximum: int | None = None) -> int:
    """``"0x1000"``/``"4096"``/``"0b1"`` -> int, or a ValueError that says what was expected.

    Not Python's "invalid literal for int() with base 0": the learner sees which box
    wants what (``what``), e.g. "value: 'twelve' is not a number (write 0x1000 or 4096)".
    """
    cleaned = text.strip().replace("_", "")
    if cleaned.upper().endswith("H") and cleaned[:-1] and all(c in "0123456789abcdefABCDEF" for c in cleaned[:-1]):
        cleaned = "0x" + cleaned[:-1]   # the SDM's own notation, e.g. 3F8H
    try:
        value = int(cleaned, 0)
    except ValueError:
        shown = text.strip() or "(empty)"
        raise ValueError(f"{what}: {shown!r} is not a number (write it as 0x3F8, 3F8H or 1016)") from None
    if value < 0 or (maximum is not None and value > maximum):
        raise ValueError(f"{what}: {value:#x} is out of range (0 to {maximum:#x})" if maximum is not None
                         else f"{what}: {value} is negative")
    return value


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
        a = parse_number(lo, f"{part!r}")
        b = parse_number(hi, f"{part!r}") if sep else a
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

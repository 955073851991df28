"""The probe box: type an instruction, see what was assembled and how it classifies.

:func:`probe_card_html` renders one :class:`vtlab.lab.rings.Probe` (category as a badge
with a symbol and a word, the CPL 0 / CPL 3 outcomes, every piece of evidence in full,
and the disassembly of what the assembler actually produced); :class:`ProbeBox` is the
widget around it (a preset list, a text box, a *classify* button).
"""
from __future__ import annotations

import html

import ipywidgets as W

from . import rings
from .widgets_base import TEXT, _Base, _css, error_html

#: Category badge: (symbol, text colour, background) - fixed pairs (contrast >= 4.5:1
#: whatever the theme), and a symbol so the category is not told by colour alone.
CATEGORY_BADGES: dict[str, tuple[str, str, str]] = {
    "privileged": ("\u25B2", "#FFFFFF", "#0072B2"),              # traps: the VMM gets control
    "sensitive-unprivileged": ("\u2716", "#000000", "#D55E00"),  # escapes trap-and-emulate
    "innocuous": ("\u2714", "#000000", "#009E73"),
    "untestable": ("?", "#000000", "#F0E442"),
}


def category_badge(category: str) -> str:
    """The category as a badge: symbol + word on a fixed colour pair."""
    symbol, fg, bg = CATEGORY_BADGES.get(category, ("?", "#000000", "#BBBBBB"))
    return (f"<span class='vtlab-category vtlab-category-{html.escape(category)}' style='color:{fg};"
            f"background:{bg};padding:2px 8px;border-radius:4px;font-weight:bold'>{symbol} "
            f"{html.escape(category)}</span>")


def probe_card_html(p: rings.Probe) -> str:
    """One probe result as HTML: badge, outcomes, evidence (never cut short), disassembly."""
    facts = [f"<b>{html.escape(d.factor)}</b>: {html.escape(str(d))}" for d in p.differences]
    items = "".join(f"<li>{x}</li>" for x in (facts or [html.escape(p.evidence)]))
    listing = html.escape(p.disassembly) if p.disassembly else "(nothing was assembled)"
    return (f"<div class='vtlab-probe-card' style='border:1px solid var(--jp-border-color1, #999);"
            f"border-radius:6px;padding:8px;color:{TEXT};white-space:normal;overflow-wrap:anywhere'>"
            f"<code>{html.escape(p.name)}</code> &nbsp; {category_badge(p.category)}<br>"
            f"CPL 0: <b>{html.escape(p.cpl0)}</b> &nbsp;|&nbsp; CPL 3: <b>{html.escape(p.cpl3)}</b>"
            f" &nbsp;|&nbsp; depends on: <b>{html.escape(', '.join(p.depends_on) or '-')}</b>"
            f"<ul style='margin:4px 0'>{items}</ul>"
            f"<details open><summary>what was assembled (disassembly)</summary>"
            f"<pre class='vtlab-probe-disassembly' style='margin:2px 0'>{listing}</pre></details></div>")


class ProbeBox(_Base):
    """Pick a preset or type instructions (set-up first, the probed one last); classify it.

    Assembly errors are shown with their line; an empty box says "nothing to run".
    """

    def __init__(self, text: str | None = None, mode: str = "protected"):
        self.mode = mode
        presets = dict(rings.default_instructions(mode))
        self.presets = presets
        first = "SMSW" if "SMSW" in presets else next(iter(presets))
        self.preset = _css(W.Dropdown(options=list(presets), value=first, description="preset",
                                      layout=W.Layout(width="22em"), style={"description_width": "initial"}),
                           "vtlab-probe-preset")
        self.source = _css(W.Textarea(value=presets[first] if text is None else text, description="assembly",
                                      layout=W.Layout(width="36em", height="6em"),
                                      style={"description_width": "initial"}), "vtlab-probe-source")
        self.button = _css(W.Button(description="classify", icon="play", button_style="primary"),
                           "vtlab-probe-run")
        self.card = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-probe-card-box")
        self.last: rings.Probe | None = None
        self.preset.observe(self._pick, names="value")
        self.button.on_click(lambda b: self.classify())
        self.widget = _css(W.VBox([self.preset, W.HBox([self.source, self.button]), self.card]),
                           "vtlab-probe-box")
        self.classify()

    def _pick(self, change) -> None:
        self.source.value = self.presets[change["new"]]
        self.classify()

    def classify(self) -> rings.Probe | None:
        """Probe the text in the box and show the card (errors as a message, never raised)."""
        try:
            self.last = rings.probe(self.source.value, self.mode)
        except (ValueError, rings.BudgetExceeded) as exc:
            self.last = None
            self.card.value = error_html(str(exc))
            return None
        self.card.value = probe_card_html(self.last)
        return self.last

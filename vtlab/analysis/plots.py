"""Plots of VM-exit traces and of the cycle-cost model (:mod:`vtlab.cost`).

Every function returns a :class:`matplotlib.figure.Figure` and never calls
``plt.show()``.  The figures are created with :class:`~matplotlib.figure.Figure`
directly, not through pyplot, so nothing is registered globally: a notebook shows
the returned figure once, and nothing needs closing.  Pass ``ax=`` to draw into an
axes of your own instead (the function then returns that axes' figure).

Colours come from the Okabe-Ito palette (:data:`OKABE_ITO`), which stays
distinguishable with the common forms of colour blindness; stacked parts also carry
hatching so that they survive greyscale printing.

>>> import pandas as pd
>>> from vtlab import plots
>>> trace = pd.DataFrame({"reason": ["CPUID", "CPUID", "HLT"], "guest_instructions": [10, 20, 30]})
>>> fig = plots.exit_counts(trace)
>>> [int(p.get_width()) for p in fig.axes[0].patches]   # bottom bar first
[1, 2]
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter

from . import cost

__all__ = [
    "OKABE_ITO",
    "CATEGORY_COLORS",
    "PART_COLORS",
    "PART_HATCHES",
    "KIND_COLORS",
    "exit_counts",
    "cycle_breakdown",
    "exit_timeline",
    "overhead_vs_exit_rate",
    "roundtrip_by_generation",
    "compare_settings",
    "technique_comparison",
    "overhead_text",
    "cycles_by_reason",
    "cycles_by_reason_svg",
    "category_grid",
    "GridLevel",
]

#: The Okabe-Ito colour-blind-safe palette (Okabe & Ito, "Color Universal Design", 2008).
OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
}

#: Colour of each cost category (:data:`vtlab.cost.COST_CATEGORIES`).
CATEGORY_COLORS: dict[str, str] = {
    "benign": OKABE_ITO["bluish green"],
    "instruction": OKABE_ITO["blue"],
    "memory": OKABE_ITO["orange"],
    "userspace-device": OKABE_ITO["vermillion"],
    "interrupt": OKABE_ITO["reddish purple"],
    "fatal": OKABE_ITO["black"],
}

#: Colours of the three parts of a run's time.
PART_COLORS: dict[str, str] = {
    "native": OKABE_ITO["sky blue"],
    "transition": OKABE_ITO["vermillion"],
    "handling": OKABE_ITO["blue"],
}
#: Hatching of the three parts (readable in greyscale too).
PART_HATCHES: dict[str, str] = {"native": "", "transition": "//", "handling": ".."}

#: Colour by kind of number (:attr:`vtlab.cost.CostFigure.kind`).
KIND_COLORS: dict[str, str] = {
    "measured": OKABE_ITO["blue"],
    "vendor": OKABE_ITO["bluish green"],
    "derived": OKABE_ITO["orange"],
    "estimate": OKABE_ITO["reddish purple"],
    "convention": OKABE_ITO["black"],
}

_CATEGORY_LABELS = {
    "benign": "benign (CPUID, HLT, VMCALL)",
    "instruction": "instruction emulation (I/O in VMM, MSR, CR)",
    "memory": "memory virtualization (EPT)",
    "userspace-device": "device emulation in user space",
    "interrupt": "interrupt delivery",
    "fatal": "fatal (VM stops)",
}
_PART_LABELS = {"native": "native guest work", "transition": "VM exit + entry (hardware)",
                "handling": "VMM handling (software)"}
_CYCLES = EngFormatter(sep="")


def overhead_text(overhead_pct: float) -> str:
    """An overhead as a learner reads it best: ``"+45.3 %"`` below 100 %, a factor of the
    native time above (``"x651 native time"`` rather than ``"65,008.3 %"``)."""
    if overhead_pct != overhead_pct:   # NaN: no native time to compare with
        return "-"
    if overhead_pct < 100:
        return f"+{overhead_pct:,.1f} %"
    return f"{cost.format_factor(overhead_pct)} native time"


def _figure(ax: Axes | None, nrows: int = 1, ncols: int = 1, figsize=(8.0, 4.5), **kw):
    """A new constrained-layout Figure and its axes, or the figure of ``ax``."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, **kw)
    return fig, axes


def _profile_label(profile: cost.CpuProfile) -> str:
    """``"skylake (2015)"``; just the name for the generic profile."""
    return profile.name if profile.name == cost.DEFAULT_PROFILE else f"{profile.name} ({profile.year})"


# ------------------------------------------------------------------ exit counts
def exit_counts(trace: Any, ax: Axes | None = None, top: int | None = None,
                title: str | None = None) -> Figure:
    """Horizontal bars: how many VM exits of each reason, most frequent on top.

    Bars are coloured by cost category; I/O exits that went to a user-space device
    get their own bar.  ``top`` keeps only the most frequent reasons.  The counts
    drawn are :func:`vtlab.cost.count_exits` of the trace.
    """
    counts = cost.count_exits(trace)
    if top is not None:
        counts = counts.head(top)
    fig, ax = _figure(ax, figsize=(8.0, max(2.5, 0.45 * len(counts) + 1.5)))
    order = counts.iloc[::-1]          # barh draws bottom-up: most frequent on top
    colors = [CATEGORY_COLORS.get(c, OKABE_ITO["black"]) for c in order["cost_category"]]
    bars = ax.barh(order.index.tolist(), order["exits"].to_numpy(), color=colors)
    ax.bar_label(bars, labels=[f"{n:,}" for n in order["exits"]], padding=3)
    ax.set_xlabel("exits")
    ax.set_ylabel("exit reason")
    total = int(counts["exits"].sum())
    ax.set_title(title or f"VM exits by reason ({total:,} exits)")
    ax.margins(x=0.15)
    _category_legend(ax, counts["cost_category"].unique(), loc="lower right")
    if not len(counts):
        ax.text(0.5, 0.5, "no VM exits", transform=ax.transAxes, ha="center", va="center")
    return fig


def _category_legend(ax: Axes, categories: Iterable[str], **kw) -> None:
    cats = [c for c in cost.COST_CATEGORIES if c in set(categories)]
    if cats:
        ax.legend(handles=[Patch(color=CATEGORY_COLORS[c], label=_CATEGORY_LABELS[c]) for c in cats],
                  title="cost category", fontsize="small", **kw)


# -------------------------------------------------------------- cycle breakdown
def cycle_breakdown(trace: Any, cpu: str | cost.CpuProfile = cost.DEFAULT_PROFILE,
                    use: cost.Use = "mid", cpi: float = 1.0,
                    native_instructions: int | None = None) -> Figure:
    """Where the cycles of a run go: native work, VM transitions and VMM handling.

    Top panel: one bar, stacked native / transition / handling (the totals of
    :func:`vtlab.cost.estimate`).  Bottom panel: transition and handling cycles for
    each exit reason.
    """
    est = cost.estimate(trace, cpu, native_instructions, cpi, use)
    a = est.attrs
    profile = cost.get_profile(cpu)
    body = est.drop(index=["native", "total"])
    fig, (top, bottom) = _figure(None, 2, 1, figsize=(8.0, 3.0 + 0.4 * max(len(body), 1)),
                                 height_ratios=[1, max(len(body), 1) * 0.6 + 0.4])
    left = 0.0
    total = a["total_cycles"] or 1.0
    for part, value in (("native", a["native_cycles"]), ("transition", a["transition_cycles"]),
                        ("handling", a["handling_cycles"])):
        top.barh(["this run"], [value], left=left, color=PART_COLORS[part], hatch=PART_HATCHES[part],
                 edgecolor="white", label=f"{_PART_LABELS[part]}: {value / total:.0%}")
        left += value
    top.xaxis.set_major_formatter(_CYCLES)
    top.set_xlabel("cycles")
    top.set_title(f"{a['exits']:,} exits on {_profile_label(profile)}, '{use}' costs", fontsize="medium")
    fig.suptitle(f"Where the cycles go: virtualization overhead {overhead_text(a['overhead_pct'])}")

    order = body.iloc[::-1]
    labels = order.index.tolist()
    bottom.barh(labels, order["transition_cycles"], color=PART_COLORS["transition"],
                hatch=PART_HATCHES["transition"], edgecolor="white", label=_PART_LABELS["transition"])
    bottom.barh(labels, order["handling_cycles"], left=order["transition_cycles"],
                color=PART_COLORS["handling"], hatch=PART_HATCHES["handling"], edgecolor="white",
                label=_PART_LABELS["handling"])
    bottom.xaxis.set_major_formatter(_CYCLES)
    bottom.set_xlabel("cycles")
    bottom.set_ylabel("exit reason")
    # one legend for both panels (the top bar's parts, with their shares), where the
    # shortest bars leave room
    bottom.legend(*top.get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize="small")  # outside the axes: never on top of a bar
    bottom.set_title("Virtualization cycles by exit reason")
    if not len(body):
        bottom.text(0.5, 0.5, "no VM exits", transform=bottom.transAxes, ha="center", va="center")
    return fig


# ------------------------------------------------------------------ timeline
def exit_timeline(trace: Any, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Each exit as a dot: exit reason against guest instructions retired so far.

    Needs the ``guest_instructions`` column.  Dots are coloured by cost category;
    reasons are ordered by first occurrence, top to bottom.  A second panel shows the
    cumulative number of exits, whose slope is the exit rate.
    """
    df = cost.classify(trace)
    if len(df) and "guest_instructions" not in df.columns:
        raise ValueError("exit_timeline needs a 'guest_instructions' column in the trace")
    reasons = list(dict.fromkeys(df["reason"]))
    if ax is None:
        fig, (ax, ax2) = _figure(None, 2, 1, figsize=(8.0, 3.0 + 0.35 * max(len(reasons), 1)),
                                 sharex=True, height_ratios=[max(len(reasons), 1) * 0.5 + 0.5, 1.2])
    else:
        fig, ax2 = ax.figure, None
    y = {r: len(reasons) - 1 - i for i, r in enumerate(reasons)}
    x = pd.to_numeric(df["guest_instructions"]).to_numpy() if len(df) else np.array([])
    for cat in cost.COST_CATEGORIES:
        mask = (df["cost_category"] == cat).to_numpy()
        if mask.any():
            ax.scatter(x[mask], [y[r] for r in df["reason"][mask]], s=12,
                       color=CATEGORY_COLORS[cat], label=_CATEGORY_LABELS[cat], linewidths=0)
    ax.set_yticks([y[r] for r in reasons], reasons)
    ax.set_ylim(-0.5, max(len(reasons), 1) - 0.5)
    ax.set_ylabel("exit reason")
    ax.set_title(title or f"Exit timeline ({len(df):,} exits)")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if len(df):
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), title="cost category")
    if ax2 is not None:
        order = np.argsort(x, kind="stable")
        ax2.step(x[order], np.arange(1, len(x) + 1), where="post", color=OKABE_ITO["black"])
        ax2.set_ylabel("exits (cumulative)")
        ax2.set_xlabel("guest instructions retired")
        ax2.xaxis.set_major_formatter(EngFormatter(sep=""))
    else:
        ax.set_xlabel("guest instructions retired")
    if not len(df):
        ax.text(0.5, 0.5, "no VM exits", transform=ax.transAxes, ha="center", va="center")
    return fig


# ------------------------------------------------------ overhead vs exit rate
def overhead_vs_exit_rate(cpu: str | cost.CpuProfile = cost.DEFAULT_PROFILE,
                          rates: Sequence[float] | None = None,
                          categories: Sequence[str] = ("benign", "instruction", "userspace-device"),
                          traces: Mapping[str, Any] | None = None, cpi: float = 1.0,
                          ax: Axes | None = None) -> Figure:
    """Virtualization overhead against exit rate, one line per cost category.

    Each line is ``rate x (round trip + handling) / cpi`` (:func:`vtlab.cost.overhead_curve`)
    at the ``mid`` costs, with a band from the ``low`` to the ``high`` costs.  Both
    axes are logarithmic.  ``traces`` (name -> trace) adds one marked point per
    workload at its measured exit rate and estimated overhead.
    """
    profile = cost.get_profile(cpu)
    if rates is None:
        rates = np.logspace(-3, 2, 31)
    rates = np.asarray(rates, dtype=float)
    fig, ax = _figure(ax)
    for cat in categories:
        mid = cost.overhead_curve(rates, profile, cat, cpi, "mid")
        low = cost.overhead_curve(rates, profile, cat, cpi, "low")
        high = cost.overhead_curve(rates, profile, cat, cpi, "high")
        color = CATEGORY_COLORS[cat]
        ax.plot(mid["exits_per_1k_instructions"], 1 + mid["overhead_pct"] / 100, color=color,
                label=f"{_CATEGORY_LABELS[cat]} (~{mid['cycles_per_exit'].iloc[0]:,.0f} cycles/exit)")
        ax.fill_between(rates, 1 + low["overhead_pct"] / 100, 1 + high["overhead_pct"] / 100, color=color, alpha=0.15,
                        linewidth=0)
    markers = "osD^v<>p*"
    for i, (name, trace) in enumerate((traces or {}).items()):
        a = cost.estimate(trace, profile, cpi=cpi).attrs
        ax.scatter([a["exits_per_1k_instructions"]], [1 + a["overhead_pct"] / 100], marker=markers[i % len(markers)],
                   color=OKABE_ITO["black"], zorder=3, label=f"{name}: {overhead_text(a['overhead_pct'])}")
    ax.axhline(2, color=OKABE_ITO["black"], linewidth=0.8, linestyle=":")
    ax.text(rates[0], 2, " 2x slower", va="bottom", fontsize="small")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("exit rate (exits per 1,000 guest instructions)")
    ax.set_ylabel("time under virtualization (x native time)")
    ax.yaxis.set_major_formatter(lambda y, _pos: f"x{y:,.0f}" if y >= 10 else f"x{y:g}")
    ax.set_title(f"Overhead grows with the exit rate ({_profile_label(profile)}, cpi={cpi:g})")
    ax.legend(fontsize="small", loc="upper left")
    ax.grid(True, which="major", alpha=0.3)
    return fig


# ----------------------------------------------------- round trip by generation
def roundtrip_by_generation(use: cost.Use = "mid", ax: Axes | None = None,
                            include_generic: bool = False) -> Figure:
    """The hardware cost of one VM exit + VM entry on every CPU profile, oldest first.

    Solid bars are published figures (measured, or read off a vendor chart);
    bar height is the ``use`` value and the error bar spans the published range.
    Profiles without a published figure (the "derived" and "estimate" kinds:
    every generation after Sandy Bridge, 2011) are drawn as hatched outlines,
    so that a range vtlab assumes never looks like a measurement.  The shaded
    band is the 500-2,000-cycle rule of thumb that introductions to VT-x quote:
    it fits the 2006-2008 parts (Core 2 to Nehalem) and overstates every later
    one, while Prescott's measured 2,409 lies above it.
    """
    gen = cost.by_generation(use=use, include_generic=include_generic)
    fig, ax = _figure(ax, figsize=(9.0, 4.8))
    labels = [f"{name}\n{year}" for name, year in zip(gen.index, gen["year"])]
    heights = gen["roundtrip_cycles"].to_numpy()
    err = np.vstack([heights - gen["roundtrip_low"].to_numpy(), gen["roundtrip_high"].to_numpy() - heights])
    published = gen["kind"].isin(_PUBLISHED_KINDS).to_numpy()
    x = np.arange(len(gen))
    # The rule of thumb as a band behind the bars (a collection, not a bar patch).
    low, high = _RULE_OF_THUMB_CYCLES
    ax.fill_between([-0.5, len(gen) - 0.5], low, high, color=OKABE_ITO["sky blue"], alpha=0.25,
                    hatch="..", edgecolor=OKABE_ITO["blue"], linewidth=0, zorder=0)
    for i, (h, kind, solid) in enumerate(zip(heights, gen["kind"], published)):
        colour = KIND_COLORS[kind]
        if solid:
            ax.bar(x[i], h, color=colour, zorder=2)
        else:
            ax.bar(x[i], h, facecolor="none", hatch="///", edgecolor=colour, linewidth=1.2, zorder=2)
    ax.errorbar(x, heights, yerr=err, fmt="none", capsize=3, ecolor=OKABE_ITO["black"], zorder=3)
    ax.set_xticks(x, labels)
    if (~published).any():
        first = int(np.argmax(~published))
        top = float(gen.loc[~published, "roundtrip_high"].max())
        ax.text((first + len(gen) - 1) / 2, top + 60,
                "after 2011: no published figure\n(ranges derived from whole-exit measurements)",
                ha="center", va="bottom", fontsize="small")
    ax.text(3.0, high + 30, f"rule of thumb {low:,}-{high:,} cycles:\nfits Core 2 to Nehalem (2006-2008)",
            ha="center", va="bottom", fontsize="small", color=OKABE_ITO["black"])
    ax.set_ylabel("cycles per VM exit + VM entry")
    ax.set_xlabel("CPU generation (year of first shipment)")
    ax.set_title("VT-x round-trip cost by Intel generation (hardware only)")
    ax.tick_params(axis="x", labelsize="small", labelrotation=45)
    ax.set_ylim(0, max(float(gen["roundtrip_high"].max()), high) * 1.3)
    kinds = [k for k in KIND_COLORS if k in set(gen["kind"])]
    handles = [Patch(color=KIND_COLORS[k], label=k) if k in _PUBLISHED_KINDS
               else Patch(fill=False, hatch="///", edgecolor=KIND_COLORS[k], label=f"{k} (no published figure)")
               for k in kinds]
    handles.append(Patch(color=OKABE_ITO["sky blue"], alpha=0.25, hatch="..", label="500-2,000 rule of thumb"))
    ax.legend(handles=handles, title="kind of number", fontsize="small", loc="upper right")
    return fig


_PUBLISHED_KINDS = frozenset({"measured", "vendor"})
# The "500 to 2,000 cycles" per transition that introductions to VT-x quote.
_RULE_OF_THUMB_CYCLES = (500, 2_000)


# --------------------------------------------------------- before / after
def compare_settings(trace_a: Any, trace_b: Any, labels: tuple[str, str] = ("before", "after"),
                     cpu: str | cost.CpuProfile = cost.DEFAULT_PROFILE, use: cost.Use = "mid",
                     cpi: float = 1.0, native_instructions: tuple[int | None, int | None] = (None, None)
                     ) -> Figure:
    """Two runs side by side, e.g. the same workload before and after changing a control.

    Left: exits per reason for each run (grouped bars).  Right: each run's cycles
    stacked as native / transition / handling.
    """
    est = [cost.estimate(t, cpu, n, cpi, use) for t, n in zip((trace_a, trace_b), native_instructions)]
    counts = [e.drop(index=["native", "total"]).groupby("reason", sort=False)["exits"].sum() for e in est]
    reasons = list(dict.fromkeys(list(counts[0].index) + list(counts[1].index)))
    fig, (left, right) = _figure(None, 1, 2, figsize=(11.0, 4.5), width_ratios=[1.6, 1])
    x = np.arange(len(reasons))
    width = 0.4
    run_colors = (OKABE_ITO["blue"], OKABE_ITO["orange"])
    run_hatches = ("", "//")
    for i, (c, label) in enumerate(zip(counts, labels)):
        values = [int(c.get(r, 0)) for r in reasons]
        bars = left.bar(x + (i - 0.5) * width, values, width, label=label, color=run_colors[i],
                        hatch=run_hatches[i], edgecolor="white")
        left.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize="x-small", padding=2)
    left.set_xticks(x, reasons, rotation=30, ha="right")
    left.set_ylabel("exits")
    left.set_xlabel("exit reason")
    left.set_title("Exits per reason")
    left.legend()
    if not reasons:
        left.text(0.5, 0.5, "no VM exits", transform=left.transAxes, ha="center", va="center")

    bottom = np.zeros(2)
    for part in ("native", "transition", "handling"):
        values = np.array([e.attrs[f"{part}_cycles"] for e in est])
        right.bar(list(labels), values, bottom=bottom, color=PART_COLORS[part], hatch=PART_HATCHES[part],
                  edgecolor="white", label=_PART_LABELS[part])
        bottom += values
    right.yaxis.set_major_formatter(_CYCLES)
    right.set_ylabel("cycles")
    right.set_title("Cycles per run")
    right.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    a, b = (e.attrs for e in est)
    profile = cost.get_profile(cpu)
    fig.suptitle(f"{labels[0]} vs {labels[1]} on {_profile_label(profile)}: exits {a['exits']:,} -> "
                 f"{b['exits']:,}, overhead {overhead_text(a['overhead_pct'])} -> {overhead_text(b['overhead_pct'])}")
    return fig


# ----------------------------------------------------------- techniques
def technique_comparison(trace: Any, cpu: str | cost.CpuProfile = cost.DEFAULT_PROFILE,
                         use: cost.Use = "mid", cpi: float = 1.0,
                         native_instructions: int | None = None, ax: Axes | None = None,
                         **kwargs) -> Figure:
    """The same guest under VT-x, binary translation and paravirtualization.

    Stacked bars of native and virtualization cycles from
    :func:`vtlab.cost.compare_techniques` (extra keyword arguments go there).
    """
    comp = cost.compare_techniques(trace, cpu, native_instructions, cpi, use, **kwargs)
    fig, ax = _figure(ax)
    names = [n.replace(" (", "\n(") for n in comp.index]
    ax.bar(names, comp["native_cycles"], color=PART_COLORS["native"], label=_PART_LABELS["native"])
    bars = ax.bar(names, comp["virtualization_cycles"], bottom=comp["native_cycles"],
                  color=OKABE_ITO["vermillion"], hatch="//", edgecolor="white",
                  label="virtualization overhead")
    ax.bar_label(bars, labels=[overhead_text(p) for p in comp["overhead_pct"]], padding=2)
    ax.yaxis.set_major_formatter(_CYCLES)
    ax.set_ylabel("cycles")
    ax.set_xlabel("how the CPU is virtualized")
    ax.set_title(f"One guest, three techniques ({cost.get_profile(cpu).name}, '{use}' costs)")
    ax.legend(fontsize="small")
    ax.margins(y=0.15)
    return fig


# ------------------------------------------------------ the dashboard's panel
def cycles_by_reason(est: pd.DataFrame, ax: Axes) -> Axes:
    """Draw, into ``ax``, the virtualization cycles of each exit reason of an estimate.

    ``est`` is a :func:`vtlab.cost.estimate` table.  One stacked bar per reason
    (hardware transition, hatched ``//``; VMM handling, hatched ``..``) with its exit
    count and cycles written beside it, so the panel reads the same in greyscale.  A
    run without exits gets a message on a 0-1 axis, never an empty plot with a
    nonsense range.  Cheap on purpose (one axes, no legend box): the dashboard redraws
    it on every toggle.
    """
    body = est.drop(index=["native", "total"], errors="ignore")
    a = est.attrs
    if not len(body) or not (a.get("virtualization_cycles") or 0) > 0:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_xticks([0, 1], ["0", ""])
        ax.set_xlabel("virtualization cycles")
        ax.text(0.5, 0.5, "no VM exits under these controls:\nthe guest ran without leaving "
                "non-root operation,\nso there is no virtualization cost to draw",
                transform=ax.transAxes, ha="center", va="center")
        return ax
    order = body.iloc[::-1]
    labels = order.index.tolist()
    trans = order["transition_cycles"].to_numpy(dtype=float)
    hand = order["handling_cycles"].to_numpy(dtype=float)
    ax.barh(labels, trans, color=PART_COLORS["transition"], hatch=PART_HATCHES["transition"],
            edgecolor="white", label=_PART_LABELS["transition"])
    bars = ax.barh(labels, hand, left=trans, color=PART_COLORS["handling"], hatch=PART_HATCHES["handling"],
                   edgecolor="white", label=_PART_LABELS["handling"])
    ax.bar_label(bars, labels=[f"{int(n):,} exit{'' if int(n) == 1 else 's'}, {_CYCLES(t + h)} cycles" for n, t, h in
                               zip(order["exits"], trans, hand)], padding=3, fontsize="small")
    ax.set_xlim(0, float((trans + hand).max()) * 1.6)
    ax.xaxis.set_major_formatter(_CYCLES)
    ax.set_xlabel("virtualization cycles (transition + handling)")
    ax.legend(fontsize="x-small", loc="lower right")
    return ax


# ------------------------------------------------------------ category grids
class GridLevel(tuple):
    """One value of a :func:`category_grid`: ``(label, colour, hatch, mark)``.

    ``mark`` is the text written in each cell of this level (``"1"``, ``"x"`` ...);
    together with ``hatch`` it keeps the grid readable without colour (greyscale
    printing, colour blindness).
    """

    def __new__(cls, label: str, colour: str, hatch: str = "", mark: str = ""):
        return super().__new__(cls, (label, colour, hatch, mark))


def category_grid(grid: Sequence[Sequence[int]], row_labels: Sequence[str], col_labels: Sequence[str],
                  levels: Sequence[GridLevel | tuple[str, str, str, str]], ax: Axes | None = None,
                  title: str = "", xlabel: str = "", ylabel: str = "", legend: bool = True) -> Figure:
    """A heat map of categories that survives greyscale: colour, hatching and a mark per cell.

    ``grid[r][c]`` is an index into ``levels``; each level is ``(label, colour, hatch,
    mark)``.  Used for "which control bits are fixed" (03) and "which change altered
    the result" (01) grids.
    """
    rows, cols = len(grid), len(grid[0]) if len(grid) else 0
    fig, ax = _figure(ax, figsize=(max(6.0, 0.32 * cols + 3), max(2.5, 0.38 * rows + 1.6)))
    from matplotlib.patches import Rectangle

    for r, row in enumerate(grid):
        for c, value in enumerate(row):
            label, colour, hatch, mark = levels[int(value)]
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor=colour, hatch=hatch,
                                   edgecolor="#777777", linewidth=0.6))
            if mark:
                # black or white text, whichever contrasts more with the cell (WCAG luminance)
                rgb = [int(colour.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)] if colour.startswith("#") else [1, 1, 1]
                lum = sum(w * (x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4)
                          for w, x in zip((0.2126, 0.7152, 0.0722), rgb))
                ax.text(c, r, mark, ha="center", va="center", fontsize="x-small", fontweight="bold",
                        color="black" if lum > 0.179 else "white")
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xticks(range(cols), list(col_labels), rotation=45 if max(map(len, map(str, col_labels)), default=0) > 3 else 0,
                  ha="right" if max(map(len, map(str, col_labels)), default=0) > 3 else "center")
    ax.set_yticks(range(rows), list(row_labels))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(handles=[Patch(facecolor=colour, hatch=hatch, edgecolor="#777777",
                                 label=f"{label} ({mark})" if mark else label)
                           for label, colour, hatch, mark in levels],
                  loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(levels), frameon=False,
                  fontsize="small")
    return fig


def cycles_by_reason_svg(est: pd.DataFrame, title: str = "", width: int = 760) -> str:
    """The :func:`cycles_by_reason` panel as an inline SVG string (for the dashboard).

    The same bars (transition hatched ``//``, handling dotted, exit count and cycles
    written beside each bar), drawn by the browser: no raster image to render, encode
    and send on every toggle, sharp at any zoom.  Text uses the page's colour
    (``currentColor``: JupyterLab's theme); bars keep the Okabe-Ito colours.  A run
    without exits gets a message on a 0-1 axis.
    """
    import html as _html

    from matplotlib.ticker import MaxNLocator

    body = est.drop(index=["native", "total"], errors="ignore")
    a = est.attrs
    empty = not len(body) or not (a.get("virtualization_cycles") or 0) > 0
    rows = [] if empty else list(body.itertuples())
    left, right, top, bar, gap = 150, 190, 46, 22, 12
    plot_w = width - left - right
    height = top + max(len(rows), 2) * (bar + gap) + 44
    totals = [float(r.transition_cycles) + float(r.handling_cycles) for r in rows]
    xmax = max(totals) if totals else 1.0
    ticks = [t for t in MaxNLocator(5).tick_values(0, xmax) if 0 <= t <= xmax * 1.0001] if totals else [0, 1]
    xmax = max(xmax, ticks[-1]) if ticks else xmax

    def x(v: float) -> float:
        return left + plot_w * v / xmax

    esc = _html.escape
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='vtlab-cycles-svg' width='{width}' height='{height}' "
           f"viewBox='0 0 {width} {height}' role='img' aria-label='{esc(title or 'virtualization cycles by exit reason')}' "
           "style='max-width:100%;height:auto;font-family:sans-serif;font-size:12px;fill:currentColor'>",
           "<defs>"
           f"<pattern id='vtlab-hatch-t' width='6' height='6' patternUnits='userSpaceOnUse' patternTransform='rotate(45)'>"
           f"<rect width='6' height='6' fill='{PART_COLORS['transition']}'/><line x1='0' y1='0' x2='0' y2='6' "
           "stroke='white' stroke-width='1.5'/></pattern>"
           f"<pattern id='vtlab-hatch-h' width='5' height='5' patternUnits='userSpaceOnUse'>"
           f"<rect width='5' height='5' fill='{PART_COLORS['handling']}'/><circle cx='2.5' cy='2.5' r='0.9' "
           "fill='white'/></pattern></defs>"]
    if title:
        out.append(f"<text x='{width / 2:.0f}' y='16' text-anchor='middle' style='font-size:13px'>{esc(title)}</text>")
    base = top + max(len(rows), 2) * (bar + gap)
    out.append(f"<line x1='{left}' y1='{top - 6}' x2='{left}' y2='{base}' stroke='currentColor'/>"
               f"<line x1='{left}' y1='{base}' x2='{left + plot_w}' y2='{base}' stroke='currentColor'/>")
    for t in ticks:
        out.append(f"<line x1='{x(t):.1f}' y1='{base}' x2='{x(t):.1f}' y2='{base + 4}' stroke='currentColor'/>"
                   f"<text x='{x(t):.1f}' y='{base + 16}' text-anchor='middle'>{esc(_CYCLES(t))}</text>")
    out.append(f"<text x='{left + plot_w / 2:.0f}' y='{base + 34}' text-anchor='middle'>"
               "virtualization cycles (transition + handling)</text>")
    if empty:
        out.append(f"<text x='{left + plot_w / 2:.0f}' y='{top + bar}' text-anchor='middle' class='vtlab-no-exits'>"
                   "no VM exits under these controls: the guest ran without leaving</text>"
                   f"<text x='{left + plot_w / 2:.0f}' y='{top + bar + 16}' text-anchor='middle'>"
                   "non-root operation, so there is no virtualization cost to draw</text>")
    for i, (r, total) in enumerate(zip(rows, totals)):
        y = top + i * (bar + gap)
        t, h = float(r.transition_cycles), float(r.handling_cycles)
        n = int(r.exits)
        out.append(f"<g class='vtlab-cycles-bar' data-reason='{esc(str(r.Index))}'>"
                   f"<text x='{left - 6}' y='{y + bar * 0.7:.0f}' text-anchor='end'>{esc(str(r.Index))}</text>"
                   f"<rect x='{left}' y='{y}' width='{x(t) - left:.1f}' height='{bar}' fill='url(#vtlab-hatch-t)'/>"
                   f"<rect x='{x(t):.1f}' y='{y}' width='{x(t + h) - x(t):.1f}' height='{bar}' fill='url(#vtlab-hatch-h)'/>"
                   f"<text x='{x(total) + 5:.1f}' y='{y + bar * 0.7:.0f}'>{n:,} exit{'' if n == 1 else 's'}, "
                   f"{esc(_CYCLES(total))} cycles</text></g>")
    for j, (pat, part) in enumerate((("vtlab-hatch-t", "transition"), ("vtlab-hatch-h", "handling"))):
        lx, ly = left + j * 230, 24   # the legend: one line under the title, above the bars
        out.append(f"<rect x='{lx}' y='{ly}' width='16' height='12' fill='url(#{pat})'/>"
                   f"<text x='{lx + 22}' y='{ly + 10}' style='font-size:11px'>{esc(_PART_LABELS[part])}</text>")
    out.append("</svg>")
    return "".join(out)

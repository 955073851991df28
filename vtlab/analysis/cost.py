"""A cycle-cost model for VM exits: what a trace of exits would cost on a real CPU.

vtlab runs the guest on an emulator, so its own timings say nothing about hardware.
This module turns a *trace* (one row per VM exit) into an estimate of CPU cycles:

* **native work**: the guest instructions retired, times a cycles-per-instruction
  figure (``cpi``, 1.0 by default);
* **transition cost**: one VM exit plus one VM entry per exit, the hardware
  "round trip" of the chosen CPU profile (:data:`PROFILES`);
* **handling cost**: the VMM's software work for that kind of exit, by *cost
  category* (:data:`COST_CATEGORIES`): benign (CPUID, HLT, VMCALL), instruction
  emulation (I/O to a device in the VMM, MSR, CR ...), memory virtualization (EPT
  violation), device emulation in user space, interrupt delivery.

**Overhead** is (transition + handling) / native, as a percentage.

Every number in the tables is a :class:`CostFigure`: a low-high range (equal when a
single value was published), *what kind* of number it is (measured, vendor,
derived or estimate), the source it comes from and a note.  ``use="low" | "mid" |
"high"`` picks which end of the ranges an estimate uses.

>>> import pandas as pd
>>> trace = pd.DataFrame({"reason": ["CPUID"] * 10, "guest_instructions": range(100, 1100, 100)})
>>> df = estimate(trace, cpu="prescott")
>>> int(df.loc["CPUID", "transition_cycles"])        # 10 exits x 2409 cycles
24090

The model's assumptions and limits are listed in :data:`ASSUMPTIONS` and in
``docs/cost-model.md``.  The numbers themselves, each with its source, are the tables
of :mod:`vtlab.analysis.cost_data` (importable from here too); this module computes.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from ..arch import EXIT_REASON_INFO, ExitReason
# The model's numbers (see cost_data), importable from here as they always were.
from .cost_data import (ASSUMPTIONS, BT_COSTS, COST_CATEGORIES, DEFAULT_PROFILE,  # noqa: F401
                        PROFILES, PV_COSTS, REASON_COST_CATEGORY, SOURCES, USERSPACE_HANDLERS,
                        VMM_HANDLING, CostFigure, CpuProfile, FigureKind, Use, _DISPLAY_TO_COST,
                        _F, _MITIGATIONS, _MODERN, _MODERN_NOTE, _chart, get_profile)

__all__ = [
    "CostFigure",
    "CpuProfile",
    "SOURCES",
    "COST_CATEGORIES",
    "REASON_COST_CATEGORY",
    "USERSPACE_HANDLERS",
    "VMM_HANDLING",
    "BT_COSTS",
    "PV_COSTS",
    "PROFILES",
    "DEFAULT_PROFILE",
    "ASSUMPTIONS",
    "get_profile",
    "trace_frame",
    "native_instruction_count",
    "cost_category",
    "classify",
    "count_exits",
    "estimate",
    "summary",
    "compare_techniques",
    "by_generation",
    "overhead_curve",
    "profiles_table",
    "slowdown_factor",
    "format_factor",
]


# ------------------------------------------------------------------------- traces
_COLUMNS = ["seq", "reason", "reason_number", "category", "qualification", "instruction_length",
            "guest_rip", "instruction", "handler", "device", "guest_instructions"]


def trace_frame(trace: Any) -> pd.DataFrame:
    """The trace as a DataFrame with one row per VM exit.

    Accepts a ``vtlab.trace.Trace`` (anything with ``to_dataframe()``), a DataFrame,
    or a list of dicts.  Only the ``reason`` column is required.
    """
    if hasattr(trace, "to_dataframe"):
        df = trace.to_dataframe()
    elif isinstance(trace, pd.DataFrame):
        df = trace
    elif trace is None:
        df = pd.DataFrame(columns=_COLUMNS)
    else:
        df = pd.DataFrame(list(trace))
    if "reason" not in df.columns:
        if len(df) == 0:
            df = pd.DataFrame(columns=_COLUMNS)
        else:
            raise ValueError("a trace needs a 'reason' column (the ExitReason name of each exit)")
    df = df.copy()
    df["reason"] = df["reason"].map(_reason_name)
    return df


def _reason_name(reason: Any) -> str:
    """``ExitReason.CPUID``, ``10`` or ``"cpuid"`` -> ``"CPUID"``."""
    if isinstance(reason, ExitReason):
        return reason.name
    if isinstance(reason, (int, np.integer)):
        try:
            return ExitReason(int(reason)).name
        except ValueError:
            return str(int(reason))
    text = str(reason)
    return text.split(".")[-1].upper() if text.startswith("ExitReason.") else text.upper()


def native_instruction_count(trace: Any, native_instructions: int | None = None) -> int:
    """Guest instructions retired in the run the trace records.

    In order of preference: ``native_instructions``, the trace's ``instructions_total``,
    the last exit's ``guest_instructions``.
    """
    if native_instructions is not None:
        return int(native_instructions)
    total = getattr(trace, "instructions_total", None)
    if total is not None:
        return int(total)
    df = trace if isinstance(trace, pd.DataFrame) else trace_frame(trace)
    if "guest_instructions" in df.columns and len(df):
        return int(pd.to_numeric(df["guest_instructions"]).max())
    raise ValueError("cannot tell how many guest instructions ran: pass native_instructions=")


def cost_category(reason: str, handler: str | None = None, device: str | None = None) -> str:
    """The cost category (:data:`COST_CATEGORIES`) of one exit.

    An exit whose handler is in :data:`USERSPACE_HANDLERS` or whose ``device`` is
    ``"userspace"`` is ``"userspace-device"``; otherwise :data:`REASON_COST_CATEGORY`
    decides, then the reason's display category in ``vtlab.arch.EXIT_REASON_INFO``.
    """
    if (isinstance(handler, str) and handler in USERSPACE_HANDLERS) or (
            isinstance(device, str) and device.lower().replace("-", "").replace(" ", "") == "userspace"):
        return "userspace-device"
    name = _reason_name(reason)
    if name in REASON_COST_CATEGORY:
        return REASON_COST_CATEGORY[name]
    try:
        display = EXIT_REASON_INFO[ExitReason[name]].category
    except KeyError:
        return "instruction"
    return _DISPLAY_TO_COST.get(display, "instruction")


def classify(trace: Any) -> pd.DataFrame:
    """The trace with a ``cost_category`` column (and ``category`` filled in if absent)."""
    df = trace_frame(trace)
    handler = df["handler"] if "handler" in df.columns else pd.Series([None] * len(df), index=df.index)
    device = df["device"] if "device" in df.columns else pd.Series([None] * len(df), index=df.index)
    df["cost_category"] = [cost_category(r, h, d) for r, h, d in zip(df["reason"], handler, device)]
    if "category" not in df.columns:
        def display(name: str) -> str:
            try:
                return EXIT_REASON_INFO[ExitReason[name]].category
            except KeyError:
                return "other"
        df["category"] = df["reason"].map(display)
    return df


def _label(reason: str, cost_cat: str, ambiguous: bool) -> str:
    if not ambiguous:
        return reason
    return f"{reason} (user space)" if cost_cat == "userspace-device" else f"{reason} (in VMM)"


def count_exits(trace: Any) -> pd.DataFrame:
    """Exits per reason, most frequent first, indexed like :func:`estimate`'s rows.

    Columns ``reason``, ``cost_category`` and ``exits``.  A reason whose exits went
    both to the VMM and to a user-space device gets two rows, ``"IO_INSTRUCTION (in
    VMM)"`` and ``"IO_INSTRUCTION (user space)"``.
    """
    df = classify(trace)
    if not len(df):
        return pd.DataFrame({"reason": pd.Series(dtype=str), "cost_category": pd.Series(dtype=str),
                             "exits": pd.Series(dtype=int)})
    ambiguous = df.groupby("reason")["cost_category"].nunique() > 1
    out = df.groupby(["reason", "cost_category"], sort=False).size().rename("exits").reset_index()
    out.index = [_label(r, c, bool(ambiguous[r])) for r, c in zip(out["reason"], out["cost_category"])]
    return out.sort_values("exits", ascending=False, kind="stable")


# ----------------------------------------------------------------------- estimate
_OUT_COLUMNS = ["reason", "category", "cost_category", "exits", "transition_cycles",
                "handling_cycles", "total_cycles", "cycles_per_exit", "share_pct"]


def estimate(trace: Any, cpu: str | CpuProfile = DEFAULT_PROFILE,
             native_instructions: int | None = None, cpi: float = 1.0,
             use: Use = "mid") -> pd.DataFrame:
    """Cost a trace of VM exits on CPU profile ``cpu``.

    Args:
        trace: a ``vtlab.trace.Trace`` or a DataFrame with one row per exit (at
            least a ``reason`` column; ``handler``/``device`` mark user-space devices).
        cpu: a name in :data:`PROFILES` or a :class:`CpuProfile`.
        native_instructions: guest instructions retired in the run; default: the
            trace's ``instructions_total`` or the last row's ``guest_instructions``.
        cpi: cycles per guest instruction when running natively.
        use: which end of each cost range to use: ``"low"``, ``"mid"`` or ``"high"``.

    Returns:
        A DataFrame indexed by exit reason (an I/O reason that went both to the VMM
        and to user space gets two rows, ``"IO_INSTRUCTION (in VMM)"`` and ``"...
        (user space)"``), most expensive first, then a ``"native"`` row (the guest's
        own work) and a ``"total"`` row.  Columns: ``reason``, ``category`` (display
        category), ``cost_category``, ``exits``, ``transition_cycles``,
        ``handling_cycles``, ``total_cycles``, ``cycles_per_exit`` and ``share_pct``
        (share of the whole run's cycles).  ``df.attrs`` holds ``native_cycles``,
        ``transition_cycles``, ``handling_cycles``, ``virtualization_cycles``,
        ``total_cycles``, ``overhead_pct`` (virtualization / native x 100),
        ``slowdown``, ``exits``, ``exits_per_1k_instructions``, ``instructions``,
        ``profile``, ``use``, ``cpi``, ``assumptions`` and ``sources``.
    """
    profile = get_profile(cpu)
    if cpi <= 0:
        raise ValueError("cpi must be positive")
    df = classify(trace)
    instructions = native_instruction_count(trace if not isinstance(trace, pd.DataFrame) else df,
                                            native_instructions)
    roundtrip = profile.roundtrip.pick(use)
    rows = []
    if len(df):
        groups = df.groupby(["reason", "cost_category"], sort=False)
        per_reason = df.groupby("reason")["cost_category"].nunique()
        for (reason, cat), g in groups:
            n = len(g)
            trans = 0.0 if cat == "fatal" else n * roundtrip
            handle = n * profile.handling[cat].pick(use)
            rows.append({
                "label": _label(reason, cat, per_reason[reason] > 1),
                "reason": reason,
                "category": g["category"].iloc[0],
                "cost_category": cat,
                "exits": n,
                "transition_cycles": trans,
                "handling_cycles": handle,
            })
    out = pd.DataFrame(rows, columns=["label", "reason", "category", "cost_category", "exits",
                                      "transition_cycles", "handling_cycles"])
    out["total_cycles"] = out["transition_cycles"] + out["handling_cycles"]
    out = out.sort_values(["total_cycles", "exits"], ascending=False, kind="stable")

    native = instructions * cpi
    transition = float(out["transition_cycles"].sum())
    handling = float(out["handling_cycles"].sum())
    virt = transition + handling
    total = native + virt
    exits = int(out["exits"].sum())
    native_row = {"label": "native", "reason": "native", "category": "native",
                  "cost_category": "native", "exits": 0, "transition_cycles": 0.0,
                  "handling_cycles": 0.0, "total_cycles": native}
    total_row = {"label": "total", "reason": "total", "category": "total", "cost_category": "total",
                 "exits": exits, "transition_cycles": transition, "handling_cycles": handling,
                 "total_cycles": total}
    out = pd.concat([out, pd.DataFrame([native_row, total_row])], ignore_index=True)
    out["exits"] = out["exits"].astype(int)
    for col in ("transition_cycles", "handling_cycles", "total_cycles"):
        out[col] = out[col].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_exit = np.where(out["exits"] > 0, out["transition_cycles"] + out["handling_cycles"], np.nan)
        out["cycles_per_exit"] = per_exit / out["exits"].where(out["exits"] > 0)
        out["share_pct"] = out["total_cycles"] / total * 100 if total else np.nan
    out = out.set_index("label")
    out.index.name = None
    out = out[_OUT_COLUMNS]

    used = {"roundtrip": profile.roundtrip}
    used.update({c: profile.handling[c] for c in out["cost_category"] if c in profile.handling})
    out.attrs.update({
        "profile": profile.name,
        "cpu": f"{profile.generation} ({profile.microarchitecture}, {profile.year})",
        "use": use,
        "cpi": cpi,
        "instructions": instructions,
        "native_cycles": native,
        "transition_cycles": transition,
        "handling_cycles": handling,
        "virtualization_cycles": virt,
        "total_cycles": total,
        "overhead_pct": virt / native * 100 if native else math.nan,
        "slowdown": total / native if native else math.nan,
        "exits": exits,
        "exits_per_1k_instructions": exits / instructions * 1000 if instructions else math.nan,
        "roundtrip_cycles": roundtrip,
        "assumptions": list(ASSUMPTIONS),
        "sources": {k: f"{f} - {f.citation}" for k, f in used.items()},
    })
    return out


def summary(trace: Any, cpu: str | CpuProfile = DEFAULT_PROFILE,
            native_instructions: int | None = None, cpi: float = 1.0,
            use: Use = "mid") -> dict[str, Any]:
    """The headline numbers of :func:`estimate` as a dict.

    Keys: ``profile``, ``cpu``, ``use``, ``cpi``, ``instructions``, ``exits``,
    ``exits_per_1k_instructions``, ``native_cycles``, ``transition_cycles``,
    ``handling_cycles``, ``virtualization_cycles``, ``total_cycles``,
    ``overhead_pct``, ``slowdown``, ``roundtrip_cycles``, ``exits_by_reason``.
    """
    df = estimate(trace, cpu, native_instructions, cpi, use)
    out = {k: v for k, v in df.attrs.items() if k not in ("assumptions", "sources")}
    body = df.drop(index=["native", "total"])
    out["exits_by_reason"] = {r: int(n) for r, n in body.groupby("reason", sort=False)["exits"].sum().items()}
    return out


# ------------------------------------------------------------- technique compare
def compare_techniques(trace: Any, cpu: str | CpuProfile = DEFAULT_PROFILE,
                       native_instructions: int | None = None, cpi: float = 1.0,
                       use: Use = "mid", translated_blocks: int | None = None,
                       pv_batch: float = 1.0) -> pd.DataFrame:
    """Cost the same guest under three ways of virtualizing the CPU.

    * **trap-and-emulate (VT-x)**: every exit in the trace costs a hardware round
      trip plus the VMM's handling (:func:`estimate`).
    * **binary translation**: no hardware transitions; each sensitive instruction
      that exited under VT-x is instead rewritten into a call to the VMM
      (:data:`BT_COSTS` per cost category), each distinct code site costs one
      block translation, and translated code runs a little slower than native.
    * **paravirtualization**: the guest kernel is modified to call the hypervisor
      (:data:`PV_COSTS` per hypercall plus the VMM's handling), with ``pv_batch``
      sensitive operations per hypercall (Xen batches page-table updates).

    Args:
        translated_blocks: basic blocks the translator has to translate; default:
            the number of distinct ``guest_rip`` values in the trace (or the number of
            distinct reasons if the trace has no RIPs).
        pv_batch: operations one hypercall covers (1 = no batching).

    Returns:
        One row per technique: ``events`` (exits / translated instructions /
        hypercalls), ``cycles_per_event``, ``virtualization_cycles``,
        ``native_cycles``, ``total_cycles``, ``overhead_pct`` and ``assumptions``.
    """
    profile = get_profile(cpu)
    if pv_batch < 1:
        raise ValueError("pv_batch must be at least 1")
    vt = estimate(trace, profile, native_instructions, cpi, use)
    native = vt.attrs["native_cycles"]
    body = vt.drop(index=["native", "total"])
    df = classify(trace)

    vt_cycles = vt.attrs["virtualization_cycles"]
    exits = vt.attrs["exits"]

    live = body[body["cost_category"] != "fatal"]
    bt_instr = float(sum(BT_COSTS[c].pick(use) * n for c, n in zip(live["cost_category"], live["exits"])))
    if translated_blocks is None:
        if "guest_rip" in df.columns and df["guest_rip"].notna().any():
            translated_blocks = int(df["guest_rip"].nunique())
        else:
            translated_blocks = int(df["reason"].nunique())
    bt_blocks = translated_blocks * BT_COSTS["per_block"].pick(use)
    bt_code = native * BT_COSTS["code_slowdown"].pick(use)
    bt_cycles = bt_instr + bt_blocks + bt_code
    bt_events = int(live["exits"].sum())

    hypercalls = float(sum(math.ceil(n / pv_batch) for n in live["exits"]))
    pv_trans = hypercalls * PV_COSTS["hypercall"].pick(use)
    pv_handle = float(sum(profile.handling[c].pick(use) * n
                          for c, n in zip(live["cost_category"], live["exits"])))
    pv_cycles = pv_trans + pv_handle

    def row(name: str, events: float, cycles: float, assumptions: str) -> dict[str, Any]:
        return {"technique": name, "events": events,
                "cycles_per_event": cycles / events if events else math.nan,
                "virtualization_cycles": cycles, "native_cycles": native,
                "total_cycles": native + cycles,
                "overhead_pct": cycles / native * 100 if native else math.nan,
                "assumptions": assumptions}

    rows = [
        row("trap-and-emulate (VT-x)", exits, vt_cycles,
            f"{exits} exits x (round trip {profile.roundtrip.pick(use):,.0f} cycles on {profile.name} "
            f"+ VMM handling by category); guest code runs natively."),
        row("binary translation", bt_events, bt_cycles,
            f"{bt_events} sensitive instructions rewritten into VMM calls "
            f"({bt_instr:,.0f} cycles, BT_COSTS by category, no world switch); "
            f"{translated_blocks} blocks translated x {BT_COSTS['per_block'].pick(use):,.0f} cycles; "
            f"translated code {BT_COSTS['code_slowdown'].pick(use):.0%} slower than native."),
        row("paravirtualization", hypercalls, pv_cycles,
            f"{hypercalls:,.0f} hypercalls ({pv_batch:g} operations each) x "
            f"{PV_COSTS['hypercall'].pick(use):,.0f} cycles trap + same VMM handling as VT-x; "
            f"needs a modified guest kernel."),
    ]
    out = pd.DataFrame(rows).set_index("technique")
    out.index.name = None
    out.attrs.update({"profile": profile.name, "use": use, "cpi": cpi,
                      "translated_blocks": translated_blocks, "pv_batch": pv_batch,
                      "assumptions": list(ASSUMPTIONS)})
    return out


# -------------------------------------------------------------- generations etc.
def by_generation(trace: Any = None, native_instructions: int | None = None, cpi: float = 1.0,
                  use: Use = "mid", include_generic: bool = False) -> pd.DataFrame:
    """The round-trip cost of every CPU profile (and, given a trace, its overhead there).

    Returns one row per profile, oldest first, indexed by profile name, with
    ``generation``, ``microarchitecture``, ``year``, ``roundtrip_low``,
    ``roundtrip_high``, ``roundtrip_cycles`` (the ``use`` value), ``kind`` and
    ``source``; with a trace also ``exits``, ``native_cycles``,
    ``virtualization_cycles`` and ``overhead_pct``.
    """
    rows = []
    for p in PROFILES.values():
        if p.name == DEFAULT_PROFILE and not include_generic:
            continue
        r = {"profile": p.name, "generation": p.generation, "microarchitecture": p.microarchitecture,
             "year": p.year, "roundtrip_low": p.roundtrip.low, "roundtrip_high": p.roundtrip.high,
             "roundtrip_cycles": p.roundtrip.pick(use), "kind": p.roundtrip.kind,
             "source": p.roundtrip.source}
        if trace is not None:
            a = estimate(trace, p, native_instructions, cpi, use).attrs
            r.update({"exits": a["exits"], "native_cycles": a["native_cycles"],
                      "virtualization_cycles": a["virtualization_cycles"],
                      "overhead_pct": a["overhead_pct"]})
        rows.append(r)
    out = pd.DataFrame(rows).set_index("profile")
    out.index.name = None
    return out


def overhead_curve(rates: Iterable[float] | None = None, cpu: str | CpuProfile = DEFAULT_PROFILE,
                   category: str = "benign", cpi: float = 1.0, use: Use = "mid") -> pd.DataFrame:
    """Overhead as a function of exit rate, for exits of one cost category.

    ``overhead_pct = rate / 1000 x cycles_per_exit / cpi x 100`` where ``rate`` is in
    exits per 1,000 guest instructions.  Returns columns ``exits_per_1k_instructions``,
    ``cycles_per_exit`` and ``overhead_pct``.
    """
    profile = get_profile(cpu)
    if rates is None:
        rates = np.logspace(-3, 2, 31)
    rates = np.asarray(list(rates), dtype=float)
    per_exit = profile.cycles_per_exit(category, use)
    return pd.DataFrame({
        "exits_per_1k_instructions": rates,
        "cycles_per_exit": per_exit,
        "overhead_pct": rates / 1000 * per_exit / cpi * 100,
    })


def profiles_table() -> pd.DataFrame:
    """Every number of every profile with its range, kind, source and note (long format)."""
    rows = []
    for p in PROFILES.values():
        for item, f in p.figures.items():
            rows.append({"profile": p.name, "year": p.year, "item": item, "low": f.low,
                         "high": f.high, "kind": f.kind, "source": f.source, "note": f.note})
    return pd.DataFrame(rows)


def slowdown_factor(overhead_pct: float) -> float:
    """Time under virtualization as a multiple of native time, from an overhead in %.

    An overhead of 65,008.3 % means the run took 1 + 650.083 = 651.08 times as long
    as natively: for costs this large a factor reads better than a percentage.
    """
    if math.isnan(overhead_pct):
        return math.nan
    if overhead_pct < 0:
        raise ValueError(f"an overhead cannot be negative: {overhead_pct}%")
    return 1.0 + overhead_pct / 100.0


def format_factor(overhead_pct: float) -> str:
    """``"x651"`` for an overhead of 65,008.3 %; one decimal below x10 (``"x1.3"``)."""
    factor = slowdown_factor(overhead_pct)
    if math.isnan(factor):
        return "-"
    return f"x{factor:,.0f}" if factor >= 10 else f"x{factor:,.1f}"

"""vtlab.plots: every plot renders with Agg, and draws the numbers it claims to draw."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vtlab import cost, plots  # noqa: E402
from vtlab.cost import CostFigure, CpuProfile  # noqa: E402


def F(low, high):
    return CostFigure(low, high, "model", "estimate", "test value")


TOY = CpuProfile(
    "toy", "Toy CPU", 2000, "toy core", F(100, 300),
    {"benign": F(10, 30), "instruction": F(100, 300), "memory": F(1_000, 3_000),
     "userspace-device": F(10_000, 30_000), "interrupt": F(500, 1_500), "fatal": F(0, 0)},
)

PALETTE = {v.lower() for v in plots.OKABE_ITO.values()}


def trace_a() -> pd.DataFrame:
    """5 CPUID, 3 I/O (1 to user space), 2 MSR_READ, 1 HLT over 20,000 instructions."""
    reasons = ["CPUID", "IO_INSTRUCTION", "CPUID", "MSR_READ", "IO_INSTRUCTION", "CPUID",
               "IO_INSTRUCTION", "CPUID", "MSR_READ", "CPUID", "HLT"]
    handlers = ["handle_io_userspace" if i == 4 else "h" for i in range(len(reasons))]
    return pd.DataFrame({"seq": range(len(reasons)), "reason": reasons, "handler": handlers,
                         "guest_instructions": [1_000 * (i + 1) for i in range(10)] + [20_000],
                         "guest_rip": [0x1000 + 4 * i for i in range(len(reasons))]})


def trace_b() -> pd.DataFrame:
    """trace_a without its I/O exits (as if the I/O bitmap let them through)."""
    t = trace_a()
    return t[t["reason"] != "IO_INSTRUCTION"].reset_index(drop=True)


def render(fig: Figure) -> bytes:
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    data = buf.getvalue()
    assert data.startswith(b"\x89PNG")
    return data


def labels_of(ax) -> list[str]:
    ax.figure.canvas.draw()
    return [t.get_text() for t in ax.get_yticklabels()]


def face_colors(ax) -> set[str]:
    return {to_hex(p.get_facecolor()).lower() for p in ax.patches}


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    """The plots build Figures directly: nothing must appear in pyplot's registry."""
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before


def test_exit_counts_bars_are_the_counts():
    fig = plots.exit_counts(trace_a())
    render(fig)
    ax = fig.axes[0]
    widths = [int(p.get_width()) for p in ax.patches]
    drawn = dict(zip(labels_of(ax), widths))
    assert drawn == {"CPUID": 5, "IO_INSTRUCTION (in VMM)": 2, "MSR_READ": 2,
                     "IO_INSTRUCTION (user space)": 1, "HLT": 1}
    assert widths == sorted(widths)                     # most frequent at the top
    assert ax.get_xlabel() == "exits"
    assert "11 exits" in ax.get_title()
    assert face_colors(ax) <= PALETTE
    assert to_hex(ax.patches[-1].get_facecolor()).upper() == plots.CATEGORY_COLORS["benign"]


def test_exit_counts_top_and_empty():
    fig = plots.exit_counts(trace_a(), top=2)
    assert sorted(int(p.get_width()) for p in fig.axes[0].patches) == [2, 5]
    empty = plots.exit_counts(pd.DataFrame({"reason": pd.Series(dtype=str)}))
    render(empty)
    assert not empty.axes[0].patches


def test_cycle_breakdown_segments():
    fig = plots.cycle_breakdown(trace_a(), cpu=TOY)
    render(fig)
    top, bottom = fig.axes
    a = cost.estimate(trace_a(), cpu=TOY).attrs
    # native 20,000; transition 11 x 200; handling 5x20 + 2x200 + 1x20,000 + 2x200 + 1x20
    assert a["native_cycles"] == 20_000.0
    assert a["transition_cycles"] == 2_200.0
    assert a["handling_cycles"] == 100 + 400 + 20_000 + 400 + 20
    assert [p.get_width() for p in top.patches] == [20_000.0, 2_200.0, 20_920.0]
    assert [p.get_x() for p in top.patches] == [0.0, 20_000.0, 22_200.0]
    assert top.get_xlabel() == "cycles" and bottom.get_xlabel() == "cycles"
    # (2,200 + 20,920) / 20,000 = 115.6 %: the run took 2.156 times the native time
    assert "x2.2 native time" in fig.get_suptitle()
    # per reason: transition bars then handling bars, bottom-up (cheapest first)
    n = len(bottom.patches) // 2
    trans = dict(zip(labels_of(bottom), [p.get_width() for p in bottom.patches[:n]]))
    handle = dict(zip(labels_of(bottom), [p.get_width() for p in bottom.patches[n:]]))
    assert trans["CPUID"] == 1_000.0 and handle["CPUID"] == 100.0
    assert handle["IO_INSTRUCTION (user space)"] == 20_000.0
    assert face_colors(top) <= PALETTE


def test_exit_timeline_points():
    t = trace_a()
    fig = plots.exit_timeline(t)
    render(fig)
    ax, cumulative = fig.axes
    xs = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections])
    assert sorted(xs.tolist()) == sorted(t["guest_instructions"].tolist())
    positions = dict(zip(labels_of(ax), ax.get_yticks()))
    # reasons in order of first occurrence, top to bottom
    assert sorted(positions, key=positions.get, reverse=True) == ["CPUID", "IO_INSTRUCTION", "MSR_READ", "HLT"]
    line = cumulative.lines[0]
    assert line.get_ydata()[-1] == len(t)
    assert cumulative.get_xlabel() == "guest instructions retired"
    assert cumulative.get_ylabel() == "exits (cumulative)"
    for c in ax.collections:
        assert to_hex(c.get_facecolor()[0]).lower() in PALETTE


def test_exit_timeline_needs_instruction_counts():
    with pytest.raises(ValueError, match="guest_instructions"):
        plots.exit_timeline(pd.DataFrame({"reason": ["CPUID"]}))


def test_overhead_vs_exit_rate_lines():
    rates = [0.1, 1.0, 10.0]
    fig = plots.overhead_vs_exit_rate(cpu=TOY, rates=rates, categories=("benign", "userspace-device"),
                                      traces={"a": trace_a()})
    render(fig)
    ax = fig.axes[0]
    benign, user = ax.lines[:2]
    assert benign.get_xdata().tolist() == rates
    # 220 cycles per benign exit: 0.1/1000 x 220 = 2.2 % overhead, i.e. x1.022 native time
    assert benign.get_ydata().tolist() == pytest.approx([1.022, 1.22, 3.2])
    # 20,200 cycles per user-space exit: 202 % -> x3.02, 2,020 % -> x21.2, 20,200 % -> x203
    assert user.get_ydata().tolist() == pytest.approx([3.02, 21.2, 203.0])
    point = ax.collections[-1].get_offsets()[0]
    a = cost.estimate(trace_a(), cpu=TOY).attrs
    assert point.tolist() == pytest.approx([a["exits_per_1k_instructions"], 1 + a["overhead_pct"] / 100])
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "exits per 1,000 guest instructions" in ax.get_xlabel()
    assert "x native time" in ax.get_ylabel()


def test_roundtrip_by_generation_bars():
    fig = plots.roundtrip_by_generation()
    render(fig)
    ax = fig.axes[0]
    gen = cost.by_generation()
    assert [p.get_height() for p in ax.patches] == gen["roundtrip_cycles"].tolist()
    assert ax.patches[0].get_height() == 2_409
    assert "cycles" in ax.get_ylabel()
    assert face_colors(ax) <= PALETTE
    fig.canvas.draw()
    assert ax.get_xticklabels()[0].get_text() == "prescott\n2005"
    low = plots.roundtrip_by_generation(use="low")
    assert [p.get_height() for p in low.axes[0].patches] == gen["roundtrip_low"].tolist()


def test_compare_settings_bars():
    fig = plots.compare_settings(trace_a(), trace_b(), labels=("all ports exit", "bitmap"), cpu=TOY)
    render(fig)
    left, right = fig.axes
    heights = [p.get_height() for p in left.patches]
    n = len(heights) // 2
    fig.canvas.draw()
    reasons = [t.get_text() for t in left.get_xticklabels()]
    assert dict(zip(reasons, heights[:n])) == {"CPUID": 5, "IO_INSTRUCTION": 3, "MSR_READ": 2, "HLT": 1}
    assert dict(zip(reasons, heights[n:])) == {"CPUID": 5, "IO_INSTRUCTION": 0, "MSR_READ": 2, "HLT": 1}
    assert left.get_ylabel() == "exits" and right.get_ylabel() == "cycles"
    # stacked native / transition / handling per run
    a, b = (cost.estimate(t, cpu=TOY).attrs for t in (trace_a(), trace_b()))
    stacks = [p.get_height() for p in right.patches]
    assert stacks == [a["native_cycles"], b["native_cycles"], a["transition_cycles"], b["transition_cycles"],
                      a["handling_cycles"], b["handling_cycles"]]
    assert "11 -> 8" in fig.get_suptitle()
    assert face_colors(right) <= PALETTE


def test_technique_comparison_bars():
    fig = plots.technique_comparison(trace_a(), cpu=TOY)
    render(fig)
    ax = fig.axes[0]
    comp = cost.compare_techniques(trace_a(), cpu=TOY)
    heights = [p.get_height() for p in ax.patches]
    assert heights[:3] == comp["native_cycles"].tolist()
    assert heights[3:] == pytest.approx(comp["virtualization_cycles"].tolist())
    assert ax.get_ylabel() == "cycles"


def test_every_plot_has_title_and_axis_labels():
    figs = [plots.exit_counts(trace_a()), plots.cycle_breakdown(trace_a()), plots.exit_timeline(trace_a()),
            plots.overhead_vs_exit_rate(), plots.roundtrip_by_generation(),
            plots.compare_settings(trace_a(), trace_b()), plots.technique_comparison(trace_a())]
    for fig in figs:
        render(fig)
        titled = bool(fig.get_suptitle()) or any(ax.get_title() for ax in fig.axes)
        assert titled
        xlabels = {ax.get_xlabel() for ax in fig.axes} - {""}
        ylabels = {ax.get_ylabel() for ax in fig.axes} - {""}
        assert xlabels and ylabels, fig
        units = ("cycles", "exits", "guest instructions", "exit reason", "CPU generation", "%")
        assert any(u in label for label in xlabels | ylabels for u in units), (xlabels, ylabels)


def test_draws_into_given_axes():
    fig = Figure()
    ax = fig.subplots()
    assert plots.exit_counts(trace_a(), ax=ax) is fig
    assert len(ax.patches) == 5


def test_make_cost_figure_script(tmp_path, repo_root):
    import runpy

    script = runpy.run_path(str(repo_root / "benchmarks" / "make_cost_figure.py"), run_name="not_main")
    out = script["main"](["--out", str(tmp_path / "fig.png"), "--cpu", "skylake"])
    assert out.read_bytes().startswith(b"\x89PNG")
    trace = script["hand_made_trace"]()
    assert len(trace) == sum(n for *_, n in script["MIX"]) + 1
    assert trace["reason"].iloc[-1] == "HLT"


def test_overhead_text_uses_factors_for_large_overheads():
    # 65,008.3 % overhead = 651.08 times the native time (issue #16: "x651", not "65,008.3 %")
    assert plots.overhead_text(65_008.3) == "x651 native time"
    assert plots.overhead_text(115.6) == "x2.2 native time"
    assert plots.overhead_text(45.25) == "+45.2 %" or plots.overhead_text(45.25) == "+45.3 %"

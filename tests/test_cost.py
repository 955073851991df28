"""vtlab.cost: the arithmetic of the cycle-cost model on hand-made traces.

Every expected number is written out literally and worked by hand in the comments, so
that a change to the model's formulas (or to its data tables) shows up here.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest

from vtlab import cost
from vtlab.arch import ExitReason
from vtlab.cost import CostFigure, CpuProfile


def F(low: float, high: float) -> CostFigure:
    return CostFigure(low, high, "model", "estimate", "test value")


# A toy CPU with round numbers: mid round trip 200, mid handling benign 20,
# instruction 200, memory 2,000, user-space device 20,000, interrupt 1,000.
TOY = CpuProfile(
    "toy", "Toy CPU", 2000, "toy core", F(100, 300),
    {"benign": F(10, 30), "instruction": F(100, 300), "memory": F(1_000, 3_000),
     "userspace-device": F(10_000, 30_000), "interrupt": F(500, 1_500), "fatal": F(0, 0)},
)


def toy_trace() -> pd.DataFrame:
    """3 CPUID, 2 I/O to the VMM, 2 I/O to user space (one by handler, one by device),
    1 HLT and 1 triple fault; 10,000 guest instructions in all."""
    rows = [
        ("CPUID", "handle_cpuid", None, 1_000),
        ("CPUID", "handle_cpuid", None, 2_000),
        ("IO_INSTRUCTION", "handle_io", "serial", 3_000),
        ("CPUID", "handle_cpuid", None, 4_000),
        ("IO_INSTRUCTION", "handle_io_userspace", None, 5_000),
        ("IO_INSTRUCTION", "handle_io", "serial", 6_000),
        ("IO_INSTRUCTION", "handle_io", "userspace", 7_000),
        ("HLT", "handle_hlt", None, 8_000),
        ("TRIPLE_FAULT", "handle_triple_fault", None, 10_000),
    ]
    return pd.DataFrame({
        "seq": range(len(rows)),
        "reason": [r[0] for r in rows],
        "handler": [r[1] for r in rows],
        "device": [r[2] for r in rows],
        "guest_instructions": [r[3] for r in rows],
        "guest_rip": [0x1000, 0x1000, 0x1010, 0x1000, 0x1020, 0x1010, 0x1030, 0x1040, 0x1050],
    })


class FakeTrace:
    """Stands in for vtlab.trace.Trace: to_dataframe() and instructions_total."""

    def __init__(self, df: pd.DataFrame, instructions_total: int):
        self._df, self.instructions_total = df, instructions_total

    def to_dataframe(self) -> pd.DataFrame:
        return self._df.copy()


# ------------------------------------------------------------------ arithmetic
def test_estimate_rows_mid():
    df = cost.estimate(toy_trace(), cpu=TOY)
    # CPUID: 3 x 200 transition, 3 x 20 handling
    assert df.loc["CPUID", ["exits", "transition_cycles", "handling_cycles", "total_cycles"]].tolist() \
        == [3, 600.0, 60.0, 660.0]
    # I/O to the VMM: 2 x 200, 2 x 200
    assert df.loc["IO_INSTRUCTION (in VMM)", ["exits", "transition_cycles", "handling_cycles"]].tolist() \
        == [2, 400.0, 400.0]
    # I/O to user space (by handler name and by device column): 2 x 200, 2 x 20,000
    assert df.loc["IO_INSTRUCTION (user space)", ["exits", "transition_cycles", "handling_cycles"]].tolist() \
        == [2, 400.0, 40_000.0]
    assert df.loc["IO_INSTRUCTION (user space)", "cost_category"] == "userspace-device"
    assert df.loc["HLT", "total_cycles"] == 220.0
    # a triple fault stops the VM: counted, not charged
    assert df.loc["TRIPLE_FAULT", ["exits", "total_cycles"]].tolist() == [1, 0.0]
    assert df.loc["native", "total_cycles"] == 10_000.0
    # 1,600 transition + 40,480 handling = 42,080; + 10,000 native = 52,080
    assert df.loc["total", ["exits", "transition_cycles", "handling_cycles", "total_cycles"]].tolist() \
        == [9, 1_600.0, 40_480.0, 52_080.0]
    assert df.loc["CPUID", "cycles_per_exit"] == 220.0
    assert df.loc["CPUID", "share_pct"] == pytest.approx(660 / 52_080 * 100)
    assert df.loc["total", "share_pct"] == pytest.approx(100.0)
    assert df.drop(index="total")["share_pct"].sum() == pytest.approx(100.0)


def test_estimate_order_and_columns():
    df = cost.estimate(toy_trace(), cpu=TOY)
    assert list(df.columns) == ["reason", "category", "cost_category", "exits", "transition_cycles",
                                "handling_cycles", "total_cycles", "cycles_per_exit", "share_pct"]
    # most expensive first, then native and total
    assert list(df.index) == ["IO_INSTRUCTION (user space)", "IO_INSTRUCTION (in VMM)", "CPUID", "HLT",
                              "TRIPLE_FAULT", "native", "total"]
    assert df.loc["CPUID", "category"] == "benign"          # filled in from vtlab.arch
    assert df.loc["TRIPLE_FAULT", "cost_category"] == "fatal"


def test_estimate_attrs():
    a = cost.estimate(toy_trace(), cpu=TOY).attrs
    assert a["profile"] == "toy"
    assert a["instructions"] == 10_000                     # from the last row
    assert a["native_cycles"] == 10_000.0
    assert a["transition_cycles"] == 1_600.0
    assert a["handling_cycles"] == 40_480.0
    assert a["virtualization_cycles"] == 42_080.0
    assert a["overhead_pct"] == pytest.approx(420.8)       # 42,080 / 10,000
    assert a["slowdown"] == pytest.approx(5.208)
    assert a["exits"] == 9
    assert a["exits_per_1k_instructions"] == pytest.approx(0.9)
    assert a["roundtrip_cycles"] == 200.0
    assert a["assumptions"] == list(cost.ASSUMPTIONS)
    assert set(a["sources"]) == {"roundtrip", "benign", "instruction", "userspace-device", "fatal"}


@pytest.mark.parametrize("use, virt", [
    # low: CPUID 3 x 110, VMM I/O 2 x 200, user I/O 2 x 10,100, HLT 110
    ("low", 330 + 400 + 20_200 + 110),
    # high: CPUID 3 x 330, VMM I/O 2 x 600, user I/O 2 x 30,300, HLT 330
    ("high", 990 + 1_200 + 60_600 + 330),
    ("mid", 42_080),
])
def test_estimate_use_picks_range_end(use, virt):
    assert cost.estimate(toy_trace(), cpu=TOY, use=use).attrs["virtualization_cycles"] == virt


def test_cpi_and_native_instructions():
    a = cost.estimate(toy_trace(), cpu=TOY, cpi=2.0).attrs
    assert a["native_cycles"] == 20_000.0
    assert a["overhead_pct"] == pytest.approx(210.4)
    a = cost.estimate(toy_trace(), cpu=TOY, native_instructions=100_000).attrs
    assert a["instructions"] == 100_000
    assert a["overhead_pct"] == pytest.approx(42.08)
    assert a["exits_per_1k_instructions"] == pytest.approx(0.09)


def test_trace_object_uses_instructions_total():
    a = cost.estimate(FakeTrace(toy_trace(), 84_160), cpu=TOY).attrs
    assert a["instructions"] == 84_160
    assert a["overhead_pct"] == pytest.approx(50.0)
    # an explicit count still wins
    assert cost.estimate(FakeTrace(toy_trace(), 84_160), cpu=TOY,
                         native_instructions=42_080).attrs["overhead_pct"] == pytest.approx(100.0)


def test_real_profile_numbers():
    trace = pd.DataFrame({"reason": ["CPUID"] * 10, "guest_instructions": range(100, 1_100, 100)})
    df = cost.estimate(trace, cpu="prescott")
    assert df.loc["CPUID", "transition_cycles"] == 24_090.0           # 10 x 2,409
    assert df.loc["CPUID", "handling_cycles"] == 7_000.0              # 10 x 700 (400-1,000)
    assert df.attrs["native_cycles"] == 1_000.0
    assert cost.estimate(trace, cpu="generic-modern").loc["CPUID", "transition_cycles"] == 4_500.0
    assert cost.estimate(trace).attrs["profile"] == cost.DEFAULT_PROFILE == "generic-modern"


def test_empty_trace():
    empty = pd.DataFrame({"reason": pd.Series(dtype=str), "guest_instructions": pd.Series(dtype=int)})
    df = cost.estimate(empty, cpu=TOY, native_instructions=5_000)
    assert list(df.index) == ["native", "total"]
    assert df.attrs["overhead_pct"] == 0.0
    assert df.attrs["exits"] == 0
    with pytest.raises(ValueError, match="native_instructions"):
        cost.estimate(empty, cpu=TOY)


def test_reason_spellings():
    trace = pd.DataFrame({"reason": [ExitReason.CPUID, 10, "cpuid", "ExitReason.CPUID"]})
    df = cost.estimate(trace, cpu=TOY, native_instructions=1_000)
    assert df.loc["CPUID", "exits"] == 4


def test_errors():
    with pytest.raises(KeyError, match="prescott"):
        cost.estimate(toy_trace(), cpu="pentium-pro")
    with pytest.raises(ValueError, match="use"):
        cost.estimate(toy_trace(), cpu=TOY, use="median")
    with pytest.raises(ValueError, match="reason"):
        cost.estimate(pd.DataFrame({"x": [1]}), cpu=TOY)
    with pytest.raises(ValueError):
        CostFigure(2, 1, "model")
    with pytest.raises(ValueError, match="source"):
        CostFigure(1, 2, "no-such-paper")


def test_summary():
    s = cost.summary(toy_trace(), cpu=TOY)
    assert s["virtualization_cycles"] == 42_080.0
    assert s["overhead_pct"] == pytest.approx(420.8)
    assert s["exits_by_reason"] == {"IO_INSTRUCTION": 4, "CPUID": 3, "HLT": 1, "TRIPLE_FAULT": 1}
    assert "assumptions" not in s


# ----------------------------------------------------------- categories
@pytest.mark.parametrize("reason, handler, device, expected", [
    ("CPUID", None, None, "benign"),
    ("HLT", None, None, "benign"),
    ("VMCALL", None, None, "benign"),
    ("IO_INSTRUCTION", "handle_io", None, "instruction"),
    ("IO_INSTRUCTION", "handle_io_userspace", None, "userspace-device"),
    ("IO_INSTRUCTION", "handle_io", "userspace", "userspace-device"),
    ("IO_INSTRUCTION", None, "user-space", "userspace-device"),
    ("MSR_READ", None, None, "instruction"),
    ("MSR_WRITE", None, None, "instruction"),
    ("CR_ACCESS", None, None, "instruction"),
    ("RDTSC", None, None, "instruction"),
    ("WBINVD", None, None, "instruction"),          # from the display category
    ("EPT_VIOLATION", None, None, "memory"),
    ("EPT_MISCONFIG", None, None, "memory"),
    ("EXTERNAL_INTERRUPT", None, None, "interrupt"),
    ("INTERRUPT_WINDOW", None, None, "interrupt"),
    ("EXCEPTION_NMI", None, None, "interrupt"),
    ("TRIPLE_FAULT", None, None, "fatal"),
    ("INVALID_STATE", None, None, "fatal"),
])
def test_cost_category(reason, handler, device, expected):
    assert cost.cost_category(reason, handler, device) == expected


def test_count_exits():
    counts = cost.count_exits(toy_trace())
    assert counts["exits"].to_dict() == {"CPUID": 3, "IO_INSTRUCTION (in VMM)": 2,
                                         "IO_INSTRUCTION (user space)": 2, "HLT": 1, "TRIPLE_FAULT": 1}


# ----------------------------------------------------------- techniques
def test_compare_techniques_arithmetic():
    trace = pd.DataFrame({"reason": ["CPUID"] * 4, "guest_rip": [0x1000, 0x1000, 0x1008, 0x1008]})
    comp = cost.compare_techniques(trace, cpu=TOY, native_instructions=100_000)
    assert list(comp.index) == ["trap-and-emulate (VT-x)", "binary translation", "paravirtualization"]
    # VT-x: 4 x (200 + 20)
    assert comp.loc["trap-and-emulate (VT-x)", "virtualization_cycles"] == 880.0
    # BT: 4 x 275 (benign 50-500) + 2 blocks x 5,500 (1,000-10,000) + 10% of 100,000 native
    assert comp.loc["binary translation", "virtualization_cycles"] == pytest.approx(1_100 + 11_000 + 10_000)
    assert comp.loc["binary translation", "events"] == 4
    # PV: 4 hypercalls x 900 (300-1,500) + 4 x 20 handling
    assert comp.loc["paravirtualization", "virtualization_cycles"] == pytest.approx(3_680.0)
    assert comp.loc["paravirtualization", "overhead_pct"] == pytest.approx(3.68)
    assert (comp["native_cycles"] == 100_000.0).all()
    assert comp["assumptions"].str.len().min() > 20
    # batching two operations per hypercall halves the traps: 2 x 900 + 4 x 20
    batched = cost.compare_techniques(trace, cpu=TOY, native_instructions=100_000, pv_batch=2)
    assert batched.loc["paravirtualization", "virtualization_cycles"] == pytest.approx(1_880.0)
    assert batched.loc["paravirtualization", "events"] == 2


def test_overhead_curve():
    curve = cost.overhead_curve([0.1, 1, 10], cpu=TOY, category="benign")
    # 1 exit per 1,000 instructions x 220 cycles per exit / cpi 1 = 22% of native time
    assert curve["overhead_pct"].tolist() == pytest.approx([2.2, 22.0, 220.0])
    assert (curve["cycles_per_exit"] == 220.0).all()
    assert cost.overhead_curve([1], cpu=TOY, category="benign", cpi=2.0)["overhead_pct"].iloc[0] == 11.0


# ----------------------------------------------------------- the data tables
def test_every_profile_number_has_a_source():
    assert len(cost.PROFILES) >= 12
    for profile in cost.PROFILES.values():
        assert set(profile.handling) == set(cost.COST_CATEGORIES), profile.name
        for item, fig in profile.figures.items():
            where = f"{profile.name}.{item}"
            assert fig.source_keys, where
            assert all(k in cost.SOURCES for k in fig.source_keys), where
            assert len(fig.citation) > 40, where
            assert fig.note, where
            assert fig.kind in ("measured", "vendor", "derived", "estimate", "convention"), where
            assert 0 <= fig.low <= fig.high, where
        assert profile.sources.keys() == profile.figures.keys()
        assert all(profile.sources.values())
        lo, hi = profile.roundtrip_cycles
        assert 100 <= lo <= hi <= 5_000, profile.name


def test_technique_tables_have_sources():
    for table in (cost.BT_COSTS, cost.PV_COSTS, cost.VMM_HANDLING):
        for name, fig in table.items():
            assert fig.source_keys and fig.note and fig.low <= fig.high, name


def test_profiles_cover_the_generations():
    names = list(cost.PROFILES)
    for needed in ("prescott", "merom", "penryn", "nehalem", "westmere", "sandy-bridge", "ivy-bridge",
                   "haswell", "broadwell", "skylake", "cascade-lake", "ice-lake", "sapphire-rapids",
                   "generic-modern"):
        assert needed in names
    years = [p.year for p in cost.PROFILES.values()]
    assert years == sorted(years)
    assert cost.PROFILES["prescott"].roundtrip_cycles == (2_409, 2_409)
    assert cost.PROFILES["prescott"].generation == "Pentium 4 662/672"
    assert cost.PROFILES["prescott"].year == 2005


def test_by_generation_falls_from_prescott():
    gen = cost.by_generation()
    assert "generic-modern" not in gen.index
    mids = gen["roundtrip_cycles"]
    # the vendor chart: strictly cheaper each generation from Prescott to Sandy Bridge
    chain = mids[["prescott", "merom", "penryn", "nehalem", "westmere", "sandy-bridge"]].tolist()
    assert chain == sorted(chain, reverse=True) and len(set(chain)) == len(chain)
    # every later part costs well under a third of Prescott, within Nehalem's range or below
    for name in gen.index[gen["year"] >= 2012]:
        assert mids[name] < mids["prescott"] / 3
        assert gen.loc[name, "roundtrip_low"] <= gen.loc["nehalem", "roundtrip_high"]
    assert (gen["roundtrip_low"] <= gen["roundtrip_cycles"]).all()
    assert (gen["roundtrip_cycles"] <= gen["roundtrip_high"]).all()


def test_by_generation_with_trace():
    trace = pd.DataFrame({"reason": ["CPUID"] * 10})
    gen = cost.by_generation(trace, native_instructions=10_000)
    # Prescott: 10 x (2,409 + 700) = 31,090 cycles on 10,000 native
    assert gen.loc["prescott", "virtualization_cycles"] == 31_090.0
    assert gen.loc["prescott", "overhead_pct"] == pytest.approx(310.9)
    assert gen.loc["prescott", "overhead_pct"] > gen.loc["skylake", "overhead_pct"]


def test_profiles_table():
    table = cost.profiles_table()
    assert len(table) == len(cost.PROFILES) * (1 + len(cost.COST_CATEGORIES))
    assert table["source"].str.len().min() > 0
    assert not table[["low", "high"]].isna().any().any()


def test_figure_helpers():
    fig = CostFigure(300, 600, "kvm-unit-tests + model", "derived", "n")
    assert fig.mid == 450 and fig.is_range
    assert fig.pick("low") == 300 and fig.pick("high") == 600
    assert fig.source_keys == ["kvm-unit-tests", "model"]
    assert "kvm-unit-tests" in str(fig)
    assert not math.isnan(TOY.cycles_per_exit("memory"))
    assert TOY.cycles_per_exit("fatal") == 0.0


def test_slowdown_factor_and_format():
    # 65,008.3 % overhead: the run takes 1 + 650.083 times the native time.
    assert cost.slowdown_factor(65_008.3) == pytest.approx(651.083)
    assert cost.slowdown_factor(0.0) == 1.0
    assert cost.format_factor(65_008.3) == "x651"
    assert cost.format_factor(30.0) == "x1.3"
    assert cost.format_factor(float("nan")) == "-"
    with pytest.raises(ValueError, match="negative"):
        cost.slowdown_factor(-5.0)

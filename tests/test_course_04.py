"""Key results of the course notebook 04_exits.

The notebook is executed once (a copy with one extra cell appended that prints its key
variables as JSON) through ``nbrun.run_notebook``; the tests then check what a learner
would read off its tables, widgets and plots: which instructions exit with the controls
off and on, the decoded qualifications, the endless exits of a handler that forgets to
advance RIP, the learner's handlers (solutions) at work, the dashboard, the cost tables and
the "best exit is no exit" measurements. The notebook is the instructor source
``course/source/04_exits/04_exits.ipynb``. nbgrader is checked too: metadata as
docs/NOTEBOOKS.md says and the instructor version validates. The learner version
``notebooks/04_exits.ipynb`` (untouched: runs to the end, passes no test) is executed by
tests/test_notebooks.py.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from nbrun import (assert_nbgrader_conventions, assert_nbgrader_validates, assert_plots_have_captions,
                   assert_stored_without_outputs, code_outputs, run_with_probe)

REPO = Path(__file__).resolve().parent.parent
STEM = "04_exits"
NOTEBOOK = REPO / "course" / "source" / STEM / f"{STEM}.ipynb"
MARK = "@@KEY-RESULTS@@"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

PROBE = """
import json as _json
_dash_default = dashboard.exit_counts
dashboard.toggles[ProcBased.HLT_EXITING].value = not dashboard.toggles[ProcBased.HLT_EXITING].value
_dash_flipped = dashboard.exit_counts
_cpuid_vm, _cpuid_run = run_cpuid_guest(my_cpuid)
_serial_vm, _serial_run, _serial_bytes, _uart = run_serial_guest()
_msr_vm, _msr_run, _msr_writes = run_sysenter_guest()
_tuned = cautious_vm()
tune(_tuned)
_tuned.run(max_exits=5_000, max_instructions=100_000)
print("@@KEY-RESULTS@@" + _json.dumps({
    "exit_table": exit_table.reset_index().astype(str).to_dict(orient="records"),
    "on_off": on_off_table.reset_index().astype(str).to_dict(orient="records"),
    "decoded": [{"reason": r, "qualification": q, "length": int(n), "decoded": {k: str(v) for k, v in d.items()}}
                for r, q, n, d in zip(decoded_exits["reason"], decoded_exits["qualification"],
                                      decoded_exits["instruction_length"], decoded_exits["decoded"])],
    "forgetful": [forgetful.state.value, forgetful.message, forgetful.exits],
    "ept": [ept_exits["reason"].tolist(), [int(r) for r in ept_exits["guest_rip"]]],
    "cpuid": [_cpuid_run.state.value, list(struct.unpack("<8I", _cpuid_vm.guest.read(0x600, 32))),
              _cpuid_vm.guest.read(0x614, 12).decode("latin-1"), counts(_cpuid_vm)],
    "serial_table": serial_table.astype(str).to_dict(orient="index"),
    "serial_ex": [_serial_run.state.value, bytes(_serial_bytes).decode("latin-1"), bytes(_uart.output).decode(),
                  counts(_serial_vm)],
    "msr_table": msr_table.astype(int).to_dict(orient="index"),
    "msr_ex": [_msr_run.state.value, counts(_msr_vm), _msr_writes[:3], int(_msr_vm.regs.ebx)],
    "dashboard": [_dash_default, _dash_flipped, type(dashboard).__name__],
    "handling": handling_table.astype(str).to_dict(orient="index"),
    "workload_costs": workload_costs.astype(str).to_dict(orient="index"),
    "io_per_exit": io_per_exit,
    "generations": generations[["year", "roundtrip_low", "roundtrip_high", "kind"]].astype(str).to_dict(orient="index"),
    "paging": {k: len(v.trace) for k, v in paging.items()},
    "cr8": {" | ".join(k): v for k, v in cr8_table["first VM exit"].items()},
    "best_exit": best_exit_table.astype(str).to_dict(orient="index"),
    "tuned": [_tuned.state.value, _tuned.output, counts(_tuned)],
}))
"""

UNCONDITIONAL = ["CPUID", "GETSEC", "INVD", "XSETBV", "VMCALL", "VMXON", "VMPTRLD", "VMLAUNCH"]
NEVER = ["CLI", "PUSHFD / POPFD", "MOV from CR0", "MOV from CR4"]


@pytest.fixture(scope="module")
def nb04(tmp_path_factory):
    """(executed notebook, key results) of a copy of 04_exits with the probe cell appended."""
    done, results = run_with_probe(NOTEBOOK, PROBE, MARK, tmp_path_factory.mktemp(STEM))
    return done, results


# ------------------------------------------------------------------------ the notebook
def test_runs_fast_and_shows_widget_table_and_plot(nb04):
    nb, results = nb04
    assert results["_seconds"] < 60, f"{STEM} took {results['_seconds']:.0f} s"
    outputs = code_outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    mimes = {m for o in outputs for m in o.get("data", {})}
    assert "image/png" in mimes, "no plot"
    assert "text/html" in mimes, "no table"


def test_exactly_one_dashboard_with_default_workloads(nb04):
    """The browser test toggles HLT exiting in the first .vtlab-dashboard: there is one,
    built by Dashboard() with the default workload list, in a cell that says Dashboard(."""
    nb, results = nb04
    views = [(i, c) for i, c in enumerate(nb.cells[:-1]) if c.cell_type == "code"
             for o in c.get("outputs", []) if WIDGET_MIME in o.get("data", {})]
    assert len(views) == 1, f"expected one widget (the Dashboard), got cells {[i for i, _ in views]}"
    assert "Dashboard()" in views[0][1].source
    assert sum("Dashboard(" in c.source for c in nb.cells[:-1] if c.cell_type == "code") == 1
    default, flipped, kind = results["dashboard"]
    assert kind == "Dashboard"
    assert default == {"CPUID": 2000, "HLT": 1}          # cpuid-loop, vtlab's default controls
    assert flipped == {"CPUID": 2000}                    # HLT exiting off: CPUID still exits


def test_markdown_after_every_plot_is_a_caption(nb04):
    assert_plots_have_captions(nb04[0])


def test_stored_without_outputs():
    assert_stored_without_outputs(NOTEBOOK)


# ---------------------------------------------------------------------------- nbgrader
def test_nbgrader_metadata():
    assert_nbgrader_conventions(NOTEBOOK, "ex04_", ids_are_grade_ids=False)


def test_nbgrader_validates_instructor_version():
    assert_nbgrader_validates(NOTEBOOK)


# ------------------------------------------------------------------- 1 · which exit
def test_unconditional_and_conditional_exits(nb04):
    _, r = nb04
    rows = {x["instruction"]: x for x in r["exit_table"]}
    for name, row in rows.items():
        if name in UNCONDITIONAL:
            assert row["controls off"] == row["controls on"] == "exit", row
            assert row["SDM: always exits"] == "True", row
        elif name in NEVER:
            assert row["controls off"] == row["controls on"] == "runs", row
            assert row["exit reason"] == "-"
        else:
            assert (row["controls off"], row["controls on"]) == ("runs", "exit"), row
            assert row["SDM: always exits"] == "False", row
    for name in ("HLT", "OUT 80H, AL", "IN AL, DX (3FDH)", "MOV to CR3", "MOV from CR3", "MOV to CR0 (set TS)",
                 "RDMSR 174H", "WRMSR 174H", "RDTSC", "INVLPG", "SGDT", "LIDT"):
        assert name in rows, name
    assert rows["CPUID"]["exit reason"] == "CPUID (10)" and rows["CPUID"]["length (bytes)"] == "2"
    assert rows["VMCALL"]["exit reason"] == "VMCALL (18)" and rows["VMCALL"]["length (bytes)"] == "3"
    assert rows["LIDT"]["exit reason"] == "GDTR_IDTR (46)"
    # SDM Vol. 3C, Appendix C: 47 = "Access to LDTR or TR" (LLDT, LTR, SLDT, STR), under the same
    # descriptor-table exiting control (secondary bit 2) as LGDT/LIDT/SGDT/SIDT (46)
    for name in ("SLDT", "STR", "LLDT (null selector)"):
        assert rows[name]["exit reason"] == "LDTR_TR (47)", rows[name]
        assert rows[name]["decided by"].startswith("descriptor-table exiting")
    # MOV from CR0/CR4 never exits, whatever the controls (SDM Vol. 3C, 26.3: the read shadows)
    assert rows["MOV from CR4"]["controls on"] == "runs"
    assert rows["RDMSR 174H"]["exit reason"] == "MSR_READ (31)"


def test_cr8_exits_need_the_cr8_controls(nb04):
    # SDM Vol. 3C, 26.1.3: MOV to CR8 exits iff CR8-load exiting (bit 19), MOV from CR8 iff
    # CR8-store exiting (bit 20); CR3-load/-store exiting (bits 15/16) do not apply to CR8
    _, r = nb04
    cr8 = r["cr8"]
    assert cr8["mov rax, cr8 | CR8-load + CR8-store exiting"].startswith("CR_ACCESS"), cr8
    assert cr8["mov cr8, rax | CR8-load + CR8-store exiting"].startswith("CR_ACCESS"), cr8
    for key in ("mov rax, cr8 | none", "mov cr8, rax | none",
                "mov rax, cr8 | CR3-load + CR3-store exiting", "mov cr8, rax | CR3-load + CR3-store exiting"):
        assert cr8[key].startswith("HLT"), (key, cr8[key])


def test_one_control_decides_a_workload(nb04):
    _, r = nb04
    got = {(x["workload"], x["RDTSC exiting"], x["HLT exiting"]): x for x in r["on_off"]}
    assert got[("rdtsc-loop", "True", "True")]["RDTSC"] == "2000"
    assert got[("rdtsc-loop", "False", "True")]["exits"] == "1"        # only the final HLT
    assert got[("rdtsc-loop", "False", "False")]["exits"] == "0"
    for rdtsc in ("True", "False"):
        for hlt in ("True", "False"):
            assert got[("cpuid-loop", rdtsc, hlt)]["CPUID"] == "2000"


# --------------------------------------------------------- 2 · reason, qualification
def test_decoded_qualifications(nb04):
    _, r = nb04
    d = r["decoded"]
    assert [x["reason"] for x in d] == ["IO_INSTRUCTION"] * 6 + ["CR_ACCESS"] * 5 + ["HLT"]
    assert d[0]["qualification"] == "0x00800040" and d[0]["decoded"]["operand"] == "immediate"
    assert d[1]["qualification"] == "0x03fd0008" and d[1]["decoded"]["direction"] == "IN"
    assert [x["decoded"]["size"] for x in d[:4]] == ["1", "1", "2", "4"]
    assert d[4]["decoded"]["string"] == "True" and d[4]["decoded"]["rep"] == "True"
    assert d[5]["decoded"]["string"] == "True" and d[5]["decoded"]["rep"] == "False"
    assert d[8]["qualification"] == "0x00000313" and d[8]["decoded"] == {
        "cr": "3", "access_type": "MOV_FROM_CR", "register": "rbx"}
    assert d[7]["decoded"]["access_type"] == "MOV_TO_CR" and d[10]["decoded"]["access_type"] == "CLTS"
    assert [x["length"] for x in d] == [2, 1, 2, 1, 2, 1, 3, 3, 3, 3, 2, 1]


# ------------------------------------------------------------------ 3 · advancing RIP
def test_forgetting_to_advance_rip_ends_at_the_exit_budget(nb04):
    _, r = nb04
    state, message, exits = r["forgetful"]
    assert state == "budget" and exits == 25
    assert message.startswith("exit budget exhausted")


def test_ept_violation_is_retried_without_advancing_rip(nb04):
    _, r = nb04
    reasons, rips = r["ept"]
    assert reasons == ["EPT_VIOLATION", "HLT"]
    assert rips[0] == 0x1000                                # the faulting instruction, retried


# -------------------------------------------------------------- exercises (solutions)
def test_cpuid_handler_hides_vmx_and_reports_the_vendor(nb04):
    _, r = nb04
    state, regs, signature, counts = r["cpuid"]
    assert state == "halted"
    ecx = regs[2]
    assert not ecx >> 5 & 1 and ecx >> 31 & 1
    assert regs[4] == 0x4000_0001 and signature == "vtlab-course"
    assert counts == {"CPUID": 2, "HLT": 1}


def test_serial_port_behind_io_exits(nb04):
    _, r = nb04
    table = r["serial_table"]
    assert table["unconditional I/O exiting"]["I/O exits"] == "2496"
    assert table["I/O bitmap: only 3F8H exits"]["I/O exits"] == "1248"
    state, received, uart, counts = r["serial_ex"]
    assert state == "halted" and received == "Hello from the guest!\r\n" and uart == ""
    assert counts == {"IO_INSTRUCTION": 2 * len(received), "HLT": 1}


def test_msr_bitmap(nb04):
    _, r = nb04
    t = r["msr_table"]
    assert t["no MSR bitmaps"]["MSR_READ"] == t["no MSR bitmaps"]["MSR_WRITE"] == 1000
    assert t["bitmap: 175H reads pass"]["MSR_READ"] == 0 and t["bitmap: 175H reads pass"]["MSR_WRITE"] == 1000
    assert t["bitmap: 175H reads and writes pass"]["MSR_WRITE"] == 0
    state, counts, writes, last = r["msr_ex"]
    assert state == "halted" and counts == {"MSR_WRITE": 50, "HLT": 1}
    assert writes == [[0x174, 400], [0x174, 392], [0x174, 384]] and last == 8


def test_tuned_telemetry_guest(nb04):
    _, r = nb04
    state, output, counts = r["tuned"]
    assert state == "halted" and output == "tele ok\r\n"
    assert sum(counts.values()) <= 12 and counts["IO_INSTRUCTION"] == len(output)
    assert counts["MSR_WRITE"] == 1 and "PAUSE_INSTRUCTION" not in counts


def test_exercise_5_needs_transfer():
    """Issue #16: the worked example (BOOT_GUEST) must not be Exercise 5's answer, and no cell
    of the learner version may hold the answer (PAUSE exiting off, MSR 10H reads passing)."""
    learner = nbformat.read(REPO / "notebooks" / f"{STEM}.ipynb", as_version=4)
    code = "\n".join(c.source for c in learner.cells if c.cell_type == "code")
    assert "TELEMETRY_GUEST" in code and "cautious_vm" in code
    assert "IA32_TIME_STAMP_COUNTER, read=False" not in code
    assert "PAUSE_EXITING, False" not in code


# --------------------------------------------------------------------------- costs
def test_categories_and_workload_costs(nb04):
    _, r = nb04
    assert set(r["handling"]) == {"benign", "instruction", "memory", "userspace-device", "interrupt", "fatal"}
    costs = {k: float(v["time vs native (x)"]) for k, v in r["workload_costs"].items()}
    assert max(costs, key=costs.get) == "io-userspace"
    assert costs["syscall-heavy"] < 2 < costs["cpuid-loop"]          # x2 = 100 % overhead
    shown = {k: v["time vs native"] for k, v in r["workload_costs"].items()}
    assert all(v.startswith("x") and "%" not in v for v in shown.values()), shown
    assert r["io_per_exit"]["io-userspace"] > 5 * r["io_per_exit"]["io-vmm"]


def test_cost_by_generation(nb04):
    _, r = nb04
    g = r["generations"]
    assert float(g["prescott"]["roundtrip_low"]) == 2409 and g["prescott"]["kind"] == "measured"
    chart = ["prescott", "merom", "penryn", "nehalem", "westmere", "sandy-bridge"]
    highs = [float(g[p]["roundtrip_high"]) for p in chart]
    assert highs == sorted(highs, reverse=True)


def test_the_best_exit_is_no_exit(nb04):
    _, r = nb04
    assert r["paging"]["shadow-paging controls"] > 1000 and r["paging"]["EPT (vtlab default)"] == 1
    best = r["best_exit"]
    steps = list(best)
    exits = [int(best[s]["exits"]) for s in steps]
    assert exits == sorted(exits, reverse=True) and exits[0] > 700 and exits[-1] == 10
    assert {best[s]["output"] for s in steps} == {"boot ok\r\n"}
    factors = [float(best[s]["time vs native (x)"]) for s in steps]
    assert factors == sorted(factors, reverse=True) and factors[0] > 20 * factors[-1], factors

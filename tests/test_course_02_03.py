"""Key results of the course notebooks 02_vmx_modes and 03_vmcs.

Each instructor source ``course/source/<a>/<a>.ipynb`` is executed once (a copy with one
extra cell appended that prints the notebook's key variables as JSON) through
``nbrun.run_notebook``; the tests then check what a learner would read off the tables,
widgets and plots. nbgrader is checked too: the metadata follows docs/NOTEBOOKS.md and
the instructor version validates (every solution passes its tests). The learner versions
in ``notebooks/`` (untouched: run to the end, pass no test) are executed by
tests/test_notebooks.py.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from nbrun import assert_nbgrader_conventions, assert_nbgrader_validates, code_outputs, run_with_probe

REPO = Path(__file__).resolve().parent.parent
SOURCES = REPO / "course" / "source"
MARK = "@@KEY-RESULTS@@"

PROBES = {
    "02_vmx_modes": """
import json as _json
print("@@KEY-RESULTS@@" + _json.dumps({
    "stepper_mode": stepper.mode_text,
    "ring_walk": {"mode": ring_walk["mode"].tolist(), "cpl": [int(c) for c in ring_walk["CPL"]],
                  "event": ring_walk["event"].tolist()},
    "cpuid_vmx_bits": [cpuid_row("a", VmxCpu())["ECX bit 5 (VMX)"],
                       cpuid_row("b", VmxCpu(vmx_supported=False))["ECX bit 5 (VMX)"]],
    "cr4_without_vmx": cpuid_row("b", VmxCpu(vmx_supported=False))["MOV CR4 with VMXE = 1"],
    "feature_control": feature_control_table["VMXON as firmware left it"].to_dict(),
    "feature_control_after": feature_control_table["VMXON afterwards"].to_dict(),
    "enable": enable_steps[["action", "outcome", "afterwards"]].to_dict(orient="records"),
    "state_table": {s: state_table.loc[s].to_dict() for s in state_table.index},
    "console": {"entries": console.entries, "state": console.state},
    "hypercall_result": int(hypercall_result),
    "vmcall_root": [with_vmcs.status.value, int(with_vmcs.error), without_vmcs.status.value],
    "first_exit_fields": first_exit_fields.to_dict(),
    "boot_steps": {"mode": boot_steps["mode"].tolist(), "event": boot_steps["event"].tolist()},
    "cpuid_views": {"host": host_ecx, "guest": ecx, "guest_osxsave": int(osxsave_vm.regs.ecx)},
    "bring_up": [name for name, _status in bring_up],
    "new_vmcs_state": [fresh_cpu.current_vmcs_pointer == new_vmcs, fresh_cpu.current_vmcs.launch_state.value],
    "hypercall_counts": [summary.instructions, summary.exits],
    "predictions": {k: list(v) for k, v in predictions.items()},
}))
""",
    "03_vmcs": """
import json as _json
print("@@KEY-RESULTS@@" + _json.dumps({
    "n_fields": len(F),
    "area_counts": {a: int(area_counts.loc[a, "all widths"]) for a in area_counts.index},
    "encodings": encodings.reset_index().to_dict(orient="records"),
    "rules": vmread_vmwrite_rules.reset_index().to_dict(orient="records"),
    "primary": primary.reset_index()[["bit", "control", "TRUE MSR", "original MSR"]].to_dict(orient="records"),
    "forbidden": [forbidden_outcome.status.value, int(forbidden_outcome.error)],
    "missing": [missing_outcome.status.value, int(missing_outcome.error)],
    "entry_checks": entry_checks.reset_index().astype(str).to_dict(orient="records"),
    "boot_output": boot_vm().run(max_exits=50, max_instructions=10_000).output,
    "reset_cr0": [reset_cr0.state.value, reset_cr0.vmread(F.VM_EXIT_REASON)],
    "violations": [str(v) for v in several.cpu.entry_violations()],
    "registry_sample": registry_sample.reset_index().astype(str).to_dict(orient="records"),
    "explorer_rules": len(entry_explorer.rules),
    "explored": [explored.outcome, explored.exit_reason, explored.qualification],
    "launch_story": launch_story.reset_index().astype(str).to_dict(orient="records"),
    "link_pointer": link_table.astype(str).to_dict(orient="index"),
    "vmm_bring_up": bring_up,
}))
""",
}


def source(stem: str) -> Path:
    """The instructor source of assignment *stem*."""
    return SOURCES / stem / f"{stem}.ipynb"


def _execute(stem: str, tmp_path_factory):
    """Run a copy of the notebook with the probe cell appended: (stem, notebook, key results)."""
    done, results = run_with_probe(source(stem), PROBES[stem], MARK,
                                   tmp_path_factory.mktemp(stem))
    return stem, done, results


@pytest.fixture(scope="module")
def nb02(tmp_path_factory):
    return _execute("02_vmx_modes", tmp_path_factory)


@pytest.fixture(scope="module")
def nb03(tmp_path_factory):
    return _execute("03_vmcs", tmp_path_factory)


# ----------------------------------------------------------------------- both notebooks
@pytest.mark.parametrize("fixture", ["nb02", "nb03"])
def test_runs_fast_and_shows_widget_table_and_plot(fixture, request):
    stem, nb, results = request.getfixturevalue(fixture)
    assert results["_seconds"] < 60, f"{stem} took {results['_seconds']:.0f} s"
    outputs = code_outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    mimes = {m for o in outputs for m in o.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in mimes, "no widget displayed"
    assert "image/png" in mimes, "no plot"
    assert "text/html" in mimes, "no table"


@pytest.mark.parametrize("stem", sorted(PROBES))
def test_nbgrader_metadata(stem):
    # 02 keeps older ids on a few cells with nbgrader metadata (ids never change)
    assert_nbgrader_conventions(source(stem), "ex" + stem[:2] + "_", ids_are_grade_ids=stem != "02_vmx_modes")


@pytest.mark.parametrize("stem", sorted(PROBES))
def test_nbgrader_validates_instructor_version(stem):
    assert_nbgrader_validates(source(stem))


# ------------------------------------------------------------------------ 02_vmx_modes
def test_02_guest_keeps_ring_0_in_non_root(nb02):
    r = nb02[2]
    assert r["stepper_mode"].startswith("VMX non-root operation (guest) · guest CPL 0")
    walk = r["ring_walk"]
    cells = {(m, c) for m, c in zip(walk["mode"], walk["cpl"])}
    assert ("non-root", 0) in cells and ("non-root", 3) in cells
    assert {c for m, c in cells if m == "root"} == {0}
    exits = [e for e in walk["event"] if "VM exit" in e]
    assert exits == ["VM exit: CPUID (10)", "VM exit: CPUID (10)", "VM exit: VMCALL (18)"]


def test_02_detection_and_feature_control(nb02):
    r = nb02[2]
    assert r["cpuid_vmx_bits"] == [1, 0]
    assert r["cr4_without_vmx"].startswith("#GP")
    first, after = r["feature_control"], r["feature_control_after"]
    ready = {k for k, v in first.items() if v == "VMsucceed"}
    assert ready == {"0b101", "0b111"}                      # locked + enabled outside SMX
    assert all(v == "fault #GP" for k, v in first.items() if k not in ready)
    assert after["0b000"] == "VMsucceed"                    # unlocked: the OS can fix it
    assert after["0b001"] == "fault" and after["0b011"] == "fault"   # locked off: nothing to do


def test_02_enable_step_by_step(nb02):
    r = nb02[2]
    vmxon = [(s["outcome"], s["afterwards"]) for s in r["enable"] if s["action"].startswith("VMXON")]
    assert [o for o, _ in vmxon] == ["fault #UD", "fault #GP", "fault #GP", "VMfailInvalid",
                                     "VMfailInvalid", "VMsucceed", "VMfailInvalid"]
    assert vmxon[-2][1] == "VMX root operation"
    assert r["enable"][-1]["outcome"] == "fault #GP"        # CR4.VMXE cannot be cleared now


def test_02_state_machine_table(nb02):
    r = nb02[2]
    t = r["state_table"]
    outside, none = t["outside VMX operation"], t["root, no current VMCS"]
    clear, launched = t["root, current VMCS clear"], t["root, current VMCS launched"]
    guest = t["non-root (guest running)"]
    assert outside["VMXON"] == "VMsucceed"
    assert all(v == "#UD" for k, v in outside.items() if k != "VMXON")
    assert none["VMLAUNCH"] == none["VMREAD"] == none["VMCALL"] == none["VMXON"] == "VMfailInvalid"
    assert none["VMCLEAR"] == none["VMPTRLD"] == "VMsucceed"
    assert clear["VMLAUNCH"] == "VMsucceed: guest ran" and clear["VMRESUME"] == "VMfailValid (5)"
    assert launched["VMLAUNCH"] == "VMfailValid (4)" and launched["VMRESUME"] == "VMsucceed: guest ran"
    assert clear["VMXON"] == launched["VMXON"] == "VMfailValid (15)"
    assert clear["VMCALL"] == "VMfailValid (1)"
    assert clear["VMREAD"] == clear["VMWRITE"] == "VMsucceed"
    assert guest == {"VMXON": "VM exit 27", "VMXOFF": "VM exit 26", "VMCLEAR": "VM exit 19",
                     "VMPTRLD": "VM exit 21", "VMLAUNCH": "VM exit 20", "VMRESUME": "VM exit 24",
                     "VMREAD": "VM exit 23", "VMWRITE": "VM exit 25", "VMCALL": "VM exit 18"}


def test_02_console_hypercall_and_vmcall_in_root(nb02):
    r = nb02[2]
    entries = r["console"]["entries"]
    assert "#UD" in entries[0] and "VMsucceed" in entries[2]
    assert "VM-instruction error 4" in entries[5] and entries[6].endswith("0x4")
    assert r["console"]["state"] == "launched"
    assert r["hypercall_result"] == 42
    assert r["vmcall_root"] == ["VMfailValid", 1, "VMfailInvalid"]


def test_02_first_entry_and_exits(nb02):
    r = nb02[2]
    f = r["first_exit_fields"]
    assert f["after the first VM exit"]["VM_EXIT_REASON"] == "0xa"
    assert f["after the first VM exit"]["VM_EXIT_INSTRUCTION_LEN"] == "0x2"
    assert f["before VMLAUNCH"]["HOST_RIP"] == f["after the first VM exit"]["HOST_RIP"]
    modes, events = r["boot_steps"]["mode"], r["boot_steps"]["event"]
    assert events[0] == "VM entry (VMLAUNCH)" and modes[0] == "non-root"
    exits = [e.split("VM exit: ")[1] for e in events if "VM exit" in e]
    assert exits == ["CPUID (10)", "VMCALL (18)", "HLT (12)"]
    assert all("VMRESUME" in e for e in events[1:] if "VM entry" in e)
    for event, mode in zip(events, modes):      # exits and handlers leave the CPU in root
        if "VM exit" in event or event.startswith("VMM handles"):
            assert mode == "root"


# ----------------------------------------------------------------------------- 03_vmcs
def test_02_host_and_guest_cpuid_agree(nb02):
    """Host and guest ask one processor: leaf 1 ECX differs in VMX (5) and hypervisor (31)
    only, and OSXSAVE (27) follows the asker's CR4.OSXSAVE (SDM Vol. 2A, CPUID, Table 3-10)."""
    v = nb02[2]["cpuid_views"]
    assert v["host"] ^ v["guest"] == (1 << 5) | (1 << 31)
    assert v["host"] >> 5 & 1 == 1 and v["guest"] >> 31 & 1 == 1
    assert v["host"] >> 27 & 1 == 0 and v["guest_osxsave"] >> 27 & 1 == 1
    assert v["guest_osxsave"] ^ v["guest"] == 1 << 27


def test_02_vmclear_before_first_vmptrld(nb02):
    """SDM Vol. 3C 25.11.3: a new VMCS is VMCLEARed before its first VMPTRLD."""
    r = nb02[2]
    assert r["bring_up"] == ["VMXON", "VMCLEAR", "VMPTRLD"]
    assert r["new_vmcs_state"] == [True, "clear"]            # current, and ready for VMLAUNCH
    text = "\n".join(c.source for c in nbformat.read(source("02_vmx_modes"), as_version=4).cells)
    assert "25.11.3" in text and "VMCLEAR before its first VMPTRLD" in text


def test_02_guest_instruction_count_excludes_exiting_instructions(nb02):
    """An instruction that causes a VM exit is not a guest instruction (SDM Vol. 3C 28.1):
    MOV, MOV, MOV complete; VMCALL and HLT exit."""
    assert nb02[2]["hypercall_counts"] == [3, 2]


def test_02_exercise_3_solution_is_the_sdms(nb02):
    """Literal answers from SDM Vol. 3C 31.3 and Table 31-1 (not from vtlab)."""
    assert nb02[2]["predictions"] == {"A": ["VMfailInvalid", None], "B": ["VMfailValid", 10],
                                      "C": ["VMfailValid", 2], "D": ["VMfailValid", 11],
                                      "E": ["VMfailInvalid", None], "F": ["VMfailValid", 4],
                                      "G": ["VMfailValid", 5]}


def test_03_areas_and_encodings(nb03):
    r = nb03[2]
    counts = r["area_counts"]
    assert counts["all areas"] == r["n_fields"]
    assert len(counts) == 7 and all(v > 0 for v in counts.values())
    enc = {e["field"]: e for e in r["encodings"]}
    assert enc["GUEST_RIP"]["encoding"] == "0x681e" and enc["GUEST_RIP"]["index"] == 15
    assert enc["GUEST_RIP"]["width"] == "NATURAL" and enc["GUEST_RIP"]["type"] == "GUEST_STATE"
    assert enc["TSC_OFFSET_HIGH"]["access"] == "HIGH"
    assert enc["VM_EXIT_REASON"]["type"] == "EXIT_INFORMATION"


def test_03_vmread_vmwrite_rules(nb03):
    r = nb03[2]
    rules = {x["attempt"].split(" (")[0].split(" =")[0]: x for x in r["rules"]}
    assert rules["VMWRITE GUEST_ES_SELECTOR"]["value / read back"] == "0x2345"     # truncated
    assert rules["VMREAD 0x2011"]["value / read back"] == "0x11223344"           # high half
    assert rules["VMWRITE VM_EXIT_REASON"]["error"] == 13
    for a in ("VMREAD 0x0830", "VMREAD 0x681F", "VMREAD 0x1234"):
        assert rules[a]["outcome"] == "VMfailValid" and rules[a]["error"] == 12


def test_03_capabilities(nb03):
    r = nb03[2]
    primary = {p["control"]: p for p in r["primary"]}
    assert primary["TPR_SHADOW"]["TRUE MSR"] == "fixed to 0"
    assert primary["CR3_LOAD_EXITING"]["original MSR"] == "fixed to 1"
    assert primary["CR3_LOAD_EXITING"]["TRUE MSR"] == "free"
    assert primary["HLT_EXITING"]["TRUE MSR"] == "free"
    assert r["forbidden"] == ["VMfailValid", 7]      # a must-be-0 control set
    assert r["missing"] == ["VMfailValid", 7]        # a must-be-1 control cleared


def test_03_entry_checks(nb03):
    r = nb03[2]
    assert r["boot_output"] == "boot ok"
    assert r["reset_cr0"] == ["entry-failed", 0x80000021]       # CR0 = 0x60000010 lacks NE
    rows = {x["rule broken"]: x for x in r["entry_checks"]}
    guest_state = ["RFLAGS bit 1 = 0", "CR0.PG = 1 while CR0.PE = 0", "CR0.NE = 0 (IA32_VMX_CR0_FIXED0)",
                   "unrestricted guest off (real-mode CR0)", "CS access rights: accessed bit clear",
                   "SS access rights: not present", "VMCS link pointer = 0"]
    for rule in guest_state:
        assert rows[rule]["outcome"] == "VM-entry failure", rule
        assert rows[rule]["exit reason"] == "0x80000021", rule
        assert rows[rule]["guest instructions run"] == "0", rule
    assert rows["VMCS link pointer = 0"]["qualification"] == "4"
    assert rows["EPT off, unrestricted guest on"]["VM-instruction error"] == "7"
    assert rows["TPR shadow on (fixed to 0)"]["VM-instruction error"] == "7"
    assert rows["HOST_CS_SELECTOR = 0"]["VM-instruction error"] == "8"
    assert rows["HOST_CR0.NE = 0"]["VM-instruction error"] == "8"
    assert "enable EPT" in rows["EPT off, unrestricted guest on"]["what the check says"]
    groups = [v.split("]")[0].lstrip("[").split(",")[0] for v in r["violations"]]
    assert groups == ["controls", "host-state", "guest-state", "guest-state"]


def test_03_registry_rules_of_every_group(nb03):
    """One registry rule per group, broken with its own recipe (SDM 27.2 / 27.8 outcomes,
    written out: controls -> error 7, host state -> error 8, guest state -> 0x80000021)."""
    r = nb03[2]
    rows = {x["rule"]: x for x in r["registry_sample"]}
    assert {x["group"] for x in rows.values()} == {"controls", "host-state", "guest-state"}
    for x in rows.values():
        if x["group"] == "controls":
            assert (x["outcome"], x["VM-instruction error"]) == ("VMfailValid", "7"), x
        elif x["group"] == "host-state":
            assert (x["outcome"], x["VM-instruction error"]) == ("VMfailValid", "8"), x
        else:
            assert (x["outcome"], x["exit reason"]) == ("VM-entry failure", "0x80000021"), x
    assert rows["guest_pdptes_valid"]["qualification"] == "2"            # SDM 27.8: PDPTEs
    assert rows["guest_pdptes_valid"]["guest mode"] == "paged"
    assert r["explorer_rules"] >= 193
    assert r["explored"] == ["VM-entry failure", 0x80000021, 0]


def test_03_vmcs_link_pointer_rule(nb03):
    """SDM Vol. 3C, 27.3.1.5: checked only if not FFFFFFFF_FFFFFFFFH; then bits 11:0 = 0, within
    the physical-address width, revision identifier at the address, shadow-VMCS indicator =
    "VMCS shadowing" (0 here); a failure has exit qualification 4 (27.8)."""
    link = nb03[2]["link_pointer"]
    assert link["FFFFFFFF_FFFFFFFFH (no linked VMCS)"]["rule broken"] == "-"
    assert link["a region with the revision identifier"]["rule broken"] == "-"
    assert link["0"]["rule broken"] == "vmcs_link_pointer_revision"
    assert link["1_0000_0800H (bits 11:0 not 0)"]["rule broken"] == "vmcs_link_pointer_alignment"
    assert link["1 << 40 (beyond the physical-address width)"]["rule broken"] == "vmcs_link_pointer_width"
    assert link["the same, shadow-VMCS indicator 1"]["rule broken"] == "vmcs_link_pointer_shadow_indicator"
    assert {v["qualification"] for v in link.values() if v["rule broken"] != "-"} == {"4"}


def test_03_vmclear_before_first_use(nb03):
    """SDM Vol. 3C, 25.11.3: VMCLEAR initializes a new VMCS region before its first VMPTRLD."""
    steps = nb03[2]["vmm_bring_up"]
    assert steps[:3] == ["VMXON", "VMCLEAR", "VMPTRLD"], steps


def test_03_exercises_need_transfer():
    """Issue #16: Ex 2 asks for the CR0/CR4 fixed-bit MSRs (the section shows the control MSRs),
    Ex 4 for several vCPUs with a software launch-state record (section 6 shows one VMCS)."""
    learner = nbformat.read(REPO / "notebooks" / "03_vmcs.ipynb", as_version=4)
    code = "\n".join(c.source for c in learner.cells if c.cell_type == "code")
    text = "\n".join(c.source for c in learner.cells)
    assert "def legal_guest_cr(" in code and "def enter_vcpu(" in code and "def migrate_away(" in code
    assert "launched.add" not in code and "must_be_1 &=" not in code
    assert text.count("<summary>Hint") >= 6


def test_03_launch_state(nb03):
    r = nb03[2]
    story = [(s["instruction"], s["outcome"], s["error"], s["launch state of V"], s["current-VMCS pointer"])
             for s in r["launch_story"]]
    assert story[0][:3] == ("VMRESUME", "VMfailValid", "5")
    assert story[1][1] == "VM exit" and story[1][3] == "launched"
    assert story[2][:3] == ("VMLAUNCH", "VMfailValid", "4")
    assert story[4][0] == "VMCLEAR V" and story[4][3] == "clear" and story[4][4] == "0xffffffffffffffff"
    assert story[5][1] == "VMfailInvalid"
    assert story[7][:3] == ("VMRESUME", "VMfailValid", "5")
    assert story[8][:2] == ("VMLAUNCH", "VM exit") and story[8][3] == "launched"

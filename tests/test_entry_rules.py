"""The VM-entry rule registry (vtlab/cpu/entry): tests generated from the rules themselves.

Every rule carries a *break recipe*: VMWRITEs that break it in a fresh, valid
VirtualMachine.  For each rule the tests below apply the recipe and check what the SDM
says VM entry must do, with the SDM's numbers written out (not taken from vtlab):

* controls    -> VMfailValid, VM-instruction error 7 (SDM 31.4, Table 31-1)
* host state  -> VMfailValid, VM-instruction error 8 (SDM 31.4, Table 31-1)
* guest state -> VM-entry failure: exit reason 0x80000021 = basic reason 33 "VM-entry
  failure due to invalid guest state" | bit 31 (SDM 27.8, Appendix C), exit
  qualification 0, or 4 for an invalid VMCS link pointer (SDM 27.8)

A rule added without a recipe fails here.  The incremental checker (re-running only the
rules whose ``reads`` meet the fields written) must agree with a full check for every
recipe, and each rule's ``reads`` must cover what it really reads.
"""
from __future__ import annotations

import dataclasses

import pytest

from vtlab import ExitReason, Status, VirtualMachine, VmState
from vtlab.arch.controls import ProcBased
from vtlab.arch.vmcs_fields import VmcsField as F
from vtlab.cpu.capabilities import AllowedSettings, VmxCapabilities
from vtlab.cpu.entry import GROUPS, MODES, EntryChecker, Violation, entry_violations, get_rule, rules, table

RULES = rules()
BY_ID = {r.id: r for r in RULES}
#: The rules that read GUEST_RIP (the checker skips them while RIP is below 4 GiB).
RIP_RULES = {r.id for r in RULES if F.GUEST_RIP in r.reads}

#: SDM 27.8: exit qualifications of VM-entry failures that are not 0 (2 = a problem loading
#: the PDPTEs, 4 = invalid VMCS link pointer).  Every other guest-state rule here fails
#: with qualification 0.
NONZERO_QUALIFICATION = {"guest_pdptes_valid": 2,
                         **{f"vmcs_link_pointer_{what}": 4 for what in (
                             "alignment", "width", "revision", "shadow_indicator", "not_current")}}


def fresh(mode: str = "real", program: str = "hlt") -> VirtualMachine:
    return VirtualMachine(program, mode=mode)


def assert_sdm_outcome(vm: VirtualMachine, rule) -> None:
    """The outcome SDM 27.2/27.8 prescribes for a broken rule of ``rule.group``."""
    out = vm.last_outcome
    assert out is not None
    if rule.group == "controls":
        assert out.status is Status.VMFAIL_VALID, out
        assert vm.vmread(F.VM_INSTRUCTION_ERROR) == 7        # SDM 31.4: invalid control field(s)
    elif rule.group == "host-state":
        assert out.status is Status.VMFAIL_VALID, out
        assert vm.vmread(F.VM_INSTRUCTION_ERROR) == 8        # SDM 31.4: invalid host-state field(s)
    else:
        assert out.status is Status.ENTRY_FAILED, out
        assert vm.vmread(F.VM_EXIT_REASON) == 0x80000021     # SDM 27.8, App. C: 33 | bit 31
        expected = NONZERO_QUALIFICATION.get(rule.id, 0)     # SDM 27.8
        assert vm.vmread(F.EXIT_QUALIFICATION) == expected
        assert rule.qualification == expected
    assert vm.state is VmState.ENTRY_FAILED
    assert rule.id in [v.rule for v in out.violations], [str(v) for v in out.violations]


# --------------------------------------------------------------- the registry
def test_registry_is_well_formed():
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids))
    sections = {"controls": ("27.2.1.1", "27.2.1.2", "27.2.1.3"),
                "host-state": ("27.2.2", "27.2.3", "27.2.4"),
                "guest-state": ("27.3.1.1", "27.3.1.2", "27.3.1.3", "27.3.1.4", "27.3.1.5", "27.3.1.6")}
    for r in RULES:
        assert r.section in sections[r.group], r
        assert r.reads and all(isinstance(f, F) for f in r.reads), r
        assert r.doc, f"{r.id} has no docstring"
        assert r.group == "guest-state" or r.qualification == 0, r
    # checking order: controls, then host state, then guest state (SDM 27.2 before 27.3)
    assert [GROUPS.index(r.group) for r in RULES] == sorted(GROUPS.index(r.group) for r in RULES)
    assert {"guest_cr0_pg_requires_pe", "guest_cs_dpl_nonconforming", "vmcs_link_pointer_revision",
            "unrestricted_guest_requires_ept", "host_cs_selector_nonzero"} <= set(ids)


def test_rule_records_explain_themselves():
    r = get_rule("guest_cr0_pg_requires_pe")
    assert r.group == "guest-state" and r.section == "27.3.1.1" and r.reads == {F.GUEST_CR0}
    text = r.explain()
    assert "27.3.1.1" in text and "GUEST_CR0" in text and "exit reason 33" in text
    assert list(table().index) == [r.id for r in RULES]
    with pytest.raises(KeyError):
        get_rule("no_such_rule")


def test_violation_keeps_its_fields_and_str():
    v = Violation("guest-state", "27.3.1.5", "VMCS_LINK_POINTER is 0x0", 4, "vmcs_link_pointer_revision")
    assert (v.group, v.section, v.qualification, v.rule) == ("guest-state", "27.3.1.5", 4,
                                                             "vmcs_link_pointer_revision")
    assert str(v) == "[guest-state, SDM 27.3.1.5] VMCS_LINK_POINTER is 0x0"
    assert Violation("controls", "27.2.1", "m").rule == ""   # the old positional form still works


def test_entry_checks_module_re_exports_the_registry():
    from vtlab.cpu import entry_checks
    from vtlab.cpu.entry_checks import Violation as V, entry_violations as ev

    assert V is Violation and ev is entry_violations
    assert not hasattr(entry_checks, "LOCAL_RULES")


@pytest.mark.parametrize("mode", MODES)
def test_fresh_vms_break_no_rule(mode):
    vm = fresh(mode)
    assert entry_violations(vm.cpu, vm.vmcs.region) == []
    assert vm.run().state is VmState.HALTED


# ------------------------------------------------------- one test per rule
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_break_recipe_gives_the_sdm_outcome(rule):
    """A fresh VM with this one rule broken: VMLAUNCH fails as SDM 27.2 / 27.8 say."""
    assert rule.breaks is not None, f"rule {rule.id} has no break recipe"
    assert rule.mode in MODES
    vm = fresh(rule.mode)
    rule.breaks(vm)
    vm.run()
    assert_sdm_outcome(vm, rule)
    assert vm.guest.counter.total == 0          # the guest never ran an instruction
    assert vm.last_outcome.violations == vm.cpu.entry_violations()


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_break_after_an_exit_is_found_by_the_incremental_check(rule):
    """The VMM breaks the rule in its CPUID handler; VMRESUME re-checks only the rules the
    handler's writes concern - and must report what a full check reports."""
    vm = fresh(rule.mode, "cpuid\nhlt")

    @vm.handler(ExitReason.CPUID)
    def breaking(vm, exit):
        done = vm.default(exit)          # the built-in CPUID handler
        rule.breaks(vm)
        return done

    vm.run()
    assert [e.reason for e in vm.trace.exits][0] == "CPUID"    # (an entry failure is traced too)
    assert vm.last_outcome.instruction == "VMRESUME"
    # an incremental check (a second look after an in-place attempt failed may run nothing:
    # the verdicts are kept)
    assert len(vm.cpu.entry_checker.last_run_ids) < len(RULES)
    assert_sdm_outcome(vm, rule)
    assert vm.last_outcome.violations == vm.cpu.entry_violations()


class _WriteLog:
    """Records the fields a recipe VMWRITEs (what a VMCS's "changed" set would hold); the
    rest of the VM (``cpu``, ``vmcs_address`` ...) is the VM's own."""

    def __init__(self, vm: VirtualMachine):
        self.vm, self.fields, self.before = vm, set(), {}

    def __getattr__(self, name):
        return getattr(self.vm, name)

    def vmread(self, field):
        return self.vm.vmread(field)

    def vmwrite(self, field, value):
        self.before.setdefault(F(field), self.vm.vmcs.region.get(F(field)))
        self.fields.add(int(field))
        self.vm.vmwrite(field, value)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_incremental_check_matches_a_full_check(rule):
    vm = fresh(rule.mode)
    cpu, region = vm.cpu, vm.vmcs.region
    checker = EntryChecker()
    assert checker.violations(cpu, region) == []
    log = _WriteLog(vm)
    rule.breaks(log)
    incremental = checker.violations(cpu, region, log.fields)
    assert incremental == entry_violations(cpu, region)
    assert rule.id in [v.rule for v in incremental]
    # only the rules reading a written field ran (the RIP rules only for a RIP above 4 GiB)
    expected = {r.id for r in RULES if {int(f) for f in r.reads} & log.fields}
    if not region.get(F.GUEST_RIP) >> 32 and {int(f) for f in log.fields} - {int(F.GUEST_RIP)} == set():
        expected -= RIP_RULES
    assert set(checker.last_run_ids) == expected
    # write the old values back: the broken verdicts must go again
    for field, value in log.before.items():
        vm.vmwrite(field, value)
    assert checker.violations(cpu, region, log.fields) == [] == entry_violations(cpu, region)


# ------------------------------------------------------ the incremental checker
def _spied(counts: dict[str, int]):
    def spy(r):
        def fn(get, cpu, _fn=r.fn, _id=r.id):
            counts[_id] = counts.get(_id, 0) + 1
            return _fn(get, cpu)
        return dataclasses.replace(r, fn=fn)
    return [spy(r) for r in RULES]


def test_checker_reruns_only_the_rules_that_read_a_changed_field():
    counts: dict[str, int] = {}
    checker = EntryChecker(_spied(counts))
    vm = fresh("protected")
    cpu, region = vm.cpu, vm.vmcs.region
    assert checker.violations(cpu, region) == []
    assert counts == {r.id: 1 for r in RULES}              # a full check runs every rule once

    counts.clear()
    assert checker.violations(cpu, region, set()) == []
    assert counts == {}                                     # nothing changed: nothing runs

    counts.clear()
    checker.violations(cpu, region, {int(F.GUEST_CR0)})
    expected = {r.id for r in RULES if F.GUEST_CR0 in r.reads}
    assert set(counts) == expected and set(counts.values()) == {1}
    assert "guest_cr0_pg_requires_pe" in expected and "guest_rflags_vm" in expected
    assert "guest_rflags_bit1" not in expected

    counts.clear()
    checker.violations(cpu, region, {int(F.GUEST_RSP), int(F.CR0_READ_SHADOW)})  # read by no rule
    assert counts == {}


def test_checker_notices_guest_rip_moving_without_being_told():
    """VMWRITEs of GUEST_RIP need not be in ``changed``: the checker compares RIP itself."""
    counts: dict[str, int] = {}
    checker = EntryChecker(_spied(counts))
    vm = fresh("protected")
    cpu, region = vm.cpu, vm.vmcs.region
    checker.violations(cpu, region)
    counts.clear()
    region.put(F.GUEST_RIP, 1 << 32)
    found = checker.violations(cpu, region, set())
    assert set(counts) == {r.id for r in RULES if F.GUEST_RIP in r.reads} == RIP_RULES
    assert [v.rule for v in found] == ["guest_rip_high_bits"]
    assert found == entry_violations(cpu, region)
    # back below 4 GiB: the RIP rules run once more, to clear their verdict ...
    counts.clear()
    region.put(F.GUEST_RIP, 0x2000)
    assert checker.violations(cpu, region, set()) == [] == entry_violations(cpu, region)
    assert set(counts) == RIP_RULES
    # ... and then no more while RIP stays below 4 GiB: they hold there (see .registry)
    counts.clear()
    region.put(F.GUEST_RIP, 0x3000)
    assert checker.violations(cpu, region, {int(F.GUEST_RIP)}) == []
    assert counts == {}


def test_checker_reruns_processor_rules_when_the_capabilities_change():
    counts: dict[str, int] = {}
    checker = EntryChecker(_spied(counts))
    vm = fresh("protected")
    cpu, region = vm.cpu, vm.vmcs.region
    checker.violations(cpu, region)
    processor_rules = {r.id for r in RULES if r.processor}
    assert {"cr3_target_count", "host_cr0_fixed_bits", "guest_cr3_width", "msr_bitmap_address"} <= processor_rules

    # a capability changed in place: HLT exiting becomes a must-be-0 control
    counts.clear()
    a = cpu.caps.true_controls[ProcBased]
    cpu.caps.true_controls[ProcBased] = AllowedSettings(a.allowed0, a.allowed1 & ~ProcBased.HLT_EXITING)
    found = checker.violations(cpu, region, set())
    assert set(counts) == processor_rules
    assert [v.rule for v in found] == ["primary_controls_reserved"] and found == entry_violations(cpu, region)

    # another capabilities object (the original MSR values again)
    counts.clear()
    cpu.caps = VmxCapabilities()
    assert checker.violations(cpu, region, set()) == []
    assert set(counts) == processor_rules

    # a narrower physical-address width puts the bitmaps and CR3 out of reach
    counts.clear()
    cpu.memory.width = 20
    found = {v.rule for v in checker.violations(cpu, region, set())}
    assert set(counts) == processor_rules
    assert found == {v.rule for v in entry_violations(cpu, region)} and "msr_bitmap_address" in found


def test_checker_keeps_verdicts_per_vmcs():
    checker = EntryChecker()
    a, b = fresh("real"), fresh("long")
    assert checker.violations(a.cpu, a.vmcs.region) == []
    b.vmwrite(F.GUEST_RFLAGS, 0)
    assert [v.rule for v in checker.violations(b.cpu, b.vmcs.region)] == ["guest_rflags_bit1"]
    # back to A with nothing changed: its own (clean) verdicts, no re-run
    assert checker.violations(a.cpu, a.vmcs.region, set()) == []
    assert checker.last_run_ids == []
    assert [v.rule for v in checker.violations(b.cpu, b.vmcs.region, set())] == ["guest_rflags_bit1"]
    checker.forget(b.vmcs.region)
    checker.violations(b.cpu, b.vmcs.region, set())          # no verdicts kept: a full check
    assert len(checker.last_run_ids) == len(RULES)


def test_checker_accepts_the_current_vmcs_view():
    """``cpu.current_vmcs`` is a view of the region; verdicts are kept per region."""
    vm = fresh("protected")
    checker = EntryChecker()
    view, region = vm.vmcs, vm.vmcs.region
    assert checker.violations(vm.cpu, view) == []
    vm.vmwrite(F.VMCS_LINK_POINTER, 0)       # a zeroed page: not a VMCS of this revision
    found = checker.violations(vm.cpu, region, {int(F.VMCS_LINK_POINTER)})
    assert [v.rule for v in found] == ["vmcs_link_pointer_revision"] and found[0].qualification == 4
    assert set(checker.last_run_ids) == {r.id for r in RULES if F.VMCS_LINK_POINTER in r.reads}


def test_index_comes_from_the_reads():
    checker = EntryChecker()
    for field, indexes in checker.by_field.items():
        assert {RULES[i].id for i in indexes} == {r.id for r in RULES if field in {int(f) for f in r.reads}}
    assert [r.id for r in checker.rules_reading(F.GUEST_RIP)] == ["guest_rip_high_bits", "guest_rip_canonical"]


def test_vm_entry_after_a_cpuid_exit_rechecks_no_rule():
    """The CPUID round trip: the handler advances GUEST_RIP, nothing else - and the RIP
    rules hold below 4 GiB, so VMRESUME runs no rule at all."""
    vm = fresh("protected", "mov eax, 1\ncpuid\nhlt")
    runs = []
    checker = vm.cpu.entry_checker
    original = checker.violations

    def spy(cpu, vmcs, changed=None):
        out = original(cpu, vmcs, changed)
        runs.append(checker.last_run_ids)
        return out

    checker.violations = spy
    assert vm.run().state is VmState.HALTED
    assert len(runs[0]) == len(RULES)                       # VMLAUNCH: every rule
    assert runs[1:] == [[]]                                 # VMRESUME after CPUID: none


# --------------------------------------------------- reads are complete
class _RecordingVmcs:
    """A VMCS reader that notes every field a rule reads."""

    def __init__(self, region):
        self.region, self.read = region, set()

    def get(self, field):
        self.read.add(int(field))
        return self.region.get(field)


class _RecordingCpu:
    """The processor, noting which of its attributes a rule touches."""

    def __init__(self, cpu):
        self._cpu, self.touched = cpu, set()

    def __getattr__(self, name):
        self.touched.add(name)
        return getattr(self._cpu, name)


@pytest.fixture(scope="module")
def recipe_vmcs():
    """(cpu, VMCS region) of a fresh VM in every mode and of every rule's broken VM."""
    out = []
    for mode in MODES:
        vm = fresh(mode)
        out.append((vm.cpu, vm.vmcs.region))
    vm = fresh("long")                    # 64-bit code above 4 GiB: legal, and reads CS.L
    vm.vmwrite(F.GUEST_RIP, 1 << 32)
    out.append((vm.cpu, vm.vmcs.region))
    for r in RULES:
        vm = fresh(r.mode)
        r.breaks(vm)
        out.append((vm.cpu, vm.vmcs.region))
    return out


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_reads_declare_every_field_the_rule_reads(rule, recipe_vmcs):
    declared = {int(f) for f in rule.reads}
    seen: set[int] = set()
    touched: set[str] = set()
    for cpu, region in recipe_vmcs:
        vmcs, proc = _RecordingVmcs(region), _RecordingCpu(cpu)
        rule.check(proc, vmcs)
        undeclared = vmcs.read - declared
        assert not undeclared, f"{rule.id} reads {[F(f).name for f in undeclared]} without declaring them"
        seen |= vmcs.read
        touched |= proc.touched
    # ... and declares nothing it never reads on any of these VMCSs
    assert seen == declared, f"{rule.id} never read {[F(f).name for f in declared - seen]}"
    # processor state outside the VMCS: declared exactly when used
    assert bool(touched & {"caps", "memory"}) == rule.processor, (rule.id, touched)


@pytest.mark.parametrize("rule", [r for r in RULES if F.GUEST_RIP in r.reads], ids=lambda r: r.id)
def test_rip_rules_hold_below_4_gib_and_read_nothing_else(rule, recipe_vmcs):
    """The registry's promise (vtlab/cpu/entry/registry.py) the checker and the lazy
    guest-state save rely on: with RIP < 4 GiB a RIP rule holds, reading only GUEST_RIP."""
    for cpu, region in recipe_vmcs:
        saved = region.get(F.GUEST_RIP)
        for rip in (0, 0x1000, 0xFFFF_FFFF):
            region.put(F.GUEST_RIP, rip)
            vmcs = _RecordingVmcs(region)
            assert not rule.check(cpu, vmcs), (rule.id, hex(rip))
            assert vmcs.read == {int(F.GUEST_RIP)}, rule.id
        region.put(F.GUEST_RIP, saved)


def test_rip_above_4_gib_needs_64_bit_code():
    """SDM 27.3.1.4: RIP bits 63:32 may be set only with "IA-32e mode guest" = 1 and CS.L = 1."""
    rip_rule = get_rule("guest_rip_high_bits")
    vm = fresh("long")
    vm.vmwrite(F.GUEST_RIP, 1 << 32)
    assert not rip_rule.check(vm.cpu, vm.vmcs.region)
    vm.vmwrite(F.GUEST_CS_AR_BYTES, vm.vmread(F.GUEST_CS_AR_BYTES) & ~(1 << 13))   # CS.L = 0
    assert rip_rule.check(vm.cpu, vm.vmcs.region)


# ------------------------------------------------------------ CS DPL (27.3.1.2)
@pytest.mark.parametrize("cs_ar, ss_ar, broken", [
    (0x9B, 0x93, None),                           # type 11, DPL 0 = SS DPL 0
    (0xFB, 0xF3, None),                           # type 11, DPL 3 = SS DPL 3
    (0xFB, 0x93, "guest_cs_dpl_nonconforming"),   # type 11, DPL 3 != SS DPL 0
    (0x99, 0xB3, "guest_cs_dpl_nonconforming"),   # type 9, DPL 0 != SS DPL 1
    (0x9F, 0xF3, None),                           # conforming type 15, DPL 0 <= SS DPL 3
    (0xDD, 0xD3, None),                           # conforming type 13, DPL 2 <= SS DPL 2
    (0xFF, 0xB3, "guest_cs_dpl_conforming"),      # conforming, DPL 3 > SS DPL 1
    (0x93, 0x93, None),                           # type 3 (unrestricted guest), DPL 0
    (0xB3, 0x93, "guest_cs_dpl_data_segment"),    # type 3, DPL 1
])
def test_cs_dpl_rules(cs_ar, ss_ar, broken):
    vm = fresh("real")                            # unrestricted guest: CS type 3 is allowed
    vm.vmwrite(F.GUEST_CS_AR_BYTES, cs_ar)
    vm.vmwrite(F.GUEST_SS_AR_BYTES, ss_ar)
    dpl_rules = [r for r in RULES if r.id.startswith("guest_cs_dpl_")]
    assert len(dpl_rules) == 3
    found = [r.id for r in dpl_rules if r.check(vm.cpu, vm.vmcs.region)]
    assert found == ([broken] if broken else [])


def test_cs_dpl_is_not_checked_in_virtual_8086_mode():
    vm = fresh("protected")
    vm.vmwrite(F.GUEST_CS_AR_BYTES, 0xFB)         # DPL 3 != SS DPL 0, but RFLAGS.VM = 1
    vm.vmwrite(F.GUEST_RFLAGS, 0x2 | (1 << 17))
    assert not get_rule("guest_cs_dpl_nonconforming").check(vm.cpu, vm.vmcs.region)
    assert get_rule("guest_cs_v8086_access_rights").check(vm.cpu, vm.vmcs.region)

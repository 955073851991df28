"""The VM-entry checks of SDM Vol. 3C 27.2-27.3, one by one, with the outcome written out
from the SDM (edition 325462-084US) - not taken from vtlab's registry.

Every case builds a valid :class:`vtlab.VirtualMachine`, VMWRITEs one field (or a few)
against one rule, runs it and checks what the SDM prescribes:

* VMX controls (27.2.1)            -> VMfailValid, VM-instruction error 7 (SDM 31.4)
* host-state area (27.2.2-27.2.4)  -> VMfailValid, VM-instruction error 8 (SDM 31.4)
* guest-state area (27.3.1)        -> VM-entry failure: exit reason 0x80000021 (33 | bit 31)
  with exit qualification 0, 2 for the PDPTEs, 4 for the VMCS link pointer (SDM 27.8)

and that the guest never ran.  Next to each group, cases of valid settings show that the
checks hold where the SDM allows (no false positives), with capability MSRs other than
vtlab's where the SDM makes a rule depend on them.  Bit numbers are the SDM's, literally.
"""
from __future__ import annotations

import pytest

from vtlab import Status, VirtualMachine, VmcsField as F, VmState, VmxCapabilities
from vtlab.cpu.capabilities import AllowedSettings
from vtlab.arch import ProcBased

VALID = 1 << 31                                  # VM-entry interruption information, bit 31
MTF = 1 << 27                                    # "monitor trap flag", primary proc-based bit 27
NON_CANONICAL = 0x0000_8000_0000_0000            # bit 47 set, bits 63:48 clear


def event(type_: int, vector: int, error_code: bool = False) -> int:
    """A VM-entry interruption-information value (SDM 25.8.3, Table 25-17)."""
    return VALID | type_ << 8 | vector | (1 << 11 if error_code else 0)


class Caps(VmxCapabilities):
    """vtlab's capability MSRs with bits of IA32_VMX_BASIC, _MISC or _EPT_VPID_CAP set or
    cleared: another processor, for the rules the SDM ties to what the processor reports."""

    def __init__(self, basic=(0, 0), misc=(0, 0), ept=(0, 0), mtf: bool = True):
        super().__init__()
        self.tweaks = (basic, misc, ept)
        if not mtf:
            for table in (self.controls, self.true_controls):
                a = table[ProcBased]
                table[ProcBased] = AllowedSettings(a.allowed0, a.allowed1 & ~MTF)

    @staticmethod
    def _tweak(value: int, tweak: tuple[int, int]) -> int:
        return (value | tweak[0]) & ~tweak[1]

    @property
    def basic(self) -> int:
        return self._tweak(super().basic, self.tweaks[0])

    @property
    def misc(self) -> int:
        return self._tweak(super().misc, self.tweaks[1])

    @property
    def ept_vpid_cap(self) -> int:
        return self._tweak(super().ept_vpid_cap, self.tweaks[2])


def vm_in(mode: str, caps: VmxCapabilities | None = None) -> VirtualMachine:
    vm = VirtualMachine("hlt", mode=mode)
    if caps is not None:
        vm.cpu.caps = caps
    return vm


def setb(vm: VirtualMachine, field: F, bits: int) -> None:
    vm.vmwrite(field, vm.vmread(field) | bits)


def clearb(vm: VirtualMachine, field: F, bits: int) -> None:
    vm.vmwrite(field, vm.vmread(field) & ~bits)


def launch(vm: VirtualMachine) -> None:
    vm.run(max_exits=20, max_instructions=2_000)


def assert_vmfail(vm: VirtualMachine, error: int, rule: str) -> None:
    """VMLAUNCH failed with VMfailValid and VM-instruction error ``error``; the guest never ran."""
    launch(vm)
    assert vm.last_outcome.status is Status.VMFAIL_VALID, vm.last_outcome
    assert vm.vmread(F.VM_INSTRUCTION_ERROR) == error
    assert vm.guest.counter.total == 0
    assert rule in [v.rule for v in vm.last_outcome.violations]


def assert_entry_failure(vm: VirtualMachine, reason: int, qualification: int, rule: str) -> None:
    """VMLAUNCH failed as a VM exit with ``reason`` and ``qualification``; the guest never ran."""
    launch(vm)
    assert vm.last_outcome.status is Status.ENTRY_FAILED, vm.last_outcome
    assert vm.vmread(F.VM_EXIT_REASON) == reason
    assert vm.vmread(F.EXIT_QUALIFICATION) == qualification
    assert vm.guest.counter.total == 0
    assert rule in [v.rule for v in vm.last_outcome.violations]


def assert_checks_pass(vm: VirtualMachine) -> None:
    """No VM-entry check objects to the VMCS."""
    assert [str(v) for v in vm.cpu.entry_violations()] == []


def assert_enters(vm: VirtualMachine) -> None:
    """No check objects, and VMLAUNCH really enters the guest."""
    assert_checks_pass(vm)
    launch(vm)
    assert vm.state is not VmState.ENTRY_FAILED, vm.message
    assert vm.cpu.history[0].status is not Status.VMFAIL_VALID
    # entered: the guest then exited (or, halted with nothing to wake it, is paused inside)
    assert [o.status for o in vm.cpu.history if o.instruction == "VMLAUNCH"][0] in (Status.VM_EXIT,
                                                                                   Status.PAUSED)


# ================================================================ 27.2.1.1 EPTP
def test_eptp_memory_type_uc_needs_ept_vpid_cap_bit_8():
    # SDM 27.2.1.1: the EPT memory type (bits 2:0) must be one IA32_VMX_EPT_VPID_CAP
    # reports - UC (0) if bit 8 is 1, WB (6) if bit 14 is 1.  vtlab's reports WB only.
    vm = vm_in("real")
    vm.vmwrite(F.EPT_POINTER, vm.vmread(F.EPT_POINTER) & ~7 | 0)
    assert_vmfail(vm, 7, "ept_pointer_memory_type")
    vm = vm_in("real", Caps(ept=(1 << 8, 0)))
    vm.vmwrite(F.EPT_POINTER, vm.vmread(F.EPT_POINTER) & ~7 | 0)
    assert_enters(vm)


def test_eptp_memory_type_wb_needs_ept_vpid_cap_bit_14():
    # SDM 27.2.1.1: WB (6) only if IA32_VMX_EPT_VPID_CAP bit 14 is 1.
    assert_enters(vm_in("real"))                            # EPTP memory type 6 (WB)
    vm = vm_in("real", Caps(ept=(1 << 8, 1 << 14)))
    assert_vmfail(vm, 7, "ept_pointer_memory_type")


def test_eptp_walk_length_must_be_one_the_cap_reports():
    # SDM 27.2.1.1: bits 5:3 = walk length - 1: 3 if EPT_VPID_CAP bit 6, 4 if bit 7.
    vm = vm_in("real")
    vm.vmwrite(F.EPT_POINTER, vm.vmread(F.EPT_POINTER) & ~0x38 | 4 << 3)   # 5-level
    assert_vmfail(vm, 7, "ept_pointer_walk_length")
    vm = vm_in("real", Caps(ept=(1 << 7, 0)))
    vm.vmwrite(F.EPT_POINTER, vm.vmread(F.EPT_POINTER) & ~0x38 | 4 << 3)
    assert_checks_pass(vm)


def test_eptp_accessed_dirty_needs_ept_vpid_cap_bit_21():
    # SDM 27.2.1.1: bit 6 (EPT A/D flags) must be 0 if IA32_VMX_EPT_VPID_CAP[21] is 0.
    vm = vm_in("real")
    setb(vm, F.EPT_POINTER, 1 << 6)
    assert_vmfail(vm, 7, "ept_pointer_accessed_dirty")
    vm = vm_in("real", Caps(ept=(1 << 21, 0)))
    setb(vm, F.EPT_POINTER, 1 << 6)
    assert_enters(vm)


# ====================================================== 27.2.1.3 event injection
def test_injection_type_1_is_reserved():
    # SDM 27.2.1.3: interruption type 1 is reserved on all processors.
    vm = vm_in("real")
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(1, 0))
    assert_vmfail(vm, 7, "event_injection_type_reserved")


def test_injection_type_7_is_reserved_without_monitor_trap_flag():
    # SDM 27.2.1.3: type 7 (other event) is reserved on processors that do not support the
    # 1-setting of "monitor trap flag".  vtlab's supports it: type 7 vector 0 is valid.
    vm = vm_in("real", Caps(mtf=False))
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(7, 0))
    assert_vmfail(vm, 7, "event_injection_type_reserved")
    vm = vm_in("real")
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(7, 0))
    assert_checks_pass(vm)


def test_injection_other_event_needs_vector_0():
    # SDM 27.2.1.3: if the type is other event, the vector is 0 (pending MTF VM exit).
    vm = vm_in("real")
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(7, 1))
    assert_vmfail(vm, 7, "event_injection_other_event_vector")


@pytest.mark.parametrize("mode, info, code, ok", [
    # SDM 27.2.1.3: "deliver error code" (bit 11) must be 0 for any type but hardware
    # exception, and with "unrestricted guest" 1 and CR0.PE 0 (real-address mode) ...
    ("protected", event(2, 2, error_code=True), 0, False),     # NMI with an error code
    ("protected", event(4, 0x80, error_code=True), 0, False),  # INT n with an error code
    ("real", event(3, 13, error_code=True), 0, False),         # #GP in real mode
    ("real", event(3, 13), 0, True),                           # ... without: fine
    ("protected", event(3, 13, error_code=True), 0, True),     # #GP(0) in protected mode
    # ... and otherwise is free: vtlab's IA32_VMX_BASIC[56] is 1
    ("protected", event(3, 13), 0, True),                      # #GP without an error code
    ("protected", event(3, 6, error_code=True), 0, True),      # #UD with one
])
def test_injection_deliver_error_code(mode, info, code, ok):
    vm = vm_in(mode)
    assert vm.cpu.rdmsr(0x480) >> 56 & 1 == 1                  # IA32_VMX_BASIC[56]
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info)
    vm.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, code)
    if ok:
        assert_enters(vm)
    else:
        assert_vmfail(vm, 7, "event_injection_deliver_error_code")


@pytest.mark.parametrize("info, ok", [
    # SDM 27.2.1.3 with IA32_VMX_BASIC[56] = 0: in protected mode a hardware exception has
    # "deliver error code" 1 exactly for #DF, #TS, #NP, #SS, #GP, #PF and #AC.
    (event(3, 13, error_code=True), True),
    (event(3, 14, error_code=True), True),
    (event(3, 17, error_code=True), True),
    (event(3, 13), False),
    (event(3, 6, error_code=True), False),
    (event(3, 6), True),
])
def test_injection_error_code_by_vector_when_basic_56_is_0(info, ok):
    vm = vm_in("protected", Caps(basic=(0, 1 << 56)))
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info)
    if ok:
        assert_checks_pass(vm)
    else:
        assert_vmfail(vm, 7, "event_injection_deliver_error_code")


def test_injection_reserved_bits_30_12():
    # SDM 27.2.1.3: reserved bits 30:12 of the field must be 0.
    vm = vm_in("real")
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(3, 6) | 1 << 12)
    assert_vmfail(vm, 7, "event_injection_reserved_bits")
    vm = vm_in("real")
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(3, 6) | 1 << 30)
    assert_vmfail(vm, 7, "event_injection_reserved_bits")


def test_injection_error_code_bits_31_16():
    # SDM 27.2.1.3: with "deliver error code" 1, bits 31:16 of the error code must be 0.
    vm = vm_in("protected")
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(3, 13, error_code=True))
    vm.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, 0x1_0000)
    assert_vmfail(vm, 7, "event_injection_error_code_high_bits")
    vm = vm_in("protected")
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(3, 13, error_code=True))
    vm.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, 0xFFFF)
    assert_enters(vm)


@pytest.mark.parametrize("type_, vector", [(4, 0x80), (5, 1), (6, 3)])
@pytest.mark.parametrize("length, ok", [(0, False), (1, True), (15, True), (16, False)])
def test_injection_instruction_length(type_, vector, length, ok):
    # SDM 27.2.1.3: software interrupt (4), privileged software exception (5), software
    # exception (6): the VM-entry instruction length must be 0-15, and 0 only if
    # IA32_VMX_MISC[30] is 1 - vtlab's is 0.
    vm = vm_in("real")
    assert not vm.cpu.rdmsr(0x485) >> 30 & 1                     # IA32_VMX_MISC[30]
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(type_, vector))
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, length)
    if ok:
        assert_checks_pass(vm)
    else:
        assert_vmfail(vm, 7, "event_injection_instruction_length")


def test_injection_instruction_length_0_with_misc_bit_30():
    # SDM 27.2.1.3, A.6: IA32_VMX_MISC[30] = 1 allows a length of 0.
    vm = vm_in("real", Caps(misc=(1 << 30, 0)))
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(4, 0x80))
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, 0)
    assert_checks_pass(vm)


def test_injecting_int_n_with_its_length_enters():
    vm = vm_in("real")
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(4, 0x80))
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, 2)
    assert_enters(vm)


# ============================================= 27.2.2 host MSRs (error 8)
@pytest.mark.parametrize("pat, ok", [
    (0x0007_0406_0007_0406, True),      # the power-up value: WB, WT, UC-, UC
    (0x0706_0504_0100_0000, True),      # every memory type
    (0x0000_0000_0000_0002, False),     # byte 0 = 2: reserved
    (0x0300_0000_0000_0000, False),     # byte 7 = 3: reserved
    (0x0000_0000_0000_0800, False),     # byte 1 = 8
])
def test_host_pat(pat, ok):
    # SDM 27.2.2: with "load IA32_PAT" (exit control bit 19) = 1, each byte of the
    # IA32_PAT field must be 0, 1, 4, 5, 6 or 7.
    vm = vm_in("real")
    setb(vm, F.VM_EXIT_CONTROLS, 1 << 19)
    vm.vmwrite(F.HOST_IA32_PAT, pat)
    if ok:
        assert_enters(vm)
    else:
        assert_vmfail(vm, 8, "host_ia32_pat_valid")


def test_host_pat_is_not_checked_without_load_ia32_pat():
    vm = vm_in("real")
    clearb(vm, F.VM_EXIT_CONTROLS, 1 << 19)
    vm.vmwrite(F.HOST_IA32_PAT, 0x0202_0202_0202_0202)
    assert_enters(vm)


@pytest.mark.parametrize("bit", [1, 9, 12, 63])
def test_host_efer_reserved_bits(bit):
    # SDM 27.2.2: with "load IA32_EFER" (exit control bit 21) = 1, the bits reserved in
    # IA32_EFER must be 0 (only SCE 0, LME 8, LMA 10, NXE 11 exist).
    vm = vm_in("real")
    assert vm.vmread(F.VM_EXIT_CONTROLS) >> 21 & 1
    setb(vm, F.HOST_IA32_EFER, 1 << bit)
    assert_vmfail(vm, 8, "host_efer_reserved")


@pytest.mark.parametrize("clear", [1 << 8, 1 << 10])
def test_host_efer_lma_and_lme_equal_host_address_space_size(clear):
    # SDM 27.2.2: LMA (bit 10) and LME (bit 8) must each equal "host address-space size".
    vm = vm_in("real")
    clearb(vm, F.HOST_IA32_EFER, clear)
    assert_vmfail(vm, 8, "host_efer_lma_lme")


def test_host_efer_of_a_64_bit_vmm_enters():
    vm = vm_in("long")
    vm.vmwrite(F.HOST_IA32_EFER, 0xD01)                    # NXE | LMA | LME | SCE
    assert_enters(vm)


# ============================================ 27.2.3-27.2.4 (host address-space size 0)
def _host_32_bit(vm: VirtualMachine) -> None:
    clearb(vm, F.VM_EXIT_CONTROLS, 1 << 9)                 # "host address-space size"


def test_host_ss_selector_nonzero_for_a_32_bit_host():
    # SDM 27.2.3: the SS selector field must not be 0000H if "host address-space size" is 0.
    vm = vm_in("real")
    _host_32_bit(vm)
    vm.vmwrite(F.HOST_SS_SELECTOR, 0)
    assert_vmfail(vm, 8, "host_ss_selector_nonzero")


def test_host_32_bit_forbids_an_ia32e_guest():
    # SDM 27.2.4: if "host address-space size" is 0, "IA-32e mode guest" must be 0.
    vm = vm_in("long")
    _host_32_bit(vm)
    assert_vmfail(vm, 8, "host_ia32e_guest_requires_64_bit_host")


def test_host_32_bit_forbids_cr4_pcide():
    # SDM 27.2.4: if "host address-space size" is 0, CR4.PCIDE (bit 17) must be 0.
    vm = vm_in("real")
    _host_32_bit(vm)
    setb(vm, F.HOST_CR4, 1 << 17)
    assert_vmfail(vm, 8, "host_cr4_pcide_requires_64_bit_host")


def test_host_32_bit_needs_rip_below_4_gib():
    # SDM 27.2.4: if "host address-space size" is 0, bits 63:32 of the RIP field must be 0.
    vm = vm_in("real")
    _host_32_bit(vm)
    vm.vmwrite(F.HOST_RIP, 0x1_0000_0000)
    assert_vmfail(vm, 8, "host_rip_high_bits")


def test_host_address_space_rules_hold_for_a_64_bit_host():
    vm = vm_in("long")
    vm.vmwrite(F.HOST_SS_SELECTOR, 0)                      # a null SS is fine in 64-bit mode
    setb(vm, F.HOST_CR4, 1 << 17)                          # and so is PCIDE
    assert_enters(vm)


# ============================================ 27.3.1.1 guest MSRs (exit reason 33)
@pytest.mark.parametrize("pat, ok", [
    (0x0007_0406_0007_0406, True), (0x0000_0000_0000_0003, False), (0x0800_0000_0000_0000, False)])
def test_guest_pat(pat, ok):
    # SDM 27.3.1.1: with "load IA32_PAT" (entry control bit 14) = 1, each byte of the
    # IA32_PAT field must be 0, 1, 4, 5, 6 or 7.
    vm = vm_in("real")
    setb(vm, F.VM_ENTRY_CONTROLS, 1 << 14)
    vm.vmwrite(F.GUEST_IA32_PAT, pat)
    if ok:
        assert_enters(vm)
    else:
        assert_entry_failure(vm, 0x80000021, 0, "guest_ia32_pat_valid")


@pytest.mark.parametrize("mode", ["real", "long"])
def test_guest_efer_reserved_bits(mode):
    # SDM 27.3.1.1: with "load IA32_EFER" (entry control bit 15) = 1, the bits reserved in
    # IA32_EFER must be 0.
    vm = vm_in(mode)
    assert vm.vmread(F.VM_ENTRY_CONTROLS) >> 15 & 1
    setb(vm, F.GUEST_IA32_EFER, 1 << 9)
    assert_entry_failure(vm, 0x80000021, 0, "guest_efer_reserved")


def test_guest_efer_sce_and_nxe_enter():
    vm = vm_in("long")
    setb(vm, F.GUEST_IA32_EFER, 1 << 0 | 1 << 11)           # SCE, NXE
    assert_enters(vm)


@pytest.mark.parametrize("debugctl, ok", [(0x2, True), (0xFFC3, True), (0x4, False), (0x1_0000, False)])
def test_guest_debugctl_reserved_bits(debugctl, ok):
    # SDM 27.3.1.1: with "load debug controls" (entry control bit 2) = 1, the bits reserved
    # in IA32_DEBUGCTL (5:2, 63:16; SDM Vol. 4 Table 2-2) must be 0.
    vm = vm_in("protected")
    setb(vm, F.VM_ENTRY_CONTROLS, 1 << 2)
    vm.vmwrite(F.GUEST_IA32_DEBUGCTL, debugctl)
    if ok:
        assert_checks_pass(vm)
    else:
        assert_entry_failure(vm, 0x80000021, 0, "guest_debugctl_reserved")


def test_guest_debugctl_is_not_checked_without_load_debug_controls():
    vm = vm_in("protected")
    clearb(vm, F.VM_ENTRY_CONTROLS, 1 << 2)
    vm.vmwrite(F.GUEST_IA32_DEBUGCTL, 0x4)
    assert_enters(vm)


# ================================================================ 27.3.1.4 RIP
def test_guest_rip_must_be_canonical_for_64_bit_code():
    # SDM 27.3.1.4: with N = 48 linear-address bits, bits 63:48 must equal bit 47 if
    # "IA-32e mode guest" is 1 and CS.L is 1.
    vm = vm_in("long")
    vm.vmwrite(F.GUEST_RIP, NON_CANONICAL)
    assert_entry_failure(vm, 0x80000021, 0, "guest_rip_canonical")
    vm = vm_in("long")
    vm.vmwrite(F.GUEST_RIP, 0xFFFF_8000_0000_1000)          # canonical, upper half
    assert_checks_pass(vm)
    vm = vm_in("long")
    vm.vmwrite(F.GUEST_RIP, 0x0000_7FFF_FFFF_F000)          # canonical, lower half
    assert_checks_pass(vm)


# ====================================================== 27.3.1.2 segment registers
def _virtual_8086(vm: VirtualMachine) -> None:
    """A complete virtual-8086 guest state: everything 27.3.1.2 asks of one."""
    setb(vm, F.GUEST_RFLAGS, 1 << 17)
    for seg in ("CS", "SS", "DS", "ES", "FS", "GS"):
        vm.vmwrite(F[f"GUEST_{seg}_SELECTOR"], 0x100)
        vm.vmwrite(F[f"GUEST_{seg}_BASE"], 0x1000)
        vm.vmwrite(F[f"GUEST_{seg}_LIMIT"], 0xFFFF)
        vm.vmwrite(F[f"GUEST_{seg}_AR_BYTES"], 0xF3)


def test_virtual_8086_guest_state_passes():
    vm = vm_in("protected")
    _virtual_8086(vm)
    assert_checks_pass(vm)


@pytest.mark.parametrize("seg", ["CS", "SS", "DS", "ES", "FS", "GS"])
def test_virtual_8086_limits_are_ffff(seg):
    # SDM 27.3.1.2: in virtual-8086 mode each limit field must be 0000FFFFH.
    vm = vm_in("protected")
    _virtual_8086(vm)
    vm.vmwrite(F[f"GUEST_{seg}_LIMIT"], 0xFFFE)
    assert_entry_failure(vm, 0x80000021, 0, f"guest_{seg.lower()}_v8086_limit")


def test_cs_base_bits_63_32_must_be_0():
    # SDM 27.3.1.2: CS: bits 63:32 of the base address must be 0.
    vm = vm_in("long")
    vm.vmwrite(F.GUEST_CS_BASE, 1 << 32)
    assert_entry_failure(vm, 0x80000021, 0, "guest_cs_base_high_bits")


@pytest.mark.parametrize("seg", ["SS", "DS", "ES"])
def test_ss_ds_es_base_bits_63_32_must_be_0_if_usable(seg):
    # SDM 27.3.1.2: SS, DS, ES: if the register is usable, bits 63:32 of the base must be 0.
    vm = vm_in("long")
    vm.vmwrite(F[f"GUEST_{seg}_BASE"], 1 << 32)
    assert_entry_failure(vm, 0x80000021, 0, f"guest_{seg.lower()}_base_high_bits")
    vm = vm_in("long")
    vm.vmwrite(F[f"GUEST_{seg}_AR_BYTES"], 1 << 16)          # unusable: not checked
    vm.vmwrite(F[f"GUEST_{seg}_BASE"], 1 << 32)
    assert not [v for v in vm.cpu.entry_violations() if v.rule == f"guest_{seg.lower()}_base_high_bits"]


@pytest.mark.parametrize("seg", ["FS", "GS"])
def test_fs_gs_bases_must_be_canonical(seg):
    # SDM 27.3.1.2: TR, FS, GS: the base address must be canonical.
    vm = vm_in("long")
    vm.vmwrite(F[f"GUEST_{seg}_BASE"], NON_CANONICAL)
    assert_entry_failure(vm, 0x80000021, 0, f"guest_{seg.lower()}_base_canonical")
    vm = vm_in("long")
    vm.vmwrite(F[f"GUEST_{seg}_BASE"], 0xFFFF_8000_0000_0000)
    assert_enters(vm)


def test_tr_base_must_be_canonical():
    # SDM 27.3.1.2: TR: the base address must be canonical.
    vm = vm_in("long")
    vm.vmwrite(F.GUEST_TR_BASE, NON_CANONICAL)
    assert_entry_failure(vm, 0x80000021, 0, "guest_tr_base_canonical")


def test_ldtr_base_must_be_canonical_if_usable():
    # SDM 27.3.1.2: LDTR: if usable, the base address must be canonical.
    vm = vm_in("long")
    vm.vmwrite(F.GUEST_LDTR_BASE, NON_CANONICAL)           # unusable (bit 16): not checked
    assert_checks_pass(vm)
    vm.vmwrite(F.GUEST_LDTR_AR_BYTES, 0x82)
    assert_entry_failure(vm, 0x80000021, 0, "guest_ldtr_base_canonical")


def test_ldtr_selector_ti_must_be_0_if_usable():
    # SDM 27.3.1.2: LDTR: if usable, the TI flag (bit 2) of the selector must be 0.
    vm = vm_in("protected")
    vm.vmwrite(F.GUEST_LDTR_SELECTOR, 0x4)
    assert_checks_pass(vm)                                  # unusable
    vm.vmwrite(F.GUEST_LDTR_AR_BYTES, 0x82)
    assert_entry_failure(vm, 0x80000021, 0, "guest_ldtr_selector_ti")


def test_usable_ldtr_enters():
    vm = vm_in("protected")
    vm.vmwrite(F.GUEST_LDTR_SELECTOR, 0)
    vm.vmwrite(F.GUEST_LDTR_BASE, 0x2000)
    vm.vmwrite(F.GUEST_LDTR_LIMIT, 0xFFF)
    vm.vmwrite(F.GUEST_LDTR_AR_BYTES, 0x82)
    assert_enters(vm)


def _no_unrestricted_guest(vm: VirtualMachine) -> None:
    clearb(vm, F.SECONDARY_VM_EXEC_CONTROL, 1 << 7)          # "unrestricted guest"


def test_ss_rpl_must_equal_cs_rpl():
    # SDM 27.3.1.2: SS: not virtual-8086 and "unrestricted guest" 0: the RPL must equal
    # the RPL of the CS selector.
    vm = vm_in("paged")
    _no_unrestricted_guest(vm)
    vm.vmwrite(F.GUEST_CS_SELECTOR, 0x0B)                   # RPL 3, SS RPL 0
    assert_entry_failure(vm, 0x80000021, 0, "guest_ss_rpl_equals_cs_rpl")


def test_ss_dpl_must_equal_rpl_even_if_ss_is_unusable():
    # SDM 27.3.1.2: SS: "unrestricted guest" 0: the DPL must equal the RPL (the rule has
    # no "if usable": SS.DPL is the CPL).
    vm = vm_in("paged")
    _no_unrestricted_guest(vm)
    vm.vmwrite(F.GUEST_SS_AR_BYTES, 1 << 16 | 3 << 5)        # unusable, DPL 3; RPL 0
    assert_entry_failure(vm, 0x80000021, 0, "guest_ss_dpl_equals_rpl")


@pytest.mark.parametrize("cs_ar, cr0_pe", [(0x9B, False), (0x93, True)])
def test_ss_dpl_must_be_0_in_real_mode_or_with_cs_type_3(cs_ar, cr0_pe):
    # SDM 27.3.1.2: SS: the DPL must be 0 if the CS type is 3 or CR0.PE is 0.
    vm = vm_in("real")
    vm.vmwrite(F.GUEST_CS_AR_BYTES, cs_ar)
    if cr0_pe:
        setb(vm, F.GUEST_CR0, 1)
    vm.vmwrite(F.GUEST_SS_AR_BYTES, 0x93 | 1 << 5)           # DPL 1
    assert_entry_failure(vm, 0x80000021, 0, "guest_ss_dpl_zero_in_real_mode")


@pytest.mark.parametrize("seg", ["DS", "ES", "FS", "GS"])
def test_data_segment_dpl_must_not_be_below_rpl(seg):
    # SDM 27.3.1.2: DS, ES, FS, GS: the DPL cannot be less than the selector's RPL if
    # "unrestricted guest" is 0, the register is usable and the type is 0-11.
    vm = vm_in("paged")
    _no_unrestricted_guest(vm)
    vm.vmwrite(F[f"GUEST_{seg}_SELECTOR"], 0x13)            # RPL 3, DPL 0
    assert_entry_failure(vm, 0x80000021, 0, f"guest_{seg.lower()}_dpl_not_below_rpl")


@pytest.mark.parametrize("change", [
    {"AR_BYTES": 0x9F},                                     # type 15: conforming code
    {"AR_BYTES": 1 << 16},                                  # unusable
])
def test_data_segment_dpl_rule_exemptions(change):
    vm = vm_in("paged")
    _no_unrestricted_guest(vm)
    vm.vmwrite(F.GUEST_DS_SELECTOR, 0x13)
    for part, value in change.items():
        vm.vmwrite(F[f"GUEST_DS_{part}"], value)
    assert not [v for v in vm.cpu.entry_violations() if v.rule == "guest_ds_dpl_not_below_rpl"]


def test_data_segment_dpl_rule_does_not_apply_to_unrestricted_guests():
    vm = vm_in("paged")
    vm.vmwrite(F.GUEST_DS_SELECTOR, 0x13)
    assert not [v for v in vm.cpu.entry_violations() if v.rule == "guest_ds_dpl_not_below_rpl"]


def test_cs_db_must_be_0_for_64_bit_code():
    # SDM 27.3.1.2: CS: D/B (bit 14) must be 0 in IA-32e mode with L (bit 13) = 1.
    vm = vm_in("long")
    setb(vm, F.GUEST_CS_AR_BYTES, 1 << 14)
    assert_entry_failure(vm, 0x80000021, 0, "guest_cs_db_with_l")
    vm = vm_in("long")                                      # compatibility mode: L 0, D 1
    vm.vmwrite(F.GUEST_CS_AR_BYTES, 0xC09B)
    assert not [v for v in vm.cpu.entry_violations() if v.rule == "guest_cs_db_with_l"]


def test_tr_access_rights_reserved_bits():
    # SDM 27.3.1.2: TR: bits 11:8 and 31:17 of the access rights must be 0.
    for bit in (8, 17):
        vm = vm_in("protected")
        setb(vm, F.GUEST_TR_AR_BYTES, 1 << bit)
        assert_entry_failure(vm, 0x80000021, 0, "guest_tr_access_rights_reserved")


def test_tr_granularity():
    # SDM 27.3.1.2: TR: G must be 0 if any of limit bits 11:0 is 0, 1 if any of 31:20 is 1.
    vm = vm_in("protected")                                 # TR limit 67H
    setb(vm, F.GUEST_TR_AR_BYTES, 1 << 15)
    assert_entry_failure(vm, 0x80000021, 0, "guest_tr_limit_granularity_low")
    vm = vm_in("protected")
    vm.vmwrite(F.GUEST_TR_LIMIT, 0x0010_0000)
    assert_entry_failure(vm, 0x80000021, 0, "guest_tr_limit_granularity_high")
    vm = vm_in("protected")
    vm.vmwrite(F.GUEST_TR_LIMIT, 0xFFFF_FFFF)
    setb(vm, F.GUEST_TR_AR_BYTES, 1 << 15)
    assert_checks_pass(vm)


def test_ldtr_access_rights_and_granularity_if_usable():
    # SDM 27.3.1.2: LDTR (if usable): reserved bits 11:8, 31:17 zero; the G rules.
    cases = [(0x82 | 1 << 8, 0, "guest_ldtr_access_rights_reserved"),
             (0x82 | 1 << 20, 0, "guest_ldtr_access_rights_reserved"),
             (0x82 | 1 << 15, 0x0FFE, "guest_ldtr_limit_granularity_low"),
             (0x82, 0x0010_0000, "guest_ldtr_limit_granularity_high")]
    for ar, limit, rule in cases:
        vm = vm_in("protected")
        vm.vmwrite(F.GUEST_LDTR_LIMIT, limit)
        vm.vmwrite(F.GUEST_LDTR_AR_BYTES, ar)
        assert_entry_failure(vm, 0x80000021, 0, rule)
        vm.vmwrite(F.GUEST_LDTR_AR_BYTES, ar | 1 << 16)     # unusable: nothing checked
        assert_checks_pass(vm)


# ============================================ 27.3.1.5 activity and interruptibility
@pytest.mark.parametrize("activity", [2, 3, 4])
def test_activity_state_must_be_one_misc_reports(activity):
    # SDM 27.3.1.5, A.6: the activity state must be 0-3 and supported as IA32_VMX_MISC
    # bits 8:6 report (HLT, shutdown, wait-for-SIPI); vtlab's reports HLT only.
    vm = vm_in("real")
    assert vm.cpu.rdmsr(0x485) >> 6 & 7 == 0b001
    vm.vmwrite(F.GUEST_ACTIVITY_STATE, activity)
    assert_entry_failure(vm, 0x80000021, 0, "guest_activity_state_valid")


def test_activity_states_misc_supports_are_accepted():
    vm = vm_in("real", Caps(misc=(1 << 7 | 1 << 8, 0)))
    for activity in (0, 1, 2, 3):
        vm.vmwrite(F.GUEST_ACTIVITY_STATE, activity)
        assert_checks_pass(vm)


def test_hlt_activity_state_enters():
    vm = vm_in("real")
    vm.vmwrite(F.GUEST_ACTIVITY_STATE, 1)
    assert_enters(vm)


@pytest.mark.parametrize("blocking", [1, 2])
def test_activity_must_be_active_with_sti_or_mov_ss_blocking(blocking):
    # SDM 27.3.1.5: the activity state must be active if blocking by STI or MOV SS.
    vm = vm_in("real")
    setb(vm, F.GUEST_RFLAGS, 1 << 9)                        # IF = 1 (STI blocking needs it)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, blocking)
    vm.vmwrite(F.GUEST_ACTIVITY_STATE, 1)
    assert_entry_failure(vm, 0x80000021, 0, "guest_activity_active_when_blocking")


@pytest.mark.parametrize("info, ok", [
    # SDM 27.3.1.5: in the HLT state only external interrupts, NMIs, hardware exceptions
    # 1 (#DB) and 18 (#MC), and other event 0 (pending MTF VM exit) may be injected.
    (VALID | 0x20, True),
    (event(2, 2), True),
    (event(3, 1), True),
    (event(3, 18), True),
    (event(7, 0), True),
    (event(3, 6), False),                                   # #UD
    (event(4, 0x80), False),                                # INT 80H
    (event(6, 3), False),                                   # INT3
])
def test_events_injected_into_a_halted_guest(info, ok):
    vm = vm_in("real")
    setb(vm, F.GUEST_RFLAGS, 1 << 9)
    vm.vmwrite(F.GUEST_ACTIVITY_STATE, 1)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info)
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, 2)
    if ok:
        assert_checks_pass(vm)
    else:
        assert_entry_failure(vm, 0x80000021, 0, "guest_activity_allows_injected_event")


@pytest.mark.parametrize("activity, info, ok", [
    # SDM 27.3.1.5: shutdown: only NMIs and machine checks; wait-for-SIPI: nothing.
    (2, event(2, 2), True), (2, event(3, 18), True), (2, VALID | 0x20, False),
    (3, event(2, 2), False), (3, event(3, 18), False),
])
def test_events_injected_in_shutdown_and_wait_for_sipi(activity, info, ok):
    vm = vm_in("real", Caps(misc=(1 << 7 | 1 << 8, 0)))
    setb(vm, F.GUEST_RFLAGS, 1 << 9)
    vm.vmwrite(F.GUEST_ACTIVITY_STATE, activity)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info)
    if ok:
        assert_checks_pass(vm)
    else:
        assert_entry_failure(vm, 0x80000021, 0, "guest_activity_allows_injected_event")


def test_interruptibility_sti_and_mov_ss_not_both():
    # SDM 27.3.1.5: bits 0 (STI) and 1 (MOV SS) cannot both be 1.
    vm = vm_in("real")
    setb(vm, F.GUEST_RFLAGS, 1 << 9)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 3)
    assert_entry_failure(vm, 0x80000021, 0, "guest_interruptibility_sti_and_mov_ss")


def test_interruptibility_sti_needs_if():
    # SDM 27.3.1.5: bit 0 (blocking by STI) must be 0 if RFLAGS.IF (bit 9) is 0.
    vm = vm_in("real")
    clearb(vm, F.GUEST_RFLAGS, 1 << 9)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 1)
    assert_entry_failure(vm, 0x80000021, 0, "guest_interruptibility_sti_requires_if")
    vm = vm_in("real")
    setb(vm, F.GUEST_RFLAGS, 1 << 9)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 1)
    assert_enters(vm)


@pytest.mark.parametrize("blocking", [1, 2])
def test_interruptibility_with_an_injected_external_interrupt(blocking):
    # SDM 27.3.1.5: bits 0 and 1 must be 0 if VM entry injects an external interrupt.
    vm = vm_in("real")
    setb(vm, F.GUEST_RFLAGS, 1 << 9)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, blocking)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, VALID | 0x20)
    assert_entry_failure(vm, 0x80000021, 0, "guest_interruptibility_external_interrupt")


def test_interruptibility_with_an_injected_nmi():
    # SDM 27.3.1.5: bit 1 (MOV SS) must be 0 if VM entry injects an NMI.
    vm = vm_in("real")
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 2)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(2, 2))
    assert_entry_failure(vm, 0x80000021, 0, "guest_interruptibility_nmi_mov_ss")
    vm = vm_in("real")                                      # STI blocking is not checked
    setb(vm, F.GUEST_RFLAGS, 1 << 9)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 1)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(2, 2))
    assert_checks_pass(vm)


def test_interruptibility_smi_blocking_outside_smm():
    # SDM 27.3.1.5: bit 2 (blocking by SMI) must be 0 if the processor is not in SMM.
    vm = vm_in("real")
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 4)
    assert_entry_failure(vm, 0x80000021, 0, "guest_interruptibility_smi")


def test_interruptibility_nmi_blocking_is_allowed():
    vm = vm_in("real")
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 8)            # bit 3: blocking by NMI
    assert_enters(vm)


def test_interruptibility_nmi_blocking_with_virtual_nmis_and_an_injected_nmi():
    # SDM 27.3.1.5: bit 3 (blocking by NMI) must be 0 if the "virtual NMIs" control
    # (pin-based bit 5; it needs "NMI exiting", bit 3) is 1 and the VM-entry
    # interruption-information field injects an NMI (valid, type 2).
    vm = vm_in("real")
    vm.vmwrite(F.PIN_BASED_VM_EXEC_CONTROL, vm.vmread(F.PIN_BASED_VM_EXEC_CONTROL) | 1 << 3 | 1 << 5)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 8)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(2, 2))
    assert_entry_failure(vm, 0x80000021, 0, "guest_interruptibility_nmi_virtual_nmis")
    vm = vm_in("real")                                      # without virtual NMIs: allowed
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 8)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, event(2, 2))
    assert_checks_pass(vm)


def test_interruptibility_enclave_interruption_needs_sgx():
    # SDM 27.3.1.5: bit 4 (enclave interruption) needs SGX support; vtlab has none.
    vm = vm_in("real")
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 0x10)
    assert_entry_failure(vm, 0x80000021, 0, "guest_interruptibility_enclave")


# ======================================================= pending debug exceptions
@pytest.mark.parametrize("bit", [4, 11, 13, 15, 17, 63])
def test_pending_debug_reserved_bits(bit):
    # SDM 27.3.1.5: bits 11:4, 13, 15 and 63:17 must be 0.
    vm = vm_in("real")
    vm.vmwrite(F.GUEST_PENDING_DBG_EXCEPTIONS, 1 << bit)
    assert_entry_failure(vm, 0x80000021, 0, "guest_pending_debug_reserved")


def test_pending_debug_defined_bits_enter():
    vm = vm_in("real")
    vm.vmwrite(F.GUEST_PENDING_DBG_EXCEPTIONS, 0x100F)      # B3-B0, enabled breakpoint
    assert_enters(vm)


def _hlt_with(vm: VirtualMachine, tf: bool, btf: bool, bs: bool) -> None:
    vm.vmwrite(F.GUEST_ACTIVITY_STATE, 1)
    if tf:
        setb(vm, F.GUEST_RFLAGS, 1 << 8)
    vm.vmwrite(F.GUEST_IA32_DEBUGCTL, 2 if btf else 0)
    vm.vmwrite(F.GUEST_PENDING_DBG_EXCEPTIONS, 1 << 14 if bs else 0)


@pytest.mark.parametrize("tf, btf, bs, broken", [
    # SDM 27.3.1.5 (blocking by STI / MOV SS, or HLT): BS (bit 14) must be 1 if RFLAGS.TF
    # is 1 and IA32_DEBUGCTL.BTF is 0; it must be 0 if TF is 0 or BTF is 1.
    (True, False, False, "guest_pending_debug_bs_set"),
    (True, False, True, None),
    (False, False, True, "guest_pending_debug_bs_clear"),
    (True, True, True, "guest_pending_debug_bs_clear"),
    (True, True, False, None),
    (False, False, False, None),
])
def test_pending_debug_bs_in_hlt(tf, btf, bs, broken):
    vm = vm_in("real")
    _hlt_with(vm, tf, btf, bs)
    if broken:
        assert_entry_failure(vm, 0x80000021, 0, broken)
    else:
        assert_checks_pass(vm)


def test_pending_debug_bs_is_free_when_active_without_blocking():
    vm = vm_in("real")
    setb(vm, F.GUEST_RFLAGS, 1 << 8)
    assert_checks_pass(vm)                                  # TF = 1, BS = 0, active
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, 2)            # ... with MOV-SS blocking: not
    assert_entry_failure(vm, 0x80000021, 0, "guest_pending_debug_bs_set")


def test_pending_debug_rtm_needs_rtm():
    # SDM 27.3.1.5: if bit 16 (RTM) is 1, the processor must support RTM; vtlab's does not.
    vm = vm_in("real")
    vm.vmwrite(F.GUEST_PENDING_DBG_EXCEPTIONS, 1 << 16 | 1 << 12)
    assert_entry_failure(vm, 0x80000021, 0, "guest_pending_debug_rtm")


# ============================================================ VMCS link pointer
def test_link_pointer_bits_11_0():
    # SDM 27.3.1.5: a VMCS link pointer other than FFFFFFFF_FFFFFFFFH has bits 11:0 = 0.
    vm = vm_in("real")
    vm.vmwrite(F.VMCS_LINK_POINTER, vm.cpu.alloc_region(4) + 0x800)
    assert_entry_failure(vm, 0x80000021, 4, "vmcs_link_pointer_alignment")


def test_link_pointer_physical_address_width():
    # SDM 27.3.1.5: ... sets no bit beyond the physical-address width (39 on vtlab).
    vm = vm_in("real")
    vm.vmwrite(F.VMCS_LINK_POINTER, 1 << 39)
    assert_entry_failure(vm, 0x80000021, 4, "vmcs_link_pointer_width")


def test_link_pointer_revision_identifier():
    # SDM 27.3.1.5: bits 30:0 of the 4 bytes it points to must be the VMCS revision
    # identifier (IA32_VMX_BASIC[30:0]).
    vm = vm_in("real")
    page = vm.cpu.alloc_region(0x5)                         # vtlab's revision is 4
    vm.vmwrite(F.VMCS_LINK_POINTER, page)
    assert_entry_failure(vm, 0x80000021, 4, "vmcs_link_pointer_revision")


def test_link_pointer_shadow_indicator_must_match_vmcs_shadowing():
    # SDM 27.3.1.5: bit 31 of those 4 bytes must equal the "VMCS shadowing" control (0).
    vm = vm_in("real")
    page = vm.cpu.alloc_region((vm.cpu.rdmsr(0x480) & 0x7FFF_FFFF) | 1 << 31)
    vm.vmwrite(F.VMCS_LINK_POINTER, page)
    assert_entry_failure(vm, 0x80000021, 4, "vmcs_link_pointer_shadow_indicator")


def test_link_pointer_must_not_be_the_current_vmcs():
    # SDM 27.3.1.5: outside SMM the link pointer must not be the current-VMCS pointer.
    vm = vm_in("real")
    vm.vmwrite(F.VMCS_LINK_POINTER, vm.cpu.vmptrst().value)
    assert_entry_failure(vm, 0x80000021, 4, "vmcs_link_pointer_not_current")


def test_link_pointer_to_a_valid_vmcs_region_enters():
    # SDM 27.3.1.5: without VMCS shadowing a link pointer may still name an ordinary VMCS
    # region (revision identifier, bit 31 clear): only FFFFFFFF_FFFFFFFFH skips the checks,
    # it is not the only valid value.
    vm = vm_in("real")
    page = vm.cpu.alloc_region(vm.cpu.rdmsr(0x480) & 0x7FFF_FFFF)
    vm.vmwrite(F.VMCS_LINK_POINTER, page)
    assert_enters(vm)
    assert vm.state is VmState.HALTED


def test_link_pointer_all_ones_is_not_checked():
    vm = vm_in("real")
    vm.vmwrite(F.VMCS_LINK_POINTER, 0xFFFF_FFFF_FFFF_FFFF)
    assert_enters(vm)


# ================================================================= 27.3.1.6 PDPTEs
def _pae_paging(vm: VirtualMachine) -> None:
    setb(vm, F.GUEST_CR4, 1 << 5)                           # CR4.PAE, CR0.PG already 1


@pytest.mark.parametrize("pdpte, ok", [
    (0x0000_0000_0000_3001, True),                          # present, address 3000H
    (0xFFFF_FFFF_FFFF_FFFE, True),                          # not present: nothing checked
    (0x0000_0000_0000_3003, False),                         # bit 1 reserved
    (0x0000_0000_0000_3021, False),                         # bit 5 reserved
    (0x0000_0080_0000_3001, False),                         # bit 39: beyond the width
    (0x8000_0000_0000_3001, False),                         # bit 63 (no XD in a PDPTE)
])
def test_pdptes_with_ept_and_pae_paging(pdpte, ok):
    # SDM 27.3.1.6: a VM entry to PAE paging with "enable EPT" 1 checks the PDPTE fields as
    # MOV to CR3 would; a failure has exit qualification 2 (SDM 27.8).
    vm = vm_in("paged")
    _pae_paging(vm)
    vm.vmwrite(F.GUEST_PDPTR3, pdpte)
    if ok:
        assert_checks_pass(vm)
    else:
        assert_entry_failure(vm, 0x80000021, 2, "guest_pdptes_valid")


def test_pdptes_are_not_checked_without_pae_paging():
    vm = vm_in("paged")                                     # 32-bit paging
    vm.vmwrite(F.GUEST_PDPTR0, 0x3003)
    assert_enters(vm)

"""The VMCS lives in its region; VMREAD/VMWRITE of fields this processor lacks; named high halves.

Expected values are written out from the Intel SDM, Vol. 3C (edition 325462-084US):

* 25.1 "Overview": VMCLEAR X makes X "inactive, not current, and clear"; VMPTRLD X
  makes X current and active; VMLAUNCH makes the launch state "launched".
* 25.2 "Format of the VMCS Region", Table 25-1: byte 0, bits 30:0 the VMCS revision
  identifier, bit 31 the shadow-VMCS indicator; byte 4 the VMX-abort indicator; byte 8
  VMCS data in an implementation-specific format.
* 25.11.1 "Software Use of Virtual-Machine Control Structures": a VMCS is moved between
  logical processors with VMCLEAR (it "ensure[s] that all VMCS data are in memory")
  before VMPTRLD; software should never access the data of an active VMCS with
  ordinary memory operations.
* 25.11.2: a 64-bit field's "high" encoding (bit 0 = 1) accesses bits 63:32 of it.
* 31.3 VMCLEAR, VMPTRLD, VMREAD, VMWRITE, VMLAUNCH/VMRESUME pseudo-code, and 31.4
  Table 31-1 for the VM-instruction error numbers.
* Appendix B for the field encodings, Appendix A.1/A.3 for the capability MSRs.

The copy tests follow the facts kvm-unit-tests checks in its VMCLEAR-flushing test
(x86/vmx.c, test_vmclear_flushing): VMCLEAR of the current VMCS, and of an active VMCS
that is not current, leaves the whole VMCS in the region, so a copy of the region made
current with VMPTRLD reads back every field.
"""
from __future__ import annotations

import pytest

from vtlab import Guest, Status, VirtualMachine, VmxCpu, VmxFailure
from vtlab.arch.vmcs_fields import VmcsField, decode_encoding
from vtlab.errors import VmcsError

# ----------------------------------------------------------- SDM constants (literal)
IA32_VMX_BASIC = 0x480             # SDM A.1
IA32_VMX_PROCBASED_CTLS = 0x482    # SDM A.3.2
IA32_VMX_PROCBASED_CTLS2 = 0x48B   # SDM A.3.3
CR4_VMXE = 1 << 13
REGION_BYTES = 4096                # IA32_VMX_BASIC[44:32] on vtlab's processor (checked below)
INVALID_POINTER = 0xFFFF_FFFF_FFFF_FFFF   # VMPTRST with no current VMCS (SDM 31.3)
# Field encodings (SDM Appendix B)
GUEST_RIP = 0x681E
GUEST_RSP = 0x681C
GUEST_CR0 = 0x6800
EXCEPTION_BITMAP = 0x4004
TSC_OFFSET = 0x2010
TPR_THRESHOLD = 0x401C             # "exists only on processors that support the 1-setting
                                   # of the 'use TPR shadow' VM-execution control"
VM_INSTRUCTION_ERROR = 0x4400
VM_EXIT_REASON = 0x4402
# Processor-based VM-execution controls (SDM 25.6.2)
USE_TPR_SHADOW = 1 << 21           # primary, bit 21
VMCS_SHADOWING = 1 << 14           # secondary, bit 14
# VM-instruction error numbers (SDM 31.4, Table 31-1)
VMLAUNCH_WITH_NON_CLEAR_VMCS = 4
VMRESUME_WITH_NON_LAUNCHED_VMCS = 5
VMPTRLD_WITH_INCORRECT_REVISION_ID = 11
UNSUPPORTED_VMCS_COMPONENT = 12
VMWRITE_TO_READ_ONLY_COMPONENT = 13
# Basic exit reason (SDM Appendix C)
HLT = 12
HLT_PROGRAM = b"\xf4"   # HLT (opcode F4, SDM Vol. 2A): the guest's only instruction
# Width of a field from bits 14:13 of its encoding (SDM 25.11.2): 16, 64, 32, natural (64)
WIDTH_BITS = {0: 16, 1: 64, 2: 32, 3: 64}
# Type from bits 11:10: 1 = VM-exit information ("read-only data")
READ_ONLY_TYPE = 1


# ------------------------------------------------------------------------ helpers
def revision(cpu: VmxCpu) -> int:
    return cpu.rdmsr(IA32_VMX_BASIC) & 0x7FFF_FFFF


def root_cpu() -> VmxCpu:
    """A processor in VMX root operation (no current VMCS yet)."""
    cpu = VmxCpu(Guest("real"))
    cpu.write_cr4(cpu.cr4 | CR4_VMXE)
    assert cpu.vmxon(cpu.alloc_region(revision(cpu))).ok
    return cpu


def new_vmcs(cpu: VmxCpu) -> int:
    """A VMCS region with the revision identifier written, VMCLEARed as SDM 25.11.3 asks."""
    address = cpu.alloc_region(revision(cpu))
    assert cpu.vmclear(address).ok
    return address


def copy_region(cpu: VmxCpu, source: int) -> int:
    """memcpy of a whole VMCS region to a fresh 4-KByte aligned page of host memory."""
    target = cpu.alloc_region()
    assert target % 4096 == 0 and target != source
    cpu.memory.write(target, cpu.memory.read(source, REGION_BYTES))
    return target


def fields_of(cpu: VmxCpu) -> list[int]:
    """Every encoding of Appendix B that VMREAD accepts on this processor (full access type)."""
    return [int(f) for f in VmcsField if cpu.vmread(int(f)).ok]


def pattern(encoding: int, cookie: int) -> int:
    """A value for field ``encoding`` that differs from field to field and cookie to cookie."""
    bits = WIDTH_BITS[(encoding >> 13) & 3]
    value = (cookie << 56) | (encoding << 24) | (cookie << 8) | (encoding & 0xFF)
    return value & ((1 << bits) - 1)


def write_all(cpu: VmxCpu, cookie: int) -> list[int]:
    """VMWRITE a pattern into every writable field of the current VMCS; returns them."""
    written = []
    for enc in fields_of(cpu):
        if (enc >> 10) & 3 == READ_ONLY_TYPE:
            continue
        assert cpu.vmwrite(enc, pattern(enc, cookie)).ok, hex(enc)
        written.append(enc)
    return written


def check_all(cpu: VmxCpu, fields: list[int], cookie: int) -> None:
    wrong = {hex(enc): hex(cpu.vmread(enc).value) for enc in fields
             if cpu.vmread(enc).value != pattern(enc, cookie)}
    assert not wrong


def vmfail_valid(outcome, number: int) -> None:
    assert outcome.status is Status.VMFAIL_VALID, outcome
    assert int(outcome.error) == number


# ------------------------------------------------------- A. the region format (25.2)
def test_region_size_is_4_kbytes():
    cpu = root_cpu()
    assert (cpu.rdmsr(IA32_VMX_BASIC) >> 32) & 0x1FFF == REGION_BYTES   # SDM A.1: bits 44:32


def test_first_4_bytes_hold_the_revision_identifier_and_bit_31_is_0():
    cpu = root_cpu()
    vmcs = new_vmcs(cpu)
    assert cpu.vmptrld(vmcs).ok
    write_all(cpu, 0x5A)
    assert cpu.vmclear(vmcs).ok
    first = cpu.memory.read_u32(vmcs)
    assert first & 0x7FFF_FFFF == cpu.rdmsr(IA32_VMX_BASIC) & 0x7FFF_FFFF   # bits 30:0
    assert first >> 31 == 0                                                  # ordinary VMCS
    # "The VMCS revision identifier is never written by the processor" (25.2): VMCLEAR
    # leaves what software wrote; no VMX abort happened, so the abort indicator is 0.
    assert cpu.memory.read_u32(vmcs + 4) == 0


def test_vmclear_puts_the_vmcs_data_in_the_region():
    cpu = root_cpu()
    vmcs = new_vmcs(cpu)
    before = cpu.memory.read(vmcs, REGION_BYTES)
    assert cpu.vmptrld(vmcs).ok
    write_all(cpu, 0x33)
    assert cpu.vmclear(vmcs).ok
    after = cpu.memory.read(vmcs, REGION_BYTES)
    assert after[:8] == before[:8]          # revision identifier and abort indicator
    assert after[8:] != before[8:]          # the VMCS data (byte 8 on) are in memory now


# --------------------------------------- A. copying a VMCLEARed region (25.11.1, 31.3)
def test_copy_of_the_region_after_vmclear_of_the_current_vmcs_is_the_same_vmcs():
    cpu = root_cpu()
    original = new_vmcs(cpu)
    assert cpu.vmptrld(original).ok
    fields = write_all(cpu, 0x86)
    assert len(fields) > 100
    assert cpu.vmclear(original).ok
    copy = copy_region(cpu, original)
    assert cpu.vmptrld(copy).ok
    check_all(cpu, fields, 0x86)


def test_copy_after_vmclear_of_an_active_vmcs_that_is_not_current():
    cpu = root_cpu()
    first = new_vmcs(cpu)
    assert cpu.vmptrld(first).ok
    write_all(cpu, 0x86)
    assert cpu.vmclear(first).ok
    second = copy_region(cpu, first)
    assert cpu.vmptrld(second).ok
    fields = write_all(cpu, 0x87)
    assert cpu.vmptrld(first).ok            # second: active, not current (25.1)
    assert cpu.vmclear(second).ok           # its data go to memory all the same
    third = copy_region(cpu, second)
    assert cpu.vmptrld(third).ok
    check_all(cpu, fields, 0x87)
    assert cpu.vmptrld(first).ok            # first is still the VMCS of cookie 0x86
    check_all(cpu, fields, 0x86)


def test_a_read_only_field_travels_with_the_copy():
    cpu = root_cpu()
    original = new_vmcs(cpu)
    assert cpu.vmptrld(original).ok
    vmfail_valid(cpu.vmwrite(VM_EXIT_REASON, 1), VMWRITE_TO_READ_ONLY_COMPONENT)
    assert cpu.vmread(VM_INSTRUCTION_ERROR).value == VMWRITE_TO_READ_ONLY_COMPONENT
    assert cpu.vmclear(original).ok
    copy = copy_region(cpu, original)
    assert cpu.vmptrld(copy).ok
    assert cpu.vmread(VM_INSTRUCTION_ERROR).value == VMWRITE_TO_READ_ONLY_COMPONENT


def test_writing_the_copy_leaves_the_original_alone():
    cpu = root_cpu()
    original = new_vmcs(cpu)
    assert cpu.vmptrld(original).ok
    assert cpu.vmwrite(GUEST_RIP, 0x7C00).ok
    assert cpu.vmclear(original).ok
    region_before = cpu.memory.read(original, REGION_BYTES)
    copy = copy_region(cpu, original)
    assert cpu.vmptrld(copy).ok
    assert cpu.vmread(GUEST_RIP).value == 0x7C00
    assert cpu.vmwrite(GUEST_RIP, 0x1234).ok
    assert cpu.vmwrite(EXCEPTION_BITMAP, 1 << 6).ok
    assert cpu.vmclear(copy).ok
    assert cpu.memory.read(original, REGION_BYTES) == region_before
    assert cpu.vmptrld(original).ok
    assert cpu.vmread(GUEST_RIP).value == 0x7C00
    assert cpu.vmread(EXCEPTION_BITMAP).value == 0
    assert cpu.vmptrld(copy).ok
    assert cpu.vmread(GUEST_RIP).value == 0x1234
    assert cpu.vmread(EXCEPTION_BITMAP).value == 1 << 6


def test_vmclear_makes_the_vmcs_not_current_so_vmread_fails_invalid():
    cpu = root_cpu()
    vmcs = new_vmcs(cpu)
    assert cpu.vmptrld(vmcs).ok
    assert cpu.vmwrite(GUEST_RIP, 0x7C00).ok
    assert cpu.vmclear(vmcs).ok
    assert cpu.vmptrst().value == INVALID_POINTER
    out = cpu.vmread(GUEST_RIP)
    assert out.status is Status.VMFAIL_INVALID       # no current VMCS to hold an error
    assert out.rflags == {"CF": 1, "ZF": 0}
    assert cpu.vmptrld(vmcs).ok                      # VMPTRLD reads it back from memory
    assert cpu.vmread(GUEST_RIP).value == 0x7C00


# ------------------------------------- A. the launch state travels too (25.1, 25.11.3)
def test_copy_of_a_launched_vmcs_is_clear_after_vmclear():
    vm = VirtualMachine(HLT_PROGRAM, mode="real")
    cpu, original = vm.cpu, vm.vmcs_address
    first = cpu.vmlaunch(10_000)
    assert first.status is Status.VM_EXIT and cpu.vmread(VM_EXIT_REASON).value == HLT
    rip, rsp, cr0 = (cpu.vmread(f).value for f in (GUEST_RIP, GUEST_RSP, GUEST_CR0))
    vmfail_valid(cpu.vmlaunch(10_000), VMLAUNCH_WITH_NON_CLEAR_VMCS)   # launched
    assert cpu.vmclear(original).ok
    copy = copy_region(cpu, original)
    assert cpu.vmptrld(copy).ok
    # The guest state saved on the exit is in the copy (VMCLEAR completed the save).
    assert [cpu.vmread(f).value for f in (GUEST_RIP, GUEST_RSP, GUEST_CR0)] == [rip, rsp, cr0]
    vmfail_valid(cpu.vmresume(10_000), VMRESUME_WITH_NON_LAUNCHED_VMCS)  # clear
    out = cpu.vmlaunch(10_000)                       # the copy runs the same guest
    assert out.status is Status.VM_EXIT and cpu.vmread(VM_EXIT_REASON).value == HLT
    vmfail_valid(cpu.vmlaunch(10_000), VMLAUNCH_WITH_NON_CLEAR_VMCS)
    assert cpu.vmresume(10_000).status is Status.VM_EXIT
    # The original, VMCLEARed, is clear as well.
    assert cpu.vmptrld(original).ok
    vmfail_valid(cpu.vmresume(10_000), VMRESUME_WITH_NON_LAUNCHED_VMCS)
    assert vm.vmcs.launch_state.value == "clear"


def test_view_of_an_inactive_vmcs_shows_its_region():
    vm = VirtualMachine(HLT_PROGRAM, mode="real")
    cpu = vm.cpu
    assert cpu.vmlaunch(10_000).status is Status.VM_EXIT
    assert vm.vmcs.launch_state.value == "launched"
    rip = cpu.vmread(GUEST_RIP).value
    assert cpu.vmclear(vm.vmcs_address).ok
    assert vm.vmcs.launch_state.value == "clear"
    assert vm.vmcs.read(GUEST_RIP) == rip


# ------------------------------------------------ A. revision identifier (31.3 VMPTRLD)
def test_vmptrld_of_a_region_with_a_wrong_revision_identifier_is_error_11():
    cpu = root_cpu()
    good = new_vmcs(cpu)
    assert cpu.vmptrld(good).ok                      # a current VMCS: VMfailValid possible
    copy = copy_region(cpu, good)
    cpu.memory.write_u32(copy, (revision(cpu) + 1) & 0x7FFF_FFFF)
    vmfail_valid(cpu.vmptrld(copy), VMPTRLD_WITH_INCORRECT_REVISION_ID)
    assert cpu.vmptrst().value == good               # the failed VMPTRLD changed nothing
    assert cpu.vmread(VM_INSTRUCTION_ERROR).value == VMPTRLD_WITH_INCORRECT_REVISION_ID


def test_vmptrld_of_a_shadow_vmcs_without_vmcs_shadowing_is_error_11():
    cpu = root_cpu()
    assert not (cpu.rdmsr(IA32_VMX_PROCBASED_CTLS2) >> 32) & VMCS_SHADOWING
    good = new_vmcs(cpu)
    assert cpu.vmptrld(good).ok
    shadow = copy_region(cpu, good)
    cpu.memory.write_u32(shadow, revision(cpu) | 1 << 31)   # shadow-VMCS indicator
    vmfail_valid(cpu.vmptrld(shadow), VMPTRLD_WITH_INCORRECT_REVISION_ID)


def test_wrong_revision_written_into_the_current_vmcs_region_is_seen_by_the_next_vmptrld():
    # VMPTRLD reads the first 32 bits of the region every time (SDM 31.3 pseudo-code).
    cpu = root_cpu()
    a, b = new_vmcs(cpu), new_vmcs(cpu)
    assert cpu.vmptrld(a).ok and cpu.vmptrld(b).ok
    cpu.memory.write_u32(a, (revision(cpu) + 1) & 0x7FFF_FFFF)
    vmfail_valid(cpu.vmptrld(a), VMPTRLD_WITH_INCORRECT_REVISION_ID)


# --------------------------- A. vtlab's behaviour where the SDM leaves it open (25.11.1)
def test_vtlab_ignores_writes_to_the_region_of_an_active_vmcs():
    # SDM 25.11.1: software "should never access or modify the VMCS data of an active
    # VMCS using ordinary memory operations"; vtlab's processor keeps its copy and
    # VMCLEAR writes that copy over the region.
    cpu = root_cpu()
    vmcs = new_vmcs(cpu)
    assert cpu.vmptrld(vmcs).ok
    assert cpu.vmwrite(GUEST_RIP, 0x7C00).ok
    cpu.memory.write(vmcs + 8, b"\xff" * (REGION_BYTES - 8))   # scribble over the data
    assert cpu.vmread(GUEST_RIP).value == 0x7C00
    assert cpu.vmptrld(vmcs).ok                                 # still active: same data
    assert cpu.vmread(GUEST_RIP).value == 0x7C00
    assert cpu.vmclear(vmcs).ok
    assert cpu.vmptrld(vmcs).ok
    assert cpu.vmread(GUEST_RIP).value == 0x7C00
    assert cpu.vmread(EXCEPTION_BITMAP).value == 0


def test_vtlab_copy_without_vmclear_misses_the_writes_since_vmptrld():
    # Without VMCLEAR the data "may be currently maintained on the processor" (31.3,
    # VMCLEAR): vtlab's region still holds what the last VMCLEAR wrote.
    cpu = root_cpu()
    vmcs = new_vmcs(cpu)
    assert cpu.vmptrld(vmcs).ok
    assert cpu.vmwrite(GUEST_RIP, 0x7C00).ok
    stale = copy_region(cpu, vmcs)
    assert cpu.vmptrld(stale).ok
    assert cpu.vmread(GUEST_RIP).value == 0


# ------------------------------- B. vm.vmread / vm.vmwrite of a missing field (31.3)
def test_vm_vmread_of_a_field_the_capability_msrs_do_not_offer_is_error_12():
    vm = VirtualMachine(HLT_PROGRAM, mode="real")
    allowed1 = vm.cpu.rdmsr(IA32_VMX_PROCBASED_CTLS) >> 32
    assert not allowed1 & USE_TPR_SHADOW       # so the TPR threshold does not exist
    vmfail_valid(vm.cpu.vmread(TPR_THRESHOLD), UNSUPPORTED_VMCS_COMPONENT)
    with pytest.raises(VmcsError, match="unsupported VMCS component") as info:
        vm.vmread(TPR_THRESHOLD)
    assert info.value.error == UNSUPPORTED_VMCS_COMPONENT
    with pytest.raises(VmcsError, match="unsupported VMCS component") as info:
        vm.vmread(VmcsField.TPR_THRESHOLD)
    assert info.value.error == UNSUPPORTED_VMCS_COMPONENT


def test_vm_vmwrite_of_a_field_the_capability_msrs_do_not_offer_is_error_12():
    vm = VirtualMachine(HLT_PROGRAM, mode="real")
    vmfail_valid(vm.cpu.vmwrite(TPR_THRESHOLD, 0), UNSUPPORTED_VMCS_COMPONENT)
    with pytest.raises(VmcsError) as info:
        vm.vmwrite(TPR_THRESHOLD, 0)
    assert info.value.error == UNSUPPORTED_VMCS_COMPONENT
    with pytest.raises(VmcsError):
        vm.vmread(TPR_THRESHOLD)              # and the failed VMWRITE created nothing


def test_vm_vmread_checks_in_vmreads_order():
    vm = VirtualMachine(HLT_PROGRAM, mode="real")
    with pytest.raises(VmcsError) as info:    # an encoding of no field at all
        vm.vmread(0x0830)
    assert info.value.error == UNSUPPORTED_VMCS_COMPONENT
    with pytest.raises(VmcsError) as info:    # a read-only field
        vm.vmwrite(VM_EXIT_REASON, 1)
    assert info.value.error == VMWRITE_TO_READ_ONLY_COMPONENT
    assert vm.cpu.vmclear(vm.vmcs_address).ok
    # No current VMCS: VMfailInvalid comes before the field checks.
    for action in (lambda: vm.vmread(TPR_THRESHOLD), lambda: vm.vmwrite(TPR_THRESHOLD, 0)):
        with pytest.raises(VmxFailure) as failure:
            action()
        assert failure.value.outcome.status is Status.VMFAIL_INVALID


def test_vm_vmread_of_existing_fields_still_works():
    vm = VirtualMachine(HLT_PROGRAM, mode="real")
    vm.vmwrite(GUEST_RIP, 0x7C00)
    assert vm.vmread(GUEST_RIP) == 0x7C00
    vm.vmwrite(VmcsField.TSC_OFFSET_HIGH, 0x1122_3344)
    assert vm.vmread(TSC_OFFSET) == 0x1122_3344_0000_0000


# ------------------------------------------------- C. named high halves (Appendix B)
APPENDIX_B_HIGH = [   # (full name, full encoding, high encoding), Tables B-4, B-5, B-6, B-7
    ("IO_BITMAP_A", 0x2000, 0x2001),
    ("IO_BITMAP_B", 0x2002, 0x2003),
    ("MSR_BITMAP", 0x2004, 0x2005),
    ("VM_EXIT_MSR_LOAD_ADDR", 0x2008, 0x2009),
    ("TSC_OFFSET", 0x2010, 0x2011),
    ("EPT_POINTER", 0x201A, 0x201B),
    ("GUEST_PHYSICAL_ADDRESS", 0x2400, 0x2401),
    ("VMCS_LINK_POINTER", 0x2800, 0x2801),
    ("GUEST_IA32_DEBUGCTL", 0x2802, 0x2803),
    ("GUEST_IA32_PAT", 0x2804, 0x2805),
    ("GUEST_IA32_EFER", 0x2806, 0x2807),
    ("GUEST_PDPTR0", 0x280A, 0x280B),
    ("HOST_IA32_PAT", 0x2C00, 0x2C01),
    ("HOST_IA32_EFER", 0x2C02, 0x2C03),
]


@pytest.mark.parametrize("name,full,high", APPENDIX_B_HIGH)
def test_high_half_is_a_named_member(name, full, high):
    assert int(VmcsField[name]) == full
    member = VmcsField(high)
    assert member.name == name + "_HIGH"
    assert repr(member) == f"<VmcsField.{name}_HIGH: {high}>"
    assert getattr(VmcsField, name + "_HIGH") is member is VmcsField[name + "_HIGH"]
    assert member.full is VmcsField(full)
    assert member.is_high and not VmcsField(full).is_high
    assert decode_encoding(high).field is VmcsField(full)   # the field it reaches
    assert member.area is VmcsField(full).area
    assert "63:32" in member.description


def test_high_halves_are_not_fields_of_their_own():
    names = [f.name for f in VmcsField]
    assert not any(n.endswith("_HIGH") for n in names)
    assert len(names) == len(set(names)) == len(VmcsField)
    vm = VirtualMachine(HLT_PROGRAM, mode="real")
    table = vm.vmcs.to_dataframe()
    assert len(table) == len(VmcsField) and not table["field"].str.endswith("_HIGH").any()


def test_every_64_bit_field_has_its_high_member():
    for f in VmcsField:
        if (int(f) >> 13) & 3 == 1:                          # width 1: 64-bit (25.11.2)
            assert VmcsField(int(f) | 1).name == f.name + "_HIGH"
        else:                                                # "must be full" for the others
            with pytest.raises(ValueError):
                VmcsField(int(f) | 1)


def test_vmread_vmwrite_through_a_high_member_reach_bits_63_32():
    cpu = root_cpu()
    vmcs = new_vmcs(cpu)
    assert cpu.vmptrld(vmcs).ok
    assert cpu.vmwrite(TSC_OFFSET, 0x1122_3344_5566_7788).ok
    assert cpu.vmread(VmcsField.TSC_OFFSET_HIGH).value == 0x1122_3344
    assert cpu.vmwrite(VmcsField.TSC_OFFSET_HIGH, 0xAABB_CCDD).ok
    assert cpu.vmread(TSC_OFFSET).value == 0xAABB_CCDD_5566_7788
    assert cpu.vmread("TSC_OFFSET_HIGH").value == 0xAABB_CCDD
    out = cpu.vmread(0x2011)
    assert out.instruction == "VMREAD TSC_OFFSET_HIGH"

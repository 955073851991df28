"""The VMX instructions and the VM-entry checks (vtlab/cpu/vmx.py, vmcs.py, vmcs_view.py, entry/).

Every expected number is written out from the Intel SDM, Vol. 3C: outcomes and error
numbers from 31.2-31.4 ("Conventions", "VMX Instructions", "VM Instruction Error
Numbers", Table 31-1), field encodings from Appendix B, MSR addresses and control bits
from Appendix A and ch. 25, the entry checks from ch. 27.
"""
from __future__ import annotations

import pytest

from vtlab import Guest, Status, VirtualMachine, VmxCpu, VmxFailure, VmxOperation
from vtlab.arch import EntryControl, ExitControl, PinBased, ProcBased, ProcBased2

# ----------------------------------------------------------- SDM constants (literal)
# VMCS field encodings (SDM Appendix B)
PIN_BASED_VM_EXEC_CONTROL = 0x4000
CPU_BASED_VM_EXEC_CONTROL = 0x4002
SECONDARY_VM_EXEC_CONTROL = 0x401E
VM_INSTRUCTION_ERROR = 0x4400
VM_EXIT_REASON = 0x4402
EXIT_QUALIFICATION = 0x6400
GUEST_CR0 = 0x6800
GUEST_RIP = 0x681E
GUEST_RFLAGS = 0x6820
GUEST_CS_AR_BYTES = 0x4816
VMCS_LINK_POINTER = 0x2800
HOST_CR4 = 0x6C04
HOST_CS_SELECTOR = 0x0C02
# MSRs (SDM Vol. 4 / Appendix A)
IA32_FEATURE_CONTROL = 0x3A
IA32_VMX_BASIC = 0x480
IA32_VMX_PINBASED_CTLS = 0x481
IA32_VMX_PROCBASED_CTLS = 0x482
IA32_VMX_EXIT_CTLS = 0x483
IA32_VMX_ENTRY_CTLS = 0x484
IA32_VMX_CR0_FIXED0 = 0x486
IA32_VMX_CR4_FIXED0 = 0x488
IA32_VMX_PROCBASED_CTLS2 = 0x48B
IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
IA32_VMX_TRUE_EXIT_CTLS = 0x48F
IA32_VMX_TRUE_ENTRY_CTLS = 0x490
FEATURE_CONTROL_LOCK = 1 << 0
FEATURE_CONTROL_VMXON_OUTSIDE_SMX = 1 << 2
# Control and flag bits
CR0_PE, CR0_NE, CR0_PG = 1 << 0, 1 << 5, 1 << 31
CR4_VMXE = 1 << 13
HLT_EXITING = 1 << 7                 # primary processor-based, bit 7
USE_TPR_SHADOW = 1 << 21             # primary processor-based, bit 21
ACTIVATE_SECONDARY_CONTROLS = 1 << 31
ENABLE_EPT = 1 << 1                  # secondary processor-based, bit 1
UNRESTRICTED_GUEST = 1 << 7          # secondary processor-based, bit 7
# "Default1" class of each control field (SDM A.2)
PIN_DEFAULT1 = 0x0000_0016
PROC_DEFAULT1 = 0x0401_E172
EXIT_DEFAULT1 = 0x0003_6DFF
ENTRY_DEFAULT1 = 0x0000_11FF
# Exception vectors (SDM Vol. 3A Table 6-1)
UD, GP = 6, 13
# Exit reason 33 with bit 31 set: "VM-entry failure due to invalid guest state"
ENTRY_FAILURE_INVALID_STATE = 0x8000_0021


# ------------------------------------------------------------------------ helpers
def vmx_cpu(**kw) -> VmxCpu:
    return VmxCpu(Guest("real"), **kw)


def in_root(**kw) -> tuple[VmxCpu, int]:
    """A CPU in VMX root operation; returns it and its VMXON region."""
    cpu = vmx_cpu(**kw)
    cpu.write_cr4(cpu.cr4 | CR4_VMXE)
    region = cpu.alloc_region(cpu.rdmsr(IA32_VMX_BASIC) & 0x7FFF_FFFF)
    assert cpu.vmxon(region).status is Status.VMSUCCEED
    return cpu, region


def with_vmcs() -> tuple[VmxCpu, int]:
    """A CPU in VMX root operation with a current (clear) VMCS."""
    cpu, _ = in_root()
    vmcs = cpu.alloc_region(cpu.rdmsr(IA32_VMX_BASIC) & 0x7FFF_FFFF)
    assert cpu.vmclear(vmcs).ok
    assert cpu.vmptrld(vmcs).ok
    return cpu, vmcs


def error_number(cpu: VmxCpu) -> int:
    return cpu.vmread(VM_INSTRUCTION_ERROR).value


def assert_vmfail_valid(cpu: VmxCpu, outcome, number: int) -> None:
    assert outcome.status is Status.VMFAIL_VALID, outcome
    assert outcome.rflags == {"CF": 0, "ZF": 1}
    assert int(outcome.error) == number
    assert error_number(cpu) == number


def assert_vmfail_invalid(outcome) -> None:
    assert outcome.status is Status.VMFAIL_INVALID, outcome
    assert outcome.rflags == {"CF": 1, "ZF": 0}
    assert outcome.error is None


def assert_fault(outcome, vector: int) -> None:
    assert outcome.status is Status.FAULT, outcome
    assert outcome.vector == vector
    assert not outcome.ok


# ----------------------------------------------------------------- VMXON preconditions
def test_vmxon_with_cr4_vmxe_clear_is_ud():
    cpu = vmx_cpu()
    assert not cpu.cr4 & CR4_VMXE
    assert_fault(cpu.vmxon(cpu.alloc_region(cpu.caps.revision_id)), UD)
    assert cpu.operation is VmxOperation.OUTSIDE


def test_vmxon_with_feature_control_unlocked_is_gp():
    cpu = vmx_cpu(feature_control=0)
    cpu.write_cr4(cpu.cr4 | CR4_VMXE)
    assert_fault(cpu.vmxon(cpu.alloc_region(cpu.caps.revision_id)), GP)
    assert cpu.operation is VmxOperation.OUTSIDE


def test_vmxon_with_vmx_disabled_outside_smx_is_gp():
    cpu = vmx_cpu(feature_control=FEATURE_CONTROL_LOCK)
    cpu.write_cr4(cpu.cr4 | CR4_VMXE)
    assert_fault(cpu.vmxon(cpu.alloc_region(cpu.caps.revision_id)), GP)


def test_feature_control_cannot_change_once_locked():
    cpu = vmx_cpu()
    assert cpu.rdmsr(IA32_FEATURE_CONTROL) == FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMXON_OUTSIDE_SMX
    with pytest.raises(VmxFailure) as info:
        cpu.wrmsr(IA32_FEATURE_CONTROL, 0)
    assert info.value.outcome.vector == GP


def test_without_vmx_cr4_vmxe_cannot_be_set():
    """CPUID.1:ECX.VMX[bit 5] = 0: CR4.VMXE is reserved, MOV to CR4 faults (#GP)."""
    cpu = vmx_cpu(vmx_supported=False)
    assert cpu.cpuid(1)[2] & (1 << 5) == 0
    with pytest.raises(VmxFailure) as info:
        cpu.write_cr4(cpu.cr4 | CR4_VMXE)
    assert info.value.outcome.vector == GP
    assert not cpu.cr4 & CR4_VMXE
    assert vmx_cpu().cpuid(1)[2] & (1 << 5)


def test_vmxon_with_cr0_fixed_bit_clear_is_gp():
    """CR0 must satisfy IA32_VMX_CR0_FIXED0 (NE = 1) at VMXON (SDM 24.8)."""
    cpu = vmx_cpu()
    cpu.write_cr4(cpu.cr4 | CR4_VMXE)
    cpu.cr0 &= ~CR0_NE
    assert_fault(cpu.vmxon(cpu.alloc_region(cpu.caps.revision_id)), GP)


def test_vmxon_misaligned_region_is_vmfail_invalid():
    cpu = vmx_cpu()
    cpu.write_cr4(cpu.cr4 | CR4_VMXE)
    region = cpu.alloc_region(cpu.caps.revision_id)
    assert_vmfail_invalid(cpu.vmxon(region + 0x10))
    assert cpu.operation is VmxOperation.OUTSIDE


def test_vmxon_wrong_revision_is_vmfail_invalid():
    cpu = vmx_cpu()
    cpu.write_cr4(cpu.cr4 | CR4_VMXE)
    revision = cpu.rdmsr(IA32_VMX_BASIC) & 0x7FFF_FFFF
    assert_vmfail_invalid(cpu.vmxon(cpu.alloc_region(revision + 1)))
    assert_vmfail_invalid(cpu.vmxon(cpu.alloc_region()))  # forgot to write it at all
    assert cpu.operation is VmxOperation.OUTSIDE


def test_vmxon_succeeds():
    cpu, _ = in_root()
    assert cpu.operation is VmxOperation.ROOT
    assert cpu.history[-1].rflags == {"CF": 0, "ZF": 0}
    assert cpu.vmptrst().value == 0xFFFF_FFFF_FFFF_FFFF  # no current VMCS yet


def test_vmxon_in_root_operation_without_current_vmcs_is_vmfail_invalid():
    cpu, region = in_root()
    assert_vmfail_invalid(cpu.vmxon(region))


def test_vmxon_in_root_operation_with_current_vmcs_is_error_15():
    cpu, _ = with_vmcs()
    assert_vmfail_valid(cpu, cpu.vmxon(cpu.vmxon_pointer), 15)


# --------------------------------------------------- before VMXON: every instruction #UD
@pytest.mark.parametrize("instruction", [
    lambda c: c.vmxoff(), lambda c: c.vmclear(0x1000), lambda c: c.vmptrld(0x1000),
    lambda c: c.vmptrst(), lambda c: c.vmread(GUEST_RIP), lambda c: c.vmwrite(GUEST_RIP, 0),
    lambda c: c.vmlaunch(), lambda c: c.vmresume(), lambda c: c.vmcall(),
], ids=["VMXOFF", "VMCLEAR", "VMPTRLD", "VMPTRST", "VMREAD", "VMWRITE", "VMLAUNCH", "VMRESUME",
        "VMCALL"])
def test_vmx_instructions_outside_vmx_operation_are_ud(instruction):
    cpu = vmx_cpu()
    cpu.write_cr4(cpu.cr4 | CR4_VMXE)
    assert_fault(instruction(cpu), UD)


@pytest.mark.parametrize("instruction", [
    lambda c: c.vmread(GUEST_RIP), lambda c: c.vmptrst(), lambda c: c.vmlaunch(),
    lambda c: c.vmcall(), lambda c: c.vmxoff(),
], ids=["VMREAD", "VMPTRST", "VMLAUNCH", "VMCALL", "VMXOFF"])
def test_vmx_instructions_after_vmxoff_are_ud(instruction):
    cpu, _ = with_vmcs()
    out = cpu.vmxoff()
    assert out.status is Status.VMSUCCEED
    assert cpu.operation is VmxOperation.OUTSIDE
    assert_fault(instruction(cpu), UD)


def test_vmx_instructions_at_cpl3_are_gp():
    cpu, vmcs = with_vmcs()
    cpu.cpl = 3
    assert_fault(cpu.vmread(GUEST_RIP), GP)
    assert_fault(cpu.vmclear(vmcs), GP)
    assert_fault(cpu.vmxoff(), GP)


def test_vmxoff_succeeds_and_vmxon_works_again():
    cpu, region = in_root()
    assert cpu.vmxoff().rflags == {"CF": 0, "ZF": 0}
    assert cpu.vmxon(region).status is Status.VMSUCCEED


# ------------------------------------------------------------------------ VMCLEAR
def test_vmclear_of_the_vmxon_region_is_error_3():
    cpu, _ = with_vmcs()
    assert_vmfail_valid(cpu, cpu.vmclear(cpu.vmxon_pointer), 3)


def test_vmclear_misaligned_is_error_2():
    cpu, vmcs = with_vmcs()
    assert_vmfail_valid(cpu, cpu.vmclear(vmcs + 8), 2)


def test_vmclear_beyond_physical_address_width_is_error_2():
    cpu, _ = with_vmcs()
    assert_vmfail_valid(cpu, cpu.vmclear(1 << 52), 2)


def test_vmclear_without_current_vmcs_fails_invalid():
    """The error number has nowhere to go: VMfailInvalid (SDM 31.2)."""
    cpu, region = in_root()
    assert_vmfail_invalid(cpu.vmclear(region))


def test_vmclear_of_the_current_vmcs_invalidates_the_pointer():
    cpu, vmcs = with_vmcs()
    assert cpu.vmptrst().value == vmcs
    assert cpu.vmclear(vmcs).status is Status.VMSUCCEED
    assert cpu.vmptrst().value == 0xFFFF_FFFF_FFFF_FFFF
    assert_vmfail_invalid(cpu.vmread(GUEST_RIP))


# ------------------------------------------------------------------------ VMPTRLD
def test_vmptrld_misaligned_is_error_9():
    cpu, vmcs = with_vmcs()
    assert_vmfail_valid(cpu, cpu.vmptrld(vmcs + 4), 9)


def test_vmptrld_of_the_vmxon_pointer_is_error_10():
    cpu, _ = with_vmcs()
    assert_vmfail_valid(cpu, cpu.vmptrld(cpu.vmxon_pointer), 10)


def test_vmptrld_wrong_revision_is_error_11():
    cpu, _ = with_vmcs()
    other = cpu.alloc_region(0x1234)
    assert_vmfail_valid(cpu, cpu.vmptrld(other), 11)


def test_vmptrld_failures_without_current_vmcs_are_vmfail_invalid():
    cpu, region = in_root()
    assert_vmfail_invalid(cpu.vmptrld(region))             # would be 10
    assert_vmfail_invalid(cpu.vmptrld(region + 0x800))     # would be 9


def test_vmptrst_stores_the_current_vmcs_pointer():
    cpu, vmcs = with_vmcs()
    out = cpu.vmptrst()
    assert out.status is Status.VMSUCCEED
    assert out.value == vmcs
    second = cpu.alloc_region(cpu.caps.revision_id)
    cpu.vmptrld(second)
    assert cpu.vmptrst().value == second


# --------------------------------------------------------------- VMREAD / VMWRITE
def test_vmread_vmwrite_without_current_vmcs_are_vmfail_invalid():
    cpu, _ = in_root()
    assert_vmfail_invalid(cpu.vmread(GUEST_RIP))
    assert_vmfail_invalid(cpu.vmwrite(GUEST_RIP, 0x1000))


def test_vmwrite_then_vmread():
    cpu, _ = with_vmcs()
    assert cpu.vmwrite(GUEST_RIP, 0x7C00).status is Status.VMSUCCEED
    out = cpu.vmread(GUEST_RIP)
    assert out.status is Status.VMSUCCEED and out.value == 0x7C00
    assert out.rflags == {"CF": 0, "ZF": 0}


@pytest.mark.parametrize("encoding", [0x1234, 0x6FFE])
def test_unsupported_component_is_error_12(encoding):
    """0x1234 sets reserved bit 12; 0x6FFE is well formed but names no field."""
    cpu, _ = with_vmcs()
    assert_vmfail_valid(cpu, cpu.vmread(encoding), 12)
    assert_vmfail_valid(cpu, cpu.vmwrite(encoding, 0), 12)


def test_vmwrite_to_exit_reason_is_error_13():
    cpu, _ = with_vmcs()
    assert_vmfail_valid(cpu, cpu.vmwrite(VM_EXIT_REASON, 12), 13)
    assert cpu.vmread(VM_EXIT_REASON).value == 0


def test_vmwrite_truncates_to_the_field_width():
    """VMWRITE ignores source bits beyond the field's width (SDM 31.3, VMWRITE)."""
    cpu, _ = with_vmcs()
    assert cpu.vmwrite(HOST_CS_SELECTOR, 0x1_0010).ok  # a 16-bit field
    assert cpu.vmread(HOST_CS_SELECTOR).value == 0x0010


# ----------------------------------------------------------------------- VMCALL
def test_vmcall_in_root_operation_is_error_1():
    cpu, _ = with_vmcs()
    assert_vmfail_valid(cpu, cpu.vmcall(), 1)


def test_vmcall_in_root_operation_without_vmcs_is_vmfail_invalid():
    cpu, _ = in_root()
    assert_vmfail_invalid(cpu.vmcall())


# -------------------------------------------------------------- VMLAUNCH / VMRESUME
def fresh_vm(program: str = "hlt", mode: str = "real") -> VirtualMachine:
    return VirtualMachine(program, mode=mode)


def test_vmlaunch_runs_the_guest_to_its_first_exit():
    vm = fresh_vm("nop\nhlt")
    out = vm.cpu.vmlaunch()
    assert out.status is Status.VM_EXIT
    assert out.rflags == {"CF": 0, "ZF": 0}
    assert vm.cpu.vmread(VM_EXIT_REASON).value == 12  # HLT
    assert vm.cpu.vmread(GUEST_RIP).value == 0x1001
    assert vm.cpu.operation is VmxOperation.ROOT      # back in the VMM after the exit


def test_vmlaunch_of_a_launched_vmcs_is_error_4():
    vm = fresh_vm()
    assert vm.cpu.vmlaunch().status is Status.VM_EXIT
    assert_vmfail_valid(vm.cpu, vm.cpu.vmlaunch(), 4)


def test_vmresume_of_a_clear_vmcs_is_error_5():
    vm = fresh_vm()
    assert_vmfail_valid(vm.cpu, vm.cpu.vmresume(), 5)


def test_vmresume_after_vmlaunch():
    vm = fresh_vm("hlt\nhlt")
    vm.cpu.vmlaunch()
    vm.cpu.vmwrite(GUEST_RIP, 0x1001)
    out = vm.cpu.vmresume()
    assert out.status is Status.VM_EXIT
    assert out.exit.guest_rip == 0x1001


def test_vmclear_then_vmlaunch_again():
    vm = fresh_vm("hlt")
    cpu = vm.cpu
    assert cpu.vmlaunch().status is Status.VM_EXIT
    assert cpu.vmclear(vm.vmcs_address).ok
    assert cpu.vmptrld(vm.vmcs_address).ok
    out = cpu.vmlaunch()
    assert out.status is Status.VM_EXIT, out
    assert cpu.vmread(VM_EXIT_REASON).value == 12


def test_vmlaunch_without_current_vmcs_is_vmfail_invalid():
    cpu, _ = in_root()
    assert_vmfail_invalid(cpu.vmlaunch())
    assert_vmfail_invalid(cpu.vmresume())


# ----------------------------------------------------- VM-entry checks: controls (7)
def test_reserved_control_bit_is_error_7():
    """Bit 0 of the primary processor-based controls is a default0 reserved bit."""
    vm = fresh_vm()
    vm.vmwrite(CPU_BASED_VM_EXEC_CONTROL, vm.vmcs.get(CPU_BASED_VM_EXEC_CONTROL) | 1)
    out = vm.cpu.vmlaunch()
    assert_vmfail_valid(vm.cpu, out, 7)
    assert out.violations and out.violations[0].group == "controls"


def test_control_the_capability_msrs_forbid_is_error_7():
    vm = fresh_vm()
    allowed1 = vm.cpu.rdmsr(IA32_VMX_TRUE_PROCBASED_CTLS) >> 32
    assert not allowed1 & USE_TPR_SHADOW   # vtlab's CPU does not offer it
    vm.vmwrite(CPU_BASED_VM_EXEC_CONTROL, vm.vmcs.get(CPU_BASED_VM_EXEC_CONTROL) | USE_TPR_SHADOW)
    assert_vmfail_valid(vm.cpu, vm.cpu.vmlaunch(), 7)


def test_clearing_a_default1_control_is_error_7():
    vm = fresh_vm()
    allowed0 = vm.cpu.rdmsr(IA32_VMX_TRUE_PINBASED_CTLS) & 0xFFFF_FFFF
    assert allowed0 & (1 << 1)                  # pin-based bit 1 is default1
    vm.vmwrite(PIN_BASED_VM_EXEC_CONTROL, vm.vmcs.get(PIN_BASED_VM_EXEC_CONTROL) & ~(1 << 1))
    assert_vmfail_valid(vm.cpu, vm.cpu.vmlaunch(), 7)


def test_unrestricted_guest_without_ept_is_error_7():
    vm = fresh_vm()
    proc2 = vm.vmcs.get(SECONDARY_VM_EXEC_CONTROL)
    assert proc2 & UNRESTRICTED_GUEST and proc2 & ENABLE_EPT
    vm.vmwrite(SECONDARY_VM_EXEC_CONTROL, proc2 & ~ENABLE_EPT)
    assert_vmfail_valid(vm.cpu, vm.cpu.vmlaunch(), 7)


# --------------------------------------------------- VM-entry checks: host state (8)
def test_host_cr4_without_vmxe_is_error_8():
    vm = fresh_vm()
    vm.vmwrite(HOST_CR4, vm.vmcs.get(HOST_CR4) & ~CR4_VMXE)
    out = vm.cpu.vmlaunch()
    assert_vmfail_valid(vm.cpu, out, 8)
    assert out.violations[0].group == "host-state"


def test_host_cs_selector_zero_is_error_8():
    vm = fresh_vm()
    vm.vmwrite(HOST_CS_SELECTOR, 0)
    assert_vmfail_valid(vm.cpu, vm.cpu.vmlaunch(), 8)


def test_controls_are_checked_before_host_state():
    vm = fresh_vm()
    vm.vmwrite(HOST_CS_SELECTOR, 0)
    vm.vmwrite(CPU_BASED_VM_EXEC_CONTROL, vm.vmcs.get(CPU_BASED_VM_EXEC_CONTROL) | 1)
    assert_vmfail_valid(vm.cpu, vm.cpu.vmlaunch(), 7)


# ---------------------------------------- VM-entry checks: guest state (exit reason 33)
def assert_entry_failure(vm: VirtualMachine, qualification: int = 0):
    out = vm.cpu.vmlaunch()
    assert out.status is Status.ENTRY_FAILED, out
    assert vm.cpu.vmread(VM_EXIT_REASON).value == ENTRY_FAILURE_INVALID_STATE
    assert vm.cpu.vmread(EXIT_QUALIFICATION).value == qualification
    assert vm.cpu.operation is VmxOperation.ROOT
    # The VMCS stays clear: the failed VMLAUNCH did not launch it.
    assert vm.vmcs.launch_state.value == "clear"
    return out


def test_guest_rflags_bit_1_clear_fails_entry():
    vm = fresh_vm()
    vm.vmwrite(GUEST_RFLAGS, 0)
    assert_entry_failure(vm)


def test_guest_cr0_pg_without_pe_fails_entry():
    vm = fresh_vm()  # an unrestricted real-mode guest: PE = 0 is allowed, PG = 1 is not
    vm.vmwrite(GUEST_CR0, (vm.vmcs.get(GUEST_CR0) & ~CR0_PE) | CR0_PG)
    assert_entry_failure(vm)


def test_vmcs_link_pointer_not_all_ones_fails_with_qualification_4():
    vm = fresh_vm()
    vm.vmwrite(VMCS_LINK_POINTER, 0)
    assert_entry_failure(vm, qualification=4)


@pytest.mark.parametrize("access_rights", [
    0x9A,   # type 10: code, not accessed
    0x91,   # type 1: a data segment in CS
    0x8B,   # S = 0: a system descriptor
    0x1B,   # P = 0: not present
])
def test_bad_cs_access_rights_fail_entry(access_rights):
    vm = fresh_vm()
    vm.vmwrite(GUEST_CS_AR_BYTES, access_rights)
    assert_entry_failure(vm)


def test_cr0_pe_clear_without_unrestricted_guest_fails_entry():
    """IA32_VMX_CR0_FIXED0 has PE and PG set: only an unrestricted guest may clear them."""
    vm = fresh_vm()
    fixed0 = vm.cpu.rdmsr(IA32_VMX_CR0_FIXED0)
    assert fixed0 & (CR0_PE | CR0_NE | CR0_PG) == CR0_PE | CR0_NE | CR0_PG
    assert not vm.vmcs.get(GUEST_CR0) & CR0_PE           # a real-mode guest
    vm.vmwrite(SECONDARY_VM_EXEC_CONTROL, vm.vmcs.get(SECONDARY_VM_EXEC_CONTROL) & ~UNRESTRICTED_GUEST)
    assert_entry_failure(vm)


def test_cr0_ne_clear_fails_entry_even_for_unrestricted_guests():
    vm = fresh_vm()
    vm.vmwrite(GUEST_CR0, vm.vmcs.get(GUEST_CR0) & ~CR0_NE)
    assert_entry_failure(vm)


def test_guest_state_failure_then_fix_and_launch():
    vm = fresh_vm("hlt")
    vm.vmwrite(GUEST_RFLAGS, 0)
    assert_entry_failure(vm)
    vm.vmwrite(GUEST_RFLAGS, 0x2)
    out = vm.cpu.vmlaunch()
    assert out.status is Status.VM_EXIT
    assert vm.cpu.vmread(VM_EXIT_REASON).value == 12


def test_long_mode_guest_enters():
    vm = fresh_vm("hlt", mode="long")
    out = vm.cpu.vmlaunch()
    assert out.status is Status.VM_EXIT, out
    assert vm.cpu.vmread(VM_EXIT_REASON).value == 12


# ----------------------------------------------------------------- capability MSRs
def test_vmx_basic():
    cpu = vmx_cpu()
    basic = cpu.rdmsr(IA32_VMX_BASIC)
    assert basic & (1 << 31) == 0                 # bit 31 is always 0
    assert 0 < (basic >> 32) & 0x1FFF <= 4096     # VMCS region size, bits 44:32
    assert (basic >> 50) & 0xF == 6               # memory type write-back
    assert basic & (1 << 55)                      # TRUE capability MSRs exist
    assert basic & 0x7FFF_FFFF == cpu.caps.revision_id


@pytest.mark.parametrize("msr, default1", [
    (IA32_VMX_PINBASED_CTLS, PIN_DEFAULT1),
    (IA32_VMX_PROCBASED_CTLS, PROC_DEFAULT1),
    (IA32_VMX_EXIT_CTLS, EXIT_DEFAULT1),
    (IA32_VMX_ENTRY_CTLS, ENTRY_DEFAULT1),
])
def test_control_msrs_report_the_default1_bits(msr, default1):
    """The non-TRUE MSRs report every default1 control as "must be 1" (SDM A.2, A.3)."""
    value = vmx_cpu().rdmsr(msr)
    allowed0, allowed1 = value & 0xFFFF_FFFF, value >> 32
    assert allowed0 == default1
    assert allowed0 & ~allowed1 == 0   # a bit that must be 1 may be 1


@pytest.mark.parametrize("msr, true_msr, default1", [
    (IA32_VMX_PINBASED_CTLS, IA32_VMX_TRUE_PINBASED_CTLS, PIN_DEFAULT1),
    (IA32_VMX_PROCBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS, PROC_DEFAULT1),
    (IA32_VMX_EXIT_CTLS, IA32_VMX_TRUE_EXIT_CTLS, EXIT_DEFAULT1),
    (IA32_VMX_ENTRY_CTLS, IA32_VMX_TRUE_ENTRY_CTLS, ENTRY_DEFAULT1),
])
def test_true_msrs_may_only_relax_default1_bits(msr, true_msr, default1):
    """TRUE MSRs: allowed-0 is a subset of the default1 bits; allowed-1 is the same (A.3)."""
    cpu = vmx_cpu()
    value, true = cpu.rdmsr(msr), cpu.rdmsr(true_msr)
    assert true & 0xFFFF_FFFF & ~default1 == 0
    assert true >> 32 == value >> 32


def test_cr_fixed_msrs():
    cpu = vmx_cpu()
    assert cpu.rdmsr(IA32_VMX_CR0_FIXED0) & (CR0_PE | CR0_NE | CR0_PG) == CR0_PE | CR0_NE | CR0_PG
    assert cpu.rdmsr(IA32_VMX_CR4_FIXED0) & CR4_VMXE


def test_secondary_controls_offer_ept_and_unrestricted_guest():
    allowed1 = vmx_cpu().rdmsr(IA32_VMX_PROCBASED_CTLS2) >> 32
    assert allowed1 & ENABLE_EPT and allowed1 & UNRESTRICTED_GUEST
    assert allowed1 & (1 << 2)   # descriptor-table exiting


def test_capability_msrs_are_read_only_and_absent_without_vmx():
    cpu = vmx_cpu()
    with pytest.raises(VmxFailure):
        cpu.wrmsr(IA32_VMX_BASIC, 0)
    with pytest.raises(VmxFailure) as info:
        vmx_cpu(vmx_supported=False).rdmsr(IA32_VMX_BASIC)
    assert info.value.outcome.vector == GP


def test_adjust_forces_the_fixed_bits():
    caps = vmx_cpu().caps
    true_proc = vmx_cpu().rdmsr(IA32_VMX_TRUE_PROCBASED_CTLS)
    allowed0, allowed1 = true_proc & 0xFFFF_FFFF, true_proc >> 32
    assert int(caps.adjust(ProcBased, 0)) == allowed0
    wanted = HLT_EXITING | 1 | USE_TPR_SHADOW  # bit 0 reserved, TPR shadow absent
    adjusted = int(caps.adjust(ProcBased, wanted))
    assert adjusted == (wanted | allowed0) & allowed1
    assert adjusted & HLT_EXITING and not adjusted & 1 and not adjusted & USE_TPR_SHADOW
    # the adjusted value passes the control checks
    vm = fresh_vm()
    vm.vmwrite(CPU_BASED_VM_EXEC_CONTROL, adjusted | ACTIVATE_SECONDARY_CONTROLS)
    assert vm.cpu.vmlaunch().status is Status.VM_EXIT


def test_adjust_for_every_control_class_passes_entry():
    caps = vmx_cpu().caps
    vm = fresh_vm()
    for cls, field in ((PinBased, PIN_BASED_VM_EXEC_CONTROL), (ExitControl, 0x400C),
                       (EntryControl, 0x4012)):
        vm.vmwrite(field, int(caps.adjust(cls, vm.vmcs.get(field))))
    assert vm.cpu.vmlaunch().status is Status.VM_EXIT
    assert int(caps.adjust(ProcBased2, 0)) == 0   # no secondary control is default1

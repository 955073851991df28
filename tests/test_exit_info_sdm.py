"""Exit information, priorities and existence, against the SDM (vtlab/cpu/exit_rules.py,
operands.py, decoder.py, events.py, capabilities.py, vmx.py).

Every expected number is written out literally from the Intel SDM, 325462-084US: Vol. 3C
26.1 (instructions that cause VM exits, 26.1.1 priorities), 26.4.2 (task switches), 28.2.1
(exit qualifications, Tables 28-2 .. 28-5), 28.2.5 (the VM-exit instruction-information
tables, cited by title), 31.3 (VMX instruction pseudo-code) and Appendices A/B.  Nothing
is derived from vtlab's own tables.  Guests are real x86 code; each test stops at the
exit with ``vm.next_exit()`` and reads the fields with ``vm.vmread()`` as a VMM would.

Instruction encodings (SDM Vol. 2) are asserted where a register number is taken from the
ModRM byte, so that the expected Reg1/Reg2 follow from the bytes, not from the assembler.
"""
from __future__ import annotations

import struct

import pytest

from vtlab import Layout, Status, VirtualMachine, VmcsField as F, VmxCapabilities, VmxCpu, VmxFailure
from vtlab.arch import ProcBased, ProcBased2
from vtlab.cpu.capabilities import AllowedSettings
from vtlab.cpu.segments import pack_descriptor

# Basic exit reasons (Appendix C)
EXCEPTION_NMI, TASK_SWITCH, CPUID, GETSEC, HLT = 0, 9, 10, 11, 12
VMCLEAR, VMPTRLD, VMPTRST, VMREAD, VMWRITE, VMXON = 19, 21, 22, 23, 25, 27
CR_ACCESS, DR_ACCESS, IO_INSTRUCTION, MWAIT, MONITOR = 28, 29, 30, 36, 39
GDTR_IDTR, LDTR_TR, INVEPT, INVVPID, RDRAND, RDSEED = 46, 47, 50, 53, 57, 61

# Interruption information (SDM 25.8.3 / 28.2.2): bit 31 valid, bit 11 error code
# valid, bits 10:8 type (3 hardware exception, 5 privileged software exception), 7:0 vector
INFO_UD = 0x8000_0306
INFO_GP = 0x8000_0B0D
INFO_INT1 = 0x8000_0501     # vector 1, type 5: INT1 (ICEBP)

# Capability MSRs (Appendix A)
IA32_VMX_BASIC, IA32_VMX_PROCBASED_CTLS, IA32_VMX_CR4_FIXED1 = 0x480, 0x482, 0x489
IA32_VMX_PROCBASED_CTLS2, IA32_VMX_EPT_VPID_CAP = 0x48B, 0x48C
IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS = 0x48D, 0x48E
IA32_VMX_TRUE_EXIT_CTLS, IA32_VMX_TRUE_ENTRY_CTLS, IA32_VMX_VMFUNC = 0x48F, 0x490, 0x491

from user_mode import TO_USER_64  # noqa: E402


def stop_at_exit(program: str, mode: str, setup=None, append_hlt: bool = True):
    vm = VirtualMachine(program + ("\nhlt" if append_hlt else ""), mode=mode)
    if setup is not None:
        setup(vm)
    e = vm.next_exit()
    assert e is not None, vm.message
    return vm, e


def read(vm, field) -> int:
    return vm.vmread(field)


def control(*flags):
    def setup(vm):
        for f in flags:
            vm.set_control(f)
    return setup


def exception_bitmap(*vectors):
    def setup(vm):
        vm.vmwrite(F.EXCEPTION_BITMAP, sum(1 << v for v in vectors))
    return setup


def both(*setups):
    def setup(vm):
        for s in setups:
            s(vm)
    return setup


def insn_bytes(vm, n: int, at: int = 0x1000) -> bytes:
    return bytes(vm.guest.read(at, n))


# ============================================= 28.2.5: VM-exit instruction information
def test_ia32_vmx_basic_54_promises_ins_outs_information():
    """IA32_VMX_BASIC[54] = 1: the processor reports information in the VM-exit
    instruction-information field on VM exits due to INS and OUTS (SDM A.1)."""
    assert VmxCpu().rdmsr(IA32_VMX_BASIC) >> 54 & 1 == 1


@pytest.mark.parametrize("mode, code, info", [
    # "... as Used for INS and OUTS": bits 9:7 address size (0 16, 1 32, 2 64-bit),
    # bits 17:15 segment (OUTS; 0 ES 1 CS 2 SS 3 DS 4 FS 5 GS), the rest undefined (0).
    ("long", "mov dx, 0x3f8\nmov rsi, 0x2000\nrep outsb", (2 << 7) | (3 << 15)),      # 64-bit, DS
    ("protected", "mov dx, 0x3f8\nmov esi, 0x2000\ndb 0x64, 0x6e", (1 << 7) | (4 << 15)),  # FS outsb
    ("real", "mov dx, 0x3f8\nmov si, 0x2000\ndb 0x2e, 0x6f", (0 << 7) | (1 << 15)),      # CS outsw
    ("real", "mov dx, 0x60\nmov di, 0x2000\nrep insb", 0 << 7),                        # INS: 17:15 undefined
    ("real", "mov dx, 0x60\nmov edi, 0x2000\ndb 0x67, 0x6c", 1 << 7),                   # 67H: 32-bit address
])
def test_ins_outs_instruction_information(mode, code, info):
    vm, _ = stop_at_exit(code, mode)
    assert read(vm, F.VM_EXIT_REASON) == IO_INSTRUCTION
    assert read(vm, F.VMX_INSTRUCTION_INFO) == info


@pytest.mark.parametrize("mode, code, linear", [
    # SDM 28.2.1 guest-linear address of INS/OUTS: segment base + offset, the offset at the
    # instruction's address size.  Real mode: base = selector * 16.
    ("real", "mov ax, 0x200\nmov es, ax\nmov dx, 0x60\nmov di, 0x10\ninsb", 0x2010),    # ES:DI
    ("real", "mov ax, 0x100\nmov ds, ax\nmov dx, 0x3f8\nmov esi, 0x12345\noutsb", 0x1000 + 0x2345),
    ("real", "mov ax, 0x100\nmov ds, ax\nmov dx, 0x3f8\nmov esi, 0x12345\ndb 0x67, 0x6e", 0x1000 + 0x12345),
    ("long", "mov dx, 0x3f8\nmov rsi, 0x123456789\nouts dx, byte ptr [rsi]", 0x1_2345_6789),
])
def test_string_io_guest_linear_address(mode, code, linear):
    vm, _ = stop_at_exit(code, mode)
    assert read(vm, F.VM_EXIT_REASON) == IO_INSTRUCTION
    assert read(vm, F.GUEST_LINEAR_ADDRESS) == linear


# "... as Used for VMCLEAR, VMPTRLD, VMPTRST, VMXON, XRSTORS, and XSAVES": bits 1:0 scaling,
# 9:7 address size, 10 cleared to 0, 17:15 segment, 21:18 index, 22 index invalid, 26:23
# base, 27 base invalid, 31:28 undefined.  "... for INVEPT, INVPCID, and INVVPID": the same
# with bits 31:28 Reg2.  Register numbers: 0 RAX 1 RCX 2 RDX 3 RBX 4 RSP 5 RBP 6 RSI 7 RDI,
# 8-15 R8-R15.
@pytest.mark.parametrize("mode, code, reason, info", [
    # [RBX + RCX*4 + 10H]: scale 4 (2), 64-bit (2 << 7), DS (3 << 15), index RCX, base RBX
    ("long", "vmclear [rbx+rcx*4+0x10]", VMCLEAR, 2 | 2 << 7 | 3 << 15 | 1 << 18 | 3 << 23),
    # RIP-relative: no index (bit 22) and no base (bit 27)
    ("long", "vmptrld [0x500]", VMPTRLD, 2 << 7 | 3 << 15 | 1 << 22 | 1 << 27),
    # [RSP]: default segment SS (2)
    ("long", "vmptrst [rsp]", VMPTRST, 2 << 7 | 2 << 15 | 1 << 22 | 4 << 23),
    ("long", "vmxon [rsi]", VMXON, 2 << 7 | 3 << 15 | 1 << 22 | 6 << 23),
    # 32-bit protected mode: address size 1
    ("protected", "vmptrld [ebx]", VMPTRLD, 1 << 7 | 3 << 15 | 1 << 22 | 3 << 23),
    # INVEPT RAX, [RBX]: Reg2 = RAX (0)
    ("long", "invept rax, [rbx]", INVEPT, 2 << 7 | 3 << 15 | 1 << 22 | 3 << 23 | 0 << 28),
    # INVVPID R9, [R10 + R11*8]: scale 8 (3), index R11, base R10, Reg2 R9
    ("long", "invvpid r9, [r10+r11*8]", INVVPID, 3 | 2 << 7 | 3 << 15 | 11 << 18 | 10 << 23 | 9 << 28),
])
def test_vmx_memory_instruction_information(mode, code, reason, info):
    vm, _ = stop_at_exit(code, mode)
    assert read(vm, F.VM_EXIT_REASON) == reason
    assert read(vm, F.VMX_INSTRUCTION_INFO) == info
    assert not info & 1 << 10   # bit 10: cleared to 0 (always a memory operand)


# "... as Used for VMREAD and VMWRITE": bits 6:3 Reg1 (register operand, undefined for
# memory), bit 10 Mem/Reg (0 memory, 1 register), 31:28 Reg2; the memory fields as above.
# VMREAD is 0F 78 /r, VMREAD r/m, r (the field encoding in the reg field = Reg2, the
# destination in r/m = Reg1); VMWRITE is 0F 79 /r, VMWRITE r, r/m (reg = field encoding
# = Reg2, source r/m = Reg1) (SDM Vol. 3C 31.3).
@pytest.mark.parametrize("mode, code, encoding, reason, info", [
    # ModRM D8 = 11 011 000: reg RBX (3) = Reg2, r/m RAX (0) = Reg1
    ("long", "vmread rax, rbx", "0f78d8", VMREAD, 0 << 3 | 1 << 10 | 3 << 28),
    # ModRM C3 = 11 000 011: reg RAX (0) = Reg2, r/m RBX (3) = Reg1
    ("long", "vmwrite rax, rbx", "0f79c3", VMWRITE, 3 << 3 | 1 << 10 | 0 << 28),
    # REX.RB 45: ModRM CA = 11 001 010: reg R9 = Reg2, r/m R10 = Reg1
    ("long", "vmread r10, r9", "450f78ca", VMREAD, 10 << 3 | 1 << 10 | 9 << 28),
    # memory: [RAX], reg RBX = Reg2, bit 10 = 0
    ("long", "vmread [rax], rbx", "0f7818", VMREAD, 2 << 7 | 3 << 15 | 1 << 22 | 0 << 23 | 3 << 28),
    ("long", "vmwrite rcx, [rdx+8]", "0f794a08", VMWRITE, 2 << 7 | 3 << 15 | 1 << 22 | 2 << 23 | 1 << 28),
    ("protected", "vmread eax, ebx", "0f78d8", VMREAD, 0 << 3 | 1 << 10 | 3 << 28),
])
def test_vmread_vmwrite_instruction_information(mode, code, encoding, reason, info):
    vm, _ = stop_at_exit(code, mode)
    assert insn_bytes(vm, len(encoding) // 2).hex() == encoding
    assert read(vm, F.VM_EXIT_REASON) == reason
    assert read(vm, F.VMX_INSTRUCTION_INFO) == info


@pytest.mark.parametrize("mode, code, reason, info", [
    # "... as Used for LIDT, LGDT, SIDT, or SGDT": bit 11 operand size (0 16-bit, 1 32-bit;
    # undefined in 64-bit mode), 29:28 identity (0 SGDT 1 SIDT 2 LGDT 3 LIDT)
    ("protected", "lgdt [eax]", GDTR_IDTR, 1 << 7 | 1 << 11 | 3 << 15 | 1 << 22 | 0 << 23 | 2 << 28),
    ("protected", "db 0x66\nsidt [ecx+edx*2]", GDTR_IDTR, 1 | 1 << 7 | 0 << 11 | 3 << 15 | 2 << 18 | 1 << 23 | 1 << 28),
    # "... as Used for LLDT, LTR, SLDT, and STR": 29:28 identity (0 SLDT 1 STR 2 LLDT 3 LTR)
    ("protected", "ltr [ebx+esi*2]", LDTR_TR, 1 | 1 << 7 | 3 << 15 | 6 << 18 | 3 << 23 | 3 << 28),
    ("protected", "sldt di", LDTR_TR, 7 << 3 | 1 << 10 | 0 << 28),
])
def test_descriptor_table_instruction_information(mode, code, reason, info):
    vm, _ = stop_at_exit(code, mode, control(ProcBased2.DESC))
    assert read(vm, F.VM_EXIT_REASON) == reason
    assert read(vm, F.VMX_INSTRUCTION_INFO) == info


@pytest.mark.parametrize("code, control_flag, reason, info", [
    # "... as Used for RDRAND, RDSEED, TPAUSE, and UMWAIT": bits 6:3 destination register,
    # bits 12:11 operand size (0 16-bit, 1 32-bit, 2 64-bit)
    ("rdrand eax", ProcBased2.RDRAND_EXITING, RDRAND, 0 << 3 | 1 << 11),
    ("rdrand rcx", ProcBased2.RDRAND_EXITING, RDRAND, 1 << 3 | 2 << 11),
    ("rdseed r9w", ProcBased2.RDSEED_EXITING, RDSEED, 9 << 3 | 0 << 11),
    ("rdseed edi", ProcBased2.RDSEED_EXITING, RDSEED, 7 << 3 | 1 << 11),
])
def test_rdrand_rdseed_instruction_information(code, control_flag, reason, info):
    vm, _ = stop_at_exit(code, "long", control(control_flag))
    assert read(vm, F.VM_EXIT_REASON) == reason
    assert read(vm, F.VMX_INSTRUCTION_INFO) == info


# ================================================== LMSW: qualification and linear address
def _cr0_low_bits_owned(vm):
    """The VMM owns CR0[3:0] (mask bits 0-3) with shadow PE=1, MP=TS=EM=0."""
    vm.vmwrite(F.CR0_GUEST_HOST_MASK, read(vm, F.CR0_GUEST_HOST_MASK) | 0xF)
    vm.vmwrite(F.CR0_READ_SHADOW, (read(vm, F.CR0_READ_SHADOW) & ~0xF) | 1)


@pytest.mark.parametrize("mode, code, qualification, linear", [
    # Table 28-3: bits 3:0 CR number (0), 5:4 access type (3 = LMSW), bit 6 LMSW operand
    # type (0 register, 1 memory), 11:8 cleared for LMSW, 31:16 the LMSW source data.
    # 28.2.1: with a memory operand the guest-linear address is the operand's, bits
    # 63:32 cleared outside 64-bit mode.
    ("protected", "mov word ptr [0x2000], 0x000b\nlmsw [0x2000]", 0x000B << 16 | 1 << 6 | 3 << 4, 0x2000),
    ("long", "mov rbx, 0x3000\nmov word ptr [rbx+4], 0x0009\nlmsw [rbx+4]", 0x0009 << 16 | 1 << 6 | 3 << 4, 0x3004),
    ("real", "mov ax, 0x200\nmov ds, ax\nmov word ptr [0x10], 0x0003\nlmsw [0x10]",
     0x0003 << 16 | 1 << 6 | 3 << 4, 0x2010),                       # DS base 2000H + 10H
    ("long", "mov ax, 0x9\nlmsw ax", 0x0009 << 16 | 0 << 6 | 3 << 4, None),
])
def test_lmsw_qualification_and_guest_linear_address(mode, code, qualification, linear):
    vm, _ = stop_at_exit(code, mode, _cr0_low_bits_owned)
    assert read(vm, F.VM_EXIT_REASON) == CR_ACCESS
    assert read(vm, F.EXIT_QUALIFICATION) == qualification
    if linear is not None:
        assert read(vm, F.GUEST_LINEAR_ADDRESS) == linear


# =============================================================== MWAIT qualification
MONITOR_ARGS = "mov rax, 0x5000\nxor ecx, ecx\nxor edx, edx\n"


def test_mwait_qualification_is_1_after_monitor():
    """28.2.1: for MWAIT the exit qualification is 1 if address-range monitoring hardware
    was armed (an executed MONITOR arms it, SDM Vol. 2 MONITOR), 0 otherwise."""
    vm, _ = stop_at_exit(MONITOR_ARGS + "monitor\nxor eax, eax\nmwait", "long",
                         control(ProcBased.MWAIT_EXITING))
    assert read(vm, F.VM_EXIT_REASON) == MWAIT
    assert read(vm, F.EXIT_QUALIFICATION) == 1


def test_mwait_qualification_is_0_without_monitor():
    vm, _ = stop_at_exit("xor eax, eax\nxor ecx, ecx\nmwait", "long", control(ProcBased.MWAIT_EXITING))
    assert read(vm, F.VM_EXIT_REASON) == MWAIT
    assert read(vm, F.EXIT_QUALIFICATION) == 0


def test_a_vm_exit_clears_the_monitor():
    """28.5.6: VM exits clear any address-range monitoring in effect (27.3.3: so do
    VM entries) - a CPUID exit between MONITOR and MWAIT disarms it."""
    vm, e = stop_at_exit(MONITOR_ARGS + "monitor\ncpuid\nxor eax, eax\nxor ecx, ecx\nmwait", "long",
                         control(ProcBased.MWAIT_EXITING))
    assert read(vm, F.VM_EXIT_REASON) == CPUID
    vm.next_exit()
    assert read(vm, F.VM_EXIT_REASON) == MWAIT
    assert read(vm, F.EXIT_QUALIFICATION) == 0


def test_a_monitor_that_exits_does_not_arm():
    """With "MONITOR exiting" = 1 MONITOR causes a VM exit instead of executing (26.1.3)."""
    vm, _ = stop_at_exit(MONITOR_ARGS + "monitor\nxor eax, eax\nmwait", "long",
                         control(ProcBased.MWAIT_EXITING, ProcBased.MONITOR_EXITING))
    assert read(vm, F.VM_EXIT_REASON) == MONITOR
    vm.next_exit()
    assert read(vm, F.VM_EXIT_REASON) == MWAIT
    assert read(vm, F.EXIT_QUALIFICATION) == 0


# ======================================================= 26.1.1 priorities: MOV DR
def test_mov_dr_at_cpl3_exits_before_the_gp():
    """26.1.1: privilege-level faults come before VM exits - MOV DR is the exception
    (26.1.3: MOV-DR exits take priority over the #GP of CPL > 0).  Table 28-4: DR7 (7),
    bit 4 = 1 (MOV from DR), bits 11:8 RAX (0)."""
    vm, e = stop_at_exit(TO_USER_64 + "mov rax, dr7", "long", control(ProcBased.MOV_DR_EXITING))
    assert read(vm, F.VM_EXIT_REASON) == DR_ACCESS
    assert read(vm, F.EXIT_QUALIFICATION) == 7 | 1 << 4 | 0 << 8
    assert e.cpl == 3
    assert read(vm, F.GUEST_RIP) == 0x1018          # the MOV DR itself (after 18H bytes of TO_USER_64)


def test_mov_dr_at_cpl3_without_the_control_is_gp():
    vm, _ = stop_at_exit(TO_USER_64 + "mov rax, dr7", "long", exception_bitmap(13))
    assert read(vm, F.VM_EXIT_REASON) == EXCEPTION_NMI
    assert read(vm, F.VM_EXIT_INTR_INFO) == INFO_GP


def test_the_vmm_injects_the_gp_of_a_cpl3_mov_dr():
    """The exit came first, so the VMM makes the CPL check (as KVM's kvm_require_cpl):
    its handler injects #GP(0) - VM-entry interruption information 80000B0DH (vector 13,
    type 3, deliver error code; SDM 25.8.3), error code 0 - and leaves RIP at the MOV."""
    vm, _ = stop_at_exit(TO_USER_64 + "mov rax, dr7", "long", control(ProcBased.MOV_DR_EXITING))
    assert vm.handle_pending_exit()
    assert read(vm, F.VM_ENTRY_INTR_INFO_FIELD) == INFO_GP
    assert read(vm, F.VM_ENTRY_EXCEPTION_ERROR_CODE) == 0
    assert read(vm, F.GUEST_RIP) == 0x1018


# ========================================================= 26.1.2 footnote: GETSEC
def test_getsec_with_smxe_0_is_ud():
    """GETSEC causes #UD if CR4.SMXE[bit 14] = 0, which comes before any exit."""
    vm, _ = stop_at_exit("getsec", "long", exception_bitmap(6))
    assert read(vm, F.VM_EXIT_REASON) == EXCEPTION_NMI
    assert read(vm, F.VM_EXIT_INTR_INFO) == INFO_UD


def test_cr4_fixed1_allows_smxe_and_getsec_then_exits():
    """IA32_VMX_CR4_FIXED1 bit 14 = 1 (SDM A.8): the guest may set CR4.SMXE; GETSEC then
    exits regardless of CPL or RAX."""
    assert VmxCpu().rdmsr(IA32_VMX_CR4_FIXED1) >> 14 & 1 == 1
    vm, _ = stop_at_exit("mov rax, cr4\nor rax, 0x4000\nmov cr4, rax\ngetsec", "long")
    assert read(vm, F.VM_EXIT_REASON) == GETSEC
    assert read(vm, F.VM_EXIT_INSTRUCTION_LEN) == 2             # 0F 37


def test_getsec_exits_at_cpl3():
    def smxe(vm):
        vm.vmwrite(F.GUEST_CR4, read(vm, F.GUEST_CR4) | 1 << 14)
    vm, e = stop_at_exit(TO_USER_64 + "getsec", "long", smxe)
    assert read(vm, F.VM_EXIT_REASON) == GETSEC
    assert e.cpl == 3


# ================================================== 31.3 VMXON in VMX root operation
def test_vmxon_in_root_operation_at_cpl3_is_gp_before_vmfail():
    """VMXON pseudo-code: ... ELSIF in VMX non-root operation THEN VMexit; ELSIF CPL > 0
    THEN #GP(0); ELSE VMfail("VMXON executed in VMX root operation") (error 15)."""
    vm = VirtualMachine("hlt", mode="long")
    cpu = vm.cpu
    region = cpu.alloc_region(cpu.rdmsr(IA32_VMX_BASIC) & 0x7FFF_FFFF)
    cpu.cpl = 3
    out = cpu.vmxon(region)
    assert out.status is Status.FAULT and out.vector == 13
    cpu.cpl = 0
    out = cpu.vmxon(region)
    assert out.status is Status.VMFAIL_VALID and out.error == 15
    assert cpu.vmread(F.VM_INSTRUCTION_ERROR).value == 15


# =============================== VMREAD/VMWRITE of fields the processor does not have
def _root_cpu(caps: VmxCapabilities | None = None) -> VmxCpu:
    cpu = VmxCpu(capabilities=caps)
    cpu.write_cr4(cpu.cr4 | 1 << 13)
    rev = cpu.rdmsr(IA32_VMX_BASIC) & 0x7FFF_FFFF
    assert cpu.vmxon(cpu.alloc_region(rev)).ok
    assert cpu.vmptrld(cpu.alloc_region(rev)).ok
    return cpu


@pytest.mark.parametrize("encoding, msr, bit", [
    # Appendix B notes: "This field exists only on processors that support the 1-setting
    # of ..." - and the allowed-1 bit of that control is 0 in vtlab's capability MSRs.
    (0x401C, IA32_VMX_PROCBASED_CTLS, 32 + 21),    # TPR threshold: "use TPR shadow"
    (0x2012, IA32_VMX_PROCBASED_CTLS, 32 + 21),    # virtual-APIC address (full)
    (0x2013, IA32_VMX_PROCBASED_CTLS, 32 + 21),    # virtual-APIC address (high)
    (0x0002, 0x481, 32 + 7),                       # posted-interrupt notification vector
    (0x2016, 0x481, 32 + 7),                       # posted-interrupt descriptor address
    (0x0812, IA32_VMX_PROCBASED_CTLS2, 32 + 17),   # PML index: "enable PML"
    (0x200E, IA32_VMX_PROCBASED_CTLS2, 32 + 17),   # PML address
    (0x0004, IA32_VMX_PROCBASED_CTLS2, 32 + 18),   # EPTP index: "EPT-violation #VE"
    (0x2018, IA32_VMX_PROCBASED_CTLS2, 32 + 13),   # VM-function controls: "enable VM functions"
    (0x2024, IA32_VMX_PROCBASED_CTLS2, 32 + 13),   # EPTP-list address (a VM function)
    (0x4020, IA32_VMX_PROCBASED_CTLS2, 32 + 10),   # PLE_Gap: "PAUSE-loop exiting"
    (0x0810, IA32_VMX_PROCBASED_CTLS2, 32 + 9),    # guest interrupt status
    (0x2014, IA32_VMX_PROCBASED_CTLS2, 32 + 0),    # APIC-access address
    (0x2808, 0x484, 32 + 13),                      # guest IA32_PERF_GLOBAL_CTRL (entry ctl 13)
])
def test_vmread_vmwrite_of_a_field_without_its_feature_fail_with_error_12(encoding, msr, bit):
    cpu = _root_cpu()
    assert cpu.rdmsr(msr) >> bit & 1 == 0
    for out in (cpu.vmread(encoding), cpu.vmwrite(encoding, 0)):
        assert out.status is Status.VMFAIL_VALID and out.error == 12
        assert cpu.vmread(F.VM_INSTRUCTION_ERROR).value == 12


@pytest.mark.parametrize("encoding, msr, bit", [
    (0x201A, IA32_VMX_PROCBASED_CTLS2, 32 + 1),    # EPT pointer: "enable EPT" is offered
    (0x482E, 0x481, 32 + 6),                       # VMX-preemption timer value: pin bit 6 is offered
    (0x0000, IA32_VMX_PROCBASED_CTLS2, 32 + 5),    # VPID: "enable VPID" is offered
    (0x2004, IA32_VMX_PROCBASED_CTLS, 32 + 28),    # MSR-bitmap address: "use MSR bitmaps"
    (0x2010, None, None),                          # TSC offset: no condition in Appendix B
    (0x6008, None, None),                          # CR3-target value 0 (IA32_VMX_MISC[24:16] = 4)
])
def test_fields_whose_feature_is_offered_exist(encoding, msr, bit):
    cpu = _root_cpu()
    if msr is not None:
        assert cpu.rdmsr(msr) >> bit & 1 == 1
    assert cpu.vmwrite(encoding, 0x1000).status is Status.VMSUCCEED
    assert cpu.vmread(encoding).value == 0x1000


def test_a_field_exists_once_its_control_is_offered():
    """The same TPR-threshold field on a processor whose IA32_VMX_PROCBASED_CTLS allows
    "use TPR shadow" (bit 21) to be 1."""
    caps = VmxCapabilities()
    for table in (caps.controls, caps.true_controls):
        old = table[ProcBased]
        table[ProcBased] = AllowedSettings(old.allowed0, old.allowed1 | 1 << 21)
    cpu = _root_cpu(caps)
    assert cpu.rdmsr(IA32_VMX_PROCBASED_CTLS) >> (32 + 21) & 1 == 1
    assert cpu.vmwrite(0x401C, 5).status is Status.VMSUCCEED
    assert cpu.vmread(0x401C).value == 5


# =========================================== Appendix A: capability MSRs that do not exist
def _gp(cpu, msr):
    with pytest.raises(VmxFailure) as info:
        cpu.rdmsr(msr)
    assert info.value.outcome.vector == 13


def test_ia32_vmx_vmfunc_does_not_exist_without_vm_functions():
    """A.11: IA32_VMX_VMFUNC exists only if IA32_VMX_PROCBASED_CTLS2[45] ("enable VM
    functions" may be 1) is 1."""
    cpu = VmxCpu()
    assert cpu.rdmsr(IA32_VMX_PROCBASED_CTLS2) >> 45 & 1 == 0
    _gp(cpu, IA32_VMX_VMFUNC)


def test_true_msrs_do_not_exist_when_basic_55_is_0():
    """A.1 / A.3.1: the IA32_VMX_TRUE_*_CTLS MSRs exist only if IA32_VMX_BASIC[55] = 1."""
    assert VmxCpu().rdmsr(IA32_VMX_TRUE_PROCBASED_CTLS)   # (they do on vtlab's processor)
    cpu = VmxCpu(capabilities=VmxCapabilities(true_ctls=False))
    assert cpu.rdmsr(IA32_VMX_BASIC) >> 55 & 1 == 0
    for msr in (IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS,
                IA32_VMX_TRUE_EXIT_CTLS, IA32_VMX_TRUE_ENTRY_CTLS):
        _gp(cpu, msr)


def test_procbased_ctls2_does_not_exist_without_activate_secondary_controls():
    """A.3.3: IA32_VMX_PROCBASED_CTLS2 exists only if IA32_VMX_PROCBASED_CTLS[63] = 1;
    A.10: IA32_VMX_EPT_VPID_CAP needs it too."""
    caps = VmxCapabilities()
    for table in (caps.controls, caps.true_controls):
        old = table[ProcBased]
        table[ProcBased] = AllowedSettings(old.allowed0, old.allowed1 & ~(1 << 31))
    cpu = VmxCpu(capabilities=caps)
    assert cpu.rdmsr(IA32_VMX_PROCBASED_CTLS) >> 63 == 0
    _gp(cpu, IA32_VMX_PROCBASED_CTLS2)
    _gp(cpu, IA32_VMX_EPT_VPID_CAP)


def test_ept_vpid_cap_does_not_exist_without_ept_and_vpid():
    """A.10: IA32_VMX_EPT_VPID_CAP exists only if IA32_VMX_PROCBASED_CTLS2 bit 33
    ("enable EPT") or bit 37 ("enable VPID") is 1."""
    assert VmxCpu().rdmsr(IA32_VMX_EPT_VPID_CAP)
    caps = VmxCapabilities()
    for table in (caps.controls, caps.true_controls):
        old = table[ProcBased2]
        table[ProcBased2] = AllowedSettings(old.allowed0, old.allowed1 & ~(1 << 1 | 1 << 5))
    cpu = VmxCpu(capabilities=caps)
    value = cpu.rdmsr(IA32_VMX_PROCBASED_CTLS2)
    assert value >> 33 & 1 == 0 and value >> 37 & 1 == 0
    _gp(cpu, IA32_VMX_EPT_VPID_CAP)


# ============================================================ 26.4.2: task switches
TSS_SELECTOR, TASK_GATE_SELECTOR = 0x48, 0x50   # GDT entries 9 and 10 (past vtlab's nine)
NEW_TSS = 0x95000


def task_tables(busy: bool = False):
    """A 32-bit TSS descriptor at 48H (type 9 available / 11 busy, limit 67H, DPL 0), a task
    gate at 50H naming it (type 5, P, DPL 0; SDM Vol. 3A 8.2.2, 8.2.5), the same task gate
    at IDT vectors 6 and 30H."""
    def setup(vm):
        vm.guest.write(Layout.GDT + TSS_SELECTOR, pack_descriptor(NEW_TSS, 0x67, 0x8B if busy else 0x89, 0))
        gate = struct.pack("<Q", TSS_SELECTOR << 16 | 0x85 << 40)
        vm.guest.write(Layout.GDT + TASK_GATE_SELECTOR, gate)
        vm.vmwrite(F.GUEST_GDTR_LIMIT, 0x57)
        vm.guest.write(Layout.IDT + 6 * 8, gate)
        vm.guest.write(Layout.IDT + 0x30 * 8, gate)
        vm.vmwrite(F.GUEST_IDTR_LIMIT, 0x7FF)
    return setup


# Table 28-2: bits 15:0 the selector of the TSS switched to; bits 31:30 the source:
# 0 CALL, 1 IRET, 2 JMP, 3 task gate in the IDT.  28.2.5: the instruction length is
# defined for CALL, IRET, JMP and for task gates met by software interrupts.
@pytest.mark.parametrize("code, qualification, length, rip", [
    ("nop\ndb 0xea, 0, 0, 0, 0, 0x48, 0", 0x48 | 2 << 30, 7, 0x1001),       # JMP ptr16:32 to the TSS
    ("nop\ndb 0x9a, 0, 0, 0, 0, 0x50, 0", 0x48 | 0 << 30, 7, 0x1001),       # CALL ptr16:32 via task gate
    # JMP m16:32 (FF /5, ModRM 2D: disp32): offset at 2000H, selector at 2004H
    ("mov dword ptr [0x2000], 0\nmov word ptr [0x2004], 0x48\ndb 0xff, 0x2d, 0, 0x20, 0, 0",
     0x48 | 2 << 30, 6, 0x1013),
    ("nop\nint 0x30", 0x48 | 3 << 30, 2, 0x1001),                           # INT 30H via IDT task gate
])
def test_task_switch_exits(code, qualification, length, rip):
    vm, _ = stop_at_exit(code, "protected", task_tables())
    assert read(vm, F.VM_EXIT_REASON) == TASK_SWITCH
    assert read(vm, F.EXIT_QUALIFICATION) == qualification
    assert read(vm, F.VM_EXIT_INSTRUCTION_LEN) == length
    assert read(vm, F.GUEST_RIP) == rip


def test_iret_with_nt_exits_with_the_previous_task_link():
    """IRET with RFLAGS.NT (bit 14) = 1 returns to the task in the previous-task link (TSS
    offset 0), a busy TSS: a task switch, source 1 (IRET)."""
    def setup(vm):
        task_tables(busy=True)(vm)
        vm.guest.write(Layout.TSS, struct.pack("<H", TSS_SELECTOR))   # vtlab's TR base
    vm, _ = stop_at_exit("pushfd\nor dword ptr [esp], 0x4000\npopfd\niretd", "protected", setup)
    assert read(vm, F.VM_EXIT_REASON) == TASK_SWITCH
    assert read(vm, F.EXIT_QUALIFICATION) == 0x48 | 1 << 30
    assert read(vm, F.VM_EXIT_INSTRUCTION_LEN) == 1
    assert read(vm, F.GUEST_RIP) == 0x1009


def test_an_exception_through_an_idt_task_gate_exits():
    """#UD (UD2) delivered through the task gate at vector 6: source 3, RIP at the UD2."""
    vm, _ = stop_at_exit("nop\nud2", "protected", task_tables())
    assert read(vm, F.VM_EXIT_REASON) == TASK_SWITCH
    assert read(vm, F.EXIT_QUALIFICATION) == 0x48 | 3 << 30
    assert read(vm, F.GUEST_RIP) == 0x1001


def test_checks_before_the_exit_fault_first():
    """26.4.2 step 4: a JMP to a busy TSS fails the type check: #GP, not an exit."""
    vm, _ = stop_at_exit("db 0xea, 0, 0, 0, 0, 0x48, 0", "protected",
                         both(task_tables(busy=True), exception_bitmap(13)))
    assert read(vm, F.VM_EXIT_REASON) == EXCEPTION_NMI
    assert read(vm, F.VM_EXIT_INTR_INFO) == INFO_GP


def test_a_far_jump_to_a_code_segment_is_no_task_switch():
    # JMP 08H:1009H (a code segment) over the HLT at 1007H to the one at 1009H
    vm, _ = stop_at_exit("db 0xea\ndd 0x1009\ndw 0x08\nhlt\nnop\nhlt", "protected", task_tables(),
                         append_hlt=False)
    assert read(vm, F.VM_EXIT_REASON) == HLT
    assert read(vm, F.GUEST_RIP) == 0x1009


def test_no_task_switch_in_ia32e_mode():
    """26.4.2 c: CALL or JMP to a TSS descriptor in IA-32e mode raises #GP."""
    def setup(vm):
        vm.guest.write(Layout.GDT + TSS_SELECTOR, pack_descriptor(NEW_TSS, 0x67, 0x89, 0))
        vm.guest.write(Layout.GDT + TSS_SELECTOR + 8, bytes(8))
        vm.vmwrite(F.GUEST_GDTR_LIMIT, 0x57)
        exception_bitmap(13)(vm)
    vm, _ = stop_at_exit("mov qword ptr [0x2000], 0\nmov word ptr [0x2008], 0x48\nmov rax, 0x2000\n"
                         "db 0x48, 0xff, 0x28", "long", setup)           # JMP m16:64 [RAX]
    assert read(vm, F.VM_EXIT_REASON) == EXCEPTION_NMI
    assert read(vm, F.VM_EXIT_INTR_INFO) == INFO_GP


# ================================================================== INT1 (ICEBP)
@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_int1_is_a_privileged_software_exception(mode):
    """INT1 (F1) with exception-bitmap bit 1 set: interruption type 5 (privileged software
    exception), vector 1 (SDM 25.8.3, 28.2.2); instruction length 1 (28.2.5); RIP at it."""
    vm, _ = stop_at_exit("nop\nint1", mode, exception_bitmap(1))
    assert insn_bytes(vm, 1, 0x1001) == b"\xf1"
    assert read(vm, F.VM_EXIT_REASON) == EXCEPTION_NMI
    assert read(vm, F.VM_EXIT_INTR_INFO) == INFO_INT1
    assert read(vm, F.VM_EXIT_INSTRUCTION_LEN) == 1
    assert read(vm, F.GUEST_RIP) == 0x1001


def test_int1_without_the_bitmap_bit_is_a_trap_to_the_guest():
    """#DB from INT1 is a trap: the guest's handler gets the address after the F1."""
    def ivt(vm):
        vm.load("mov bx, 0x77\nhlt", 0x1800)
        vm.guest.write(1 * 4, struct.pack("<HH", 0x1800, 0))   # IVT entry 1 -> 0000:1800
    vm, _ = stop_at_exit("nop\nint1\nnop", "real", ivt)
    assert read(vm, F.VM_EXIT_REASON) == HLT
    assert vm.regs.rbx == 0x77
    assert vm.guest.read_u16(vm.regs.rsp) == 0x1002


def test_int_1_is_a_software_interrupt_not_filtered_by_the_bitmap():
    """INT 1 (CD 01) is type 4, a software interrupt: the exception bitmap does not apply."""
    def ivt(vm):
        vm.load("mov bx, 0x66\nhlt", 0x1800)
        vm.guest.write(1 * 4, struct.pack("<HH", 0x1800, 0))
        exception_bitmap(1)(vm)
    vm, _ = stop_at_exit("int 1", "real", ivt)
    assert read(vm, F.VM_EXIT_REASON) == HLT
    assert vm.regs.rbx == 0x66


def test_int1_reflected_by_the_vmm_returns_past_the_f1():
    """The VMM re-injects the exit's event (type 5) with the VM-entry instruction length
    = the exit's (1): injection pushes RIP + 1 (SDM 27.6.1.1), as the INT1 itself would."""
    def setup(vm):
        vm.load("mov bx, 0x55\nhlt", 0x1800)
        vm.guest.write(1 * 4, struct.pack("<HH", 0x1800, 0))
        exception_bitmap(1)(vm)
    vm = VirtualMachine("nop\nint1\nnop\nhlt", mode="real")
    setup(vm)
    vm.run(max_exits=10)
    assert [e.reason for e in vm.trace.exits] == ["EXCEPTION_NMI", "HLT"]
    assert vm.regs.rbx == 0x55
    assert vm.guest.read_u16(vm.regs.rsp) == 0x1002


def test_an_injected_interrupt_through_an_idt_task_gate_exits():
    """Event injection delivers through the IDT (SDM 27.6): a task gate there is a task
    switch, so a VM exit, source 3 (Table 28-2); for an injected software interrupt the
    instruction length is the VM-entry instruction length (28.2.5)."""
    vm = VirtualMachine("nop\nhlt", mode="protected")
    task_tables()(vm)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0430)    # valid, type 4 (software interrupt), 30H
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, 2)
    e = vm.next_exit()
    assert read(vm, F.VM_EXIT_REASON) == TASK_SWITCH
    assert read(vm, F.EXIT_QUALIFICATION) == 0x48 | 3 << 30
    assert read(vm, F.VM_EXIT_INSTRUCTION_LEN) == 2
    assert read(vm, F.GUEST_RIP) == 0x1000

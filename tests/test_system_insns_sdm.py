"""SYSENTER/SYSEXIT, CR4.UMIP and CPUID.OSXSAVE as the SDM defines them.

Unicorn 2.1 executes SYSENTER and SYSEXIT as no-ops and never applies CR4.UMIP; vtlab
makes the checks (vtlab/cpu/system_insns.py).  Facts are written from the SDM
(325462-084US): Vol. 2B SYSENTER / SYSEXIT "Operation" and "Protected Mode Exceptions";
Vol. 3A 2.5 (CR4.UMIP, bit 11); Vol. 2A CPUID (leaf 1 ECX bit 27 OSXSAVE, leaf 7 ECX bit 2
UMIP); Vol. 3C 26.1.1 (faults based on privilege level come before VM exits).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vtlab import ProcBased, VirtualMachine, VmcsField as F, VmxCpu  # noqa: E402
from vtlab.arch import ProcBased2  # noqa: E402
from vtlab.cpu import Guest  # noqa: E402

from user_mode import TO_USER_64  # noqa: E402

# VM-exit interruption information of #GP: vector 13, type 3 (hardware exception),
# error code valid (bit 11), valid (bit 31) - SDM Vol. 3C 25.9.2, Table 25-19.
INFO_GP = 0x80000B0D
EXCEPTION_NMI = 0            # SDM Vol. 3C Appendix C, exit reason 0
GDTR_IDTR = 46               # exit reason 46: access to GDTR or IDTR
SET_UMIP = "mov rax, cr4\nor rax, 0x800\nmov cr4, rax\n"   # CR4 bit 11


def first_exit(program: str, mode: str = "long", setup=None):
    vm = VirtualMachine(program + "\nhlt", mode=mode)
    vm.vmwrite(F.EXCEPTION_BITMAP, 1 << 13)      # #GP exits
    if setup is not None:
        setup(vm)
    e = vm.next_exit()
    assert e is not None, vm.message
    return vm, e


# ------------------------------------------------------------------------ UMIP
def test_umip_makes_sgdt_gp_at_cpl3():
    vm, e = first_exit(SET_UMIP + TO_USER_64 + "sgdt [0x8d000]")
    assert vm.vmread(F.VM_EXIT_REASON) == EXCEPTION_NMI
    assert vm.vmread(F.VM_EXIT_INTR_INFO) == INFO_GP
    assert e.instruction.startswith("sgdt")


def test_each_umip_instruction_faults_at_cpl3():
    for insn in ("sgdt [0x8d000]", "sidt [0x8d000]", "sldt ax", "smsw ax", "str ax"):
        vm, e = first_exit(SET_UMIP + TO_USER_64 + insn)
        assert vm.vmread(F.VM_EXIT_INTR_INFO) == INFO_GP, insn
        assert e.instruction.split()[0] == insn.split()[0], (insn, e.instruction)


def test_without_umip_sgdt_runs_at_cpl3():
    vm, e = first_exit(TO_USER_64 + "sgdt [0x8d000]")
    assert e.instruction == "hlt"          # SGDT ran; the CPL-3 HLT is the #GP


def test_umip_gp_comes_before_the_descriptor_table_exit():
    """26.1.1: a fault based on privilege level has priority over a VM exit."""
    vm, _ = first_exit(SET_UMIP + TO_USER_64 + "sgdt [0x8d000]",
                       setup=lambda vm: (vm.set_control(ProcBased.ACTIVATE_SECONDARY_CONTROLS),
                                         vm.set_control(ProcBased2.DESC)))
    assert vm.vmread(F.VM_EXIT_REASON) == EXCEPTION_NMI
    vm, _ = first_exit(TO_USER_64 + "sgdt [0x8d000]",
                       setup=lambda vm: (vm.set_control(ProcBased.ACTIVATE_SECONDARY_CONTROLS),
                                         vm.set_control(ProcBased2.DESC)))
    assert vm.vmread(F.VM_EXIT_REASON) == GDTR_IDTR


def test_umip_in_a_bare_run_names_the_reason():
    g = Guest("long")
    g.load(SET_UMIP + TO_USER_64 + "smsw ax\nhlt")
    result = g.run(0x1000)
    assert result.reason == "exception" and result.exception.vector == 13
    assert "CR4.UMIP = 1 and CPL = 3" in result.exception.instruction


def test_cpuid_leaf7_reports_umip_and_cr4_fixed1_allows_it():
    cpu = VmxCpu()
    assert cpu.cpuid(7)[2] >> 2 & 1 == 1                          # CPUID.7:ECX[2] UMIP
    assert cpu.rdmsr(0x489) >> 11 & 1 == 1                        # IA32_VMX_CR4_FIXED1


# ------------------------------------------------------------------- SYSENTER
def test_sysenter_with_sysenter_cs_0_is_gp_at_cpl3():
    vm, e = first_exit(TO_USER_64 + "sysenter")
    assert vm.vmread(F.VM_EXIT_INTR_INFO) == INFO_GP
    assert e.instruction == "sysenter" and e.cpl == 3


def test_sysenter_with_sysenter_cs_0_is_gp_at_cpl0_too():
    vm, e = first_exit("sysenter")
    assert vm.vmread(F.VM_EXIT_INTR_INFO) == INFO_GP and e.instruction == "sysenter"


def test_sysenter_in_real_mode_is_gp():
    g = Guest("real")
    g.load("sysenter\nhlt")
    result = g.run(0x1000)
    assert result.exception is not None and result.exception.vector == 13
    assert "CR0.PE = 0" in result.exception.instruction


SETUP_SYSENTER_32 = """
    mov ecx, 0x174          ; IA32_SYSENTER_CS
    mov eax, 0x8
    xor edx, edx
    wrmsr
    mov ecx, 0x176          ; IA32_SYSENTER_EIP
    mov eax, kernel
    wrmsr
    mov ecx, 0x175          ; IA32_SYSENTER_ESP
    mov eax, 0x8c000
    wrmsr
"""


def test_configured_sysenter_enters_ring0_at_sysenter_eip():
    g = Guest("protected")
    g.load(SETUP_SYSENTER_32 + """
        pushfd
        or dword [esp], 0x200   ; IF = 1: SYSENTER clears it
        popfd
        sysenter
        hlt                     ; not reached
    kernel:
        mov ebx, esp
        pushfd
        pop esi
        hlt
    """)
    result = g.run(0x1000)
    assert result.reason == "hlt", result
    assert g.reg("cs") == 0x8 and g.reg("ss") == 0x10       # CS = SYSENTER_CS, SS = +8
    assert g.reg("ebx") == 0x8c000                           # ESP = IA32_SYSENTER_ESP
    assert g.reg("esi") & 0x200 == 0                         # RFLAGS.IF cleared


def test_sysexit_at_cpl3_is_gp():
    vm, e = first_exit(TO_USER_64 + "sysexit")
    assert vm.vmread(F.VM_EXIT_INTR_INFO) == INFO_GP and e.instruction == "sysexit"


# --------------------------------------------------------------------- OSXSAVE
def test_vmxcpu_cpuid_osxsave_follows_cr4():
    cpu = VmxCpu()
    assert cpu.cpuid(1)[2] >> 27 & 1 == 0
    cpu.write_cr4(cpu.cr4 | 1 << 18)                               # CR4.OSXSAVE
    assert cpu.cpuid(1)[2] >> 27 & 1 == 1


def test_guest_cpuid_osxsave_follows_the_guests_cr4():
    program = "mov eax, 1\ncpuid\nmov esi, ecx\n" \
              "mov rax, cr4\nbts rax, 18\nmov cr4, rax\nmov eax, 1\ncpuid\nmov edi, ecx\nhlt"
    vm = VirtualMachine(program, mode="long")
    assert str(vm.run()).startswith("halted"), vm.message
    assert vm.regs.rsi >> 27 & 1 == 0 and vm.regs.rdi >> 27 & 1 == 1


def test_vmxcpu_and_guest_report_the_same_processor():
    vm = VirtualMachine("mov eax, 1\ncpuid\nhlt", mode="long")
    vm.run()
    host = VmxCpu().cpuid(1)
    assert vm.regs.eax == host[0] == 0x000906EA                    # family 6 model 9E
    assert vm.regs.ebx == host[1]

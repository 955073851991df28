"""VM exits (vtlab/cpu/exit_rules.py, events.py, nonroot.py) and the VMM around them (vtlab/vmm/).

For every exit of SDM Vol. 3C ch. 26 ("VMX Non-Root Operation") that vtlab implements:
it happens when its control says so and not otherwise, with the exit reason (Appendix C),
exit qualification (28.2.1, Tables 28-1 .. 28-7), instruction length and the other
exit-information fields written out literally from the SDM.  Guests run in real mode and
in long mode.

The expected instruction lengths are those of the x86 encodings (SDM Vol. 2), e.g.
``out dx, al`` = EE (1 byte), ``in al, 0x60`` = E4 60 (2), ``mov cr3, rax`` = 0F 22 D8 (3).
"""
from __future__ import annotations

import struct

import pytest

from vtlab import ExitReason, HandlerError, Layout, Status, VirtualMachine, VmState
from vtlab.arch import ExitControl, PinBased, ProcBased, ProcBased2

# ------------------------------------------------------ SDM constants, written literally
# VMCS field encodings (Appendix B)
EXCEPTION_BITMAP = 0x4004
PAGE_FAULT_ERROR_CODE_MASK = 0x4006
PAGE_FAULT_ERROR_CODE_MATCH = 0x4008
CR3_TARGET_COUNT = 0x400A
VM_EXIT_REASON = 0x4402
VM_EXIT_INTR_INFO = 0x4404
VM_EXIT_INTR_ERROR_CODE = 0x4406
VM_EXIT_INSTRUCTION_LEN = 0x440C
VMX_INSTRUCTION_INFO = 0x440E
GUEST_IDTR_LIMIT = 0x4812
GUEST_PHYSICAL_ADDRESS = 0x2400
CR0_GUEST_HOST_MASK = 0x6000
CR4_GUEST_HOST_MASK = 0x6002
CR0_READ_SHADOW = 0x6004
CR4_READ_SHADOW = 0x6006
CR3_TARGET_VALUE0 = 0x6008
CR3_TARGET_VALUE1 = 0x600A
EXIT_QUALIFICATION = 0x6400
GUEST_LINEAR_ADDRESS = 0x640A
GUEST_CR0 = 0x6800
GUEST_CR3 = 0x6802
GUEST_CR4 = 0x6804
GUEST_RIP = 0x681E

# Basic exit reasons (Appendix C)
EXCEPTION_NMI, EXTERNAL_INTERRUPT, TRIPLE_FAULT = 0, 1, 2
CPUID, GETSEC, HLT, INVD, INVLPG, RDPMC, RDTSC = 10, 11, 12, 13, 14, 15, 16
VMCALL, VMCLEAR, VMLAUNCH, VMPTRLD, VMPTRST, VMREAD = 18, 19, 20, 21, 22, 23
VMRESUME, VMWRITE, VMXOFF, VMXON = 24, 25, 26, 27
CR_ACCESS, DR_ACCESS, IO_INSTRUCTION, MSR_READ, MSR_WRITE = 28, 29, 30, 31, 32
MWAIT, MONITOR, PAUSE = 36, 39, 40
GDTR_IDTR, LDTR_TR, EPT_VIOLATION = 46, 47, 48
INVEPT, RDTSCP, INVVPID, XSETBV = 50, 51, 53, 55

# Interruption information (Table 25-17 / 25-19): valid bit 31, error code bit 11,
# type in bits 10:8 (0 external interrupt, 2 NMI, 3 hardware exception, 6 software exception)
INFO_UD = 0x8000_0306          # #UD, hardware exception, no error code
INFO_BP = 0x8000_0603          # #BP (INT3), software exception
INFO_GP = 0x8000_0B0D          # #GP, hardware exception, error code valid
INFO_PF = 0x8000_0B0E          # #PF, hardware exception, error code valid
INFO_NMI = 0x8000_0202
INFO_EXT_20H = 0x8000_0020

CR0_PE, CR0_TS, CR0_NE = 1 << 0, 1 << 3, 1 << 5
CR4_PSE, CR4_VMXE, CR4_OSXSAVE = 1 << 4, 1 << 13, 1 << 18

# The ring-3 entry used by the CPL tests: an IRETQ frame with vtlab's user selectors.
TO_USER_64 = """
    push 0x2b            ; SS: user data
    push 0x8e000         ; RSP
    push 0x202           ; RFLAGS (IF)
    push 0x33            ; CS: 64-bit user code
    mov rax, user
    push rax
    iretq
user:
"""


# ----------------------------------------------------------------------------- helpers
def make_vm(program: str, mode: str = "real", setup=None) -> VirtualMachine:
    vm = VirtualMachine(program + "\nhlt", mode=mode)
    if setup is not None:
        setup(vm)
    return vm


def first_exit(program: str, mode: str = "real", setup=None, max_instructions: int = 10_000):
    """Launch ``program`` and return (vm, exit) at its first VM exit."""
    vm = make_vm(program, mode, setup)
    out = vm.cpu.vmlaunch(max_instructions=max_instructions)
    assert out.status is Status.VM_EXIT, out
    return vm, out.exit


def field(vm: VirtualMachine, encoding: int) -> int:
    out = vm.cpu.vmread(encoding)
    assert out.ok, out
    return out.value


def assert_exit(vm, reason: int, qualification: int = 0, length: int | None = None,
                rip: int | None = None) -> None:
    """Check the exit-information fields through VMREAD, as a VMM would."""
    assert field(vm, VM_EXIT_REASON) == reason, vm.last_exit if hasattr(vm, "last_exit") else ""
    assert field(vm, EXIT_QUALIFICATION) == qualification, hex(field(vm, EXIT_QUALIFICATION))
    if length is not None:
        assert field(vm, VM_EXIT_INSTRUCTION_LEN) == length
    if rip is not None:
        assert field(vm, GUEST_RIP) == rip, hex(field(vm, GUEST_RIP))


def assert_no_exit_until_hlt(program: str, mode: str = "real", setup=None, hlt_at: int | None = None):
    """The guest runs ``program`` without an exit: the first exit is its final HLT."""
    vm, e = first_exit(program, mode, setup)
    assert field(vm, VM_EXIT_REASON) == HLT, e
    if hlt_at is not None:
        assert field(vm, GUEST_RIP) == hlt_at
    return vm


def on(*controls):
    def setup(vm):
        for c in controls:
            vm.set_control(c)
    return setup


def off(*controls):
    def setup(vm):
        for c in controls:
            vm.set_control(c, False)
    return setup


def both(*setups):
    def setup(vm):
        for s in setups:
            s(vm)
    return setup


def exception_bitmap(*vectors):
    def setup(vm):
        vm.vmwrite(EXCEPTION_BITMAP, sum(1 << v for v in vectors))
    return setup


def ivt_handler(vector: int, code: str, at: int = 0x1800):
    """Real mode: point IVT entry ``vector`` at ``code`` (loaded at ``at``)."""
    def setup(vm):
        vm.load(code, at)
        vm.guest.write(vector * 4, struct.pack("<HH", at, 0))
    return setup


def idt_gate(vector: int, code: str, at: int = 0x1800):
    """Long mode: a 64-bit interrupt gate for ``vector`` to ``code`` (SDM Vol. 3A 6.14.1)."""
    def setup(vm):
        vm.load(code, at)
        low = (at & 0xFFFF) | (0x18 << 16) | (0x8E << 40) | ((at >> 16) & 0xFFFF) << 48
        vm.guest.write(Layout.IDT + vector * 16, struct.pack("<QQ", low, at >> 32))
        vm.vmwrite(GUEST_IDTR_LIMIT, 256 * 16 - 1)
    return setup


MODES = ["real", "long"]


# ===================================================================== unconditional
@pytest.mark.parametrize("mode", MODES)
def test_cpuid_always_exits(mode):
    vm, e = first_exit("nop\ncpuid", mode)
    assert_exit(vm, CPUID, 0, length=2, rip=0x1001)
    assert e.instruction == "cpuid"


@pytest.mark.parametrize("mode", MODES)
def test_cpuid_exits_even_with_every_control_clear(mode):
    vm, _ = first_exit("cpuid", mode, off(ProcBased.HLT_EXITING, ProcBased.UNCOND_IO_EXITING,
                                          ProcBased.USE_MSR_BITMAPS))
    assert_exit(vm, CPUID, length=2)


@pytest.mark.parametrize("mode", MODES)
def test_getsec_exits(mode):
    """GETSEC exits if CR4.SMXE (bit 14) = 1 (SDM 26.1.2, footnote) ..."""
    def smxe(vm):
        vm.vmwrite(GUEST_CR4, field(vm, GUEST_CR4) | 1 << 14)
    vm, _ = first_exit("getsec", mode, smxe)
    assert_exit(vm, GETSEC, length=2, rip=0x1000)


@pytest.mark.parametrize("mode", MODES)
def test_getsec_without_smxe_is_ud_not_an_exit(mode):
    """... and raises #UD if CR4.SMXE = 0, before any exit (SDM 26.1.1)."""
    vm, _ = first_exit("getsec", mode, exception_bitmap(6))
    assert_exit(vm, EXCEPTION_NMI, rip=0x1000)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_UD


@pytest.mark.parametrize("mode", MODES)
def test_invd_exits(mode):
    vm, _ = first_exit("invd", mode)
    assert_exit(vm, INVD, length=2, rip=0x1000)


@pytest.mark.parametrize("mode", MODES)
def test_xsetbv_exits(mode):
    """XSETBV (0F 01 D1) exits unconditionally once CR4.OSXSAVE = 1 ..."""
    def osxsave(vm):
        vm.vmwrite(GUEST_CR4, field(vm, GUEST_CR4) | CR4_OSXSAVE)
    vm, _ = first_exit("xor ecx, ecx\nxor eax, eax\nxor edx, edx\ninc eax\nxsetbv", mode, osxsave)
    assert_exit(vm, XSETBV, length=3)


def test_xsetbv_without_osxsave_is_ud_not_an_exit():
    """... but with CR4.OSXSAVE = 0 it raises #UD, which has priority (SDM 26.1.1)."""
    vm, _ = first_exit("xor ecx, ecx\nxsetbv", "real", exception_bitmap(6))
    assert_exit(vm, EXCEPTION_NMI, rip=0x1003)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_UD


@pytest.mark.parametrize("mode", MODES)
def test_vmcall_exits(mode):
    vm, _ = first_exit("nop\nvmcall", mode)
    assert_exit(vm, VMCALL, 0, length=3, rip=0x1001)


@pytest.mark.parametrize("code, reason, qualification, length", [
    ("vmclear [rbx+0x10]", VMCLEAR, 0x10, 5),          # 66 0F C7 73 10
    ("vmptrld [rbx-0x10]", VMPTRLD, 0xFFFF_FFFF_FFFF_FFF0, 4),   # displacement sign-extended
    ("vmptrst [rbx]", VMPTRST, 0, 3),                  # no displacement: 0
    ("vmxon [0x500]", VMXON, 0x500, 8),                # RIP-relative: disp + next RIP
    ("vmread rax, rbx", VMREAD, 0, 3),                 # register operands: 0
    ("vmwrite rax, rbx", VMWRITE, 0, 3),
    ("vmlaunch", VMLAUNCH, 0, 3),
    ("vmresume", VMRESUME, 0, 3),
    ("vmxoff", VMXOFF, 0, 3),
    ("invept rax, [0x500]", INVEPT, 0x500, 9),
    ("invvpid rax, [0x500]", INVVPID, 0x500, 9),
])
def test_vmx_instructions_exit_in_long_mode(code, reason, qualification, length):
    """The VMX instructions exit unconditionally; the qualification is the displacement
    of the memory operand (SDM 28.2.1)."""
    vm, _ = first_exit(code, "long")
    assert_exit(vm, reason, qualification, length=length, rip=0x1000)


@pytest.mark.parametrize("code", ["vmclear [0x500]", "vmptrld [0x500]", "vmread eax, ebx",
                                  "vmlaunch", "vmxoff"])
def test_vmx_instructions_in_real_mode_are_ud(code):
    """Their pseudo-code checks CR0.PE = 0 -> #UD before 'in VMX non-root operation ->
    VM exit' (SDM 31.3): a real-mode guest gets #UD."""
    vm, _ = first_exit(code, "real", exception_bitmap(6))
    assert_exit(vm, EXCEPTION_NMI, rip=0x1000)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_UD


def test_vmx_instructions_get_ud_from_the_default_vmm():
    """The VMM offers no nested VMX: it reflects #UD into the guest (as KVM does)."""
    vm = make_vm("vmxoff", "long", idt_gate(6, "mov rbx, 0x6\nhlt"))
    summary = vm.run()
    assert summary.state is VmState.HALTED
    assert [e.reason for e in vm.trace.exits] == ["VMOFF", "HLT"]
    assert vm.regs.rbx == 6


def test_triple_fault_exits_and_crashes_the_vm():
    """#UD with an empty IDT: #DF cannot be delivered either -> triple fault (reason 2)."""
    vm, _ = first_exit("ud2", "long")
    assert_exit(vm, TRIPLE_FAULT)
    vm = make_vm("ud2", "long")
    summary = vm.run()
    assert summary.state is VmState.CRASHED
    assert [e.reason_number for e in vm.trace.exits] == [TRIPLE_FAULT]


# ================================================================== HLT, INVLPG ...
@pytest.mark.parametrize("mode", MODES)
def test_hlt_exits_when_hlt_exiting(mode):
    vm, _ = first_exit("nop\nnop", mode)   # make_vm appends the HLT
    assert_exit(vm, HLT, 0, length=1, rip=0x1002)


@pytest.mark.parametrize("mode", MODES)
def test_hlt_does_not_exit_without_hlt_exiting(mode):
    vm = make_vm("nop", mode, off(ProcBased.HLT_EXITING))
    out = vm.cpu.vmlaunch()
    assert out.status is Status.PAUSED     # halted inside non-root operation
    assert "HLT activity state" in out.message
    summary = vm.run()
    assert summary.state is VmState.HALTED and len(vm.trace) == 0


@pytest.mark.parametrize("mode, code, address, length", [
    ("real", "invlpg [0x1234]", 0x1234, 5),
    ("real", "mov ax, 0x100\nmov ds, ax\ninvlpg [0x34]", 0x1034, 5),  # linear: DS.base + 34H
    ("long", "mov rbx, 0x5000\ninvlpg [rbx+8]", 0x5008, 4),
])
def test_invlpg_exit_qualification_is_the_linear_address(mode, code, address, length):
    vm, _ = first_exit(code, mode, on(ProcBased.INVLPG_EXITING))
    assert_exit(vm, INVLPG, address, length=length)


@pytest.mark.parametrize("mode", MODES)
def test_invlpg_without_control_does_not_exit(mode):
    assert_no_exit_until_hlt("invlpg [0x1234]", mode)


@pytest.mark.parametrize("mode", MODES)
def test_rdpmc(mode):
    vm, _ = first_exit("xor ecx, ecx\nrdpmc", mode, on(ProcBased.RDPMC_EXITING))
    assert_exit(vm, RDPMC, length=2)
    vm = assert_no_exit_until_hlt("mov eax, 5\nmov edx, 7\nxor ecx, ecx\nrdpmc", mode)
    assert vm.regs.rax == 0 and vm.regs.rdx == 0   # executed: no counters running


@pytest.mark.parametrize("mode", MODES)
def test_rdtsc(mode):
    vm, _ = first_exit("nop\nrdtsc", mode, on(ProcBased.RDTSC_EXITING))
    assert_exit(vm, RDTSC, length=2, rip=0x1001)
    assert_no_exit_until_hlt("rdtsc", mode, hlt_at=0x1002)


@pytest.mark.parametrize("mode", MODES)
def test_rdtscp(mode):
    vm, _ = first_exit("rdtscp", mode, on(ProcBased.RDTSC_EXITING))  # "enable RDTSCP" is on
    assert_exit(vm, RDTSCP, length=3, rip=0x1000)
    assert_no_exit_until_hlt("rdtscp", mode, hlt_at=0x1003)


def test_rdtscp_without_enable_rdtscp_is_ud():
    vm, _ = first_exit("rdtscp", "long", both(on(ProcBased.RDTSC_EXITING),
                                              off(ProcBased2.ENABLE_RDTSCP), exception_bitmap(6)))
    assert_exit(vm, EXCEPTION_NMI, rip=0x1000)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_UD


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("code, control, reason", [
    ("mwait", ProcBased.MWAIT_EXITING, MWAIT),
    ("monitor", ProcBased.MONITOR_EXITING, MONITOR),
])
def test_monitor_mwait(mode, code, control, reason):
    vm, _ = first_exit(code, mode, on(control))
    assert_exit(vm, reason, length=3, rip=0x1000)
    assert_no_exit_until_hlt(code, mode, hlt_at=0x1003)


@pytest.mark.parametrize("mode", MODES)
def test_pause(mode):
    vm, _ = first_exit("pause", mode, on(ProcBased.PAUSE_EXITING))
    assert_exit(vm, PAUSE, length=2, rip=0x1000)   # F3 90
    assert_no_exit_until_hlt("pause", mode, hlt_at=0x1002)


# ================================================================ control registers
@pytest.mark.parametrize("mode, code, qualification, length, rip", [
    ("long", "mov rax, cr3\nmov cr3, rax", 0x003, 3, 0x1003),   # CR3, MOV to CR, RAX
    ("real", "mov eax, cr3\nmov cr3, eax", 0x003, 3, 0x1003),
    ("long", "mov rax, cr3\nmov cr3, rdx", 0x203, 3, 0x1003),   # register 2 = RDX
])
def test_mov_to_cr3_with_cr3_load_exiting(mode, code, qualification, length, rip):
    vm, _ = first_exit(code, mode, on(ProcBased.CR3_LOAD_EXITING))
    assert_exit(vm, CR_ACCESS, qualification, length=length, rip=rip)


@pytest.mark.parametrize("mode, code, qualification, length", [
    ("long", "mov rbx, cr3", 0x313, 3),      # CR3, MOV from CR (bit 4), RBX (3)
    ("real", "mov ebx, cr3", 0x313, 3),
    ("long", "mov r15, cr3", 0xF13, 4),      # REX.B: register 15
])
def test_mov_from_cr3_with_cr3_store_exiting(mode, code, qualification, length):
    vm, _ = first_exit(code, mode, on(ProcBased.CR3_STORE_EXITING))
    assert_exit(vm, CR_ACCESS, qualification, length=length, rip=0x1000)


@pytest.mark.parametrize("mode", MODES)
def test_mov_cr3_without_cr3_exiting_does_not_exit(mode):
    code = "mov rax, cr3\nmov cr3, rax" if mode == "long" else "mov eax, cr3\nmov cr3, eax"
    vm = assert_no_exit_until_hlt(code, mode, off(ProcBased.CR3_LOAD_EXITING,
                                                  ProcBased.CR3_STORE_EXITING), hlt_at=0x1006)


def test_cr3_target_list():
    """MOV to CR3 of a value in the first CR3_TARGET_COUNT target values does not exit."""
    def targets(count):
        def setup(vm):
            vm.set_control(ProcBased.CR3_LOAD_EXITING)
            vm.vmwrite(CR3_TARGET_VALUE0, 0x7000)
            vm.vmwrite(CR3_TARGET_VALUE1, field(vm, GUEST_CR3))
            vm.vmwrite(CR3_TARGET_COUNT, count)
        return setup
    code = "mov rax, cr3\nmov cr3, rax"
    assert_no_exit_until_hlt(code, "long", targets(2), hlt_at=0x1006)  # in the list
    vm, _ = first_exit(code, "long", targets(1))   # only value 0 counts: exits
    assert_exit(vm, CR_ACCESS, 0x3, rip=0x1003)
    vm, _ = first_exit(code, "long", targets(0))   # count 0: every load exits
    assert_exit(vm, CR_ACCESS, 0x3, rip=0x1003)


def _own_cr0(mask: int, shadow: int):
    def setup(vm):
        vm.vmwrite(CR0_GUEST_HOST_MASK, mask)
        vm.vmwrite(CR0_READ_SHADOW, shadow)
    return setup


@pytest.mark.parametrize("mode, code, qualification", [
    ("real", "mov eax, cr0\nor eax, 8\nmov cr0, eax", 0x000),       # CR0, MOV to, EAX
    ("long", "mov rcx, cr0\nor rcx, 8\nmov cr0, rcx", 0x100),       # CR0, MOV to, RCX
])
def test_mov_to_cr0_changing_an_owned_bit_exits(mode, code, qualification):
    """The VMM owns TS (mask bit 3); the guest sets TS, which differs from the shadow."""
    def setup(vm):
        cr0 = field(vm, GUEST_CR0)
        _own_cr0(CR0_NE | CR0_TS, cr0 & ~CR0_TS)(vm)
    vm, _ = first_exit(code, mode, setup)
    assert_exit(vm, CR_ACCESS, qualification, length=3)


@pytest.mark.parametrize("mode", MODES)
def test_mov_to_cr0_leaving_owned_bits_alone_does_not_exit(mode):
    """TS is not owned: the write goes through; owned NE keeps its real value 1 although
    the guest writes the shadow's NE."""
    code = ("mov eax, cr0\nor eax, 8\nmov cr0, eax" if mode == "real"
            else "mov rax, cr0\nor rax, 8\nmov cr0, rax")
    def setup(vm):
        _own_cr0(CR0_NE, field(vm, GUEST_CR0) & ~CR0_NE)(vm)
    vm = assert_no_exit_until_hlt(code, mode, setup)
    cr0 = vm.guest.reg("cr0")
    assert cr0 & CR0_TS and cr0 & CR0_NE


@pytest.mark.parametrize("mode", MODES)
def test_mov_from_cr0_returns_the_read_shadow_for_owned_bits(mode):
    def setup(vm):
        real = field(vm, GUEST_CR0)
        assert not real & CR0_TS
        _own_cr0(CR0_NE | CR0_TS, (real | CR0_TS) & ~CR0_NE)(vm)
    code = "mov ebx, cr0" if mode == "real" else "mov rbx, cr0"
    vm = assert_no_exit_until_hlt(code, mode, setup)
    real = vm.guest.reg("cr0")
    assert vm.regs.rbx & CR0_TS and not real & CR0_TS        # TS from the shadow
    assert not vm.regs.rbx & CR0_NE and real & CR0_NE        # NE from the shadow
    assert vm.regs.rbx & CR0_PE == real & CR0_PE             # PE is the guest's own


@pytest.mark.parametrize("mode, code, qualification", [
    ("real", "mov eax, cr4\nor eax, 0x2000\nmov cr4, eax", 0x004),
    ("long", "mov rcx, cr4\nor rcx, 0x2010\nmov cr4, rcx", 0x104),
])
def test_mov_to_cr4_through_the_mask(mode, code, qualification):
    """The VMM owns VMXE and hides it (shadow 0); the guest setting VMXE exits."""
    def setup(vm):
        vm.vmwrite(CR4_GUEST_HOST_MASK, CR4_VMXE)
        vm.vmwrite(CR4_READ_SHADOW, field(vm, GUEST_CR4) & ~CR4_VMXE)
    vm, _ = first_exit(code, mode, setup)
    assert_exit(vm, CR_ACCESS, qualification, length=3)


@pytest.mark.parametrize("mode", MODES)
def test_cr4_read_shadow_and_unowned_write(mode):
    def setup(vm):
        vm.vmwrite(CR4_GUEST_HOST_MASK, CR4_VMXE)
        vm.vmwrite(CR4_READ_SHADOW, field(vm, GUEST_CR4) & ~CR4_VMXE)
    code = ("mov eax, cr4\nor eax, 0x10\nmov cr4, eax\nmov ebx, cr4" if mode == "real"
            else "mov rax, cr4\nor rax, 0x10\nmov cr4, rax\nmov rbx, cr4")
    vm = assert_no_exit_until_hlt(code, mode, setup)
    assert vm.regs.rbx & CR4_PSE and not vm.regs.rbx & CR4_VMXE
    assert vm.guest.reg("cr4") & (CR4_PSE | CR4_VMXE) == CR4_PSE | CR4_VMXE


def test_clts_and_lmsw():
    """CLTS exits when TS is owned and set in the shadow (qualification type 2); LMSW
    exits when it would set an owned PE that the shadow has clear (type 3, source in
    bits 31:16)."""
    vm, _ = first_exit("clts", "real", _own_cr0(CR0_NE | CR0_TS, CR0_TS))
    assert_exit(vm, CR_ACCESS, 0x20, length=2, rip=0x1000)
    vm, _ = first_exit("mov ax, 0x11\nlmsw ax", "real", _own_cr0(0xF, 0x10))
    assert_exit(vm, CR_ACCESS, 0x0011_0030, length=3, rip=0x1003)


def test_mov_cr8_long_mode():
    vm, _ = first_exit("mov rax, 5\nmov cr8, rax", "long", on(ProcBased.CR8_LOAD_EXITING))
    assert_exit(vm, CR_ACCESS, 0x008, length=4, rip=0x1007)   # CR8, MOV to CR, RAX
    vm, _ = first_exit("mov rcx, cr8", "long", on(ProcBased.CR8_STORE_EXITING))
    assert_exit(vm, CR_ACCESS, 0x118, length=4, rip=0x1000)   # CR8, MOV from CR, RCX
    assert_no_exit_until_hlt("mov rax, 5\nmov cr8, rax\nmov rcx, cr8", "long", hlt_at=0x100F)


# ========================================================================== MOV DR
@pytest.mark.parametrize("mode, code, qualification, length", [
    ("real", "mov eax, dr7", 0x017, 3),    # DR7, MOV from DR (bit 4), EAX
    ("real", "mov dr7, ebx", 0x307, 3),    # DR7, MOV to DR, EBX
    ("long", "mov rax, dr7", 0x017, 3),
    ("long", "mov dr0, r9", 0x900, 4),     # DR0, MOV to DR, R9
])
def test_mov_dr(mode, code, qualification, length):
    vm, _ = first_exit(code, mode, on(ProcBased.MOV_DR_EXITING))
    assert_exit(vm, DR_ACCESS, qualification, length=length, rip=0x1000)


@pytest.mark.parametrize("mode", MODES)
def test_mov_dr_without_control_does_not_exit(mode):
    assert_no_exit_until_hlt("mov eax, dr7" if mode == "real" else "mov rax, dr7", mode,
                             hlt_at=0x1003)


# ============================================================================== I/O
@pytest.mark.parametrize("mode, code, qualification, length, rip", [
    ("real", "mov dx, 0x3f8\nout dx, al", 0x03F8_0000, 1, 0x1003),
    ("long", "mov dx, 0x3f8\nout dx, al", 0x03F8_0000, 1, 0x1004),
    ("real", "in al, 0x60", 0x0060_0048, 2, 0x1000),     # IN, immediate, 1 byte
    ("long", "in al, 0x60", 0x0060_0048, 2, 0x1000),
    ("real", "out 0x80, al", 0x0080_0040, 2, 0x1000),    # OUT, immediate
    ("real", "in ax, 0x60", 0x0060_0049, 2, 0x1000),     # 2 bytes (size code 1)
    ("long", "xor edx, edx\nin eax, dx", 0x0000_000B, 1, 0x1002),   # 4 bytes (code 3), DX = 0
])
def test_io_with_unconditional_io_exiting(mode, code, qualification, length, rip):
    vm, _ = first_exit(code, mode)   # the VM's default: unconditional I/O exiting
    assert_exit(vm, IO_INSTRUCTION, qualification, length=length, rip=rip)


@pytest.mark.parametrize("mode, code, qualification, length, linear", [
    # REP OUTSB: string (bit 4), REP (bit 5), DX; guest-linear address = DS:SI
    ("real", "mov dx, 0x3f8\nmov si, 0x2000\nmov cx, 3\nrep outsb", 0x03F8_0030, 2, 0x2000),
    ("real", "mov ax, 0x100\nmov ds, ax\nmov dx, 0x3f8\nmov si, 0x20\noutsb", 0x03F8_0010, 1, 0x1020),
    ("real", "mov dx, 0x60\nmov di, 0x2000\nmov cx, 2\nrep insb", 0x0060_0038, 2, 0x2000),
    ("long", "mov dx, 0x3f8\nmov rsi, 0x2000\nouts dx, word ptr [rsi]", 0x03F8_0011, 2, 0x2000),
])
def test_string_io(mode, code, qualification, length, linear):
    vm, _ = first_exit(code, mode)
    assert_exit(vm, IO_INSTRUCTION, qualification, length=length)
    assert field(vm, GUEST_LINEAR_ADDRESS) == linear


def test_rep_outsb_prints_through_the_vmm():
    vm = make_vm("mov dx, 0x3f8\nmov si, msg\nmov cx, 3\nrep outsb\nhlt\nmsg: db 'abc'")
    summary = vm.run()
    assert summary.state is VmState.HALTED
    assert vm.output == "abc"
    assert [e.reason for e in vm.trace.exits] == ["IO_INSTRUCTION", "HLT"]


def io_bitmaps(*ports):
    def setup(vm):
        vm.set_control(ProcBased.USE_IO_BITMAPS)
        vm.set_io_intercept(ports)
    return setup


@pytest.mark.parametrize("mode, code, ports, qualification", [
    ("real", "mov dx, 0x3f8\nout dx, al", [0x3F8], 0x03F8_0000),            # bitmap A
    ("real", "mov dx, 0x8000\nin ax, dx", [0x8000], 0x8000_0009),           # bitmap B, first port
    ("long", "mov dx, 0xc0de\nout dx, eax", [0xC0DE], 0xC0DE_0003),         # bitmap B
    ("real", "mov dx, 0x3f8\nout dx, ax", [0x3F9], 0x03F8_0001),            # 2nd byte of a word
    ("real", "mov dx, 0x7fff\nout dx, ax", [0x8000], 0x7FFF_0001),          # word spans A and B
    ("real", "mov dx, 0xffff\nout dx, eax", [], 0xFFFF_0003),               # wraps: always exits
])
def test_io_bitmaps_exit(mode, code, ports, qualification):
    vm, _ = first_exit(code, mode, io_bitmaps(*ports))
    assert_exit(vm, IO_INSTRUCTION, qualification)


@pytest.mark.parametrize("mode, code, ports", [
    ("real", "mov dx, 0x3f8\nout dx, al", [0x3F9]),
    ("long", "mov dx, 0xc0de\nout dx, eax", [0x40DE]),   # same bit number, but bitmap A
    ("real", "mov dx, 0x3f8\nout dx, al", []),           # bitmaps override unconditional exiting
])
def test_io_bitmaps_let_other_ports_through(mode, code, ports):
    vm = assert_no_exit_until_hlt(code, mode, io_bitmaps(*ports))


def test_io_without_any_io_exiting_reaches_the_device_directly():
    vm = make_vm("mov dx, 0x3f8\nmov al, 'k'\nout dx, al", "real", off(ProcBased.UNCOND_IO_EXITING))
    assert vm.run().state is VmState.HALTED
    assert vm.output == "k"
    assert [e.reason for e in vm.trace.exits] == ["HLT"]


def test_io_at_cpl3_faults_before_it_exits():
    """IN at CPL 3 > IOPL raises #GP(0); that has priority over the I/O exit (26.1.1)."""
    vm, _ = first_exit(TO_USER_64 + "in al, 0x60", "long", exception_bitmap(13))
    assert_exit(vm, EXCEPTION_NMI, length=None, rip=0x1018)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_GP
    assert field(vm, VM_EXIT_INTR_ERROR_CODE) == 0


# ============================================================================ MSRs
def msr_bitmap(msr: int, read: bool | None = None, write: bool | None = None):
    def setup(vm):
        vm.cpu.memory.write(vm.msr_bitmap, bytes(4096))   # nothing intercepted ...
        if read is not None or write is not None:
            vm.set_msr_intercept(msr, read=read, write=write)   # ... but this
    return setup


RDMSR_174 = "mov ecx, 0x174\nrdmsr"                      # IA32_SYSENTER_CS (low range)
WRMSR_174 = "mov ecx, 0x174\nxor eax, eax\nxor edx, edx\nwrmsr"
RDMSR_EFER = "mov ecx, 0xc0000080\nrdmsr"                # IA32_EFER (high range)


@pytest.mark.parametrize("mode", MODES)
def test_msr_accesses_always_exit_without_msr_bitmaps(mode):
    vm, _ = first_exit(RDMSR_174, mode, off(ProcBased.USE_MSR_BITMAPS))
    assert_exit(vm, MSR_READ, 0, length=2)
    vm, _ = first_exit(WRMSR_174, mode, off(ProcBased.USE_MSR_BITMAPS))
    assert_exit(vm, MSR_WRITE, 0, length=2)


@pytest.mark.parametrize("mode", MODES)
def test_msr_bitmap_read_and_write_halves(mode):
    # read intercepted: RDMSR exits, WRMSR of the same MSR does not
    vm, _ = first_exit(RDMSR_174, mode, msr_bitmap(0x174, read=True))
    assert_exit(vm, MSR_READ)
    assert_no_exit_until_hlt(WRMSR_174, mode, msr_bitmap(0x174, read=True))
    # write intercepted: the other way round
    vm, _ = first_exit(WRMSR_174, mode, msr_bitmap(0x174, write=True))
    assert_exit(vm, MSR_WRITE)
    assert_no_exit_until_hlt(RDMSR_174, mode, msr_bitmap(0x174, write=True))


def test_msr_bitmap_high_range():
    vm, _ = first_exit(RDMSR_EFER, "long", msr_bitmap(0xC000_0080, read=True))
    assert_exit(vm, MSR_READ, length=2, rip=0x1005)
    assert_no_exit_until_hlt(RDMSR_EFER, "long", msr_bitmap(0xC000_0081, read=True))
    # the low-range bit with the same number (80H) does not intercept C0000080H
    assert_no_exit_until_hlt(RDMSR_EFER, "long", msr_bitmap(0x80, read=True))
    # the write half of the high range: IA32_KERNEL_GS_BASE (C0000102H)
    wrmsr = "mov ecx, 0xc0000102\nxor eax, eax\nxor edx, edx\nwrmsr"
    vm, _ = first_exit(wrmsr, "long", msr_bitmap(0xC000_0102, write=True))
    assert_exit(vm, MSR_WRITE, length=2)
    assert_no_exit_until_hlt(wrmsr, "long", msr_bitmap(0xC000_0102, read=True))


def test_msrs_outside_the_bitmap_ranges_always_exit():
    vm, _ = first_exit("mov ecx, 0x40000000\nrdmsr", "long", msr_bitmap(0))
    assert_exit(vm, MSR_READ)


def test_the_vmm_answers_rdmsr_from_its_store():
    vm = make_vm("mov ecx, 0x277\nrdmsr", "long")    # IA32_PAT
    assert vm.run().state is VmState.HALTED
    assert (vm.regs.rdx << 32) | vm.regs.rax == 0x0007_0406_0007_0406


# =========================================================== descriptor-table exiting
@pytest.mark.parametrize("mode, code, identity", [
    ("real", "sgdt [0x500]", 0), ("real", "sidt [0x500]", 1),
    ("real", "lgdt [0x500]", 2), ("real", "lidt [0x500]", 3),
    ("long", "sgdt [0x500]", 0), ("long", "sidt [0x500]", 1),
    ("long", "lgdt [0x500]", 2), ("long", "lidt [0x500]", 3),
])
def test_gdtr_idtr_exits(mode, code, identity):
    """Reason 46; qualification = displacement (RIP-relative in long mode: the address)."""
    vm, _ = first_exit(code, mode, on(ProcBased2.DESC))
    assert_exit(vm, GDTR_IDTR, 0x500, length=5 if mode == "real" else 7, rip=0x1000)
    assert (field(vm, VMX_INSTRUCTION_INFO) >> 28) & 3 == identity


@pytest.mark.parametrize("code, identity", [
    ("sldt ax", 0), ("str ax", 1), ("lldt ax", 2), ("ltr ax", 3),
])
def test_ldtr_tr_exits(code, identity):
    vm, _ = first_exit(code, "long", on(ProcBased2.DESC))
    assert_exit(vm, LDTR_TR, 0, rip=0x1000)   # register operand: no displacement
    info = field(vm, VMX_INSTRUCTION_INFO)
    assert (info >> 28) & 3 == identity
    assert info & (1 << 10)                    # register operand ...
    assert (info >> 3) & 0xF == 0              # ... RAX (register 0)


@pytest.mark.parametrize("mode, code, info", [
    # Table 28-10: SGDT [RBX+8]: address size 64 (2 << 7), DS (3 << 15), no index (bit 22),
    # base RBX (3 << 23), identity SGDT (0)
    ("long", "mov rbx, 0x600\nsgdt [rbx+8]", 0x01C1_8100),
    # SIDT [BP+SI+4] in real mode: 16-bit address and operand size, SS (2 << 15), index SI
    # (6 << 18), base BP (5 << 23), identity SIDT (1 << 28)
    ("real", "sidt [bp+si+4]", 0x1299_0000),
    # Table 28-11: LLDT [RAX+RCX*8]: scale 3, address size 64, DS, index RCX (1 << 18),
    # base RAX (0), identity LLDT (2 << 28)
    ("long", "lldt [rax+rcx*8]", 0x2005_8103),
    # STR R9W: register operand (bit 10), register 9 in bits 6:3, identity STR (1 << 28)
    ("long", "str r9w", 0x1000_0448),
])
def test_descriptor_table_instruction_information(mode, code, info):
    vm, _ = first_exit(code, mode, on(ProcBased2.DESC))
    assert field(vm, VMX_INSTRUCTION_INFO) == info


@pytest.mark.parametrize("mode", MODES)
def test_descriptor_tables_without_control_do_not_exit(mode):
    assert_no_exit_until_hlt("sgdt [0x500]\nsidt [0x500]", mode)


def test_sldt_in_real_mode_is_ud_not_an_exit():
    """SLDT/STR/LLDT/LTR are not recognized in real-address mode (#UD, SDM Vol. 2)."""
    vm, _ = first_exit("sldt ax", "real", both(on(ProcBased2.DESC), exception_bitmap(6)))
    assert_exit(vm, EXCEPTION_NMI)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_UD


def test_sgdt_at_cpl3_exits_but_lgdt_faults():
    """SGDT is not privileged - it exits at CPL 3; LGDT raises #GP(0) first."""
    vm, _ = first_exit(TO_USER_64 + "sgdt [0x30000]", "long",
                       both(on(ProcBased2.DESC), exception_bitmap(13)))
    assert_exit(vm, GDTR_IDTR, 0x30000, rip=0x1018)
    vm, _ = first_exit(TO_USER_64 + "lgdt [0x30000]", "long",
                       both(on(ProcBased2.DESC), exception_bitmap(13)))
    assert_exit(vm, EXCEPTION_NMI, rip=0x1018)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_GP


def test_the_vmm_emulates_sgdt():
    vm = make_vm("sgdt [0x500]", "long", on(ProcBased2.DESC))
    assert vm.run().state is VmState.HALTED
    base, limit = field(vm, 0x6816), field(vm, 0x4810)   # GUEST_GDTR_BASE, GUEST_GDTR_LIMIT
    assert vm.guest.read_u16(0x500) == limit
    assert vm.guest.read_u64(0x502) == base


# ============================================================== exceptions and events
@pytest.mark.parametrize("mode", MODES)
def test_ud2_exits_through_the_exception_bitmap(mode):
    vm, _ = first_exit("nop\nud2", mode, exception_bitmap(6))
    assert_exit(vm, EXCEPTION_NMI, 0, rip=0x1001)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_UD


@pytest.mark.parametrize("mode, setup", [
    ("real", ivt_handler(6, "mov bx, 0x66\nhlt")),
    ("long", idt_gate(6, "mov rbx, 0x66\nhlt")),
])
def test_ud2_without_bitmap_bit_goes_to_the_guest(mode, setup):
    vm = assert_no_exit_until_hlt("ud2", mode, setup, hlt_at=0x1800 + (3 if mode == "real" else 7))
    assert vm.regs.rbx == 0x66


@pytest.mark.parametrize("mode", MODES)
def test_int3_is_a_software_exception(mode):
    vm, _ = first_exit("nop\nint3", mode, exception_bitmap(3))
    assert_exit(vm, EXCEPTION_NMI, 0, length=1, rip=0x1001)   # RIP of the INT3 itself
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_BP


def test_int3_reflected_by_the_vmm_reaches_the_guest_handler():
    vm = make_vm("int3", "real", both(exception_bitmap(3), ivt_handler(3, "mov bx, 3\nhlt")))
    assert vm.run().state is VmState.HALTED
    assert [e.reason for e in vm.trace.exits] == ["EXCEPTION_NMI", "HLT"]
    assert vm.regs.rbx == 3
    # INT3 is a trap: the return address pushed is the instruction after it (1001H)
    assert vm.guest.read_u16(vm.regs.rsp) == 0x1001


def test_int_n_is_not_filtered_by_the_exception_bitmap():
    """INT 6 is a software interrupt, not the #UD exception (SDM 26.2)."""
    assert_no_exit_until_hlt("int 6", "real", both(exception_bitmap(6),
                                                  ivt_handler(6, "mov bx, 6\nhlt")))


PF_WRITE = "mov qword ptr [0x80000008], 1"   # 2 GiB + 8: not mapped by vtlab's page tables
PF_READ = "mov rax, [0x80000008]"


@pytest.mark.parametrize("code, error_code", [(PF_READ, 0x0), (PF_WRITE, 0x2)])
def test_page_fault_exit_qualification_and_error_code(code, error_code):
    vm, _ = first_exit(code, "long", exception_bitmap(14))
    assert_exit(vm, EXCEPTION_NMI, 0x8000_0008, rip=0x1000)   # qualification: linear address
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_PF
    assert field(vm, VM_EXIT_INTR_ERROR_CODE) == error_code


def test_page_fault_exit_does_not_load_cr2():
    """SDM 28.1: a #PF that causes a VM exit leaves CR2 unchanged."""
    vm, _ = first_exit(PF_READ, "long",
                       both(exception_bitmap(14), lambda vm: vm.guest.set_reg("cr2", 0x1234)))
    assert vm.guest.reg("cr2") == 0x1234


@pytest.mark.parametrize("bit14, mask, match, code, exits", [
    # bit 14 = 1: exit iff (error code AND mask) = match
    (1, 0x2, 0x2, PF_WRITE, True),
    (1, 0x2, 0x2, PF_READ, False),
    (1, 0x0, 0x0, PF_READ, True),
    # bit 14 = 0: exit iff (error code AND mask) != match
    (0, 0x2, 0x2, PF_READ, True),
    (0, 0x2, 0x2, PF_WRITE, False),
    (0, 0x0, 0x0, PF_WRITE, False),
])
def test_page_fault_error_code_mask_and_match(bit14, mask, match, code, exits):
    def setup(vm):
        vm.vmwrite(EXCEPTION_BITMAP, bit14 << 14)
        vm.vmwrite(PAGE_FAULT_ERROR_CODE_MASK, mask)
        vm.vmwrite(PAGE_FAULT_ERROR_CODE_MATCH, match)
        idt_gate(14, "pop rbx\nmov rcx, cr2\nhlt")(vm)
    vm, _ = first_exit(code, "long", setup)
    if exits:
        assert_exit(vm, EXCEPTION_NMI, 0x8000_0008, rip=0x1000)
    else:   # delivered to the guest's #PF handler: error code on the stack, CR2 loaded
        assert_exit(vm, HLT, rip=0x1804)   # after POP RBX (1 byte) and MOV RCX, CR2 (3)
        assert vm.regs.rbx == (0x2 if code == PF_WRITE else 0x0)
        assert vm.regs.rcx == 0x8000_0008


def test_page_fault_reflected_by_the_vmm_sets_cr2():
    vm = make_vm(PF_WRITE, "long", both(exception_bitmap(14),
                                       idt_gate(14, "pop rbx\nmov rcx, cr2\nhlt")))
    assert vm.run().state is VmState.HALTED
    assert [e.reason for e in vm.trace.exits] == ["EXCEPTION_NMI", "HLT"]
    assert (vm.regs.rbx, vm.regs.rcx) == (0x2, 0x8000_0008)


@pytest.mark.parametrize("mode", MODES)
def test_external_interrupt_exits_with_ext_intr_mask(mode):
    vm, _ = first_exit("nop", mode, lambda vm: vm.raise_interrupt(0x20))
    assert_exit(vm, EXTERNAL_INTERRUPT, 0, rip=0x1000)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_EXT_20H   # "acknowledge interrupt on exit"


def test_external_interrupt_info_invalid_without_acknowledge_on_exit():
    vm, _ = first_exit("nop", "real", both(off(ExitControl.ACK_INTR_ON_EXIT),
                                          lambda vm: vm.raise_interrupt(0x20)))
    assert_exit(vm, EXTERNAL_INTERRUPT)
    assert field(vm, VM_EXIT_INTR_INFO) >> 31 == 0


def test_external_interrupt_without_ext_intr_mask_goes_to_the_guest():
    def setup(vm):
        vm.set_control(PinBased.EXT_INTR_MASK, False)
        vm.vmwrite(0x6820, 0x202)    # GUEST_RFLAGS: IF = 1
        ivt_handler(0x20, "mov bx, 0x20\nhlt")(vm)
        vm.raise_interrupt(0x20)
    vm = assert_no_exit_until_hlt("nop\nnop", "real", setup, hlt_at=0x1803)
    assert vm.regs.rbx == 0x20
    assert vm.guest.read_u16(vm.regs.rsp) == 0x1000   # interrupted before its first NOP


def test_external_interrupt_waits_while_the_guest_has_if_clear():
    def setup(vm):
        vm.set_control(PinBased.EXT_INTR_MASK, False)
        ivt_handler(0x20, "mov bx, 0x20\nhlt")(vm)
        vm.raise_interrupt(0x20)
    vm = assert_no_exit_until_hlt("cli\nnop", "real", setup, hlt_at=0x1002)
    assert vm.regs.rbx == 0
    assert vm.cpu.monitor.pending_interrupts == [0x20]


@pytest.mark.parametrize("mode", MODES)
def test_nmi_exits_with_nmi_exiting(mode):
    vm, _ = first_exit("nop", mode, lambda vm: vm.raise_nmi())
    assert_exit(vm, EXCEPTION_NMI, 0, rip=0x1000)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_NMI


def test_nmi_without_nmi_exiting_goes_to_vector_2():
    def setup(vm):
        vm.set_control(PinBased.NMI_EXITING, False)
        ivt_handler(2, "mov bx, 2\nhlt")(vm)
        vm.raise_nmi()
    vm = assert_no_exit_until_hlt("nop", "real", setup, hlt_at=0x1803)
    assert vm.regs.rbx == 2


# ==================================================================== EPT violations
def unmapped(page: int):
    return lambda vm: vm.ept_unmap(page, 0x1000)


@pytest.mark.parametrize("mode, code, qualification, gpa, rip", [
    # bit 0 read / 1 write / 2 fetch; bits 5:3 = what the EPT allowed (nothing);
    # bit 7 guest-linear address valid, bit 8 access to the translated address
    ("real", "mov ax, [0x5000]", 0x181, 0x5000, 0x1000),
    ("real", "mov word ptr [0x5004], 1", 0x182, 0x5004, 0x1000),
    ("real", "jmp 0x5000", 0x184, 0x5000, 0x5000),
    ("long", "mov rax, [0x5008]", 0x181, 0x5008, 0x1000),
    ("long", "mov qword ptr [0x5010], 1", 0x182, 0x5010, 0x1000),
])
def test_ept_violation(mode, code, qualification, gpa, rip):
    vm, _ = first_exit(code, mode, unmapped(0x5000))
    assert_exit(vm, EPT_VIOLATION, qualification, rip=rip)
    assert field(vm, GUEST_PHYSICAL_ADDRESS) == gpa
    assert field(vm, GUEST_LINEAR_ADDRESS) == gpa   # bit 7: valid; identity-mapped here


def test_ept_violation_reports_the_permissions_granted():
    """A write to a read-only page: write access (bit 1), readable (bit 3)."""
    vm, _ = first_exit("mov word ptr [0x5004], 1", "real", lambda vm: vm.ept_map(0x5000, 0x1000, 1))
    assert_exit(vm, EPT_VIOLATION, 0x18A)
    assert_no_exit_until_hlt("mov ax, [0x5004]", "real", lambda vm: vm.ept_map(0x5000, 0x1000, 1))


@pytest.mark.parametrize("mode", MODES)
def test_mapped_pages_do_not_exit(mode):
    assert_no_exit_until_hlt("mov ax, [0x6000]\nmov word ptr [0x6002], 1", mode, unmapped(0x5000))


def test_the_vmm_maps_the_page_and_resumes():
    vm = make_vm("mov word ptr [0x5004], 0x77", "real", unmapped(0x5000))
    assert vm.run().state is VmState.HALTED
    assert [e.reason for e in vm.trace.exits] == ["EPT_VIOLATION", "HLT"]
    assert vm.guest.read_u16(0x5004) == 0x77


# ======================================================= CPL and privileged instructions
@pytest.mark.parametrize("code, reason", [("cpuid", CPUID), ("vmcall", VMCALL)])
def test_unconditional_exits_happen_at_cpl3(code, reason):
    vm, e = first_exit(TO_USER_64 + code, "long")
    assert_exit(vm, reason, rip=0x1018)
    assert e.cpl == 3


@pytest.mark.parametrize("code", ["hlt", "rdmsr", "mov rax, cr3", "invd"])
def test_privileged_instructions_at_cpl3_fault_before_exiting(code):
    def setup(vm):
        exception_bitmap(13)(vm)
        vm.set_control(ProcBased.CR3_STORE_EXITING)
    vm, _ = first_exit(TO_USER_64 + code, "long", setup)
    assert_exit(vm, EXCEPTION_NMI, rip=0x1018)
    assert field(vm, VM_EXIT_INTR_INFO) == INFO_GP


# ======================================================== the exit path and the VMM
def test_exit_saves_guest_state():
    vm, _ = first_exit("mov ax, 0x1234\nmov bx, 0x7000\nmov sp, bx\ncpuid", "real")
    assert field(vm, GUEST_RIP) == 0x1008            # the CPUID itself (3 + 3 + 2 bytes on)
    assert field(vm, 0x681C) == 0x7000                # GUEST_RSP
    assert field(vm, 0x6820) & 0x2                    # GUEST_RFLAGS (bit 1 always set)
    assert vm.regs.rax & 0xFFFF == 0x1234


def test_vmwrite_guest_rip_takes_effect_at_vmresume():
    vm = make_vm("cpuid\nmov ax, 1\nhlt\nmov ax, 2")

    def handler(vm, exit):
        assert vm.vmread(GUEST_RIP) == 0x1000
        vm.vmwrite(GUEST_RIP, 0x1006)   # skip CPUID (2), MOV AX (3) and HLT (1)
        vm.regs.rbx = 0x77
        return True
    vm.handlers[ExitReason.CPUID] = handler
    summary = vm.run()
    assert summary.state is VmState.HALTED
    assert vm.regs.rax & 0xFFFF == 2
    assert vm.regs.rbx == 0x77
    assert [(e.reason, e.guest_rip) for e in vm.trace.exits] == [("CPUID", 0x1000), ("HLT", 0x1009)]


def test_register_writes_by_the_handler_take_effect():
    vm = make_vm("vmcall\nmov [0x600], rax", "long")

    @vm.handler(ExitReason.VMCALL)
    def hypercall(vm, exit):
        vm.regs.rax = 0xFEED
        vm.skip_instruction()
        return True
    assert vm.run().state is VmState.HALTED
    assert vm.guest.read_u64(0x600) == 0xFEED


SUM_PROGRAM = """
    xor ax, ax
    mov cx, 1
again:
    add ax, cx          ; ax = 1 + 2 + ... + 10
    inc cx
    cmp cx, 11
    jne again
    mov bl, 10
    div bl              ; al = tens, ah = ones
    mov bx, ax
    mov dx, 0x3f8
    mov al, bl
    add al, '0'
    out dx, al
    mov al, bh
    add al, '0'
    out dx, al
    mov al, 10
    out dx, al
    hlt
"""


def test_real_mode_sum_prints_and_exits_exactly_as_expected():
    vm = VirtualMachine(SUM_PROGRAM, mode="real")
    summary = vm.run()
    assert summary.state is VmState.HALTED
    assert vm.output == "55\n"
    assert [e.reason for e in vm.trace.exits] == [
        "IO_INSTRUCTION", "IO_INSTRUCTION", "IO_INSTRUCTION", "HLT"]
    assert [e.reason_number for e in vm.trace.exits] == [30, 30, 30, 12]
    assert [e.qualification for e in vm.trace.exits] == [0x03F8_0000] * 3 + [0]
    assert [e.instruction_length for e in vm.trace.exits] == [1, 1, 1, 1]
    assert summary.exits == 4


def test_serial_line_status_register_polling():
    """A polling driver reads LSR (3FDH) until THRE (bit 5) is set, then writes THR."""
    program = """
        mov dx, 0x3fd
    poll:
        in al, dx
        test al, 0x20
        jz poll
        mov dx, 0x3f8
        mov al, 'Z'
        out dx, al
    """
    vm = make_vm(program)
    assert vm.run().state is VmState.HALTED
    assert vm.output == "Z"
    assert [(e.reason, e.qualification) for e in vm.trace.exits] == [
        ("IO_INSTRUCTION", 0x03FD_0008), ("IO_INSTRUCTION", 0x03F8_0000), ("HLT", 0)]


def test_debug_port_output():
    vm = make_vm("mov al, 'e'\nout 0xe9, al")
    vm.run()
    assert vm.output == "e"
    assert vm.trace.exits[0].qualification == 0x00E9_0040


def test_handler_exception_raises_handler_error_naming_the_exit():
    vm = make_vm("mov ax, 7\ncpuid")

    @vm.handler(ExitReason.CPUID)
    def broken(vm, exit):
        raise KeyError("oops")
    with pytest.raises(HandlerError) as info:
        vm.run()
    text = str(info.value)
    assert "CPUID" in text and "10" in text and "broken" in text and "0x1003" in text
    assert vm.state is VmState.ERROR
    # still inspectable
    assert vm.trace.exits[-1].reason == "CPUID"
    assert len(vm.trace.to_dataframe()) == 1
    assert field(vm, VM_EXIT_REASON) == CPUID
    assert vm.regs.rax & 0xFFFF == 7


def test_runaway_guest_ends_with_budget():
    vm = VirtualMachine("spin: jmp spin", mode="real")
    summary = vm.run(max_instructions=50_000)
    assert summary.state is VmState.BUDGET
    assert "instruction budget" in summary.message
    vm = VirtualMachine("spin: cpuid\njmp spin", mode="long")
    summary = vm.run(max_exits=25)
    assert summary.state is VmState.BUDGET
    assert "exit budget" in summary.message
    assert len(vm.trace) == 25


def test_trace_records_entries_and_exits():
    vm = make_vm("cpuid")
    vm.run()
    df = vm.trace.to_dataframe(include_entries=True)
    assert list(df["event"]) == ["entry", "exit", "entry", "exit"]
    exits = vm.trace.to_dataframe()
    assert list(exits["reason_number"]) == [CPUID, HLT]
    assert list(exits["guest_rip"]) == [0x1000, 0x1002]

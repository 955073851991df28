"""The course's guests with EPT on and off (issue 17: "run unchanged with EPT on and off").

With ``ept=False`` there is no unrestricted guest, so VM entry needs CR0.PE = CR0.PG = 1
(SDM Vol. 3C 27.3.1.1; IA32_VMX_CR0_FIXED0, A.7).  A protected-mode guest with paging
off then runs on the VMM's identity page table (vtlab.vmm.unpaged); the exits that
scheme adds are CR-access exits (basic exit reason 28, SDM Vol. 3C Table C-1): MOV
to/from CR3 (CR3-load/-store exiting while the guest's paging is off) and MOV to CR0/CR4
that change the bits the VMM owns through the guest/host masks (CR0.PG, CR4.PSE/PAE,
SDM Vol. 3C 26.1.3).  A real-mode guest runs in virtual-8086 mode (vtlab.vmm.v86) on the
same table, at CPL 3 (SDM Vol. 3B 21.2.7): its exits are those with EPT on, except that
each HLT exit (basic reason 12) is an exception exit (reason 0) for #GP (vector 13,
SDM Vol. 3A Table 6-1), because the privilege check comes before the HLT exit (SDM Vol.
3C 26.1.1); the VMM emulates that HLT.
"""
from __future__ import annotations

import pytest

from vtlab.arch.controls import ProcBased
from vtlab.arch.msrs import Cr0, Msr
from vtlab.arch.vmcs_fields import VmcsField as F
from vtlab.lab import guests
from vtlab.vmm.machine import VirtualMachine
from vtlab.vmm.state import VmState

CR_ACCESS = 28       # SDM Vol. 3C Table C-1: "Control-register accesses"
EXCEPTION_NMI = 0    # SDM Vol. 3C Table C-1: "Exception or non-maskable interrupt (NMI)"
HLT = 12             # SDM Vol. 3C Table C-1: "Guest software attempted to execute HLT"
# VM-exit interruption information (SDM Vol. 3C 25.9.2, Table 25-19): vector 13 (#GP) in
# bits 7:0, type 3 (hardware exception) in bits 10:8, bit 11 error code valid, bit 31 valid.
GP_EXIT_INFO = 0x8000_0B0D
INVALID_STATE = 33   # SDM Vol. 3C Table C-1: "VM-entry failure due to invalid guest state"
# CR-access exit qualification (SDM Vol. 3C Table 28-3): bits 3:0 the control register,
# bits 5:4 the access type (0 = MOV to CR, 1 = MOV from CR).
_CR_NUMBER = 0xF


def _exits(vm: VirtualMachine) -> list[tuple]:
    return [(e.reason_number, e.qualification, e.guest_rip) for e in vm.trace.exits]


def _added_by_the_scheme(on: list[tuple], off: list[tuple]) -> list[tuple]:
    """The exits of ``off`` beyond those of ``on``: ``on`` must be a subsequence of ``off``."""
    added, i = [], 0
    for exit_ in off:
        if i < len(on) and exit_ == on[i]:
            i += 1
        else:
            added.append(exit_)
    assert i == len(on), f"exits with EPT on missing with EPT off: {on[i:i + 5]} ..."
    return added


def _as_v86(exits: list[tuple]) -> list[tuple]:
    """Exits with EPT on as virtual-8086 mode has them: each HLT exit (qualification 0) is
    a #GP exception exit at the same RIP (qualification 0 too, SDM Vol. 3C 28.2.1)."""
    return [(EXCEPTION_NMI, 0, rip) if reason == HLT else (reason, q, rip) for reason, q, rip in exits]


def _compare(make, **run) -> tuple[VirtualMachine, VirtualMachine, list[tuple]]:
    vm_on, vm_off = make(True), make(False)
    s_on, s_off = vm_on.run(max_seconds=60, **run), vm_off.run(max_seconds=60, **run)
    assert s_on.state is VmState.HALTED, s_on.message
    assert s_off.state is s_on.state, s_off.message
    assert vm_off.output == vm_on.output
    on = _exits(vm_on)
    if vm_off.v86 is not None:
        assert s_off.instructions == s_on.instructions  # the same guest code ran, natively
        assert vm_on.v86 is None and vm_off.unpaged is None
        assert vm_off.v86.emulated_hlts == sum(e[0] == HLT for e in on) > 0
        assert vm_off.last_exit.intr_info == GP_EXIT_INFO
        on = _as_v86(on)
    added = _added_by_the_scheme(on, _exits(vm_off))
    for reason, qualification, rip in added:
        assert reason == CR_ACCESS and qualification & _CR_NUMBER in (0, 3, 4), (reason, hex(rip))
    return vm_on, vm_off, added


# ------------------------------------------------------------------ the workloads
PROTECTED_OR_LONG = [n for n in guests.names() if guests.info(n).mode != "real"]
REAL = [n for n in guests.names() if guests.info(n).mode == "real"]


@pytest.mark.parametrize("name", PROTECTED_OR_LONG)
def test_workload_runs_the_same_with_ept_off(name):
    _compare(lambda ept: guests.make_vm(name, ept=ept))


@pytest.mark.parametrize("name", REAL)
def test_real_mode_workload_runs_the_same_in_virtual_8086_mode(name):
    vm_on, vm_off, added = _compare(lambda ept: guests.make_vm(name, ept=ept))
    assert added == []     # v86 adds no exit: it turns HLT exits into #GP exits (_as_v86)
    assert vm_off.v86.emulated_hlts >= 1


# ------------------------------------------------------------------ notebook guests
def test_nb02_real_mode_cpuid_guest_in_virtual_8086_mode():
    vm_on, vm_off, added = _compare(lambda ept: VirtualMachine("mov eax, 1\ncpuid\nhlt", mode="real",
                                                               ept=ept), max_exits=10)
    assert added == [] and vm_off.regs["ecx"] == vm_on.regs["ecx"]
    # CPUID.1:ECX bit 5 (VMX) hidden, bit 31 (hypervisor present) set (SDM Vol. 2A, CPUID).
    assert vm_off.regs["ecx"] >> 5 & 1 == 0 and vm_off.regs["ecx"] >> 31 & 1 == 1
    # The guest ran at CPL 3 (virtual-8086 mode, SDM Vol. 3B 21.2.7), not CPL 0.
    assert [e.cpl for e in vm_off.trace.exits] == [3, 3] and vm_on.trace.exits[0].cpl == 0


NB02_BOOT_GUEST = """
    mov ax, 0x1234
    add ax, 1
    cli
    mov eax, 0
    cpuid
    mov eax, 4
    mov ebx, 40
    mov ecx, 2
    vmcall
    hlt
"""


def test_nb02_boot_guest_with_vmcall_in_virtual_8086_mode():
    # VMCALL exits (reason 18) in non-root operation before any virtual-8086 check (SDM
    # Vol. 3C 31.3, VMCALL); CLI runs natively, IOPL = 3 (SDM Vol. 3B 21.2.7).
    vm_on, vm_off, added = _compare(lambda ept: VirtualMachine(NB02_BOOT_GUEST, mode="real", ept=ept),
                                    max_exits=10)
    assert added == [] and [e[0] for e in _exits(vm_off)] == [10, 18, 0]
    assert vm_off.regs["eax"] == 42 and vm_off.regs["eax"] == vm_on.regs["eax"]


NB03_BOOT_SECTOR = """
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7C00
    mov si, msg
    mov dx, 0xE9
next:
    lodsb
    test al, al
    jz done
    out dx, al
    jmp next
done:
    hlt
msg: db "boot ok", 0
"""


def test_nb03_boot_sector_at_7c00_in_virtual_8086_mode():
    vm_on, vm_off, added = _compare(lambda ept: VirtualMachine(NB03_BOOT_SECTOR, mode="real", load=0x7C00,
                                                               ept=ept), max_exits=50)
    assert added == [] and vm_off.output == "boot ok"
    # 7 OUTs: I/O exits (reason 30, SDM Vol. 3C Table C-1), the TSS's I/O bitmap all 0
    # (SDM Vol. 1 19.5.2), then the #GP of HLT.
    assert [e[0] for e in _exits(vm_off)] == [30] * 7 + [0]


def test_nb04_cpuid_guest_in_virtual_8086_mode():
    vm_on, vm_off, added = _compare(lambda ept: VirtualMachine("mov eax, 0\ncpuid\nmov ebx, eax\nhlt",
                                                               mode="real", ept=ept), max_exits=10)
    assert added == [] and vm_off.regs["ebx"] == vm_on.regs["ebx"]


def test_virtual_8086_state_the_vmm_sets_up():
    vm = VirtualMachine("hlt", mode="real", ept=False)
    # RFLAGS.VM (bit 17) and IOPL = 3 (bits 13:12), bit 1 always 1 (SDM Vol. 3A 2.3).
    assert vm.vmread(F.GUEST_RFLAGS) & 0x3_3002 == 0x2_3002
    # CR0.PE (bit 0) and PG (bit 31) set underneath, the read shadow keeps the guest's 0s.
    assert vm.vmread(F.GUEST_CR0) & 0x8000_0001 == 0x8000_0001
    assert vm.vmread(F.CR0_READ_SHADOW) & 0x8000_0001 == 0
    # Each segment: base = selector x 16, limit FFFFH, access rights F3H (SDM Vol. 3C 27.3.1.2).
    for seg in ("CS", "SS", "DS", "ES", "FS", "GS"):
        sel = vm.vmread(F[f"GUEST_{seg}_SELECTOR"])
        assert (vm.vmread(F[f"GUEST_{seg}_BASE"]), vm.vmread(F[f"GUEST_{seg}_LIMIT"]),
                vm.vmread(F[f"GUEST_{seg}_AR_BYTES"])) == (sel * 16, 0xFFFF, 0xF3), seg
    # TR: a busy 32-bit TSS (type 11, present: 8BH); its I/O map base (offset 102) is 104,
    # the bitmap all 0, its end byte FFH (SDM Vol. 1 19.5.2; SDM Vol. 3A Figure 8-2).
    assert vm.vmread(F.GUEST_TR_AR_BYTES) == 0x8B
    tss = vm.guest.read(vm.vmread(F.GUEST_TR_BASE), 104 + 8192 + 1)
    assert int.from_bytes(tss[102:104], "little") == 104
    assert tss[104:104 + 8192] == bytes(8192) and tss[-1] == 0xFF
    # #GP intercepted: exception bitmap bit 13.
    assert vm.vmread(F.EXCEPTION_BITMAP) >> 13 & 1


@pytest.mark.parametrize("source, words", [
    ("mov eax, cr0\nhlt", "'mov eax, cr0' at 0x1000 raised #GP in virtual-8086 mode"),
    ("int 0x10\nhlt", "delivery of vector 0x10"),
])
def test_v86_guest_doing_what_the_vmm_does_not_emulate_stops_with_a_message(source, words):
    summary = VirtualMachine(source, mode="real", ept=False).run(max_exits=10)
    assert summary.state is VmState.STOPPED
    for w in (words, "unrestricted guest", "27.3.1.1", "ept=True"):
        assert w in summary.message, w


def test_real_mode_guest_cr0_written_after_bring_up_fails_entry_with_the_explanation():
    # A GUEST_CR0 with PE = 0 (a real-mode guest) that reaches VM entry without unrestricted
    # guest fails the CR0 fixed-bit check (IA32_VMX_CR0_FIXED0 = 80000021H: PE, NE, PG,
    # SDM Vol. 3C A.7 and 27.3.1.1), exit reason 33.
    vm = VirtualMachine("hlt", mode="real", ept=False)
    vm.vmwrite(F.GUEST_CR0, vm.vmread(F.GUEST_CR0) & ~0x8000_0001)
    vm.vmwrite(F.GUEST_RFLAGS, vm.vmread(F.GUEST_RFLAGS) & ~(1 << 17))
    summary = vm.run()
    assert summary.state is VmState.ENTRY_FAILED
    assert vm.trace.exits[-1].reason_number == INVALID_STATE
    assert "0x80000021" in summary.message
    for words in ("unrestricted guest", "virtual-8086 mode", "emulate_invalid_guest_state", "ept=True"):
        assert words in summary.message, words


def test_nb04_memory_read_guest():
    vm_on, vm_off, added = _compare(lambda ept: VirtualMachine(
        "mov eax, [0x5000]\nmov ebx, 1\nhlt", mode="protected", ept=ept))
    assert added == []
    assert vm_off.regs["ebx"] == 1


def test_nb04_wrmsr_rdmsr_guest():
    src = """
        mov ecx, 0x175
        mov eax, 0x8000
        xor edx, edx
        wrmsr
        xor eax, eax
        rdmsr
        mov ebx, eax
        hlt
    """

    def make(ept):
        vm = VirtualMachine(src, mode="protected", ept=ept)
        vm.set_msr_intercept(Msr.IA32_SYSENTER_ESP, read=False, write=True)
        return vm
    _, vm_off, added = _compare(make)
    assert added == [] and vm_off.regs["ebx"] == 0x8000


IO_CR_GUEST = """
    mov al, 0x42
    out 0x80, al
    mov dx, 0x3FD
    in al, dx
    mov dx, 0xE9
    mov ax, 0x4141
    out dx, ax
    mov eax, 0x0A0D4242
    out dx, eax
    mov esi, text
    mov ecx, 3
    rep outsb
    mov edi, 0x700
    mov ecx, 2
    mov dx, 0x3FD
    insb
    mov eax, cr3
    mov cr3, eax
    mov ebx, cr3
    mov eax, cr0
    or eax, 8
    mov cr0, eax
    clts
    hlt
text: db "abc"
"""


def test_nb04_io_and_cr_guest_same_exits_and_same_cr_values():
    def make(ept):
        vm = VirtualMachine(IO_CR_GUEST, mode="protected", ept=ept)
        vm.set_control(ProcBased.CR3_LOAD_EXITING, True)
        vm.set_control(ProcBased.CR3_STORE_EXITING, True)
        vm.vmwrite(F.CR0_GUEST_HOST_MASK, vm.vmread(F.CR0_GUEST_HOST_MASK) | Cr0.TS)
        return vm
    vm_on, vm_off, added = _compare(make)
    assert added == []           # the guest asked for every CR exit itself
    assert vm_off.regs["ebx"] == vm_on.regs["ebx"]
    # What the guest reads of CR0 is the read shadow: PG (bit 31) hidden, PE (bit 0) set.
    assert vm_off.vmread(F.CR0_READ_SHADOW) & (1 << 31) == 0
    assert vm_off.vmread(F.GUEST_CR0) & (1 << 31 | 1) == (1 << 31 | 1)


# ------------------------------------------------------------------ the identity table
def test_unpaged_guest_reads_its_own_cr0_and_cr3():
    src = "mov eax, cr0\nmov ebx, cr3\nhlt"
    vm_on, vm_off, added = _compare(lambda ept: VirtualMachine(src, mode="protected", ept=ept))
    assert vm_off.regs["eax"] == vm_on.regs["eax"] and not vm_off.regs["eax"] & (1 << 31)
    assert vm_off.regs["ebx"] == vm_on.regs["ebx"]
    assert [q & 0x3F for _, q, _ in added] == [0x13]   # MOV from CR3 (type 1, CR 3)
    table = vm_off.unpaged.table
    assert vm_off.vmread(F.GUEST_CR3) == table == vm_off.guest.memory_size - 0x1000
    # PDE 0: a 4-MByte page at 0 with P, R/W, U/S and PS (bits 0, 1, 2, 7; SDM Vol. 3A
    # Table 4-4); PDE 1 maps 4 MBytes up (frame in bits 31:22).  The processor really
    # walked PDE 0: it set its accessed flag, bit 5 (SDM Vol. 3A 4.8).
    pde0 = int.from_bytes(vm_off.guest.read(table, 4), "little")
    pde1 = int.from_bytes(vm_off.guest.read(table + 4, 4), "little")
    assert (pde0 & ~0x20, pde1 & ~0x20) == (0x87, 0x0040_0087)
    assert pde0 & 0x20
    assert vm_off.vmread(F.GUEST_CR4) & 0x10 and not vm_off.vmread(F.GUEST_CR4) & 0x20  # PSE, no PAE


TOGGLE = """
    mov edi, 0x80000
    mov dword [edi], 0x00000083        ; PDE 0: 4 MBytes at 0, P | R/W | PS
    mov dword [edi+4], 0x00000083      ; PDE 1: linear 400000H -> physical 0, an alias
    mov cr3, edi
    mov eax, cr4
    or eax, 0x10                       ; CR4.PSE
    mov cr4, eax
    mov dword [0x5000], 0x12345678
    mov eax, cr0
    or eax, 0x80000000                 ; CR0.PG: the guest's own tables from here
    mov cr0, eax
    mov ebx, [0x405000]                ; through the alias
    mov eax, cr0
    and eax, 0x7fffffff
    mov cr0, eax                       ; paging off: the identity table again
    mov ecx, cr0
    mov edx, cr3
    mov esi, cr4
    hlt
"""


def test_guest_turns_its_paging_on_and_off_with_ept_off():
    vm_on, vm_off, added = _compare(lambda ept: VirtualMachine(TOGGLE, mode="protected", ept=ept))
    for reg in ("ebx", "ecx", "edx", "esi"):
        assert vm_off.regs[reg] == vm_on.regs[reg], reg
    assert vm_off.regs["ebx"] == 0x12345678 and vm_off.regs["edx"] == 0x80000
    # Added: MOV to CR3 (type 0), MOV to CR4 (PSE), MOV to CR0 (PG on), MOV to CR0 (PG off),
    # MOV from CR3 (type 1); qualification bits 5:4 type, 3:0 CR (SDM Vol. 3C Table 28-3).
    assert [q & 0x3F for _, q, _ in added] == [0x03, 0x04, 0x00, 0x00, 0x13]
    assert vm_off.unpaged.switches == 2 and vm_off.unpaged.active
    assert vm_off.vmread(F.GUEST_CR3) == vm_off.unpaged.table


def test_guest_that_clears_pe_with_ept_off_stops_with_a_message():
    vm = VirtualMachine("mov eax, cr0\nand eax, 0xfffffffe\nmov cr0, eax\nhlt", mode="protected", ept=False)
    summary = vm.run()
    assert summary.state is VmState.STOPPED
    assert "cleared CR0.PE" in summary.message and "virtual-8086" in summary.message


@pytest.mark.parametrize("mode", ["paged", "long"])
def test_paged_guests_need_no_identity_table(mode):
    vm = VirtualMachine("hlt", mode=mode, ept=False)
    assert vm.unpaged is None
    assert vm.run().state is VmState.HALTED

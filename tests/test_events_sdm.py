"""Events in VMX non-root operation against the SDM (vtlab/cpu/delivery.py, events.py,
nonroot.py, vmexit.py; vtlab/arch/exceptions.py, qualifications.py; vmm/handlers.py).

Every expected number is written out literally from the Intel SDM, 325462-084US: Vol. 3A
6.12-6.15 (delivery, error codes, the 64-bit frame, Tables 6-4 and 6-5), Vol. 3C 25.9.3
(the IDT-vectoring information format), 26.2, 27.3.1.2 / 27.3.2.2 (virtual-8086 guests),
27.6.1 / 27.6.2 (event injection), 28.2.2 (VM exits due to vectored events), 28.2.4
(information for VM exits during event delivery), 28.2.5 (instruction length) and Table
28-2 (task switches).  Nothing is derived from vtlab's own tables.  Guests are real x86
code; each test stops at an exit and reads the fields with ``vm.vmread()`` as a VMM would.

Interruption-information values (bit 31 valid, bit 11 error code valid, bits 10:8 type -
0 external interrupt, 2 NMI, 3 hardware exception, 4 software interrupt, 5 privileged
software exception, 6 software exception - bits 7:0 vector), error codes (SDM 6.13: bit 0
EXT, bit 1 IDT, bits 15:3 the index) and frames are spelled out in each test.
"""
from __future__ import annotations

import struct

import pytest

from vtlab import Layout, VirtualMachine, VmcsField as F
from vtlab.arch.exceptions import (DOUBLE_FAULT_CONDITIONS, ERROR_CODE_VECTORS, ExceptionClass,
                                   exception_class)
from vtlab.arch.qualifications import TaskSwitchQualification, TaskSwitchSource
from vtlab.cpu.segments import pack_descriptor
from vtlab.vmm.state import VmState

# Basic exit reasons (SDM Appendix C)
EXCEPTION_NMI, TRIPLE_FAULT, TASK_SWITCH, CPUID, HLT = 0, 2, 9, 10, 12
MONITOR_TRAP_FLAG, EPT_VIOLATION = 37, 48

IDT = Layout.IDT

from user_mode import TO_USER_64  # noqa: E402


def gate64(offset: int, selector: int = 0x18, type_: int = 0xE, dpl: int = 0, present: bool = True,
           ist: int = 0) -> bytes:
    """A 16-byte IA-32e gate (SDM Vol. 3A 6.14.1, Figure 6-8): offset 15:0, selector,
    IST in bits 2:0 of byte 4, type (E interrupt, F trap), DPL, P, offset 63:16."""
    lo = ((offset & 0xFFFF) | selector << 16 | ist << 32 | type_ << 40 | dpl << 45
          | int(present) << 47 | ((offset >> 16) & 0xFFFF) << 48)
    return struct.pack("<QQ", lo, offset >> 32)


def gate32(offset: int, selector: int = 0x08, type_: int = 0xE, dpl: int = 0, present: bool = True) -> bytes:
    """An 8-byte 32-bit interrupt (E) / trap (F) gate (SDM Vol. 3A 6.11, Figure 6-2)."""
    return struct.pack("<HHBBH", offset & 0xFFFF, selector, 0, type_ | dpl << 5 | int(present) << 7,
                       offset >> 16)


def vm_with(program: str, mode: str, *, gates=(), bitmap=(), idt_limit: int = 0xFFF, handler_at=None,
            handler: str = "mov ebx, 0x77\nhlt"):
    vm = VirtualMachine(program + "\nhlt", mode=mode)
    if handler_at is not None:
        vm.load(handler, handler_at)
    size = 16 if mode == "long" else 8
    for vector, raw in gates:
        vm.guest.write(IDT + vector * size, raw)
    vm.vmwrite(F.GUEST_IDTR_LIMIT, idt_limit)
    vm.vmwrite(F.EXCEPTION_BITMAP, sum(1 << v for v in bitmap))
    return vm


def exit_of(vm):
    e = vm.next_exit()
    assert e is not None, vm.message
    return e


def r(vm, field) -> int:
    return vm.vmread(field)


# ====================================== Vol. 3A 6.15: Tables 6-4 and 6-5 as data
def test_exception_classes_table_6_4():
    # Table 6-4: contributory 0, 10, 11, 12, 13 (and 21 #CP); page faults 14 and 20 (#VE)
    assert {v for v in range(32) if exception_class(v) is ExceptionClass.CONTRIBUTORY} == {0, 10, 11, 12, 13, 21}
    assert {v for v in range(32) if exception_class(v) is ExceptionClass.PAGE_FAULT} == {14, 20}
    # ... everything else, NMIs and INT n (even INT 13) are benign
    assert exception_class(1) is exception_class(2) is exception_class(6) is ExceptionClass.BENIGN
    from vtlab.arch.exceptions import InterruptionType
    assert exception_class(13, InterruptionType.SOFTWARE_INTERRUPT) is ExceptionClass.BENIGN


def test_double_fault_conditions_table_6_5():
    B, C, P = ExceptionClass.BENIGN, ExceptionClass.CONTRIBUTORY, ExceptionClass.PAGE_FAULT
    # Table 6-5: #DF for contributory after contributory, contributory after #PF, #PF after #PF;
    # every other pair is handled serially.
    assert {pair for pair, df in DOUBLE_FAULT_CONDITIONS.items() if df} == {(C, C), (P, C), (P, P)}
    assert len(DOUBLE_FAULT_CONDITIONS) == 9


def test_error_code_vectors_table_6_1():
    # Table 6-1, "Error Code" = Yes: #DF 8, #TS 10, #NP 11, #SS 12, #GP 13, #PF 14, #AC 17, #CP 21
    assert sorted(int(v) for v in ERROR_CODE_VECTORS) == [8, 10, 11, 12, 13, 14, 17, 21]


# ====================================== bug: a CPL-3 exception through a 64-bit gate
def test_cpl3_exception_through_a_64_bit_gate_switches_to_rsp0():
    """SDM Vol. 3A 6.14.2-6.14.4: from CPL 3 to a DPL-0 handler the CPU loads RSP0 of
    the 64-bit TSS (vtlab's: 8F000H), aligns it to 16 bytes and pushes SS, RSP, RFLAGS,
    CS, RIP - 8 bytes each - and SS becomes a null selector (RPL 0)."""
    vm = vm_with(TO_USER_64 + "nop\nud2", "long", gates=[(6, gate64(0x1800))], handler_at=0x1800)
    e = exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == HLT, e                 # the handler ran (it did not triple-fault)
    assert vm.regs.rbx == 0x77
    assert vm.regs.rsp == 0x8F000 - 5 * 8
    frame = struct.unpack("<5Q", vm.guest.read(0x8F000 - 40, 40))
    assert frame == (0x1019, 0x33, 0x202, 0x8E000, 0x2B)     # RIP at the UD2, CS, RFLAGS, RSP, SS
    assert r(vm, F.GUEST_CS_SELECTOR) == 0x18 and r(vm, F.GUEST_SS_SELECTOR) == 0


def test_64_bit_delivery_aligns_the_stack_and_pushes_ss_rsp_without_a_privilege_change():
    """6.14.2: in IA-32e mode the frame is always SS, RSP, RFLAGS, CS, RIP (+ error code)
    on a 16-byte aligned RSP, also at CPL 0 with no stack switch."""
    vm = vm_with("mov rsp, 0x7008\nud2", "long", gates=[(6, gate64(0x1800))], handler_at=0x1800)
    exit_of(vm)
    assert vm.regs.rbx == 0x77
    assert vm.regs.rsp == 0x7000 - 40                        # 7008H aligned down to 7000H
    assert struct.unpack("<5Q", vm.guest.read(0x7000 - 40, 40)) == (0x1007, 0x18, 0x2, 0x7008, 0x10)


def test_64_bit_delivery_through_the_interrupt_stack_table():
    """6.14.5: a gate with IST = n (1-7) loads RSP from ISTn of the TSS (offset 24H + 8 (n - 1)),
    with or without a privilege change."""
    def setup(vm):
        vm.guest.write(Layout.TSS + 0x24 + 8, struct.pack("<Q", 0x6008))   # IST2 = 6008H
    vm = vm_with("ud2", "long", gates=[(6, gate64(0x1800, ist=2))], handler_at=0x1800)
    setup(vm)
    exit_of(vm)
    assert vm.regs.rsp == 0x6000 - 40


# ====================================== 28.2.4: IDT-vectoring information
def test_int_n_through_a_gate_of_lower_dpl_gp_exits_with_the_int_as_vectoring():
    """INT 80H at CPL 3 through a DPL-0 gate raises #GP with error code 80H * 8 + 2 = 402H
    (IDT bit 1, EXT 0 for INT n: 6.12.1, 6.13).  Exception bitmap bit 13: a VM exit during
    delivery of a software interrupt: IDT-vectoring 0x80000480 (type 4, vector 80H), RIP at
    the INT and the VM-exit instruction length 2 (28.2.4, 28.2.5)."""
    vm = vm_with(TO_USER_64 + "nop\nint 0x80", "long", gates=[(0x80, gate64(0x1800))], bitmap=[13])
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == EXCEPTION_NMI
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0B0D         # #GP, hardware exception, error code valid
    assert r(vm, F.VM_EXIT_INTR_ERROR_CODE) == 0x402
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0480  # valid, software interrupt (4), 80H
    assert r(vm, F.VM_EXIT_INSTRUCTION_LEN) == 2
    assert r(vm, F.GUEST_RIP) == 0x1019


def test_gp_during_delivery_of_a_hardware_exception():
    """#UD through an IDT entry whose type is not a gate: #GP(6 * 8 + 2 + 1 = 33H) - EXT set,
    the event is a hardware exception.  IDT-vectoring 0x80000306 (type 3, vector 6, no
    error code); the error-code field of the exit holds 33H."""
    bad = struct.pack("<QQ", 0x1800 | 0x18 << 16 | 0x81 << 40, 0)   # present, type 1
    vm = vm_with("nop\nud2", "long", gates=[(6, bad)], bitmap=[13])
    exit_of(vm)
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0B0D
    assert r(vm, F.VM_EXIT_INTR_ERROR_CODE) == 0x33
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0306
    assert r(vm, F.GUEST_RIP) == 0x1001


def test_vectoring_error_code_of_a_gp_being_delivered():
    """An injected #GP with error code 10H (VM-entry interruption information 0x80000B0D)
    whose gate is not present: #NP(13 * 8 + 2 + 1 = 6BH), bitmap bit 11.  IDT-vectoring
    0x80000B0D with the IDT-vectoring error code 10H (28.2.4; injection: 27.6.1.2)."""
    vm = vm_with("nop", "long", gates=[(13, gate64(0x1800, present=False))], bitmap=[11])
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0B0D)
    vm.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, 0x10)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0B0B         # #NP, error code valid
    assert r(vm, F.VM_EXIT_INTR_ERROR_CODE) == 0x6B
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0B0D  # the #GP being delivered
    assert r(vm, F.IDT_VECTORING_ERROR_CODE) == 0x10
    assert r(vm, F.GUEST_RIP) == 0x1000


def test_page_fault_on_the_stack_during_delivery():
    """A #PF while pushing the frame (the stack page not present in the guest's page
    tables) during delivery of a #UD; bitmap bit 14.  IDT-vectoring 0x80000306; the #PF's
    exit qualification is the linear address (28.2.1)."""
    vm = vm_with("mov rsp, 0x400000\nud2", "long", gates=[(6, gate64(0x1800))], bitmap=[14])
    # 4-level paging as vtlab builds it: PML4 93000H, PDPT 94000H, PD 95000H (2-MByte pages);
    # PD entry 1 maps 200000H-3FFFFFH: make it not present.
    vm.guest.write(0x95000 + 8, struct.pack("<Q", 0))
    exit_of(vm)
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0B0E
    assert r(vm, F.VM_EXIT_INTR_ERROR_CODE) == 0x2           # not present (P 0), write (W/R 1), supervisor
    assert r(vm, F.EXIT_QUALIFICATION) == 0x400000 - 8       # the SS push, the first one (6.14.2)
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0306
    assert r(vm, F.GUEST_RSP) == 0x400000                    # nothing was pushed


def test_ept_violation_on_the_idt_during_delivery():
    """The IDT page not readable in the EPT: an EPT violation during delivery (28.2.4).
    Qualification (Table 28-7): bit 0 read, bits 5:3 permissions 0, bit 7 guest-linear
    address valid, bit 8 the access was to the translated linear address = 181H; the
    guest-physical address is the gate's: 91000H + 6 * 16."""
    vm = vm_with("nop\nud2", "long", gates=[(6, gate64(0x1800))])
    vm.ept_unmap(IDT, 0x1000)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == EPT_VIOLATION
    assert r(vm, F.EXIT_QUALIFICATION) == 0x181
    assert r(vm, F.GUEST_PHYSICAL_ADDRESS) == 0x91060
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0306
    assert r(vm, F.GUEST_RIP) == 0x1001


def test_ept_violation_during_delivery_of_an_injected_software_interrupt():
    """An injected INT 30H (type 4, VM-entry instruction length 2) whose stack page is not
    writable in the EPT: the exit reports the VM-entry RIP and, as VM-exit instruction
    length, the VM-entry instruction length (27.6.1.2, 28.2.5); IDT-vectoring 0x80000430."""
    vm = vm_with("nop", "long", gates=[(0x30, gate64(0x1800))])
    vm.ept_map(0x6000, 0x1000, 0b101)                          # stack page 6000H: read + execute
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0430)
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, 2)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == EPT_VIOLATION
    assert r(vm, F.EXIT_QUALIFICATION) & 0x3 == 0x2           # a write
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0430
    assert r(vm, F.VM_EXIT_INSTRUCTION_LEN) == 2
    assert r(vm, F.GUEST_RIP) == 0x1000
    assert r(vm, F.VM_ENTRY_INTR_INFO_FIELD) == 0x430          # valid bit cleared by the exit (28.2)


def test_task_gate_exit_records_the_event_being_delivered():
    """A task switch through a task gate in the IDT is a VM exit during event delivery
    (28.2.4): #UD through the gate at vector 6 gives IDT-vectoring 0x80000306."""
    vm = VirtualMachine("nop\nud2\nhlt", mode="protected")
    vm.guest.write(Layout.GDT + 0x48, pack_descriptor(0x95000, 0x67, 0x89, 0))   # available 32-bit TSS
    vm.vmwrite(F.GUEST_GDTR_LIMIT, 0x4F)
    vm.guest.write(IDT + 6 * 8, struct.pack("<Q", 0x48 << 16 | 0x85 << 40))      # task gate
    vm.vmwrite(F.GUEST_IDTR_LIMIT, 0x7FF)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == TASK_SWITCH
    assert r(vm, F.EXIT_QUALIFICATION) == 0x48 | 3 << 30       # Table 28-2: selector 48H, source 3
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0306


def test_an_exit_caused_directly_by_the_event_has_no_vectoring_information():
    """28.2.4: an exit caused by the original event itself is not "during delivery"."""
    vm = vm_with("nop\nud2", "long", bitmap=[6])
    exit_of(vm)
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0306
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0


# ====================================== Table 6-5: double faults and triple faults
def test_contributory_after_contributory_is_a_double_fault_that_exits_without_vectoring():
    """#UD (benign) -> its gate is not present: #NP (handled serially) -> #NP's gate not
    present either: contributory after contributory = #DF (Table 6-5).  Bitmap bit 8: the
    #DF exits with 0x80000B08 and error code 0 (6.15 Interrupt 8); a #DF that causes the
    exit directly leaves IDT-vectoring invalid (28.2.4)."""
    vm = vm_with("nop\nud2", "long", gates=[(6, gate64(0x1800, present=False)),
                                             (11, gate64(0x1800, present=False))], bitmap=[8])
    exit_of(vm)
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0B08
    assert r(vm, F.VM_EXIT_INTR_ERROR_CODE) == 0
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0
    assert r(vm, F.GUEST_RIP) == 0x1001


def test_benign_then_contributory_is_handled_serially():
    """#UD whose gate is not present: #NP(6 * 8 + 3 = 33H) is delivered to its handler."""
    vm = vm_with("nop\nud2", "long", gates=[(6, gate64(0x1800, present=False)), (11, gate64(0x1800))],
                 handler_at=0x1800)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == HLT
    assert vm.regs.rbx == 0x77
    assert vm.guest.read_u64(vm.regs.rsp) == 0x33               # the #NP's error code on top
    assert vm.guest.read_u64(vm.regs.rsp + 8) == 0x1001         # the UD2's address


def test_page_fault_then_contributory_is_a_double_fault():
    """A #PF whose gate lies beyond the IDT limit: #GP (contributory after a page fault) =
    #DF (Table 6-5), delivered to the #DF handler with error code 0; CR2 holds the #PF's
    linear address."""
    vm = vm_with("mov rax, 0x400000\nmov byte ptr [rax], 1", "long",
                 gates=[(8, gate64(0x1800))], idt_limit=14 * 16 - 1, handler_at=0x1800)
    vm.guest.write(0x95000 + 16, struct.pack("<Q", 0))          # PD entry 2: 400000H not present
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == HLT
    assert vm.guest.read_u64(vm.regs.rsp) == 0                   # #DF error code 0
    assert vm.guest.reg("cr2") == 0x400000


def test_a_fault_while_delivering_a_double_fault_is_a_triple_fault():
    """IDT limit 0: #UD (benign) -> #GP, handled serially; the #GP's own delivery raises
    #GP again: contributory after contributory = #DF; the #DF cannot be delivered either:
    shutdown, exit reason 2 (triple fault), with no IDT-vectoring information (28.2.4)."""
    vm = vm_with("nop\nud2", "long", idt_limit=0)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == TRIPLE_FAULT
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0


def test_the_bitmap_sees_the_second_fault_before_the_double_fault_rules():
    """#UD whose gate is not present raises #NP(6 * 8 + 2 + 1 = 33H), delivered serially;
    #NP (vector 11) lies beyond the IDT limit (vectors 0-8), so its delivery raises
    #GP(11 * 8 + 2 + 1 = 5BH) - a #DF by Table 6-5, but bitmap bit 13 is consulted first
    (26.2): the exit is the #GP, during delivery of the #NP (IDT-vectoring 0x80000B0B,
    IDT-vectoring error code 33H)."""
    vm = vm_with("nop\nud2", "long", gates=[(6, gate64(0x1800, present=False))],
                 idt_limit=9 * 16 - 1, bitmap=[13])
    exit_of(vm)
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0B0D
    assert r(vm, F.VM_EXIT_INTR_ERROR_CODE) == 0x5B
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0B0B
    assert r(vm, F.IDT_VECTORING_ERROR_CODE) == 0x33
    assert r(vm, F.GUEST_RIP) == 0x1001


def test_gp_while_delivering_a_double_fault_has_ext_set():
    """Inject #DF (0x80000B08, error code 0) with IDT entry 8 not present: #NP(8 * 8 + 2 + 1
    = 43H) raised during its delivery, bitmap bit 11: IDT-vectoring 0x80000B08, 28.2.4."""
    vm = vm_with("nop", "long", gates=[(8, gate64(0x1800, present=False))], bitmap=[11])
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0B08)
    vm.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, 0)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0B0B
    assert r(vm, F.VM_EXIT_INTR_ERROR_CODE) == 0x43
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0B08
    assert r(vm, F.IDT_VECTORING_ERROR_CODE) == 0


def test_without_the_bitmap_a_fault_while_delivering_an_injected_double_fault_is_a_triple_fault():
    vm = vm_with("nop", "long", gates=[(8, gate64(0x1800, present=False))])
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0B08)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == TRIPLE_FAULT
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0


# ====================================== bug: real mode has no error codes
def test_real_mode_gp_exit_reports_no_error_code():
    """28.2.2 / 28.2.4: bit 11 (error code valid) is 0 for VM exits in real-address mode.
    INT 30H beyond an IVT limit of 3FH raises #GP (real-mode INT n: "(vector << 2) + 3 not
    within the IDT limit"); bitmap bit 13: VM-exit interruption information 0x8000030D
    (type 3, vector 13, bit 11 clear); IDT-vectoring 0x80000430 (the INT 30H, type 4)."""
    vm = vm_with("nop\nint 0x30", "real", idt_limit=0x3F, bitmap=[13])
    exit_of(vm)
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_030D
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0430
    assert r(vm, F.VM_EXIT_INSTRUCTION_LEN) == 2
    assert r(vm, F.GUEST_RIP) == 0x1001


def test_real_mode_double_fault_has_no_error_code_either():
    """#UD with an IVT limit of 3 (vector 0 only): #GP (serial), whose delivery fails too:
    #DF (contributory after contributory); bitmap bit 8: 0x80000308, bit 11 clear."""
    vm = vm_with("nop\nud2", "real", idt_limit=3, bitmap=[8])
    exit_of(vm)
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0308


# ====================================== bug: injection of type 7 (pending MTF VM exit)
@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_injecting_other_event_vector_0_is_an_mtf_exit_before_any_instruction(mode):
    """27.6.2: VM-entry interruption information 0x80000700 (valid, type 7, vector 0)
    delivers no event; an MTF VM exit (reason 37) is pending at the instruction boundary
    after the entry - even with "monitor trap flag" 0 - so no guest instruction runs."""
    vm = VirtualMachine("mov ebx, 0x66\nhlt", mode=mode)
    rsp = r(vm, F.GUEST_RSP)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0700)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == MONITOR_TRAP_FLAG
    assert r(vm, F.EXIT_QUALIFICATION) == 0
    assert r(vm, F.GUEST_RIP) == 0x1000
    assert r(vm, F.GUEST_RSP) == rsp                             # nothing pushed
    assert vm.regs.rbx != 0x66
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0


# ====================================== bug: virtual-8086 guests
def _v8086(vm, selector: int = 0x100, rip: int = 0x100, flags: int = 0x20002):
    """27.3.1.2: with RFLAGS.VM = 1 every segment has base = selector << 4, limit FFFFH
    and access rights F3H."""
    for s in ("ES", "CS", "SS", "DS", "FS", "GS"):
        vm.vmwrite(F[f"GUEST_{s}_SELECTOR"], selector)
        vm.vmwrite(F[f"GUEST_{s}_BASE"], selector << 4)
        vm.vmwrite(F[f"GUEST_{s}_LIMIT"], 0xFFFF)
        vm.vmwrite(F[f"GUEST_{s}_AR_BYTES"], 0xF3)
    vm.vmwrite(F.GUEST_RIP, rip)
    vm.vmwrite(F.GUEST_RSP, 0x800)
    vm.vmwrite(F.GUEST_RFLAGS, flags)


def test_vm_entry_loads_a_virtual_8086_guest():
    """RFLAGS.VM = 1 (bit 17): the guest runs 16-bit code at CS:IP = 0100H:0100H, linear
    1100H; CPUID exits unconditionally (26.1.2), with RIP 0100H + its offset."""
    vm = VirtualMachine("hlt", mode="protected")
    vm.guest.load("mov ax, 0x1234\nmov bx, ds\ncpuid", 0x1100, bits=16)
    _v8086(vm)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == CPUID
    assert r(vm, F.GUEST_RIP) == 0x105                          # B8 34 12, 8C DB, then CPUID
    assert vm.regs.rax & 0xFFFF == 0x1234 and vm.regs.rbx & 0xFFFF == 0x100
    assert r(vm, F.GUEST_RFLAGS) == 0x20002
    assert (r(vm, F.GUEST_CS_BASE), r(vm, F.GUEST_CS_LIMIT), r(vm, F.GUEST_CS_AR_BYTES)) == (0x1000, 0xFFFF, 0xF3)


def test_virtual_8086_hlt_is_gp_at_cpl_3():
    """Virtual-8086 mode runs at CPL 3: HLT raises #GP(0) (privileged), not a HLT exit."""
    vm = VirtualMachine("hlt", mode="protected")
    vm.guest.load("nop\nhlt", 0x1100, bits=16)
    _v8086(vm)
    vm.vmwrite(F.EXCEPTION_BITMAP, 1 << 13)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0B0D
    assert r(vm, F.VM_EXIT_INTR_ERROR_CODE) == 0
    assert r(vm, F.GUEST_RIP) == 0x101


def test_an_exception_from_virtual_8086_mode_reaches_a_ring_0_handler():
    """SDM Vol. 3A 6.12.1 (and the INT n pseudo-code, INTERRUPT-FROM-VIRTUAL-8086-MODE): the
    frame on the ring-0 stack (TSS SS0:ESP0 = 10H:8F000H) is GS, FS, DS, ES, SS, ESP, EFLAGS,
    CS, EIP, error code, 4 bytes each; VM is cleared and DS-GS are loaded with null."""
    vm = VirtualMachine("hlt", mode="protected")
    vm.guest.load("nop\nhlt", 0x1100, bits=16)
    vm.load("mov ebx, 0x77\nhlt", 0x1800)
    vm.guest.write(IDT + 13 * 8, gate32(0x1800))
    vm.vmwrite(F.GUEST_IDTR_LIMIT, 0x7FF)
    _v8086(vm)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == HLT and vm.regs.rbx == 0x77
    assert vm.regs.rsp == 0x8F000 - 40
    frame = struct.unpack("<10I", vm.guest.read(0x8F000 - 40, 40))
    assert frame == (0, 0x101, 0x100, 0x20002, 0x800, 0x100, 0x100, 0x100, 0x100, 0x100)
    assert r(vm, F.GUEST_RFLAGS) & (1 << 17) == 0
    assert r(vm, F.GUEST_DS_SELECTOR) == 0


# ====================================== 26.4.2 / Table 28-2: the task-switch handler
def test_task_switch_qualification_decoder():
    # Table 28-2: bits 15:0 selector, bits 31:30 source (0 CALL, 1 IRET, 2 JMP, 3 task gate)
    q = TaskSwitchQualification.decode(0x8000_0028)
    assert (q.selector, q.source) == (0x28, TaskSwitchSource.JMP)
    assert TaskSwitchQualification(0x48, TaskSwitchSource.TASK_GATE).encode() == 0xC000_0048
    assert [int(s) for s in TaskSwitchSource] == [0, 1, 2, 3]


def test_the_vmm_stops_a_guest_that_switches_tasks():
    vm = VirtualMachine("nop\ndb 0xea, 0, 0, 0, 0, 0x48, 0\nhlt", mode="protected")
    vm.guest.write(Layout.GDT + 0x48, pack_descriptor(0x95000, 0x67, 0x89, 0))
    vm.vmwrite(F.GUEST_GDTR_LIMIT, 0x4F)
    s = vm.run()
    assert [e.reason for e in vm.trace.exits] == ["TASK_SWITCH"]
    assert s.state is VmState.STOPPED
    assert "JMP to TSS selector 0x48" in s.message and "task switching" in s.message


# ====================================== ambiguities of Unicorn's reports
def test_int_3_cd_03_is_a_software_interrupt_not_filtered_by_the_bitmap():
    """INT 3 written CD 03 is INT n - type 4 - whatever its vector: exception-bitmap bit 3
    applies only to INT3 (CC), a software exception (26.2, 25.8.3)."""
    vm = VirtualMachine("db 0xcd, 0x03\nhlt", mode="real")
    vm.load("mov bx, 0x55\nhlt", 0x1800)
    vm.guest.write(3 * 4, struct.pack("<HH", 0x1800, 0))
    vm.vmwrite(F.EXCEPTION_BITMAP, 1 << 3)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == HLT and vm.regs.rbx == 0x55

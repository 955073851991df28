"""The event controls of VMX non-root operation and VM-entry event injection, against the SDM.

Every expected number is typed in from the Intel SDM, 325462-084US, never read from
vtlab's tables:

* interruption-information format (Vol. 3C 25.8.3 Table 25-17, 28.2.2): vector bits 7:0,
  type bits 10:8 - 0 external interrupt, 2 NMI, 3 hardware exception, 4 software
  interrupt, 5 privileged software exception, 6 software exception, 7 other event - bit
  11 error code valid / deliver error code, bit 12 NMI unblocking due to IRET, bit 31 valid;
* interruptibility state (25.4.2 Table 25-3): bit 0 blocking by STI, bit 1 blocking by
  MOV SS, bit 2 blocking by SMI, bit 3 blocking by NMI; activity state 0 active, 1 HLT;
* pin-based controls (25.6.1 Table 25-5): bit 0 external-interrupt exiting, bit 3 NMI
  exiting, bit 5 virtual NMIs, bit 6 activate VMX-preemption timer;
* primary processor-based controls (25.6.2 Table 25-6): bit 2 interrupt-window exiting,
  bit 3 use TSC offsetting, bit 12 RDTSC exiting, bit 22 NMI-window exiting, bit 27
  monitor trap flag;
* VM-exit controls (25.7.1 Table 25-13): bit 15 acknowledge interrupt on exit, bit 22
  save VMX-preemption-timer value;
* exit reasons (Appendix C): 0 exception or NMI, 1 external interrupt, 7 interrupt
  window, 8 NMI window, 10 CPUID, 12 HLT, 16 RDTSC, 37 monitor trap flag, 52 VMX-preemption
  timer expired;
* IA32_VMX_MISC (MSR 485H, A.6) bits 4:0: the TSC bit whose changes count the timer down;
  the true control MSRs 48DH (pin-based), 48EH (primary), 48FH (exit) with allowed-1
  settings in bits 63:32 (A.3.1);
* VM-entry checks 27.2.1.1 ("virtual NMIs" needs "NMI exiting", "NMI-window exiting" needs
  "virtual NMIs") and 27.2.1.2 ("save VMX-preemption-timer value" needs the timer):
  VMfailValid with VM-instruction error 7;
* windows and the timer: 26.2, 26.5.1, 27.7.1, 27.7.4-27.7.6; TSC offsetting 26.3;
  injection 27.6.1 (the VM-entry instruction length for types 4-6; real mode through the
  IVT, no error code).

vtlab's clock is one TSC tick per guest instruction, so timer expiries are computed from
the guest's instruction count.  Guests are real x86 code run by Unicorn.
"""
from __future__ import annotations

import struct

import pytest

from vtlab import Layout, VirtualMachine, VmcsField as F

# Exit reasons (Appendix C)
EXCEPTION_NMI, EXTERNAL_INTERRUPT, INTERRUPT_WINDOW, NMI_WINDOW = 0, 1, 7, 8
CPUID, HLT, RDTSC, MONITOR_TRAP_FLAG, PREEMPTION_TIMER = 10, 12, 16, 37, 52
# Pin-based (Table 25-5), primary (Table 25-6), exit controls (Table 25-13)
PIN_EXT_INTR, PIN_NMI_EXITING, PIN_VIRTUAL_NMIS, PIN_TIMER = 1 << 0, 1 << 3, 1 << 5, 1 << 6
INTR_WINDOW, TSC_OFFSETTING, RDTSC_EXITING = 1 << 2, 1 << 3, 1 << 12
NMI_WINDOW_EXITING, MTF = 1 << 22, 1 << 27
EXIT_ACK_INTR, EXIT_SAVE_TIMER = 1 << 15, 1 << 22
# Interruptibility (Table 25-3)
BY_STI, BY_MOV_SS, BY_NMI = 1 << 0, 1 << 1, 1 << 3
# RFLAGS: bit 1 is always 1, IF is bit 9 (Vol. 1, 3.4.3)
FLAGS_IF = 0x202
# MSRs (Appendix A)
IA32_VMX_MISC, TRUE_PIN, TRUE_PROC, TRUE_EXIT = 0x485, 0x48D, 0x48E, 0x48F

IDT = Layout.IDT


def r(vm, field) -> int:
    return vm.vmread(field)


def exit_of(vm):
    e = vm.next_exit()
    assert e is not None, vm.message
    return e


def set_bits(vm, field, bits: int, on: bool = True) -> None:
    value = r(vm, field)
    vm.vmwrite(field, value | bits if on else value & ~bits)


def gate32(offset: int, selector: int = 0x08, type_: int = 0xE, dpl: int = 0) -> bytes:
    """An 8-byte 32-bit interrupt gate (SDM Vol. 3A 6.11, Figure 6-2)."""
    return struct.pack("<HHBBH", offset & 0xFFFF, selector, 0, type_ | dpl << 5 | 1 << 7, offset >> 16)


def real_vm(program: str, vectors=(), handler_at: int = 0x3000, handler: str = "hlt") -> VirtualMachine:
    """A real-mode guest whose IVT sends ``vectors`` to ``handler`` at 0000:handler_at."""
    vm = VirtualMachine(program + "\nhlt", mode="real")
    vm.load(handler, handler_at)
    for v in vectors:
        vm.guest.write(v * 4, struct.pack("<HH", handler_at, 0))
    return vm


def protected_vm(program: str, vectors=(), handler_at: int = 0x3000, handler: str = "hlt") -> VirtualMachine:
    """A 32-bit protected-mode guest whose IDT sends ``vectors`` to ``handler``."""
    vm = VirtualMachine(program + "\nhlt", mode="protected")
    vm.load(handler, handler_at)
    for v in vectors:
        vm.guest.write(IDT + v * 8, gate32(handler_at))
    vm.vmwrite(F.GUEST_IDTR_LIMIT, 0x7FF)
    return vm


# ============================================================ capability MSRs (A.3, A.6)
def test_capability_msrs_offer_the_event_controls():
    """The allowed-1 halves (bits 63:32) of the true control MSRs have the event controls."""
    vm = VirtualMachine("hlt")
    pin, proc, exit_ = (vm.cpu.rdmsr(m) >> 32 for m in (TRUE_PIN, TRUE_PROC, TRUE_EXIT))
    for bit in (0, 3, 5, 6):            # external-interrupt exiting, NMI exiting, virtual NMIs, timer
        assert pin >> bit & 1, bit
    for bit in (2, 3, 22, 27):          # interrupt window, TSC offsetting, NMI window, MTF
        assert proc >> bit & 1, bit
    for bit in (15, 22):                # acknowledge interrupt on exit, save timer value
        assert exit_ >> bit & 1, bit


def test_misc_reports_the_preemption_timer_rate():
    """IA32_VMX_MISC[4:0] = 5: the timer counts down when TSC bit 5 changes (every 32 ticks)."""
    assert VirtualMachine("hlt").cpu.rdmsr(IA32_VMX_MISC) & 0x1F == 5


# ============================================================ entry checks (27.2.1)
@pytest.mark.parametrize("pin, proc, exit_bits", [
    (PIN_VIRTUAL_NMIS, 0, 0),                        # virtual NMIs without NMI exiting
    (PIN_NMI_EXITING, NMI_WINDOW_EXITING, 0),        # NMI window without virtual NMIs
    (0, 0, EXIT_SAVE_TIMER),                         # saving a timer that is not active
])
def test_event_control_combinations_that_fail_entry_with_error_7(pin, proc, exit_bits):
    vm = VirtualMachine("hlt")
    set_bits(vm, F.PIN_BASED_VM_EXEC_CONTROL, PIN_NMI_EXITING | PIN_VIRTUAL_NMIS | PIN_TIMER, on=False)
    set_bits(vm, F.PIN_BASED_VM_EXEC_CONTROL, pin)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, proc)
    set_bits(vm, F.VM_EXIT_CONTROLS, exit_bits)
    out = vm.cpu.vmlaunch()
    assert out.error == 7, out


# ============================================================ injection of every type (27.6)
# (interruption information, error code, VM-entry instruction length, return address
#  offset from GUEST_RIP, error code pushed?)
INJECTIONS = [
    pytest.param(0x8000_0030, None, 0, 0, id="external-interrupt-type-0"),
    pytest.param(0x8000_0202, None, 0, 0, id="nmi-type-2"),
    pytest.param(0x8000_0306, None, 0, 0, id="hardware-ud-type-3"),
    pytest.param(0x8000_0B0D, 0x1234, 0, 0, id="hardware-gp-with-error-code"),
    pytest.param(0x8000_0480, None, 2, 2, id="software-interrupt-type-4"),
    pytest.param(0x8000_0501, None, 1, 1, id="privileged-software-exception-type-5"),
    pytest.param(0x8000_0603, None, 1, 1, id="software-exception-type-6"),
]


@pytest.mark.parametrize("info, code, length, ret", INJECTIONS)
def test_injection_through_the_idt_pushes_the_sdm_frame(info, code, length, ret):
    """Protected mode: the handler of vector ``info & FFH`` runs; the frame holds EIP =
    GUEST_RIP + the VM-entry instruction length for types 4-6 (27.6.1.1), CS, EFLAGS, and
    the error code on top when bit 11 is set."""
    vector = info & 0xFF
    vm = protected_vm("nop", vectors=[vector])
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)   # (27.3.1.4: an injected external interrupt needs IF = 1)
    esp = r(vm, F.GUEST_RSP)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info)
    if code is not None:
        vm.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, code)
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, length)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == HLT and r(vm, F.GUEST_RIP) == 0x3000
    words = 4 if code is not None else 3
    assert r(vm, F.GUEST_RSP) == esp - 4 * words
    frame = struct.unpack(f"<{words}I", vm.guest.read(esp - 4 * words, 4 * words))
    if code is not None:
        assert frame[0] == code
        frame = frame[1:]
    assert frame[0] == 0x1000 + ret            # EIP
    assert frame[1] == 0x08                    # CS
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0   # delivered: nothing was interrupted


@pytest.mark.parametrize("info, length, ret", [
    (0x8000_0030, 0, 0), (0x8000_0202, 0, 0), (0x8000_0306, 0, 0),
    (0x8000_0480, 2, 2), (0x8000_0501, 1, 1), (0x8000_0603, 1, 1),
])
def test_injection_into_a_real_mode_guest_goes_through_the_ivt(info, length, ret):
    """Real-address mode: FLAGS, CS, IP pushed (6 bytes), IP = GUEST_RIP + length."""
    vm = real_vm("nop", vectors=[info & 0xFF])
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)
    sp = r(vm, F.GUEST_RSP)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info)
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, length)
    exit_of(vm)
    assert r(vm, F.GUEST_RIP) == 0x3000
    ip, cs, _flags = struct.unpack("<HHH", vm.guest.read(sp - 6, 6))
    assert (ip, cs) == (0x1000 + ret, 0)


def test_injecting_a_software_interrupt_needs_an_instruction_length():
    """27.2.1.3: types 4-6 need a VM-entry instruction length of 1-15 (IA32_VMX_MISC[30] = 0)."""
    vm = protected_vm("nop", vectors=[0x80])
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0480)
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, 0)
    assert vm.cpu.vmlaunch().error == 7


# ============================================================ interrupt window (exit 7)
def test_interrupt_window_exits_at_once_when_if_is_1():
    """27.7.5: with IF = 1 and no blocking the exit comes before the first instruction."""
    vm = real_vm("mov bx, 1")
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == INTERRUPT_WINDOW
    assert r(vm, F.GUEST_RIP) == 0x1000 and vm.regs.bx != 1
    assert r(vm, F.EXIT_QUALIFICATION) == 0


def test_interrupt_window_waits_for_sti_and_the_instruction_after_it():
    """IF = 0: the window opens after STI and one more instruction (blocking by STI)."""
    vm = real_vm("nop\nnop\nsti\nmov bx, 1\nmov cx, 2")   # sti at 1002H, mov bx at 1003H
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == INTERRUPT_WINDOW
    assert r(vm, F.GUEST_RIP) == 0x1006                  # mov cx, 2: after the shadowed mov bx
    assert vm.regs.bx == 1 and vm.regs.cx != 2
    assert r(vm, F.GUEST_INTERRUPTIBILITY_INFO) == 0


def test_blocking_by_mov_ss_loaded_at_entry_shadows_the_first_instruction():
    """27.7.1: a non-vectoring entry loads blocking by MOV SS (bit 1): the first
    instruction runs in its shadow; the window exit comes after it."""
    vm = real_vm("mov bx, 1\nmov cx, 2")
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, BY_MOV_SS)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == INTERRUPT_WINDOW
    assert r(vm, F.GUEST_RIP) == 0x1003 and vm.regs.bx == 1 and vm.regs.cx != 2


def test_blocking_by_sti_loaded_at_entry_shadows_the_first_instruction():
    vm = real_vm("mov bx, 1\nmov cx, 2")
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, BY_STI)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == INTERRUPT_WINDOW and r(vm, F.GUEST_RIP) == 0x1003


def test_a_vectoring_entry_leaves_no_blocking_by_sti():
    """27.7.1: injecting an event (here #UD, type 3) clears blocking by STI; the handler's
    first instruction sees the window open (a trap gate keeps IF = 1)."""
    vm = VirtualMachine("nop\nhlt", mode="protected")
    vm.load("mov bx, 1\nhlt", 0x3000)
    vm.guest.write(IDT + 6 * 8, gate32(0x3000, type_=0xF))   # trap gate: IF stays 1
    vm.vmwrite(F.GUEST_IDTR_LIMIT, 0x7FF)
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, BY_STI)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0306)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == INTERRUPT_WINDOW
    assert r(vm, F.GUEST_RIP) == 0x3000 and vm.regs.bx != 1


def test_the_interrupt_window_wakes_a_guest_entered_in_the_hlt_state():
    """27.7.5: the exit wakes a logical processor that just entered the HLT state because of
    the VM entry (activity state 1); the activity state saved is still HLT (1): the return
    to the active state comes after the exit."""
    vm = real_vm("mov bx, 1")
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)
    vm.vmwrite(F.GUEST_ACTIVITY_STATE, 1)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == INTERRUPT_WINDOW
    assert r(vm, F.GUEST_ACTIVITY_STATE) == 1 and vm.regs.bx != 1


def test_without_the_window_a_guest_entered_in_the_hlt_state_stays_there():
    vm = real_vm("mov bx, 1")
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)
    vm.vmwrite(F.GUEST_ACTIVITY_STATE, 1)
    out = vm.cpu.vmlaunch()
    assert out.halted and vm.regs.bx != 1


def test_the_interrupt_window_comes_before_an_external_interrupt():
    """27.7.5 / 26.2: interrupt-window exits take priority over external interrupts."""
    vm = real_vm("nop")
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW)
    vm.raise_interrupt(0x31)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == INTERRUPT_WINDOW
    vm.vmwrite(F.GUEST_RIP, r(vm, F.GUEST_RIP))          # (stay here)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW, on=False)
    vm.pending_exit = None
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == EXTERNAL_INTERRUPT


# ============================================================ interruptibility saved (28.3.4)
@pytest.mark.parametrize("program, flags, expected", [
    ("sti\ncpuid", 0x2, BY_STI),                  # STI with IF = 0, then an exiting instruction
    ("sti\ncpuid", FLAGS_IF, 0),                  # STI with IF = 1 sets no shadow
    ("mov ax, ss\nmov ss, ax\ncpuid", 0x2, BY_MOV_SS),
    ("push ss\npop ss\ncpuid", 0x2, BY_MOV_SS),   # POP SS too
    ("sti\nnop\ncpuid", 0x2, 0),                  # the shadow covered the NOP only
])
def test_interruptibility_state_saved_on_exit(program, flags, expected):
    vm = real_vm(program)
    vm.vmwrite(F.GUEST_RFLAGS, flags)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == CPUID
    assert r(vm, F.GUEST_INTERRUPTIBILITY_INFO) == expected


def test_the_vmm_skipping_the_shadowed_instruction_ends_the_shadow():
    """After the CPUID exit the VMM advances RIP past CPUID, the instruction the STI shadow
    covered: the next entry has no blocking by STI (KVM's skip_emulated_instruction)."""
    vm = real_vm("sti\ncpuid\nmov bx, 1")
    exit_of(vm)
    assert r(vm, F.GUEST_INTERRUPTIBILITY_INFO) == BY_STI
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW)
    exit_of(vm)    # the CPUID handler skips CPUID, then the entry
    assert r(vm, F.VM_EXIT_REASON) == INTERRUPT_WINDOW
    assert r(vm, F.GUEST_RIP) == 0x1003 and vm.regs.bx != 1


# ============================================================ NMIs, virtual NMIs, NMI window
def _virtual_nmis(vm):
    set_bits(vm, F.PIN_BASED_VM_EXEC_CONTROL, PIN_NMI_EXITING | PIN_VIRTUAL_NMIS)


def test_nmi_exiting_reports_interruption_type_2_vector_2():
    vm = real_vm("nop")
    vm.raise_nmi()
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == EXCEPTION_NMI
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0202


def test_without_nmi_exiting_the_nmi_goes_to_vector_2_and_blocks_nmis_until_iret():
    """The NMI handler runs (vector 2 of the IVT); blocking by NMI (bit 3) is saved at the
    handler's exit; a second NMI waits; IRET ends the blocking and the second NMI is taken."""
    vm = real_vm("nop\nnop\ncpuid\nnop", vectors=[2], handler="inc si\ncpuid\niret")
    set_bits(vm, F.PIN_BASED_VM_EXEC_CONTROL, PIN_NMI_EXITING, on=False)
    vm.raise_nmi()
    exit_of(vm)                                            # CPUID in the handler
    assert r(vm, F.GUEST_RIP) == 0x3001 and vm.regs.si == 1
    assert r(vm, F.GUEST_INTERRUPTIBILITY_INFO) == BY_NMI
    vm.raise_nmi()                                         # blocked until the IRET
    exit_of(vm)                                            # the handler again, after its IRET
    assert r(vm, F.GUEST_RIP) == 0x3001 and vm.regs.si == 2
    assert r(vm, F.GUEST_INTERRUPTIBILITY_INFO) == BY_NMI


def test_an_injected_nmi_sets_virtual_nmi_blocking():
    """27.6.1.2: with "virtual NMIs" an injected NMI sets virtual-NMI blocking (bit 3)."""
    vm = real_vm("nop", vectors=[2], handler="cpuid\niret")
    _virtual_nmis(vm)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0202)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == CPUID and r(vm, F.GUEST_RIP) == 0x3000
    assert r(vm, F.GUEST_INTERRUPTIBILITY_INFO) == BY_NMI


def test_nmi_window_exits_at_once_without_virtual_nmi_blocking():
    vm = real_vm("mov bx, 1")
    _virtual_nmis(vm)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, NMI_WINDOW_EXITING)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == NMI_WINDOW and r(vm, F.GUEST_RIP) == 0x1000


def test_nmi_window_opens_right_after_the_iret_of_the_nmi_handler():
    """Virtual-NMI blocking from an injected NMI lasts until the handler's IRET; the exit
    (reason 8) comes at the instruction IRET returns to."""
    vm = real_vm("mov bx, 1\nmov cx, 2", vectors=[2], handler="inc dx\niret")
    _virtual_nmis(vm)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0202)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, NMI_WINDOW_EXITING)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == NMI_WINDOW
    assert r(vm, F.GUEST_RIP) == 0x1000 and vm.regs.dx == 1 and vm.regs.bx != 1
    assert r(vm, F.GUEST_INTERRUPTIBILITY_INFO) == 0


def test_the_nmi_window_comes_before_the_interrupt_window():
    vm = real_vm("nop")
    _virtual_nmis(vm)
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, NMI_WINDOW_EXITING | INTR_WINDOW)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == NMI_WINDOW


# ============================================================ acknowledge interrupt on exit
@pytest.mark.parametrize("ack, info", [(True, 0x8000_0031), (False, 0)])
def test_acknowledge_interrupt_on_exit_fills_the_interruption_information(ack, info):
    """28.2.2: exit 1 with "acknowledge interrupt on exit" = 1 reports the vector (type 0,
    valid); with 0 the field is not valid."""
    vm = real_vm("nop")
    set_bits(vm, F.VM_EXIT_CONTROLS, EXIT_ACK_INTR, on=ack)
    vm.raise_interrupt(0x31)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == EXTERNAL_INTERRUPT
    assert r(vm, F.VM_EXIT_INTR_INFO) == info


# ============================================================ VMX-preemption timer (exit 52)
LOOP = "spin:\ninc ax\njmp spin"


def _timer_vm(value: int, save: bool = False, program: str = LOOP) -> VirtualMachine:
    vm = real_vm(program)
    set_bits(vm, F.PIN_BASED_VM_EXEC_CONTROL, PIN_TIMER)
    set_bits(vm, F.VM_EXIT_CONTROLS, EXIT_SAVE_TIMER, on=save)
    vm.vmwrite(F.VMX_PREEMPTION_TIMER_VALUE, value)
    return vm


@pytest.mark.parametrize("value", [1, 10, 100])
def test_the_preemption_timer_expires_after_value_times_32_tsc_ticks(value):
    """26.5.1: the timer counts down by 1 each time TSC bit 5 changes (IA32_VMX_MISC[4:0] =
    5); one TSC tick per guest instruction, so it expires at the value-th multiple of 32
    after the entry."""
    vm = _timer_vm(value)
    start = vm.guest.read_tsc()
    e = exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == PREEMPTION_TIMER
    expiry = ((start >> 5) + value) << 5
    assert expiry <= vm.guest.read_tsc() <= expiry + 2      # at the next 2-instruction block
    assert e.guest_instructions == vm.guest.counter.total


def test_a_timer_value_of_0_exits_before_any_instruction():
    """27.7.4: with value 0 the exit occurs before the first guest instruction."""
    vm = _timer_vm(0, program="mov bx, 1")
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == PREEMPTION_TIMER and r(vm, F.GUEST_RIP) == 0x1000
    assert vm.regs.bx != 1


def test_save_preemption_timer_value_stores_what_is_left():
    """28.3.4: with "save VMX-preemption-timer value" the field holds the timer at the exit:
    0 after a timer exit; the rest after an earlier CPUID exit (value 100, 64 instructions
    ran: 100 - the number of 32-tick boundaries crossed)."""
    vm = _timer_vm(5, save=True)
    exit_of(vm)
    assert r(vm, F.VMX_PREEMPTION_TIMER_VALUE) == 0
    vm2 = _timer_vm(100, save=True, program="mov cx, 64\nl: loop l\ncpuid")
    start = vm2.guest.read_tsc()
    exit_of(vm2)
    assert r(vm2, F.VM_EXIT_REASON) == CPUID
    now = vm2.guest.read_tsc()
    assert r(vm2, F.VMX_PREEMPTION_TIMER_VALUE) == 100 - ((now >> 5) - (start >> 5))
    assert 95 <= r(vm2, F.VMX_PREEMPTION_TIMER_VALUE) <= 98


def test_without_the_save_control_the_timer_value_field_is_unchanged():
    vm = _timer_vm(100, program="mov cx, 64\nl: loop l\ncpuid")
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == CPUID and r(vm, F.VMX_PREEMPTION_TIMER_VALUE) == 100


# ============================================================ TSC offsetting (26.3)
def _rdtsc_vm(program: str = "rdtsc\ncpuid", offset: int = 0, offsetting: bool = False,
              exiting: bool = False) -> VirtualMachine:
    vm = VirtualMachine(program + "\nhlt", mode="long")
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, TSC_OFFSETTING, on=offsetting)
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, RDTSC_EXITING, on=exiting)
    vm.vmwrite(F.TSC_OFFSET, offset & (1 << 64) - 1)
    return vm


@pytest.mark.parametrize("offset", [0x1_0000_0000, 12345, -3])
def test_rdtsc_returns_the_tsc_plus_the_tsc_offset(offset):
    plain = _rdtsc_vm()
    exit_of(plain)
    base = plain.regs.rdx << 32 | plain.regs.rax & 0xFFFF_FFFF
    vm = _rdtsc_vm(offset=offset, offsetting=True)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == CPUID
    assert (vm.regs.rdx << 32 | vm.regs.rax & 0xFFFF_FFFF) == (base + offset) % (1 << 64)


def test_the_offset_is_ignored_without_use_tsc_offsetting():
    plain, vm = _rdtsc_vm(), _rdtsc_vm(offset=1000)
    exit_of(plain)
    exit_of(vm)
    assert vm.regs.rax == plain.regs.rax


def test_rdtscp_adds_the_offset_too():
    plain = _rdtsc_vm("rdtscp\ncpuid")
    exit_of(plain)
    vm = _rdtsc_vm("rdtscp\ncpuid", offset=77, offsetting=True)
    exit_of(vm)
    assert (vm.regs.rax & 0xFFFF_FFFF) == (plain.regs.rax & 0xFFFF_FFFF) + 77


def test_rdtsc_exiting_has_priority_over_offsetting():
    """26.1.3: with "RDTSC exiting" = 1 RDTSC exits (reason 16) whatever the offsetting."""
    vm = _rdtsc_vm(offset=5, offsetting=True, exiting=True)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == RDTSC


# ============================================================ monitor trap flag (26.5.2)
def test_monitor_trap_flag_exits_after_one_instruction():
    vm = real_vm("mov bx, 1\nmov cx, 2")
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, MTF)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == MONITOR_TRAP_FLAG
    assert r(vm, F.GUEST_RIP) == 0x1003 and vm.regs.bx == 1 and vm.regs.cx != 2


def test_mtf_after_sti_saves_blocking_by_sti():
    """The MTF exit comes after STI, before the instruction its shadow covers."""
    vm = real_vm("sti\nmov bx, 1")
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, MTF)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == MONITOR_TRAP_FLAG and r(vm, F.GUEST_RIP) == 0x1001
    assert r(vm, F.GUEST_INTERRUPTIBILITY_INFO) == BY_STI


# ============================================================ exits during delivery (28.2.4)
def test_an_injected_nmi_whose_delivery_exits_leaves_virtual_nmi_blocking():
    """28.3.4 / 27.6.1.2: with "virtual NMIs", an injected NMI whose delivery causes a VM
    exit (here #NP from a not-present gate, bitmap bit 11) has virtual-NMI blocking in
    effect at the exit; the IDT-vectoring information is the NMI, 80000202H."""
    vm = VirtualMachine("nop\nhlt", mode="protected")
    vm.guest.write(IDT + 2 * 8, struct.pack("<HHBBH", 0x3000, 0x08, 0, 0x0E, 0))   # P = 0
    vm.vmwrite(F.GUEST_IDTR_LIMIT, 0x7FF)
    vm.vmwrite(F.EXCEPTION_BITMAP, 1 << 11)
    _virtual_nmis(vm)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0202)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == EXCEPTION_NMI
    assert r(vm, F.VM_EXIT_INTR_INFO) == 0x8000_0B0B                 # #NP, error code valid
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0202
    assert r(vm, F.GUEST_INTERRUPTIBILITY_INFO) == BY_NMI


def test_the_vmm_reinjects_an_event_whose_delivery_was_interrupted():
    """An injected INT 30H (type 4, length 2) meets a stack page the EPT does not let it
    write: EPT violation with IDT-vectoring 80000430H.  The VMM maps the page and injects
    the event again from the vectoring information (VM-entry instruction length = the
    VM-exit instruction length, 28.2.5): the handler runs with return EIP = 1000H + 2."""
    vm = protected_vm("nop", vectors=[0x30])
    esp = r(vm, F.GUEST_RSP)
    stack_page = (esp - 4) & ~0xFFF
    vm.ept_map(stack_page, 0x1000, 0b101)                # read + execute, no write
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0430)
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, 2)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == 48                  # EPT violation
    assert r(vm, F.IDT_VECTORING_INFO_FIELD) == 0x8000_0430
    exit_of(vm)                                           # the EPT handler maps; re-injected
    assert r(vm, F.VM_EXIT_REASON) == HLT and r(vm, F.GUEST_RIP) == 0x3000
    eip, cs, _ = struct.unpack("<III", vm.guest.read(esp - 12, 12))
    assert (eip, cs) == (0x1002, 0x08)


def test_reinjection_can_be_left_to_the_handler():
    vm = protected_vm("nop", vectors=[0x30])
    vm.reinject_events = False
    esp = r(vm, F.GUEST_RSP)
    vm.ept_map((esp - 4) & ~0xFFF, 0x1000, 0b101)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0430)
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, 2)
    exit_of(vm)
    exit_of(vm)                                           # the event is lost: the guest goes on
    assert r(vm, F.VM_EXIT_REASON) == HLT and r(vm, F.GUEST_RIP) == 0x1001


def test_popf_that_sets_if_opens_the_window_at_once_with_no_shadow():
    """POPF sets IF without an interrupt shadow (only STI and MOV SS / POP SS leave one):
    the exit comes right after it.  The 200,000-instruction CLI section before it runs at
    full speed (vtlab steps only the instruction that can open the window)."""
    vm = real_vm("cli\nmov ecx, 200000\nl: dec ecx\njnz l\npushf\npop ax\nor ax, 0x200\npush ax\n"
                 "popf\nmov bx, 1")                 # popf at 1011H, mov bx at 1012H
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == INTERRUPT_WINDOW
    assert r(vm, F.GUEST_RIP) == 0x1012 and vm.regs.bx != 1
    assert vm.guest.counter.total >= 400_000


def test_iret_that_sets_if_opens_the_window():
    """IRET restoring FLAGS with IF = 1 (a real-mode frame IP, CS, FLAGS = 0202H)."""
    vm = real_vm("cli\npush 0x202\npush 0\npush 0x1009\niret\nmov bx, 1")   # iret at 1008H
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, INTR_WINDOW)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == INTERRUPT_WINDOW
    assert r(vm, F.GUEST_RIP) == 0x1009 and vm.regs.bx != 1


def test_an_interrupt_for_the_guest_waits_for_sti_and_its_shadow():
    """Without external-interrupt exiting, a device's interrupt goes to the guest once IF = 1
    and the STI shadow has passed: the handler runs after the instruction STI covers."""
    vm = real_vm("cli\nnop\nsti\nmov bx, 1\nmov cx, 2", vectors=[0x31], handler="cpuid")
    set_bits(vm, F.PIN_BASED_VM_EXEC_CONTROL, PIN_EXT_INTR, on=False)
    vm.raise_interrupt(0x31)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == CPUID and r(vm, F.GUEST_RIP) == 0x3000
    ip, = struct.unpack("<H", vm.guest.read(r(vm, F.GUEST_RSP), 2))
    assert ip == 0x1006                               # pushed: the MOV CX after the shadow


def test_an_exiting_external_interrupt_waits_for_the_sti_shadow():
    """26.3: with external-interrupt exiting, RFLAGS.IF does not block external interrupts,
    but blocking by STI does: the exit comes one instruction after the entry that loaded it."""
    vm = real_vm("mov bx, 1\nmov cx, 2")
    vm.vmwrite(F.GUEST_RFLAGS, FLAGS_IF)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, BY_STI)
    vm.raise_interrupt(0x31)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == EXTERNAL_INTERRUPT
    assert r(vm, F.GUEST_RIP) == 0x1003 and vm.regs.bx == 1


def test_an_exiting_external_interrupt_ignores_if_0():
    vm = real_vm("mov bx, 1")
    vm.raise_interrupt(0x31)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == EXTERNAL_INTERRUPT and r(vm, F.GUEST_RIP) == 0x1000


# ============================================================ the VMM's window handlers
def test_the_vmm_holds_an_nmi_back_until_the_nmi_window_opens():
    """The guest is in its NMI handler (virtual-NMI blocking, bit 3, loaded at entry); the
    VMM has a second NMI for it (``vm.nmi_waiting``) and sets NMI-window exiting.  After
    the handler's IRET the window exit (8) comes; the default handler injects the NMI
    (80000202H) and the guest's NMI handler runs again."""
    vm = real_vm("push 0\npush 0\npush 0x1008\niret\nnop\nhlt", vectors=[2],
                 handler="inc si\ncpuid")            # iret at 1007H returns to 1008H
    vm.vmwrite(F.GUEST_RFLAGS, 0x2)
    _virtual_nmis(vm)
    vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, BY_NMI)
    vm.nmi_waiting = True
    set_bits(vm, F.CPU_BASED_VM_EXEC_CONTROL, NMI_WINDOW_EXITING)
    exit_of(vm)
    assert r(vm, F.VM_EXIT_REASON) == NMI_WINDOW and r(vm, F.GUEST_RIP) == 0x1008
    exit_of(vm)                                        # handled: NMI injected
    assert r(vm, F.VM_EXIT_REASON) == CPUID and r(vm, F.GUEST_RIP) == 0x3001 and vm.regs.si == 1
    assert not r(vm, F.CPU_BASED_VM_EXEC_CONTROL) & NMI_WINDOW_EXITING
    assert r(vm, F.GUEST_INTERRUPTIBILITY_INFO) == BY_NMI


def test_the_vmm_rearms_the_preemption_timer_for_each_slice():
    vm = _timer_vm(10)
    vm.preemption_slice = 10
    vm.run(max_exits=50, max_instructions=3_300)
    # 3,300 instructions at 320 per slice: 10 timer exits (the 11th would need 3,520).
    assert vm.exit_counts().get("PREEMPTION_TIMER", 0) == 10 and vm.preemption_exits == 10


@pytest.mark.parametrize("raw, bits, site", [
    (b"\xfb", 16, (1, True)),            # STI (FB): blocking by STI, sets IF
    (b"\x17", 32, (2, False)),           # POP SS (17): blocking by MOV SS
    (b"\x17", 64, None),                 # ... invalid in 64-bit mode
    (b"\x8e\xd0", 16, (2, False)),       # MOV SS, AX (8E /2, ModRM D0H)
    (b"\x36\x8e\x16\x00\x10", 16, (2, False)),   # MOV SS, [1000H] with an SS: prefix
    (b"\x8e\xd8", 16, None),             # MOV DS, AX (8E /3): no shadow
    (b"\x9d", 32, (0, True)),            # POPF: may set IF, no shadow
    (b"\x66\x9d", 16, (0, True)),        # POPFD in 16-bit code
    (b"\x90", 16, None),
])
def test_the_instructions_that_leave_a_shadow_or_set_if(raw, bits, site):
    from vtlab.cpu.event_controls import shadow_site
    assert shadow_site(raw, bits) == site


def test_a_timer_that_would_expire_at_every_entry_stops_the_vm_with_a_message():
    """Value 0 after a timer exit (saved, or never set) and no slice to re-arm: the VMM
    stops rather than entering into an endless storm of exits (27.7.4)."""
    vm = _timer_vm(0)
    summary = vm.run(max_exits=50)
    assert vm.exit_counts().get("PREEMPTION_TIMER", 0) == 1
    assert "VMX_PREEMPTION_TIMER_VALUE" in summary.message

"""How vtlab's VMM delivers the guest's device interrupts: the PIT's IRQ 0 through the PIC,
injected when the guest can take it, through the interrupt window when it cannot.

The pattern is KVM's (``inject_pending_event`` / ``enable_irq_window`` in Linux's x86 KVM):

1. The guest's 8254 counts on vtlab's clock (guest instructions).  When IRQ 0 falls due
   while the guest runs, the *host's* timer interrupt arrives: with "external-interrupt
   exiting" = 1 that is a VM exit, reason 1, and with "acknowledge interrupt on exit" the
   VM-exit interruption-information field names the host's vector (SDM Vol. 3C 26.2,
   28.2.2).  The VMM runs its timer code: the virtual PIT raises IRQ 0 on the virtual PIC.
2. Before re-entering, the VMM asks whether the guest can take an external interrupt now
   - RFLAGS.IF = 1 and no blocking by STI or MOV SS in the interruptibility state, and no
   other event already being injected (SDM 26.2, 27.2.1.3, 27.3.1.5).  If so it plays the
   CPU's INTA cycle on the PIC and injects the vector (interruption type 0, SDM 27.6).
3. If not, it sets "interrupt-window exiting": the processor exits (reason 7) at the first
   instruction boundary where the guest can take it - right after its STI and the
   instruction after that, or its IRET - and the VMM injects then (step 2 again).

So the trace of a timer-driven guest shows exit 1 (the tick) and, whenever the tick found
the guest with interrupts off, exit 7 after it: reasons 1 and 7 in the SDM's order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.controls import PinBased, ProcBased
from ..arch.exceptions import (INTR_INFO_NMI_UNBLOCKING, INTR_INFO_VALID, SOFTWARE_EVENT_TYPES,
                               InterruptionType, IntrInfo)
from ..arch.interrupts import PIT_IRQ, ActivityState, Interruptibility
from ..arch.msrs import Rflags
from ..arch.vmcs_fields import VmcsField as F
from ..arch.interrupts import PIC_MASTER_COMMAND, PIC_SLAVE_COMMAND
from .pic import Pic8259, PicPair
from .pit import Pit8254

if TYPE_CHECKING:
    from .machine import VirtualMachine

#: The host's timer vector: what "acknowledge interrupt on exit" reports for a host timer
#: tick (Linux's LOCAL_TIMER_VECTOR, the local APIC timer's vector on the host).
HOST_TIMER_VECTOR = 0xEC

_BLOCKED = Interruptibility.BLOCKING_BY_STI | Interruptibility.BLOCKING_BY_MOV_SS


def attach_legacy_devices(vm: "VirtualMachine") -> None:
    """Give the VM a PIC pair and a PIT on its bus unless it has them (a learner's own bus
    keeps whatever it holds); ``vm.pic`` / ``vm.pit`` are None without them."""
    bus = vm.bus
    master = bus.device_at(PIC_MASTER_COMMAND)
    if isinstance(master, Pic8259) and master.pair is not None:
        vm.pic = master.pair
    elif master is None and bus.device_at(PIC_SLAVE_COMMAND) is None:
        vm.pic = PicPair()
        for chip in vm.pic.devices:
            bus.attach(chip)
    vm.pit = next((d for d in bus.devices if isinstance(d, Pit8254)), None)
    if vm.pit is None and all(bus.device_at(p) is None for p in Pit8254().ports()):
        vm.pit = bus.attach(Pit8254())
    if vm.pit is not None:
        vm.pit.clock = vm.guest.read_tsc   # vtlab's clock: instructions + time asleep in HLT


def guest_can_take_interrupt(vm: "VirtualMachine") -> bool:
    """May VM entry inject an external interrupt now?  GUEST_RFLAGS.IF = 1, no blocking by
    STI or MOV SS (GUEST_INTERRUPTIBILITY_INFO bits 1:0), the guest active or halted, and
    no event in the VM-entry interruption-information field already."""
    if vm.vmread(F.VM_ENTRY_INTR_INFO_FIELD) & INTR_INFO_VALID:
        return False
    if not vm.vmread(F.GUEST_RFLAGS) & Rflags.IF:
        return False
    if vm.vmread(F.GUEST_INTERRUPTIBILITY_INFO) & _BLOCKED:
        return False
    return vm.vmread(F.GUEST_ACTIVITY_STATE) in (ActivityState.ACTIVE, ActivityState.HLT)


def inject_pending_irq(vm: "VirtualMachine") -> str:
    """Inject the PIC's pending interrupt if the guest can take it, else open the
    interrupt window.  Returns what it did: "none", "injected" or "window"."""
    pic = vm.pic
    if pic is None or not pic.pending():
        return "none"
    if not guest_can_take_interrupt(vm):
        vm.set_control(ProcBased.INTR_WINDOW_EXITING, True)
        return "window"
    vector = pic.acknowledge()   # the CPU's INTA cycle: IRR -> ISR, the vector
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, IntrInfo(vector, InterruptionType.EXTERNAL_INTERRUPT).encode())
    # Another request still pending (and of higher priority than the one now in service)?
    # Then ask for the window again: it opens once this one's handler can be interrupted.
    vm.set_control(ProcBased.INTR_WINDOW_EXITING, pic.pending())
    return "injected"


def timer_tick(vm: "VirtualMachine") -> int:
    """The host's timer code for the virtual PIT: IRQ 0 edges due by now go to the PIC."""
    pit, pic = vm.pit, vm.pic
    if pit is None:
        return 0
    edges = pit.expire(vm.guest.read_tsc())
    if edges and pic is not None:
        pic.raise_irq(PIT_IRQ)
    return edges


def sleep_until_timer(vm: "VirtualMachine") -> bool:
    """The guest executed HLT with RFLAGS.IF = 1 and its PIT counting: the vCPU sleeps until
    IRQ 0 (as KVM blocks a halted vCPU until an interrupt is pending).  The time asleep
    passes on vtlab's clock - the TSC moves on to the tick, which the host takes in root
    operation - and the VMM injects IRQ 0, or opens the window.  False if nothing will
    wake the guest (no tick due)."""
    due = pit_due(vm)
    if due is None:
        return False
    g = vm.guest
    asleep = due - g.read_tsc()
    if asleep > 0:
        g.tsc_offset += asleep   # the TSC counts the time the vCPU slept
    timer_tick(vm)
    inject_pending_irq(vm)
    return True


def pit_due(vm: "VirtualMachine") -> int | None:
    """vtlab's clock value at which the PIT's next IRQ 0 is due (None: none is)."""
    return vm.pit.next_irq() if vm.pit is not None else None


def host_timer_fired(vm: "VirtualMachine") -> None:
    """The PIT's IRQ 0 fell due while the guest ran: the host's timer interrupt arrives.
    With "external-interrupt exiting" it causes a VM exit (reason 1); without it the
    interrupt goes to the guest directly (the virtual PIC's vector, no VMM involved)."""
    if vm.control(PinBased.EXT_INTR_MASK):
        vm.raise_interrupt(HOST_TIMER_VECTOR)
    else:
        timer_tick(vm)
        if vm.pic is not None and vm.pic.pending():
            vm.raise_interrupt(vm.pic.acknowledge())


def reinject_interrupted_event(vm: "VirtualMachine", exit_) -> bool:
    """An exit during event delivery left the event undelivered (the IDT-vectoring
    information is valid, SDM 28.2.4): inject it again at the next VM entry (27.6), as
    KVM's ``vmx_complete_interrupts`` does - the same vector and type, its error code
    (IDT-vectoring error code) and, for a software event, the VM-exit instruction length
    as the VM-entry instruction length (28.2.5).  Bit 12 of the vectoring information
    (NMI unblocking due to IRET) is reserved in the VM-entry field, so it is not copied;
    an NMI's blocking by NMI is cleared, since VM entry will inject it (27.3.1.5).

    A handler may still inject something else instead (``vm.inject_exception``): the VMM's
    exception handler reflects the exception that interrupted the delivery, and the guest
    raises the first one again when it re-executes the instruction.  Returns True if an
    event was queued."""
    info = exit_.idt_vectoring_info
    if not info & INTR_INFO_VALID:
        return False
    decoded = IntrInfo.decode(info)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info & ~INTR_INFO_NMI_UNBLOCKING)
    if decoded.deliver_error_code and exit_.idt_vectoring_error_code is not None:
        vm.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, exit_.idt_vectoring_error_code)
    if decoded.type in SOFTWARE_EVENT_TYPES:
        vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, exit_.instruction_length)
    if decoded.type is InterruptionType.NMI:
        blocking = vm.vmread(F.GUEST_INTERRUPTIBILITY_INFO)
        vm.vmwrite(F.GUEST_INTERRUPTIBILITY_INFO, blocking & ~Interruptibility.BLOCKING_BY_NMI)
    return True

"""Exceptions, interrupts, NMIs and EPT violations in VMX non-root operation (SDM 26.2,
27.6, 29.3.3): through the exception bitmap and pin-based controls to a VM exit, or
delivered to the guest through its IDT.

An exception raised while an event is being delivered (a #GP from a bad gate, a #PF or
an EPT violation on the IDT or the stack) is first checked against the exception bitmap
- a VM exit *during event delivery*, which records the event in the IDT-vectoring
information fields (SDM 28.2.4) - and otherwise goes through the double-fault rules of
SDM Vol. 3A 6.15 (Tables 6-4 and 6-5, data in :mod:`vtlab.arch.exceptions`): handled
serially, a #DF (itself subject to exception-bitmap bit 8), or - an exception while
delivering #DF - a triple fault (exit reason 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import unicorn
from unicorn import x86_const as X

from ..arch.controls import ExitControl, PinBased, ProcBased2
from ..arch.interrupts import Interruptibility
from ..arch.exceptions import (EXCEPTION_BITMAP_TYPES, SOFTWARE_EVENT_TYPES, IntrInfo, InterruptionType,
                               Vector, causes_double_fault, exception_class)
from ..arch.exit_reasons import ExitReason
from ..arch.qualifications import EptViolationQualification, TaskSwitchQualification, TaskSwitchSource
from ..arch.msrs import Cr0, Efer, Rflags
from ..arch.vmcs_fields import VmcsField as F
from .guest import ERROR_CODE_VECTORS, Guest

from .vmexit import VmExit
from .ept_exits import ept_exit, fault_linear, guest_walk
from .nonroot_consts import _VALID
from .event_controls import EventControls

_EFER_LMA = int(Efer.LMA)
_CR0_PE = int(Cr0.PE)
_RFLAGS_IF, _RFLAGS_VM = int(Rflags.IF), int(Rflags.VM)
_HARDWARE = InterruptionType.HARDWARE_EXCEPTION
_SOFTWARE_INTERRUPT = InterruptionType.SOFTWARE_INTERRUPT
_SOFTWARE_EXCEPTION = InterruptionType.SOFTWARE_EXCEPTION
_PRIVILEGED = InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION
#: Events a delivery may chain before vtlab gives up (a #DF ends any chain well before).
_MAX_NESTING = 8


def software_interrupt_length(guest: Guest, rip: int, vector: int) -> int:
    """Did an INT n / INT3 / INTO just execute?  Unicorn reports only the vector and RIP
    after the instruction, so the bytes before RIP tell: the length (2 for CD ib, 1 for
    CC or CE) - the "software" element of an event - else 0 (an exception the CPU
    raised).  Used for VT-x and AMD-V exits alike."""
    base = guest.segment("cs").base
    try:
        raw = guest.read(base + rip - 2, 2)
    except unicorn.UcError:
        try:
            raw = b"\0" + guest.read(base + rip - 1, 1)
        except unicorn.UcError:
            return 0
    if raw[0] == 0xCD and raw[1] == vector:
        return 2
    if (raw[1] == 0xCC and vector == 3) or (raw[1] == 0xCE and vector == 4):
        return 1
    return 0


@dataclass
class Event:
    """An event on its way to the guest's IDT (or IVT).

    ``at`` is the RIP a VM exit during its delivery reports - the INT n / INT1 / INT3 /
    INTO itself for a software event (SDM 28.3.3), the guest RIP of the VM entry for an
    injected one (27.6.1.2) - and ``length`` the instruction length such an exit reports
    (28.2.5; the VM-entry instruction length for injected software events).  Delivery
    pushes ``at + length``.  ``address``: a #PF's linear address, loaded into CR2 when
    the #PF is delivered.
    """

    vector: int
    kind: InterruptionType
    error_code: int | None = None
    at: int = 0
    length: int = 0
    address: int | None = None
    note: str = ""

    @property
    def return_rip(self) -> int:
        return self.at + self.length

    @property
    def is_double_fault(self) -> bool:
        return self.kind is _HARDWARE and self.vector == Vector.DF

    def info(self, real_mode: bool) -> int:
        """The interruption-information value of this event (VM-exit or IDT-vectoring):
        bit 11 says an error code is valid - never in real-address mode (28.2.2, 28.2.4)."""
        return IntrInfo(self.vector, self.kind, self.error_code is not None and not real_mode).encode()

    def name(self) -> str:
        if self.kind in (_SOFTWARE_INTERRUPT,) or self.vector >= 32:
            return f"INT {self.vector:#x}"
        try:
            return "#" + Vector(self.vector).name
        except ValueError:
            return f"vector {self.vector}"


def software_event_type(vector: int, length: int) -> InterruptionType:
    """The interruption type of an instruction-caused event (SDM 25.8.3, 28.2.2): INT1
    (F1) is a privileged software exception (5), INT3 (CC) and INTO (CE) are software
    exceptions (6), and INT n (CD n) is a software interrupt (4) whatever n - INT 3
    (CD 03) included."""
    if length == 1:
        if vector == Vector.DB:
            return _PRIVILEGED
        if vector in (Vector.BP, Vector.OF):
            return _SOFTWARE_EXCEPTION
    return _SOFTWARE_INTERRUPT


class EventUnit(EventControls):
    """Event handling of the non-root monitor (with the event controls of
    :class:`vtlab.cpu.event_controls.EventControls`)."""

    #: The address-range monitoring hardware (MONITOR/MWAIT, SDM Vol. 3A 9.10.4): armed by
    #: an executed MONITOR, cleared by every VM exit and VM entry (SDM 28.5.6, 27.3.3).
    address_monitor_armed = False
    _monitor_listening = False

    def _on_interrupt(self, vector: int) -> None:
        g = self.guest
        rip = g.rip
        software = self._software_interrupt_at(rip, vector)
        self.event = (vector, rip, software)
        if vector == Vector.PF and not software and g.page_fault is not None:
            # #PF: the error code and faulting address the guest captured (see Guest._on_intr)
            self.event = (vector, rip, software, g.page_fault[1], 0, g.page_fault[0])
        g.uc.emu_stop()

    def _software_interrupt_at(self, rip: int, vector: int) -> int:
        """Did an INT n / INT3 / INTO just execute?  (:func:`software_interrupt_length`)"""
        return software_interrupt_length(self.guest, rip, vector)

    # ------------------------------------------------- address-range monitor
    def arm_address_monitor(self) -> None:
        """MONITOR executed: the monitor is armed until the next VM exit or entry."""
        self.address_monitor_armed = True
        if not self._monitor_listening:  # (only vCPUs whose guest ever armed it pay for this)
            self._monitor_listening = True
            self.cpu.exit_listeners.append(self._clear_address_monitor)

    def _clear_address_monitor(self, _exit=None) -> None:
        """VM exits clear any address-range monitoring in effect (SDM 28.5.6); so do VM
        entries (27.3.3), and every entry of this vCPU follows an exit."""
        self.address_monitor_armed = False

    # ------------------------------------------------------- task switches
    def descriptor(self, selector: int) -> int | None:
        """The 8-byte descriptor ``selector`` names in the GDT (TI = 0) or the LDT (TI = 1),
        or None if it lies beyond the table's limit (or outside memory)."""
        g = self.guest
        if selector & 4:
            ldtr = g.segment("ldtr")
            if ldtr.unusable:
                return None
            base, limit = ldtr.base, ldtr.limit
        else:
            base, limit = g.descriptor_table("gdtr")
        if (selector | 7) > limit:
            return None
        try:
            return g.read_u64(base + (selector & ~7))
        except unicorn.UcError:
            return None

    def valid_new_tss(self, selector: int, busy: bool) -> bool:
        """The checks on the new TSS that come before a task-switch VM exit (SDM 26.4.2,
        steps 2-4): the selector is in the GDT (TI = 0) and within its limit; the
        descriptor is a TSS (S = 0) of the right type - available (1, 9) for CALL, JMP
        and task gates, busy (3, 11) for IRET - present, with a limit of at least 67H
        (32-bit TSS) or 2BH (16-bit TSS) (SDM Vol. 3A 8.2.2, 8.3)."""
        if selector & 4 or selector & ~7 == 0:
            return False
        raw = self.descriptor(selector)
        if raw is None or raw >> 44 & 1 or not raw >> 47 & 1:
            return False
        kind = raw >> 40 & 0xF
        if kind not in ((3, 11) if busy else (1, 9)):
            return False
        limit = (raw & 0xFFFF) | (raw >> 48 & 0xF) << 16
        if raw >> 55 & 1:  # G
            limit = limit << 12 | 0xFFF
        return limit >= (0x67 if kind & 8 else 0x2B)

    def _task_gate_exit(self, event: Event) -> VmExit | None:
        """An event about to be delivered through a task gate in the IDT: a task switch,
        so a VM exit (SDM 26.4.2) - qualification bits 15:0 the TSS selector in the gate,
        bits 31:30 = 3 (task gate in the IDT), Table 28-2 - during event delivery, so
        with the event in the IDT-vectoring information (28.2.4).

        Outside IA-32e mode only (there a task gate raises #GP, 26.4.2 e); the gate must
        be present, and for INT n / INT3 / INTO its DPL >= CPL (26.4.2 b; other events
        get no privilege check, f); then the new TSS is checked (:meth:`valid_new_tss`).
        None: not a task gate, or a check failed (delivery raises the fault).  The exit
        reports RIP ``event.at`` and, for software events, ``event.length`` (28.2.5).
        """
        g = self.guest
        if not g.reg("cr0") & _CR0_PE or g.reg("efer") & _EFER_LMA:
            return None
        vector = event.vector
        base, limit = g.descriptor_table("idtr")
        if vector * 8 + 7 > limit:
            return None
        try:
            raw = g.read_u64(base + vector * 8)
        except unicorn.UcError:
            return None
        if (raw >> 40) & 0x1F != 5 or not raw >> 47 & 1:   # S = 0, type 5; P
            return None
        software = event.kind in (_SOFTWARE_INTERRUPT, _SOFTWARE_EXCEPTION)
        if software and (raw >> 45 & 3) < self._guest_cpl():
            return None
        selector = raw >> 16 & 0xFFFF
        if not self.valid_new_tss(selector, busy=False):
            return None
        has_length = event.kind in SOFTWARE_EVENT_TYPES
        insn = g.instruction_at(event.at) if has_length else None
        q = TaskSwitchQualification(selector, TaskSwitchSource.TASK_GATE).encode()
        return self._during_delivery(VmExit(ExitReason.TASK_SWITCH, q, 0, event.at,
                                            insn.text if insn else "", guest_instructions=g.counter.total,
                                            cpl=self._guest_cpl()), event)

    def _guest_cpl(self) -> int:
        """The CPL: 0 in real mode, 3 in virtual-8086 mode, else CS.RPL."""
        g = self.guest
        if not g.reg("cr0") & _CR0_PE:
            return 0
        return 3 if g.reg("eflags") & _RFLAGS_VM else g.reg("cs") & 3

    def _during_delivery(self, exit_: VmExit, event: Event) -> VmExit:
        """Fill in what a VM exit during the delivery of ``event`` reports (SDM 28.2.4):
        the IDT-vectoring information and error code, the VM-exit instruction length of
        a software event (28.2.5), RIP as the event's (28.3.3)."""
        real = not self.guest.reg("cr0") & _CR0_PE
        exit_.idt_vectoring_info = event.info(real)
        exit_.idt_vectoring_error_code = event.error_code if event.error_code is not None and not real else None
        exit_.instruction_length = event.length if event.kind in SOFTWARE_EVENT_TYPES else 0
        exit_.guest_rip = event.at
        return exit_

    def _ept_permissions(self):
        """The EPT permissions of a guest-physical page, for delivery's own accesses
        (None while EPT is off): what the cached EPT mappings grant (vtlab.cpu.ept), 0 for
        a page they do not map (an EPT violation, as :meth:`_on_mem_fault` reports it)."""
        if self.vmcs is None or not self.proc2 & ProcBased2.ENABLE_EPT:
            return None
        return self.ept.touch

    def _on_mem_fault(self, uc, access, address, size, value, _user):
        """Unicorn refused a guest-physical access (``address`` is guest-physical): with
        EPT on, an EPT violation or misconfiguration - or only an EPT accessed/dirty flag
        to set, after which the access is retried (SDM 29.3.3, 29.3.4)."""
        if self.vmcs is None or not self.proc2 & ProcBased2.ENABLE_EPT:
            return False
        kind = {unicorn.UC_MEM_READ_UNMAPPED: "r", unicorn.UC_MEM_WRITE_UNMAPPED: "w",
                unicorn.UC_MEM_FETCH_UNMAPPED: "x", unicorn.UC_MEM_READ_PROT: "r",
                unicorn.UC_MEM_WRITE_PROT: "w", unicorn.UC_MEM_FETCH_PROT: "x"}.get(access, "r")
        outcome = self.ept.fault(kind, address)
        if outcome == "retry":
            return True
        self.guest.counter.unretire_rest_of_block(self.guest.linear_rip())  # it did not retire
        self.pending = ept_exit(self.ept, self.guest, outcome, kind, address,
                                fault_linear(self.ept, self.guest, address))
        uc.emu_stop()
        return False

    def _ept_fault_in_guest_walk(self, linear: int) -> "VmExit | str | None":
        """A #PF that QEMU raised because a guest paging-structure entry lies at a
        guest-physical address Unicorn's map lacks: on the processor that access is
        translated through EPT first, so it is an EPT violation (qualification bit 8 = 0:
        the access was to a paging-structure entry) or misconfiguration (SDM 29.3.3) -
        or, with EPT A/D flags on, a page whose accessed flag was still 0: then the flag is
        set, the page mapped, and "retry" returned (the guest never sees the #PF)."""
        w, filled = guest_walk(self.ept, self.guest, linear, fill=True)
        if filled:
            return "retry"
        if not w.during_guest_walk or w.failed is None:
            return None
        outcome = (("misconfig", w.failed.problem) if w.failed.fault == "misconfigured"
                   else ("violation", w.failed.permissions))
        return ept_exit(self.ept, self.guest, outcome, "r", w.failed.address, linear, translation=False,
                        note=f"the guest's page walk for {linear:#x} reads {w.references[-1].purpose if w.references else 'a paging structure'} at guest-physical {w.failed.address:#x}")

    # ------------------------------------------------------------ operands

    def raise_exception(self, vector: Vector, note: str = "") -> str:
        """Make the current instruction raise ``vector`` (used for #UD of disabled features)."""
        self.event = (int(vector), self.guest.rip, False)
        self.guest.uc.emu_stop()
        return "emulated-fault"

    def raise_event(self, vector: int, rip: int, length: int) -> str:
        """Make the current instruction raise a trap-like software event of ``length``
        bytes (INT1): delivered with return address ``rip``, past the instruction."""
        self.event = (int(vector), rip, length)
        self.guest.uc.emu_stop()
        return "emulated-fault"

    def exception_exits(self, vector: int, error_code: int = 0) -> bool:
        """Does exception ``vector`` cause a VM exit (the exception bitmap, SDM 26.2)?"""
        return self._exception_exits(vector, error_code)

    # --------------------------------------------------- guest state <-> VMCS

    def _cpu_error(self, exc: unicorn.UcError) -> VmExit | None:
        """A Unicorn error with no hook involved: an unmapped access or an invalid opcode."""
        e = self.guest._unicorn_error(exc)
        if e.vector == Vector.UD:
            # Unicorn reports every vector-6 event as UC_ERR_INSN_INVALID, without calling
            # the interrupt hook - including INT 6 (CD 06), which is a software interrupt
            # (type 4): it skips the exception bitmap and returns past the INT (SDM 26.2).
            try:
                raw = self.guest.read(self.guest.linear_rip(), 2)
            except unicorn.UcError:
                raw = b""
            if raw == b"\xcd\x06":
                return self._handle_event(int(Vector.UD), self.guest.rip + 2, True)
        return self._handle_event(int(e.vector), self.guest.rip, False, error_code=e.error_code)

    def _handle_event(self, vector: int, rip: int, software: bool | int, error_code: int | None = None,
                      depth: int = 0, fault_address: int | None = None) -> VmExit | None:
        """An exception or INT n: exit through the exception bitmap, or deliver it (SDM 26.2).

        ``rip`` is where the CPU stands (past the instruction for INT n / INT3 / INTO /
        INT1); ``software`` the length of that instruction (True: work it out), or False
        for a hardware exception.  ``fault_address`` is the linear address of a #PF: the
        exit qualification of a #PF exit (SDM 28.2.1) - such an exit leaves CR2 alone
        (SDM 28.1) - and the value loaded into CR2 when the #PF is delivered instead.
        """
        g = self.guest
        if (vector == Vector.PF and not software and fault_address is not None
                and self.proc2 & ProcBased2.ENABLE_EPT and self.vmcs is not None):
            found = self._ept_fault_in_guest_walk(fault_address)
            if found is not None:   # not the guest's #PF: CR2 stays as it was
                if self._cr2 is not None:
                    g.uc.reg_write(X.UC_X86_REG_CR2, self._cr2)
                return None if found == "retry" else found
        real = not g.reg("cr0") & _CR0_PE
        if software:
            length = (2 if vector not in (3, 4) else 1) if software is True else int(software)
            event = Event(vector, software_event_type(vector, length), None, rip - length, length)
        else:
            if error_code is None and vector in ERROR_CODE_VECTORS:
                error_code = 0  # Unicorn does not report error codes (see ERROR_CODE_VECTORS)
            event = Event(vector, _HARDWARE, None if real else error_code, rip, 0,
                          fault_address if vector == Vector.PF else None)
        exit_ = self._bitmap_exit(event)
        if exit_ is not None:
            return exit_
        return self._deliver(event, depth)

    def _bitmap_exit(self, event: Event, during: Event | None = None) -> VmExit | None:
        """The exception bitmap (SDM 26.2) for an exception about to be delivered: an
        EXCEPTION_NMI exit (reason 0) with the interruption information of 28.2.2, or None.
        ``during``: the event whose delivery raised this exception (28.2.4)."""
        if event.kind not in EXCEPTION_BITMAP_TYPES or not self._exception_exits(
                event.vector, event.error_code or 0):
            return None
        g = self.guest
        real = not g.reg("cr0") & _CR0_PE
        software = event.kind in SOFTWARE_EVENT_TYPES
        insn = g.instruction_at(event.at)
        qualification = event.address if event.vector == Vector.PF and event.address is not None else 0
        exit_ = VmExit(ExitReason.EXCEPTION_NMI, qualification, event.length if software else 0, event.at,
                       insn.text if insn and during is None else "", intr_info=event.info(real),
                       intr_error_code=None if real else event.error_code,
                       guest_instructions=g.counter.total, cpl=self._guest_cpl(), note=event.note)
        if during is not None:
            self._during_delivery(exit_, during)
        return exit_

    def _deliver(self, event: Event, depth: int = 0) -> VmExit | None:
        """Deliver ``event`` through the guest's IDT/IVT (no exception-bitmap check: the
        caller made it, and an injected event skips it, 27.6.1.2).  None: delivered.
        Otherwise the VM exit its delivery caused (a task switch, an exit during event
        delivery, a #DF exit or a triple fault)."""
        gate = self._task_gate_exit(event)
        if gate is not None:
            return gate
        g = self.guest
        if event.vector == Vector.PF and event.kind is _HARDWARE and event.address is not None:
            g.uc.reg_write(X.UC_X86_REG_CR2, event.address)   # CR2 before delivery starts
        code = event.error_code if event.kind is _HARDWARE else None
        fault = g.deliver_interrupt(event.vector, code, event.return_rip,
                                    software=event.kind in (_SOFTWARE_INTERRUPT, _SOFTWARE_EXCEPTION),
                                    ept=self._ept_permissions())
        if fault is None:
            return None
        return self._delivery_failed(event, fault, depth)

    def _delivery_failed(self, event: Event, fault, depth: int) -> VmExit | None:
        """Delivering ``event`` raised ``fault`` (a DeliveryFault; nothing was changed)."""
        g = self.guest
        if fault.vector is None:   # an EPT violation on the IDT, GDT, TSS or stack (29.3.3)
            perms = fault.ept_permissions
            q = EptViolationQualification(read=not fault.ept_write, write=fault.ept_write,
                                          readable=bool(perms & 1), writable=bool(perms & 2),
                                          executable=bool(perms & 4), gla_valid=True, gla_translation=True)
            exit_ = VmExit(ExitReason.EPT_VIOLATION, q.encode(), 0, event.at, "",
                           guest_linear_address=fault.ept_linear, guest_physical_address=fault.ept_physical,
                           guest_instructions=g.counter.total, cpl=self._guest_cpl(),
                           note=f"{fault.note} of {event.name()}")
            return self._during_delivery(exit_, event)
        real = not g.reg("cr0") & _CR0_PE
        second = Event(fault.vector, _HARDWARE, None if real else fault.error_code, event.at, 0,
                       fault.address, note=f"{fault.note}, delivering {event.name()}")
        # 1. The exception bitmap, for the exception delivery raised (SDM 26.2, 28.2.4).
        exit_ = self._bitmap_exit(second, during=event)
        if exit_ is not None:
            return exit_
        # 2. The double-fault rules (SDM Vol. 3A 6.15, Tables 6-4 and 6-5).
        if event.is_double_fault or depth >= _MAX_NESTING:
            # Shutdown: a triple fault - not "during event delivery" (28.2.4).
            return VmExit(ExitReason.TRIPLE_FAULT, 0, 0, event.at, "",
                          note=f"triple fault: {second.note}", guest_instructions=g.counter.total,
                          cpl=self._guest_cpl())
        if second.vector == Vector.PF and second.address is not None:
            g.uc.reg_write(X.UC_X86_REG_CR2, second.address)   # the #PF happened (CR2 loaded)
        if causes_double_fault(exception_class(event.vector, event.kind), exception_class(second.vector)):
            df = Event(int(Vector.DF), _HARDWARE, None if real else 0, event.at, 0,
                       note=f"#DF: {second.note}")
            # A #DF that exits is not an exit during event delivery (28.2.4).
            exit_ = self._bitmap_exit(df)
            if exit_ is not None:
                return exit_
            return self._deliver(df, depth + 1)
        return self._deliver(second, depth + 1)   # handled serially

    def _exception_exits(self, vector: int, error_code: int) -> bool:
        """Exception bitmap, with the #PF error-code mask/match rule (SDM 26.2)."""
        bitmap = self.vmcs.get(F.EXCEPTION_BITMAP)
        if vector != Vector.PF:
            return bool(bitmap >> vector & 1)
        match = (error_code & self.vmcs.get(F.PAGE_FAULT_ERROR_CODE_MASK)) == self.vmcs.get(F.PAGE_FAULT_ERROR_CODE_MATCH)
        return bool(bitmap >> 14 & 1) == match

    def _inject_event(self) -> VmExit | None:
        """VM-entry event injection (SDM 27.6): deliver VM_ENTRY_INTR_INFO through the guest
        IDT as if it had happened just after the entry (27.6.1), or - type 7 (other event),
        vector 0 - make an MTF VM exit pending (27.6.2)."""
        info = self.vmcs.get(F.VM_ENTRY_INTR_INFO_FIELD)
        if not info & _VALID:
            return None
        d = IntrInfo.decode(info)
        g = self.guest
        self.vmcs.save_guest(F.VM_ENTRY_INTR_INFO_FIELD, info & ~_VALID)
        self.halted = False
        if d.type is InterruptionType.OTHER_EVENT:
            # SDM 27.6.2: no event is delivered; an MTF VM exit is pending on the instruction
            # boundary after the entry - even with "monitor trap flag" 0 - so it happens
            # before the guest executes anything, RIP unchanged, qualification 0.
            return VmExit(ExitReason.MONITOR_TRAP_FLAG, 0, 0, g.rip, "",
                          note="pending MTF VM exit injected at VM entry (type 7, vector 0)",
                          guest_instructions=g.counter.total, cpl=self._guest_cpl())
        real = not g.reg("cr0") & _CR0_PE
        code = self.vmcs.get(F.VM_ENTRY_EXCEPTION_ERROR_CODE) if d.deliver_error_code and not real else None
        length = self.vmcs.get(F.VM_ENTRY_INSTRUCTION_LEN) if d.type in SOFTWARE_EVENT_TYPES else 0
        if d.type is InterruptionType.NMI:
            # An injected NMI blocks NMIs until IRET - virtual-NMI blocking when "virtual
            # NMIs" is 1 - already if its delivery causes a VM exit (27.6.1.2, 28.3.4).
            self.nmi_blocked = True
        # An exit during delivery reports the entry's RIP and, for software events, the
        # VM-entry instruction length (27.6.1.2, 28.2.5).
        return self._deliver(Event(d.vector, d.type, code, g.rip, length))

    def _pending_interrupt_exit(self) -> VmExit | None:
        """External interrupts / NMIs raised by devices: exit if the pin-based control says
        so, else deliver them when the guest can take them (the NMI first)."""
        if self.pending_nmi:
            exit_ = self._pending_nmi_exit()
            if exit_ is not None:
                return exit_
        if self.pending_interrupts:
            return self._pending_external_exit()
        return None

    def _pending_nmi_exit(self) -> VmExit | None:
        """A device's NMI: with "NMI exiting" a VM exit (reason 0, interruption type 2,
        SDM 26.2) whatever the blocking; otherwise delivered through the guest's vector 2
        unless blocked by NMI or MOV SS, and then NMIs are blocked until IRET."""
        g = self.guest
        if self.pin & PinBased.NMI_EXITING:
            if self.sti_blocking() and self.shadow_bits & Interruptibility.BLOCKING_BY_MOV_SS:
                return None   # blocked by MOV SS for one more instruction (SDM 26.3)
            self.pending_nmi = False
            return VmExit(ExitReason.EXCEPTION_NMI, 0, 0, g.rip, intr_info=IntrInfo(
                2, InterruptionType.NMI).encode(), guest_instructions=g.counter.total, cpl=self._guest_cpl())
        if not self.nmi_open():
            return None   # it waits for the IRET of the NMI handler
        self.pending_nmi = False
        self.halted = False
        self.nmi_blocked = True
        self.end_shadow()
        return self._deliver(Event(int(Vector.NMI), InterruptionType.NMI, None, g.rip))

    def _pending_external_exit(self) -> VmExit | None:
        """A device's external interrupt: with "external-interrupt exiting" a VM exit
        (reason 1) whatever RFLAGS.IF says - not through an STI / MOV SS shadow - its vector in the VM-exit
        interruption-information field if "acknowledge interrupt on exit" is 1 (26.2,
        28.2.2); otherwise delivered to the guest when IF = 1 and nothing blocks it."""
        g = self.guest
        vector = self.pending_interrupts[0]
        if self.pin & PinBased.EXT_INTR_MASK:
            # RFLAGS.IF does not block it, but blocking by STI / MOV SS does (SDM 26.3).
            if self.sti_blocking():
                return None
            self.pending_interrupts.pop(0)
            ack = self.vmcs.get(F.VM_EXIT_CONTROLS) & ExitControl.ACK_INTR_ON_EXIT
            info = IntrInfo(vector, InterruptionType.EXTERNAL_INTERRUPT).encode() if ack else 0
            return VmExit(ExitReason.EXTERNAL_INTERRUPT, 0, 0, g.rip, intr_info=info,
                          guest_instructions=g.counter.total, cpl=self._guest_cpl())
        if self.interrupts_open():  # IF = 1 and no shadow: the guest takes it itself
            self.pending_interrupts.pop(0)
            self.halted = False
            self.end_shadow()
            return self._deliver(Event(vector, InterruptionType.EXTERNAL_INTERRUPT, None, g.rip))
        return None

"""Exceptions, interrupts, NMIs and EPT violations in VMX non-root operation (SDM 26.2,
27.6, 29.3.3): through the exception bitmap and pin-based controls to a VM exit, or
delivered to the guest through its IDT."""
from __future__ import annotations


import unicorn
from unicorn import x86_const as X

from ..arch.controls import ExitControl, PinBased, ProcBased2
from ..arch.exceptions import IntrInfo, InterruptionType, Vector
from ..arch.exit_reasons import ExitReason
from ..arch.qualifications import (EptViolationQualification)
from ..arch.msrs import Efer
from ..arch.vmcs_fields import VmcsField as F
from .guest import ERROR_CODE_VECTORS

from .vmexit import VmExit
from .nonroot_consts import _VALID

_EFER_LMA = int(Efer.LMA)

class EventUnit:
    """Event handling of the non-root monitor."""

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
        """Did an INT n / INT3 / INTO just execute (Unicorn reports RIP after it)?  Its
        length (2, 1, 1) if so - the "software" element of an event - else 0."""
        for length, opcode in ((2, 0xCD), (1, 0xCC), (1, 0xCE)):
            try:
                raw = self.guest.read(self.guest.segment("cs").base + rip - length, length)
            except unicorn.UcError:
                continue
            if raw[0] == opcode and (opcode != 0xCD or raw[1] == vector):
                return length
        return 0

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

    def _task_gate_exit(self, vector: int, at: int, length: int, software: bool) -> VmExit | None:
        """An event about to be delivered through a task gate in the IDT: a task switch,
        so a VM exit (SDM 26.4.2) - qualification bits 15:0 the TSS selector in the gate,
        bits 31:30 = 3 (task gate in the IDT), Table 28-2.

        Outside IA-32e mode only (there a task gate raises #GP, 26.4.2 e); the gate must
        be present, and for INT n / INT3 / INTO its DPL >= CPL (26.4.2 b; other events
        get no privilege check, f); then the new TSS is checked (:meth:`valid_new_tss`).
        None: not a task gate, or a check failed (delivery raises the fault).
        ``at``/``length``: the RIP and VM-exit instruction length the exit reports
        (the INT instruction and its length for software events, SDM 28.2.5).
        """
        g = self.guest
        if not g.reg("cr0") & 1 or g.reg("efer") & _EFER_LMA:
            return None
        base, limit = g.descriptor_table("idtr")
        if vector * 8 + 7 > limit:
            return None
        try:
            raw = g.read_u64(base + vector * 8)
        except unicorn.UcError:
            return None
        if (raw >> 40) & 0x1F != 5 or not raw >> 47 & 1:   # S = 0, type 5; P
            return None
        if software and (raw >> 45 & 3) < g.cpl:
            return None
        selector = raw >> 16 & 0xFFFF
        if not self.valid_new_tss(selector, busy=False):
            return None
        insn = g.instruction_at(at) if software else None
        return VmExit(ExitReason.TASK_SWITCH, selector | 3 << 30, length, at,
                      insn.text if insn else "", guest_instructions=g.counter.total, cpl=g.cpl)

    def _on_mem_fault(self, uc, access, address, size, value, _user):
        if self.vmcs is None or not self.proc2 & ProcBased2.ENABLE_EPT:
            return False
        kind = {unicorn.UC_MEM_READ_UNMAPPED: "r", unicorn.UC_MEM_WRITE_UNMAPPED: "w",
                unicorn.UC_MEM_FETCH_UNMAPPED: "x", unicorn.UC_MEM_READ_PROT: "r",
                unicorn.UC_MEM_WRITE_PROT: "w", unicorn.UC_MEM_FETCH_PROT: "x"}.get(access, "r")
        perms = 0
        if self.ept_pages is not None:
            perms = self.ept_pages.get(address & ~0xFFF, 0)
        q = EptViolationQualification(read=kind == "r", write=kind == "w", fetch=kind == "x",
                                      readable=bool(perms & 1), writable=bool(perms & 2),
                                      executable=bool(perms & 4), gla_valid=True, gla_translation=True)
        insn = self.guest.instruction_at()
        self.pending = VmExit(ExitReason.EPT_VIOLATION, q.encode(), 0, self.guest.rip,
                              insn.text if insn else "", guest_linear_address=address,
                              guest_physical_address=address,
                              guest_instructions=self.guest.counter.total, cpl=self.guest.cpl)
        uc.emu_stop()
        return False

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

    def _handle_event(self, vector: int, rip: int, software: bool, error_code: int | None = None,
                      depth: int = 0, fault_address: int | None = None) -> VmExit | None:
        """An exception or INT n: exit through the exception bitmap, or deliver it (SDM 26.2).

        ``fault_address`` is the linear address of a #PF: the exit qualification of a #PF
        exit (SDM 28.2.1) - such an exit leaves CR2 alone (SDM 28.1) - and the value
        loaded into CR2 when the #PF is delivered to the guest instead.
        """
        g = self.guest
        if not software and error_code is None and vector in ERROR_CODE_VECTORS:
            error_code = 0  # Unicorn does not report error codes (see ERROR_CODE_VECTORS)
        is_exception = vector < 32 and (not software or vector in (3, 4))
        # ``software``: the length of the INT n / INT3 / INTO / INT1 (True: work it out).
        length = (2 if vector not in (3, 4) else 1) if software is True else int(software)
        if is_exception and self._exception_exits(vector, error_code or 0):
            kind = InterruptionType.SOFTWARE_EXCEPTION if software else InterruptionType.HARDWARE_EXCEPTION
            info = IntrInfo(vector, kind, error_code is not None).encode()
            insn = g.instruction_at()
            at = rip - length if software else rip
            qualification = fault_address if vector == Vector.PF and fault_address is not None else 0
            return VmExit(ExitReason.EXCEPTION_NMI, qualification, (rip - at) if software else 0, at,
                          insn.text if insn and not software else "", intr_info=info,
                          intr_error_code=error_code, guest_instructions=g.counter.total, cpl=g.cpl)
        gate = self._task_gate_exit(vector, rip - length if software else rip,
                                    length if software else 0, bool(software))
        if gate is not None:
            return gate
        if vector == Vector.PF and not software and fault_address is not None:
            g.uc.reg_write(X.UC_X86_REG_CR2, fault_address)
        problem = g.deliver_interrupt(vector, error_code if is_exception and not software else None, rip)
        if problem is None:
            return None
        # Could not deliver: #GP, then #DF, then a triple fault (SDM Vol. 3A 6.15, Table 6-5).
        if depth >= 1 or vector == Vector.DF:
            return VmExit(ExitReason.TRIPLE_FAULT, 0, 0, rip, "", note=f"triple fault: {problem}",
                          guest_instructions=g.counter.total, cpl=g.cpl)
        return self._handle_event(int(Vector.DF), rip, False, 0, depth + 1)

    def _exception_exits(self, vector: int, error_code: int) -> bool:
        """Exception bitmap, with the #PF error-code mask/match rule (SDM 26.2)."""
        bitmap = self.vmcs.get(F.EXCEPTION_BITMAP)
        if vector != Vector.PF:
            return bool(bitmap >> vector & 1)
        match = (error_code & self.vmcs.get(F.PAGE_FAULT_ERROR_CODE_MASK)) == self.vmcs.get(F.PAGE_FAULT_ERROR_CODE_MATCH)
        return bool(bitmap >> 14 & 1) == match

    def _inject_event(self) -> VmExit | None:
        """VM-entry event injection (SDM 27.6): deliver VM_ENTRY_INTR_INFO through the guest IDT."""
        info = self.vmcs.get(F.VM_ENTRY_INTR_INFO_FIELD)
        if not info & _VALID:
            return None
        d = IntrInfo.decode(info)
        code = self.vmcs.get(F.VM_ENTRY_EXCEPTION_ERROR_CODE) if d.deliver_error_code else None
        rip = at = self.guest.rip
        length = 0
        if d.type in (InterruptionType.SOFTWARE_INTERRUPT, InterruptionType.SOFTWARE_EXCEPTION,
                      InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION):
            length = self.vmcs.get(F.VM_ENTRY_INSTRUCTION_LEN)
            rip += length
        self.vmcs.save_guest(F.VM_ENTRY_INTR_INFO_FIELD, info & ~_VALID)
        self.halted = False
        # Delivery through a task gate is a task switch: a VM exit (SDM 26.4.2); its
        # instruction length is the VM-entry instruction length (SDM 28.2.5).
        if d.type is not InterruptionType.OTHER_EVENT:
            gate = self._task_gate_exit(d.vector, at, length, d.type in (
                InterruptionType.SOFTWARE_INTERRUPT, InterruptionType.SOFTWARE_EXCEPTION))
            if gate is not None:
                return gate
        problem = self.guest.deliver_interrupt(d.vector, code, rip)
        if problem is None:
            return None
        return self._handle_event(int(Vector.DF), rip, False, 0, 1)

    def _pending_interrupt_exit(self) -> VmExit | None:
        """External interrupts / NMIs raised by devices: exit if the pin-based control says so."""
        g = self.guest
        if self.pending_nmi:
            self.pending_nmi = False
            if self.pin & PinBased.NMI_EXITING:
                return VmExit(ExitReason.EXCEPTION_NMI, 0, 0, g.rip, intr_info=IntrInfo(
                    2, InterruptionType.NMI).encode(), guest_instructions=g.counter.total, cpl=g.cpl)
            gate = self._task_gate_exit(2, g.rip, 0, False)
            if gate is not None:
                return gate
            g.deliver_interrupt(2)
            self.halted = False
        if self.pending_interrupts:
            vector = self.pending_interrupts[0]
            if self.pin & PinBased.EXT_INTR_MASK:
                self.pending_interrupts.pop(0)
                ack = self.vmcs.get(F.VM_EXIT_CONTROLS) & ExitControl.ACK_INTR_ON_EXIT
                info = IntrInfo(vector, InterruptionType.EXTERNAL_INTERRUPT).encode() if ack else 0
                return VmExit(ExitReason.EXTERNAL_INTERRUPT, 0, 0, g.rip, intr_info=info,
                              guest_instructions=g.counter.total, cpl=g.cpl)
            if g.reg("eflags") & (1 << 9):  # IF = 1: the guest takes it itself
                self.pending_interrupts.pop(0)
                self.halted = False
                gate = self._task_gate_exit(vector, g.rip, 0, False)
                if gate is not None:
                    return gate
                problem = g.deliver_interrupt(vector)
                if problem is not None:
                    return self._handle_event(int(Vector.DF), g.rip, False, 0, 1)
        return None

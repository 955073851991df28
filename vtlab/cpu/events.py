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
from ..arch.vmcs_fields import VmcsField as F
from .guest import ERROR_CODE_VECTORS

from .vmexit import VmExit
from .nonroot_consts import _VALID

class EventUnit:
    """Event handling of the non-root monitor."""

    def _on_interrupt(self, vector: int) -> None:
        g = self.guest
        rip = g.rip
        software = self._software_interrupt_at(rip, vector)
        self.event = (vector, rip, software)
        if vector == Vector.PF and not software and g.page_fault is not None:
            # #PF: the error code and faulting address the guest captured (see Guest._on_intr)
            self.event = (vector, rip, software, g.page_fault[1], 0, g.page_fault[0])
        g.uc.emu_stop()

    def _software_interrupt_at(self, rip: int, vector: int) -> bool:
        """Did an INT n / INT3 just execute (Unicorn reports RIP after it)?"""
        for length, opcode in ((2, 0xCD), (1, 0xCC), (1, 0xCE)):
            try:
                raw = self.guest.read(self.guest.segment("cs").base + rip - length, length)
            except unicorn.UcError:
                continue
            if raw[0] == opcode and (opcode != 0xCD or raw[1] == vector):
                return True
        return False

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
        if is_exception and self._exception_exits(vector, error_code or 0):
            kind = InterruptionType.SOFTWARE_EXCEPTION if software else InterruptionType.HARDWARE_EXCEPTION
            info = IntrInfo(vector, kind, error_code is not None).encode()
            insn = g.instruction_at()
            at = rip - (2 if software and vector not in (3, 4) else 1) if software else rip
            qualification = fault_address if vector == Vector.PF and fault_address is not None else 0
            return VmExit(ExitReason.EXCEPTION_NMI, qualification, (rip - at) if software else 0, at,
                          insn.text if insn and not software else "", intr_info=info,
                          intr_error_code=error_code, guest_instructions=g.counter.total, cpl=g.cpl)
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
        rip = self.guest.rip
        if d.type in (InterruptionType.SOFTWARE_INTERRUPT, InterruptionType.SOFTWARE_EXCEPTION):
            rip += self.vmcs.get(F.VM_ENTRY_INSTRUCTION_LEN)
        self.vmcs.save_guest(F.VM_ENTRY_INTR_INFO_FIELD, info & ~_VALID)
        self.halted = False
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
                problem = g.deliver_interrupt(vector)
                if problem is not None:
                    return self._handle_event(int(Vector.DF), g.rip, False, 0, 1)
        return None

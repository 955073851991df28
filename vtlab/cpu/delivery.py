"""Exceptions and interrupts: describing what the CPU raised, and delivering events.

Unicorn reports every exception and interrupt to a host callback instead of vectoring
it through the guest's IDT.  :class:`EventDelivery`, one part of
:class:`vtlab.cpu.guest.Guest`, turns such a report into a :class:`GuestException`
(:meth:`~EventDelivery.make_exception`) and, when an event must really reach the guest
(a VMM injecting an interrupt, an exception the guest handles itself), delivers it the
way the CPU would (:meth:`~EventDelivery.deliver_interrupt`).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from unicorn import x86_const as X

from ..arch.exceptions import Vector
from ..arch.msrs import Cr0, Efer

#: The exceptions that push an error code (SDM Vol. 3A 6.13, Table 6-1).  Unicorn never
#: reports the code, so vtlab supplies 0: right for the #GP(0) of a privileged
#: instruction or a segment check at CPL 3 (SDM Vol. 3A 6.15, "Exception 13").
ERROR_CODE_VECTORS = {Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF,
                       Vector.AC, Vector.CP}


@dataclass
class GuestException:
    """An exception or interrupt the CPU raised while running the guest."""

    vector: int
    rip: int
    error_code: int | None = None
    cpl: int = 0
    instruction: str = ""
    #: #PF only: the linear address that caused it (what the CPU loads into CR2).
    address: int | None = None

    @property
    def name(self) -> str:
        try:
            return "#" + Vector(self.vector).name
        except ValueError:
            return f"INT {self.vector:#x}"

    def __str__(self) -> str:
        code = "" if self.error_code is None else f"({self.error_code})"
        return f"{self.name}{code} at {self.rip:#x} (CPL {self.cpl}) {self.instruction}".strip()


class EventDelivery:
    """Exception reports and IVT/IDT delivery (a part of :class:`~vtlab.cpu.guest.Guest`).

    Relies on the Guest for ``uc``, the registers, the segments and memory, and on
    ``page_fault`` (set when Unicorn raised a #PF).
    """

    def make_exception(self, vector: int) -> GuestException:
        """Describe an exception Unicorn just raised (RIP points at the faulting instruction
        for faults, after the INT n for software interrupts)."""
        rip = self.rip
        insn = self.instruction_at()
        code = 0 if vector in ERROR_CODE_VECTORS else None
        address = None
        if vector == Vector.PF and self.page_fault is not None:
            address, code = self.page_fault
        return GuestException(vector, rip, code, self.cpl, insn.text if insn else "", address)

    def _push(self, value: int, size: int) -> None:
        sp = self.reg("rsp") - size
        ss_base = self.segment("ss").base if self.reg("cr0") & Cr0.PE else self.reg("ss") << 4
        self.write(ss_base + (sp & (0xFFFF if self.bits == 16 and not self.reg("cr0") & Cr0.PE else 0xFFFF_FFFF_FFFF_FFFF)),
                   value.to_bytes(size, "little", signed=False))
        self.set_reg("rsp", sp)

    def deliver_interrupt(self, vector: int, error_code: int | None = None,
                          return_rip: int | None = None) -> str | None:
        """Deliver an interrupt or exception through the guest's IVT/IDT, as the CPU would.

        Unicorn reports events but never vectors them (its UC_HOOK_INTR replaces the
        delivery), so vtlab does what SDM Vol. 3A 6.12 (protected mode), 6.14 (IA-32e
        mode) and Vol. 1 / 3A 20.1.4 (real mode) describe: push the return frame, switch
        to the ring-0 stack from the TSS on a privilege change, load CS:RIP from the gate
        and clear IF for interrupt gates.  Returns None on success, or why the gate
        could not be used (the caller then raises #GP / #DF / triple fault).
        """
        rip = self.rip if return_rip is None else return_rip
        flags = self.reg("eflags")
        cr0 = self.reg("cr0")
        if not cr0 & Cr0.PE:  # real mode: 4-byte IVT entries offset:segment
            _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
            if vector * 4 + 3 > limit:
                return f"vector {vector} is beyond the IVT limit {limit:#x}"
            offset, segment = struct.unpack("<HH", self.read(base + vector * 4, 4))
            self._push(flags & 0xFFFF, 2)
            self._push(self.reg("cs"), 2)
            self._push(rip & 0xFFFF, 2)
            self.set_reg("eflags", flags & ~((1 << 9) | (1 << 8)))
            self.uc.reg_write(X.UC_X86_REG_CS, segment)
            self.rip = offset
            return None
        long_mode = bool(self.reg("efer") & Efer.LMA)
        size = 16 if long_mode else 8
        _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
        if vector * size + size - 1 > limit:
            return f"vector {vector} is beyond the IDT limit {limit:#x}"
        raw = self.read(base + vector * size, size)
        lo = struct.unpack("<Q", raw[:8])[0]
        gate_type, present = (lo >> 40) & 0xF, (lo >> 47) & 1
        selector = (lo >> 16) & 0xFFFF
        offset = (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16)
        if long_mode:
            offset |= struct.unpack("<I", raw[8:12])[0] << 32
        if not present or gate_type not in (0xE, 0xF):
            return f"IDT entry {vector} is not a present interrupt or trap gate"
        old_cs, old_ss, old_sp, cpl = self.reg("cs"), self.reg("ss"), self.reg("rsp"), self.cpl
        target_dpl = selector & 3 if selector & ~3 == 0 else self.segment_dpl(selector)
        word = 8 if long_mode else 4
        if target_dpl < cpl:  # privilege change: stack from the TSS (SDM 6.12.1)
            tss = self.segment("tr").base
            new_sp = self.read_u64(tss + 4) if long_mode else self.read_u32(tss + 4)
            new_ss = 0 if long_mode else self.read_u16(tss + 8)
            self.load_segment("cs", selector)
            if not long_mode:
                self.load_segment("ss", new_ss)
            else:
                self.load_segment("ss", 0)
            self.set_reg("rsp", new_sp & (~0xF if long_mode else ~0))
            self._push(old_ss, word)
            self._push(old_sp, word)
        elif long_mode:
            self.set_reg("rsp", old_sp & ~0xF)
            self._push(old_ss, word)
            self._push(old_sp, word)
        self._push(flags, word)
        self._push(old_cs, word)
        self._push(rip, word)
        if error_code is not None:
            self._push(error_code, word)
        if target_dpl == cpl:
            self.load_segment("cs", selector)
        new_flags = flags & ~((1 << 8) | (1 << 14) | (1 << 16) | (1 << 17))
        if gate_type == 0xE:
            new_flags &= ~(1 << 9)  # interrupt gate: IF := 0
        self.set_reg("eflags", new_flags)
        self.rip = offset
        return None

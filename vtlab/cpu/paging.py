"""Page faults as the CPU reports them: the #PF error code and the translation walk.

Unicorn raises #PF but never reports its error code (SDM Vol. 3A 4.7), so
:class:`PagingUnit`, one part of :class:`vtlab.cpu.guest.Guest`, rebuilds it: it
decodes the faulting instruction to learn the kind of access, and walks the guest's
own page tables (32-bit, PAE or 4-level paging) to learn whether the translation was
absent or the access was not allowed.
"""
from __future__ import annotations

import capstone
import unicorn
from unicorn import x86_const as X

from . import asm
from ..arch.msrs import Cr0, Cr4, Efer

#: Instructions that write the stack whatever their operands (Capstone instruction ids).
_STACK_WRITERS = frozenset(getattr(capstone.x86_const, f"X86_INS_{name}") for name in (
    "PUSH", "PUSHF", "PUSHFD", "PUSHFQ", "PUSHAW", "PUSHAL", "CALL", "ENTER", "LCALL")
    if hasattr(capstone.x86_const, f"X86_INS_{name}"))


def _decode_detail(guest, linear: int):
    """Capstone's detailed decode of the instruction at ``linear`` (None if unreadable)."""
    cs = capstone.Cs(capstone.CS_ARCH_X86, asm._CS_MODE[guest.bits])
    cs.detail = True
    try:
        return next(cs.disasm(guest.read(linear, 15), linear, 1), None)
    except unicorn.UcError:
        return None


def _writes_memory(detail) -> bool:
    """Does the decoded instruction write memory (an operand, or the stack)?"""
    if detail.id in _STACK_WRITERS:
        return True
    return any(op.type == capstone.x86.X86_OP_MEM and op.access & capstone.CS_AC_WRITE
               for op in detail.operands)


class PagingUnit:
    """The #PF error code and the page walk (a part of :class:`~vtlab.cpu.guest.Guest`).

    Relies on the Guest for ``uc``, :meth:`reg`, :attr:`cpl`, :meth:`linear_rip` and
    its memory reads.
    """

    def _page_fault_info(self) -> tuple[int, int]:
        """(linear address, error code) of the page fault being raised (SDM Vol. 3A 4.7).

        The error code is rebuilt as the SDM defines it: bit 0 P (0: a non-present
        translation, 1: a protection violation), bit 1 W/R (a write), bit 2 U/S (CPL 3),
        bit 4 I/D (an instruction fetch, reported with PAE + EFER.NXE or CR4.SMEP).  The
        access kind comes from the faulting instruction: a fetch if the address lies in
        its own bytes (or it cannot be read), a write if it writes a memory operand or
        the stack.  RSVD (bit 3) is never set: vtlab's page tables have no reserved bits.
        """
        address = self.uc.reg_read(X.UC_X86_REG_CR2)
        linear = self.linear_rip()
        detail = _decode_detail(self, linear)
        write = detail is not None and _writes_memory(detail)
        fetch = detail is None or (linear <= address < linear + detail.size and not write)
        cr4, efer = self.reg("cr4"), self.reg("efer")
        code = int(self._translation_present(address)) | int(write) << 1 | int(self.cpl == 3) << 2
        if fetch and ((efer & Efer.NXE and cr4 & Cr4.PAE) or cr4 & Cr4.SMEP):
            code |= 1 << 4
        return address, code

    def _translation_present(self, linear: int) -> bool:
        """Does the guest's paging structure map ``linear`` at every level (P = 1)?"""
        cr0, cr3, cr4 = self.reg("cr0"), self.reg("cr3"), self.reg("cr4")
        if not cr0 & Cr0.PG:
            return True
        frame = 0x000F_FFFF_FFFF_F000
        try:
            if self.reg("efer") & Efer.LMA:  # 4-level paging: PML4, PDPT, PD, PT
                table = cr3 & frame
                for shift in (39, 30, 21, 12):
                    entry = self.read_u64(table + ((linear >> shift) & 0x1FF) * 8)
                    if not entry & 1:
                        return False
                    if shift in (30, 21) and entry & 0x80:  # 1-GByte / 2-MByte page
                        return True
                    table = entry & frame
                return True
            if cr4 & Cr4.PAE:  # PAE paging: PDPTE, PD, PT
                pdpte = self.read_u64((cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8)
                if not pdpte & 1:
                    return False
                pde = self.read_u64((pdpte & frame) + ((linear >> 21) & 0x1FF) * 8)
                if not pde & 1 or pde & 0x80:  # absent, or a 2-MByte page
                    return bool(pde & 1)
                return bool(self.read_u64((pde & frame) + ((linear >> 12) & 0x1FF) * 8) & 1)
            entry = self.read_u32((cr3 & 0xFFFF_F000) + ((linear >> 22) & 0x3FF) * 4)  # 32-bit
            if not entry & 1:
                return False
            if entry & 0x80 and cr4 & Cr4.PSE:  # 4-MByte page
                return True
            return bool(self.read_u32((entry & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4) & 1)
        except unicorn.UcError:  # a paging structure outside guest memory
            return False

"""Operands of exiting instructions: effective addresses, displacements and the
VM-exit instruction-information field (SDM Vol. 3C 28.2.1, 28.2.5)."""
from __future__ import annotations


import capstone

from .asm import _CS_MODE, Instruction

from .exit_rules import _gpr_index


class OperandDecoder:
    """Operand helpers of the non-root monitor."""

    def effective_address(self, insn: Instruction) -> int:
        """Linear address of ``insn``'s memory operand (segment base + base + index*scale + disp)."""
        d = self._detail(insn)
        if d is None:
            return 0
        for op in d.operands:
            if op.type == capstone.x86.X86_OP_MEM:
                addr = op.mem.disp
                if op.mem.base:
                    base = d.reg_name(op.mem.base)
                    addr += self.guest.rip + insn.size if base == "rip" else self.guest.reg(base)
                if op.mem.index:
                    addr += self.guest.reg(d.reg_name(op.mem.index)) * op.mem.scale
                seg = d.reg_name(op.mem.segment) if op.mem.segment else "ds"
                return (self.guest.segment(seg).base + addr) & 0xFFFF_FFFF_FFFF_FFFF
        return 0

    def _detail(self, insn: Instruction):
        """Capstone's detailed decode of ``insn`` in the guest's current code size."""
        self._cs.mode = _CS_MODE[self.guest.bits]
        return next(self._cs.disasm(insn.bytes, insn.address, 1), None)

    def displacement(self, insn: Instruction) -> int:
        """The exit qualification of descriptor-table and VMX-instruction exits (SDM 28.2.1).

        It is the instruction's displacement field, sign-extended to 64 bits, or 0 when
        there is none (a register operand, or a memory operand without displacement).
        RIP-relative addressing is the exception: the qualification is then the
        displacement plus the RIP of the following instruction.
        """
        d = self._detail(insn)
        mem = [op for op in (d.operands if d else []) if op.type == capstone.x86.X86_OP_MEM]
        if not mem or not d.disp_size:
            return 0
        raw = d.bytes[d.disp_offset:d.disp_offset + d.disp_size]
        disp = int.from_bytes(raw, "little", signed=True)
        if mem[0].mem.base and d.reg_name(mem[0].mem.base) == "rip":
            disp += insn.address + insn.size
        return disp & 0xFFFF_FFFF_FFFF_FFFF

    def instruction_information(self, insn: Instruction, gdtr_idtr: bool) -> int:
        """VM-exit instruction-information field for LGDT/LIDT/SGDT/SIDT (SDM Table 28-10)
        and LLDT/LTR/SLDT/STR (Table 28-11), without the identity bits 29:28.

        Bits 1:0 scaling, 9:7 address size (0 16-bit, 1 32-bit, 2 64-bit), 17:15 segment
        register (ES, CS, SS, DS, FS, GS), 21:18 index register, 22 index invalid, 26:23
        base register, 27 base invalid.  Table 28-10 adds bit 11, the operand size (0
        16-bit, 1 32-bit); Table 28-11 has bit 10 (1 = register operand, given in bits
        6:3).  Bits the SDM calls undefined are left 0.
        """
        d = self._detail(insn)
        if d is None:
            return 0
        info = 0
        if gdtr_idtr and self.guest.bits != 64:
            operand32 = (self.guest.bits == 32) != (0x66 in d.prefix)
            info |= int(operand32) << 11
        for op in d.operands:
            if op.type == capstone.x86.X86_OP_REG and not gdtr_idtr:
                return info | _gpr_index(d.reg_name(op.reg)) << 3 | 1 << 10
            if op.type != capstone.x86.X86_OP_MEM:
                continue
            mem = op.mem
            info |= {1: 0, 2: 1, 4: 2, 8: 3}.get(mem.scale, 0)
            info |= {2: 0, 4: 1, 8: 2}.get(d.addr_size, 0) << 7
            base = d.reg_name(mem.base) if mem.base else None
            if mem.segment:
                seg = d.reg_name(mem.segment)
            else:  # default segment: SS for rBP/rSP-based addresses, DS otherwise
                seg = "ss" if base and base.lstrip("re").rstrip("lwd") in ("bp", "sp") else "ds"
            info |= ("es", "cs", "ss", "ds", "fs", "gs").index(seg) << 15
            if mem.index:
                info |= _gpr_index(d.reg_name(mem.index)) << 18
            else:
                info |= 1 << 22
            if base and base != "rip":
                info |= _gpr_index(base) << 23
            else:
                info |= 1 << 27
            return info
        return info

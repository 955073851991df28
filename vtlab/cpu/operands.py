"""Exit information computed from a decoded instruction's operands (SDM Vol. 3C 28.2.1,
28.2.5): the displacement qualification and the VM-exit instruction-information field,
in each layout of 28.2.5 that vtlab's instructions use - INS/OUTS, the VMX instructions
(VMCLEAR/VMPTRLD/VMPTRST/VMXON, VMREAD/VMWRITE, INVEPT/INVVPID), LGDT/LIDT/SGDT/SIDT,
LLDT/LTR/SLDT/STR and RDRAND/RDSEED.

All are pure functions of a :class:`~vtlab.cpu.decoder.DecodedInstruction` - the
instruction was decoded once, when it was loaded, so a VM exit decodes nothing.  The
operand's linear address is the record's own method
(:meth:`~vtlab.cpu.decoder.DecodedInstruction.linear_address`).
"""
from __future__ import annotations

from .decoder import DecodedInstruction, InsnKind, MemoryOperand

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
#: Address-size codes of the instruction-information field (bits 9:7): 16, 32, 64 bits.
_ADDRESS_SIZE_CODE = {16: 0, 32: 1, 64: 2}


def displacement(d: DecodedInstruction) -> int:
    """The exit qualification of descriptor-table and VMX-instruction exits (SDM 28.2.1).

    It is the instruction's displacement field, sign-extended to 64 bits, or 0 when
    there is none (a register operand, or a memory operand without displacement).
    RIP-relative addressing is the exception: the qualification is then the
    displacement plus the RIP of the following instruction.
    """
    mem = d.memory
    if mem is None or not mem.displacement_size:
        return 0
    disp = mem.displacement
    if mem.rip_relative:
        disp += d.address + d.length
    return disp & _MASK64


#: Operand-size codes of RDRAND/RDSEED's instruction information (bits 12:11).
_OPERAND_SIZE_CODE = {16: 0, 32: 1, 64: 2}
_MEM_REG = 1 << 10   # bit 10 of the VMREAD/VMWRITE and LLDT/... layouts: 1 = register operand


def memory_information(mem: MemoryOperand) -> int:
    """The memory-operand part every instruction-information layout with a memory
    operand shares (SDM 28.2.5, the tables for INVEPT/INVVPID, LIDT/LGDT/SIDT/SGDT,
    LLDT/LTR/SLDT/STR, VMCLEAR/VMPTRLD/VMPTRST/VMXON and VMREAD/VMWRITE):

    bits 1:0 scaling (0 none, 1 by 2, 2 by 4, 3 by 8), 9:7 address size (0 16-bit,
    1 32-bit, 2 64-bit), 17:15 segment register (0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS),
    21:18 index register, 22 index invalid, 26:23 base register, 27 base invalid.
    RIP-relative addressing has neither base nor index.
    """
    info = mem.scaling | _ADDRESS_SIZE_CODE[mem.address_size] << 7 | mem.segment << 15
    info |= mem.index << 18 if mem.index is not None else 1 << 22
    info |= mem.base << 23 if mem.base is not None else 1 << 27
    return info


def instruction_information(d: DecodedInstruction, gdtr_idtr: bool) -> int:
    """VM-exit instruction-information field for LGDT/LIDT/SGDT/SIDT (SDM Table 28-10)
    and LLDT/LTR/SLDT/STR (Table 28-11), without the identity bits 29:28.

    The memory operand as :func:`memory_information` encodes it.  Table 28-10 adds bit
    11, the operand size (0 16-bit, 1 32-bit; undefined in 64-bit mode); Table 28-11
    has bit 10 (1 = register operand, given in bits 6:3).  Bits the SDM calls undefined
    are left 0.
    """
    info = 0
    if gdtr_idtr and d.code_size != 64:
        info |= int(d.operand_size == 32) << 11
    if not gdtr_idtr and d.registers:
        return info | d.registers[0].number << 3 | _MEM_REG
    mem = d.memory
    if mem is None:
        return info
    return info | memory_information(mem)


def vmx_instruction_information(d: DecodedInstruction) -> int:
    """VM-exit instruction information of a VMX instruction (SDM 28.2.5), or 0 for those
    that define none (VMLAUNCH, VMRESUME, VMXOFF, VMCALL).

    * VMCLEAR, VMPTRLD, VMPTRST, VMXON ("... as Used for VMCLEAR, VMPTRLD, VMPTRST, VMXON,
      XRSTORS, and XSAVES"): the memory operand (:func:`memory_information`), bit 10
      cleared to 0 (the operand is always in memory), bits 31:28 undefined.
    * INVEPT, INVVPID ("... for INVEPT, INVPCID, and INVVPID"): the memory operand, bit 10
      cleared, bits 31:28 Reg2 - the register operand (the INVEPT/INVVPID type).
    * VMREAD, VMWRITE ("... for VMREAD and VMWRITE"): bit 10 = 0 memory / 1 register
      operand; for a register, bits 6:3 Reg1 (the r/m register); for memory, the memory
      operand; bits 31:28 Reg2 (the register of the ModRM reg field, which holds the
      VMCS-field encoding).  In Intel operand order VMREAD is ``r/m, reg`` and VMWRITE
      ``reg, r/m``.
    """
    kind, regs, mem = d.kind, d.registers, d.memory
    if kind is InsnKind.VMREAD or kind is InsnKind.VMWRITE:
        if mem is not None:  # the one register operand is Reg2
            return memory_information(mem) | (regs[0].number << 28 if regs else 0)
        if len(regs) < 2:
            return 0
        rm, reg = (regs[0], regs[1]) if kind is InsnKind.VMREAD else (regs[1], regs[0])
        return rm.number << 3 | _MEM_REG | reg.number << 28
    if mem is None or kind not in _VMX_MEMORY_KINDS:
        return 0
    info = memory_information(mem)
    if (kind is InsnKind.INVEPT or kind is InsnKind.INVVPID) and regs:
        info |= regs[0].number << 28
    return info


_VMX_MEMORY_KINDS = frozenset({InsnKind.VMCLEAR, InsnKind.VMPTRLD, InsnKind.VMPTRST,
                               InsnKind.VMXON, InsnKind.INVEPT, InsnKind.INVVPID})


def string_io_information(d: DecodedInstruction) -> int:
    """VM-exit instruction information of INS/OUTS ("... as Used for INS and OUTS",
    SDM 28.2.5; defined when IA32_VMX_BASIC[54] = 1): bits 9:7 the address size (0
    16-bit, 1 32-bit, 2 64-bit) and, for OUTS, bits 17:15 the segment register of the
    source (DS or an override prefix's); for INS those bits are undefined (left 0: INS
    always writes ES:rDI).  Every other bit is undefined (0)."""
    info = _ADDRESS_SIZE_CODE[d.address_size] << 7
    if d.kind is InsnKind.OUTS and d.memory is not None:
        info |= d.memory.segment << 15
    return info


def rdrand_information(d: DecodedInstruction) -> int:
    """VM-exit instruction information of RDRAND/RDSEED ("... as Used for RDRAND,
    RDSEED, TPAUSE, and UMWAIT", SDM 28.2.5): bits 6:3 the destination register, bits
    12:11 the operand size (0 16-bit, 1 32-bit, 2 64-bit); the rest undefined (0)."""
    if not d.registers:
        return 0
    dest = d.registers[0]
    return dest.number << 3 | _OPERAND_SIZE_CODE.get(dest.width, 1) << 11


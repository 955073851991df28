"""Exit information computed from a decoded instruction's operands (SDM Vol. 3C 28.2.1,
28.2.5): the displacement qualification and the VM-exit instruction-information field.

Both are pure functions of a :class:`~vtlab.cpu.decoder.DecodedInstruction` - the
instruction was decoded once, when it was loaded, so a VM exit decodes nothing.  The
operand's linear address is the record's own method
(:meth:`~vtlab.cpu.decoder.DecodedInstruction.linear_address`).
"""
from __future__ import annotations

from .decoder import DecodedInstruction

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


def instruction_information(d: DecodedInstruction, gdtr_idtr: bool) -> int:
    """VM-exit instruction-information field for LGDT/LIDT/SGDT/SIDT (SDM Table 28-10)
    and LLDT/LTR/SLDT/STR (Table 28-11), without the identity bits 29:28.

    Bits 1:0 scaling, 9:7 address size (0 16-bit, 1 32-bit, 2 64-bit), 17:15 segment
    register (ES, CS, SS, DS, FS, GS), 21:18 index register, 22 index invalid, 26:23
    base register, 27 base invalid.  Table 28-10 adds bit 11, the operand size (0
    16-bit, 1 32-bit); Table 28-11 has bit 10 (1 = register operand, given in bits
    6:3).  Bits the SDM calls undefined are left 0.
    """
    info = 0
    if gdtr_idtr and d.code_size != 64:
        info |= int(d.operand_size == 32) << 11
    if not gdtr_idtr and d.registers:
        return info | d.registers[0].number << 3 | 1 << 10
    mem = d.memory
    if mem is None:
        return info
    info |= mem.scaling
    info |= _ADDRESS_SIZE_CODE[mem.address_size] << 7
    info |= mem.segment << 15
    info |= mem.index << 18 if mem.index is not None else 1 << 22
    info |= mem.base << 23 if mem.base is not None else 1 << 27  # RIP-relative: no base
    return info


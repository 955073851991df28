"""The access-rights format of a segment register's hidden part, as the VMCS holds it.

The guest-state area keeps each segment register's access rights in a 32-bit field whose
bits 15:0 have the layout of bytes 5-6 of a segment descriptor (type, S, DPL, P, then the
descriptor's flags nibble AVL, L, D/B, G with the limit bits 19:16 left out as reserved
bits 11:8) and whose bit 16 says the register is *unusable* (SDM Vol. 3C, 25.4.1 "Guest
Register State", Table 25-2 "Format of Access Rights"; the descriptor fields themselves:
Vol. 3A, 3.4.5 "Segment Descriptors").  VMREAD of a segment's access rights gives exactly
this value; vtlab's :class:`~vtlab.cpu.segments.Segment` uses the same layout.

Values match Linux's ``arch/x86/include/asm/vmx.h`` (``VMX_AR_*``).
"""
from __future__ import annotations

import enum

from .bits import RegisterBits

__all__ = ["AccessRights", "CodeDataType", "SystemType", "AR_DPL_SHIFT", "AR_RESERVED"]


class AccessRights(RegisterBits):
    """Bits of a VMCS segment access-rights field (SDM Vol. 3C, 25.4.1, Table 25-2).

    ``TYPE`` (bits 3:0) and ``DPL`` (bits 6:5) are multi-bit fields given as masks; the
    type bits are :class:`CodeDataType` (S = 1) or a :class:`SystemType` (S = 0).
    """

    TYPE = 0xF << 0  #: segment type (bits 3:0)
    S = 1 << 4  #: descriptor type: 0 = system, 1 = code or data
    DPL = 3 << 5  #: descriptor privilege level (mask of bits 6:5)
    P = 1 << 7  #: segment present
    AVL = 1 << 12  #: available for use by system software
    L = 1 << 13  #: 64-bit mode active (CS only)
    DB = 1 << 14  #: default operation size (0 = 16-bit, 1 = 32-bit segment)
    G = 1 << 15  #: granularity: the limit counts 4-KByte units
    UNUSABLE = 1 << 16  #: segment unusable (a null selector was loaded)


#: Bit position of :attr:`AccessRights.DPL`: ``(ar & AccessRights.DPL) >> AR_DPL_SHIFT``.
AR_DPL_SHIFT = 5

#: Reserved bits 11:8 and 31:17 of an access-rights field (0 in a valid VMCS, 27.3.1.2).
AR_RESERVED = 0xFFFE_0F00


class CodeDataType(RegisterBits):
    """The four type bits of a code or data segment (S = 1; SDM Vol. 3A, 3.4.5.1
    "Code- and Data-Segment Descriptor Types"): type 3 is ``WRITABLE | ACCESSED``
    (read/write data), type 11 ``CODE | READABLE | ACCESSED`` (execute/read code)."""

    ACCESSED = 1 << 0  #: accessed
    WRITABLE = 1 << 1  #: data: writable (for code the same bit is READABLE)
    EXPAND_DOWN = 1 << 2  #: data: expand-down (for code the same bit is CONFORMING)
    CODE = 1 << 3  #: 1 = code segment, 0 = data segment
    # Aliases: the code-segment meanings of bits 1 and 2.
    READABLE = 1 << 1
    CONFORMING = 1 << 2


class SystemType(enum.IntEnum):
    """Type values of the system descriptors a VMCS can hold (S = 0; SDM Vol. 3A, 3.5
    "System Descriptor Types", Table 3-2)."""

    LDT = 2  #: local descriptor table
    TSS16_BUSY = 3  #: busy 16-bit TSS
    TSS_AVAILABLE = 9  #: available 32-bit TSS (64-bit TSS in IA-32e mode)
    TSS_BUSY = 11  #: busy 32-bit TSS (64-bit TSS in IA-32e mode)

"""The base of vtlab's bit-field enums (RFLAGS, CR0, CR4, EFER, VMX controls ...).

A register's bits are an :class:`enum.IntFlag`, so ``Rflags.IF | Rflags.DF`` keeps its
names.  One difference from a plain int matters to a VMM: since Python 3.11 ``~flag`` of
an IntFlag keeps only the bits the enum *defines*, so ``rflags & ~Rflags.IF`` would also
clear every reserved or undefined bit (bits 63:22 of RFLAGS, a VMX control's reserved
"default1" bits ...).  Registers are not enums: their complement must be the int one.
"""
from __future__ import annotations

import enum


def _int_complement(self: enum.IntFlag) -> int:
    """``~flag`` as for an int: every bit set but the flag's own."""
    return ~int(self)


class _RegisterBitsType(enum.EnumType):
    # EnumType gives every Flag class Flag's operators after the class body has run (so a
    # method inherited from a base class would be replaced): set the complement afterwards.
    def __new__(mcls, *args, **kwargs):
        cls = super().__new__(mcls, *args, **kwargs)
        cls.__invert__ = _int_complement
        return cls


class RegisterBits(enum.IntFlag, metaclass=_RegisterBitsType):
    """An IntFlag of register or field bits whose complement is the plain int one
    (``x & ~Cr0.NE`` clears CR0.NE and nothing else)."""

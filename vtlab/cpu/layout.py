"""The fixed facts of a vtlab guest: its start modes, where its kernel structures live,
and the selectors of the GDT vtlab builds.

These are plain values (no engine behind them), shared by every part of the guest CPU
(:mod:`vtlab.cpu.guest` and the modules it is assembled from).
"""
from __future__ import annotations

import enum


class Mode(str, enum.Enum):
    """The four start modes (see :mod:`vtlab.cpu.guest`)."""

    REAL = "real"
    PROTECTED = "protected"
    PAGED = "paged"
    LONG = "long"

    @property
    def bits(self) -> int:
        """Default operand/address size of code in this mode."""
        return {Mode.REAL: 16, Mode.PROTECTED: 32, Mode.PAGED: 32, Mode.LONG: 64}[self]


def parse_mode(mode: Mode | str) -> Mode:
    """``"real"``/``"protected"``/``"paged"``/``"long"`` -> :class:`Mode`; anything else is a
    ValueError that lists the modes a vtlab guest can start in (not Python's bare
    "'smm' is not a valid Mode")."""
    try:
        return Mode(mode.lower() if isinstance(mode, str) else mode)
    except ValueError:
        names = ", ".join(repr(m.value) for m in Mode)
        extra = (" (system-management mode is not modelled: SMM and its dual-monitor "
                 "treatment are outside vtlab)" if str(mode).lower() == "smm" else "")
        raise ValueError(f"mode {mode!r} is not a mode a vtlab guest can start in{extra}; "
                         f"use one of {names}") from None


class Layout:
    """Where vtlab puts the structures a kernel would own (all in low guest memory).

    Kept out of the way of the classic load addresses (0x1000 and the 0x7C00 boot
    sector) and below the 640 KiB conventional-memory line.
    """

    GDT = 0x9_0000
    IDT = 0x9_1000
    TSS = 0x9_2000
    PAGE_TABLES = 0x9_3000       # PML4 / PD (32-bit) ...
    TRAMPOLINE = 0x9_8000        # ring-0 code vtlab writes (IRET to CPL 3)
    KERNEL_STACK = 0x8_F000      # TSS.ESP0/RSP0: the ring-0 stack for CPL-3 exceptions
    USER_STACK = 0x8_E000        # default CPL-3 stack top
    STACK = 0x7_000              # default ring-0 stack top (below the boot sector)


class Selector(enum.IntEnum):
    """The GDT vtlab builds (index << 3 | RPL)."""

    NULL = 0x00
    KERNEL_CODE32 = 0x08
    KERNEL_DATA = 0x10
    KERNEL_CODE64 = 0x18
    USER_CODE32 = 0x23
    USER_DATA = 0x2B
    USER_CODE64 = 0x33
    TSS = 0x38  # 16 bytes in long mode (entries 7 and 8)

"""Putting the CPU into a start mode: control registers, page tables, segments.

:class:`ModeControl`, one part of :class:`vtlab.cpu.guest.Guest`, leaves the CPU the
way a boot loader would leave it for a kernel in each :class:`~vtlab.cpu.layout.Mode`:
real mode as after reset, 32-bit protected mode with a flat GDT, the same with 4-MByte
pages, or 64-bit long mode with PAE page tables (SDM Vol. 3A 10.8 and 10.8.5).
"""
from __future__ import annotations

import struct

from unicorn import x86_const as X

from ..arch.msrs import Cr0, Cr4, Efer, Msr, Rflags
from .layout import Layout, Mode, Selector
from .registers import _REGS, _SEGMENTS
from .segments import TSS_LIMIT


class ModeControl:
    """Start modes (a part of :class:`~vtlab.cpu.guest.Guest`).

    Relies on the Guest for ``uc``, its stack-pointer register id ``_sp``, the GDT that
    :meth:`~vtlab.cpu.segments.SegmentUnit._build_system_tables` wrote (``gdt_limit``)
    and its memory writes.
    """

    def _build_page_tables(self, long_mode: bool) -> int:
        """Identity-map guest memory with large pages; user-accessible (U/S = 1)."""
        base = Layout.PAGE_TABLES
        present_rw_user = 0x7
        if long_mode:
            pml4, pdpt, pd = base, base + 0x1000, base + 0x2000
            self.write_u64(pml4, pdpt | present_rw_user)
            self.write_u64(pdpt, pd | present_rw_user)
            for i in range(512):  # 512 x 2 MiB = the first GiB
                self.write_u64(pd + 8 * i, (i << 21) | present_rw_user | 0x80)
            return pml4
        pd = base
        entries = b"".join(struct.pack("<I", (i << 22) | present_rw_user | 0x80) for i in range(1024))
        self.write(pd, entries)
        return pd

    def enter_mode(self, mode: Mode | str) -> None:
        """Put the CPU into ``mode`` as a boot loader would leave it (ring 0)."""
        mode = Mode(mode)
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_GDTR, (0, Layout.GDT, self.gdt_limit, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, Layout.IDT, 0x3FF if mode is Mode.REAL else 0, 0))
        if mode is Mode.REAL:
            uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0x3FF, 0))  # the real-mode IVT
            uc.reg_write(X.UC_X86_REG_CR0, Cr0.ET)
            uc.reg_write(X.UC_X86_REG_CR4, 0)
            uc.msr_write(Msr.IA32_EFER, 0)
            for seg in _SEGMENTS:
                uc.reg_write(_REGS[seg], 0)
            # TR as the CPU leaves it at reset: base 0, limit FFFFH, present busy TSS (SDM 10.1.1)
            uc.reg_write(X.UC_X86_REG_TR, (0, 0, 0xFFFF, 0x8B00))
            uc.reg_write(self._sp, Layout.STACK)
            uc.reg_write(X.UC_X86_REG_EFLAGS, Rflags.FIXED)
            self.mode = mode
            return
        cr4, cr0 = 0, Cr0.PE | Cr0.ET | Cr0.NE
        if mode is Mode.PAGED:
            uc.reg_write(X.UC_X86_REG_CR3, self._build_page_tables(False))
            cr4, cr0 = Cr4.PSE, cr0 | Cr0.PG | Cr0.WP
        elif mode is Mode.LONG:
            uc.reg_write(X.UC_X86_REG_CR3, self._build_page_tables(True))
            cr4, cr0 = Cr4.PAE, cr0 | Cr0.PG | Cr0.WP
            uc.msr_write(Msr.IA32_EFER, Efer.LME)
        uc.reg_write(X.UC_X86_REG_CR4, cr4)
        uc.reg_write(X.UC_X86_REG_CR0, cr0)
        code = Selector.KERNEL_CODE64 if mode is Mode.LONG else Selector.KERNEL_CODE32
        uc.reg_write(X.UC_X86_REG_CS, code)
        for seg in ("ss", "ds", "es", "fs", "gs"):
            uc.reg_write(_REGS[seg], Selector.KERNEL_DATA)
        self.write_tss(long_mode=mode is Mode.LONG)
        uc.reg_write(X.UC_X86_REG_TR, (Selector.TSS, Layout.TSS, TSS_LIMIT, 0x8B00))
        uc.reg_write(self._sp, Layout.STACK)
        uc.reg_write(X.UC_X86_REG_EFLAGS, Rflags.FIXED)
        self.mode = mode

"""Segmentation: segment registers, descriptors and the system tables (GDT, IDT, TSS).

:class:`SegmentUnit` is one part of :class:`vtlab.cpu.guest.Guest`: it reads a segment
register with its hidden part (:meth:`~SegmentUnit.segment`), loads one the way MOV or
IRET would (:meth:`~SegmentUnit.load_segment`), gives the descriptor-table registers
GDTR/IDTR and the system segments LDTR/TR, and writes the GDT and TSS that vtlab's
small "kernel" owns.  :func:`pack_descriptor` builds an 8-byte segment descriptor.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import unicorn
from unicorn import x86_const as X

from ..arch.msrs import Cr0, Cr4, Efer, Rflags
from .layout import Layout, Selector
from .registers import _REGS

#: Limit of vtlab's TSS (104 bytes: the 32-bit layout, which also holds RSP0 at offset 4).
TSS_LIMIT = 0x67
_TSS_LIMIT = TSS_LIMIT

_CR0_PE, _CR0_PG, _CR0_WP = int(Cr0.PE), int(Cr0.PG), int(Cr0.WP)
_CR4_PAE, _CR4_PSE = int(Cr4.PAE), int(Cr4.PSE)
_EFER_LMA, _EFER_NXE = int(Efer.LMA), int(Efer.NXE)

_TABLES = {"gdtr": X.UC_X86_REG_GDTR, "idtr": X.UC_X86_REG_IDTR}
_SYSTEM_SEGMENTS = {"ldtr": X.UC_X86_REG_LDTR, "tr": X.UC_X86_REG_TR}


def pack_descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """The 8 bytes of a segment descriptor, as they sit in a GDT or LDT.

    ``base`` is the segment's 32-bit linear base address, ``limit`` its 20-bit limit
    (in bytes, or in 4-KByte units when the G flag is set), ``access`` the access byte
    (bit 7 P, bits 6:5 DPL, bit 4 S, bits 3:0 type: 0x9B is ring-0 code, 0xF3 ring-3
    data, 0x89 an available 32-bit TSS) and ``flags`` the high nibble (bit 3 G, bit 2
    D/B, bit 1 L, bit 0 AVL).  SDM Vol. 3A 3.4.5, Figure 3-8.

    >>> pack_descriptor(0, 0xFFFFF, 0x9B, 0xC).hex()   # flat 32-bit ring-0 code
    'ffff0000009bcf00'
    """
    value = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
    value |= ((limit >> 16) & 0xF) << 48 | (flags & 0xF) << 52 | ((base >> 24) & 0xFF) << 56
    return struct.pack("<Q", value)


#: The name this function had before it was public.
_descriptor = pack_descriptor


@dataclass(frozen=True)
class Segment:
    """A segment register with its hidden part, as the VMCS guest-state area holds it.

    ``access_rights`` uses the VMX format (SDM Vol. 3C 25.4.1, Table 25-2): bits 3:0
    type, 4 S, 6:5 DPL, 7 P, 12 AVL, 13 L, 14 D/B, 15 G, 16 unusable.
    """

    selector: int
    base: int
    limit: int
    access_rights: int

    @property
    def dpl(self) -> int:
        return (self.access_rights >> 5) & 3

    @property
    def unusable(self) -> bool:
        return bool(self.access_rights & (1 << 16))


def _table_register(name: str) -> int:
    try:
        return _TABLES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown descriptor-table register {name!r}: use 'gdtr' or 'idtr'") from None


class SegmentUnit:
    """Segment registers and system tables (a part of :class:`~vtlab.cpu.guest.Guest`).

    Relies on the Guest for ``uc`` (the engine), :meth:`reg`, :attr:`cpl`,
    :meth:`read_u64` and :meth:`write`.
    """

    # ------------------------------------------------------ descriptor tables
    def descriptor_table(self, name: str) -> tuple[int, int]:
        """(base, limit) of the descriptor-table register ``name``: ``"gdtr"`` or ``"idtr"``.

        What SGDT/SIDT store: the linear address of the GDT (or IDT) and its limit, the
        offset of its last byte (SDM Vol. 3A 2.4.1, 2.4.3).  In real mode IDTR locates
        the interrupt vector table (base 0, limit 0x3FF after reset).
        """
        _, base, limit, _ = self.uc.reg_read(_table_register(name))
        return base, limit

    def set_descriptor_table(self, name: str, base: int, limit: int) -> None:
        """Load GDTR or IDTR (``name`` ``"gdtr"`` / ``"idtr"``), as LGDT/LIDT would.

        Only the register changes: the descriptors already loaded into the segment
        registers stay as they are until a segment is loaded again.
        """
        self.uc.reg_write(_table_register(name), (0, base, limit, 0))

    def set_system_segment(self, name: str, selector: int, base: int, limit: int,
                           access_rights: int) -> None:
        """Load LDTR or TR (``name`` ``"ldtr"`` / ``"tr"``) with the given hidden part.

        ``access_rights`` uses the VMX format of :class:`Segment` (0x82: an LDT, 0x8B:
        a busy 32/64-bit TSS; bit 16 set: unusable).  Unlike LLDT/LTR, nothing is read
        from the GDT: the selector, base, limit and rights are taken as given, the way a
        VM entry loads them from the VMCS (SDM Vol. 3C 27.3.2.2).
        """
        try:
            regid = _SYSTEM_SEGMENTS[name.lower()]
        except KeyError:
            raise ValueError(f"unknown system segment {name!r}: use 'ldtr' or 'tr'") from None
        self.uc.reg_write(regid, (selector, base, limit, (access_rights & 0xF0FF) << 8))

    # ------------------------------------------------------- segment registers
    def _descriptor_at(self, table_base: int, selector: int) -> int:
        """The 8-byte descriptor ``selector`` names; 0 if the table lies outside memory
        (a guest may have pointed GDTR anywhere after loading its segments)."""
        try:
            return self.read_u64(table_base + (selector & ~7))
        except unicorn.UcError:
            return 0

    def segment(self, name: str) -> Segment:
        """The segment register ``name`` with base, limit and VMX access rights."""
        name = name.lower()
        if name in ("tr", "ldtr"):
            sel, base, limit, flags = self.uc.reg_read(_REGS[name])
            present = flags & 0x8000 and (name == "tr" or sel & ~3)
            ar = (flags >> 8) & 0xF0FF if present else 1 << 16
            return Segment(sel, base, limit, ar)
        selector = self.uc.reg_read(_REGS[name])
        if not self.reg("cr0") & Cr0.PE:
            ar = 0x9B if name == "cs" else 0x93
            return Segment(selector, selector << 4, 0xFFFF, ar)
        if self.reg("eflags") & Rflags.VM:
            # Virtual-8086 mode: base = selector << 4, limit FFFFH, a present ring-3
            # read/write accessed data segment (SDM 27.3.1.2 checks exactly these).
            return Segment(selector, selector << 4, 0xFFFF, 0xF3)
        if selector & ~3 == 0:
            return Segment(selector, 0, 0, 1 << 16)  # null selector: unusable
        gdt_base = self.uc.reg_read(X.UC_X86_REG_GDTR)[1]
        raw = self._descriptor_at(gdt_base, selector)
        base = ((raw >> 16) & 0xFFFFFF) | (((raw >> 56) & 0xFF) << 24)
        limit = (raw & 0xFFFF) | (((raw >> 48) & 0xF) << 16)
        access, flags = (raw >> 40) & 0xFF, (raw >> 52) & 0xF
        if flags & 0x8:  # G: limit in 4-KByte units
            limit = (limit << 12) | 0xFFF
        if name in ("fs", "gs") and self.reg("efer") & Efer.LMA:
            base = self.reg(f"{name}_base")
        return Segment(selector, base, limit, access | (flags << 12))

    def load_segment(self, name: str, selector: int) -> None:
        """Load a segment register the way MOV/IRET would, from the current GDT.

        Unicorn checks privilege on every direct write (as MOV SS would), which makes a
        return from CPL 3 to ring 0 impossible through register writes.  vtlab plays
        the part of the VM-entry/IRET microcode here: with CR0.PE briefly clear, a
        selector load resets the CPL to 0; the descriptor is then loaded for real.
        """
        name = name.lower()
        reg = _REGS[name]
        cr0 = self.uc.reg_read(X.UC_X86_REG_CR0)
        if cr0 & Cr0.PE and self.uc.reg_read(X.UC_X86_REG_EFLAGS) & Rflags.VM:
            # Virtual-8086 mode: no descriptor is read; the CPU makes base = selector << 4,
            # limit FFFFH, DPL 3 (SDM Vol. 3A "8086 Emulation"; SDM 27.3.2.2).
            self.uc.reg_write(reg, selector & 0xFFFF)
            return
        if cr0 & Cr0.PG and cr0 & Cr0.PE and selector & ~3 and not self._descriptor_reachable(selector):
            # QEMU reads the descriptor through the guest's page tables; a walk that faults
            # here, outside emulation, would crash the emulator process (Unicorn has no
            # fault context for register writes).  Refuse it as Unicorn refuses a bad
            # selector; callers turn that into a VM-entry failure or a triple fault.
            raise unicorn.UcError(unicorn.UC_ERR_EXCEPTION)
        if cr0 & Cr0.PE and name in ("cs", "ss") and (selector & 3) < self.cpl:
            self.uc.reg_write(X.UC_X86_REG_CR0, cr0 & ~Cr0.PE)
            self.uc.reg_write(X.UC_X86_REG_SS, 0)
            self.uc.reg_write(X.UC_X86_REG_CR0, cr0)
            # CPL is now 0: reload CS first so that the later loads see ring-0 code.
            if name == "ss":
                self.uc.reg_write(X.UC_X86_REG_CS, Selector.KERNEL_CODE64 if self.reg(
                    "efer") & Efer.LMA else Selector.KERNEL_CODE32)
        self.uc.reg_write(reg, selector)

    def _descriptor_reachable(self, selector: int) -> bool:
        """With paging on: do the guest's page tables map both ends of the descriptor
        ``selector`` names (GDT, or LDT if TI = 1) to guest memory, with no reserved bit
        set on the way?  Conservative: anything unusual counts as unreachable."""
        if selector & 4:
            base = self.uc.reg_read(X.UC_X86_REG_LDTR)[1]
        else:
            base = self.uc.reg_read(X.UC_X86_REG_GDTR)[1]
        at = base + (selector & ~7)
        return self._linear_in_memory(at) and self._linear_in_memory(at + 7)

    def _linear_in_memory(self, linear: int) -> bool:
        """Translate ``linear`` through the guest's paging structures (SDM Vol. 3A 4.3,
        4.4, 4.5) and say whether the walk ends in guest memory without a fault."""
        physical, _ = self.translate_linear(linear)
        return physical is not None and physical < self.memory_size

    def translate_linear(self, linear: int, write: bool = False, user: bool = False,
                         paging: tuple[int, int, int, int] | None = None) -> tuple[int | None, int]:
        """Translate ``linear`` as the CPU would for a data access: ``(physical, 0)``, or
        ``(None, error code)`` of the #PF the access raises (SDM Vol. 3A 4.7: bit 0 P -
        0 for a not-present translation, 1 for a protection or reserved-bit violation -
        bit 1 W/R, bit 2 U/S, bit 3 RSVD).

        ``user``: a user-mode access (CPL 3, not an implicit supervisor access such as
        reading the IDT or pushing on a ring-0 stack).  Supervisor writes to read-only
        pages fault only with CR0.WP = 1 (SDM Vol. 3A 4.6).  Paging structures beyond
        guest memory count as a reserved-bit violation.  With paging off the linear
        address is the physical one.  ``paging``: CR0, CR3, CR4 and EFER, if the caller
        has them already.
        """
        if paging is None:
            paging = self.reg("cr0"), self.reg("cr3"), self.reg("cr4"), self.reg("efer")
        cr0, cr3, cr4, efer = paging
        if not cr0 & _CR0_PG or not cr0 & _CR0_PE:
            return linear & 0xFFFF_FFFF, 0
        access = (2 if write else 0) | (4 if user else 0)
        size = self.memory_size
        nx_reserved = not efer & _EFER_NXE
        high = 0xFFF0_0000_0000_0000 & ~(1 << 63)   # bits 62:52 (ignored) are fine
        absent, reserved = access, access | 0x9
        rights = 6     # R/W and U/S, ANDed over the levels

        def done(physical: int) -> tuple[int | None, int]:
            if user and not rights & 4:
                return None, access | 1
            if write and not rights & 2 and (user or cr0 & _CR0_WP):
                return None, access | 1
            return physical, 0

        try:
            if efer & _EFER_LMA:  # 4-level paging
                table = cr3 & 0x000F_FFFF_FFFF_F000
                for shift in (39, 30, 21, 12):
                    if table + 0x1000 > size:
                        return None, reserved
                    entry = self.read_u64(table + ((linear >> shift) & 0x1FF) * 8)
                    if not entry & 1:
                        return None, absent
                    if ((entry >> 63 and nx_reserved) or entry & 0x000F_FF80_0000_0000
                            or (shift == 39 and entry & 0x80)):
                        return None, reserved  # reserved bits (51:39 beyond MAXPHYADDR)
                    rights &= entry & 6
                    if shift in (30, 21) and entry & 0x80:  # a 1-GByte / 2-MByte page
                        if entry & ((1 << shift) - 1) & ~0x1FFF:
                            return None, reserved
                        page = entry & 0x000F_FFFF_FFFF_F000 & ~((1 << shift) - 1)
                        return done(page + (linear & ((1 << shift) - 1)))
                    table = entry & 0x000F_FFFF_FFFF_F000
                return done(table + (linear & 0xFFF))
            if cr4 & _CR4_PAE:  # PAE paging
                if (cr3 & 0xFFFF_FFE0) + 32 > size:
                    return None, reserved
                pdpte = self.read_u64((cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8)
                if not pdpte & 1:
                    return None, absent
                if pdpte & 0x1E6 or pdpte & high:
                    return None, reserved
                table = pdpte & 0x000F_FFFF_FFFF_F000
                for shift in (21, 12):
                    if table + 0x1000 > size:
                        return None, reserved
                    entry = self.read_u64(table + ((linear >> shift) & 0x1FF) * 8)
                    if not entry & 1:
                        return None, absent
                    if (entry >> 63 and nx_reserved) or entry & high:
                        return None, reserved
                    rights &= entry & 6
                    if shift == 21 and entry & 0x80:
                        if entry & 0x1F_E000:
                            return None, reserved
                        return done((entry & 0xFFFF_FFE0_0000) + (linear & 0x1F_FFFF))
                    table = entry & 0x000F_FFFF_FFFF_F000
                return done(table + (linear & 0xFFF))
            # 32-bit paging
            if (cr3 & 0xFFFF_F000) + 0x1000 > size:
                return None, reserved
            pde = self.read_u32((cr3 & 0xFFFF_F000) + ((linear >> 22) & 0x3FF) * 4)
            if not pde & 1:
                return None, absent
            rights &= pde & 6
            if pde & 0x80 and cr4 & _CR4_PSE:  # a 4-MByte page
                if pde & 0x3F_E000:
                    return None, reserved
                return done((pde & 0xFFC0_0000) + (linear & 0x3F_FFFF))
            table = pde & 0xFFFF_F000
            if table + 0x1000 > size:
                return None, reserved
            pte = self.read_u32(table + ((linear >> 12) & 0x3FF) * 4)
            if not pte & 1:
                return None, absent
            rights &= pte & 6
            return done((pte & 0xFFFF_F000) + (linear & 0xFFF))
        except unicorn.UcError:
            return None, reserved

    def segment_dpl(self, selector: int) -> int:
        """DPL of the GDT descriptor ``selector`` names."""
        gdt_base = self.uc.reg_read(X.UC_X86_REG_GDTR)[1]
        return (self._descriptor_at(gdt_base, selector) >> 45) & 3

    # ---------------------------------------------------------- system tables
    def _build_system_tables(self) -> None:
        """Write the GDT, an empty IDT and a TSS (identical for every mode)."""
        flat = 0xFFFFF
        tss = Layout.TSS
        gdt = b"".join([
            pack_descriptor(0, 0, 0, 0),
            pack_descriptor(0, flat, 0x9B, 0xC),   # 0x08 ring-0 code, 32-bit
            pack_descriptor(0, flat, 0x93, 0xC),   # 0x10 ring-0 data
            pack_descriptor(0, flat, 0x9B, 0xA),   # 0x18 ring-0 code, 64-bit (L=1)
            pack_descriptor(0, flat, 0xFB, 0xC),   # 0x20 ring-3 code, 32-bit
            pack_descriptor(0, flat, 0xF3, 0xC),   # 0x28 ring-3 data
            pack_descriptor(0, flat, 0xFB, 0xA),   # 0x30 ring-3 code, 64-bit
            pack_descriptor(tss, TSS_LIMIT, 0x8B, 0x0),  # 0x38 busy TSS (as after LTR)
            struct.pack("<Q", tss >> 32),          # upper half of a 64-bit TSS descriptor
        ])
        self.write(Layout.GDT, gdt)
        self.gdt_limit = len(gdt) - 1
        self.write_tss(long_mode=False)
        self.write(Layout.IDT, bytes(256 * 16))

    def write_tss(self, long_mode: bool) -> None:
        """Write vtlab's TSS with the kernel stack for a privilege change to ring 0.

        The two layouts overlap, so the TSS is written for the mode the guest starts
        in: a 32-bit TSS has ESP0 at offset 4 and SS0 at offset 8 (SDM Vol. 3A 8.2.1,
        Figure 8-2); a 64-bit TSS has the 8-byte RSP0 at offset 4 - its upper half where
        SS0 would be - and IST1-7 from offset 24H, all 0 here (8.7, Figure 8-11).
        """
        tss = Layout.TSS
        self.write(tss, bytes(0x68))
        if long_mode:
            self.write(tss + 4, struct.pack("<Q", Layout.KERNEL_STACK))
        else:
            self.write(tss + 4, struct.pack("<IH", Layout.KERNEL_STACK, Selector.KERNEL_DATA))

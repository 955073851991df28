"""Nested paging (NPT): the nCR3 tables, walked like EPT, and nested page faults
(APM Vol. 2, 15.25 "Nested Paging").

With NP_ENABLE set in the VMCB, every guest-physical address goes through a second
x86 4-level page table whose root is N_CR3 (host-physical, in the VMM's memory).  The
walk is the vendor-neutral one EPT uses (:func:`vtlab.cpu.nested_walk.walk`, format
:data:`~vtlab.cpu.nested_walk.X86_4LEVEL`): AMD's nested tables *are* x86 page tables,
where Intel's EPT has a format of its own.  All nested accesses count as user accesses
(15.25.5), so an entry with U/S = 0 denies the guest.

vtlab's guest memory is one block of Unicorn memory, so nested paging is modelled as the
permission of each guest-physical page: the nCR3 tables must map each page onto the
same address (identity) - a learner's table that maps elsewhere gets a message saying
so.  An access the tables do not allow is a #VMEXIT NPF (400h) with the #PF-style
error code in EXITINFO1 and the guest-physical address in EXITINFO2.

Like a TLB, the translations are kept: vtlab walks the tables again at VMRUN when N_CR3
changed or TLB_CONTROL asks for a flush (15.16), not when the VMM merely edits them -
exactly when a real processor may still use stale entries.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import unicorn

from ...arch.svm import NpfError, SvmExitCode
from ..nested_walk import X86_4LEVEL, walk
from .intercepts import SvmExit

if TYPE_CHECKING:
    from ..guest import Guest
    from ..hostmem import HostMemory

PAGE = 0x1000
_US = 1 << 2   # x86 page-table entry bit 2, U/S (SDM Vol. 3A 4.5; APM Vol. 2, 5.4)


class NestedPaging:
    """The nested translations in use for one guest (identity-mapped, per 4-KByte page)."""

    def __init__(self, guest: "Guest", memory: "HostMemory"):
        self.guest = guest
        self.memory = memory
        self.root: int | None = None
        #: guest-physical page -> RWX permissions (bit 0 read, 1 write, 2 execute; 0: not present)
        self.pages: dict[int, int] = {}
        self.present: dict[int, bool] = {}
        self.walks = 0
        #: pages whose access was refused since the last VMRUN (see :meth:`flush_refused`)
        self.refused: set[int] = set()

    def flush_refused(self) -> None:
        """Drop QEMU's TLB entries of refused pages: remapping a page is the one way
        Unicorn offers (its ``mem_protect`` leaves a filled TLB entry in place)."""
        uc, ram = self.guest.uc, getattr(self.guest, "ram_pointer", None)
        for page in self.refused:
            perms = self.pages.get(page, 7)
            if ram is not None:
                uc.mem_unmap(page, PAGE)
                prot = ((unicorn.UC_PROT_READ if perms & 1 else 0) | (unicorn.UC_PROT_WRITE if perms & 2 else 0)
                        | (unicorn.UC_PROT_EXEC if perms & 4 else 0))
                uc.mem_map_ptr(page, PAGE, prot, ram + page)
            else:
                self.guest.protect(page, PAGE, read=bool(perms & 1), write=bool(perms & 2), execute=bool(perms & 4))
        self.refused.clear()

    def _read(self, address: int, size: int) -> int:
        return int.from_bytes(self.memory.read(address, size), "little")

    def rebuild(self, n_cr3: int) -> None:
        """Walk the nCR3 tables for every page of guest memory and apply what they allow.
        Raises ValueError when a page is mapped somewhere other than itself."""
        root = n_cr3 & ~0xFFF
        pages, present = {}, {}
        seen: dict[int, int] = {}   # table entries read during this rebuild (one read each)

        def read(address: int, size: int) -> int:
            value = seen.get(address)
            if value is None:
                value = seen[address] = self._read(address, size)
            return value

        for gpa in range(0, self.guest.memory_size, PAGE):
            w = walk(X86_4LEVEL, root, gpa, read, "nested")
            self.walks += 1
            if w.physical is None:
                pages[gpa], present[gpa] = 0, False
                continue
            if w.physical != gpa:
                raise ValueError(f"N_CR3 {n_cr3:#x} maps guest-physical {gpa:#x} to {w.physical:#x}: vtlab's nested "
                                 "paging maps each guest page onto the same address (identity) only")
            user = all(r.entry & _US for r in w.references)
            pages[gpa], present[gpa] = (w.permissions if user else 0), True
        for gpa, perms in pages.items():
            if self.pages.get(gpa, 7) != perms:
                self.guest.protect(gpa, PAGE, read=bool(perms & 1), write=bool(perms & 2), execute=bool(perms & 4))
        self.pages, self.present, self.root = pages, present, n_cr3

    def disable(self) -> None:
        """NP_ENABLE = 0: guest-physical is host-physical again, with every permission."""
        if self.root is None:
            return
        for gpa, perms in self.pages.items():
            if perms != 7:
                self.guest.protect(gpa, PAGE)
        self.pages, self.present, self.root = {}, {}, None

    def fault(self, kind: str, gpa: int, rip: int, cpl: int) -> SvmExit:
        """The #VMEXIT of an access the nested tables refuse (``kind`` "r", "w" or "x")."""
        page = gpa & ~(PAGE - 1)
        # A refused translation is not cached (the TLB holds only good ones), but QEMU's
        # TLB may have kept this page's entry: the next VMRUN drops it (:meth:`flush_refused`).
        self.refused.add(page)
        info = NpfError.US | NpfError.FINAL_GPA     # guest accesses are user accesses (15.25.5)
        if self.present.get(page):
            info |= NpfError.P
        if kind == "w":
            info |= NpfError.RW
        if kind == "x":
            info |= NpfError.ID
        return SvmExit(SvmExitCode.NPF, int(info), gpa, 0, 0, rip, "", 0, cpl,
                       note=f"nested page fault: {dict(r='read', w='write', x='fetch')[kind]} of guest-physical {gpa:#x}")

"""Building EPT paging structures in host memory, as a VMM does (SDM Vol. 3C 29.3.2).

An :class:`EptTables` owns one EPT: a PML4 table (the EPTP points at it) and the
tables below it, each a 4-KByte page of 512 8-byte entries in host memory.  Every entry
is written the way the SDM lays it out - bits 2:0 read/write/execute, bits 5:3 the
memory type of a page, bit 7 "this entry maps a page" in a PDPTE (1 GByte) or PDE
(2 MBytes), the address in bits N-1:12 - so the tables can be read back with
``tables.describe(gpa)`` or ``vm.cpu.ept.translate(eptp, gpa)``, and a learner can write
the same entries by hand.

>>> from vtlab.cpu.hostmem import HostMemory
>>> t = EptTables(HostMemory())
>>> t.map(0x5000, 0x8000, 0x1000, READ | EXECUTE)          # guest page 5000H -> host 8000H, r-x
>>> [f"{level} {value:#x}" for level, _, value in t.describe(0x5000)][-1]
'PTE 0x8035'

The processor caches what it finds (SDM 29.4): after changing an EPT that a guest has
run on, the VMM must execute INVEPT (``vm.invept()``), or the guest keeps the old view.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..arch.ept import PAGE_1G, PAGE_2M, PAGE_4K, EptEntry, EptMemoryType, Eptp

if TYPE_CHECKING:
    from ..cpu.hostmem import HostMemory
    from ..cpu.vmexit import VmExit
    from .machine import VirtualMachine

READ, WRITE, EXECUTE = int(EptEntry.READ), int(EptEntry.WRITE), int(EptEntry.EXECUTE)
RWX = READ | WRITE | EXECUTE
_PS = int(EptEntry.PAGE_SIZE)
#: (entry name, the bit of the guest-physical address its index starts at, the page size
#: an entry there may map) for a 4-level EPT, PML4 first (SDM 29.3.2).
LEVELS = (("PML4E", 39, None), ("PDPTE", 30, PAGE_1G), ("PDE", 21, PAGE_2M), ("PTE", 12, PAGE_4K))
_FRAME = ((1 << 52) - 1) & ~0xFFF


class EptTables:
    """One EPT in host memory (``memory`` allocates and holds the tables)."""

    def __init__(self, memory: "HostMemory"):
        self.memory = memory
        self.root = memory.alloc()      #: the PML4 table's host-physical address
        self.tables = [self.root]       #: every table allocated, for display

    # ------------------------------------------------------------------ entries
    def read_entry(self, address: int) -> int:
        return struct.unpack("<Q", self.memory.read(address, 8))[0]

    def write_entry(self, address: int, value: int) -> None:
        self.memory.write(address, struct.pack("<Q", value))

    def eptp(self, memory_type: int = EptMemoryType.WB, accessed_dirty: bool = False) -> int:
        """The EPTP naming these tables: WB, a 4-level walk (SDM 25.6.11)."""
        return Eptp.encode(self.root, memory_type, 4, accessed_dirty)

    @staticmethod
    def leaf(hpa: int, perms: int = RWX, size: int = PAGE_4K,
             memory_type: int = EptMemoryType.WB) -> int:
        """The entry that maps a page of ``size`` at host-physical ``hpa``."""
        if hpa % size:
            raise ValueError(f"host-physical {hpa:#x} is not aligned to the page size {size:#x}")
        return hpa | (perms & 7) | int(memory_type) << 3 | (_PS if size != PAGE_4K else 0)

    def _slot(self, gpa: int, size: int) -> int:
        """The host-physical address of the entry that maps (or will map) the page of
        ``size`` holding ``gpa``: missing tables are allocated, larger pages on the way
        are split into 512 smaller ones with the same permissions and memory type."""
        table = self.root
        for name, shift, page in LEVELS:
            at = table + ((gpa >> shift) & 0x1FF) * 8
            if page == size:
                return at
            entry = self.read_entry(at)
            if entry & 7 and (entry & _PS or name == "PTE"):
                entry = self._split(at, entry, shift)
            elif not entry & 7:
                new = self.memory.alloc()
                self.tables.append(new)
                entry = new | RWX          # a table entry: the leaves decide the permissions
                self.write_entry(at, entry)
            table = entry & _FRAME
        raise ValueError(f"page size {size:#x} is not 4 KBytes, 2 MBytes or 1 GByte")

    def _split(self, at: int, entry: int, shift: int) -> int:
        """Replace the large-page entry at ``at`` by a table of 512 pages a level down."""
        new = self.memory.alloc()
        self.tables.append(new)
        small = 1 << (shift - 9)
        flags = entry & 0x7F | (_PS if small != PAGE_4K else 0)   # permissions, memory type, ignore PAT
        base = entry & _FRAME & ~((1 << shift) - 1)
        self.memory.write(new, b"".join(struct.pack("<Q", base + i * small | flags) for i in range(512)))
        entry = new | RWX
        self.write_entry(at, entry)
        return entry

    # ------------------------------------------------------------------ mappings
    def map(self, gpa: int, hpa: int, size: int, perms: int = RWX, page: int = PAGE_4K,
            memory_type: int = EptMemoryType.WB) -> None:
        """Map guest-physical ``[gpa, gpa + size)`` to host-physical ``hpa`` with pages of
        ``page`` bytes (4 KBytes, 2 MBytes or 1 GByte; all three addresses aligned to it)."""
        if gpa % page or hpa % page or size % page:
            raise ValueError(f"gpa {gpa:#x}, hpa {hpa:#x} and size {size:#x} must be multiples of "
                             f"the page size {page:#x}")
        for off in range(0, size, page):
            self.write_entry(self._slot(gpa + off, page), self.leaf(hpa + off, perms, page, memory_type))

    def identity(self, size: int, perms: int = RWX, large: bool = True) -> None:
        """Map guest-physical ``[0, size)`` to the same host-physical addresses (the guest's
        RAM), with 2-MByte pages where they fit (``large``) and 4-KByte pages elsewhere."""
        big = size - size % PAGE_2M if large else 0
        if big:
            self.map(0, 0, big, perms, PAGE_2M)
        if size > big:
            self.map(big, big, size - big, perms)

    def protect(self, gpa: int, size: int, perms: int) -> None:
        """Set the permissions of the 4-KByte pages in ``[gpa, gpa + size)`` (0: not
        present).  Large pages there are split; a page never mapped is mapped to the same
        host-physical address (the identity)."""
        for page in range(gpa & ~0xFFF, gpa + size, PAGE_4K):
            at = self._slot(page, PAGE_4K)
            entry = self.read_entry(at)
            frame = entry & _FRAME if entry & _FRAME or entry & 7 else page
            self.write_entry(at, frame | (entry & 0x78 if entry else int(EptMemoryType.WB) << 3) | (perms & 7))

    def unmap(self, gpa: int, size: int) -> None:
        """Make ``[gpa, gpa + size)`` not present (bits 2:0 = 0)."""
        self.protect(gpa, size, 0)

    # ------------------------------------------------------------------ display
    def describe(self, gpa: int) -> list[tuple[str, int, int]]:
        """(entry name, host-physical address of the entry, its value) down the walk of
        ``gpa``, stopping at a not-present entry or one that maps a page."""
        out, table = [], self.root
        for name, shift, page in LEVELS:
            at = table + ((gpa >> shift) & 0x1FF) * 8
            entry = self.read_entry(at)
            out.append((name, at, entry))
            if not entry & 7 or name == "PTE" or entry & _PS:
                break
            table = entry & _FRAME
        return out


def handle_ept_misconfig(vm: "VirtualMachine", exit: "VmExit") -> bool:
    """EPT misconfiguration (exit reason 49): an EPT entry the VMM wrote breaks the SDM's
    rules (29.3.3.1) - a VMM bug, not the guest's doing; stop and say which entry."""
    from .state import VmState
    where = f"guest-physical {exit.guest_physical_address:#x}" if exit.guest_physical_address is not None else "?"
    vm.stop(VmState.STOPPED, f"EPT misconfiguration at {where} (SDM 29.3.3.1): "
            f"{(exit.note or 'an EPT entry breaks the format').removeprefix('EPT misconfiguration: ')}"
            " - fix the entry, then execute INVEPT")
    return False

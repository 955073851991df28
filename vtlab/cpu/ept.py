"""EPT: guest-physical addresses translated through the EPT paging structures (SDM Vol. 3C 29.3).

The EPT paging structures are tables in host memory that the VMM writes; the EPTP (VMCS
field EPT_POINTER) names the top one.  Every guest-physical address a guest in VMX
non-root operation uses - its instruction fetches and data, its own page-table walk,
the IDT, GDT and stack accesses of event delivery - goes through them (SDM 29.3.2).

How vtlab does it on Unicorn.  Unicorn's address space *is* the guest-physical space:
QEMU's softmmu translates the guest's linear addresses with the guest's own page tables
into it.  So the EPT becomes Unicorn's memory map: when the processor needs the
translations of an EPTP it walks every present entry of its tables once
(:meth:`EptUnit.build`) and maps each guest-physical page onto the host page the EPT
names (``mem_map_ptr``: two guest-physical pages may name one host page, and then they
alias), with the EPT's read/write/execute permissions.  An access the map does not
allow stops Unicorn in a memory hook, and :meth:`EptUnit.fault` (with
:mod:`vtlab.cpu.ept_exits` for the exit itself) turns it into what the SDM says: an EPT violation (exit reason 48) with its qualification (Table 28-7), or an
EPT misconfiguration (49), or - with accessed and dirty flags on - the setting of the
flag, after which the access is retried (SDM 29.3.4).

That map is the processor's cache of *guest-physical mappings* (SDM 29.4.1), tagged by
the EP4TA (EPTP bits 51:12).  Like the hardware's it survives VM exits and entries and
is dropped only by INVEPT (single-context: one EP4TA, all-context: every one): a VMM
that changes an EPT entry and forgets INVEPT keeps seeing the old translation, exactly
as on silicon (SDM 29.4.3.4).  Guest-linear translations are QEMU's TLB: dropped when
the guest loads CR3, on INVVPID, and whenever vtlab reloads guest state at VM entry -
the SDM lets a processor drop cached translations at any time.

Host-physical memory (:class:`HostPhysical`): addresses below the guest's RAM size are
the host pages that back the guest's RAM (an identity EPT maps guest-physical X to host
X); the VMM's own pages (VMCS regions, bitmaps, the EPT tables) are above 4 GiB
(:class:`vtlab.cpu.hostmem.HostMemory`).
"""
from __future__ import annotations

import ctypes
import struct
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import unicorn

from ..arch.ept import (EPT_LEVELS, RESERVED_MEMORY_TYPES, EptEntry, EptLevel, EptVpidCap, Eptp)
from ..arch.msrs import Cr0, Cr4, Efer
from .nested_walk import (X86_32BIT, X86_4LEVEL, X86_PAE, LevelFormat, TableFormat, Walk, Walk2D,
                          walk, walk_2d)

if TYPE_CHECKING:
    from .guest import Guest
    from .hostmem import HostMemory

PAGE = 0x1000
_PROT = {1: unicorn.UC_PROT_READ, 2: unicorn.UC_PROT_WRITE, 4: unicorn.UC_PROT_EXEC}
_A, _D = int(EptEntry.ACCESSED), int(EptEntry.DIRTY)
#: The EP4TA of an EPTP: its bits 51:12, the tag of cached mappings (SDM Vol. 3C, 29.4.1).
_EP4TA_MASK = ~0xFFF & ((1 << 52) - 1)


def _uc_prot(perms: int) -> int:
    return sum(p for bit, p in _PROT.items() if perms & bit)


# ------------------------------------------------------------ host-physical memory
class HostPhysical:
    """Host-physical memory as the EPT sees it: the guest's RAM backing below
    ``ram_size``, the VMM's :class:`~vtlab.cpu.hostmem.HostMemory` pages elsewhere."""

    def __init__(self, guest: "Guest", host: "HostMemory"):
        self.guest, self.host = guest, host
        self.ram_size = guest.memory_size
        self._pinned: dict[int, ctypes.Array] = {}   # HostMemory pages handed to Unicorn

    def read(self, address: int, size: int) -> bytes:
        if address + size <= self.ram_size:
            return bytes(self.guest.ram[address:address + size])
        return self.host.read(address, size)

    def write(self, address: int, data: bytes) -> None:
        if address + len(data) <= self.ram_size:
            self.guest.ram[address:address + len(data)] = data
        else:
            self.host.write(address, data)

    def read_int(self, address: int, size: int) -> int:
        return int.from_bytes(self.read(address, size), "little")

    def read_u64(self, address: int) -> int:
        return self.read_int(address, 8)

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<Q", value))

    def pointer(self, address: int) -> int:
        """The host (Python process) address of host-physical page ``address``."""
        if address < self.ram_size:
            return self.guest.ram_pointer + address
        page = self._pinned.get(address)
        if page is None:
            buf = self.host._page(address)
            page = self._pinned[address] = (ctypes.c_char * PAGE).from_buffer(buf)
        return ctypes.addressof(page)


# ------------------------------------------------------------ the EPT format
def ept_format(cap: int, width: int, walk_length: int = 4) -> TableFormat:
    """The EPT paging-structure format for a processor with IA32_VMX_EPT_VPID_CAP ``cap``
    and physical-address width ``width``, for a ``walk_length``-level walk."""
    above = ((1 << 52) - 1) & ~((1 << width) - 1)     # bits 51:N are reserved (SDM 29.3.2)
    levels = {lv.name: lv for lv in EPT_LEVELS}
    page_ok = {"PDPTE": bool(cap & EptVpidCap.PAGE_1G), "PDE": bool(cap & EptVpidCap.PAGE_2M)}
    formats = [LevelFormat(lv.name, lv.shift, 9, lv.page_size) for lv in EPT_LEVELS[-walk_length:]]

    def maps_page(entry: int, level: LevelFormat) -> bool:
        return bool(entry & EptEntry.PAGE_SIZE)

    def address(entry: int, level: LevelFormat) -> int:
        frame = ((1 << width) - 1) & ~0xFFF
        if level.name != "PTE" and entry & EptEntry.PAGE_SIZE and level.page_size:
            frame &= ~(level.page_size - 1)
        return entry & frame

    def problem(entry: int, level: LevelFormat) -> str | None:
        """The misconfiguration rules of SDM 29.3.3.1 for a present entry."""
        perms = entry & 7
        if perms & 2 and not perms & 1:
            return "bit 1 (write) is set but bit 0 (read) is clear: write without read"
        if perms == 4 and not cap & EptVpidCap.EXECUTE_ONLY:
            return ("execute-only (bits 2:0 = 100b) but IA32_VMX_EPT_VPID_CAP[0] = 0: "
                    "this processor has no execute-only translations")
        if entry & above:
            return f"a reserved bit above the physical-address width ({width} bits) is set"
        arch: EptLevel = levels[level.name]
        leaf = level.name == "PTE" or (level.page_size is not None and entry & EptEntry.PAGE_SIZE)
        if leaf and level.name != "PTE" and not page_ok[level.name]:
            return (f"bit 7 (page size) is set in a {level.name}, but this processor does not support "
                    f"{'1-GByte' if level.name == 'PDPTE' else '2-MByte'} pages (IA32_VMX_EPT_VPID_CAP)")
        if leaf:
            if entry & arch.page_reserved:
                return f"reserved bits {arch.page_reserved:#x} (below the page address) are set"
            if EptEntry.memory_type(entry) in RESERVED_MEMORY_TYPES:
                return f"memory type (bits 5:3) {EptEntry.memory_type(entry)} is reserved"
            return None
        if entry & arch.table_reserved:
            bits = "7:3" if arch.table_reserved == 0xF8 else "6:3"
            return f"reserved bits {bits} are set (they must be 0 in an entry that references a table)"
        return None

    return TableFormat("EPT", tuple(formats), 8, lambda e: bool(e & 7), maps_page, address, problem,
                       lambda e: e & 7)


def guest_paging_format(cr0: int, cr4: int, efer: int) -> TableFormat | None:
    """The guest's own paging mode (SDM Vol. 3A 4.1): None with CR0.PG = 0."""
    if not cr0 & Cr0.PG:
        return None
    if efer & Efer.LMA:
        return X86_4LEVEL
    if cr4 & Cr4.PAE:
        return X86_PAE
    if cr4 & Cr4.PSE:
        return X86_32BIT
    return replace(X86_32BIT, maps_page=lambda e, lv: False)


# ------------------------------------------------------------ cached mappings
@dataclass
class Leaf:
    """One cached guest-physical mapping: an EPT entry that maps a page."""

    gpa: int
    size: int
    hpa: int
    permissions: int          #: AND of bits 2:0 over the walk
    entries: tuple[int, ...]  #: host-physical addresses of the entries used (A/D flags)
    accessed: bool = True     #: (A/D on) bit 8 of the leaf
    dirty: bool = True        #: (A/D on) bit 9 of the leaf

    def effective(self) -> int:
        """The permissions Unicorn enforces now: none until accessed, no write until dirty."""
        if not self.accessed:
            return 0
        return self.permissions & ~2 if not self.dirty else self.permissions


@dataclass
class Context:
    """The guest-physical mappings cached for one EP4TA (SDM 29.4.1)."""

    eptp: int
    leaves: list[Leaf] = field(default_factory=list)
    #: guest-physical ranges whose entry is misconfigured: (start, size, why)
    misconfigured: list[tuple[int, int, str]] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)

    def leaf(self, gpa: int) -> Leaf | None:
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            lf = self.leaves[i]
            if lf.gpa <= gpa < lf.gpa + lf.size:
                return lf
        return None

    def misconfiguration(self, gpa: int) -> str | None:
        for start, size, why in self.misconfigured:
            if start <= gpa < start + size:
                return why
        return None


class EptUnit:
    """The processor's EPT: walks, cached guest-physical mappings, violations (a part of the
    non-root monitor, :class:`vtlab.cpu.nonroot.ExitMonitor`)."""

    def __init__(self, guest: "Guest", host: "HostMemory", cap: Callable[[], int]):
        self.guest = guest
        self.memory = HostPhysical(guest, host)
        self._cap = cap
        self.width = host.width
        #: EP4TA -> cached mappings (SDM 29.4.1: guest-physical mappings are tagged by EP4TA)
        self.contexts: dict[int, Context] = {}
        #: what Unicorn's map shows now: an EP4TA, or None for the guest's RAM unmapped
        #: by EPT (identity, every permission - EPT off)
        self.applied: int | None = None
        self.current: Context | None = None
        self.builds = 0           #: how often the tables were walked (a learner can watch it)

    # ---------------------------------------------------------------- walks
    def format(self, eptp: int) -> TableFormat:
        return ept_format(self._cap(), self.width, Eptp.decode(eptp).walk_length)

    def translate(self, eptp: int, gpa: int, purpose: str = "") -> Walk:
        """Walk the EPT paging structures *in memory now* for ``gpa`` (no cache)."""
        return walk(self.format(eptp), Eptp.decode(eptp).address, gpa, self.memory.read_int, "EPT", purpose)

    def walk_linear(self, eptp: int | None, cr3: int, cr0: int, cr4: int, efer: int, linear: int) -> Walk2D:
        """The two-dimensional walk of ``linear``: the guest's page tables (CR0/CR3/CR4/EFER
        as the guest has them), each of their guest-physical addresses through the EPT
        of ``eptp`` (None: EPT off, guest-physical = host-physical).  Every reference is
        listed: 24 for 4-level guest paging on a 4-level EPT."""
        fmt = guest_paging_format(cr0, cr4, efer)
        root = cr3 & (~0x1F if fmt is X86_PAE else ~0xFFF) & ((1 << 52) - 1)
        if eptp is None:
            def nested(gpa: int, purpose: str) -> Walk:
                return Walk(gpa, physical=gpa)
        else:
            def nested(gpa: int, purpose: str) -> Walk:
                return self.translate(eptp, gpa, purpose)
        return walk_2d(fmt, root, linear, nested, self.memory.read_int)

    # ---------------------------------------------------------------- the cache
    def build(self, eptp: int) -> Context:
        """Walk every present entry of the EPT of ``eptp`` and cache what it maps."""
        fmt = self.format(eptp)
        ctx = Context(eptp)
        ad = Eptp.decode(eptp).accessed_dirty

        def descend(table: int, depth: int, base: int, perms: int, chain: tuple[int, ...]) -> None:
            level = fmt.levels[depth]
            span = 1 << level.shift
            entries = struct.unpack("<512Q", self.memory.read(table, PAGE))   # one read per table
            for index, entry in enumerate(entries):
                if not entry & 7:
                    continue
                at = table + index * 8
                gpa = base + index * span
                problem = fmt.problem(entry, level)
                if problem is not None:
                    ctx.misconfigured.append((gpa, span, f"{level.name} at {at:#x} = {entry:#x}: {problem}"))
                    continue
                p = perms & entry & 7
                leaf = level.name == "PTE" or (level.page_size is not None and fmt.maps_page(entry, level))
                if leaf:
                    ctx.leaves.append(Leaf(gpa, span, fmt.address(entry, level), p, chain + (at,),
                                           accessed=not ad or bool(entry & _A),
                                           dirty=not ad or bool(entry & _D)))
                else:
                    descend(fmt.address(entry, level), depth + 1, gpa, p, chain + (at,))

        descend(Eptp.decode(eptp).address, 0, 0, 7, ())
        ctx._starts = [lf.gpa for lf in ctx.leaves]
        self.builds += 1
        return ctx

    def enter(self, ept_on: bool, eptp: int) -> None:
        """VM entry: make Unicorn's map the cached mappings of this EPTP (walking its
        tables if nothing is cached for its EP4TA), or the plain RAM with EPT off."""
        if not ept_on:
            if self.applied is not None:
                self._apply(None)
            return
        tag = eptp & ~0xFFF & ((1 << 52) - 1)
        if not self.needs_enter(True, eptp):
            return
        ctx = self.contexts.get(tag)
        if ctx is None:
            ctx = self.contexts[tag] = self.build(eptp)
        if self.applied != tag or self.current is not ctx:
            self.current = ctx
            self._apply(tag)

    def needs_enter(self, ept_on: bool, eptp: int) -> bool:
        """Would :meth:`enter` change Unicorn's map (INVEPT since, another EPTP, EPT
        turned on or off)?"""
        # (Asked on every VM entry handled in place, so the common answer - "no", the same
        # EPTP as last time with its mappings cached - is settled by the first two tests.)
        if not ept_on:
            return self.applied is not None
        current = self.current
        if current is None:
            return True
        tag = eptp & _EP4TA_MASK
        return self.applied != tag or self.contexts.get(tag) is not current

    def invalidate(self, ep4ta: int | None = None) -> None:
        """INVEPT: drop the mappings of one EP4TA (None: of every one, all-context).  The
        next VM entry walks the tables again."""
        if ep4ta is None:
            self.contexts.clear()
        else:
            self.contexts.pop(ep4ta & ~0xFFF, None)
        if self.applied is not None and self.applied not in self.contexts:
            self.current = None

    def _apply(self, tag: int | None) -> None:
        uc = self.guest.uc
        for begin, end, _ in list(uc.mem_regions()):
            uc.mem_unmap(begin, end - begin + 1)
        self.applied = tag
        if tag is None:
            self.current = None
            uc.mem_map_ptr(0, self.guest.memory_size, unicorn.UC_PROT_ALL, self.guest.ram_pointer)
            return
        # Leaves whose accessed flag is still 0 (A/D on) stay out of the map: the first
        # access faults as unmapped, and fault() sets the flag and maps the leaf.  (Unicorn
        # cannot change a page's protection from inside an instruction-fetch hook.)
        pieces = sorted(p for lf in self.current.leaves if lf.accessed for p in self._pieces(lf))
        run: list | None = None
        for gpa, size, ptr, prot in pieces:
            if run is not None and run[0] + run[1] == gpa and run[2] + run[1] == ptr and run[3] == prot:
                run[1] += size
                continue
            if run is not None:
                uc.mem_map_ptr(run[0], run[1], _uc_prot(run[3]), run[2])
            run = [gpa, size, ptr, prot]
        if run is not None:
            uc.mem_map_ptr(run[0], run[1], _uc_prot(run[3]), run[2])

    def _pieces(self, lf: Leaf) -> list[tuple[int, int, int, int]]:
        """(gpa, size, host pointer, permissions) of what can be mapped of a leaf: the part
        backed by the guest's RAM in one piece; beyond it only host pages that exist (the
        VMM's HostMemory pages), one by one.  Other host-physical addresses have no memory
        behind them in vtlab, and stay unmapped."""
        ram, prot = self.memory.ram_size, lf.effective()
        out, ram_end = [], min(lf.hpa + lf.size, ram)
        if lf.hpa < ram_end:
            out.append((lf.gpa, ram_end - lf.hpa, self.guest.ram_pointer + lf.hpa, prot))
        if lf.hpa + lf.size > ram:
            for hpa in sorted(a for a in self.memory.host._pages if max(lf.hpa, ram) <= a < lf.hpa + lf.size):
                out.append((lf.gpa + hpa - lf.hpa, PAGE, self.memory.pointer(hpa), prot))
        return out

    # ---------------------------------------------------------------- faults
    def permissions(self, gpa: int) -> int:
        """The permissions the cached mappings give ``gpa`` (0: not mapped)."""
        lf = self.current.leaf(gpa) if self.current is not None else None
        return lf.permissions if lf is not None else 0

    def touch(self, gpa: int) -> int:
        """:meth:`permissions` for an access the processor makes outside an instruction
        (event delivery's IDT, GDT and stack accesses): with A/D on, the accessed flags
        of the translation are set first, as for any access (SDM 29.3.4)."""
        lf = self.current.leaf(gpa) if self.current is not None else None
        if lf is None:
            return 0
        if not lf.accessed and lf.permissions:
            self.set_flags(lf, write=False)
        return lf.permissions

    def fault(self, kind: str, gpa: int) -> str | tuple[int, str]:
        """An access of ``kind`` ("r", "w", "x") to ``gpa`` that Unicorn's map refused.

        Returns "retry" when it was only the accessed or dirty flag to set (SDM 29.3.4:
        set, then the access goes on), ("misconfig", why) for an EPT misconfiguration, or
        ("violation", permissions) with the permissions the mapping grants."""
        ctx = self.current
        if ctx is None:
            return ("violation", 0)
        lf = ctx.leaf(gpa)
        if lf is None:
            why = ctx.misconfiguration(gpa)
            return ("misconfig", why) if why is not None else ("violation", 0)
        need = {"r": 1, "w": 2, "x": 4}[kind]
        if not lf.permissions & need:
            return ("violation", lf.permissions)
        self.set_flags(lf, write=kind == "w")
        return "retry"

    def set_flags(self, lf: Leaf, write: bool) -> None:
        """Set the accessed flag of every entry used and, for a write, the dirty flag of
        the leaf (SDM 29.3.4), then widen Unicorn's protection to what the EPT grants."""
        was_mapped = lf.accessed
        for at in lf.entries:
            self.memory.write_u64(at, self.memory.read_u64(at) | _A)
        lf.accessed = True
        if write:
            self.memory.write_u64(lf.entries[-1], self.memory.read_u64(lf.entries[-1]) | _D)
            lf.dirty = True
        for gpa, size, ptr, prot in self._pieces(lf):
            if was_mapped:
                self.guest.uc.mem_protect(gpa, size, _uc_prot(prot))
            else:
                self.guest.uc.mem_map_ptr(gpa, size, _uc_prot(prot), ptr)

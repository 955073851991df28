"""A walk through radix page tables, and the two-dimensional walk of nested paging.

Vendor-neutral: a :class:`TableFormat` says how wide an entry is, which address bits
index each level, which bit makes an entry present, which makes it map a page, and which
bits are reserved; :func:`walk` follows one address down such a tree with a reader of
the memory the tables live in and returns every reference it made.  Intel's EPT
(:mod:`vtlab.cpu.ept`) and the guest's own x86 paging are two such formats; AMD's nested
paging uses the x86 4-level format for both dimensions.

:func:`walk_2d` is the walk of a processor with nested paging (SDM Vol. 3C 29.3.2: "the
guest-physical address of each guest paging-structure entry is translated through EPT"):
each guest paging-structure reference is a guest-physical address, so it costs a nested
walk first; with 4 guest levels and 4 nested levels that is 4 x (4 + 1) + 4 = 24 memory
references for one TLB miss, against 4 without virtualization.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

#: Reads ``size`` bytes (4 or 8) at a physical address of the memory the tables are in.
Reader = Callable[[int, int], int]


@dataclass(frozen=True)
class LevelFormat:
    """One level of a radix tree: the entry's name, the address bits that index its table
    (``index_bits`` bits from ``shift`` up) and the page size of an entry that maps a page
    here (None: entries here always reference a table)."""

    name: str
    shift: int
    index_bits: int = 9
    page_size: int | None = None


@dataclass(frozen=True)
class TableFormat:
    """How a family of page tables is laid out (the levels top to bottom).

    ``present(entry)``, ``maps_page(entry, level)`` (for a level that can map a page),
    ``address(entry)`` (the next table or the page frame), ``problem(entry, level)`` (a
    reserved-bit or other configuration error of a present entry, or None) and
    ``permissions(entry)`` (bit 0 read, 1 write, 2 execute - for the AND over the walk).
    """

    name: str
    levels: tuple[LevelFormat, ...]
    entry_size: int
    present: Callable[[int], bool]
    maps_page: Callable[[int, LevelFormat], bool]
    address: Callable[[int, LevelFormat], int]
    problem: Callable[[int, LevelFormat], str | None]
    permissions: Callable[[int], int]


@dataclass(frozen=True)
class Reference:
    """One memory reference of a walk: the entry read at ``address`` (physical, in the
    tables' memory), at ``level``, for the address being translated."""

    dimension: str        #: which tree: e.g. "guest" or "EPT"
    level: str            #: the entry's name (PML4E, PDE ...)
    address: int          #: where the entry is
    entry: int            #: what it held
    translating: int      #: the address whose translation needed it
    purpose: str = ""     #: (2-D walks) what the nested walk was for


@dataclass
class Walk:
    """The result of :func:`walk`: the references made, the physical address (None if the
    walk stopped), the AND of the permissions of the entries used, and why it stopped:
    ``fault`` is "not-present" or "misconfigured" (``problem`` says how)."""

    address: int
    references: list[Reference] = field(default_factory=list)
    physical: int | None = None
    permissions: int = 7
    page_size: int = 0
    fault: str | None = None
    problem: str = ""
    leaf: Reference | None = None

    @property
    def ok(self) -> bool:
        return self.fault is None


def walk(fmt: TableFormat, root: int, address: int, read: Reader, dimension: str = "",
         purpose: str = "") -> Walk:
    """Translate ``address`` through the tables of format ``fmt`` whose top table is at
    ``root``, reading entries with ``read``; every entry read is a :class:`Reference`."""
    result = Walk(address)
    table = root
    for level in fmt.levels:
        index = (address >> level.shift) & ((1 << level.index_bits) - 1)
        at = table + index * fmt.entry_size
        entry = read(at, fmt.entry_size)
        ref = Reference(dimension or fmt.name, level.name, at, entry, address, purpose)
        result.references.append(ref)
        if not fmt.present(entry):
            result.fault, result.permissions = "not-present", 0
            return result
        problem = fmt.problem(entry, level)
        if problem is not None:
            result.fault, result.problem = "misconfigured", f"{level.name} at {at:#x} = {entry:#x}: {problem}"
            return result
        result.permissions &= fmt.permissions(entry)
        if level.page_size is not None and (level is fmt.levels[-1] or fmt.maps_page(entry, level)):
            result.page_size, result.leaf = level.page_size, ref
            result.physical = fmt.address(entry, level) + (address & (level.page_size - 1))
            return result
        table = fmt.address(entry, level)
    raise AssertionError(f"{fmt.name}: the last level must map a page")  # (a format error)


@dataclass
class Walk2D:
    """A two-dimensional walk: every reference in the order the processor makes them,
    the guest-physical address the guest's tables gave, and the final physical address.
    ``fault`` names the dimension and the reason it stopped ("EPT not-present" ...)."""

    linear: int
    references: list[Reference] = field(default_factory=list)
    guest_physical: int | None = None
    physical: int | None = None
    fault: str | None = None
    #: the nested walk that failed (its ``address`` is the guest-physical address)
    failed: Walk | None = None
    #: True if the failing nested walk was for a guest paging-structure entry
    during_guest_walk: bool = False

    def count(self, dimension: str | None = None) -> int:
        """Memory references made (of one dimension only, if given)."""
        return sum(1 for r in self.references if dimension is None or r.dimension == dimension)


def walk_2d(guest: TableFormat | None, guest_root: int, linear: int,
            nested: Callable[[int, str], Walk], read_host: Reader) -> Walk2D:
    """Translate ``linear`` through the guest's page tables (format ``guest``, top table
    at guest-physical ``guest_root``; None: guest paging is off, linear = guest-physical)
    and each guest-physical address through ``nested(gpa, purpose)`` (the EPT walk).
    Guest entries are read with ``read_host`` at the physical address the nested walk gave."""
    out = Walk2D(linear)

    def through(gpa: int, purpose: str) -> int | None:
        w = nested(gpa, purpose)
        out.references.extend(w.references)
        if not w.ok:
            out.fault, out.failed = f"{w.references[-1].dimension if w.references else 'nested'} {w.fault}", w
            return None
        return w.physical

    if guest is None:
        out.guest_physical = linear
        out.physical = through(linear, "the access")
        return out
    table = guest_root
    for level in guest.levels:
        index = (linear >> level.shift) & ((1 << level.index_bits) - 1)
        gpa = table + index * guest.entry_size
        hpa = through(gpa, f"guest {level.name}")
        if hpa is None:
            out.during_guest_walk = True
            return out
        entry = read_host(hpa, guest.entry_size)
        out.references.append(Reference("guest", level.name, gpa, entry, linear))
        if not guest.present(entry):
            out.fault = "guest not-present"
            return out
        if level.page_size is not None and (level is guest.levels[-1] or guest.maps_page(entry, level)):
            out.guest_physical = guest.address(entry, level) + (linear & (level.page_size - 1))
            out.physical = through(out.guest_physical, "the access")
            return out
        table = guest.address(entry, level)
    raise AssertionError(f"{guest.name}: the last level must map a page")


# ------------------------------------------------------------ the x86 guest formats
# x86 paging (SDM Vol. 3A 4.3, 4.4, 4.5): bit 0 P, bit 1 R/W, bit 7 PS (a page at a level
# that can map one), bit 63 XD (PAE and 4-level paging); the frame in bits 51:12.
_P, _RW, _PS, _XD = 1 << 0, 1 << 1, 1 << 7, 1 << 63
_FRAME = ((1 << 52) - 1) & ~0xFFF


def _x86_perms(entry: int) -> int:
    return 1 | (2 if entry & _RW else 0) | (0 if entry >> 63 & 1 else 4)


def _x86_address(entry: int, level: LevelFormat) -> int:
    mask = _FRAME if level.page_size is None or not entry & _PS else _FRAME & ~(level.page_size - 1)
    return entry & mask


X86_4LEVEL = TableFormat(
    "guest", (LevelFormat("PML4E", 39), LevelFormat("PDPTE", 30, page_size=1 << 30),
              LevelFormat("PDE", 21, page_size=1 << 21), LevelFormat("PTE", 12, page_size=1 << 12)),
    8, lambda e: bool(e & _P), lambda e, lv: bool(e & _PS), _x86_address, lambda e, lv: None, _x86_perms)
X86_PAE = TableFormat(
    "guest", (LevelFormat("PDPTE", 30, index_bits=2), LevelFormat("PDE", 21, page_size=1 << 21),
              LevelFormat("PTE", 12, page_size=1 << 12)),
    8, lambda e: bool(e & _P), lambda e, lv: bool(e & _PS), _x86_address, lambda e, lv: None, _x86_perms)
X86_32BIT = TableFormat(
    "guest", (LevelFormat("PDE", 22, index_bits=10, page_size=1 << 22),
              LevelFormat("PTE", 12, index_bits=10, page_size=1 << 12)),
    4, lambda e: bool(e & _P), lambda e, lv: bool(e & _PS), lambda e, lv: e & 0xFFFF_F000 & ~(
        (lv.page_size - 1) if lv.page_size and e & _PS and lv.shift == 22 else 0),
    lambda e, lv: None, lambda e: 1 | (2 if e & _RW else 0) | 4)

"""The extended page tables as the SDM defines them, as data (SDM Vol. 3C 25.6.11, 29.3).

* :class:`Eptp` - the extended-page-table pointer, the VMCS field EPT_POINTER (SDM 25.6.11,
  "Format of Extended-Page-Table Pointer"): memory type in bits 2:0, page-walk length - 1
  in bits 5:3, bit 6 enables accessed and dirty flags, the address of the EPT PML4 table
  (PML5 table with a 5-level walk) in bits N-1:12.
* :class:`EptEntry` - the bits of an EPT paging-structure entry (SDM 29.3.2, the tables
  "Format of an EPT PML5 Entry" ... "Format of an EPT Page-Table Entry"): read 0, write 1,
  execute 2, memory type 5:3 and ignore-PAT 6 (in an entry that maps a page), page size 7
  (PDPTE and PDE), accessed 8, dirty 9 (an entry that maps a page), user-mode execute 10
  (only with mode-based execute control, which vtlab does not offer), the address of the
  next table or of the page in bits N-1:12.
* :data:`EPT_LEVELS` - the five levels, what bits 47:12 / 56:12 of a guest-physical
  address select at each, and the page size of an entry there that maps a page.
* :class:`EptMemoryType` and :data:`RESERVED_MEMORY_TYPES` - the memory types an entry may
  name (SDM 29.3.6, "EPT and Memory Typing"); 2, 3 and 7 are reserved (a misconfiguration).
* :class:`EptVpidCap` - the bits of IA32_VMX_EPT_VPID_CAP (SDM Appendix A.10).
* :class:`InveptType` / :class:`InvvpidType` - the INVEPT and INVVPID types (SDM 29.4.3,
  31.3 "INVEPT", "INVVPID") and the capability bit that offers each.

The EPT-violation exit qualification lives with the other qualifications
(:class:`vtlab.arch.qualifications.EptViolationQualification`, SDM Table 28-7).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Eptp", "EptEntry", "EptLevel", "EPT_LEVELS", "EptMemoryType", "RESERVED_MEMORY_TYPES",
           "EptVpidCap", "InveptType", "InvvpidType", "INVEPT_TYPE_CAP", "INVVPID_TYPE_CAP",
           "PAGE_4K", "PAGE_2M", "PAGE_1G", "ENTRIES_PER_TABLE"]

PAGE_4K, PAGE_2M, PAGE_1G = 0x1000, 0x20_0000, 0x4000_0000
#: Every EPT paging structure is a 4-KByte table of 512 8-byte entries (SDM 29.3.2).
ENTRIES_PER_TABLE = 512


class EptMemoryType(enum.IntEnum):
    """Memory types (SDM 29.3.6; the same encodings as the PAT's)."""

    UC = 0   #: uncacheable
    WC = 1   #: write combining
    WT = 4   #: write through
    WP = 5   #: write protected
    WB = 6   #: write back


#: Memory types 2, 3 and 7 are reserved: an EPT entry that maps a page with one of them is
#: misconfigured (SDM 29.3.3.1).
RESERVED_MEMORY_TYPES = frozenset({2, 3, 7})


class EptEntry(enum.IntFlag):
    """Bits of an EPT paging-structure entry (SDM 29.3.2)."""

    READ = 1 << 0           #: reads allowed from the region this entry controls
    WRITE = 1 << 1          #: writes allowed
    EXECUTE = 1 << 2        #: instruction fetches allowed (supervisor-mode with MBEC)
    IGNORE_PAT = 1 << 6     #: (an entry that maps a page) ignore the guest's PAT memory type
    PAGE_SIZE = 1 << 7      #: (PDPTE, PDE) 1: the entry maps a 1-GByte / 2-MByte page
    ACCESSED = 1 << 8       #: set by the processor if EPTP[6] = 1 (SDM 29.3.4)
    DIRTY = 1 << 9          #: (an entry that maps a page) set on a write if EPTP[6] = 1
    USER_EXECUTE = 1 << 10  #: user-mode execute, only with mode-based execute control

    @staticmethod
    def permissions(entry: int) -> int:
        """Bits 2:0 (read, write, execute): all 0 means "not present" (SDM 29.3.2)."""
        return entry & 7

    @staticmethod
    def memory_type(entry: int) -> int:
        """Bits 5:3 of an entry that maps a page: the EPT memory type."""
        return (entry >> 3) & 7


#: The address bits of an entry: N-1:12 (N = the physical-address width).
ADDRESS_SHIFT = 12
#: Bits 5:3 of an entry that maps a page hold the memory type.
MEMORY_TYPE_SHIFT = 3


@dataclass(frozen=True)
class EptLevel:
    """One level of the EPT walk: the entry's name, the guest-physical-address bits that
    index its table, and the size of a page an entry here maps (None: it cannot)."""

    name: str
    shift: int                  #: the index is bits shift+8:shift of the guest-physical address
    page_size: int | None       #: the page an entry with bit 7 = 1 maps here
    #: bits that are reserved (must be 0) in an entry here that references another table
    table_reserved: int
    #: bits that are reserved in an entry here that maps a page (below the address), or 0
    page_reserved: int


#: Top to bottom (SDM 29.3.2): a 4-level walk starts at the PML4, a 5-level at the PML5.
#: In an entry that references a table bits 7:3 are reserved (bit 7 is the page size, 0);
#: an entry that maps a 1-GByte page has bits 29:12 reserved, a 2-MByte page bits 20:12.
EPT_LEVELS: tuple[EptLevel, ...] = (
    EptLevel("PML5E", 48, None, 0xF8, 0),
    EptLevel("PML4E", 39, None, 0xF8, 0),
    EptLevel("PDPTE", 30, PAGE_1G, 0x78, ((1 << 30) - 1) & ~0xFFF),
    EptLevel("PDE", 21, PAGE_2M, 0x78, ((1 << 21) - 1) & ~0xFFF),
    EptLevel("PTE", 12, PAGE_4K, 0, 0),
)


class EptVpidCap(enum.IntFlag):
    """Bits of IA32_VMX_EPT_VPID_CAP (MSR 48CH, SDM Appendix A.10)."""

    EXECUTE_ONLY = 1 << 0         #: EPT entries may allow execute without read (bits 2:0 = 100b)
    WALK_LENGTH_4 = 1 << 6        #: page-walk length of 4
    WALK_LENGTH_5 = 1 << 7        #: page-walk length of 5
    MEMORY_TYPE_UC = 1 << 8       #: EPTP memory type UC may be used
    MEMORY_TYPE_WB = 1 << 14      #: EPTP memory type WB may be used
    PAGE_2M = 1 << 16             #: a PDE may map a 2-MByte page
    PAGE_1G = 1 << 17             #: a PDPTE may map a 1-GByte page
    INVEPT = 1 << 20              #: INVEPT is supported
    ACCESSED_DIRTY = 1 << 21      #: accessed and dirty flags for EPT (EPTP bit 6)
    ADVANCED_EXIT_INFO = 1 << 22  #: advanced VM-exit information for EPT violations
    INVEPT_SINGLE = 1 << 25       #: single-context INVEPT
    INVEPT_ALL = 1 << 26          #: all-context INVEPT
    INVVPID = 1 << 32             #: INVVPID is supported
    INVVPID_ADDRESS = 1 << 40     #: individual-address INVVPID
    INVVPID_SINGLE = 1 << 41      #: single-context INVVPID
    INVVPID_ALL = 1 << 42         #: all-context INVVPID
    INVVPID_SINGLE_GLOBALS = 1 << 43  #: single-context-retaining-globals INVVPID


@dataclass(frozen=True)
class Eptp:
    """The extended-page-table pointer (SDM 25.6.11).

    >>> p = Eptp.decode(0x1_0000_305E)
    >>> p.memory_type, p.walk_length, p.accessed_dirty, hex(p.address)
    (6, 4, True, '0x100003000')
    """

    memory_type: int      #: bits 2:0: memory type for accessing the EPT paging structures
    walk_length: int      #: bits 5:3 plus 1: the number of EPT levels walked (4 or 5)
    accessed_dirty: bool  #: bit 6: the processor sets EPT accessed and dirty flags
    supervisor_shadow_stack: bool  #: bit 7: enforcement of supervisor shadow-stack access rights
    reserved: int         #: bits 11:8, must be 0
    address: int          #: bits N-1:12: the PML4 (or PML5) table

    @classmethod
    def decode(cls, value: int) -> "Eptp":
        return cls(memory_type=value & 7, walk_length=((value >> 3) & 7) + 1,
                   accessed_dirty=bool(value >> 6 & 1), supervisor_shadow_stack=bool(value >> 7 & 1),
                   reserved=(value >> 8) & 0xF, address=value & ~0xFFF)

    @staticmethod
    def encode(address: int, memory_type: int = EptMemoryType.WB, walk_length: int = 4,
               accessed_dirty: bool = False) -> int:
        """An EPTP value: ``Eptp.encode(root)`` is WB, a 4-level walk, no A/D flags."""
        if address & 0xFFF:
            raise ValueError(f"the EPT PML4 table address {address:#x} must be 4-KByte aligned")
        return address | (walk_length - 1) << 3 | int(memory_type) | int(accessed_dirty) << 6


class InveptType(enum.IntEnum):
    """INVEPT types (SDM 29.4.3.1, 31.3 "INVEPT")."""

    SINGLE_CONTEXT = 1   #: mappings tagged with the EP4TA of the descriptor's EPTP
    ALL_CONTEXT = 2      #: mappings tagged with every EP4TA


class InvvpidType(enum.IntEnum):
    """INVVPID types (SDM 29.4.3.1, 31.3 "INVVPID")."""

    INDIVIDUAL_ADDRESS = 0          #: one linear address of one VPID
    SINGLE_CONTEXT = 1              #: every mapping of one VPID
    ALL_CONTEXT = 2                 #: every VPID but 0000H
    SINGLE_CONTEXT_RETAINING_GLOBALS = 3   #: one VPID, global translations kept


#: The IA32_VMX_EPT_VPID_CAP bit that offers each type (SDM A.10).
INVEPT_TYPE_CAP = {InveptType.SINGLE_CONTEXT: EptVpidCap.INVEPT_SINGLE,
                   InveptType.ALL_CONTEXT: EptVpidCap.INVEPT_ALL}
INVVPID_TYPE_CAP = {InvvpidType.INDIVIDUAL_ADDRESS: EptVpidCap.INVVPID_ADDRESS,
                    InvvpidType.SINGLE_CONTEXT: EptVpidCap.INVVPID_SINGLE,
                    InvvpidType.ALL_CONTEXT: EptVpidCap.INVVPID_ALL,
                    InvvpidType.SINGLE_CONTEXT_RETAINING_GLOBALS: EptVpidCap.INVVPID_SINGLE_GLOBALS}

"""VM-entry checks on guest segment registers (SDM 27.3.1.2) and descriptor-table
registers (SDM 27.3.1.3).  A failure is a VM-entry failure, exit reason 33 | bit 31.

VM entry does not read the guest's GDT: it loads every segment register's hidden part
(base, limit, access rights) straight from the VMCS, so the processor checks that those
fields describe a segment it could have loaded itself.  The access-rights field has the
layout of a descriptor's bytes 5-6 (SDM 25.4.1, Table 25-2)::

    bits 3:0 type   bit 4 S (1 = code/data)   bits 6:5 DPL   bit 7 P (present)
    bit 12 AVL   bit 13 L (64-bit code)   bit 14 D/B   bit 15 G   bit 16 unusable

In virtual-8086 mode (RFLAGS.VM = 1) the rules are simpler: every data/code segment is a
ring-3, read/write, present 64-KByte segment at selector * 16.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

from ...arch.controls import ProcBased2
from ...arch.vmcs_fields import VmcsField as F
from .registry import (NON_CANONICAL, RFLAGS_VM, SECONDARY_READS, Reader, both, canonical, clear_bits,
                       ia32e_guest, rule, set_bits, unrestricted_guest, virtual_8086, write)

if TYPE_CHECKING:
    from ..vmx import VmxCpu

guest = functools.partial(rule, "guest-state")

UNUSABLE = 1 << 16   #: access-rights bit 16: the register holds a null selector ("unusable")
_S, _P, _G = 1 << 4, 1 << 7, 1 << 15


def _type_to(field: F, typ: int) -> Callable:
    """Recipe: give the access-rights ``field`` segment type ``typ`` (bits 3:0)."""
    return lambda vm: vm.vmwrite(field, vm.vmread(field) & ~0xF | typ)


def _add_segment_rules(seg: str) -> None:
    """Register the rules of one of CS, SS, DS, ES, FS, GS, in the order they are checked."""
    sel_f, base_f, limit_f, ar_f = (F[f"GUEST_{seg}_{part}"] for part in ("SELECTOR", "BASE", "LIMIT", "AR_BYTES"))
    s = seg.lower()
    ar_reads = {F.GUEST_RFLAGS, ar_f}
    # "If the register is CS or if the register is usable" (SDM 27.3.1.2): an unusable
    # data segment register is not checked further; CS is always checked.
    usable_only = seg != "CS"
    when = f"If {seg} is usable, the" if usable_only else "The"   # how the docs below start

    def checked(get: Reader) -> int | None:
        """The access rights if the non-virtual-8086 rules apply to this register, else None."""
        if virtual_8086(get):
            return None
        ar = get(ar_f)
        return None if usable_only and ar & UNUSABLE else ar

    def prefix(msg: str) -> list[str]:
        return [f"GUEST_{seg}: {msg}"]

    @guest(f"guest_{s}_v8086_access_rights", "27.3.1.2", reads=ar_reads, mode="protected",
           breaks=set_bits(F.GUEST_RFLAGS, RFLAGS_VM),
           doc=f"If the guest will be in virtual-8086 mode, the {seg} access-rights field must be "
               "000000F3H: a present, DPL-3, accessed read/write data segment.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if virtual_8086(get) and get(ar_f) != 0xF3:
            return prefix(f"{seg} access rights must be 0xF3 in virtual-8086 mode (are {get(ar_f):#x})")
        return []

    @guest(f"guest_{s}_access_rights_reserved", "27.3.1.2", reads=ar_reads, breaks=set_bits(ar_f, 1 << 8),
           doc=f"Bits 11:8 and 31:17 of the {seg} access-rights field are reserved and must be 0"
               f"{' if the register is usable' if usable_only else ''}.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        ar = checked(get)
        if ar is not None and ar & 0xFFFE0F00:
            return prefix(f"{seg} access-rights reserved bits (11:8, 31:17) must be 0 (are {ar:#x})")
        return []

    if seg == "CS":
        @guest("guest_cs_type", "27.3.1.2", reads=ar_reads | SECONDARY_READS, breaks=_type_to(ar_f, 1))
        def _(get: Reader, cpu: "VmxCpu") -> list[str]:
            """The CS type must be 9, 11, 13 or 15 (an accessed code segment); if
            "unrestricted guest" is 1 it may also be 3 (read/write accessed data), the CS of
            a real-mode guest."""
            ar = checked(get)
            if ar is None:
                return []
            unrestricted = unrestricted_guest(get)
            if ar & 0xF not in ((3, 9, 11, 13, 15) if unrestricted else (9, 11, 13, 15)):
                return prefix(f"CS type must be an accessed code segment (9, 11, 13 or 15"
                              f"{', or 3 with unrestricted guest' if unrestricted else ''}); it is {ar & 0xF}")
            return []
    elif seg == "SS":
        @guest("guest_ss_type", "27.3.1.2", reads=ar_reads, breaks=_type_to(ar_f, 11))
        def _(get: Reader, cpu: "VmxCpu") -> list[str]:
            """If SS is usable, its type must be 3 or 7: a read/write, accessed data segment
            (expand-up or expand-down)."""
            ar = checked(get)
            if ar is not None and ar & 0xF not in (3, 7):
                return prefix(f"SS type must be a read/write accessed data segment (3 or 7); it is {ar & 0xF}")
            return []
    else:
        @guest(f"guest_{s}_type_accessed", "27.3.1.2", reads=ar_reads, breaks=clear_bits(ar_f, 1),
               doc=f"If {seg} is usable, bit 0 of its type (accessed) must be 1.")
        def _(get: Reader, cpu: "VmxCpu") -> list[str]:
            ar = checked(get)
            if ar is not None and not ar & 1:
                return prefix(f"{seg} type must have the accessed bit (bit 0) set; it is {ar & 0xF}")
            return []

        @guest(f"guest_{s}_code_readable", "27.3.1.2", reads=ar_reads, breaks=_type_to(ar_f, 9),
               doc=f"If {seg} is usable and bit 3 of its type is 1 (a code segment), bit 1 of the "
                   "type (readable) must be 1: a data segment register cannot hold execute-only code.")
        def _(get: Reader, cpu: "VmxCpu") -> list[str]:
            ar = checked(get)
            if ar is not None and ar & 8 and not ar & 2:
                return prefix(f"{seg} is a code segment, so it must be readable (type bit 1)")
            return []

    @guest(f"guest_{s}_s_bit", "27.3.1.2", reads=ar_reads, breaks=clear_bits(ar_f, _S),
           doc=f"{when} S bit (bit 4) of {seg} must be 1: a code or data segment, not a system "
               "descriptor.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        ar = checked(get)
        if ar is not None and not ar & _S:
            return prefix(f"{seg} S bit (bit 4) must be 1: a code or data segment, not a system one")
        return []

    @guest(f"guest_{s}_present", "27.3.1.2", reads=ar_reads, breaks=clear_bits(ar_f, _P),
           doc=f"{when} P bit (bit 7) of {seg} must be 1 (present).")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        ar = checked(get)
        if ar is not None and not ar & _P:
            return prefix(f"{seg} P bit (bit 7) must be 1 (segment present)")
        return []

    if seg == "SS":
        @guest("guest_ss_dpl_equals_rpl", "27.3.1.2", reads=ar_reads | SECONDARY_READS | {sel_f},
               mode="paged", breaks=both(clear_bits(F.SECONDARY_VM_EXEC_CONTROL, ProcBased2.UNRESTRICTED_GUEST),
                                         set_bits(sel_f, 3)))
        def _(get: Reader, cpu: "VmxCpu") -> list[str]:
            """If "unrestricted guest" is 0, the SS DPL must equal the RPL of the SS selector:
            SS always holds the current privilege level."""
            ar = checked(get)
            if ar is not None and not unrestricted_guest(get) and (ar >> 5) & 3 != get(sel_f) & 3:
                return prefix(f"SS DPL ({(ar >> 5) & 3}) must equal SS selector RPL ({get(sel_f) & 3})")
            return []

    if seg == "CS":
        _add_cs_dpl_rules(ar_reads)

    @guest(f"guest_{s}_limit_granularity_low", "27.3.1.2", reads=ar_reads | {limit_f}, mode="protected",
           breaks=write(limit_f, 0xFFFF_F000),
           doc=f"{when} G bit (bit 15) of {seg} must be 0 if any bit in the range 11:0 of the limit "
               "field is 0: a 4-KByte-granular limit always ends in FFFH.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        ar = checked(get)
        if ar is not None and ar & _G and (get(limit_f) & 0xFFF) != 0xFFF:
            return prefix(f"{seg} G bit is 1 but limit bits 11:0 are not all 1 (limit {get(limit_f):#x})")
        return []

    @guest(f"guest_{s}_limit_granularity_high", "27.3.1.2", reads=ar_reads | {limit_f}, mode="protected",
           breaks=clear_bits(ar_f, _G),
           doc=f"{when} G bit (bit 15) of {seg} must be 1 if any bit in the range 31:20 of the "
               "limit field is 1: a byte-granular limit has only 20 bits.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        ar = checked(get)
        if ar is not None and get(limit_f) >> 20 and not ar & _G:
            return prefix(f"{seg} limit {get(limit_f):#x} exceeds 1 MByte but G bit is 0")
        return []

    @guest(f"guest_{s}_v8086_base", "27.3.1.2", reads={F.GUEST_RFLAGS, sel_f, base_f}, mode="protected",
           breaks=set_bits(F.GUEST_RFLAGS, RFLAGS_VM),
           doc=f"If the guest will be in virtual-8086 mode, the {seg} base-address field must be "
               "the selector field shifted left 4 bits.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if virtual_8086(get) and get(base_f) != get(sel_f) << 4:
            return [f"GUEST_{seg}_BASE must be selector << 4 in virtual-8086 mode"]
        return []


def _add_cs_dpl_rules(ar_reads: set) -> None:
    """The three CS DPL rules of SDM 27.3.1.2, one per kind of CS type."""
    cs_ar, ss_ar = F.GUEST_CS_AR_BYTES, F.GUEST_SS_AR_BYTES

    def cs(get: Reader) -> tuple[int, int] | None:
        """(type, DPL) of CS when the access-rights rules apply (not virtual-8086 mode)."""
        if virtual_8086(get):
            return None
        ar = get(cs_ar)
        return ar & 0xF, (ar >> 5) & 3

    @guest("guest_cs_dpl_data_segment", "27.3.1.2", reads=ar_reads,
           breaks=write(cs_ar, 0xF3))
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        """If the CS type is 3 (read/write accessed expand-up data segment, allowed only with
        "unrestricted guest" = 1), the CS DPL must be 0: such a CS is a real-mode guest's."""
        found = cs(get)
        if found is not None and found[0] == 3 and found[1] != 0:
            return [f"GUEST_CS: CS type is 3 (a read/write data segment, for an unrestricted guest), "
                    f"so CS DPL must be 0; it is {found[1]}"]
        return []

    @guest("guest_cs_dpl_nonconforming", "27.3.1.2", reads=ar_reads | {ss_ar},
           breaks=set_bits(cs_ar, 3 << 5))
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        """If the CS type is 9 or 11 (non-conforming code segment), the CS DPL must equal
        the DPL in the access-rights field for SS: both are the CPL."""
        found = cs(get)
        if found is not None and found[0] in (9, 11):
            ss_dpl = (get(ss_ar) >> 5) & 3
            if found[1] != ss_dpl:
                return [f"GUEST_CS: CS is a non-conforming code segment (type {found[0]}), so its DPL "
                        f"({found[1]}) must equal SS DPL ({ss_dpl})"]
        return []

    @guest("guest_cs_dpl_conforming", "27.3.1.2", reads=ar_reads | {ss_ar},
           breaks=lambda vm: vm.vmwrite(cs_ar, vm.vmread(cs_ar) | 0xF | (3 << 5)))
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        """If the CS type is 13 or 15 (conforming code segment), the CS DPL must not be
        greater than the DPL in the access-rights field for SS (code runs at CPL >= DPL)."""
        found = cs(get)
        if found is not None and found[0] in (13, 15):
            ss_dpl = (get(ss_ar) >> 5) & 3
            if found[1] > ss_dpl:
                return [f"GUEST_CS: CS is a conforming code segment (type {found[0]}), so its DPL "
                        f"({found[1]}) must not be greater than SS DPL ({ss_dpl})"]
        return []


for _seg in ("CS", "SS", "DS", "ES", "FS", "GS"):
    _add_segment_rules(_seg)


# ------------------------------------------------------------ TR (27.3.1.2)
_TR_AR, _TR_SEL = F.GUEST_TR_AR_BYTES, F.GUEST_TR_SELECTOR


@guest("guest_tr_selector_ti", "27.3.1.2", reads={_TR_SEL}, breaks=set_bits(_TR_SEL, 1 << 2))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The TI flag (bit 2) of the TR selector must be 0: a TSS descriptor lives in the GDT."""
    if get(_TR_SEL) & 4:
        return ["GUEST_TR_SELECTOR TI flag (bit 2) must be 0"]
    return []


@guest("guest_tr_usable", "27.3.1.2", reads={_TR_AR}, breaks=set_bits(_TR_AR, UNUSABLE))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The unusable bit (bit 16) of the TR access-rights field must be 0: the guest
    always has a task register."""
    if get(_TR_AR) & UNUSABLE:
        return ["GUEST_TR must be usable (access rights bit 16 clear)"]
    return []


@guest("guest_tr_type", "27.3.1.2", reads={_TR_AR, F.VM_ENTRY_CONTROLS}, breaks=_type_to(_TR_AR, 9))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The TR type must be 11 (busy 32-bit or 64-bit TSS); if the guest will not be in
    IA-32e mode it may also be 3 (busy 16-bit TSS)."""
    ar, ia32e = get(_TR_AR), ia32e_guest(get)
    if ar & 0xF not in ((11,) if ia32e else (3, 11)):
        return [f"GUEST_TR access rights {ar:#x}: TR must be a busy TSS (type 11"
                f"{', or 3 for a 16-bit TSS' if not ia32e else ''}); its type is {ar & 0xF}"]
    return []


@guest("guest_tr_s_bit", "27.3.1.2", reads={_TR_AR}, breaks=set_bits(_TR_AR, _S))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The S bit (bit 4) of the TR access-rights field must be 0: a TSS is a system descriptor."""
    if get(_TR_AR) & _S:
        return [f"GUEST_TR access rights {get(_TR_AR):#x}: S (bit 4) must be 0, a TSS is a system descriptor"]
    return []


@guest("guest_tr_present", "27.3.1.2", reads={_TR_AR}, breaks=clear_bits(_TR_AR, _P))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The P bit (bit 7) of the TR access-rights field must be 1 (present)."""
    if not get(_TR_AR) & _P:
        return [f"GUEST_TR access rights {get(_TR_AR):#x}: P (bit 7) must be 1 (TSS present)"]
    return []


# ---------------------------------------------------------- LDTR (27.3.1.2)
_LDTR_AR = F.GUEST_LDTR_AR_BYTES


def _usable_ldtr(get: Reader) -> int | None:
    """The LDTR access rights if LDTR is usable (only then is it checked), else None."""
    ar = get(_LDTR_AR)
    return None if ar & UNUSABLE else ar


@guest("guest_ldtr_type", "27.3.1.2", reads={_LDTR_AR}, breaks=write(_LDTR_AR, 0x83))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If LDTR is usable, its type must be 2 (LDT)."""
    ar = _usable_ldtr(get)
    if ar is not None and ar & 0xF != 2:
        return [f"GUEST_LDTR is usable, so it must be an LDT descriptor (type 2); its type is {ar & 0xF}"]
    return []


@guest("guest_ldtr_s_bit", "27.3.1.2", reads={_LDTR_AR}, breaks=write(_LDTR_AR, 0x92))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If LDTR is usable, its S bit (bit 4) must be 0: an LDT descriptor is a system descriptor."""
    ar = _usable_ldtr(get)
    if ar is not None and ar & _S:
        return ["GUEST_LDTR is usable, so its S bit (bit 4) must be 0 (a system descriptor)"]
    return []


@guest("guest_ldtr_present", "27.3.1.2", reads={_LDTR_AR}, breaks=write(_LDTR_AR, 0x02))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If LDTR is usable, its P bit (bit 7) must be 1 (present)."""
    ar = _usable_ldtr(get)
    if ar is not None and not ar & _P:
        return ["GUEST_LDTR is usable, so its P bit (bit 7) must be 1 (present)"]
    return []


# ------------------------------------------- GDTR and IDTR (27.3.1.3)
def _table_rules(table: str) -> None:
    base_f, limit_f = F[f"GUEST_{table}_BASE"], F[f"GUEST_{table}_LIMIT"]

    @guest(f"guest_{table.lower()}_limit", "27.3.1.3", reads={limit_f}, breaks=write(limit_f, 0x1_0000),
           doc=f"Bits 31:16 of the {table} limit field must be 0: {table} limits are 16 bits.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if get(limit_f) >> 16:
            return [f"GUEST_{table}_LIMIT bits 31:16 must be 0"]
        return []

    @guest(f"guest_{table.lower()}_base_canonical", "27.3.1.3", reads={base_f},
           breaks=write(base_f, NON_CANONICAL),
           doc=f"The {table} base-address field must contain a canonical address.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if not canonical(get(base_f)):
            return [f"GUEST_{table}_BASE must be canonical"]
        return []


_table_rules("GDTR")
_table_rules("IDTR")

"""VM-entry checks on the guest segment registers CS, SS, DS, ES, FS and GS (SDM 27.3.1.2;
TR, LDTR, GDTR and IDTR are in :mod:`.guest_tables`).  A failure is a VM-entry failure,
exit reason 33 | bit 31.

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
from ...arch.msrs import Cr0
from ...arch.segments import AR_RESERVED, AccessRights
from ...arch.vmcs_fields import VmcsField as F
from .registry import (NON_CANONICAL, RFLAGS_VM, SECONDARY_READS, Reader, both, canonical, clear_bits,
                       ia32e_guest, rule, set_bits, unrestricted_guest, virtual_8086, write)

if TYPE_CHECKING:
    from ..vmx import VmxCpu

guest = functools.partial(rule, "guest-state")

# Plain-int copies of the access-rights bits (vtlab.arch.segments): the rules re-run on VM entries.
UNUSABLE = int(AccessRights.UNUSABLE)   #: access-rights bit 16: the register holds a null selector ("unusable")
_S, _P, _L, _DB, _G = (int(b) for b in (AccessRights.S, AccessRights.P, AccessRights.L, AccessRights.DB,
                                         AccessRights.G))


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
        if ar is not None and ar & AR_RESERVED:
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
        _add_ss_privilege_rules(ar_reads, sel_f)

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

    @guest(f"guest_{s}_v8086_limit", "27.3.1.2", reads={F.GUEST_RFLAGS, limit_f}, mode="protected",
           breaks=set_bits(F.GUEST_RFLAGS, RFLAGS_VM),
           doc=f"If the guest will be in virtual-8086 mode, the {seg} limit field must be 0000FFFFH.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if virtual_8086(get) and get(limit_f) != 0xFFFF:
            return [f"GUEST_{seg}_LIMIT must be 0000FFFFH in virtual-8086 mode (is {get(limit_f):#x})"]
        return []

    _add_base_rule(seg, base_f, ar_f)
    if seg == "CS":
        @guest("guest_cs_db_with_l", "27.3.1.2", reads=ar_reads | {F.VM_ENTRY_CONTROLS}, mode="long",
               breaks=set_bits(ar_f, _DB))
        def _(get: Reader, cpu: "VmxCpu") -> list[str]:
            """The D/B bit (bit 14) of CS must be 0 if the guest will be in IA-32e mode and the
            L bit (bit 13) of CS is 1: L = 1 with D = 1 is reserved (SDM Vol. 3A 3.4.5)."""
            ar = checked(get)
            if ar is not None and ar & _L and ar & _DB and ia32e_guest(get):
                return prefix("CS.L is 1 in IA-32e mode, so CS D/B (bit 14) must be 0")
            return []
    elif seg != "SS":
        @guest(f"guest_{s}_dpl_not_below_rpl", "27.3.1.2", reads=ar_reads | SECONDARY_READS | {sel_f},
               mode="paged", breaks=both(clear_bits(F.SECONDARY_VM_EXEC_CONTROL, ProcBased2.UNRESTRICTED_GUEST),
                                         set_bits(sel_f, 3)),
               doc=f"The DPL of {seg} cannot be less than the RPL of its selector if (1) \"unrestricted "
                   "guest\" is 0, (2) the register is usable and (3) its type is 0-11 (a data segment "
                   "or a non-conforming code segment): the selector could not have been loaded.")
        def _(get: Reader, cpu: "VmxCpu") -> list[str]:
            ar = checked(get)
            if ar is not None and not unrestricted_guest(get) and ar & 0xF <= 11:
                dpl, rpl = (ar >> 5) & 3, get(sel_f) & 3
                if dpl < rpl:
                    return prefix(f"{seg} DPL ({dpl}) must not be less than its selector's RPL ({rpl})")
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


def _add_ss_privilege_rules(ar_reads: set, sel_f: F) -> None:
    """The SS selector and DPL rules of SDM 27.3.1.2.  Unlike the other SS checks they
    apply even if SS is unusable: SS.DPL is always the CPL."""
    ss_ar, cs_ar, cs_sel = F.GUEST_SS_AR_BYTES, F.GUEST_CS_AR_BYTES, F.GUEST_CS_SELECTOR

    @guest("guest_ss_rpl_equals_cs_rpl", "27.3.1.2", reads={F.GUEST_RFLAGS, sel_f, cs_sel} | SECONDARY_READS,
           mode="paged", breaks=both(clear_bits(F.SECONDARY_VM_EXEC_CONTROL, ProcBased2.UNRESTRICTED_GUEST),
                                     set_bits(cs_sel, 3)))
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        """If the guest will not be in virtual-8086 mode and "unrestricted guest" is 0, the
        RPL (bits 1:0) of the SS selector must equal the RPL of the CS selector."""
        if not virtual_8086(get) and not unrestricted_guest(get) and get(sel_f) & 3 != get(cs_sel) & 3:
            return [f"GUEST_SS: SS selector RPL ({get(sel_f) & 3}) must equal CS selector RPL ({get(cs_sel) & 3})"]
        return []

    @guest("guest_ss_dpl_equals_rpl", "27.3.1.2", reads=ar_reads | SECONDARY_READS | {sel_f},
           mode="paged", breaks=both(clear_bits(F.SECONDARY_VM_EXEC_CONTROL, ProcBased2.UNRESTRICTED_GUEST),
                                     set_bits(sel_f, 3)))
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        """If "unrestricted guest" is 0, the SS DPL must equal the RPL of the SS selector:
        SS always holds the current privilege level."""
        if not virtual_8086(get) and not unrestricted_guest(get):
            dpl = (get(ss_ar) >> 5) & 3
            if dpl != get(sel_f) & 3:
                return [f"GUEST_SS: SS DPL ({dpl}) must equal SS selector RPL ({get(sel_f) & 3})"]
        return []

    @guest("guest_ss_dpl_zero_in_real_mode", "27.3.1.2", reads={F.GUEST_RFLAGS, ss_ar, cs_ar, F.GUEST_CR0},
           breaks=set_bits(ss_ar, 3 << 5))
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        """The SS DPL must be 0 if the CS type is 3 (read/write accessed data, the CS of an
        unrestricted guest) or if bit 0 of the CR0 field (PE) is 0: real-mode code runs at
        CPL 0."""
        if virtual_8086(get):
            return []
        dpl = (get(ss_ar) >> 5) & 3
        if dpl and (get(cs_ar) & 0xF == 3 or not get(F.GUEST_CR0) & Cr0.PE):
            return [f"GUEST_SS: SS DPL must be 0 when CS type is 3 or CR0.PE is 0; it is {dpl}"]
        return []


def _add_base_rule(seg: str, base_f: F, ar_f: F) -> None:
    """The base-address rule of SDM 27.3.1.2 for 64-bit processors: FS and GS bases must be
    canonical; bits 63:32 of the CS base must be 0, and of the SS, DS and ES bases if usable."""
    s = seg.lower()
    if seg in ("FS", "GS"):
        @guest(f"guest_{s}_base_canonical", "27.3.1.2", reads={base_f}, breaks=write(base_f, NON_CANONICAL),
               doc=f"The {seg} base-address field must contain a canonical address (it is the "
                   "64-bit base IA-32e mode uses).")
        def _(get: Reader, cpu: "VmxCpu") -> list[str]:
            if not canonical(get(base_f)):
                return [f"GUEST_{seg}_BASE ({get(base_f):#x}) must be canonical"]
            return []
    elif seg == "CS":
        @guest("guest_cs_base_high_bits", "27.3.1.2", reads={base_f}, breaks=write(base_f, 1 << 32))
        def _(get: Reader, cpu: "VmxCpu") -> list[str]:
            """Bits 63:32 of the CS base-address field must be 0: CS bases are 32 bits, even
            in IA-32e mode (where they are ignored)."""
            if get(base_f) >> 32:
                return [f"GUEST_CS_BASE ({get(base_f):#x}) bits 63:32 must be 0"]
            return []
    else:
        @guest(f"guest_{s}_base_high_bits", "27.3.1.2", reads={base_f, ar_f}, breaks=write(base_f, 1 << 32),
               doc=f"If {seg} is usable, bits 63:32 of its base-address field must be 0: "
                   f"{seg} bases are 32 bits.")
        def _(get: Reader, cpu: "VmxCpu") -> list[str]:
            if not get(ar_f) & UNUSABLE and get(base_f) >> 32:
                return [f"GUEST_{seg}_BASE ({get(base_f):#x}) bits 63:32 must be 0 ({seg} is usable)"]
            return []


for _seg in ("CS", "SS", "DS", "ES", "FS", "GS"):
    _add_segment_rules(_seg)



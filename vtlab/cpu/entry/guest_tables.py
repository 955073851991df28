"""VM-entry checks on the guest's system-segment registers TR and LDTR (SDM 27.3.1.2) and
descriptor-table registers GDTR and IDTR (SDM 27.3.1.3).  A failure is a VM-entry failure,
exit reason 33 | bit 31, exit qualification 0.

TR always holds a busy TSS; LDTR may be unusable (a null LDT selector), and then none of
its checks apply.  Their access-rights fields have the layout of the segment registers'
(:mod:`.guest_segments`), with S = 0: system descriptors.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

from ...arch.segments import AR_RESERVED, AccessRights
from ...arch.vmcs_fields import VmcsField as F
from .guest_segments import UNUSABLE, _type_to
from .registry import NON_CANONICAL, Reader, both, canonical, clear_bits, ia32e_guest, rule, set_bits, write

if TYPE_CHECKING:
    from ..vmx import VmxCpu

guest = functools.partial(rule, "guest-state")

_S, _P, _G = int(AccessRights.S), int(AccessRights.P), int(AccessRights.G)   # plain ints: re-run on entries


def _system_segment_rules(seg: str, usable: Callable | None, recipes: dict) -> None:
    """The base, reserved-bit and granularity rules TR and LDTR share.  ``usable(get)`` is
    None for TR (always checked) or says whether LDTR is usable (only then is it checked)."""
    s = seg.lower()
    base_f, limit_f, ar_f = (F[f"GUEST_{seg}_{part}"] for part in ("BASE", "LIMIT", "AR_BYTES"))
    when, reads = ("If LDTR is usable, the", {ar_f}) if usable else ("The", set())

    def applies(get: Reader) -> bool:
        return usable is None or usable(get)

    @guest(f"guest_{s}_base_canonical", "27.3.1.2", reads=reads | {base_f}, breaks=recipes["base"],
           doc=f"{when} {seg} base-address field must contain a canonical address.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if applies(get) and not canonical(get(base_f)):
            return [f"GUEST_{seg}_BASE ({get(base_f):#x}) must be canonical"]
        return []

    @guest(f"guest_{s}_access_rights_reserved", "27.3.1.2", reads={ar_f}, breaks=recipes["reserved"],
           doc=f"{when} reserved bits 11:8 and 31:17 of the {seg} access-rights field must be 0.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if applies(get) and get(ar_f) & AR_RESERVED:
            return [f"GUEST_{seg} access rights {get(ar_f):#x}: reserved bits 11:8 and 31:17 must be 0"]
        return []

    @guest(f"guest_{s}_limit_granularity_low", "27.3.1.2", reads={ar_f, limit_f}, breaks=recipes["low"],
           mode=recipes.get("mode", "real"),
           doc=f"{when} G bit (bit 15) of {seg} must be 0 if any bit in the range 11:0 of its limit "
               "field is 0: a 4-KByte-granular limit always ends in FFFH.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if applies(get) and get(ar_f) & _G and get(limit_f) & 0xFFF != 0xFFF:
            return [f"GUEST_{seg}: G bit is 1 but limit bits 11:0 are not all 1 (limit {get(limit_f):#x})"]
        return []

    @guest(f"guest_{s}_limit_granularity_high", "27.3.1.2", reads={ar_f, limit_f}, breaks=recipes["high"],
           doc=f"{when} G bit (bit 15) of {seg} must be 1 if any bit in the range 31:20 of its "
               "limit field is 1: a byte-granular limit has only 20 bits.")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if applies(get) and get(limit_f) >> 20 and not get(ar_f) & _G:
            return [f"GUEST_{seg}: limit {get(limit_f):#x} exceeds 1 MByte but G bit is 0"]
        return []


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


_system_segment_rules("TR", None, {
    "base": write(F.GUEST_TR_BASE, NON_CANONICAL),
    "reserved": set_bits(_TR_AR, 1 << 8),
    "low": set_bits(_TR_AR, _G), "mode": "protected",         # TR limit 67H, G = 1
    "high": write(F.GUEST_TR_LIMIT, 0x10_0000),                 # 1 MByte + 1 bytes, G = 0
})


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


_LDTR_USABLE = 0x82   # a present LDT descriptor (type 2), DPL 0


@guest("guest_ldtr_selector_ti", "27.3.1.2", reads={_LDTR_AR, F.GUEST_LDTR_SELECTOR},
       breaks=both(write(_LDTR_AR, _LDTR_USABLE), write(F.GUEST_LDTR_SELECTOR, 1 << 2)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If LDTR is usable, the TI flag (bit 2) of its selector must be 0: an LDT descriptor
    lives in the GDT."""
    if _usable_ldtr(get) is not None and get(F.GUEST_LDTR_SELECTOR) & 4:
        return ["GUEST_LDTR is usable, so the TI flag (bit 2) of its selector must be 0"]
    return []


_system_segment_rules("LDTR", lambda get: _usable_ldtr(get) is not None, {
    "base": both(write(_LDTR_AR, _LDTR_USABLE), write(F.GUEST_LDTR_BASE, NON_CANONICAL)),
    "reserved": write(_LDTR_AR, _LDTR_USABLE | 1 << 8),
    "low": write(_LDTR_AR, _LDTR_USABLE | _G),                  # limit 0, G = 1
    "high": both(write(_LDTR_AR, _LDTR_USABLE), write(F.GUEST_LDTR_LIMIT, 0x10_0000)),
})


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

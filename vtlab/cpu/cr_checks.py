"""When MOV to a control register raises #GP(0) (SDM Vol. 2B, "MOV - Move to/from Control
Registers"; Vol. 3A 2.5, 4.1.1, 4.4.1, 4.10.1, 10.8.5).

QEMU, the CPU model inside Unicorn, performs a MOV to CR0/CR3/CR4/CR8 without any of
the architectural checks: it lets a real-mode guest set CR0.PG with CR0.PE clear, set
reserved CR4 bits, clear CR0.PG in 64-bit mode or load a CR3 with bits beyond
MAXPHYADDR.  A real processor refuses every one of those writes with #GP(0), leaving
the register unchanged.  vtlab checks the value before the write happens:

* in VMX non-root operation from the MOV-CR exit rule
  (:func:`vtlab.cpu.exit_rules.rule_mov_cr`), for writes that do *not* cause a VM exit -
  an exit has priority over these faults (SDM Vol. 3C 26.1.1: only #UD, privilege-level
  faults and the TSS I/O-bitmap #GP come first; a VMM emulating the write does the
  checks itself, as KVM's ``kvm_set_cr0()`` does);
* in bare runs of a :class:`vtlab.cpu.guest.Guest` from a code hook on each MOV to CR.

:func:`mov_to_cr_fault` says *why* a write faults (or None); the message names the rule,
so a learner sees "CR0.PG = 1 with CR0.PE = 0" rather than a mysterious #GP.

The privilege check (CPL > 0 -> #GP) and the #UD of CR1, CR5-CR7 and of CR8 outside
64-bit mode are left to QEMU, which does implement those.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.controls import ProcBased2
from ..arch.cpuid import HOST_CPUID
from ..arch.exceptions import Vector
from ..arch.msrs import Cr0, Cr4, Efer

if TYPE_CHECKING:
    from .guest import Guest
    from .nonroot import ExitMonitor

_PE, _NW, _CD, _PG, _WP = int(Cr0.PE), int(Cr0.NW), int(Cr0.CD), int(Cr0.PG), int(Cr0.WP)
_PSE, _PAE, _PGE, _LA57 = int(Cr4.PSE), int(Cr4.PAE), int(Cr4.PGE), int(Cr4.LA57)
_PCIDE, _SMEP, _CET = int(Cr4.PCIDE), int(Cr4.SMEP), int(Cr4.CET)
_LME, _LMA = int(Efer.LME), int(Efer.LMA)
_UNRESTRICTED_GUEST = int(ProcBased2.UNRESTRICTED_GUEST)


def _bit(leaf: int, register: int, bit: int) -> bool:
    """A CPUID feature flag of the processor vtlab models (register 0-3 = EAX..EDX)."""
    return bool(HOST_CPUID.get(leaf, (0, 0, 0, 0))[register] >> bit & 1)


#: MAXPHYADDR, CPUID.80000008H:EAX[7:0] (SDM Vol. 3A 4.1.4): physical-address bits.
MAXPHYADDR = HOST_CPUID.get(0x8000_0008, (36, 0, 0, 0))[0] & 0xFF or 36

#: The CR4 bits this processor supports, each with the CPUID flag that enumerates it
#: (SDM Vol. 3A 2.5, Figure 2-7, and Vol. 2A CPUID).  Every other bit is
#: reserved: setting it raises #GP(0) (SDM Vol. 3A 2.5: "Attempting to set any
#: reserved bits in CR4 to 1 causes a #GP").  PCE needs no CPUID flag.
_EAX, _EBX, _ECX, _EDX = range(4)
CR4_SUPPORTED = int(Cr4.PCE) | sum(int(flag) for flag, (leaf, reg, bit) in {
    Cr4.VME: (1, _EDX, 1), Cr4.PVI: (1, _EDX, 1), Cr4.DE: (1, _EDX, 2), Cr4.PSE: (1, _EDX, 3),
    Cr4.TSD: (1, _EDX, 4), Cr4.PAE: (1, _EDX, 6), Cr4.MCE: (1, _EDX, 7), Cr4.PGE: (1, _EDX, 13),
    Cr4.OSFXSR: (1, _EDX, 24), Cr4.OSXMMEXCPT: (1, _EDX, 25), Cr4.VMXE: (1, _ECX, 5),
    Cr4.SMXE: (1, _ECX, 6), Cr4.PCIDE: (1, _ECX, 17), Cr4.OSXSAVE: (1, _ECX, 26),
    Cr4.FSGSBASE: (7, _EBX, 0), Cr4.SMEP: (7, _EBX, 7), Cr4.SMAP: (7, _EBX, 20),
    Cr4.UMIP: (7, _ECX, 2), Cr4.PKE: (7, _ECX, 3), Cr4.CET: (7, _ECX, 7), Cr4.LA57: (7, _ECX, 16),
    Cr4.KL: (7, _ECX, 23), Cr4.PKS: (7, _ECX, 31), Cr4.UINTR: (7, _EDX, 5),
}.items() if _bit(leaf, reg, bit))

#: Reserved bits of a present PAE PDPTE: 2:1, 8:5 and 63:MAXPHYADDR (SDM Vol. 3A 4.4.1,
#: Table 4-8).  A MOV that loads the PDPTEs with one of them set raises #GP(0).
PDPTE_RESERVED = 0b110 | 0b1_1110_0000 | (((1 << 64) - 1) >> MAXPHYADDR << MAXPHYADDR)


def _hex(value: int) -> str:
    return f"{value:#x}"


def _pdpte_fault(guest: "Guest", cr3: int) -> str | None:
    """PAE paging loads the four PDPTEs from CR3[31:5] (SDM Vol. 3A 4.4.1); a present one
    with a reserved bit set makes the MOV that loads them raise #GP(0)."""
    base = cr3 & 0xFFFF_FFE0
    try:
        raw = guest.read(base, 32)
    except Exception:  # beyond guest memory: the bus reads all ones
        raw = b"\xff" * 32
    for i in range(4):
        entry = int.from_bytes(raw[8 * i:8 * i + 8], "little")
        if entry & 1 and entry & PDPTE_RESERVED:
            return (f"PDPTE {i} at {base + 8 * i:#x} ({entry:#x}) has reserved bits "
                    f"{entry & PDPTE_RESERVED:#x} set, and PAE paging loads the PDPTEs "
                    "(SDM Vol. 3A 4.4.1)")
    return None


def _pae_paging_after(cr0: int, cr4: int, efer: int) -> bool:
    """PAE paging (not 4-level) is in use with these values (SDM Vol. 3A 4.1.1)."""
    return bool(cr0 & _PG and cr4 & _PAE and not efer & _LME)


def mov_to_cr_fault(guest: "Guest", cr: int, value: int,
                    vmx_fixed: tuple[int, int] | None = None) -> str | None:
    """Why ``MOV CRn, value`` raises #GP(0) in the guest's current state, or None if it may
    proceed.

    ``value`` is what the register would become; ``vmx_fixed`` the (FIXED0, FIXED1) pair
    of the VMX capability MSRs for that register when the CPU is in VMX operation (SDM
    Vol. 3C 24.8: bits fixed to 1 must stay 1, bits fixed to 0 must stay 0 - a MOV that
    breaks them raises #GP, SDM 26.3).

    >>> from vtlab.cpu.guest import Guest
    >>> mov_to_cr_fault(Guest("real"), 0, 0x8000_0010)
    '#GP(0): CR0.PG = 1 with CR0.PE = 0 (SDM Vol. 2B MOV CR: invalid bit combination)'
    >>> mov_to_cr_fault(Guest("real"), 0, 0x11) is None
    True
    """
    cr0, cr3, cr4, efer = (guest.reg(name) for name in ("cr0", "cr3", "cr4", "efer"))
    lma = bool(efer & _LMA)
    if cr == 0:
        if value >> 32:
            return (f"#GP(0): bits 63:32 of CR0 are reserved and must be 0 (value {_hex(value)}; "
                    "SDM Vol. 3A 2.5)")
        if value & _PG and not value & _PE:
            return "#GP(0): CR0.PG = 1 with CR0.PE = 0 (SDM Vol. 2B MOV CR: invalid bit combination)"
        if value & _NW and not value & _CD:
            return "#GP(0): CR0.NW = 1 with CR0.CD = 0 (SDM Vol. 2B MOV CR: invalid bit combination)"
        if lma and not value & _PG and guest.bits == 64:
            return ("#GP(0): clearing CR0.PG in 64-bit mode (IA-32e mode is left from "
                    "compatibility mode only; SDM Vol. 3A 10.8.5.4)")
        if value & _PG and not cr0 & _PG and efer & _LME and not cr4 & _PAE:
            return ("#GP(0): setting CR0.PG with IA32_EFER.LME = 1 needs CR4.PAE = 1 "
                    "(SDM Vol. 3A 10.8.5)")
        if not value & _WP and cr4 & _CET:
            return "#GP(0): clearing CR0.WP while CR4.CET = 1 (SDM Vol. 2B MOV CR)"
        fault = _fixed_fault("CR0", value, vmx_fixed)
        if fault is None and _pae_paging_after(value, cr4, efer) and (value ^ cr0) & (_PG | _CD | _NW):
            fault = _pdpte_fault(guest, cr3)
            fault = fault and "#GP(0): " + fault
        return fault
    if cr == 4:
        reserved = value & ~CR4_SUPPORTED
        if reserved:
            return (f"#GP(0): reserved CR4 bits {_hex(reserved)} set (bits this processor's "
                    "CPUID does not enumerate; SDM Vol. 3A 2.5)")
        if value & _PCIDE and not cr4 & _PCIDE:
            if not lma:
                return "#GP(0): CR4.PCIDE can be set only in IA-32e mode (SDM Vol. 3A 4.10.1)"
            if cr3 & 0xFFF:
                return (f"#GP(0): setting CR4.PCIDE while CR3[11:0] = {cr3 & 0xFFF:#x} is not 0 "
                        "(SDM Vol. 3A 4.10.1)")
        if lma and not value & _PAE:
            return "#GP(0): clearing CR4.PAE in IA-32e mode (SDM Vol. 2B MOV CR)"
        if lma and (value ^ cr4) & _LA57:
            return "#GP(0): changing CR4.LA57 in IA-32e mode (SDM Vol. 2B MOV CR)"
        if value & _CET and not cr0 & _WP:
            return "#GP(0): setting CR4.CET while CR0.WP = 0 (SDM Vol. 2B MOV CR)"
        fault = _fixed_fault("CR4", value, vmx_fixed)
        if (fault is None and _pae_paging_after(cr0, value, efer)
                and (value ^ cr4) & (_PAE | _PGE | _PSE | _SMEP)):
            fault = _pdpte_fault(guest, cr3)
            fault = fault and "#GP(0): " + fault
        return fault
    if cr == 3:
        if lma:
            # Bit 63 is the "no flush" hint when CR4.PCIDE = 1 (it is not stored); every
            # other bit at or above MAXPHYADDR is reserved (SDM Vol. 3A 4.5, Table 4-12).
            reserved = value >> MAXPHYADDR << MAXPHYADDR
            if cr4 & _PCIDE:
                reserved &= ~(1 << 63)
            if reserved:
                return (f"#GP(0): CR3 {_hex(value)} sets bits {_hex(reserved)} at or above "
                        f"MAXPHYADDR ({MAXPHYADDR}) (SDM Vol. 2B MOV CR, Vol. 3A 4.5)")
            return None
        if _pae_paging_after(cr0, cr4, efer):
            fault = _pdpte_fault(guest, value)
            return fault and "#GP(0): " + fault
        return None
    if cr == 8:
        if value >> 4:
            return f"#GP(0): bits 63:4 of CR8 are reserved (value {_hex(value)}; SDM Vol. 2B MOV CR)"
    return None


def _fixed_fault(name: str, value: int, fixed: tuple[int, int] | None) -> str | None:
    """The VMX fixed-bit rule (SDM Vol. 3C 24.8, 26.3) for a MOV in VMX operation."""
    if fixed is None:
        return None
    fixed0, fixed1 = fixed
    low = fixed0 & ~value & 0xFFFF_FFFF_FFFF_FFFF
    if low:
        return (f"#GP(0): {name} bits {low:#x} must be 1 in VMX operation "
                f"(IA32_VMX_{name}_FIXED0; SDM Vol. 3C 24.8)")
    high = value & ~fixed1 & 0xFFFF_FFFF
    if high:
        return (f"#GP(0): {name} bits {high:#x} must be 0 in VMX operation "
                f"(IA32_VMX_{name}_FIXED1; SDM Vol. 3C 24.8)")
    return None


def check_mov_to_cr(m: "ExitMonitor", cr: int, value: int) -> str | None:
    """For :func:`vtlab.cpu.exit_rules.rule_mov_cr`: a MOV to CRn that did not exit.

    Returns None when the write may proceed, or raises #GP(0) in the guest the way the
    exit rules raise faults (:meth:`ExitMonitor.raise_exception`) and returns the rule
    outcome "emulated-fault".  ``value`` is what the register would become (the bits the
    guest/host mask gives the VMM keep their values, SDM 25.6.6).
    """
    fixed = None
    if cr in (0, 4):
        caps = m.cpu.caps
        if cr == 0:
            fixed0 = caps.cr0_fixed0
            if m.proc2 & _UNRESTRICTED_GUEST:  # PE and PG may be 0 (SDM Vol. 3C 24.8)
                fixed0 &= ~(_PE | _PG)
            fixed = (int(fixed0), int(caps.cr0_fixed1))
        else:
            fixed = (int(caps.cr4_fixed0), int(caps.cr4_fixed1))
    reason = mov_to_cr_fault(m.guest, cr, value, fixed)
    if reason is None:
        return None
    m.fault_note = f"MOV to CR{cr}: {reason.removeprefix('#GP(0): ')}"
    return m.raise_exception(Vector.GP, reason)

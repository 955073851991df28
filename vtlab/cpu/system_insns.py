"""Instructions whose architectural checks Unicorn leaves out, made by vtlab.

**SYSENTER and SYSEXIT.**  Unicorn 2.1 reports these to its instruction hooks and then
does nothing at all: no #GP, no change of CS, SS, RIP or RSP.  A real processor (SDM
Vol. 2B, SYSENTER and SYSEXIT, "Operation"):

* SYSENTER raises #GP(0) if CR0.PE = 0 or IA32_SYSENTER_CS[15:2] = 0 - so with the MSR
  at its reset value 0 every SYSENTER faults, in ring 3 as in ring 0;
* otherwise it clears RFLAGS.VM, IF and RF, loads CS with IA32_SYSENTER_CS AND FFFCH and
  SS with that plus 8 (CPL 0), and continues at IA32_SYSENTER_EIP with IA32_SYSENTER_ESP
  (all 64 bits of both in IA-32e mode, the low 32 otherwise);
* SYSEXIT raises #GP(0) if IA32_SYSENTER_CS[15:2] = 0, CR0.PE = 0 or CPL > 0;
  otherwise it returns to CPL 3: CS = IA32_SYSENTER_CS + 16 (+ 32 with REX.W, to 64-bit
  code), SS = CS + 8, both with RPL 3, RIP = RDX and RSP = RCX.

The SDM loads fixed flat descriptors without reading the GDT; Unicorn offers no way to
set a segment's hidden part, so vtlab loads the selectors from the GDT (README, "Where
vtlab's processor differs"): an OS that follows the SDM's layout rule (code, data at +8)
sees the same result.

**CR4.UMIP.**  With CR4.UMIP = 1, SGDT, SIDT, SLDT, SMSW and STR raise #GP(0) at CPL > 0
(SDM Vol. 3A 2.5, CR4.UMIP; Vol. 2, the five instructions' "Protected Mode Exceptions").
This is how a modern kernel (Linux enables UMIP where the CPU has it) closes the Red
Pill's door.  The #GP is a fault based on privilege level, so it comes before a
descriptor-table VM exit (SDM Vol. 3C 26.1.1).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch import Cr0, Cr4, Efer, Msr, Rflags
from .decoder import InsnKind

if TYPE_CHECKING:  # pragma: no cover
    from .guest import Guest

#: The instructions CR4.UMIP restricts to CPL 0.
UMIP_KINDS: frozenset[InsnKind] = frozenset(
    {InsnKind.SGDT, InsnKind.SIDT, InsnKind.SLDT, InsnKind.SMSW, InsnKind.STR})
#: SYSENTER and SYSEXIT.
FAST_SYSTEM_CALL_KINDS: frozenset[InsnKind] = frozenset({InsnKind.SYSENTER, InsnKind.SYSEXIT})

#: IA32_SYSENTER_CS[15:2]: the part of the MSR that must not be 0.
_SYSENTER_CS_SELECTOR_INDEX = 0xFFFC
_RPL3 = 3
_REX_W = 0x48


def umip_fault(g: "Guest") -> str | None:
    """Why an SGDT/SIDT/SLDT/SMSW/STR here raises #GP(0) under CR4.UMIP, or None."""
    if g.reg("cr0") & Cr0.PE and g.reg("cr4") & Cr4.UMIP and g.cpl > 0:
        return f"CR4.UMIP = 1 and CPL = {g.cpl}: #GP(0)"
    return None


def sysenter_fault(g: "Guest") -> str | None:
    """Why a SYSENTER here raises #GP(0), or None."""
    if not g.reg("cr0") & Cr0.PE:
        return "CR0.PE = 0: #GP(0)"
    if not g.uc.msr_read(Msr.IA32_SYSENTER_CS) & _SYSENTER_CS_SELECTOR_INDEX:
        return "IA32_SYSENTER_CS[15:2] = 0 (the OS has not set up SYSENTER): #GP(0)"
    return None


def sysexit_fault(g: "Guest") -> str | None:
    """Why a SYSEXIT here raises #GP(0), or None."""
    if not g.reg("cr0") & Cr0.PE:
        return "CR0.PE = 0: #GP(0)"
    if not g.uc.msr_read(Msr.IA32_SYSENTER_CS) & _SYSENTER_CS_SELECTOR_INDEX:
        return "IA32_SYSENTER_CS[15:2] = 0: #GP(0)"
    if g.cpl > 0:
        return f"CPL = {g.cpl}, SYSEXIT needs CPL 0: #GP(0)"
    return None


def sysenter(g: "Guest") -> None:
    """Perform SYSENTER (the checks of :func:`sysenter_fault` have passed)."""
    ia32e = bool(g.reg("efer") & Efer.LMA)
    cs = g.uc.msr_read(Msr.IA32_SYSENTER_CS) & _SYSENTER_CS_SELECTOR_INDEX
    mask = 0xFFFF_FFFF_FFFF_FFFF if ia32e else 0xFFFF_FFFF
    esp = g.uc.msr_read(Msr.IA32_SYSENTER_ESP) & mask
    eip = g.uc.msr_read(Msr.IA32_SYSENTER_EIP) & mask
    g.set_reg("rflags", g.reg("rflags") & ~(Rflags.VM | Rflags.IF | Rflags.RF))
    g.load_segment("cs", cs)
    g.load_segment("ss", cs + 8)
    g.set_reg("rsp", esp)
    g.rip = eip


def sysexit(g: "Guest", raw: bytes) -> None:
    """Perform SYSEXIT (the checks of :func:`sysexit_fault` have passed); ``raw`` are
    its bytes (a REX.W prefix returns to 64-bit code)."""
    to_64 = bool(raw) and raw[0] & 0xF8 == _REX_W and g.bits == 64
    base = g.uc.msr_read(Msr.IA32_SYSENTER_CS) & 0xFFFF
    cs = (base + (32 if to_64 else 16)) | _RPL3
    mask = 0xFFFF_FFFF_FFFF_FFFF if to_64 else 0xFFFF_FFFF
    rip, rsp = g.reg("rdx") & mask, g.reg("rcx") & mask
    g.load_segment("cs", cs)
    g.load_segment("ss", (cs + 8) | _RPL3)
    g.set_reg("rsp", rsp)
    g.rip = rip

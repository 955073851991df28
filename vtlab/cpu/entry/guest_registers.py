"""VM-entry checks on guest registers: control registers, debug registers and MSRs
(SDM 27.3.1.1), RFLAGS and RIP (SDM 27.3.1.4).

A failure of any guest-state check is a *VM-entry failure*: the processor has already
committed to the entry, so it reports it like a VM exit - exit reason 33 (invalid guest
state) with bit 31 set, exit qualification 0 - loads the host state, and the guest
never runs (SDM 27.8).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ...arch.controls import EntryControl
from ...arch.msrs import Cr0, Cr4, Efer, Rflags
from ...arch.segments import AccessRights
from ...arch.vmcs_fields import VmcsField as F
from .registry import (EFER_RESERVED, IA32E_MODE, NON_CANONICAL, RFLAGS_VM, SECONDARY_READS, Reader, both,
                       canonical, clear_bits, ia32e_guest, pat_invalid_bytes, rule, set_bits,
                       unrestricted_guest, write)

if TYPE_CHECKING:
    from ..vmx import VmxCpu

guest = functools.partial(rule, "guest-state")


# ------------------------------------ control registers, DR7, MSRs (27.3.1.1)
@guest("guest_cr0_fixed_bits", "27.3.1.1", reads=SECONDARY_READS | {F.GUEST_CR0}, processor=True,
       breaks=clear_bits(F.GUEST_CR0, Cr0.NE))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The CR0 field must not set any bit to a value not supported in VMX operation
    (IA32_VMX_CR0_FIXED0/FIXED1).  Exception: if "unrestricted guest" is 1, PE and PG may
    be 0 - a real-mode or unpaged guest."""
    unrestricted = unrestricted_guest(get)
    tail = "" if unrestricted else " (only an unrestricted guest may run with PE or PG clear)"
    return [f"GUEST_{msg}{tail}" for msg in cpu.caps.cr_fixed_violations("cr0", get(F.GUEST_CR0), unrestricted)]


@guest("guest_cr0_pg_requires_pe", "27.3.1.1", reads={F.GUEST_CR0},
       breaks=set_bits(F.GUEST_CR0, Cr0.PG))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If bit 31 in the CR0 field (PG) is 1, bit 0 (PE) must be 1: paging needs
    protected mode (this matters for unrestricted guests, which may clear PE)."""
    cr0 = get(F.GUEST_CR0)
    if cr0 & Cr0.PG and not cr0 & Cr0.PE:
        return ["GUEST_CR0.PG is 1, so GUEST_CR0.PE must be 1 (paging needs protected mode)"]
    return []


@guest("guest_cr4_fixed_bits", "27.3.1.1", reads={F.GUEST_CR4}, processor=True,
       breaks=clear_bits(F.GUEST_CR4, Cr4.VMXE))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The CR4 field must not set any bit to a value not supported in VMX operation
    (IA32_VMX_CR4_FIXED0/FIXED1)."""
    return [f"GUEST_{msg}" for msg in cpu.caps.cr_fixed_violations("cr4", get(F.GUEST_CR4))]


@guest("guest_ia32e_requires_paging", "27.3.1.1",
       reads={F.VM_ENTRY_CONTROLS, F.GUEST_CR0, F.GUEST_CR4}, mode="long",
       breaks=clear_bits(F.GUEST_CR4, Cr4.PAE))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "IA-32e mode guest" VM-entry control is 1, bit 31 of the CR0 field (PG) and
    bit 5 of the CR4 field (PAE) must be 1: IA-32e mode runs with PAE paging."""
    if ia32e_guest(get) and not (get(F.GUEST_CR0) & Cr0.PG and get(F.GUEST_CR4) & Cr4.PAE):
        return ["\"IA-32e mode guest\" is 1, so GUEST_CR0.PG and GUEST_CR4.PAE must be 1"]
    return []


@guest("guest_cr4_pcide_requires_ia32e", "27.3.1.1", reads={F.VM_ENTRY_CONTROLS, F.GUEST_CR4},
       breaks=set_bits(F.GUEST_CR4, Cr4.PCIDE))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "IA-32e mode guest" VM-entry control is 0, bit 17 of the CR4 field (PCIDE)
    must be 0: process-context identifiers exist only in IA-32e mode."""
    if not ia32e_guest(get) and get(F.GUEST_CR4) & Cr4.PCIDE:
        return ["\"IA-32e mode guest\" is 0, so GUEST_CR4.PCIDE must be 0"]
    return []


@guest("guest_cr3_width", "27.3.1.1", reads={F.GUEST_CR3}, processor=True,
       breaks=write(F.GUEST_CR3, 1 << 40))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The CR3 field must not set any bit beyond the processor's physical-address width."""
    if get(F.GUEST_CR3) >> cpu.memory.width:
        return ["GUEST_CR3 sets bits beyond the physical-address width"]
    return []


@guest("guest_dr7_high_bits", "27.3.1.1", reads={F.VM_ENTRY_CONTROLS, F.GUEST_DR7},
       breaks=both(set_bits(F.VM_ENTRY_CONTROLS, EntryControl.LOAD_DEBUG_CONTROLS),
                   set_bits(F.GUEST_DR7, 1 << 32)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "load debug controls" VM-entry control is 1, bits 63:32 of the DR7 field
    must be 0 (VM entry loads DR7 from it)."""
    if get(F.VM_ENTRY_CONTROLS) & EntryControl.LOAD_DEBUG_CONTROLS and get(F.GUEST_DR7) >> 32:
        return ["GUEST_DR7 bits 63:32 must be 0"]
    return []


#: IA32_DEBUGCTL bits that are reserved (SDM Vol. 4, Table 2-2): 5:2 and 63:16.  Defined:
#: LBR (0), BTF (1), TR (6), BTS (7), BTINT (8), BTS_OFF_OS (9), BTS_OFF_USR (10),
#: FREEZE_LBRS_ON_PMI (11), FREEZE_PERFMON_ON_PMI (12), ENABLE_UNCORE_PMI (13),
#: FREEZE_WHILE_SMM (14), RTM_DEBUG (15).
DEBUGCTL_RESERVED = 0x3C | (~0xFFFF & 0xFFFF_FFFF_FFFF_FFFF)


@guest("guest_debugctl_reserved", "27.3.1.1", reads={F.VM_ENTRY_CONTROLS, F.GUEST_IA32_DEBUGCTL},
       breaks=both(set_bits(F.VM_ENTRY_CONTROLS, EntryControl.LOAD_DEBUG_CONTROLS),
                   set_bits(F.GUEST_IA32_DEBUGCTL, 1 << 2)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "load debug controls" VM-entry control is 1, the bits reserved in the
    IA32_DEBUGCTL MSR (5:2 and 63:16) must be 0 in its field."""
    if get(F.VM_ENTRY_CONTROLS) & EntryControl.LOAD_DEBUG_CONTROLS and get(F.GUEST_IA32_DEBUGCTL) & DEBUGCTL_RESERVED:
        return [f"GUEST_IA32_DEBUGCTL {get(F.GUEST_IA32_DEBUGCTL):#x}: reserved bits (5:2, 63:16) must be 0"]
    return []


def _sysenter_rule(field: F, id: str) -> None:
    @guest(id, "27.3.1.1", reads={field}, breaks=write(field, NON_CANONICAL),
           doc=f"""The {field.name} field must contain a canonical address (VM entry loads
           the MSR from it; WRMSR would #GP on a non-canonical one).""")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if not canonical(get(field)):
            return [f"{field.name} must be canonical"]
        return []


_sysenter_rule(F.GUEST_SYSENTER_ESP, "guest_sysenter_esp_canonical")
_sysenter_rule(F.GUEST_SYSENTER_EIP, "guest_sysenter_eip_canonical")


@guest("guest_ia32_pat_valid", "27.3.1.1", reads={F.VM_ENTRY_CONTROLS, F.GUEST_IA32_PAT},
       breaks=both(set_bits(F.VM_ENTRY_CONTROLS, EntryControl.LOAD_IA32_PAT), write(F.GUEST_IA32_PAT, 3)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "load IA32_PAT" VM-entry control is 1, the IA32_PAT field must hold a value
    WRMSR would accept at CPL 0: each of its 8 bytes 0 (UC), 1 (WC), 4 (WT), 5 (WP),
    6 (WB) or 7 (UC-)."""
    if get(F.VM_ENTRY_CONTROLS) & EntryControl.LOAD_IA32_PAT:
        bad = pat_invalid_bytes(get(F.GUEST_IA32_PAT))
        if bad:
            return [f"GUEST_IA32_PAT {get(F.GUEST_IA32_PAT):#018x}: byte(s) {bad} are not a memory type "
                    "(0, 1, 4, 5, 6 or 7)"]
    return []


@guest("guest_efer_reserved", "27.3.1.1", reads={F.VM_ENTRY_CONTROLS, F.GUEST_IA32_EFER},
       breaks=set_bits(F.GUEST_IA32_EFER, 1 << 1))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "load IA32_EFER" VM-entry control is 1, the bits reserved in IA32_EFER must be
    0 in its field (all but SCE, bit 0; LME, bit 8; LMA, bit 10; NXE, bit 11)."""
    if get(F.VM_ENTRY_CONTROLS) & EntryControl.LOAD_IA32_EFER and get(F.GUEST_IA32_EFER) & EFER_RESERVED:
        return [f"GUEST_IA32_EFER {get(F.GUEST_IA32_EFER):#x}: reserved bits must be 0 "
                "(only SCE, LME, LMA and NXE exist)"]
    return []


@guest("guest_efer_lma_matches_ia32e", "27.3.1.1", reads={F.VM_ENTRY_CONTROLS, F.GUEST_IA32_EFER},
       breaks=set_bits(F.GUEST_IA32_EFER, Efer.LMA))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "load IA32_EFER" VM-entry control is 1, bit 10 of the IA32_EFER field (LMA)
    must equal the "IA-32e mode guest" VM-entry control."""
    if get(F.VM_ENTRY_CONTROLS) & EntryControl.LOAD_IA32_EFER:
        if bool(get(F.GUEST_IA32_EFER) & Efer.LMA) != ia32e_guest(get):
            return ["GUEST_IA32_EFER.LMA must equal the \"IA-32e mode guest\" VM-entry control"]
    return []


@guest("guest_efer_lma_equals_lme", "27.3.1.1",
       reads={F.VM_ENTRY_CONTROLS, F.GUEST_IA32_EFER, F.GUEST_CR0}, mode="long",
       breaks=clear_bits(F.GUEST_IA32_EFER, Efer.LME))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "load IA32_EFER" VM-entry control is 1 and CR0.PG is 1 in the CR0 field,
    IA32_EFER.LMA must equal IA32_EFER.LME (long mode is active exactly when enabled)."""
    if get(F.VM_ENTRY_CONTROLS) & EntryControl.LOAD_IA32_EFER and get(F.GUEST_CR0) & Cr0.PG:
        efer = get(F.GUEST_IA32_EFER)
        if bool(efer & Efer.LMA) != bool(efer & Efer.LME):
            return ["GUEST_CR0.PG is 1, so GUEST_IA32_EFER.LMA must equal LME"]
    return []


# ---------------------------------------------------------- RFLAGS (27.3.1.4)
_RFLAGS_FIXED, _RFLAGS_IF = int(Rflags.FIXED), int(Rflags.IF)   # plain ints: re-run on VM entries


@guest("guest_rflags_reserved", "27.3.1.4", reads={F.GUEST_RFLAGS},
       breaks=set_bits(F.GUEST_RFLAGS, 1 << 3))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """RFLAGS reserved bits 63:22, 15, 5 and 3 must be 0 in the RFLAGS field."""
    rflags = get(F.GUEST_RFLAGS)
    if rflags >> 22 or rflags & ((1 << 15) | (1 << 5) | (1 << 3)):
        return [f"GUEST_RFLAGS reserved bits (63:22, 15, 5, 3) must be 0 (RFLAGS = {rflags:#x})"]
    return []


@guest("guest_rflags_bit1", "27.3.1.4", reads={F.GUEST_RFLAGS}, breaks=clear_bits(F.GUEST_RFLAGS, _RFLAGS_FIXED))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """RFLAGS bit 1 (reserved, always 1 on the processor) must be 1 in the RFLAGS field."""
    rflags = get(F.GUEST_RFLAGS)
    if not rflags & _RFLAGS_FIXED:
        return [f"GUEST_RFLAGS bit 1 must be 1 (RFLAGS = {rflags:#x}); it is reserved and always set"]
    return []


@guest("guest_rflags_vm", "27.3.1.4", reads={F.GUEST_RFLAGS, F.VM_ENTRY_CONTROLS, F.GUEST_CR0},
       breaks=set_bits(F.GUEST_RFLAGS, RFLAGS_VM))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The VM flag (bit 17) must be 0 if the "IA-32e mode guest" VM-entry control is 1 or
    bit 0 in the CR0 field (PE) is 0: virtual-8086 mode is a sub-mode of protected mode."""
    if get(F.GUEST_RFLAGS) & RFLAGS_VM and (ia32e_guest(get) or not get(F.GUEST_CR0) & Cr0.PE):
        return ["GUEST_RFLAGS.VM must be 0 in IA-32e mode or when CR0.PE is 0"]
    return []


@guest("guest_rflags_if_for_external_interrupt", "27.3.1.4",
       reads={F.VM_ENTRY_INTR_INFO_FIELD, F.GUEST_RFLAGS},
       breaks=write(F.VM_ENTRY_INTR_INFO_FIELD, (1 << 31) | 0x20))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The IF flag (bit 9) must be 1 if the valid bit of the VM-entry interruption-
    information field is 1 and the interruption type is external interrupt (0): the guest
    could not take that interrupt."""
    info = get(F.VM_ENTRY_INTR_INFO_FIELD)
    if info >> 31 & 1 and (info >> 8) & 7 == 0 and not get(F.GUEST_RFLAGS) & _RFLAGS_IF:
        return ["injecting an external interrupt requires GUEST_RFLAGS.IF = 1"]
    return []


# --------------------------------------------------------------- RIP (27.3.1.4)
# The VMM advances GUEST_RIP past the exiting instruction after nearly every VM exit, so
# these rules test RIP first and, below 4 GBytes, hold and read nothing else (the promise
# of every RIP rule, see .registry): VM entry then skips them, and VM_ENTRY_CONTROLS and
# CS, lazily saved guest state, need no save.
_GUEST_RIP, _ENTRY_CONTROLS, _CS_AR = int(F.GUEST_RIP), int(F.VM_ENTRY_CONTROLS), int(F.GUEST_CS_AR_BYTES)
_CS_L = int(AccessRights.L)   # access rights bit 13: CS.L, 64-bit code segment


@guest("guest_rip_high_bits", "27.3.1.4", reads={F.GUEST_RIP, F.VM_ENTRY_CONTROLS, F.GUEST_CS_AR_BYTES},
       breaks=write(F.GUEST_RIP, 1 << 32))
def _(get: Reader, cpu: "VmxCpu") -> tuple[str, ...]:
    """Bits 63:32 of the RIP field must be 0 if the "IA-32e mode guest" VM-entry control
    is 0 or the L bit (bit 13) in the CS access-rights field is 0: only 64-bit code has
    64-bit instruction pointers."""
    if get(_GUEST_RIP) >> 32 and not (get(_ENTRY_CONTROLS) & IA32E_MODE and get(_CS_AR) & _CS_L):
        return ("GUEST_RIP bits 63:32 must be 0 unless the guest runs 64-bit code (IA-32e mode, CS.L = 1)",)
    return ()



_CANONICAL_TOP = (1 << 17) - 1   # bits 63:47 all 1


@guest("guest_rip_canonical", "27.3.1.4", reads={F.GUEST_RIP, F.VM_ENTRY_CONTROLS, F.GUEST_CS_AR_BYTES},
       mode="long", breaks=write(F.GUEST_RIP, NON_CANONICAL))
def _(get: Reader, cpu: "VmxCpu") -> tuple[str, ...]:
    """If the processor supports N < 64 linear-address bits (vtlab's: 48), bits 63:N of the
    RIP field must be identical if the "IA-32e mode guest" VM-entry control is 1 and the L
    bit in the CS access-rights field is 1: 64-bit code runs at canonical addresses."""
    top = get(_GUEST_RIP) >> 47
    if top and top != _CANONICAL_TOP and get(_ENTRY_CONTROLS) & IA32E_MODE and get(_CS_AR) & _CS_L:
        return (f"GUEST_RIP ({get(_GUEST_RIP):#x}) must be canonical (bits 63:47 identical) for 64-bit code",)
    return ()

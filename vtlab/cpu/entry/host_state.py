"""VM-entry checks on the host-state area (SDM 27.2.2-27.2.4): a failure is VMfailValid, error 8.

The host-state area is what a VM exit loads: the VMM's own CR0/CR3/CR4, segment
selectors, descriptor-table bases and the RIP/RSP it continues at.  VM entry checks it
*before* entering, so a VMM can never leave itself an unusable state to exit to.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ...arch.controls import EntryControl, ExitControl
from ...arch.msrs import Cr0, Cr4, Efer
from ...arch.vmcs_fields import VmcsField as F
from .registry import (EFER_RESERVED, NON_CANONICAL, Reader, both, canonical, clear_bits, pat_invalid_bytes,
                       rule, set_bits, write)

if TYPE_CHECKING:
    from ..vmx import VmxCpu

host = functools.partial(rule, "host-state")


# ----------------------------------------- control registers and MSRs (27.2.2)
@host("host_cr0_fixed_bits", "27.2.2", reads={F.HOST_CR0}, processor=True,
      breaks=clear_bits(F.HOST_CR0, Cr0.NE))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The CR0 field must not set any bit to a value not supported in VMX operation:
    the bits of IA32_VMX_CR0_FIXED0 must be 1, those clear in IA32_VMX_CR0_FIXED1 must be 0."""
    return cpu.caps.cr_fixed_violations("cr0", get(F.HOST_CR0))


@host("host_cr4_fixed_bits", "27.2.2", reads={F.HOST_CR4}, processor=True,
      breaks=clear_bits(F.HOST_CR4, Cr4.VMXE))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The CR4 field must not set any bit to a value not supported in VMX operation
    (IA32_VMX_CR4_FIXED0/FIXED1; CR4.VMXE must stay 1)."""
    return cpu.caps.cr_fixed_violations("cr4", get(F.HOST_CR4))


@host("host_cr3_width", "27.2.2", reads={F.HOST_CR3}, processor=True,
      breaks=write(F.HOST_CR3, 1 << 40))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The CR3 field must not set any bit beyond the processor's physical-address width."""
    if get(F.HOST_CR3) >> cpu.memory.width:
        return ["HOST_CR3 sets bits beyond the physical-address width"]
    return []


_LOAD_PAT, _LOAD_EFER = int(ExitControl.LOAD_IA32_PAT), int(ExitControl.LOAD_IA32_EFER)
_HOST_64 = int(ExitControl.HOST_ADDR_SPACE_SIZE)


@host("host_ia32_pat_valid", "27.2.2", reads={F.VM_EXIT_CONTROLS, F.HOST_IA32_PAT},
      breaks=both(set_bits(F.VM_EXIT_CONTROLS, ExitControl.LOAD_IA32_PAT), write(F.HOST_IA32_PAT, 2)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "load IA32_PAT" VM-exit control is 1, the IA32_PAT field must hold a value
    WRMSR would accept at CPL 0: each of its 8 bytes 0 (UC), 1 (WC), 4 (WT), 5 (WP),
    6 (WB) or 7 (UC-)."""
    if get(F.VM_EXIT_CONTROLS) & _LOAD_PAT:
        bad = pat_invalid_bytes(get(F.HOST_IA32_PAT))
        if bad:
            return [f"HOST_IA32_PAT {get(F.HOST_IA32_PAT):#018x}: byte(s) {bad} are not a memory type "
                    "(0, 1, 4, 5, 6 or 7)"]
    return []


@host("host_efer_reserved", "27.2.2", reads={F.VM_EXIT_CONTROLS, F.HOST_IA32_EFER},
      breaks=set_bits(F.HOST_IA32_EFER, 1 << 1))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "load IA32_EFER" VM-exit control is 1, the bits reserved in IA32_EFER must be
    0 in its field (all but SCE, bit 0; LME, bit 8; LMA, bit 10; NXE, bit 11)."""
    if get(F.VM_EXIT_CONTROLS) & _LOAD_EFER and get(F.HOST_IA32_EFER) & EFER_RESERVED:
        return [f"HOST_IA32_EFER {get(F.HOST_IA32_EFER):#x}: reserved bits must be 0 "
                "(only SCE, LME, LMA and NXE exist)"]
    return []


@host("host_efer_lma_lme", "27.2.2", reads={F.VM_EXIT_CONTROLS, F.HOST_IA32_EFER},
      breaks=clear_bits(F.HOST_IA32_EFER, Efer.LME))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "load IA32_EFER" VM-exit control is 1, the LMA (bit 10) and LME (bit 8) bits
    of the IA32_EFER field must each equal the "host address-space size" VM-exit control:
    the VMM the exit returns to runs in IA-32e mode exactly when that control says so."""
    controls = get(F.VM_EXIT_CONTROLS)
    if controls & _LOAD_EFER:
        efer, host64 = get(F.HOST_IA32_EFER), bool(controls & _HOST_64)
        if bool(efer & Efer.LMA) != host64 or bool(efer & Efer.LME) != host64:
            return [f"HOST_IA32_EFER.LMA and .LME must both be {int(host64)}, the \"host address-space "
                    f"size\" VM-exit control (EFER = {efer:#x})"]
    return []


def _canonical_rule(field: F, id: str, section: str, what: str) -> None:
    @host(id, section, reads={field}, breaks=write(field, NON_CANONICAL),
          doc=f"""{field.name} ({what}) must contain a canonical address: the VM exit loads it
          into the processor, which cannot hold a non-canonical one.""")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if not canonical(get(field)):
            return [f"{field.name} ({get(field):#x}) must be canonical"]
        return []


_canonical_rule(F.HOST_IA32_SYSENTER_ESP, "host_sysenter_esp_canonical", "27.2.2", "IA32_SYSENTER_ESP")
_canonical_rule(F.HOST_IA32_SYSENTER_EIP, "host_sysenter_eip_canonical", "27.2.2", "IA32_SYSENTER_EIP")
# --------------------------------- segment and descriptor-table registers (27.2.3)
_canonical_rule(F.HOST_FS_BASE, "host_fs_base_canonical", "27.2.3", "the FS base")
_canonical_rule(F.HOST_GS_BASE, "host_gs_base_canonical", "27.2.3", "the GS base")
_canonical_rule(F.HOST_TR_BASE, "host_tr_base_canonical", "27.2.3", "the TR base")
_canonical_rule(F.HOST_GDTR_BASE, "host_gdtr_base_canonical", "27.2.3", "the GDTR base")
_canonical_rule(F.HOST_IDTR_BASE, "host_idtr_base_canonical", "27.2.3", "the IDTR base")


# --------------------------------------------------- address-space size (27.2.4)
@host("host_address_space_size", "27.2.4", reads={F.VM_EXIT_CONTROLS},
      breaks=clear_bits(F.VM_EXIT_CONTROLS, ExitControl.HOST_ADDR_SPACE_SIZE))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the logical processor is in IA-32e mode (IA32_EFER.LMA = 1) at the time of VM
    entry, the "host address-space size" VM-exit control must be 1: the exit must return
    to 64-bit code.  vtlab's VMM always runs in IA-32e mode."""
    if not get(F.VM_EXIT_CONTROLS) & ExitControl.HOST_ADDR_SPACE_SIZE:
        return ["the VMM runs in IA-32e mode, so the \"host address-space size\" VM-exit "
                "control must be 1"]
    return []


@host("host_ia32e_guest_requires_64_bit_host", "27.2.4", reads={F.VM_EXIT_CONTROLS, F.VM_ENTRY_CONTROLS},
      mode="long", breaks=clear_bits(F.VM_EXIT_CONTROLS, ExitControl.HOST_ADDR_SPACE_SIZE))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "host address-space size" VM-exit control is 0, the "IA-32e mode guest"
    VM-entry control must be 0: a 64-bit guest needs a 64-bit host to exit to."""
    if not get(F.VM_EXIT_CONTROLS) & _HOST_64 and get(F.VM_ENTRY_CONTROLS) & EntryControl.IA32E_MODE:
        return ["\"host address-space size\" is 0, so the \"IA-32e mode guest\" VM-entry control must be 0"]
    return []


@host("host_cr4_pcide_requires_64_bit_host", "27.2.4", reads={F.VM_EXIT_CONTROLS, F.HOST_CR4},
      breaks=both(clear_bits(F.VM_EXIT_CONTROLS, ExitControl.HOST_ADDR_SPACE_SIZE),
                  set_bits(F.HOST_CR4, Cr4.PCIDE)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "host address-space size" VM-exit control is 0, bit 17 of the CR4 field
    (CR4.PCIDE) must be 0: PCIDs exist only in IA-32e mode."""
    if not get(F.VM_EXIT_CONTROLS) & _HOST_64 and get(F.HOST_CR4) & Cr4.PCIDE:
        return ["\"host address-space size\" is 0, so HOST_CR4.PCIDE must be 0"]
    return []


@host("host_rip_high_bits", "27.2.4", reads={F.VM_EXIT_CONTROLS, F.HOST_RIP},
      breaks=both(clear_bits(F.VM_EXIT_CONTROLS, ExitControl.HOST_ADDR_SPACE_SIZE), write(F.HOST_RIP, 1 << 32)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "host address-space size" VM-exit control is 0, bits 63:32 of the RIP field
    must be 0: a 32-bit host continues at a 32-bit address."""
    if not get(F.VM_EXIT_CONTROLS) & _HOST_64 and get(F.HOST_RIP) >> 32:
        return [f"\"host address-space size\" is 0, so HOST_RIP ({get(F.HOST_RIP):#x}) bits 63:32 must be 0"]
    return []


@host("host_cr4_pae", "27.2.4", reads={F.VM_EXIT_CONTROLS, F.HOST_CR4},
      breaks=clear_bits(F.HOST_CR4, Cr4.PAE))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "host address-space size" VM-exit control is 1, bit 5 of the CR4 field
    (CR4.PAE) must be 1: IA-32e mode needs PAE paging."""
    if get(F.VM_EXIT_CONTROLS) & ExitControl.HOST_ADDR_SPACE_SIZE and not get(F.HOST_CR4) & Cr4.PAE:
        return ["\"host address-space size\" is 1, so HOST_CR4.PAE must be 1"]
    return []


@host("host_rip_canonical", "27.2.4", reads={F.VM_EXIT_CONTROLS, F.HOST_RIP},
      breaks=write(F.HOST_RIP, NON_CANONICAL))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "host address-space size" VM-exit control is 1, the RIP field must contain
    a canonical address (the VMM continues there after every VM exit)."""
    if get(F.VM_EXIT_CONTROLS) & ExitControl.HOST_ADDR_SPACE_SIZE and not canonical(get(F.HOST_RIP)):
        return [f"HOST_RIP ({get(F.HOST_RIP):#x}) must be canonical"]
    return []


# ------------------------------------------------------ host selectors (27.2.3)
def _selector_rule(seg: str) -> None:
    field = F[f"HOST_{seg}_SELECTOR"]

    @host(f"host_{seg.lower()}_selector_rpl_ti", "27.2.3", reads={field}, breaks=set_bits(field, 3),
          doc=f"""In the selector field for {seg}, the RPL (bits 1:0) and the TI flag (bit 2)
          must be 0: the VM exit loads a ring-0 selector from the GDT.""")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        sel = get(field)
        if sel & 7:
            return [f"HOST_{seg}_SELECTOR ({sel:#x}): RPL and TI (bits 2:0) must be 0"]
        return []


for _seg in ("ES", "CS", "SS", "DS", "FS", "GS", "TR"):
    _selector_rule(_seg)


@host("host_cs_selector_nonzero", "27.2.3", reads={F.HOST_CS_SELECTOR},
      breaks=write(F.HOST_CS_SELECTOR, 0))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The selector field for CS must not be 0000H (a null code segment)."""
    if get(F.HOST_CS_SELECTOR) == 0:
        return ["HOST_CS_SELECTOR must not be 0000H"]
    return []


@host("host_tr_selector_nonzero", "27.2.3", reads={F.HOST_TR_SELECTOR},
      breaks=write(F.HOST_TR_SELECTOR, 0))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The selector field for TR must not be 0000H (the host needs a TSS)."""
    if get(F.HOST_TR_SELECTOR) == 0:
        return ["HOST_TR_SELECTOR must not be 0000H"]
    return []


@host("host_ss_selector_nonzero", "27.2.3", reads={F.VM_EXIT_CONTROLS, F.HOST_SS_SELECTOR},
      breaks=both(clear_bits(F.VM_EXIT_CONTROLS, ExitControl.HOST_ADDR_SPACE_SIZE), write(F.HOST_SS_SELECTOR, 0)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The selector field for SS must not be 0000H if the "host address-space size" VM-exit
    control is 0: only 64-bit code may run with a null SS."""
    if not get(F.VM_EXIT_CONTROLS) & _HOST_64 and get(F.HOST_SS_SELECTOR) == 0:
        return ["\"host address-space size\" is 0, so HOST_SS_SELECTOR must not be 0000H"]
    return []

"""VM-entry checks on the host-state area (SDM 27.2.2-27.2.4): a failure is VMfailValid, error 8.

The host-state area is what a VM exit loads: the VMM's own CR0/CR3/CR4, segment
selectors, descriptor-table bases and the RIP/RSP it continues at.  VM entry checks it
*before* entering, so a VMM can never leave itself an unusable state to exit to.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ...arch.controls import ExitControl
from ...arch.msrs import Cr0, Cr4
from ...arch.vmcs_fields import VmcsField as F
from .registry import NON_CANONICAL, Reader, canonical, clear_bits, rule, set_bits, write

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

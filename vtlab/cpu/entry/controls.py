"""VM-entry checks on the VMX controls (SDM 27.2.1): a failure is VMfailValid, error 7.

SDM 27.2.1.1 checks the VM-execution control fields, 27.2.1.2 the VM-exit control
fields and 27.2.1.3 the VM-entry control fields (including event injection).  The
capability MSRs say which control bits this processor lets software set (SDM A.3-A.5).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ...arch.controls import EntryControl, ExitControl, PinBased, ProcBased, ProcBased2
from ...arch.vmcs_fields import VmcsField as F
from ..capabilities import flag_names
from .registry import SECONDARY_READS, Reader, both, clear_bits, rule, secondary_controls, set_bits, write

if TYPE_CHECKING:
    from ..vmx import VmxCpu

control = functools.partial(rule, "controls")


# ------------------------------------------------- reserved bits (27.2.1.1-3)
def _reserved(cpu: "VmxCpu", cls: type, value: int, field: str) -> list[str]:
    """Bits of ``value`` the capability MSR of ``cls`` fixes the other way (SDM A.3)."""
    must1, must0 = cpu.caps.allowed(cls).violations(value)
    out = []
    if must1:
        out.append(f"{field}: {', '.join(flag_names(cls, must1, 32))} must be 1 on this CPU "
                   "(capability MSR allowed-0 settings)")
    if must0:
        out.append(f"{field}: {', '.join(flag_names(cls, must0, 32))} must be 0 on this CPU "
                   "(capability MSR allowed-1 settings)")
    return out


@control("pin_based_controls_reserved", "27.2.1.1", reads={F.PIN_BASED_VM_EXEC_CONTROL}, processor=True,
         breaks=set_bits(F.PIN_BASED_VM_EXEC_CONTROL, PinBased.POSTED_INTR))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Reserved bits in the pin-based VM-execution controls must be set properly: as
    IA32_VMX_TRUE_PINBASED_CTLS allows (bits 31:0 must-be-1, bits 63:32 may-be-1)."""
    return _reserved(cpu, PinBased, get(F.PIN_BASED_VM_EXEC_CONTROL), "pin-based VM-execution controls")


@control("primary_controls_reserved", "27.2.1.1", reads={F.CPU_BASED_VM_EXEC_CONTROL}, processor=True,
         breaks=set_bits(F.CPU_BASED_VM_EXEC_CONTROL, ProcBased.TPR_SHADOW))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Reserved bits in the primary processor-based VM-execution controls must be set
    properly (IA32_VMX_TRUE_PROCBASED_CTLS)."""
    return _reserved(cpu, ProcBased, get(F.CPU_BASED_VM_EXEC_CONTROL),
                     "primary processor-based VM-execution controls")


@control("exit_controls_reserved", "27.2.1.2", reads={F.VM_EXIT_CONTROLS}, processor=True,
         breaks=set_bits(F.VM_EXIT_CONTROLS, ExitControl.ACTIVATE_SECONDARY_CONTROLS))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Reserved bits in the primary VM-exit controls must be set properly
    (IA32_VMX_TRUE_EXIT_CTLS)."""
    return _reserved(cpu, ExitControl, get(F.VM_EXIT_CONTROLS), "VM-exit controls")


@control("entry_controls_reserved", "27.2.1.3", reads={F.VM_ENTRY_CONTROLS}, processor=True,
         breaks=set_bits(F.VM_ENTRY_CONTROLS, EntryControl.LOAD_BNDCFGS))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Reserved bits in the VM-entry controls must be set properly
    (IA32_VMX_TRUE_ENTRY_CTLS)."""
    return _reserved(cpu, EntryControl, get(F.VM_ENTRY_CONTROLS), "VM-entry controls")


@control("secondary_controls_reserved", "27.2.1.1", reads=SECONDARY_READS, processor=True,
         breaks=set_bits(F.SECONDARY_VM_EXEC_CONTROL, ProcBased2.ENABLE_PML))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If "activate secondary controls" is 1, reserved bits in the secondary
    processor-based VM-execution controls must be cleared (IA32_VMX_PROCBASED_CTLS2);
    if it is 0, the field is ignored."""
    if not get(F.CPU_BASED_VM_EXEC_CONTROL) & ProcBased.ACTIVATE_SECONDARY_CONTROLS:
        return []
    return _reserved(cpu, ProcBased2, get(F.SECONDARY_VM_EXEC_CONTROL),
                     "secondary processor-based VM-execution controls")


# ------------------------------------------------ other execution controls (27.2.1.1)
@control("cr3_target_count", "27.2.1.1", reads={F.CR3_TARGET_COUNT}, processor=True,
         breaks=write(F.CR3_TARGET_COUNT, 5))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The CR3-target count must not be greater than 4 - or than the number of CR3-target
    values the processor supports, IA32_VMX_MISC bits 24:16 (SDM A.6)."""
    count, supported = get(F.CR3_TARGET_COUNT), cpu.caps.cr3_targets
    if count > supported:
        return [f"CR3-target count {count} exceeds the {supported} CR3-target values this CPU "
                "supports (IA32_VMX_MISC[24:16])"]
    return []


def _bitmap_rule(field: F, control_bit: ProcBased, id: str, what: str) -> None:
    # The recipe turns the control on as well: vtlab's VMs exit on every I/O
    # instruction ("unconditional I/O exiting") and use no I/O bitmaps.
    @control(id, "27.2.1.1", reads={F.CPU_BASED_VM_EXEC_CONTROL, field}, processor=True,
             breaks=both(set_bits(F.CPU_BASED_VM_EXEC_CONTROL, control_bit), set_bits(field, 1)),
             doc=f"""If the "{what}" VM-execution control is 1, bits 11:0 of {field.name} must be
             0 (the bitmap is a 4-KByte page) and it must not set any bit beyond the
             processor's physical-address width.""")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if get(F.CPU_BASED_VM_EXEC_CONTROL) & control_bit and not cpu.memory.valid_address(get(field)):
            return [f"{field.name} address {get(field):#x} must be 4-KByte aligned and within the "
                    "physical-address width"]
        return []


_bitmap_rule(F.IO_BITMAP_A, ProcBased.USE_IO_BITMAPS, "io_bitmap_a_address", "use I/O bitmaps")
_bitmap_rule(F.IO_BITMAP_B, ProcBased.USE_IO_BITMAPS, "io_bitmap_b_address", "use I/O bitmaps")
_bitmap_rule(F.MSR_BITMAP, ProcBased.USE_MSR_BITMAPS, "msr_bitmap_address", "use MSR bitmaps")


@control("virtual_nmis_require_nmi_exiting", "27.2.1.1", reads={F.PIN_BASED_VM_EXEC_CONTROL},
         breaks=both(clear_bits(F.PIN_BASED_VM_EXEC_CONTROL, PinBased.NMI_EXITING),
                     set_bits(F.PIN_BASED_VM_EXEC_CONTROL, PinBased.VIRTUAL_NMIS)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "NMI exiting" VM-execution control is 0, the "virtual NMIs" control must be 0."""
    pin = get(F.PIN_BASED_VM_EXEC_CONTROL)
    if not pin & PinBased.NMI_EXITING and pin & PinBased.VIRTUAL_NMIS:
        return ["\"virtual NMIs\" requires \"NMI exiting\""]
    return []


@control("nmi_window_requires_virtual_nmis", "27.2.1.1",
         reads={F.PIN_BASED_VM_EXEC_CONTROL, F.CPU_BASED_VM_EXEC_CONTROL},
         breaks=both(clear_bits(F.PIN_BASED_VM_EXEC_CONTROL, PinBased.VIRTUAL_NMIS),
                     set_bits(F.CPU_BASED_VM_EXEC_CONTROL, ProcBased.NMI_WINDOW_EXITING)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "virtual NMIs" VM-execution control is 0, the "NMI-window exiting" control
    must be 0: the NMI window is the end of virtual-NMI blocking."""
    if (get(F.CPU_BASED_VM_EXEC_CONTROL) & ProcBased.NMI_WINDOW_EXITING
            and not get(F.PIN_BASED_VM_EXEC_CONTROL) & PinBased.VIRTUAL_NMIS):
        return ["\"NMI-window exiting\" requires \"virtual NMIs\""]
    return []


@control("save_preemption_timer_requires_timer", "27.2.1.2",
         reads={F.PIN_BASED_VM_EXEC_CONTROL, F.VM_EXIT_CONTROLS},
         breaks=both(clear_bits(F.PIN_BASED_VM_EXEC_CONTROL, PinBased.VMX_PREEMPTION_TIMER),
                     set_bits(F.VM_EXIT_CONTROLS, ExitControl.SAVE_VMX_PREEMPTION_TIMER)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "activate VMX-preemption timer" VM-execution control is 0, the "save
    VMX-preemption-timer value" VM-exit control must also be 0."""
    if (get(F.VM_EXIT_CONTROLS) & ExitControl.SAVE_VMX_PREEMPTION_TIMER
            and not get(F.PIN_BASED_VM_EXEC_CONTROL) & PinBased.VMX_PREEMPTION_TIMER):
        return ["\"save VMX-preemption-timer value\" requires \"activate VMX-preemption timer\""]
    return []


@control("unrestricted_guest_requires_ept", "27.2.1.1", reads=SECONDARY_READS,
         breaks=clear_bits(F.SECONDARY_VM_EXEC_CONTROL, ProcBased2.ENABLE_EPT))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "unrestricted guest" VM-execution control is 1, the "enable EPT" control
    must also be 1: with guest paging off, only EPT stands between the guest and host memory."""
    proc2 = secondary_controls(get)
    if proc2 & ProcBased2.UNRESTRICTED_GUEST and not proc2 & ProcBased2.ENABLE_EPT:
        return ["\"unrestricted guest\" is 1, so \"enable EPT\" must also be 1"]
    return []


@control("vpid_nonzero", "27.2.1.1", reads=SECONDARY_READS | {F.VIRTUAL_PROCESSOR_ID},
         breaks=write(F.VIRTUAL_PROCESSOR_ID, 0))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the "enable VPID" VM-execution control is 1, the value of the VPID field must
    not be 0000H (VPID 0 is the VMM's own)."""
    if secondary_controls(get) & ProcBased2.ENABLE_VPID and get(F.VIRTUAL_PROCESSOR_ID) == 0:
        return ["\"enable VPID\" is 1, so the VPID field must not be 0000H"]
    return []


_EPT_READS = SECONDARY_READS | {F.EPT_POINTER}


def _eptp(get: Reader) -> int | None:
    """The EPT pointer, or None if "enable EPT" is 0 (then the field is not checked)."""
    return get(F.EPT_POINTER) if secondary_controls(get) & ProcBased2.ENABLE_EPT else None


#: IA32_VMX_EPT_VPID_CAP bits (SDM A.10): the EPTP settings this processor supports.
EPT_CAP_WALK_4, EPT_CAP_WALK_5 = 1 << 6, 1 << 7     #: page-walk length 4 / 5 supported
EPT_CAP_UC, EPT_CAP_WB = 1 << 8, 1 << 14            #: EPT paging-structure memory type UC / WB
EPT_CAP_ACCESSED_DIRTY = 1 << 21                    #: accessed and dirty flags for EPT


@control("ept_pointer_memory_type", "27.2.1.1", reads=_EPT_READS, processor=True,
         breaks=lambda vm: vm.vmwrite(F.EPT_POINTER, vm.vmread(F.EPT_POINTER) & ~7 | 1))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If "enable EPT" is 1, the EPT memory type (EPTP bits 2:0) must be a value the
    processor supports, as IA32_VMX_EPT_VPID_CAP says: 0 (UC) if its bit 8 is 1, 6 (WB) if
    its bit 14 is 1.  (vtlab's CPU reports WB only.)"""
    eptp = _eptp(get)
    if eptp is None:
        return []
    cap = cpu.caps.ept_vpid_cap
    allowed = [t for t, bit in ((0, EPT_CAP_UC), (6, EPT_CAP_WB)) if cap & bit]
    if eptp & 7 not in allowed:
        names = " or ".join({0: "UC (0)", 6: "WB (6)"}[t] for t in allowed) or "none"
        return [f"EPTP memory type (bits 2:0) is {eptp & 7}; IA32_VMX_EPT_VPID_CAP allows {names}"]
    return []


@control("ept_pointer_walk_length", "27.2.1.1", reads=_EPT_READS, processor=True,
         breaks=lambda vm: vm.vmwrite(F.EPT_POINTER, vm.vmread(F.EPT_POINTER) & ~0x38 | (2 << 3)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If "enable EPT" is 1, EPTP bits 5:3 (1 less than the EPT page-walk length) must be a
    length IA32_VMX_EPT_VPID_CAP supports: 3 (a 4-level walk) if its bit 6 is 1, 4 (a
    5-level walk) if its bit 7 is 1.  (vtlab's CPU reports 4-level walks only.)"""
    eptp = _eptp(get)
    if eptp is None:
        return []
    cap = cpu.caps.ept_vpid_cap
    allowed = [n for n, bit in ((3, EPT_CAP_WALK_4), (4, EPT_CAP_WALK_5)) if cap & bit]
    if (eptp >> 3) & 7 not in allowed:
        return [f"EPTP bits 5:3 are {(eptp >> 3) & 7}; IA32_VMX_EPT_VPID_CAP allows "
                f"{' or '.join(map(str, allowed)) or 'none'} (page-walk length - 1)"]
    return []


@control("ept_pointer_accessed_dirty", "27.2.1.1", reads=_EPT_READS, processor=True,
         breaks=set_bits(F.EPT_POINTER, 1 << 6))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If "enable EPT" is 1, EPTP bit 6 (enable accessed and dirty flags for EPT) must be 0
    if bit 21 of IA32_VMX_EPT_VPID_CAP is 0: the processor has no EPT A/D flags (as
    vtlab's CPU reports)."""
    eptp = _eptp(get)
    if eptp is not None and eptp & (1 << 6) and not cpu.caps.ept_vpid_cap & EPT_CAP_ACCESSED_DIRTY:
        return ["EPTP bit 6 (EPT accessed and dirty flags) must be 0: IA32_VMX_EPT_VPID_CAP[21] is 0"]
    return []


@control("ept_pointer_reserved", "27.2.1.1", reads=_EPT_READS, processor=True,
         breaks=set_bits(F.EPT_POINTER, 1 << 7))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If "enable EPT" is 1, EPTP reserved bits 11:7 and the bits beyond the
    physical-address width must be 0."""
    eptp = _eptp(get)
    if eptp is not None and (eptp & 0xF80 or eptp >> cpu.memory.width):
        return ["EPTP reserved bits (11:7 and above the physical-address width) must be 0"]
    return []


# ----------------------------------------------- MSR-store/load lists (27.2.1.2-3)
def _msr_count_rule(field: F, id: str, section: str) -> None:
    @control(id, section, reads={field}, breaks=write(field, 1),
             doc=f"""{field.name} must be 0 on vtlab's CPU, which implements no MSR-store or
             MSR-load lists (on hardware the count may go up to 512 times
             (IA32_VMX_MISC[27:25] + 1), the list address 16-byte aligned).""")
    def _(get: Reader, cpu: "VmxCpu") -> list[str]:
        if get(field):
            return [f"{field.name} is {get(field)}: vtlab's CPU supports no MSR-load/store "
                    "lists (IA32_VMX_MISC[27:25] = 0 means 512 entries on hardware; use 0 here)"]
        return []


_msr_count_rule(F.VM_EXIT_MSR_STORE_COUNT, "exit_msr_store_count", "27.2.1.2")
_msr_count_rule(F.VM_EXIT_MSR_LOAD_COUNT, "exit_msr_load_count", "27.2.1.2")
_msr_count_rule(F.VM_ENTRY_MSR_LOAD_COUNT, "entry_msr_load_count", "27.2.1.3")

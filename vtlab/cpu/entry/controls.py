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
         breaks=set_bits(F.PIN_BASED_VM_EXEC_CONTROL, PinBased.VMX_PREEMPTION_TIMER))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Reserved bits in the pin-based VM-execution controls must be set properly: as
    IA32_VMX_TRUE_PINBASED_CTLS allows (bits 31:0 must-be-1, bits 63:32 may-be-1)."""
    return _reserved(cpu, PinBased, get(F.PIN_BASED_VM_EXEC_CONTROL), "pin-based VM-execution controls")


@control("primary_controls_reserved", "27.2.1.1", reads={F.CPU_BASED_VM_EXEC_CONTROL}, processor=True,
         breaks=set_bits(F.CPU_BASED_VM_EXEC_CONTROL, ProcBased.USE_TSC_OFFSETTING))
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


@control("ept_pointer_memory_type", "27.2.1.1", reads=_EPT_READS,
         breaks=lambda vm: vm.vmwrite(F.EPT_POINTER, vm.vmread(F.EPT_POINTER) & ~7 | 1))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If "enable EPT" is 1, the EPT memory type in EPTP bits 2:0 must be a value
    IA32_VMX_EPT_VPID_CAP supports: UC (0) or WB (6) on vtlab's CPU."""
    eptp = _eptp(get)
    if eptp is not None and eptp & 7 not in (0, 6):
        return [f"EPTP memory type (bits 2:0) must be UC (0) or WB (6); it is {eptp & 7}"]
    return []


@control("ept_pointer_walk_length", "27.2.1.1", reads=_EPT_READS,
         breaks=lambda vm: vm.vmwrite(F.EPT_POINTER, vm.vmread(F.EPT_POINTER) & ~0x38 | (2 << 3)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If "enable EPT" is 1, EPTP bits 5:3 (the EPT page-walk length minus 1) must be 3:
    a 4-level walk, the one length IA32_VMX_EPT_VPID_CAP reports on vtlab's CPU."""
    eptp = _eptp(get)
    if eptp is not None and (eptp >> 3) & 7 != 3:
        return [f"EPTP bits 5:3 must be 3 (a 4-level page walk); they are {(eptp >> 3) & 7}"]
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


# -------------------------------------------------- event injection (27.2.1.3)
def _injected(get: Reader) -> tuple[int, int] | None:
    """(type, vector) of the event VM entry injects, or None if the valid bit is 0."""
    info = get(F.VM_ENTRY_INTR_INFO_FIELD)
    return ((info >> 8) & 7, info & 0xFF) if info >> 31 & 1 else None


@control("event_injection_type_reserved", "27.2.1.3", reads={F.VM_ENTRY_INTR_INFO_FIELD},
         breaks=write(F.VM_ENTRY_INTR_INFO_FIELD, (1 << 31) | (1 << 8)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the VM-entry interruption-information valid bit is 1, the interruption type
    (bits 10:8) must not be 1 (reserved)."""
    event = _injected(get)
    if event is not None and event[0] == 1:
        return ["VM-entry interruption-information: type 1 is reserved"]
    return []


@control("event_injection_nmi_vector", "27.2.1.3", reads={F.VM_ENTRY_INTR_INFO_FIELD},
         breaks=write(F.VM_ENTRY_INTR_INFO_FIELD, (1 << 31) | (2 << 8) | 3))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the interruption type is NMI (2), the vector (bits 7:0) must be 2."""
    event = _injected(get)
    if event is not None and event[0] == 2 and event[1] != 2:
        return ["VM-entry interruption-information: an NMI must have vector 2"]
    return []


@control("event_injection_exception_vector", "27.2.1.3", reads={F.VM_ENTRY_INTR_INFO_FIELD},
         breaks=write(F.VM_ENTRY_INTR_INFO_FIELD, (1 << 31) | (3 << 8) | 32))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the interruption type is hardware exception (3), the vector must be at most 31."""
    event = _injected(get)
    if event is not None and event[0] == 3 and event[1] > 31:
        return ["VM-entry interruption-information: a hardware exception must have a vector of 0-31"]
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

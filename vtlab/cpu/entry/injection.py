"""VM-entry checks on the event-injection fields (SDM 27.2.1.3): a failure is VMfailValid,
error 7, like every check on the VMX controls.

A VMM injects an event by VMWRITEing the VM-entry interruption-information field (vector
in bits 7:0, type in bits 10:8, "deliver error code" in bit 11, valid in bit 31), with the
VM-entry exception error code and, for software events, the VM-entry instruction length
(SDM 25.8.3).  The checks below apply only when the valid bit is 1.  Some depend on what
the processor reports: the 1-setting of "monitor trap flag" (type 7), IA32_VMX_BASIC[56]
(error codes of hardware exceptions) and IA32_VMX_MISC[30] (instruction length 0).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ...arch.controls import ProcBased
from ...arch.msrs import Cr0
from ...arch.vmcs_fields import VmcsField as F
from .registry import SECONDARY_READS, Reader, both, rule, unrestricted_guest, write

if TYPE_CHECKING:
    from ..vmx import VmxCpu

control = functools.partial(rule, "controls")

_INFO = F.VM_ENTRY_INTR_INFO_FIELD
VALID, DELIVER_ERROR_CODE = 1 << 31, 1 << 11
#: Interruption types (bits 10:8, SDM Table 25-17).
EXTERNAL, RESERVED, NMI, HARDWARE, SOFTWARE_INTERRUPT, PRIVILEGED_SOFTWARE, SOFTWARE, OTHER = range(8)
#: The exceptions that deliver an error code (SDM 27.2.1.3): #DF, #TS, #NP, #SS, #GP, #PF, #AC.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17})
#: IA32_VMX_BASIC[56]: VM entry may deliver a hardware exception with or without an error
#: code, whatever its vector (SDM A.1).
BASIC_NO_ERROR_CODE_CHECK = 1 << 56
#: IA32_VMX_MISC[30]: VM entry allows an instruction length of 0 for software events (SDM A.6).
MISC_ZERO_LENGTH_INJECTION = 1 << 30


def _event(type_: int, vector: int, error_code: bool = False) -> int:
    """A valid VM-entry interruption-information value."""
    return VALID | type_ << 8 | vector | (DELIVER_ERROR_CODE if error_code else 0)


def _injected(get: Reader) -> tuple[int, int] | None:
    """(type, vector) of the event VM entry injects, or None if the valid bit is 0."""
    info = get(_INFO)
    return ((info >> 8) & 7, info & 0xFF) if info & VALID else None


@control("event_injection_type_reserved", "27.2.1.3", reads={_INFO}, processor=True,
         breaks=write(_INFO, _event(RESERVED, 0)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the VM-entry interruption-information valid bit is 1, the interruption type
    (bits 10:8) must not be a reserved value: 1 is reserved on all processors; 7 (other
    event) on processors that do not support the 1-setting of the "monitor trap flag"
    VM-execution control (vtlab's CPU supports it, IA32_VMX_PROCBASED_CTLS bit 59)."""
    event = _injected(get)
    if event is None:
        return []
    if event[0] == RESERVED:
        return ["VM-entry interruption-information: type 1 is reserved"]
    if event[0] == OTHER and not cpu.caps.allowed(ProcBased).allowed1 & ProcBased.MONITOR_TRAP_FLAG:
        return ["VM-entry interruption-information: type 7 (other event) is reserved on a CPU "
                "without the 1-setting of \"monitor trap flag\""]
    return []


@control("event_injection_nmi_vector", "27.2.1.3", reads={_INFO}, breaks=write(_INFO, _event(NMI, 3)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the interruption type is NMI (2), the vector (bits 7:0) must be 2."""
    event = _injected(get)
    if event is not None and event[0] == NMI and event[1] != 2:
        return ["VM-entry interruption-information: an NMI must have vector 2"]
    return []


@control("event_injection_exception_vector", "27.2.1.3", reads={_INFO}, breaks=write(_INFO, _event(HARDWARE, 32)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the interruption type is hardware exception (3), the vector must be at most 31."""
    event = _injected(get)
    if event is not None and event[0] == HARDWARE and event[1] > 31:
        return ["VM-entry interruption-information: a hardware exception must have a vector of 0-31"]
    return []


@control("event_injection_other_event_vector", "27.2.1.3", reads={_INFO}, breaks=write(_INFO, _event(OTHER, 1)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the interruption type is other event (7), the vector must be 0 (pending MTF VM
    exit), the only "other event" there is."""
    event = _injected(get)
    if event is not None and event[0] == OTHER and event[1] != 0:
        return [f"VM-entry interruption-information: type 7 (other event) must have vector 0 "
                f"(pending MTF VM exit); it is {event[1]}"]
    return []


@control("event_injection_deliver_error_code", "27.2.1.3", reads={_INFO, F.GUEST_CR0} | SECONDARY_READS,
         processor=True, breaks=write(_INFO, _event(NMI, 2, error_code=True)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The deliver-error-code bit (bit 11) must be 0 if the interruption type is not
    hardware exception, or if the guest will be in real-address mode ("unrestricted
    guest" is 1 and bit 0, PE, of the CR0 field is 0).  Otherwise - a hardware exception
    in protected mode - it must be 1 exactly for the vectors that deliver an error code
    (8 #DF, 10 #TS, 11 #NP, 12 #SS, 13 #GP, 14 #PF, 17 #AC), unless IA32_VMX_BASIC[56] is
    1: then either setting is allowed (as vtlab's CPU reports)."""
    info = get(_INFO)
    if not info & VALID:
        return []
    has_code, type_, vector = bool(info & DELIVER_ERROR_CODE), (info >> 8) & 7, info & 0xFF
    if type_ != HARDWARE:
        return ["VM-entry interruption-information: \"deliver error code\" (bit 11) must be 0: "
                f"only hardware exceptions deliver an error code (type is {type_})"] if has_code else []
    protected = not unrestricted_guest(get) or get(F.GUEST_CR0) & Cr0.PE
    if not protected:
        return ["VM-entry interruption-information: \"deliver error code\" (bit 11) must be 0: "
                "the guest will be in real-address mode (CR0.PE = 0)"] if has_code else []
    if cpu.caps.basic & BASIC_NO_ERROR_CODE_CHECK:
        return []
    if has_code != (vector in ERROR_CODE_VECTORS):
        return [f"VM-entry interruption-information: \"deliver error code\" (bit 11) must be "
                f"{int(not has_code)} for vector {vector} (IA32_VMX_BASIC[56] = 0)"]
    return []


@control("event_injection_reserved_bits", "27.2.1.3", reads={_INFO},
         breaks=write(_INFO, _event(HARDWARE, 6) | 1 << 12))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Reserved bits 30:12 of the VM-entry interruption-information field must be 0."""
    info = get(_INFO)
    if info & VALID and info & 0x7FFF_F000:
        return [f"VM-entry interruption-information {info:#x}: reserved bits 30:12 must be 0"]
    return []


@control("event_injection_error_code_high_bits", "27.2.1.3",
         reads={_INFO, F.VM_ENTRY_EXCEPTION_ERROR_CODE}, mode="protected",
         breaks=both(write(_INFO, _event(HARDWARE, 13, error_code=True)),
                     write(F.VM_ENTRY_EXCEPTION_ERROR_CODE, 1 << 16)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the deliver-error-code bit (bit 11) is 1, bits 31:16 of the VM-entry exception
    error-code field must be 0: error codes are 16 bits."""
    info = get(_INFO)
    if info & VALID and info & DELIVER_ERROR_CODE and get(F.VM_ENTRY_EXCEPTION_ERROR_CODE) >> 16:
        return [f"VM-entry exception error code {get(F.VM_ENTRY_EXCEPTION_ERROR_CODE):#x}: "
                "bits 31:16 must be 0"]
    return []


@control("event_injection_instruction_length", "27.2.1.3", reads={_INFO, F.VM_ENTRY_INSTRUCTION_LEN},
         processor=True, breaks=both(write(_INFO, _event(SOFTWARE_INTERRUPT, 0x80)),
                                     write(F.VM_ENTRY_INSTRUCTION_LEN, 0)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the interruption type is software interrupt (4), privileged software exception
    (5) or software exception (6), the VM-entry instruction length must be in the range
    0-15 - and 0 only if IA32_VMX_MISC[30] is 1 (vtlab's CPU reports 0: lengths 1-15).
    The guest resumes that many bytes past RIP, after the INT n / INT1 / INT3 / INTO."""
    event = _injected(get)
    if event is None or event[0] not in (SOFTWARE_INTERRUPT, PRIVILEGED_SOFTWARE, SOFTWARE):
        return []
    length = get(F.VM_ENTRY_INSTRUCTION_LEN)
    lowest = 0 if cpu.caps.misc & MISC_ZERO_LENGTH_INJECTION else 1
    if not lowest <= length <= 15:
        return [f"VM-entry instruction length {length}: a software interrupt or exception needs "
                f"{lowest}-15 (IA32_VMX_MISC[30] = {1 - lowest})"]
    return []

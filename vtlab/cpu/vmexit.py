"""The VM-exit record and the VM exit itself (SDM Vol. 3C chapter 28).

:class:`VmExit` is what one exit wrote into the exit-information fields.  The processor
(:meth:`vtlab.cpu.vmx.VmxCpu`) performs the exit in the SDM's step order: record the exit
information (28.2, :func:`record_exit_information`), save guest state (28.3, lazily:
:class:`vtlab.cpu.guest_state.GuestStateCache`), load host state (28.5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..arch.exceptions import IntrInfo
from ..arch.exit_reasons import EXIT_REASON_INFO, ExitReason
from ..arch.qualifications import (CrAccessQualification, DrAccessQualification, EptViolationQualification,
                                   IoQualification, TaskSwitchQualification)
from ..arch.vmcs_fields import VmcsField as F

from .nonroot_consts import _EXIT_INFO_FIELDS, _VALID

if TYPE_CHECKING:
    from .vmcs import Vmcs

_ENTRY_INTR_INFO = int(F.VM_ENTRY_INTR_INFO_FIELD)
(_REASON, _QUALIFICATION, _LENGTH, _INTR_INFO, _INTR_CODE, _IDT_INFO, _IDT_CODE, _INSN_INFO, _LINEAR,
 _PHYSICAL) = _EXIT_INFO_FIELDS
_ENTRY_FAILURE = 1 << 31   # bit 31 of the exit reason: VM-entry failure (SDM 25.9.1)


# ----------------------------------------------------------------------------- records
@dataclass(slots=True)
class VmExit:
    """One VM exit (or VM-entry failure) with the exit-information fields it wrote."""

    reason: ExitReason
    qualification: int = 0
    instruction_length: int = 0
    guest_rip: int = 0
    instruction: str = ""
    guest_linear_address: int | None = None
    guest_physical_address: int | None = None
    intr_info: int = 0
    intr_error_code: int | None = None
    instruction_info: int = 0
    entry_failure: bool = False
    note: str = ""
    guest_instructions: int = 0
    cpl: int = 0
    device: str | None = None
    #: The guest instruction's :class:`~vtlab.cpu.decoder.DecodedInstruction` (decoded
    #: at load time) for an instruction-caused exit; None for other exits.
    decoded_insn: object | None = None
    #: The guest's RAX, RBX, RCX, RDX, RSP, RFLAGS and CPL at the exit, when the processor
    #: read them anyway (instruction exits): what a VMM's exit stub saves first thing.
    registers: tuple | None = None
    #: IDT-vectoring information (SDM 28.2.4): the event whose delivery through the IDT
    #: the exit interrupted (valid bit 31, vector, type, bit 11 error code valid), 0 if none.
    idt_vectoring_info: int = 0
    #: ... and its error code (IDT-vectoring error code), when bit 11 of that field is 1.
    idt_vectoring_error_code: int | None = None

    @property
    def reason_number(self) -> int:
        return int(self.reason)

    @property
    def exit_reason_field(self) -> int:
        """The VM_EXIT_REASON field value: basic reason, bit 31 for entry failures."""
        return int(self.reason) | (1 << 31 if self.entry_failure else 0)

    @property
    def category(self) -> str:
        return EXIT_REASON_INFO[self.reason].category

    def decoded(self) -> dict[str, object]:
        """The qualification (and interruption information) split into named fields."""
        decoder = _DECODERS.get(self.reason)
        if self.idt_vectoring_info:
            return _with_vectoring(decoder)(self)
        if decoder is not None:
            return decoder(self)
        q = self.qualification
        return {"qualification": q} if q else {}

    def __str__(self) -> str:
        what = f"{self.reason.name} ({int(self.reason)})"
        if self.entry_failure:
            what = f"VM-entry failure: {what}, bit 31 set"
        at = f" at {self.guest_rip:#x}" + (f" '{self.instruction}'" if self.instruction else "")
        q = f" qualification={self.qualification:#x}" if self.qualification else ""
        n = f" length={self.instruction_length}" if self.instruction_length else ""
        return what + at + q + n



def _ept_violation(e: VmExit) -> dict[str, object]:
    d = EptViolationQualification.decode(e.qualification).as_dict()
    d["guest_physical_address"] = e.guest_physical_address
    return d


def _interruption(e: VmExit) -> dict[str, object]:
    d = IntrInfo.decode(e.intr_info).as_dict()
    if e.intr_error_code is not None:
        d["error_code"] = e.intr_error_code
    return d


def _with_vectoring(decoder):
    """Add the IDT-vectoring information (SDM 28.2.4) of an exit during event delivery."""
    def decode(e: VmExit) -> dict[str, object]:
        d = decoder(e) if decoder is not None else ({"qualification": e.qualification} if e.qualification else {})
        if e.idt_vectoring_info & _VALID:
            v = IntrInfo.decode(e.idt_vectoring_info)
            d["idt_vectoring"] = f"{v.type.name} vector {v.vector}" + (
                f" error code {e.idt_vectoring_error_code:#x}" if e.idt_vectoring_error_code is not None else "")
        return d
    return decode


#: How :meth:`VmExit.decoded` splits each reason's qualification (SDM 28.2.1 tables).
_DECODERS = {
    ExitReason.IO_INSTRUCTION: lambda e: IoQualification.decode(e.qualification).as_dict(),
    ExitReason.CR_ACCESS: lambda e: CrAccessQualification.decode(e.qualification).as_dict(),
    ExitReason.DR_ACCESS: lambda e: DrAccessQualification.decode(e.qualification).as_dict(),
    ExitReason.EPT_VIOLATION: _ept_violation,
    ExitReason.EXCEPTION_NMI: _interruption,
    ExitReason.EXTERNAL_INTERRUPT: _interruption,
    ExitReason.TASK_SWITCH: lambda e: TaskSwitchQualification.decode(e.qualification).as_dict(),
    ExitReason.INVLPG: lambda e: {"linear_address": e.qualification},
    ExitReason.INVALID_STATE: lambda e: {"entry_failure": True, "qualification": e.qualification,
                                         "why": e.note},
}


def record_exit_information(vmcs: "Vmcs", exit_: VmExit) -> None:
    """SDM 28.2: write the exit-information fields (all ten, so nothing stale survives)
    and clear the valid bit of the VM-entry interruption-information field, so that an
    injected event is not injected twice (SDM 28.2, introduction).  The IDT-vectoring
    fields hold the event being delivered when the exit happened, 0 otherwise (28.2.4)."""
    data = vmcs._data   # the processor's own writes: no software checks (Vmcs.put)
    (data[_REASON], data[_QUALIFICATION], data[_LENGTH], data[_INTR_INFO], data[_INTR_CODE],
     data[_IDT_INFO], data[_IDT_CODE], data[_INSN_INFO], data[_LINEAR], data[_PHYSICAL]) = (
        exit_.reason | _ENTRY_FAILURE if exit_.entry_failure else int(exit_.reason),
        exit_.qualification, exit_.instruction_length, exit_.intr_info,
        exit_.intr_error_code or 0, exit_.idt_vectoring_info, exit_.idt_vectoring_error_code or 0,
        exit_.instruction_info, exit_.guest_linear_address or 0, exit_.guest_physical_address or 0)
    info = data.get(_ENTRY_INTR_INFO, 0)
    if info & _VALID:
        data[_ENTRY_INTR_INFO] = info & ~_VALID

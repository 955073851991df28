"""The VM-exit record and the VM exit itself (SDM Vol. 3C chapter 28).

:class:`VmExit` is what one exit wrote into the exit-information fields; the
:meth:`VmExitPath.vm_exit` step performs the exit in the SDM's order: record the exit
information (28.2), save guest state (28.3, lazily), load host state (28.5).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..arch.exceptions import IntrInfo
from ..arch.exit_reasons import EXIT_REASON_INFO, ExitReason
from ..arch.qualifications import (CrAccessQualification, DrAccessQualification, EptViolationQualification, IoQualification)
from ..arch.vmcs_fields import VmcsField as F
from .outcome import VmxOperation

from .nonroot_consts import _LAZY_FIELDS, _VALID, _EXIT_INFO_FIELDS

# ----------------------------------------------------------------------------- records
@dataclass
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
        q = self.qualification
        if self.reason is ExitReason.IO_INSTRUCTION:
            return IoQualification.decode(q).as_dict()
        if self.reason is ExitReason.CR_ACCESS:
            return CrAccessQualification.decode(q).as_dict()
        if self.reason is ExitReason.DR_ACCESS:
            return DrAccessQualification.decode(q).as_dict()
        if self.reason is ExitReason.EPT_VIOLATION:
            d = EptViolationQualification.decode(q).as_dict()
            d["guest_physical_address"] = self.guest_physical_address
            return d
        if self.reason in (ExitReason.EXCEPTION_NMI, ExitReason.EXTERNAL_INTERRUPT):
            d = IntrInfo.decode(self.intr_info).as_dict()
            if self.intr_error_code is not None:
                d["error_code"] = self.intr_error_code
            return d
        if self.reason is ExitReason.INVLPG:
            return {"linear_address": q}
        if self.reason is ExitReason.INVALID_STATE:
            return {"entry_failure": True, "qualification": q, "why": self.note}
        return {"qualification": q} if q else {}

    def __str__(self) -> str:
        what = f"{self.reason.name} ({int(self.reason)})"
        if self.entry_failure:
            what = f"VM-entry failure: {what}, bit 31 set"
        at = f" at {self.guest_rip:#x}" + (f" '{self.instruction}'" if self.instruction else "")
        q = f" qualification={self.qualification:#x}" if self.qualification else ""
        n = f" length={self.instruction_length}" if self.instruction_length else ""
        return what + at + q + n



class VmExitPath:
    """The VM-exit step of the non-root monitor."""

    def vm_exit(self, exit_: VmExit) -> VmExit:
        """Perform the VM exit (SDM 28): exit information, guest state, host state."""
        vmcs, cpu, g = self.vmcs, self.cpu, self.guest
        vmcs.set_exit_infos(zip(_EXIT_INFO_FIELDS, (
            exit_.exit_reason_field, int(exit_.qualification), int(exit_.instruction_length),
            int(exit_.intr_info), int(exit_.intr_error_code or 0), 0, int(exit_.instruction_info),
            int(exit_.guest_linear_address or 0), int(exit_.guest_physical_address or 0))))
        # Every VM exit clears the valid bit of the VM-entry interruption-information
        # field (SDM 28.2, introduction), so an injected event is not injected twice.
        vmcs.save_guest(F.VM_ENTRY_INTR_INFO_FIELD, vmcs.get(F.VM_ENTRY_INTR_INFO_FIELD) & ~_VALID)
        rip = g.rip
        if exit_.reason is not ExitReason.MONITOR_TRAP_FLAG and rip != exit_.guest_rip:
            g.rip = exit_.guest_rip  # (usually it is there already: the CPU stopped at it)
            rip = g.rip
        # Guest state is saved lazily: the first VMREAD of a guest-state field completes it.
        vmcs.save_guest(F.GUEST_RIP, rip)
        self._materialize_pending = True
        vmcs.lazy_fields = _LAZY_FIELDS
        vmcs.on_access = self.materialize
        # Host state (SDM 28.5): the VMM's CR0/CR4 come back from the host-state area.
        cpu.cr0, cpu.cr4 = vmcs.get(F.HOST_CR0) or cpu.cr0, vmcs.get(F.HOST_CR4) or cpu.cr4
        cpu.operation = VmxOperation.ROOT
        if exit_.reason is ExitReason.TRIPLE_FAULT:
            self.halted = False
        for listener in cpu.exit_listeners:
            listener(exit_)
        return exit_

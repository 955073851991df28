"""How a VMX instruction ends (SDM Vol. 3C 31.2), and where the processor is (SDM 24.3).

Every VMX instruction ends in VMsucceed, VMfailInvalid, VMfailValid (with the
VM-instruction error number) or a fault; VMLAUNCH/VMRESUME may also end in a VM exit
or a VM-entry failure.  :class:`VmxOutcome` says which, in the SDM's words.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..arch.errors import VmInstructionError
from ..arch.exceptions import Vector
from ..errors import VmxFailure

if TYPE_CHECKING:
    from .entry_checks import Violation
    from .vmexit import VmExit


class VmxOperation(str, enum.Enum):
    """Where the logical processor is with respect to VMX (SDM 24.3)."""

    OUTSIDE = "outside VMX operation"
    ROOT = "VMX root operation"
    NON_ROOT = "VMX non-root operation"


class Status(str, enum.Enum):
    """How a VMX instruction ended."""

    VMSUCCEED = "VMsucceed"
    VMFAIL_INVALID = "VMfailInvalid"
    VMFAIL_VALID = "VMfailValid"
    FAULT = "fault"
    VM_EXIT = "VM exit"               #: VMLAUNCH/VMRESUME entered the guest, which then exited
    ENTRY_FAILED = "VM-entry failure"  #: guest-state check failed: exit reason 33 | bit 31
    PAUSED = "paused"                  #: vtlab paused the guest (stepping); no exit happened


@dataclass(slots=True)
class VmxOutcome:
    """The result of one VMX instruction, printable in the SDM's terms."""

    instruction: str
    status: Status
    error: VmInstructionError | None = None
    vector: Vector | None = None
    message: str = ""
    value: int | None = None
    exit: "VmExit | None" = None
    #: Every VM-entry rule broken (a failed VMLAUNCH/VMRESUME); empty otherwise.
    violations: Sequence[Violation] = ()
    #: PAUSED because the guest sits in the HLT activity state (HLT did not exit).
    halted: bool = False

    @property
    def ok(self) -> bool:
        """True for VMsucceed, and for a VM entry that ran the guest."""
        return self.status in (Status.VMSUCCEED, Status.VM_EXIT, Status.PAUSED)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def rflags(self) -> dict[str, int]:
        """The arithmetic flags the instruction leaves (SDM 31.2): CF and ZF."""
        return {"CF": int(self.status is Status.VMFAIL_INVALID),
                "ZF": int(self.status is Status.VMFAIL_VALID)}

    def check(self) -> "VmxOutcome":
        """Raise :class:`vtlab.errors.VmxFailure` unless the instruction succeeded."""
        if not self.ok:
            raise VmxFailure(self)
        return self

    def __str__(self) -> str:
        text = f"{self.instruction}: {self.status.value}"
        if self.error is not None:
            text += f" (VM-instruction error {int(self.error)}: {self.error.description})"
        if self.vector is not None:
            text += f" #{Vector(self.vector).name}"
        if self.value is not None:
            text += f" -> {self.value:#x}"
        if self.exit is not None:
            text += f" -> {self.exit}"
        if self.message:
            text += f" - {self.message}"
        return text

    __repr__ = __str__

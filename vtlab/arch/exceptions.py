"""x86 exception vectors and the VMX interruption-information format.

* :class:`Vector` and :data:`EXCEPTION_INFO` - SDM Vol. 3A, 6.3.1 "IA-32 Exceptions"
  (Table 6-1 "Protected-Mode Exceptions and Interrupts").
* :class:`InterruptionType` and the ``INTR_INFO_*`` constants - the layout shared
  by the VM-entry interruption-information field, the VM-exit
  interruption-information field and the IDT-vectoring information field
  (SDM Vol. 3C, 25.8.3 Table 25-17 and 25.9.2 Table 25-19).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Vector",
    "ExceptionInfo",
    "EXCEPTION_INFO",
    "InterruptionType",
    "INTR_INFO_VECTOR_MASK",
    "INTR_INFO_TYPE_SHIFT",
    "INTR_INFO_TYPE_MASK",
    "INTR_INFO_DELIVER_CODE",
    "INTR_INFO_NMI_UNBLOCKING",
    "INTR_INFO_VALID",
    "IntrInfo",
]


class Vector(enum.IntEnum):
    """Architectural exception vectors 0-31 (the ones the SDM defines)."""

    DE = 0  #: divide error
    DB = 1  #: debug
    NMI = 2  #: non-maskable interrupt
    BP = 3  #: breakpoint (INT3)
    OF = 4  #: overflow (INTO)
    BR = 5  #: BOUND range exceeded
    UD = 6  #: invalid opcode
    NM = 7  #: device not available
    DF = 8  #: double fault
    TS = 10  #: invalid TSS
    NP = 11  #: segment not present
    SS = 12  #: stack-segment fault
    GP = 13  #: general protection
    PF = 14  #: page fault
    MF = 16  #: x87 floating-point error
    AC = 17  #: alignment check
    MC = 18  #: machine check
    XM = 19  #: SIMD floating-point exception
    VE = 20  #: virtualization exception
    CP = 21  #: control protection exception

    @property
    def info(self) -> "ExceptionInfo":
        """The :class:`ExceptionInfo` row for this vector."""
        return EXCEPTION_INFO[self]


@dataclass(frozen=True)
class ExceptionInfo:
    """One row of SDM Table 6-1.

    Attributes:
        mnemonic: e.g. ``"#GP"`` (``"NMI"`` for vector 2).
        name: the SDM's description, e.g. ``"General Protection"``.
        has_error_code: True if the CPU pushes an error code.
        exception_class: ``"fault"``, ``"trap"``, ``"abort"``, ``"interrupt"``, or
            ``"fault/trap"`` for #DB (data breakpoints trap, instruction ones fault).
    """

    mnemonic: str
    name: str
    has_error_code: bool
    exception_class: str


_V = Vector

#: SDM Table 6-1, one row per :class:`Vector`.
EXCEPTION_INFO: dict[Vector, ExceptionInfo] = {
    _V.DE: ExceptionInfo("#DE", "Divide Error", False, "fault"),
    _V.DB: ExceptionInfo("#DB", "Debug Exception", False, "fault/trap"),
    _V.NMI: ExceptionInfo("NMI", "NMI Interrupt", False, "interrupt"),
    _V.BP: ExceptionInfo("#BP", "Breakpoint", False, "trap"),
    _V.OF: ExceptionInfo("#OF", "Overflow", False, "trap"),
    _V.BR: ExceptionInfo("#BR", "BOUND Range Exceeded", False, "fault"),
    _V.UD: ExceptionInfo("#UD", "Invalid Opcode (Undefined Opcode)", False, "fault"),
    _V.NM: ExceptionInfo("#NM", "Device Not Available (No Math Coprocessor)", False, "fault"),
    _V.DF: ExceptionInfo("#DF", "Double Fault", True, "abort"),
    _V.TS: ExceptionInfo("#TS", "Invalid TSS", True, "fault"),
    _V.NP: ExceptionInfo("#NP", "Segment Not Present", True, "fault"),
    _V.SS: ExceptionInfo("#SS", "Stack-Segment Fault", True, "fault"),
    _V.GP: ExceptionInfo("#GP", "General Protection", True, "fault"),
    _V.PF: ExceptionInfo("#PF", "Page Fault", True, "fault"),
    _V.MF: ExceptionInfo("#MF", "x87 FPU Floating-Point Error (Math Fault)", False, "fault"),
    _V.AC: ExceptionInfo("#AC", "Alignment Check", True, "fault"),
    _V.MC: ExceptionInfo("#MC", "Machine Check", False, "abort"),
    _V.XM: ExceptionInfo("#XM", "SIMD Floating-Point Exception", False, "fault"),
    _V.VE: ExceptionInfo("#VE", "Virtualization Exception", False, "fault"),
    _V.CP: ExceptionInfo("#CP", "Control Protection Exception", True, "fault"),
}


class InterruptionType(enum.IntEnum):
    """Bits 10:8 of an interruption-information field: what kind of event it is."""

    EXTERNAL_INTERRUPT = 0
    RESERVED = 1
    NMI = 2
    HARDWARE_EXCEPTION = 3
    SOFTWARE_INTERRUPT = 4  #: INT n
    PRIVILEGED_SOFTWARE_EXCEPTION = 5  #: INT1 (ICEBP)
    SOFTWARE_EXCEPTION = 6  #: INT3 or INTO
    OTHER_EVENT = 7  #: e.g. MTF pending on VM entry


#: Bits 7:0: vector of the interrupt or exception.
INTR_INFO_VECTOR_MASK: int = 0xFF
#: Shift of the interruption type (bits 10:8).
INTR_INFO_TYPE_SHIFT: int = 8
#: Mask of the interruption type (bits 10:8).
INTR_INFO_TYPE_MASK: int = 0x7 << 8
#: Bit 11: an error code is delivered (entry) / was pushed (exit).
INTR_INFO_DELIVER_CODE: int = 1 << 11
#: Bit 12 (exit/IDT-vectoring only): NMI unblocking due to IRET.
INTR_INFO_NMI_UNBLOCKING: int = 1 << 12
#: Bit 31: the field is valid.
INTR_INFO_VALID: int = 1 << 31


@dataclass(frozen=True)
class IntrInfo:
    """A decoded interruption-information value (VM-entry, VM-exit or IDT-vectoring).

    ``IntrInfo(Vector.GP, InterruptionType.HARDWARE_EXCEPTION, True).encode()``
    gives ``0x80000B0D``.
    """

    vector: int
    type: InterruptionType
    deliver_error_code: bool = False
    valid: bool = True
    nmi_unblocking: bool = False

    def encode(self) -> int:
        """The 32-bit field value."""
        return (
            (int(self.vector) & INTR_INFO_VECTOR_MASK)
            | (int(self.type) << INTR_INFO_TYPE_SHIFT)
            | (INTR_INFO_DELIVER_CODE if self.deliver_error_code else 0)
            | (INTR_INFO_NMI_UNBLOCKING if self.nmi_unblocking else 0)
            | (INTR_INFO_VALID if self.valid else 0)
        )

    @classmethod
    def decode(cls, value: int) -> "IntrInfo":
        """Split a 32-bit interruption-information value into its fields."""
        return cls(
            vector=value & INTR_INFO_VECTOR_MASK,
            type=InterruptionType((value & INTR_INFO_TYPE_MASK) >> INTR_INFO_TYPE_SHIFT),
            deliver_error_code=bool(value & INTR_INFO_DELIVER_CODE),
            valid=bool(value & INTR_INFO_VALID),
            nmi_unblocking=bool(value & INTR_INFO_NMI_UNBLOCKING),
        )

    def as_dict(self) -> dict[str, object]:
        """Named fields for display."""
        try:
            vec: object = Vector(self.vector).name if self.type in (
                InterruptionType.HARDWARE_EXCEPTION,
                InterruptionType.SOFTWARE_EXCEPTION,
                InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION,
                InterruptionType.NMI,
            ) else self.vector
        except ValueError:
            vec = self.vector
        return {
            "vector": vec,
            "type": self.type.name,
            "deliver_error_code": self.deliver_error_code,
            "nmi_unblocking": self.nmi_unblocking,
            "valid": self.valid,
        }

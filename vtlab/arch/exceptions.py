"""x86 exception vectors and the VMX interruption-information format.

* :class:`Vector` and :data:`EXCEPTION_INFO` - SDM Vol. 3A, 6.3.1 "IA-32 Exceptions"
  (Table 6-1 "Protected-Mode Exceptions and Interrupts").
* :data:`ERROR_CODE_VECTORS` and the ``ERROR_CODE_*`` bits - which exceptions push an
  error code (Table 6-1) and its format for segment and IDT errors (SDM Vol. 3A, 6.13
  "Error Code").
* :class:`ExceptionClass`, :func:`exception_class` and :data:`DOUBLE_FAULT_CONDITIONS` -
  SDM Vol. 3A, 6.15 "Interrupt 8 - Double Fault Exception (#DF)": Table 6-4 "Interrupt
  and Exception Classes" and Table 6-5 "Conditions for Generating a Double Fault".
* :class:`InterruptionType` and the ``INTR_INFO_*`` constants - the layout shared
  by the VM-entry interruption-information field, the VM-exit
  interruption-information field and the IDT-vectoring information field
  (SDM Vol. 3C, 25.8.3 Table 25-17, 25.9.2 Table 25-19 and 25.9.3 "Format of the
  IDT-Vectoring Information Field"; filled on VM exits as 28.2.2 and 28.2.4 say).
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
    "ERROR_CODE_VECTORS",
    "ERROR_CODE_EXT",
    "ERROR_CODE_IDT",
    "ERROR_CODE_TI",
    "selector_error_code",
    "ExceptionClass",
    "CONTRIBUTORY_VECTORS",
    "PAGE_FAULT_CLASS_VECTORS",
    "exception_class",
    "DOUBLE_FAULT_CONDITIONS",
    "causes_double_fault",
    "SOFTWARE_EVENT_TYPES",
    "EXCEPTION_BITMAP_TYPES",
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
#: Bit 12 (VM-exit interruption information only; undefined in IDT-vectoring information,
#: SDM 25.9.2, 25.9.3): NMI unblocking due to IRET.
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


#: The exceptions that push an error code when delivered in protected mode (SDM Vol. 3A,
#: Table 6-1, column "Error Code": #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP).  In real-address
#: mode no exception pushes one (SDM Vol. 3A, "8086 Emulation": real-address-mode
#: interrupt handling pushes FLAGS, CS and IP only), so the VMX fields say "no error code"
#: there (SDM 27.2.1.3, 28.2.2, 28.2.4).
ERROR_CODE_VECTORS: frozenset[Vector] = frozenset(
    v for v, row in EXCEPTION_INFO.items() if row.has_error_code)

#: Error-code bit 0, EXT: the exception happened while delivering an event external to
#: the program - an interrupt, an NMI, an earlier exception or INT1 - and is clear when it
#: happened while delivering INT n, INT3 or INTO (SDM Vol. 3A 6.13, Figure 6-6).
ERROR_CODE_EXT: int = 1 << 0
#: Error-code bit 1, IDT: bits 15:3 are the index of a gate in the IDT (SDM Vol. 3A 6.13).
ERROR_CODE_IDT: int = 1 << 1
#: Error-code bit 2, TI: with IDT = 0, the index is into the LDT (1) or the GDT (0).
ERROR_CODE_TI: int = 1 << 2


def selector_error_code(index_or_selector: int, *, idt: bool = False, ext: bool = False) -> int:
    """The error code of a segment- or gate-related exception (SDM Vol. 3A 6.13).

    ``idt=True``: ``index_or_selector`` is an IDT vector and the code is ``vector * 8 | 2``
    (plus EXT); otherwise it is a segment selector, whose index and TI bit are kept
    (its RPL bits are replaced by IDT = 0 and EXT)."""
    if idt:
        code = (index_or_selector & 0xFF) << 3 | ERROR_CODE_IDT
    else:
        code = index_or_selector & 0xFFFC
    return code | (ERROR_CODE_EXT if ext else 0)


class ExceptionClass(enum.Enum):
    """SDM Vol. 3A Table 6-4 "Interrupt and Exception Classes"."""

    BENIGN = "benign"
    CONTRIBUTORY = "contributory"
    PAGE_FAULT = "page fault"


#: Table 6-4, "Contributory Exceptions": 0 #DE, 10 #TS, 11 #NP, 12 #SS, 13 #GP, 21 #CP.
CONTRIBUTORY_VECTORS: frozenset[Vector] = frozenset({_V.DE, _V.TS, _V.NP, _V.SS, _V.GP, _V.CP})
#: Table 6-4, "Page Faults": 14 #PF, 20 #VE.
PAGE_FAULT_CLASS_VECTORS: frozenset[Vector] = frozenset({_V.PF, _V.VE})

#: Table 6-5 "Conditions for Generating a Double Fault": (first event's class, class of
#: the exception raised while delivering it) -> True if the pair generates #DF, False if
#: the two are "handled serially" (the second is delivered, the first is lost and, if it
#: was a fault, raised again when its instruction is re-executed).
DOUBLE_FAULT_CONDITIONS: dict[tuple[ExceptionClass, ExceptionClass], bool] = {
    (ExceptionClass.BENIGN, ExceptionClass.BENIGN): False,
    (ExceptionClass.BENIGN, ExceptionClass.CONTRIBUTORY): False,
    (ExceptionClass.BENIGN, ExceptionClass.PAGE_FAULT): False,
    (ExceptionClass.CONTRIBUTORY, ExceptionClass.BENIGN): False,
    (ExceptionClass.CONTRIBUTORY, ExceptionClass.CONTRIBUTORY): True,
    (ExceptionClass.CONTRIBUTORY, ExceptionClass.PAGE_FAULT): False,
    (ExceptionClass.PAGE_FAULT, ExceptionClass.BENIGN): False,
    (ExceptionClass.PAGE_FAULT, ExceptionClass.CONTRIBUTORY): True,
    (ExceptionClass.PAGE_FAULT, ExceptionClass.PAGE_FAULT): True,
}


#: The interruption types whose event is caused by an instruction (INT n 4, INT1 5, INT3
#: and INTO 6): the ones that use the VM-entry instruction length on injection (27.6.1.1)
#: and report a VM-exit instruction length (28.2.5).
SOFTWARE_EVENT_TYPES: frozenset[InterruptionType] = frozenset({
    InterruptionType.SOFTWARE_INTERRUPT, InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION,
    InterruptionType.SOFTWARE_EXCEPTION})
#: The interruption types the exception bitmap applies to (SDM 26.2): hardware exceptions,
#: privileged software exceptions (INT1) and software exceptions (INT3, INTO) - not
#: software interrupts (INT n, whatever n), NMIs or external interrupts.
EXCEPTION_BITMAP_TYPES: frozenset[InterruptionType] = frozenset({
    InterruptionType.HARDWARE_EXCEPTION, InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION,
    InterruptionType.SOFTWARE_EXCEPTION})


def exception_class(vector: int, kind: InterruptionType = InterruptionType.HARDWARE_EXCEPTION
                    ) -> ExceptionClass:
    """The Table 6-4 class of an event: contributory or page fault for those hardware
    exceptions, benign for every other exception, for interrupts and for INT n."""
    if kind is InterruptionType.HARDWARE_EXCEPTION:
        if vector in CONTRIBUTORY_VECTORS:
            return ExceptionClass.CONTRIBUTORY
        if vector in PAGE_FAULT_CLASS_VECTORS:
            return ExceptionClass.PAGE_FAULT
    return ExceptionClass.BENIGN


def causes_double_fault(first: ExceptionClass, second: ExceptionClass) -> bool:
    """Table 6-5: does an exception of class ``second``, raised while delivering an event
    of class ``first``, generate a double fault (#DF)?"""
    return DOUBLE_FAULT_CONDITIONS[(first, second)]

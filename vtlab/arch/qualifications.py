"""Exit-qualification layouts (Intel SDM Vol. 3C, 28.2.1 "Basic VM-Exit Information").

The EXIT_QUALIFICATION field (0x6400) gives details about an exit; its layout
depends on the exit reason:

* :class:`TaskSwitchQualification` - Table 28-2 "Exit Qualification for Task Switches"
* :class:`IoQualification` - Table 28-5 "Exit Qualification for I/O Instructions"
* :class:`CrAccessQualification` - Table 28-3 "Exit Qualification for Control-Register Accesses"
* :class:`DrAccessQualification` - Table 28-4 "Exit Qualification for MOV DR"
* :class:`EptViolationQualification` - Table 28-7 "Exit Qualification for EPT Violations"

Each class has ``encode()`` (to the raw field value), a ``decode(value)``
classmethod and ``as_dict()`` for display.  :data:`GPR_ORDER` is the register
numbering the SDM uses in exit qualifications and in the VM-exit
instruction-information field (0 = RAX, 1 = RCX, ..., 15 = R15).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "GPR_ORDER",
    "gpr_name",
    "IoDirection",
    "IoQualification",
    "CrAccessType",
    "CrAccessQualification",
    "DrAccessDirection",
    "DrAccessQualification",
    "EptViolationQualification",
    "TaskSwitchSource",
    "TaskSwitchQualification",
]

#: SDM register numbering (Table 28-3 bits 11:8, Table 28-4, instruction information).
GPR_ORDER: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)


def gpr_name(number: int) -> str:
    """Name of SDM register ``number`` (0 -> ``"rax"``, 3 -> ``"rbx"``, 15 -> ``"r15"``)."""
    return GPR_ORDER[number]


def _gpr_number(reg: int | str) -> int:
    if isinstance(reg, str):
        return GPR_ORDER.index(reg.lower())
    if not 0 <= reg <= 15:
        raise ValueError(f"general-purpose register number {reg} is not in 0..15")
    return int(reg)


# ---------------------------------------------------------------------------
# I/O instructions
# ---------------------------------------------------------------------------


class IoDirection(enum.IntEnum):
    """Bit 3 of the I/O exit qualification."""

    OUT = 0
    IN = 1


_IO_SIZE_CODES = {1: 0, 2: 1, 4: 3}


@dataclass(frozen=True)
class IoQualification:
    """Exit qualification for IN, INS, OUT and OUTS (SDM Table 28-5).

    ====== ==============================================================
    bits   meaning
    ====== ==============================================================
    2:0    size of access - 1 (0 = 1 byte, 1 = 2 bytes, 3 = 4 bytes)
    3      direction: 0 = OUT, 1 = IN
    4      string instruction (INS/OUTS)
    5      REP prefixed
    6      operand encoding: 0 = port in DX, 1 = immediate port
    31:16  port number
    ====== ==============================================================

    ``IoQualification(port=0x60, size=1, direction=IoDirection.IN, immediate=True).encode()``
    is ``0x00600048`` (``in al, 0x60``).
    """

    port: int
    size: int = 1
    direction: IoDirection = IoDirection.OUT
    string: bool = False
    rep: bool = False
    immediate: bool = False

    def __post_init__(self) -> None:
        if self.size not in _IO_SIZE_CODES:
            raise ValueError(f"I/O access size must be 1, 2 or 4 bytes, not {self.size}")
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"I/O port {self.port:#x} is not in 0..0xFFFF")

    def encode(self) -> int:
        """The exit-qualification value."""
        return (
            _IO_SIZE_CODES[self.size]
            | (int(self.direction) << 3)
            | (int(self.string) << 4)
            | (int(self.rep) << 5)
            | (int(self.immediate) << 6)
            | (self.port << 16)
        )

    @classmethod
    def decode(cls, value: int) -> "IoQualification":
        """Split an I/O exit qualification into its fields."""
        code = value & 7
        sizes = {v: k for k, v in _IO_SIZE_CODES.items()}
        if code not in sizes:
            raise ValueError(f"I/O exit qualification {value:#x}: size code {code} is not used by the SDM")
        return cls(
            port=(value >> 16) & 0xFFFF,
            size=sizes[code],
            direction=IoDirection((value >> 3) & 1),
            string=bool(value & (1 << 4)),
            rep=bool(value & (1 << 5)),
            immediate=bool(value & (1 << 6)),
        )

    def as_dict(self) -> dict[str, object]:
        """Named fields for display."""
        return {
            "port": f"{self.port:#x}",
            "size": self.size,
            "direction": self.direction.name,
            "string": self.string,
            "rep": self.rep,
            "operand": "immediate" if self.immediate else "DX",
        }


# ---------------------------------------------------------------------------
# Control-register accesses
# ---------------------------------------------------------------------------


class CrAccessType(enum.IntEnum):
    """Bits 5:4 of the control-register-access exit qualification."""

    MOV_TO_CR = 0
    MOV_FROM_CR = 1
    CLTS = 2
    LMSW = 3


@dataclass(frozen=True)
class CrAccessQualification:
    """Exit qualification for control-register accesses (SDM Table 28-3).

    ====== ==============================================================
    bits   meaning
    ====== ==============================================================
    3:0    number of the control register (0 for CLTS and LMSW)
    5:4    access type: 0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW
    6      LMSW operand type: 0 register, 1 memory
    11:8   general-purpose register for MOV CR (see :data:`GPR_ORDER`)
    31:16  LMSW source data
    ====== ==============================================================

    ``mov cr3, rax`` gives 0x3; ``mov rbx, cr3`` gives 0x313.
    """

    cr: int
    access_type: CrAccessType = CrAccessType.MOV_TO_CR
    gpr: int = 0
    lmsw_memory_operand: bool = False
    lmsw_source: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.cr <= 15:
            raise ValueError(f"control register number {self.cr} is not in 0..15")
        if not 0 <= self.gpr <= 15:
            raise ValueError(f"general-purpose register number {self.gpr} is not in 0..15")
        if not 0 <= self.lmsw_source <= 0xFFFF:
            raise ValueError(f"LMSW source data {self.lmsw_source:#x} does not fit in 16 bits")

    @classmethod
    def mov(cls, cr: int, reg: int | str, to_cr: bool) -> "CrAccessQualification":
        """Qualification for ``mov crN, reg`` (``to_cr=True``) or ``mov reg, crN``."""
        return cls(cr, CrAccessType.MOV_TO_CR if to_cr else CrAccessType.MOV_FROM_CR, _gpr_number(reg))

    @property
    def register(self) -> str:
        """Name of the general-purpose register operand (meaningful for MOV CR)."""
        return GPR_ORDER[self.gpr]

    def encode(self) -> int:
        """The exit-qualification value."""
        return (
            self.cr
            | (int(self.access_type) << 4)
            | (int(self.lmsw_memory_operand) << 6)
            | (self.gpr << 8)
            | (self.lmsw_source << 16)
        )

    @classmethod
    def decode(cls, value: int) -> "CrAccessQualification":
        """Split a control-register-access exit qualification into its fields."""
        return cls(
            cr=value & 0xF,
            access_type=CrAccessType((value >> 4) & 3),
            gpr=(value >> 8) & 0xF,
            lmsw_memory_operand=bool(value & (1 << 6)),
            lmsw_source=(value >> 16) & 0xFFFF,
        )

    def as_dict(self) -> dict[str, object]:
        """Named fields for display."""
        d: dict[str, object] = {"cr": self.cr, "access_type": self.access_type.name}
        if self.access_type in (CrAccessType.MOV_TO_CR, CrAccessType.MOV_FROM_CR):
            d["register"] = self.register
        if self.access_type == CrAccessType.LMSW:
            d["lmsw_operand"] = "memory" if self.lmsw_memory_operand else "register"
            d["lmsw_source"] = f"{self.lmsw_source:#x}"
        return d


# ---------------------------------------------------------------------------
# MOV DR
# ---------------------------------------------------------------------------


class DrAccessDirection(enum.IntEnum):
    """Bit 4 of the MOV-DR exit qualification."""

    MOV_TO_DR = 0
    MOV_FROM_DR = 1


@dataclass(frozen=True)
class DrAccessQualification:
    """Exit qualification for MOV DR (SDM Table 28-4).

    Bits 2:0 debug register number, bit 4 direction (0 MOV to DR, 1 MOV from
    DR), bits 11:8 general-purpose register (see :data:`GPR_ORDER`).
    """

    dr: int
    direction: DrAccessDirection = DrAccessDirection.MOV_TO_DR
    gpr: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.dr <= 7:
            raise ValueError(f"debug register number {self.dr} is not in 0..7")
        if not 0 <= self.gpr <= 15:
            raise ValueError(f"general-purpose register number {self.gpr} is not in 0..15")

    @property
    def register(self) -> str:
        """Name of the general-purpose register operand."""
        return GPR_ORDER[self.gpr]

    def encode(self) -> int:
        """The exit-qualification value."""
        return self.dr | (int(self.direction) << 4) | (self.gpr << 8)

    @classmethod
    def decode(cls, value: int) -> "DrAccessQualification":
        """Split a MOV-DR exit qualification into its fields."""
        return cls(
            dr=value & 7,
            direction=DrAccessDirection((value >> 4) & 1),
            gpr=(value >> 8) & 0xF,
        )

    def as_dict(self) -> dict[str, object]:
        """Named fields for display."""
        return {"dr": self.dr, "direction": self.direction.name, "register": self.register}


# ---------------------------------------------------------------------------
# EPT violations
# ---------------------------------------------------------------------------

_EPT_BITS: tuple[tuple[str, int], ...] = (
    ("read", 0),
    ("write", 1),
    ("fetch", 2),
    ("readable", 3),
    ("writable", 4),
    ("executable", 5),
    ("user_executable", 6),
    ("gla_valid", 7),
    ("gla_translation", 8),
    ("user_mode_linear", 9),
    ("linear_writable", 10),
    ("linear_execute_disable", 11),
    ("nmi_unblocking", 12),
    ("shadow_stack", 13),
)
_EPT_NAMED_MASK = sum(1 << b for _, b in _EPT_BITS)


@dataclass(frozen=True)
class EptViolationQualification:
    """Exit qualification for EPT violations (SDM Table 28-7).

    Attributes (bit):
        read (0), write (1), fetch (2): the kind of access that faulted.
        readable (3), writable (4), executable (5): the permissions the EPT
            entries granted (AND of all levels; all 0 if not present).
        user_executable (6): execute permission for user-mode linear addresses
            (only with mode-based execute control).
        gla_valid (7): the GUEST_LINEAR_ADDRESS field is valid.
        gla_translation (8): if gla_valid, 1 = the access was to the translated
            linear address, 0 = to a guest paging-structure entry.
        user_mode_linear (9), linear_writable (10), linear_execute_disable (11):
            advanced VM-exit information about the linear address.
        nmi_unblocking (12): NMI unblocking due to IRET.
        shadow_stack (13): the access was a shadow-stack access.
        other_bits: any other bits of the raw value, kept so that
            ``decode(v).encode() == v``.
    """

    read: bool = False
    write: bool = False
    fetch: bool = False
    readable: bool = False
    writable: bool = False
    executable: bool = False
    user_executable: bool = False
    gla_valid: bool = False
    gla_translation: bool = False
    user_mode_linear: bool = False
    linear_writable: bool = False
    linear_execute_disable: bool = False
    nmi_unblocking: bool = False
    shadow_stack: bool = False
    other_bits: int = 0

    def encode(self) -> int:
        """The exit-qualification value."""
        value = self.other_bits & ~_EPT_NAMED_MASK
        for name, bit in _EPT_BITS:
            if getattr(self, name):
                value |= 1 << bit
        return value

    @classmethod
    def decode(cls, value: int) -> "EptViolationQualification":
        """Split an EPT-violation exit qualification into its fields."""
        flags = {name: bool(value >> bit & 1) for name, bit in _EPT_BITS}
        return cls(**flags, other_bits=value & ~_EPT_NAMED_MASK)  # type: ignore[arg-type]

    @property
    def access(self) -> str:
        """The faulting access as a short string, e.g. ``"write"`` or ``"read+fetch"``."""
        parts = [n for n in ("read", "write", "fetch") if getattr(self, n)]
        return "+".join(parts) or "none"

    @property
    def permissions(self) -> str:
        """The EPT permissions in ``rwx`` style, e.g. ``"r--"``."""
        return (
            ("r" if self.readable else "-")
            + ("w" if self.writable else "-")
            + ("x" if self.executable else "-")
        )

    def as_dict(self) -> dict[str, object]:
        """Named fields for display."""
        d: dict[str, object] = {"access": self.access, "ept_permissions": self.permissions}
        d.update({name: getattr(self, name) for name, _ in _EPT_BITS[6:]})
        if self.other_bits:
            d["other_bits"] = f"{self.other_bits:#x}"
        return d


# ---------------------------------------------------------------------------
# Task switches
# ---------------------------------------------------------------------------


class TaskSwitchSource(enum.IntEnum):
    """Bits 31:30 of the task-switch exit qualification: what started the switch."""

    CALL = 0       #: CALL to a TSS or to a task gate
    IRET = 1       #: IRET with RFLAGS.NT = 1 (back to the previous-task link)
    JMP = 2        #: JMP to a TSS or to a task gate
    TASK_GATE = 3  #: an event delivered through a task gate in the IDT


@dataclass(frozen=True)
class TaskSwitchQualification:
    """Exit qualification for task switches (SDM Table 28-2).

    Bits 15:0 the selector of the TSS switched to; bits 29:16 not currently defined
    (kept in ``other_bits`` so ``decode(v).encode() == v``); bits 31:30 the source.
    """

    selector: int
    source: TaskSwitchSource = TaskSwitchSource.CALL
    other_bits: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.selector <= 0xFFFF:
            raise ValueError(f"TSS selector {self.selector:#x} is not a 16-bit value")

    def encode(self) -> int:
        """The exit-qualification value."""
        return self.selector | (self.other_bits & 0x3FFF_0000) | int(self.source) << 30

    @classmethod
    def decode(cls, value: int) -> "TaskSwitchQualification":
        """Split a task-switch exit qualification into its fields."""
        return cls(selector=value & 0xFFFF, source=TaskSwitchSource((value >> 30) & 3),
                   other_bits=value & 0x3FFF_0000)

    def as_dict(self) -> dict[str, object]:
        """Named fields for display."""
        d: dict[str, object] = {"tss_selector": f"{self.selector:#06x}", "source": self.source.name}
        if self.other_bits:
            d["other_bits"] = f"{self.other_bits:#x}"
        return d

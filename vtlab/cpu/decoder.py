"""Guest instructions decoded once, at load time, into typed records.

A VMM that emulates or reports an instruction needs more than its text: which
instruction it is, which general-purpose register it names (as the *number* the SDM
puts in exit qualifications), which memory operand it uses and where that operand
lies, which prefixes it carries, how long it is.  Real hardware hands the VMM those
facts ready-made in the exit-information fields (SDM Vol. 3C 28.2); vtlab computes
them here, once per instruction when code is loaded, from Capstone's *numeric*
decode - its instruction id and register ids - and never from the disassembly text.

* :class:`InsnKind` - the instructions VMX cares about (they can cause a VM exit, or
  behave differently in VMX non-root operation), and ``OTHER``.
* :class:`DecodedInstruction` - one instruction: kind, length, prefixes, sizes,
  register operands as SDM register numbers (:class:`Register`), the memory operand
  (:class:`MemoryOperand`, which can compute its linear address), an immediate, and the
  control/debug register of MOV CR/DR.
* :func:`sweep` - disassemble a program and decode its instructions of interest
  (what :meth:`vtlab.cpu.guest.Guest.load` uses); :func:`decode_instruction` - decode
  one instruction.

Register numbers follow the SDM's encoding of the general-purpose registers (the one
exit qualifications and the VM-exit instruction-information field use, SDM Vol. 3C
Tables 28-3 and 28-10): 0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15
R8-R15 - whatever the width (EBX, BX and BL are all register 3).  Segment registers
are numbered as in the instruction-information field (Table 28-10, bits 17:15): 0 ES,
1 CS, 2 SS, 3 DS, 4 FS, 5 GS.

Unicorn (QEMU) does not implement GETSEC or the VMX instructions, but Capstone decodes
them like any other, so they get records too.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import capstone
from capstone import x86_const as C

from .asm import _CS_MODE, Instruction

__all__ = [
    "InsnKind",
    "Register",
    "MemoryOperand",
    "Prefixes",
    "DecodedInstruction",
    "UnknownRegisterError",
    "SEGMENT_NAMES",
    "IO_KINDS",
    "sdm_register",
    "register_name",
    "decode_instruction",
    "sweep",
]


class InsnKind(enum.IntEnum):
    """The instructions vtlab's VMX model tells apart (everything else is ``OTHER``).

    Most can cause a VM exit (SDM Vol. 3C 26.1); SMSW never exits but reads CR0 through
    the read shadow (SDM 25.6.6).  MOV to/from CR and DR are separate kinds: the
    direction changes what they do and what the exit qualification says (Tables 28-3
    and 28-4).  An ``IntEnum`` so that looking one up in a dict is a C-level int hash.

    ``INT1`` is ICEBP (F1), a privileged software exception (#DB, interruption type 5,
    SDM 25.8.3); ``FAR_JMP`` / ``FAR_CALL`` are JMP/CALL ptr16:16/32 (EA, 9A) and m16:16/32/64
    (FF /5, FF /3), and ``IRET`` is IRET/IRETD/IRETQ: a task switch in non-root operation
    (to a TSS or through a task gate, or IRET with NT = 1) is a VM exit (SDM 26.4.2).
    """

    OTHER = 0
    CPUID = enum.auto()
    GETSEC = enum.auto()
    INVD = enum.auto()
    XSETBV = enum.auto()
    VMCALL = enum.auto()
    VMCLEAR = enum.auto()
    VMLAUNCH = enum.auto()
    VMPTRLD = enum.auto()
    VMPTRST = enum.auto()
    VMREAD = enum.auto()
    VMRESUME = enum.auto()
    VMWRITE = enum.auto()
    VMXOFF = enum.auto()
    VMXON = enum.auto()
    INVEPT = enum.auto()
    INVVPID = enum.auto()
    HLT = enum.auto()
    INVLPG = enum.auto()
    RDPMC = enum.auto()
    RDTSC = enum.auto()
    RDTSCP = enum.auto()
    MONITOR = enum.auto()
    MWAIT = enum.auto()
    PAUSE = enum.auto()
    WBINVD = enum.auto()
    RDRAND = enum.auto()
    RDSEED = enum.auto()
    MOV_TO_CR = enum.auto()
    MOV_FROM_CR = enum.auto()
    MOV_TO_DR = enum.auto()
    MOV_FROM_DR = enum.auto()
    CLTS = enum.auto()
    LMSW = enum.auto()
    SMSW = enum.auto()
    IN = enum.auto()
    OUT = enum.auto()
    INS = enum.auto()
    OUTS = enum.auto()
    RDMSR = enum.auto()
    WRMSR = enum.auto()
    LGDT = enum.auto()
    LIDT = enum.auto()
    SGDT = enum.auto()
    SIDT = enum.auto()
    LLDT = enum.auto()
    LTR = enum.auto()
    SLDT = enum.auto()
    STR = enum.auto()
    INT1 = enum.auto()
    FAR_JMP = enum.auto()
    FAR_CALL = enum.auto()
    IRET = enum.auto()
    SYSENTER = enum.auto()
    SYSEXIT = enum.auto()


#: The I/O instructions (SDM Vol. 1 chapter 19): what the I/O-permission check and the
#: I/O exit rules look at.
IO_KINDS: frozenset[InsnKind] = frozenset({InsnKind.IN, InsnKind.OUT, InsnKind.INS, InsnKind.OUTS})

#: SDM segment-register numbers (Table 28-10 bits 17:15) -> vtlab's register names.
SEGMENT_NAMES: tuple[str, ...] = ("es", "cs", "ss", "ds", "fs", "gs")
ES, CS, SS, DS, FS, GS = range(6)


class UnknownRegisterError(ValueError):
    """A Capstone register id that has no SDM general-purpose register number."""


# ------------------------------------------------------------------ the id tables
# Built once from capstone.x86_const, so the tables follow whatever numbering the
# installed Capstone uses.  Only the numbers are compared at run time.
def _cs(name: str) -> int:
    return getattr(C, name)


#: Capstone instruction id -> kind (MOV is resolved by its operands, see _kind()).
_KIND_BY_ID: dict[int, InsnKind] = {
    _cs(f"X86_INS_{name}"): kind for name, kind in (
        ("CPUID", InsnKind.CPUID), ("GETSEC", InsnKind.GETSEC), ("INVD", InsnKind.INVD),
        ("XSETBV", InsnKind.XSETBV), ("VMCALL", InsnKind.VMCALL),
        ("VMCLEAR", InsnKind.VMCLEAR), ("VMLAUNCH", InsnKind.VMLAUNCH),
        ("VMPTRLD", InsnKind.VMPTRLD), ("VMPTRST", InsnKind.VMPTRST),
        ("VMREAD", InsnKind.VMREAD), ("VMRESUME", InsnKind.VMRESUME),
        ("VMWRITE", InsnKind.VMWRITE), ("VMXOFF", InsnKind.VMXOFF), ("VMXON", InsnKind.VMXON),
        ("INVEPT", InsnKind.INVEPT), ("INVVPID", InsnKind.INVVPID),
        ("HLT", InsnKind.HLT), ("INVLPG", InsnKind.INVLPG), ("RDPMC", InsnKind.RDPMC),
        ("RDTSC", InsnKind.RDTSC), ("RDTSCP", InsnKind.RDTSCP),
        ("MONITOR", InsnKind.MONITOR), ("MWAIT", InsnKind.MWAIT), ("PAUSE", InsnKind.PAUSE),
        ("WBINVD", InsnKind.WBINVD), ("RDRAND", InsnKind.RDRAND), ("RDSEED", InsnKind.RDSEED),
        ("CLTS", InsnKind.CLTS), ("LMSW", InsnKind.LMSW), ("SMSW", InsnKind.SMSW),
        ("IN", InsnKind.IN), ("OUT", InsnKind.OUT),
        ("INSB", InsnKind.INS), ("INSW", InsnKind.INS), ("INSD", InsnKind.INS),
        ("OUTSB", InsnKind.OUTS), ("OUTSW", InsnKind.OUTS), ("OUTSD", InsnKind.OUTS),
        ("RDMSR", InsnKind.RDMSR), ("WRMSR", InsnKind.WRMSR),
        ("LGDT", InsnKind.LGDT), ("LIDT", InsnKind.LIDT), ("SGDT", InsnKind.SGDT),
        ("SIDT", InsnKind.SIDT), ("LLDT", InsnKind.LLDT), ("LTR", InsnKind.LTR),
        ("SLDT", InsnKind.SLDT), ("STR", InsnKind.STR),
        ("INT1", InsnKind.INT1), ("LJMP", InsnKind.FAR_JMP), ("LCALL", InsnKind.FAR_CALL),
        ("IRET", InsnKind.IRET), ("IRETD", InsnKind.IRET), ("IRETQ", InsnKind.IRET),
        ("SYSENTER", InsnKind.SYSENTER), ("SYSEXIT", InsnKind.SYSEXIT),
    )
}
#: JMP/CALL: Capstone calls the far indirect forms FF /5 and FF /3 (m16:16/32/64) plain
#: JMP/CALL unless an operand-size prefix is present, so the sweep looks at their ModRM
#: byte (:func:`_far_indirect`) - a byte test on each JMP/CALL, at load time only.
_JMP_CALL = frozenset({C.X86_INS_JMP, C.X86_INS_CALL})
#: Legacy prefix bytes (SDM Vol. 2 2.1.1), skipped to find the opcode.
_LEGACY_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
_MOV = C.X86_INS_MOV
#: MOV to/from CRn is 0F 22 / 0F 20, to/from DRn 0F 23 / 0F 21 (SDM Vol. 2, MOV).  The
#: sweep looks for those opcode bytes before asking Capstone for operand details, so
#: that the thousands of ordinary MOVs of a program are not decoded twice.  (A false
#: hit - the bytes inside a displacement - costs one detailed decode, nothing more.)
_MOV_CR_DR_OPCODE = re.compile(rb"\x0f[\x20-\x23]")

_GPR_NAMES_64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi") + tuple(f"r{n}" for n in range(8, 16))
_GPR_NAMES_32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi") + tuple(f"r{n}d" for n in range(8, 16))
_GPR_NAMES_16 = ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di") + tuple(f"r{n}w" for n in range(8, 16))
# The low bytes; AH, CH, DH and BH have no number of their own (their encodings 4-7
# mean SPL..DIL once a REX prefix is present), so they are deliberately absent.
_GPR_NAMES_8 = ("al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil") + tuple(f"r{n}b" for n in range(8, 16))
_GPR_NAMES: dict[int, tuple[str, ...]] = {64: _GPR_NAMES_64, 32: _GPR_NAMES_32, 16: _GPR_NAMES_16,
                                          8: _GPR_NAMES_8}

#: Capstone register id -> (SDM register number, width in bits).
_GPR_BY_ID: dict[int, tuple[int, int]] = {
    _cs("X86_REG_" + names[number].upper()): (number, width)
    for width, names in _GPR_NAMES.items() for number in range(16)
}
_CR_BY_ID: dict[int, int] = {_cs(f"X86_REG_CR{n}"): n for n in range(16)}
_DR_BY_ID: dict[int, int] = {_cs(f"X86_REG_DR{n}"): n for n in range(16)}
_SEGMENT_BY_ID: dict[int, int] = {_cs(f"X86_REG_{name.upper()}"): n for n, name in enumerate(SEGMENT_NAMES)}
_RIP_IDS = frozenset({C.X86_REG_RIP, C.X86_REG_EIP, C.X86_REG_IP})
#: Segment-override prefix byte -> SDM segment number (SDM Vol. 2 2.1.1, group 2).
_SEGMENT_PREFIX: dict[int, int] = {0x26: ES, 0x2E: CS, 0x36: SS, 0x3E: DS, 0x64: FS, 0x65: GS}
_ADDRESS_MASK = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}


def sdm_register(capstone_id: int) -> tuple[int, int]:
    """(SDM register number, width in bits) of a Capstone general-purpose register id.

    ``sdm_register(X86_REG_EBX)`` is ``(3, 32)``, ``sdm_register(X86_REG_R9W)`` is
    ``(9, 16)``.  Raises :class:`UnknownRegisterError` for any other register (AH,
    a segment register, XMM0 ...): there is no number to give, and guessing one (RAX)
    would make an exit qualification lie.
    """
    try:
        return _GPR_BY_ID[capstone_id]
    except KeyError:
        raise UnknownRegisterError(
            f"Capstone register {_capstone_register_name(capstone_id)} has no SDM "
            "general-purpose register number (0 = RAX ... 15 = R15)") from None


def register_name(number: int, width: int = 64) -> str:
    """vtlab's name of SDM register ``number`` at ``width`` bits: (3, 32) -> ``"ebx"``."""
    return _GPR_NAMES[width][number]


@lru_cache(maxsize=None)
def _capstone_register_name(capstone_id: int) -> str:
    for name, value in vars(C).items():
        if name.startswith("X86_REG_") and value == capstone_id:
            return name
    return f"#{capstone_id}"


# ------------------------------------------------------------------ the records
class RegisterFile(Protocol):
    """What a memory operand needs from a CPU to find its address (a Guest has it)."""

    rip: int

    def reg(self, name: str) -> int: ...

    def segment(self, name: str): ...  # an object with a ``base``


@dataclass(frozen=True, slots=True)
class Register:
    """A general-purpose register operand: SDM number and width (bits).

    ``Register(3, 32)`` is EBX.  :attr:`name` is vtlab's register name, for reading it
    with ``guest.reg()``.
    """

    number: int
    width: int

    @property
    def name(self) -> str:
        return _GPR_NAMES[self.width][self.number]


@dataclass(frozen=True, slots=True)
class MemoryOperand:
    """A memory operand: ``segment:[base + index * scale + displacement]``.

    ``segment`` is the SDM number of the segment used - the override prefix's, or the
    default: SS when the base is rSP or rBP, DS otherwise (SDM Vol. 1 3.7.4, Table 3-5),
    ES for the destination of INS (which no prefix can change).  ``base`` and ``index``
    are SDM register numbers or None; ``displacement`` is the signed displacement field
    (``displacement_size`` bytes of it, 0 if there is none); ``address_size`` is the
    instruction's address size in bits (16, 32 or 64, after any 67H prefix);
    ``rip_relative`` marks 64-bit RIP-relative addressing ``[rip + disp]``; ``size`` is
    how many bytes the instruction accesses there; ``code_size`` the code size it was
    decoded for.
    """

    segment: int
    base: int | None
    index: int | None
    scale: int
    displacement: int
    displacement_size: int
    address_size: int
    rip_relative: bool
    size: int
    code_size: int

    @property
    def scaling(self) -> int:
        """log2 of the scale (0 for *1 ... 3 for *8), as instruction information encodes it."""
        return self.scale.bit_length() - 1

    @property
    def segment_name(self) -> str:
        return SEGMENT_NAMES[self.segment]

    def offset(self, cpu: RegisterFile, next_rip: int) -> int:
        """The effective address (offset in the segment), wrapped to the address size.

        Base and index are read at full width: the sum truncated to 16 or 32 bits is the
        same as the sum of the truncated registers, as the CPU computes it (SDM Vol. 1
        3.7.5).  ``next_rip`` is the RIP of the following instruction, the base of
        RIP-relative addressing (SDM Vol. 2 2.2.1.6).
        """
        offset = self.displacement
        if self.rip_relative:
            offset += next_rip
        elif self.base is not None:
            offset += cpu.reg(_GPR_NAMES_64[self.base])
        if self.index is not None:
            offset += cpu.reg(_GPR_NAMES_64[self.index]) * self.scale
        return offset & _ADDRESS_MASK[self.address_size]

    def linear_address(self, cpu: RegisterFile, next_rip: int) -> int:
        """Segment base + effective address: the linear address of the operand.

        In 64-bit mode the CPU treats the bases of ES, CS, SS and DS as 0 (only FS and GS
        keep theirs; SDM Vol. 3A 3.4.4) and linear addresses have 64 bits; outside it
        they have 32 bits (SDM Vol. 3A 3.4).
        """
        offset = self.offset(cpu, next_rip)
        if self.code_size == 64:
            if self.segment < FS:
                return offset
            return (cpu.segment(SEGMENT_NAMES[self.segment]).base + offset) & _ADDRESS_MASK[64]
        return (cpu.segment(SEGMENT_NAMES[self.segment]).base + offset) & _ADDRESS_MASK[32]


@dataclass(frozen=True, slots=True)
class Prefixes:
    """The legacy prefixes of an instruction (SDM Vol. 2 2.1.1).

    ``rep`` is F3H (REP / REPE), ``repne`` F2H, ``lock`` F0H, ``operand_size`` 66H,
    ``address_size`` 67H; ``segment`` the SDM number of a segment-override prefix or
    None.  Capstone reports a mandatory F3H (PAUSE, VMXON) as part of the opcode, not
    here, but a mandatory 66H (VMCLEAR, INVEPT) as ``operand_size``.
    """

    rep: bool = False
    repne: bool = False
    lock: bool = False
    operand_size: bool = False
    address_size: bool = False
    segment: int | None = None


_NO_PREFIXES = Prefixes()


@dataclass(frozen=True, slots=True)
class DecodedInstruction:
    """One guest instruction, decoded once: everything VMX needs to know about it.

    ``text`` is the disassembly, for display only - no decision looks at it.  Sizes are
    in bits: ``code_size`` is the code size it was decoded for (16, 32, 64),
    ``operand_size`` the operand-size attribute (code size, 66H and REX.W: SDM Vol. 1
    3.6.1; an instruction with fixed-size operands, such as MOV CR, shows its true
    width in its register operands), ``address_size`` the address-size attribute.
    ``registers`` are the general-purpose register operands in Intel operand order
    (destination first), ``memory`` the memory operand, ``immediate`` an immediate
    operand as an unsigned number (the port of ``in al, 0x60``).  ``control_register``
    is N of a MOV to/from CRn and 0 for CLTS, LMSW and SMSW (they access CR0);
    ``debug_register`` is N of a MOV to/from DRn.
    """

    address: int
    length: int
    raw: bytes
    text: str
    kind: InsnKind
    code_size: int
    operand_size: int
    address_size: int
    prefixes: Prefixes = _NO_PREFIXES
    registers: tuple[Register, ...] = ()
    memory: MemoryOperand | None = None
    immediate: int | None = None
    control_register: int | None = None
    debug_register: int | None = None

    @property
    def register(self) -> Register | None:
        """The first general-purpose register operand (None if it has none)."""
        return self.registers[0] if self.registers else None

    @property
    def to_special_register(self) -> bool | None:
        """MOV CR/DR direction: True for MOV to CRn/DRn, False for MOV from; else None."""
        if self.kind in (InsnKind.MOV_TO_CR, InsnKind.MOV_TO_DR):
            return True
        if self.kind in (InsnKind.MOV_FROM_CR, InsnKind.MOV_FROM_DR):
            return False
        return None

    def linear_address(self, cpu: RegisterFile) -> int:
        """Linear address of the memory operand, with the CPU's registers now (RIP at
        this instruction).  Raises ValueError if the instruction has no memory operand."""
        if self.memory is None:
            raise ValueError(f"{self.text!r} has no memory operand")
        return self.memory.linear_address(cpu, cpu.rip + self.length)

    def __str__(self) -> str:
        return f"{self.address:#06x}: {self.raw.hex(' '):<24} {self.text}  [{self.kind.name}]"


# ------------------------------------------------------------------ decoding
@lru_cache(maxsize=None)
def _capstone(bits: int, detail: bool) -> capstone.Cs:
    cs = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODE[bits])
    cs.detail = detail
    return cs


def _far_indirect(raw: bytes, bits: int) -> InsnKind | None:
    """FAR_JMP for JMP m16:xx (FF /5), FAR_CALL for CALL m16:xx (FF /3), else None.

    The opcode follows the legacy prefixes (and, in 64-bit code, one REX prefix); the
    ModRM byte's reg field selects the form and mod = 11B (a register) is not a far
    form at all (SDM Vol. 2, JMP and CALL; Table A-6, opcode group 5).
    """
    i, n = 0, len(raw)
    while i < n and raw[i] in _LEGACY_PREFIXES:
        i += 1
    if bits == 64 and i < n and 0x40 <= raw[i] <= 0x4F:
        i += 1
    if i + 1 >= n or raw[i] != 0xFF or raw[i + 1] >> 6 == 3:
        return None
    reg = (raw[i + 1] >> 3) & 7
    return InsnKind.FAR_JMP if reg == 5 else InsnKind.FAR_CALL if reg == 3 else None


def _kind(insn, bits: int) -> InsnKind:
    """The kind of a (detailed) Capstone instruction, from its id and operand ids."""
    if insn.id in _JMP_CALL:
        return _far_indirect(bytes(insn.bytes), bits) or InsnKind.OTHER
    kind = _KIND_BY_ID.get(insn.id)
    if kind is not None:
        if kind is InsnKind.VMPTRLD and bits == 16 and insn.prefix[2] == 0x66:
            # VMCLEAR is 66 0F C7 /6, VMPTRLD NP 0F C7 /6 in every mode (SDM Vol. 3C
            # 31.3); Capstone 5 takes the mandatory 66H of 16-bit code for an operand-size
            # prefix and calls both VMPTRLD.  (It cannot decode INVEPT/INVVPID in 16-bit
            # code at all, so the sweep ends before them, as the disassembly does.)
            return InsnKind.VMCLEAR
        return kind
    if insn.id == _MOV:
        for position, op in enumerate(insn.operands):
            if op.type != C.X86_OP_REG:
                continue
            if op.reg in _CR_BY_ID:
                return InsnKind.MOV_TO_CR if position == 0 else InsnKind.MOV_FROM_CR
            if op.reg in _DR_BY_ID:
                return InsnKind.MOV_TO_DR if position == 0 else InsnKind.MOV_FROM_DR
    return InsnKind.OTHER


def _operand_size(bits: int, prefix66: bool, rex: int) -> int:
    """Operand-size attribute (SDM Vol. 1 3.6.1, Table 3-4): REX.W gives 64 bits in
    64-bit mode; otherwise 66H toggles the default (16 in 16-bit code, else 32)."""
    if bits == 64 and rex & 0x8:
        return 64
    default = 16 if bits == 16 else 32
    return (48 - default) if prefix66 else default  # 16 <-> 32


def _record(insn, bits: int) -> DecodedInstruction:
    kind = _kind(insn, bits)
    strict = kind is not InsnKind.OTHER  # an unknown register is an error only where it matters
    p = insn.prefix
    prefixes = Prefixes(rep=p[0] == 0xF3, repne=p[0] == 0xF2, lock=p[0] == 0xF0,
                        operand_size=p[2] == 0x66, address_size=p[3] == 0x67,
                        segment=_SEGMENT_PREFIX.get(p[1]))
    address_size = insn.addr_size * 8
    raw = bytes(insn.bytes)
    registers: list[Register] = []
    memory = immediate = cr = dr = None
    for op in insn.operands:
        if op.type == C.X86_OP_REG:
            reg = op.reg
            if reg in _CR_BY_ID:
                cr = _CR_BY_ID[reg]
            elif reg in _DR_BY_ID:
                dr = _DR_BY_ID[reg]
            elif reg in _GPR_BY_ID:
                registers.append(Register(*_GPR_BY_ID[reg]))
            elif strict and reg not in _SEGMENT_BY_ID:
                sdm_register(reg)  # raises UnknownRegisterError, naming the register
        elif op.type == C.X86_OP_IMM and immediate is None:
            immediate = op.imm & ((1 << (8 * (op.size or 8))) - 1)
        elif op.type == C.X86_OP_MEM and memory is None:
            try:
                memory = _memory_operand(insn, op, kind, bits, address_size, raw)
            except UnknownRegisterError:
                if strict:
                    raise
    if kind in (InsnKind.CLTS, InsnKind.LMSW, InsnKind.SMSW):
        cr = 0  # they access CR0 (the CR-access qualification reports CR number 0)
    mnemonic = "vmclear" if kind is InsnKind.VMCLEAR else insn.mnemonic  # (see _kind)
    return DecodedInstruction(
        address=insn.address, length=insn.size, raw=raw,
        text=f"{mnemonic} {insn.op_str}".strip(), kind=kind, code_size=bits,
        operand_size=_operand_size(bits, prefixes.operand_size, insn.rex if bits == 64 else 0),
        address_size=address_size, prefixes=prefixes, registers=tuple(registers),
        memory=memory, immediate=immediate, control_register=cr, debug_register=dr)


def _memory_operand(insn, op, kind: InsnKind, bits: int, address_size: int, raw: bytes) -> MemoryOperand:
    mem = op.mem
    rip_relative = mem.base in _RIP_IDS
    base = None if mem.base == C.X86_REG_INVALID or rip_relative else sdm_register(mem.base)[0]
    index = None if mem.index == C.X86_REG_INVALID else sdm_register(mem.index)[0]
    if kind is InsnKind.INS:
        segment = ES  # INS stores to ES:rDI; a segment prefix cannot change that (SDM Vol. 2, INS)
    elif mem.segment != C.X86_REG_INVALID:
        segment = _SEGMENT_BY_ID[mem.segment]
    else:  # the default segment: SS for rSP/rBP-based addresses, DS otherwise (Vol. 1 3.7.4)
        segment = SS if base in (4, 5) else DS
    # The displacement as encoded - its own bytes, sign-extended - not Capstone's
    # computed value (which, for 16-bit code, may already be reduced modulo 64K).
    size = insn.disp_size
    disp = int.from_bytes(raw[insn.disp_offset:insn.disp_offset + size], "little", signed=True) if size else 0
    return MemoryOperand(segment=segment, base=base, index=index, scale=mem.scale or 1,
                         displacement=disp, displacement_size=size, address_size=address_size,
                         rip_relative=rip_relative, size=op.size, code_size=bits)


def decode_instruction(code: bytes, address: int, bits: int) -> DecodedInstruction | None:
    """Decode the instruction at the start of ``code`` (placed at ``address``, in
    ``bits``-bit code); None if Capstone cannot decode it.  Every instruction gets a
    record; those vtlab does not tell apart have kind ``OTHER``.

    Raises :class:`UnknownRegisterError` if an instruction of interest names a register
    that has no SDM number.
    """
    insn = next(_capstone(bits, True).disasm(bytes(code[:15]), address, 1), None)
    return None if insn is None else _record(insn, bits)


def sweep(code: bytes, address: int, bits: int) -> tuple[list[Instruction], dict[int, DecodedInstruction]]:
    """Disassemble a whole program; decode its instructions of interest.

    Returns what :func:`vtlab.cpu.asm.disassemble` returns (every instruction, as
    display records) and ``{address: DecodedInstruction}`` for each instruction whose
    kind is not ``OTHER``.  One pass without Capstone's operand details finds the
    instructions by id; only those are decoded again with details - a program's
    ordinary instructions cost no more than the plain disassembly.
    """
    instructions: list[Instruction] = []
    decoded: dict[int, DecodedInstruction] = {}
    detailed = _capstone(bits, True)
    for insn in _capstone(bits, False).disasm(bytes(code), address):
        raw = bytes(insn.bytes)
        instructions.append(Instruction(insn.address, insn.size, insn.mnemonic, insn.op_str, raw))
        if (insn.id in _KIND_BY_ID or (insn.id == _MOV and _MOV_CR_DR_OPCODE.search(raw))
                or (insn.id in _JMP_CALL and _far_indirect(raw, bits) is not None)):
            full = next(detailed.disasm(raw, insn.address, 1), None)
            if full is not None:
                record = _record(full, bits)
                if record.kind is not InsnKind.OTHER:
                    decoded[insn.address] = record
    return instructions, decoded

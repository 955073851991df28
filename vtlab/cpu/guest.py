"""The guest CPU: a real x86 processor emulated by Unicorn (QEMU's x86 core).

A :class:`Guest` owns a Unicorn instance, its physical memory and the system tables a
small kernel would build for itself.  It can start in any of the four modes the
well-known KVM examples use:

========== ============================================================================
``real``       16-bit real mode, CS:IP addressing, the BIOS's view (boot sector 0x7C00)
``protected``  32-bit protected mode with a flat GDT (CR0.PE = 1, no paging)
``paged``      32-bit protected mode with paging (4-MByte pages, CR4.PSE, CR0.PG = 1)
``long``       64-bit long mode: PAE page tables, EFER.LME, CR0.PG (IA32e, CS.L = 1)
========== ============================================================================

All of it is real: the mode is what the CR0/CR4/EFER bits and the loaded descriptors
say, and guest code may switch modes itself.  CPL 3 is reached the way an operating
system does it, by an IRET from ring 0 (SDM Vol. 3A 6.14 / 5.8), never by poking CS.

This module knows nothing about VMX; :mod:`vtlab.vmx` drives a Guest from the VMCS.
"""
from __future__ import annotations

import array
import ctypes
import enum
import struct
from dataclasses import dataclass, field

import unicorn
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucmod

from . import asm
from ..arch.exceptions import Vector
from ..arch.msrs import Cr0, Cr4, Efer, Msr
from .counter import InstructionCounter
from .quirks import forget_exception
from ..errors import BudgetExceeded, GuestFault


class Mode(str, enum.Enum):
    """The four start modes (see the module docstring)."""

    REAL = "real"
    PROTECTED = "protected"
    PAGED = "paged"
    LONG = "long"

    @property
    def bits(self) -> int:
        """Default operand/address size of code in this mode."""
        return {Mode.REAL: 16, Mode.PROTECTED: 32, Mode.PAGED: 32, Mode.LONG: 64}[self]


class Layout:
    """Where vtlab puts the structures a kernel would own (all in low guest memory).

    Kept out of the way of the classic load addresses (0x1000 and the 0x7C00 boot
    sector) and below the 640 KiB conventional-memory line.
    """

    GDT = 0x9_0000
    IDT = 0x9_1000
    TSS = 0x9_2000
    PAGE_TABLES = 0x9_3000       # PML4 / PD (32-bit) ...
    TRAMPOLINE = 0x9_8000        # ring-0 code vtlab writes (IRET to CPL 3)
    KERNEL_STACK = 0x8_F000      # TSS.ESP0/RSP0: the ring-0 stack for CPL-3 exceptions
    USER_STACK = 0x8_E000        # default CPL-3 stack top
    STACK = 0x7_000              # default ring-0 stack top (below the boot sector)


class Selector(enum.IntEnum):
    """The GDT vtlab builds (index << 3 | RPL)."""

    NULL = 0x00
    KERNEL_CODE32 = 0x08
    KERNEL_DATA = 0x10
    KERNEL_CODE64 = 0x18
    USER_CODE32 = 0x23
    USER_DATA = 0x2B
    USER_CODE64 = 0x33
    TSS = 0x38  # 16 bytes in long mode (entries 7 and 8)


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """Pack a segment descriptor (SDM Vol. 3A 3.4.5, Figure 3-8)."""
    value = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
    value |= ((limit >> 16) & 0xF) << 48 | (flags & 0xF) << 52 | ((base >> 24) & 0xFF) << 56
    return struct.pack("<Q", value)


_TSS_LIMIT = 0x67

_GPRS = {
    64: ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
         "r12", "r13", "r14", "r15", "rip", "rflags"],
    32: ["eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "eflags"],
    16: ["ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "ip", "flags"],
}
_R64_TO_32 = {r: "e" + r[1:] for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip")}
_R64_TO_32["rflags"] = "eflags"
_MMR_REGS = {X.UC_X86_REG_GDTR, X.UC_X86_REG_IDTR, X.UC_X86_REG_LDTR, X.UC_X86_REG_TR}
_CONTROL_REGS = {"cr0", "cr3", "cr4", "cs", "ss", "ds", "es", "fs", "gs", "eflags", "rflags", "flags"}
_uc_reg_read, _uc_reg_write = _ucmod.uclib.uc_reg_read, _ucmod.uclib.uc_reg_write
_uc_mem_read = _ucmod.uclib.uc_mem_read
_uc_reg_read_batch, _uc_reg_write_batch = _ucmod.uclib.uc_reg_read_batch, _ucmod.uclib.uc_reg_write_batch
#: CR0.PE as a plain int: ``int & IntFlag`` runs IntFlag.__rand__ in Python, too slow
#: for emulate(), which runs on every VM entry.
_CR0_PE = int(Cr0.PE)

_IO_MNEMONICS = {"in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"}
_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")
_REGS = {name[len("UC_X86_REG_"):].lower(): getattr(X, name) for name in dir(X)
         if name.startswith("UC_X86_REG_")}
# Registers wider than 8 bytes (x87 80-bit, SSE/AVX, the MSR struct) must never go through
# the raw 8-byte path: uc_reg_read would write past the buffer.  The binding sizes them.
_MMR_REGS |= {regid for name, regid in _REGS.items()
              if name.startswith(("st", "fp", "xmm", "ymm", "zmm", "msr", "bnd"))
              and name not in ("fpcw", "fpsw", "fptag")}


class _RegisterBatch:
    """Preallocated arguments of uc_reg_read_batch / uc_reg_write_batch.

    The values live in an ``array('Q')`` rather than a ctypes array: zeroing it
    (``values[:] = zeros``) and reading it (``values.tolist()``) are single C calls,
    where a ctypes array converts element by element.  The engine gets pointers into
    the array's buffer, which stays put because the array is never resized.
    """

    def __init__(self, ids: list[int]):
        self.count = len(ids)
        self.ids = (ctypes.c_int * self.count)(*ids)
        self.zeros = array.array("Q", bytes(8 * self.count))
        self.values = array.array("Q", self.zeros)
        base, _ = self.values.buffer_info()
        self.pointers = (ctypes.c_void_p * self.count)(*(base + 8 * i for i in range(self.count)))

    @classmethod
    def build(cls, guest: "Guest", names: tuple[str, ...], write: bool) -> "_RegisterBatch | None":
        """A batch for ``names`` if each is a register that :meth:`Guest.reg` (or, for
        ``write``, :meth:`Guest.set_reg`) accesses with a bare uc_reg_read (uc_reg_write);
        None otherwise."""
        ids = []
        for name in names:
            engine = guest._engine_name(name.lower())
            regid = _REGS.get(engine)
            if regid is None or regid in _MMR_REGS:
                return None
            if write and (engine in _CONTROL_REGS or engine in _SEGMENTS):
                return None
            ids.append(regid)
        return cls(ids)


@dataclass(frozen=True)
class Segment:
    """A segment register with its hidden part, as the VMCS guest-state area holds it.

    ``access_rights`` uses the VMX format (SDM Vol. 3C 25.4.1, Table 25-2): bits 3:0
    type, 4 S, 6:5 DPL, 7 P, 12 AVL, 13 L, 14 D/B, 15 G, 16 unusable.
    """

    selector: int
    base: int
    limit: int
    access_rights: int

    @property
    def dpl(self) -> int:
        return (self.access_rights >> 5) & 3

    @property
    def unusable(self) -> bool:
        return bool(self.access_rights & (1 << 16))


@dataclass
class GuestException:
    """An exception or interrupt the CPU raised while running the guest."""

    vector: int
    rip: int
    error_code: int | None = None
    cpl: int = 0
    instruction: str = ""
    #: #PF only: the linear address that caused it (what the CPU loads into CR2).
    address: int | None = None

    @property
    def name(self) -> str:
        try:
            return "#" + Vector(self.vector).name
        except ValueError:
            return f"INT {self.vector:#x}"

    def __str__(self) -> str:
        code = "" if self.error_code is None else f"({self.error_code})"
        return f"{self.name}{code} at {self.rip:#x} (CPL {self.cpl}) {self.instruction}".strip()


@dataclass
class RunResult:
    """Why a bare (non-VMX) run of the guest stopped."""

    reason: str                      # "hlt", "exception", "until", "budget"
    rip: int
    instructions: int
    exception: GuestException | None = None
    cpl: int = 0

    @property
    def ok(self) -> bool:
        return self.reason in ("hlt", "until")


@dataclass
class Program:
    """Code loaded into guest memory, with its disassembly."""

    address: int
    code: bytes
    bits: int
    source: str | None = None
    instructions: list[asm.Instruction] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.address + len(self.code)

    def listing(self) -> str:
        return "\n".join(str(i) for i in self.instructions)


#: The exceptions that push an error code (SDM Vol. 3A 6.13, Table 6-1).  Unicorn never
#: reports the code, so vtlab supplies 0: right for the #GP(0) of a privileged
#: instruction or a segment check at CPL 3 (SDM Vol. 3A 6.15, "Exception 13").
ERROR_CODE_VECTORS = {Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF,
                       Vector.AC, Vector.CP}


_STACK_WRITERS = frozenset({"push", "pushf", "pushfd", "pushfq", "pusha", "pushal", "call",
                            "enter"})


def _decode_detail(guest: "Guest", linear: int):
    """Capstone's detailed decode of the instruction at ``linear`` (None if unreadable)."""
    import capstone

    cs = capstone.Cs(capstone.CS_ARCH_X86, asm._CS_MODE[guest.bits])
    cs.detail = True
    try:
        return next(cs.disasm(guest.read(linear, 15), linear, 1), None)
    except unicorn.UcError:
        return None


def _writes_memory(detail) -> bool:
    """Does the decoded instruction write memory (an operand, or the stack)?"""
    import capstone

    if detail.mnemonic in _STACK_WRITERS:
        return True
    return any(op.type == capstone.x86.X86_OP_MEM and op.access & capstone.CS_AC_WRITE
               for op in detail.operands)


class Guest:
    """A real x86 CPU (Unicorn) with memory, set up in one of the four :class:`Mode` s.

    >>> g = Guest("real")
    >>> g.load("mov ax, 0x1234\\nmov [0x500], ax\\nhlt", 0x1000)  # doctest: +ELLIPSIS
    Program(...)
    >>> g.run(0x1000).reason, hex(g.read_u16(0x500))
    ('hlt', '0x1234')
    """

    def __init__(self, mode: Mode | str = Mode.REAL, memory_size: int = 2 << 20):
        self.mode = Mode(mode)
        if memory_size % 0x1000 or memory_size < 0x10_0000:
            raise ValueError("memory_size must be a multiple of 4 KiB and at least 1 MiB")
        self.memory_size = memory_size
        # Unicorn decodes by the mode the engine was opened in, so each start mode gets
        # its own engine (16-, 32- or 64-bit); CR0/CR4/EFER and CS are then set for real.
        uc_mode = {16: unicorn.UC_MODE_16, 32: unicorn.UC_MODE_32, 64: unicorn.UC_MODE_64}
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, uc_mode[self.mode.bits])
        self._pc = X.UC_X86_REG_RIP if self.mode is Mode.LONG else X.UC_X86_REG_EIP
        self._sp = X.UC_X86_REG_RSP if self.mode is Mode.LONG else X.UC_X86_REG_ESP
        self._uch = self.uc._uch
        self._fast_ids: dict[str, int] = {}
        self._scratch = ctypes.c_uint64(0)
        self._scratch_w = ctypes.c_uint64(0)
        self._fast_write_ids: dict[str, int] = {}
        self._insn_buf = ctypes.create_string_buffer(16)  # for memory_holds (x86: <= 15 bytes)
        self._batches: dict[tuple, _RegisterBatch | None] = {}  # (names, write?) -> batch
        self.uc.mem_map(0, memory_size)
        # No "until" address: when emulation stops Unicorn looks up the address before
        # ``until``, and with guest paging on and that address unmapped (as the customary
        # 0xFFFF_FFFF_FFFF_FFFF is) QEMU's page walk leaves it in CR2, as if the guest had
        # page-faulted.  An empty exit list makes emu_start ignore ``until`` altogether;
        # runs end by HLT, hooks, the instruction budget or ``count``.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        self.programs: list[Program] = []
        self.exceptions: list[GuestException] = []
        self.counter = InstructionCounter(self.uc)
        self._stop: tuple | None = None
        # Hooks the VMX layer can take over; defaults serve a bare run.
        self.on_interrupt = self._record_interrupt
        self._hlt_hooks: set[int] = set()
        #: (linear address, error code) of the last #PF, captured when Unicorn raised it.
        self.page_fault: tuple[int, int] | None = None
        self.uc.hook_add(unicorn.UC_HOOK_INTR, lambda uc, n, _: self._on_intr(n))
        #: Port I/O that reaches the "hardware" (no VM exit): set by the VMM's device bus.
        self.io_read = lambda port, size: (1 << (8 * size)) - 1   # floating bus: all ones
        self.io_write = lambda port, size, value: None
        self.uc.hook_add(unicorn.UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        self.uc.hook_add(unicorn.UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        #: Called with each newly loaded :class:`Program` (the VMX layer hooks its
        #: sensitive instructions from here).
        self.load_listeners: list = []
        self._build_system_tables()
        self.enter_mode(self.mode)

    # ------------------------------------------------------------------ memory
    def read(self, address: int, size: int) -> bytes:
        """Read guest-physical memory."""
        return bytes(self.uc.mem_read(address, size))

    def memory_holds(self, address: int, data: bytes) -> bool:
        """Does guest-physical memory at ``address`` hold ``data`` (an instruction's bytes)?

        ``read(address, len(data)) == data``, without the binding's bytearray and copy:
        the exit path asks this once per sensitive instruction to catch self-modifying
        code.  Raises ``UcError`` for unmapped memory, as :meth:`read` does.
        """
        size = len(data)
        if size > 16:
            return self.read(address, size) == data
        status = _uc_mem_read(self._uch, address, self._insn_buf, size)
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)
        return self._insn_buf.raw[:size] == data

    def write(self, address: int, data: bytes) -> None:
        """Write guest-physical memory."""
        self.uc.mem_write(address, bytes(data))

    def read_u8(self, a: int) -> int:
        return self.read(a, 1)[0]

    def read_u16(self, a: int) -> int:
        return struct.unpack("<H", self.read(a, 2))[0]

    def read_u32(self, a: int) -> int:
        return struct.unpack("<I", self.read(a, 4))[0]

    def read_u64(self, a: int) -> int:
        return struct.unpack("<Q", self.read(a, 8))[0]

    def write_u64(self, a: int, v: int) -> None:
        self.write(a, struct.pack("<Q", v))

    # --------------------------------------------------------------- registers
    def reg(self, name: str) -> int:
        """Read a register by name (``rax``, ``eip``, ``cs``, ``cr0``, ``efer`` ...)."""
        regid = self._fast_ids.get(name)
        if regid is not None:  # hot path: a plain integer register, already resolved
            value = self._scratch
            value.value = 0  # Unicorn writes only 1-2 bytes for AL, DX ...
            if not _uc_reg_read(self._uch, regid, ctypes.byref(value)):
                return value.value
        original = name
        name = name.lower()
        if name == "efer":
            return self.uc.msr_read(Msr.IA32_EFER)
        if name == "cpl":
            return self.cpl
        name = self._engine_name(name)
        try:
            regid = _REGS[name]
        except KeyError:
            raise ValueError(f"unknown register {name!r}") from None
        if regid in _MMR_REGS:
            return self.uc.reg_read(regid)
        self._fast_ids[original] = regid
        return self._read_raw(regid)

    def _read_raw(self, regid: int) -> int:
        """uc_reg_read straight through ctypes: the binding's generic path costs ~10x more."""
        value = self._scratch  # reused (as in reg): it is read back before anything else runs
        value.value = 0
        status = _uc_reg_read(self._uch, regid, ctypes.byref(value))
        if status:
            return self.uc.reg_read(regid)
        return value.value

    def read_registers(self, names: tuple[str, ...]) -> list[int]:
        """``[reg(n) for n in names]`` for general registers, in one call into Unicorn.

        The VM-exit path reads a handful of registers per exit (the trace's register
        summary); one ``uc_reg_read_batch`` costs little more than one ``uc_reg_read``.
        Names that :meth:`reg` does not read with a bare ``uc_reg_read`` (EFER, CPL, the
        descriptor-table registers) make the whole call take the one-by-one path.
        """
        key = (names, False)
        if key not in self._batches:
            self._batches[key] = _RegisterBatch.build(self, names, write=False)
        batch = self._batches[key]
        if batch is not None:
            batch.values[:] = batch.zeros  # 32-bit (and narrower) registers write only 4 bytes
            if not _uc_reg_read_batch(self._uch, batch.ids, batch.pointers, batch.count):
                return batch.values.tolist()
        return [self.reg(n) for n in names]

    def write_registers(self, names: tuple[str, ...], values) -> None:
        """``set_reg(n, v)`` for each general register name and value, in one call into Unicorn."""
        values = [v & 0xFFFF_FFFF_FFFF_FFFF for v in values]
        if len(values) != len(names):
            raise ValueError(f"{len(names)} register names but {len(values)} values")
        key = (names, True)
        if key not in self._batches:
            self._batches[key] = _RegisterBatch.build(self, names, write=True)
        batch = self._batches[key]
        if batch is not None:
            batch.values[:] = array.array("Q", values)  # same length: the buffer stays put
            if not _uc_reg_write_batch(self._uch, batch.ids, batch.pointers, batch.count):
                return
        for name, value in zip(names, values):
            self.set_reg(name, value)

    def set_reg(self, name: str, value: int) -> None:
        """Write a register by name; segment registers load their descriptor."""
        regid = self._fast_write_ids.get(name)
        if regid is not None:  # hot path: a general register seen before
            self._scratch_w.value = value & 0xFFFF_FFFF_FFFF_FFFF
            if not _uc_reg_write(self._uch, regid, ctypes.byref(self._scratch_w)):
                return
        original = name
        name = name.lower()
        if name == "efer":
            self.uc.msr_write(Msr.IA32_EFER, value)
        elif name in _SEGMENTS:
            self.load_segment(name, value)
        elif self._engine_name(name) in _REGS:
            name = self._engine_name(name)
            regid = _REGS[name]
            if regid not in _MMR_REGS and name not in _CONTROL_REGS:
                if not _uc_reg_write(self._uch, regid, ctypes.byref(ctypes.c_uint64(value & 0xFFFF_FFFF_FFFF_FFFF))):
                    self._fast_write_ids[original] = regid
                    return
            self.uc.reg_write(_REGS[name], value)
        else:
            raise ValueError(f"unknown register {name!r}")

    def _engine_name(self, name: str) -> str:
        """On a 16/32-bit engine the 64-bit names (rax, rip ...) address the 32-bit registers."""
        if self.mode is not Mode.LONG and name in _R64_TO_32:
            return _R64_TO_32[name]
        return name

    @property
    def bits(self) -> int:
        """Code size the CPU is executing in now: 16, 32 or 64."""
        cr0, efer = self.reg("cr0"), self.reg("efer")
        if not cr0 & Cr0.PE:
            return 16
        cs = self.segment("cs")
        if efer & Efer.LMA and cs.access_rights & (1 << 13):
            return 64
        return 32 if cs.access_rights & (1 << 14) else 16

    @property
    def rip(self) -> int:
        """The instruction pointer (RIP; EIP on a 32-bit engine)."""
        return self._read_raw(self._pc)

    @rip.setter
    def rip(self, value: int) -> None:
        _uc_reg_write(self._uch, self._pc, ctypes.byref(ctypes.c_uint64(value)))

    @property
    def cpl(self) -> int:
        """Current privilege level: SS.DPL in protected mode (SDM Vol. 3A 5.5), 0 in real mode."""
        if not self._read_raw(X.UC_X86_REG_CR0) & 1:
            return 0
        return self._read_raw(X.UC_X86_REG_CS) & 3

    @staticmethod
    def cpl_of(cr0: int, cs: int) -> int:
        """:attr:`cpl` from CR0 and the CS selector already read (e.g. by read_registers)."""
        return cs & 3 if cr0 & 1 else 0

    def registers(self) -> dict[str, int]:
        """The general registers, RIP, RFLAGS, segments and control registers."""
        names = _GPRS[64 if self.mode is Mode.LONG else 32] + list(_SEGMENTS) + ["cr0", "cr2", "cr3", "cr4"]
        out = {n: self.reg(n) for n in names}
        out["efer"] = self.reg("efer")
        return out

    # ---------------------------------------------------------------- segments
    def _descriptor_at(self, table_base: int, selector: int) -> int:
        """The 8-byte descriptor ``selector`` names; 0 if the table lies outside memory
        (a guest may have pointed GDTR anywhere after loading its segments)."""
        try:
            return self.read_u64(table_base + (selector & ~7))
        except unicorn.UcError:
            return 0

    def segment(self, name: str) -> Segment:
        """The segment register ``name`` with base, limit and VMX access rights."""
        name = name.lower()
        if name in ("tr", "ldtr"):
            sel, base, limit, flags = self.uc.reg_read(_REGS[name])
            present = flags & 0x8000 and (name == "tr" or sel & ~3)
            ar = (flags >> 8) & 0xF0FF if present else 1 << 16
            return Segment(sel, base, limit, ar)
        selector = self.uc.reg_read(_REGS[name])
        if not self.reg("cr0") & Cr0.PE:
            ar = 0x9B if name == "cs" else 0x93
            return Segment(selector, selector << 4, 0xFFFF, ar)
        if selector & ~3 == 0:
            return Segment(selector, 0, 0, 1 << 16)  # null selector: unusable
        gdt_base = self.uc.reg_read(X.UC_X86_REG_GDTR)[1]
        raw = self._descriptor_at(gdt_base, selector)
        base = ((raw >> 16) & 0xFFFFFF) | (((raw >> 56) & 0xFF) << 24)
        limit = (raw & 0xFFFF) | (((raw >> 48) & 0xF) << 16)
        access, flags = (raw >> 40) & 0xFF, (raw >> 52) & 0xF
        if flags & 0x8:  # G: limit in 4-KByte units
            limit = (limit << 12) | 0xFFF
        if name in ("fs", "gs") and self.reg("efer") & Efer.LMA:
            base = self.reg(f"{name}_base")
        return Segment(selector, base, limit, access | (flags << 12))

    def load_segment(self, name: str, selector: int) -> None:
        """Load a segment register the way MOV/IRET would, from the current GDT.

        Unicorn checks privilege on every direct write (as MOV SS would), which makes a
        return from CPL 3 to ring 0 impossible through register writes.  vtlab plays
        the part of the VM-entry/IRET microcode here: with CR0.PE briefly clear, a
        selector load resets the CPL to 0; the descriptor is then loaded for real.
        """
        name = name.lower()
        reg = _REGS[name]
        cr0 = self.uc.reg_read(X.UC_X86_REG_CR0)
        if cr0 & Cr0.PE and name in ("cs", "ss") and (selector & 3) < self.cpl:
            self.uc.reg_write(X.UC_X86_REG_CR0, cr0 & ~Cr0.PE)
            self.uc.reg_write(X.UC_X86_REG_SS, 0)
            self.uc.reg_write(X.UC_X86_REG_CR0, cr0)
            # CPL is now 0: reload CS first so that the later loads see ring-0 code.
            if name == "ss":
                self.uc.reg_write(X.UC_X86_REG_CS, Selector.KERNEL_CODE64 if self.reg(
                    "efer") & Efer.LMA else Selector.KERNEL_CODE32)
        self.uc.reg_write(reg, selector)

    # -------------------------------------------------------------- modes
    def _build_system_tables(self) -> None:
        """Write the GDT, an empty IDT and a TSS (identical for every mode)."""
        flat = 0xFFFFF
        tss = Layout.TSS
        gdt = b"".join([
            _descriptor(0, 0, 0, 0),
            _descriptor(0, flat, 0x9B, 0xC),   # 0x08 ring-0 code, 32-bit
            _descriptor(0, flat, 0x93, 0xC),   # 0x10 ring-0 data
            _descriptor(0, flat, 0x9B, 0xA),   # 0x18 ring-0 code, 64-bit (L=1)
            _descriptor(0, flat, 0xFB, 0xC),   # 0x20 ring-3 code, 32-bit
            _descriptor(0, flat, 0xF3, 0xC),   # 0x28 ring-3 data
            _descriptor(0, flat, 0xFB, 0xA),   # 0x30 ring-3 code, 64-bit
            _descriptor(tss, _TSS_LIMIT, 0x8B, 0x0),  # 0x38 busy TSS (as after LTR)
            struct.pack("<Q", tss >> 32),      # upper half of a 64-bit TSS descriptor
        ])
        self.write(Layout.GDT, gdt)
        self.gdt_limit = len(gdt) - 1
        # TSS: ESP0/SS0 (32-bit layout) and RSP0 (64-bit layout, offset 4) both point to
        # the kernel stack, so either kind of CPU finds it on a privilege change.
        self.write(tss, bytes(0x68))
        self.write(tss + 4, struct.pack("<Q", Layout.KERNEL_STACK))
        self.write(tss + 8, struct.pack("<I", Selector.KERNEL_DATA))
        self.write(Layout.IDT, bytes(256 * 16))

    def _build_page_tables(self, long_mode: bool) -> int:
        """Identity-map guest memory with large pages; user-accessible (U/S = 1)."""
        base = Layout.PAGE_TABLES
        present_rw_user = 0x7
        if long_mode:
            pml4, pdpt, pd = base, base + 0x1000, base + 0x2000
            self.write_u64(pml4, pdpt | present_rw_user)
            self.write_u64(pdpt, pd | present_rw_user)
            for i in range(512):  # 512 x 2 MiB = the first GiB
                self.write_u64(pd + 8 * i, (i << 21) | present_rw_user | 0x80)
            return pml4
        pd = base
        entries = b"".join(struct.pack("<I", (i << 22) | present_rw_user | 0x80) for i in range(1024))
        self.write(pd, entries)
        return pd

    def enter_mode(self, mode: Mode | str) -> None:
        """Put the CPU into ``mode`` as a boot loader would leave it (ring 0)."""
        mode = Mode(mode)
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_GDTR, (0, Layout.GDT, self.gdt_limit, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, Layout.IDT, 0x3FF if mode is Mode.REAL else 0, 0))
        if mode is Mode.REAL:
            uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0x3FF, 0))  # the real-mode IVT
            uc.reg_write(X.UC_X86_REG_CR0, Cr0.ET)
            uc.reg_write(X.UC_X86_REG_CR4, 0)
            uc.msr_write(Msr.IA32_EFER, 0)
            for seg in _SEGMENTS:
                uc.reg_write(_REGS[seg], 0)
            # TR as the CPU leaves it at reset: base 0, limit FFFFH, present busy TSS (SDM 10.1.1)
            uc.reg_write(X.UC_X86_REG_TR, (0, 0, 0xFFFF, 0x8B00))
            uc.reg_write(self._sp, Layout.STACK)
            uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
            self.mode = mode
            return
        cr4, cr0 = 0, Cr0.PE | Cr0.ET | Cr0.NE
        if mode is Mode.PAGED:
            uc.reg_write(X.UC_X86_REG_CR3, self._build_page_tables(False))
            cr4, cr0 = Cr4.PSE, cr0 | Cr0.PG | Cr0.WP
        elif mode is Mode.LONG:
            uc.reg_write(X.UC_X86_REG_CR3, self._build_page_tables(True))
            cr4, cr0 = Cr4.PAE, cr0 | Cr0.PG | Cr0.WP
            uc.msr_write(Msr.IA32_EFER, Efer.LME)
        uc.reg_write(X.UC_X86_REG_CR4, cr4)
        uc.reg_write(X.UC_X86_REG_CR0, cr0)
        code = Selector.KERNEL_CODE64 if mode is Mode.LONG else Selector.KERNEL_CODE32
        uc.reg_write(X.UC_X86_REG_CS, code)
        for seg in ("ss", "ds", "es", "fs", "gs"):
            uc.reg_write(_REGS[seg], Selector.KERNEL_DATA)
        uc.reg_write(X.UC_X86_REG_TR, (Selector.TSS, Layout.TSS, _TSS_LIMIT, 0x8B00))
        uc.reg_write(self._sp, Layout.STACK)
        uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
        self.mode = mode

    # ------------------------------------------------------------- programs
    def load(self, program: str | bytes, address: int = 0x1000, bits: int | None = None) -> Program:
        """Assemble (if text) and write a program at ``address``; returns the :class:`Program`.

        The code is swept with Capstone so that vtlab knows where every instruction
        starts: the VMX layer hooks exactly the sensitive ones, and the instruction
        counter knows how many instructions each executed block holds.
        """
        bits = bits or self.mode.bits
        source = program if isinstance(program, str) else None
        code = asm.assemble(program, address, bits) if source is not None else bytes(program)
        if address < 0 or address + len(code) > self.memory_size:
            raise ValueError(f"program at {address:#x} (+{len(code)} bytes) is outside guest memory")
        self.write(address, code)
        # Unicorn keeps translated blocks across memory writes: drop any stale ones.
        self.uc.ctl_remove_cache(address, address + max(len(code), 1))
        prog = Program(address, code, bits, source, asm.disassemble(code, address, bits))
        self.programs.append(prog)
        if prog.instructions:
            self.counter.add_instructions(i.address for i in prog.instructions)
        for insn in prog.instructions:
            if insn.address in self._hlt_hooks:
                continue
            if insn.mnemonic == "hlt":
                self._hlt_hooks.add(insn.address)
                self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_hlt, begin=insn.address, end=insn.address)
            elif insn.mnemonic in ("rdtsc", "rdtscp"):
                self._hlt_hooks.add(insn.address)
                self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_rdtsc, begin=insn.address, end=insn.address)
            elif insn.mnemonic.split()[-1] in _IO_MNEMONICS:  # "rep outsb" -> "outsb"
                self._hlt_hooks.add(insn.address)
                self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_io_check, begin=insn.address, end=insn.address)
        for listener in self.load_listeners:
            listener(prog)
        return prog

    def instruction_at(self, address: int | None = None) -> asm.Instruction | None:
        """Decode the instruction at ``address`` (default: the current RIP)."""
        address = self.linear_rip() if address is None else address
        try:
            return asm.decode_one(self.read(address, 16), address, self.bits)
        except unicorn.UcError:
            return None

    def linear_rip(self) -> int:
        """RIP as a linear address (CS.base + RIP)."""
        return (self.segment("cs").base + self.rip) & 0xFFFF_FFFF_FFFF_FFFF

    # --------------------------------------------------------------- running
    def _on_hlt(self, uc, address, size, _user):
        # HLT is privileged: at CPL > 0 let the CPU raise #GP instead of stopping here.
        if self._stop is None and self.cpl == 0 and self.on_hlt(address):
            if self._stop is None and not self.on_hlt_stops_itself:
                self._stop = ("hlt", address)
            uc.emu_stop()

    def _on_rdtsc(self, uc, address, size, _user):
        """RDTSC/RDTSCP read a *virtual* time-stamp counter: guest instructions retired.

        Unicorn's own TSC follows the host clock, which would make every run different;
        counting retired instructions keeps guests deterministic (and is roughly what a
        1-instruction-per-cycle CPU would show).  CR4.TSD at CPL > 0 still faults.
        """
        if self._stop is not None or self.on_rdtsc(address):
            return
        if self.reg("cr4") & Cr4.TSD and self.cpl > 0:
            return  # let the CPU raise #GP
        tsc = self.read_tsc()
        self.set_reg("rax", tsc & 0xFFFF_FFFF)
        self.set_reg("rdx", tsc >> 32)
        if size == 3:  # RDTSCP also loads IA32_TSC_AUX into ECX
            self.set_reg("rcx", self.tsc_aux)
        self.counter.unretire_rest_of_block(address, retired_here=True)
        self.rip = self.rip + size

    #: Added to the instruction count to form the TSC (IA32_TSC_ADJUST-like).
    tsc_offset = 0
    tsc_aux = 0

    def read_tsc(self) -> int:
        """The guest's time-stamp counter: instructions retired + :attr:`tsc_offset`."""
        return (self.counter.total + self.tsc_offset) & 0xFFFF_FFFF_FFFF_FFFF

    def on_rdtsc(self, address: int) -> bool:
        """Called before RDTSC/RDTSCP; True means someone else (a VM exit) took it over."""
        return False

    def _on_io_check(self, uc, address, size, _user):
        """IN/OUT/INS/OUTS privilege check (SDM Vol. 1 19.5.1), which Unicorn skips.

        At CPL > IOPL the CPU consults the TSS I/O permission bitmap; vtlab's TSS has
        none (its I/O map base lies past the TSS limit), so every port faults: #GP(0).
        """
        if self._stop is not None or not self.reg("cr0") & Cr0.PE:
            return
        iopl = (self.reg("eflags") >> 12) & 3
        if self.cpl > iopl:
            # #GP(0), raised like any other exception: a bare run records it, and in VMX
            # non-root operation the exit monitor takes it through the exception bitmap -
            # it has priority over an I/O-instruction VM exit (SDM Vol. 3C 26.1.1).
            self.on_interrupt(Vector.GP)

    def _on_in(self, uc, port, size, _user):
        return self.io_read(port, size) & ((1 << (8 * size)) - 1)

    def _on_out(self, uc, port, size, value, _user):
        self.io_write(port, size, value)

    #: False for bare runs (the guest records the stop); the VMX monitor records its own.
    on_hlt_stops_itself = False

    def on_hlt(self, address: int) -> bool:
        """Called before a HLT executes; return True to stop there (bare runs do)."""
        return True

    def _on_intr(self, vector: int) -> None:
        # A #PF: QEMU has just put the faulting address in CR2 (the value does not survive
        # the end of the run) and Unicorn never reports the error code - capture both now.
        self.page_fault = self._page_fault_info() if vector == Vector.PF else None
        self.on_interrupt(vector)

    def _page_fault_info(self) -> tuple[int, int]:
        """(linear address, error code) of the page fault being raised (SDM Vol. 3A 4.7).

        The error code is rebuilt as the SDM defines it: bit 0 P (0: a non-present
        translation, 1: a protection violation), bit 1 W/R (a write), bit 2 U/S (CPL 3),
        bit 4 I/D (an instruction fetch, reported with PAE + EFER.NXE or CR4.SMEP).  The
        access kind comes from the faulting instruction: a fetch if the address lies in
        its own bytes (or it cannot be read), a write if it writes a memory operand or
        the stack.  RSVD (bit 3) is never set: vtlab's page tables have no reserved bits.
        """
        address = self.uc.reg_read(X.UC_X86_REG_CR2)
        linear = self.linear_rip()
        detail = _decode_detail(self, linear)
        write = detail is not None and _writes_memory(detail)
        fetch = detail is None or (linear <= address < linear + detail.size and not write)
        cr4, efer = self.reg("cr4"), self.reg("efer")
        code = int(self._translation_present(address)) | int(write) << 1 | int(self.cpl == 3) << 2
        if fetch and ((efer & Efer.NXE and cr4 & Cr4.PAE) or cr4 & Cr4.SMEP):
            code |= 1 << 4
        return address, code

    def _translation_present(self, linear: int) -> bool:
        """Does the guest's paging structure map ``linear`` at every level (P = 1)?"""
        cr0, cr3, cr4 = self.reg("cr0"), self.reg("cr3"), self.reg("cr4")
        if not cr0 & Cr0.PG:
            return True
        frame = 0x000F_FFFF_FFFF_F000
        try:
            if self.reg("efer") & Efer.LMA:  # 4-level paging: PML4, PDPT, PD, PT
                table = cr3 & frame
                for shift in (39, 30, 21, 12):
                    entry = self.read_u64(table + ((linear >> shift) & 0x1FF) * 8)
                    if not entry & 1:
                        return False
                    if shift in (30, 21) and entry & 0x80:  # 1-GByte / 2-MByte page
                        return True
                    table = entry & frame
                return True
            if cr4 & Cr4.PAE:  # PAE paging: PDPTE, PD, PT
                pdpte = self.read_u64((cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8)
                if not pdpte & 1:
                    return False
                pde = self.read_u64((pdpte & frame) + ((linear >> 21) & 0x1FF) * 8)
                if not pde & 1 or pde & 0x80:  # absent, or a 2-MByte page
                    return bool(pde & 1)
                return bool(self.read_u64((pde & frame) + ((linear >> 12) & 0x1FF) * 8) & 1)
            entry = self.read_u32((cr3 & 0xFFFF_F000) + ((linear >> 22) & 0x3FF) * 4)  # 32-bit
            if not entry & 1:
                return False
            if entry & 0x80 and cr4 & Cr4.PSE:  # 4-MByte page
                return True
            return bool(self.read_u32((entry & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4) & 1)
        except unicorn.UcError:  # a paging structure outside guest memory
            return False

    def _record_interrupt(self, vector: int) -> None:
        """Default UC_HOOK_INTR handler: remember the exception and stop the run."""
        self._stop = ("exception", self.make_exception(vector))
        self.uc.emu_stop()

    def make_exception(self, vector: int) -> GuestException:
        """Describe an exception Unicorn just raised (RIP points at the faulting instruction
        for faults, after the INT n for software interrupts)."""
        rip = self.rip
        insn = self.instruction_at()
        code = 0 if vector in ERROR_CODE_VECTORS else None
        address = None
        if vector == Vector.PF and self.page_fault is not None:
            address, code = self.page_fault
        return GuestException(vector, rip, code, self.cpl, insn.text if insn else "", address)

    def emulate(self, budget: int, *, exact: bool = False) -> None:
        """One call into Unicorn from the current RIP, bounded by ``budget`` instructions.

        The native block counter stops a runaway guest at block granularity with no
        Python on the hot path; ``exact=True`` (single-stepping) makes Unicorn count
        every instruction instead, which is precise but slow.
        """
        begin = self.rip
        if not self._read_raw(X.UC_X86_REG_CR0) & _CR0_PE:  # (a plain int: see _CR0_PE)
            begin &= 0xFFFF
        # The end address is ignored: Unicorn's exit list (set up in __init__) is empty.
        until = 0
        if exact:
            self.counter.stop_at = (1 << 64) - 1
            self.uc.emu_start(begin, until, count=budget)
        else:
            self.counter.stop_at = self.counter.total + budget
            try:
                self.uc.emu_start(begin, until)
            finally:
                self.counter.stop_at = (1 << 64) - 1

    def run(self, start: int | None = None, max_instructions: int = 1_000_000) -> RunResult:
        """Run the guest (no VMX) until HLT, an exception or the instruction budget.

        Raises :class:`BudgetExceeded` if the budget runs out first.
        """
        if start is not None:
            self.rip = start
        self._stop = None
        before = self.counter.total
        try:
            self.emulate(max_instructions)
        except unicorn.UcError as exc:
            self._stop = self._stop or ("exception", self._unicorn_error(exc))
        stop = self._stop
        if stop is not None:  # the CPU stopped at RIP: nothing from there on retired
            where = stop[1] if stop[0] == "hlt" else stop[1].rip
            # HLT itself retires (the CPU then waits); a faulting instruction does not
            self.counter.unretire_rest_of_block(self.segment("cs").base + where,
                                                retired_here=stop[0] == "hlt")
        executed = self.counter.total - before
        self._stop = None
        if stop is None:
            if not self.counter.exhausted and self.read(self.linear_rip() - 1, 1) == b"\xf4":
                return RunResult("hlt", self.rip - 1, executed, cpl=self.cpl)
            raise BudgetExceeded(
                f"the guest ran {max_instructions:,} instructions without stopping "
                f"(RIP now {self.rip:#x}); raise max_instructions or look for a loop")
        if stop[0] == "hlt":
            self.rip = self.rip + 1  # HLT retires; the CPU would now wait for an interrupt
            return RunResult("hlt", stop[1], executed, cpl=self.cpl)
        exc = stop[1]
        forget_exception(self.uc)  # the exception was reported, not delivered
        if exc.address is not None:  # a #PF loads CR2 when it is raised (SDM Vol. 3A 4.7)
            self.uc.reg_write(X.UC_X86_REG_CR2, exc.address)
        self.exceptions.append(exc)
        return RunResult("exception", exc.rip, executed, exc, cpl=exc.cpl)

    def _unicorn_error(self, exc: unicorn.UcError) -> GuestException:
        """Translate a Unicorn error (unmapped memory, bad opcode) into an x86 exception."""
        errno = exc.errno
        vector = {unicorn.UC_ERR_INSN_INVALID: Vector.UD}.get(errno, Vector.GP)
        if errno in (unicorn.UC_ERR_READ_UNMAPPED, unicorn.UC_ERR_WRITE_UNMAPPED,
                     unicorn.UC_ERR_FETCH_UNMAPPED):
            vector = Vector.PF if self.reg("cr0") & Cr0.PG else Vector.GP
        e = self.make_exception(vector)
        e.instruction = (e.instruction + f" [{exc}]").strip()
        return e

    def raise_for(self, result: RunResult) -> RunResult:
        """Turn an exception stop into :class:`GuestFault`; pass other results through."""
        if result.exception is not None:
            e = result.exception
            raise GuestFault(e.vector, e.error_code, e.rip, e.instruction)
        return result

    # ---------------------------------------------------- event delivery
    def _push(self, value: int, size: int) -> None:
        sp = self.reg("rsp") - size
        ss_base = self.segment("ss").base if self.reg("cr0") & Cr0.PE else self.reg("ss") << 4
        self.write(ss_base + (sp & (0xFFFF if self.bits == 16 and not self.reg("cr0") & Cr0.PE else 0xFFFF_FFFF_FFFF_FFFF)),
                   value.to_bytes(size, "little", signed=False))
        self.set_reg("rsp", sp)

    def deliver_interrupt(self, vector: int, error_code: int | None = None,
                          return_rip: int | None = None) -> str | None:
        """Deliver an interrupt or exception through the guest's IVT/IDT, as the CPU would.

        Unicorn reports events but never vectors them (its UC_HOOK_INTR replaces the
        delivery), so vtlab does what SDM Vol. 3A 6.12 (protected mode), 6.14 (IA-32e
        mode) and Vol. 1 / 3A 20.1.4 (real mode) describe: push the return frame, switch
        to the ring-0 stack from the TSS on a privilege change, load CS:RIP from the gate
        and clear IF for interrupt gates.  Returns None on success, or why the gate
        could not be used (the caller then raises #GP / #DF / triple fault).
        """
        rip = self.rip if return_rip is None else return_rip
        flags = self.reg("eflags")
        cr0 = self.reg("cr0")
        if not cr0 & Cr0.PE:  # real mode: 4-byte IVT entries offset:segment
            _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
            if vector * 4 + 3 > limit:
                return f"vector {vector} is beyond the IVT limit {limit:#x}"
            offset, segment = struct.unpack("<HH", self.read(base + vector * 4, 4))
            self._push(flags & 0xFFFF, 2)
            self._push(self.reg("cs"), 2)
            self._push(rip & 0xFFFF, 2)
            self.set_reg("eflags", flags & ~((1 << 9) | (1 << 8)))
            self.uc.reg_write(X.UC_X86_REG_CS, segment)
            self.rip = offset
            return None
        long_mode = bool(self.reg("efer") & Efer.LMA)
        size = 16 if long_mode else 8
        _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
        if vector * size + size - 1 > limit:
            return f"vector {vector} is beyond the IDT limit {limit:#x}"
        raw = self.read(base + vector * size, size)
        lo = struct.unpack("<Q", raw[:8])[0]
        gate_type, present = (lo >> 40) & 0xF, (lo >> 47) & 1
        selector = (lo >> 16) & 0xFFFF
        offset = (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16)
        if long_mode:
            offset |= struct.unpack("<I", raw[8:12])[0] << 32
        if not present or gate_type not in (0xE, 0xF):
            return f"IDT entry {vector} is not a present interrupt or trap gate"
        old_cs, old_ss, old_sp, cpl = self.reg("cs"), self.reg("ss"), self.reg("rsp"), self.cpl
        target_dpl = selector & 3 if selector & ~3 == 0 else self.segment_dpl(selector)
        word = 8 if long_mode else 4
        if target_dpl < cpl:  # privilege change: stack from the TSS (SDM 6.12.1)
            tss = self.segment("tr").base
            new_sp = self.read_u64(tss + 4) if long_mode else self.read_u32(tss + 4)
            new_ss = 0 if long_mode else self.read_u16(tss + 8)
            self.load_segment("cs", selector)
            if not long_mode:
                self.load_segment("ss", new_ss)
            else:
                self.load_segment("ss", 0)
            self.set_reg("rsp", new_sp & (~0xF if long_mode else ~0))
            self._push(old_ss, word)
            self._push(old_sp, word)
        elif long_mode:
            self.set_reg("rsp", old_sp & ~0xF)
            self._push(old_ss, word)
            self._push(old_sp, word)
        self._push(flags, word)
        self._push(old_cs, word)
        self._push(rip, word)
        if error_code is not None:
            self._push(error_code, word)
        if target_dpl == cpl:
            self.load_segment("cs", selector)
        new_flags = flags & ~((1 << 8) | (1 << 14) | (1 << 16) | (1 << 17))
        if gate_type == 0xE:
            new_flags &= ~(1 << 9)  # interrupt gate: IF := 0
        self.set_reg("eflags", new_flags)
        self.rip = offset
        return None

    def segment_dpl(self, selector: int) -> int:
        """DPL of the GDT descriptor ``selector`` names."""
        gdt_base = self.uc.reg_read(X.UC_X86_REG_GDTR)[1]
        return (self._descriptor_at(gdt_base, selector) >> 45) & 3

    # ------------------------------------------------------------------ CPL 3
    def run_user(self, program: str | bytes, address: int = 0x2_0000,
                 max_instructions: int = 1_000_000, iopl: int = 0) -> RunResult:
        """Run ``program`` at CPL 3, entered by IRET from ring 0 like an OS would.

        vtlab writes a ring-0 trampoline that pushes an IRET frame (SS, RSP, RFLAGS
        with the requested IOPL, CS, RIP) and executes IRET (SDM Vol. 3A 6.14.1).
        """
        if self.mode is Mode.REAL:
            raise ValueError("CPL 3 needs protected or long mode; real mode always runs at CPL 0")
        prog = self.load(program, address)
        flags = 0x202 | (iopl & 3) << 12
        if self.mode is Mode.LONG:
            tramp = (f"push {Selector.USER_DATA:#x}\npush {Layout.USER_STACK:#x}\n"
                     f"push {flags:#x}\npopfq\npushfq\npush {Selector.USER_CODE64:#x}\n"
                     f"push {prog.address:#x}\niretq")
        else:
            tramp = (f"push {Selector.USER_DATA:#x}\npush {Layout.USER_STACK:#x}\n"
                     f"push {flags:#x}\npopfd\npushfd\npush {Selector.USER_CODE32:#x}\n"
                     f"push {prog.address:#x}\niretd")
        if self.cpl != 0:
            self.load_segment("cs", Selector.KERNEL_CODE64 if self.mode is Mode.LONG else Selector.KERNEL_CODE32)
            self.load_segment("ss", Selector.KERNEL_DATA)
        self.uc.reg_write(self._sp, Layout.STACK)
        self.load(tramp, Layout.TRAMPOLINE)
        return self.run(Layout.TRAMPOLINE, max_instructions)

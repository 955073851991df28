"""Register access by name for the guest CPU: ``g.reg("rax")``, ``g.set_reg("cr0", v)``.

:class:`RegisterAccess` is one part of :class:`vtlab.cpu.guest.Guest`.  It reads and
writes the engine's registers by their x86 names, resolving each name once and then
going straight through Unicorn's C API (the binding's generic path costs ~10x more,
and the VM-exit path reads registers on every exit).  It also gives the model-specific
registers (:meth:`~RegisterAccess.msr_read`) and the derived values the rest of the CPU
asks for all the time: :attr:`~RegisterAccess.rip`, :attr:`~RegisterAccess.cpl` and
:attr:`~RegisterAccess.bits`.
"""
from __future__ import annotations

import array
import ctypes

from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucmod

from ..arch.msrs import Cr0, Efer, Msr, Rflags
from ..arch.segments import AccessRights
from .layout import Mode

_CR0_PE = int(Cr0.PE)   # a plain int: cpl is read on every exit
_RFLAGS_VM = int(Rflags.VM)

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
_uc_reg_read_batch, _uc_reg_write_batch = _ucmod.uclib.uc_reg_read_batch, _ucmod.uclib.uc_reg_write_batch

_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")
_REGS = {name[len("UC_X86_REG_"):].lower(): getattr(X, name) for name in dir(X)
         if name.startswith("UC_X86_REG_")}
# Registers wider than 8 bytes (x87 80-bit, SSE/AVX, the MSR struct) must never go through
# the raw 8-byte path: uc_reg_read would write past the buffer.  The binding sizes them.
_MMR_REGS |= {regid for name, regid in _REGS.items()
              if name.startswith(("st", "fp", "xmm", "ymm", "zmm", "msr", "bnd"))
              and name not in ("fpcw", "fpsw", "fptag")}


_UNBUILT = object()  # (a batch not looked for yet; None means "no batch possible")


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
    def build(cls, guest: "RegisterAccess", names: tuple[str, ...],
              write: bool) -> "_RegisterBatch | None":
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


class RegisterAccess:
    """The guest's registers by name (a part of :class:`~vtlab.cpu.guest.Guest`).

    Relies on the Guest for ``uc`` (the engine), ``mode`` and, for segment registers,
    :meth:`~vtlab.cpu.segments.SegmentUnit.segment` / ``load_segment``.
    """

    def _init_register_access(self) -> None:
        """Set up the fast paths (call once the engine ``self.uc`` exists)."""
        self._pc = X.UC_X86_REG_RIP if self.mode is Mode.LONG else X.UC_X86_REG_EIP
        self._sp = X.UC_X86_REG_RSP if self.mode is Mode.LONG else X.UC_X86_REG_ESP
        self._uch = self.uc._uch
        self._fast_ids: dict[str, int] = {}
        self._scratch = ctypes.c_uint64(0)
        self._scratch_w = ctypes.c_uint64(0)
        self._fast_write_ids: dict[str, int] = {}
        self._batches: dict[tuple, _RegisterBatch | None] = {}        # names -> read batch
        self._write_batches: dict[tuple, _RegisterBatch | None] = {}  # names -> write batch

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
        batch = self._batches.get(names, _UNBUILT)
        if batch is _UNBUILT:
            batch = self._batches[names] = _RegisterBatch.build(self, names, write=False)
        if batch is not None:
            batch.values[:] = batch.zeros  # 32-bit (and narrower) registers write only 4 bytes
            if not _uc_reg_read_batch(self._uch, batch.ids, batch.pointers, batch.count):
                return batch.values.tolist()
        return [self.reg(n) for n in names]

    def write_registers(self, names: tuple[str, ...], values) -> None:
        """``set_reg(n, v)`` for each general register name and value, in one call into Unicorn."""
        batch = self._write_batches.get(names, _UNBUILT)
        if batch is _UNBUILT:
            batch = self._write_batches[names] = _RegisterBatch.build(self, names, write=True)
        if len(values) != len(names):
            raise ValueError(f"{len(names)} register names but {len(values)} values")
        if batch is not None:
            buf = batch.values   # (its buffer is where the batch's pointers point)
            i = 0
            for v in values:
                buf[i] = v & 0xFFFF_FFFF_FFFF_FFFF
                i += 1
            if not _uc_reg_write_batch(self._uch, batch.ids, batch.pointers, batch.count):
                return
        values = [v & 0xFFFF_FFFF_FFFF_FFFF for v in values]
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

    # ------------------------------------------------------------------ MSRs
    def msr_read(self, msr: int) -> int:
        """RDMSR: the value of model-specific register ``msr`` (e.g. ``Msr.IA32_PAT``).

        This reads the CPU's real MSR, with no privilege check and no VM exit: it is
        how the processor itself (or a VM entry/exit loading guest state) sees it.
        """
        return self.uc.msr_read(int(msr))

    def msr_write(self, msr: int, value: int) -> None:
        """WRMSR: set model-specific register ``msr`` to ``value`` (no checks, no VM exit)."""
        self.uc.msr_write(int(msr), value)

    # ---------------------------------------------------------- derived values
    @property
    def bits(self) -> int:
        """Code size the CPU is executing in now: 16, 32 or 64."""
        cr0, efer = self.reg("cr0"), self.reg("efer")
        if not cr0 & Cr0.PE:
            return 16
        cs = self.segment("cs")
        if efer & Efer.LMA and cs.access_rights & AccessRights.L:
            return 64
        return 32 if cs.access_rights & AccessRights.DB else 16

    @property
    def rip(self) -> int:
        """The instruction pointer (RIP; EIP on a 32-bit engine)."""
        return self._read_raw(self._pc)

    @rip.setter
    def rip(self, value: int) -> None:
        _uc_reg_write(self._uch, self._pc, ctypes.byref(ctypes.c_uint64(value)))

    @property
    def cpl(self) -> int:
        """Current privilege level (SDM Vol. 3A 5.5): 0 in real mode, 3 in virtual-8086 mode
        (RFLAGS.VM = 1; Vol. 3B, "8086 Emulation"), else the CS selector's RPL (= CS.DPL)."""
        cr0 = self._read_raw(X.UC_X86_REG_CR0)
        if not cr0 & _CR0_PE:
            return 0
        return self.cpl_of(cr0, self._read_raw(X.UC_X86_REG_CS), self._read_raw(X.UC_X86_REG_EFLAGS))

    @staticmethod
    def cpl_of(cr0: int, cs: int, rflags: int = 0) -> int:
        """:attr:`cpl` from CR0, the CS selector and RFLAGS already read (e.g. by read_registers)."""
        if not cr0 & _CR0_PE:
            return 0
        return 3 if rflags & _RFLAGS_VM else cs & 3

    def registers(self) -> dict[str, int]:
        """The general registers, RIP, RFLAGS, segments and control registers."""
        names = _GPRS[64 if self.mode is Mode.LONG else 32] + list(_SEGMENTS) + ["cr0", "cr2", "cr3", "cr4"]
        out = {n: self.reg(n) for n in names}
        out["efer"] = self.reg("efer")
        return out

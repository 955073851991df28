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

import ctypes
import mmap
from typing import Protocol

from dataclasses import dataclass, field

import unicorn
from unicorn import x86_const as X

from . import asm, decoder, system_insns
from ..arch.exceptions import Vector
from ..arch.msrs import RFLAGS_IOPL_SHIFT, Cr0, Cr4, Efer, Msr, Rflags  # noqa: F401
from unicorn.unicorn_py3 import unicorn as _ucmod

from .counter import _CTX_FIELDS, InstructionCounter
from .quirks import forget_exception
from ..errors import BudgetExceeded, GuestFault
# The parts a Guest is assembled from (one job each), and the names this module has
# always offered: ``from vtlab.cpu.guest import Mode, Segment, GuestException ...``.
from .delivery import ERROR_CODE_VECTORS, EventDelivery, GuestException  # noqa: F401
from .layout import Layout, Mode, Selector, parse_mode
from .memory import GuestMemory
from .modes import ModeControl
from .paging import PagingUnit, _STACK_WRITERS, _decode_detail, _writes_memory  # noqa: F401
from .registers import (_CONTROL_REGS, _GPRS, _MMR_REGS, _R64_TO_32, _REGS,  # noqa: F401
                        _SEGMENTS, RegisterAccess, _RegisterBatch)
from .segments import TSS_LIMIT, Segment, SegmentUnit, _descriptor, _TSS_LIMIT, pack_descriptor  # noqa: F401

#: CR0.PE as a plain int: ``int & IntFlag`` runs IntFlag.__rand__ in Python, too slow
#: for emulate(), which runs on every VM entry.
_CR0_PE = int(Cr0.PE)
_UC_CR0 = X.UC_X86_REG_CR0
_uc_emu_start = _ucmod.uclib.uc_emu_start
#: Indexes into the instruction counter's context (vtlab.cpu.counter._CTX_FIELDS).
_TOTAL, _STOP_AT = _CTX_FIELDS.index("total"), _CTX_FIELDS.index("stop_at")
_LAST_BLOCK, _LAST_SIZE = _CTX_FIELDS.index("last_block"), _CTX_FIELDS.index("last_size")
_OUTSIDE_BLOCKS, _OUTSIDE_BYTES = _CTX_FIELDS.index("outside_blocks"), _CTX_FIELDS.index("outside_bytes")
_BASE, _LIMIT, _BLOCKS = _CTX_FIELDS.index("base"), _CTX_FIELDS.index("limit"), _CTX_FIELDS.index("blocks")
_NO_STOP = (1 << 64) - 1
from time import monotonic as _monotonic  # noqa: E402


#: Size of each engine's buffer of translated code (see Guest.__init__).
TCG_BUFFER_SIZE = 1 << 20


class RanPastProgram(BudgetExceeded):
    """The guest ran off the end of its code into memory nothing was loaded into
    (a forgotten HLT, an empty program, a jump to a bad address)."""


class WallClockExceeded(BudgetExceeded):
    """A run went on for longer than its wall-clock cap (``max_seconds``)."""


# ------------------------------------------------------------------ run slices
#: How long one call into Unicorn may run before vtlab takes control back, in seconds.
#: Python runs signal handlers (the notebook's interrupt button is SIGINT, raised as
#: KeyboardInterrupt) and checks wall-clock caps only between bytecodes, never while
#: the emulator runs machine code; so a watchdog thread stops any emulator call that
#: has lasted a whole tick, and the caller simply carries on where the guest stopped.
#: An interrupt is then seen within one or two ticks.
#:
#: The watchdog does not call ``uc_emu_stop`` from its own thread: Unicorn sets its stop
#: flag before it asks the CPU to leave its loop, and a code hook reached in between is
#: skipped while its instruction still runs - a VM exit lost (seen once in some 10^4
#: slices).  It sets the instruction counter's budget to 0 instead: the native block
#: hook then stops the engine itself, on the emulation thread, at the next block.
SLICE_SECONDS = 0.025

#: [the instruction counter context (see vtlab.cpu.counter) of the emulator call in
#: progress, or None; that call's serial number].  emulate() keeps it up to date with
#: plain list stores (no locks on the hot path).
_SLICE = [None, 0]
_watchdog = None   # the watchdog thread, started by the first emulate()


class RunTimeout(BaseException):
    """Raised by the watchdog, asynchronously, in a run that is still busy in Python code
    (an exit handler or a device that loops) half a second past its wall-clock cap.

    A BaseException, like KeyboardInterrupt, so that the code it interrupts (a handler
    wrapper's ``except Exception``) does not mistake it for that code's own error; the
    run that set the cap catches it and stops with a message.  It never escapes a run.
    """


#: How long past its cap a run may stay busy in Python before RunTimeout is raised in it
#: (until then the run's own checks, between slices and exits, stop it cleanly).
TIMEOUT_GRACE = 0.5

#: [(thread id, time.monotonic() at which to raise RunTimeout) of the run being watched,
#: when RunTimeout was last raised in it (0.0: never)]; changed under _TIMEOUT_LOCK.
_TIMEOUT: list = [None, 0.0]
_TIMEOUT_LOCK = None   # a threading.Lock, made with the watchdog


def _raise_in(thread_id: int, exc) -> None:
    import ctypes
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               None if exc is None else ctypes.py_object(exc))


def _watch() -> None:
    """The watchdog: once per tick, stop the emulator call that was already running at the
    previous tick (by zeroing its instruction budget, see SLICE_SECONDS); the engine
    stops at the next block, the guest's state intact at an instruction boundary.  It also raises RunTimeout in a run stuck in
    Python code past its wall-clock cap (see watch_deadline)."""
    import time
    last = None
    while True:
        time.sleep(SLICE_SECONDS)
        ctx, serial = _SLICE[0], _SLICE[1]
        if ctx is not None:
            if last == serial:
                # A budget of 0: the counter's hook stops the engine at the next block.
                # (``ctx`` is held here, so the array stays valid even if its Guest is
                # dropped meanwhile; a store that arrives after the call ended is undone
                # by the next emulate(), which sets the budget afresh.)
                ctx[_STOP_AT] = 0
            last = serial
        else:
            last = None
        watched, now = _TIMEOUT[0], _monotonic()
        # (Raised again every TIMEOUT_GRACE while the run goes on: an exception that
        # arrives as a ctypes callback starts, before its try, is printed and lost.)
        if watched is not None and now > watched[1] and now > _TIMEOUT[1] + TIMEOUT_GRACE:
            with _TIMEOUT_LOCK:
                if _TIMEOUT[0] is watched:
                    _TIMEOUT[1] = now
                    _raise_in(watched[0], RunTimeout)


def watch_deadline(deadline: float | None):
    """Let the watchdog raise :class:`RunTimeout` in this thread if it is still running
    Python code :data:`TIMEOUT_GRACE` seconds after ``deadline`` (a time.monotonic()
    value; None: no cap).  Returns a token for :func:`unwatch_deadline`, which the caller
    must call (in a ``finally``) whatever happens."""
    if deadline is None:
        return _TIMEOUT[0]
    import threading
    if _watchdog is None:
        _start_watchdog()
    with _TIMEOUT_LOCK:
        previous = _TIMEOUT[0]
        _TIMEOUT[0] = (threading.get_ident(), deadline + TIMEOUT_GRACE)
    return previous


def unwatch_deadline(token) -> None:
    """Undo :func:`watch_deadline`; a RunTimeout raised but not yet delivered is withdrawn,
    so none can escape the run (the loop catches one arriving during this very call)."""
    while True:
        try:
            with _TIMEOUT_LOCK:
                if _TIMEOUT[1]:
                    _raise_in(_TIMEOUT[0][0], None)  # (withdraws a pending one, if any)
                    _TIMEOUT[1] = 0.0
                _TIMEOUT[0] = token
            return
        except RunTimeout:
            continue


def _start_watchdog() -> None:
    global _watchdog, _TIMEOUT_LOCK
    import threading
    if _TIMEOUT_LOCK is None:
        _TIMEOUT_LOCK = threading.Lock()
    _watchdog = threading.Thread(target=_watch, name="vtlab-slice-watchdog", daemon=True)
    _watchdog.start()


def _after_fork() -> None:  # threads do not survive fork(): a child starts its own
    global _watchdog, _TIMEOUT_LOCK
    _watchdog = _TIMEOUT_LOCK = None
    _SLICE[0] = None
    _TIMEOUT[:] = [None, 0.0]


try:
    import os as _os
    _os.register_at_fork(after_in_child=_after_fork)
except AttributeError:  # (not on Windows)
    pass


def _zero_instruction(bits: int) -> str:
    """How the bytes 00 00 decode in code of ``bits``: what runs in never-loaded memory."""
    return {16: "ADD [BX+SI], AL", 32: "ADD [EAX], AL"}.get(bits, "ADD [RAX], AL")



@dataclass
class RunLimits:
    """What bounds a run of the CPU besides its instruction budget, set by the code that
    drives it (a VMM's run loop), and why the last run had to stop.

    ``deadline`` is a time.monotonic() value after which a run stops (None: none);
    ``event_limit`` the value of ``events_delivered`` (exceptions and interrupts delivered
    to the guest so far) at which it stops (None: a fixed number more per run, see
    vtlab.cpu.nonroot.EVENT_BUDGET).  ``stopped`` says why the last run stopped although
    nothing architectural ended it - a guest past its program, an endless exception loop,
    the wall-clock cap - or is None: such a guest must not simply be entered again.
    """

    deadline: float | None = None
    event_limit: int | None = None
    events_delivered: int = 0
    stopped: str | None = None


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
    """Code loaded into guest memory, with its disassembly.

    ``instructions`` lists every instruction (for display and the instruction counter);
    ``decoded`` holds, by address, the typed record of each instruction VMX cares about
    (:class:`vtlab.cpu.decoder.DecodedInstruction`), decoded once here at load time.
    """

    address: int
    code: bytes
    bits: int
    source: str | None = None
    instructions: list[asm.Instruction] = field(default_factory=list)
    decoded: dict[int, decoder.DecodedInstruction] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.address + len(self.code)

    def listing(self) -> str:
        return "\n".join(str(i) for i in self.instructions)


class GuestMonitor(Protocol):
    """What :meth:`Guest.attach_monitor` expects of a monitor (the VMX exit monitor)."""

    #: True if the monitor records a HLT stop itself (the guest then does not).
    records_own_stops: bool

    def interrupt_raised(self, vector: int) -> None: ...
    def before_hlt(self, address: int) -> bool: ...
    def before_rdtsc(self, address: int) -> bool: ...
    def program_loaded(self, program: "Program") -> None: ...


class Guest(RegisterAccess, GuestMemory, SegmentUnit, PagingUnit, ModeControl, EventDelivery):
    """A real x86 CPU (Unicorn) with memory, set up in one of the four :class:`Mode` s.

    The CPU's parts live in modules of their own and are combined here: registers
    (:mod:`vtlab.cpu.registers`), guest-physical memory (:mod:`~vtlab.cpu.memory`),
    segments and system tables (:mod:`~vtlab.cpu.segments`), page faults
    (:mod:`~vtlab.cpu.paging`), start modes (:mod:`~vtlab.cpu.modes`) and event
    delivery (:mod:`~vtlab.cpu.delivery`).  This class owns the engine, loads programs
    and runs them.

    ``virtual_8086=True`` (real mode only): the guest's 8086 code will run in
    virtual-8086 mode, as a VMM without unrestricted guest runs it (:mod:`vtlab.vmm.v86`);
    the engine is then opened in 32-bit mode so that this code runs at CPL 3.

    >>> g = Guest("real")
    >>> g.load("mov ax, 0x1234\\nmov [0x500], ax\\nhlt", 0x1000)  # doctest: +ELLIPSIS
    Program(...)
    >>> g.run(0x1000).reason, hex(g.read_u16(0x500))
    ('hlt', '0x1234')
    """

    def __init__(self, mode: Mode | str = Mode.REAL, memory_size: int = 2 << 20,
                 virtual_8086: bool = False):
        self.mode = parse_mode(mode)
        if memory_size % 0x1000 or memory_size < 0x10_0000:
            raise ValueError("memory_size must be a multiple of 4 KiB and at least 1 MiB")
        if virtual_8086 and self.mode is not Mode.REAL:
            raise ValueError("virtual_8086=True is for a guest that starts in real mode "
                             "(its 8086 code then runs in virtual-8086 mode, SDM Vol. 3B 21.2)")
        self.memory_size = memory_size
        # Unicorn decodes by the mode the engine was opened in, so each start mode gets
        # its own engine (16-, 32- or 64-bit); CR0/CR4/EFER and CS are then set for real.
        uc_mode = {16: unicorn.UC_MODE_16, 32: unicorn.UC_MODE_32, 64: unicorn.UC_MODE_64}
        # A real-mode guest that will run in virtual-8086 mode (a VMM without unrestricted
        # guest, vtlab.vmm.v86) gets a 32-bit engine: a 16-bit one loads every segment
        # register with DPL 0, so RFLAGS.VM = 1 code would run at CPL 0, where the SDM
        # has CPL 3 (SDM Vol. 3B 21.2.7) and HLT or MOV CR must raise #GP.  The 32-bit
        # engine loads virtual-8086 segments as the CPU does (base = selector x 16, limit
        # FFFFH, DPL 3) and still decodes 16-bit code, by CS's D flag (SDM Vol. 3A 3.4.5).
        self.virtual_8086 = virtual_8086
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, uc_mode[32 if virtual_8086 else self.mode.bits])
        # QEMU's translation buffer (1 GiB of address space by default) has 2 MiB of it
        # touched at once, per engine; vtlab's guests translate to far less than 1 MiB
        # (QEMU starts afresh when it is full), and a notebook making many VMs keeps RSS
        # down by 2 MiB each while an old one waits for the garbage collector.
        self.uc.ctl_set_tcg_buffer_size(TCG_BUFFER_SIZE)
        self._init_register_access()
        self._init_memory()
        # The guest's RAM is a buffer of vtlab's, mapped into Unicorn at guest-physical 0:
        # with EPT on, vtlab maps guest-physical pages onto pages of it as the EPT says
        # (vtlab.cpu.ept), and two guest-physical pages may then share one.
        self.ram = mmap.mmap(-1, memory_size)
        self._ram_view = ctypes.c_char.from_buffer(self.ram)
        self.ram_pointer = ctypes.addressof(self._ram_view)
        self.uc.mem_map_ptr(0, memory_size, unicorn.UC_PROT_ALL, self.ram_pointer)
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
        self._counting_tbs = False  # translated blocks made for a counted (exact) run
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

    # ------------------------------------------------------------- programs
    def load(self, program: str | bytes, address: int = 0x1000, bits: int | None = None) -> Program:
        """Assemble (if text) and write a program at ``address``; returns the :class:`Program`.

        The code is swept with Capstone so that vtlab knows where every instruction
        starts: the VMX layer hooks exactly the sensitive ones, and the instruction
        counter knows how many instructions each executed block holds.  Instructions of
        interest are decoded into typed records once, here (``Program.decoded``); hooks
        are placed by their kind, never by their text.
        """
        bits = bits or self.mode.bits
        source = program if isinstance(program, str) else None
        code = asm.assemble(program, address, bits) if source is not None else bytes(program)
        if address < 0 or address + len(code) > self.memory_size:
            raise ValueError(f"program at {address:#x} (+{len(code)} bytes) is outside guest memory")
        self.write(address, code)
        # Unicorn keeps translated blocks across memory writes: drop any stale ones.
        self.uc.ctl_remove_cache(address, address + max(len(code), 1))
        instructions, decoded = decoder.sweep(code, address, bits)
        prog = Program(address, code, bits, source, instructions, decoded)
        self.programs.append(prog)
        if prog.instructions:
            self.counter.add_instructions(i.address for i in prog.instructions)
        kinds = decoder.InsnKind
        for at, d in decoded.items():
            if at in self._hlt_hooks:
                continue
            if d.kind is kinds.HLT:
                hook = self._on_hlt
            elif d.kind is kinds.RDTSC or d.kind is kinds.RDTSCP:
                hook = self._on_rdtsc  # the virtual TSC
            elif d.kind in decoder.IO_KINDS:
                hook = self._on_io_check  # the I/O-permission check Unicorn skips
            elif d.kind in system_insns.UMIP_KINDS:
                hook = self._on_umip_check  # CR4.UMIP, which Unicorn does not apply
            elif d.kind in system_insns.FAST_SYSTEM_CALL_KINDS:
                hook = self._on_fast_system_call  # SYSENTER/SYSEXIT: a no-op in Unicorn
            else:
                continue
            self._hlt_hooks.add(at)
            self.uc.hook_add(unicorn.UC_HOOK_CODE, hook, d, begin=at, end=at)
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

    # ----------------------------------------------------------------- hooks
    def add_code_hook(self, callback, begin: int = 0, end: int = 0xFFFF_FFFF_FFFF_FFFF):
        """Call ``callback(address, size)`` before each instruction in ``begin..end``.

        ``address`` is the instruction's linear address (CS.base + RIP) and ``size`` its
        length in bytes; ``begin`` and ``end`` are linear addresses, both inclusive.
        Every instruction in the range then costs a call into Python, so keep the range
        to the code you want to watch.  Returns a handle for :meth:`remove_hook`.

        >>> g = Guest("real")
        >>> _ = g.load("nop\\nnop\\nhlt", 0x1000)
        >>> seen = []
        >>> _ = g.add_code_hook(lambda address, size: seen.append(hex(address)), 0x1000, 0x1001)
        >>> _ = g.run(0x1000); seen
        ['0x1000', '0x1001']
        """
        return self.uc.hook_add(unicorn.UC_HOOK_CODE,
                                lambda uc, address, size, _user: callback(address, size),
                                None, begin, end)

    def remove_hook(self, handle) -> None:
        """Remove a hook that :meth:`add_code_hook` returned."""
        self.uc.hook_del(handle)

    # ------------------------------------------------------------ monitors
    def attach_monitor(self, monitor: "GuestMonitor") -> None:
        """Let ``monitor`` watch this CPU run (VMX non-root operation attaches its exit
        monitor here): it hears of every exception and interrupt, of each HLT and RDTSC
        before it executes, and of every program loaded, including those loaded already.
        Without a monitor the guest itself records why a bare run stopped."""
        self.on_interrupt = monitor.interrupt_raised
        self.on_hlt = monitor.before_hlt
        self.on_rdtsc = monitor.before_rdtsc
        self.on_hlt_stops_itself = monitor.records_own_stops
        self.load_listeners.append(monitor.program_loaded)
        for prog in self.programs:
            monitor.program_loaded(prog)

    def connect_io(self, read, write) -> None:
        """Wire port I/O that does not exit to "hardware": ``read(port, size) -> value``
        and ``write(port, size, value)`` (a VMM's device bus, a test's recorder)."""
        self.io_read, self.io_write = read, write

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
        iopl = (self.reg("eflags") & Rflags.IOPL) >> RFLAGS_IOPL_SHIFT
        if self.cpl > iopl:
            # #GP(0), raised like any other exception: a bare run records it, and in VMX
            # non-root operation the exit monitor takes it through the exception bitmap -
            # it has priority over an I/O-instruction VM exit (SDM Vol. 3C 26.1.1).
            self.on_interrupt(Vector.GP)

    def _raise_gp(self, reason: str) -> None:
        """#GP(0) from a check vtlab makes for Unicorn: a bare run stops with ``reason``
        beside the instruction; in VMX non-root operation the exit monitor takes it
        through the exception bitmap like any other exception."""
        if self.on_hlt_stops_itself:
            self.on_interrupt(Vector.GP)
            return
        exc = self.make_exception(Vector.GP)
        exc.instruction = f"{exc.instruction} [{reason}]".strip()
        self._stop = ("exception", exc)
        self.uc.emu_stop()

    def _on_umip_check(self, uc, address, size, d):
        """SGDT/SIDT/SLDT/SMSW/STR with CR4.UMIP = 1 at CPL > 0: #GP(0) (system_insns)."""
        if self._stop is not None or not self.memory_holds(address, d.raw):
            return
        reason = system_insns.umip_fault(self)
        if reason is not None:
            self._raise_gp(reason)

    def _on_fast_system_call(self, uc, address, size, d):
        """SYSENTER/SYSEXIT as the SDM defines them; Unicorn skips them (system_insns)."""
        if self._stop is not None or not self.memory_holds(address, d.raw):
            return
        enter = d.kind is decoder.InsnKind.SYSENTER
        reason = system_insns.sysenter_fault(self) if enter else system_insns.sysexit_fault(self)
        if reason is not None:
            self._raise_gp(reason)
            return
        try:
            system_insns.sysenter(self) if enter else system_insns.sysexit(self, d.raw)
        except unicorn.UcError:
            # The GDT has no descriptor Unicorn accepts at the selectors the SDM names.
            self._raise_gp("the GDT has no flat code/data descriptors at IA32_SYSENTER_CS "
                           "(+8, +16, +24 ...): vtlab loads them from the GDT")
            return
        self.counter.unretire_rest_of_block(address, retired_here=True)

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

    def _record_interrupt(self, vector: int) -> None:
        """Default UC_HOOK_INTR handler: remember the exception and stop the run."""
        self._stop = ("exception", self.make_exception(vector))
        self.uc.emu_stop()

    def emulate(self, budget: int, *, exact: bool = False) -> bool:
        """One call into Unicorn from the current RIP, bounded by ``budget`` instructions.

        The native block counter stops a runaway guest at block granularity with no
        Python on the hot path; ``exact=True`` (single-stepping) makes Unicorn count
        every instruction instead, which is precise but slow.

        Returns True if the call was cut short after :data:`SLICE_SECONDS` by the slice
        watchdog (the guest simply stopped at an instruction boundary; the caller checks
        for an interrupt or a wall-clock cap and calls again), False otherwise.

        ``uc_emu_start`` is called straight through ctypes, with the binding's contract
        kept (an exception raised in a hook comes out of here): the binding's wrapper
        costs as much as the rest of a short run.
        """
        begin = self._read_raw(self._pc)
        if not self._read_raw(_UC_CR0) & _CR0_PE:  # (a plain int: see _CR0_PE)
            begin &= 0xFFFF
        ctx = self.counter._ctx
        if exact:
            ctx[_STOP_AT] = _NO_STOP
            count = budget
            if not self._counting_tbs:
                # Unicorn counts instructions (``count``) with code it adds when it
                # translates a block; blocks translated for a run without a count would
                # ignore it, so the first counted run after uncounted ones starts afresh.
                self.uc.ctl_flush_tb()
                self._counting_tbs = True
        else:
            self._counting_tbs = False
            ctx[_STOP_AT] = min(ctx[_TOTAL] + budget, _NO_STOP)
            count = 0
        uc = self.uc
        uc._hook_exception = None
        if _watchdog is None:
            _start_watchdog()
        slices = _SLICE
        slices[1] += 1
        slices[0] = ctx
        try:
            # The end address is ignored: Unicorn's exit list (set up in __init__) is empty.
            status = _uc_emu_start(self._uch, begin, 0, 0, count)
        finally:
            # (Plain stores, which Python never interrupts: even a KeyboardInterrupt
            # raised just as Unicorn returns leaves no budget or slice behind.)
            slices[0] = None
            sliced = ctx[_STOP_AT] == 0   # the watchdog's mark
            ctx[_STOP_AT] = _NO_STOP
        if status:
            raise unicorn.UcError(status)
        if uc._hook_exception is not None:
            raise uc._hook_exception
        return sliced

    def run(self, start: int | None = None, max_instructions: int = 1_000_000,
            max_seconds: float | None = 60.0) -> RunResult:
        """Run the guest (no VMX) until HLT, an exception or the instruction budget.

        Raises :class:`BudgetExceeded` if the budget runs out first, its subclass
        :class:`RanPastProgram` if the guest runs off the end of its code into memory
        nothing was loaded into (a forgotten HLT), and :class:`WallClockExceeded` after
        ``max_seconds`` of wall-clock time (None: no cap).  The guest stays where it
        stopped, so it can be inspected and run again.

        A MOV to CR0/CR3/CR4/CR8 with a value the architecture refuses raises #GP(0)
        here as on a real CPU (see :mod:`vtlab.cpu.cr_checks`; Unicorn would write it).
        """
        if start is not None:
            self.rip = start
        self._guard_programs(bare=True)
        self._stop = None
        runaway = self.runaway_message(recent=False)
        if runaway is not None:  # (already in never-loaded memory: say so at once)
            raise RanPastProgram(runaway)
        before = self.counter.total
        deadline = None if max_seconds is None else _monotonic() + max_seconds
        too_long = (f"the guest ran for more than max_seconds={max_seconds} s of wall-clock time; "
                    "raise max_seconds or look for a loop")
        token = watch_deadline(deadline)
        outside = (self.counter._ctx[_OUTSIDE_BLOCKS], self.counter._ctx[_OUTSIDE_BYTES])
        try:
            while True:
                remaining = max_instructions - (self.counter.total - before)
                if remaining <= 0:
                    break
                try:
                    sliced = self.emulate(remaining)
                except unicorn.UcError as exc:
                    self._stop = self._stop or ("exception", self._unicorn_error(exc))
                    break
                if self._stop is not None or not sliced:
                    break
                # (The engine may have counted a block it then did not run: see ExitMonitor.run.)
                self.unretire_unstarted_block()
                # The slice watchdog took control back (see SLICE_SECONDS): a
                # KeyboardInterrupt has been raised by now if there was one; check the caps.
                runaway = self.runaway_message()
                if runaway is not None:
                    raise RanPastProgram(runaway)
                # Blocks outside every swept program count as one instruction each; count
                # them by size (2 bytes an instruction) for the budget (see ExitMonitor.run).
                ctx = self.counter._ctx
                extra = (ctx[_OUTSIDE_BYTES] - outside[1]) // 2 - (ctx[_OUTSIDE_BLOCKS] - outside[0])
                if extra >= remaining:
                    raise BudgetExceeded(
                        f"the guest ran about {max_instructions - remaining + extra:,} instructions "
                        f"without stopping (max_instructions={max_instructions:,}), most of them outside "
                        f"every program loaded (RIP now {self.rip:#x}); look for a jump to a bad address")
                if deadline is not None and _monotonic() > deadline:
                    raise WallClockExceeded(f"{too_long} ({self.counter.total - before:,} "
                                            f"instructions, RIP now {self.rip:#x})")
        except RunTimeout:  # stuck in a Python hook (a device?) past the cap
            self._stop = None
            raise WallClockExceeded(f"{too_long} (stopped inside Python code the guest's "
                                    "I/O or hooks called - a device callback that loops?)") from None
        finally:
            unwatch_deadline(token)
        stop = self._stop
        if stop is not None and stop[0] == "ran-off":
            self._stop = None
            raise RanPastProgram(self.ran_off_message(stop[1]))
        if stop is not None:  # the CPU stopped at RIP: nothing from there on retired
            # (a HLT stop holds the hook's address, already linear; an exception its RIP)
            linear = stop[1] if stop[0] == "hlt" else self.segment("cs").base + stop[1].rip
            # HLT itself retires (the CPU then waits); a faulting instruction does not
            self.counter.unretire_rest_of_block(linear, retired_here=stop[0] == "hlt")
        executed = self.counter.total - before
        self._stop = None
        if stop is None:
            if not self.counter.exhausted and self._byte_before_rip() == b"\xf4":
                return RunResult("hlt", self.rip - 1, executed, cpl=self.cpl)
            runaway = self.runaway_message()
            if runaway is not None:
                raise RanPastProgram(runaway)
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

    def unretire_unstarted_block(self) -> None:
        """After a slice stop: the engine stops between blocks - having perhaps counted the
        block it was about to run (the counter's hook runs first) - or before a hooked
        instruction in the middle of one.  Either way nothing from RIP to the end of the
        last block counted ran: take it back (a part already taken back, by an exit
        handled in place, is not taken twice), so slicing never changes the count."""
        ctx = self.counter._ctx
        at, start, size = self.linear_rip(), ctx[_LAST_BLOCK], ctx[_LAST_SIZE]
        if not (size and at == start):
            self.counter.unretire_rest_of_block(at)   # (stopped before a hooked instruction)
            return
        # None of the block ran: undo its hook's work, instructions and block tallies alike.
        off = start - ctx[_BASE]
        if 0 <= off and off + size <= ctx[_LIMIT]:
            self.counter.unretire_rest_of_block(at)
            ctx[_BLOCKS] -= 1
        else:
            ctx[_TOTAL] -= 1
            ctx[_OUTSIDE_BLOCKS] -= 1
            ctx[_OUTSIDE_BYTES] -= size
        ctx[_LAST_SIZE] = 0

    def _byte_before_rip(self) -> bytes:
        try:
            return self.read(self.linear_rip() - 1, 1)
        except unicorn.UcError:
            return b""

    # ------------------------------------------------------- runaway guards
    # A guest that forgets its HLT runs on into the memory after its code.  Nothing was
    # ever loaded there, so it holds zeros, and 00 00 is a valid instruction (ADD
    # [BX+SI], AL / ADD [EAX], AL): the CPU would execute it for ever, slowly (each one
    # is a memory write), until some budget ran out minutes later.  vtlab hooks the first
    # byte after each program (a hook costs nothing until execution gets there) and stops
    # the guest the moment it arrives; runs cut into slices also check where they are.

    @property
    def limits(self) -> RunLimits:
        """The :class:`RunLimits` of this CPU's runs (made on first use)."""
        try:
            return self._limits
        except AttributeError:
            self._limits = RunLimits()
            return self._limits

    _end_guards: dict | None = None   #: program end address -> its hook
    _guarded = 0                      #: programs seen by _guard_programs
    _cr_guarded = 0                   #: programs whose MOV-to-CR bare runs check

    def in_program(self, address: int) -> bool:
        """Does ``address`` lie in the code or data of a loaded :class:`Program`?"""
        return any(p.address <= address < p.end for p in self.programs)

    def _guard_programs(self, bare: bool = False) -> None:
        """Hook the end of each program loaded since the last call (see above); with
        ``bare``, also the MOV-to-CR instructions, whose #GP(0) checks Unicorn lacks (in
        VMX non-root operation the exit rules make them instead)."""
        programs = self.programs
        if self._end_guards is None:
            self._end_guards = {}
        guards = self._end_guards
        for prog in programs[self._guarded:]:
            for at in [a for a in guards if prog.address <= a < prog.end]:
                self.uc.hook_del(guards.pop(at))  # a later program covers that end
            end = prog.end
            if end not in guards and end < self.memory_size and not self.in_program(end):
                guards[end] = self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_program_end, None, end, end)
        self._guarded = len(programs)
        if bare:
            for prog in programs[self._cr_guarded:]:
                for at, d in prog.decoded.items():
                    if d.kind is decoder.InsnKind.MOV_TO_CR:
                        self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_mov_to_cr, d, at, at)
            self._cr_guarded = len(programs)

    def _on_program_end(self, uc, address, size, _user) -> None:
        """Execution reached the first byte after a program: stop if nothing is there."""
        if self._stop is not None or self.in_program(address):
            return
        try:
            if self.read(address, 2) != b"\0\0":
                return  # the guest put code there itself: let it run
        except unicorn.UcError:
            return
        self._stop = ("ran-off", address)
        uc.emu_stop()

    def _on_mov_to_cr(self, uc, address, size, d) -> None:
        """Bare runs: MOV to CRn with a value the architecture refuses raises #GP(0)."""
        if (self._stop is not None or self.on_hlt_stops_itself or not d.registers
                or self.cpl != 0 or not self.memory_holds(address, d.raw)):
            return  # (VMX non-root: the exit rule checks; CPL > 0: QEMU raises #GP)
        from .cr_checks import mov_to_cr_fault
        reason = mov_to_cr_fault(self, d.control_register, self.reg(d.registers[0].name))
        if reason is None:
            return
        exc = self.make_exception(Vector.GP)
        exc.instruction = f"{exc.instruction} [{reason}]".strip()
        self._stop = ("exception", exc)
        uc.emu_stop()

    def ran_off_message(self, address: int) -> str:
        """What to tell a learner whose guest reached ``address``, the end of a program."""
        insn = _zero_instruction(self.bits)
        prog = next((p for p in reversed(self.programs) if p.end == address), None)
        if prog is not None and not prog.code:
            return (f"the program at {address:#x} is empty: the guest started executing memory "
                    f"nothing was loaded into (its zero bytes run as {insn}) - load some code, "
                    "ending in HLT")
        where = f"the code loaded at {prog.address:#x} ends there; " if prog is not None else ""
        return (f"the guest ran past its program at {address:#x}: did you forget HLT? ({where}nothing "
                f"was loaded after it, and its zero bytes would run as {insn} over and over)")

    def never_loaded(self, address: int) -> bool:
        """Is ``address`` outside every program, in memory that holds zeros (00 00)?"""
        if self.in_program(address):
            return False
        try:
            return self.read(address, 2) == b"\0\0"
        except unicorn.UcError:
            return False

    def runaway_message(self, recent: bool = True) -> str | None:
        """If the CPU stands in never-loaded memory (zeros, outside every program) - or,
        with ``recent``, the last block it started executing lay there (the instruction
        counter remembers it): why the run should stop, in words; None if it does not."""
        ctx = self.counter._ctx
        candidates = (self.linear_rip(), ctx[_LAST_BLOCK]) if recent and ctx[_LAST_SIZE] else (self.linear_rip(),)
        address = next((at for at in candidates if self.never_loaded(at)), None)
        if address is None:
            return None
        if any(p.end == address for p in self.programs):
            return self.ran_off_message(address)
        return (f"the guest is executing zeroed memory at {address:#x}, outside every program "
                f"loaded ({_zero_instruction(self.bits)} over and over): it jumped or returned to "
                "an address where nothing was loaded, or ran past the end of its program - "
                "did you forget HLT?")

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
        flags = int(Rflags.FIXED | Rflags.IF | (iopl << RFLAGS_IOPL_SHIFT) & Rflags.IOPL)
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

"""VMX non-root operation: which guest instructions and events cause VM exits, and how.

The guest runs natively in Unicorn.  A Python callback per instruction would make it
hundreds of times slower, so vtlab does what a binary translator's front end does:
when code is loaded it is decoded (Capstone) and a code hook is placed on exactly the
*sensitive* instructions (CPUID, HLT, IN/OUT, RDMSR, MOV CR ...).  When one is about to
execute, its rule below decides - from the VMCS controls, bitmaps and masks, as SDM
Vol. 3C 26.1 ("Instructions That Cause VM Exits") prescribes - whether it exits.  If it
does, emulation stops *before* the instruction, so the saved guest RIP points at it
and VM_EXIT_INSTRUCTION_LEN tells the VMM how far to advance (SDM 28.2.5).

Events arrive the same way: exceptions through Unicorn's interrupt hook (checked
against the exception bitmap, SDM 26.2), guest-physical accesses that the EPT does not
allow through Unicorn's memory hooks (EPT violations, SDM 29.3.3), external interrupts
and NMIs from the VMM's virtual devices (pin-based controls, SDM 26.2).

:class:`ExitMonitor` also moves guest state between the VMCS and the CPU on VM entry
and VM exit (SDM 27.3.2 and 28.3).
"""
from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import unicorn
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucmod

from ..arch.controls import ProcBased2
from ..arch.exceptions import Vector
from ..arch.exit_reasons import ExitReason
from ..arch.vmcs_fields import VmcsField as F
from .quirks import forget_exception
from .outcome import Status, VmxOutcome

if TYPE_CHECKING:
    from .guest import Guest, Program
    from .vmcs import Vmcs
    from .vmx import VmxCpu

from .vmexit import VmExit
from .decoder import DecodedInstruction, InsnKind
from .exit_rules import EXIT_REASON_BY_KIND, EXIT_RULES, NON_EXITING_RULES
from .guest_state import GuestStateCache
from .events import EventUnit
_uc_emu_stop = _ucmod.uclib.uc_emu_stop
#: What the exit rules and the exit record need of the CPU at a sensitive instruction,
#: read in one call: RIP and the CPL (CS.RPL in protected mode), and the registers a
#: VMM saves at every exit (VmExit.registers).
_EXIT_REGISTERS = ("rip", "cr0", "cs", "rax", "rbx", "rcx", "rdx", "rsp", "rflags")
from .nonroot_consts import _UNDECODED_SIZE, _NOT_IN_QEMU, _MONITOR_TRAP_FLAG, _ACTIVATE_SECONDARY, _uc_hook_add

#: Kinds the guest hooks itself (Guest.load); its hooks call _on_hlt / _on_rdtsc.
_GUEST_HOOKED = frozenset({InsnKind.HLT, InsnKind.RDTSC, InsnKind.RDTSCP})


class ExitMonitor(EventUnit):
    """Watches a guest in VMX non-root operation and turns sensitive events into VM exits."""

    def __init__(self, cpu: "VmxCpu"):
        self.cpu = cpu
        self.guest: "Guest" = cpu.guest
        self.pin = self.proc = self.proc2 = 0
        self.pending: VmExit | None = None
        self.event: tuple | None = None          # (vector, rip, software?) from the INTR hook
        self.mem_fault: tuple | None = None
        self.halted = False
        # address -> (decoded instruction, the exit reason it can cause or None for SMSW),
        # found once at load time (see watch_program)
        self._watched: dict[int, tuple[DecodedInstruction, ExitReason | None]] = {}
        # Which VMCS (and which write of software's) pin/proc/proc2 were read from: run()
        # re-reads the controls only when software wrote outside the guest-state area since.
        self._controls_vmcs, self._controls_version = None, -1
        #: what the vCPU keeps about the VMCS it last ran (lazy save, fields to load)
        self.state = GuestStateCache(self.guest, self)
        self._single = False       # the current run steps one instruction at a time
        #: RIP and CPL at the sensitive instruction being decided (set just before its rule)
        self.rip = self.cpl = 0
        self._pf_may_exit = True   # (set from the controls by _load_controls)
        self._cr2: int | None = None  # CR2 before this run, for a #PF that exits
        self.pending_interrupts: list[int] = []   # external interrupt vectors raised by devices
        self.pending_nmi = False
        self.ept_pages: dict[int, int] | None = None  # page -> RWX permissions, None = no EPT view
        g = self.guest
        g.attach_monitor(self)
        g.uc.hook_add(unicorn.UC_HOOK_MEM_UNMAPPED | unicorn.UC_HOOK_MEM_PROT, self._on_mem_fault)
        # The code hook of the sensitive instructions, as a raw ctypes callback: the
        # binding's hook_add wraps every callback in two more Python frames, which is a
        # noticeable part of a VM exit.  One callback object serves every address; it
        # must stay referenced for as long as the engine may call it.
        self._code_hook_fn = _ucmod.HOOK_CODE_CFUNC(self._code_hook)

    # The Guest.attach_monitor interface (vtlab.cpu.guest.GuestMonitor).
    records_own_stops = True

    def interrupt_raised(self, vector: int) -> None:
        self._on_interrupt(vector)

    def before_hlt(self, address: int) -> bool:
        return self._on_hlt(address)

    def before_rdtsc(self, address: int) -> bool:
        return self._on_rdtsc(address)

    def program_loaded(self, program: "Program") -> None:
        self.watch_program(program)

    @property
    def vmcs(self) -> "Vmcs | None":
        """The VMCS region whose guest this vCPU runs (or last ran)."""
        return self.state.vmcs

    # --------------------------------------------------------------- hooks
    def watch_program(self, prog: "Program") -> None:
        """Hook every sensitive instruction of a newly loaded program (one hook per address).

        The program's instructions were decoded when it was loaded (``prog.decoded``);
        an instruction is sensitive if its kind can cause an exit (EXIT_REASON_BY_KIND)
        or behaves differently in non-root operation (NON_EXITING_RULES: SMSW).
        """
        for address, d in prog.decoded.items():
            if address in self._watched:
                continue
            reason = EXIT_REASON_BY_KIND.get(d.kind)
            if reason is None and d.kind not in NON_EXITING_RULES:
                continue
            self._watched[address] = (d, reason)
            if d.kind in _GUEST_HOOKED:
                continue  # the guest's own hook for these calls _on_hlt / _on_rdtsc
            handle = _ucmod.uc_hook_h()
            status = _uc_hook_add(self.guest.uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_CODE,
                                  self._code_hook_fn, None, ctypes.c_uint64(address),
                                  ctypes.c_uint64(address))
            if status != unicorn.UC_ERR_OK:
                raise unicorn.UcError(status)

    def _code_hook(self, _handle, address: int, size: int, _user) -> None:
        """UC_HOOK_CODE entry point (see __init__), with the binding's exception contract:
        an exception stops emulation and ``Uc.emu_start`` raises it once Unicorn returns."""
        try:
            self._on_sensitive(self.guest.uc, address, size, True)
        except BaseException as exc:
            uc = self.guest.uc
            if uc._hook_exception is None:
                uc._hook_exception = exc
            uc.emu_stop()

    def control_on(self, control) -> bool:
        if isinstance(control, ProcBased2):
            return bool(self.proc2 & control)
        return bool(self.proc & control)

    def _on_sensitive(self, uc, address, size, in_place=None) -> bool:
        """Decide, just before a sensitive instruction executes, whether it exits.

        ``in_place`` (from the code hook only): the processor may perform the exit, let
        the VMM handle it and re-enter the guest right here, without stopping Unicorn
        (see :meth:`vtlab.cpu.vmx.VmxCpu.exit_in_place`).
        """
        if self.pending is not None or self.state.vmcs is None or self.event is not None:
            return False  # (an exception - e.g. the I/O-permission #GP - claimed it first)
        watched = self._watched.get(address)
        if watched is None:
            return False
        d, reason = watched
        # Unicorn (QEMU) passes the size it decoded, except for instructions its
        # translator turns straight into #UD (GETSEC, VMCALL and the other VMX
        # instructions): their size arrives as the placeholder 0xF1F1F1F1, or as the
        # length of the part QEMU decoded before giving up (2 for VMREAD 0F 78 /r).
        # Those are exactly instructions that exit unconditionally, so trust the
        # sweep's size for them (the byte comparison below still guards against
        # self-modifying code).
        if d.length != size and size != _UNDECODED_SIZE and d.kind not in _NOT_IN_QEMU:
            return False
        g = self.guest
        # Self-modifying code: trust the bytes that are there now, not the sweep.
        if not g.memory_holds(address, d.raw):
            return False
        # What the rules and the exit record need of the CPU, in one call into it:
        # RIP, and the CPL (CS.RPL in protected mode, 0 in real mode).
        rip, cr0, cs, rax, rbx, rcx, rdx, rsp, rflags = g.read_registers(_EXIT_REGISTERS)
        self.rip = rip
        self.cpl = cpl = cs & 3 if cr0 & 1 else 0
        rule = EXIT_RULES[reason] if reason is not None else NON_EXITING_RULES[d.kind]
        result = rule(self, d)
        if result is None:
            return False
        # (A type test first: ``VmExit == str`` would run the dataclass's Python __eq__.)
        if result.__class__ is str:
            if result == "emulated":
                g.counter.unretire_rest_of_block(address, retired_here=True)
                g.rip = g.rip + d.length  # the rule did the work; skip it
                return False
            return True  # "emulated-fault": the rule raised an exception instead
        counter = g.counter
        counter.unretire_rest_of_block(address)  # it exits instead of retiring
        result.guest_instructions = counter.total
        result.registers = (rax, rbx, rcx, rdx, rsp, rflags, cpl)
        self.pending = result
        if in_place and not self._single and self.cpu.resume_in_place is not None:
            if self.cpu.exit_in_place(result):
                self.pending = None   # handled and re-entered: the guest goes on
                return False
        _uc_emu_stop(g._uch)
        return True

    def _on_hlt(self, address: int) -> bool:
        """Called by the guest before HLT executes: exit, or enter the HLT activity state."""
        if self.pending is not None or self.vmcs is None:
            return False
        if self._on_sensitive(self.guest.uc, address, 1, None):
            return True
        self.halted = True
        return True

    def _on_rdtsc(self, address: int) -> bool:
        """Called by the guest before RDTSC/RDTSCP: True if it exits (or faults) instead."""
        if self.pending is not None or self.vmcs is None:
            return False
        watched = self._watched.get(address)
        return watched is not None and self._on_sensitive(self.guest.uc, address, watched[0].length, None)


    def _load_controls(self) -> None:
        """Read the execution controls the rules test, unless the VMCS is unchanged since.

        Every software write outside the guest-state area bumps the vCPU's
        ``controls_version`` (the processor's own writes never touch the controls), so
        (VMCS, version) says whether :attr:`pin`, :attr:`proc` and :attr:`proc2` are still
        what it holds.
        """
        state = self.state
        vmcs = state.vmcs
        if vmcs is self._controls_vmcs and state.controls_version == self._controls_version:
            return
        v = vmcs.get
        self.pin = v(F.PIN_BASED_VM_EXEC_CONTROL)
        self.proc = v(F.CPU_BASED_VM_EXEC_CONTROL)
        self.proc2 = v(F.SECONDARY_VM_EXEC_CONTROL) if self.proc & _ACTIVATE_SECONDARY else 0
        # A #PF exits when exception-bitmap bit 14 equals "PFEC & mask == match" (SDM 26.2):
        # with bit 14 clear and mask = match = 0 it never does.
        self._pf_may_exit = bool(v(F.EXCEPTION_BITMAP) >> 14 & 1 or v(F.PAGE_FAULT_ERROR_CODE_MASK)
                                 or v(F.PAGE_FAULT_ERROR_CODE_MATCH))
        self._controls_vmcs, self._controls_version = vmcs, state.controls_version

    def run(self, insn: str, budget: int, step: bool = False) -> VmxOutcome:
        """Run the guest in non-root operation until a VM exit (or the budget / a step)."""
        self._load_controls()
        g = self.guest
        start = g.counter.total
        exit_ = self._inject_event()
        while exit_ is None:
            if self.pending_nmi or self.pending_interrupts:
                exit_ = self._pending_interrupt_exit()
                if exit_ is not None:
                    break
            if self.halted:
                return VmxOutcome(insn, Status.PAUSED, halted=True, message="the guest is in the HLT activity "
                                  "state (HLT exiting is 0) and no interrupt is pending")
            remaining = budget - (g.counter.total - start)
            if remaining <= 0:
                return VmxOutcome(insn, Status.PAUSED, message=f"paused after {budget:,} guest "
                                  "instructions without a VM exit (budget)")
            mtf = bool(self.proc & _MONITOR_TRAP_FLAG)
            single = self._single = step or mtf
            self.pending, self.event = None, None
            rip_before = g.rip if single else None  # (only the step message shows it)
            # QEMU overwrites CR2 when it raises #PF; a #PF that exits must leave it alone
            # (SDM 28.1), so keep it - when a #PF can exit at all (SDM 26.2).
            self._cr2 = g.reg("cr2") if self._pf_may_exit else None
            try:
                g.emulate(1 if single else remaining, exact=single)
            except unicorn.UcError as exc:
                if self.pending is None and self.event is None:
                    exit_ = self._cpu_error(exc)
                    if exit_ is not None:
                        break
                    continue
            if self.pending is not None:
                exit_ = self.pending
                break
            if self.event is not None:
                forget_exception(g.uc)  # vtlab, not QEMU, delivers it (or exits)
                g.counter.unretire_rest_of_block(g.linear_rip())
                exit_ = self._handle_event(*self.event)
                if exit_ is not None:
                    if self.event[0] == Vector.PF and exit_.reason is ExitReason.EXCEPTION_NMI:
                        # A #PF that causes a VM exit does not load CR2 (SDM 28.1): the
                        # address is in the exit qualification instead.
                        if self._cr2 is not None:
                            g.uc.reg_write(X.UC_X86_REG_CR2, self._cr2)
                    break
                continue
            if self.halted:
                continue
            if single:
                if mtf:  # SDM 26.5.2: MTF exit after the instruction completes
                    exit_ = VmExit(ExitReason.MONITOR_TRAP_FLAG, 0, 0, g.rip, "",
                                   guest_instructions=g.counter.total, cpl=g.cpl)
                    break
                return VmxOutcome(insn, Status.PAUSED, message=f"stepped one instruction ({rip_before:#x})")
        # The processor (VmxCpu) performs the exit itself: exit information, guest state,
        # host state (SDM 28.2-28.5).
        return VmxOutcome(insn, Status.VM_EXIT, exit=exit_)

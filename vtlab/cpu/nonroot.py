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
from time import monotonic as _monotonic
from typing import TYPE_CHECKING

import unicorn
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucmod

from ..arch.controls import ProcBased2
from ..arch.exceptions import Vector
from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Cr0, Rflags
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
from .ept import EptUnit
from .event_controls import shadow_site
from .counter import _CTX_FIELDS
_uc_emu_stop = _ucmod.uclib.uc_emu_stop
#: What the exit rules and the exit record need of the CPU at a sensitive instruction,
#: read in one call: RIP and the CPL (CS.RPL in protected mode), and the registers a
#: VMM saves at every exit (VmExit.registers).
_EXIT_REGISTERS = ("rip", "cr0", "cs", "rax", "rbx", "rcx", "rdx", "rsp", "rflags")
from .nonroot_consts import _UNDECODED_SIZE, _NOT_IN_QEMU, _MONITOR_TRAP_FLAG, _ACTIVATE_SECONDARY, _VALID, _uc_hook_add

#: Kinds the guest hooks itself (Guest.load); its hooks call _on_hlt / _on_rdtsc.
_GUEST_HOOKED = frozenset({InsnKind.HLT, InsnKind.RDTSC, InsnKind.RDTSCP})

_ENTRY_INTR_INFO = int(F.VM_ENTRY_INTR_INFO_FIELD)
_RFLAGS_VM = int(Rflags.VM)
_CR0_PE = int(Cr0.PE)
_CR_ACCESS = ExitReason.CR_ACCESS
_ENABLE_EPT = int(ProcBased2.ENABLE_EPT)

#: Indexes into the instruction counter's context (vtlab.cpu.counter._CTX_FIELDS).
_OUTSIDE_BLOCKS, _OUTSIDE_BYTES = _CTX_FIELDS.index("outside_blocks"), _CTX_FIELDS.index("outside_bytes")

#: Events (exceptions, interrupts, INT n) delivered to the guest in one run before it is
#: stopped: at tens of microseconds each, a few seconds of a guest doing nothing else.
EVENT_BUDGET = 100_000
#: Events in a row with no guest instruction retired between them (a handler that faults
#: at once), or emulator calls in a row that ran nothing, before the run is stopped.
STUCK_LIMIT = 1_000
#: Events in a row delivered to handlers outside every loaded program before a run stops.
WILD_EVENTS = 256


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
        #: CR0 of the guest at the last sensitive instruction (read with its registers)
        self._exit_cr0 = 0
        #: _cr2 was not refreshed by an exit handled in place (the guest's paging was off:
        #: no #PF can overwrite CR2); the next MOV to CR - which may turn paging on - reads it
        self._cr2_stale = False
        self.pending_interrupts: list[int] = []   # external interrupt vectors raised by devices
        self.pending_nmi = False
        #: The EPT: walks of the tables behind EPTP and their cached mappings (vtlab.cpu.ept)
        self.ept = EptUnit(cpu.guest, cpu.memory, lambda: cpu.caps.ept_vpid_cap)
        #: The bounds of a run besides its budget (deadline, events) and why the last run
        #: had to stop (``stopped``): the guest's RunLimits, which the VMM sets and reads.
        self.limits = self.guest.limits
        #: Why the last fault the exit rules raised was raised (e.g. a MOV to CR0's #GP).
        self.fault_note = ""
        g = self.guest
        # The code hook of the sensitive instructions, as a raw ctypes callback: the
        # binding's hook_add wraps every callback in two more Python frames, which is a
        # noticeable part of a VM exit.  One callback object serves every address; it
        # must stay referenced for as long as the engine may call it.  (Made before the
        # monitor attaches: attaching watches the programs the guest already holds.)
        self._code_hook_fn = _ucmod.HOOK_CODE_CFUNC(self._code_hook)
        #: STI / MOV SS / POP SS / POPF by linear address: (interruptibility bit or 0, length,
        #: bytes).  Their hook records the interrupt shadow (vtlab.cpu.event_controls).
        self._shadow_sites: dict[int, tuple[int, int, bytes]] = {}
        self._if_setters, self._iret_sites = set(), set()   # (see EventControls.window_watch)
        g.attach_monitor(self)
        g.uc.hook_add(unicorn.UC_HOOK_MEM_UNMAPPED | unicorn.UC_HOOK_MEM_PROT, self._on_mem_fault)

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
        self.guest._guard_programs()  # stop a guest that runs past the program's end
        for address, d in prog.decoded.items():
            if address in self._watched:
                continue
            reason = EXIT_REASON_BY_KIND.get(d.kind)
            if reason is None and d.kind not in NON_EXITING_RULES:
                continue
            self._watched[address] = (d, reason)
            if d.kind is InsnKind.IRET:
                self._iret_sites.add(address)
                self._if_setters.add(address)
            if d.kind in _GUEST_HOOKED:
                continue  # the guest's own hook for these calls _on_hlt / _on_rdtsc
            self._hook_at(address)
        # STI, MOV SS and POP SS never exit, but the interrupt shadow they leave is part of
        # the guest's interruptibility state (vtlab.cpu.event_controls): hook them too.
        # POPF sets no shadow but may set IF: hooked too, so that a window waiting for IF
        # is seen to open (EventControls.stop_before_opening).
        for insn in prog.instructions:
            site = shadow_site(insn.bytes, prog.bits)
            if site is None or insn.address in self._shadow_sites or insn.address in self._watched:
                continue
            shadow, sets_if = site
            self._shadow_sites[insn.address] = (shadow, insn.size, insn.bytes)
            if sets_if:
                self._if_setters.add(insn.address)
            self._hook_at(insn.address)

    def _hook_at(self, address: int) -> None:
        """Place the code hook (:meth:`_code_hook`) on the instruction at ``address``."""
        handle = _ucmod.uc_hook_h()
        status = _uc_hook_add(self.guest.uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_CODE,
                              self._code_hook_fn, None, ctypes.c_uint64(address), ctypes.c_uint64(address))
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)

    def _code_hook(self, _handle, address: int, size: int, _user) -> None:
        """UC_HOOK_CODE entry point (see __init__), with the binding's exception contract:
        an exception stops emulation and ``Uc.emu_start`` raises it once Unicorn returns."""
        try:
            shadow = self._shadow_sites.get(address)
            if shadow is not None:
                bit, length, raw = shadow
                if self.state.vmcs is not None and self.guest.memory_holds(address, raw):
                    if address in self._if_setters and self.stop_before_opening(address):
                        return   # (stepped next: the window may open after it)
                    if bit:
                        self.note_shadow(address, bit, length)
                return
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
        self.rip, self._exit_cr0 = rip, cr0
        if self._cr2_stale and reason is _CR_ACCESS:
            # Paging may be turned on here, without an exit: from now on a #PF can
            # overwrite CR2, so take the value it must keep (see vmresume_in_place).
            self._cr2, self._cr2_stale = g.reg("cr2"), False
        # (Virtual-8086 mode, RFLAGS.VM = 1, always runs at CPL 3.)
        self.cpl = cpl = (3 if rflags & _RFLAGS_VM else cs & 3) if cr0 & _CR0_PE else 0
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
        cpu = self.cpu
        if in_place and not self._single and cpu.resume_in_place is not None:
            if cpu.exit_in_place(result):
                self.pending = None   # handled and re-entered: the guest goes on
                return False
        _uc_emu_stop(g._uch)
        return True

    def _on_hlt(self, address: int) -> bool:
        """Called by the guest before HLT executes: exit, or enter the HLT activity state."""
        if self.pending is not None or self.vmcs is None:
            return False
        if self.guest.reg("eflags") & _RFLAGS_VM:
            return False  # virtual-8086 mode is CPL 3: HLT raises #GP (the CPU does it)
        if self._on_sensitive(self.guest.uc, address, 1, None):
            return True
        self.halted = True
        return True

    def _on_rdtsc(self, address: int) -> bool:
        """Called by the guest before RDTSC/RDTSCP: True if it exits (or faults) instead."""
        if self.pending is not None or self.vmcs is None:
            return False
        watched = self._watched.get(address)
        if watched is None:
            return False
        if self._on_sensitive(self.guest.uc, address, watched[0].length, None):
            return True
        # It does not exit: with "use TSC offsetting" it reads TSC + offset (SDM 26.3).
        return self.rdtsc_offset(watched[0])


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
        """Run the guest in non-root operation until a VM exit (or the budget / a step).

        Every run ends, whatever the guest does.  Besides the instruction ``budget`` (which
        the native counter enforces with no Python running) the loop bounds what costs no
        instructions: events delivered to the guest (:data:`EVENT_BUDGET` per run, or up to
        :attr:`event_limit`), events in a row with nothing retired between them - an
        exception handler that faults itself - and emulator calls that do nothing
        (:data:`STUCK_LIMIT` each); runs are sliced by time (see
        :data:`vtlab.cpu.guest.SLICE_SECONDS`) so that :attr:`deadline` and the notebook's
        interrupt are honoured; and a guest that runs into never-loaded memory is stopped.
        Such a stop is a PAUSED outcome whose message says which bound was reached and
        whose fault it is, and :attr:`stopped` holds that message (a VMM should not just
        re-enter the guest).  Any exception leaves the vCPU consistent (see _abandon).
        """
        self._load_controls()
        g = self.guest
        start = g.counter.total
        self.limits.stopped = None
        limits = self.limits
        limit = limits.event_limit if limits.event_limit is not None else limits.events_delivered + EVENT_BUDGET
        idle = 0                      # emulator calls in a row that ran nothing
        last_total = start
        #: [events in a row with nothing retired between them, events in a row delivered to
        #: handlers outside every program, the counter's total at the last event]
        bounds = [0, 0, start]
        ctx = g.counter._ctx
        outside_blocks, outside_bytes = ctx[_OUTSIDE_BLOCKS], ctx[_OUTSIDE_BYTES]
        try:
            exit_ = None
            if insn != "continue":   # VM entry: interruptibility state, preemption timer (27.7)
                self.enter_event_state()
            watch_events = self.events_watched()
            if self.vmcs.get(_ENTRY_INTR_INFO) & _VALID:  # VM-entry event injection (SDM 27.6)
                exit_ = self._guarded(self._inject_event)
                if exit_ is None:  # delivered through the guest's IVT/IDT
                    vector = self.vmcs.get(_ENTRY_INTR_INFO) & 0xFF
                    what = (self._event_name(vector, g.rip).split(" at RIP")[0]
                            + " (injected by the VMM at VM entry)")
                    why = self._delivered(bounds, limit, what, None)
                    if why is not None:
                        return self._stop_run(insn, why)
            while exit_ is None:
                if watch_events or self.pending_nmi or self.pending_interrupts:
                    # Exits at an instruction boundary, in the SDM's priority order:
                    # timer, NMI window, NMI, interrupt window, external interrupt.
                    exit_ = self._guarded(self.boundary_exit)
                    if exit_ is not None:
                        break
                if self.halted:
                    return VmxOutcome(insn, Status.PAUSED, halted=True, message="the guest is in the HLT "
                                      "activity state (HLT exiting is 0) and no interrupt is pending")
                remaining = budget - (g.counter.total - start)
                if remaining > 0 and ctx[_OUTSIDE_BLOCKS] != outside_blocks:
                    # The counter counts a block outside every swept program as one
                    # instruction: in never-loaded memory that is some 200 of them.  For the
                    # budget, count such blocks by size instead (2 bytes each, as 00 00 is).
                    blocks = ctx[_OUTSIDE_BLOCKS] - outside_blocks
                    extra = (ctx[_OUTSIDE_BYTES] - outside_bytes) // 2 - blocks
                    if extra >= remaining:
                        return self._stop_run(insn, g.runaway_message() or (
                            f"instruction budget exhausted: the guest ran about {budget - remaining + extra:,} "
                            f"instructions (budget {budget:,}), most of them in {blocks:,} blocks of code "
                            "outside every program loaded (counted by size) - a runaway guest?"))
                if remaining <= 0:
                    runaway = g.runaway_message()
                    if runaway is not None:
                        return self._stop_run(insn, runaway)
                    return VmxOutcome(insn, Status.PAUSED, message=f"paused after {budget:,} guest "
                                      "instructions without a VM exit (budget)")
                mtf = bool(self.proc & _MONITOR_TRAP_FLAG)
                window = watch_events and self.window_watch()   # a shut window: step to its opening
                single = self._single = step or mtf or window
                mark = self.step_begins() if single else 0
                run_for = remaining
                if watch_events and self.timer_deadline is not None:   # stop where the timer expires
                    run_for = max(1, min(remaining, self.timer_left()))
                self.pending, self.event = None, None
                rip_before = g.rip if single else None  # (only the step message shows it)
                # QEMU overwrites CR2 when it raises #PF; a #PF that exits must leave it alone
                # (SDM 28.1), so keep it - when a #PF can exit at all (SDM 26.2).
                # (With EPT on too: a #PF that is really an EPT fault on the guest's page walk
                # exits instead, vtlab.cpu.ept.)
                self._cr2 = g.reg("cr2") if self._pf_may_exit or self.proc2 & _ENABLE_EPT else None
                self._cr2_stale = False
                sliced = False
                try:
                    sliced = g.emulate(1 if single else run_for, exact=single)
                except unicorn.UcError as exc:
                    if self.pending is None and self.event is None:
                        g._stop = None
                        rip = g.rip
                        g.counter.unretire_rest_of_block(g.linear_rip())  # it faulted: not retired
                        exit_ = self._guarded(self._cpu_error, exc)
                        if exit_ is not None:
                            break
                        what = ("#UD" if exc.errno == unicorn.UC_ERR_INSN_INVALID else str(exc)) + f" at RIP {rip:#x}"
                        why = self._delivered(bounds, limit, what, Vector.UD if what[0] == "#" else None)
                        if why is not None:
                            return self._stop_run(insn, why)
                        continue
                if g._stop is not None:  # the guest reached the end of a program (Guest._on_program_end)
                    stop, g._stop = g._stop, None
                    if stop[0] == "ran-off" and self.pending is None and self.event is None:
                        return self._stop_run(insn, g.ran_off_message(stop[1]))
                if self.pending is not None:
                    exit_ = self.pending
                    break
                if self.event is not None:
                    forget_exception(g.uc)  # vtlab, not QEMU, delivers it (or exits)
                    g.counter.unretire_rest_of_block(g.linear_rip())
                    event = self.event
                    exit_ = self._guarded(self._handle_event, *event)
                    if exit_ is not None:
                        if (event[0] == Vector.PF and exit_.reason is ExitReason.EXCEPTION_NMI
                                and not exit_.idt_vectoring_info & _VALID):
                            # A #PF that causes a VM exit does not load CR2 (SDM 28.1): the
                            # address is in the exit qualification instead.  (One whose
                            # delivery was under way when the exit came had loaded it.)
                            if self._cr2 is not None:
                                g.uc.reg_write(X.UC_X86_REG_CR2, self._cr2)
                        if self.fault_note and not exit_.note:
                            exit_.note = self.fault_note
                        self.fault_note = ""
                        break
                    # Delivered through the guest's IVT/IDT: bound the events, and stop a
                    # guest whose handler is not there at all.
                    software = len(event) > 2 and event[2]
                    self.end_shadow()   # an event ends blocking by STI / MOV SS (27.7.1)
                    why = self._delivered(bounds, limit, self._event_name(event[0], event[1]),
                                          None if software else event[0])
                    self.fault_note = ""
                    if why is not None:
                        return self._stop_run(insn, why)
                    continue
                if self.halted:
                    continue
                if sliced and single and g.rip == rip_before:
                    # The watchdog's mark arrived as the step began: nothing ran, step again.
                    g.unretire_unstarted_block()
                    continue
                if single:
                    self.step_done(mark)   # the shadow covered that one instruction
                    if mtf:  # SDM 26.5.2: MTF exit after the instruction completes
                        exit_ = VmExit(ExitReason.MONITOR_TRAP_FLAG, 0, 0, g.rip, "",
                                       guest_instructions=g.counter.total, cpl=g.cpl)
                        break
                    if step:
                        return VmxOutcome(insn, Status.PAUSED, message=f"stepped one instruction ({rip_before:#x})")
                    continue   # stepping only to watch a window: go on
                if sliced:
                    # The slice watchdog took control back (a KeyboardInterrupt would have
                    # been raised by now): check where the guest is and the wall clock.
                    # The engine stops between blocks, possibly after counting one it then
                    # did not run: take that back, so slicing never changes the count.
                    g.unretire_unstarted_block()
                    why = g.runaway_message() or self._past_deadline()
                    if why is not None:
                        return self._stop_run(insn, why)
                    idle = 0
                    continue
                # Unicorn returned with no exit, event, halt or budget to show for it.  That
                # happens (an unhooked HLT, a stop request), but never endlessly in a row.
                total = g.counter.total
                idle = idle + 1 if total == last_total else 0
                last_total = total
                if idle >= STUCK_LIMIT:
                    return self._stop_run(insn, (
                        f"vtlab stopped the run: the emulator returned {idle:,} times in a row at RIP "
                        f"{g.rip:#x} without executing anything or reporting why (vtlab's fault, not "
                        "the guest's - please report it)"))
        except BaseException:
            self._abandon()
            raise
        # The processor (VmxCpu) performs the exit itself: exit information, guest state,
        # host state (SDM 28.2-28.5).
        return VmxOutcome(insn, Status.VM_EXIT, exit=exit_)

    # ------------------------------------------------------ run bounds
    def _stop_run(self, insn: str, message: str) -> VmxOutcome:
        """End a run that must not simply go on (see :attr:`vtlab.cpu.guest.RunLimits.stopped`)."""
        self.limits.stopped = message
        return VmxOutcome(insn, Status.PAUSED, message=message)

    def _delivered(self, bounds: list, limit: int, what: str, vector: int | None) -> str | None:
        """An event (``what``, a hardware exception of ``vector`` or None for INT n and the
        like) was just delivered through the guest's IVT/IDT: count it against the bounds
        of the run (see :meth:`run`) and say why the run must stop, if it must."""
        g = self.guest
        self.limits.events_delivered += 1
        total = g.counter.total
        bounds[0] = bounds[0] + 1 if total == bounds[2] else 0
        bounds[2] = total
        handler = g.linear_rip()
        bounds[1] = 0 if g.in_program(handler) else bounds[1] + 1
        table = "IDT" if g.reg("cr0") & _CR0_PE else "IVT"
        if g.never_loaded(handler):
            return (f"the guest took {what} and its {table} sent it to {handler:#x}, where nothing "
                    "was loaded (zeroed memory): it has no handler for it"
                    + ("" if vector is None or vector >= 32 else
                       f" - install one, or let the VMM see it (exception bitmap bit {vector})"))
        if bounds[0] >= STUCK_LIMIT:
            return (f"endless exception loop: the guest took {bounds[0]:,} exceptions in a row without "
                    f"retiring a single instruction (last: {what}) - its exception handler faults "
                    "itself, or returns to the faulting instruction (the guest's fault)")
        if bounds[1] >= WILD_EVENTS:
            return (f"the guest took {bounds[1]:,} exceptions and interrupts in a row whose handlers lie "
                    f"outside every program loaded (last: {what}, handler at {handler:#x}): its {table} "
                    "points into memory it never loaded code into - it is executing garbage "
                    "(the guest's fault)")
        if self.limits.events_delivered >= limit:
            return (f"event budget exhausted: more than {EVENT_BUDGET:,} exceptions and interrupts "
                    f"delivered to the guest in this run (last: {what}) - an exception storm? "
                    "(the guest's fault)")
        return g.runaway_message() or self._past_deadline()

    def _event_name(self, vector: int, rip: int) -> str:
        try:
            name = "#" + Vector(vector).name
        except ValueError:
            name = f"INT {vector:#x}"
        note = f" ({self.fault_note})" if self.fault_note else ""
        return f"{name} at RIP {rip:#x}{note}"

    def _past_deadline(self) -> str | None:
        deadline = self.limits.deadline
        if deadline is None or _monotonic() < deadline:
            return None
        return ("wall-clock cap reached: the run took longer than its max_seconds and was "
                f"stopped at guest RIP {self.guest.rip:#x}")

    def _guarded(self, deliver, *args):
        """Event delivery and injection, which write the guest's stack and read its IDT
        (vtlab's own code, SDM Vol. 3A 6.12): a frame or table beyond guest memory ends in
        a triple fault (SDM Vol. 3A 6.15, interrupt 8), never in an emulator error."""
        try:
            return deliver(*args)
        except unicorn.UcError as exc:
            g = self.guest
            self.fault_note = ""
            return VmExit(ExitReason.TRIPLE_FAULT, 0, 0, g.rip, "",
                          note=f"triple fault: an event could not be delivered ({exc}: the IDT, the "
                          "stack or the TSS lies outside guest memory)",
                          guest_instructions=g.counter.total, cpl=g.cpl)

    def _abandon(self) -> None:
        """A run ended by an exception (a KeyboardInterrupt, a handler's error raised in
        place): drop what it left half-done, so the vCPU is consistent and the next run
        starts clean.  The guest stays where it stopped; if an exit was performed in place,
        the processor stays in VMX root operation after it, as after any exit."""
        self.pending = self.event = None
        self._single = False
        self.fault_note = ""
        self.guest._stop = None
        self.cpu._exited_in_place = None

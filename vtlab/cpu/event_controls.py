"""The event controls of VMX non-root operation: interrupt- and NMI-window exiting, the
VMX-preemption timer, TSC offsetting, and the guest's interruptibility state.

What each does (SDM Vol. 3C, edition 325462-084US):

* **Interrupt-window exiting** (primary control bit 2, exit reason 7, SDM 26.2 and
  27.7.5): a VM exit before any instruction at which RFLAGS.IF = 1 and there is no
  blocking by STI or MOV SS.  NMIs (and what outranks them) come first; the exit comes
  before external interrupts.  It also wakes a guest in the HLT state.
* **NMI-window exiting** (primary bit 22, exit reason 8, 26.2, 27.7.6): a VM exit before
  any instruction with no virtual-NMI blocking and no blocking by MOV SS; it needs
  "virtual NMIs" (pin bit 5, entry check 27.2.1.1).  The preemption timer comes first;
  the exit comes before NMIs.
* **Blocking by NMI** (interruptibility bit 3): an NMI delivered to the guest (or, with
  "virtual NMIs", an NMI injected by VM entry: virtual-NMI blocking, 27.6.1.2) blocks
  further NMIs until the guest executes IRET.
* **Blocking by STI / MOV SS** (interruptibility bits 0 and 1): STI executed with IF = 0,
  and MOV SS / POP SS, inhibit interrupts until the next instruction completes (SDM
  Vol. 2B, STI, MOV, POP).  VM entry loads both from the interruptibility-state field -
  unless the entry is vectoring (it injects an event), which leaves no blocking (27.7.1);
  every VM exit saves them (28.3.4).
* **The VMX-preemption timer** (pin bit 6, exit reason 52, 26.5.1, 27.7.4): VM entry loads
  the timer-value field; the timer counts down by 1 every time bit X of the TSC changes,
  X = IA32_VMX_MISC[4:0] (A.6); at 0 a VM exit occurs.  "Save VMX-preemption-timer value"
  (exit control bit 22) stores what is left on every exit (28.3.4).
* **TSC offsetting** (primary bit 3, 26.3): RDTSC and RDTSCP that do not exit return the
  TSC plus the TSC-offset field; "RDTSC exiting" has priority (26.1.3).

**vtlab's clock.**  Silicon's TSC ticks with time; vtlab's is deterministic: one TSC tick
per guest instruction retired (:meth:`vtlab.cpu.guest.Guest.read_tsc`).  vtlab's CPU
reports X = 5 (:data:`vtlab.cpu.capabilities.PREEMPTION_TIMER_RATE`), so the timer counts
down once every 32 guest instructions, and a timer value V set at entry expires after
V * 32 instructions at the most (fewer by the part of the first 32-tick period already
gone).  Instruction counts are taken per basic block, so an expiry is seen at the first
block boundary at or after it.  The clock stands still in the HLT state (no instruction
retires), so the timer does not expire there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.controls import ExitControl, PinBased, ProcBased
from ..arch.exit_reasons import ExitReason
from ..arch.interrupts import (MISC_PREEMPTION_TIMER_RATE, OPCODE_MOV_SREG, OPCODE_POP_SS, OPCODE_POPF,
                               OPCODE_STI, SREG_SS, Interruptibility)
from ..arch.msrs import Cr4, Rflags
from ..arch.vmcs_fields import VmcsField as F
from .vmexit import VmExit

if TYPE_CHECKING:
    from .decoder import DecodedInstruction
    from .vmcs import Vmcs

_STI, _MOV_SS = int(Interruptibility.BLOCKING_BY_STI), int(Interruptibility.BLOCKING_BY_MOV_SS)
_NMI = int(Interruptibility.BLOCKING_BY_NMI)
_RFLAGS_IF = int(Rflags.IF)
_INTR_WINDOW, _NMI_WINDOW = int(ProcBased.INTR_WINDOW_EXITING), int(ProcBased.NMI_WINDOW_EXITING)
_TSC_OFFSETTING, _RDTSC_EXITING = int(ProcBased.USE_TSC_OFFSETTING), int(ProcBased.RDTSC_EXITING)
_TIMER, _VIRTUAL_NMIS = int(PinBased.VMX_PREEMPTION_TIMER), int(PinBased.VIRTUAL_NMIS)
_EXT_INTR_EXITING, _NMI_EXITING = int(PinBased.EXT_INTR_MASK), int(PinBased.NMI_EXITING)
_SAVE_TIMER = int(ExitControl.SAVE_VMX_PREEMPTION_TIMER)
_INTERRUPTIBILITY = int(F.GUEST_INTERRUPTIBILITY_INFO)
_TIMER_VALUE = int(F.VMX_PREEMPTION_TIMER_VALUE)
_U64 = (1 << 64) - 1
#: Legacy prefixes an interrupt-shadow instruction may carry (segment overrides, operand
#: and address size, LOCK, REP): skipped to find its opcode (SDM Vol. 2A, 2.1.1).
_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
_PREFIXES_ALL = _PREFIXES | frozenset(range(0x40, 0x50))   # with REX (64-bit mode)
#: Exits that never save blocking by STI or MOV SS: an external interrupt and the
#: interrupt window wait for the shadow to end (SDM 26.2, 26.3), and a triple fault ends
#: it; exits during event delivery neither ("no blocking by STI or by MOV SS when the VM
#: exit commences", 28.3.4).
_NO_SHADOW_EXITS = frozenset({ExitReason.EXTERNAL_INTERRUPT, ExitReason.TRIPLE_FAULT,
                              ExitReason.INTERRUPT_WINDOW})


#: The first bytes an interrupt-shadow or IF-setting instruction can start with (its
#: opcode or a legacy / REX prefix): a quick filter for :func:`shadow_site`.
_SITE_FIRST_BYTES = frozenset({OPCODE_STI, OPCODE_POP_SS, OPCODE_MOV_SREG, OPCODE_POPF}) | _PREFIXES_ALL


def shadow_site(raw: bytes, bits: int) -> tuple[int, bool] | None:
    """What an instruction does to event blocking, from its bytes: (the interruptibility
    bit it sets, whether it may set RFLAGS.IF) for STI (blocking by STI; sets IF), POP SS
    and MOV SS (blocking by MOV SS) and POPF (no shadow; may set IF); None for the rest.
    IRET, which may set IF too, is watched as a sensitive instruction already."""
    if not raw or raw[0] not in _SITE_FIRST_BYTES:
        return None
    bit = shadow_kind(raw, bits)
    if bit:
        return bit, bit == _STI
    return (0, True) if _opcode(raw, bits) == OPCODE_POPF else None


def _opcode_index(raw: bytes, bits: int) -> int:
    """Where the opcode byte is: after any legacy prefixes (and a REX prefix in 64-bit mode)."""
    i = 0
    while i < len(raw) and raw[i] in _PREFIXES:
        i += 1
    if bits == 64 and i < len(raw) and 0x40 <= raw[i] <= 0x4F:   # REX
        i += 1
    return i


def _opcode(raw: bytes, bits: int) -> int | None:
    """The opcode byte (None if the bytes end before it)."""
    i = _opcode_index(raw, bits)
    return raw[i] if i < len(raw) else None


def shadow_kind(raw: bytes, bits: int) -> int:
    """The interruptibility bit an instruction sets when it executes: blocking by STI for
    STI (FB), blocking by MOV SS for POP SS (17, outside 64-bit mode) and MOV SS, r/m
    (8E /2); 0 for anything else.  (STI blocks only when IF was 0: decided when it runs.)"""
    i = _opcode_index(raw, bits)
    if i >= len(raw):
        return 0
    op = raw[i]
    if op == OPCODE_STI:
        return _STI
    if op == OPCODE_POP_SS and bits != 64:
        return _MOV_SS
    if op == OPCODE_MOV_SREG and i + 1 < len(raw) and (raw[i + 1] >> 3) & 7 == SREG_SS:
        return _MOV_SS
    return 0


class EventControls:
    """The event-control state of the non-root monitor (a part of
    :class:`vtlab.cpu.nonroot.ExitMonitor`; see the module doc)."""

    #: Blocking by STI or MOV SS (interruptibility bits 0-1) in effect at :attr:`shadow_rip`:
    #: the instruction there is the one the shadow covers.
    shadow_bits = 0
    shadow_rip: int | None = None
    #: Bumped whenever an STI / MOV SS / POP SS sets a shadow (tells single steps apart).
    _shadow_seq = 0
    #: Blocking by NMI, or virtual-NMI blocking with "virtual NMIs" (interruptibility bit 3).
    nmi_blocked = False
    #: Linear addresses of the instructions that may set RFLAGS.IF (STI, POPF, IRET) and of
    #: the IRETs, which also end NMI blocking (filled as programs are loaded).
    _if_setters: frozenset[int] | set[int] = frozenset()
    _iret_sites: frozenset[int] | set[int] = frozenset()
    #: The TSC value at which the VMX-preemption timer reaches 0 (None: not active), and
    #: what the timer was loaded with at VM entry and when.
    timer_deadline: int | None = None
    _timer_start = (0, 0)

    # ------------------------------------------------------------- VM entry
    def enter_event_state(self) -> None:
        """VM entry: the interruptibility state (27.7.1) and the preemption timer (27.7.4).

        A vectoring entry - one that injects an event of type 0-6 - leaves no blocking by
        STI or MOV SS whatever the field says; blocking by NMI is loaded from bit 3.
        """
        vmcs, g = self.vmcs, self.guest
        blocking = vmcs.get(_INTERRUPTIBILITY)
        info = vmcs.get(F.VM_ENTRY_INTR_INFO_FIELD)
        vectoring = bool(info >> 31 & 1) and (info >> 8) & 7 != 7
        self.shadow_bits = 0 if vectoring else blocking & (_STI | _MOV_SS)
        self.shadow_rip = g.rip
        self.nmi_blocked = bool(blocking & _NMI)
        if self.pin & _TIMER:
            value = vmcs.get(_TIMER_VALUE) & 0xFFFF_FFFF
            rate = self.cpu.caps.misc & MISC_PREEMPTION_TIMER_RATE
            now = g.read_tsc()
            # The timer decrements each time TSC bit X changes: it reaches 0 at the V-th
            # multiple of 2^X after the entry (at once for V = 0).
            self.timer_deadline = ((now >> rate) + value) << rate
            self._timer_start = (now, value)
        else:
            self.timer_deadline = None

    def events_watched(self) -> bool:
        """Must the run loop look at the event controls before every emulator call?"""
        return bool(self.timer_deadline is not None or self.proc & (_INTR_WINDOW | _NMI_WINDOW)
                    or self.pending_nmi or self.pending_interrupts)

    # ------------------------------------------------- instruction boundaries
    def sti_blocking(self) -> bool:
        """Is there blocking by STI or MOV SS at the current instruction?"""
        return bool(self.shadow_bits) and self.guest.rip == self.shadow_rip

    def interrupts_open(self) -> bool:
        """May the guest take an external interrupt now (RFLAGS.IF = 1, no STI/MOV SS
        blocking)?"""
        return bool(self.guest.reg("eflags") & _RFLAGS_IF) and not self.sti_blocking()

    def nmi_open(self) -> bool:
        """No blocking by NMI (virtual-NMI blocking) and none by MOV SS."""
        return not self.nmi_blocked and not (self.sti_blocking() and self.shadow_bits & _MOV_SS)

    def timer_left(self) -> int | None:
        """Guest instructions until the preemption timer expires (None: not active)."""
        if self.timer_deadline is None:
            return None
        return max(0, self.timer_deadline - self.guest.read_tsc())

    def timer_value(self) -> int:
        """What the VMX-preemption timer holds now (its value field's meaning, 26.5.1)."""
        if self.timer_deadline is None:
            return 0
        start, value = self._timer_start
        rate = self.cpu.caps.misc & MISC_PREEMPTION_TIMER_RATE
        ticks = (self.guest.read_tsc() >> rate) - (start >> rate)
        return max(0, value - ticks)

    def boundary_exit(self) -> VmExit | None:
        """The VM exit due at this instruction boundary, highest priority first (26.2,
        27.7.4-27.7.6): the preemption timer (52), NMI-window (8), a pending NMI, the
        interrupt window (7), then pending external interrupts."""
        g = self.guest
        if self.timer_deadline is not None and g.read_tsc() >= self.timer_deadline:
            self.timer_deadline = None   # it stops counting at 0
            return self._boundary(ExitReason.PREEMPTION_TIMER, "the VMX-preemption timer counted down to 0")
        if self.proc & _NMI_WINDOW and self.nmi_open():
            return self._boundary(ExitReason.NMI_WINDOW, "no virtual-NMI blocking: the NMI window is open")
        if self.pending_nmi:
            exit_ = self._pending_nmi_exit()
            if exit_ is not None:
                return exit_
        if self.proc & _INTR_WINDOW and self.interrupts_open():
            # Wakes a guest in the HLT state; the state saved is still HLT (the return to
            # the active state comes after the exit, 28.1).
            return self._boundary(ExitReason.INTERRUPT_WINDOW, "RFLAGS.IF = 1 and no blocking by STI or "
                                  "MOV SS: the interrupt window is open")
        if self.pending_interrupts:
            return self._pending_external_exit()
        return None

    def _boundary(self, reason: ExitReason, note: str) -> VmExit:
        g = self.guest
        return VmExit(reason, 0, 0, g.rip, "", note=note, guest_instructions=g.counter.total,
                      cpl=self._guest_cpl())

    def _wants_interrupt_window(self) -> bool:
        """Is something waiting for the guest to accept interrupts: the interrupt-window
        control, or an interrupt for the guest itself (no external-interrupt exiting)?"""
        return bool(self.proc & _INTR_WINDOW or (self.pending_interrupts and not self.pin & _EXT_INTR_EXITING))

    def _wants_nmi_window(self) -> bool:
        return bool(self.proc & _NMI_WINDOW or (self.pending_nmi and not self.pin & _NMI_EXITING))

    def window_watch(self) -> bool:
        """Must the next instruction run on its own?  A window that something waits for
        (:meth:`_wants_interrupt_window`, :meth:`_wants_nmi_window`) opens at an
        instruction boundary that only single-stepping sees: after the instruction a
        shadow covers (IF = 1), or after the STI / POPF / IRET that sets IF or ends NMI
        blocking - which the guest reaches at full speed (their hooks stop it there,
        :meth:`stop_before_opening`)."""
        g = self.guest
        if self.shadow_bits and (self.pending_interrupts or self.pending_nmi) and self.sti_blocking():
            return True   # an exit for a pending interrupt / NMI waits for the shadow's end
        if self._wants_interrupt_window():
            if g.reg("eflags") & _RFLAGS_IF:
                if self.sti_blocking():
                    return True
            elif g.linear_rip() in self._if_setters:
                return True
        if self._wants_nmi_window() and not self.nmi_open():
            return not self.nmi_blocked or g.linear_rip() in self._iret_sites
        return False

    def stop_before_opening(self, address: int, iret: bool = False) -> bool:
        """The hook of an STI, POPF or IRET at linear ``address``, before it executes: if it
        may open a window something waits for, stop the emulator here (True) so that the
        run loop single-steps it and sees the window open (:meth:`window_watch`)."""
        if self._single:
            return False
        if not (self._wants_interrupt_window() and not self.guest.reg("eflags") & _RFLAGS_IF) and not (
                iret and self.nmi_blocked and self._wants_nmi_window()):
            return False
        self.guest.uc.emu_stop()
        return True

    def step_begins(self) -> int:
        """Before a single step: a mark for :meth:`step_done`."""
        return self._shadow_seq

    def step_done(self, mark: int) -> None:
        """After a single step: the shadow covered that instruction and ends, unless the
        instruction set a new one (STI; STI keeps one shadow, SDM Vol. 2B STI)."""
        if self._shadow_seq == mark:
            self.shadow_bits = 0

    def end_shadow(self) -> None:
        """An event was delivered (or the guest exited): no STI / MOV SS blocking remains."""
        self.shadow_bits = 0

    # ------------------------------------------------------------ hooks
    def note_shadow(self, address: int, bit: int, length: int) -> None:
        """An STI / MOV SS / POP SS at linear ``address`` is about to execute: the next
        instruction runs in its shadow (STI only when it sets IF, i.e. IF is 0 now)."""
        g = self.guest
        if bit == _STI and g.reg("eflags") & _RFLAGS_IF:
            return
        self.shadow_bits = bit
        self.shadow_rip = g.rip + length
        self._shadow_seq += 1

    def iret_executed(self) -> None:
        """IRET ends blocking by NMI, or virtual-NMI blocking (SDM Vol. 3A 6.7.1; 26.3)."""
        self.nmi_blocked = False

    def rdtsc_offset(self, d: "DecodedInstruction") -> bool:
        """RDTSC / RDTSCP that do not exit, with "use TSC offsetting" = 1: load the TSC plus
        the TSC-offset field (26.3) and step past.  False if CR4.TSD makes it #GP at
        CPL > 0 (the CPU raises that) or offsetting is off."""
        g = self.guest
        if not self.proc & _TSC_OFFSETTING or self.proc & _RDTSC_EXITING:
            return False
        if g.reg("cr4") & Cr4.TSD and self._guest_cpl() > 0:
            return False
        tsc = (g.read_tsc() + self.vmcs.get(F.TSC_OFFSET)) & _U64
        g.set_reg("rax", tsc & 0xFFFF_FFFF)
        g.set_reg("rdx", tsc >> 32)
        if d.length == 3:   # RDTSCP (0F 01 F9) also loads IA32_TSC_AUX into ECX
            g.set_reg("rcx", g.tsc_aux)
        g.counter.unretire_rest_of_block(g.linear_rip(), retired_here=True)
        g.rip = g.rip + d.length
        return True

    # ------------------------------------------------------------- VM exit
    def save_event_state(self, vmcs: "Vmcs", exit_: VmExit) -> None:
        """The VM exit's part of saving non-register state (28.3.4): the interruptibility
        state and, with "save VMX-preemption-timer value", what the timer holds (0 after
        a timer exit)."""
        bits = _NMI if self.nmi_blocked else 0
        if (self.shadow_bits and exit_.guest_rip == self.shadow_rip
                and exit_.reason not in _NO_SHADOW_EXITS and not exit_.idt_vectoring_info >> 31 & 1):
            bits |= self.shadow_bits
        if vmcs.get(_INTERRUPTIBILITY) != bits:   # (the common case: unchanged, nothing to write)
            self.state._put(vmcs, _INTERRUPTIBILITY, bits)
        if self.pin & _TIMER and vmcs.get(F.VM_EXIT_CONTROLS) & _SAVE_TIMER:
            self.state._put(vmcs, _TIMER_VALUE, self.timer_value())
        self.timer_deadline = None

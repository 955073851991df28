"""The vCPU side of VMX transitions, and the narrow interface a VMM uses between them.

:class:`VcpuServices` is part of :class:`vtlab.cpu.vmx.VmxCpu`.  It holds two things:

* the end of a VM entry - the VM exit in the SDM's step order (28.2 exit information,
  28.3 guest state, 28.5 host state) and the VM-entry failure (27.8);
* what a hypervisor may ask of the processor while the guest is out, beyond the VMX
  instructions: fast VMREAD/VMWRITE helpers that raise instead of returning an outcome
  (as KVM's ``vmcs_read64()``/``vmcs_write64()`` wrap the instructions), interrupts and
  NMIs raised by virtual devices, the EPT unit (walks, cached mappings), and capturing
  the CPU's current state as the initial guest state.

Everything above the processor layer (:mod:`vtlab.vmm`) uses only these public methods.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.controls import PinBased, ProcBased, ProcBased2
from ..arch.exceptions import Vector
from ..arch.exit_reasons import VM_ENTRY_FAILURE_BIT, ExitReason
from ..arch.msrs import Cr0
from ..arch.vmcs_fields import VmcsField as F
from ..errors import VmxFailure
from .outcome import Status, VmxOperation, VmxOutcome
from .nonroot_consts import _RIP_ONLY, _VALID
from .vmexit import VmExit, record_exit_information

if TYPE_CHECKING:
    from .entry_checks import Violation
    from .vmcs import Vmcs

_HOST_CR0, _HOST_CR4 = int(F.HOST_CR0), int(F.HOST_CR4)
_GUEST_RIP, _ENTRY_INTR_INFO = int(F.GUEST_RIP), int(F.VM_ENTRY_INTR_INFO_FIELD)
_MTF = int(ProcBased.MONITOR_TRAP_FLAG)
_ENABLE_EPT = int(ProcBased2.ENABLE_EPT)
_EPT_POINTER = int(F.EPT_POINTER)
_TIMER = int(PinBased.VMX_PREEMPTION_TIMER)
_WINDOWS = int(ProcBased.INTR_WINDOW_EXITING | ProcBased.NMI_WINDOW_EXITING)
_RUN_LOOP_PROC = _MTF | _WINDOWS   # processor-based controls only the run loop handles
_ROOT, _NON_ROOT = VmxOperation.ROOT, VmxOperation.NON_ROOT
_INTERRUPTIBILITY = int(F.GUEST_INTERRUPTIBILITY_INFO)
_TRIPLE_FAULT = ExitReason.TRIPLE_FAULT
_CR0_PG = int(Cr0.PG)
_VM_EXIT = Status.VM_EXIT   # (module constants: an Enum member lookup costs ~70 ns)


class VcpuServices:
    """VM-exit completion and the VMM-facing helpers of :class:`vtlab.cpu.vmx.VmxCpu`."""

    # ------------------------------------------------------------- VM exit
    def _finish(self, outcome: VmxOutcome) -> VmxOutcome:
        """The guest stopped: perform the VM exit if there was one, record the outcome."""
        outcome.instruction = self._entry_insn
        if outcome.status is Status.VM_EXIT:
            if outcome.exit is self._exited_in_place:  # performed (and recorded) already
                self._exited_in_place = None
                return outcome
            self._vm_exit(outcome.exit)
        return self._done(outcome)

    # ---------------------------------------------------- exits in place
    #: Set by a VMM loop (``VirtualMachine.run``) to handle instruction exits without
    #: leaving the emulator: called with the exit, it runs the exit handler and returns
    #: True if it re-entered the guest (:meth:`vmresume_in_place`).
    resume_in_place = None
    _exited_in_place = None
    _entry_insn = "VMLAUNCH"

    def exit_in_place(self, exit_: VmExit) -> bool:
        """Perform a VM exit from inside the emulator and let the VMM loop handle it there.

        On silicon the VMM runs between VM exit and VMRESUME while the guest waits; here
        the guest's Unicorn run may simply wait too, instead of being stopped and started
        again for every exit.  Everything architectural happens exactly as on the slow
        path: the exit's steps (SDM 28), the outcome in :attr:`history`, the VMM's handler,
        the VM-entry checks and guest-state load of the VMRESUME.  Returns True if the
        guest was re-entered (emulation goes on at the new RIP); False leaves the exit
        performed and the run stops as usual.
        """
        self._vm_exit(exit_, at_rip=True)
        # (positional: instruction, status, error, vector, message, value, exit)
        self.history.append(VmxOutcome(self._entry_insn, _VM_EXIT, None, None, "", None, exit_))
        self._exited_in_place = exit_
        if self.resume_in_place(exit_):
            self._exited_in_place = None
            return True
        return False

    def vmresume_in_place(self, exit_: VmExit) -> int | None:
        """VMRESUME from inside the exit of :meth:`exit_in_place`, for the common case only.

        Declines (returns None, changes nothing) unless the entry is one the running
        emulator can take without restarting: same VMCS, no event to inject, no pending
        interrupt or NMI, no monitor trap flag, only GUEST_RIP written since the exit and
        moved away from the exiting instruction, and every VM-entry check passing.  The
        caller then leaves the emulator and executes VMRESUME the ordinary way.
        Returns the guest RIP entered at, or None when it declined.
        """
        monitor = self.monitor
        state = monitor.state
        vmcs = state.vmcs
        if (self.operation is not _ROOT or self.cpl or vmcs is None
                or self.current_vmcs_pointer != vmcs.address
                or monitor.pending_interrupts or monitor.pending_nmi or monitor.halted):
            return None
        unloaded = state.unloaded
        data = vmcs._data   # (the processor reads its own VMCS copy: no software checks)
        if data.get(_ENTRY_INTR_INFO, 0) & _VALID or not unloaded <= _RIP_ONLY:
            return None
        rip = data.get(_GUEST_RIP, 0)
        if rip == exit_.guest_rip or _GUEST_RIP not in unloaded:
            return None  # the exiting instruction would run natively instead of exiting
        if vmcs is not monitor._controls_vmcs or state.controls_version != monitor._controls_version:
            monitor._load_controls()   # (a control was written since: read them again)
        if monitor.proc & _RUN_LOOP_PROC or monitor.pin & _TIMER:
            return None   # (MTF / the entry starts the timer / the window needs the run loop)
        if self._check_entry(vmcs):
            return None  # the ordinary VMRESUME reports the failure
        ept_on = monitor.proc2 & _ENABLE_EPT
        if monitor.ept.needs_enter(ept_on, data.get(_EPT_POINTER, 0)):
            return None  # (INVEPT or a new EPTP: the EPT mappings are remade outside the emulator)
        # GuestStateCache.load for the case at hand: the CPU holds the guest's state, so
        # the fields not saved yet need no load; RIP is the one field written.
        state.pending = False
        self.guest.rip = rip
        unloaded.clear()
        self.operation = _NON_ROOT
        self._entry_insn = "VMRESUME"
        # CR2 as it is now, for a #PF that exits (or that is an EPT fault on the guest's
        # page walk) to leave alone (SDM 28.1); see ExitMonitor.run.  With the guest's
        # paging off (CR0.PG = 0: the exit's CR0, which only a VMWRITE of GUEST_CR0 -
        # declined above - could change) no walk can fault and overwrite it: it is read
        # at the next MOV to CR instead, the only way to turn paging on without an exit.
        if monitor._pf_may_exit or ept_on and monitor._exit_cr0 & _CR0_PG:
            monitor._cr2 = self.guest.reg("cr2")
        elif ept_on:
            monitor._cr2_stale = True
        return rip

    def _vm_exit(self, exit_: VmExit, at_rip: bool = False) -> None:
        """Perform a VM exit (SDM Vol. 3C chapter 28), step by step.

        ``at_rip``: the CPU is known to stand at the exit's RIP (an exiting instruction,
        decided just before it executes), so RIP needs no second look.
        """
        monitor = self.monitor
        state = monitor.state
        vmcs = state.vmcs
        # 28.1: the exit happens *at* the instruction (faults, exiting instructions) -
        # an MTF exit after it - so RIP is where the exit says.
        if at_rip:
            rip = exit_.guest_rip
        else:
            g = self.guest
            rip = g.rip
            if exit_.reason is not ExitReason.MONITOR_TRAP_FLAG and rip != exit_.guest_rip:
                g.rip = rip = exit_.guest_rip
        # 28.2: exit reason, qualification, lengths, interruption information ...
        record_exit_information(vmcs, exit_)
        data = vmcs._data   # (the processor reads its own VMCS copy: no software checks)
        # 28.3: guest state (RIP now, the rest when software first reads it); the
        # interruptibility state and the preemption timer now (28.3.4).
        state.after_exit(vmcs, rip)
        if (monitor.nmi_blocked or monitor.shadow_bits or monitor.pin & _TIMER
                or data.get(_INTERRUPTIBILITY)):
            monitor.save_event_state(vmcs, exit_)
        else:
            # Nothing blocks, the field already says so (0) and there is no timer value
            # to save: what save_event_state would do comes down to this.
            monitor.timer_deadline = None
        if exit_.reason is _TRIPLE_FAULT:
            monitor.halted = False
        # 28.5: host state - the VMM's CR0/CR4 come back from the host-state area.
        self.cr0 = data.get(_HOST_CR0) or self.cr0
        self.cr4 = data.get(_HOST_CR4) or self.cr4
        self.operation = _ROOT
        for listener in self.exit_listeners:
            listener(exit_)

    def _entry_failure(self, insn: str, vmcs: "Vmcs", qualification: int, message: str,
                       violations: "list[Violation]") -> VmxOutcome:
        """VM entry fails on guest state (SDM 27.8): exit reason 33 with bit 31 set."""
        vmcs.put(F.VM_EXIT_REASON, int(ExitReason.INVALID_STATE) | VM_ENTRY_FAILURE_BIT)
        vmcs.put(F.EXIT_QUALIFICATION, qualification)
        exit_ = VmExit(ExitReason.INVALID_STATE, qualification=qualification, entry_failure=True,
                       guest_rip=vmcs.get(F.GUEST_RIP), note=message)
        for listener in self.exit_listeners:
            listener(exit_)
        return self._done(VmxOutcome(insn, Status.ENTRY_FAILED, exit=exit_, message=message,
                                     violations=violations))

    # ---------------------------------------------------- continuing a pause
    def continue_guest(self, max_instructions: int = 10_000_000, *, step: bool = False) -> VmxOutcome:
        """Let a paused guest go on (after ``max_instructions`` ran out, or to single-step).

        Not an instruction: a debugger-style pause of the simulation.  The guest stays in
        VMX non-root operation while paused and nothing is written to the VMCS.
        """
        if self.operation is not VmxOperation.NON_ROOT or self.monitor is None:
            raise VmxFailure(VmxOutcome("continue", Status.FAULT, vector=Vector.UD,
                                        message="the guest is not running (not in VMX non-root operation)"))
        self._entry_insn = "continue"
        return self._finish(self.monitor.run("continue", max_instructions, step=step))

    # ------------------------------------------------ VMREAD/VMWRITE helpers
    def _current_or_raise(self, what: str):
        if self.operation is not VmxOperation.ROOT:
            raise VmxFailure(VmxOutcome(what, Status.FAULT, vector=Vector.UD, message=(
                "not in VMX root operation" if self.operation is VmxOperation.OUTSIDE else
                "the guest is running (VMX non-root operation)")))
        view = self.current_vmcs
        if view is None:
            raise VmxFailure(VmxOutcome(what, Status.VMFAIL_INVALID,
                                        message="there is no current VMCS (VMPTRLD one first)"))
        return view

    def vmcs_read(self, field: F | int | str) -> int:
        """VMREAD of the current VMCS for a VMM written in Python: the value, or an error
        raised (:class:`vtlab.errors.VmcsError` with the VM-instruction error,
        :class:`VmxFailure` when VMREAD could not run at all)."""
        view = self._views.get(self.current_vmcs_pointer) if self.operation is _ROOT else None
        if view is None:
            view = self._current_or_raise("VMREAD")
        return view.read(field)

    def vmcs_write(self, field: F | int | str, value: int) -> None:
        """VMWRITE likewise (high bits beyond the field's width are dropped, as VMWRITE does)."""
        view = self._views.get(self.current_vmcs_pointer) if self.operation is _ROOT else None
        if view is None:
            view = self._current_or_raise("VMWRITE")
        view.write(field, int(value), truncate=True)

    # --------------------------------------------------- what devices raise
    def raise_interrupt(self, vector: int) -> None:
        """An external interrupt from a virtual device: it exits or is delivered at the
        next VM entry, as the pin-based controls and the guest's RFLAGS.IF say (SDM 26.2)."""
        if not 0 <= int(vector) <= 255:
            raise ValueError(f"interrupt vector {vector} is not 0-255")
        self.monitor.pending_interrupts.append(int(vector))

    def raise_nmi(self) -> None:
        """An NMI: exits if "NMI exiting" is 1, else goes to the guest's vector 2."""
        self.monitor.pending_nmi = True

    @property
    def pending_interrupts(self) -> list[int]:
        """External-interrupt vectors raised and not yet taken (oldest first)."""
        return list(self.monitor.pending_interrupts) if self.monitor is not None else []

    # ------------------------------------------------------------------- EPT
    @property
    def ept(self):
        """The processor's EPT (:class:`vtlab.cpu.ept.EptUnit`): walks of the paging
        structures behind an EPTP, the host-physical memory they live in and the cached
        guest-physical mappings (SDM 29.3, 29.4)."""
        return self.monitor.ept

    def ept_permissions(self, gpa: int) -> int:
        """The EPT permissions (RWX bits) the processor's cached mappings give ``gpa``
        (what the guest gets now - until INVEPT, whatever the tables say since)."""
        return self.monitor.ept.permissions(gpa)

    # ------------------------------------------------------------- set-up
    def capture_guest_state(self) -> None:
        """Write the guest CPU's current state into the current VMCS's guest-state area,
        as a VMM's VMWRITEs would: the guest starts where its CPU is now, and the first
        VM entry loads all of it."""
        view = self._current_or_raise("VMWRITE")
        self.monitor.state.capture(view.region)

"""A tiny hypervisor: brings up VMX, builds a VMCS, runs the guest and handles its exits.

The shape follows Linux KVM (``arch/x86/kvm/vmx/vmx.c``): one table, ``HANDLERS``,
maps each :class:`ExitReason` to a small function named after what it handles.  A
handler gets the VM and the :class:`VmExit`, does the work (emulates the instruction,
talks to a device), advances the guest RIP past the instruction when it emulated it
(:meth:`VirtualMachine.skip_instruction`, like ``kvm_skip_emulated_instruction``), and
returns ``True``/``None`` to resume the guest or ``False`` to stop the VM.

Learners replace or wrap handlers::

    @vm.handler(ExitReason.CPUID)
    def my_cpuid(vm, exit):
        ...
        return vm.default(exit)   # fall back to the built-in handler

A handler that raises stops the VM with :class:`vtlab.errors.HandlerError` naming the
exit; the VM, its VMCS and its trace stay inspectable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..arch.controls import EntryControl, ExitControl, PinBased, ProcBased, ProcBased2
from ..arch.ept import InveptType
from ..arch.exceptions import InterruptionType, IntrInfo
from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Cr0, Cr4, Msr
from ..arch.vmcs_fields import VmcsField as F
from .devices import DeviceBus, standard_devices
from ..arch.interrupts import Interruptibility
from . import irq as _irq
from .pic import PicPair
from .pit import Pit8254
from .ept_tables import EptTables, handle_ept_misconfig
from . import unpaged as _unpaged
from . import v86 as _v86
from ..errors import HandlerError, VtlabError
from ..cpu.exits import VmExit, msr_bitmap_position
from ..cpu.guest import Guest, Mode
from ..cpu.layout import parse_mode  # noqa: F401  (re-exported: vtlab.vmm.machine.parse_mode)
from .trace import Trace
from ..cpu.vmcs import INVALID_POINTER, LaunchState
from ..cpu.vmx import Status, VmxCpu, VmxOperation, VmxOutcome

from ..cpu import guest as _guest, nonroot as _nonroot
from time import monotonic as _monotonic
from .handlers import (HANDLERS, HYPERCALLS, Handler, _unhandled)
from .state import Registers, RunSummary, VmState

#: Where guest code goes unless told otherwise (the same in every mode).
GUEST_LOAD_DEFAULT = 0x1000

#: Exceptions and interrupts delivered to the guest in one VirtualMachine.run before it
#: stops (an exception storm; see vtlab.cpu.nonroot.EVENT_BUDGET).
_EVENT_BUDGET = _nonroot.EVENT_BUDGET


class InternalError(VtlabError):
    """Something went wrong inside vtlab itself (a bug, not the guest's or the VMM's
    fault); the VM is stopped but stays inspectable.  The error raised is also an instance
    of the original exception's type (``__cause__`` is the original)."""


_INTERNAL_ERRORS: dict[type, type] = {}   # original exception type -> its InternalError



# ------------------------------------------------------------------------ the machine
#: Controls of a typical KVM guest: HLT and I/O exit, MSR bitmaps, EPT + unrestricted guest.
DEFAULT_CONTROLS = (
    PinBased.EXT_INTR_MASK | PinBased.NMI_EXITING,
    ProcBased.HLT_EXITING | ProcBased.UNCOND_IO_EXITING | ProcBased.USE_MSR_BITMAPS
    | ProcBased.ACTIVATE_SECONDARY_CONTROLS,
    ProcBased2.ENABLE_EPT | ProcBased2.UNRESTRICTED_GUEST | ProcBased2.ENABLE_VPID | ProcBased2.ENABLE_RDTSCP,
    ExitControl.HOST_ADDR_SPACE_SIZE | ExitControl.ACK_INTR_ON_EXIT | ExitControl.SAVE_IA32_EFER
    | ExitControl.LOAD_IA32_EFER,
    EntryControl.LOAD_IA32_EFER,
)

_CONTROL_FIELD = {PinBased: F.PIN_BASED_VM_EXEC_CONTROL, ProcBased: F.CPU_BASED_VM_EXEC_CONTROL,
                  ProcBased2: F.SECONDARY_VM_EXEC_CONTROL, ExitControl: F.VM_EXIT_CONTROLS,
                  EntryControl: F.VM_ENTRY_CONTROLS}

# Symbolic host addresses: the VMM's exit entry point and stack (canonical, kernel half).
HOST_RIP = 0xFFFF_FFFF_8100_0000
HOST_RSP = 0xFFFF_C900_0000_8000


class VirtualMachine:
    """A guest program running in VMX non-root operation under vtlab's VMM.

    ``program`` is assembly text, machine code (bytes) or a path to a ``.asm``/``.bin``
    file; ``mode`` the mode the guest starts in; ``load`` where its code goes (and
    where it starts unless ``entry`` says otherwise).
    """

    def __init__(self, program: str | bytes | Path | None = None, mode: Mode | str = "real",
                 load: int | None = None, entry: int | None = None, memory_size: int = 2 << 20,
                 devices: DeviceBus | None = None, ept: bool = True):
        self.mode = parse_mode(mode)
        #: Run the guest with EPT (and unrestricted guest) on - the default, as KVM does -
        #: or off (``ept=False``: a protected-mode guest with paging off then runs on the
        #: VMM's identity page table, vtlab.vmm.unpaged; a real-mode guest, which VM entry
        #: refuses without unrestricted guest (SDM 27.3.1.1), in virtual-8086 mode,
        #: vtlab.vmm.v86).
        self.ept_enabled = bool(ept)
        self.guest = Guest(self.mode, memory_size,
                           virtual_8086=not self.ept_enabled and self.mode is Mode.REAL)
        self.cpu = VmxCpu(self.guest)
        self.regs = Registers(self.guest)
        self.bus = devices or standard_devices()
        self.guest.connect_io(self.bus.read, self.bus.write)
        #: The PC's interrupt controller and interval timer (vtlab.vmm.pic, vtlab.vmm.pit):
        #: on the standard bus, None on a learner's bus without them.
        self.pic: PicPair | None = None
        self.pit: Pit8254 | None = None
        _irq.attach_legacy_devices(self)
        self.handlers: dict[ExitReason, Handler] = dict(HANDLERS)
        self.handlers.setdefault(ExitReason.EPT_MISCONFIG, handle_ept_misconfig)
        self.hypercalls = dict(HYPERCALLS)
        self.trace = Trace()
        self.console = bytearray()
        self.state = VmState.READY
        self.message = ""
        self.tpr = 0
        self.tsc_offset = 0
        self.host_interrupts = 0
        self.timer_period = 0
        self.timer_vector = 0x20
        #: An NMI the VMM holds back until the NMI window opens (handle_nmi_window), the
        #: VMX-preemption timer value re-armed after each timer exit (None: not re-armed),
        #: and the number of timer exits so far (handle_preemption_timer).
        self.nmi_waiting = False
        #: Re-inject the event an exit during event delivery interrupted, before the handler
        #: runs (vtlab.vmm.irq.reinject_interrupted_event; False: the handler's job).
        self.reinject_events = True
        self.preemption_slice: int | None = None
        self.preemption_exits = 0
        self.last_exit: VmExit | None = None
        self.last_outcome: VmxOutcome | None = None
        #: An exit that happened but whose handler has not run yet (see next_exit / step).
        self.pending_exit: VmExit | None = None
        self._pending_event = None
        #: [first instruction count, max instructions, max exits, exits, wall-clock
        #: deadline] of the current run
        self._budget = [0, 0, 0, 0, None]
        self._verdict = True      # False: a handler run in place asked to stop
        self._in_place = None     # the last exit recorded and handled in place
        self._handler_names: dict = {}   # handler -> the name the trace shows
        #: Let run() handle instruction exits inside the emulator (same results, faster;
        #: set False to see the ordinary path, one emulator run per exit).
        self.exits_in_place = True
        self.msrs: dict[int, int] = {
            Msr.IA32_TIME_STAMP_COUNTER: 0, Msr.IA32_APIC_BASE: 0xFEE0_0900, Msr.IA32_PAT: 0x0007_0406_0007_0406,
            Msr.IA32_MISC_ENABLE: 1, Msr.IA32_SYSENTER_CS: 0, Msr.IA32_SYSENTER_ESP: 0,
            Msr.IA32_SYSENTER_EIP: 0, Msr.IA32_STAR: 0, Msr.IA32_LSTAR: 0, Msr.IA32_FMASK: 0,
            Msr.IA32_KERNEL_GS_BASE: 0, Msr.IA32_TSC_AUX: 0, Msr.IA32_MTRRCAP: 0x508,
        }
        self.program = None
        if program is not None:
            self.program = self.load(program, load)
            if entry is None:
                entry = self.program.address
        self._bring_up(entry)

    # ----------------------------------------------------------- bring-up
    def load(self, program: str | bytes | Path, address: int | None = None):
        """Load more guest code (assembly text, bytes, or a .asm/.bin path)."""
        if isinstance(program, Path) or (isinstance(program, str) and program.endswith((".asm", ".bin"))
                                         and "\n" not in program and Path(program).exists()):
            path = Path(program)
            program = path.read_bytes() if path.suffix == ".bin" else path.read_text()
        address = GUEST_LOAD_DEFAULT if address is None else address
        return self.guest.load(program, address)

    def _bring_up(self, entry: int | None) -> None:
        """What a VMM does before the first VMLAUNCH (SDM 24.7, 25.11.5)."""
        cpu, caps = self.cpu, self.cpu.caps
        cpu.write_cr4(cpu.cr4 | Cr4.VMXE)
        self.vmxon_address = cpu.alloc_region(caps.revision_id)
        cpu.vmxon(self.vmxon_address).check()
        self.vmcs_address = cpu.alloc_region(caps.revision_id)
        cpu.vmclear(self.vmcs_address).check()
        cpu.vmptrld(self.vmcs_address).check()
        self.io_bitmap_a, self.io_bitmap_b = cpu.memory.alloc(), cpu.memory.alloc()
        self.msr_bitmap = cpu.memory.alloc()
        cpu.memory.write(self.msr_bitmap, b"\xff" * 4096)   # every MSR access exits ...
        # The EPT: an identity map of the guest's RAM (2-MByte pages), as KVM builds one.
        self.ept_tables = EptTables(cpu.memory)
        self.ept_tables.identity(self.guest.memory_size)
        self.ept_root = self.ept_tables.root
        pin, proc, proc2, exit_ctl, entry_ctl = DEFAULT_CONTROLS
        if self.mode is Mode.LONG:
            entry_ctl |= EntryControl.IA32E_MODE
        for cls, value in ((PinBased, pin), (ProcBased, proc), (ProcBased2, proc2),
                           (ExitControl, exit_ctl), (EntryControl, entry_ctl)):
            self.vmwrite(_CONTROL_FIELD[cls], caps.adjust(cls, value))
        self.vmwrite(F.IO_BITMAP_A, self.io_bitmap_a)
        self.vmwrite(F.IO_BITMAP_B, self.io_bitmap_b)
        self.vmwrite(F.MSR_BITMAP, self.msr_bitmap)
        self.vmwrite(F.EPT_POINTER, self.ept_tables.eptp())   # WB, 4-level walk
        if not self.ept_enabled:
            # Without EPT there is no unrestricted guest either (SDM 27.2.1.1).
            self.vmwrite(F.SECONDARY_VM_EXEC_CONTROL, self.vmread(F.SECONDARY_VM_EXEC_CONTROL)
                         & ~(ProcBased2.ENABLE_EPT | ProcBased2.UNRESTRICTED_GUEST))
        self.vmwrite(F.VIRTUAL_PROCESSOR_ID, 1)
        self.vmwrite(F.VMCS_LINK_POINTER, INVALID_POINTER)
        self.vmwrite(F.EXCEPTION_BITMAP, 0)
        # Host state: the VMM's own context, restored on every exit (SDM 25.5).
        for f, value in ((F.HOST_CR0, cpu.cr0), (F.HOST_CR3, 0x1000), (F.HOST_CR4, cpu.cr4),
                         (F.HOST_CS_SELECTOR, 0x10), (F.HOST_SS_SELECTOR, 0x18), (F.HOST_DS_SELECTOR, 0),
                         (F.HOST_ES_SELECTOR, 0), (F.HOST_FS_SELECTOR, 0), (F.HOST_GS_SELECTOR, 0),
                         (F.HOST_TR_SELECTOR, 0x40), (F.HOST_RIP, HOST_RIP), (F.HOST_RSP, HOST_RSP),
                         (F.HOST_IA32_EFER, cpu.efer)):
            self.vmwrite(f, value)
        # Guest state: the CPU state the guest's boot code would have set up, captured
        # from the guest CPU.  VMX requires CR0.NE and CR4.VMXE to stay set (FIXED0 MSRs);
        # the read shadows show the guest the values it expects.
        g = self.guest
        guest_cr0, guest_cr4 = g.reg("cr0"), g.reg("cr4")
        g.set_reg("cr0", guest_cr0 | Cr0.NE)
        g.set_reg("cr4", guest_cr4 | Cr4.VMXE)
        if entry is not None:
            g.rip = entry
        self.cpu.capture_guest_state()
        self.vmwrite(F.GUEST_IA32_EFER, g.reg("efer"))
        self.vmwrite(F.GUEST_ACTIVITY_STATE, 0)
        self.vmwrite(F.CR0_GUEST_HOST_MASK, Cr0.NE)
        self.vmwrite(F.CR0_READ_SHADOW, guest_cr0)
        self.vmwrite(F.CR4_GUEST_HOST_MASK, Cr4.VMXE)
        self.vmwrite(F.CR4_READ_SHADOW, guest_cr4)
        #: With EPT off, a protected-mode guest whose paging is off runs on the VMM's identity
        #: page table (vtlab.vmm.unpaged; None otherwise): VM entry needs CR0.PG = 1 then.
        self.unpaged = _unpaged.attach(self)
        #: With EPT off, a real-mode guest runs in virtual-8086 mode (vtlab.vmm.v86; None
        #: otherwise): VM entry needs CR0.PE = 1 then, and HLT becomes a #GP exit.
        self.v86 = _v86.attach(self)

    # ----------------------------------------------------------- VMCS access
    def vmread(self, field: F | int | str) -> int:
        """VMREAD from the current VMCS; raises :class:`VmxFailure` / :class:`VmcsError` on VMfail.

        The checks are VMREAD's, in its order (SDM 31.3): no current VMCS raises
        :class:`VmxFailure` (VMfailInvalid); an encoding of no field, or of a field the
        capability MSRs do not offer (TPR threshold without "use TPR shadow", ...), raises
        :class:`VmcsError` with ``error`` 12.
        """
        cpu = self.cpu
        cpu.require_field(field, "VMREAD")    # VMfailInvalid, then error 12 (no such field here)
        return cpu.vmcs_read(field)

    def vmwrite(self, field: F | int | str, value: int) -> None:
        """VMWRITE to the current VMCS; raises :class:`VmxFailure` / :class:`VmcsError` on VMfail
        (the checks of :meth:`vmread`, then error 13 for a read-only field)."""
        cpu = self.cpu
        cpu.require_field(field, "VMWRITE")   # VMfailInvalid, then error 12 (no such field here)
        cpu.vmcs_write(field, value)          # error 13 for a read-only field

    @property
    def vmcs(self):
        """The VM's VMCS object (inspect with ``vm.vmcs.to_dataframe()``)."""
        return self.cpu.view(self.vmcs_address)

    def control(self, flag) -> bool:
        """Is a VM-execution/exit/entry control bit set?"""
        return bool(self.vmcs.get(_CONTROL_FIELD[type(flag)]) & flag)

    def set_control(self, flag, on: bool = True) -> None:
        """Set or clear one control bit (checked against the capability MSRs at VM entry)."""
        field = _CONTROL_FIELD[type(flag)]
        value = self.vmcs.get(field)
        self.vmwrite(field, (value | flag) if on else (value & ~flag))

    def set_io_intercept(self, ports: Iterable[int] | range, intercept: bool = True) -> None:
        """Set/clear I/O-bitmap bits for ``ports`` (bitmap A: 0-7FFFH, B: 8000H-FFFFH)."""
        for port in ports:
            bitmap = self.io_bitmap_a if port < 0x8000 else self.io_bitmap_b
            self.cpu.memory.set_bit(bitmap, port & 0x7FFF, intercept)

    def set_msr_intercept(self, msr: int, read: bool | None = None, write: bool | None = None) -> None:
        """Set/clear MSR-bitmap bits for one MSR (SDM 25.6.9 layout)."""
        position = msr_bitmap_position(msr)
        if position is None:
            raise ValueError(f"MSR {msr:#x} is outside the ranges the MSR bitmap covers: it always exits")
        off, bit = position
        if read is not None:
            self.cpu.memory.set_bit(self.msr_bitmap + off, bit, read)
        if write is not None:
            self.cpu.memory.set_bit(self.msr_bitmap + off + 2048, bit, write)

    def ept_map(self, gpa: int, size: int, perms: int = 7) -> None:
        """Grant read(1)/write(2)/execute(4) on guest-physical pages: the VMM rewrites the
        EPT entries of those 4-KByte pages (splitting a 2-MByte page if need be) and
        executes INVEPT, so that the processor drops what it had cached (SDM 29.4.3.4)."""
        self.ept_tables.protect(gpa, size, perms)
        self.invept()

    def ept_unmap(self, gpa: int, size: int) -> None:
        """Remove guest-physical pages from the EPT: the next access is an EPT violation."""
        self.ept_map(gpa, size, 0)

    def invept(self, all_contexts: bool = False) -> None:
        """INVEPT single-context for this VM's EPTP (or all-context): after a change to the
        EPT paging structures the processor may still use the old translations until then."""
        if all_contexts:
            self.cpu.invept(InveptType.ALL_CONTEXT).check()
        else:
            self.cpu.invept(InveptType.SINGLE_CONTEXT, self.vmread(F.EPT_POINTER)).check()

    # ----------------------------------------------------------- handler API
    def handler(self, reason: ExitReason):
        """Decorator: install ``fn(vm, exit)`` as the handler for ``reason``."""
        def install(fn: Handler) -> Handler:
            self.handlers[ExitReason(reason)] = fn
            return fn
        return install

    def default(self, exit: VmExit) -> bool | None:
        """Run the built-in handler for ``exit`` (for wrappers that add to it)."""
        return HANDLERS.get(exit.reason, _unhandled)(self, exit)

    def skip_instruction(self) -> None:
        """Advance GUEST_RIP past the exiting instruction (VM_EXIT_INSTRUCTION_LEN bytes).

        The instruction was the one an STI or MOV SS shadow covered, if any: emulating it
        ends the shadow, so blocking by STI / MOV SS (interruptibility bits 1:0) is cleared,
        as KVM's ``skip_emulated_instruction`` does."""
        cpu = self.cpu
        if cpu.operation is _ROOT and cpu.current_vmcs_pointer == self.vmcs_address:
            vmcs = cpu.view(self.vmcs_address)   # VMREAD/VMWRITE without the instruction's checks
            # GUEST_RIP is saved at the exit itself and the length is exit information
            # (SDM 28.2, 28.3): neither waits for the lazy guest-state save, so the region
            # holds what VMREAD would return (and CPUID, the most frequent exit, gets here).
            get = vmcs.region.get
            vmcs.write(_GUEST_RIP, get(_GUEST_RIP) + get(_EXIT_LENGTH), truncate=True)
            shadow = get(_INTERRUPTIBILITY)   # (saved at the exit, never lazily)
            if shadow & _SHADOW:
                vmcs.write(F.GUEST_INTERRUPTIBILITY_INFO, shadow & ~_SHADOW)
            return
        cpu.vmcs_write(F.GUEST_RIP, cpu.vmcs_read(F.GUEST_RIP) + cpu.vmcs_read(F.VM_EXIT_INSTRUCTION_LEN))
        shadow = cpu.vmcs_read(F.GUEST_INTERRUPTIBILITY_INFO)
        if shadow & _SHADOW:
            cpu.vmcs_write(F.GUEST_INTERRUPTIBILITY_INFO, shadow & ~_SHADOW)

    def inject_exception(self, vector: int, error_code: int | None = None,
                         kind: InterruptionType = InterruptionType.HARDWARE_EXCEPTION) -> bool:
        """Queue an exception for delivery at the next VM entry (SDM 27.6 event injection).

        A real-mode guest (GUEST_CR0.PE = 0, an unrestricted guest) gets no error code:
        real-mode delivery pushes none, and VM entry refuses "deliver error code" there
        (SDM 27.2.1.3), so the error code is dropped as KVM does.
        """
        if error_code is not None and not self.vmread(F.GUEST_CR0) & Cr0.PE:
            error_code = None
        info = IntrInfo(int(vector), kind, error_code is not None).encode()
        self.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info)
        if error_code is not None:
            self.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, error_code)
        return True

    def set_guest_cr0(self, value: int) -> None:
        """What the guest asked CR0 to be: shadow = value, real CR0 = value plus VMX's fixed bits."""
        caps = self.cpu.caps
        fixed0 = caps.cr0_fixed0
        if self.control(ProcBased2.UNRESTRICTED_GUEST):
            fixed0 &= ~(Cr0.PE | Cr0.PG)
        self.vmwrite(F.CR0_READ_SHADOW, value & 0xFFFF_FFFF)
        self.vmwrite(F.GUEST_CR0, (value | fixed0) & caps.cr0_fixed1)

    def set_guest_cr4(self, value: int) -> None:
        """CR4 likewise: VMXE stays set underneath, hidden by the read shadow."""
        self.vmwrite(F.CR4_READ_SHADOW, value)
        self.vmwrite(F.GUEST_CR4, (value | self.cpu.caps.cr4_fixed0) & self.cpu.caps.cr4_fixed1)

    def raise_interrupt(self, vector: int) -> None:
        """A virtual device raises an external interrupt (delivered or exiting at the next entry)."""
        self.cpu.raise_interrupt(vector)

    def raise_nmi(self) -> None:
        """A virtual device raises an NMI (exits if "NMI exiting" is 1, else goes to guest vector 2)."""
        self.cpu.raise_nmi()

    def set_timer(self, period_instructions: int, vector: int = 0x20) -> None:
        """A periodic timer interrupt every ``period_instructions`` guest instructions (0: off)."""
        self.timer_period, self.timer_vector = period_instructions, vector

    def stop(self, state: VmState, message: str) -> None:
        """Stop the VM (called by handlers)."""
        self.state, self.message = state, message

    # ----------------------------------------------------------------- running
    @property
    def output(self) -> str:
        """Everything the guest printed: serial port, debug port and PUTCHAR hypercalls."""
        parts = [d.text for d in self.bus.devices if hasattr(d, "text")]
        return "".join(parts) + self.console.decode("latin-1")

    def _on_exit(self, exit_: VmExit) -> None:
        """(Kept for code that registered it as a listener; the VMM records exits itself.)"""
        self.last_exit = exit_

    def _state_summary(self) -> tuple:
        """Registers for the trace, kept raw; :func:`vtlab.trace.format_state` prints them."""
        rax, rbx, rcx, rdx, rsp, rflags, cr0, cs = self.guest.read_registers(_SUMMARY_REGISTERS)
        return (rax, rbx, rcx, rdx, rsp, rflags, Guest.cpl_of(cr0, cs, rflags))

    def _record(self, exit_: VmExit):
        """Put a fresh exit in the trace; it waits in :attr:`pending_exit` for its handler."""
        handler = self.handlers.get(exit_.reason, _unhandled)
        try:
            name = self._handler_names.get(handler)
            if name is None:
                name = self._handler_names[handler] = _handler_name(handler)
        except TypeError:  # a learner's handler object that cannot be hashed
            name = _handler_name(handler)
        event = self.trace.record_exit(exit_, name, exit_.registers or self._state_summary())
        self.last_exit = exit_
        self.pending_exit, self._pending_event = exit_, event
        self._budget[3] += 1
        return event

    def handle_pending_exit(self) -> bool:
        """Run the handler of the exit waiting in :attr:`pending_exit`; True if the guest may resume."""
        exit_, event = self.pending_exit, self._pending_event
        if exit_ is None:
            return self.state in (VmState.RUNNING, VmState.READY)
        self.pending_exit = None
        handler = self.handlers.get(exit_.reason, _unhandled)
        if self.state is _READY:   # (module constants: an Enum member lookup costs ~70 ns)
            self.state = _RUNNING
        try:
            if exit_.idt_vectoring_info and self.reinject_events:
                _irq.reinject_interrupted_event(self, exit_)   # the event it interrupted (SDM 28.2.4)
            result = handler(self, exit_)
        except Exception as exc:  # the learner's handler: stop cleanly, keep everything
            name = _handler_name(handler)
            self.stop(VmState.ERROR, f"exit handler {name} raised {type(exc).__name__}: {exc}")
            if event is not None:
                event.note = self.message
            error = HandlerError(
                f"VM exit #{event.seq if event else '?'} ({exit_.reason.name}, reason {int(exit_.reason)}) "
                f"at guest RIP {exit_.guest_rip:#x} '{exit_.instruction}': handler {name} raised "
                f"{type(exc).__name__}: {exc}. The VM is stopped; vm.trace, vm.vmcs and vm.regs "
                "show where it was.")
            error.original = exc  # the learner's own exception, for whoever wants it whole
            # A short traceback: the learner's handler frames (the caught traceback minus
            # this frame) under the HandlerError, without the chained "During handling of
            # the above exception" copy of the same frames plus vtlab's.  run/next_exit/
            # step raise it again with just these frames, dropping the emulator's frames
            # between them and the learner's call.
            tb = exc.__traceback__
            error.handler_traceback = tb.tb_next if tb is not None else None
            raise error.with_traceback(error.handler_traceback) from None
        if event is not None and exit_.device is not None:
            event.device = exit_.device
        return result is not False and self.state is _RUNNING

    def _advance_timed(self, budget: int) -> VmxOutcome:
        """:meth:`_advance`, with the guest's 8254 counting on vtlab's clock: the guest is
        stopped where its IRQ 0 falls due, and the host's timer interrupt arrives there (an
        external-interrupt exit next, :func:`vtlab.vmm.irq.host_timer_fired`).  A tick due
        while the VMM itself runs (after an exit) is taken in root operation - no exit - and
        IRQ 0 injected or the interrupt window opened (vtlab.vmm.irq)."""
        g = self.guest
        end = g.counter.total + budget
        while True:
            due = self.pit.next_irq() if self.pit is not None else None
            if due is None:
                return self._advance(max(1, end - g.counter.total))
            # (The PIT counts vtlab's clock, the TSC: instructions plus the time the vCPU
            # slept in HLT, vtlab.vmm.irq.sleep_until_timer.)
            now = g.read_tsc()
            if now >= due and self.cpu.operation is _ROOT:
                _irq.timer_tick(self)
                _irq.inject_pending_irq(self)
                continue
            outcome = self._advance(max(1, min(end - g.counter.total, due - now)))
            if (outcome.status is not Status.PAUSED or outcome.halted or g.read_tsc() < due
                    or self.state is not VmState.RUNNING or g.limits.stopped is not None):
                return outcome
            _irq.host_timer_fired(self)   # the host's timer interrupt: exit 1 comes next
            if g.counter.total >= end:
                return outcome

    def _advance(self, budget: int, step: bool = False) -> VmxOutcome:
        """Enter the guest (VMLAUNCH/VMRESUME) or let a paused guest go on; record any exit."""
        g, cpu = self.guest, self.cpu
        if cpu.operation is VmxOperation.NON_ROOT:
            outcome = cpu.continue_guest(budget, step=step)
        else:
            vmcs = self.vmcs
            insn = "VMRESUME" if vmcs.launch_state is LaunchState.LAUNCHED else "VMLAUNCH"
            self.trace.record_entry(insn, vmcs.get(F.GUEST_RIP), g.counter.total)
            enter = cpu.vmresume if vmcs.launch_state is LaunchState.LAUNCHED else cpu.vmlaunch
            outcome = enter(budget, step=step)
        self.last_outcome = outcome
        if outcome.status is Status.VM_EXIT:
            if outcome.exit is not self._in_place:  # (an exit handled in place is recorded)
                self._record(outcome.exit)
        elif outcome.status is Status.ENTRY_FAILED:
            self.last_exit = outcome.exit
            self.trace.record_exit(outcome.exit, "(VM-entry failure)")
            reason = outcome.exit.reason
            self.stop(VmState.ENTRY_FAILED, _unpaged.explain_entry_failure(
                self, f"{outcome.instruction} failed: VM-entry failure, exit "
                      f"reason {int(reason)} ({reason.name}) | bit 31: {outcome.message}"))
        elif outcome.status in (Status.VMFAIL_VALID, Status.VMFAIL_INVALID, Status.FAULT):
            self.stop(VmState.ENTRY_FAILED, str(outcome))
        return outcome

    _FINAL = (VmState.CRASHED, VmState.ERROR, VmState.ENTRY_FAILED, VmState.SHUTDOWN)

    def run(self, max_exits: int = 10_000, max_instructions: int = 10_000_000,
            max_seconds: float | None = 60.0) -> RunSummary:
        """Run the guest until it halts or stops, handling every VM exit.

        Ends with state BUDGET (and a message saying which budget) if the guest runs
        ``max_instructions`` instructions or causes ``max_exits`` exits first, runs for
        more than ``max_seconds`` of wall-clock time (None: no cap), runs past the end of
        its program into never-loaded memory ("did you forget HLT?"), or loops in its
        exception handling (see :meth:`vtlab.cpu.nonroot.ExitMonitor.run`): whatever the
        guest does, the run ends, and the message names what happened and whose fault it
        is.  The VM stays runnable after a BUDGET stop.

        The notebook's interrupt (KeyboardInterrupt) stops a run within a fraction of a
        second, even deep in exit-free guest code; the VM is left consistent (state READY,
        the message saying where it stopped) and ``vm.run()`` carries on from there.

        Instruction exits are handled *in place* when they can be (see
        :meth:`vtlab.cpu.vmx.VmxCpu.exit_in_place`): the handler runs and the guest
        re-enters without the emulator being stopped and started again, which halves
        the cost of a round trip; the trace, the VMCS and the outcome are the same.
        """
        if self.state in self._FINAL:
            return self._summary()
        self.state, self.message = VmState.RUNNING, ""
        g = self.guest
        limits = g.limits
        start_insns = g.counter.total
        deadline = None if max_seconds is None else _monotonic() + max_seconds
        self._budget = [start_insns, max_instructions, max_exits, 0, deadline]  # ..., exits so far
        self._verdict = True
        next_tick = g.counter.total + self.timer_period if self.timer_period else None
        if next_tick is None and self.exits_in_place:  # (a timer slices runs: not in place)
            self.cpu.resume_in_place = self._exit_in_place
        limits.deadline = deadline
        limits.event_limit = limits.events_delivered + _EVENT_BUDGET
        token = _guest.watch_deadline(deadline)
        try:
            runaway = g.runaway_message(recent=False) if self.pending_exit is None else None
            if runaway is not None:  # (it stands in never-loaded memory already: say so at once)
                self.stop(VmState.BUDGET, runaway)
            while runaway is None:
                if self.pending_exit is not None:
                    if not self.handle_pending_exit():
                        break
                elif not self._verdict or self.state is not VmState.RUNNING:
                    break  # an exit handled in place stopped the VM
                used = g.counter.total - start_insns
                exits = self._budget[3]
                if used >= max_instructions:
                    self.stop(VmState.BUDGET, g.runaway_message() or (
                              f"instruction budget exhausted: the guest ran {used:,} "
                              f"instructions (max_instructions={max_instructions:,}) - a runaway loop?"))
                    break
                if exits >= max_exits:
                    self.stop(VmState.BUDGET, f"exit budget exhausted: {exits:,} VM exits (max_exits={max_exits:,})")
                    break
                if deadline is not None and _monotonic() > deadline:
                    self.stop(VmState.BUDGET, f"wall-clock cap reached: the run took more than "
                              f"max_seconds={max_seconds:g} s ({used:,} guest instructions, {exits:,} VM exits)")
                    break
                budget = max_instructions - used
                if next_tick is not None:
                    budget = max(1, min(budget, next_tick - g.counter.total))
                outcome = self._advance_timed(budget)
                if outcome.status is Status.VM_EXIT:
                    continue
                if self.state is not VmState.RUNNING:
                    break
                if limits.stopped is not None:  # past its program, an exception loop, the clock
                    self.stop(VmState.BUDGET, limits.stopped)
                    break
                # PAUSED: the guest halted without exiting, or the budget slice ran out
                if next_tick is not None and g.counter.total >= next_tick:
                    self.raise_interrupt(self.timer_vector)
                    next_tick = g.counter.total + self.timer_period
                    continue
                if outcome.halted:
                    self.stop(VmState.HALTED, "the guest executed HLT without exiting (HLT exiting is 0) "
                              "and nothing will wake it")
                    break
        except KeyboardInterrupt:
            self._interrupted()
            raise
        except _guest.RunTimeout:  # stuck in Python (a handler, a device) past max_seconds
            self._interrupted()
            self.stop(VmState.BUDGET, f"wall-clock cap reached: the run took more than max_seconds="
                      f"{max_seconds:g} s and was stopped inside Python code - an exit handler or "
                      "a device that loops (a REP INS/OUTS with a huge count?)")
        except HandlerError as exc:  # the learner's frames only (see handle_pending_exit)
            raise exc.with_traceback(getattr(exc, "handler_traceback", exc.__traceback__)) from None
        except VtlabError:
            raise
        except Exception as exc:
            raise self._internal_error(exc) from exc
        finally:
            # (First, and retried: a RunTimeout arriving now must not escape the run.)
            while True:
                try:
                    _guest.unwatch_deadline(token)
                    break
                except _guest.RunTimeout:
                    pass
            self.cpu.resume_in_place = None
            limits.deadline = limits.event_limit = None
        return self._summary(self._budget[3], g.counter.total - start_insns)

    def _interrupted(self) -> None:
        """A KeyboardInterrupt stopped a run: leave the VM consistent and runnable.

        The interrupt may land anywhere - in exit-free guest code (the guest is then
        paused in VMX non-root operation), in an exit handler (the exit stays performed
        and recorded; GUEST_RIP is wherever the handler left it, so the next VMRESUME
        re-executes an instruction the handler did not skip) or between the two.  The
        vCPU dropped what it had half-done (ExitMonitor._abandon); the VMM forgets an
        exit whose handler was cut short and marks the VM READY.
        """
        self.pending_exit = self._pending_event = None
        self._in_place = None
        where = f"guest RIP {self.guest.rip:#x}"
        self.stop(VmState.READY, f"interrupted (KeyboardInterrupt) at {where}, "
                  f"{self.cpu.operation.value}; vm.run() carries on from there")

    def _internal_error(self, exc: Exception) -> VtlabError:
        """An exception that is nobody's fault but vtlab's: stop the VM (it stays
        inspectable) and say so, instead of letting a raw traceback out."""
        self.stop(VmState.ERROR, f"vtlab internal error (a bug in vtlab, not in your guest or VMM): "
                  f"{type(exc).__name__}: {exc}")
        message = f"{self.message}. The VM is stopped; vm.trace, vm.vmcs and vm.regs show where it was."
        # The error is an InternalError *and* of the original type, so code that caught, say,
        # a RuntimeError coming out of a run still does.
        kind = type(exc)
        cls = _INTERNAL_ERRORS.get(kind)
        if cls is None:
            try:
                cls = type(f"InternalError[{kind.__name__}]", (InternalError, kind), {"__module__": __name__})
            except TypeError:  # (an exception type that cannot be combined)
                cls = InternalError
            _INTERNAL_ERRORS[kind] = cls
        try:
            return cls(message)
        except Exception:
            return InternalError(message)

    def _exit_in_place(self, exit_: VmExit) -> bool:
        """One turn of :meth:`run`'s loop for an exit handled inside the emulator: record
        it, run its handler, check the budgets, re-enter.  True if the guest re-entered;
        False leaves what is left of the turn to the loop (it stops, or re-enters the
        ordinary way)."""
        self._record(exit_)
        self._in_place = exit_
        if not self.handle_pending_exit():  # (the handler: KVM's exit-handler call)
            self._verdict = False
            return False
        start, max_instructions, max_exits, exits, deadline = self._budget
        # (The count at the exit: the guest waits while its VMM runs, nothing retires.)
        total = exit_.guest_instructions
        if exits >= max_exits or total - start >= max_instructions:
            return False
        # The wall clock, every 256 exits (leaving the emulator lets run() stop the VM).
        if not exits & 0xFF and deadline is not None and _monotonic() > deadline:
            return False
        if self.pit is not None and self.pit.next_irq() is not None:
            return False   # the PIT counts: run() must stop the guest where IRQ 0 falls due
        rip = self.cpu.vmresume_in_place(exit_)
        if rip is None:
            return False
        self.trace.record_entry("VMRESUME", rip, total)
        return True

    def next_exit(self, max_instructions: int = 10_000_000,
                  max_seconds: float | None = 60.0) -> VmExit | None:
        """Handle the pending exit (if any), run the guest, and stop at the next VM exit
        *before* its handler runs (it waits in :attr:`pending_exit`).  None if the VM stopped
        (HALTED, or BUDGET with a message: the instruction budget, ``max_seconds`` of wall
        clock, a guest past its program ... as in :meth:`run`)."""
        if self.state in self._FINAL:
            return None
        if self.pending_exit is not None:
            if not self.handle_pending_exit():
                return None
        self.state = VmState.RUNNING
        limits = self.guest.limits
        limits.deadline = None if max_seconds is None else _monotonic() + max_seconds
        token = _guest.watch_deadline(limits.deadline)
        try:
            outcome = self._advance_timed(max_instructions)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        except _guest.RunTimeout:  # (see run)
            self._interrupted()
            self.stop(VmState.BUDGET, f"wall-clock cap reached: next_exit took more than max_seconds="
                      f"{max_seconds:g} s and was stopped inside Python code (a device that loops?)")
            return None
        except HandlerError as exc:  # the learner's frames only (see handle_pending_exit)
            raise exc.with_traceback(getattr(exc, "handler_traceback", exc.__traceback__)) from None
        except VtlabError:
            raise
        except Exception as exc:
            raise self._internal_error(exc) from exc
        finally:
            while True:  # (see run)
                try:
                    _guest.unwatch_deadline(token)
                    break
                except _guest.RunTimeout:
                    pass
            limits.deadline = None
        if outcome.status is Status.VM_EXIT:
            return outcome.exit
        if self.state is VmState.RUNNING:
            if outcome.halted:
                self.stop(VmState.HALTED, "the guest executed HLT without exiting (HLT exiting is 0)")
            else:
                self.stop(VmState.BUDGET, outcome.message)
        return None

    def step(self) -> VmxOutcome | None:
        """One step: handle the pending exit if there is one, else run one guest instruction.

        Returns the VMX outcome of the step (a VM exit, or PAUSED after one instruction).
        """
        if self.state in self._FINAL or (self.state is VmState.HALTED and self.pending_exit is None):
            return None
        if self.pending_exit is not None:
            self.handle_pending_exit()
            return self.last_outcome
        self.state = VmState.RUNNING
        try:
            outcome = self._advance(1, step=True)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        except HandlerError as exc:  # the learner's frames only (see handle_pending_exit)
            raise exc.with_traceback(getattr(exc, "handler_traceback", exc.__traceback__)) from None
        except VtlabError:
            raise
        except Exception as exc:
            raise self._internal_error(exc) from exc
        if self.state is VmState.RUNNING and outcome.status is Status.PAUSED:
            if outcome.halted:
                self.stop(VmState.HALTED, "the guest executed HLT without exiting (HLT exiting is 0)")
            elif self.guest.limits.stopped is not None:  # e.g. it stepped past its program
                self.stop(VmState.BUDGET, self.guest.limits.stopped)
            else:
                self.state = VmState.READY
        return outcome

    def _summary(self, exits: int = 0, instructions: int = 0) -> RunSummary:
        self.trace.instructions_total = self.guest.counter.total
        return RunSummary(self.state, exits, instructions, self.message, self.output)

    def summary(self) -> RunSummary:
        """Where the VM stands now (state, message, guest output) without running it."""
        return self._summary()

    def exit_counts(self):
        """Exits per reason so far (pandas Series)."""
        return self.trace.counts()

    def __repr__(self) -> str:
        return (f"<VirtualMachine {self.mode.value} guest, {self.state.value}, {len(self.trace)} exits, "
                f"{self.cpu.operation.value}>")


_RUNNING, _READY = VmState.RUNNING, VmState.READY
_ROOT = VmxOperation.ROOT
#: Blocking by STI and by MOV SS (interruptibility-state bits 0 and 1, SDM 25.4.2).
_SHADOW = int(Interruptibility.BLOCKING_BY_STI | Interruptibility.BLOCKING_BY_MOV_SS)
_INTERRUPTIBILITY = int(F.GUEST_INTERRUPTIBILITY_INFO)
_GUEST_RIP, _EXIT_LENGTH = int(F.GUEST_RIP), int(F.VM_EXIT_INSTRUCTION_LEN)

#: Registers of the trace's state summary (see _state_summary): CR0 and CS give the CPL.
_SUMMARY_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsp", "rflags", "cr0", "cs")


def _handler_name(handler) -> str:
    """How the trace and error messages name a handler (its __name__, else its repr)."""
    try:
        return handler.__name__
    except AttributeError:
        return repr(handler)


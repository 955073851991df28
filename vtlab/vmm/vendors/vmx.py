"""The VT-x side of the two-vendor VMM: the existing :class:`VirtualMachine` (bring-up,
VMCS set-up, VMREAD/VMWRITE), with its CPUID, I/O, MSR, HLT and VMCALL exits decoded
into vendor-neutral records (:func:`vtlab.vmm.exit_record.from_vmx`) and handled by the
handlers both vendors share (:mod:`.common`).

The VT-x specifics: the exit's length is VM_EXIT_INSTRUCTION_LEN (SDM Vol. 3C 28.2.5),
skipping means GUEST_RIP += that length (VMWRITE); injecting means the VM-entry
interruption-information field (SDM 27.6); the virtualization bit to hide is
CPUID.1:ECX.VMX[bit 5]; SYSENTER MSRs live in the VMCS guest-state area.
"""
from __future__ import annotations

from pathlib import Path

from ...arch.cpuid import CPUID_1_ECX_VMX, HOST_CPUID
from ...arch.exit_reasons import ExitReason
from ...cpu.exits import VmExit
from ...cpu.guest import Mode
from ..exit_record import Exit, from_vmx
from ..handlers import GUEST_STATE_MSRS
from ..machine import VirtualMachine
from ..state import RunSummary, VmState
from .common import NEUTRAL_HANDLERS, exit_table

#: The VMX exits the neutral handlers take over (the rest keep VirtualMachine's handlers).
NEUTRAL_REASONS = (ExitReason.CPUID, ExitReason.IO_INSTRUCTION, ExitReason.MSR_READ, ExitReason.MSR_WRITE,
                   ExitReason.HLT, ExitReason.VMCALL, ExitReason.TRIPLE_FAULT)


class VmxVendorVm:
    """A guest under VT-x, driven through the vendor-neutral handlers.

    ``vm`` is the ordinary :class:`VirtualMachine` (its API unchanged: ``vm.vmcs``,
    ``vm.trace``, ``vm.vmread`` ...); :attr:`exits` lists the neutral records.
    """

    vendor = "VMX"

    def __init__(self, program: str | bytes | Path | None = None, mode: Mode | str = "real",
                 load: int | None = None, entry: int | None = None, **kw):
        self.vm = VirtualMachine(program, mode, load, entry, **kw)
        self.regs, self.bus, self.msrs, self.console = self.vm.regs, self.vm.bus, self.vm.msrs, self.vm.console
        self.guest = self.vm.guest
        self.exits: list[Exit] = []
        #: The vendor-neutral handlers this VM uses (replace one to change it for this VM).
        self.handlers = dict(NEUTRAL_HANDLERS)
        for reason in NEUTRAL_REASONS:
            self.vm.handlers[reason] = self._dispatch

    # ------------------------------------------------------- the narrow interface
    def host_cpuid(self, leaf: int) -> tuple[int, int, int, int]:
        return HOST_CPUID.get(leaf, (0, 0, 0, 0))

    def hide_virtualization(self, leaf, regs):
        """No nested VMX here: clear CPUID.1:ECX.VMX (SDM Vol. 3C 24.6)."""
        eax, ebx, ecx, edx = regs
        return (eax, ebx, ecx & ~CPUID_1_ECX_VMX, edx) if leaf == 1 else regs

    def skip(self, exit: Exit) -> None:
        self.vm.skip_instruction()

    def inject_exception(self, vector: int, error_code: int | None = None) -> bool:
        return self.vm.inject_exception(vector, error_code)

    def read_guest_msr(self, msr: int) -> int | None:
        field = GUEST_STATE_MSRS.get(msr)
        return None if field is None else self.vm.vmread(field)

    def write_guest_msr(self, msr: int, value: int) -> bool:
        field = GUEST_STATE_MSRS.get(msr)
        if field is None:
            return False
        self.msrs[msr] = value
        self.vm.vmwrite(field, value)
        return True

    def stop(self, state: VmState, message: str) -> None:
        self.vm.stop(state, message)

    # ------------------------------------------------------------------ running
    def _dispatch(self, vm: VirtualMachine, e: VmExit) -> bool | None:
        ecx = e.registers[2] if e.registers else self.regs.rcx
        x = from_vmx(e, ecx)
        self.exits.append(x)
        return self.handlers[x.kind](self, x)

    def run(self, max_exits: int = 10_000, max_instructions: int = 10_000_000) -> RunSummary:
        return self.vm.run(max_exits=max_exits, max_instructions=max_instructions)

    def exit_table(self):
        """The exits as a pandas DataFrame (the same columns for both vendors)."""
        return exit_table(self.exits)

    @property
    def output(self) -> str:
        return self.vm.output

    @property
    def state(self) -> VmState:
        return self.vm.state

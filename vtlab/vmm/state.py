"""The VMM's vocabulary: where a virtual machine is in its life, what a run did, and the
guest's general registers as the VMM sees them (KVM's ``vcpu->arch.regs``)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..arch.qualifications import GPR_ORDER
from ..cpu.guest import Guest, Mode


class VmState(str, enum.Enum):
    """Where the virtual machine is in its life."""

    READY = "ready"
    RUNNING = "running"
    HALTED = "halted"              #: the guest executed HLT with nothing to wake it
    STOPPED = "stopped"            #: a handler or hypercall asked to stop
    SHUTDOWN = "shutdown"          #: the guest asked to be switched off (hypercall)
    CRASHED = "crashed"            #: triple fault
    ENTRY_FAILED = "entry-failed"  #: VMLAUNCH/VMRESUME failed (VMfail or invalid guest state)
    BUDGET = "budget"              #: instruction or exit budget ran out
    ERROR = "error"                #: a handler raised


@dataclass
class RunSummary:
    """What :meth:`VirtualMachine.run` did."""

    state: VmState
    exits: int
    instructions: int
    message: str
    output: str

    @property
    def ok(self) -> bool:
        return self.state in (VmState.HALTED, VmState.STOPPED, VmState.SHUTDOWN)

    def __str__(self) -> str:
        return (f"{self.state.value}: {self.message} ({self.exits} VM exits, "
                f"{self.instructions:,} guest instructions)")


class Registers:
    """The guest's general registers as the VMM sees them (KVM's ``vcpu->arch.regs``).

    ``vm.regs.rax`` / ``vm.regs["rax"]`` read and write them; the VMCS holds only RIP,
    RSP and RFLAGS, everything else lives in the CPU while the guest is out.
    """

    def __init__(self, guest: Guest):
        object.__setattr__(self, "_guest", guest)

    def __getitem__(self, name: str) -> int:
        return self._guest.reg(name)

    def __setitem__(self, name: str, value: int) -> None:
        self._guest.set_reg(name, value & 0xFFFF_FFFF_FFFF_FFFF)

    __getattr__ = __getitem__

    def __setattr__(self, name: str, value: int) -> None:
        self[name] = value

    def __repr__(self) -> str:
        names = GPR_ORDER if self._guest.mode is Mode.LONG else GPR_ORDER[:8]
        return " ".join(f"{n}={self._guest.reg(n):#x}" for n in names)


"""The VMM's vendor-neutral half: exit handlers written once, for VT-x and AMD-V alike.

Each handler gets a :class:`VendorVm` (the narrow interface both vendors implement:
registers, the device bus, the MSR store, "skip the instruction", "inject an exception",
"stop") and an :class:`~vtlab.vmm.exit_record.Exit`.  These are notebook 04's handlers -
CPUID that hides the virtualization bit and reports a vendor leaf, port I/O to the
device bus (the serial port), MSR reads and writes - in a form that does not know which
processor exited.  What differs by vendor is small and lives beside this file
(:mod:`.vmx`, :mod:`.svm`): bring-up, control block set-up, and exit decoding.
"""
from __future__ import annotations

from typing import Callable, Protocol

from ...arch.cpuid import CPUID_1_ECX_HYPERVISOR, HYPERVISOR_BASE_LEAF, vendor_signature
from ...arch.exceptions import Vector
from ..exit_record import Exit, ExitKind, IoAccess, MsrAccess
from ..handlers import HYPERVISOR_SIGNATURE, KVM_ENOSYS, Hypercall
from ..state import VmState

#: The register IN/OUT move through, by access size (SDM Vol. 2, IN/OUT; APM Vol. 3).
_IO_VALUE_REG = {1: "al", 2: "ax", 4: "eax"}


class VendorVm(Protocol):
    """What a vendor-neutral handler may use (both vendors' machines provide it)."""

    vendor: str
    regs: object       #: :class:`vtlab.vmm.state.Registers`
    bus: object        #: :class:`vtlab.vmm.devices.DeviceBus`
    msrs: dict[int, int]
    console: bytearray

    def host_cpuid(self, leaf: int) -> tuple[int, int, int, int]: ...
    def hide_virtualization(self, leaf: int, regs: tuple[int, int, int, int]) -> tuple[int, int, int, int]: ...
    def skip(self, exit: Exit) -> None: ...
    def inject_exception(self, vector: int, error_code: int | None = None) -> bool: ...
    def read_guest_msr(self, msr: int) -> int | None: ...
    def write_guest_msr(self, msr: int, value: int) -> bool: ...
    def stop(self, state: VmState, message: str) -> None: ...


NeutralHandler = Callable[[VendorVm, Exit], "bool | None"]


def cpuid(vm: VendorVm, x: Exit) -> bool:
    """CPUID: the host's answer with the vendor's virtualization bit hidden (VMX:
    CPUID.1:ECX[5]; SVM: CPUID.8000_0001h:ECX[2]), "hypervisor present" (CPUID.1:ECX[31])
    and the hypervisor leaves at 4000_0000h."""
    leaf = vm.regs.eax & 0xFFFF_FFFF
    if leaf == HYPERVISOR_BASE_LEAF:
        ebx, ecx, edx = vendor_signature(HYPERVISOR_SIGNATURE)
        out = (HYPERVISOR_BASE_LEAF + 1, ebx, ecx, edx)
    elif leaf == HYPERVISOR_BASE_LEAF + 1:
        out = (0, 0, 0, 0)
    else:
        out = vm.hide_virtualization(leaf, vm.host_cpuid(leaf))
        if leaf == 1:
            out = (out[0], out[1], out[2] | CPUID_1_ECX_HYPERVISOR, out[3])
    vm.regs.rax, vm.regs.rbx, vm.regs.rcx, vm.regs.rdx = out
    vm.skip(x)
    return True


def io(vm: VendorVm, x: Exit) -> bool:
    """IN/OUT: one access to the device bus (the serial port, the debug port ...)."""
    p: IoAccess = x.payload
    if p.string:
        vm.stop(VmState.STOPPED, f"INS/OUTS at {x.guest_rip:#x}: the vendor-neutral VMM handles "
                "IN and OUT only (use the VT-x VirtualMachine for string I/O)")
        return False
    reg = _IO_VALUE_REG[p.size]
    if p.is_in:
        vm.regs[reg] = vm.bus.read(p.port, p.size)
    else:
        vm.bus.write(p.port, p.size, vm.regs[reg])
    vm.skip(x)
    return True


def msr(vm: VendorVm, x: Exit) -> bool:
    """RDMSR/WRMSR: guest-state MSRs from the vendor's control block, the rest from the
    VMM's MSR store; #GP(0) for an MSR it does not know."""
    p: MsrAccess = x.payload
    if p.write:
        value = ((vm.regs.rdx & 0xFFFF_FFFF) << 32) | (vm.regs.rax & 0xFFFF_FFFF)
        if not vm.write_guest_msr(p.msr, value):
            if p.msr not in vm.msrs:
                return vm.inject_exception(Vector.GP, 0)
            vm.msrs[p.msr] = value
    else:
        value = vm.read_guest_msr(p.msr)
        if value is None:
            if p.msr not in vm.msrs:
                return vm.inject_exception(Vector.GP, 0)
            value = vm.msrs[p.msr]
        vm.regs.rax, vm.regs.rdx = value & 0xFFFF_FFFF, value >> 32
    vm.skip(x)
    return True


def hlt(vm: VendorVm, x: Exit) -> bool:
    """HLT: nothing will wake the guest - stop the VM."""
    vm.skip(x)
    vm.stop(VmState.HALTED, f"the guest executed HLT at {x.guest_rip:#x}")
    return False


def hypercall(vm: VendorVm, x: Exit) -> bool:
    """VMCALL / VMMCALL: KVM's convention, number in RAX, arguments RBX/RCX, result RAX."""
    vm.skip(x)
    nr = vm.regs.rax & 0xFFFF_FFFF
    if nr == Hypercall.NOP:
        vm.regs.rax = 0
    elif nr == Hypercall.PUTCHAR:
        vm.console.append(vm.regs.rbx & 0xFF)
        vm.regs.rax = 0
    elif nr == Hypercall.SHUTDOWN:
        vm.stop(VmState.SHUTDOWN, "the guest asked to shut down (hypercall SHUTDOWN)")
        return False
    elif nr == Hypercall.ADD:
        vm.regs.rax = (vm.regs.rbx + vm.regs.rcx) & 0xFFFF_FFFF_FFFF_FFFF
    else:
        vm.regs.rax = -KVM_ENOSYS & 0xFFFF_FFFF_FFFF_FFFF
    return True


def exception(vm: VendorVm, x: Exit) -> bool:
    """An intercepted exception: reflect it into the guest."""
    p = x.payload
    return vm.inject_exception(p.vector, p.error_code)


def shutdown(vm: VendorVm, x: Exit) -> bool:
    vm.stop(VmState.CRASHED, f"the guest shut down (triple fault) near RIP {x.guest_rip:#x}")
    return False


#: The neutral handler table, keyed by :class:`ExitKind` (the vendor machines dispatch here).
NEUTRAL_HANDLERS: dict[ExitKind, NeutralHandler] = {
    ExitKind.CPUID: cpuid, ExitKind.IO: io, ExitKind.MSR_READ: msr, ExitKind.MSR_WRITE: msr,
    ExitKind.HLT: hlt, ExitKind.HYPERCALL: hypercall, ExitKind.EXCEPTION: exception,
    ExitKind.SHUTDOWN: shutdown,
}


def exit_table(exits: "list[Exit]"):
    """A pandas DataFrame of exit records: one row per exit, vendor-neutral columns
    (kind, what) next to the vendor's own (exit, code) - the same guest under both
    vendors gives tables whose neutral columns agree row for row."""
    import pandas as pd

    return pd.DataFrame([{"vendor": x.vendor, "kind": x.kind.value, "what": x.summary(), "exit": x.native_name,
                          "code": hex(x.native_code & 0xFFFF_FFFF_FFFF_FFFF), "guest_rip": hex(x.guest_rip),
                          "length": x.length, "instruction": x.instruction} for x in exits],
                        columns=["vendor", "kind", "what", "exit", "code", "guest_rip", "length", "instruction"])

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

import enum
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..arch.controls import EntryControl, ExitControl, PinBased, ProcBased, ProcBased2
from ..arch.cpuid import (CPUID_1_ECX_HYPERVISOR, CPUID_1_ECX_VMX, HOST_CPUID,
                         HYPERVISOR_BASE_LEAF, vendor_signature)
from ..arch.exceptions import InterruptionType, IntrInfo, Vector
from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Cr0, Cr4, Msr
from ..arch.qualifications import GPR_ORDER, CrAccessQualification, CrAccessType, IoDirection, IoQualification
from ..arch.vmcs_fields import VmcsField as F
from .devices import DeviceBus, standard_devices
from ..errors import HandlerError
from ..cpu.exits import VmExit, msr_bitmap_position
from ..cpu.guest import Guest, Mode
from .trace import Trace
from ..cpu.vmcs import INVALID_POINTER, LaunchState
from ..cpu.vmx import Status, VmxCpu, VmxOperation, VmxOutcome

Handler = Callable[["VirtualMachine", VmExit], "bool | None"]

#: Signature the CPUID handler reports at leaf 0x40000000 (like KVM's "KVMKVMKVM").
HYPERVISOR_SIGNATURE = "vtlabvtlabvt"

#: Hypercall numbers (RAX at VMCALL; arguments in RBX, RCX, RDX; result in RAX).
class Hypercall(enum.IntEnum):
    NOP = 0          #: do nothing, return 0 (measures the bare round trip)
    PUTCHAR = 1      #: print the byte in BL on the VMM console
    SHUTDOWN = 2     #: stop the VM
    GET_EXITS = 3    #: return the number of VM exits so far
    ADD = 4          #: return RBX + RCX (a paravirtual "service")


#: KVM's answer to an unknown hypercall: -KVM_ENOSYS (include/uapi/linux/kvm_para.h).
KVM_ENOSYS = 1000

#: Where guest code goes unless told otherwise (the same in every mode).
GUEST_LOAD_DEFAULT = 0x1000


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


# ----------------------------------------------------------------------------- handlers
def handle_cpuid(vm: "VirtualMachine", exit: VmExit) -> bool:
    """CPUID: the host's answer, minus VMX, plus "hypervisor present" and a vendor leaf."""
    leaf = vm.guest.reg("eax") & 0xFFFF_FFFF
    if leaf == HYPERVISOR_BASE_LEAF:
        ebx, ecx, edx = vendor_signature(HYPERVISOR_SIGNATURE)
        eax = HYPERVISOR_BASE_LEAF + 1
    elif leaf == HYPERVISOR_BASE_LEAF + 1:
        eax = ebx = ecx = edx = 0  # no paravirtual features advertised
    else:
        eax, ebx, ecx, edx = HOST_CPUID.get(leaf, (0, 0, 0, 0))
        if leaf == 1:
            ecx = (ecx & ~CPUID_1_ECX_VMX) | CPUID_1_ECX_HYPERVISOR  # no nested VMX here
    # vm.regs.rax, .rbx, .rcx, .rdx = ... in one call into the CPU (CPUID is the most
    # frequent exit of all)
    vm.guest.write_registers(_CPUID_OUTPUTS, (eax, ebx, ecx, edx))
    vm.skip_instruction()
    return True


_CPUID_OUTPUTS = ("rax", "rbx", "rcx", "rdx")


#: The register IN/OUT move through, by access size (SDM Vol. 2, IN/OUT).
_IO_VALUE_REG = {1: "al", 2: "ax", 4: "eax"}


def handle_io(vm: "VirtualMachine", exit: VmExit) -> bool:
    """IN/OUT/INS/OUTS: decode the qualification and talk to the device bus."""
    q = IoQualification.decode(exit.qualification)
    device = vm.bus.device_at(q.port)
    exit.device = device.location if device else None
    if q.string:
        count = vm.regs.rcx if q.rep else 1
        mask = 0xFFFF if vm.guest.bits == 16 else 0xFFFF_FFFF_FFFF_FFFF
        step = -q.size if vm.regs.rflags & (1 << 10) else q.size   # RFLAGS.DF: downwards
        if q.direction is IoDirection.OUT:
            # OUTS reads DS:RSI unless a segment prefix overrides DS; the exit's guest-linear
            # address (SDM 28.2.1) already has the right segment base in it.
            start = vm.regs.rsi & mask
            base = (exit.guest_linear_address - start if exit.guest_linear_address is not None
                    else vm.guest.segment("ds").base)
        for _ in range(count & mask):
            if q.direction is IoDirection.OUT:
                src = vm.regs.rsi & mask
                value = int.from_bytes(vm.guest.read(base + src, q.size), "little")
                vm.bus.write(q.port, q.size, value)
                vm.regs.rsi = (src + step) & mask
            else:  # INS always writes ES:RDI (no override possible)
                dst = vm.regs.rdi & mask
                value = vm.bus.read(q.port, q.size)
                vm.guest.write(vm.guest.segment("es").base + dst, value.to_bytes(q.size, "little"))
                vm.regs.rdi = (dst + step) & mask
        if q.rep:
            vm.regs.rcx = 0
    elif q.direction is IoDirection.IN:
        vm.regs[_IO_VALUE_REG[q.size]] = vm.bus.read(q.port, q.size)
    else:
        vm.bus.write(q.port, q.size, vm.regs[_IO_VALUE_REG[q.size]])
    vm.skip_instruction()
    return True


#: MSRs whose guest value lives in the VMCS guest-state area and that every VM entry loads
#: (SDM 27.3.2.1), so a read that the MSR bitmap lets through sees the VMCS value.  (PAT,
#: EFER and DEBUGCTL are loaded only under their VM-entry controls.)
GUEST_STATE_MSRS: dict[int, F] = {
    Msr.IA32_SYSENTER_CS: F.GUEST_SYSENTER_CS, Msr.IA32_SYSENTER_ESP: F.GUEST_SYSENTER_ESP,
    Msr.IA32_SYSENTER_EIP: F.GUEST_SYSENTER_EIP,
}


def handle_msr_read(vm: "VirtualMachine", exit: VmExit) -> bool:
    """RDMSR: guest-state MSRs from the VMCS, others from the VMM's MSR store (#GP if unknown)."""
    msr = vm.regs.ecx & 0xFFFF_FFFF
    if msr in GUEST_STATE_MSRS:
        value = vm.vmread(GUEST_STATE_MSRS[msr])
    elif msr in vm.msrs:
        value = vm.msrs[msr]
    else:
        return vm.inject_exception(Vector.GP, 0)
    vm.regs.rax, vm.regs.rdx = value & 0xFFFF_FFFF, value >> 32
    vm.skip_instruction()
    return True


def handle_msr_write(vm: "VirtualMachine", exit: VmExit) -> bool:
    """WRMSR: store EDX:EAX (in the VMCS too for guest-state MSRs); #GP for unknown MSRs."""
    msr = vm.regs.ecx & 0xFFFF_FFFF
    if msr not in vm.msrs and msr not in GUEST_STATE_MSRS:
        return vm.inject_exception(Vector.GP, 0)
    value = ((vm.regs.rdx & 0xFFFF_FFFF) << 32) | (vm.regs.rax & 0xFFFF_FFFF)
    vm.msrs[msr] = value
    if msr in GUEST_STATE_MSRS:  # VM entry loads it, so pass-through reads see it too
        vm.vmwrite(GUEST_STATE_MSRS[msr], value)
    vm.skip_instruction()
    return True


def _gpr_name(vm: "VirtualMachine", gpr: int) -> str:
    """The name of general register number ``gpr`` (SDM order, as exit qualifications give
    it) on the guest's engine: RAX ... R15 in long mode, EAX ... EDI otherwise."""
    if vm.guest.mode is Mode.LONG or gpr >= 8:
        return GPR_ORDER[gpr]
    return "e" + GPR_ORDER[gpr][1:]


def handle_cr_access(vm: "VirtualMachine", exit: VmExit) -> bool:
    """MOV to/from CR0/CR3/CR4/CR8, CLTS and LMSW (qualification per SDM Table 28-3)."""
    q = CrAccessQualification.decode(exit.qualification)
    reg = _gpr_name(vm, q.gpr)
    if q.access_type is CrAccessType.MOV_TO_CR:
        value = vm.regs[reg]
        if q.cr == 0:
            vm.set_guest_cr0(value)
        elif q.cr == 4:
            vm.set_guest_cr4(value)
        elif q.cr == 3:
            vm.vmwrite(F.GUEST_CR3, value)
        elif q.cr == 8:
            vm.tpr = value & 0xF
    elif q.access_type is CrAccessType.MOV_FROM_CR:
        vm.regs[reg] = vm.vmread(F.GUEST_CR3) if q.cr == 3 else vm.tpr if q.cr == 8 else 0
    elif q.access_type is CrAccessType.CLTS:
        vm.set_guest_cr0(vm.vmread(F.CR0_READ_SHADOW) & ~Cr0.TS)
    else:  # LMSW can set PE but never clear it
        shadow = vm.vmread(F.CR0_READ_SHADOW)
        vm.set_guest_cr0((shadow & ~0xE) | (q.lmsw_source & 0xF) | (shadow & 1))
    vm.skip_instruction()
    return True


def handle_dr_access(vm: "VirtualMachine", exit: VmExit) -> bool:
    """MOV DR: carry out the move on the guest's debug registers."""
    dr, from_dr, gpr = exit.qualification & 7, bool(exit.qualification >> 4 & 1), (exit.qualification >> 8) & 0xF
    reg = _gpr_name(vm, gpr)
    if from_dr:
        vm.regs[reg] = vm.guest.reg(f"dr{dr}")
    else:
        vm.guest.set_reg(f"dr{dr}", vm.regs[reg])
    vm.skip_instruction()
    return True


def handle_hlt(vm: "VirtualMachine", exit: VmExit) -> bool:
    """HLT: the vCPU would sleep until an interrupt; with nothing to wake it, stop here."""
    vm.skip_instruction()
    if vm.timer_period and vm.vmread(F.GUEST_RFLAGS) & (1 << 9):
        return True  # IF = 1: the timer's next interrupt wakes the guest
    vm.stop(VmState.HALTED, f"the guest executed HLT at {exit.guest_rip:#x}")
    return False


def handle_vmcall(vm: "VirtualMachine", exit: VmExit) -> bool:
    """VMCALL: a hypercall; number in RAX, arguments in RBX/RCX/RDX, result in RAX."""
    vm.skip_instruction()
    nr = vm.regs.rax & 0xFFFF_FFFF
    call = vm.hypercalls.get(nr)
    if call is None:
        vm.regs.rax = -KVM_ENOSYS & 0xFFFF_FFFF_FFFF_FFFF
        return True
    result = call(vm)
    if result is False:
        return False
    vm.regs.rax = 0 if result in (None, True) else int(result)
    return True


def handle_triple_fault(vm: "VirtualMachine", exit: VmExit) -> bool:
    """Triple fault: the guest is beyond saving; KVM reports a shutdown and so do we."""
    vm.stop(VmState.CRASHED, f"triple fault near RIP {exit.guest_rip:#x}: {exit.note}".rstrip(": "))
    return False


def handle_exception(vm: "VirtualMachine", exit: VmExit) -> bool:
    """An exception the exception bitmap intercepted: reflect it back into the guest."""
    info = IntrInfo.decode(exit.intr_info)
    if info.type is InterruptionType.NMI:
        return True
    if info.type is InterruptionType.SOFTWARE_EXCEPTION:
        vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, exit.instruction_length)
    if info.vector == Vector.PF and info.type is InterruptionType.HARDWARE_EXCEPTION:
        # Neither the #PF exit nor the injection loads CR2 (SDM 28.1, 27.6.1): the VMM
        # sets it from the exit qualification, the faulting linear address (as KVM does).
        vm.guest.set_reg("cr2", exit.qualification)
    return vm.inject_exception(info.vector, exit.intr_error_code, kind=info.type)


def handle_external_interrupt(vm: "VirtualMachine", exit: VmExit) -> bool:
    """External interrupt: the host takes it (it was for the host); then resume the guest."""
    vm.host_interrupts += 1
    return True


def handle_ept_violation(vm: "VirtualMachine", exit: VmExit) -> bool:
    """EPT violation: map the page if it is guest RAM the VMM held back; else stop (no device there)."""
    gpa = exit.guest_physical_address or 0
    if gpa < vm.guest.memory_size:
        vm.ept_map(gpa & ~0xFFF, 0x1000)
        return True
    vm.stop(VmState.STOPPED, f"guest touched guest-physical {gpa:#x}: no RAM or device there")
    return False


def handle_rdtsc(vm: "VirtualMachine", exit: VmExit) -> bool:
    """RDTSC/RDTSCP: the guest's virtual TSC (instructions retired) + the VMM's TSC offset."""
    tsc = vm.guest.read_tsc() + vm.tsc_offset
    vm.regs.rax, vm.regs.rdx = tsc & 0xFFFF_FFFF, tsc >> 32
    if exit.reason is ExitReason.RDTSCP:
        vm.regs.rcx = vm.msrs.get(Msr.IA32_TSC_AUX, 0) & 0xFFFF_FFFF
    vm.skip_instruction()
    return True


def handle_nop(vm: "VirtualMachine", exit: VmExit) -> bool:
    """Instructions with nothing to emulate here (PAUSE, INVLPG, WBINVD, INVD, MWAIT, XSETBV ...)."""
    vm.skip_instruction()
    return True


def handle_ud(vm: "VirtualMachine", exit: VmExit) -> bool:
    """VMX instructions and GETSEC in the guest: no nested VMX/SMX here, so #UD (as KVM does)."""
    return vm.inject_exception(Vector.UD)


def handle_descriptor_table(vm: "VirtualMachine", exit: VmExit) -> bool:
    """SGDT/SIDT/LGDT/LIDT and SLDT/STR/LLDT/LTR under descriptor-table exiting: emulate them.

    What to do comes from the exit's decoded instruction - its kind, its memory
    operand's linear address, its register operand - the facts a real VMM reads from
    the exit qualification and the instruction-information field (SDM 28.2.1, 28.2.5).
    """
    from ..cpu.decoder import InsnKind as K, decode_instruction

    d = exit.decoded_insn
    if d is None:  # (an exit recorded without its instruction: decode it where RIP points)
        at = vm.guest.linear_rip()
        d = decode_instruction(vm.guest.read(at, 15), at, vm.guest.bits)
    kind = d.kind
    ea = d.linear_address(vm.guest) if d.memory is not None else None
    wide = d.code_size == 64
    if kind in (K.SGDT, K.SIDT):
        base, limit = (vm.vmread(F.GUEST_GDTR_BASE), vm.vmread(F.GUEST_GDTR_LIMIT)) if kind is K.SGDT else \
                      (vm.vmread(F.GUEST_IDTR_BASE), vm.vmread(F.GUEST_IDTR_LIMIT))
        vm.guest.write(ea, struct.pack("<HQ" if wide else "<HI", limit, base if wide else base & 0xFFFF_FFFF))
    elif kind in (K.LGDT, K.LIDT):
        raw = vm.guest.read(ea, 10 if wide else 6)
        limit, base = struct.unpack("<HQ" if wide else "<HI", raw)
        prefix = "GUEST_GDTR" if kind is K.LGDT else "GUEST_IDTR"
        vm.vmwrite(F[prefix + "_BASE"], base)
        vm.vmwrite(F[prefix + "_LIMIT"], limit)
    elif kind in (K.SLDT, K.STR):
        sel = vm.vmread(F.GUEST_LDTR_SELECTOR if kind is K.SLDT else F.GUEST_TR_SELECTOR)
        if ea is not None:
            vm.guest.write(ea, struct.pack("<H", sel))
        else:
            vm.regs[d.registers[0].name] = sel
    else:  # LLDT / LTR: load the selector through the guest's GDT
        sel = vm.regs[d.registers[0].name] if ea is None else struct.unpack("<H", vm.guest.read(ea, 2))[0]
        vm.guest.set_system_segment("ldtr" if kind is K.LLDT else "tr", sel, 0, 0,
                                    0x82 if kind is K.LLDT else 0x8B)
    vm.skip_instruction()
    return True


def handle_monitor_trap(vm: "VirtualMachine", exit: VmExit) -> bool:
    """Monitor trap flag: one instruction done; nothing to do but resume."""
    return True


#: The exit-handler table (compare ``kvm_vmx_exit_handlers[]`` in Linux's vmx.c).
HANDLERS: dict[ExitReason, Handler] = {
    ExitReason.EXCEPTION_NMI: handle_exception,
    ExitReason.EXTERNAL_INTERRUPT: handle_external_interrupt,
    ExitReason.TRIPLE_FAULT: handle_triple_fault,
    ExitReason.CPUID: handle_cpuid,
    ExitReason.GETSEC: handle_ud,
    ExitReason.HLT: handle_hlt,
    ExitReason.INVD: handle_nop,
    ExitReason.INVLPG: handle_nop,
    ExitReason.RDPMC: handle_rdtsc,
    ExitReason.RDTSC: handle_rdtsc,
    ExitReason.RDTSCP: handle_rdtsc,
    ExitReason.VMCALL: handle_vmcall,
    ExitReason.VMCLEAR: handle_ud, ExitReason.VMLAUNCH: handle_ud, ExitReason.VMPTRLD: handle_ud,
    ExitReason.VMPTRST: handle_ud, ExitReason.VMREAD: handle_ud, ExitReason.VMRESUME: handle_ud,
    ExitReason.VMWRITE: handle_ud, ExitReason.VMOFF: handle_ud, ExitReason.VMON: handle_ud,
    ExitReason.INVEPT: handle_ud, ExitReason.INVVPID: handle_ud,
    ExitReason.CR_ACCESS: handle_cr_access,
    ExitReason.DR_ACCESS: handle_dr_access,
    ExitReason.IO_INSTRUCTION: handle_io,
    ExitReason.MSR_READ: handle_msr_read,
    ExitReason.MSR_WRITE: handle_msr_write,
    ExitReason.MWAIT_INSTRUCTION: handle_nop,
    ExitReason.MONITOR_TRAP_FLAG: handle_monitor_trap,
    ExitReason.MONITOR_INSTRUCTION: handle_nop,
    ExitReason.PAUSE_INSTRUCTION: handle_nop,
    ExitReason.GDTR_IDTR: handle_descriptor_table,
    ExitReason.LDTR_TR: handle_descriptor_table,
    ExitReason.EPT_VIOLATION: handle_ept_violation,
    ExitReason.WBINVD: handle_nop,
    ExitReason.XSETBV: handle_nop,
    ExitReason.RDRAND: handle_nop,
    ExitReason.RDSEED: handle_nop,
}


def _hc_putchar(vm: "VirtualMachine"):
    vm.console.append(vm.regs.rbx & 0xFF)


def _hc_shutdown(vm: "VirtualMachine"):
    vm.stop(VmState.SHUTDOWN, "the guest asked to shut down (hypercall SHUTDOWN)")
    return False


HYPERCALLS: dict[int, Callable[["VirtualMachine"], object]] = {
    Hypercall.NOP: lambda vm: 0,
    Hypercall.PUTCHAR: _hc_putchar,
    Hypercall.SHUTDOWN: _hc_shutdown,
    Hypercall.GET_EXITS: lambda vm: len(vm.trace),
    Hypercall.ADD: lambda vm: (vm.regs.rbx + vm.regs.rcx) & 0xFFFF_FFFF_FFFF_FFFF,
}


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
                 devices: DeviceBus | None = None):
        self.mode = Mode(mode)
        self.guest = Guest(self.mode, memory_size)
        self.cpu = VmxCpu(self.guest)
        self.regs = Registers(self.guest)
        self.bus = devices or standard_devices()
        self.guest.io_read, self.guest.io_write = self.bus.read, self.bus.write
        self.handlers: dict[ExitReason, Handler] = dict(HANDLERS)
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
        self.last_exit: VmExit | None = None
        self.last_outcome: VmxOutcome | None = None
        #: An exit that happened but whose handler has not run yet (see next_exit / step).
        self.pending_exit: VmExit | None = None
        self._pending_event = None
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
        """What a VMM does before the first VMLAUNCH (SDM 24.7, 24.11.5)."""
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
        self.ept_root = cpu.memory.alloc()
        pin, proc, proc2, exit_ctl, entry_ctl = DEFAULT_CONTROLS
        if self.mode is Mode.LONG:
            entry_ctl |= EntryControl.IA32E_MODE
        for cls, value in ((PinBased, pin), (ProcBased, proc), (ProcBased2, proc2),
                           (ExitControl, exit_ctl), (EntryControl, entry_ctl)):
            self.vmwrite(_CONTROL_FIELD[cls], caps.adjust(cls, value))
        self.vmwrite(F.IO_BITMAP_A, self.io_bitmap_a)
        self.vmwrite(F.IO_BITMAP_B, self.io_bitmap_b)
        self.vmwrite(F.MSR_BITMAP, self.msr_bitmap)
        self.vmwrite(F.EPT_POINTER, self.ept_root | (3 << 3) | 6)   # WB, 4-level walk
        self.vmwrite(F.VIRTUAL_PROCESSOR_ID, 1)
        self.vmwrite(F.VMCS_LINK_POINTER, INVALID_POINTER)
        self.vmwrite(F.EXCEPTION_BITMAP, 0)
        # Host state: the VMM's own context, restored on every exit (SDM 24.5).
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
        self.cpu.exit_listeners.append(self._on_exit)

    # ----------------------------------------------------------- VMCS access
    def vmread(self, field: F | int | str) -> int:
        """VMREAD from the current VMCS; raises :class:`VmxFailure` / :class:`VmcsError` on VMfail."""
        return self.cpu.vmcs_read(field)

    def vmwrite(self, field: F | int | str, value: int) -> None:
        """VMWRITE to the current VMCS; raises :class:`VmxFailure` / :class:`VmcsError` on VMfail."""
        self.cpu.vmcs_write(field, value)

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
        """Grant read(1)/write(2)/execute(4) on guest-physical pages (the EPT's view)."""
        self.cpu.set_ept_permissions(gpa, size, perms)

    def ept_unmap(self, gpa: int, size: int) -> None:
        """Remove guest-physical pages from the EPT: the next access is an EPT violation."""
        self.ept_map(gpa, size, 0)

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
        """Advance GUEST_RIP past the exiting instruction (VM_EXIT_INSTRUCTION_LEN bytes)."""
        cpu = self.cpu
        cpu.vmcs_write(F.GUEST_RIP, cpu.vmcs_read(F.GUEST_RIP) + cpu.vmcs_read(F.VM_EXIT_INSTRUCTION_LEN))

    def inject_exception(self, vector: int, error_code: int | None = None,
                         kind: InterruptionType = InterruptionType.HARDWARE_EXCEPTION) -> bool:
        """Queue an exception for delivery at the next VM entry (SDM 27.6 event injection)."""
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
        self.last_exit = exit_

    def _state_summary(self) -> tuple:
        """Registers for the trace, kept raw; :func:`vtlab.trace.format_state` prints them."""
        rax, rbx, rcx, rdx, rsp, rflags, cr0, cs = self.guest.read_registers(_SUMMARY_REGISTERS)
        return (rax, rbx, rcx, rdx, rsp, rflags, Guest.cpl_of(cr0, cs))

    def _record(self, exit_: VmExit):
        """Put a fresh exit in the trace; it waits in :attr:`pending_exit` for its handler."""
        event = self.trace.record_exit(exit_, _handler_name(self.handlers.get(exit_.reason, _unhandled)),
                                       self._state_summary())
        self.pending_exit, self._pending_event = exit_, event
        return event

    def handle_pending_exit(self) -> bool:
        """Run the handler of the exit waiting in :attr:`pending_exit`; True if the guest may resume."""
        exit_, event = self.pending_exit, self._pending_event
        if exit_ is None:
            return self.state in (VmState.RUNNING, VmState.READY)
        self.pending_exit = None
        handler = self.handlers.get(exit_.reason, _unhandled)
        if self.state is VmState.READY:
            self.state = VmState.RUNNING
        try:
            result = handler(self, exit_)
        except Exception as exc:  # the learner's handler: stop cleanly, keep everything
            name = _handler_name(handler)
            self.stop(VmState.ERROR, f"exit handler {name} raised {type(exc).__name__}: {exc}")
            if event is not None:
                event.note = self.message
            raise HandlerError(
                f"VM exit #{event.seq if event else '?'} ({exit_.reason.name}, reason {int(exit_.reason)}) "
                f"at guest RIP {exit_.guest_rip:#x} '{exit_.instruction}': handler {name} raised "
                f"{type(exc).__name__}: {exc}. The VM is stopped; vm.trace, vm.vmcs and vm.regs "
                "show where it was.") from exc
        if event is not None:
            event.device = exit_.device
        return result is not False and self.state is VmState.RUNNING

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
            self._record(outcome.exit)
        elif outcome.status is Status.ENTRY_FAILED:
            self.trace.record_exit(outcome.exit, "(VM-entry failure)")
            self.stop(VmState.ENTRY_FAILED, f"{outcome.instruction} failed: VM-entry failure, exit "
                      f"reason 33 (INVALID_STATE) | bit 31: {outcome.message}")
        elif outcome.status in (Status.VMFAIL_VALID, Status.VMFAIL_INVALID, Status.FAULT):
            self.stop(VmState.ENTRY_FAILED, str(outcome))
        return outcome

    _FINAL = (VmState.CRASHED, VmState.ERROR, VmState.ENTRY_FAILED, VmState.SHUTDOWN)

    def run(self, max_exits: int = 10_000, max_instructions: int = 10_000_000) -> RunSummary:
        """Run the guest until it halts or stops, handling every VM exit.

        Ends with state BUDGET (and a message saying which budget) if the guest runs
        ``max_instructions`` instructions or causes ``max_exits`` exits first.
        """
        if self.state in self._FINAL:
            return self._summary()
        self.state, self.message = VmState.RUNNING, ""
        g = self.guest
        start_insns, exits = g.counter.total, 0
        next_tick = g.counter.total + self.timer_period if self.timer_period else None
        while True:
            if self.pending_exit is not None and not self.handle_pending_exit():
                break
            used = g.counter.total - start_insns
            if used >= max_instructions:
                self.stop(VmState.BUDGET, f"instruction budget exhausted: the guest ran {used:,} "
                          f"instructions (max_instructions={max_instructions:,}) - a runaway loop?")
                break
            if exits >= max_exits:
                self.stop(VmState.BUDGET, f"exit budget exhausted: {exits:,} VM exits (max_exits={max_exits:,})")
                break
            budget = max_instructions - used
            if next_tick is not None:
                budget = max(1, min(budget, next_tick - g.counter.total))
            outcome = self._advance(budget)
            if outcome.status is Status.VM_EXIT:
                exits += 1
                continue
            if self.state is not VmState.RUNNING:
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
        return self._summary(exits, g.counter.total - start_insns)

    def next_exit(self, max_instructions: int = 10_000_000) -> VmExit | None:
        """Handle the pending exit (if any), run the guest, and stop at the next VM exit
        *before* its handler runs (it waits in :attr:`pending_exit`).  None if the VM stopped."""
        if self.state in self._FINAL:
            return None
        if self.pending_exit is not None:
            if not self.handle_pending_exit():
                return None
        self.state = VmState.RUNNING
        outcome = self._advance(max_instructions)
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
        outcome = self._advance(1, step=True)
        if self.state is VmState.RUNNING and outcome.status is Status.PAUSED:
            if outcome.halted:
                self.stop(VmState.HALTED, "the guest executed HLT without exiting (HLT exiting is 0)")
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


#: Registers of the trace's state summary (see _state_summary): CR0 and CS give the CPL.
_SUMMARY_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsp", "rflags", "cr0", "cs")


def _handler_name(handler) -> str:
    """How the trace and error messages name a handler (its __name__, else its repr)."""
    try:
        return handler.__name__
    except AttributeError:
        return repr(handler)


def _unhandled(vm: VirtualMachine, exit: VmExit) -> bool:
    vm.stop(VmState.STOPPED, f"no handler for exit reason {exit.reason.name} ({int(exit.reason)})")
    return False

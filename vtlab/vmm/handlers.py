"""The exit-handler table: one small function per exit reason, named after what it handles.

The shape follows Linux KVM (``arch/x86/kvm/vmx/vmx.c``, ``kvm_vmx_exit_handlers[]``): a
handler gets the VM and the :class:`vtlab.cpu.vmexit.VmExit`, does the work (emulates the
instruction, talks to a device), advances the guest RIP past the instruction when it
emulated it (``vm.skip_instruction()``, like ``kvm_skip_emulated_instruction``), and
returns ``True``/``None`` to resume the guest or ``False`` to stop the VM.  Hypercalls
(VMCALL with a number in RAX) have a table of their own.
"""
from __future__ import annotations

import enum
import struct
from typing import TYPE_CHECKING, Callable

from ..arch.cpuid import (CPUID_1_ECX_HYPERVISOR, CPUID_1_ECX_OSXSAVE, CPUID_1_ECX_VMX, HOST_CPUID,
                         HYPERVISOR_BASE_LEAF, vendor_signature)
from ..arch.controls import ProcBased
from ..arch.exceptions import InterruptionType, IntrInfo, Vector
from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Cr0, Cr4, Msr, Rflags
from ..arch.qualifications import (GPR_ORDER, CrAccessQualification, CrAccessType, IoDirection, IoQualification,
                                   TaskSwitchQualification, TaskSwitchSource)
from ..arch.vmcs_fields import VmcsField as F
from ..cpu.exits import VmExit
from ..cpu.guest import Mode
from ..cpu.memory import UnmappedMemoryError
from .state import VmState
from . import irq as _irq

if TYPE_CHECKING:
    from .machine import VirtualMachine

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


# ----------------------------------------------------------------------------- handlers
def handle_cpuid(vm: "VirtualMachine", exit: VmExit) -> bool:
    """CPUID: the host's answer, minus VMX, plus "hypervisor present" and a vendor leaf."""
    g = vm.guest
    # EAX (the leaf) and CR4 (for leaf 1's OSXSAVE bit, below) in one call into the CPU:
    # a second call would cost as much as the whole batch (CPUID is the most frequent exit).
    leaf, cr4 = g.read_registers(_CPUID_INPUTS)
    leaf &= 0xFFFF_FFFF
    if leaf == HYPERVISOR_BASE_LEAF:
        ebx, ecx, edx = vendor_signature(HYPERVISOR_SIGNATURE)
        eax = HYPERVISOR_BASE_LEAF + 1
    elif leaf == HYPERVISOR_BASE_LEAF + 1:
        eax = ebx = ecx = edx = 0  # no paravirtual features advertised
    else:
        eax, ebx, ecx, edx = HOST_CPUID.get(leaf, (0, 0, 0, 0))
        if leaf == 1:
            ecx = (ecx & ~CPUID_1_ECX_VMX) | CPUID_1_ECX_HYPERVISOR  # no nested VMX here
            # OSXSAVE reports the CR4.OSXSAVE the guest sees (through the CR4 read shadow
            # for the bits the VMM owns, SDM Vol. 3C 25.6.6), as KVM's CPUID does.
            # (The processor's fast VMREAD: both fields always exist.  Only the one bit
            # matters: the CPU's CR4, read above, unless the VMM owns it.)
            cpu = vm.cpu
            if cpu.vmcs_read(_CR4_MASK) & _CR4_OSXSAVE:
                cr4 = cpu.vmcs_read(_CR4_SHADOW)   # the VMM owns the bit: the guest reads the shadow
            if cr4 & _CR4_OSXSAVE:
                ecx |= CPUID_1_ECX_OSXSAVE
    # vm.regs.rax, .rbx, .rcx, .rdx = ... in one call into the CPU (CPUID is the most
    # frequent exit of all).  (Not with the new RIP in the same batch: Unicorn 2.1's
    # uc_reg_write_batch sets the PC without ending the translation block, so the guest
    # would run on at the old RIP; only uc_reg_write does, for the entry's RIP load.)
    g.write_registers(_CPUID_OUTPUTS, (eax, ebx, ecx, edx))
    vm.skip_instruction()
    return True


_CPUID_INPUTS = ("eax", "cr4")
_CPUID_OUTPUTS = ("rax", "rbx", "rcx", "rdx")
_CR4_MASK, _CR4_SHADOW = int(F.CR4_GUEST_HOST_MASK), int(F.CR4_READ_SHADOW)
_CR4_OSXSAVE = int(Cr4.OSXSAVE)


#: The register IN/OUT move through, by access size (SDM Vol. 2, IN/OUT).
_IO_VALUE_REG = {1: "al", 2: "ax", 4: "eax"}


def handle_io(vm: "VirtualMachine", exit: VmExit) -> bool:
    """IN/OUT/INS/OUTS: decode the qualification and talk to the device bus."""
    q = IoQualification.decode(exit.qualification)
    device = vm.bus.device_at(q.port)
    exit.device = device.location if device else None
    if q.string:
        return _string_io(vm, exit, q)
    if q.direction is IoDirection.IN:
        vm.regs[_IO_VALUE_REG[q.size]] = vm.bus.read(q.port, q.size)
    else:
        vm.bus.write(q.port, q.size, vm.regs[_IO_VALUE_REG[q.size]])
        if device is not None and vm.pic is not None and device in vm.pic.devices:
            _irq.inject_pending_irq(vm)   # an EOI or a new mask may let a request through
    vm.skip_instruction()
    return True


def _string_io(vm: "VirtualMachine", exit: VmExit, q: IoQualification) -> bool:
    """INS/OUTS (with REP: RCX iterations), one element at a time as the CPU does it.

    RSI/RDI and RCX move after every element (SDM Vol. 2, INS/OUTS and REP), so a guest
    that points the string at memory where there is no RAM stops the VM with RSI/RDI and
    RCX naming the element that could not be moved."""
    mask = 0xFFFF if vm.guest.bits == 16 else 0xFFFF_FFFF_FFFF_FFFF
    count = vm.regs.rcx & mask if q.rep else 1
    step = -q.size if vm.regs.rflags & Rflags.DF else q.size   # RFLAGS.DF: downwards
    if q.direction is IoDirection.OUT:
        # OUTS reads DS:RSI unless a segment prefix overrides DS; the exit's guest-linear
        # address (SDM 28.2.1) already has the right segment base in it.
        index = "rsi"
        start = vm.regs.rsi & mask
        base = (exit.guest_linear_address - start if exit.guest_linear_address is not None
                else vm.guest.segment("ds").base)
    else:  # INS always writes ES:RDI (no override possible)
        index, base = "rdi", vm.guest.segment("es").base
    for done in range(count):
        offset = vm.regs[index] & mask
        address = base + offset
        try:
            if q.direction is IoDirection.OUT:
                value = int.from_bytes(vm.guest.read(address, q.size), "little")
                vm.bus.write(q.port, q.size, value)
            else:
                value = vm.bus.read(q.port, q.size)
                vm.guest.write(address, value.to_bytes(q.size, "little"))
        except UnmappedMemoryError:
            if q.rep:
                vm.regs.rcx = count - done
            what = "OUTS read from" if q.direction is IoDirection.OUT else "INS wrote to"
            vm.stop(VmState.STOPPED, f"{what} guest address {address:#x} (port {q.port:#x}, "
                    f"element {done + 1} of {count}): no RAM or device there")
            return False
        vm.regs[index] = (offset + step) & mask
    if q.rep:
        vm.regs.rcx = 0
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
    """MOV DR: carry out the move on the guest's debug registers.

    A MOV-DR exit comes *before* the instruction's own #GP (CPL > 0) and #UD (DR4/DR5
    with CR4.DE = 1) checks (SDM 26.1.3), so the VMM makes them, as KVM's
    ``kvm_require_cpl()`` / ``kvm_require_dr()`` do, and injects the fault.
    """
    dr, from_dr, gpr = exit.qualification & 7, bool(exit.qualification >> 4 & 1), (exit.qualification >> 8) & 0xF
    if exit.cpl > 0:
        return vm.inject_exception(Vector.GP, 0)
    if dr in (4, 5) and vm.guest.reg("cr4") & Cr4.DE:
        return vm.inject_exception(Vector.UD)
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
    if vm.vmread(F.GUEST_RFLAGS) & Rflags.IF:
        if vm.timer_period:
            return True  # IF = 1: the timer's next interrupt wakes the guest
        if _irq.sleep_until_timer(vm):
            return True  # the vCPU slept until the PIT's IRQ 0, which wakes it
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
    if info.type in (InterruptionType.SOFTWARE_EXCEPTION, InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION):
        # INT3/INTO (type 6) and INT1 (type 5): injection pushes RIP + this length (SDM 27.6.1.1)
        vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, exit.instruction_length)
    if info.vector == Vector.PF and info.type is InterruptionType.HARDWARE_EXCEPTION:
        # Neither the #PF exit nor the injection loads CR2 (SDM 28.1, 27.6.1): the VMM
        # sets it from the exit qualification, the faulting linear address (as KVM does).
        vm.guest.set_reg("cr2", exit.qualification)
    return vm.inject_exception(info.vector, exit.intr_error_code, kind=info.type)


def handle_external_interrupt(vm: "VirtualMachine", exit: VmExit) -> bool:
    """External interrupt: the host takes it (it was for the host); then resume the guest.

    With "acknowledge interrupt on exit" the exit names the vector (VM-exit
    interruption-information, SDM 28.2.2).  The host's timer tick also runs the virtual
    PIT: its IRQ 0 goes to the virtual PIC, and the guest gets it now if it can take it,
    else through the interrupt window (:func:`vtlab.vmm.irq.inject_pending_irq`)."""
    vm.host_interrupts += 1
    info = IntrInfo.decode(exit.intr_info)
    if not info.valid or info.vector == _irq.HOST_TIMER_VECTOR:
        _irq.timer_tick(vm)
    _irq.inject_pending_irq(vm)
    return True


def handle_interrupt_window(vm: "VirtualMachine", exit: VmExit) -> bool:
    """Interrupt window (reason 7): the guest can take an interrupt now (RFLAGS.IF = 1, no
    blocking by STI or MOV SS, SDM 26.2): close the window and inject what the PIC holds -
    as KVM does on this exit - or leave it closed if nothing is pending any more."""
    vm.set_control(ProcBased.INTR_WINDOW_EXITING, False)
    _irq.inject_pending_irq(vm)
    return True


def handle_nmi_window(vm: "VirtualMachine", exit: VmExit) -> bool:
    """NMI window (reason 8): virtual-NMI blocking ended; inject the NMI the VMM held back
    (``vm.nmi_waiting``), or just close the window."""
    vm.set_control(ProcBased.NMI_WINDOW_EXITING, False)
    if vm.nmi_waiting:
        vm.nmi_waiting = False
        vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, IntrInfo(Vector.NMI, InterruptionType.NMI).encode())
    return True


def handle_preemption_timer(vm: "VirtualMachine", exit: VmExit) -> bool:
    """VMX-preemption timer (reason 52): the guest's time slice is over.  A VMM would
    schedule something else; this one counts the slice and re-arms the timer with
    ``vm.preemption_slice`` (if set) for the next one."""
    vm.preemption_exits += 1
    if vm.preemption_slice is not None:
        vm.vmwrite(F.VMX_PREEMPTION_TIMER_VALUE, vm.preemption_slice)
    elif vm.vmread(F.VMX_PREEMPTION_TIMER_VALUE) == 0:
        # The next entry would load 0 and exit again before any instruction (SDM 27.7.4):
        # an endless storm of timer exits.  Say so instead.
        vm.stop(VmState.STOPPED, "VMX-preemption timer exit with the timer-value field at 0: every "
                "VM entry would exit again at once (SDM 27.7.4). Write VMX_PREEMPTION_TIMER_VALUE "
                "(it counts down once per 32 guest instructions) or set vm.preemption_slice")
        return False
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


def handle_task_switch(vm: "VirtualMachine", exit: VmExit) -> bool:
    """Task switch (reason 9): decode the qualification (SDM Table 28-2) and stop the VM.

    Hardware task switching is not emulated here: like KVM's ``handle_task_switch`` a
    VMM would have to save the old task's state in its TSS, load the new one from the TSS
    the qualification names (SDM Vol. 3A 8.3) and update the busy bits and the
    previous-task link - a legacy-mode feature no 64-bit OS uses.  So the VM stops,
    saying which switch the guest asked for."""
    q = TaskSwitchQualification.decode(exit.qualification)
    how = {TaskSwitchSource.CALL: "CALL to", TaskSwitchSource.IRET: "IRET (RFLAGS.NT = 1) back to",
           TaskSwitchSource.JMP: "JMP to",
           TaskSwitchSource.TASK_GATE: "an event delivered through an IDT task gate to"}[q.source]
    vm.stop(VmState.STOPPED, f"the guest switched tasks ({how} TSS selector {q.selector:#x}, at "
            f"{exit.guest_rip:#x}); vtlab's VMM does not emulate hardware task switching "
            "(KVM does, in its instruction emulator)")
    return False


def handle_monitor_trap(vm: "VirtualMachine", exit: VmExit) -> bool:
    """Monitor trap flag: one instruction done; nothing to do but resume."""
    return True


#: The exit-handler table (compare ``kvm_vmx_exit_handlers[]`` in Linux's vmx.c).
HANDLERS: dict[ExitReason, Handler] = {
    ExitReason.EXCEPTION_NMI: handle_exception,
    ExitReason.EXTERNAL_INTERRUPT: handle_external_interrupt,
    ExitReason.INTERRUPT_WINDOW: handle_interrupt_window,
    ExitReason.NMI_WINDOW: handle_nmi_window,
    ExitReason.PREEMPTION_TIMER: handle_preemption_timer,
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
    ExitReason.TASK_SWITCH: handle_task_switch,
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



def _unhandled(vm: VirtualMachine, exit: VmExit) -> bool:
    vm.stop(VmState.STOPPED, f"no handler for exit reason {exit.reason.name} ({int(exit.reason)})")
    return False

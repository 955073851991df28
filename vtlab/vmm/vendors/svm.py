"""The AMD-V side of the two-vendor VMM: SVM bring-up, the VMCB's set-up, #VMEXIT decoding.

Bring-up (APM Vol. 2, 15.4): CPUID Fn8000_0001h ECX.SVM says SVM exists, VM_CR.SVMDIS
says the BIOS did not disable it; the VMM sets EFER.SVME and gives the processor a host
save area (VM_HSAVE_PA).  Control block: the VMCB is memory - intercepts are bits the VMM
stores (CPUID, HLT, IOIO_PROT with an all-ones IOPM, MSR_PROT with an all-ones MSRPM,
VMRUN, VMMCALL, SHUTDOWN, and #UD so that an Intel VMCALL can be served as a hypercall,
as KVM does on AMD).  Each entry is KVM's ``svm_vcpu_run`` sequence: CLGI, VMLOAD,
VMRUN, VMSAVE, STGI.  Skipping an instruction is ``RIP = nRIP`` (NRIP save), injecting
an exception writes EVENTINJ (15.20).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ...arch.cpuid import CPUID_1_ECX_VMX, HOST_CPUID, vendor_signature
from ...arch.exceptions import Vector
from ...arch.msrs import Cr0, Msr
from ...arch.svm import (AMD_VENDOR, CPUID_8000_0001_ECX_SVM, CPUID_SVM_LEAF, EFER_SVME, IOPM_SIZE, MSRPM_SIZE,
                         EventInfo, EventType, Intercept, Intercept2, SvmMsr, VmCr, VmcbControl, VmcbSave,
                         iopm_bit, msrpm_bits)
from ...cpu.guest import Guest, Mode
from ...cpu.svm import SvmCpu, SvmStatus, Vmcb
from ...errors import HandlerError, VtlabError
from ..devices import DeviceBus, standard_devices
from ..exit_record import Exit, ExitKind, from_svm
from ..state import Registers, RunSummary, VmState
from .common import NEUTRAL_HANDLERS, exit_table

GUEST_LOAD_DEFAULT = 0x1000

#: Intercepts of a KVM-like SVM guest (Linux ``init_vmcb``: CPUID, HLT, IOIO_PROT,
#: MSR_PROT, SHUTDOWN, VMRUN, VMMCALL ...).
DEFAULT_INTERCEPTS = (Intercept.CPUID | Intercept.HLT | Intercept.IOIO_PROT | Intercept.MSR_PROT
                      | Intercept.SHUTDOWN)
DEFAULT_INTERCEPTS2 = Intercept2.VMRUN | Intercept2.VMMCALL
#: Exceptions intercepted: #UD (vector 6), for the VMCALL-as-hypercall path.
DEFAULT_EXCEPTIONS = 1 << Vector.UD

#: Guest MSRs that live in the VMCB's save area (VMLOAD/VMSAVE state; KVM's svm_get_msr
#: reads them there).
VMCB_MSRS = {Msr.IA32_SYSENTER_CS: VmcbSave.SYSENTER_CS, Msr.IA32_SYSENTER_ESP: VmcbSave.SYSENTER_ESP,
             Msr.IA32_SYSENTER_EIP: VmcbSave.SYSENTER_EIP, Msr.IA32_STAR: VmcbSave.STAR,
             Msr.IA32_LSTAR: VmcbSave.LSTAR, Msr.IA32_CSTAR: VmcbSave.CSTAR, Msr.IA32_FMASK: VmcbSave.SFMASK,
             Msr.IA32_KERNEL_GS_BASE: VmcbSave.KERNEL_GS_BASE}


def _amd_host_cpuid() -> dict[int, tuple[int, int, int, int]]:
    """The processor vtlab's SVM model pretends to be: HOST_CPUID's features with AMD's
    vendor string, no VMX, and SVM (CPUID Fn8000_0001h ECX[2], Fn8000_000Ah)."""
    ebx, ecx, edx = vendor_signature(AMD_VENDOR)
    table = dict(HOST_CPUID)
    eax1, ebx1, ecx1, edx1 = table[1]
    table[0] = (table[0][0], ebx, edx, ecx)   # leaf 0 is EBX:EDX:ECX
    table[1] = (eax1, ebx1, ecx1 & ~CPUID_1_ECX_VMX, edx1)
    table[0x8000_0000] = (CPUID_SVM_LEAF, 0, 0, 0)
    e, b, c, d = table[0x8000_0001]
    table[0x8000_0001] = (e, b, c | CPUID_8000_0001_ECX_SVM, d)
    table[CPUID_SVM_LEAF] = SvmCpu.cpuid(CPUID_SVM_LEAF)
    return table


AMD_HOST_CPUID = _amd_host_cpuid()


#: Registers #VMEXIT saves into the VMCB and VMRUN loads from it (APM Vol. 2, 15.5.1,
#: 15.6): a VMM's write of one of them must reach the VMCB, or the next VMRUN undoes it.
_VMCB_REGISTERS = {**{n: VmcbSave.RAX for n in ("rax", "eax", "ax", "al", "ah")},
                   **{n: VmcbSave.RSP for n in ("rsp", "esp", "sp")},
                   **{n: VmcbSave.RFLAGS for n in ("rflags", "eflags")}}
_FULL_NAME = {VmcbSave.RAX: "rax", VmcbSave.RSP: "rsp", VmcbSave.RFLAGS: "rflags"}


class SvmRegisters(Registers):
    """The guest's registers as an SVM VMM sees them.  Unlike VMX (where the VMCS holds
    RSP, RFLAGS and RIP), the VMCB's save area holds RAX too - and *only* RAX of the
    general registers: the others stay in the CPU across VMRUN and #VMEXIT, for the VMM's
    own code to save (KVM's ``__svm_vcpu_run``).  So writes of RAX, RSP and RFLAGS go to
    the CPU *and* the VMCB."""

    def __init__(self, guest: Guest, vmcb: "Vmcb | None" = None):
        super().__init__(guest)
        object.__setattr__(self, "_vmcb", vmcb)

    def __setitem__(self, name: str, value: int) -> None:
        super().__setitem__(name, value)
        field = _VMCB_REGISTERS.get(name.lower())
        vmcb = self._vmcb
        if field is not None and vmcb is not None:
            vmcb.put(field, self._guest.reg(_FULL_NAME[field]))

    def __setattr__(self, name: str, value: int) -> None:
        self[name] = value


class SvmBringUpError(VtlabError):
    """SVM could not be enabled (no SVM in CPUID, or VM_CR.SVMDIS set)."""


class SvmVendorVm:
    """A guest under AMD-V, driven by the same vendor-neutral handlers as
    :class:`~vtlab.vmm.vendors.vmx.VmxVendorVm`.

    >>> vm = SvmVendorVm("mov dx, 0x3f8\\nmov al, 'A'\\nout dx, al\\nhlt", mode="real")
    >>> vm.run().state.value, vm.output
    ('halted', 'A')
    """

    vendor = "SVM"

    def __init__(self, program: str | bytes | Path | None = None, mode: Mode | str = "real",
                 load: int | None = None, entry: int | None = None, memory_size: int = 2 << 20,
                 devices: DeviceBus | None = None):
        self.mode = Mode(mode)
        self.guest = Guest(self.mode, memory_size)
        self.regs = SvmRegisters(self.guest)
        self.bus = devices or standard_devices()
        self.guest.connect_io(self.bus.read, self.bus.write)
        self.console = bytearray()
        self.msrs: dict[int, int] = {Msr.IA32_TIME_STAMP_COUNTER: 0, Msr.IA32_APIC_BASE: 0xFEE0_0900,
                                     Msr.IA32_PAT: 0x0007_0406_0007_0406, Msr.IA32_TSC_AUX: 0}
        self.exits: list[Exit] = []
        #: The vendor-neutral handlers this VM uses, by :class:`ExitKind` ...
        self.handlers: dict[ExitKind, Callable] = dict(NEUTRAL_HANDLERS)
        #: ... and handlers of raw #VMEXITs by EXITCODE, consulted first:
        #: ``fn(vm, svm_exit) -> bool | None`` reads EXITINFO1/2 itself.
        self.svm_handlers: dict[int, Callable] = {}
        self.state, self.message = VmState.READY, ""
        self.program = None
        if program is not None:
            if isinstance(program, Path):
                program = program.read_bytes() if program.suffix == ".bin" else program.read_text()
            address = GUEST_LOAD_DEFAULT if load is None else load
            self.program = self.guest.load(program, address)
            entry = address if entry is None else entry
        if entry is not None:
            self.guest.rip = entry
        self.cpu = SvmCpu(self.guest)
        self._bring_up()

    # ----------------------------------------------------------- bring-up
    def _bring_up(self) -> None:
        """Enable SVM and build the VMCB (APM Vol. 2, 15.4, 15.5)."""
        cpu, mem = self.cpu, self.cpu.memory
        if not cpu.cpuid(0x8000_0001)[2] & CPUID_8000_0001_ECX_SVM:
            raise SvmBringUpError("CPUID Fn8000_0001h ECX[2] (SVM) is 0: no SVM on this processor")
        if cpu.rdmsr(SvmMsr.VM_CR) & VmCr.SVMDIS:
            raise SvmBringUpError("VM_CR.SVMDIS = 1: SVM is disabled (by the BIOS); EFER.SVME cannot be set")
        cpu.enable_svm().check()
        cpu.wrmsr(SvmMsr.VM_HSAVE_PA, mem.alloc()).check()
        self.vmcb_address = mem.alloc()
        self.vmcb = vmcb = Vmcb(mem, self.vmcb_address)
        object.__setattr__(self.regs, "_vmcb", vmcb)
        self.iopm = mem.alloc(IOPM_SIZE // 0x1000)
        self.msrpm = mem.alloc(MSRPM_SIZE // 0x1000)
        mem.write(self.iopm, b"\xff" * IOPM_SIZE)     # every port intercepted ...
        mem.write(self.msrpm, b"\xff" * MSRPM_SIZE)   # ... and every MSR
        vmcb.put(VmcbControl.INTERCEPT_MISC1, DEFAULT_INTERCEPTS)
        vmcb.put(VmcbControl.INTERCEPT_MISC2, DEFAULT_INTERCEPTS2)
        vmcb.put(VmcbControl.INTERCEPT_EXCEPTIONS, DEFAULT_EXCEPTIONS)
        vmcb.put(VmcbControl.IOPM_BASE_PA, self.iopm)
        vmcb.put(VmcbControl.MSRPM_BASE_PA, self.msrpm)
        vmcb.put(VmcbControl.GUEST_ASID, 1)
        # Guest state: the CPU state its boot code set up, stored into the save area
        # (what a VMM's C code does field by field), plus VMSAVE for FS/GS/TR/LDTR/MSRs.
        from ...cpu.svm.state import save_guest
        save_guest(vmcb, self.guest)
        vmcb.put(VmcbSave.EFER, vmcb.get(VmcbSave.EFER) | EFER_SVME)
        cpu.vmsave(self.vmcb_address).check()

    # ------------------------------------------------------ the narrow interface
    def host_cpuid(self, leaf: int) -> tuple[int, int, int, int]:
        return AMD_HOST_CPUID.get(leaf, (0, 0, 0, 0))

    def hide_virtualization(self, leaf, regs):
        """No nested SVM: clear CPUID Fn8000_0001h ECX.SVM and report no SVM leaf."""
        if leaf == 0x8000_0001:
            eax, ebx, ecx, edx = regs
            return (eax, ebx, ecx & ~CPUID_8000_0001_ECX_SVM, edx)
        if leaf == CPUID_SVM_LEAF:
            return (0, 0, 0, 0)
        return regs

    def skip(self, exit: Exit) -> None:
        """RIP = nRIP (the next RIP the processor saved), or RIP + length for an exit
        that has none (the #UD of a VMCALL)."""
        nrip = exit.native.next_rip
        self.vmcb.put(VmcbSave.RIP, nrip if nrip else exit.guest_rip + exit.length)

    def inject_exception(self, vector: int, error_code: int | None = None) -> bool:
        """EVENTINJ = the exception (APM Vol. 2, 15.20); real mode pushes no error code."""
        if not self.vmcb.get(VmcbSave.CR0) & Cr0.PE:
            error_code = None
        self.vmcb.put(VmcbControl.EVENTINJ, EventInfo(int(vector), EventType.EXCEPTION, error_code).encode())
        return True

    def read_guest_msr(self, msr: int) -> int | None:
        field = VMCB_MSRS.get(msr)
        return None if field is None else self.vmcb.get(field)

    def write_guest_msr(self, msr: int, value: int) -> bool:
        field = VMCB_MSRS.get(msr)
        if field is None:
            return False
        self.vmcb.put(field, value)
        return True

    def stop(self, state: VmState, message: str) -> None:
        self.state, self.message = state, message

    def set_io_intercept(self, ports, intercept: bool = True) -> None:
        """Set/clear IOPM bits (bit n for port n, APM Vol. 2, 15.10.1)."""
        for port in ports:
            byte, bit = iopm_bit(port)
            self.cpu.memory.set_bit(self.iopm + byte, bit, intercept)

    def set_msr_intercept(self, msr: int, read: bool | None = None, write: bool | None = None) -> None:
        """Set/clear the MSRPM's read (2n) / write (2n + 1) bits of ``msr`` (APM Vol. 2, 15.11)."""
        position = msrpm_bits(msr)
        if position is None:
            raise ValueError(f"MSR {msr:#x} is outside the MSRPM's ranges: it is always intercepted")
        byte, bit = position
        if read is not None:
            self.cpu.memory.set_bit(self.msrpm + byte, bit, read)
        if write is not None:
            self.cpu.memory.set_bit(self.msrpm + byte, bit + 1, write)

    # ------------------------------------------------------------------ running
    def _enter(self, budget: int):
        """KVM's svm_vcpu_run: CLGI, VMLOAD, VMRUN, VMSAVE, STGI."""
        cpu, pa = self.cpu, self.vmcb_address
        cpu.clgi().check()
        cpu.vmload(pa).check()
        outcome = cpu.vmrun(pa, budget)
        if outcome.status is SvmStatus.VMEXIT:
            cpu.vmsave(pa).check()
            cpu.stgi().check()
        return outcome

    def run(self, max_exits: int = 10_000, max_instructions: int = 10_000_000) -> RunSummary:
        """Run until the guest halts or stops, handling every #VMEXIT."""
        g = self.guest
        start = g.counter.total
        self.state, self.message = VmState.RUNNING, ""
        exits = 0
        while self.state is VmState.RUNNING:
            if exits >= max_exits:
                self.stop(VmState.BUDGET, f"exit budget exhausted: {exits:,} #VMEXITs (max_exits={max_exits:,})")
                break
            remaining = max_instructions - (g.counter.total - start)
            if remaining <= 0:
                self.stop(VmState.BUDGET, f"instruction budget exhausted ({max_instructions:,})")
                break
            outcome = self._enter(remaining)
            if outcome.status is SvmStatus.FAULT:
                self.stop(VmState.ENTRY_FAILED, str(outcome))
                break
            if outcome.status is SvmStatus.PAUSED:
                self.stop(VmState.HALTED if outcome.halted else VmState.BUDGET, outcome.message)
                break
            exits += 1
            e = outcome.exit
            insn = b""
            try:
                insn = g.read(g.segment("cs").base + e.guest_rip, 3)
            except Exception:
                pass
            x = from_svm(e, self.regs.rcx, insn)
            self.exits.append(x)
            if x.kind is ExitKind.INVALID_STATE:
                self.stop(VmState.ENTRY_FAILED, f"VMRUN failed: VMEXIT_INVALID ({e.note})")
                break
            native = self.svm_handlers.get(int(e.code))
            handler = self.handlers.get(x.kind) if native is None else None
            if native is None and handler is None:
                self.stop(VmState.STOPPED, f"no handler for #VMEXIT {x.native_name} ({x.native_code:#x})")
                break
            try:
                result = native(self, e) if native is not None else handler(self, x)
            except Exception as exc:  # the learner's handler: stop cleanly, keep everything
                fn = native or handler
                name = getattr(fn, "__name__", repr(fn))
                self.stop(VmState.ERROR, f"exit handler {name} raised {type(exc).__name__}: {exc}")
                raise HandlerError(f"#VMEXIT {len(self.exits)} ({x.native_name}, EXITCODE {x.native_code:#x}) at "
                                   f"guest RIP {x.guest_rip:#x}: handler {name} raised {type(exc).__name__}: "
                                   f"{exc}. The VM is stopped; vm.vmcb, vm.exits and vm.regs show where it was.") from exc
            if result is False:
                break
        return RunSummary(self.state, exits, g.counter.total - start, self.message, self.output)

    def exit_table(self):
        """The exits as a pandas DataFrame (the same columns for both vendors)."""
        return exit_table(self.exits)

    @property
    def output(self) -> str:
        parts = [d.text for d in self.bus.devices if hasattr(d, "text")]
        return "".join(parts) + self.console.decode("latin-1")

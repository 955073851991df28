"""The SVM processor: EFER.SVME, VM_CR, VM_HSAVE_PA and the SVM instructions
(APM Vol. 2, chapter 15; the instruction pages of Vol. 3).

:class:`SvmCpu` is to AMD-V what :class:`vtlab.cpu.vmx.VmxCpu` is to VT-x: the host side
of the processor (the VMM runs in Python, so its CPU state - EFER, CR0, CPL, GIF - is
held here) around a real x86 guest in Unicorn.  Each instruction returns an
:class:`SvmOutcome`: done, a fault (#UD, #GP with the APM's reason), or for VMRUN the
#VMEXIT it ended in (the exit code in the VMCB, VMEXIT_INVALID when the consistency
checks refused the guest state).
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import unicorn

from ...arch.exceptions import Vector
from ...arch.msrs import Cr0, Cr4, Efer
from ...arch.svm import (CR4_MBZ_SHIFT, CPUID_8000_0001_ECX_SVM, CPUID_SVM_LEAF, EFER_SVME, EVENT_VALID, IOPM_SIZE,
                         MSRPM_SIZE, NP_ENABLE, Intercept2, SvmExitCode, SvmFeature, SvmMsr, VmCr, VmcbControl, VmcbSave)
from ..hostmem import HostMemory
from .intercepts import SvmExit, SvmMonitor
from .npt import NestedPaging
from .state import load_guest, save_guest, vmload_state, vmsave_state
from .vmcb import Vmcb

if TYPE_CHECKING:
    from ..guest import Guest

#: What vtlab's SVM processor reports in CPUID Fn8000_000Ah: SVM revision 1, 8 ASIDs
#: (a small number, so that ASID exhaustion can be shown), and the features it models:
#: nested paging (identity-mapped, :mod:`.npt`), NRIP save and decode assists (EXITINFO1 of CR/DR/INVLPG), and VMCB clean bits (which
#: it may ignore: it reloads every field at each VMRUN, as the APM allows).
SVM_REVISION, SVM_ASIDS = 1, 8
SVM_FEATURES = SvmFeature.NP | SvmFeature.NRIPS | SvmFeature.DECODE_ASSISTS | SvmFeature.VMCB_CLEAN

#: EFER bits that must be zero (MBZ): everything but SCE 0, LME 8, LMA 10, NXE 11, SVME 12,
#: LMSLE 13, FFXSR 14, TCE 15 (APM Vol. 2, 3.1.7).
_EFER_DEFINED = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NXE) | EFER_SVME | (0b111 << 13)
#: The physical-address width of the processor (CPUID Fn8000_0008 EAX[7:0]).
_MAX_PHYS = 39


class SvmStatus(enum.Enum):
    OK = "ok"
    FAULT = "fault"
    VMEXIT = "#VMEXIT"
    PAUSED = "paused"


@dataclass
class SvmOutcome:
    """What an SVM instruction did."""

    instruction: str
    status: SvmStatus
    vector: int | None = None
    message: str = ""
    exit: SvmExit | None = None
    halted: bool = False

    def check(self) -> "SvmOutcome":
        """Raise :class:`vtlab.errors.VtlabError` with the APM's reason unless it worked."""
        if self.status is SvmStatus.FAULT:
            from ...errors import VtlabError
            raise VtlabError(str(self))
        return self

    def __str__(self) -> str:
        if self.status is SvmStatus.FAULT:
            return f"{self.instruction}: #{Vector(self.vector).name} - {self.message}"
        if self.status is SvmStatus.VMEXIT:
            return f"{self.instruction}: {self.exit}"
        return f"{self.instruction}: {self.status.value}" + (f" ({self.message})" if self.message else "")


@dataclass
class HostState:
    """The VMM's own CPU state (it runs in Python: this is the CPU it would have)."""

    efer: int = int(Efer.LME | Efer.LMA)
    cr0: int = int(Cr0.PE | Cr0.PG | Cr0.NE)
    cr4: int = int(Cr4.PAE)
    cpl: int = 0
    protected: bool = True
    msrs: dict[int, int] = field(default_factory=dict)


class SvmCpu:
    """An AMD processor with SVM around the guest CPU ``guest``.

    >>> from vtlab.cpu import Guest
    >>> cpu = SvmCpu(Guest("real"))
    >>> cpu.vmrun(cpu.memory.alloc())  # doctest: +ELLIPSIS
    SvmOutcome(instruction='VMRUN', status=<SvmStatus.FAULT: 'fault'>, vector=6, ...)
    """

    def __init__(self, guest: "Guest", memory: HostMemory | None = None):
        self.guest = guest
        self.memory = memory or HostMemory(width=_MAX_PHYS)
        self.host = HostState()
        self.vm_cr = 0
        self.hsave_pa = 0
        #: The global interrupt flag (APM Vol. 2, 15.17): 1 at reset, cleared by #VMEXIT.
        self.gif = True
        self.monitor = SvmMonitor(guest, self.memory)
        self.npt = NestedPaging(guest, self.memory)
        #: The last outcomes (a bounded record: a long run does not grow it without end).
        self.history: deque[SvmOutcome] = deque(maxlen=1000)
        self.in_guest = False
        self.current_vmcb: Vmcb | None = None
        self.asid_flushes: list[tuple[int, int]] = []   # (ASID, TLB_CONTROL) at VMRUN
        self.invlpga_log: list[tuple[int, int]] = []   # (address, ASID)

    # --------------------------------------------------------------- detection
    @staticmethod
    def cpuid(leaf: int) -> tuple[int, int, int, int]:
        """The SVM-related CPUID leaves of this processor (APM Vol. 2, 15.4)."""
        if leaf == 0x8000_0001:
            return (0, 0, CPUID_8000_0001_ECX_SVM, 0)
        if leaf == CPUID_SVM_LEAF:
            return (SVM_REVISION, SVM_ASIDS, 0, int(SVM_FEATURES))
        return (0, 0, 0, 0)

    # -------------------------------------------------------------------- MSRs
    def _fault(self, insn: str, vector: Vector, message: str) -> SvmOutcome:
        return self._done(SvmOutcome(insn, SvmStatus.FAULT, int(vector), message))

    def _done(self, outcome: SvmOutcome) -> SvmOutcome:
        self.history.append(outcome)
        return outcome

    def rdmsr(self, msr: int) -> int:
        """RDMSR by the VMM of EFER, VM_CR, VM_HSAVE_PA."""
        if msr == SvmMsr.EFER:
            return self.host.efer
        if msr == SvmMsr.VM_CR:
            return self.vm_cr
        if msr == SvmMsr.VM_HSAVE_PA:
            return self.hsave_pa
        return self.host.msrs.get(msr, 0)

    def wrmsr(self, msr: int, value: int) -> SvmOutcome:
        """WRMSR by the VMM: EFER.SVME cannot be set while VM_CR.SVMDIS = 1 (#GP, APM
        Vol. 2, 15.4); VM_CR's SVMDIS and LOCK are read-only once LOCK is set (15.30.1);
        VM_HSAVE_PA must be 4-KByte aligned (15.30.4)."""
        if msr == SvmMsr.EFER:
            if value & ~_EFER_DEFINED:
                return self._fault("WRMSR", Vector.GP, f"EFER value {value:#x} sets a reserved (MBZ) bit")
            if value & EFER_SVME and self.vm_cr & VmCr.SVMDIS:
                return self._fault("WRMSR", Vector.GP, "EFER.SVME cannot be set: VM_CR.SVMDIS = 1 "
                                   "(SVM disabled by the BIOS, APM Vol. 2, 15.4)")
            self.host.efer = value
        elif msr == SvmMsr.VM_CR:
            if self.vm_cr & VmCr.LOCK and (value ^ self.vm_cr) & (VmCr.LOCK | VmCr.SVMDIS):
                return self._fault("WRMSR", Vector.GP, "VM_CR.LOCK = 1: SVMDIS and LOCK are read-only")
            self.vm_cr = value & int(VmCr.DPD | VmCr.R_INIT | VmCr.DIS_A20M | VmCr.LOCK | VmCr.SVMDIS)
        elif msr == SvmMsr.VM_HSAVE_PA:
            if value & 0xFFF or value >> _MAX_PHYS:
                return self._fault("WRMSR", Vector.GP, f"VM_HSAVE_PA {value:#x} is not a 4-KByte aligned "
                                   "physical address")
            self.hsave_pa = value
        else:
            self.host.msrs[msr] = value
        return self._done(SvmOutcome("WRMSR", SvmStatus.OK))

    def enable_svm(self) -> SvmOutcome:
        """EFER.SVME = 1 (read-modify-write of EFER)."""
        return self.wrmsr(SvmMsr.EFER, self.host.efer | EFER_SVME)

    # --------------------------------------------------------- common checks
    def _svm_instruction_faults(self, insn: str) -> SvmOutcome | None:
        """The checks every SVM instruction makes first (APM Vol. 3, VMRUN ... INVLPGA):
        #UD if EFER.SVME = 0 or not in protected mode; #GP(0) if CPL is not 0."""
        if not self.host.efer & EFER_SVME:
            return self._fault(insn, Vector.UD, "EFER.SVME = 0: SVM instructions raise #UD until "
                               "SVM is enabled (APM Vol. 2, 15.4)")
        if not self.host.protected:
            return self._fault(insn, Vector.UD, "SVM instructions need protected mode (#UD in real mode)")
        if self.host.cpl != 0:
            return self._fault(insn, Vector.GP, f"CPL {self.host.cpl}: SVM instructions need CPL 0 (#GP(0))")
        return None

    def _vmcb_address_faults(self, insn: str, rax: int) -> SvmOutcome | None:
        if rax & 0xFFF or rax >> _MAX_PHYS:
            return self._fault(insn, Vector.GP, f"rAX = {rax:#x} is not a 4-KByte aligned physical "
                               "address within the processor's width (#GP(0))")
        return None

    # ------------------------------------------------------------------ GIF
    def clgi(self) -> SvmOutcome:
        """CLGI: GIF = 0 - interrupts, NMIs and SMIs are held pending (APM Vol. 2, 15.17)."""
        fault = self._svm_instruction_faults("CLGI")
        if fault:
            return fault
        self.gif = False
        return self._done(SvmOutcome("CLGI", SvmStatus.OK))

    def stgi(self) -> SvmOutcome:
        """STGI: GIF = 1 (APM Vol. 2, 15.17)."""
        fault = self._svm_instruction_faults("STGI")
        if fault:
            return fault
        self.gif = True
        return self._done(SvmOutcome("STGI", SvmStatus.OK))

    # -------------------------------------------------------- VMLOAD / VMSAVE
    def vmload(self, rax: int) -> SvmOutcome:
        """VMLOAD: FS, GS, TR, LDTR and the SYSCALL/SYSENTER MSRs from the VMCB at rAX
        into the CPU (APM Vol. 2, 15.5.2)."""
        fault = self._svm_instruction_faults("VMLOAD") or self._vmcb_address_faults("VMLOAD", rax)
        if fault:
            return fault
        try:
            vmload_state(Vmcb(self.memory, rax), self.guest)
        except ValueError as exc:
            return self._fault("VMLOAD", Vector.GP, str(exc))
        return self._done(SvmOutcome("VMLOAD", SvmStatus.OK))

    def vmsave(self, rax: int) -> SvmOutcome:
        """VMSAVE: the same state from the CPU into the VMCB at rAX (APM Vol. 2, 15.5.2)."""
        fault = self._svm_instruction_faults("VMSAVE") or self._vmcb_address_faults("VMSAVE", rax)
        if fault:
            return fault
        vmsave_state(Vmcb(self.memory, rax), self.guest)
        return self._done(SvmOutcome("VMSAVE", SvmStatus.OK))

    def invlpga(self, address: int, asid: int) -> SvmOutcome:
        """INVLPGA: invalidate the TLB mapping of ``address`` (rAX) for ``asid`` (ECX).
        vtlab's guest has one address space and Unicorn's TLB is flushed by the page; the
        request is recorded (:attr:`invlpga_log`)."""
        fault = self._svm_instruction_faults("INVLPGA")
        if fault:
            return fault
        self.invlpga_log.append((address, asid))
        self.guest.uc.ctl_remove_cache(address & ~0xFFF, (address & ~0xFFF) + 0x1000)
        return self._done(SvmOutcome("INVLPGA", SvmStatus.OK))

    # ------------------------------------------------------------------ VMRUN
    def consistency_violations(self, vmcb: Vmcb) -> list[str]:
        """VMRUN's checks of the guest state and controls (APM Vol. 2, 15.5.1,
        "Canonicalization and Consistency Checks"): each failed one, in the APM's order.
        Any of them makes VMRUN end at once in #VMEXIT with VMEXIT_INVALID."""
        v = vmcb.get
        efer, cr0, cr3, cr4 = v(VmcbSave.EFER), v(VmcbSave.CR0), v(VmcbSave.CR3), v(VmcbSave.CR4)
        out = []
        if not efer & EFER_SVME:
            out.append("EFER.SVME is zero")
        if not cr0 & Cr0.CD and cr0 & Cr0.NW:
            out.append("CR0.CD is zero and CR0.NW is set")
        if cr0 >> 32:
            out.append("CR0[63:32] are not zero")
        if cr3 >> _MAX_PHYS:
            out.append("an MBZ bit of CR3 is set (above the physical-address width)")
        if cr4 >> CR4_MBZ_SHIFT:
            out.append("an MBZ bit of CR4 is set")
        if v(VmcbSave.DR6) >> 32:
            out.append("DR6[63:32] are not zero")
        if v(VmcbSave.DR7) >> 32:
            out.append("DR7[63:32] are not zero")
        if efer & ~_EFER_DEFINED:
            out.append("an MBZ bit of EFER is set")
        lme_pg = efer & Efer.LME and cr0 & Cr0.PG
        if lme_pg and not cr4 & Cr4.PAE:
            out.append("EFER.LME and CR0.PG are both set and CR4.PAE is zero")
        if lme_pg and not cr0 & Cr0.PE:
            out.append("EFER.LME and CR0.PG are both non-zero and CR0.PE is zero")
        cs_attrib = vmcb.segment(VmcbSave.CS).attrib
        # CS.L is descriptor bit 53 (attribute bit 9), CS.D bit 54 (attribute bit 10)
        if lme_pg and cr4 & Cr4.PAE and cs_attrib >> 9 & 1 and cs_attrib >> 10 & 1:
            out.append("EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D are all non-zero")
        if not v(VmcbControl.INTERCEPT_MISC2) & Intercept2.VMRUN:
            out.append("the VMRUN intercept bit is clear")
        for name, base, size in (("MSRPM", VmcbControl.MSRPM_BASE_PA, MSRPM_SIZE),
                                 ("IOPM", VmcbControl.IOPM_BASE_PA, IOPM_SIZE)):
            if v(base) + size > (1 << _MAX_PHYS):
                out.append(f"the {name} extends to a physical address at or beyond the maximum supported")
        inj = v(VmcbControl.EVENTINJ)
        if inj & EVENT_VALID:
            kind = inj >> 8 & 7
            if kind in (1, 5, 6, 7) or (kind == 3 and (inj & 0xFF) in (2,)) or (kind == 3 and (inj & 0xFF) > 31):
                out.append(f"illegal event injection (EVENTINJ {inj:#x}: APM Vol. 2, 15.20)")
        if v(VmcbControl.GUEST_ASID) == 0:
            out.append("ASID is equal to zero (ASID 0 is the host's)")
        return out

    def vmrun(self, rax: int, max_instructions: int = 10_000_000) -> SvmOutcome:
        """VMRUN: save host state to VM_HSAVE_PA, check and load the guest's state from the
        VMCB at rAX, run the guest until a #VMEXIT (APM Vol. 2, 15.5 and 15.6).

        The guest runs for at most ``max_instructions`` (a PAUSED outcome then: a
        simulation pause, not an architectural event; :meth:`continue_guest` resumes it).
        """
        fault = self._svm_instruction_faults("VMRUN") or self._vmcb_address_faults("VMRUN", rax)
        if fault:
            return fault
        vmcb = Vmcb(self.memory, rax)
        self.current_vmcb = vmcb
        # Host state into the host save area (its format is implementation-specific,
        # APM Vol. 2, 15.30.4; vtlab uses the VMCB's save-area layout).
        if self.hsave_pa:
            hsave = Vmcb(self.memory, self.hsave_pa)
            hsave.put(VmcbSave.EFER, self.host.efer)
            hsave.put(VmcbSave.CR0, self.host.cr0)
            hsave.put(VmcbSave.CR4, self.host.cr4)
        violations = self.consistency_violations(vmcb)
        if violations:
            exit_ = SvmExit(SvmExitCode.INVALID, guest_rip=vmcb.get(VmcbSave.RIP),
                            note="; ".join(violations))
            self._write_exit(vmcb, exit_)
            return self._done(SvmOutcome("VMRUN", SvmStatus.VMEXIT, exit=exit_,
                                         message="VMEXIT_INVALID: " + exit_.note))
        try:
            load_guest(vmcb, self.guest)
        except ValueError as exc:
            exit_ = SvmExit(SvmExitCode.INVALID, guest_rip=vmcb.get(VmcbSave.RIP), note=str(exc))
            self._write_exit(vmcb, exit_)
            return self._done(SvmOutcome("VMRUN", SvmStatus.VMEXIT, exit=exit_, message=str(exc)))
        tlb = vmcb.get(VmcbControl.TLB_CONTROL)
        if tlb:
            self.asid_flushes.append((vmcb.get(VmcbControl.GUEST_ASID), tlb))
        if vmcb.get(VmcbControl.NESTED_CTL) & NP_ENABLE:
            n_cr3 = vmcb.get(VmcbControl.N_CR3)
            if self.npt.root != n_cr3 or tlb:   # a new root or a TLB flush: walk again
                try:
                    self.npt.rebuild(n_cr3)
                except ValueError as exc:
                    return self._fault("VMRUN", Vector.GP, f"{exc} (a limit of vtlab's model, not of SVM)")
            self.npt.flush_refused()
            self.monitor.npt = self.npt
        else:
            self.npt.disable()
            self.monitor.npt = None
        self.guest.tsc_offset = vmcb.get(VmcbControl.TSC_OFFSET)
        self.gif = True          # VMRUN sets GIF (15.17)
        self.in_guest = True
        self.monitor.vmcb = vmcb
        if vmcb.get(VmcbControl.EVENTINJ) & EVENT_VALID:
            exit_ = self.monitor.inject()
            if exit_ is not None:
                return self._vmexit("VMRUN", exit_)
        return self._run("VMRUN", max_instructions)

    def continue_guest(self, max_instructions: int = 10_000_000) -> SvmOutcome:
        """Let a paused guest go on (a debugger-style pause, not an instruction)."""
        if not self.in_guest:
            return self._fault("continue", Vector.UD, "the guest is not running")
        return self._run("continue", max_instructions)

    def _run(self, insn: str, budget: int) -> SvmOutcome:
        m, g = self.monitor, self.guest
        start = g.counter.total
        m.halted = False
        while True:
            remaining = budget - (g.counter.total - start)
            if remaining <= 0:
                return self._done(SvmOutcome(insn, SvmStatus.PAUSED, message=f"paused after {budget:,} guest "
                                             "instructions without a #VMEXIT (budget)"))
            m.pending = m.event = None
            try:
                g.emulate(remaining)
            except unicorn.UcError as exc:
                if m.pending is None and m.event is None:
                    e = g._unicorn_error(exc)
                    m.event = (int(e.vector), g.rip, 0, None)
                elif m.pending is not None and m.pending.guest_rip == -1:
                    # a nested page fault: the access did not complete (QEMU restored RIP)
                    g.counter.unretire_rest_of_block(g.linear_rip())
                    m.pending.guest_rip = g.rip
            if g._stop is not None:
                stop, g._stop = g._stop, None
                if stop[0] == "ran-off" and m.pending is None and m.event is None:
                    self.in_guest = False
                    return self._done(SvmOutcome(insn, SvmStatus.PAUSED, message=g.ran_off_message(stop[1])))
            if m.pending is not None:
                exit_, m.pending = m.pending, None
                return self._vmexit(insn, exit_)
            if m.event is not None:
                exit_ = m.handle_event()
                if exit_ is not None:
                    return self._vmexit(insn, exit_)
                continue
            if m.halted:
                return self._done(SvmOutcome(insn, SvmStatus.PAUSED, halted=True, message=(
                    "the guest executed HLT without an intercept and no interrupt will wake it")))

    def _write_exit(self, vmcb: Vmcb, exit_: SvmExit) -> None:
        """#VMEXIT's control-area writes (APM Vol. 2, 15.6): EXITCODE, EXITINFO1/2,
        EXITINTINFO, nRIP (NRIP save), and EVENTINJ.V cleared."""
        vmcb.put(VmcbControl.EXITCODE, int(exit_.code))
        vmcb.put(VmcbControl.EXITINFO1, exit_.exitinfo1)
        vmcb.put(VmcbControl.EXITINFO2, exit_.exitinfo2)
        vmcb.put(VmcbControl.EXITINTINFO, exit_.exitintinfo)
        vmcb.put(VmcbControl.NEXT_RIP, exit_.next_rip)
        vmcb.put(VmcbControl.EVENTINJ, vmcb.get(VmcbControl.EVENTINJ) & ~EVENT_VALID)

    def _vmexit(self, insn: str, exit_: SvmExit) -> SvmOutcome:
        """#VMEXIT (APM Vol. 2, 15.6): GIF = 0, guest state into the VMCB, exit
        information into the control area, host state back from VM_HSAVE_PA."""
        vmcb, g = self.current_vmcb, self.guest
        g.rip = exit_.guest_rip if exit_.code != SvmExitCode.SHUTDOWN else g.rip
        save_guest(vmcb, g)
        self._write_exit(vmcb, exit_)
        if self.hsave_pa:   # host state back from the host save area (15.6)
            hsave = Vmcb(self.memory, self.hsave_pa)
            self.host.efer, self.host.cr0, self.host.cr4 = (hsave.get(VmcbSave.EFER), hsave.get(VmcbSave.CR0),
                                                            hsave.get(VmcbSave.CR4))
        self.gif = False
        self.in_guest = False
        self.monitor.vmcb = None
        return self._done(SvmOutcome(insn, SvmStatus.VMEXIT, exit=exit_))

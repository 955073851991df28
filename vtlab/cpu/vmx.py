"""The VMX "processor": VMX operation, the VMX instructions, VM entry and VM exit.

:class:`VmxCpu` is the logical processor seen from the VMM.  It holds what the SDM
says a processor holds for VMX (SDM Vol. 3C ch. 24 and 31):

* whether it is outside VMX operation, in VMX root or in VMX non-root operation;
* the VMXON pointer and the *current-VMCS pointer*;
* the data of its *active* VMCSs, on the chip: VMCLEAR writes a VMCS to its region in
  host memory and VMPTRLD reads it back (:mod:`vtlab.cpu.vmcs`, "vtlab's
  implementation-specific format");
* the capability MSRs and IA32_FEATURE_CONTROL, CR0/CR4 and CPL of the host.

Every VMX instruction ends in one of the SDM's outcomes (SDM 31.2):

* **VMsucceed** - CF = ZF = 0;
* **VMfailInvalid** - CF = 1: there is no current VMCS to hold an error number;
* **VMfailValid** - ZF = 1 and the VM-instruction error field of the current VMCS
  holds the reason (:class:`vtlab.arch.VmInstructionError`);
* a **fault** (#UD, #GP) when the instruction may not run at all.

and each method returns a :class:`VmxOutcome` saying which, in the SDM's words.
VMLAUNCH and VMRESUME return when the guest causes a VM exit, just as on hardware
execution continues at HOST_RIP after an exit.
"""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Callable

from ..arch.cpuid import CPUID_1_ECX_OSXSAVE, CPUID_1_ECX_VMX, HOST_CPUID
from ..arch.errors import VmInstructionError
from ..arch.exceptions import Vector
from ..arch.msrs import Cr0, Cr4, Efer, FeatureControl, Msr
from ..arch.controls import ProcBased2
from ..arch.vmcs_fields import VmcsField as F
from .capabilities import PHYSICAL_ADDRESS_WIDTH, VMX_CAPABILITY_MSRS, VmxCapabilities
from .entry_checks import EntryChecker, Violation, entry_violations


from .outcome import Status, VmxOperation, VmxOutcome
from .nonroot import ExitMonitor
from ..errors import VmcsError, VmxFailure
from .hostmem import HostMemory
from .vmcs import INVALID_POINTER, LAUNCH_STATE_OFFSET, REGION_SIZE, LaunchState, Vmcs, lookup
from .vmcs_view import DETACHED, CurrentVmcs
from .vcpu import VcpuServices
from .entry.registry import secondary_controls
from . import invalidate as _invalidate

if TYPE_CHECKING:
    from .guest import Guest




class VmxCpu(VcpuServices):
    """A logical processor with VMX, driving one :class:`vtlab.guest.Guest` in non-root operation.

    ``vmx_supported=False`` models a CPU without VMX (CPUID.1:ECX[5] = 0);
    ``feature_control`` is IA32_FEATURE_CONTROL as the firmware left it (default:
    locked with VMXON enabled outside SMX, as a BIOS with VT-x turned on does).
    """

    def __init__(self, guest: "Guest | None" = None, *, vmx_supported: bool = True,
                 feature_control: int = FeatureControl.LOCKED | FeatureControl.VMXON_ENABLED_OUTSIDE_SMX,
                 capabilities: VmxCapabilities | None = None):
        self.caps = capabilities or VmxCapabilities()
        self.memory = HostMemory(width=PHYSICAL_ADDRESS_WIDTH)
        self.vmx_supported = vmx_supported
        self.operation = VmxOperation.OUTSIDE
        # The host (root-mode) CPU a 64-bit VMM runs on: long mode, paging, ring 0.
        self.cr0 = int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.AM | Cr0.PG)
        self.cr4 = int(Cr4.PAE | Cr4.PGE | Cr4.OSFXSR | Cr4.OSXMMEXCPT)
        self.cpl = 0
        self.efer = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NXE)
        self.msrs: dict[int, int] = {Msr.IA32_FEATURE_CONTROL: int(feature_control)}
        self.vmxon_pointer: int | None = None
        self.current_vmcs_pointer = INVALID_POINTER
        #: The processor's copy of each VMCS it has met, by region address (the cache of
        #: SDM 25.11.1).  Up to date for the addresses in :attr:`active`; the region in
        #: :attr:`memory` is, after VMCLEAR.
        self.regions: dict[int, Vmcs] = {}
        #: Addresses of the active VMCSs (SDM 25.1): made active by VMPTRLD, inactive by
        #: VMCLEAR.  Their data live in :attr:`regions`; their regions in memory are stale.
        self.active: set[int] = set()
        #: The most recent VMX instruction outcomes (the console widget draws these).
        self.history: "collections.deque[VmxOutcome]" = collections.deque(maxlen=1000)
        self.guest = guest
        self.monitor: "ExitMonitor | None" = None
        #: The processor's view of each VMCS it made current (see vtlab.cpu.vmcs_view).
        self._views: dict[int, CurrentVmcs] = {}
        #: The VM-entry checks, re-run only where fields changed (vtlab.cpu.entry).
        self.entry_checker = EntryChecker()
        #: Called with each :class:`vtlab.exits.VmExit` right after the exit completes.
        self.exit_listeners: list[Callable] = []
        if guest is not None:
            self.monitor = ExitMonitor(self)

    # ------------------------------------------------------------ helpers
    @property
    def current_vmcs(self) -> CurrentVmcs | None:
        """The VMCS the current-VMCS pointer names, or None if the pointer is invalid.

        It is the processor's view of the region (:class:`vtlab.cpu.vmcs_view.CurrentVmcs`):
        reads see the guest state of the last exit, writes are noted for the next entry.
        """
        if self.current_vmcs_pointer == INVALID_POINTER:
            return None
        return self.view(self.current_vmcs_pointer)

    def view(self, address: int) -> CurrentVmcs | None:
        """The processor's view of the VMCS at ``address`` (None if this processor never
        met a VMCS there: no VMCLEAR or VMPTRLD of it).

        For an active VMCS that is the processor's copy (what VMREAD sees once it is
        current).  For an inactive one it is the region as memory holds it now, decoded
        afresh on every call; writes through such a view do not reach memory (VMWRITE
        needs the VMCS current), and the next VMPTRLD reads the region again.
        """
        found = self._views.get(address)
        if found is None:
            region = self.regions.get(address)
            if region is None:
                return None
            if address not in self.active:
                region.load_image(self.memory.read(address, REGION_SIZE))
                return self._make_view(region)
            found = self._views[address] = self._make_view(region)
        return found

    def _make_view(self, region: Vmcs) -> CurrentVmcs:
        if self.monitor is not None:
            state = self.monitor.state
            return CurrentVmcs(region, state, state.written_set(region))
        return CurrentVmcs(region, DETACHED, set())

    def _forget(self, region: Vmcs) -> None:
        """Drop what the processor knows *about* ``region`` beyond its data - a lazy
        guest-state save still to do (done first), the fields written since the last
        entry checks, the checks' verdicts - before its data moves to or from memory."""
        if self.monitor is not None:
            self.monitor.state.forget(region)
        self.entry_checker.forget(region)
        self._views.pop(region.address, None)

    def _wrong_revision(self, address: int) -> int | None:
        """The first dword of the region at ``address`` if VMXON/VMPTRLD must refuse it: bits
        30:0 differ from IA32_VMX_BASIC[30:0], or bit 31 is set (SDM 31.3); else None."""
        rev = self.memory.read_u32(address)
        return rev if rev & 0x7FFF_FFFF != self.caps.revision_id or rev >> 31 else None

    def _done(self, outcome: VmxOutcome) -> VmxOutcome:
        self.history.append(outcome)
        return outcome

    def _succeed(self, insn: str, message: str = "", value: int | None = None) -> VmxOutcome:
        return self._done(VmxOutcome(insn, Status.VMSUCCEED, message=message, value=value))

    def _fail(self, insn: str, error: VmInstructionError, message: str = "") -> VmxOutcome:
        """VMfail(ErrorNumber) (SDM 31.2): VMfailValid if there is a current VMCS, else VMfailInvalid."""
        vmcs = self.current_vmcs
        if vmcs is None:
            return self._done(VmxOutcome(insn, Status.VMFAIL_INVALID, message=(
                message + " " if message else "") + "(no current VMCS to hold error number "
                f"{int(error)}, so the failure is VMfailInvalid)"))
        vmcs.put(F.VM_INSTRUCTION_ERROR, int(error))
        return self._done(VmxOutcome(insn, Status.VMFAIL_VALID, error=error, message=message))

    def _fail_invalid(self, insn: str, message: str) -> VmxOutcome:
        return self._done(VmxOutcome(insn, Status.VMFAIL_INVALID, message=message))

    def _fault(self, insn: str, vector: Vector, message: str) -> VmxOutcome:
        return self._done(VmxOutcome(insn, Status.FAULT, vector=vector, message=message))

    def _common_checks(self, insn: str) -> VmxOutcome | None:
        """The checks shared by every VMX instruction except VMXON (SDM 31.3 pseudo-code).

        Returns the fault outcome, or None when the instruction may go on.  Callers must
        test ``is not None``: a fault outcome is falsy (``VmxOutcome.__bool__`` is ``ok``),
        so a plain ``if bad:`` would skip the #UD/#GP and run the instruction anyway.
        """
        if self.operation is VmxOperation.OUTSIDE:
            return self._fault(insn, Vector.UD, "not in VMX operation (execute VMXON first)")
        if self.operation is VmxOperation.NON_ROOT:
            return self._fault(insn, Vector.UD, "the guest is running: in VMX non-root operation "
                               "this instruction causes a VM exit instead")
        if self.cpl > 0:
            return self._fault(insn, Vector.GP, f"CPL is {self.cpl}; VMX instructions need CPL 0")
        return None

    # ------------------------------------------------------ root-mode CPU
    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """CPUID as the host sees it: the same processor a guest's CPUID reports
        (``vtlab.arch.cpuid.HOST_CPUID``), with leaf 1 ECX bit 5 reporting VMX (SDM 24.6)
        only if this CPU has it, and bit 27 (OSXSAVE) following CR4.OSXSAVE (SDM Vol. 2A,
        CPUID).  Leaves it does not list read as zeros."""
        eax, ebx, ecx, edx = HOST_CPUID.get(leaf, (0, 0, 0, 0))
        if leaf == 1:
            ecx &= ~(CPUID_1_ECX_VMX | CPUID_1_ECX_OSXSAVE)
            if self.vmx_supported:
                ecx |= CPUID_1_ECX_VMX
            if self.cr4 & Cr4.OSXSAVE:
                ecx |= CPUID_1_ECX_OSXSAVE
        return (eax, ebx, ecx, edx)

    def rdmsr(self, msr: int) -> int:
        """Read an MSR: IA32_FEATURE_CONTROL or a VMX capability MSR.

        #GP(0) if VMX is absent, and for a capability MSR this processor does not have
        (SDM Appendix A: IA32_VMX_PROCBASED_CTLS2 without "activate secondary controls",
        IA32_VMX_EPT_VPID_CAP without EPT and VPID, IA32_VMX_TRUE_* with
        IA32_VMX_BASIC[55] = 0, IA32_VMX_VMFUNC without VM functions, ...; see
        :meth:`VmxCapabilities.msr_exists`).
        """
        if msr in VMX_CAPABILITY_MSRS:
            if not self.vmx_supported:
                raise VmxFailure(VmxOutcome(f"RDMSR {msr:#x}", Status.FAULT, vector=Vector.GP,
                                            message="this CPU has no VMX capability MSRs"))
            if not self.caps.msr_exists(msr):
                name = Msr(msr).name if msr in Msr._value2member_map_ else f"{msr:#x}"
                raise VmxFailure(VmxOutcome(f"RDMSR {name}", Status.FAULT, vector=Vector.GP,
                                            message="this processor does not have that capability MSR "
                                            "(its feature is not offered, SDM Appendix A): #GP(0)"))
            return self.caps.msrs()[msr]
        return self.msrs.get(msr, 0)

    def wrmsr(self, msr: int, value: int) -> None:
        """Write an MSR.  IA32_FEATURE_CONTROL cannot change once its lock bit is set (#GP)."""
        if msr == Msr.IA32_FEATURE_CONTROL and self.msrs[msr] & FeatureControl.LOCKED:
            raise VmxFailure(VmxOutcome("WRMSR IA32_FEATURE_CONTROL", Status.FAULT, vector=Vector.GP,
                                        message="the MSR is locked (bit 0 set) until the next reset"))
        if msr in self.caps.msrs():
            raise VmxFailure(VmxOutcome(f"WRMSR {Msr(msr).name}", Status.FAULT, vector=Vector.GP,
                                        message="VMX capability MSRs are read-only"))
        self.msrs[msr] = value

    def write_cr4(self, value: int) -> None:
        """MOV to CR4 on the host: VMXE needs CPUID.1:ECX.VMX and cannot be cleared inside VMX operation."""
        if value & Cr4.VMXE and not self.vmx_supported:
            raise VmxFailure(VmxOutcome("MOV CR4", Status.FAULT, vector=Vector.GP,
                                        message="CR4.VMXE is reserved on a CPU without VMX (CPUID.1:ECX[5] = 0)"))
        if not value & Cr4.VMXE and self.operation is not VmxOperation.OUTSIDE:
            raise VmxFailure(VmxOutcome("MOV CR4", Status.FAULT, vector=Vector.GP,
                                        message="CR4.VMXE cannot be cleared in VMX operation (SDM 24.8)"))
        self.cr4 = value

    def alloc_region(self, revision_id: int | None = None) -> int:
        """Allocate a zeroed 4-KByte region (VMXON region or VMCS) in host memory.

        ``revision_id`` is written into its first dword if given - forgetting it is a
        classic bug, and VMXON/VMPTRLD then fail.
        """
        address = self.memory.alloc()
        if revision_id is not None:
            self.memory.write_u32(address, revision_id)
        return address

    # ----------------------------------------------------- VMX instructions
    def vmxon(self, address: int) -> VmxOutcome:
        """VMXON (SDM 31.3): enter VMX root operation with the VMXON region at ``address``."""
        insn = "VMXON"
        if not self.cr0 & Cr0.PE or not self.cr4 & Cr4.VMXE:
            return self._fault(insn, Vector.UD, "CR4.VMXE is 0 (set it first; it needs "
                               "CPUID.1:ECX.VMX = 1)" if self.cr0 & Cr0.PE else "CR0.PE is 0")
        if self.operation is VmxOperation.OUTSIDE:
            fc = self.msrs.get(Msr.IA32_FEATURE_CONTROL, 0)
            if self.cpl > 0:
                return self._fault(insn, Vector.GP, f"CPL is {self.cpl}, VMXON needs CPL 0")
            bad = self.caps.cr_fixed_violations("cr0", self.cr0) + self.caps.cr_fixed_violations("cr4", self.cr4)
            if bad:
                return self._fault(insn, Vector.GP, "; ".join(bad))
            if not fc & FeatureControl.LOCKED:
                return self._fault(insn, Vector.GP, "IA32_FEATURE_CONTROL lock bit (bit 0) is clear: "
                                   "firmware must configure and lock the MSR first")
            if not fc & FeatureControl.VMXON_ENABLED_OUTSIDE_SMX:
                return self._fault(insn, Vector.GP, "IA32_FEATURE_CONTROL bit 2 (enable VMX outside "
                                   "SMX operation) is clear: VT-x is disabled in the firmware")
            if not self.memory.valid_address(address):
                return self._fail_invalid(insn, f"VMXON region address {address:#x} is not 4-KByte "
                                          "aligned or exceeds the physical-address width")
            rev = self._wrong_revision(address)
            if rev is not None:
                return self._fail_invalid(insn, f"VMXON region revision identifier {rev:#x} differs "
                                          f"from IA32_VMX_BASIC[30:0] = {self.caps.revision_id:#x}")
            self.vmxon_pointer = address
            self.current_vmcs_pointer = INVALID_POINTER
            self.operation = VmxOperation.ROOT
            return self._succeed(insn, "now in VMX root operation")
        if self.operation is VmxOperation.NON_ROOT:
            return self._fault(insn, Vector.UD, "in VMX non-root operation VMXON causes a VM exit")
        # In VMX root operation the pseudo-code tests CPL > 0 -> #GP(0) before
        # VMfail("VMXON executed in VMX root operation") (SDM 31.3, VMXON).
        if self.cpl > 0:
            return self._fault(insn, Vector.GP, f"CPL is {self.cpl}: VMXON in VMX root operation "
                               "at CPL > 0 raises #GP(0) before it could VMfail")
        return self._fail(insn, VmInstructionError.VMXON_IN_VMX_ROOT_OPERATION,
                          "already in VMX root operation")

    def vmxoff(self) -> VmxOutcome:
        """VMXOFF (SDM 31.3): leave VMX operation."""
        bad = self._common_checks("VMXOFF")
        if bad is not None:
            return bad
        self.operation = VmxOperation.OUTSIDE
        self.vmxon_pointer = None
        self.current_vmcs_pointer = INVALID_POINTER
        return self._succeed("VMXOFF", "left VMX operation")

    def _check_vmcs_pointer(self, insn: str, address: int, invalid: VmInstructionError,
                            vmxon: VmInstructionError) -> VmxOutcome | None:
        """The checks VMCLEAR and VMPTRLD share (SDM 31.3): the common ones, then the
        operand's alignment and width, and that it is not the VMXON region."""
        bad = self._common_checks(insn)
        if bad is not None:
            return bad
        if not self.memory.valid_address(address):
            return self._fail(insn, invalid,
                              f"{address:#x} is not 4-KByte aligned or exceeds the physical-address width")
        if address == self.vmxon_pointer:
            return self._fail(insn, vmxon, "that is the VMXON region")
        return None

    def vmclear(self, address: int) -> VmxOutcome:
        """VMCLEAR (SDM 31.3): "ensure that data for VMCS referenced by the operand is in
        memory", set its launch state to clear and make it inactive (and not current).

        An active VMCS (current or not) is written to its region from the processor's
        copy, in vtlab's layout (:mod:`vtlab.cpu.vmcs`); for an inactive one the data are
        in memory already, and only the launch state in the region is set to clear.
        """
        insn = "VMCLEAR"
        bad = self._check_vmcs_pointer(insn, address, VmInstructionError.VMCLEAR_INVALID_ADDRESS,
                                       VmInstructionError.VMCLEAR_VMXON_POINTER)
        if bad is not None:
            return bad
        region = self.regions.get(address)
        if region is None:
            region = self.regions[address] = Vmcs(address, self.memory.read_u32(address) & 0x7FFF_FFFF)
        self._forget(region)   # (completes a pending lazy guest-state save first)
        region.clear()
        if address in self.active:
            self.memory.write(address + LAUNCH_STATE_OFFSET, region.image())
            self.active.discard(address)
        else:
            self.memory.write_u32(address + LAUNCH_STATE_OFFSET, 0)
        msg = "launch state is now clear; the VMCS data are in its region in memory"
        if address == self.current_vmcs_pointer:
            self.current_vmcs_pointer = INVALID_POINTER
            msg += "; it was the current VMCS, so the current-VMCS pointer is now invalid"
        return self._succeed(insn, msg)

    def vmptrld(self, address: int) -> VmxOutcome:
        """VMPTRLD (SDM 31.3): make the VMCS at ``address`` current (and active)."""
        insn = "VMPTRLD"
        bad = self._check_vmcs_pointer(insn, address, VmInstructionError.VMPTRLD_INVALID_ADDRESS,
                                       VmInstructionError.VMPTRLD_VMXON_POINTER)
        if bad is not None:
            return bad
        rev = self._wrong_revision(address)
        if rev is not None:
            return self._fail(insn, VmInstructionError.VMPTRLD_INCORRECT_VMCS_REVISION_ID,
                              f"the region's revision identifier is {rev:#x}, the CPU's is "
                              f"{self.caps.revision_id:#x} (IA32_VMX_BASIC[30:0])")
        region = self.regions.get(address)
        if region is None:
            region = self.regions[address] = Vmcs(address, 0)
        if address not in self.active:
            # An inactive VMCS: its data are in its region, the processor reads them in.
            self._forget(region)
            region.load_image(self.memory.read(address, REGION_SIZE))
            self.active.add(address)
        else:
            # Active already: the processor's copy is the VMCS (writes to the region since
            # the VMPTRLD that made it active are ignored, SDM 25.11.1).
            region.revision_id = self.memory.read_u32(address) & 0x7FFF_FFFF
        self.current_vmcs_pointer = address
        return self._succeed(insn, f"current VMCS is now {address:#x}")

    def vmptrst(self) -> VmxOutcome:
        """VMPTRST (SDM 31.3): store the current-VMCS pointer."""
        bad = self._common_checks("VMPTRST")
        if bad is not None:
            return bad
        return self._succeed("VMPTRST", value=self.current_vmcs_pointer)

    def vmread(self, encoding: int | str | F) -> VmxOutcome:
        """VMREAD (SDM 31.3): read a field of the current VMCS by its encoding."""
        insn = f"VMREAD {_enc_text(encoding)}"
        bad = self._common_checks(insn)
        if bad is not None:
            return bad
        vmcs = self.current_vmcs
        if vmcs is None:
            return self._fail_invalid(insn, "there is no current VMCS (VMPTRLD one first)")
        try:
            missing = self._missing_field(encoding)
            if missing is not None:
                return self._fail(insn, VmInstructionError.UNSUPPORTED_VMCS_COMPONENT, missing)
            value = vmcs.read(encoding)
        except VmcsError as exc:
            return self._fail(insn, VmInstructionError(exc.error), str(exc))
        return self._succeed(insn, value=value)

    def vmwrite(self, encoding: int | str | F, value: int) -> VmxOutcome:
        """VMWRITE (SDM 31.3): write a field of the current VMCS; high bits beyond its width are ignored."""
        insn = f"VMWRITE {_enc_text(encoding)}"
        bad = self._common_checks(insn)
        if bad is not None:
            return bad
        vmcs = self.current_vmcs
        if vmcs is None:
            return self._fail_invalid(insn, "there is no current VMCS (VMPTRLD one first)")
        try:
            missing = self._missing_field(encoding)
            if missing is not None:
                return self._fail(insn, VmInstructionError.UNSUPPORTED_VMCS_COMPONENT, missing)
            vmcs.write(encoding, value, truncate=True)
        except VmcsError as exc:
            return self._fail(insn, VmInstructionError(exc.error), str(exc))
        return self._succeed(insn)

    def require_field(self, encoding: int | str | F, insn: str = "VMREAD") -> None:
        """The checks VMREAD and VMWRITE make before they touch a field, in their order
        (SDM 31.3), raising instead of returning an outcome - for VMMs written in Python
        (``vm.vmread``/``vm.vmwrite``):

        * :class:`VmxFailure` (#UD, or VMfailInvalid) outside VMX root operation or with
          no current VMCS;
        * :class:`VmcsError` with VM-instruction error 12 ("VMREAD/VMWRITE from/to
          unsupported VMCS component") for an encoding of no field, or of a field the
          capability MSRs do not offer (:meth:`_missing_field`, the check VMREAD uses).
        """
        self._current_or_raise(insn)
        missing = self._missing_field(encoding)
        if missing is not None:
            raise VmcsError(f"{insn} fails with VMfailValid: {missing}",
                            VmInstructionError.UNSUPPORTED_VMCS_COMPONENT)

    def _missing_field(self, encoding: int | str | F) -> str | None:
        """VMREAD/VMWRITE of a field this processor does not have (its feature is not
        offered by the capability MSRs, :meth:`VmxCapabilities.vmcs_field_missing`)
        fail with error 12, like an encoding of no field at all (SDM 31.3, VMREAD)."""
        enc = lookup(encoding)  # (raises VmcsError 12 for an encoding of no field)
        why = self.caps.vmcs_field_missing(enc.encoding)
        if why is None:
            return None
        return (f"unsupported VMCS component {_enc_text(enc.encoding)} ({enc.encoding:#06x}): "
                f"{why}; VM-instruction error 12")

    def vmcall(self) -> VmxOutcome:
        """VMCALL executed by the VMM itself, in VMX root operation (SDM 31.3): VMfail(1)."""
        bad = self._common_checks("VMCALL")
        if bad is not None:
            return bad
        return self._fail("VMCALL", VmInstructionError.VMCALL_IN_VMX_ROOT_OPERATION,
                          "VMCALL in VMX root operation (the dual-monitor treatment of SMM is not active)")

    def invept(self, type_: int, eptp: int = 0) -> VmxOutcome:
        """INVEPT (SDM 31.3): invalidate cached EPT mappings - type 1 (single-context) those
        of the descriptor's EPTP, type 2 (all-context) all.  VMfail error 28 ("invalid
        operand to INVEPT/INVVPID") for a type not offered or a bad EPTP
        (:mod:`vtlab.cpu.invalidate`)."""
        return _invalidate.invept(self, type_, eptp)

    def invvpid(self, type_: int, vpid: int = 0, linear: int = 0) -> VmxOutcome:
        """INVVPID (SDM 31.3): invalidate linear and combined mappings of a VPID - type 0
        one address, 1 single-context, 2 all-context, 3 single-context retaining globals;
        VMfail error 28 for a type not offered, VPID 0 or a non-canonical address."""
        return _invalidate.invvpid(self, type_, vpid, linear)

    def vmlaunch(self, max_instructions: int = 10_000_000, *, step: bool = False) -> VmxOutcome:
        """VMLAUNCH (SDM 31.3): enter the guest of a *clear* VMCS; returns at the next VM exit.

        ``max_instructions`` bounds the run (the guest is then *paused*, still in non-root
        operation); ``step=True`` runs one guest instruction (the stepper's pause).
        """
        return self._enter("VMLAUNCH", max_instructions, step)

    def vmresume(self, max_instructions: int = 10_000_000, *, step: bool = False) -> VmxOutcome:
        """VMRESUME (SDM 31.3): re-enter the guest of a *launched* VMCS; returns at the next VM exit."""
        return self._enter("VMRESUME", max_instructions, step)

    # ------------------------------------------------------------ VM entry
    def entry_violations(self) -> list[Violation]:
        """Every VM-entry rule the current VMCS breaks (empty list: entry would succeed)."""
        vmcs = self.current_vmcs
        if vmcs is None:
            return []
        if self.monitor is not None:
            self.monitor.state.complete(vmcs.region)
        return entry_violations(self, vmcs.region)

    def _enter(self, insn: str, budget: int, step: bool = False) -> VmxOutcome:
        """VMLAUNCH/VMRESUME: the instruction's own checks, the VM-entry checks (SDM 27.2,
        27.3), the guest-state load (27.3.2), then the guest runs until a VM exit."""
        bad = self._common_checks(insn)
        if bad is not None:
            return bad
        view = self.current_vmcs
        if view is None:
            return self._fail_invalid(insn, "there is no current VMCS (VMPTRLD one first)")
        vmcs = view.region
        if insn == "VMLAUNCH" and vmcs.launch_state is not LaunchState.CLEAR:
            return self._fail(insn, VmInstructionError.VMLAUNCH_NONCLEAR_VMCS,
                              "this VMCS was already launched: use VMRESUME (or VMCLEAR it first)")
        if insn == "VMRESUME" and vmcs.launch_state is not LaunchState.LAUNCHED:
            return self._fail(insn, VmInstructionError.VMRESUME_NONLAUNCHED_VMCS,
                              "this VMCS has not been launched: use VMLAUNCH")
        if self.guest is None or self.monitor is None:
            return self._fail(insn, VmInstructionError.ENTRY_INVALID_CONTROL_FIELD,
                              "this VmxCpu has no guest CPU attached (VmxCpu(guest=...))")
        violations = self._check_entry(vmcs)
        if violations:
            for group, error in (("controls", VmInstructionError.ENTRY_INVALID_CONTROL_FIELD),
                                 ("host-state", VmInstructionError.ENTRY_INVALID_HOST_STATE_FIELD)):
                first = [v for v in violations if v.group == group]
                if first:
                    out = self._fail(insn, error, str(first[0]))
                    out.violations = violations
                    return out
            guest_bad = [v for v in violations if v.group == "guest-state"]
            if guest_bad:
                return self._entry_failure(insn, vmcs, guest_bad[0].qualification, str(guest_bad[0]),
                                           violations)
        try:
            self.monitor.state.load(vmcs)
        except Exception as exc:  # a state Unicorn cannot represent (see GuestStateCache.load)
            return self._entry_failure(insn, vmcs, 0, f"[guest-state] {exc}", violations)
        # The guest-physical mappings of this EPTP (cached per EP4TA until INVEPT; walked
        # from the tables when none are cached), or the plain RAM with EPT off (SDM 29.4).
        self.monitor.ept.enter(bool(secondary_controls(vmcs.get) & ProcBased2.ENABLE_EPT),
                               vmcs.get(F.EPT_POINTER))
        if insn == "VMLAUNCH":
            vmcs.launch_state = LaunchState.LAUNCHED
        self.operation = VmxOperation.NON_ROOT
        self._entry_insn = insn
        return self._finish(self.monitor.run(insn, budget, step=step))

    def _check_entry(self, vmcs: Vmcs) -> list[Violation]:
        """The VM-entry checks, re-running only the rules whose fields changed since the
        last check of this VMCS (the checker derives which from each rule's ``reads``).

        The rules read the VMCS through the processor's view, so a guest-state field a
        rule reads is saved first if the lazy save has not reached it yet (one register
        for most fields): a re-run rule sees exactly what a full save would show.
        """
        changed = self.monitor.state.unchecked.get(id(vmcs))
        view = self._views.get(vmcs.address) or self.view(vmcs.address)
        violations = self.entry_checker.violations(self, view, changed)
        if changed and not violations:  # (after a failure the next attempt looks again)
            changed.clear()
        return violations


def _enc_text(encoding) -> str:
    if isinstance(encoding, F):
        return encoding.name
    if isinstance(encoding, str):
        return encoding
    try:
        return F(encoding).name
    except ValueError:
        return f"{int(encoding):#x}"

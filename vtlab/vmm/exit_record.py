"""One exit record for both vendors: what the VMM needs to know, whoever's processor exited.

A VT-x exit says *why* with a basic exit reason and an exit qualification (SDM Vol. 3C
28.2.1); an AMD-V #VMEXIT says it with an EXITCODE and EXITINFO1/EXITINFO2 (APM Vol. 2,
15.6, Appendix C).  The facts are the same - "the guest wrote AL to port 3F8h, the
instruction is 1 byte long" - packed differently.  :func:`from_vmx` and :func:`from_svm`
unpack each vendor's format into an :class:`Exit` with a :class:`ExitKind` and a typed
payload, so that one set of handlers (:mod:`vtlab.vmm.vendors.common`) serves both, the
way Hypervisor-101 and KVM's common x86 code sit above their vendor modules.

The native exit stays attached (:attr:`Exit.native`): nothing is lost in translation.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

from ..arch.exceptions import IntrInfo, Vector
from ..arch.exit_reasons import ExitReason
from ..arch.qualifications import CrAccessQualification, CrAccessType, IoDirection, IoQualification
from ..arch.svm import CR_DR_EXITINFO1_MOV, MSR_EXITINFO1_WRITE, IoioInfo, SvmExitCode
from ..cpu.exits import VmExit
from ..cpu.svm import SvmExit

#: The bytes of VMCALL (0F 01 C1, SDM Vol. 2C): an Intel hypercall, which an AMD processor
#: answers with #UD - KVM intercepts that #UD and treats it as the hypercall.
VMCALL_BYTES = b"\x0f\x01\xc1"


class ExitKind(enum.Enum):
    """What the guest did, in vendor-neutral terms."""

    CPUID = "cpuid"
    IO = "io"
    MSR_READ = "msr-read"
    MSR_WRITE = "msr-write"
    HLT = "hlt"
    HYPERCALL = "hypercall"
    CR_READ = "cr-read"
    CR_WRITE = "cr-write"
    EXCEPTION = "exception"
    SHUTDOWN = "shutdown"         #: triple fault (VMX) / shutdown intercept (SVM)
    INVALID_STATE = "invalid-state"  #: VM-entry failure (VMX) / VMEXIT_INVALID (SVM)
    OTHER = "other"


@dataclass(frozen=True)
class IoAccess:
    port: int
    size: int          #: bytes
    is_in: bool
    string: bool = False
    rep: bool = False


@dataclass(frozen=True)
class MsrAccess:
    msr: int           #: ECX at the exit
    write: bool


@dataclass(frozen=True)
class CrAccess:
    cr: int
    write: bool
    gpr: int | None    #: the general register of a MOV (SDM register number), None otherwise


@dataclass(frozen=True)
class ExceptionEvent:
    vector: int
    error_code: int | None
    fault_address: int | None = None


Payload = Union[IoAccess, MsrAccess, CrAccess, ExceptionEvent, None]


@dataclass
class Exit:
    """A VM exit as the VMM sees it: kind, payload, where, and the vendor's own record."""

    vendor: str                 #: "VMX" or "SVM"
    kind: ExitKind
    payload: Payload
    guest_rip: int
    length: int                 #: bytes of the exiting instruction (0 for events)
    instruction: str
    native_name: str            #: "IO_INSTRUCTION" / "IOIO" ...
    native_code: int            #: exit reason / EXITCODE
    native: VmExit | SvmExit

    def summary(self) -> str:
        """One line, the same for both vendors when the guest did the same thing."""
        p = self.payload
        if isinstance(p, IoAccess):
            what = f"{'IN' if p.is_in else 'OUT'} port {p.port:#x} size {p.size}"
        elif isinstance(p, MsrAccess):
            what = f"{'WRMSR' if p.write else 'RDMSR'} {p.msr:#x}"
        elif isinstance(p, CrAccess):
            what = f"{'write' if p.write else 'read'} CR{p.cr}"
        elif isinstance(p, ExceptionEvent):
            what = f"vector {p.vector}"
        else:
            what = ""
        return f"{self.kind.value} {what}".strip() + f" at {self.guest_rip:#x}"


# ---------------------------------------------------------------------------- VT-x
def from_vmx(e: VmExit, ecx: int = 0) -> Exit:
    """A VT-x exit (basic reason + qualification, SDM Vol. 3C 28.2.1) as an :class:`Exit`.
    ``ecx``: the guest's ECX at the exit (RDMSR/WRMSR name their MSR there)."""
    r, q = e.reason, e.qualification
    payload: Payload = None
    kind = _VMX_KINDS.get(r, ExitKind.OTHER)
    if r is ExitReason.IO_INSTRUCTION:
        io = IoQualification.decode(q)
        payload = IoAccess(io.port, io.size, io.direction is IoDirection.IN, io.string, io.rep)
    elif r in (ExitReason.MSR_READ, ExitReason.MSR_WRITE):
        payload = MsrAccess(ecx & 0xFFFF_FFFF, r is ExitReason.MSR_WRITE)
    elif r is ExitReason.CR_ACCESS:
        cq = CrAccessQualification.decode(q)
        write = cq.access_type is not CrAccessType.MOV_FROM_CR
        mov = cq.access_type in (CrAccessType.MOV_TO_CR, CrAccessType.MOV_FROM_CR)
        payload = CrAccess(cq.cr, write, cq.gpr if mov else None)
        kind = ExitKind.CR_WRITE if write else ExitKind.CR_READ
    elif r is ExitReason.EXCEPTION_NMI:
        info = IntrInfo.decode(e.intr_info)
        payload = ExceptionEvent(info.vector, e.intr_error_code, q if info.vector == Vector.PF else None)
    if e.entry_failure:
        kind = ExitKind.INVALID_STATE
    return Exit("VMX", kind, payload, e.guest_rip, e.instruction_length, e.instruction, r.name, int(r), e)


_VMX_KINDS = {
    ExitReason.CPUID: ExitKind.CPUID, ExitReason.IO_INSTRUCTION: ExitKind.IO,
    ExitReason.MSR_READ: ExitKind.MSR_READ, ExitReason.MSR_WRITE: ExitKind.MSR_WRITE,
    ExitReason.HLT: ExitKind.HLT, ExitReason.VMCALL: ExitKind.HYPERCALL,
    ExitReason.EXCEPTION_NMI: ExitKind.EXCEPTION, ExitReason.TRIPLE_FAULT: ExitKind.SHUTDOWN,
    ExitReason.INVALID_STATE: ExitKind.INVALID_STATE,
}


# ---------------------------------------------------------------------------- AMD-V
def from_svm(e: SvmExit, ecx: int = 0, insn_bytes: bytes = b"") -> Exit:
    """An AMD-V #VMEXIT (EXITCODE + EXITINFO1/2, APM Vol. 2, 15.6) as an :class:`Exit`.

    ``insn_bytes``: the bytes at the guest RIP - a #UD at VMCALL (0F 01 C1) is an
    Intel-style hypercall, which the VMM serves as VMMCALL (as KVM does on AMD)."""
    code = e.code
    payload: Payload = None
    kind = _SVM_KINDS.get(code, ExitKind.OTHER)
    length = e.instruction_length
    if code == SvmExitCode.IOIO:
        io = IoioInfo.decode(e.exitinfo1)
        payload = IoAccess(io.port, io.size, io.is_in, io.string, io.rep)
    elif code == SvmExitCode.MSR:
        write = e.exitinfo1 == MSR_EXITINFO1_WRITE
        payload = MsrAccess(ecx & 0xFFFF_FFFF, write)
        kind = ExitKind.MSR_WRITE if write else ExitKind.MSR_READ
    elif 0x00 <= code < 0x20:
        write = code >= 0x10
        mov = bool(e.exitinfo1 & CR_DR_EXITINFO1_MOV)
        payload = CrAccess(code & 0xF, write, e.exitinfo1 & 0xF if mov else None)
        kind = ExitKind.CR_WRITE if write else ExitKind.CR_READ
    elif 0x40 <= code < 0x60:
        vector = code - 0x40
        if vector == Vector.UD and insn_bytes[:3] == VMCALL_BYTES:
            kind, length = ExitKind.HYPERCALL, len(VMCALL_BYTES)
        else:
            kind = ExitKind.EXCEPTION
            payload = ExceptionEvent(vector, e.exitinfo1, e.exitinfo2 if vector == Vector.PF else None)
    name = e.name
    return Exit("SVM", kind, payload, e.guest_rip, length, e.instruction, name, int(code), e)


_SVM_KINDS = {
    SvmExitCode.CPUID: ExitKind.CPUID, SvmExitCode.IOIO: ExitKind.IO, SvmExitCode.HLT: ExitKind.HLT,
    SvmExitCode.VMMCALL: ExitKind.HYPERCALL, SvmExitCode.SHUTDOWN: ExitKind.SHUTDOWN,
    SvmExitCode.INVALID: ExitKind.INVALID_STATE,
}

"""Basic VM-exit reasons (Intel SDM Vol. 3C, Appendix C "VMX Basic Exit Reasons").

When a VM exit happens the processor writes the *exit reason* VMCS field
(``VmcsField.VM_EXIT_REASON``, encoding 0x4402).  Its bits 15:0 hold the
*basic exit reason* listed here; bit 31 is set when the exit was really a
failed VM entry (SDM 25.9.1 / 27.8, "VM-Entry Failures During or After
Loading Guest State").

Names follow Linux's ``arch/x86/include/uapi/asm/vmx.h`` with the
``EXIT_REASON_`` prefix removed.  Reasons that the SDM defines but Linux does
not name (5, 11, 17, 65, 66, 69, 70, 72, 73, 78-81) get a short name built from
the SDM's wording.  Numbers 35, 38, 42 and 71 are not used by the SDM.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "ExitReason",
    "ExitReasonInfo",
    "EXIT_REASON_INFO",
    "EXIT_CATEGORIES",
    "VM_ENTRY_FAILURE_BIT",
    "EXIT_REASON_BASIC_MASK",
    "basic_exit_reason",
    "is_entry_failure",
]

#: Bit 31 of the exit-reason field: set if this "exit" is a VM-entry failure.
VM_ENTRY_FAILURE_BIT: int = 1 << 31

#: Bits 15:0 of the exit-reason field hold the basic exit reason.
EXIT_REASON_BASIC_MASK: int = 0xFFFF


class ExitReason(enum.IntEnum):
    """Basic exit reason: bits 15:0 of the VM-exit reason field (SDM Appendix C).

    ``ExitReason(10)`` is ``ExitReason.CPUID``.  ``EXIT_REASON_INFO[reason]``
    gives a plain-English description, whether the exit is unconditional and a
    coarse category.  ``VMXOFF``/``VMXON`` are aliases of Linux's
    ``VMOFF``/``VMON``.
    """

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT_SIGNAL = 3
    SIPI_SIGNAL = 4
    IO_SMI = 5
    OTHER_SMI = 6
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    TASK_SWITCH = 9
    CPUID = 10
    GETSEC = 11
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    RSM = 17
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMPTRST = 22
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMOFF = 26
    VMON = 27
    CR_ACCESS = 28
    DR_ACCESS = 29
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    INVALID_STATE = 33
    MSR_LOAD_FAIL = 34
    MWAIT_INSTRUCTION = 36
    MONITOR_TRAP_FLAG = 37
    MONITOR_INSTRUCTION = 39
    PAUSE_INSTRUCTION = 40
    MCE_DURING_VMENTRY = 41
    TPR_BELOW_THRESHOLD = 43
    APIC_ACCESS = 44
    EOI_INDUCED = 45
    GDTR_IDTR = 46
    LDTR_TR = 47
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    INVEPT = 50
    RDTSCP = 51
    PREEMPTION_TIMER = 52
    INVVPID = 53
    WBINVD = 54
    XSETBV = 55
    APIC_WRITE = 56
    RDRAND = 57
    INVPCID = 58
    VMFUNC = 59
    ENCLS = 60
    RDSEED = 61
    PML_FULL = 62
    XSAVES = 63
    XRSTORS = 64
    PCONFIG = 65
    SPP = 66
    UMWAIT = 67
    TPAUSE = 68
    LOADIWKEY = 69
    ENCLV = 70
    ENQCMD_PASID_FAIL = 72
    ENQCMDS_PASID_FAIL = 73
    BUS_LOCK = 74
    NOTIFY = 75
    SEAMCALL = 76
    TDCALL = 77
    RDMSRLIST = 78
    WRMSRLIST = 79
    URDMSR = 80
    UWRMSR = 81
    MSR_READ_IMM = 84
    MSR_WRITE_IMM = 85

    # Aliases (same value, SDM spelling of the instruction names).
    VMXOFF = 26
    VMXON = 27

    @property
    def info(self) -> "ExitReasonInfo":
        """The :class:`ExitReasonInfo` row for this reason."""
        return EXIT_REASON_INFO[self]

    @property
    def description(self) -> str:
        """One line of plain English saying what caused this exit."""
        return EXIT_REASON_INFO[self].description


#: The categories used in :data:`EXIT_REASON_INFO`.
EXIT_CATEGORIES: tuple[str, ...] = (
    "benign",
    "instruction",
    "io",
    "memory",
    "interrupt",
    "exception",
    "entry-failure",
    "other",
)


@dataclass(frozen=True)
class ExitReasonInfo:
    """What a basic exit reason means.

    Attributes:
        description: one line of plain English.
        unconditional: True if the instruction always causes a VM exit in VMX
            non-root operation, whatever the VM-execution controls say (SDM
            26.1.2 "Instructions That Cause VM Exits Unconditionally").
        category: a coarse grouping for display, one of :data:`EXIT_CATEGORIES`.
    """

    description: str
    unconditional: bool
    category: str


def _i(description: str, category: str, unconditional: bool = False) -> ExitReasonInfo:
    return ExitReasonInfo(description, unconditional, category)


_R = ExitReason

#: One :class:`ExitReasonInfo` per :class:`ExitReason` member.
EXIT_REASON_INFO: dict[ExitReason, ExitReasonInfo] = {
    _R.EXCEPTION_NMI: _i("An exception or NMI hit the guest and the exception bitmap (or NMI exiting) asked for an exit.", "exception"),
    _R.EXTERNAL_INTERRUPT: _i("An external interrupt arrived while 'external-interrupt exiting' was set.", "interrupt"),
    _R.TRIPLE_FAULT: _i("The guest triple-faulted (an exception while delivering a double fault).", "exception"),
    _R.INIT_SIGNAL: _i("An INIT signal arrived for this logical processor.", "interrupt"),
    _R.SIPI_SIGNAL: _i("A start-up IPI arrived while the guest was in the wait-for-SIPI state.", "interrupt"),
    _R.IO_SMI: _i("An SMI arrived immediately after retirement of an I/O instruction (dual-monitor SMM).", "other"),
    _R.OTHER_SMI: _i("An SMI arrived that was not an I/O SMI (dual-monitor SMM).", "other"),
    _R.INTERRUPT_WINDOW: _i("The guest became able to take interrupts and 'interrupt-window exiting' was set.", "interrupt"),
    _R.NMI_WINDOW: _i("The guest became able to take an NMI and 'NMI-window exiting' was set.", "interrupt"),
    _R.TASK_SWITCH: _i("The guest tried a hardware task switch (not an instruction exit: every task switch exits, SDM 26.2).", "other"),
    _R.CPUID: _i("The guest executed CPUID.", "benign", True),
    _R.GETSEC: _i("The guest executed GETSEC (Safer Mode Extensions).", "instruction", True),
    _R.HLT: _i("The guest executed HLT and 'HLT exiting' was set.", "benign"),
    _R.INVD: _i("The guest executed INVD.", "instruction", True),
    _R.INVLPG: _i("The guest executed INVLPG and 'INVLPG exiting' was set.", "instruction"),
    _R.RDPMC: _i("The guest executed RDPMC and 'RDPMC exiting' was set.", "instruction"),
    _R.RDTSC: _i("The guest executed RDTSC and 'RDTSC exiting' was set.", "instruction"),
    _R.RSM: _i("The guest executed RSM in SMM (dual-monitor treatment of SMM).", "instruction"),
    _R.VMCALL: _i("The guest executed VMCALL: a hypercall to the VMM.", "instruction", True),
    _R.VMCLEAR: _i("The guest executed VMCLEAR.", "instruction", True),
    _R.VMLAUNCH: _i("The guest executed VMLAUNCH.", "instruction", True),
    _R.VMPTRLD: _i("The guest executed VMPTRLD.", "instruction", True),
    _R.VMPTRST: _i("The guest executed VMPTRST.", "instruction", True),
    _R.VMREAD: _i("The guest executed VMREAD (exits unless VMCS shadowing lets it through).", "instruction"),
    _R.VMRESUME: _i("The guest executed VMRESUME.", "instruction", True),
    _R.VMWRITE: _i("The guest executed VMWRITE (exits unless VMCS shadowing lets it through).", "instruction"),
    _R.VMOFF: _i("The guest executed VMXOFF.", "instruction", True),
    _R.VMON: _i("The guest executed VMXON.", "instruction", True),
    _R.CR_ACCESS: _i("The guest accessed a control register (MOV to/from CR, CLTS or LMSW) in a way the controls trap.", "instruction"),
    _R.DR_ACCESS: _i("The guest executed MOV to/from a debug register and 'MOV-DR exiting' was set.", "instruction"),
    _R.IO_INSTRUCTION: _i("The guest executed IN/OUT/INS/OUTS on a port the I/O controls trap.", "io"),
    _R.MSR_READ: _i("The guest executed RDMSR on an MSR the MSR bitmap (or its absence) traps.", "instruction"),
    _R.MSR_WRITE: _i("The guest executed WRMSR on an MSR the MSR bitmap (or its absence) traps.", "instruction"),
    _R.INVALID_STATE: _i("VM entry failed: the guest-state area failed the SDM's checks.", "entry-failure"),
    _R.MSR_LOAD_FAIL: _i("VM entry failed while loading MSRs from the VM-entry MSR-load area.", "entry-failure"),
    _R.MWAIT_INSTRUCTION: _i("The guest executed MWAIT and 'MWAIT exiting' was set.", "benign"),
    _R.MONITOR_TRAP_FLAG: _i("The monitor trap flag fired: one guest instruction was single-stepped.", "other"),
    _R.MONITOR_INSTRUCTION: _i("The guest executed MONITOR and 'MONITOR exiting' was set.", "benign"),
    _R.PAUSE_INSTRUCTION: _i("The guest executed PAUSE ('PAUSE exiting' or PAUSE-loop exiting).", "benign"),
    _R.MCE_DURING_VMENTRY: _i("VM entry failed because of a machine-check event.", "entry-failure"),
    _R.TPR_BELOW_THRESHOLD: _i("The guest lowered its virtual TPR below the TPR threshold.", "interrupt"),
    _R.APIC_ACCESS: _i("The guest accessed the APIC-access page.", "memory"),
    _R.EOI_INDUCED: _i("The guest wrote EOI for a vector set in the EOI-exit bitmap (virtualized EOI).", "interrupt"),
    _R.GDTR_IDTR: _i("The guest executed LGDT, LIDT, SGDT or SIDT and descriptor-table exiting was set.", "instruction"),
    _R.LDTR_TR: _i("The guest executed LLDT, LTR, SLDT or STR and descriptor-table exiting was set.", "instruction"),
    _R.EPT_VIOLATION: _i("A guest-physical access was not allowed by the EPT paging structures.", "memory"),
    _R.EPT_MISCONFIG: _i("An EPT paging-structure entry was misconfigured (e.g. write without read).", "memory"),
    _R.INVEPT: _i("The guest executed INVEPT.", "instruction", True),
    _R.RDTSCP: _i("The guest executed RDTSCP and 'RDTSC exiting' was set.", "instruction"),
    _R.PREEMPTION_TIMER: _i("The VMX-preemption timer counted down to zero.", "interrupt"),
    _R.INVVPID: _i("The guest executed INVVPID.", "instruction", True),
    _R.WBINVD: _i("The guest executed WBINVD or WBNOINVD and 'WBINVD exiting' was set.", "instruction"),
    _R.XSETBV: _i("The guest executed XSETBV.", "instruction", True),
    _R.APIC_WRITE: _i("The guest completed a write to the virtual-APIC page that must be virtualized by the VMM.", "memory"),
    _R.RDRAND: _i("The guest executed RDRAND and 'RDRAND exiting' was set.", "instruction"),
    _R.INVPCID: _i("The guest executed INVPCID and 'INVLPG exiting' was set.", "instruction"),
    _R.VMFUNC: _i("The guest executed VMFUNC and the VM function failed or is not enabled.", "instruction"),
    _R.ENCLS: _i("The guest executed ENCLS (SGX) and the ENCLS-exiting bitmap asked for an exit.", "instruction"),
    _R.RDSEED: _i("The guest executed RDSEED and 'RDSEED exiting' was set.", "instruction"),
    _R.PML_FULL: _i("The page-modification log is full.", "memory"),
    _R.XSAVES: _i("The guest executed XSAVES and the XSS-exiting bitmap asked for an exit.", "instruction"),
    _R.XRSTORS: _i("The guest executed XRSTORS and the XSS-exiting bitmap asked for an exit.", "instruction"),
    _R.PCONFIG: _i("The guest executed PCONFIG and the PCONFIG-exiting bitmap asked for an exit.", "instruction"),
    _R.SPP: _i("An SPP-related event: a sub-page write-permission check needed the VMM.", "memory"),
    _R.UMWAIT: _i("The guest executed UMWAIT with 'enable user wait and pause' and 'RDTSC exiting' set.", "benign"),
    _R.TPAUSE: _i("The guest executed TPAUSE with 'enable user wait and pause' and 'RDTSC exiting' set.", "benign"),
    _R.LOADIWKEY: _i("The guest executed LOADIWKEY (Key Locker) and 'LOADIWKEY exiting' was set.", "instruction"),
    _R.ENCLV: _i("The guest executed ENCLV (SGX) and the ENCLV-exiting bitmap asked for an exit.", "instruction"),
    _R.ENQCMD_PASID_FAIL: _i("ENQCMD could not translate the guest PASID.", "other"),
    _R.ENQCMDS_PASID_FAIL: _i("ENQCMDS could not translate the guest PASID.", "other"),
    _R.BUS_LOCK: _i("The guest acquired a bus lock and 'VMM bus-lock detection' was set.", "other"),
    _R.NOTIFY: _i("Instruction timeout: no event window opened within the notify window.", "other"),
    _R.SEAMCALL: _i("The guest executed SEAMCALL (TDX).", "instruction", True),
    _R.TDCALL: _i("The guest executed TDCALL (TDX).", "instruction", True),
    _R.RDMSRLIST: _i("The guest executed RDMSRLIST.", "instruction"),
    _R.WRMSRLIST: _i("The guest executed WRMSRLIST.", "instruction"),
    _R.URDMSR: _i("The guest executed URDMSR (user-mode MSR read).", "instruction"),
    _R.UWRMSR: _i("The guest executed UWRMSR (user-mode MSR write).", "instruction"),
    _R.MSR_READ_IMM: _i("The guest executed RDMSR with an immediate MSR number on a trapped MSR.", "instruction"),
    _R.MSR_WRITE_IMM: _i("The guest executed WRMSRNS with an immediate MSR number on a trapped MSR.", "instruction"),
}


def basic_exit_reason(exit_reason_field: int) -> ExitReason | int:
    """Bits 15:0 of an exit-reason field value, as an :class:`ExitReason` if known.

    >>> basic_exit_reason(0x80000021)
    <ExitReason.INVALID_STATE: 33>
    """
    basic = exit_reason_field & EXIT_REASON_BASIC_MASK
    try:
        return ExitReason(basic)
    except ValueError:
        return basic


def is_entry_failure(exit_reason_field: int) -> bool:
    """True if bit 31 (VM-entry failure) of an exit-reason field value is set."""
    return bool(exit_reason_field & VM_ENTRY_FAILURE_BIT)

"""VM-execution, VM-exit and VM-entry control bits (Intel SDM Vol. 3C, 25.6-25.8).

* :class:`PinBased` - Table 25-5 "Definitions of Pin-Based VM-Execution Controls"
* :class:`ProcBased` - Table 25-6 "Definitions of Primary Processor-Based VM-Execution Controls"
* :class:`ProcBased2` - Table 25-7 "Definitions of Secondary Processor-Based VM-Execution Controls"
* :class:`ExitControl` - Table 25-13 "Definitions of Primary VM-Exit Controls"
* :class:`EntryControl` - Table 25-15 "Definitions of VM-Entry Controls"

(Table numbers are those of the edition in :data:`vtlab.arch.SDM_EDITION`; editions
before the VMX chapters moved up by one number the chapter 24.)  Member names are Linux's (``arch/x86/include/asm/vmx.h``) without
the ``PIN_BASED_`` / ``CPU_BASED_`` / ``SECONDARY_EXEC_`` / ``VM_EXIT_`` /
``VM_ENTRY_`` prefix.  Bits the SDM defines but Linux does not name get a name
in the same style.

The ``*_DEFAULT1`` constants are the SDM's "default1" classes (Appendix A.3-A.5):
reserved bits that must be 1 unless the TRUE capability MSRs allow 0.
"""
from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Union

from .bits import RegisterBits
from .vmcs_fields import VmcsField

__all__ = [
    "PinBased",
    "ProcBased",
    "ProcBased2",
    "ExitControl",
    "EntryControl",
    "ControlFlag",
    "CONTROL_CLASSES",
    "ControlInfo",
    "CONTROL_INFO",
    "CONTROL_FIELD",
    "ControlField",
    "PIN_BASED_DEFAULT1",
    "PROC_BASED_DEFAULT1",
    "PROC_BASED2_DEFAULT1",
    "EXIT_CONTROL_DEFAULT1",
    "ENTRY_CONTROL_DEFAULT1",
    "DEFAULT1",
    "control_names",
]


class PinBased(RegisterBits):
    """Pin-based VM-execution controls (VMCS field PIN_BASED_VM_EXEC_CONTROL, 0x4000).

    They govern asynchronous events: external interrupts and NMIs.
    ``CONTROL_INFO[PinBased.NMI_EXITING]`` has the SDM name and a tooltip.
    """

    EXT_INTR_MASK = 1 << 0
    NMI_EXITING = 1 << 3
    VIRTUAL_NMIS = 1 << 5
    VMX_PREEMPTION_TIMER = 1 << 6
    POSTED_INTR = 1 << 7


class ProcBased(RegisterBits):
    """Primary processor-based VM-execution controls (CPU_BASED_VM_EXEC_CONTROL, 0x4002).

    They decide which guest instructions cause VM exits.
    """

    INTR_WINDOW_EXITING = 1 << 2
    USE_TSC_OFFSETTING = 1 << 3
    HLT_EXITING = 1 << 7
    INVLPG_EXITING = 1 << 9
    MWAIT_EXITING = 1 << 10
    RDPMC_EXITING = 1 << 11
    RDTSC_EXITING = 1 << 12
    CR3_LOAD_EXITING = 1 << 15
    CR3_STORE_EXITING = 1 << 16
    ACTIVATE_TERTIARY_CONTROLS = 1 << 17
    CR8_LOAD_EXITING = 1 << 19
    CR8_STORE_EXITING = 1 << 20
    TPR_SHADOW = 1 << 21
    NMI_WINDOW_EXITING = 1 << 22
    MOV_DR_EXITING = 1 << 23
    UNCOND_IO_EXITING = 1 << 24
    USE_IO_BITMAPS = 1 << 25
    MONITOR_TRAP_FLAG = 1 << 27
    USE_MSR_BITMAPS = 1 << 28
    MONITOR_EXITING = 1 << 29
    PAUSE_EXITING = 1 << 30
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class ProcBased2(RegisterBits):
    """Secondary processor-based VM-execution controls (SECONDARY_VM_EXEC_CONTROL, 0x401E).

    Only used if ``ProcBased.ACTIVATE_SECONDARY_CONTROLS`` is set.
    """

    VIRTUALIZE_APIC_ACCESSES = 1 << 0
    ENABLE_EPT = 1 << 1
    DESC = 1 << 2
    ENABLE_RDTSCP = 1 << 3
    VIRTUALIZE_X2APIC_MODE = 1 << 4
    ENABLE_VPID = 1 << 5
    WBINVD_EXITING = 1 << 6
    UNRESTRICTED_GUEST = 1 << 7
    APIC_REGISTER_VIRT = 1 << 8
    VIRTUAL_INTR_DELIVERY = 1 << 9
    PAUSE_LOOP_EXITING = 1 << 10
    RDRAND_EXITING = 1 << 11
    ENABLE_INVPCID = 1 << 12
    ENABLE_VMFUNC = 1 << 13
    SHADOW_VMCS = 1 << 14
    ENCLS_EXITING = 1 << 15
    RDSEED_EXITING = 1 << 16
    ENABLE_PML = 1 << 17
    EPT_VIOLATION_VE = 1 << 18
    PT_CONCEAL_VMX = 1 << 19
    ENABLE_XSAVES = 1 << 20
    PASID_TRANSLATION = 1 << 21
    MODE_BASED_EPT_EXEC = 1 << 22
    ENABLE_SPP = 1 << 23
    PT_USE_GPA = 1 << 24
    TSC_SCALING = 1 << 25
    ENABLE_USR_WAIT_PAUSE = 1 << 26
    ENABLE_PCONFIG = 1 << 27
    ENCLV_EXITING = 1 << 28
    BUS_LOCK_DETECTION = 1 << 30
    NOTIFY_VM_EXITING = 1 << 31


class ExitControl(RegisterBits):
    """Primary VM-exit controls (VM_EXIT_CONTROLS, 0x400C): what happens on VM exit."""

    SAVE_DEBUG_CONTROLS = 1 << 2
    HOST_ADDR_SPACE_SIZE = 1 << 9
    LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 12
    ACK_INTR_ON_EXIT = 1 << 15
    SAVE_IA32_PAT = 1 << 18
    LOAD_IA32_PAT = 1 << 19
    SAVE_IA32_EFER = 1 << 20
    LOAD_IA32_EFER = 1 << 21
    SAVE_VMX_PREEMPTION_TIMER = 1 << 22
    CLEAR_BNDCFGS = 1 << 23
    PT_CONCEAL_PIP = 1 << 24
    CLEAR_IA32_RTIT_CTL = 1 << 25
    CLEAR_IA32_LBR_CTL = 1 << 26
    CLEAR_UINV = 1 << 27
    LOAD_CET_STATE = 1 << 28
    LOAD_IA32_PKRS = 1 << 29
    SAVE_IA32_PERF_GLOBAL_CTRL = 1 << 30
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class EntryControl(RegisterBits):
    """VM-entry controls (VM_ENTRY_CONTROLS, 0x4012): what happens on VM entry."""

    LOAD_DEBUG_CONTROLS = 1 << 2
    IA32E_MODE = 1 << 9
    SMM = 1 << 10
    DEACT_DUAL_MONITOR = 1 << 11
    LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 13
    LOAD_IA32_PAT = 1 << 14
    LOAD_IA32_EFER = 1 << 15
    LOAD_BNDCFGS = 1 << 16
    PT_CONCEAL_PIP = 1 << 17
    LOAD_IA32_RTIT_CTL = 1 << 18
    LOAD_UINV = 1 << 19
    LOAD_CET_STATE = 1 << 20
    LOAD_IA32_LBR_CTL = 1 << 21
    LOAD_IA32_PKRS = 1 << 22
    LOAD_IA32_FRED = 1 << 23


#: Any member of one of the five control classes.
ControlFlag = Union[PinBased, ProcBased, ProcBased2, ExitControl, EntryControl]

#: The five control classes, in VMCS order.
CONTROL_CLASSES: tuple[type[enum.IntFlag], ...] = (
    PinBased,
    ProcBased,
    ProcBased2,
    ExitControl,
    EntryControl,
)

# SDM Appendix A.3-A.5: bits reserved to 1 in the default settings.
#: Pin-based default1 bits (1, 2, 4).
PIN_BASED_DEFAULT1: int = 0x00000016
#: Primary processor-based default1 bits (1, 4-6, 8, 13-16, 26).
PROC_BASED_DEFAULT1: int = 0x0401E172
#: Secondary processor-based controls have no default1 bits.
PROC_BASED2_DEFAULT1: int = 0x00000000
#: Primary VM-exit default1 bits (0-8, 10, 11, 13, 14, 16, 17).
EXIT_CONTROL_DEFAULT1: int = 0x00036DFF
#: VM-entry default1 bits (0-8, 12).
ENTRY_CONTROL_DEFAULT1: int = 0x000011FF

#: default1 mask for each control class.
DEFAULT1: dict[type[enum.IntFlag], int] = {
    PinBased: PIN_BASED_DEFAULT1,
    ProcBased: PROC_BASED_DEFAULT1,
    ProcBased2: PROC_BASED2_DEFAULT1,
    ExitControl: EXIT_CONTROL_DEFAULT1,
    EntryControl: ENTRY_CONTROL_DEFAULT1,
}

#: The VMCS field that holds each control class.
CONTROL_FIELD: dict[type[enum.IntFlag], VmcsField] = {
    PinBased: VmcsField.PIN_BASED_VM_EXEC_CONTROL,
    ProcBased: VmcsField.CPU_BASED_VM_EXEC_CONTROL,
    ProcBased2: VmcsField.SECONDARY_VM_EXEC_CONTROL,
    ExitControl: VmcsField.VM_EXIT_CONTROLS,
    EntryControl: VmcsField.VM_ENTRY_CONTROLS,
}
#: Same mapping as :data:`CONTROL_FIELD` (the name used in the design notes).
ControlField = CONTROL_FIELD


@dataclass(frozen=True)
class ControlInfo:
    """Tooltip data for one control bit.

    Attributes:
        bit: bit position in its 32-bit control field.
        sdm_name: the control's name in the SDM tables.
        description: one line saying what setting the bit does.
    """

    bit: int
    sdm_name: str
    description: str


class _ControlInfoTable(Mapping):
    """``CONTROL_INFO[member]`` -> :class:`ControlInfo`.

    A dict cannot hold these keys directly: ``PinBased.EXT_INTR_MASK`` and
    ``ProcBased2.VIRTUALIZE_APIC_ACCESSES`` are both equal to the int 1.  This
    mapping keys on (class, value) so each member gets its own entry.
    """

    def __init__(self) -> None:
        self._data: dict[tuple[type, int], tuple[ControlFlag, ControlInfo]] = {}

    def _add(self, member: ControlFlag, sdm_name: str, description: str) -> None:
        value = int(member)
        bit = value.bit_length() - 1
        self._data[(type(member), value)] = (member, ControlInfo(bit, sdm_name, description))

    def __getitem__(self, member: ControlFlag) -> ControlInfo:
        if not isinstance(member, CONTROL_CLASSES):
            raise KeyError(member)
        return self._data[(type(member), int(member))][1]

    def __contains__(self, member: object) -> bool:
        return isinstance(member, CONTROL_CLASSES) and (type(member), int(member)) in self._data

    def __iter__(self) -> Iterator[ControlFlag]:
        return (m for m, _ in self._data.values())

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<CONTROL_INFO: {len(self)} control bits>"


#: Tooltip (:class:`ControlInfo`) for every bit of every control class.
CONTROL_INFO: Mapping[ControlFlag, ControlInfo] = _ControlInfoTable()


def _fill(table: _ControlInfoTable) -> None:
    P, C, S, X, E = PinBased, ProcBased, ProcBased2, ExitControl, EntryControl
    rows: list[tuple[ControlFlag, str, str]] = [
        (P.EXT_INTR_MASK, "External-interrupt exiting", "External interrupts cause VM exits instead of going through the guest IDT."),
        (P.NMI_EXITING, "NMI exiting", "Non-maskable interrupts cause VM exits instead of going through the guest IDT."),
        (P.VIRTUAL_NMIS, "Virtual NMIs", "NMI blocking is tracked virtually, so the VMM can inject NMIs and use NMI-window exiting."),
        (P.VMX_PREEMPTION_TIMER, "Activate VMX-preemption timer", "The VMX-preemption timer counts down in the guest and forces a VM exit at zero."),
        (P.POSTED_INTR, "Process posted interrupts", "Interrupts with the posted-interrupt notification vector update the virtual APIC without an exit."),
        (C.INTR_WINDOW_EXITING, "Interrupt-window exiting", "VM exit as soon as the guest can accept an external interrupt (RFLAGS.IF=1, no blocking)."),
        (C.USE_TSC_OFFSETTING, "Use TSC offsetting", "RDTSC/RDTSCP/RDMSR(TSC) in the guest return the TSC plus the TSC offset field."),
        (C.HLT_EXITING, "HLT exiting", "HLT causes a VM exit."),
        (C.INVLPG_EXITING, "INVLPG exiting", "INVLPG (and INVPCID) cause VM exits."),
        (C.MWAIT_EXITING, "MWAIT exiting", "MWAIT causes a VM exit."),
        (C.RDPMC_EXITING, "RDPMC exiting", "RDPMC causes a VM exit."),
        (C.RDTSC_EXITING, "RDTSC exiting", "RDTSC and RDTSCP cause VM exits."),
        (C.CR3_LOAD_EXITING, "CR3-load exiting", "MOV to CR3 exits unless the value matches a CR3-target value."),
        (C.CR3_STORE_EXITING, "CR3-store exiting", "MOV from CR3 causes a VM exit."),
        (C.ACTIVATE_TERTIARY_CONTROLS, "Activate tertiary controls", "Use the tertiary processor-based VM-execution controls."),
        (C.CR8_LOAD_EXITING, "CR8-load exiting", "MOV to CR8 (the TPR) causes a VM exit."),
        (C.CR8_STORE_EXITING, "CR8-store exiting", "MOV from CR8 (the TPR) causes a VM exit."),
        (C.TPR_SHADOW, "Use TPR shadow", "TPR accesses go to the virtual-APIC page instead of exiting."),
        (C.NMI_WINDOW_EXITING, "NMI-window exiting", "VM exit as soon as there is no virtual-NMI blocking (needs virtual NMIs)."),
        (C.MOV_DR_EXITING, "MOV-DR exiting", "MOV to or from a debug register causes a VM exit."),
        (C.UNCOND_IO_EXITING, "Unconditional I/O exiting", "Every IN/INS/OUT/OUTS exits (ignored when I/O bitmaps are used)."),
        (C.USE_IO_BITMAPS, "Use I/O bitmaps", "I/O bitmaps A and B decide, port by port, which I/O instructions exit."),
        (C.MONITOR_TRAP_FLAG, "Monitor trap flag", "VM exit after the guest executes one instruction: single-stepping for the VMM."),
        (C.USE_MSR_BITMAPS, "Use MSR bitmaps", "The MSR bitmaps decide which RDMSR/WRMSR exit; without them every one exits."),
        (C.MONITOR_EXITING, "MONITOR exiting", "MONITOR causes a VM exit."),
        (C.PAUSE_EXITING, "PAUSE exiting", "PAUSE causes a VM exit."),
        (C.ACTIVATE_SECONDARY_CONTROLS, "Activate secondary controls", "Use the secondary processor-based VM-execution controls (EPT, VPID, ...)."),
        (S.VIRTUALIZE_APIC_ACCESSES, "Virtualize APIC accesses", "Accesses to the APIC-access page are virtualized or cause APIC-access exits."),
        (S.ENABLE_EPT, "Enable EPT", "Guest-physical addresses are translated through the extended page tables."),
        (S.DESC, "Descriptor-table exiting", "LGDT, LIDT, LLDT, LTR, SGDT, SIDT, SLDT and STR cause VM exits."),
        (S.ENABLE_RDTSCP, "Enable RDTSCP", "RDTSCP is allowed in the guest (otherwise it raises #UD)."),
        (S.VIRTUALIZE_X2APIC_MODE, "Virtualize x2APIC mode", "RDMSR/WRMSR to x2APIC MSRs are virtualized through the virtual-APIC page."),
        (S.ENABLE_VPID, "Enable VPID", "TLB entries are tagged with the virtual-processor identifier."),
        (S.WBINVD_EXITING, "WBINVD exiting", "WBINVD and WBNOINVD cause VM exits."),
        (S.UNRESTRICTED_GUEST, "Unrestricted guest", "The guest may run with paging off or in real mode (needs EPT)."),
        (S.APIC_REGISTER_VIRT, "APIC-register virtualization", "Reads of most APIC registers are served from the virtual-APIC page."),
        (S.VIRTUAL_INTR_DELIVERY, "Virtual-interrupt delivery", "The CPU evaluates and delivers pending virtual interrupts itself."),
        (S.PAUSE_LOOP_EXITING, "PAUSE-loop exiting", "A PAUSE spin loop at CPL 0 longer than PLE_WINDOW causes a VM exit."),
        (S.RDRAND_EXITING, "RDRAND exiting", "RDRAND causes a VM exit."),
        (S.ENABLE_INVPCID, "Enable INVPCID", "INVPCID is allowed in the guest (otherwise it raises #UD)."),
        (S.ENABLE_VMFUNC, "Enable VM functions", "VMFUNC is allowed in the guest for the functions enabled in VM_FUNCTION_CONTROL."),
        (S.SHADOW_VMCS, "VMCS shadowing", "Guest VMREAD/VMWRITE may access a shadow VMCS instead of exiting."),
        (S.ENCLS_EXITING, "Enable ENCLS exiting", "ENCLS leaves selected by the ENCLS-exiting bitmap cause VM exits."),
        (S.RDSEED_EXITING, "RDSEED exiting", "RDSEED causes a VM exit."),
        (S.ENABLE_PML, "Enable PML", "Guest-physical pages that get dirtied are logged in the page-modification log."),
        (S.EPT_VIOLATION_VE, "EPT-violation #VE", "Some EPT violations become #VE exceptions in the guest instead of VM exits."),
        (S.PT_CONCEAL_VMX, "Conceal VMX from PT", "Intel Processor Trace hides that the code runs in VMX non-root operation."),
        (S.ENABLE_XSAVES, "Enable XSAVES/XRSTORS", "XSAVES and XRSTORS are allowed in the guest (otherwise #UD)."),
        (S.PASID_TRANSLATION, "PASID translation", "ENQCMD/ENQCMDS translate guest PASIDs to host PASIDs."),
        (S.MODE_BASED_EPT_EXEC, "Mode-based execute control for EPT", "EPT has separate execute permissions for supervisor and user linear addresses."),
        (S.ENABLE_SPP, "Sub-page write permissions for EPT", "EPT write permission can be set per 128-byte sub-page."),
        (S.PT_USE_GPA, "Intel PT uses guest physical addresses", "Processor Trace output addresses are guest-physical and go through EPT."),
        (S.TSC_SCALING, "Use TSC scaling", "The TSC the guest reads is multiplied by the TSC multiplier."),
        (S.ENABLE_USR_WAIT_PAUSE, "Enable user wait and pause", "TPAUSE, UMONITOR and UMWAIT are allowed in the guest (otherwise #UD)."),
        (S.ENABLE_PCONFIG, "Enable PCONFIG", "PCONFIG is allowed in the guest (otherwise #UD)."),
        (S.ENCLV_EXITING, "Enable ENCLV exiting", "ENCLV leaves selected by the ENCLV-exiting bitmap cause VM exits."),
        (S.BUS_LOCK_DETECTION, "VMM bus-lock detection", "A bus lock taken by the guest causes a VM exit after the instruction."),
        (S.NOTIFY_VM_EXITING, "Instruction timeout", "VM exit if the guest runs NOTIFY_WINDOW cycles without an event window."),
        (X.SAVE_DEBUG_CONTROLS, "Save debug controls", "DR7 and IA32_DEBUGCTL are saved to the guest-state area on VM exit."),
        (X.HOST_ADDR_SPACE_SIZE, "Host address-space size", "The host runs in 64-bit mode after VM exit (must be 1 for a 64-bit VMM)."),
        (X.LOAD_IA32_PERF_GLOBAL_CTRL, "Load IA32_PERF_GLOBAL_CTRL", "IA32_PERF_GLOBAL_CTRL is loaded from the host-state area on VM exit."),
        (X.ACK_INTR_ON_EXIT, "Acknowledge interrupt on exit", "On an external-interrupt exit the CPU acknowledges it and stores the vector."),
        (X.SAVE_IA32_PAT, "Save IA32_PAT", "IA32_PAT is saved to the guest-state area on VM exit."),
        (X.LOAD_IA32_PAT, "Load IA32_PAT", "IA32_PAT is loaded from the host-state area on VM exit."),
        (X.SAVE_IA32_EFER, "Save IA32_EFER", "IA32_EFER is saved to the guest-state area on VM exit."),
        (X.LOAD_IA32_EFER, "Load IA32_EFER", "IA32_EFER is loaded from the host-state area on VM exit."),
        (X.SAVE_VMX_PREEMPTION_TIMER, "Save VMX-preemption timer value", "The remaining preemption-timer value is saved on VM exit."),
        (X.CLEAR_BNDCFGS, "Clear IA32_BNDCFGS", "IA32_BNDCFGS (MPX) is cleared on VM exit."),
        (X.PT_CONCEAL_PIP, "Conceal VMX from PT", "Processor Trace does not report the VM exit (no PIP/VMCS packets)."),
        (X.CLEAR_IA32_RTIT_CTL, "Clear IA32_RTIT_CTL", "IA32_RTIT_CTL (Processor Trace) is cleared on VM exit."),
        (X.CLEAR_IA32_LBR_CTL, "Clear IA32_LBR_CTL", "IA32_LBR_CTL (architectural LBRs) is cleared on VM exit."),
        (X.CLEAR_UINV, "Clear UINV", "UINV (user-interrupt notification vector) is cleared on VM exit."),
        (X.LOAD_CET_STATE, "Load CET state", "IA32_S_CET, SSP and IA32_INTERRUPT_SSP_TABLE_ADDR are loaded on VM exit."),
        (X.LOAD_IA32_PKRS, "Load PKRS", "IA32_PKRS is loaded from the host-state area on VM exit."),
        (X.SAVE_IA32_PERF_GLOBAL_CTRL, "Save IA32_PERF_GLOBAL_CTL", "IA32_PERF_GLOBAL_CTRL is saved to the guest-state area on VM exit."),
        (X.ACTIVATE_SECONDARY_CONTROLS, "Activate secondary controls", "Use the secondary VM-exit controls."),
        (E.LOAD_DEBUG_CONTROLS, "Load debug controls", "DR7 and IA32_DEBUGCTL are loaded from the guest-state area on VM entry."),
        (E.IA32E_MODE, "IA-32e mode guest", "The guest runs in IA-32e (long) mode after VM entry; IA32_EFER.LMA is set."),
        (E.SMM, "Entry to SMM", "VM entry returns to system-management mode (dual-monitor treatment only)."),
        (E.DEACT_DUAL_MONITOR, "Deactivate dual-monitor treatment", "The dual-monitor treatment of SMIs and SMM is turned off after VM entry."),
        (E.LOAD_IA32_PERF_GLOBAL_CTRL, "Load IA32_PERF_GLOBAL_CTRL", "IA32_PERF_GLOBAL_CTRL is loaded from the guest-state area on VM entry."),
        (E.LOAD_IA32_PAT, "Load IA32_PAT", "IA32_PAT is loaded from the guest-state area on VM entry."),
        (E.LOAD_IA32_EFER, "Load IA32_EFER", "IA32_EFER is loaded from the guest-state area on VM entry."),
        (E.LOAD_BNDCFGS, "Load IA32_BNDCFGS", "IA32_BNDCFGS (MPX) is loaded from the guest-state area on VM entry."),
        (E.PT_CONCEAL_PIP, "Conceal VMX from PT", "Processor Trace does not report the VM entry (no PIP/VMCS packets)."),
        (E.LOAD_IA32_RTIT_CTL, "Load IA32_RTIT_CTL", "IA32_RTIT_CTL (Processor Trace) is loaded from the guest-state area on VM entry."),
        (E.LOAD_UINV, "Load UINV", "UINV is loaded from the guest-state area on VM entry."),
        (E.LOAD_CET_STATE, "Load CET state", "Guest IA32_S_CET, SSP and interrupt SSP table address are loaded on VM entry."),
        (E.LOAD_IA32_LBR_CTL, "Load guest IA32_LBR_CTL", "IA32_LBR_CTL is loaded from the guest-state area on VM entry."),
        (E.LOAD_IA32_PKRS, "Load PKRS", "IA32_PKRS is loaded from the guest-state area on VM entry."),
        (E.LOAD_IA32_FRED, "Load FRED", "The guest's FRED MSRs are loaded from the guest-state area on VM entry."),
    ]
    for member, sdm_name, description in rows:
        table._add(member, sdm_name, description)


_fill(CONTROL_INFO)  # type: ignore[arg-type]


def control_names(cls: type[enum.IntFlag], value: int) -> list[str]:
    """Names of the defined bits of ``cls`` that are set in ``value``, lowest bit first.

    >>> control_names(ProcBased, 0x80 | 0x1000000)
    ['HLT_EXITING', 'UNCOND_IO_EXITING']
    """
    return [m.name for m in cls.__members__.values() if int(m) & value == int(m) and int(m)]  # type: ignore[misc]

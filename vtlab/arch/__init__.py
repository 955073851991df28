"""The Intel SDM's VMX tables as Python data.

Every number here is the architectural value from the Intel SDM (Vol. 3C
chapters 24-31 and Appendices A-C) and matches Linux's
``arch/x86/include/asm/vmx.h``, ``uapi/asm/vmx.h`` and ``msr-index.h``:

* :mod:`.exit_reasons` - basic VM-exit reasons (Appendix C)
* :mod:`.vmcs_fields` - VMCS field encodings and their decoder (Appendix B)
* :mod:`.controls` - pin-based, processor-based, VM-exit and VM-entry controls
* :mod:`.errors` - VM-instruction error numbers
* :mod:`.msrs` - MSR numbers and CR0/CR4/EFER/RFLAGS/IA32_FEATURE_CONTROL bits
* :mod:`.exceptions` - exception vectors and the interruption-information format
* :mod:`.qualifications` - exit-qualification layouts
* :mod:`.ept` - the EPTP and EPT entry formats, IA32_VMX_EPT_VPID_CAP, INVEPT/INVVPID types
* :mod:`.segments` - the segment access-rights format (S, P, L, D/B, G, unusable, types)
* :mod:`.interrupts` - interruptibility and activity states, interrupt-shadow opcodes, the
  preemption-timer rate field, the PC's 8259A PIC and 8254 PIT ports and command words

Section numbers cited anywhere in vtlab are those of the edition in :data:`SDM_EDITION`
(Vol. 3C: 24 Introduction to VMX, 25 VMCS, 26 VMX non-root operation, 27 VM entries,
28 VM exits, 29 address translation, 30 APIC virtualization, 31 VMX instruction reference;
:data:`SDM_VMX_CHAPTERS`).
"""
from __future__ import annotations

#: Order number of the SDM edition vtlab cites (325462 = the combined volumes; 084 = the
#: revision).  Everything else that names the edition is built from this one string.
SDM_ORDER_NUMBER = "325462-084US"

#: The Intel SDM edition whose section and table numbers vtlab cites.
SDM_EDITION = ("Intel 64 and IA-32 Architectures Software Developer's Manual, Combined "
               f"Volumes 1-4, Order Number {SDM_ORDER_NUMBER}, June 2024")

#: The VMX chapters of Vol. 3C in that edition (older editions numbered them
#: 23-30: a citation "24.11.5" there is "25.11.5" here).
SDM_VMX_CHAPTERS = {
    24: "Introduction to Virtual Machine Extensions",
    25: "Virtual Machine Control Structures",
    26: "VMX Non-Root Operation",
    27: "VM Entries",
    28: "VM Exits",
    29: "VMX Support for Address Translation",
    30: "APIC Virtualization and Virtual Interrupts",
    31: "VMX Instruction Reference",
}

from .controls import (
    CONTROL_CLASSES,
    CONTROL_FIELD,
    CONTROL_INFO,
    DEFAULT1,
    ENTRY_CONTROL_DEFAULT1,
    EXIT_CONTROL_DEFAULT1,
    PIN_BASED_DEFAULT1,
    PROC_BASED2_DEFAULT1,
    PROC_BASED_DEFAULT1,
    ControlField,
    ControlFlag,
    ControlInfo,
    EntryControl,
    ExitControl,
    PinBased,
    ProcBased,
    ProcBased2,
    control_names,
)
from .errors import VM_INSTRUCTION_ERROR_DESCRIPTIONS, VmInstructionError
from .exceptions import (
    EXCEPTION_INFO,
    INTR_INFO_DELIVER_CODE,
    INTR_INFO_NMI_UNBLOCKING,
    INTR_INFO_TYPE_MASK,
    INTR_INFO_TYPE_SHIFT,
    INTR_INFO_VALID,
    INTR_INFO_VECTOR_MASK,
    ExceptionInfo,
    InterruptionType,
    IntrInfo,
    Vector,
)
from .exit_reasons import (
    EXIT_CATEGORIES,
    EXIT_REASON_BASIC_MASK,
    EXIT_REASON_INFO,
    VM_ENTRY_FAILURE_BIT,
    ExitReason,
    ExitReasonInfo,
    basic_exit_reason,
    is_entry_failure,
)
from .msrs import RFLAGS_IOPL_SHIFT, Cr0, Cr4, Efer, FeatureControl, Msr, Rflags
from .qualifications import (
    GPR_ORDER,
    CrAccessQualification,
    CrAccessType,
    DrAccessDirection,
    DrAccessQualification,
    EptViolationQualification,
    IoDirection,
    IoQualification,
    gpr_name,
)
from .ept import EptEntry, EptMemoryType, Eptp, EptVpidCap, InveptType, InvvpidType
from .interrupts import ActivityState, Interruptibility
from .segments import AR_DPL_SHIFT, AR_RESERVED, AccessRights, CodeDataType, SystemType
from .vmcs_fields import (
    FIELD_DESCRIPTIONS,
    VMCS_MAX_INDEX,
    AccessType,
    FieldEncoding,
    FieldType,
    FieldWidth,
    VmcsArea,
    VmcsField,
    decode_encoding,
    field_area,
    make_encoding,
)

__all__ = [
    "SDM_EDITION",
    "SDM_ORDER_NUMBER",
    "SDM_VMX_CHAPTERS",
    # exit_reasons
    "ExitReason",
    "ExitReasonInfo",
    "EXIT_REASON_INFO",
    "EXIT_CATEGORIES",
    "VM_ENTRY_FAILURE_BIT",
    "EXIT_REASON_BASIC_MASK",
    "basic_exit_reason",
    "is_entry_failure",
    # vmcs_fields
    "VmcsField",
    "FieldType",
    "FieldWidth",
    "AccessType",
    "FieldEncoding",
    "decode_encoding",
    "make_encoding",
    "VmcsArea",
    "field_area",
    "FIELD_DESCRIPTIONS",
    "VMCS_MAX_INDEX",
    # controls
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
    # errors
    "VmInstructionError",
    "VM_INSTRUCTION_ERROR_DESCRIPTIONS",
    # msrs
    "Msr",
    "FeatureControl",
    "Efer",
    "Cr0",
    "Cr4",
    "Rflags",
    "RFLAGS_IOPL_SHIFT",
    # exceptions
    "Vector",
    "ExceptionInfo",
    "EXCEPTION_INFO",
    "InterruptionType",
    "IntrInfo",
    "INTR_INFO_VECTOR_MASK",
    "INTR_INFO_TYPE_SHIFT",
    "INTR_INFO_TYPE_MASK",
    "INTR_INFO_DELIVER_CODE",
    "INTR_INFO_NMI_UNBLOCKING",
    "INTR_INFO_VALID",
    # interrupts
    "Interruptibility",
    "ActivityState",
    # segments
    "AccessRights",
    "CodeDataType",
    "SystemType",
    "AR_DPL_SHIFT",
    "AR_RESERVED",
    # qualifications
    "GPR_ORDER",
    "gpr_name",
    "IoDirection",
    "IoQualification",
    "CrAccessType",
    "CrAccessQualification",
    "DrAccessDirection",
    "DrAccessQualification",
    "EptViolationQualification",
    "EptEntry",
    "EptMemoryType",
    "Eptp",
    "EptVpidCap",
    "InveptType",
    "InvvpidType",
]

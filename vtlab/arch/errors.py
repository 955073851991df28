"""VM-instruction error numbers (Intel SDM Vol. 3C, 31.4 "VM Instruction Error Numbers", Table 31-1).

When a VMX instruction fails with *VMfailValid* (RFLAGS.ZF = 1), the processor
writes one of these numbers to the VM-instruction error field
(``VmcsField.VM_INSTRUCTION_ERROR``, 0x4400) of the current VMCS.

Names follow Linux's ``enum vm_instruction_error_number`` without the
``VMXERR_`` prefix; the reserved numbers 14, 21 and 27 are ``RESERVED_14`` etc.
"""
from __future__ import annotations

import enum

__all__ = ["VmInstructionError", "VM_INSTRUCTION_ERROR_DESCRIPTIONS"]


class VmInstructionError(enum.IntEnum):
    """A VM-instruction error number (SDM Table 31-1).

    ``VmInstructionError(7).description`` gives the SDM's wording.
    """

    VMCALL_IN_VMX_ROOT_OPERATION = 1
    VMCLEAR_INVALID_ADDRESS = 2
    VMCLEAR_VMXON_POINTER = 3
    VMLAUNCH_NONCLEAR_VMCS = 4
    VMRESUME_NONLAUNCHED_VMCS = 5
    VMRESUME_AFTER_VMXOFF = 6
    ENTRY_INVALID_CONTROL_FIELD = 7
    ENTRY_INVALID_HOST_STATE_FIELD = 8
    VMPTRLD_INVALID_ADDRESS = 9
    VMPTRLD_VMXON_POINTER = 10
    VMPTRLD_INCORRECT_VMCS_REVISION_ID = 11
    UNSUPPORTED_VMCS_COMPONENT = 12
    VMWRITE_READ_ONLY_VMCS_COMPONENT = 13
    RESERVED_14 = 14
    VMXON_IN_VMX_ROOT_OPERATION = 15
    ENTRY_INVALID_EXECUTIVE_VMCS_POINTER = 16
    ENTRY_NONLAUNCHED_EXECUTIVE_VMCS = 17
    ENTRY_EXECUTIVE_VMCS_POINTER_NOT_VMXON_POINTER = 18
    VMCALL_NONCLEAR_VMCS = 19
    VMCALL_INVALID_VM_EXIT_CONTROL_FIELDS = 20
    RESERVED_21 = 21
    VMCALL_INCORRECT_MSEG_REVISION_ID = 22
    VMXOFF_UNDER_DUAL_MONITOR_TREATMENT_OF_SMIS_AND_SMM = 23
    VMCALL_INVALID_SMM_MONITOR_FEATURES = 24
    ENTRY_INVALID_VM_EXECUTION_CONTROL_FIELDS_IN_EXECUTIVE_VMCS = 25
    ENTRY_EVENTS_BLOCKED_BY_MOV_SS = 26
    RESERVED_27 = 27
    INVALID_OPERAND_TO_INVEPT_INVVPID = 28

    @property
    def description(self) -> str:
        """The SDM's wording for this error number (Table 31-1)."""
        return VM_INSTRUCTION_ERROR_DESCRIPTIONS[self]


_E = VmInstructionError

#: The SDM's description of every error number.
VM_INSTRUCTION_ERROR_DESCRIPTIONS: dict[VmInstructionError, str] = {
    _E.VMCALL_IN_VMX_ROOT_OPERATION: "VMCALL executed in VMX root operation",
    _E.VMCLEAR_INVALID_ADDRESS: "VMCLEAR with invalid physical address",
    _E.VMCLEAR_VMXON_POINTER: "VMCLEAR with VMXON pointer",
    _E.VMLAUNCH_NONCLEAR_VMCS: "VMLAUNCH with non-clear VMCS",
    _E.VMRESUME_NONLAUNCHED_VMCS: "VMRESUME with non-launched VMCS",
    _E.VMRESUME_AFTER_VMXOFF: "VMRESUME after VMXOFF (VMXOFF and VMXON between VMLAUNCH and VMRESUME)",
    _E.ENTRY_INVALID_CONTROL_FIELD: "VM entry with invalid control field(s)",
    _E.ENTRY_INVALID_HOST_STATE_FIELD: "VM entry with invalid host-state field(s)",
    _E.VMPTRLD_INVALID_ADDRESS: "VMPTRLD with invalid physical address",
    _E.VMPTRLD_VMXON_POINTER: "VMPTRLD with VMXON pointer",
    _E.VMPTRLD_INCORRECT_VMCS_REVISION_ID: "VMPTRLD with incorrect VMCS revision identifier",
    _E.UNSUPPORTED_VMCS_COMPONENT: "VMREAD/VMWRITE from/to unsupported VMCS component",
    _E.VMWRITE_READ_ONLY_VMCS_COMPONENT: "VMWRITE to read-only VMCS component",
    _E.RESERVED_14: "Reserved",
    _E.VMXON_IN_VMX_ROOT_OPERATION: "VMXON executed in VMX root operation",
    _E.ENTRY_INVALID_EXECUTIVE_VMCS_POINTER: "VM entry with invalid executive-VMCS pointer",
    _E.ENTRY_NONLAUNCHED_EXECUTIVE_VMCS: "VM entry with non-launched executive VMCS",
    _E.ENTRY_EXECUTIVE_VMCS_POINTER_NOT_VMXON_POINTER: (
        "VM entry with executive-VMCS pointer not VMXON pointer "
        "(when attempting to deactivate the dual-monitor treatment of SMIs and SMM)"
    ),
    _E.VMCALL_NONCLEAR_VMCS: (
        "VMCALL with non-clear VMCS "
        "(when attempting to activate the dual-monitor treatment of SMIs and SMM)"
    ),
    _E.VMCALL_INVALID_VM_EXIT_CONTROL_FIELDS: "VMCALL with invalid VM-exit control fields",
    _E.RESERVED_21: "Reserved",
    _E.VMCALL_INCORRECT_MSEG_REVISION_ID: (
        "VMCALL with incorrect MSEG revision identifier "
        "(when attempting to activate the dual-monitor treatment of SMIs and SMM)"
    ),
    _E.VMXOFF_UNDER_DUAL_MONITOR_TREATMENT_OF_SMIS_AND_SMM: "VMXOFF under dual-monitor treatment of SMIs and SMM",
    _E.VMCALL_INVALID_SMM_MONITOR_FEATURES: (
        "VMCALL with invalid SMM-monitor features "
        "(when attempting to activate the dual-monitor treatment of SMIs and SMM)"
    ),
    _E.ENTRY_INVALID_VM_EXECUTION_CONTROL_FIELDS_IN_EXECUTIVE_VMCS: (
        "VM entry with invalid VM-execution control fields in executive VMCS "
        "(when attempting to return from SMM)"
    ),
    _E.ENTRY_EVENTS_BLOCKED_BY_MOV_SS: "VM entry with events blocked by MOV SS",
    _E.RESERVED_27: "Reserved",
    _E.INVALID_OPERAND_TO_INVEPT_INVVPID: "Invalid operand to INVEPT/INVVPID",
}

"""Constants shared by the non-root modules."""
from __future__ import annotations


from unicorn.unicorn_py3 import unicorn as _ucmod

from ..arch.controls import ProcBased
from ..arch.msrs import Msr
from ..arch.vmcs_fields import VmcsField as F
from .decoder import InsnKind



# ------------------------------------------------------------------------- the monitor
_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")
_SEG_FIELDS = {s: (F[f"GUEST_{s.upper()}_SELECTOR"], F[f"GUEST_{s.upper()}_BASE"],
                   F[f"GUEST_{s.upper()}_LIMIT"], F[f"GUEST_{s.upper()}_AR_BYTES"]) for s in _SEGMENTS}
#: The size a UC_HOOK_CODE callback receives for an instruction QEMU does not implement.
_UNDECODED_SIZE = 0xF1F1F1F1
#: Kinds of instruction QEMU does not implement (it raises #UD for them), so the size it
#: reports to a code hook says nothing about the instruction.  MOV DR is here too: at
#: CPL > 0 QEMU raises its #GP while translating (reporting the 2 opcode bytes as the
#: size), yet a MOV-DR exit takes priority over that #GP (SDM 26.1.1, 26.1.3).
_NOT_IN_QEMU = frozenset({InsnKind.GETSEC, InsnKind.VMCALL, InsnKind.VMCLEAR, InsnKind.VMLAUNCH,
                          InsnKind.VMPTRLD, InsnKind.VMPTRST, InsnKind.VMREAD, InsnKind.VMRESUME,
                          InsnKind.VMWRITE, InsnKind.VMXOFF, InsnKind.VMXON, InsnKind.INVEPT,
                          InsnKind.INVVPID, InsnKind.MOV_TO_DR, InsnKind.MOV_FROM_DR})
#: Guest-state fields that can be saved on their own (see ExitMonitor.materialize).
_SINGLE_FIELD_SAVERS = {
    int(F.GUEST_SYSENTER_CS): lambda g: g.uc.msr_read(Msr.IA32_SYSENTER_CS) & 0xFFFF_FFFF,
    int(F.GUEST_SYSENTER_ESP): lambda g: g.uc.msr_read(Msr.IA32_SYSENTER_ESP),
    int(F.GUEST_SYSENTER_EIP): lambda g: g.uc.msr_read(Msr.IA32_SYSENTER_EIP),
    int(F.GUEST_RSP): lambda g: g.reg("rsp"),
    int(F.GUEST_RFLAGS): lambda g: g.reg("rflags"),
    int(F.GUEST_CR0): lambda g: g.reg("cr0"),
    int(F.GUEST_CR3): lambda g: g.reg("cr3"),
    int(F.GUEST_CR4): lambda g: g.reg("cr4"),
}
_RIP_ONLY = frozenset({int(F.GUEST_RIP)})
#: Guest-state fields saved lazily (all but RIP, which the exit path writes at once, and
#: the interruptibility state and preemption-timer value, saved at once by
#: vtlab.cpu.event_controls: they are the processor's state, not the guest CPU's registers).
_EAGER_FIELDS = (F.GUEST_RIP, F.GUEST_INTERRUPTIBILITY_INFO, F.VMX_PREEMPTION_TIMER_VALUE)
_LAZY_FIELDS = frozenset(int(f) for f in F if f.name.startswith("GUEST_") and
                         (int(f) >> 10) & 3 == 2 and f not in _EAGER_FIELDS) | {int(F.VM_ENTRY_CONTROLS)}

# Plain-int copies of the control bits the per-entry path tests.  ``int & IntFlag``
# dispatches to IntFlag.__rand__, written in Python (~0.5 us a time): too slow for a
# path that runs on every VM entry.
_MONITOR_TRAP_FLAG = int(ProcBased.MONITOR_TRAP_FLAG)
_ACTIVATE_SECONDARY = int(ProcBased.ACTIVATE_SECONDARY_CONTROLS)
_VALID = 1 << 31  # the valid bit of the interruption-information fields (SDM 25.8.3, 28.2.2)

#: The exit-information fields every VM exit writes (SDM 28.2), in vm_exit's order.
_EXIT_INFO_FIELDS = tuple(int(f) for f in (
    F.VM_EXIT_REASON, F.EXIT_QUALIFICATION, F.VM_EXIT_INSTRUCTION_LEN, F.VM_EXIT_INTR_INFO,
    F.VM_EXIT_INTR_ERROR_CODE, F.IDT_VECTORING_INFO_FIELD, F.IDT_VECTORING_ERROR_CODE,
    F.VMX_INSTRUCTION_INFO,
    F.GUEST_LINEAR_ADDRESS, F.GUEST_PHYSICAL_ADDRESS))

_uc_hook_add = _ucmod.uclib.uc_hook_add

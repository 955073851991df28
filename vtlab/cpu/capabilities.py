"""The VMX capability MSRs of vtlab's processor (SDM Vol. 3C, Appendix A).

A VMM never guesses which controls a CPU supports: it reads IA32_VMX_* MSRs.  Each
control MSR holds two halves (SDM A.3):

* bits 31:0, **allowed-0 settings**: a bit that is 1 here *must* be 1 in the control;
* bits 63:32, **allowed-1 settings**: a bit that is 0 here *must* be 0 in the control.

vtlab's CPU advertises exactly what it implements, so a control it cannot honour is
reported as fixed to 0 instead of being silently ignored.  The numbers otherwise
resemble a recent Intel core (revision identifier, VMCS size, memory type, CR fixed
bits, 4 CR3-target values, "true" control MSRs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from ..arch.controls import (DEFAULT1, EntryControl, ExitControl, PinBased, ProcBased,
                            ProcBased2)
from ..arch.msrs import Cr0, Cr4, Msr
from ..arch.vmcs_fields import VMCS_MAX_INDEX

F = TypeVar("F", PinBased, ProcBased, ProcBased2, ExitControl, EntryControl)

#: Revision identifier that VMXON and VMCS regions must carry (IA32_VMX_BASIC[30:0]).
VMCS_REVISION_ID = 0x4
#: MAXPHYADDR: physical-address width reported by CPUID.80000008H:EAX[7:0].
PHYSICAL_ADDRESS_WIDTH = 39

IMPLEMENTED: dict[type, int] = {
    PinBased: PinBased.EXT_INTR_MASK | PinBased.NMI_EXITING,
    ProcBased: (ProcBased.HLT_EXITING | ProcBased.INVLPG_EXITING | ProcBased.MWAIT_EXITING
                | ProcBased.RDPMC_EXITING | ProcBased.RDTSC_EXITING | ProcBased.CR3_LOAD_EXITING
                | ProcBased.CR3_STORE_EXITING | ProcBased.CR8_LOAD_EXITING
                | ProcBased.CR8_STORE_EXITING | ProcBased.MOV_DR_EXITING
                | ProcBased.UNCOND_IO_EXITING | ProcBased.USE_IO_BITMAPS
                | ProcBased.MONITOR_TRAP_FLAG | ProcBased.USE_MSR_BITMAPS
                | ProcBased.MONITOR_EXITING | ProcBased.PAUSE_EXITING
                | ProcBased.ACTIVATE_SECONDARY_CONTROLS),
    ProcBased2: (ProcBased2.ENABLE_EPT | ProcBased2.DESC | ProcBased2.ENABLE_RDTSCP
                 | ProcBased2.ENABLE_VPID | ProcBased2.WBINVD_EXITING
                 | ProcBased2.UNRESTRICTED_GUEST | ProcBased2.RDRAND_EXITING
                 | ProcBased2.RDSEED_EXITING),
    ExitControl: (ExitControl.SAVE_DEBUG_CONTROLS | ExitControl.HOST_ADDR_SPACE_SIZE
                  | ExitControl.ACK_INTR_ON_EXIT | ExitControl.SAVE_IA32_PAT
                  | ExitControl.LOAD_IA32_PAT | ExitControl.SAVE_IA32_EFER
                  | ExitControl.LOAD_IA32_EFER),
    EntryControl: (EntryControl.LOAD_DEBUG_CONTROLS | EntryControl.IA32E_MODE
                   | EntryControl.LOAD_IA32_PAT | EntryControl.LOAD_IA32_EFER),
}

# "True" allowed-0 settings (SDM A.3.1): the default1 bits a VMM may clear when
# IA32_VMX_BASIC[55] = 1.  Modern CPUs let CR3-load/store exiting and the debug-control
# save/load be 0.
_TRUE_CLEARABLE: dict[type, int] = {
    PinBased: 0,
    ProcBased: ProcBased.CR3_LOAD_EXITING | ProcBased.CR3_STORE_EXITING,
    ProcBased2: 0,
    ExitControl: ExitControl.SAVE_DEBUG_CONTROLS,
    EntryControl: EntryControl.LOAD_DEBUG_CONTROLS,
}


@dataclass(frozen=True)
class AllowedSettings:
    """One control MSR split into its halves (SDM A.3)."""

    allowed0: int   #: bits that must be 1
    allowed1: int   #: bits that may be 1

    @property
    def msr_value(self) -> int:
        return self.allowed0 | (self.allowed1 << 32)

    def violations(self, value: int) -> tuple[int, int]:
        """(bits that must be 1 but are 0, bits that must be 0 but are 1)."""
        return self.allowed0 & ~value, value & ~self.allowed1

    def adjust(self, desired: int) -> int:
        """Force the fixed bits, as KVM's ``adjust_vmx_controls()`` does."""
        return (desired | self.allowed0) & self.allowed1


def _settings(cls: type, true: bool) -> AllowedSettings:
    default1 = DEFAULT1[cls]
    allowed0 = default1 & ~_TRUE_CLEARABLE[cls] if true else default1
    return AllowedSettings(allowed0, default1 | IMPLEMENTED[cls])


@dataclass
class VmxCapabilities:
    """The capability MSRs of vtlab's processor, readable with RDMSR."""

    revision_id: int = VMCS_REVISION_ID
    cr0_fixed0: int = Cr0.PE | Cr0.NE | Cr0.PG
    cr0_fixed1: int = 0xFFFF_FFFF
    cr4_fixed0: int = Cr4.VMXE
    cr4_fixed1: int = 0x0037_27FF
    cr3_targets: int = 4
    controls: dict[type, AllowedSettings] = field(default_factory=lambda: {
        cls: _settings(cls, true=False) for cls in IMPLEMENTED})
    true_controls: dict[type, AllowedSettings] = field(default_factory=lambda: {
        cls: _settings(cls, true=True) for cls in IMPLEMENTED})

    @property
    def basic(self) -> int:
        """IA32_VMX_BASIC (SDM A.1): revision id, 4-KByte VMCS, WB memory, TRUE MSRs."""
        return (self.revision_id | (0x1000 << 32) | (6 << 50) | (1 << 54) | (1 << 55)
                | (1 << 56))

    @property
    def misc(self) -> int:
        """IA32_VMX_MISC (SDM A.6): LMA saved on exit, HLT activity state, 4 CR3 targets."""
        return 5 | (1 << 5) | (1 << 6) | (self.cr3_targets << 16)

    @property
    def ept_vpid_cap(self) -> int:
        """IA32_VMX_EPT_VPID_CAP (SDM A.10): 4-level walks, WB, 2-MByte pages, INVEPT/INVVPID."""
        return (1 << 6) | (1 << 14) | (1 << 16) | (1 << 20) | (1 << 25) | (1 << 26) | (1 << 32) | (1 << 41)

    def allowed(self, cls: type, true: bool = True) -> AllowedSettings:
        """Allowed settings of one control class (TRUE MSR by default, as IA32_VMX_BASIC[55] says)."""
        return (self.true_controls if true else self.controls)[cls]

    def adjust(self, cls: type[F], desired: int) -> F:
        """Return ``desired`` with the bits the CPU fixes forced (the usual VMM idiom)."""
        return cls(self.allowed(cls).adjust(int(desired)))

    def msrs(self) -> dict[Msr, int]:
        """Every IA32_VMX_* capability MSR with its value."""
        c, t = self.controls, self.true_controls
        return {
            Msr.IA32_VMX_BASIC: self.basic,
            Msr.IA32_VMX_PINBASED_CTLS: c[PinBased].msr_value,
            Msr.IA32_VMX_PROCBASED_CTLS: c[ProcBased].msr_value,
            Msr.IA32_VMX_EXIT_CTLS: c[ExitControl].msr_value,
            Msr.IA32_VMX_ENTRY_CTLS: c[EntryControl].msr_value,
            Msr.IA32_VMX_MISC: self.misc,
            Msr.IA32_VMX_CR0_FIXED0: self.cr0_fixed0,
            Msr.IA32_VMX_CR0_FIXED1: self.cr0_fixed1,
            Msr.IA32_VMX_CR4_FIXED0: self.cr4_fixed0,
            Msr.IA32_VMX_CR4_FIXED1: self.cr4_fixed1,
            Msr.IA32_VMX_VMCS_ENUM: VMCS_MAX_INDEX << 1,
            Msr.IA32_VMX_PROCBASED_CTLS2: c[ProcBased2].msr_value,
            Msr.IA32_VMX_EPT_VPID_CAP: self.ept_vpid_cap,
            Msr.IA32_VMX_TRUE_PINBASED_CTLS: t[PinBased].msr_value,
            Msr.IA32_VMX_TRUE_PROCBASED_CTLS: t[ProcBased].msr_value,
            Msr.IA32_VMX_TRUE_EXIT_CTLS: t[ExitControl].msr_value,
            Msr.IA32_VMX_TRUE_ENTRY_CTLS: t[EntryControl].msr_value,
            Msr.IA32_VMX_VMFUNC: 0,
        }

    def cr_fixed_violations(self, cr: str, value: int, unrestricted: bool = False) -> list[str]:
        """Explain how ``value`` breaks the CRn FIXED0/FIXED1 rule (SDM A.7, A.8)."""
        fixed0, fixed1 = ((self.cr0_fixed0, self.cr0_fixed1) if cr == "cr0"
                          else (self.cr4_fixed0, self.cr4_fixed1))
        enum_cls = Cr0 if cr == "cr0" else Cr4
        if unrestricted and cr == "cr0":
            fixed0 &= ~(Cr0.PE | Cr0.PG)  # SDM 27.3.1.1: unrestricted guests may clear them
        out = []
        must1 = fixed0 & ~value
        must0 = value & ~fixed1 & 0xFFFF_FFFF_FFFF_FFFF
        if must1:
            out.append(f"{cr.upper()} bits {_names(enum_cls, must1)} must be 1 "
                       f"(IA32_VMX_{cr.upper()}_FIXED0 = {fixed0:#x})")
        if must0:
            out.append(f"{cr.upper()} bits {_names(enum_cls, must0)} must be 0 "
                       f"(IA32_VMX_{cr.upper()}_FIXED1 = {fixed1:#x})")
        return out


def _names(enum_cls, bits: int) -> str:
    """``Cr0.PE|Cr0.PG``-style names of the set bits (unnamed ones as "bit N")."""
    return "|".join(flag_names(enum_cls, bits))


def flag_names(enum_cls, bits: int, width: int = 64) -> list[str]:
    """Names of the bits set in ``bits``, lowest first; bits the enum does not name as "bit N"."""
    names = []
    for b in range(width):
        if bits >> b & 1:
            try:
                name = enum_cls(1 << b).name  # an IntFlag's unnamed bit has name None
            except ValueError:
                name = None
            names.append(name or f"bit {b}")
    return names

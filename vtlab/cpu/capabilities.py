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
from ..arch.vmcs_fields import VMCS_MAX_INDEX, VmcsField

F = TypeVar("F", PinBased, ProcBased, ProcBased2, ExitControl, EntryControl)

#: Revision identifier that VMXON and VMCS regions must carry (IA32_VMX_BASIC[30:0]).
VMCS_REVISION_ID = 0x4
#: MAXPHYADDR: physical-address width reported by CPUID.80000008H:EAX[7:0].
PHYSICAL_ADDRESS_WIDTH = 39
#: IA32_VMX_MISC[4:0]: the VMX-preemption timer decrements each time TSC bit 5 changes,
#: i.e. every 32 TSC ticks - every 32 guest instructions on vtlab's clock (SDM 26.5.1).
PREEMPTION_TIMER_RATE = 5

IMPLEMENTED: dict[type, int] = {
    # Event controls (SDM 26.2, 26.5.1, 26.6 ...; vtlab.cpu.event_controls): NMI exiting with
    # virtual NMIs, the VMX-preemption timer, interrupt- and NMI-window exiting, TSC offsetting.
    PinBased: (PinBased.EXT_INTR_MASK | PinBased.NMI_EXITING | PinBased.VIRTUAL_NMIS
               | PinBased.VMX_PREEMPTION_TIMER),
    ProcBased: (ProcBased.INTR_WINDOW_EXITING | ProcBased.USE_TSC_OFFSETTING
                | ProcBased.NMI_WINDOW_EXITING | ProcBased.HLT_EXITING | ProcBased.INVLPG_EXITING | ProcBased.MWAIT_EXITING
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
                  | ExitControl.LOAD_IA32_EFER | ExitControl.SAVE_VMX_PREEMPTION_TIMER),
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
    #: Bits CR4 may have set in VMX operation (SDM A.8): VME..OSXMMEXCPT (bits 10:0), UMIP
    #: (11: CPUID.7:ECX[2]), VMXE, SMXE (14: vtlab's processor reports SMX, CPUID.1:ECX[6]),
    #: FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP - the value of a recent Intel core with SMX.
    cr4_fixed1: int = int(Cr4.VME | Cr4.PVI | Cr4.TSD | Cr4.DE | Cr4.PSE | Cr4.PAE | Cr4.MCE
                          | Cr4.PGE | Cr4.PCE | Cr4.OSFXSR | Cr4.OSXMMEXCPT | Cr4.UMIP | Cr4.VMXE
                          | Cr4.SMXE | Cr4.FSGSBASE | Cr4.PCIDE | Cr4.OSXSAVE | Cr4.SMEP | Cr4.SMAP)
    cr3_targets: int = 4
    #: IA32_VMX_BASIC[55]: the IA32_VMX_TRUE_*_CTLS MSRs exist (SDM A.1, A.3.1).
    true_ctls: bool = True
    controls: dict[type, AllowedSettings] = field(default_factory=lambda: {
        cls: _settings(cls, true=False) for cls in IMPLEMENTED})
    true_controls: dict[type, AllowedSettings] = field(default_factory=lambda: {
        cls: _settings(cls, true=True) for cls in IMPLEMENTED})

    @property
    def basic(self) -> int:
        """IA32_VMX_BASIC (SDM A.1): revision id, 4-KByte VMCS, WB memory, bit 54 (INS/OUTS
        instruction information), bit 55 (TRUE MSRs, :attr:`true_ctls`), bit 56."""
        return (self.revision_id | (0x1000 << 32) | (6 << 50) | (1 << 54)
                | (int(bool(self.true_ctls)) << 55) | (1 << 56))

    @property
    def misc(self) -> int:
        """IA32_VMX_MISC (SDM A.6): bits 4:0 = 5, the VMX-preemption timer counts down once
        every 32 TSC ticks (:data:`PREEMPTION_TIMER_RATE`); bit 5 LMA saved on exit, bit 6
        HLT activity state, 4 CR3 targets."""
        return PREEMPTION_TIMER_RATE | (1 << 5) | (1 << 6) | (self.cr3_targets << 16)

    #: Offer accessed and dirty flags for EPT (IA32_VMX_EPT_VPID_CAP[21], SDM 29.3.4)?  Off
    #: by default (then EPTP bit 6 fails VM entry); ``VmxCapabilities(ept_accessed_dirty=True)``
    #: makes a processor that has them.
    ept_accessed_dirty: bool = False

    @property
    def ept_vpid_cap(self) -> int:
        """IA32_VMX_EPT_VPID_CAP (SDM A.10): execute-only translations, 4-level walks, WB,
        2-MByte and 1-GByte pages, INVEPT (single- and all-context), INVVPID (all four
        types); bit 21 (EPT accessed and dirty flags) with :attr:`ept_accessed_dirty`."""
        return (1 << 0 | 1 << 6 | 1 << 14 | 1 << 16 | 1 << 17 | 1 << 20 | 1 << 25 | 1 << 26 | 1 << 32
                | 1 << 40 | 1 << 41 | 1 << 42 | 1 << 43 | int(self.ept_accessed_dirty) << 21)

    def allowed(self, cls: type, true: bool | None = None) -> AllowedSettings:
        """Allowed settings of one control class: by default the TRUE MSR if
        IA32_VMX_BASIC[55] = 1 (:attr:`true_ctls`), else the plain one (SDM A.3.1)."""
        if true is None:
            true = bool(self.true_ctls)
        return (self.true_controls if true else self.controls)[cls]

    def supports(self, cls: type, bits: int) -> bool:
        """Does the processor support the 1-setting of any of ``bits`` in control class
        ``cls`` (the allowed-1 half of its capability MSR, SDM A.3)?  The secondary
        processor-based controls exist only if "activate secondary controls" may be 1."""
        if cls is ProcBased2 and not self.controls[ProcBased].allowed1 & ProcBased.ACTIVATE_SECONDARY_CONTROLS:
            return False
        settings = self.controls.get(cls)
        return settings is not None and bool(settings.allowed1 & bits)

    def msr_exists(self, msr: int) -> bool:
        """Does this processor have capability MSR ``msr`` (SDM Appendix A)?

        IA32_VMX_PROCBASED_CTLS2 only if IA32_VMX_PROCBASED_CTLS[63] = 1 ("activate
        secondary controls", A.3.3); IA32_VMX_EPT_VPID_CAP only if, further, "enable EPT"
        (PROCBASED_CTLS2[33]) or "enable VPID" ([37]) may be 1 (A.10); the TRUE controls
        MSRs only if IA32_VMX_BASIC[55] = 1 (A.3.1); IA32_VMX_VMFUNC only with "enable VM
        functions" (PROCBASED_CTLS2[45], A.11); IA32_VMX_PROCBASED_CTLS3 only with
        "activate tertiary controls" (PROCBASED_CTLS[49], A.3.4) and IA32_VMX_EXIT_CTLS2
        only with "activate secondary controls" of the exit controls (EXIT_CTLS[63], A.4.2).
        RDMSR of one that does not exist raises #GP(0).
        """
        msr = int(msr)
        if msr in _TRUE_MSRS:
            return bool(self.true_ctls)
        if msr == Msr.IA32_VMX_PROCBASED_CTLS2:
            return self.supports(ProcBased, ProcBased.ACTIVATE_SECONDARY_CONTROLS)
        if msr == Msr.IA32_VMX_EPT_VPID_CAP:
            return self.supports(ProcBased2, ProcBased2.ENABLE_EPT | ProcBased2.ENABLE_VPID)
        if msr == Msr.IA32_VMX_VMFUNC:
            return self.supports(ProcBased2, ProcBased2.ENABLE_VMFUNC)
        if msr == Msr.IA32_VMX_PROCBASED_CTLS3:
            return self.supports(ProcBased, ProcBased.ACTIVATE_TERTIARY_CONTROLS)
        if msr == Msr.IA32_VMX_EXIT_CTLS2:
            return self.supports(ExitControl, ExitControl.ACTIVATE_SECONDARY_CONTROLS)
        return msr in _ALWAYS_MSRS

    def vmcs_field_missing(self, encoding: int) -> str | None:
        """Why VMCS field ``encoding`` does not exist on this processor (VMREAD/VMWRITE of it
        fail with VM-instruction error 12, as for an unknown encoding), or None if it
        exists.  The field's feature must be offered by the capability MSRs
        (:data:`FIELD_REQUIREMENTS`, from the notes of SDM Appendix B; CR3-target value n
        needs n < IA32_VMX_MISC[24:16])."""
        full = int(encoding) & ~1 if (int(encoding) >> 13) & 3 == 1 else int(encoding)
        need = FIELD_REQUIREMENTS.get(full)
        if need is None:
            index = _CR3_TARGET_INDEX.get(full)
            if index is not None and index >= self.cr3_targets:
                return (f"IA32_VMX_MISC[24:16] reports {self.cr3_targets} CR3-target values, so "
                        f"CR3-target value {index} does not exist")
            return None
        what, pairs = need
        if any(self.supports(cls, bits) for cls, bits in pairs):
            return None
        return f"it exists only on processors that support the 1-setting of {what} (SDM Appendix B)"

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


_TRUE_MSRS = frozenset(int(m) for m in (Msr.IA32_VMX_TRUE_PINBASED_CTLS, Msr.IA32_VMX_TRUE_PROCBASED_CTLS,
                                        Msr.IA32_VMX_TRUE_EXIT_CTLS, Msr.IA32_VMX_TRUE_ENTRY_CTLS))
#: The capability MSRs every VMX processor has (SDM A.1-A.9).
_ALWAYS_MSRS = frozenset(int(m) for m in (
    Msr.IA32_VMX_BASIC, Msr.IA32_VMX_PINBASED_CTLS, Msr.IA32_VMX_PROCBASED_CTLS,
    Msr.IA32_VMX_EXIT_CTLS, Msr.IA32_VMX_ENTRY_CTLS, Msr.IA32_VMX_MISC, Msr.IA32_VMX_CR0_FIXED0,
    Msr.IA32_VMX_CR0_FIXED1, Msr.IA32_VMX_CR4_FIXED0, Msr.IA32_VMX_CR4_FIXED1,
    Msr.IA32_VMX_VMCS_ENUM))
#: Every IA32_VMX_* capability MSR number (480H-493H).
VMX_CAPABILITY_MSRS = frozenset(range(0x480, 0x494))

_CR3_TARGET_INDEX = {int(VmcsField[f"CR3_TARGET_VALUE{i}"]): i for i in range(4)}


def _need(what: str, *pairs) -> tuple[str, tuple]:
    return what, pairs


_PB, _PB2, _PIN, _EXIT, _ENTRY = ProcBased, ProcBased2, PinBased, ExitControl, EntryControl
_TERTIARY = _need('"activate tertiary controls" (the field belongs to a tertiary control)',
                  (_PB, _PB.ACTIVATE_TERTIARY_CONTROLS))
_FRED = _need('"load FRED" (VM-entry) / the FRED exit controls', (_ENTRY, _ENTRY.LOAD_IA32_FRED))

#: VMCS field -> the control whose 1-setting it needs ("This field exists only on
#: processors that support the 1-setting of ...", the notes to SDM Appendix B's tables).
#: Fields of features that exist only in tertiary or secondary exit controls, which
#: vtlab's processor does not have, name those.  Absent fields always exist.
FIELD_REQUIREMENTS: dict[int, tuple[str, tuple]] = {int(f): need for f, need in {
    # 16-bit
    VmcsField.VIRTUAL_PROCESSOR_ID: _need('"enable VPID"', (_PB2, _PB2.ENABLE_VPID)),
    VmcsField.POSTED_INTR_NV: _need('"process posted interrupts"', (_PIN, _PIN.POSTED_INTR)),
    VmcsField.EPTP_INDEX: _need('"EPT-violation #VE"', (_PB2, _PB2.EPT_VIOLATION_VE)),
    VmcsField.HLAT_PREFIX_SIZE: _TERTIARY,
    VmcsField.LAST_PID_POINTER_INDEX: _TERTIARY,
    VmcsField.GUEST_INTR_STATUS: _need('"virtual-interrupt delivery"', (_PB2, _PB2.VIRTUAL_INTR_DELIVERY)),
    VmcsField.GUEST_PML_INDEX: _need('"enable PML"', (_PB2, _PB2.ENABLE_PML)),
    VmcsField.GUEST_UINV: _need('"load UINV" (VM-entry) or "clear UINV" (VM-exit)',
                                (_ENTRY, _ENTRY.LOAD_UINV), (_EXIT, _EXIT.CLEAR_UINV)),
    # 64-bit control
    VmcsField.MSR_BITMAP: _need('"use MSR bitmaps"', (_PB, _PB.USE_MSR_BITMAPS)),
    VmcsField.PML_ADDRESS: _need('"enable PML"', (_PB2, _PB2.ENABLE_PML)),
    VmcsField.VIRTUAL_APIC_PAGE_ADDR: _need('"use TPR shadow"', (_PB, _PB.TPR_SHADOW)),
    VmcsField.APIC_ACCESS_ADDR: _need('"virtualize APIC accesses"', (_PB2, _PB2.VIRTUALIZE_APIC_ACCESSES)),
    VmcsField.POSTED_INTR_DESC_ADDR: _need('"process posted interrupts"', (_PIN, _PIN.POSTED_INTR)),
    VmcsField.VM_FUNCTION_CONTROL: _need('"enable VM functions"', (_PB2, _PB2.ENABLE_VMFUNC)),
    VmcsField.EPT_POINTER: _need('"enable EPT"', (_PB2, _PB2.ENABLE_EPT)),
    **{VmcsField[f"EOI_EXIT_BITMAP{i}"]: _need('"virtual-interrupt delivery"',
                                               (_PB2, _PB2.VIRTUAL_INTR_DELIVERY)) for i in range(4)},
    VmcsField.EPTP_LIST_ADDRESS: _need('"EPTP switching" (a VM function: "enable VM functions")',
                                       (_PB2, _PB2.ENABLE_VMFUNC)),
    VmcsField.VMREAD_BITMAP: _need('"VMCS shadowing"', (_PB2, _PB2.SHADOW_VMCS)),
    VmcsField.VMWRITE_BITMAP: _need('"VMCS shadowing"', (_PB2, _PB2.SHADOW_VMCS)),
    VmcsField.VE_INFORMATION_ADDRESS: _need('"EPT-violation #VE"', (_PB2, _PB2.EPT_VIOLATION_VE)),
    VmcsField.XSS_EXIT_BITMAP: _need('"enable XSAVES/XRSTORS"', (_PB2, _PB2.ENABLE_XSAVES)),
    VmcsField.ENCLS_EXITING_BITMAP: _need('"enable ENCLS exiting"', (_PB2, _PB2.ENCLS_EXITING)),
    VmcsField.SPPT_POINTER: _need('"sub-page write permissions for EPT"', (_PB2, _PB2.ENABLE_SPP)),
    VmcsField.TSC_MULTIPLIER: _need('"use TSC scaling"', (_PB2, _PB2.TSC_SCALING)),
    VmcsField.TERTIARY_VM_EXEC_CONTROL: _TERTIARY,
    VmcsField.ENCLV_EXITING_BITMAP: _need('"enable ENCLV exiting"', (_PB2, _PB2.ENCLV_EXITING)),
    VmcsField.LOW_PASID_DIR_ADDRESS: _need('"PASID translation"', (_PB2, _PB2.PASID_TRANSLATION)),
    VmcsField.HIGH_PASID_DIR_ADDRESS: _need('"PASID translation"', (_PB2, _PB2.PASID_TRANSLATION)),
    VmcsField.SHARED_EPT_POINTER: _TERTIARY,
    VmcsField.PCONFIG_EXITING_BITMAP: _need('"enable PCONFIG"', (_PB2, _PB2.ENABLE_PCONFIG)),
    VmcsField.HLAT_POINTER: _TERTIARY,
    VmcsField.PID_POINTER_TABLE: _TERTIARY,
    VmcsField.SECONDARY_VM_EXIT_CONTROLS: _need('"activate secondary controls" (VM-exit)',
                                                (_EXIT, _EXIT.ACTIVATE_SECONDARY_CONTROLS)),
    VmcsField.IA32_SPEC_CTRL_MASK: _TERTIARY,
    VmcsField.IA32_SPEC_CTRL_SHADOW: _TERTIARY,
    VmcsField.INJECTED_EVENT_DATA: _FRED,
    VmcsField.ORIGINAL_EVENT_DATA: _FRED,
    # 64-bit guest state
    VmcsField.GUEST_IA32_PAT: _need('"load IA32_PAT" (VM-entry) or "save IA32_PAT" (VM-exit)',
                                    (_ENTRY, _ENTRY.LOAD_IA32_PAT), (_EXIT, _EXIT.SAVE_IA32_PAT)),
    VmcsField.GUEST_IA32_EFER: _need('"load IA32_EFER" (VM-entry) or "save IA32_EFER" (VM-exit)',
                                     (_ENTRY, _ENTRY.LOAD_IA32_EFER), (_EXIT, _EXIT.SAVE_IA32_EFER)),
    VmcsField.GUEST_IA32_PERF_GLOBAL_CTRL: _need('"load IA32_PERF_GLOBAL_CTRL" (VM-entry)',
                                                 (_ENTRY, _ENTRY.LOAD_IA32_PERF_GLOBAL_CTRL),
                                                 (_EXIT, _EXIT.SAVE_IA32_PERF_GLOBAL_CTRL)),
    **{VmcsField[f"GUEST_PDPTR{i}"]: _need('"enable EPT"', (_PB2, _PB2.ENABLE_EPT)) for i in range(4)},
    VmcsField.GUEST_BNDCFGS: _need('"load IA32_BNDCFGS" (VM-entry) or "clear IA32_BNDCFGS" (VM-exit)',
                                   (_ENTRY, _ENTRY.LOAD_BNDCFGS), (_EXIT, _EXIT.CLEAR_BNDCFGS)),
    VmcsField.GUEST_IA32_RTIT_CTL: _need('"load IA32_RTIT_CTL" (VM-entry) or "clear IA32_RTIT_CTL" (VM-exit)',
                                         (_ENTRY, _ENTRY.LOAD_IA32_RTIT_CTL), (_EXIT, _EXIT.CLEAR_IA32_RTIT_CTL)),
    VmcsField.GUEST_IA32_LBR_CTL: _need('"load guest IA32_LBR_CTL" (VM-entry) or "clear IA32_LBR_CTL" (VM-exit)',
                                        (_ENTRY, _ENTRY.LOAD_IA32_LBR_CTL), (_EXIT, _EXIT.CLEAR_IA32_LBR_CTL)),
    VmcsField.GUEST_IA32_PKRS: _need('"load PKRS" (VM-entry)', (_ENTRY, _ENTRY.LOAD_IA32_PKRS)),
    **{f: _FRED for f in VmcsField if f.name.startswith("GUEST_IA32_FRED_")},
    # 64-bit host state
    VmcsField.HOST_IA32_PAT: _need('"load IA32_PAT" (VM-exit)', (_EXIT, _EXIT.LOAD_IA32_PAT)),
    VmcsField.HOST_IA32_EFER: _need('"load IA32_EFER" (VM-exit)', (_EXIT, _EXIT.LOAD_IA32_EFER)),
    VmcsField.HOST_IA32_PERF_GLOBAL_CTRL: _need('"load IA32_PERF_GLOBAL_CTRL" (VM-exit)',
                                                (_EXIT, _EXIT.LOAD_IA32_PERF_GLOBAL_CTRL)),
    VmcsField.HOST_IA32_PKRS: _need('"load PKRS" (VM-exit)', (_EXIT, _EXIT.LOAD_IA32_PKRS)),
    **{f: _need('"load FRED" (a secondary VM-exit control)', (_EXIT, _EXIT.ACTIVATE_SECONDARY_CONTROLS))
       for f in VmcsField if f.name.startswith("HOST_IA32_FRED_")},
    # 32-bit control
    VmcsField.TPR_THRESHOLD: _need('"use TPR shadow"', (_PB, _PB.TPR_SHADOW)),
    VmcsField.SECONDARY_VM_EXEC_CONTROL: _need('"activate secondary controls"',
                                               (_PB, _PB.ACTIVATE_SECONDARY_CONTROLS)),
    VmcsField.PLE_GAP: _need('"PAUSE-loop exiting"', (_PB2, _PB2.PAUSE_LOOP_EXITING)),
    VmcsField.PLE_WINDOW: _need('"PAUSE-loop exiting"', (_PB2, _PB2.PAUSE_LOOP_EXITING)),
    VmcsField.NOTIFY_WINDOW: _need('"NMI-notify VM exiting" (notification VM exits)',
                                   (_PB2, _PB2.NOTIFY_VM_EXITING)),
    # 32-bit guest state
    VmcsField.VMX_PREEMPTION_TIMER_VALUE: _need('"activate VMX-preemption timer"',
                                                (_PIN, _PIN.VMX_PREEMPTION_TIMER)),
    # natural-width guest / host state
    VmcsField.GUEST_S_CET: _need('"load CET state" (VM-entry)', (_ENTRY, _ENTRY.LOAD_CET_STATE)),
    VmcsField.GUEST_SSP: _need('"load CET state" (VM-entry)', (_ENTRY, _ENTRY.LOAD_CET_STATE)),
    VmcsField.GUEST_INTR_SSP_TABLE: _need('"load CET state" (VM-entry)', (_ENTRY, _ENTRY.LOAD_CET_STATE)),
    VmcsField.HOST_S_CET: _need('"load CET state" (VM-exit)', (_EXIT, _EXIT.LOAD_CET_STATE)),
    VmcsField.HOST_SSP: _need('"load CET state" (VM-exit)', (_EXIT, _EXIT.LOAD_CET_STATE)),
    VmcsField.HOST_INTR_SSP_TABLE: _need('"load CET state" (VM-exit)', (_EXIT, _EXIT.LOAD_CET_STATE)),
}.items()}

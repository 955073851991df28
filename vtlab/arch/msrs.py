"""MSR numbers and the bit layouts of a few architectural registers.

* :class:`Msr` - model-specific register addresses (SDM Vol. 4, Chapter 2
  "Model-Specific Registers", Table 2-2 "IA-32 Architectural MSRs"; the VMX
  capability MSRs are described in SDM Vol. 3D Appendix A).
* :class:`FeatureControl` - IA32_FEATURE_CONTROL bits (SDM Vol. 3C, 24.7 "Enabling
  and Entering VMX Operation").
* :class:`Efer`, :class:`Cr0`, :class:`Cr4`, :class:`Rflags` - SDM Vol. 3A, 2.2.1
  "Extended Feature Enable Register", 2.5 "Control Registers" and Vol. 1, 3.4.3
  "EFLAGS Register".

Values match Linux's ``arch/x86/include/asm/msr-index.h`` and
``arch/x86/include/uapi/asm/processor-flags.h``.
"""
from __future__ import annotations

import enum

from .bits import RegisterBits

__all__ = ["Msr", "FeatureControl", "Efer", "Cr0", "Cr4", "Rflags", "RFLAGS_IOPL_SHIFT"]


class Msr(enum.IntEnum):
    """MSR addresses used by vtlab (the ECX value of RDMSR/WRMSR).

    Names are the SDM's.  Aliases: ``IA32_TSC`` = ``IA32_TIME_STAMP_COUNTER``,
    ``IA32_FMASK`` is the SDM's name for Linux's MSR_SYSCALL_MASK.
    """

    IA32_P5_MC_ADDR = 0x0
    IA32_P5_MC_TYPE = 0x1
    IA32_TIME_STAMP_COUNTER = 0x10
    IA32_PLATFORM_ID = 0x17
    IA32_APIC_BASE = 0x1B
    IA32_FEATURE_CONTROL = 0x3A
    IA32_TSC_ADJUST = 0x3B
    IA32_SPEC_CTRL = 0x48
    IA32_PRED_CMD = 0x49
    IA32_BIOS_SIGN_ID = 0x8B
    IA32_SMM_MONITOR_CTL = 0x9B
    IA32_SMBASE = 0x9E
    IA32_UMWAIT_CONTROL = 0xE1
    IA32_MPERF = 0xE7
    IA32_APERF = 0xE8
    IA32_MTRRCAP = 0xFE
    IA32_ARCH_CAPABILITIES = 0x10A
    IA32_SYSENTER_CS = 0x174
    IA32_SYSENTER_ESP = 0x175
    IA32_SYSENTER_EIP = 0x176
    IA32_MCG_CAP = 0x179
    IA32_MCG_STATUS = 0x17A
    IA32_MISC_ENABLE = 0x1A0
    IA32_DEBUGCTL = 0x1D9
    IA32_PAT = 0x277
    IA32_MTRR_DEF_TYPE = 0x2FF
    IA32_PERF_GLOBAL_STATUS = 0x38E
    IA32_PERF_GLOBAL_CTRL = 0x38F
    IA32_VMX_BASIC = 0x480
    IA32_VMX_PINBASED_CTLS = 0x481
    IA32_VMX_PROCBASED_CTLS = 0x482
    IA32_VMX_EXIT_CTLS = 0x483
    IA32_VMX_ENTRY_CTLS = 0x484
    IA32_VMX_MISC = 0x485
    IA32_VMX_CR0_FIXED0 = 0x486
    IA32_VMX_CR0_FIXED1 = 0x487
    IA32_VMX_CR4_FIXED0 = 0x488
    IA32_VMX_CR4_FIXED1 = 0x489
    IA32_VMX_VMCS_ENUM = 0x48A
    IA32_VMX_PROCBASED_CTLS2 = 0x48B
    IA32_VMX_EPT_VPID_CAP = 0x48C
    IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
    IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
    IA32_VMX_TRUE_EXIT_CTLS = 0x48F
    IA32_VMX_TRUE_ENTRY_CTLS = 0x490
    IA32_VMX_VMFUNC = 0x491
    IA32_VMX_PROCBASED_CTLS3 = 0x492
    IA32_VMX_EXIT_CTLS2 = 0x493
    IA32_RTIT_CTL = 0x570
    IA32_U_CET = 0x6A0
    IA32_S_CET = 0x6A2
    IA32_PL0_SSP = 0x6A4
    IA32_PL1_SSP = 0x6A5
    IA32_PL2_SSP = 0x6A6
    IA32_PL3_SSP = 0x6A7
    IA32_INTERRUPT_SSP_TABLE_ADDR = 0x6A8
    IA32_TSC_DEADLINE = 0x6E0
    IA32_PKRS = 0x6E1
    IA32_X2APIC_APICID = 0x802
    IA32_BNDCFGS = 0xD90
    IA32_XSS = 0xDA0
    IA32_EFER = 0xC0000080
    IA32_STAR = 0xC0000081
    IA32_LSTAR = 0xC0000082
    IA32_CSTAR = 0xC0000083
    IA32_FMASK = 0xC0000084
    IA32_FS_BASE = 0xC0000100
    IA32_GS_BASE = 0xC0000101
    IA32_KERNEL_GS_BASE = 0xC0000102
    IA32_TSC_AUX = 0xC0000103

    # Aliases
    IA32_TSC = 0x10


class FeatureControl(RegisterBits):
    """IA32_FEATURE_CONTROL (MSR 0x3A) bits; firmware sets them and then locks the MSR.

    VMXON raises #GP unless LOCKED and the VMXON_ENABLED bit for the current
    mode (inside or outside SMX) are both set (SDM 24.7).
    """

    LOCKED = 1 << 0
    VMXON_ENABLED_INSIDE_SMX = 1 << 1
    VMXON_ENABLED_OUTSIDE_SMX = 1 << 2
    SENTER_LOCAL_FUNCTIONS = 0x7F << 8  # bits 14:8
    SENTER_GLOBAL_ENABLE = 1 << 15
    SGX_LC_ENABLED = 1 << 17
    SGX_ENABLED = 1 << 18
    LMCE_ENABLED = 1 << 20


class Efer(RegisterBits):
    """IA32_EFER (MSR 0xC0000080) bits (SDM Vol. 3A, 2.2.1)."""

    SCE = 1 << 0  #: SYSCALL enable
    LME = 1 << 8  #: IA-32e mode enable
    LMA = 1 << 10  #: IA-32e mode active (read-only, set by the CPU)
    NXE = 1 << 11  #: execute-disable bit enable


class Cr0(RegisterBits):
    """CR0 bits (SDM Vol. 3A, 2.5)."""

    PE = 1 << 0  #: protection enable
    MP = 1 << 1  #: monitor coprocessor
    EM = 1 << 2  #: x87 emulation
    TS = 1 << 3  #: task switched
    ET = 1 << 4  #: extension type (always 1)
    NE = 1 << 5  #: numeric error (must be 1 in VMX operation)
    WP = 1 << 16  #: write protect
    AM = 1 << 18  #: alignment mask
    NW = 1 << 29  #: not write-through
    CD = 1 << 30  #: cache disable
    PG = 1 << 31  #: paging


class Cr4(RegisterBits):
    """CR4 bits (SDM Vol. 3A, 2.5)."""

    VME = 1 << 0  #: virtual-8086 mode extensions
    PVI = 1 << 1  #: protected-mode virtual interrupts
    TSD = 1 << 2  #: time stamp disable
    DE = 1 << 3  #: debugging extensions
    PSE = 1 << 4  #: page size extensions
    PAE = 1 << 5  #: physical address extension
    MCE = 1 << 6  #: machine-check enable
    PGE = 1 << 7  #: page global enable
    PCE = 1 << 8  #: performance-monitoring counter enable
    OSFXSR = 1 << 9  #: OS support for FXSAVE/FXRSTOR
    OSXMMEXCPT = 1 << 10  #: OS support for unmasked SIMD FP exceptions
    UMIP = 1 << 11  #: user-mode instruction prevention
    LA57 = 1 << 12  #: 57-bit linear addresses (5-level paging)
    VMXE = 1 << 13  #: VMX enable (must be 1 for VMXON)
    SMXE = 1 << 14  #: SMX enable
    FSGSBASE = 1 << 16  #: RDFSBASE/WRFSBASE/... enable
    PCIDE = 1 << 17  #: PCID enable
    OSXSAVE = 1 << 18  #: XSAVE and processor extended states enable
    KL = 1 << 19  #: Key Locker enable
    SMEP = 1 << 20  #: supervisor-mode execution prevention
    SMAP = 1 << 21  #: supervisor-mode access prevention
    PKE = 1 << 22  #: protection keys for user-mode pages
    CET = 1 << 23  #: control-flow enforcement technology
    PKS = 1 << 24  #: protection keys for supervisor-mode pages
    UINTR = 1 << 25  #: user interrupts enable
    LASS = 1 << 27  #: linear-address space separation
    LAM_SUP = 1 << 28  #: linear-address masking for supervisor pointers
    FRED = 1 << 32  #: flexible return and event delivery


class Rflags(RegisterBits):
    """RFLAGS bits (SDM Vol. 1, 3.4.3).  ``IOPL`` is the two-bit field 13:12."""

    CF = 1 << 0  #: carry
    FIXED = 1 << 1  #: reserved, always 1
    PF = 1 << 2  #: parity
    AF = 1 << 4  #: auxiliary carry
    ZF = 1 << 6  #: zero
    SF = 1 << 7  #: sign
    TF = 1 << 8  #: trap (single step)
    IF = 1 << 9  #: interrupt enable
    DF = 1 << 10  #: direction
    OF = 1 << 11  #: overflow
    IOPL = 3 << 12  #: I/O privilege level (mask of bits 13:12)
    NT = 1 << 14  #: nested task
    RF = 1 << 16  #: resume
    VM = 1 << 17  #: virtual-8086 mode
    AC = 1 << 18  #: alignment check / access control
    VIF = 1 << 19  #: virtual interrupt flag
    VIP = 1 << 20  #: virtual interrupt pending
    ID = 1 << 21  #: CPUID available


#: Bit position of the two-bit :attr:`Rflags.IOPL` field: ``(rflags & Rflags.IOPL) >>
#: RFLAGS_IOPL_SHIFT`` is the I/O privilege level, ``iopl << RFLAGS_IOPL_SHIFT`` the bits.
RFLAGS_IOPL_SHIFT = 12

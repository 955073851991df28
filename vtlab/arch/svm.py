"""AMD-V (Secure Virtual Machine, SVM) as data: the APM's tables vtlab's SVM model uses.

Every number here is from the AMD64 Architecture Programmer's Manual, Volume 2 (the
edition in :data:`APM_EDITION`), chapter 15 "Secure Virtual Machine", Appendix B
"Layout of VMCB" and Appendix C "SVM Intercept Exit Codes"; the names follow Linux's
``arch/x86/include/asm/svm.h`` and ``uapi/asm/svm.h`` (``SVM_EXIT_CPUID`` ->
:attr:`SvmExitCode.CPUID`, ``INTERCEPT_HLT`` -> :attr:`Intercept.HLT`).

The big difference from VMX shows in the types: the VMCS is opaque (fields named by
encodings, reached only through VMREAD/VMWRITE), while the VMCB is a 4-KByte page of
ordinary memory whose layout the APM publishes - :class:`VmcbControl` and
:class:`VmcbSave` are byte offsets into it, and software reads and writes them with
plain loads and stores.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

#: Publication number and revision of the APM volume vtlab cites for SVM.
APM_ORDER_NUMBER = "24593 Rev. 3.42"
#: The edition whose section numbers vtlab's "APM Vol. 2, 15.x" citations use.
APM_EDITION = ("AMD64 Architecture Programmer's Manual Volume 2: System Programming, "
               f"Publication No. {APM_ORDER_NUMBER}, March 2024")

#: The VMCB is one 4-KByte aligned page (APM Vol. 2, 15.5.1: rAX must be 4K-aligned).
VMCB_SIZE = 0x1000
#: The control area fills bytes 000h-3FFh; the state-save area starts at 400h (Appendix B).
VMCB_SAVE_AREA = 0x400


class VmcbControl(enum.IntEnum):
    """Byte offsets in the VMCB control area (APM Vol. 2, Appendix B, Table B-1)."""

    INTERCEPT_CR = 0x000         #: bits 15:0 CR0-15 reads, 31:16 CR0-15 writes (32 bits)
    INTERCEPT_DR = 0x004         #: bits 15:0 DR0-15 reads, 31:16 DR0-15 writes (32 bits)
    INTERCEPT_EXCEPTIONS = 0x008  #: bit n intercepts exception vector n (32 bits)
    INTERCEPT_MISC1 = 0x00C      #: :class:`Intercept` bits 0-31 (INTR ... SHUTDOWN)
    INTERCEPT_MISC2 = 0x010      #: :class:`Intercept2` bits (VMRUN, VMMCALL ...)
    INTERCEPT_MISC3 = 0x014      #: INVLPGB, INVPCID, MCOMMIT, TLBSYNC ...
    PAUSE_FILTER_THRESHOLD = 0x03C  #: 16 bits
    PAUSE_FILTER_COUNT = 0x03E   #: 16 bits
    IOPM_BASE_PA = 0x040         #: physical base of the I/O permissions map (64 bits)
    MSRPM_BASE_PA = 0x048        #: physical base of the MSR permissions map (64 bits)
    TSC_OFFSET = 0x050           #: added to the TSC the guest reads (64 bits)
    GUEST_ASID = 0x058           #: bits 31:0 of the qword at 058h
    TLB_CONTROL = 0x05C          #: bits 39:32 of the qword at 058h (byte 05Ch)
    VINTR = 0x060                #: V_TPR 7:0, V_IRQ 8, VGIF 9, V_INTR_PRIO 19:16, V_IGN_TPR 20,
                                 #: V_INTR_MASKING 24, V_INTR_VECTOR 39:32 (64 bits)
    INTERRUPT_SHADOW = 0x068     #: bit 0 interrupt shadow, bit 1 guest RFLAGS.IF (64 bits)
    EXITCODE = 0x070             #: :class:`SvmExitCode` (64 bits, -1 = VMEXIT_INVALID)
    EXITINFO1 = 0x078            #: exit-specific information (64 bits)
    EXITINFO2 = 0x080            #: exit-specific information (64 bits)
    EXITINTINFO = 0x088          #: event being delivered at the exit (:class:`EventInfo`)
    NESTED_CTL = 0x090           #: bit 0 NP_ENABLE, bit 1 SEV, bit 2 SEV-ES (64 bits)
    AVIC_APIC_BAR = 0x098        #: (64 bits)
    GHCB_GPA = 0x0A0             #: (64 bits)
    EVENTINJ = 0x0A8             #: event to inject at VMRUN (:class:`EventInfo`, 64 bits)
    N_CR3 = 0x0B0                #: nested page table CR3 (64 bits)
    VIRT_EXT = 0x0B8             #: bit 0 LBR virtualization, bit 1 virtual VMSAVE/VMLOAD
    CLEAN = 0x0C0                #: VMCB clean bits (bits 31:0)
    NEXT_RIP = 0x0C8             #: nRIP: RIP of the next instruction (NRIP save, 64 bits)
    INSN_LEN = 0x0D0             #: number of instruction bytes fetched (decode assists, 8 bits)
    INSN_BYTES = 0x0D1           #: the guest instruction bytes (15 bytes)


#: (offset, width in bytes) of every control-area field vtlab reads or writes.
CONTROL_WIDTH: dict[VmcbControl, int] = {
    VmcbControl.INTERCEPT_CR: 4, VmcbControl.INTERCEPT_DR: 4, VmcbControl.INTERCEPT_EXCEPTIONS: 4,
    VmcbControl.INTERCEPT_MISC1: 4, VmcbControl.INTERCEPT_MISC2: 4, VmcbControl.INTERCEPT_MISC3: 4,
    VmcbControl.PAUSE_FILTER_THRESHOLD: 2, VmcbControl.PAUSE_FILTER_COUNT: 2,
    VmcbControl.IOPM_BASE_PA: 8, VmcbControl.MSRPM_BASE_PA: 8, VmcbControl.TSC_OFFSET: 8,
    VmcbControl.GUEST_ASID: 4, VmcbControl.TLB_CONTROL: 1, VmcbControl.VINTR: 8,
    VmcbControl.INTERRUPT_SHADOW: 8, VmcbControl.EXITCODE: 8, VmcbControl.EXITINFO1: 8,
    VmcbControl.EXITINFO2: 8, VmcbControl.EXITINTINFO: 8, VmcbControl.NESTED_CTL: 8,
    VmcbControl.AVIC_APIC_BAR: 8, VmcbControl.GHCB_GPA: 8, VmcbControl.EVENTINJ: 8,
    VmcbControl.N_CR3: 8, VmcbControl.VIRT_EXT: 8, VmcbControl.CLEAN: 4, VmcbControl.NEXT_RIP: 8,
    VmcbControl.INSN_LEN: 1, VmcbControl.INSN_BYTES: 15,
}

#: NESTED_CTL bit 0: enable nested paging (APM Vol. 2, 15.25).
NP_ENABLE = 1 << 0


class VmcbSave(enum.IntEnum):
    """Byte offsets in the VMCB, of the state-save area's fields (APM Vol. 2, Appendix B,
    Table B-2, whose offsets count from the start of the save area at 400h; these are the
    offsets from the start of the VMCB)."""

    ES = 0x400
    CS = 0x410
    SS = 0x420
    DS = 0x430
    FS = 0x440
    GS = 0x450
    GDTR = 0x460
    LDTR = 0x470
    IDTR = 0x480
    TR = 0x490
    CPL = 0x4CB        #: 8 bits
    EFER = 0x4D0
    CR4 = 0x548
    CR3 = 0x550
    CR0 = 0x558
    DR7 = 0x560
    DR6 = 0x568
    RFLAGS = 0x570
    RIP = 0x578
    RSP = 0x5D8
    RAX = 0x5F8
    STAR = 0x600
    LSTAR = 0x608
    CSTAR = 0x610
    SFMASK = 0x618
    KERNEL_GS_BASE = 0x620
    SYSENTER_CS = 0x628
    SYSENTER_ESP = 0x630
    SYSENTER_EIP = 0x638
    CR2 = 0x640
    G_PAT = 0x668
    DBGCTL = 0x670


#: The segment registers of the save area, each 16 bytes (Appendix B, Table B-2).
SEGMENTS: tuple[VmcbSave, ...] = (VmcbSave.ES, VmcbSave.CS, VmcbSave.SS, VmcbSave.DS, VmcbSave.FS,
                                  VmcbSave.GS, VmcbSave.GDTR, VmcbSave.LDTR, VmcbSave.IDTR, VmcbSave.TR)
#: Inside a segment's 16 bytes: selector (2 bytes), attributes (2), limit (4), base (8).
SEG_SELECTOR, SEG_ATTRIB, SEG_LIMIT, SEG_BASE = 0, 2, 4, 8


def pack_attrib(access_rights: int) -> int:
    """VMX-style access rights (descriptor bits 47:40 in 7:0, 55:52 in 15:12) -> the VMCB's
    12-bit segment attribute (descriptor bits 47:40 in 7:0, 55:52 in 11:8; Appendix B)."""
    return (access_rights & 0xFF) | ((access_rights >> 4) & 0xF00)


def unpack_attrib(attrib: int) -> int:
    """The VMCB's segment attribute -> VMX-style access rights (bits 7:0 and 15:12)."""
    return (attrib & 0xFF) | ((attrib & 0xF00) << 4)


#: The save-area fields VMSAVE stores and VMLOAD loads (APM Vol. 2, 15.5.2, and the
#: VMLOAD/VMSAVE pages of Vol. 3): FS, GS, TR, LDTR with their hidden state, KernelGsBase,
#: STAR, LSTAR, CSTAR, SFMASK, SYSENTER_CS/ESP/EIP.
VMLOAD_VMSAVE_FIELDS: tuple[VmcbSave, ...] = (
    VmcbSave.FS, VmcbSave.GS, VmcbSave.TR, VmcbSave.LDTR, VmcbSave.KERNEL_GS_BASE, VmcbSave.STAR,
    VmcbSave.LSTAR, VmcbSave.CSTAR, VmcbSave.SFMASK, VmcbSave.SYSENTER_CS, VmcbSave.SYSENTER_ESP,
    VmcbSave.SYSENTER_EIP)


class Intercept(enum.IntFlag):
    """The intercept vector at VMCB offset 00Ch (APM Vol. 2, Appendix B, Table B-1)."""

    INTR = 1 << 0
    NMI = 1 << 1
    SMI = 1 << 2
    INIT = 1 << 3
    VINTR = 1 << 4
    SELECTIVE_CR0 = 1 << 5   #: writes of CR0 that change bits other than TS or MP
    IDTR_READ = 1 << 6
    GDTR_READ = 1 << 7
    LDTR_READ = 1 << 8
    TR_READ = 1 << 9
    IDTR_WRITE = 1 << 10
    GDTR_WRITE = 1 << 11
    LDTR_WRITE = 1 << 12
    TR_WRITE = 1 << 13
    RDTSC = 1 << 14
    RDPMC = 1 << 15
    PUSHF = 1 << 16
    POPF = 1 << 17
    CPUID = 1 << 18
    RSM = 1 << 19
    IRET = 1 << 20
    INTN = 1 << 21
    INVD = 1 << 22
    PAUSE = 1 << 23
    HLT = 1 << 24
    INVLPG = 1 << 25
    INVLPGA = 1 << 26
    IOIO_PROT = 1 << 27      #: consult the IOPM for IN/OUT/INS/OUTS
    MSR_PROT = 1 << 28       #: consult the MSRPM for RDMSR/WRMSR
    TASK_SWITCH = 1 << 29
    FERR_FREEZE = 1 << 30
    SHUTDOWN = 1 << 31


class Intercept2(enum.IntFlag):
    """The intercept vector at VMCB offset 010h (APM Vol. 2, Appendix B, Table B-1)."""

    VMRUN = 1 << 0
    VMMCALL = 1 << 1
    VMLOAD = 1 << 2
    VMSAVE = 1 << 3
    STGI = 1 << 4
    CLGI = 1 << 5
    SKINIT = 1 << 6
    RDTSCP = 1 << 7
    ICEBP = 1 << 8
    WBINVD = 1 << 9
    MONITOR = 1 << 10
    MWAIT = 1 << 11
    MWAIT_COND = 1 << 12
    XSETBV = 1 << 13
    RDPRU = 1 << 14
    EFER_WRITE_TRAP = 1 << 15


class SvmExitCode(enum.IntEnum):
    """EXITCODE values (APM Vol. 2, Appendix C, Table C-1), named as Linux's ``SVM_EXIT_*``.

    CR reads are 00h + n, CR writes 10h + n, DR reads 20h + n, DR writes 30h + n and
    exception n is 40h + n (:func:`cr_read`, :func:`exception_exit` ...); the members below
    name the ones vtlab's guests meet.
    """

    CR0_READ = 0x000
    CR3_READ = 0x003
    CR4_READ = 0x004
    CR8_READ = 0x008
    CR0_WRITE = 0x010
    CR3_WRITE = 0x013
    CR4_WRITE = 0x014
    CR8_WRITE = 0x018
    DR0_READ = 0x020
    DR7_READ = 0x027
    DR0_WRITE = 0x030
    DR7_WRITE = 0x037
    EXCP_BASE = 0x040        #: exception vector 0 (#DE); vector n is 40h + n
    EXCP_DB = 0x041
    EXCP_BP = 0x043
    EXCP_UD = 0x046
    EXCP_GP = 0x04D
    EXCP_PF = 0x04E
    INTR = 0x060
    NMI = 0x061
    SMI = 0x062
    INIT = 0x063
    VINTR = 0x064
    CR0_SEL_WRITE = 0x065
    IDTR_READ = 0x066
    GDTR_READ = 0x067
    LDTR_READ = 0x068
    TR_READ = 0x069
    IDTR_WRITE = 0x06A
    GDTR_WRITE = 0x06B
    LDTR_WRITE = 0x06C
    TR_WRITE = 0x06D
    RDTSC = 0x06E
    RDPMC = 0x06F
    PUSHF = 0x070
    POPF = 0x071
    CPUID = 0x072
    RSM = 0x073
    IRET = 0x074
    SWINT = 0x075
    INVD = 0x076
    PAUSE = 0x077
    HLT = 0x078
    INVLPG = 0x079
    INVLPGA = 0x07A
    IOIO = 0x07B
    MSR = 0x07C
    TASK_SWITCH = 0x07D
    FERR_FREEZE = 0x07E
    SHUTDOWN = 0x07F
    VMRUN = 0x080
    VMMCALL = 0x081
    VMLOAD = 0x082
    VMSAVE = 0x083
    STGI = 0x084
    CLGI = 0x085
    SKINIT = 0x086
    RDTSCP = 0x087
    ICEBP = 0x088
    WBINVD = 0x089
    MONITOR = 0x08A
    MWAIT = 0x08B
    MWAIT_COND = 0x08C
    XSETBV = 0x08D
    RDPRU = 0x08E
    EFER_WRITE_TRAP = 0x08F
    NPF = 0x400
    AVIC_INCOMPLETE_IPI = 0x401
    AVIC_UNACCELERATED_ACCESS = 0x402
    VMGEXIT = 0x403
    INVALID = -1             #: VMRUN's consistency checks failed (stored as 64-bit -1)
    BUSY = -2

    @property
    def field_value(self) -> int:
        """The EXITCODE as the 64-bit VMCB field holds it (-1 is FFFF_FFFF_FFFF_FFFFh)."""
        return int(self) & 0xFFFF_FFFF_FFFF_FFFF

    @classmethod
    def from_field(cls, value: int) -> "SvmExitCode | int":
        """The member for a 64-bit EXITCODE field value (the bare number if unnamed)."""
        signed = value - (1 << 64) if value >> 63 else value
        try:
            return cls(signed)
        except ValueError:
            return signed


def cr_read(n: int) -> int:
    """EXITCODE of a read of CRn: 00h + n (Appendix C)."""
    return 0x000 + n


def cr_write(n: int) -> int:
    """EXITCODE of a write of CRn: 10h + n (Appendix C)."""
    return 0x010 + n


def dr_read(n: int) -> int:
    """EXITCODE of a read of DRn: 20h + n (Appendix C)."""
    return 0x020 + n


def dr_write(n: int) -> int:
    """EXITCODE of a write of DRn: 30h + n (Appendix C)."""
    return 0x030 + n


def exception_exit(vector: int) -> int:
    """EXITCODE of exception ``vector``: 40h + vector (Appendix C)."""
    return int(SvmExitCode.EXCP_BASE) + vector


def exit_name(code: int) -> str:
    """Linux-style name of any EXITCODE value ("CR3_WRITE", "EXCP_GP", "IOIO" ...)."""
    try:
        return SvmExitCode(code).name
    except ValueError:
        pass
    for base, what in ((0x000, "CR{}_READ"), (0x010, "CR{}_WRITE"), (0x020, "DR{}_READ"),
                       (0x030, "DR{}_WRITE"), (0x040, "EXCP_{}")):
        if base <= code < base + (32 if base == 0x040 else 16):
            return what.format(code - base)
    return f"EXIT_{code:#x}"


# -------------------------------------------------------------------- EXITINFO1 layouts
@dataclass(frozen=True)
class IoioInfo:
    """EXITINFO1 of an IOIO intercept (APM Vol. 2, 15.10.2, Figure 15-2).

    Bit 0 TYPE (1 = IN, 0 = OUT), bit 2 STR (INS/OUTS), bit 3 REP, bits 6:4 SZ8/SZ16/SZ32
    (one-hot operand size), bits 9:7 A16/A32/A64 (address size), bits 12:10 SEG (effective
    segment of INS/OUTS, a decode assist), bits 31:16 the port.  EXITINFO2 holds the rIP
    of the next instruction.
    """

    port: int
    size: int          #: 1, 2 or 4 bytes
    is_in: bool
    string: bool = False
    rep: bool = False
    address_size: int = 16   #: 16, 32 or 64
    segment: int = 0          #: ES 0, CS 1, SS 2, DS 3, FS 4, GS 5

    def encode(self) -> int:
        if self.size not in (1, 2, 4) or self.address_size not in (16, 32, 64):
            raise ValueError("IOIO size must be 1, 2 or 4 bytes and address size 16, 32 or 64")
        return (int(self.is_in) | int(self.string) << 2 | int(self.rep) << 3
                | {1: 1 << 4, 2: 1 << 5, 4: 1 << 6}[self.size]
                | {16: 1 << 7, 32: 1 << 8, 64: 1 << 9}[self.address_size]
                | (self.segment & 7) << 10 | (self.port & 0xFFFF) << 16)

    @classmethod
    def decode(cls, value: int) -> "IoioInfo":
        size = 1 if value >> 4 & 1 else 2 if value >> 5 & 1 else 4
        asz = 16 if value >> 7 & 1 else 32 if value >> 8 & 1 else 64
        return cls(port=value >> 16 & 0xFFFF, size=size, is_in=bool(value & 1), string=bool(value >> 2 & 1),
                   rep=bool(value >> 3 & 1), address_size=asz, segment=value >> 10 & 7)

    def as_dict(self) -> dict[str, object]:
        return {"port": self.port, "size": self.size, "direction": "IN" if self.is_in else "OUT",
                "string": self.string, "rep": self.rep}


#: EXITINFO1 of an MSR intercept: 0 for RDMSR, 1 for WRMSR (APM Vol. 2, 15.11).
MSR_EXITINFO1_READ, MSR_EXITINFO1_WRITE = 0, 1

#: EXITINFO1 of a CR intercept with decode assists (APM Vol. 2, chapter 15, "Decode
#: Assists", "MOV CRx/DRx Intercepts"): bit 63 = 1 for a MOV CRx instruction, 0 for LMSW,
#: CLTS and SMSW.  Bit 63 is defined for CR intercepts only: a DR intercept (only MOV DRx
#: reaches a DR) leaves it 0 (Linux's KVM tests it, as ``CR_VALID``, in its CR handler alone).
CR_DR_EXITINFO1_MOV = 1 << 63
#: Bits 3:0 of EXITINFO1 of a MOV CRx or MOV DRx intercept: the GPR number ("Decode Assists").
CR_DR_EXITINFO1_GPR = 0xF


class NpfError(enum.IntFlag):
    """EXITINFO1 of a nested page fault (APM Vol. 2, 15.25, "Nested Paging"): a #PF error code plus
    bit 32 (the fault was on the final guest-physical address) and bit 33 (on a
    guest page-table access).  EXITINFO2 is the faulting guest-physical address."""

    P = 1 << 0
    RW = 1 << 1
    US = 1 << 2
    RSV = 1 << 3
    ID = 1 << 4
    FINAL_GPA = 1 << 32
    PAGE_TABLE = 1 << 33


class EventType(enum.IntEnum):
    """TYPE (bits 10:8) of EVENTINJ and EXITINTINFO (APM Vol. 2, 15.20)."""

    INTR = 0          #: external or virtual interrupt
    NMI = 2
    EXCEPTION = 3     #: exception (fault or trap)
    SOFT_INT = 4      #: software interrupt (INTn)


@dataclass(frozen=True)
class EventInfo:
    """The EVENTINJ / EXITINTINFO format (APM Vol. 2, 15.20, Figure 15-5): bits 7:0
    VECTOR, 10:8 TYPE, bit 11 EV (error code valid), bit 31 V (valid), 63:32 ERRORCODE."""

    vector: int
    type: EventType
    error_code: int | None = None
    valid: bool = True

    def encode(self) -> int:
        return ((self.vector & 0xFF) | (int(self.type) & 7) << 8 | int(self.error_code is not None) << 11
                | int(self.valid) << 31 | ((self.error_code or 0) & 0xFFFF_FFFF) << 32)

    @classmethod
    def decode(cls, value: int) -> "EventInfo":
        ev = bool(value >> 11 & 1)
        try:
            kind = EventType(value >> 8 & 7)
        except ValueError as exc:
            raise ValueError(f"EVENTINJ/EXITINTINFO TYPE {value >> 8 & 7} is reserved (APM Vol. 2, 15.20)") from exc
        return cls(value & 0xFF, kind, value >> 32 & 0xFFFF_FFFF if ev else None, bool(value >> 31 & 1))


#: Bit 31 of EVENTINJ / EXITINTINFO: the event is valid.
EVENT_VALID = 1 << 31


# ------------------------------------------------------------ permission maps
#: The I/O permissions map: 12 KBytes, one bit per port, bit n for port n; an access of
#: several bytes is intercepted if the bit of any byte it touches is set (APM Vol. 2, 15.10.1).
IOPM_SIZE = 12 * 1024
#: The MSR permissions map: 8 KBytes, two bits per MSR (APM Vol. 2, 15.11).
MSRPM_SIZE = 8 * 1024

#: (first MSR, byte offset of its vector in the MSRPM) of the three MSR ranges the MSRPM
#: covers, 8K MSRs each in 2 KBytes (APM Vol. 2, 15.11): 0000_0000h-0000_1FFFh at 000h,
#: C000_0000h-C000_1FFFh at 800h, C001_0000h-C001_1FFFh at 1000h (1800h-1FFFh reserved).
MSRPM_RANGES: tuple[tuple[int, int], ...] = ((0x0000_0000, 0x000), (0xC000_0000, 0x800), (0xC001_0000, 0x1000))
MSRPM_RANGE_MSRS = 0x2000


def iopm_bit(port: int) -> tuple[int, int]:
    """(byte offset, bit) of ``port`` in the IOPM: bit ``port`` of the map."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port:#x} is not 0-FFFFh")
    return port >> 3, port & 7


def msrpm_bits(msr: int) -> tuple[int, int] | None:
    """(byte offset, bit of the read intercept) of ``msr`` in the MSRPM; the write
    intercept is the next bit (``bit + 1``).  Each MSR has two bits, read at the even
    position 2n and write at 2n + 1 (APM Vol. 2, 15.11).  None: the MSR lies outside
    the three ranges, and an access to it is always intercepted (with MSR_PROT set)."""
    for first, base in MSRPM_RANGES:
        if first <= msr < first + MSRPM_RANGE_MSRS:
            n = msr - first
            return base + n // 4, (n % 4) * 2
    return None


# ----------------------------------------------------------- detection and enabling
#: CPUID Fn8000_0001h ECX bit 2: SVM (APM Vol. 2, 15.4; Vol. 3, Appendix E).
CPUID_8000_0001_ECX_SVM = 1 << 2
#: CPUID Fn8000_000Ah: SVM revision (EAX 7:0), number of ASIDs (EBX), features (EDX).
CPUID_SVM_LEAF = 0x8000_000A


class SvmFeature(enum.IntFlag):
    """CPUID Fn8000_000Ah EDX (APM Vol. 3, Appendix E.4.9; Vol. 2, 15.4)."""

    NP = 1 << 0             #: nested paging
    LBR_VIRT = 1 << 1
    SVML = 1 << 2           #: SVM lock
    NRIPS = 1 << 3          #: NRIP save on #VMEXIT
    TSC_RATE_MSR = 1 << 4
    VMCB_CLEAN = 1 << 5     #: VMCB clean bits
    FLUSH_BY_ASID = 1 << 6
    DECODE_ASSISTS = 1 << 7
    PAUSE_FILTER = 1 << 10
    PAUSE_FILTER_THRESHOLD = 1 << 12
    AVIC = 1 << 13
    VMSAVE_VIRT = 1 << 15
    VGIF = 1 << 16


class SvmMsr(enum.IntEnum):
    """The SVM MSRs (APM Vol. 2, 15.30) and EFER."""

    EFER = 0xC000_0080
    VM_CR = 0xC001_0114
    VM_HSAVE_PA = 0xC001_0117


class VmCr(enum.IntFlag):
    """VM_CR MSR bits (APM Vol. 2, 15.30.1)."""

    DPD = 1 << 0
    R_INIT = 1 << 1
    DIS_A20M = 1 << 2
    LOCK = 1 << 3       #: SVMDIS (and LOCK) are read-only once set
    SVMDIS = 1 << 4     #: EFER.SVME cannot be set while SVMDIS = 1


#: CR4 bits 63:32 are reserved and must be zero (APM Vol. 2, 3.1.3): the part of VMRUN's
#: "any MBZ bit of CR4 is set" check (15.5.1) that vtlab makes.
CR4_MBZ_SHIFT = 32

#: EFER.SVME, bit 12: SVM enable (APM Vol. 2, 3.1.7 and 15.4).
EFER_SVME = 1 << 12


class TlbControl(enum.IntEnum):
    """TLB_CONTROL (VMCB 05Ch) values (APM Vol. 2, chapter 15, "TLB Control")."""

    DO_NOTHING = 0x00
    FLUSH_ALL = 0x01      #: flush the entire TLB at VMRUN (all ASIDs)
    FLUSH_ASID = 0x03     #: flush this guest's TLB entries
    FLUSH_ASID_LOCAL = 0x07  #: flush this guest's non-global entries


#: The opcodes of the SVM instructions: 0F 01 D8 ... DF (APM Vol. 3, instruction pages).
SVM_OPCODES: dict[bytes, str] = {
    b"\x0f\x01\xd8": "VMRUN", b"\x0f\x01\xd9": "VMMCALL", b"\x0f\x01\xda": "VMLOAD",
    b"\x0f\x01\xdb": "VMSAVE", b"\x0f\x01\xdc": "STGI", b"\x0f\x01\xdd": "CLGI",
    b"\x0f\x01\xde": "SKINIT", b"\x0f\x01\xdf": "INVLPGA",
}

#: CPUID leaf 0's vendor string on AMD processors (EBX:EDX:ECX = "Auth" "enti" "cAMD").
AMD_VENDOR = "AuthenticAMD"

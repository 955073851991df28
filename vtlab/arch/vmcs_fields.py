"""VMCS field encodings (Intel SDM Vol. 3C, Appendix B "Field Encoding in VMCS").

Software never touches the VMCS memory layout directly: VMREAD and VMWRITE name
a field by a 32-bit *encoding* (SDM 25.11.2, "VMREAD, VMWRITE, and Encodings of
VMCS Fields", Table 25-21 "Structure of VMCS Component Encoding"):

====== =========================================================
bits   meaning
====== =========================================================
0      access type: 0 = full, 1 = high (upper 32 bits of a 64-bit field)
9:1    index
11:10  type: 0 control, 1 VM-exit information (read-only), 2 guest state, 3 host state
12     reserved, must be 0
14:13  width: 0 16-bit, 1 64-bit, 2 32-bit, 3 natural width
31:15  reserved, must be 0
====== =========================================================

:class:`VmcsField` lists every field of Appendix B by its full encoding, and
names the "high" access encoding of each 64-bit field too, as Appendix B lists it
(``TSC_OFFSET = 0x2010``, ``TSC_OFFSET_HIGH = 0x2011``).  A high half is not a field
of its own but a second way to reach bits 63:32 of the same field (SDM 25.11.2), so
the ``*_HIGH`` members work by name and by value (``VmcsField(0x2011)`` is
``VmcsField.TSC_OFFSET_HIGH``) but iterating over ``VmcsField`` (and ``len``) gives
each field once, by its full encoding; :attr:`VmcsField.full` goes from either
encoding to the field.  Names follow Linux's ``arch/x86/include/asm/vmx.h``
(``<NAME>_HIGH`` for the high halves); fields Linux does not name get a name in the
same style.  :func:`decode_encoding` splits any encoding into its parts.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from functools import cached_property

__all__ = [
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
]


class VmcsField(enum.IntEnum):
    """Encoding of every VMCS field (SDM Appendix B), full access type, plus the named
    high access encoding (``<NAME>_HIGH`` = encoding | 1) of every 64-bit field.

    ``int(VmcsField.GUEST_RIP) == 0x681E``.  Useful properties:
    ``.encoding_info`` (a :class:`FieldEncoding`), ``.width``, ``.type``,
    ``.area``, ``.read_only``, ``.description`` and ``.full`` (the field itself, also
    for a ``*_HIGH`` member).  Iteration yields the fields only (no ``*_HIGH``): a high
    half is an access type of its field, not another field (see the module doc).
    """

    # --- B.1.1 16-bit control fields -------------------------------------
    VIRTUAL_PROCESSOR_ID = 0x0000
    POSTED_INTR_NV = 0x0002
    EPTP_INDEX = 0x0004
    HLAT_PREFIX_SIZE = 0x0006
    LAST_PID_POINTER_INDEX = 0x0008
    # --- B.1.2 16-bit guest-state fields ---------------------------------
    GUEST_ES_SELECTOR = 0x0800
    GUEST_CS_SELECTOR = 0x0802
    GUEST_SS_SELECTOR = 0x0804
    GUEST_DS_SELECTOR = 0x0806
    GUEST_FS_SELECTOR = 0x0808
    GUEST_GS_SELECTOR = 0x080A
    GUEST_LDTR_SELECTOR = 0x080C
    GUEST_TR_SELECTOR = 0x080E
    GUEST_INTR_STATUS = 0x0810
    GUEST_PML_INDEX = 0x0812
    GUEST_UINV = 0x0814
    # --- B.1.3 16-bit host-state fields ----------------------------------
    HOST_ES_SELECTOR = 0x0C00
    HOST_CS_SELECTOR = 0x0C02
    HOST_SS_SELECTOR = 0x0C04
    HOST_DS_SELECTOR = 0x0C06
    HOST_FS_SELECTOR = 0x0C08
    HOST_GS_SELECTOR = 0x0C0A
    HOST_TR_SELECTOR = 0x0C0C
    # --- B.2.1 64-bit control fields -------------------------------------
    IO_BITMAP_A = 0x2000
    IO_BITMAP_A_HIGH = 0x2001
    IO_BITMAP_B = 0x2002
    IO_BITMAP_B_HIGH = 0x2003
    MSR_BITMAP = 0x2004
    MSR_BITMAP_HIGH = 0x2005
    VM_EXIT_MSR_STORE_ADDR = 0x2006
    VM_EXIT_MSR_STORE_ADDR_HIGH = 0x2007
    VM_EXIT_MSR_LOAD_ADDR = 0x2008
    VM_EXIT_MSR_LOAD_ADDR_HIGH = 0x2009
    VM_ENTRY_MSR_LOAD_ADDR = 0x200A
    VM_ENTRY_MSR_LOAD_ADDR_HIGH = 0x200B
    EXECUTIVE_VMCS_POINTER = 0x200C
    EXECUTIVE_VMCS_POINTER_HIGH = 0x200D
    PML_ADDRESS = 0x200E
    PML_ADDRESS_HIGH = 0x200F
    TSC_OFFSET = 0x2010
    TSC_OFFSET_HIGH = 0x2011
    VIRTUAL_APIC_PAGE_ADDR = 0x2012
    VIRTUAL_APIC_PAGE_ADDR_HIGH = 0x2013
    APIC_ACCESS_ADDR = 0x2014
    APIC_ACCESS_ADDR_HIGH = 0x2015
    POSTED_INTR_DESC_ADDR = 0x2016
    POSTED_INTR_DESC_ADDR_HIGH = 0x2017
    VM_FUNCTION_CONTROL = 0x2018
    VM_FUNCTION_CONTROL_HIGH = 0x2019
    EPT_POINTER = 0x201A
    EPT_POINTER_HIGH = 0x201B
    EOI_EXIT_BITMAP0 = 0x201C
    EOI_EXIT_BITMAP0_HIGH = 0x201D
    EOI_EXIT_BITMAP1 = 0x201E
    EOI_EXIT_BITMAP1_HIGH = 0x201F
    EOI_EXIT_BITMAP2 = 0x2020
    EOI_EXIT_BITMAP2_HIGH = 0x2021
    EOI_EXIT_BITMAP3 = 0x2022
    EOI_EXIT_BITMAP3_HIGH = 0x2023
    EPTP_LIST_ADDRESS = 0x2024
    EPTP_LIST_ADDRESS_HIGH = 0x2025
    VMREAD_BITMAP = 0x2026
    VMREAD_BITMAP_HIGH = 0x2027
    VMWRITE_BITMAP = 0x2028
    VMWRITE_BITMAP_HIGH = 0x2029
    VE_INFORMATION_ADDRESS = 0x202A
    VE_INFORMATION_ADDRESS_HIGH = 0x202B
    XSS_EXIT_BITMAP = 0x202C
    XSS_EXIT_BITMAP_HIGH = 0x202D
    ENCLS_EXITING_BITMAP = 0x202E
    ENCLS_EXITING_BITMAP_HIGH = 0x202F
    SPPT_POINTER = 0x2030
    SPPT_POINTER_HIGH = 0x2031
    TSC_MULTIPLIER = 0x2032
    TSC_MULTIPLIER_HIGH = 0x2033
    TERTIARY_VM_EXEC_CONTROL = 0x2034
    TERTIARY_VM_EXEC_CONTROL_HIGH = 0x2035
    ENCLV_EXITING_BITMAP = 0x2036
    ENCLV_EXITING_BITMAP_HIGH = 0x2037
    LOW_PASID_DIR_ADDRESS = 0x2038
    LOW_PASID_DIR_ADDRESS_HIGH = 0x2039
    HIGH_PASID_DIR_ADDRESS = 0x203A
    HIGH_PASID_DIR_ADDRESS_HIGH = 0x203B
    SHARED_EPT_POINTER = 0x203C
    SHARED_EPT_POINTER_HIGH = 0x203D
    PCONFIG_EXITING_BITMAP = 0x203E
    PCONFIG_EXITING_BITMAP_HIGH = 0x203F
    HLAT_POINTER = 0x2040
    HLAT_POINTER_HIGH = 0x2041
    PID_POINTER_TABLE = 0x2042
    PID_POINTER_TABLE_HIGH = 0x2043
    SECONDARY_VM_EXIT_CONTROLS = 0x2044
    SECONDARY_VM_EXIT_CONTROLS_HIGH = 0x2045
    IA32_SPEC_CTRL_MASK = 0x204A
    IA32_SPEC_CTRL_MASK_HIGH = 0x204B
    IA32_SPEC_CTRL_SHADOW = 0x204C
    IA32_SPEC_CTRL_SHADOW_HIGH = 0x204D
    INJECTED_EVENT_DATA = 0x2052
    INJECTED_EVENT_DATA_HIGH = 0x2053
    # --- B.2.2 64-bit read-only data fields ------------------------------
    GUEST_PHYSICAL_ADDRESS = 0x2400
    GUEST_PHYSICAL_ADDRESS_HIGH = 0x2401
    ORIGINAL_EVENT_DATA = 0x2404
    ORIGINAL_EVENT_DATA_HIGH = 0x2405
    # --- B.2.3 64-bit guest-state fields ---------------------------------
    VMCS_LINK_POINTER = 0x2800
    VMCS_LINK_POINTER_HIGH = 0x2801
    GUEST_IA32_DEBUGCTL = 0x2802
    GUEST_IA32_DEBUGCTL_HIGH = 0x2803
    GUEST_IA32_PAT = 0x2804
    GUEST_IA32_PAT_HIGH = 0x2805
    GUEST_IA32_EFER = 0x2806
    GUEST_IA32_EFER_HIGH = 0x2807
    GUEST_IA32_PERF_GLOBAL_CTRL = 0x2808
    GUEST_IA32_PERF_GLOBAL_CTRL_HIGH = 0x2809
    GUEST_PDPTR0 = 0x280A
    GUEST_PDPTR0_HIGH = 0x280B
    GUEST_PDPTR1 = 0x280C
    GUEST_PDPTR1_HIGH = 0x280D
    GUEST_PDPTR2 = 0x280E
    GUEST_PDPTR2_HIGH = 0x280F
    GUEST_PDPTR3 = 0x2810
    GUEST_PDPTR3_HIGH = 0x2811
    GUEST_BNDCFGS = 0x2812
    GUEST_BNDCFGS_HIGH = 0x2813
    GUEST_IA32_RTIT_CTL = 0x2814
    GUEST_IA32_RTIT_CTL_HIGH = 0x2815
    GUEST_IA32_LBR_CTL = 0x2816
    GUEST_IA32_LBR_CTL_HIGH = 0x2817
    GUEST_IA32_PKRS = 0x2818
    GUEST_IA32_PKRS_HIGH = 0x2819
    GUEST_IA32_FRED_CONFIG = 0x281A
    GUEST_IA32_FRED_CONFIG_HIGH = 0x281B
    GUEST_IA32_FRED_RSP1 = 0x281C
    GUEST_IA32_FRED_RSP1_HIGH = 0x281D
    GUEST_IA32_FRED_RSP2 = 0x281E
    GUEST_IA32_FRED_RSP2_HIGH = 0x281F
    GUEST_IA32_FRED_RSP3 = 0x2820
    GUEST_IA32_FRED_RSP3_HIGH = 0x2821
    GUEST_IA32_FRED_STKLVLS = 0x2822
    GUEST_IA32_FRED_STKLVLS_HIGH = 0x2823
    GUEST_IA32_FRED_SSP1 = 0x2824
    GUEST_IA32_FRED_SSP1_HIGH = 0x2825
    GUEST_IA32_FRED_SSP2 = 0x2826
    GUEST_IA32_FRED_SSP2_HIGH = 0x2827
    GUEST_IA32_FRED_SSP3 = 0x2828
    GUEST_IA32_FRED_SSP3_HIGH = 0x2829
    # --- B.2.4 64-bit host-state fields ----------------------------------
    HOST_IA32_PAT = 0x2C00
    HOST_IA32_PAT_HIGH = 0x2C01
    HOST_IA32_EFER = 0x2C02
    HOST_IA32_EFER_HIGH = 0x2C03
    HOST_IA32_PERF_GLOBAL_CTRL = 0x2C04
    HOST_IA32_PERF_GLOBAL_CTRL_HIGH = 0x2C05
    HOST_IA32_PKRS = 0x2C06
    HOST_IA32_PKRS_HIGH = 0x2C07
    HOST_IA32_FRED_CONFIG = 0x2C08
    HOST_IA32_FRED_CONFIG_HIGH = 0x2C09
    HOST_IA32_FRED_RSP1 = 0x2C0A
    HOST_IA32_FRED_RSP1_HIGH = 0x2C0B
    HOST_IA32_FRED_RSP2 = 0x2C0C
    HOST_IA32_FRED_RSP2_HIGH = 0x2C0D
    HOST_IA32_FRED_RSP3 = 0x2C0E
    HOST_IA32_FRED_RSP3_HIGH = 0x2C0F
    HOST_IA32_FRED_STKLVLS = 0x2C10
    HOST_IA32_FRED_STKLVLS_HIGH = 0x2C11
    HOST_IA32_FRED_SSP1 = 0x2C12
    HOST_IA32_FRED_SSP1_HIGH = 0x2C13
    HOST_IA32_FRED_SSP2 = 0x2C14
    HOST_IA32_FRED_SSP2_HIGH = 0x2C15
    HOST_IA32_FRED_SSP3 = 0x2C16
    HOST_IA32_FRED_SSP3_HIGH = 0x2C17
    # --- B.3.1 32-bit control fields -------------------------------------
    PIN_BASED_VM_EXEC_CONTROL = 0x4000
    CPU_BASED_VM_EXEC_CONTROL = 0x4002
    EXCEPTION_BITMAP = 0x4004
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008
    CR3_TARGET_COUNT = 0x400A
    VM_EXIT_CONTROLS = 0x400C
    VM_EXIT_MSR_STORE_COUNT = 0x400E
    VM_EXIT_MSR_LOAD_COUNT = 0x4010
    VM_ENTRY_CONTROLS = 0x4012
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014
    VM_ENTRY_INTR_INFO_FIELD = 0x4016
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018
    VM_ENTRY_INSTRUCTION_LEN = 0x401A
    TPR_THRESHOLD = 0x401C
    SECONDARY_VM_EXEC_CONTROL = 0x401E
    PLE_GAP = 0x4020
    PLE_WINDOW = 0x4022
    NOTIFY_WINDOW = 0x4024
    # --- B.3.2 32-bit read-only data fields ------------------------------
    VM_INSTRUCTION_ERROR = 0x4400
    VM_EXIT_REASON = 0x4402
    VM_EXIT_INTR_INFO = 0x4404
    VM_EXIT_INTR_ERROR_CODE = 0x4406
    IDT_VECTORING_INFO_FIELD = 0x4408
    IDT_VECTORING_ERROR_CODE = 0x440A
    VM_EXIT_INSTRUCTION_LEN = 0x440C
    VMX_INSTRUCTION_INFO = 0x440E
    # --- B.3.3 32-bit guest-state fields ---------------------------------
    GUEST_ES_LIMIT = 0x4800
    GUEST_CS_LIMIT = 0x4802
    GUEST_SS_LIMIT = 0x4804
    GUEST_DS_LIMIT = 0x4806
    GUEST_FS_LIMIT = 0x4808
    GUEST_GS_LIMIT = 0x480A
    GUEST_LDTR_LIMIT = 0x480C
    GUEST_TR_LIMIT = 0x480E
    GUEST_GDTR_LIMIT = 0x4810
    GUEST_IDTR_LIMIT = 0x4812
    GUEST_ES_AR_BYTES = 0x4814
    GUEST_CS_AR_BYTES = 0x4816
    GUEST_SS_AR_BYTES = 0x4818
    GUEST_DS_AR_BYTES = 0x481A
    GUEST_FS_AR_BYTES = 0x481C
    GUEST_GS_AR_BYTES = 0x481E
    GUEST_LDTR_AR_BYTES = 0x4820
    GUEST_TR_AR_BYTES = 0x4822
    GUEST_INTERRUPTIBILITY_INFO = 0x4824
    GUEST_ACTIVITY_STATE = 0x4826
    GUEST_SMBASE = 0x4828
    GUEST_SYSENTER_CS = 0x482A
    VMX_PREEMPTION_TIMER_VALUE = 0x482E
    # --- B.3.4 32-bit host-state field -----------------------------------
    HOST_IA32_SYSENTER_CS = 0x4C00
    # --- B.4.1 natural-width control fields ------------------------------
    CR0_GUEST_HOST_MASK = 0x6000
    CR4_GUEST_HOST_MASK = 0x6002
    CR0_READ_SHADOW = 0x6004
    CR4_READ_SHADOW = 0x6006
    CR3_TARGET_VALUE0 = 0x6008
    CR3_TARGET_VALUE1 = 0x600A
    CR3_TARGET_VALUE2 = 0x600C
    CR3_TARGET_VALUE3 = 0x600E
    # --- B.4.2 natural-width read-only data fields -----------------------
    EXIT_QUALIFICATION = 0x6400
    IO_RCX = 0x6402
    IO_RSI = 0x6404
    IO_RDI = 0x6406
    IO_RIP = 0x6408
    GUEST_LINEAR_ADDRESS = 0x640A
    # --- B.4.3 natural-width guest-state fields --------------------------
    GUEST_CR0 = 0x6800
    GUEST_CR3 = 0x6802
    GUEST_CR4 = 0x6804
    GUEST_ES_BASE = 0x6806
    GUEST_CS_BASE = 0x6808
    GUEST_SS_BASE = 0x680A
    GUEST_DS_BASE = 0x680C
    GUEST_FS_BASE = 0x680E
    GUEST_GS_BASE = 0x6810
    GUEST_LDTR_BASE = 0x6812
    GUEST_TR_BASE = 0x6814
    GUEST_GDTR_BASE = 0x6816
    GUEST_IDTR_BASE = 0x6818
    GUEST_DR7 = 0x681A
    GUEST_RSP = 0x681C
    GUEST_RIP = 0x681E
    GUEST_RFLAGS = 0x6820
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822
    GUEST_SYSENTER_ESP = 0x6824
    GUEST_SYSENTER_EIP = 0x6826
    GUEST_S_CET = 0x6828
    GUEST_SSP = 0x682A
    GUEST_INTR_SSP_TABLE = 0x682C
    # --- B.4.4 natural-width host-state fields ---------------------------
    HOST_CR0 = 0x6C00
    HOST_CR3 = 0x6C02
    HOST_CR4 = 0x6C04
    HOST_FS_BASE = 0x6C06
    HOST_GS_BASE = 0x6C08
    HOST_TR_BASE = 0x6C0A
    HOST_GDTR_BASE = 0x6C0C
    HOST_IDTR_BASE = 0x6C0E
    HOST_IA32_SYSENTER_ESP = 0x6C10
    HOST_IA32_SYSENTER_EIP = 0x6C12
    HOST_RSP = 0x6C14
    HOST_RIP = 0x6C16
    HOST_S_CET = 0x6C18
    HOST_SSP = 0x6C1A
    HOST_INTR_SSP_TABLE = 0x6C1C

    @property
    def encoding_info(self) -> "FieldEncoding":
        """This field's encoding split into access type, index, type and width."""
        return decode_encoding(int(self))

    @property
    def width(self) -> "FieldWidth":
        """The field's width (16, 32, 64 bits or natural width)."""
        return decode_encoding(int(self)).width

    @property
    def type(self) -> "FieldType":
        """The field's type from bits 11:10 (control, exit information, guest, host)."""
        return decode_encoding(int(self)).type

    @property
    def read_only(self) -> bool:
        """True for VM-exit information fields, which VMWRITE normally refuses."""
        return decode_encoding(int(self)).read_only

    @property
    def area(self) -> "VmcsArea":
        """Which of the six VMCS areas the SDM puts this field in."""
        return field_area(self)

    @property
    def full(self) -> "VmcsField":
        """The field this encoding reaches: itself, or for a ``*_HIGH`` member the
        64-bit field whose bits 63:32 it reads and writes."""
        return VmcsField(int(self) & ~1) if int(self) & 1 else self

    @property
    def is_high(self) -> bool:
        """True for the high access encoding of a 64-bit field (bit 0 of the encoding)."""
        return bool(int(self) & 1)

    @property
    def description(self) -> str:
        """A one-line description of the field (of its bits 63:32 for a ``*_HIGH`` member)."""
        if int(self) & 1:
            return (f"Bits 63:32 of {self.full.name}, the 'high' access type of that 64-bit "
                    f"field: {FIELD_DESCRIPTIONS[self.full]}")
        return FIELD_DESCRIPTIONS[self]


def _iterate_fields_only(cls: type[VmcsField]) -> None:
    """Keep the ``*_HIGH`` members out of iteration and ``len``.

    The enum machinery iterates over ``_member_names_``; removing a name from it gives
    that member the standing of an alias (reachable as ``VmcsField.X``,
    ``VmcsField["X"]`` and ``VmcsField(value)``, listed in ``__members__``, skipped by
    ``for f in VmcsField``), which is what a high half is: another encoding of a field.
    The check below keeps the table honest: exactly one ``_HIGH`` per 64-bit field.
    """
    names = cls._member_names_
    high = [n for n in names if int(cls[n]) & 1]
    fields64 = [n for n in names if not int(cls[n]) & 1 and (int(cls[n]) >> 13) & 3 == 1]
    if sorted(high) != sorted(n + "_HIGH" for n in fields64) or any(
            int(cls[n + "_HIGH"]) != int(cls[n]) | 1 for n in fields64):
        raise AssertionError("VmcsField: every 64-bit field needs exactly one <NAME>_HIGH = encoding | 1")
    names[:] = [n for n in names if not int(cls[n]) & 1]


_iterate_fields_only(VmcsField)


class AccessType(enum.IntEnum):
    """Bit 0 of an encoding: which half of a field VMREAD/VMWRITE accesses."""

    FULL = 0  #: the whole field (for 64-bit fields in 64-bit mode: all 64 bits)
    HIGH = 1  #: bits 63:32 of a 64-bit field (only valid for 64-bit fields)


class FieldType(enum.IntEnum):
    """Bits 11:10 of an encoding.

    ``EXIT_INFORMATION`` is what the SDM calls "VM-exit information" or
    "read-only data" (alias ``READ_ONLY_DATA``): fields the processor writes on
    VM exit and that VMWRITE cannot change unless IA32_VMX_MISC bit 29 says so.
    """

    CONTROL = 0
    EXIT_INFORMATION = 1
    GUEST_STATE = 2
    HOST_STATE = 3
    READ_ONLY_DATA = 1  # alias of EXIT_INFORMATION


class FieldWidth(enum.Enum):
    """Bits 14:13 of an encoding: the width of the field.

    The value is the width in bits, except ``NATURAL`` whose size is that of
    the processor's registers: use :attr:`bits` (64 on a 64-bit CPU, which
    is what vtlab models).  :attr:`code` is the 2-bit value in the encoding.
    """

    BIT16 = 16
    BIT64 = 64
    BIT32 = 32
    NATURAL = "natural"

    @property
    def bits(self) -> int:
        """Width in bits; natural width is 64 on a processor with Intel 64."""
        return 64 if self is FieldWidth.NATURAL else int(self.value)

    @property
    def bytes(self) -> int:
        """Width in bytes (natural width: 8)."""
        return self.bits // 8

    @property
    def code(self) -> int:
        """The value of bits 14:13 that selects this width."""
        return _WIDTH_CODES.index(self)

    @property
    def mask(self) -> int:
        """All-ones value of this width, e.g. 0xFFFF for BIT16."""
        return (1 << self.bits) - 1

    @classmethod
    def from_code(cls, code: int) -> "FieldWidth":
        """The width selected by the 2-bit value ``code`` (bits 14:13)."""
        return _WIDTH_CODES[code & 3]


_WIDTH_CODES: tuple[FieldWidth, ...] = (
    FieldWidth.BIT16,
    FieldWidth.BIT64,
    FieldWidth.BIT32,
    FieldWidth.NATURAL,
)


@dataclass(frozen=True)
class FieldEncoding:
    """A VMCS component encoding split into its parts (SDM Table 25-21).

    Attributes:
        encoding: the raw 32-bit encoding.
        access_type: FULL or HIGH (bit 0).
        index: bits 9:1.
        type: control / exit information / guest state / host state (bits 11:10).
        width: 16-bit / 64-bit / 32-bit / natural (bits 14:13).
    """

    encoding: int
    access_type: AccessType
    index: int
    type: FieldType
    width: FieldWidth

    # read_only, full_encoding and access_bits are cached: every VMREAD/VMWRITE asks
    # them, and the decoded encodings are themselves cached (vtlab.vmcs.lookup).
    # (cached_property stores into the instance __dict__, which a frozen dataclass
    # allows; equality and hashing still use the fields only.)
    @cached_property
    def read_only(self) -> bool:
        """True if this is a VM-exit information ("read-only data") field."""
        return self.type == FieldType.EXIT_INFORMATION

    @cached_property
    def full_encoding(self) -> int:
        """The encoding with the access-type bit cleared."""
        return self.encoding & ~1

    @property
    def field(self) -> VmcsField | None:
        """The :class:`VmcsField` this encoding names (its full half), or None."""
        try:
            return VmcsField(self.full_encoding)
        except ValueError:
            return None

    @cached_property
    def access_bits(self) -> int:
        """How many bits a VMREAD/VMWRITE through this encoding moves."""
        return 32 if self.access_type == AccessType.HIGH else self.width.bits

    def as_dict(self) -> dict[str, object]:
        """The parts as a plain dict, for display."""
        f = self.field
        return {
            "encoding": f"{self.encoding:#06x}",
            "field": f.name if f is not None else None,
            "access_type": self.access_type.name,
            "index": self.index,
            "type": self.type.name,
            "width": self.width.name,
        }


def decode_encoding(encoding: int) -> FieldEncoding:
    """Split a VMCS component encoding into access type, index, type and width.

    Raises ValueError if the encoding is negative, has bit 12 or any of bits
    31:15 set, or uses the HIGH access type on a field that is not 64 bits
    wide (SDM Table 25-21: access type "must be full for 16-bit, 32-bit, and
    natural-width fields").

    >>> decode_encoding(0x681E).as_dict()["type"]
    'GUEST_STATE'
    """
    encoding = int(encoding)
    if encoding < 0:
        raise ValueError(f"VMCS encoding {encoding} is negative")
    if encoding >> 15:
        raise ValueError(
            f"VMCS encoding {encoding:#x} has reserved bits 31:15 set "
            "(SDM Table 25-21: they must be 0)"
        )
    if encoding & (1 << 12):
        raise ValueError(
            f"VMCS encoding {encoding:#x} has reserved bit 12 set "
            "(SDM Table 25-21: it must be 0)"
        )
    access = AccessType(encoding & 1)
    width = FieldWidth.from_code((encoding >> 13) & 3)
    if access == AccessType.HIGH and width != FieldWidth.BIT64:
        raise ValueError(
            f"VMCS encoding {encoding:#x} asks for the high half of a "
            f"{width.name} field; only 64-bit fields have a high access type"
        )
    return FieldEncoding(
        encoding=encoding,
        access_type=access,
        index=(encoding >> 1) & 0x1FF,
        type=FieldType((encoding >> 10) & 3),
        width=width,
    )


def make_encoding(
    index: int,
    type: FieldType,
    width: FieldWidth,
    access_type: AccessType = AccessType.FULL,
) -> int:
    """Build an encoding from its parts (the inverse of :func:`decode_encoding`)."""
    if not 0 <= index <= 0x1FF:
        raise ValueError(f"index {index} does not fit in bits 9:1 (0..511)")
    return (
        int(access_type)
        | (index << 1)
        | (int(type) << 10)
        | (width.code << 13)
    )


#: Highest index used by any field in :class:`VmcsField` (the value a CPU
#: reports in IA32_VMX_VMCS_ENUM bits 9:1).
VMCS_MAX_INDEX: int = max(((int(f) >> 1) & 0x1FF) for f in VmcsField)


class VmcsArea(enum.Enum):
    """The six logical groups of the VMCS data (SDM 25.3, "Organization of VMCS Data")."""

    GUEST_STATE = "guest-state area"
    HOST_STATE = "host-state area"
    VM_EXECUTION_CONTROL = "VM-execution control fields"
    VM_EXIT_CONTROL = "VM-exit control fields"
    VM_ENTRY_CONTROL = "VM-entry control fields"
    EXIT_INFORMATION = "VM-exit information fields"


_EXIT_CONTROL_FIELDS = frozenset(
    {
        VmcsField.VM_EXIT_CONTROLS,
        VmcsField.SECONDARY_VM_EXIT_CONTROLS,
        VmcsField.VM_EXIT_MSR_STORE_COUNT,
        VmcsField.VM_EXIT_MSR_STORE_ADDR,
        VmcsField.VM_EXIT_MSR_LOAD_COUNT,
        VmcsField.VM_EXIT_MSR_LOAD_ADDR,
    }
)
_ENTRY_CONTROL_FIELDS = frozenset(
    {
        VmcsField.VM_ENTRY_CONTROLS,
        VmcsField.VM_ENTRY_MSR_LOAD_COUNT,
        VmcsField.VM_ENTRY_MSR_LOAD_ADDR,
        VmcsField.VM_ENTRY_INTR_INFO_FIELD,
        VmcsField.VM_ENTRY_EXCEPTION_ERROR_CODE,
        VmcsField.VM_ENTRY_INSTRUCTION_LEN,
        VmcsField.INJECTED_EVENT_DATA,
    }
)


def field_area(field: VmcsField | int) -> VmcsArea:
    """The VMCS area (SDM 25.3) that holds ``field``.

    Guest, host and exit-information fields follow from the type bits; control
    fields are split into execution, exit and entry controls by a table
    (SDM 25.6-25.8).
    """
    info = decode_encoding(int(field))
    if info.type == FieldType.GUEST_STATE:
        return VmcsArea.GUEST_STATE
    if info.type == FieldType.HOST_STATE:
        return VmcsArea.HOST_STATE
    if info.type == FieldType.EXIT_INFORMATION:
        return VmcsArea.EXIT_INFORMATION
    full = info.full_encoding
    if full in _EXIT_CONTROL_FIELDS:
        return VmcsArea.VM_EXIT_CONTROL
    if full in _ENTRY_CONTROL_FIELDS:
        return VmcsArea.VM_ENTRY_CONTROL
    return VmcsArea.VM_EXECUTION_CONTROL


# ---------------------------------------------------------------------------
# Descriptions
# ---------------------------------------------------------------------------

_F = VmcsField

_EXPLICIT_DESCRIPTIONS: dict[VmcsField, str] = {
    # Execution controls
    _F.VIRTUAL_PROCESSOR_ID: "VPID: tags this guest's TLB entries so they survive VM entries and exits.",
    _F.POSTED_INTR_NV: "Vector that tells the CPU an interrupt was posted to the posted-interrupt descriptor.",
    _F.EPTP_INDEX: "Index of the current EPTP in the EPTP list (used by VMFUNC EPTP switching and #VE).",
    _F.IO_BITMAP_A: "Physical address of I/O bitmap A (ports 0x0000-0x7FFF); a set bit makes IN/OUT exit.",
    _F.IO_BITMAP_B: "Physical address of I/O bitmap B (ports 0x8000-0xFFFF); a set bit makes IN/OUT exit.",
    _F.MSR_BITMAP: "Physical address of the 4-KByte MSR bitmaps that choose which RDMSR/WRMSR exit.",
    _F.TSC_OFFSET: "Added to the TSC when the guest reads it (if 'use TSC offsetting' is set).",
    _F.VIRTUAL_APIC_PAGE_ADDR: "Physical address of the virtual-APIC page (TPR shadow and APIC virtualization).",
    _F.APIC_ACCESS_ADDR: "Physical address of the APIC-access page; guest accesses to it are virtualized or exit.",
    _F.EPT_POINTER: "EPTP: memory type, page-walk length and address of the EPT PML4 table.",
    _F.PIN_BASED_VM_EXEC_CONTROL: "Pin-based VM-execution controls: how asynchronous events (interrupts, NMIs) are handled.",
    _F.CPU_BASED_VM_EXEC_CONTROL: "Primary processor-based VM-execution controls: which instructions cause VM exits.",
    _F.SECONDARY_VM_EXEC_CONTROL: "Secondary processor-based VM-execution controls (EPT, VPID, unrestricted guest...).",
    _F.TERTIARY_VM_EXEC_CONTROL: "Tertiary processor-based VM-execution controls (64 bits).",
    _F.EXCEPTION_BITMAP: "One bit per exception vector 0-31: a set bit makes that exception cause a VM exit.",
    _F.PAGE_FAULT_ERROR_CODE_MASK: "With PFEC_MATCH, filters which page faults exit when bit 14 of the exception bitmap is set.",
    _F.PAGE_FAULT_ERROR_CODE_MATCH: "With PFEC_MASK, filters which page faults exit when bit 14 of the exception bitmap is set.",
    _F.CR3_TARGET_COUNT: "How many of CR3_TARGET_VALUE0..3 are valid; MOV to CR3 of one of them does not exit.",
    _F.TPR_THRESHOLD: "VM exit when the guest lowers its virtual TPR below this value (bits 3:0).",
    _F.PLE_GAP: "PAUSE-loop exiting: max TSC ticks between two PAUSEs of the same loop.",
    _F.PLE_WINDOW: "PAUSE-loop exiting: max TSC ticks a guest may spin in a PAUSE loop before exiting.",
    _F.NOTIFY_WINDOW: "Instruction timeout: how long (in crystal clock cycles) a guest may run without an event window.",
    _F.CR0_GUEST_HOST_MASK: "Bits set here are owned by the host: guest writes that change them exit, reads see the shadow.",
    _F.CR4_GUEST_HOST_MASK: "Bits set here are owned by the host: guest writes that change them exit, reads see the shadow.",
    _F.CR0_READ_SHADOW: "Value the guest reads for host-owned CR0 bits.",
    _F.CR4_READ_SHADOW: "Value the guest reads for host-owned CR4 bits.",
    # Exit and entry controls
    _F.VM_EXIT_CONTROLS: "Primary VM-exit controls: what the processor saves and loads on VM exit.",
    _F.SECONDARY_VM_EXIT_CONTROLS: "Secondary VM-exit controls (64 bits, e.g. FRED state save/load).",
    _F.VM_EXIT_MSR_STORE_COUNT: "Number of entries in the VM-exit MSR-store area (guest MSRs saved on exit).",
    _F.VM_EXIT_MSR_STORE_ADDR: "Physical address of the VM-exit MSR-store area.",
    _F.VM_EXIT_MSR_LOAD_COUNT: "Number of entries in the VM-exit MSR-load area (host MSRs loaded on exit).",
    _F.VM_EXIT_MSR_LOAD_ADDR: "Physical address of the VM-exit MSR-load area.",
    _F.VM_ENTRY_CONTROLS: "VM-entry controls: what the processor loads on VM entry (IA-32e mode guest, EFER...).",
    _F.VM_ENTRY_MSR_LOAD_COUNT: "Number of entries in the VM-entry MSR-load area (guest MSRs loaded on entry).",
    _F.VM_ENTRY_MSR_LOAD_ADDR: "Physical address of the VM-entry MSR-load area.",
    _F.VM_ENTRY_INTR_INFO_FIELD: "Event to inject on the next VM entry: vector, type, deliver-error-code, valid bit.",
    _F.VM_ENTRY_EXCEPTION_ERROR_CODE: "Error code delivered with the injected exception (if bit 11 of the intr-info is set).",
    _F.VM_ENTRY_INSTRUCTION_LEN: "Instruction length used when injecting a software interrupt or exception.",
    # Exit information
    _F.VM_INSTRUCTION_ERROR: "Why the last VMX instruction failed with VMfailValid (a VM-instruction error number).",
    _F.VM_EXIT_REASON: "Why the last VM exit happened: basic exit reason in bits 15:0, entry failure in bit 31.",
    _F.VM_EXIT_INTR_INFO: "For exits caused by an event: its vector, type, error-code-valid and valid bits.",
    _F.VM_EXIT_INTR_ERROR_CODE: "Error code of the exception that caused the VM exit.",
    _F.IDT_VECTORING_INFO_FIELD: "Event that was being delivered through the IDT when the VM exit happened.",
    _F.IDT_VECTORING_ERROR_CODE: "Error code of the event that was being delivered when the VM exit happened.",
    _F.VM_EXIT_INSTRUCTION_LEN: "Length in bytes of the instruction that caused the VM exit.",
    _F.VMX_INSTRUCTION_INFO: "Operand details (registers, scaling, segment...) of the instruction that exited.",
    _F.EXIT_QUALIFICATION: "Extra details about the exit; the layout depends on the exit reason.",
    _F.GUEST_LINEAR_ADDRESS: "Guest linear address that was being accessed (for some exits).",
    _F.GUEST_PHYSICAL_ADDRESS: "Guest physical address that caused an EPT violation or misconfiguration.",
    _F.IO_RCX: "RCX value before an I/O SMI (dual-monitor SMM only).",
    _F.IO_RSI: "RSI value before an I/O SMI (dual-monitor SMM only).",
    _F.IO_RDI: "RDI value before an I/O SMI (dual-monitor SMM only).",
    _F.IO_RIP: "RIP value before an I/O SMI (dual-monitor SMM only).",
    # Guest state
    _F.VMCS_LINK_POINTER: "Pointer to a shadow VMCS; must be all ones (0xFFFFFFFFFFFFFFFF) if unused.",
    _F.GUEST_CR0: "Guest CR0, loaded on VM entry and saved on VM exit.",
    _F.GUEST_CR3: "Guest CR3 (page-table root), loaded on VM entry and saved on VM exit.",
    _F.GUEST_CR4: "Guest CR4, loaded on VM entry and saved on VM exit (VMXE must stay set).",
    _F.GUEST_DR7: "Guest DR7, loaded on VM entry if 'load debug controls' is set.",
    _F.GUEST_RSP: "Guest stack pointer, loaded on VM entry and saved on VM exit.",
    _F.GUEST_RIP: "Guest instruction pointer: where the guest resumes after VM entry.",
    _F.GUEST_RFLAGS: "Guest RFLAGS (bit 1 must be 1), loaded on VM entry and saved on VM exit.",
    _F.GUEST_IA32_EFER: "Guest IA32_EFER, loaded on VM entry if 'load IA32_EFER' is set.",
    _F.GUEST_INTERRUPTIBILITY_INFO: "Blocking by STI, MOV SS, SMI and NMI at the guest's current instruction.",
    _F.GUEST_ACTIVITY_STATE: "Guest activity: 0 active, 1 HLT, 2 shutdown, 3 wait-for-SIPI.",
    _F.GUEST_PENDING_DBG_EXCEPTIONS: "Debug exceptions (breakpoints, single step) pending for the guest.",
    _F.VMX_PREEMPTION_TIMER_VALUE: "Counts down while the guest runs; a VM exit happens when it reaches 0.",
    _F.GUEST_INTR_STATUS: "Virtual-interrupt delivery: requesting (RVI, low byte) and servicing (SVI, high byte) vectors.",
    _F.GUEST_PML_INDEX: "Index of the next free entry in the page-modification log.",
    _F.GUEST_SMBASE: "Guest SMBASE (used only for the dual-monitor treatment of SMM).",
    _F.GUEST_SYSENTER_CS: "Guest IA32_SYSENTER_CS MSR.",
    _F.GUEST_SYSENTER_ESP: "Guest IA32_SYSENTER_ESP MSR.",
    _F.GUEST_SYSENTER_EIP: "Guest IA32_SYSENTER_EIP MSR.",
    # Host state
    _F.HOST_CR0: "CR0 loaded on VM exit.",
    _F.HOST_CR3: "CR3 (host page-table root) loaded on VM exit.",
    _F.HOST_CR4: "CR4 loaded on VM exit.",
    _F.HOST_RSP: "Stack pointer loaded on VM exit: the VMM's stack.",
    _F.HOST_RIP: "Instruction pointer loaded on VM exit: the VMM's exit handler entry point.",
    _F.HOST_IA32_EFER: "IA32_EFER loaded on VM exit if 'load IA32_EFER' is set.",
    _F.HOST_IA32_SYSENTER_CS: "IA32_SYSENTER_CS loaded on VM exit.",
    _F.HOST_IA32_SYSENTER_ESP: "IA32_SYSENTER_ESP loaded on VM exit.",
    _F.HOST_IA32_SYSENTER_EIP: "IA32_SYSENTER_EIP loaded on VM exit.",
}

_SEG_RE = re.compile(r"^(GUEST|HOST)_(ES|CS|SS|DS|FS|GS|LDTR|TR|GDTR|IDTR)_(SELECTOR|LIMIT|AR_BYTES|BASE)$")
_SEG_PART = {
    "SELECTOR": "selector",
    "LIMIT": "limit",
    "AR_BYTES": "access rights (type, S, DPL, P, AVL, L, D/B, G, unusable)",
    "BASE": "base address",
}
_MSR_LIKE = re.compile(r"^(GUEST|HOST)_(IA32_\w+|BNDCFGS|S_CET|SSP|INTR_SSP_TABLE)$")


def _auto_description(field: VmcsField) -> str:
    name = field.name
    m = _SEG_RE.match(name)
    if m:
        who, seg, part = m.groups()
        if who == "GUEST":
            return f"Guest {seg} {_SEG_PART[part]}, loaded on VM entry and saved on VM exit."
        return f"Host {seg} {_SEG_PART[part]}, loaded on VM exit."
    m = re.match(r"^CR3_TARGET_VALUE(\d)$", name)
    if m:
        return f"CR3-target value {m.group(1)}: a MOV to CR3 of this value does not exit."
    m = re.match(r"^EOI_EXIT_BITMAP(\d)$", name)
    if m:
        lo = int(m.group(1)) * 64
        return f"EOI-exit bitmap for vectors {lo}-{lo + 63}: EOI of a set vector causes a VM exit."
    m = re.match(r"^GUEST_PDPTR(\d)$", name)
    if m:
        return f"Guest PDPTE{m.group(1)}, used with EPT when the guest uses PAE paging."
    m = _MSR_LIKE.match(name)
    if m:
        who, reg = m.groups()
        reg = reg if reg.startswith("IA32_") else {
            "BNDCFGS": "IA32_BNDCFGS",
            "S_CET": "IA32_S_CET",
            "SSP": "SSP (shadow-stack pointer)",
            "INTR_SSP_TABLE": "IA32_INTERRUPT_SSP_TABLE_ADDR",
        }[reg]
        if who == "GUEST":
            return f"Guest {reg}, loaded on VM entry when the matching VM-entry control is set."
        return f"Host {reg}, loaded on VM exit when the matching VM-exit control is set."
    words = name.replace("_", " ").lower()
    kind = {
        FieldType.CONTROL: "control field",
        FieldType.EXIT_INFORMATION: "VM-exit information field",
        FieldType.GUEST_STATE: "guest-state field",
        FieldType.HOST_STATE: "host-state field",
    }[decode_encoding(int(field)).type]
    return f"{words[0].upper()}{words[1:]} ({kind})."


_MORE: dict[VmcsField, str] = {
    _F.HLAT_PREFIX_SIZE: "Number of upper linear-address bits whose translation uses HLAT paging.",
    _F.LAST_PID_POINTER_INDEX: "IPI virtualization: last valid index in the PID-pointer table.",
    _F.GUEST_UINV: "Guest user-interrupt notification vector (user interrupts).",
    _F.EXECUTIVE_VMCS_POINTER: "Executive-VMCS pointer (dual-monitor treatment of SMM).",
    _F.PML_ADDRESS: "Physical address of the 4-KByte page-modification log.",
    _F.POSTED_INTR_DESC_ADDR: "Physical address of the 64-byte posted-interrupt descriptor.",
    _F.VM_FUNCTION_CONTROL: "Which VM functions (VMFUNC leaves) the guest may invoke.",
    _F.EPTP_LIST_ADDRESS: "Physical address of the 512-entry EPTP list used by EPTP switching.",
    _F.VMREAD_BITMAP: "VMCS shadowing: bitmap of fields whose VMREAD in the guest exits.",
    _F.VMWRITE_BITMAP: "VMCS shadowing: bitmap of fields whose VMWRITE in the guest exits.",
    _F.VE_INFORMATION_ADDRESS: "Physical address of the virtualization-exception (#VE) information area.",
    _F.XSS_EXIT_BITMAP: "XSAVES/XRSTORS exit when they touch a state component set here.",
    _F.ENCLS_EXITING_BITMAP: "ENCLS leaves (SGX) that cause VM exits.",
    _F.SPPT_POINTER: "Sub-page-permission-table pointer (EPT sub-page write permissions).",
    _F.TSC_MULTIPLIER: "Scales the TSC the guest reads (if 'use TSC scaling' is set).",
    _F.ENCLV_EXITING_BITMAP: "ENCLV leaves (SGX) that cause VM exits.",
    _F.LOW_PASID_DIR_ADDRESS: "Low PASID directory address (ENQCMD PASID translation).",
    _F.HIGH_PASID_DIR_ADDRESS: "High PASID directory address (ENQCMD PASID translation).",
    _F.SHARED_EPT_POINTER: "EPTP for shared guest-physical memory (TDX).",
    _F.PCONFIG_EXITING_BITMAP: "PCONFIG leaves that cause VM exits.",
    _F.HLAT_POINTER: "HLATP: root of hypervisor-managed linear-address translation.",
    _F.PID_POINTER_TABLE: "IPI virtualization: address of the PID-pointer table.",
    _F.IA32_SPEC_CTRL_MASK: "Bits of IA32_SPEC_CTRL the guest cannot change.",
    _F.IA32_SPEC_CTRL_SHADOW: "Value the guest reads from IA32_SPEC_CTRL.",
    _F.INJECTED_EVENT_DATA: "Event data delivered with an injected event (FRED).",
    _F.ORIGINAL_EVENT_DATA: "Event data of the event that was being delivered at VM exit (FRED).",
}

#: A short description for every :class:`VmcsField`.
FIELD_DESCRIPTIONS: dict[VmcsField, str] = {
    f: _EXPLICIT_DESCRIPTIONS.get(f) or _MORE.get(f) or _auto_description(f) for f in VmcsField
}

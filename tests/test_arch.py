"""vtlab.arch against the Intel SDM: every expected number is written out literally.

The values come from the SDM (Vol. 3C Appendices A-C, chapters 25-31) and
Linux's arch/x86/include/asm/vmx.h, uapi/asm/vmx.h and msr-index.h; none is
computed from the code under test.
"""
from __future__ import annotations

import dataclasses
import enum

import pytest

import vtlab.arch as arch
from vtlab.arch import (
    CONTROL_CLASSES,
    CONTROL_FIELD,
    CONTROL_INFO,
    EXCEPTION_INFO,
    EXIT_CATEGORIES,
    EXIT_REASON_INFO,
    FIELD_DESCRIPTIONS,
    GPR_ORDER,
    AccessType,
    Cr0,
    Cr4,
    CrAccessQualification,
    CrAccessType,
    DrAccessDirection,
    DrAccessQualification,
    Efer,
    EntryControl,
    EptViolationQualification,
    ExitControl,
    ExitReason,
    FeatureControl,
    FieldType,
    FieldWidth,
    InterruptionType,
    IntrInfo,
    IoDirection,
    IoQualification,
    Msr,
    PinBased,
    ProcBased,
    ProcBased2,
    Rflags,
    Vector,
    VmcsArea,
    VmcsField,
    VmInstructionError,
    basic_exit_reason,
    decode_encoding,
    field_area,
    is_entry_failure,
    make_encoding,
)


# ---------------------------------------------------------------------------
# Exit reasons (SDM Appendix C, Linux uapi/asm/vmx.h)
# ---------------------------------------------------------------------------

EXIT_REASONS = [
    ("EXCEPTION_NMI", 0), ("EXTERNAL_INTERRUPT", 1), ("TRIPLE_FAULT", 2),
    ("INIT_SIGNAL", 3), ("SIPI_SIGNAL", 4), ("IO_SMI", 5), ("OTHER_SMI", 6),
    ("INTERRUPT_WINDOW", 7), ("NMI_WINDOW", 8), ("TASK_SWITCH", 9), ("CPUID", 10),
    ("GETSEC", 11), ("HLT", 12), ("INVD", 13), ("INVLPG", 14), ("RDPMC", 15),
    ("RDTSC", 16), ("RSM", 17), ("VMCALL", 18), ("VMCLEAR", 19), ("VMLAUNCH", 20),
    ("VMPTRLD", 21), ("VMPTRST", 22), ("VMREAD", 23), ("VMRESUME", 24),
    ("VMWRITE", 25), ("VMOFF", 26), ("VMON", 27), ("VMXOFF", 26), ("VMXON", 27),
    ("CR_ACCESS", 28), ("DR_ACCESS", 29), ("IO_INSTRUCTION", 30), ("MSR_READ", 31),
    ("MSR_WRITE", 32), ("INVALID_STATE", 33), ("MSR_LOAD_FAIL", 34),
    ("MWAIT_INSTRUCTION", 36), ("MONITOR_TRAP_FLAG", 37), ("MONITOR_INSTRUCTION", 39),
    ("PAUSE_INSTRUCTION", 40), ("MCE_DURING_VMENTRY", 41), ("TPR_BELOW_THRESHOLD", 43),
    ("APIC_ACCESS", 44), ("EOI_INDUCED", 45), ("GDTR_IDTR", 46), ("LDTR_TR", 47),
    ("EPT_VIOLATION", 48), ("EPT_MISCONFIG", 49), ("INVEPT", 50), ("RDTSCP", 51),
    ("PREEMPTION_TIMER", 52), ("INVVPID", 53), ("WBINVD", 54), ("XSETBV", 55),
    ("APIC_WRITE", 56), ("RDRAND", 57), ("INVPCID", 58), ("VMFUNC", 59), ("ENCLS", 60),
    ("RDSEED", 61), ("PML_FULL", 62), ("XSAVES", 63), ("XRSTORS", 64),
    ("UMWAIT", 67), ("TPAUSE", 68), ("BUS_LOCK", 74), ("NOTIFY", 75),
    ("SEAMCALL", 76), ("TDCALL", 77), ("MSR_READ_IMM", 84), ("MSR_WRITE_IMM", 85),
]


@pytest.mark.parametrize("name,value", EXIT_REASONS)
def test_exit_reason_numbers(name, value):
    assert int(ExitReason[name]) == value


def test_exit_reason_lookup_and_failure_bit():
    assert ExitReason(10) is ExitReason.CPUID
    assert ExitReason(30) is ExitReason.IO_INSTRUCTION
    assert ExitReason.VMXON is ExitReason.VMON
    assert arch.VM_ENTRY_FAILURE_BIT == 0x80000000
    assert basic_exit_reason(0x80000021) is ExitReason.INVALID_STATE
    assert is_entry_failure(0x80000021)
    assert not is_entry_failure(0x0000000C)
    assert basic_exit_reason(35) == 35  # unused number stays an int


def test_every_exit_reason_has_info():
    for reason in ExitReason:
        info = EXIT_REASON_INFO[reason]
        assert info.description and "\n" not in info.description
        assert info.category in EXIT_CATEGORIES
    assert set(EXIT_REASON_INFO) == set(ExitReason)


def test_exit_reason_unconditional_and_categories():
    unconditional = {r.name for r in ExitReason if EXIT_REASON_INFO[r].unconditional}
    for name in ("CPUID", "GETSEC", "INVD", "XSETBV", "VMCALL", "VMCLEAR", "VMLAUNCH",
                 "VMPTRLD", "VMPTRST", "VMRESUME", "VMOFF", "VMON", "INVEPT", "INVVPID"):
        assert name in unconditional
    for name in ("HLT", "IO_INSTRUCTION", "MSR_READ", "CR_ACCESS", "EPT_VIOLATION", "RDTSC"):
        assert name not in unconditional
    assert EXIT_REASON_INFO[ExitReason.CPUID].category == "benign"
    assert EXIT_REASON_INFO[ExitReason.HLT].category == "benign"
    assert EXIT_REASON_INFO[ExitReason.IO_INSTRUCTION].category == "io"
    assert EXIT_REASON_INFO[ExitReason.EPT_VIOLATION].category == "memory"
    assert EXIT_REASON_INFO[ExitReason.EPT_MISCONFIG].category == "memory"
    assert EXIT_REASON_INFO[ExitReason.APIC_ACCESS].category == "memory"
    assert EXIT_REASON_INFO[ExitReason.EXTERNAL_INTERRUPT].category == "interrupt"
    assert EXIT_REASON_INFO[ExitReason.TRIPLE_FAULT].category == "exception"
    assert EXIT_REASON_INFO[ExitReason.EXCEPTION_NMI].category == "exception"
    assert EXIT_REASON_INFO[ExitReason.INVALID_STATE].category == "entry-failure"
    assert EXIT_REASON_INFO[ExitReason.MSR_LOAD_FAIL].category == "entry-failure"
    assert EXIT_REASON_INFO[ExitReason.MCE_DURING_VMENTRY].category == "entry-failure"
    assert EXIT_REASON_INFO[ExitReason.CR_ACCESS].category == "instruction"
    assert EXIT_REASON_INFO[ExitReason.MSR_WRITE].category == "instruction"


# ---------------------------------------------------------------------------
# VMCS field encodings (SDM Appendix B)
# ---------------------------------------------------------------------------

FIELDS = [
    # 16-bit
    ("VIRTUAL_PROCESSOR_ID", 0x0000), ("POSTED_INTR_NV", 0x0002), ("EPTP_INDEX", 0x0004),
    ("GUEST_ES_SELECTOR", 0x0800), ("GUEST_CS_SELECTOR", 0x0802), ("GUEST_TR_SELECTOR", 0x080E),
    ("GUEST_INTR_STATUS", 0x0810), ("GUEST_PML_INDEX", 0x0812),
    ("HOST_ES_SELECTOR", 0x0C00), ("HOST_CS_SELECTOR", 0x0C02), ("HOST_TR_SELECTOR", 0x0C0C),
    # 64-bit
    ("IO_BITMAP_A", 0x2000), ("IO_BITMAP_B", 0x2002), ("MSR_BITMAP", 0x2004),
    ("VM_EXIT_MSR_STORE_ADDR", 0x2006), ("VM_EXIT_MSR_LOAD_ADDR", 0x2008),
    ("VM_ENTRY_MSR_LOAD_ADDR", 0x200A), ("TSC_OFFSET", 0x2010),
    ("VIRTUAL_APIC_PAGE_ADDR", 0x2012), ("APIC_ACCESS_ADDR", 0x2014), ("EPT_POINTER", 0x201A),
    ("TERTIARY_VM_EXEC_CONTROL", 0x2034),
    ("GUEST_PHYSICAL_ADDRESS", 0x2400), ("VMCS_LINK_POINTER", 0x2800),
    ("GUEST_IA32_DEBUGCTL", 0x2802), ("GUEST_IA32_PAT", 0x2804), ("GUEST_IA32_EFER", 0x2806),
    ("GUEST_PDPTR0", 0x280A), ("GUEST_PDPTR3", 0x2810),
    ("HOST_IA32_PAT", 0x2C00), ("HOST_IA32_EFER", 0x2C02),
    # 32-bit
    ("PIN_BASED_VM_EXEC_CONTROL", 0x4000), ("CPU_BASED_VM_EXEC_CONTROL", 0x4002),
    ("EXCEPTION_BITMAP", 0x4004), ("PAGE_FAULT_ERROR_CODE_MASK", 0x4006),
    ("PAGE_FAULT_ERROR_CODE_MATCH", 0x4008), ("CR3_TARGET_COUNT", 0x400A),
    ("VM_EXIT_CONTROLS", 0x400C), ("VM_EXIT_MSR_STORE_COUNT", 0x400E),
    ("VM_EXIT_MSR_LOAD_COUNT", 0x4010), ("VM_ENTRY_CONTROLS", 0x4012),
    ("VM_ENTRY_MSR_LOAD_COUNT", 0x4014), ("VM_ENTRY_INTR_INFO_FIELD", 0x4016),
    ("VM_ENTRY_EXCEPTION_ERROR_CODE", 0x4018), ("VM_ENTRY_INSTRUCTION_LEN", 0x401A),
    ("TPR_THRESHOLD", 0x401C), ("SECONDARY_VM_EXEC_CONTROL", 0x401E),
    ("PLE_GAP", 0x4020), ("PLE_WINDOW", 0x4022),
    ("VM_INSTRUCTION_ERROR", 0x4400), ("VM_EXIT_REASON", 0x4402), ("VM_EXIT_INTR_INFO", 0x4404),
    ("VM_EXIT_INTR_ERROR_CODE", 0x4406), ("IDT_VECTORING_INFO_FIELD", 0x4408),
    ("IDT_VECTORING_ERROR_CODE", 0x440A), ("VM_EXIT_INSTRUCTION_LEN", 0x440C),
    ("VMX_INSTRUCTION_INFO", 0x440E),
    ("GUEST_ES_LIMIT", 0x4800), ("GUEST_GDTR_LIMIT", 0x4810), ("GUEST_IDTR_LIMIT", 0x4812),
    ("GUEST_ES_AR_BYTES", 0x4814), ("GUEST_CS_AR_BYTES", 0x4816), ("GUEST_TR_AR_BYTES", 0x4822),
    ("GUEST_INTERRUPTIBILITY_INFO", 0x4824), ("GUEST_ACTIVITY_STATE", 0x4826),
    ("GUEST_SYSENTER_CS", 0x482A), ("VMX_PREEMPTION_TIMER_VALUE", 0x482E),
    ("HOST_IA32_SYSENTER_CS", 0x4C00),
    # natural width
    ("CR0_GUEST_HOST_MASK", 0x6000), ("CR4_GUEST_HOST_MASK", 0x6002),
    ("CR0_READ_SHADOW", 0x6004), ("CR4_READ_SHADOW", 0x6006),
    ("CR3_TARGET_VALUE0", 0x6008), ("CR3_TARGET_VALUE3", 0x600E),
    ("EXIT_QUALIFICATION", 0x6400), ("IO_RCX", 0x6402), ("IO_RSI", 0x6404),
    ("IO_RDI", 0x6406), ("IO_RIP", 0x6408), ("GUEST_LINEAR_ADDRESS", 0x640A),
    ("GUEST_CR0", 0x6800), ("GUEST_CR3", 0x6802), ("GUEST_CR4", 0x6804),
    ("GUEST_ES_BASE", 0x6806), ("GUEST_CS_BASE", 0x6808), ("GUEST_GDTR_BASE", 0x6816),
    ("GUEST_IDTR_BASE", 0x6818), ("GUEST_DR7", 0x681A), ("GUEST_RSP", 0x681C),
    ("GUEST_RIP", 0x681E), ("GUEST_RFLAGS", 0x6820), ("GUEST_PENDING_DBG_EXCEPTIONS", 0x6822),
    ("GUEST_SYSENTER_ESP", 0x6824), ("GUEST_SYSENTER_EIP", 0x6826),
    ("GUEST_S_CET", 0x6828), ("GUEST_SSP", 0x682A), ("GUEST_INTR_SSP_TABLE", 0x682C),
    ("HOST_CR0", 0x6C00), ("HOST_CR3", 0x6C02), ("HOST_CR4", 0x6C04),
    ("HOST_FS_BASE", 0x6C06), ("HOST_GS_BASE", 0x6C08), ("HOST_TR_BASE", 0x6C0A),
    ("HOST_GDTR_BASE", 0x6C0C), ("HOST_IDTR_BASE", 0x6C0E),
    ("HOST_IA32_SYSENTER_ESP", 0x6C10), ("HOST_IA32_SYSENTER_EIP", 0x6C12),
    ("HOST_RSP", 0x6C14), ("HOST_RIP", 0x6C16), ("HOST_S_CET", 0x6C18),
]


@pytest.mark.parametrize("name,value", FIELDS)
def test_vmcs_field_encodings(name, value):
    assert int(VmcsField[name]) == value


def test_high_halves_are_named_but_not_iterated():
    # SDM Appendix B lists a "(high)" encoding = full | 1 for each 64-bit field; it is an
    # access type of that field, so iteration yields every field once, by its full encoding.
    assert all(int(f) & 1 == 0 for f in VmcsField)
    assert len(set(int(f) for f in VmcsField)) == len(VmcsField) == len(list(VmcsField))
    highs = [name for name in VmcsField.__members__ if name.endswith("_HIGH")]
    assert sorted(highs) == sorted(f.name + "_HIGH" for f in VmcsField if 0x2000 <= int(f) <= 0x2FFF)
    assert len(VmcsField.__members__) == len(VmcsField) + len(highs)


def test_decode_guest_rip():
    d = decode_encoding(0x681E)
    assert d.encoding == 0x681E
    assert d.access_type is AccessType.FULL
    assert d.index == 15
    assert d.type is FieldType.GUEST_STATE
    assert d.width is FieldWidth.NATURAL
    assert d.width.bits == 64
    assert d.read_only is False
    assert d.field is VmcsField.GUEST_RIP


def test_decode_high_access():
    d = decode_encoding(0x2001)
    assert d.access_type is AccessType.HIGH
    assert d.index == 0
    assert d.type is FieldType.CONTROL
    assert d.width is FieldWidth.BIT64
    assert d.field is VmcsField.IO_BITMAP_A
    assert d.access_bits == 32


def test_decode_exit_reason_field():
    d = decode_encoding(0x4402)
    assert d.type is FieldType.EXIT_INFORMATION
    assert d.width is FieldWidth.BIT32
    assert d.index == 1
    assert d.read_only is True


@pytest.mark.parametrize(
    "encoding,index,ftype,width",
    [
        (0x0000, 0, FieldType.CONTROL, FieldWidth.BIT16),
        (0x080E, 7, FieldType.GUEST_STATE, FieldWidth.BIT16),
        (0x0C0C, 6, FieldType.HOST_STATE, FieldWidth.BIT16),
        (0x201A, 13, FieldType.CONTROL, FieldWidth.BIT64),
        (0x2400, 0, FieldType.EXIT_INFORMATION, FieldWidth.BIT64),
        (0x2806, 3, FieldType.GUEST_STATE, FieldWidth.BIT64),
        (0x2C02, 1, FieldType.HOST_STATE, FieldWidth.BIT64),
        (0x401E, 15, FieldType.CONTROL, FieldWidth.BIT32),
        (0x4C00, 0, FieldType.HOST_STATE, FieldWidth.BIT32),
        (0x6400, 0, FieldType.EXIT_INFORMATION, FieldWidth.NATURAL),
        (0x6C16, 11, FieldType.HOST_STATE, FieldWidth.NATURAL),
    ],
)
def test_decode_samples(encoding, index, ftype, width):
    d = decode_encoding(encoding)
    assert (d.index, d.type, d.width) == (index, ftype, width)
    assert make_encoding(index, ftype, width) == encoding


@pytest.mark.parametrize("bad", [0x1000, 0x781E, 0x8000, 0x10000, 0x80004402, 0x4403, 0x681F, -1])
def test_decode_invalid(bad):
    # bit 12 set, bits 31:15 set, negative, or HIGH access on a non-64-bit field
    with pytest.raises(ValueError):
        decode_encoding(bad)


def test_field_width_values():
    assert FieldWidth.BIT16.bits == 16
    assert FieldWidth.BIT32.bits == 32
    assert FieldWidth.BIT64.bits == 64
    assert FieldWidth.NATURAL.bits == 64
    assert [FieldWidth.from_code(c) for c in range(4)] == [
        FieldWidth.BIT16, FieldWidth.BIT64, FieldWidth.BIT32, FieldWidth.NATURAL]


def test_every_field_decodes_and_matches_its_name():
    width_of_block = {0x0: FieldWidth.BIT16, 0x2: FieldWidth.BIT64,
                      0x4: FieldWidth.BIT32, 0x6: FieldWidth.NATURAL}
    exit_info_with_guest_prefix = {"GUEST_PHYSICAL_ADDRESS", "GUEST_LINEAR_ADDRESS"}
    for f in VmcsField:
        d = decode_encoding(int(f))
        assert d.access_type is AccessType.FULL
        assert d.width is width_of_block[int(f) >> 12]
        assert d.field is f
        if f.name in exit_info_with_guest_prefix:
            assert d.type is FieldType.EXIT_INFORMATION
        elif f.name.startswith("GUEST_"):
            assert d.type is FieldType.GUEST_STATE, f.name
        elif f.name.startswith("HOST_"):
            assert d.type is FieldType.HOST_STATE, f.name
        assert FIELD_DESCRIPTIONS[f]


def test_field_areas():
    assert field_area(VmcsField.GUEST_RIP) is VmcsArea.GUEST_STATE
    assert field_area(VmcsField.VMCS_LINK_POINTER) is VmcsArea.GUEST_STATE
    assert field_area(VmcsField.HOST_RIP) is VmcsArea.HOST_STATE
    assert field_area(VmcsField.EXIT_QUALIFICATION) is VmcsArea.EXIT_INFORMATION
    assert field_area(VmcsField.VM_INSTRUCTION_ERROR) is VmcsArea.EXIT_INFORMATION
    assert field_area(VmcsField.VM_EXIT_CONTROLS) is VmcsArea.VM_EXIT_CONTROL
    assert field_area(VmcsField.VM_EXIT_MSR_STORE_COUNT) is VmcsArea.VM_EXIT_CONTROL
    assert field_area(VmcsField.VM_EXIT_MSR_LOAD_ADDR) is VmcsArea.VM_EXIT_CONTROL
    assert field_area(VmcsField.VM_ENTRY_CONTROLS) is VmcsArea.VM_ENTRY_CONTROL
    assert field_area(VmcsField.VM_ENTRY_INTR_INFO_FIELD) is VmcsArea.VM_ENTRY_CONTROL
    assert field_area(VmcsField.VM_ENTRY_MSR_LOAD_ADDR) is VmcsArea.VM_ENTRY_CONTROL
    assert field_area(VmcsField.PIN_BASED_VM_EXEC_CONTROL) is VmcsArea.VM_EXECUTION_CONTROL
    assert field_area(VmcsField.IO_BITMAP_A) is VmcsArea.VM_EXECUTION_CONTROL
    assert field_area(VmcsField.CR0_GUEST_HOST_MASK) is VmcsArea.VM_EXECUTION_CONTROL
    assert field_area(VmcsField.VIRTUAL_PROCESSOR_ID) is VmcsArea.VM_EXECUTION_CONTROL
    assert VmcsField.GUEST_RIP.area is VmcsArea.GUEST_STATE
    assert VmcsField.VM_EXIT_REASON.read_only is True
    assert VmcsField.GUEST_RIP.read_only is False


# ---------------------------------------------------------------------------
# Controls (SDM 25.6-25.8, Appendix A)
# ---------------------------------------------------------------------------

CONTROL_BITS = [
    (PinBased.EXT_INTR_MASK, 0), (PinBased.NMI_EXITING, 3), (PinBased.VIRTUAL_NMIS, 5),
    (PinBased.VMX_PREEMPTION_TIMER, 6), (PinBased.POSTED_INTR, 7),
    (ProcBased.INTR_WINDOW_EXITING, 2), (ProcBased.USE_TSC_OFFSETTING, 3),
    (ProcBased.HLT_EXITING, 7), (ProcBased.INVLPG_EXITING, 9), (ProcBased.MWAIT_EXITING, 10),
    (ProcBased.RDPMC_EXITING, 11), (ProcBased.RDTSC_EXITING, 12),
    (ProcBased.CR3_LOAD_EXITING, 15), (ProcBased.CR3_STORE_EXITING, 16),
    (ProcBased.ACTIVATE_TERTIARY_CONTROLS, 17),
    (ProcBased.CR8_LOAD_EXITING, 19), (ProcBased.CR8_STORE_EXITING, 20),
    (ProcBased.TPR_SHADOW, 21), (ProcBased.NMI_WINDOW_EXITING, 22),
    (ProcBased.MOV_DR_EXITING, 23), (ProcBased.UNCOND_IO_EXITING, 24),
    (ProcBased.USE_IO_BITMAPS, 25), (ProcBased.MONITOR_TRAP_FLAG, 27),
    (ProcBased.USE_MSR_BITMAPS, 28), (ProcBased.MONITOR_EXITING, 29),
    (ProcBased.PAUSE_EXITING, 30), (ProcBased.ACTIVATE_SECONDARY_CONTROLS, 31),
    (ProcBased2.VIRTUALIZE_APIC_ACCESSES, 0), (ProcBased2.ENABLE_EPT, 1), (ProcBased2.DESC, 2),
    (ProcBased2.ENABLE_RDTSCP, 3), (ProcBased2.VIRTUALIZE_X2APIC_MODE, 4),
    (ProcBased2.ENABLE_VPID, 5), (ProcBased2.WBINVD_EXITING, 6),
    (ProcBased2.UNRESTRICTED_GUEST, 7), (ProcBased2.APIC_REGISTER_VIRT, 8),
    (ProcBased2.VIRTUAL_INTR_DELIVERY, 9), (ProcBased2.PAUSE_LOOP_EXITING, 10),
    (ProcBased2.RDRAND_EXITING, 11), (ProcBased2.ENABLE_INVPCID, 12),
    (ProcBased2.ENABLE_VMFUNC, 13), (ProcBased2.SHADOW_VMCS, 14),
    (ProcBased2.ENCLS_EXITING, 15), (ProcBased2.RDSEED_EXITING, 16), (ProcBased2.ENABLE_PML, 17),
    (ProcBased2.EPT_VIOLATION_VE, 18), (ProcBased2.PT_CONCEAL_VMX, 19),
    (ProcBased2.ENABLE_XSAVES, 20), (ProcBased2.MODE_BASED_EPT_EXEC, 22),
    (ProcBased2.PT_USE_GPA, 24), (ProcBased2.TSC_SCALING, 25),
    (ProcBased2.ENABLE_USR_WAIT_PAUSE, 26), (ProcBased2.ENCLV_EXITING, 28),
    (ProcBased2.BUS_LOCK_DETECTION, 30), (ProcBased2.NOTIFY_VM_EXITING, 31),
    (ExitControl.SAVE_DEBUG_CONTROLS, 2), (ExitControl.HOST_ADDR_SPACE_SIZE, 9),
    (ExitControl.LOAD_IA32_PERF_GLOBAL_CTRL, 12), (ExitControl.ACK_INTR_ON_EXIT, 15),
    (ExitControl.SAVE_IA32_PAT, 18), (ExitControl.LOAD_IA32_PAT, 19),
    (ExitControl.SAVE_IA32_EFER, 20), (ExitControl.LOAD_IA32_EFER, 21),
    (ExitControl.SAVE_VMX_PREEMPTION_TIMER, 22), (ExitControl.CLEAR_BNDCFGS, 23),
    (ExitControl.PT_CONCEAL_PIP, 24), (ExitControl.CLEAR_IA32_RTIT_CTL, 25),
    (ExitControl.LOAD_CET_STATE, 28), (ExitControl.ACTIVATE_SECONDARY_CONTROLS, 31),
    (EntryControl.LOAD_DEBUG_CONTROLS, 2), (EntryControl.IA32E_MODE, 9), (EntryControl.SMM, 10),
    (EntryControl.DEACT_DUAL_MONITOR, 11), (EntryControl.LOAD_IA32_PERF_GLOBAL_CTRL, 13),
    (EntryControl.LOAD_IA32_PAT, 14), (EntryControl.LOAD_IA32_EFER, 15),
    (EntryControl.LOAD_BNDCFGS, 16), (EntryControl.PT_CONCEAL_PIP, 17),
    (EntryControl.LOAD_IA32_RTIT_CTL, 18), (EntryControl.LOAD_CET_STATE, 20),
    (EntryControl.LOAD_IA32_FRED, 23),
]


@pytest.mark.parametrize("member,bit", CONTROL_BITS, ids=lambda x: getattr(x, "name", str(x)))
def test_control_bits(member, bit):
    assert int(member) == 1 << bit
    assert CONTROL_INFO[member].bit == bit


def test_control_literals_from_the_brief():
    assert ProcBased.HLT_EXITING == 1 << 7
    assert ProcBased.UNCOND_IO_EXITING == 1 << 24
    assert ProcBased.USE_IO_BITMAPS == 1 << 25
    assert ProcBased.USE_MSR_BITMAPS == 1 << 28
    assert ProcBased.ACTIVATE_SECONDARY_CONTROLS == 0x80000000
    assert ProcBased2.ENABLE_EPT == 0x2
    assert ProcBased2.UNRESTRICTED_GUEST == 0x80
    assert ProcBased2.DESC == 0x4
    assert PinBased.EXT_INTR_MASK == 0x1
    assert PinBased.NMI_EXITING == 0x8
    assert ExitControl.HOST_ADDR_SPACE_SIZE == 0x200
    assert ExitControl.ACK_INTR_ON_EXIT == 0x8000
    assert ExitControl.LOAD_IA32_EFER == 0x200000
    assert EntryControl.IA32E_MODE == 0x200
    assert EntryControl.LOAD_IA32_EFER == 0x8000


def test_default1_masks():
    assert arch.PIN_BASED_DEFAULT1 == 0x00000016
    assert arch.PROC_BASED_DEFAULT1 == 0x0401E172
    assert arch.EXIT_CONTROL_DEFAULT1 == 0x00036DFF
    assert arch.ENTRY_CONTROL_DEFAULT1 == 0x000011FF
    assert arch.DEFAULT1[ProcBased] == 0x0401E172
    # pin-based default1 bits (1, 2, 4) are all reserved
    assert all(int(m) & 0x16 == 0 for m in PinBased)
    # CR3-load/store exiting (bits 15, 16) and the debug-control bits (bit 2)
    # are default1: they can only be cleared where the TRUE MSRs allow it
    assert ProcBased.CR3_LOAD_EXITING & 0x0401E172
    assert ProcBased.CR3_STORE_EXITING & 0x0401E172
    assert not ProcBased.HLT_EXITING & 0x0401E172
    assert ExitControl.SAVE_DEBUG_CONTROLS & 0x00036DFF
    assert EntryControl.LOAD_DEBUG_CONTROLS & 0x000011FF


def test_every_control_has_info():
    total = 0
    for cls in CONTROL_CLASSES:
        for member in cls:
            info = CONTROL_INFO[member]
            assert info.sdm_name and info.description
            assert 1 << info.bit == int(member)
            total += 1
    assert len(CONTROL_INFO) == total
    # members of different classes with the same value keep separate entries
    assert CONTROL_INFO[PinBased.EXT_INTR_MASK].sdm_name == "External-interrupt exiting"
    assert CONTROL_INFO[ProcBased2.VIRTUALIZE_APIC_ACCESSES].sdm_name == "Virtualize APIC accesses"
    assert CONTROL_INFO[ProcBased2.DESC].sdm_name == "Descriptor-table exiting"


def test_control_fields():
    assert CONTROL_FIELD[PinBased] == 0x4000
    assert CONTROL_FIELD[ProcBased] == 0x4002
    assert CONTROL_FIELD[ProcBased2] == 0x401E
    assert CONTROL_FIELD[ExitControl] == 0x400C
    assert CONTROL_FIELD[EntryControl] == 0x4012
    assert arch.ControlField is CONTROL_FIELD
    assert arch.control_names(ProcBased, 0x01000080) == ["HLT_EXITING", "UNCOND_IO_EXITING"]


# ---------------------------------------------------------------------------
# VM-instruction errors (SDM Table 31-1)
# ---------------------------------------------------------------------------

VM_ERRORS = [
    (1, "VMCALL_IN_VMX_ROOT_OPERATION"), (2, "VMCLEAR_INVALID_ADDRESS"),
    (3, "VMCLEAR_VMXON_POINTER"), (4, "VMLAUNCH_NONCLEAR_VMCS"),
    (5, "VMRESUME_NONLAUNCHED_VMCS"), (6, "VMRESUME_AFTER_VMXOFF"),
    (7, "ENTRY_INVALID_CONTROL_FIELD"), (8, "ENTRY_INVALID_HOST_STATE_FIELD"),
    (9, "VMPTRLD_INVALID_ADDRESS"), (10, "VMPTRLD_VMXON_POINTER"),
    (11, "VMPTRLD_INCORRECT_VMCS_REVISION_ID"), (12, "UNSUPPORTED_VMCS_COMPONENT"),
    (13, "VMWRITE_READ_ONLY_VMCS_COMPONENT"), (14, "RESERVED_14"),
    (15, "VMXON_IN_VMX_ROOT_OPERATION"), (16, "ENTRY_INVALID_EXECUTIVE_VMCS_POINTER"),
    (17, "ENTRY_NONLAUNCHED_EXECUTIVE_VMCS"),
    (18, "ENTRY_EXECUTIVE_VMCS_POINTER_NOT_VMXON_POINTER"), (19, "VMCALL_NONCLEAR_VMCS"),
    (20, "VMCALL_INVALID_VM_EXIT_CONTROL_FIELDS"), (21, "RESERVED_21"),
    (22, "VMCALL_INCORRECT_MSEG_REVISION_ID"),
    (23, "VMXOFF_UNDER_DUAL_MONITOR_TREATMENT_OF_SMIS_AND_SMM"),
    (24, "VMCALL_INVALID_SMM_MONITOR_FEATURES"),
    (25, "ENTRY_INVALID_VM_EXECUTION_CONTROL_FIELDS_IN_EXECUTIVE_VMCS"),
    (26, "ENTRY_EVENTS_BLOCKED_BY_MOV_SS"), (27, "RESERVED_27"),
    (28, "INVALID_OPERAND_TO_INVEPT_INVVPID"),
]


def test_vm_instruction_errors():
    assert [(int(e), e.name) for e in VmInstructionError] == VM_ERRORS
    assert VmInstructionError(12).description == "VMREAD/VMWRITE from/to unsupported VMCS component"
    assert VmInstructionError(13).description == "VMWRITE to read-only VMCS component"
    assert VmInstructionError(7).description == "VM entry with invalid control field(s)"
    assert VmInstructionError(14).description == "Reserved"
    assert all(e.description for e in VmInstructionError)


# ---------------------------------------------------------------------------
# MSRs and register bits
# ---------------------------------------------------------------------------

MSRS = [
    ("IA32_TIME_STAMP_COUNTER", 0x10), ("IA32_TSC", 0x10), ("IA32_APIC_BASE", 0x1B),
    ("IA32_FEATURE_CONTROL", 0x3A), ("IA32_TSC_ADJUST", 0x3B), ("IA32_SPEC_CTRL", 0x48),
    ("IA32_MTRRCAP", 0xFE), ("IA32_SYSENTER_CS", 0x174), ("IA32_SYSENTER_ESP", 0x175),
    ("IA32_SYSENTER_EIP", 0x176), ("IA32_MISC_ENABLE", 0x1A0), ("IA32_DEBUGCTL", 0x1D9),
    ("IA32_PAT", 0x277), ("IA32_PERF_GLOBAL_CTRL", 0x38F),
    ("IA32_VMX_BASIC", 0x480), ("IA32_VMX_PINBASED_CTLS", 0x481),
    ("IA32_VMX_PROCBASED_CTLS", 0x482), ("IA32_VMX_EXIT_CTLS", 0x483),
    ("IA32_VMX_ENTRY_CTLS", 0x484), ("IA32_VMX_MISC", 0x485),
    ("IA32_VMX_CR0_FIXED0", 0x486), ("IA32_VMX_CR0_FIXED1", 0x487),
    ("IA32_VMX_CR4_FIXED0", 0x488), ("IA32_VMX_CR4_FIXED1", 0x489),
    ("IA32_VMX_VMCS_ENUM", 0x48A), ("IA32_VMX_PROCBASED_CTLS2", 0x48B),
    ("IA32_VMX_EPT_VPID_CAP", 0x48C), ("IA32_VMX_TRUE_PINBASED_CTLS", 0x48D),
    ("IA32_VMX_TRUE_PROCBASED_CTLS", 0x48E), ("IA32_VMX_TRUE_EXIT_CTLS", 0x48F),
    ("IA32_VMX_TRUE_ENTRY_CTLS", 0x490), ("IA32_VMX_VMFUNC", 0x491),
    ("IA32_VMX_PROCBASED_CTLS3", 0x492), ("IA32_EFER", 0xC0000080),
    ("IA32_STAR", 0xC0000081), ("IA32_LSTAR", 0xC0000082), ("IA32_CSTAR", 0xC0000083),
    ("IA32_FMASK", 0xC0000084), ("IA32_FS_BASE", 0xC0000100), ("IA32_GS_BASE", 0xC0000101),
    ("IA32_KERNEL_GS_BASE", 0xC0000102), ("IA32_TSC_AUX", 0xC0000103),
]


@pytest.mark.parametrize("name,value", MSRS)
def test_msr_numbers(name, value):
    assert int(Msr[name]) == value


def test_register_bits():
    assert FeatureControl.LOCKED == 0x1
    assert FeatureControl.VMXON_ENABLED_INSIDE_SMX == 0x2
    assert FeatureControl.VMXON_ENABLED_OUTSIDE_SMX == 0x4
    assert (Efer.SCE, Efer.LME, Efer.LMA, Efer.NXE) == (0x1, 0x100, 0x400, 0x800)
    assert (Cr0.PE, Cr0.MP, Cr0.EM, Cr0.TS, Cr0.ET, Cr0.NE) == (0x1, 0x2, 0x4, 0x8, 0x10, 0x20)
    assert (Cr0.WP, Cr0.AM, Cr0.NW, Cr0.CD, Cr0.PG) == (0x10000, 0x40000, 0x20000000, 0x40000000, 0x80000000)
    assert Cr4.PAE == 0x20
    assert Cr4.OSFXSR == 0x200
    assert Cr4.UMIP == 0x800
    assert Cr4.LA57 == 0x1000
    assert Cr4.VMXE == 0x2000
    assert Cr4.SMXE == 0x4000
    assert Cr4.FSGSBASE == 0x10000
    assert Cr4.PCIDE == 0x20000
    assert Cr4.OSXSAVE == 0x40000
    assert Cr4.SMEP == 0x100000
    assert Cr4.SMAP == 0x200000
    assert Cr4.PKE == 0x400000
    assert Cr4.CET == 0x800000
    assert Rflags.CF == 0x1
    assert Rflags.FIXED == 0x2
    assert Rflags.ZF == 0x40
    assert Rflags.TF == 0x100
    assert Rflags.IF == 0x200
    assert Rflags.IOPL == 0x3000
    assert Rflags.RF == 0x10000
    assert Rflags.VM == 0x20000
    assert Rflags.ID == 0x200000


# ---------------------------------------------------------------------------
# Exceptions and interruption information
# ---------------------------------------------------------------------------


def test_vectors():
    expected = {"DE": 0, "DB": 1, "NMI": 2, "BP": 3, "OF": 4, "BR": 5, "UD": 6, "NM": 7,
                "DF": 8, "TS": 10, "NP": 11, "SS": 12, "GP": 13, "PF": 14, "MF": 16,
                "AC": 17, "MC": 18, "XM": 19, "VE": 20, "CP": 21}
    assert {v.name: int(v) for v in Vector} == expected
    assert set(EXCEPTION_INFO) == set(Vector)


def test_exception_info():
    gp = EXCEPTION_INFO[Vector.GP]
    assert (gp.mnemonic, gp.name, gp.has_error_code, gp.exception_class) == (
        "#GP", "General Protection", True, "fault")
    with_code = {v.name for v, i in EXCEPTION_INFO.items() if i.has_error_code}
    assert with_code == {"DF", "TS", "NP", "SS", "GP", "PF", "AC", "CP"}
    assert EXCEPTION_INFO[Vector.BP].exception_class == "trap"
    assert EXCEPTION_INFO[Vector.DF].exception_class == "abort"
    assert EXCEPTION_INFO[Vector.MC].exception_class == "abort"
    assert EXCEPTION_INFO[Vector.NMI].exception_class == "interrupt"
    assert EXCEPTION_INFO[Vector.PF].mnemonic == "#PF"


def test_interruption_info():
    assert [(t.name, int(t)) for t in InterruptionType if t.name != "RESERVED"] == [
        ("EXTERNAL_INTERRUPT", 0), ("NMI", 2), ("HARDWARE_EXCEPTION", 3),
        ("SOFTWARE_INTERRUPT", 4), ("PRIVILEGED_SOFTWARE_EXCEPTION", 5),
        ("SOFTWARE_EXCEPTION", 6), ("OTHER_EVENT", 7)]
    assert arch.INTR_INFO_VALID == 0x80000000
    assert arch.INTR_INFO_DELIVER_CODE == 0x800
    assert arch.INTR_INFO_VECTOR_MASK == 0xFF
    assert arch.INTR_INFO_TYPE_SHIFT == 8
    # #GP with error code: valid | deliver | type 3 | vector 13
    assert IntrInfo(13, InterruptionType.HARDWARE_EXCEPTION, True).encode() == 0x80000B0D
    # #UD without error code
    assert IntrInfo(6, InterruptionType.HARDWARE_EXCEPTION).encode() == 0x80000306
    # external interrupt vector 0x20
    assert IntrInfo(0x20, InterruptionType.EXTERNAL_INTERRUPT).encode() == 0x80000020
    d = IntrInfo.decode(0x80000B0E)
    assert (d.vector, d.type, d.deliver_error_code, d.valid) == (
        14, InterruptionType.HARDWARE_EXCEPTION, True, True)
    assert d.as_dict()["vector"] == "PF"


# ---------------------------------------------------------------------------
# Exit qualifications (SDM Tables 28-3, 28-4, 28-5, 28-7)
# ---------------------------------------------------------------------------


def test_gpr_order():
    assert GPR_ORDER == ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@pytest.mark.parametrize(
    "value,port,size,direction,string,rep,immediate",
    [
        # out dx, al with DX = 0x3F8: port in DX, so bit 6 = 0
        (0x03F80000, 0x3F8, 1, IoDirection.OUT, False, False, False),
        # in al, 0x60: IN (bit 3) with an immediate port (bit 6)
        (0x00600048, 0x60, 1, IoDirection.IN, False, False, True),
        # out 0x80, al
        (0x00800040, 0x80, 1, IoDirection.OUT, False, False, True),
        # in eax, dx with DX = 0xCFC: size code 3 (4 bytes), IN
        (0x0CFC000B, 0xCFC, 4, IoDirection.IN, False, False, False),
        # rep outsw to DX = 0x1F0: size code 1, string, rep
        (0x01F00031, 0x1F0, 2, IoDirection.OUT, True, True, False),
    ],
)
def test_io_qualification(value, port, size, direction, string, rep, immediate):
    q = IoQualification.decode(value)
    assert (q.port, q.size, q.direction, q.string, q.rep, q.immediate) == (
        port, size, direction, string, rep, immediate)
    assert IoQualification(port, size, direction, string, rep, immediate).encode() == value
    assert q.encode() == value
    assert q.as_dict()["port"] == hex(port)


def test_io_qualification_invalid():
    with pytest.raises(ValueError):
        IoQualification(0x60, size=3)
    with pytest.raises(ValueError):
        IoQualification.decode(0x00600002)  # size code 2 is unused


@pytest.mark.parametrize(
    "value,cr,access,gpr",
    [
        (0x003, 3, CrAccessType.MOV_TO_CR, 0),    # mov cr3, rax
        (0x313, 3, CrAccessType.MOV_FROM_CR, 3),  # mov rbx, cr3
        (0x000, 0, CrAccessType.MOV_TO_CR, 0),    # mov cr0, rax
        (0xC04, 4, CrAccessType.MOV_TO_CR, 12),   # mov cr4, r12
        (0x118, 8, CrAccessType.MOV_FROM_CR, 1),  # mov rcx, cr8
        (0x020, 0, CrAccessType.CLTS, 0),         # clts
    ],
)
def test_cr_access_qualification(value, cr, access, gpr):
    q = CrAccessQualification.decode(value)
    assert (q.cr, q.access_type, q.gpr) == (cr, access, gpr)
    assert CrAccessQualification(cr, access, gpr).encode() == value
    assert q.encode() == value


def test_cr_access_helpers_and_lmsw():
    assert CrAccessQualification.mov(3, "rax", to_cr=True).encode() == 0x3
    assert CrAccessQualification.mov(3, "rbx", to_cr=False).encode() == 0x313
    q = CrAccessQualification.decode(0x313)
    assert q.register == "rbx"
    assert q.as_dict() == {"cr": 3, "access_type": "MOV_FROM_CR", "register": "rbx"}
    # lmsw ax with AX = 0x0001: type 3, register operand, source data in 31:16
    lmsw = CrAccessQualification(0, CrAccessType.LMSW, lmsw_source=0x0001)
    assert lmsw.encode() == 0x00010030
    # lmsw [mem] (bit 6 set) with source 0x000F
    q = CrAccessQualification.decode(0x000F0070)
    assert (q.access_type, q.lmsw_memory_operand, q.lmsw_source) == (CrAccessType.LMSW, True, 0xF)


@pytest.mark.parametrize(
    "value,dr,direction,gpr",
    [
        (0x007, 7, DrAccessDirection.MOV_TO_DR, 0),     # mov dr7, rax
        (0x316, 6, DrAccessDirection.MOV_FROM_DR, 3),   # mov rbx, dr6
        (0xF00, 0, DrAccessDirection.MOV_TO_DR, 15),    # mov dr0, r15
    ],
)
def test_dr_access_qualification(value, dr, direction, gpr):
    q = DrAccessQualification.decode(value)
    assert (q.dr, q.direction, q.gpr) == (dr, direction, gpr)
    assert DrAccessQualification(dr, direction, gpr).encode() == value
    assert q.as_dict()["register"] == GPR_ORDER[gpr]


def test_ept_violation_qualification():
    # write to a not-present page, linear address valid and translated: bits 1, 7, 8
    q = EptViolationQualification.decode(0x182)
    assert q.write and not q.read and not q.fetch
    assert q.permissions == "---"
    assert q.gla_valid and q.gla_translation
    assert q.encode() == 0x182
    # write to a read/execute page: bits 1, 3, 5, 7, 8
    q = EptViolationQualification(write=True, readable=True, executable=True,
                                  gla_valid=True, gla_translation=True)
    assert q.encode() == 0x1AA
    assert q.permissions == "r-x"
    # instruction fetch from a read-only page: bits 2, 3, 7, 8
    assert EptViolationQualification(fetch=True, readable=True, gla_valid=True,
                                     gla_translation=True).encode() == 0x18C
    # NMI unblocking (bit 12) and an unnamed bit survive a round trip
    assert EptViolationQualification.decode(0x1001).nmi_unblocking
    assert EptViolationQualification.decode(0x10000001).encode() == 0x10000001
    assert "access" in q.as_dict()


def test_decoded_qualifications_are_frozen():
    q = IoQualification.decode(0x00600048)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.port = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Package surface
# ---------------------------------------------------------------------------


def test_all_names_exist():
    for name in arch.__all__:
        assert hasattr(arch, name), name


def test_public_enums_have_docstrings():
    for name in arch.__all__:
        obj = getattr(arch, name)
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            assert obj.__doc__ and obj.__doc__.strip(), name

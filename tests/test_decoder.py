"""The instruction decoder (vtlab/cpu/decoder.py) and exit decisions over its records.

Each guest instruction VMX cares about is decoded once, at load, into a typed record:
its kind (from Capstone's numeric instruction id), register operands as SDM register
numbers, the memory operand and its linear address, prefixes, sizes.  The exit rules
(vtlab/cpu/exit_rules.py) read only those records - never the disassembly text.

The SDM facts are written out literally: the general-purpose register numbers of the
exit qualifications and the instruction-information field (SDM Vol. 3C Tables 28-3,
28-4, 28-10: 0 = RAX ... 15 = R15) and the segment numbers of the instruction-
information field (Table 28-10 bits 17:15: 0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS).
"""
from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
from capstone import x86_const as C

from vtlab import ExitReason, Guest, VirtualMachine, assemble, exits
from vtlab.arch import ProcBased
from vtlab.arch.qualifications import GPR_ORDER, IoDirection, IoQualification
from vtlab.cpu import asm, exit_rules, operands
from vtlab.cpu.decoder import (SEGMENT_NAMES, DecodedInstruction, InsnKind, MemoryOperand,
                               Register, UnknownRegisterError, decode_instruction,
                               register_name, sdm_register, sweep)

K = InsnKind
ES, CS, SS, DS, FS, GS = 0, 1, 2, 3, 4, 5     # Table 28-10, bits 17:15


def decode(src: str, bits: int, address: int = 0x1000) -> DecodedInstruction:
    """Assemble one instruction and decode it."""
    code = assemble(src, address, bits)
    d = decode_instruction(code, address, bits)
    assert d is not None and d.length == len(code), (src, code.hex(), d)
    return d


# ======================================================= SDM register and segment numbers
# The "general-purpose register" encoding of SDM Vol. 3C Table 28-3 (bits 11:8):
# 0 = RAX, 1 = RCX, 2 = RDX, 3 = RBX, 4 = RSP, 5 = RBP, 6 = RSI, 7 = RDI, 8-15 = R8-R15.
SDM_NUMBERS = [
    # (Capstone name, SDM number, width)
    ("RAX", 0, 64), ("RCX", 1, 64), ("RDX", 2, 64), ("RBX", 3, 64),
    ("RSP", 4, 64), ("RBP", 5, 64), ("RSI", 6, 64), ("RDI", 7, 64),
    ("R8", 8, 64), ("R9", 9, 64), ("R10", 10, 64), ("R11", 11, 64),
    ("R12", 12, 64), ("R13", 13, 64), ("R14", 14, 64), ("R15", 15, 64),
    ("EAX", 0, 32), ("ECX", 1, 32), ("EDX", 2, 32), ("EBX", 3, 32),
    ("ESP", 4, 32), ("EBP", 5, 32), ("ESI", 6, 32), ("EDI", 7, 32),
    ("R8D", 8, 32), ("R13D", 13, 32), ("R15D", 15, 32),
    ("AX", 0, 16), ("CX", 1, 16), ("DX", 2, 16), ("BX", 3, 16),
    ("SP", 4, 16), ("BP", 5, 16), ("SI", 6, 16), ("DI", 7, 16),
    ("R9W", 9, 16), ("R15W", 15, 16),
    ("AL", 0, 8), ("CL", 1, 8), ("DL", 2, 8), ("BL", 3, 8),
    ("SPL", 4, 8), ("BPL", 5, 8), ("SIL", 6, 8), ("DIL", 7, 8), ("R10B", 10, 8),
]


@pytest.mark.parametrize("name, number, width", SDM_NUMBERS)
def test_register_numbers_are_the_sdm_encoding(name, number, width):
    assert sdm_register(getattr(C, f"X86_REG_{name}")) == (number, width)
    assert register_name(number, width) == name.lower()
    assert Register(number, width).name == name.lower()


def test_register_numbers_agree_with_the_qualification_order():
    assert [register_name(n) for n in range(16)] == list(GPR_ORDER)
    assert GPR_ORDER[:8] == ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")


def test_segment_numbers_are_table_28_10():
    assert SEGMENT_NAMES == ("es", "cs", "ss", "ds", "fs", "gs")


@pytest.mark.parametrize("name", ["AH", "CH", "DH", "BH", "XMM0", "CS", "CR0", "RIP", "ST0"])
def test_a_register_without_number_raises(name):
    """No silent fallback to RAX: AH, segment, control, vector registers have no number."""
    with pytest.raises(UnknownRegisterError, match=f"X86_REG_{name}"):
        sdm_register(getattr(C, f"X86_REG_{name}"))


# ================================================================ every kind, every mode
REG = {16: "eax", 32: "eax", 64: "rax"}
MEM = {16: "[bx]", 32: "[ebx]", 64: "[rbx]"}
KINDS = [
    (K.CPUID, "cpuid"), (K.GETSEC, "getsec"), (K.INVD, "invd"), (K.XSETBV, "xsetbv"),
    (K.VMCALL, "vmcall"), (K.VMCLEAR, "vmclear {m}"), (K.VMLAUNCH, "vmlaunch"),
    (K.VMPTRLD, "vmptrld {m}"), (K.VMPTRST, "vmptrst {m}"), (K.VMREAD, "vmread {m}, {r}"),
    (K.VMRESUME, "vmresume"), (K.VMWRITE, "vmwrite {r}, {m}"), (K.VMXOFF, "vmxoff"),
    (K.VMXON, "vmxon {m}"), (K.INVEPT, "invept {r}, {m}"), (K.INVVPID, "invvpid {r}, {m}"),
    (K.HLT, "hlt"), (K.INVLPG, "invlpg {m}"), (K.RDPMC, "rdpmc"), (K.RDTSC, "rdtsc"),
    (K.RDTSCP, "rdtscp"), (K.MONITOR, "monitor"), (K.MWAIT, "mwait"), (K.PAUSE, "pause"),
    (K.WBINVD, "wbinvd"), (K.RDRAND, "rdrand eax"), (K.RDSEED, "rdseed eax"),
    (K.MOV_TO_CR, "mov cr3, {r}"), (K.MOV_FROM_CR, "mov {r}, cr0"),
    (K.MOV_TO_DR, "mov dr7, {r}"), (K.MOV_FROM_DR, "mov {r}, dr6"), (K.CLTS, "clts"),
    (K.LMSW, "lmsw ax"), (K.SMSW, "smsw ax"), (K.IN, "in al, dx"), (K.OUT, "out 0x80, al"),
    (K.INS, "insb"), (K.OUTS, "outsw"), (K.RDMSR, "rdmsr"), (K.WRMSR, "wrmsr"),
    (K.LGDT, "lgdt {m}"), (K.LIDT, "lidt {m}"), (K.SGDT, "sgdt {m}"), (K.SIDT, "sidt {m}"),
    (K.LLDT, "lldt ax"), (K.LTR, "ltr ax"), (K.SLDT, "sldt ax"), (K.STR, "str ax"),
]


@pytest.mark.parametrize("bits", [16, 32, 64])
@pytest.mark.parametrize("kind, src", KINDS, ids=[k.name for k, _ in KINDS])
def test_each_kind_decodes_in_each_code_size(kind, src, bits):
    if bits == 16 and kind in (K.INVEPT, K.INVVPID):
        pytest.skip("Capstone 5 cannot decode INVEPT/INVVPID (66 0F 38 8x) in 16-bit code")
    d = decode(src.format(r=REG[bits], m=MEM[bits]), bits)
    assert d.kind is kind
    assert d.code_size == bits
    assert d.text  # (for display)


def test_vmclear_in_16_bit_code_is_not_vmptrld():
    """66 0F C7 /6 is VMCLEAR in every mode; Capstone 5 names it VMPTRLD in 16-bit code."""
    d = decode_instruction(bytes.fromhex("660fc737"), 0x1000, 16)
    assert d.kind is K.VMCLEAR and d.text.startswith("vmclear")
    assert decode_instruction(bytes.fromhex("0fc737"), 0x1000, 16).kind is K.VMPTRLD


def test_other_instructions_are_other():
    for src in ("mov eax, ebx", "add eax, 1", "mov eax, 0x220f", "nop", "push ebp"):
        assert decode(src, 32).kind is K.OTHER


# ================================================================== MOV CR and MOV DR
@pytest.mark.parametrize("bits, src, kind, number, reg", [
    (64, "mov cr8, r15", K.MOV_TO_CR, 8, Register(15, 64)),
    (64, "mov r9, cr3", K.MOV_FROM_CR, 3, Register(9, 64)),
    (64, "mov cr0, r8", K.MOV_TO_CR, 0, Register(8, 64)),
    (64, "mov cr4, rbx", K.MOV_TO_CR, 4, Register(3, 64)),
    (32, "mov cr4, ecx", K.MOV_TO_CR, 4, Register(1, 32)),
    (32, "mov edi, cr2", K.MOV_FROM_CR, 2, Register(7, 32)),
    (16, "mov eax, cr0", K.MOV_FROM_CR, 0, Register(0, 32)),   # MOV CR is 32-bit in 16-bit code
])
def test_mov_cr_number_direction_register(bits, src, kind, number, reg):
    d = decode(src, bits)
    assert (d.kind, d.control_register, d.registers, d.debug_register) == (kind, number, (reg,), None)
    assert d.to_special_register is (kind is K.MOV_TO_CR)


@pytest.mark.parametrize("bits, src, kind, number, reg", [
    (64, "mov dr7, r10", K.MOV_TO_DR, 7, Register(10, 64)),
    (64, "mov r11, dr6", K.MOV_FROM_DR, 6, Register(11, 64)),
    (32, "mov dr0, esi", K.MOV_TO_DR, 0, Register(6, 32)),
    (32, "mov ebp, dr3", K.MOV_FROM_DR, 3, Register(5, 32)),
])
def test_mov_dr_number_direction_register(bits, src, kind, number, reg):
    d = decode(src, bits)
    assert (d.kind, d.debug_register, d.registers, d.control_register) == (kind, number, (reg,), None)
    assert d.to_special_register is (kind is K.MOV_TO_DR)


def test_clts_lmsw_smsw_access_cr0():
    for src in ("clts", "lmsw ax", "smsw eax"):
        assert decode(src, 32).control_register == 0
    assert decode("cpuid", 32).to_special_register is None


# ====================================================================== memory operands
class FakeCpu:
    """Registers and segment bases, for linear-address arithmetic without a guest."""

    def __init__(self, regs=None, bases=None, rip=0x1000):
        self.regs, self.bases, self.rip = regs or {}, bases or {}, rip

    def reg(self, name):
        return self.regs.get(name, 0)

    def segment(self, name):
        return SimpleNamespace(base=self.bases.get(name, 0))


@pytest.mark.parametrize("bits, src, segment, base, index, scale, disp", [
    (64, "invlpg [rax+rcx*4+0x10]", DS, 0, 1, 4, 0x10),
    (64, "invlpg [r13+r14*8-0x80]", DS, 13, 14, 8, -0x80),    # R13 base: DS, not SS
    (64, "invlpg [rbp]", SS, 5, None, 1, 0),                  # rBP base: SS (Vol. 1 3.7.4)
    (64, "invlpg [rsp+8]", SS, 4, None, 1, 8),                # rSP base: SS
    (64, "invlpg [r12]", DS, 12, None, 1, 0),
    (64, "invlpg fs:[rax]", FS, 0, None, 1, 0),               # segment override
    (32, "invlpg [esp+4]", SS, 4, None, 1, 4),
    (32, "invlpg [0x500]", DS, None, None, 1, 0x500),
    (32, "invlpg [ebx+esi*2-4]", DS, 3, 6, 2, -4),
    (16, "invlpg [bp+di]", SS, 5, 7, 1, 0),                   # BP-based: SS
    (16, "invlpg [bx+si+4]", DS, 3, 6, 1, 4),
    (16, "invlpg es:[bx]", ES, 3, None, 1, 0),
])
def test_memory_operand_fields(bits, src, segment, base, index, scale, disp):
    m = decode(src, bits).memory
    assert (m.segment, m.base, m.index, m.scale, m.displacement) == (segment, base, index, scale, disp)
    assert m.address_size == bits and not m.rip_relative
    assert m.scaling == {1: 0, 2: 1, 4: 2, 8: 3}[scale]


def test_segment_override_is_a_prefix():
    d = decode("invlpg fs:[rax]", 64)
    assert d.prefixes.segment == FS and d.memory.segment == FS
    assert decode("invlpg [rax]", 64).prefixes.segment is None


def test_rip_relative_operand():
    d = decode("invlpg [rip+0x100]", 64)
    m = d.memory
    assert m.rip_relative and m.base is None and m.index is None
    assert (m.displacement, m.displacement_size) == (0x100, 4)
    cpu = FakeCpu(rip=0x1000)
    assert d.linear_address(cpu) == 0x1000 + d.length + 0x100   # next RIP + displacement


@pytest.mark.parametrize("bits, src, address_size", [
    (64, "invlpg [eax]", 32),          # 67H in 64-bit code: 32-bit addressing
    (32, "invlpg [bx]", 16),           # 67H in 32-bit code: 16-bit addressing
    (16, "invlpg [ebx+eax*2]", 32),    # 67H in 16-bit code: 32-bit addressing
])
def test_address_size_prefix(bits, src, address_size):
    d = decode(src, bits)
    assert d.prefixes.address_size and d.address_size == address_size
    assert d.memory.address_size == address_size


def test_linear_address_wraps_the_offset_to_the_address_size():
    # 16-bit: BX = FFF0H + 20H wraps to 0010H in the segment; DS base 1000H
    d = decode("invlpg [bx+0x20]", 16)
    assert d.linear_address(FakeCpu({"rbx": 0xFFF0}, {"ds": 0x1000})) == 0x1010
    # 32-bit addressing in 64-bit code: the sum is truncated to 32 bits
    d = decode("invlpg [eax]", 64)
    assert d.linear_address(FakeCpu({"rax": 0x1_0000_0010})) == 0x10
    # 32-bit code: base + offset is a 32-bit linear address
    d = decode("invlpg [ebx+0x2000]", 32)
    assert d.linear_address(FakeCpu({"rbx": 0}, {"ds": 0xFFFF_F000})) == 0x1000
    # a negative displacement
    d = decode("invlpg [ebx+esi*2-4]", 32)
    assert d.linear_address(FakeCpu({"rbx": 0x600, "rsi": 0x10})) == 0x600 + 0x20 - 4


def test_64_bit_mode_ignores_es_cs_ss_ds_bases_but_not_fs_gs():
    """SDM Vol. 3A 3.4.4: in 64-bit mode the CPU treats the ES/CS/SS/DS bases as 0."""
    cpu = FakeCpu({"rax": 0x500}, {"ds": 0x7000, "fs": 0x9000})
    assert decode("invlpg [rax]", 64).linear_address(cpu) == 0x500
    assert decode("invlpg fs:[rax]", 64).linear_address(cpu) == 0x9500
    assert decode("invlpg [eax]", 32).linear_address(cpu) == 0x7500


def test_linear_address_needs_a_memory_operand():
    with pytest.raises(ValueError, match="no memory operand"):
        decode("cpuid", 64).linear_address(FakeCpu())


# ================================================================ prefixes and sizes
def test_operand_size_attribute():
    assert decode("lgdt [0x500]", 16).operand_size == 16
    assert decode_instruction(b"\x66" + assemble("lgdt [0x500]", 0, 16), 0, 16).operand_size == 32
    assert decode("lgdt [0x500]", 32).operand_size == 32
    d = decode("rdrand rax", 64)                                 # REX.W
    assert d.operand_size == 64 and d.registers == (Register(0, 64),)
    assert decode("str r9w", 64).prefixes.operand_size            # 66H


def test_rep_lock_prefixes():
    assert decode("rep outsb", 32).prefixes.rep
    assert decode_instruction(b"\xf2\x6e", 0, 64).prefixes.repne
    assert decode("lock add [rax], eax", 64).prefixes.lock        # (kind OTHER, still decoded)


# ===================================================================== I/O instructions
def io(d: DecodedInstruction, dx: int = 0) -> IoQualification:
    return exit_rules.io_operands(SimpleNamespace(guest=FakeCpu({"dx": dx})), d)


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_in_al_dx(bits):
    d = decode("in al, dx", bits)
    assert d.kind is K.IN and d.immediate is None
    assert d.registers == (Register(0, 8), Register(2, 16))      # AL, DX
    assert io(d, dx=0x3F8) == IoQualification(0x3F8, 1, IoDirection.IN)


def test_in_and_out_with_an_immediate_port():
    d = decode("out 0x80, al", 32)
    assert (d.kind, d.immediate, d.registers) == (K.OUT, 0x80, (Register(0, 8),))
    assert io(d) == IoQualification(0x80, 1, IoDirection.OUT, immediate=True)
    # SDM Table 28-5 example: in al, 0x60 -> 0x00600048
    assert io(decode("in al, 0x60", 16)).encode() == 0x0060_0048
    assert io(decode("in eax, 0x60", 32)).size == 4
    assert decode("out 0xff, al", 16).immediate == 0xFF            # unsigned
    assert io(decode("out dx, ax", 64), dx=0x1F0) == IoQualification(0x1F0, 2, IoDirection.OUT)


@pytest.mark.parametrize("bits, index", [(16, 6), (32, 6), (64, 6)])
def test_rep_outsb(bits, index):
    d = decode("rep outsb", bits)
    assert d.kind is K.OUTS and d.prefixes.rep
    m = d.memory
    assert (m.segment, m.base, m.size, m.address_size) == (DS, index, 1, bits)   # DS:rSI
    assert io(d, dx=0xE9) == IoQualification(0xE9, 1, IoDirection.OUT, string=True, rep=True)


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_insd(bits):
    d = decode("insd", bits)
    assert d.kind is K.INS and not d.prefixes.rep
    m = d.memory
    assert (m.segment, m.base, m.size) == (ES, 7, 4)                # ES:rDI
    assert io(d, dx=0x60) == IoQualification(0x60, 4, IoDirection.IN, string=True)


def test_string_io_segments():
    es_outsb = decode_instruction(b"\x26\x6e", 0x1000, 16)            # ES override
    assert es_outsb.kind is K.OUTS and es_outsb.memory.segment == ES
    cs_insb = decode_instruction(b"\x2e\x6c", 0x1000, 16)             # INS: always ES
    assert cs_insb.kind is K.INS and cs_insb.memory.segment == ES
    repne = decode_instruction(b"\xf2\x6e", 0x1000, 64)
    assert io(repne).rep


def test_string_io_linear_address():
    d = decode("rep outsb", 16)
    assert d.linear_address(FakeCpu({"rsi": 0x10}, {"ds": 0x1000})) == 0x1010


# ============================================ instruction information and displacement
def test_instruction_information_from_the_record():
    """SDM Table 28-10 / 28-11 (identity bits 29:28 are added by the rule)."""
    # SGDT [RBX+8]: address size 64 (2 << 7), DS (3 << 15), no index (bit 22), base RBX (3 << 23)
    assert operands.instruction_information(decode("sgdt [rbx+8]", 64), True) == 0x01C1_8100
    # SIDT [BP+SI+4], 16-bit: SS (2 << 15), index SI (6 << 18), base BP (5 << 23)
    assert operands.instruction_information(decode("sidt [bp+si+4]", 16), True) == 0x0299_0000
    # LLDT [RAX+RCX*8]: scaling 3, address size 64, DS, index RCX, base RAX
    assert operands.instruction_information(decode("lldt [rax+rcx*8]", 64), False) == 0x0005_8103
    # STR R9W: register operand (bit 10), register 9 in bits 6:3
    assert operands.instruction_information(decode("str r9w", 64), False) == 0x0000_0448
    # LGDT [RIP+disp]: no base, no index
    info = operands.instruction_information(decode("lgdt [rip+0x10]", 64), True)
    assert info & (1 << 22) and info & (1 << 27)


def test_displacement_qualification():
    assert operands.displacement(decode("vmptrld [rbx-0x10]", 64)) == 0xFFFF_FFFF_FFFF_FFF0
    assert operands.displacement(decode("vmptrst [rbx]", 64)) == 0
    assert operands.displacement(decode("vmxon [0x500]", 64)) == 0x500     # RIP-relative
    assert operands.displacement(decode("vmread rax, rbx", 64)) == 0


# ============================================================ decoded once, at load time
def test_sweep_lists_every_instruction_and_decodes_those_of_interest():
    src = "mov eax, 0x220f\ncpuid\nmov ebx, eax\nmov cr3, eax\nrep outsb\nhlt"
    code = assemble(src, 0x1000, 32)
    instructions, decoded = sweep(code, 0x1000, 32)
    assert instructions == asm.disassemble(code, 0x1000, 32)
    # MOV EAX, 220FH holds the bytes 0F 22 in its immediate: still an ordinary MOV
    assert [d.kind for d in decoded.values()] == [K.CPUID, K.MOV_TO_CR, K.OUTS, K.HLT]
    assert all(decoded[d.address] is d for d in decoded.values())


def test_guest_load_keeps_the_records():
    g = Guest("long")
    prog = g.load("cpuid\nmov rax, cr3\nmov cr3, rax\nhlt")
    assert [i.mnemonic for i in prog.instructions] == ["cpuid", "mov", "mov", "hlt"]
    assert [(a, d.kind) for a, d in prog.decoded.items()] == [
        (0x1000, K.CPUID), (0x1002, K.MOV_FROM_CR), (0x1005, K.MOV_TO_CR), (0x1008, K.HLT)]


def test_the_rule_gets_the_record_decoded_at_load(monkeypatch):
    seen = []
    cpuid_rule = exits.EXIT_RULES[ExitReason.CPUID]

    def spy(m, d):
        seen.append(d)
        return cpuid_rule(m, d)
    monkeypatch.setitem(exits.EXIT_RULES, ExitReason.CPUID, spy)
    vm = VirtualMachine("mov esi, 3\nl: cpuid\ndec esi\njnz l\nhlt", mode="protected")
    vm.run()
    assert len(seen) == 3 and seen[0].kind is K.CPUID
    prog = vm.guest.programs[-1]
    assert all(d is prog.decoded[d.address] for d in seen)  # the same record: nothing re-decoded


# ========================================================== decisions never read text
class FakeMonitor:
    """Just enough of an ExitMonitor for one rule: CPL 0, controls, a VMCS."""

    def __init__(self, proc=0, proc2=0, regs=None, fields=None):
        self.proc, self.proc2 = proc, proc2
        self.guest = FakeCpu(regs or {})
        self.guest.cpl, self.guest._stop = 0, None
        self.rip, self.cpl = 0x1000, 0   # what ExitMonitor reads at the instruction
        self.vmcs = SimpleNamespace(get=lambda f: (fields or {}).get(int(f), 0))


def test_a_misleading_text_changes_no_decision():
    """A record built by hand whose text says something else: the rule follows the kind
    and the operands.  ``mov rbx, cr3`` with CR3-store exiting: qualification 0x313
    (CR 3, MOV from CR (1 << 4), register RBX (3 << 8), SDM Table 28-3)."""
    d = DecodedInstruction(address=0x1000, length=3, raw=bytes.fromhex("0f20db"),
                           text="out dx, al", kind=K.MOV_FROM_CR, code_size=64,
                           operand_size=32, address_size=64, registers=(Register(3, 64),),
                           control_register=3)
    m = FakeMonitor(proc=int(ProcBased.CR3_STORE_EXITING))
    exit_ = exit_rules.EXIT_RULES[exit_rules.EXIT_REASON_BY_KIND[d.kind]](m, d)
    assert (exit_.reason, exit_.qualification, exit_.instruction_length) == (ExitReason.CR_ACCESS, 0x313, 3)
    assert exit_.instruction == "out dx, al"    # the text is only carried along for display
    assert exit_.decoded_insn is d


def test_replacing_the_text_of_a_real_record_changes_nothing():
    d = decode("in al, 0x60", 16)
    liar = dataclasses.replace(d, text="cpuid")
    m = FakeMonitor(proc=int(ProcBased.UNCOND_IO_EXITING))
    a = exit_rules.rule_io_instruction(m, d)
    b = exit_rules.rule_io_instruction(m, liar)
    assert (a.reason, a.qualification) == (b.reason, b.qualification) == (ExitReason.IO_INSTRUCTION, 0x0060_0048)


def test_the_exit_decision_code_reads_no_text():
    """The rule, operand and hook code mention no mnemonic or operand strings."""
    from vtlab.cpu.nonroot import ExitMonitor
    sources = [inspect.getsource(exit_rules), inspect.getsource(operands)] + [
        inspect.getsource(getattr(ExitMonitor, name))
        for name in ("watch_program", "_on_sensitive", "_on_hlt", "_on_rdtsc")]
    for src in sources:
        assert "op_str" not in src and "mnemonic" not in src
    # (the exit record carries the text for display, taken in one place)
    assert inspect.getsource(exit_rules).count(".text") == 1


def test_the_kind_table_covers_every_exit_rule():
    reasons = set(exit_rules.EXIT_REASON_BY_KIND.values())
    assert reasons == set(exit_rules.EXIT_RULES)
    assert exit_rules.EXIT_REASON_BY_KIND[K.LMSW] is ExitReason.CR_ACCESS
    assert K.SMSW not in exit_rules.EXIT_REASON_BY_KIND         # SMSW never exits ...
    assert exit_rules.rule_for(K.SMSW) is exit_rules.rule_smsw  # ... but reads the shadow
    assert exit_rules.rule_for(K.OTHER) is None
    assert isinstance(MemoryOperand.__slots__, tuple)           # slotted, frozen records
    with pytest.raises(dataclasses.FrozenInstanceError):
        decode("cpuid", 32).kind = K.HLT

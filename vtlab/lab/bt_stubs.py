"""The toy binary translator's emulation side: the virtual CPU block and the stubs.

Every sensitive instruction the translator (:mod:`vtlab.lab.bt_translate`) meets is
replaced by a ``CALL`` to a *stub*: a few instructions of real machine code that do to
the :class:`VCPU` block (the guest's virtual privileged state, in memory) what the
instruction would have done to the real CPU.  :func:`_stub_name` decides which stub an
instruction needs (or refuses it with :class:`TranslationError`); :func:`_shared_stubs`
and :func:`_site_stub` write their assembly.  See :mod:`vtlab.lab.bt` for the whole.
"""
from __future__ import annotations

import re

from ..cpu import asm
from ..errors import VtlabError

#: The virtual CPU block: the guest's view of its privileged state.
VCPU_ADDRESS = 0x5_F000


class VCPU:
    """Offsets of the fields of the virtual CPU block (at :data:`VCPU_ADDRESS`)."""

    IF = 0x00         # u8: virtual EFLAGS.IF
    IOPL = 0x01       # u8: virtual EFLAGS.IOPL
    HALTED = 0x04     # u32: 1 once the guest executed HLT
    GDTR = 0x08       # u16 limit, u32 base (the SGDT image)
    IDTR = 0x10       # u16 limit, u32 base
    LDTR = 0x18       # u16 selector
    TR = 0x1A         # u16 selector
    CS = 0x1C         # u16: the selector the guest believes CS holds (RPL 0)
    SS = 0x1E         # u16
    CR0 = 0x20        # u32 each: CR0, CR2, CR3, CR4
    OUT_COUNT = 0x30  # u32: port writes so far
    OUT_LOG = 0x40    # 64 records of (u16 port, u8 value, u8 size)
    OUT_RECORDS = 64
    SIZE = 0x140
    #: where MOV to/from each control register finds it
    CR = {"cr0": 0x20, "cr2": 0x24, "cr3": 0x28, "cr4": 0x2C}


#: Sensitive instructions the translator rewrites (Capstone mnemonics).
SUPPORTED = ("cli", "sti", "pushfd", "popfd", "sgdt", "sidt", "lgdt", "lidt", "sldt",
             "str", "smsw", "mov (CR/CS/SS)", "push cs/ss", "in", "out", "hlt")

# Sensitive or privileged instructions the toy refuses (besides far transfers).
_REFUSED = {"lar", "lsl", "verr", "verw", "lldt", "ltr", "lmsw", "clts", "invlpg", "wbinvd",
            "invd", "rdmsr", "wrmsr", "rdpmc", "int", "int1", "int3", "into", "iret", "iretd",
            "retf", "lcall", "ljmp", "sysenter", "sysexit", "syscall", "sysret", "pushf",
            "popf", "insb", "insw", "insd", "outsb", "outsw", "outsd", "les", "lds",
            "lfs", "lgs", "lss"}
_SEGS = ("cs", "ds", "es", "fs", "gs", "ss")


class TranslationError(VtlabError):
    """The toy translator met code it does not handle (the message says which and why)."""


# ---------------------------------------------------------------------- decoding
def _is_sensitive_mov(insn: asm.Instruction) -> bool:
    return insn.mnemonic == "mov" and bool(re.search(r"\b(cr\d|dr\d|cs|ds|es|fs|gs|ss)\b", insn.op_str))


def _memory_operand(insn: asm.Instruction) -> str:
    """The ``[...]`` operand of ``insn``, usable inside a stub (ESP moved, so refused)."""
    m = re.search(r"(?:(\w\w):)?(\[[^\]]*\])", insn.op_str)
    if not m:
        raise TranslationError(f"{insn.address:#x}: `{insn.text}`: no memory operand")
    seg, mem = m.group(1), m.group(2)
    if "esp" in mem or seg in ("fs", "gs", "es", "cs"):
        raise TranslationError(
            f"{insn.address:#x}: `{insn.text}`: the toy cannot translate memory operands "
            "based on ESP (the stub's CALL moves it) or with an FS/GS/ES/CS override")
    return mem


def _register_operand(op: str) -> str | None:
    op = op.strip()
    return op if re.fullmatch(r"e?[abcd]x|e?[sd]i|e?bp|[abcd][lh]", op) else None


# --------------------------------------------------------------------- the stubs
def _shared_stubs(v: int) -> dict[str, str]:
    """Stubs without operands, shared by every site of that instruction."""
    return {
        # CLI/STI: a MOV to the virtual IF (MOV leaves the guest's arithmetic flags alone).
        "cli": f"mov byte ptr [{v + VCPU.IF:#x}], 0\nret",
        "sti": f"mov byte ptr [{v + VCPU.IF:#x}], 1\nret",
        # PUSHFD: push the real flags with IF and IOPL replaced by the virtual ones.
        # Stack on entry: [ret]; on return: [vflags] - exactly what PUSHFD leaves.
        "pushfd": f"""
            push eax
            pushfd
            mov eax, dword ptr [esp]
            and eax, 0xffffcdff
            push ebx
            movzx ebx, byte ptr [{v + VCPU.IF:#x}]
            shl ebx, 9
            or eax, ebx
            movzx ebx, byte ptr [{v + VCPU.IOPL:#x}]
            shl ebx, 12
            or eax, ebx
            pop ebx
            xchg eax, dword ptr [esp + 8]
            xchg eax, dword ptr [esp + 4]
            popfd
            ret""",
        # POPFD: IF and IOPL go to the VCPU (the virtual CPL is 0, so both may change);
        # the other flags go to the real EFLAGS.  Entry: [ret][g]; exit: ESP past g.
        "popfd": f"""
            push eax
            mov eax, dword ptr [esp + 8]
            shr eax, 9
            and eax, 1
            mov byte ptr [{v + VCPU.IF:#x}], al
            mov eax, dword ptr [esp + 8]
            shr eax, 12
            and eax, 3
            mov byte ptr [{v + VCPU.IOPL:#x}], al
            mov eax, dword ptr [esp + 4]
            xchg eax, dword ptr [esp + 8]
            push eax
            mov eax, dword ptr [esp + 4]
            popfd
            lea esp, [esp + 8]
            ret""",
        # HLT: the guest is idle; at CPL 3 this HLT raises #GP, which hands control to
        # the VMM (run_translated ends the run there).
        "hlt": f"lea esp, [esp + 4]\nmov dword ptr [{v + VCPU.HALTED:#x}], 1\nhlt",
    }


def _site_stub(insn: asm.Instruction, v: int) -> str:
    """Assembly of the stub for one sensitive instruction with operands."""
    m, ops = insn.mnemonic, insn.op_str
    if m in ("sgdt", "sidt"):
        mem = _memory_operand(insn)
        src = v + (VCPU.GDTR if m == "sgdt" else VCPU.IDTR)
        inner = mem[1:-1]
        return (f"push eax\nmov ax, word ptr [{src:#x}]\nmov word ptr {mem}, ax\n"
                f"mov eax, dword ptr [{src + 2:#x}]\nmov dword ptr [{inner} + 2], eax\n"
                "pop eax\nret")
    if m in ("lgdt", "lidt"):
        mem = _memory_operand(insn)
        dst = v + (VCPU.GDTR if m == "lgdt" else VCPU.IDTR)
        inner = mem[1:-1]
        return (f"push eax\nmov ax, word ptr {mem}\nmov word ptr [{dst:#x}], ax\n"
                f"mov eax, dword ptr [{inner} + 2]\nmov dword ptr [{dst + 2:#x}], eax\n"
                "pop eax\nret")
    if m in ("sldt", "str", "smsw"):
        src = v + {"sldt": VCPU.LDTR, "str": VCPU.TR, "smsw": VCPU.CR0}[m]
        return _store_selector(insn, ops, src)
    if m == "mov":
        dst, _, srcop = (p.strip() for p in ops.partition(","))
        if srcop in VCPU.CR:                          # MOV r32, CRn
            return f"mov {dst}, dword ptr [{v + VCPU.CR[srcop]:#x}]\nret"
        if dst in VCPU.CR:                            # MOV CRn, r32: recorded, not applied
            return f"mov dword ptr [{v + VCPU.CR[dst]:#x}], {srcop}\nret"
        if srcop in ("cs", "ss"):                     # MOV r/m, CS|SS: the guest's RPL-0 view
            return _store_selector(insn, dst, v + (VCPU.CS if srcop == "cs" else VCPU.SS))
    if m == "push" and ops in ("cs", "ss"):
        src = v + (VCPU.CS if ops == "cs" else VCPU.SS)
        if insn.bytes[0] == 0x66:                     # 16-bit push (the assembler's encoding)
            return (f"lea esp, [esp - 2]\npush eax\nmov eax, dword ptr [esp + 6]\n"
                    f"mov dword ptr [esp + 4], eax\nmov ax, word ptr [{src:#x}]\n"
                    f"mov word ptr [esp + 8], ax\npop eax\nret")
        return (f"push eax\nmovzx eax, word ptr [{src:#x}]\nxchg eax, dword ptr [esp + 4]\n"
                "xchg eax, dword ptr [esp]\nret")
    if m == "out":
        port, _, value = (p.strip() for p in ops.partition(","))
        if value != "al":
            raise TranslationError(f"{insn.address:#x}: `{insn.text}`: the toy only translates byte OUT (AL)")
        port_src = "dx" if port == "dx" else f"{int(port, 0):#x}"
        log = v + VCPU.OUT_LOG
        return (f"pushfd\npush ebx\nmov ebx, dword ptr [{v + VCPU.OUT_COUNT:#x}]\n"
                f"and ebx, {VCPU.OUT_RECORDS - 1}\n"
                f"mov word ptr [ebx*4 + {log:#x}], {port_src}\n"
                f"mov byte ptr [ebx*4 + {log + 2:#x}], al\n"
                f"mov byte ptr [ebx*4 + {log + 3:#x}], 1\n"
                f"inc dword ptr [{v + VCPU.OUT_COUNT:#x}]\npop ebx\npopfd\nret")
    if m == "in":
        dst = ops.partition(",")[0].strip()
        if dst != "al":
            raise TranslationError(f"{insn.address:#x}: `{insn.text}`: the toy only translates byte IN (AL)")
        return "mov al, 0xff\nret"   # no device behind the port: a floating bus reads all ones
    raise TranslationError(f"{insn.address:#x}: `{insn.text}` is sensitive and the toy "
                           "translator does not support it")


def _store_selector(insn: asm.Instruction, dst: str, src: int) -> str:
    """SLDT/STR/SMSW/MOV r/m,Sreg: a 16-bit value to a register or to memory."""
    reg = _register_operand(dst)
    if reg and reg.startswith("e"):       # 32-bit register: zero-extended
        return f"movzx {reg}, word ptr [{src:#x}]\nret"
    if reg:
        return f"mov {reg}, word ptr [{src:#x}]\nret"
    mem = _memory_operand(insn)
    return f"push eax\nmov ax, word ptr [{src:#x}]\nmov word ptr {mem}, ax\npop eax\nret"


def _stub_name(insn: asm.Instruction) -> str | None:
    """The stub replacing ``insn`` (None if innocuous); TranslationError if unsupported."""
    m, ops = insn.mnemonic, insn.op_str
    if m in ("cli", "sti", "pushfd", "popfd", "hlt"):
        return m
    if m in ("sgdt", "sidt", "lgdt", "lidt", "sldt", "str", "smsw", "in", "out"):
        return f"{m}@{insn.address:#x}"
    if m == "push" and ops in _SEGS or m == "pop" and ops in _SEGS:
        if m == "push" and ops in ("cs", "ss"):
            return f"push@{insn.address:#x}"
        raise TranslationError(f"{insn.address:#x}: `{insn.text}`: the toy translator "
                               "only handles PUSH CS/SS among segment pushes and pops")
    if _is_sensitive_mov(insn):
        dst, _, src = (p.strip() for p in ops.partition(","))
        if src in VCPU.CR or dst in VCPU.CR or src in ("cs", "ss"):
            return f"mov@{insn.address:#x}"
        raise TranslationError(f"{insn.address:#x}: `{insn.text}`: the toy translator does "
                               "not support this segment/debug register move")
    if m in _REFUSED or (m in ("jmp", "call") and ("ptr" in ops or ":" in ops)):
        raise TranslationError(f"{insn.address:#x}: `{insn.text}` is sensitive or a far "
                               "transfer, which the toy translator does not support")
    return None

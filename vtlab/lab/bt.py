"""A toy binary translator: how VMware ran x86 kernels deprivileged before VT-x.

x86 could not be virtualized by trap and emulate alone (see :mod:`vtlab.rings`): some
sensitive instructions do not trap at CPL 3.  VMware's answer (1999) was to *never run
the guest kernel's code as is*.  Its binary translator decoded the guest's code one
basic block at a time, copied the innocuous instructions unchanged into a
**translation cache** (TC) and replaced each sensitive one with code that works on a
**virtual CPU** kept in memory: CLI clears a *virtual* IF, SGDT stores the *guest's*
GDTR, PUSHF pushes the *virtual* IF and IOPL.  The translated code then runs at CPL 3
at nearly native speed.

This module does the same, in miniature:

* :func:`translate` decodes 32-bit guest code with Capstone, splits it into basic
  blocks (discovered from the entry point by following direct branches, as a real
  translator discovers them), copies every innocuous instruction **byte for byte**
  into the TC, and rewrites every supported sensitive instruction into a
  ``CALL rel32`` to an emulation stub.  Stubs are real machine code, assembled with
  Keystone, that read and write the :data:`VCPU` block.  Because instruction lengths
  change, every direct branch is re-emitted as a ``rel32`` branch to the *translated*
  target (JMP/Jcc/CALL), and fall-through edges get an explicit JMP when the
  successor block is not laid out next.
* :func:`run_translated` runs the translation at CPL 3 under a "VMM" that has moved
  the real GDT and IDT to its own memory, runs the original natively at CPL 0 for
  reference, and compares what each left behind (registers, flags with the virtual
  IF/IOPL, memory, the stack, the virtual CR0/CR3/GDTR/IDTR, port output).  It also
  runs the *untranslated* code at CPL 3 to show what trap-and-emulate alone gets wrong.

What the toy supports (32-bit protected mode, flat segments)
-----------------------------------------------------------
CLI, STI, PUSHFD, POPFD, SGDT/SIDT/LGDT/LIDT m, SLDT/STR/SMSW r/m, MOV r32 <-> CR0/CR2/
CR3/CR4, MOV r, CS/SS, PUSH CS/SS, IN AL / OUT with AL (port imm8 or DX; OUT is
logged in the VCPU, IN reads 0xFF like a floating bus), HLT (ends the run).

Limits, stated honestly
-----------------------
* 32-bit code only; memory operands of translated instructions may not use ESP (the
  stub's CALL moves ESP) nor FS/GS overrides.  16-bit PUSHF/POPF are refused.
* Indirect JMP/CALL (through a register or memory) and far transfers (LCALL, LJMP,
  RETF, IRET, INT n) are refused: a real translator looks the target up in a hash
  table of translated blocks at run time.  RET works, because CALLs are translated
  into CALLs: the guest therefore sees TC addresses as return addresses on its stack
  (a real translator pushes the guest's address and translates RET instead).
* Other sensitive instructions (LAR, LSL, VERR, VERW, LLDT, LTR, LMSW, CLTS, INVLPG,
  RDMSR, WRMSR, segment-register loads ...) are refused with :class:`TranslationError`.
* Translation is eager (all blocks reachable by direct branches, before the run);
  VMware translated lazily, on first execution, and chained blocks as they appeared.
  Self-modifying code and code that reads its own bytes are not handled.
* The VCPU block and the TC live in memory the deprivileged guest could write: VMware
  protected them with segment limits ("segment truncation"); the toy does not.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

import unicorn
from unicorn import x86_const as X

from ..cpu import asm
from ..errors import BudgetExceeded, VtlabError
from ..cpu.guest import Guest, Layout, Mode, Selector
from .rings import VMM_GDT, VMM_GDT_LIMIT, VMM_IDT, VMM_IDT_LIMIT, _initial_gprs
from .rings import assemble as _assemble

__all__ = ["VCPU", "TC_ADDRESS", "GUEST_ADDRESS", "TranslationError", "Site", "Block",
           "Translation", "BTRun", "translate", "run_translated", "SUPPORTED"]

#: Where :func:`run_translated` loads the guest's own code.
GUEST_ADDRESS = 0x2_0000
#: Where the translation cache starts (the stubs follow the translated blocks).
TC_ADDRESS = 0x6_0000
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
_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3}


class TranslationError(VtlabError):
    """The toy translator met code it does not handle (the message says which and why)."""


@dataclass
class Site:
    """One sensitive guest instruction and the stub that replaces it."""

    guest_address: int
    text: str
    stub: str                 # the stub's name, e.g. "cli" or "sgdt@0x20001"
    stub_address: int = 0


@dataclass
class Block:
    """One guest basic block and where its translation sits in the TC."""

    guest_start: int
    guest_end: int            # address after its last instruction
    tc_address: int = 0
    tc_size: int = 0
    instructions: int = 0     # guest instructions in the block
    sites: int = 0            # sensitive instructions among them


@dataclass
class Translation:
    """The result of :func:`translate`: the TC bytes and how they map to the guest."""

    guest_address: int
    guest_code: bytes
    tc_address: int
    code: bytes               # translated blocks, then the stubs
    stub_address: int         # where the stubs start
    blocks: list[Block]
    sites: list[Site]
    entry: int                # TC address of the entry block
    stub_sources: dict[str, str] = field(default_factory=dict)
    #: the HLT inside the HLT stub: its #GP at CPL 3 is how a translated run ends
    halt_address: int | None = None

    def tc_of(self, guest_address: int) -> int:
        """TC address of the block that starts at ``guest_address``."""
        for b in self.blocks:
            if b.guest_start == guest_address:
                return b.tc_address
        raise KeyError(f"no translated block starts at {guest_address:#x}")

    def listing(self) -> str:
        """The guest code beside its translation, block by block, then the stubs."""
        out = []
        guest = {i.address: i for i in asm.disassemble(self.guest_code, self.guest_address, 32)}
        tc = asm.disassemble(self.code, self.tc_address, 32)
        for b in self.blocks:
            out.append(f"; block {b.guest_start:#x}..{b.guest_end:#x} -> TC {b.tc_address:#x} "
                       f"({b.instructions} guest instructions, {b.sites} rewritten)")
            for i in tc:
                if b.tc_address <= i.address < b.tc_address + b.tc_size:
                    out.append("    " + str(i))
            out.append(";   guest: " + " | ".join(guest[a].text for a in sorted(guest)
                                                 if b.guest_start <= a < b.guest_end))
        out.append(f"; stubs at {self.stub_address:#x}")
        for i in tc:
            if i.address >= self.stub_address:
                out.append("    " + str(i))
        return "\n".join(out)


# ---------------------------------------------------------------------- decoding
def _is_sensitive_mov(insn: asm.Instruction) -> bool:
    return insn.mnemonic == "mov" and bool(re.search(r"\b(cr\d|dr\d|cs|ds|es|fs|gs|ss)\b", insn.op_str))


def _branch_kind(insn: asm.Instruction) -> str | None:
    """'jmp', 'jcc', 'call', 'loop', 'ret' or 'hlt' for block terminators, else None."""
    m = insn.mnemonic
    if m in ("ret",):
        return "ret"
    if m == "hlt":
        return "hlt"
    if m in ("loop", "loope", "loopne", "jecxz", "jcxz"):
        return "loop"
    if m == "jmp":
        return "jmp"
    if m == "call":
        return "call"
    if m.startswith("j"):
        return "jcc"
    return None


def _direct_target(insn: asm.Instruction) -> int:
    """The target of a direct relative branch; TranslationError for indirect ones."""
    if re.fullmatch(r"0x[0-9a-f]+|\d+", insn.op_str.strip()):
        return int(insn.op_str, 0)
    raise TranslationError(
        f"{insn.address:#x}: `{insn.text}` is an indirect branch; the toy translator only "
        "follows direct branches (a real one looks the target up at run time)")


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
        if insn.bytes[0] == 0x66:                     # 16-bit push (Keystone's encoding)
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


# ------------------------------------------------------------------- translation
def _rel32(opcode: bytes, at: int, target: int) -> bytes:
    """A branch with a 32-bit displacement: E8 (CALL), E9 (JMP), 0F 8x (Jcc) (SDM Vol. 2)."""
    end = at + len(opcode) + 4
    return opcode + struct.pack("<i", target - end)


def translate(code: bytes, address: int, bits: int = 32, tc_address: int = TC_ADDRESS,
              vcpu_address: int = VCPU_ADDRESS) -> Translation:
    """Translate 32-bit guest ``code`` (placed at ``address``) into a translation cache.

    Returns a :class:`Translation` whose ``code`` is meant to be loaded at
    ``tc_address`` and run at CPL 3 with a :class:`VCPU` block at ``vcpu_address``.
    Raises :class:`TranslationError` for code the toy does not handle (see the module
    docstring).
    """
    if bits != 32:
        raise TranslationError("the toy translator handles 32-bit code only")
    insns = asm.disassemble(code, address, bits)
    if sum(i.size for i in insns) != len(code):
        bad = address + sum(i.size for i in insns)
        raise TranslationError(f"cannot decode the guest code at {bad:#x}")
    by_addr = {i.address: i for i in insns}
    end = address + len(code)

    # 1. Discover basic blocks from the entry, following direct branches (depth first,
    #    fall-through first, so straight-line code stays straight in the TC).
    blocks: dict[int, list[asm.Instruction]] = {}
    succ: dict[int, list[tuple[str, int]]] = {}
    leaders = {address}
    for i in insns:
        kind = _branch_kind(i)
        if kind in ("jmp", "jcc", "call", "loop"):
            t = _direct_target(i)
            if not address <= t < end or t not in by_addr:
                raise TranslationError(f"{i.address:#x}: `{i.text}` leaves the translated "
                                       f"code (target {t:#x})")
            leaders.add(t)
        if kind:
            leaders.add(i.address + i.size)
    order: list[int] = []
    todo = [address]
    while todo:
        start = todo.pop()
        if start in blocks or start >= end:
            continue
        body, a = [], start
        while True:
            i = by_addr[a]
            body.append(i)
            a += i.size
            if _branch_kind(i) or a >= end or a in leaders:
                break
        blocks[start] = body
        order.append(start)
        last = body[-1]
        kind = _branch_kind(last)
        edges = []
        if kind in ("jmp", "jcc", "call", "loop"):
            edges.append(("target", _direct_target(last)))
        if kind in (None, "jcc", "call", "loop") and a < end:
            edges.append(("fall", a))
        elif kind in (None, "jcc", "call", "loop"):
            raise TranslationError(f"{last.address:#x}: execution falls off the end of the "
                                   "guest code; end it with HLT")
        succ[start] = edges
        for _, t in edges:                # [target, fall]: the fall-through is popped first
            todo.append(t)

    # 2. Decide the stubs (validates every instruction before any layout work).
    v = vcpu_address
    shared = _shared_stubs(v)
    sources: dict[str, str] = {}
    sites: list[Site] = []
    for start in order:
        for i in blocks[start]:
            name = _stub_name(i)
            if name is None:
                continue
            sources[name] = shared[name] if name in shared else _site_stub(i, v)
            sites.append(Site(i.address, i.text, name))

    # 3. Lay out the blocks (sizes are known: copies, 5-byte CALLs, rel32 branches).
    def pieces(start: int, next_start: int | None):
        """(kind, payload, size) for each piece of the block's translation."""
        out = []
        body = blocks[start]
        last = body[-1]
        kind = _branch_kind(last)
        for i in body if kind is None else body[:-1]:
            out += _piece(i)
        if kind == "jmp":
            out.append(("jmp", _direct_target(last), 5))
        elif kind == "jcc":
            out.append(("jcc", (last, _direct_target(last)), 6))
        elif kind == "call":
            out.append(("call", _direct_target(last), 5))
        elif kind == "loop":
            out.append(("loop", last, 2 + (1 if last.bytes[0] == 0x67 else 0)))
            out.append(("jmp", last.address + last.size, 5))
            out.append(("jmp", _direct_target(last), 5))
        elif kind in ("ret", "hlt"):
            out += _piece(last)
        fall = dict((k, t) for k, t in succ[start]).get("fall")
        if fall is not None and kind != "loop" and fall != next_start:
            out.append(("jmp", fall, 5))
        return out

    def _piece(i: asm.Instruction):
        name = _stub_name(i)
        if name is not None:
            return [("site", name, 5)]
        return [("copy", i.bytes, i.size)]

    layout: dict[int, list] = {}
    tc_addr: dict[int, int] = {}
    at = tc_address
    for n, start in enumerate(order):
        nxt = order[n + 1] if n + 1 < len(order) else None
        layout[start] = pieces(start, nxt)
        tc_addr[start] = at
        at += sum(p[2] for p in layout[start])
    stub_address = at

    # 4. Assemble the stubs (their size does not depend on where they sit: every
    #    operand is an absolute address or a register).
    stub_at: dict[str, int] = {}
    stub_code = bytearray()
    for name, source in sources.items():
        stub_at[name] = stub_address + len(stub_code)
        stub_code += asm.assemble(source, stub_at[name], 32)
    halt_stub = stub_at.get("hlt")

    # 5. Encode the blocks.
    tc = bytearray()
    block_records = []
    for start in order:
        here = tc_addr[start]
        assert tc_address + len(tc) == here
        for kind, payload, size in layout[start]:
            pos = tc_address + len(tc)
            if kind == "copy":
                tc += payload                                   # byte-identical
            elif kind == "site":
                tc += _rel32(b"\xe8", pos, stub_at[payload])   # CALL stub
            elif kind == "jmp":
                tc += _rel32(b"\xe9", pos, tc_addr[payload])
            elif kind == "call":
                tc += _rel32(b"\xe8", pos, tc_addr[payload])
            elif kind == "jcc":
                insn, target = payload
                raw = insn.bytes.lstrip(bytes(_PREFIXES))
                cc = raw[0] & 0xF if raw[0] in range(0x70, 0x80) else raw[1] & 0xF
                tc += _rel32(bytes([0x0F, 0x80 | cc]), pos, tc_addr[target])
            elif kind == "loop":
                # LOOP/JECXZ only have an 8-bit displacement: branch over the next JMP
                # (to the fall-through) onto a JMP to the translated target.
                tc += payload.bytes[:-1] + bytes([5])
            assert tc_address + len(tc) == pos + size, (kind, payload)
        body = blocks[start]
        block_records.append(Block(start, body[-1].address + body[-1].size, here,
                                   tc_address + len(tc) - here, len(body),
                                   sum(1 for i in body if _stub_name(i) is not None)))
    for s in sites:
        s.stub_address = stub_at[s.stub]
    halt = None
    if halt_stub is not None:   # the HLT is the stub's last byte
        halt = halt_stub + len(asm.assemble(sources["hlt"], 0, 32)) - 1
    return Translation(address, bytes(code), tc_address, bytes(tc + stub_code), stub_address,
                       block_records, sites, tc_addr[address], dict(sources), halt)


# ------------------------------------------------------------------------ running
_ARITH_FLAGS = 0x8D5 | 0x400   # CF PF AF ZF SF OF, DF


@dataclass
class BTRun:
    """What :func:`run_translated` measured.

    Counts: ``guest_instructions`` (the original, run natively), ``tc_instructions``
    (translated-block instructions executed, including the CALLs that replaced
    sensitive instructions and the JMPs the layout added), ``stub_instructions``
    (executed inside emulation stubs), ``sensitive_translated`` (sensitive
    instructions rewritten, static), ``sensitive_executed`` (stub calls, dynamic),
    ``blocks`` (TC blocks).  ``overhead`` = executed instructions translated /
    natively.  ``matches_native`` says whether the translated run left the same
    architectural state as the native run (``differences`` lists what did not);
    ``untranslated`` says what happened when the same code ran at CPL 3 *without*
    translation, and ``untranslated_differences`` what that got wrong.
    """

    guest_instructions: int
    tc_instructions: int
    stub_instructions: int
    sensitive_translated: int
    sensitive_executed: int
    blocks: int
    overhead: float
    matches_native: bool
    differences: list[str]
    native: dict
    translated: dict
    untranslated: str
    untranslated_differences: list[str]
    translation: Translation

    def as_dict(self) -> dict:
        """The counts and verdicts (no nested state), e.g. for a DataFrame row."""
        return {k: getattr(self, k) for k in (
            "guest_instructions", "tc_instructions", "stub_instructions",
            "sensitive_translated", "sensitive_executed", "blocks", "overhead",
            "matches_native", "untranslated")}


def _state(g: Guest, vcpu: int | None, out_log: list) -> dict:
    """The architectural state to compare: real registers, and the guest's view of
    the privileged state (the real one natively, the VCPU's when translated)."""
    s = {r: g.reg(r) for r in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp")}
    flags = g.reg("eflags")
    s["flags"] = flags & _ARITH_FLAGS
    if vcpu is None:
        s["IF"], s["IOPL"] = flags >> 9 & 1, flags >> 12 & 3
        gdtr, idtr = g.uc.reg_read(X.UC_X86_REG_GDTR), g.uc.reg_read(X.UC_X86_REG_IDTR)
        s["GDTR"] = (gdtr[1], gdtr[2])
        s["IDTR"] = (idtr[1], idtr[2])
        for cr in ("cr0", "cr3", "cr4"):
            s[cr.upper()] = g.reg(cr)
        s["output"] = list(out_log)
    else:
        s["IF"], s["IOPL"] = g.read_u8(vcpu + VCPU.IF), g.read_u8(vcpu + VCPU.IOPL)
        lim, base = struct.unpack("<HI", g.read(vcpu + VCPU.GDTR, 6))
        s["GDTR"] = (base, lim)
        lim, base = struct.unpack("<HI", g.read(vcpu + VCPU.IDTR, 6))
        s["IDTR"] = (base, lim)
        for n, cr in enumerate(("CR0", "CR3", "CR4")):
            s[cr] = g.read_u32(vcpu + VCPU.CR0 + (0, 8, 12)[n])
        count = g.read_u32(vcpu + VCPU.OUT_COUNT)
        recs = [struct.unpack("<HBB", g.read(vcpu + VCPU.OUT_LOG + 4 * (k % VCPU.OUT_RECORDS), 4))
                for k in range(max(0, count - VCPU.OUT_RECORDS), count)]
        s["output"] = [(port, value) for port, value, _ in recs]
    s["memory"] = g.read(0, 0x1000)
    # only the live part of the stack: below ESP lie dead values (return addresses the
    # translated CALLs pushed are TC addresses, which a native run never sees)
    esp = s["esp"]
    s["stack"] = g.read(esp, max(0, Layout.USER_STACK - esp)) if esp <= Layout.USER_STACK else b""
    return s


def _differences(a: dict, b: dict) -> list[str]:
    out = []
    for k, va in a.items():
        vb = b.get(k)
        if va == vb:
            continue
        if isinstance(va, (bytes, bytearray)):
            first = next((n for n in range(min(len(va), len(vb))) if va[n] != vb[n]), min(len(va), len(vb)))
            out.append(f"{k} differs from offset {first:#x}: {va[first:first + 8].hex(' ')} vs "
                       f"{vb[first:first + 8].hex(' ')}")
        elif isinstance(va, tuple):
            out.append(f"{k} base {va[0]:#x} limit {va[1]:#x} vs base {vb[0]:#x} limit {vb[1]:#x}")
        elif isinstance(va, int):
            out.append(f"{k} {va:#x} vs {vb:#x}")
        else:
            out.append(f"{k} {va} vs {vb}")
    return out


def _vmm_guest(mode: Mode) -> Guest:
    """A guest whose real GDT and IDT a VMM has moved to its own memory."""
    g = Guest(mode)
    gdt = g.read(Layout.GDT, g.gdt_limit + 1)
    g.write(VMM_GDT, gdt)
    g.uc.reg_write(X.UC_X86_REG_GDTR, (0, VMM_GDT, VMM_GDT_LIMIT, 0))
    g.uc.reg_write(X.UC_X86_REG_IDTR, (0, VMM_IDT, VMM_IDT_LIMIT, 0))
    return g


def run_translated(source: str | bytes, mode: str | Mode = "protected",
                   address: int = GUEST_ADDRESS, max_instructions: int = 100_000) -> BTRun:
    """Translate ``source``, run it deprivileged (CPL 3), and compare with a native run.

    ``source`` is 32-bit guest *kernel* code (assembly text or machine code) that ends
    with HLT.  Three runs, each on a fresh guest, all starting with the same registers,
    stack (``Layout.USER_STACK``) and EFLAGS.IF = 1:

    1. **native**: the code as is, at CPL 0, with its own GDT/IDT;
    2. **translated**: :func:`translate`'s output at CPL 3, the real GDT/IDT moved to the
       VMM's memory, the guest's privileged state in the :class:`VCPU` block;
    3. **untranslated**: the code as is at CPL 3 under the same VMM (plain
       trap-and-emulate with no emulation: the first privileged instruction faults,
       the sensitive unprivileged ones silently show the VMM's state).

    Returns a :class:`BTRun` (counts, comparison, the translation).
    """
    mode = Mode(mode)
    if mode not in (Mode.PROTECTED, Mode.PAGED):
        raise ValueError("the toy translator handles 32-bit code: use 'protected' or 'paged'")
    code = _assemble(source, address, 32) if isinstance(source, str) else bytes(source)
    regs = _initial_gprs(mode)

    # 1. native, CPL 0
    g = Guest(mode)
    native_out: list = []
    g.io_write = lambda port, size, value: native_out.append((port, value))
    g.load(code, address)
    for r, val in regs.items():
        g.set_reg(r, val)
    g.set_reg("esp", Layout.USER_STACK)
    g.set_reg("eflags", 0x202)
    vcpu_init = {
        "gdtr": g.uc.reg_read(X.UC_X86_REG_GDTR), "idtr": g.uc.reg_read(X.UC_X86_REG_IDTR),
        "cr0": g.reg("cr0"), "cr3": g.reg("cr3"), "cr4": g.reg("cr4"),
    }
    try:
        result = g.run(address, max_instructions)
    except BudgetExceeded as exc:
        raise TranslationError(f"the native run did not stop: {exc}") from None
    hlts = {i.address for i in asm.disassemble(code, address, 32) if i.mnemonic == "hlt"}
    if result.reason != "hlt" or result.rip not in hlts:
        raise TranslationError("the native run (CPL 0) did not end at one of the guest's HLTs: "
                               f"{result.exception or f'HLT at {result.rip:#x}'}")
    native = _state(g, None, native_out)
    guest_instructions = result.instructions

    # 2. translated, CPL 3
    t = translate(code, address, 32, TC_ADDRESS, VCPU_ADDRESS)
    g2 = _vmm_guest(mode)
    g2.write(address, code)                        # the guest's own image (data it may read)
    v = VCPU_ADDRESS
    block = bytearray(VCPU.SIZE)
    block[VCPU.IF], block[VCPU.IOPL] = 1, 0
    struct.pack_into("<HI", block, VCPU.GDTR, vcpu_init["gdtr"][2], vcpu_init["gdtr"][1])
    struct.pack_into("<HI", block, VCPU.IDTR, vcpu_init["idtr"][2], vcpu_init["idtr"][1])
    struct.pack_into("<HH", block, VCPU.LDTR, 0, Selector.TSS)
    struct.pack_into("<HH", block, VCPU.CS, Selector.KERNEL_CODE32, Selector.KERNEL_DATA)
    struct.pack_into("<IIII", block, VCPU.CR0, vcpu_init["cr0"], 0, vcpu_init["cr3"], vcpu_init["cr4"])
    g2.write(v, bytes(block))
    for r, val in regs.items():
        g2.set_reg(r, val)
    counts = {"tc": 0, "stub": 0, "calls": 0}
    stub_entries = {s.stub_address for s in t.sites}

    def count(uc, addr, size, _):
        if addr >= t.stub_address:
            counts["stub"] += 1
            if addr in stub_entries:
                counts["calls"] += 1
        else:
            counts["tc"] += 1
    # A code hook bound to the TC's range: a Python call per TC instruction, fine for a
    # toy; nothing else the guest runs (the IRET trampoline) is slowed down.
    g2.uc.hook_add(unicorn.UC_HOOK_CODE, count, None, TC_ADDRESS, TC_ADDRESS + len(t.code) - 1)
    try:
        r2 = g2.run_user(t.code, address=TC_ADDRESS, max_instructions=max_instructions)
    except BudgetExceeded as exc:
        raise TranslationError(f"the translated run did not stop: {exc}") from None
    exc = r2.exception
    if exc is None or exc.rip != t.halt_address:
        raise TranslationError(f"the translated code stopped unexpectedly: {exc or r2.reason}")
    # The HLT stub dropped its return address, so ESP is the guest's again.
    translated = _state(g2, v, [])
    differences = _differences(native, translated)

    # 3. untranslated, CPL 3: trap-and-emulate with nothing emulated
    g3 = _vmm_guest(mode)
    untranslated_out: list = []
    g3.io_write = lambda port, size, value: untranslated_out.append((port, value))
    for r, val in regs.items():
        g3.set_reg(r, val)
    try:
        r3 = g3.run_user(code, address=address, max_instructions=max_instructions)
        e3 = r3.exception
        if e3 is not None and e3.rip in hlts:
            state3 = _state(g3, None, untranslated_out)
            untranslated_diffs = _differences(native, state3)
            untranslated = ("ran to HLT" + (" with wrong results" if untranslated_diffs
                                            else " with the native results"))
        else:
            untranslated = f"trapped: {e3}" if e3 else r3.reason
            untranslated_diffs = [f"stopped by {e3.name if e3 else r3.reason} at "
                                  f"{(e3.rip if e3 else r3.rip):#x} before the guest's HLT"]
    except BudgetExceeded:
        untranslated, untranslated_diffs = "did not stop", ["ran out of budget"]

    executed = counts["tc"] + counts["stub"]
    return BTRun(
        guest_instructions=guest_instructions,
        tc_instructions=counts["tc"],
        stub_instructions=counts["stub"],
        sensitive_translated=len(t.sites),
        sensitive_executed=counts["calls"],
        blocks=len(t.blocks),
        overhead=executed / guest_instructions if guest_instructions else float("nan"),
        matches_native=not differences,
        differences=differences,
        native=native,
        translated=translated,
        untranslated=untranslated,
        untranslated_differences=untranslated_diffs,
        translation=t,
    )

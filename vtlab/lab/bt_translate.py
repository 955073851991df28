"""The toy binary translator's translation: basic blocks into a translation cache.

:func:`translate` discovers the guest's basic blocks from its entry point (following
direct branches), copies innocuous instructions byte for byte, replaces each sensitive
one with a ``CALL`` to its stub (:mod:`vtlab.lab.bt_stubs`), re-emits every direct
branch with a 32-bit displacement to the *translated* target and appends the stubs.
The result is a :class:`Translation`.  See :mod:`vtlab.lab.bt` for the whole.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from ..cpu import asm
from .bt_stubs import VCPU_ADDRESS, TranslationError, _shared_stubs, _site_stub, _stub_name

#: Where the translation cache starts (the stubs follow the translated blocks).
TC_ADDRESS = 0x6_0000
_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3}


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

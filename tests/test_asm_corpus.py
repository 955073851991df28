"""The LLVM assembler makes the course's programs into the same machine code as Keystone.

tests/fixtures/asm_corpus.json holds every program the course assembles - workloads,
ring-lab probes and worlds, binary-translation stubs, notebook guests, test programs -
with the bytes Keystone 0.9.2 made of them (recorded by tools/asm_corpus.py before the
switch, issue #14).  Each is assembled again here.  Where the bytes differ, the two
programs are decoded with Capstone and compared instruction by instruction; every
difference must be one of the kinds listed in :data:`DIFFERENCES`, each explained there.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from vtlab.cpu import asm

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "asm_corpus.json"
PROGRAMS = json.loads(FIXTURE.read_text(encoding="utf-8"))["programs"]
TABLE_OPS = {"lgdt", "lidt", "sgdt", "sidt"}

#: Every kind of difference between Keystone's bytes and LLVM's, and why it is expected.
DIFFERENCES = {
    # Keystone put an operand-size prefix (66H) on LGDT/LIDT/SGDT/SIDT in 32-bit code,
    # which would load or store only 24 bits of the base; vtlab's _fix_keystone turned it
    # into a harmless DS (3EH) or SS (36H) override.  LLVM emits no prefix at all: the
    # same instruction, one byte shorter.
    "table-prefix": "LGDT/LIDT/SGDT/SIDT without Keystone's repaired 66H prefix (3EH/36H)",
    # In 16-bit code Keystone made RETF the 32-bit far return 66 CB; vtlab replaced the
    # 66H by a NOP (90 CB).  vtlab now writes the 16-bit RETF (CB) itself.
    "retf16": "16-bit RETF is CB, without the NOP that replaced Keystone's 66H",
    # Keystone used the moffs64 form (A1/A3 with a 64-bit address, "movabs") for MOV
    # between the accumulator and an absolute address in 64-bit code; vtlab gives LLVM
    # such an address RIP-relative (as Keystone did for every other instruction), so it
    # is MOV r/m with [rip + disp32].  Same address, same effect, 3 bytes shorter.
    "moffs": "MOV accumulator, [address] RIP-relative instead of movabs moffs64",
    # MOV r16, Sreg in 32-bit code: Keystone added 66H (8C /r with a 16-bit register);
    # LLVM leaves it out, which writes the selector zero-extended into the 32-bit
    # register (SDM Vol. 2B MOV: "the upper 16 bits are cleared" on P6 and later).
    # AX holds the selector either way.
    "sreg-store": "MOV r16, Sreg in 32-bit code without the 66H prefix",
    # JMP to an absolute address in 16-bit code: Keystone chose 66 E9 rel32 even when
    # rel16 reaches; LLVM chooses E9 rel16.  Same target.
    "jmp-rel16": "16-bit JMP to an address as E9 rel16 instead of 66 E9 rel32",
    # [bp+di] in 16-bit code: Keystone wrote it with a displacement of 0 (ModRM mod=01,
    # disp8 00); LLVM with none (mod=00), the usual encoding - only [bp] needs a
    # displacement, because mod=00 rm=110 means a bare disp16.  The same operand.
    "zero-disp8": "[bp+di] without the zero disp8 Keystone added",
    # Any instruction that mentions an address inside the program (a branch target, a
    # label's address as an immediate or in memory) changes its bytes when code before
    # that address changed length for one of the reasons above.  It is the same
    # instruction if it points at the same instruction of the program.
    "moved": "an address into the program moved with the code before it",
}

_NUMBER = re.compile(r"(?<![\w.])(-?0x[0-9a-f]+|\d+)(?![\w.])")


class Program:
    """One version (Keystone's or LLVM's) of a corpus program, decoded."""

    def __init__(self, code: bytes, address: int, bits: int):
        self.bits = bits
        self.insns = asm.disassemble(code, address, bits)
        self.index = {i.address: k for k, i in enumerate(self.insns)}
        self.index[address + len(code)] = len(self.insns)  # the end of the program

    def normal(self, k: int) -> str:
        """Instruction ``k`` as text, every address written in the program's own terms.

        RIP-relative operands become the absolute address they name; an address that is
        an instruction start becomes ``@index``; a segment override that changes nothing
        (``ds:`` on a table instruction) is dropped.
        """
        insn = self.insns[k]
        ops = insn.op_str
        rip = re.search(r"\[rip ([+-]) (0x[0-9a-f]+|\d+)\]", ops)
        if rip:
            disp = int(rip.group(2), 0) * (1 if rip.group(1) == "+" else -1)
            target = (insn.address + insn.size + disp) % (1 << 64)
            ops = ops.replace(rip.group(0), f"[{target:#x}]")
        ops = re.sub(r"\b[ds]s:\[", "[", ops) if insn.mnemonic in TABLE_OPS else ops

        def place(m: re.Match) -> str:
            value = int(m.group(1), 0) % (1 << 64)
            return f"@{self.index[value]}" if value in self.index else f"{value:#x}"

        mnemonic = "mov" if insn.mnemonic == "movabs" else insn.mnemonic
        return f"{mnemonic} {_NUMBER.sub(place, ops)}"


def _without_retf_nops(p: Program) -> tuple[list[int], bool]:
    """Indexes of p's instructions, minus each NOP vtlab put before a 16-bit RETF."""
    keep, dropped = [], False
    for k, insn in enumerate(p.insns):
        following = p.insns[k + 1] if k + 1 < len(p.insns) else None
        if (p.bits == 16 and insn.bytes == b"\x90" and following is not None
                and following.bytes[:1] in (b"\xcb", b"\xca")):
            dropped = True
            continue
        keep.append(k)
    return keep, dropped


def _narrow(text: str) -> str:
    """``text`` with 32-bit general registers named by their 16-bit halves (eax -> ax)."""
    return re.sub(r"\be([a-d]x|[sd]i|[sb]p)\b", r"\1", text)


def _kind(old: Program, i: int, new: Program, j: int) -> str | None:
    """Which difference of :data:`DIFFERENCES` instruction pair (i, j) is (None: none)."""
    a, b = old.insns[i], new.insns[j]
    same = old.normal(i) == new.normal(j)
    if a.bytes == b.bytes and same:
        return ""
    if not same and not (a.mnemonic == b.mnemonic == "mov"
                         and _narrow(old.normal(i)) == _narrow(new.normal(j))):
        return None
    if a.mnemonic in TABLE_OPS and old.bits == 32 and a.bytes[:1] in (b"\x3e", b"\x36"):
        return "table-prefix"
    if a.mnemonic == "movabs" and b.mnemonic == "mov" and old.bits == 64:
        return "moffs"
    if old.bits == 32 and a.bytes[:2] == b"\x66\x8c" and b.bytes == a.bytes[1:]:
        return "sreg-store"
    if old.bits == 16 and a.bytes[:2] == b"\x66\xe9" and b.bytes[:1] == b"\xe9":
        return "jmp-rel16"
    if (old.bits == 16 and a.mnemonic == b.mnemonic and a.size == b.size + 1
            and a.bytes[-1:] == b"\x00" and old.normal(i) == new.normal(j)):
        return "zero-disp8"
    if a.mnemonic == b.mnemonic and a.size == b.size:
        return "moved"
    return None


def explain(entry: dict, code: bytes) -> Counter | str:
    """The kinds of difference between the fixture's bytes and ``code``, or why not."""
    old = Program(bytes.fromhex(entry["code"]), entry["address"], entry["bits"])
    new = Program(code, entry["address"], entry["bits"])
    kinds = Counter()
    keep, dropped = _without_retf_nops(old)
    if dropped:
        kinds["retf16"] += 1
    if len(keep) != len(new.insns):
        return f"{len(keep)} instructions became {len(new.insns)}"
    for i, j in zip(keep, range(len(new.insns))):
        kind = _kind(old, i, new, j)
        if kind is None:
            return (f"unexplained: {old.insns[i]}  became  {new.insns[j]}  "
                    f"({old.normal(i)!r} vs {new.normal(j)!r})")
        if kind:
            kinds[kind] += 1
    return kinds


def _label(entry: dict) -> str:
    first = next((line.strip() for line in entry["source"].splitlines() if line.strip()), "")
    return f"{entry['where']} {entry['bits']}-bit {first[:40]!r}"


def test_the_fixture_is_small_and_covers_the_course():
    assert FIXTURE.stat().st_size < 1_000_000
    wheres = Counter(entry["where"].split(":")[0] for entry in PROGRAMS)
    assert wheres["vtlab/lab/guests/*.asm"] == 11       # every workload
    assert wheres["notebook cell"] > 0                   # guests written in the notebooks
    assert wheres["vtlab/lab/rings_worlds.py"] > 0       # the ring lab's probes
    assert wheres["vtlab/lab/bt_translate.py"] > 0       # the binary translator's stubs
    assert {entry["bits"] for entry in PROGRAMS} == {16, 32, 64}


def test_every_program_assembles_to_the_same_bytes_or_an_explained_difference():
    unexplained, used = [], Counter()
    same = 0
    for entry in PROGRAMS:
        try:
            code = asm.assemble(entry["source"], entry["address"], entry["bits"])
        except asm.AssemblyError as exc:
            unexplained.append(f"{_label(entry)}: {exc}")
            continue
        if code.hex() == entry["code"]:
            same += 1
            continue
        kinds = explain(entry, code)
        if isinstance(kinds, str):
            unexplained.append(f"{_label(entry)}: {kinds}")
        else:
            used.update(kinds)
    assert not unexplained, "\n".join(unexplained)
    # Each listed difference really occurs (the list holds no stale excuses) ...
    assert set(used) == set(DIFFERENCES), set(DIFFERENCES) - set(used)
    # ... and most programs come out byte for byte as before.
    assert same > 0.85 * len(PROGRAMS), (same, len(PROGRAMS), used)


@pytest.mark.parametrize("source, bits, code", [
    # The silent miscompile of issue #14: Keystone alone made this 90 F4.
    ("nop\njmp $\nhlt", 16, "90 eb fe f4"),
    ("nop\njmp $\nhlt", 32, "90 eb fe f4"),
    ("nop\njmp $\nhlt", 64, "90 eb fe f4"),
    # The differences above, one of each, as LLVM writes them (SDM Vol. 2 encodings).
    ("lgdt [0x600]", 32, "0f 01 15 00 06 00 00"),        # 0F 01 /2, disp32
    ("retf", 16, "cb"),                                  # CB: far return, 16-bit
    ("retf 4", 16, "ca 04 00"),                          # CA iw
    ("sgdt [0x500]", 64, "0f 01 05 f9 f4 ff ff"),        # RIP-relative, as Keystone
    ("sgdt [-16]", 64, "0f 01 04 25 f0 ff ff ff"),       # SIB: no base, no index, disp32
    ("mov ax, [0x6000]", 64, "66 8b 05 f9 4f 00 00"),     # 8B /r, not A1 moffs64
    ("mov ax, cs", 32, "8c c8"),                         # 8C /r
])
def test_the_differences_one_by_one(source, bits, code):
    assert asm.assemble(source, 0x1000, bits) == bytes.fromhex(code)

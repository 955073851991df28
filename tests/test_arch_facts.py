"""Architectural facts come from ``vtlab.arch``; SDM citations use the pinned edition.

Two source checks over ``vtlab/`` (they read the code, they do not run it):

* **No magic register bits.**  An RFLAGS, CR0, CR4 or IA32_EFER bit written as a number
  (``regs.rflags & (1 << 9)``, ``g.set_reg("eflags", 0x202)``, ``cr4 & 0x20``) next to
  the register it belongs to is a regression: ``vtlab.arch`` names every one of them
  (``Rflags.IF``, ``Rflags.FIXED | Rflags.IF``, ``Cr4.PAE``).  The scan is syntactic
  (``ast``): a binary ``&``/``|``/``^``, a comparison, an assignment, a keyword argument,
  a dict entry or a call whose other side names the register, with an integer literal
  made only of that register's defined bits.  The defined bits are written out here from
  the SDM, not read from vtlab.
* **Citations in the pinned edition's numbering.**  ``vtlab.arch.SDM_EDITION`` is
  325462-084US, whose Vol. 3C VMX chapters are 24-31.  Every "SDM ..." citation must
  name a section that exists there, and a small table of sections that moved between
  editions (with the topic that gives the old number away) must find nothing.

Both tests collect every offender and report them all at once.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VTLAB = ROOT / "vtlab"
#: vtlab.arch defines the facts: its modules are where the numbers belong.
SOURCES = sorted(p for p in VTLAB.rglob("*.py") if "arch" not in p.relative_to(VTLAB).parts[:1])


def _bits(*positions: int) -> int:
    return sum(1 << b for b in positions)


# ---------------------------------------------------------------- register families
#: name pattern (a variable, attribute, VMCS field or Unicorn register naming the
#: register), its architecturally defined bits, and the vtlab.arch enum to use instead.
FAMILIES = {
    # SDM Vol. 1, 3.4.3 "EFLAGS Register": CF 0, bit 1 (always 1), PF 2, AF 4, ZF 6, SF 7,
    # TF 8, IF 9, DF 10, OF 11, IOPL 13:12, NT 14, RF 16, VM 17, AC 18, VIF 19, VIP 20, ID 21.
    "RFLAGS": (re.compile(r"(^|_)(r|e)?flags($|_)|rflags|eflags", re.I),
               _bits(0, 1, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21), "Rflags"),
    # SDM Vol. 3A, 2.5: PE 0, MP 1, EM 2, TS 3, ET 4, NE 5, WP 16, AM 18, NW 29, CD 30, PG 31.
    "CR0": (re.compile(r"(^|_)cr0($|_(?!guest_host_mask|read_shadow))", re.I),
            _bits(0, 1, 2, 3, 4, 5, 16, 18, 29, 30, 31), "Cr0"),
    # SDM Vol. 3A, 2.5: VME 0 ... SMXE 14, FSGSBASE 16, PCIDE 17, OSXSAVE 18 ... PKS 24.
    "CR4": (re.compile(r"(^|_)cr4($|_(?!guest_host_mask|read_shadow))", re.I),
            _bits(*range(0, 15), *range(16, 25)), "Cr4"),
    # SDM Vol. 3A, 2.2.1: SCE 0, LME 8, LMA 10, NXE 11.
    "EFER": (re.compile(r"(^|_)(ia32_)?efer($|_)", re.I), _bits(0, 8, 10, 11), "Efer"),
}

#: Literals next to a register name that are *not* a bit of it.  Keep this short and say
#: why; (path relative to vtlab/, text of the expression as it appears in the source).
ALLOWED = {
    # The hidden part of TR/LDTR as Unicorn returns it: `flags` is descriptor bytes 5-6
    # (type, S, DPL, P, AVL, L, D/B, G), not EFLAGS.
    ("cpu/segments.py", "flags >> 8"),
    # The binary translator's VCPU block: byte offsets of the saved CR0, CR2, CR3, CR4.
    ("lab/bt_stubs.py", "CR0 = 0x20"),
    ("lab/bt_stubs.py", '"cr0": 0x20'),
}

#: The enums themselves: ``Cr4.PAE`` names the fix, not the register.
_ENUMS = {"Rflags", "Cr0", "Cr4", "Efer"}


def _names(node: ast.AST, pattern: re.Pattern) -> bool:
    """Does ``node`` mention the register: a name, attribute or string like it?"""
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id in _ENUMS:
            continue
        text = (n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute)
                else n.value if isinstance(n, ast.Constant) and isinstance(n.value, str) else None)
        if text is not None and pattern.search(text):
            return True
    return False


def _designates(node: ast.AST, pattern: re.Pattern) -> bool:
    """Is ``node`` itself the register (``"eflags"``, ``F.GUEST_RFLAGS``, ``X.UC_X86_REG_EFLAGS``)?"""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return bool(pattern.fullmatch(node.value))
    if isinstance(node, (ast.Name, ast.Attribute)):
        return _names(node, pattern)
    return False


def _literal(node: ast.AST, defined: int) -> ast.AST | None:
    """The integer literal in ``node`` made only of ``defined`` bits, if any: a number,
    ``1 << n``, or those combined with ``|``, ``&``, ``^``, ``~`` (and tuples, ``x if c else y``)."""
    if isinstance(node, ast.Constant):
        v = node.value
        return node if type(v) is int and v and not v & ~defined else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.LShift):
        if all(isinstance(s, ast.Constant) and type(s.value) is int for s in (node.left, node.right)):
            v = node.left.value << node.right.value
            return node if v and not v & ~defined else None
        return None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
        return _literal(node.operand, defined)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd, ast.BitXor)):
        return _literal(node.left, defined) or _literal(node.right, defined)
    if isinstance(node, ast.Tuple):
        return next((x for x in (_literal(e, defined) for e in node.elts) if x is not None), None)
    if isinstance(node, ast.IfExp):
        return _literal(node.body, defined) or _literal(node.orelse, defined)
    return None


def _pairs(node: ast.AST, pattern: re.Pattern) -> list[tuple[ast.AST, ast.AST]]:
    """(side that may name the register, side that may hold the literal) of ``node``."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
        return [(node.left, node.right), (node.right, node.left)]
    if isinstance(node, ast.AugAssign) and isinstance(node.op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
        return [(node.target, node.value)]
    if isinstance(node, ast.Assign):
        return [(t, node.value) for t in node.targets]
    if isinstance(node, ast.AnnAssign) and node.value is not None:
        return [(node.target, node.value)]
    if isinstance(node, ast.Compare):
        return [(node.left, c) for c in node.comparators] + [(c, node.left) for c in node.comparators]
    if isinstance(node, ast.Dict):
        return [(k, v) for k, v in zip(node.keys, node.values) if k is not None]
    if isinstance(node, ast.Call):
        # set_reg("eflags", 0x202), reg_write(UC_X86_REG_EFLAGS, 0x2), set_bits(F.GUEST_RFLAGS, 1 << 9)
        args = [(node.args[0], a) for a in node.args[1:]
                if _designates(node.args[0], pattern)] if node.args else []
        return args + [(ast.Name(k.arg), k.value) for k in node.keywords if k.arg]
    return []


def _field_extractions(node: ast.AST, pattern: re.Pattern, defined: int) -> bool:
    """``rflags >> 9 & 1``, ``(eflags >> 12) & 3``: a shift of the register by a bit number."""
    return (isinstance(node, ast.BinOp) and isinstance(node.op, ast.RShift)
            and isinstance(node.right, ast.Constant) and type(node.right.value) is int
            and 0 < node.right.value < 64 and defined >> node.right.value & 1
            and _names(node.left, pattern) and not _names(node.left, re.compile(r"^[A-Z][a-z]\w*$")))


def magic_register_bits(paths=SOURCES) -> list[str]:
    """Every ``file:line: REGISTER ... -> use Enum`` offender in ``paths``."""
    found: dict[tuple[str, int], str] = {}   # one report per line: the outermost expression
    for path in paths:
        source = path.read_text()
        rel = path.relative_to(VTLAB).as_posix()
        for node in ast.walk(ast.parse(source)):
            for register, (pattern, defined, enum_name) in FAMILIES.items():
                hit = _field_extractions(node, pattern, defined) or any(
                    _names(a, pattern) and _literal(b, defined) is not None for a, b in _pairs(node, pattern))
                if not hit:
                    continue
                text = ast.get_source_segment(source, node) or ""
                if any(rel == p and t in text for p, t in ALLOWED):
                    continue
                first = " ".join(text.split())[:90]
                found.setdefault((rel, node.lineno), f"vtlab/{rel}:{node.lineno}: {register} bits as a number"
                                 f" in `{first}` -> use vtlab.arch.{enum_name}")
                break
    return [found[k] for k in sorted(found)]


def test_no_magic_register_bits():
    """RFLAGS/CR0/CR4/EFER bits next to their register are vtlab.arch members, not numbers."""
    offenders = magic_register_bits()
    assert not offenders, ("architectural bits written as numbers (use vtlab.arch):\n"
                           + "\n".join(offenders))


def test_magic_register_bits_scanner_catches_the_patterns(tmp_path):
    """The scanner itself: each of these lines is a regression it must report."""
    bad = tmp_path / "bad.py"
    bad.write_text("\n".join([
        "a = regs.rflags & (1 << 10)",
        "b = eflags | 0x200",
        'g.set_reg("eflags", 0x202)',
        "uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)",
        "c = vm.vmread(F.GUEST_RFLAGS) & (1 << 9)",
        "d = (flags >> 12) & 3",
        "RFLAGS_VM = 1 << 17",
        "e = new_flags & ~((1 << 8) | (1 << 14))",
        'f = g.reg("cr4") & 0x20',
        "h = cr0 & 1",
        "EFER_RESERVED = ~0xD01 & 0xFFFF_FFFF_FFFF_FFFF",
    ]) + "\n")
    good = tmp_path / "good.py"
    good.write_text("\n".join([
        "a = regs.rflags & Rflags.DF",
        "b = flags & 0xFFFF",                      # bit 3, 5, 15 are not flags: a 16-bit mask
        "c = get(F.GUEST_RFLAGS) >> 22",           # reserved bits 63:22
        "d = info >> 8 & 7",                       # not a register
        "_RFLAGS_IF = int(Rflags.IF)",
        "e = self._push(flags & 0xFFFF, 2)",       # the 2 is a size, not a bit of `flags`
    ]) + "\n")
    global VTLAB
    saved, VTLAB = VTLAB, tmp_path
    try:
        reported = magic_register_bits([bad, good])
    finally:
        VTLAB = saved
    assert [int(r.split(":")[1]) for r in reported] == list(range(1, 12)), "\n".join(reported)


# ------------------------------------------------------------------ SDM citations
#: Sections per VMX chapter of Vol. 3C in 325462-084US (first-level sections: chapter 24
#: "Introduction to Virtual Machine Extensions" ends with 24.8 "Restrictions on VMX
#: Operation", chapter 25 with 25.11 "Software Use of the VMCS and Related Structures",
#: chapter 31 with 31.4 "VM Instruction Error Numbers" ...).  Generous where the edition
#: adds sections vtlab does not cite.
VMX_SECTIONS = {24: 8, 25: 11, 26: 7, 27: 9, 28: 8, 29: 5, 30: 7, 31: 4}

#: Sections that moved between editions, with the topic that shows a citation still uses
#: the old number: (old section, topic pattern on the same sentence, the 084 section).
MOVED = [
    ("24.11.5", r"VMXON", "25.11.5 (VMXON region)"),
    ("24.5", r"host", "25.5 (host-state area)"),
    ("24.4", r"guest.state", "25.4 (guest-state area)"),
    ("24.6", r"control|bitmap|mask", "25.6 (VM-execution control fields)"),
    ("24.9", r"exit.information|exit reason|qualification", "25.9 (VM-exit information fields)"),
    ("25.3", r"#GP|fixed.bit", "26.3 (changes to instruction behaviour in non-root operation)"),
    ("25.1", r"causes? (a )?VM exits?|exits? (un)?conditionally", "26.1 (instructions that cause VM exits)"),
    ("26.1", r"pointer|VMfailInvalid|basic", "27.1 (basic VM-entry checks)"),
    ("26.2", r"VMfail|entry checks?|checks on (the )?(VMX controls|host)", "27.2 (checks on VMX controls and host state)"),
    ("26.3", r"guest state|load", "27.3 (checking and loading guest state)"),
    ("27.2.2", r"interruption|vectored|valid bit", "28.2.2 (VM exits due to vectored events)"),
    ("27.3", r"sav", "28.3 (saving guest state)"),
    ("28.2", r"EPT (mechanism|paging.structure|translation)|extended page.table", "29.3 (EPT)"),
    ("30.3", r"VMX instruction|VMXON|VMREAD|VMWRITE|VMLAUNCH", "31.3 (VMX instructions)"),
    ("9.8.5", r"IA-32e|LME|long mode|compatibility", "Vol. 3A 10.8.5 (initializing IA-32e mode)"),
    ("20.1.4", r"real", "Vol. 3B 21.1.4 (8086 emulation: interrupt handling in real mode)"),
]

_SECTION = r"\d{1,2}\.\d{1,2}(?:\.\d{1,2}){0,3}"
#: "SDM 27.2.1", "SDM Vol. 3C 25.4.1", "SDM Vol. 3A, 6.15", then ", 27.8" / " / 27.8" /
#: " and 28.3" / "-27.3" continuations.
_VOLUME = r"[1-4][A-D]?(?:\s*/\s*[1-4][A-D]?)?"
_CITATION = re.compile(
    rf"(?:SDM(?:\s+Vol\.\s*(?P<vol>{_VOLUME}),?)?|Vol\.\s*(?P<vol2>{_VOLUME}),?)\s+(?P<list>{_SECTION}"
    rf"(?:\s*(?:,|/|-|and|to)\s*{_SECTION})*)")


def _source_texts():
    """vtlab's sources and the course notebooks (the jupytext twins of course/source/)."""
    for path in [*sorted(VTLAB.rglob("*.py")), *sorted((ROOT / "course" / "source").glob("*/*.py"))]:
        yield path.relative_to(ROOT).as_posix(), path.read_text()


def sdm_citations():
    """(where, volume or None, section, the sentence around it) of every "SDM NN.N" citation."""
    for where, text in _source_texts():
        for m in _CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            # The topic of a citation: its own line and the line before it.
            start = text.rfind("\n", 0, text.rfind("\n", 0, m.start()))
            end = text.find("\n", m.end())
            sentence = " ".join(text[start + 1:end if end != -1 else len(text)].split())
            for section in re.findall(_SECTION, m.group("list")):
                vol = m.group("vol") or m.group("vol2")
                yield f"{where}:{line}", vol and re.sub(r"\s+", "", vol), section, sentence


def test_sdm_citations_exist_in_the_pinned_edition():
    """Each "SDM [Vol. 3C] NN.N" names a VMX section that exists in 325462-084US; VMX
    topics never cite chapter 23 (or 20-22) the way editions before the renumbering did."""
    bad = []
    for where, vol, section, sentence in sdm_citations():
        chapter, first = (int(x) for x in section.split(".")[:2])
        vmx = vol in (None, "3C", "3D") and chapter >= 20
        if vol is not None and re.fullmatch(r"3[AB]?", vol) and chapter > 23:
            bad.append(f"{where}: SDM Vol. {vol} {section}: Vol. 3A/3B end with chapter 23 in this edition")
        elif vmx and chapter not in VMX_SECTIONS:
            bad.append(f"{where}: SDM {section}: Vol. 3C VMX chapters are 24-31 in this edition")
        elif vmx and not 1 <= first <= VMX_SECTIONS[chapter]:
            bad.append(f"{where}: SDM {section}: chapter {chapter} has sections "
                       f"{chapter}.1-{chapter}.{VMX_SECTIONS[chapter]}")
    assert not bad, "SDM citations outside 325462-084US's numbering:\n" + "\n".join(sorted(set(bad)))


def test_no_citation_uses_a_moved_section_number():
    """Known renumbered sections, recognised by their topic, are cited by the new number."""
    bad = []
    for where, vol, section, sentence in sdm_citations():
        for old, topic, new in MOVED:
            if section == old and re.search(topic, sentence, re.I):
                bad.append(f"{where}: SDM {section} ({topic!r} nearby) is the old number: now {new}")
    assert not bad, "stale SDM section numbers:\n" + "\n".join(sorted(set(bad)))


def test_citation_scanner_finds_citations():
    """The citation scanner sees the kinds of citation vtlab writes (so an empty result
    above means something)."""
    found = {(vol, section) for _, vol, section, _ in sdm_citations()}
    assert (None, "27.3.1.2") in found            # the entry-check registry
    assert ("3C", "26.1") in found                # "SDM Vol. 3C 26.1"
    assert any(s.startswith("28.") for _, s in found)


@pytest.mark.parametrize("chapter, title", [
    (24, "Introduction to Virtual Machine Extensions"),
    (25, "Virtual Machine Control Structures"),
    (27, "VM Entries"),
    (28, "VM Exits"),
    (31, "VMX Instruction Reference"),
])
def test_pinned_edition_and_its_vmx_chapters(chapter, title):
    """SDM_EDITION names the edition by order number (with its revision, 084), once."""
    import vtlab.arch as arch

    assert arch.SDM_ORDER_NUMBER == "325462-084US"
    assert arch.SDM_ORDER_NUMBER in arch.SDM_EDITION
    assert arch.SDM_VMX_CHAPTERS[chapter] == title


def test_complement_of_a_register_bit_is_the_int_one():
    """``x & ~Flag.BIT`` clears that bit and nothing else, for every bit-field enum
    (Python 3.11's IntFlag complement would keep only the bits the enum defines and so
    clear RFLAGS bits 63:22, a control's reserved bits ...)."""
    from vtlab.arch.bits import RegisterBits
    from vtlab.arch.controls import EntryControl, ExitControl, PinBased, ProcBased, ProcBased2
    from vtlab.arch.msrs import Cr0, Cr4, Efer, FeatureControl, Rflags
    from vtlab.arch.segments import AccessRights, CodeDataType

    everything = (1 << 64) - 1
    for cls in (PinBased, ProcBased, ProcBased2, ExitControl, EntryControl, FeatureControl,
                Efer, Cr0, Cr4, Rflags, AccessRights, CodeDataType):
        assert issubclass(cls, RegisterBits), cls
        for member in cls:
            assert everything & ~member == everything ^ int(member), (cls, member)
    assert (1 << 63 | 0x202) & ~Rflags.IF == 1 << 63 | 0x2
    assert 0xFFFF_FFFF & ~PinBased.NMI_EXITING == 0xFFFF_FFF7   # SDM Table 25-5: NMI exiting is bit 3

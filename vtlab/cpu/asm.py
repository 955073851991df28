"""Assemble guest source with Keystone and disassemble machine code with Capstone.

The source dialect is Intel syntax as Keystone reads it, with a few NASM habits that
learners bring along translated first:

* ``;`` starts a comment (Keystone would read it as a statement separator),
* ``db``/``dw``/``dd``/``dq`` data with numbers and quoted strings,
* ``times N <statement>`` repeats a statement,
* ``bits 16|32|64`` / ``[bits N]`` and ``org ADDR`` lines are honoured.

Errors name the offending source line (:class:`vtlab.errors.AssemblyError`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import capstone
import keystone

from ..errors import AssemblyError

_KS_MODE = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32, 64: keystone.KS_MODE_64}
_CS_MODE = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_DATA = {"db": ".byte", "dw": ".short", "dd": ".long", "dq": ".quad"}
_LABEL = re.compile(r"^\s*([A-Za-z_.$@?][\w.$@?]*)\s*:")
_SIZE_NO_PTR = re.compile(r"\b(byte|word|dword|qword)\s+\[", re.I)
_STRING = re.compile(r"'([^']*)'|\"([^\"]*)\"")


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction: where it is, how long it is and what it says."""

    address: int
    size: int
    mnemonic: str
    op_str: str
    bytes: bytes

    @property
    def text(self) -> str:
        """Intel-syntax text, e.g. ``out dx, al``."""
        return f"{self.mnemonic} {self.op_str}".strip()

    def __str__(self) -> str:
        return f"{self.address:#06x}: {self.bytes.hex(' '):<24} {self.text}"


@lru_cache(maxsize=None)
def _ks(bits: int) -> keystone.Ks:
    return keystone.Ks(keystone.KS_ARCH_X86, _KS_MODE[bits])


@lru_cache(maxsize=None)
def _cs(bits: int) -> capstone.Cs:
    cs = capstone.Cs(capstone.CS_ARCH_X86, _CS_MODE[bits])
    cs.detail = False
    return cs


def strip_comment(line: str) -> str:
    """``line`` without its ``;`` comment (a ``;`` inside quotes is kept).

    >>> strip_comment("mov al, ';'   ; the character itself")
    "mov al, ';'   "
    """
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            return line[:i]
    return line


#: The name :func:`strip_comment` had before it was public.
_strip_comment = strip_comment


def _data_operands(operands: str) -> str:
    """``'hi', 0`` -> ``104, 105, 0`` so that Keystone's .byte accepts strings."""
    def expand(m: re.Match) -> str:
        text = m.group(1) if m.group(1) is not None else m.group(2)
        return ", ".join(str(b) for b in text.encode("latin-1")) or "0"
    return _STRING.sub(expand, operands)


def _translate(line: str) -> tuple[str, int | None, int | None]:
    """Translate one NASM-flavoured line; returns (keystone text, bits, org)."""
    code = _strip_comment(line).strip()
    low = code.lower().strip("[]").strip()
    m = re.fullmatch(r"bits\s+(16|32|64)", low)
    if m:
        return "", int(m.group(1)), None
    m = re.fullmatch(r"org\s+(\S+)", low)
    if m:
        return "", None, int(m.group(1), 0)
    label = ""
    m = _LABEL.match(code)
    if m:
        label, code = code[: m.end()], code[m.end():].strip()
    m = re.fullmatch(r"times\s+(\S+)\s+(.*)", code, flags=re.I)
    if m:
        inner, _, _ = _translate(m.group(2))
        return label + "\n".join([inner] * int(m.group(1), 0)), None, None
    head, _, rest = code.partition(" ")
    if head.lower() in _DATA:
        code = f"{_DATA[head.lower()]} {_data_operands(rest.strip())}"
    else:
        code = _SIZE_NO_PTR.sub(lambda m: f"{m.group(1)} ptr [", code)  # NASM "word [x]"
    return label + " " + code if label else code, None, None


def _preprocess(source: str, bits: int, address: int) -> tuple[list[str], int, int]:
    lines, org = [], address
    for line in source.splitlines():
        text, new_bits, new_org = _translate(line)
        bits = new_bits or bits
        org = address if new_org is None else new_org
        lines.append(text)
    return lines, bits, org


def _find_bad_line(lines: list[str], source_lines: list[str], bits: int, address: int):
    """Assemble each line alone (with every label defined) to find the one Keystone rejects."""
    labels = {m.group(1) for ln in lines if (m := _LABEL.match(ln))}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        own = {m.group(1)} if (m := _LABEL.match(text)) else set()
        probe = text + "\n" + "\n".join(f"{lab}:" for lab in sorted(labels - own))
        try:
            encoding, _ = _ks(bits).asm(probe, address)
        except keystone.KsError as exc:
            return number, source_lines[number - 1], str(exc)
        if encoding is None and not _LABEL.fullmatch(text.strip() + " "):
            if text.strip() and not text.strip().endswith(":"):
                return number, source_lines[number - 1], "Keystone produced no code for this line"
    return None, None, None


def assemble(source: str, address: int = 0, bits: int = 16) -> bytes:
    """Assemble ``source`` (Intel syntax) for code that will sit at ``address``.

    ``bits`` is the code size: 16 (real mode), 32 (protected mode) or 64 (long mode); a
    ``bits N`` line in the source overrides it.  Raises :class:`AssemblyError` naming
    the first line Keystone cannot assemble.
    """
    if bits not in _KS_MODE:
        raise ValueError(f"bits must be 16, 32 or 64, not {bits!r}")
    source_lines = source.splitlines()
    lines, bits, address = _preprocess(source, bits, address)
    try:
        encoding, _ = _ks(bits).asm("\n".join(lines), address)
        error = None if encoding is not None else "Keystone produced no code"
    except keystone.KsError as exc:
        encoding, error = None, str(exc)
    if error is None:
        return _fix_keystone(bytes(encoding), address, bits)
    number, text, reason = _find_bad_line(lines, source_lines, bits, address)
    if number is None and error == "Keystone produced no code" and not any(l.strip() for l in lines):
        return b""
    raise AssemblyError(reason or error, number, text)


# Keystone (0.9.2) emits an operand-size prefix (66H) where none belongs: on LGDT, LIDT,
# SGDT and SIDT in 32-bit code (which then load/store only 24 bits of the base) and on
# RETF in 16-bit code (which then pops 32-bit values).  The prefix is swapped for one
# that changes nothing (DS, or SS for a stack-based operand, or a NOP before RETF), so
# every length - and every label - stays as Keystone computed it.
_DT_OPS = {"lgdt", "lidt", "sgdt", "sidt"}


def _fix_keystone(code: bytes, address: int, bits: int) -> bytes:
    if bits == 64 or b"\x66" not in code:
        return code
    out = bytearray(code)
    for insn in disassemble(code, address, bits):
        raw = insn.bytes
        if raw[:1] != b"\x66":
            continue
        off = insn.address - address
        if bits == 32 and insn.mnemonic in _DT_OPS:
            stack = any(r in insn.op_str for r in ("esp", "ebp"))
            out[off] = 0x36 if stack else 0x3E
        elif bits == 16 and raw[1:2] == b"\xcb" and len(raw) == 2:
            out[off] = 0x90
    return bytes(out)


def disassemble(code: bytes, address: int = 0, bits: int = 16, count: int = 0) -> list[Instruction]:
    """Decode ``code`` (placed at ``address``) into :class:`Instruction` records."""
    return [
        Instruction(i.address, i.size, i.mnemonic, i.op_str, bytes(i.bytes))
        for i in _cs(bits).disasm(bytes(code), address, count)
    ]


def decode_one(code: bytes, address: int, bits: int) -> Instruction | None:
    """Decode the single instruction at the start of ``code`` (None if undecodable)."""
    found = disassemble(code[:16], address, bits, count=1)
    return found[0] if found else None

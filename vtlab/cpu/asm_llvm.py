"""LLVM's x86 assembler, from the ``ziglang`` wheel, turned into "text in, bytes out".

:mod:`vtlab.cpu.asm` checks a learner's program line by line and translates NASM habits
into the GNU-style Intel syntax LLVM reads; this module does the rest:

1. :func:`assemble_object` hands the text to LLVM's integrated assembler and gets back
   an ELF relocatable object (or the first error, with the line it names);
2. :func:`read_object` reads that object: the ``.text`` bytes, their relocations and
   the symbol table (which tells where every label ended up);
3. :func:`link` applies the relocations for the address the program will be loaded at,
   which gives the flat machine code a guest runs.

**Why LLVM through zig.**  The ``ziglang`` package ships the zig toolchain, which has
clang (and so LLVM's assembler) built in, as wheels for Linux x86-64/aarch64, macOS
arm64/x86-64 and Windows x86-64.  Keystone, the assembler vtlab used before (issue #14),
was an old fork of the same LLVM code without wheels for Macs or ARM Linux.

**Why ``zig -cc1as`` and a linker written in Python.**  Measured on the development
machine (Linux x86-64; best and median of repeated runs, quiet machine): ``zig -cc1as``
(clang's assembler front end, which the ``zig cc`` driver itself runs in-process) reads
the text on stdin and writes the object on stdout in 4 ms (median 6 ms; 13/20 ms on a
busy machine), with no files and no zig cache; ``zig cc -c`` with files costs 19 ms
(26 ms), ``python -m ziglang cc`` 24 ms (65 ms: a second Python start plus the driver).  Turning the object into a flat binary
with ``zig objcopy`` takes 10 s on first use (zig compiles it), and ``zig ld.lld``
would add a process, a linker script and temporary files, for what is here about 60
lines of Python: vtlab's programs have one section and a handful of relocation kinds.

Relocations (System V x86-64 psABI, Table 4.10; S = symbol address, A = addend, P =
address of the field): ``R_X86_64_8/16/32/32S/64`` store S + A, the PC-relative
``R_X86_64_PC8/PC16/PC32/PC64`` store S + A - P.  Anything else is an error: vtlab never
asks for it.
"""
from __future__ import annotations

import importlib.util
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

#: The triple LLVM assembles for; ``.code16``/``.code32`` in the text switch the mode.
TRIPLE = "x86_64-unknown-unknown-elf"


class LlvmError(Exception):
    """LLVM (or the linking here) refused the program.

    ``line`` is the 1-based line of the text given to :func:`assemble_object` (None when
    unknown), ``offset`` the byte offset in ``.text`` a relocation problem is at.
    """

    def __init__(self, message: str, line: int | None = None, offset: int | None = None):
        super().__init__(message)
        self.message, self.line, self.offset = message, line, offset


# ------------------------------------------------------------------ running LLVM
@cache
def zig_command() -> tuple[str, ...]:
    """How to start zig: its binary inside the ziglang package (or ``python -m ziglang``)."""
    spec = importlib.util.find_spec("ziglang")
    if spec is None or not spec.submodule_search_locations:
        raise LlvmError("the x86 assembler is missing: install the ziglang package "
                        "(pip install ziglang)")
    folder = Path(list(spec.submodule_search_locations)[0])
    for name in ("zig", "zig.exe"):
        if (folder / name).is_file():
            return (str(folder / name),)
    return (sys.executable, "-m", "ziglang")  # slower: one more Python start


@cache
def zig_version() -> str:
    """The zig (and so LLVM) version, part of every on-disk cache key."""
    try:
        from importlib.metadata import version
        return f"ziglang {version('ziglang')}"
    except Exception:  # noqa: BLE001 - metadata missing: ask zig itself
        out = subprocess.run([*zig_command(), "version"], capture_output=True, text=True)
        return f"zig {out.stdout.strip()}"


def _zig_env() -> dict[str, str]:
    """The environment for zig: its caches outside the repository (it needs none here)."""
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vtlab" / "zig"
    env = dict(os.environ)
    env.setdefault("ZIG_GLOBAL_CACHE_DIR", str(cache_dir))
    env.setdefault("ZIG_LOCAL_CACHE_DIR", str(cache_dir))
    return env


_DIAGNOSTIC = re.compile(r"^[^\n]*?:(\d+):(?:\d+:)? error: (.*)$", re.MULTILINE)


def assemble_object(text: str) -> bytes:
    """The ELF object LLVM makes of ``text`` (GNU Intel syntax, ASCII).

    Raises :class:`LlvmError` with LLVM's first error message and the line it names.
    """
    command = [*zig_command(), "-cc1as", "-triple", TRIPLE, "-filetype", "obj",
               "-o", "-", "-"]
    try:
        done = subprocess.run(command, input=text.encode("ascii"), capture_output=True,
                              env=_zig_env(), timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise LlvmError(f"the assembler (zig) could not be run: {exc}") from None
    if done.returncode == 0 and done.stdout[:4] == b"\x7fELF":
        return done.stdout
    stderr = done.stderr.decode("utf-8", "replace")
    m = _DIAGNOSTIC.search(stderr)
    if m:
        raise LlvmError(m.group(2).strip(), int(m.group(1)) or None)  # 0: no line known
    raise LlvmError(f"the assembler (zig) failed: {stderr.strip() or done.returncode}")


# ------------------------------------------------------------ reading the object
SHN_UNDEF, SHN_ABS = 0, 0xFFF1
_SECTION = struct.Struct("<IIQQQQIIQQ")   # Elf64_Shdr
_SYMBOL = struct.Struct("<IBBHQQ")        # Elf64_Sym
_RELA = struct.Struct("<QQq")             # Elf64_Rela
SHT_SYMTAB, SHT_RELA, SHF_ALLOC = 2, 4, 0x2


@dataclass(frozen=True)
class Symbol:
    """A symbol of the object: a label (``section`` = .text), a constant (SHN_ABS) ..."""

    name: str
    value: int
    section: int


@dataclass(frozen=True)
class Relocation:
    """A field of ``.text`` that needs the load address: where, what kind, of what."""

    offset: int
    kind: int
    symbol: Symbol
    addend: int


@dataclass(frozen=True)
class ObjectFile:
    """The parts of the ELF object vtlab needs."""

    code: bytes
    text_index: int            # section number of .text
    symbols: tuple[Symbol, ...]
    relocations: tuple[Relocation, ...]

    def labels(self) -> dict[str, int]:
        """Named symbols defined in .text: name -> offset from the program's start."""
        return {s.name: s.value for s in self.symbols if s.section == self.text_index and s.name}


def _cstring(table: bytes, start: int) -> str:
    return table[start:table.index(b"\0", start)].decode("ascii", "replace")


def read_object(obj: bytes) -> ObjectFile:
    """Read an ELF64 little-endian relocatable object made by :func:`assemble_object`."""
    if obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] != 1:
        raise LlvmError("the assembler did not produce a 64-bit little-endian ELF object")
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shnum, shstrndx = struct.unpack_from("<HH", obj, 0x3C)
    sections = [_SECTION.unpack_from(obj, shoff + i * _SECTION.size) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    names = [_cstring(obj, names_at + s[0]) for s in sections]

    def body(i: int) -> bytes:
        return obj[sections[i][4]:sections[i][4] + sections[i][5]]

    text_index = names.index(".text")
    for i, (name, s) in enumerate(zip(names, sections)):
        if s[2] & SHF_ALLOC and i != text_index and s[5]:
            raise LlvmError(f"the program put bytes into the section {name}: vtlab "
                            "programs have one section of code and data")
    symtab = next(i for i, s in enumerate(sections) if s[1] == SHT_SYMTAB)
    strings = body(sections[symtab][6])
    raw = body(symtab)
    symbols = []
    for k in range(0, len(raw), _SYMBOL.size):
        st_name, _, _, shndx, value, _ = _SYMBOL.unpack_from(raw, k)
        symbols.append(Symbol(_cstring(strings, st_name), value, shndx))
    relocations = []
    for i, s in enumerate(sections):
        if s[1] != SHT_RELA:
            continue
        if s[7] != text_index:
            raise LlvmError(f"relocations for the section {names[s[7]]}: vtlab programs "
                            "have one section")
        rela = body(i)
        for k in range(0, len(rela), _RELA.size):
            offset, info, addend = _RELA.unpack_from(rela, k)
            relocations.append(Relocation(offset, info & 0xFFFFFFFF, symbols[info >> 32], addend))
    return ObjectFile(body(text_index), text_index, tuple(symbols), tuple(relocations))


# ------------------------------------------------------------------ linking
#: Relocation kinds (psABI Table 4.10): name, field width in bytes, PC-relative?
RELOCATIONS = {1: ("R_X86_64_64", 8, False), 2: ("R_X86_64_PC32", 4, True),
               10: ("R_X86_64_32", 4, False), 11: ("R_X86_64_32S", 4, False),
               12: ("R_X86_64_16", 2, False), 13: ("R_X86_64_PC16", 2, True),
               14: ("R_X86_64_8", 1, False), 15: ("R_X86_64_PC8", 1, True),
               24: ("R_X86_64_PC64", 8, True)}


def _signed64(value: int) -> int:
    """``value`` reduced to a signed 64-bit number (addresses wrap at 2**64)."""
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


def _fits(value: int, width: int, kind: int, bits: int) -> int | None:
    """The field's bits for ``value``, or None when the value does not fit the field.

    An absolute field takes a value that fits signed or unsigned (``dw -1`` and
    ``dw 0xFFFF`` are both the word FFFF) - except R_X86_64_32S, which the CPU
    sign-extends to 64 bits.  A PC-relative field takes a signed distance; a distance of
    the code size itself (rel16 in 16-bit code, rel32 in 32-bit code) may wrap, as IP
    and EIP do.
    """
    size = 8 * width
    name, _, relative = RELOCATIONS[kind]
    if relative and size == bits and bits < 64:
        return value % (1 << size)
    low = -(1 << (size - 1))
    high = (1 << (size - 1)) - 1 if relative or name == "R_X86_64_32S" else (1 << size) - 1
    return value % (1 << size) if low <= value <= high else None


def link(obj: ObjectFile, base: int, bits: int) -> bytes:
    """The flat code of ``obj`` loaded at ``base``: every relocation applied."""
    code = bytearray(obj.code)
    for r in obj.relocations:
        if r.kind not in RELOCATIONS:
            raise LlvmError(f"the assembler asked for relocation type {r.kind}, which vtlab "
                            "does not apply", offset=r.offset)
        name, width, relative = RELOCATIONS[r.kind]
        sym = r.symbol
        if sym.section == SHN_UNDEF and sym.name:
            raise LlvmError(f"the symbol {sym.name!r} is not defined", offset=r.offset)
        if sym.section == SHN_ABS:
            target = sym.value
        elif sym.section == obj.text_index or sym.section == SHN_UNDEF:
            target = base + sym.value if sym.section else 0
        else:
            raise LlvmError(f"a symbol in section {sym.section}: vtlab programs have one "
                            "section", offset=r.offset)
        value = target + r.addend - ((base + r.offset) if relative else 0)
        field = _fits(_signed64(value), width, r.kind, bits)
        if field is None:
            what = "the distance" if relative else "the value"
            raise LlvmError(f"{what} {_signed64(value):#x} does not fit the {8 * width}-bit "
                            f"field ({name})", offset=r.offset)
        code[r.offset:r.offset + width] = field.to_bytes(width, "little")
    return bytes(code)

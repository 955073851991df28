"""Assemble guest source with LLVM's x86 assembler and disassemble it with Capstone.

The source dialect is Intel syntax as LLVM reads it (``.intel_syntax noprefix``), with
the NASM habits learners bring along translated first:

* ``;`` starts a comment (LLVM would read it as a statement separator),
* ``db``/``dw``/``dd``/``dq`` data with numbers and quoted strings (UTF-8, as NASM),
* ``times N <statement>`` repeats a statement (``N`` a constant expression),
* ``bits 16|32|64`` / ``[bits N]`` and ``org ADDR`` lines are honoured,
* ``$`` is the address of the current line, ``$$`` the program's origin,
* ``name equ expr`` defines a symbol; ``jmp short x``/``jmp near x`` are read as ``jmp x``
  (LLVM knows neither word and picks the shortest encoding itself),
* ``jmp 0x1000`` goes to the address 0x1000 (LLVM has no absolute near branch: the
  target is written relative to the program's first byte), ``jmp SEL:OFF`` and
  ``call SEL:OFF`` are the far forms (LLVM spells them ``ljmp SEL, OFF``),
* ``retf`` in 16-bit code is the 16-bit far return CB (LLVM would make it ``66 CB``,
  the 32-bit one, as it does in 32-bit code).

Expressions follow NASM's precedence: constant ones are handed to LLVM as their value,
the others fully parenthesised (GNU rules would read ``1 + 2 << 3`` as ``1 + (2 << 3)``).

Every line is checked here before LLVM sees it: LLVM itself would accept a few things
silently that mean something else to a NASM user (``mov ax, [bx`` is ``[0]`` to it).
LLVM's own errors name a line of the translated text, which is mapped back to the
learner's line.  Errors are :class:`vtlab.errors.AssemblyError` naming the offending
source line; a program may assemble to at most :data:`MAX_OUTPUT` bytes (1 MiB).

Running LLVM (:mod:`vtlab.cpu.asm_llvm`) costs a process start, about 10 ms, so results
are cached twice: in memory for this process (the same text again costs nothing) and,
by (text, address, bits, assembler version), in a small on-disk cache
(:mod:`vtlab.cpu.asm_cache`) that survives between runs - set ``VTLAB_ASM_CACHE=off`` to
turn it off.
"""
from __future__ import annotations

import hashlib
import operator
import re
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import capstone

from ..errors import AssemblyError
from . import asm_cache, asm_llvm

_CS_MODE = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_DATA = {"db": ".byte", "dw": ".short", "dd": ".long", "dq": ".quad"}
#: The GNU data directives, accepted as written (checked like db/dw/dd/dq).
_KS_DATA = {".byte": ".byte", ".short": ".short", ".word": ".short", ".value": ".short",
            ".long": ".long", ".int": ".long", ".quad": ".quad"}
_DATA_RANGE = {".byte": (8, "db"), ".short": (16, "dw"), ".long": (32, "dd"), ".quad": (64, "dq")}
_LABEL = re.compile(r"^\s*([A-Za-z_.$@?][\w.$@?]*)\s*:")
_SIZE_NO_PTR = re.compile(r"\b(byte|word|dword|qword)\s+\[", re.IGNORECASE)

#: The most machine code one program may assemble to: the smallest guest memory (1 MiB).
MAX_OUTPUT = 1 << 20

_RESERVED = "__vtlab_"
_START = "__vtlab_start"      # the first byte of the program: NASM's $$
_END = "__vtlab_end"
_HERE = "\x01"                # placeholder for this repetition's "$" label
_REP = "\x02"                 # placeholder for this repetition's number
_ORIGIN = "\x03"              # placeholder for the origin (known once every line is read)
_RETF = "\x04retf"            # placeholder for RETF (its bytes depend on the code size)
_LABEL_NAME = re.compile(r"[A-Za-z_.][\w.$@?]*")
_BRANCHES = re.compile(r"j[a-z]{1,4}|call|loop[a-z]{0,3}|xbegin", re.IGNORECASE)
#: Prefixes written before an instruction (or alone on a line, NASM style).
_PREFIXES = {"lock", "rep", "repe", "repz", "repne", "repnz", "data16", "rex64"}
_PREFIX = re.compile(r"([A-Za-z_][\w.$@?]*)\s*/?(.*)")
_DIRECTIVE = re.compile(r"\[?\s*(bits|org|use16|use32|use64)(?:\s+(.*?))?\s*\]?", re.IGNORECASE)
#: NASM's far branch to a constant SEL:OFF (LLVM: ljmp/lcall SEL, OFF).
_FAR = re.compile(r"(?:far\s+)?([^\[\],:'\"]+):([^\[\],:'\"]+)", re.IGNORECASE)
#: Instructions LLVM does not know, as their bytes (SDM Vol. 2: F1 is INT1, "ICEBP").
_RAW_BYTES = {"int1": 0xF1, "icebp": 0xF1}
#: x86 register names (an operand that is one is never read as an expression).
_REGISTER_NAME = re.compile(
    r"[abcd][lh]|[re]?[abcd]x|[re]?[sd]il?|[re]?[sb]pl?|r(?:[89]|1[0-5])[dwb]?|[re]?ip|"
    r"[c-gs]s|cr\d+|dr\d+|tr\d|st\d?|mm\d|[xyz]mm\d+|k[0-7]|bnd[0-3]", re.IGNORECASE)
#: How far from the origin a RIP-relative operand may point: 2 GiB, less the longest
#: instruction (code far from the origin that points near the limit gets LLVM's "too
#: large for field of 4 bytes").
_RIP_REACH = (1 << 31) - 16
#: The width of each general register, to check an immediate given with it.
_REGISTER_WIDTH = {
    **{r: 8 for r in "al ah bl bh cl ch dl dh sil dil spl bpl".split()},
    **{r: 16 for r in "ax bx cx dx si di sp bp".split()},
    **{"e" + r: 32 for r in "ax bx cx dx si di sp bp".split()},
    **{"r" + r: 64 for r in "ax bx cx dx si di sp bp".split()},
    **{f"r{n}{s}": w for n in range(8, 16) for s, w in (("b", 8), ("w", 16), ("d", 32), ("", 64))},
}
#: Registers a near branch can go through (jmp eax): never turned into an address.
_REGISTER = re.compile(r"[re]?(?:ax|bx|cx|dx|si|di|sp|bp|ip)|r(?:[89]|1[0-5])[dwb]?", re.IGNORECASE)


class AssemblyTypeError(AssemblyError, TypeError):
    """:func:`assemble` was given something that is not assembly text (or a bad address type)."""


class AssemblyValueError(AssemblyError, ValueError):
    """:func:`assemble` was given an impossible ``bits`` or ``address``."""


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


@cache
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


# ------------------------------------------------------------------- checking text
class _LineError(Exception):
    """A problem with the line being read (turned into an AssemblyError naming it)."""


def _char_name(ch: str) -> str:
    return f"{ch!r} (U+{ord(ch):04X})"


_TYPOGRAPHIC = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2032": "'",
                "\u00b4": "'", "\u2013": "-", "\u2014": "-", "\u2212": "-", "\uff1b": ";",
                "\uff0c": ","}


def _pieces(code: str) -> list[tuple[str | None, str]]:
    """``code`` split into (quote, text) pieces: quote is ``'``/``"`` for a literal, else None."""
    out, i, n = [], 0, len(code)
    while i < n:
        j = i
        while j < n and code[j] not in "'\"":
            j += 1
        if j > i:
            out.append((None, code[i:j]))
        if j == n:
            break
        end = code.find(code[j], j + 1)
        if end < 0:
            raise _LineError(f"unterminated string: {code[j:]!r} has no closing {code[j]}")
        out.append((code[j], code[j + 1:end]))
        i = end + 1
    return out


def _check_plain(text: str) -> str:
    """Check text outside quotes: ASCII, no control characters (Unicode spaces become spaces)."""
    if text.isascii():
        bad = next((c for c in text if (c < " " and c != "\t") or c == "\x7f"), None)
        if bad is not None:
            raise _LineError(f"control character {_char_name(bad)} in the line: only text, "
                             "spaces and tabs can be assembled")
        return text
    out = []
    for c in text:
        if c.isascii():
            if (c < " " and c != "\t") or c == "\x7f":
                raise _LineError(f"control character {_char_name(c)} in the line: only text, "
                                 "spaces and tabs can be assembled")
            out.append(c)
        elif c.isspace() or c in "\u200b\ufeff":
            out.append(" ")  # a non-breaking space pasted from a web page
        elif c in _TYPOGRAPHIC:
            raise _LineError(f"typographic character {_char_name(c)}: type {_TYPOGRAPHIC[c]!r} "
                             "instead (assembly text must be plain ASCII)")
        else:
            raise _LineError(f"non-ASCII character {_char_name(c)}: assembly text must be ASCII "
                             "(only comments and strings in db may hold other characters)")
    return "".join(out)


def _check_char_literal(body: str) -> None:
    if not body.isascii():
        c = next(c for c in body if not c.isascii())
        raise _LineError(
            f"non-ASCII character {_char_name(c)} in a character constant: an instruction's "
            f"character constant must be ASCII; write the byte(s) you mean as a number "
            f"(its UTF-8 encoding is {c.encode('utf-8').hex(' ').upper()})")
    bad = next((c for c in body if c < " " or c == "\x7f"), None)
    if bad is not None:
        raise _LineError(f"control character {_char_name(bad)} in a character constant")


# ---------------------------------------------------------------- expressions
_EXPR_TOKEN = re.compile(r"""\s*(?:
    (?P<num>\d[\w.]*(?:(?<=[eE])[-+]\d+)?)
  | (?P<chr>'[^']*'|"[^"]*")
  | (?P<dd>\$\$(?![\w.$@?]))
  | (?P<d>\$(?![\w.$@?]))
  | (?P<id>[A-Za-z_.?@$][\w.$@?]*)
  | (?P<op><<|>>|[-+*/%&|^~!()])
  | (?P<bad>\S)
)""", re.VERBOSE)


def _number(tok: str) -> int:
    """The value of a number token as NASM reads it (0x.., 0b.., ..h, 0.. octal, decimal)."""
    low = tok.lower()
    try:
        if re.fullmatch(r"0x[0-9a-f]+", low):
            value = int(low, 16)
        elif re.fullmatch(r"0b[01]+", low):
            value = int(low, 0)
        elif re.fullmatch(r"[0-9][0-9a-f]*h", low):
            value = int(low[:-1], 16)
        elif re.fullmatch(r"0[0-7]*", low):
            value = int(low, 8)
        elif re.fullmatch(r"[1-9][0-9]*", low):
            value = int(low)
        else:
            raise ValueError
    except ValueError:
        if re.fullmatch(r"\d+(\.\d*)?(e[-+]?\d+)?", low) and ("." in low or "e" in low):
            raise _LineError(f"{tok!r}: floating-point numbers are not supported") from None
        if re.fullmatch(r"0[0-9]+", low):
            raise _LineError(f"{tok!r} is not a number: a leading 0 makes it octal "
                             "(digits 0-7); write it without the 0") from None
        raise _LineError(f"{tok!r} is not a number (write 42, 0x2A, 2Ah or 0b101010)") from None
    if value >= 1 << 64:
        raise _LineError(f"{tok!r} is too big: numbers are at most 64 bits")
    return value


@dataclass
class _Expr:
    """A checked expression: the text for LLVM, its value if constant, whether it uses $."""

    text: str
    value: int | None
    dollar: bool = False


_BINARY = [  # NASM/C precedence, lowest first
    {"|": operator.or_}, {"^": operator.xor}, {"&": operator.and_},
    {"<<": operator.lshift, ">>": operator.rshift},
    {"+": operator.add, "-": operator.sub},
    {"*": operator.mul, "/": None, "%": None},
]


def _c_div(a: int, b: int, op: str) -> int:
    if b == 0:
        raise _LineError("division by zero in an expression")
    q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
    return q if op == "/" else a - q * b


def _llvm_number(value: int) -> str:
    """A constant as LLVM should read it: decimal, with a negative one in parentheses."""
    return str(value) if value >= 0 else f"({value})"


class _ExprParser:
    """Recursive descent over :data:`_EXPR_TOKEN` tokens; evaluates what is constant.

    Each rule returns (text, value): ``value`` is None unless the part is constant, and
    ``text`` is what LLVM gets - the value itself when it is known, otherwise the part
    fully parenthesised, so that LLVM's (GNU) precedence cannot change its meaning.
    """

    def __init__(self, text: str, here: str | None, what: str):
        self.tokens, self.what = [], what
        for m in _EXPR_TOKEN.finditer(text):
            kind = m.lastgroup
            tok = m.group(kind)
            if kind == "bad":
                raise _LineError(f"{tok!r} cannot appear in {what}")
            self.tokens.append((kind, tok))
        self.i, self.here, self.dollar = 0, here, False

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def parse(self) -> _Expr:
        if not self.tokens:
            raise _LineError(f"{self.what} is missing")
        text, value = self.binary(0)
        if self.i < len(self.tokens):
            raise _LineError(f"unexpected {self.tokens[self.i][1]!r} in {self.what}")
        return _Expr(text, value, self.dollar)

    def binary(self, level: int) -> tuple[str, int | None]:
        if level == len(_BINARY):
            return self.unary()
        text, value = self.binary(level + 1)
        while True:
            kind, tok = self.peek()
            if kind != "op" or tok not in _BINARY[level]:
                return text, value
            self.take()
            rhs_text, rhs = self.binary(level + 1)
            if value is None or rhs is None:
                value = None
            elif tok in ("/", "%"):
                value = _c_div(value, rhs, tok)
            elif tok in ("<<", ">>") and not 0 <= rhs < 64:
                raise _LineError(f"shift by {rhs} in {self.what}: shifts go from 0 to 63")
            else:
                value = _BINARY[level][tok](value, rhs)
            text = _llvm_number(value) if value is not None else f"({text} {tok} {rhs_text})"

    def unary(self) -> tuple[str, int | None]:
        kind, tok = self.take()
        if kind == "op" and tok in "-+~!":
            text, value = self.unary()
            if value is None:
                return f"({tok}{text})", None
            value = {"-": -value, "+": value, "~": ~value, "!": int(not value)}[tok]
            return _llvm_number(value), value
        if kind == "op" and tok == "(":
            text, value = self.binary(0)
            if self.take() != ("op", ")"):
                raise _LineError(f"a '(' in {self.what} has no matching ')'")
            return text, value
        if kind == "num":
            value = _number(tok)
            return _llvm_number(value), value
        if kind == "chr":
            body = tok[1:-1]
            _check_char_literal(body)
            if len(body) != 1:
                raise _LineError(f"{tok} in {self.what}: a character constant is one character")
            return str(ord(body)), ord(body)
        if kind == "d":
            if self.here is None:
                raise _LineError(f"$ cannot be used in {self.what}: it must be a constant")
            self.dollar = True
            return self.here, None
        if kind == "dd":
            if self.here is None:
                raise _LineError(f"$$ cannot be used in {self.what}: it must be a constant")
            return _START, None
        if kind == "id":
            if self.here is None:
                raise _LineError(f"{self.what} must be a constant: the symbol {tok!r} cannot "
                                 "be used in it")
            if tok.startswith("$"):
                raise _LineError(f"{tok!r}: NASM's $name escape is not supported")
            if tok.startswith(_RESERVED):
                raise _LineError(f"{tok!r}: names starting with {_RESERVED} are vtlab's own")
            return tok, None
        if kind is None:
            raise _LineError(f"{self.what} ends too early (a value is missing)")
        raise _LineError(f"unexpected {tok!r} in {self.what}")


def _expression(text: str, what: str, here: str | None = _HERE) -> _Expr:
    return _ExprParser(text, here, what).parse()


def _constant(text: str, what: str) -> int:
    return _expression(text, what, here=None).value


# ---------------------------------------------------------------------- lines
@dataclass
class _Line:
    number: int
    text: str
    stmts: list[str] = field(default_factory=list)  # one repetition, one statement each
    reps: int = 1
    code: bool = False          # must produce bytes
    dollar: bool = False        # uses $ (a label per repetition)
    labels: list[str] = field(default_factory=list)
    what: str = ""              # "data", "instruction", "symbol"
    target: str | None = None   # the symbol a branch goes to (checked after assembly)
    pattern: bytes | None = None  # one repetition's bytes, when they do not depend on where

    def statements(self, origin: int, reps: int | None = None) -> list[str]:
        """This line's statements for LLVM (one per entry), ``reps`` repetitions.

        A label ``__vtlab_L<line>`` marks where the line's code starts (the symbol table
        of the object says where each line ended up).  A repeated statement without
        ``$`` becomes one ``.rept`` block, however large the count; with ``$`` every
        repetition is written out, each with a label of its own for its ``$``.
        """
        reps = self.reps if reps is None else reps
        out = [f"{label}:" for label in self.labels]
        if not self.stmts or reps == 0:
            return out
        marker = f"{_RESERVED}L{self.number}"
        out.append(f"{marker}:")
        origin_text = str(origin)
        if self.pattern is not None and reps > 1:
            # LLVM takes seconds for 10**5 instructions, and no time for data.
            return out + [f".rept {reps}", ".byte " + ", ".join(map(str, self.pattern)), ".endr"]
        if not self.dollar:
            body = [s.replace(_REP, "").replace(_ORIGIN, origin_text) for s in self.stmts]
            out.extend([f".rept {reps}", *body, ".endr"] if reps > 1 else body)
            return out
        for r in range(reps):
            out.append(f"{marker}_{r}:")
            out.extend(self.resolve(s, r).replace(_ORIGIN, origin_text) for s in self.stmts)
        return out

    def resolve(self, text: str, rep: int = 0) -> str:
        """``text`` of repetition ``rep``, its $ and names made concrete."""
        if not self.dollar:
            return text.replace(_REP, "")
        return text.replace(_HERE, f"{_RESERVED}L{self.number}_{rep}").replace(_REP, f"_{rep}")


def _split_items(operands: str) -> list[str]:
    """Comma-separated items, commas inside quotes or parentheses not splitting."""
    items, depth, start, quote = [], 0, 0, None
    for i, ch in enumerate(operands):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(operands[start:i])
            start = i + 1
    items.append(operands[start:])
    return [item.strip() for item in items]


def _data(directive: str, name: str, operands: str) -> tuple[list[str], bool]:
    """The statement for ``db``-style data; (statements, uses $)."""
    if not operands.strip():
        raise _LineError(f"{name} needs at least one value, e.g. {name} 0")
    width, nasm = _DATA_RANGE[directive]
    low, high = -(1 << (width - 1)), (1 << width) - 1
    values, dollar = [], False
    for k, item in enumerate(_split_items(operands), start=1):
        if not item:
            raise _LineError(f"value {k} of {name} is empty (two commas in a row, or a "
                             "comma at the end)")
        m = re.fullmatch(r"'([^']*)'|\"([^\"]*)\"", item)
        if m:  # a string: its bytes (UTF-8, as NASM), one value each
            text = m.group(1) if m.group(1) is not None else m.group(2)
            values.extend(str(b) for b in text.encode("utf-8"))
            continue
        expr = _expression(item, f"value {k} of {name}")
        dollar |= expr.dollar
        if expr.value is not None and not low <= expr.value <= high:
            raise _LineError(f"value {k} of {name} ({item}) does not fit: {nasm} takes "
                             f"{low}..{high}")
        values.append(expr.text)
    if not values:
        return [], False  # only empty strings: no bytes, as in NASM
    return [f"{directive} {', '.join(values)}"], dollar


def _check_brackets(code: str) -> None:
    stack = []
    pairs = {"]": "[", ")": "("}
    for quote, text in _pieces(code):
        if quote:
            continue
        for ch in text:
            if ch in "[(":
                stack.append(ch)
            elif ch in "])":
                if not stack or stack[-1] != pairs[ch]:
                    raise _LineError(f"a {ch!r} has no matching {pairs[ch]!r}")
                stack.pop()
    if stack:
        raise _LineError(f"a {stack[-1]!r} has no matching {']' if stack[-1] == '[' else ')'!r}")


def _substitute_dollars(code: str) -> tuple[str, bool]:
    """``$`` -> this line's label, ``$$`` -> the program's first byte (outside quotes)."""
    out, dollar = [], False
    for quote, text in _pieces(code):
        if quote:
            out.append(f"{quote}{text}{quote}")
            continue
        if "$" in text:
            if re.search(r"(?<![\w.$@?])\$[\w.?@]", text):
                raise _LineError("NASM's $name escape is not supported")
            text = re.sub(r"(?<![\w.$@?])\$\$(?![\w.$@?])", _START, text)
            new = re.sub(r"(?<![\w.$@?])\$(?![\w.$@?])", _HERE, text)
            dollar |= new != text
            text = new
        out.append(text)
    return "".join(out), dollar


def _instruction(code: str, number: int, bits: int,
                 origin: int) -> tuple[list[str], bool, str | None]:
    """The statement(s) for an instruction line; (statements, uses $, branch target)."""
    if not re.match(r"[A-Za-z_]", code):
        raise _LineError(f"{code.split()[0]!r} cannot start a statement: a line holds an "
                         "instruction, a label (name:) or a directive (db, times, bits, org)")
    plain = "".join(text for quote, text in _pieces(code) if not quote)
    for ch, why in (("{", "braces { } (AVX-512 masks) are not supported"),
                    ("}", "braces { } (AVX-512 masks) are not supported"),
                    ("\\", "a backslash cannot appear in an instruction"),
                    ("`", "a backquote cannot appear in an instruction"),
                    ("#", ("# does not start a comment here (LLVM would drop the rest of "
                          "the line silently): comments start with ;"))):
        if ch in plain:
            raise _LineError(why)
    m = re.search(r"([-+~!*/%&|^<>])\s*($|[,\])])", plain)
    if m:  # an operator without its value: say so here, in a learner's words
        raise _LineError(f"the operator {m.group(1)!r} has no value after it")
    for quote, text in _pieces(code):
        if quote:
            _check_char_literal(text)
    for m in re.finditer(r"(?<![\w.$@?])\d\w*", plain):
        try:
            _number(m.group(0))
        except _LineError as exc:
            if "too big" in str(exc):
                raise
    _check_brackets(code)  # LLVM reads "mov ax, [bx" as "mov ax, [0]"
    code = _SIZE_NO_PTR.sub(lambda m: f"{m.group(1)} ptr [", code)  # NASM "word [x]"
    prefixes = []  # "rep movsb", "REP/movsb", "lock": each prefix a statement of its own
    while (m := _PREFIX.match(code)) and m.group(1).lower() in _PREFIXES:
        prefixes.append(m.group(1).lower())
        code = m.group(2).strip()
        if not code:
            return prefixes, False, None
    stmts, dollar, target = _operation(code, number, bits, origin)
    return prefixes + stmts, dollar, target


def _operation(code: str, number: int, bits: int,
               origin: int) -> tuple[list[str], bool, str | None]:
    """Statements for one instruction; (statements, uses $, the symbol a branch goes to)."""
    if not re.match(r"[A-Za-z_]", code) or _LABEL.match(code) or re.match(r"[\w.$@?]+\s*=", code):
        raise _LineError(f"{code.split()[0]!r} cannot follow a prefix: an instruction must")
    mnemonic, operand = re.match(r"(\S+)\s*(.*)", code).groups()
    low = mnemonic.lower()
    far = _FAR.fullmatch(operand.strip())
    if far and low in ("jmp", "call", "ljmp", "lcall"):
        return _far_branch(low.lstrip("l"), far.group(1), far.group(2), number)
    if _BRANCHES.fullmatch(mnemonic):
        return _branch(mnemonic, operand, number)
    if low in _RAW_BYTES and not operand.strip():
        return [f".byte {_RAW_BYTES[low]:#04x}"], False, None
    helpers, code = _immediates(mnemonic, operand, number, bits, origin)
    code, dollar = _substitute_dollars(code)
    dollar |= any(_HERE in h for h in helpers)
    if mnemonic.lower() == "retf":
        # LLVM reads RETF as the 32-bit far return in 16-bit code too (66 CB); NASM's
        # RETF there is CB (SDM Vol. 2B RET: CB/CA iw pop IP and CS at operand size 16).
        # A placeholder, finished by _Program._retf, which knows the code size: only
        # 16-bit code needs the bytes written out.
        return [f"{_RETF}{operand}"], dollar, None
    m = re.fullmatch(r"push offset (\S+)", code, re.IGNORECASE)
    if m and bits == 32:
        # LLVM makes PUSH of a symbol's address the 16-bit push (66 68 iw) in 32-bit
        # code; NASM's is PUSH imm32 (68 id, SDM Vol. 2B PUSH).
        return [*helpers, ".byte 0x68", f".long {m.group(1)}"], dollar, None
    return [*helpers, code], dollar, None


def _immediates(mnemonic: str, operands: str, number: int, bits: int,
                origin: int) -> tuple[list[str], str]:
    """Immediate operands in NASM's meaning; (helper statements, the instruction).

    NASM reads ``mov ax, msg`` as "the address of msg" and ``mov cx, len`` (len a
    constant) as the number; LLVM's Intel syntax, like MASM, reads a bare symbol as a
    memory operand (``mov ax, [msg]``) unless it is written ``offset msg``.  So each
    operand that is an expression without ``[ ]`` is evaluated here, with NASM's
    precedence: a constant becomes its value, anything with a symbol or ``$`` a helper
    symbol ``__vtlab_V<line>_<k> = <expression>`` used as ``offset __vtlab_V<line>_<k>``.
    Registers, memory operands and whatever is not an expression are left as written.
    """
    if not operands.strip():
        return [], mnemonic
    helpers, out = [], []
    items = _split_items(operands)
    width = next((_REGISTER_WIDTH[o.lower()] for o in items if o.lower() in _REGISTER_WIDTH), None)
    for k, operand in enumerate(items):
        if "[" in operand:
            helpers_k, operand = _memory(operand, number, k, bits, origin)
            helpers += helpers_k
            out.append(operand)
            continue
        if (not operand or re.search(r"[\[\]:]|\bptr\b", operand, re.IGNORECASE)
                or _REGISTER_NAME.fullmatch(operand)):
            out.append(operand)
            continue
        try:
            expr = _expression(operand, f"operand {k + 1}")
        except _LineError:
            out.append(operand)  # not an expression: LLVM reads it (or says what is wrong)
            continue
        if expr.value is not None:
            if width and width < 64 and not -(1 << (width - 1)) <= expr.value < 1 << width:
                # LLVM would silently keep only the low bits (mov al, 300 -> mov al, 44)
                raise _LineError(f"operand {k + 1} ({operand}) does not fit a {width}-bit "
                                 f"register: it takes {-(1 << (width - 1))}..{(1 << width) - 1}")
            out.append(_llvm_number(expr.value))
        elif _REGISTER_NAME.search(expr.text) and re.search(
                rf"(?<![\w.$@?])({_REGISTER_NAME.pattern})(?![\w.$@?])", expr.text, re.I):
            out.append(operand)  # a register inside an expression: LLVM's to judge
        else:
            name = f"{_RESERVED}V{number}_{k}{_REP}"
            helpers.append(f"{name} = {expr.text}")
            out.append(f"offset {name}")
    return helpers, f"{mnemonic} {', '.join(out)}"


def _memory(operand: str, number: int, k: int, bits: int,
            origin: int) -> tuple[list[str], str]:
    """A memory operand at a constant address checked (and in 64-bit code placed).

    LLVM silently cuts an address that does not fit the displacement (``[0x12345]`` in
    16-bit code is ``[0x2345]`` to it).  In 64-bit code an absolute address is reached
    RIP-relative, as Keystone did (and as the exit qualifications of the course expect):
    LLVM's other form, a disp32 through a SIB byte, is sign-extended, so ``[0x80000000]``
    would silently be ``[0xFFFFFFFF80000000]``.  Only an address out of RIP's reach but
    valid as a sign-extended disp32 (the top 2 GiB) takes the SIB form.
    """
    m = re.fullmatch(r"(.*?)\[([^\[\]]*)\](.*)", operand)
    if not m or ":" in m.group(2):
        return [], operand
    try:
        expr = _expression(m.group(2), "the address")
    except _LineError:
        return [], operand  # registers inside: LLVM's to read
    if expr.value is None:
        return [], operand
    address = expr.value % (1 << 64)
    if bits == 64:
        if abs(address - origin) >= _RIP_REACH:
            if address < 1 << 31 or address >= (1 << 64) - (1 << 31):
                return [], operand  # LLVM's sign-extended disp32 holds it
            raise _LineError(f"the address {m.group(2).strip()} is out of reach in 64-bit "
                             "code (2 GiB from the code, or a sign-extended 32-bit address): "
                             "put it in a register, e.g. mov rax, ADDRESS / mov [rax], ...")
        name = f"{_RESERVED}V{number}_{k}{_REP}"
        return ([f"{name} = {_START} + ({address} - {_ORIGIN})"],
                f"{m.group(1)}[rip + {name}]{m.group(3)}")
    if not -(1 << (bits - 1)) <= expr.value < 1 << bits:
        raise _LineError(f"the address {m.group(2).strip()} does not fit {bits}-bit code: "
                         f"addresses go up to {(1 << bits) - 1:#x}")
    return [], operand


def _far_branch(kind: str, selector: str, offset: str,
                number: int) -> tuple[list[str], bool, str | None]:
    """``jmp SEL:OFF`` / ``call SEL:OFF``: LLVM's ``ljmp SEL, OFF`` (EA/9A, ptr16:16/32).

    The selector must be a constant; the offset may use labels (``lcall 0x48:next``),
    given to LLVM as ``offset`` of a helper symbol (a bare name would be memory to it).
    """
    sel = _expression(selector, "the selector of a far branch", here=None)
    off = _expression(offset, "the offset of a far branch")
    if off.value is not None:
        return [f"l{kind} {sel.text}, {off.text}"], False, None
    name = f"{_RESERVED}V{number}_1{_REP}"
    return [f"{name} = {off.text}", f"l{kind} {sel.text}, offset {name}"], off.dollar, None


def _branch(mnemonic: str, operand: str, number: int) -> tuple[list[str], bool, str | None]:
    """A JMP/Jcc/CALL/LOOP/XBEGIN; (statements, uses $, the symbol it goes to).

    * ``short``/``near`` are dropped: LLVM picks the shortest encoding that reaches.
    * ``jmp SEL:OFF`` (a constant far pointer) is LLVM's ``ljmp SEL, OFF``.
    * A constant target is an address (NASM: ``jmp 0x1000`` goes to 0x1000); LLVM has
      no such operand, so it is written relative to the program's first byte, which
      also lets LLVM pick the short form when the address is in reach.
    * A target with arithmetic (``label+2``, ``$+5``) gets a name of its own, so that
      the branch can be checked after assembly like a branch to a label.
    """
    operand = re.sub(r"^(short|near)(\s+|$)", "", operand, flags=re.IGNORECASE).strip()
    if re.match(r"far\s+\S", operand, re.IGNORECASE):  # NASM "jmp far [mem]"
        operand = operand[3:].strip()
        return [f"l{mnemonic.lower()} {_SIZE_NO_PTR.sub(lambda m: f'{m.group(1)} ptr [', operand)}"
                ], False, None
    plain = (operand and not re.search(r"[\[\],:'\"]", operand)
             and not _REGISTER.fullmatch(operand))
    if plain:
        target = _expression(operand, "the branch target")
        if target.value is not None:
            address = target.value
            name = f"{_RESERVED}T{number}{_REP}"
            return ([f"{name} = {_START} + ({address} - {_ORIGIN})", f"{mnemonic} {name}"],
                    False, name)
        if re.search(r"[-+*/%&|^~()]", operand) or target.dollar:
            name = f"{_RESERVED}T{number}{_REP}"
            return [f"{name} = {target.text}", f"{mnemonic} {name}"], target.dollar, name
        if re.fullmatch(r"[A-Za-z_.][\w.$@?]*", operand):
            return [f"{mnemonic} {operand}"], False, operand
    code, dollar = _substitute_dollars(f"{mnemonic} {operand}".strip())
    return [code], dollar, None


class _Program:
    """The checked, translated source: its lines, code size, origin and labels."""

    def __init__(self, source: str, address: int, bits: int):
        self.source_lines = source.splitlines()
        self.bits = bits
        self.origin, self.origin_line = address, None
        self.labels: dict[str, int] = {}
        self.symbols: dict[str, int] = {}
        self.code_seen = False
        self.lines = [self._line(n, text) for n, text in enumerate(self.source_lines, start=1)]

    def error(self, message: str, line: _Line | int | None) -> AssemblyError:
        if isinstance(line, _Line):
            line = line.number
        return AssemblyError(message, line, None if line is None else self.source_lines[line - 1])

    def _line(self, number: int, raw: str) -> _Line:
        line = _Line(number, raw)
        try:
            self._read(line, raw)
        except _LineError as exc:
            raise self.error(str(exc), number) from None
        if line.code and line.reps:
            self.code_seen = True
        return line

    def _define(self, name: str, number: int, kind: str) -> None:
        if not _LABEL_NAME.fullmatch(name) or name == "." or not re.search(r"[\w]", name):
            raise _LineError(f"{name!r} cannot be a {kind} name: names start with a letter, "
                             "_ or . and hold letters, digits, _ . $ @ ?")
        if name.startswith(_RESERVED):
            raise _LineError(f"{name!r}: names starting with {_RESERVED} are vtlab's own")
        for table, what in ((self.labels, "label"), (self.symbols, "symbol")):
            if name in table:
                raise _LineError(f"{name!r} is already defined (as a {what}) on line "
                                 f"{table[name]}")
        (self.labels if kind == "label" else self.symbols)[name] = number

    def _read(self, line: _Line, raw: str) -> None:
        pieces = _pieces(strip_comment(raw))
        code = "".join(q + t + q if q else _check_plain(t) for q, t in pieces).strip()
        if not code:
            return
        while True:  # labels
            m = _LABEL.match(code)
            if not m:
                break
            self._define(m.group(1), line.number, "label")
            line.labels.append(m.group(1))
            code = code[m.end():].strip()
        if code:
            self._statement(line, code)

    def _directive(self, line: _Line, word: str, arg: str) -> None:
        if word.startswith("use"):
            word, arg = "bits", word[3:] + (" " + arg if arg else "")
        if word == "bits":
            if not arg:
                raise _LineError("bits needs a code size: bits 16, bits 32 or bits 64")
            if arg not in ("16", "32", "64"):
                raise _LineError(f"bits takes the code size 16, 32 or 64, not {arg!r}")
            bits = int(arg)
            if bits != self.bits and self.code_seen:
                raise _LineError(
                    f"bits {bits} after code: a program is assembled in one code size, so "
                    "bits must come before the first instruction (assemble and load code of "
                    "another size as a separate program)")
            self.bits = bits
            return
        if not arg:
            raise _LineError("org needs the address the code is assembled for, e.g. org 0x7C00")
        origin = _constant(arg, "the org address")
        if not 0 <= origin < 1 << 64:
            raise _LineError(f"org {arg}: the address must be between 0 and 2**64-1")
        if self.origin_line is not None and origin != self.origin:
            raise _LineError(f"org given twice: line {self.origin_line} already set the origin "
                             f"to {self.origin:#x} (a program has one origin)")
        self.origin, self.origin_line = origin, line.number

    def _statement(self, line: _Line, code: str, repeated: bool = False) -> None:
        head, rest = re.match(r"(\S+)\s*(.*)", code).groups()
        low = head.lower()
        if re.match(r"times\b", code, re.IGNORECASE):
            if repeated:
                raise _LineError("times cannot repeat another times")
            return self._times(line, code[5:])
        m = _DIRECTIVE.fullmatch(code)
        if m:
            if repeated:
                raise _LineError(f"times cannot repeat {m.group(1).lower()}")
            return self._directive(line, m.group(1).lower(), (m.group(2) or "").strip())
        m = re.fullmatch(r"([A-Za-z_.][\w.$@?]*)\s*(?:=|\s[eE][qQ][uU](?:\s|$))(.*)", code)
        if m:
            if repeated:
                raise _LineError("times cannot repeat a symbol definition")
            name = m.group(1)
            self._define(name, line.number, "symbol")
            expr = _expression(m.group(2), f"the value of {name}")
            line.stmts = [f"{name} = {expr.text}"]
            line.dollar, line.what = expr.dollar, "symbol"
            return
        if low in _DATA or low in _KS_DATA:
            directive = _DATA.get(low) or _KS_DATA[low]
            line.stmts, line.dollar = _data(directive, head, rest)
            line.code, line.what = bool(line.stmts), "data"
            return
        if low.startswith("."):
            raise _LineError(f"the directive {head!r} is not supported (vtlab reads db, dw, dd, "
                             "dq, times, bits, org and equ)")
        stmts, line.dollar, line.target = _instruction(code, line.number, self.bits, self.origin)
        line.stmts = [self._retf(s) if s.startswith(_RETF) else s for s in stmts]
        line.code, line.what = True, "instruction"

    def _retf(self, stmt: str) -> str:
        """RETF for the code size (``bits`` is final: it cannot change after code)."""
        operand = stmt[len(_RETF):].strip()
        if self.bits != 16:
            return f"retf {operand}".strip()
        if not operand:
            return ".byte 0xCB"
        count = _constant(operand, "the operand of retf")
        if not 0 <= count <= 0xFFFF:
            raise _LineError(f"retf {operand}: the count of bytes to release is 0..65535")
        return f".byte 0xCA, {count & 0xFF}, {count >> 8}"

    def _times(self, line: _Line, rest: str) -> None:
        m = re.match(r"""(?:\s*(?:\d[\w.]*|'[^']*'|"[^"]*"|<<|>>|[-+*/%()~&|^!]|\$+))+""", rest)
        count_text = m.group(0).strip() if m else ""
        stmt = rest[m.end():].strip() if m else rest.strip()
        if not count_text:
            raise _LineError("times needs a constant count and a statement, e.g. times 4 nop"
                             + (f" ({stmt.split()[0]!r} is not a number)" if stmt else ""))
        if "$" in count_text:
            raise _LineError("the count of times must be a constant: $ and labels (as in "
                             "510-($-$$)) cannot be used in it")
        count = _constant(count_text, "the count of times")
        if not stmt:
            raise _LineError(f"times {count_text} needs a statement to repeat, e.g. times 4 nop")
        if count < 0:
            raise _LineError(f"times {count_text}: the count must not be negative")
        if count > MAX_OUTPUT:
            raise _LineError(
                f"times {count_text} repeats the statement {count:,} times: a program may "
                f"take at most 1 MiB ({MAX_OUTPUT:,} bytes, the smallest guest memory), so "
                f"the count can be at most {MAX_OUTPUT:,}")
        if _LABEL.match(stmt):
            raise _LineError("times cannot repeat a label (it would be defined many times)")
        self._statement(line, stmt, repeated=True)
        line.reps = count


# ---------------------------------------------------------------------- LLVM
def _llvm(text: str) -> asm_llvm.ObjectFile:
    """LLVM on checked text: the object it makes (raises :class:`asm_llvm.LlvmError`)."""
    return asm_llvm.read_object(asm_llvm.assemble_object(text))


_LLVM = _llvm  # the real one: only its results go into the on-disk cache

#: LLVM's messages, and what they mean in a learner's terms.
_HINTS = [
    (r"invalid instruction mnemonic '([^']*)'", "unknown instruction {0!r}"),
    (r"invalid operand for instruction", "these operands are not valid for this instruction"),
    (r"the symbol '([^']*)' is not defined", "a label or symbol used here is not defined: {0!r}"),
    (r"symbol '([^']*)' is already defined", "{0!r} is defined twice"),
    (r"does not fit the (\d+)-bit field", "a value does not fit {where}"),
    (r"too large for field of (\d+) byte", "a value does not fit {where}"),
    (r"out of range|must be in the range", "a value is out of range {where}"),
    (r"unknown token in expression|unexpected token", "an operand is missing or has an "
                                                      "unexpected token"),
]


def _reason(message: str, line: _Line | None) -> str:
    """LLVM's message, after a hint in a learner's terms where there is one."""
    for pattern, hint in _HINTS:
        m = re.search(pattern, message)
        if m:
            where = ("for its operand" if line is None or line.what != "data" else
                     "(db takes -128..255, dw -32768..65535, dd -2**31..2**32-1)")
            return f"{hint.format(*m.groups(), where=where)} (LLVM: {message})"
    return f"LLVM: {message}"


#: Where each line with code ended up: line number -> (start, end) offsets.
_Spans = dict[int, tuple[int, int]]


class _Assembly:
    """One run of LLVM over a checked program, and the checks of what came back."""

    def __init__(self, program: _Program):
        self.p = program

    def text(self, reps_one: bool = False) -> tuple[str, list[int | None]]:
        """The text for LLVM and, for each of its lines, the source line it comes from."""
        p = self.p
        lines = [".intel_syntax noprefix", f".code{p.bits}", f"{_START}:"]
        owners: list[int | None] = [None, None, None]
        for line in p.lines:
            statements = line.statements(p.origin, min(line.reps, 1) if reps_one else None)
            lines += statements
            owners += [line.number] * len(statements)
        lines.append(f"{_END}:")
        owners.append(None)
        return "\n".join(lines) + "\n", owners

    def llvm(self, reps_one: bool = False) -> tuple[asm_llvm.ObjectFile, _Spans]:
        """Run LLVM: the object and, for every line with code, its (start, end) offsets."""
        text, owners = self.text(reps_one)
        try:
            obj = _llvm(text)
        except asm_llvm.LlvmError as exc:
            number = owners[exc.line - 1] if exc.line and exc.line <= len(owners) else None
            line = self.p.lines[number - 1] if number else None
            raise self.p.error(_reason(exc.message, line), number) from None
        except Exception as exc:  # noqa: BLE001 - the assembler must never escape raw
            error = self.p.error(f"the assembler failed: {type(exc).__name__}: {exc}", None)
            error.vtlab_transient = True  # not the program's fault: never cached
            raise error from None
        labels = obj.labels()
        coded = [line for line in self.p.lines if line.code and line.reps]
        starts = [labels.get(f"{_RESERVED}L{line.number}") for line in coded]
        starts.append(labels.get(_END))
        if None in starts or starts != sorted(starts):
            raise self.p.error("the assembler placed the program's lines where vtlab cannot "
                               "follow", None)
        spans = {line.number: (a, b) for line, a, b in zip(coded, starts, starts[1:])}
        for line in coded:
            start, end = spans[line.number]
            if end <= start:
                raise self.p.error("this line produced no code (it would have been left out "
                                   "of the program silently); check the operands", line)
        return obj, spans

    def check_total(self, spans: _Spans, reps_one: bool) -> None:
        """Fail when the program (its times lines counted in full) passes 1 MiB."""
        total = 0
        for number, (start, end) in spans.items():
            line = self.p.lines[number - 1]
            size = (end - start) // (line.reps if not reps_one else 1) or 1
            own = size * line.reps
            total += own
            if total <= MAX_OUTPUT:
                continue
            if line.reps > 1:
                more = "" if own == total else f", {total:,} bytes with the lines before it"
                raise self.p.error(
                    f"times {line.reps:,} of {size} bytes makes {own:,} bytes{more}: a "
                    f"program may take at most 1 MiB ({MAX_OUTPUT:,} bytes, the smallest "
                    "guest memory)", line)
            raise self.p.error(f"the program assembles to more than {MAX_OUTPUT:,} bytes: a "
                               "program may take at most 1 MiB (the smallest guest memory)",
                               None)

    def size_repetitions(self, coded: list[_Line]) -> None:
        """Assemble one repetition of each times line first: to refuse a program that
        would pass 1 MiB before making megabytes, and to learn the bytes of a repeated
        statement that does not depend on where it is (then repeated as data)."""
        obj, spans = self.llvm(reps_one=True)
        self.check_total(spans, reps_one=True)
        names = set(self.p.labels) | set(self.p.symbols)
        for line in coded:
            start, end = spans[line.number]
            words = set(re.findall(r"[A-Za-z_.][\w.$@?]*", " ".join(line.stmts)))
            moving = any(start <= r.offset < end for r in obj.relocations)
            if (line.reps > 64 and not line.dollar and not moving and not (words & names)
                    and _RESERVED not in " ".join(line.stmts)):
                line.pattern = obj.code[start:end]

    def link(self, obj: asm_llvm.ObjectFile, spans: _Spans) -> bytes:
        """The relocations applied for the origin; a problem names the line it is in."""
        try:
            return asm_llvm.link(obj, self.p.origin, self.p.bits)
        except asm_llvm.LlvmError as exc:
            number = next((n for n, (a, b) in spans.items()
                           if exc.offset is not None and a <= exc.offset < b), None)
            line = self.p.lines[number - 1] if number else None
            raise self.p.error(_reason(exc.message, line), number) from None

    def addresses(self, obj: asm_llvm.ObjectFile) -> dict[str, int]:
        """Every named symbol's address (labels at the origin, constants as they are)."""
        out = {}
        for sym in obj.symbols:
            if sym.name and sym.section == asm_llvm.SHN_ABS:
                out[sym.name] = sym.value
            elif sym.name and sym.section == obj.text_index:
                out[sym.name] = self.p.origin + sym.value
        return out

    def check_branch(self, line: _Line, code: bytes, address: int, expected: int) -> None:
        """Disassemble a branch and check that it goes where the source says.

        LLVM refuses a LOOP/JCXZ out of reach itself; this is the guard that no branch
        of any kind is ever encoded to somewhere else without an error.
        """
        found = disassemble(code, address, self.p.bits)
        if not found or not re.fullmatch(r"0x[0-9a-f]+|\d+", found[-1].op_str):
            return
        insn = found[-1]
        actual = int(insn.op_str, 0)
        mask = (1 << min(self.p.bits, 64)) - 1
        if (actual - expected) & mask:
            raise self.p.error(f"the branch would go to {actual:#x} instead of {expected:#x}", line)

    def check_branches(self, code: bytes, obj: asm_llvm.ObjectFile,
                       spans: _Spans) -> None:
        addresses = self.addresses(obj)
        for number, (start, end) in spans.items():
            line = self.p.lines[number - 1]
            target = line.resolve(line.target) if line.target else None
            if target in addresses and line.reps == 1:
                self.check_branch(line, code[start:end], self.p.origin + start,
                                  addresses[target])

    def reach_error(self, exc: AssemblyError) -> AssemblyError:
        """LLVM's "too large for field of 1 byte" on a LOOP/JCXZ, in a learner's terms."""
        line = self.p.lines[exc.line - 1] if exc.line else None
        words = strip_comment(line.text).lower().split() if line else []
        branch = next((w for w in words if re.fullmatch(r"loop\w*|j[er]?cxz", w)), None)
        if branch is None or "field of 1 byte" not in exc.reason:
            return exc
        return self.p.error(
            f"the target is out of the reach of {branch.upper()}: LOOP, JCXZ, JECXZ and "
            "JRCXZ reach only -128..+127 bytes; use DEC and JNZ, or TEST and JZ "
            f"({exc.reason})", line)

    def run(self) -> bytes:
        p = self.p
        coded = [line for line in p.lines if line.code and line.reps]
        if not coded:
            return b""
        if sum(line.reps for line in coded) > MAX_OUTPUT or any(l.reps > 64 for l in coded):
            self.size_repetitions(coded)
        try:
            obj, spans = self.llvm()
        except AssemblyError as exc:
            raise self.reach_error(exc) from None
        self.check_total(spans, reps_one=False)
        code = self.link(obj, spans)
        self.check_branches(code, obj, spans)
        return code


@cache
def assembler_version() -> str:
    """What made the bytes: the ziglang wheel and the source of vtlab's assembler.

    Part of every on-disk cache key, so that a new zig or an edited asm.py never meets
    the results of the old one.
    """
    digest = hashlib.sha256()
    for module in (__file__, asm_llvm.__file__):
        digest.update(Path(module).read_bytes())
    return f"{asm_llvm.zig_version()}; vtlab-asm {digest.hexdigest()[:16]}"


def _assemble_uncached(source: str, address: int, bits: int) -> bytes:
    return _Assembly(_Program(source, address, bits)).run()


@lru_cache(maxsize=1024)
def _assemble(source: str, address: int, bits: int) -> bytes:
    """The one funnel every assembly goes through: memory cache, disk cache, LLVM."""
    if _llvm is not _LLVM:  # a test watching or replacing LLVM: keep the disk out of it
        return _assemble_uncached(source, address, bits)
    try:
        version = assembler_version()
    except asm_llvm.LlvmError as exc:  # ziglang is not installed
        raise AssemblyError(str(exc)) from None
    name = asm_cache.key(version, source, address, bits)
    hit = asm_cache.load(name)
    if isinstance(hit, bytes):
        return hit
    if hit is not None:
        message, line = hit
        text = source.splitlines()[line - 1] if line and line <= len(source.splitlines()) else None
        raise AssemblyError(message, line if text is not None else None, text)
    program = _Program(source, address, bits)  # an error of the checks: cheap, not kept
    try:
        code = _Assembly(program).run()
    except AssemblyError as exc:
        if not getattr(exc, "vtlab_transient", False):
            asm_cache.store_error(name, exc.reason, exc.line)
        raise
    asm_cache.store_code(name, code)
    return code


def assemble(source: str, address: int = 0, bits: int = 16) -> bytes:
    """Assemble ``source`` (Intel syntax) for code that will sit at ``address``.

    ``bits`` is the code size: 16 (real mode), 32 (protected mode) or 64 (long mode); a
    ``bits N`` line in the source overrides it (before the first instruction).  Raises
    :class:`AssemblyError` naming the first line that cannot be assembled.  The result
    of a (source, address, bits) is cached: assembling the same text again is free.
    """
    if not isinstance(source, str):
        if isinstance(source, (bytes, bytearray, memoryview)):
            raise AssemblyTypeError(
                "assemble() takes assembly text (a str); bytes are machine code already: "
                "load them as they are with Guest.load(code, address)")
        raise AssemblyTypeError(
            f"assemble() takes assembly text (a str), not {type(source).__name__}")
    if isinstance(bits, bool) or bits not in (16, 32, 64):
        raise AssemblyValueError(f"bits must be 16, 32 or 64, not {bits!r}")
    try:
        address = operator.index(address)
    except TypeError:
        raise AssemblyTypeError(
            f"address must be an integer, not {type(address).__name__}") from None
    if not 0 <= address < 1 << 64:
        raise AssemblyValueError(f"address {address:#x} is outside 0 .. 2**64-1")
    return _assemble(source, address, int(bits))


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

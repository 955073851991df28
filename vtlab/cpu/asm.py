"""Assemble guest source with Keystone and disassemble machine code with Capstone.

The source dialect is Intel syntax as Keystone reads it, with a few NASM habits that
learners bring along translated first:

* ``;`` starts a comment (Keystone would read it as a statement separator),
* ``db``/``dw``/``dd``/``dq`` data with numbers and quoted strings (UTF-8, as NASM),
* ``times N <statement>`` repeats a statement (``N`` a constant expression),
* ``bits 16|32|64`` / ``[bits N]`` and ``org ADDR`` lines are honoured,
* ``$`` is the address of the current line, ``$$`` the program's origin,
* ``name equ expr`` defines a symbol; ``jmp short x``/``jmp near x`` are read as ``jmp x``
  (Keystone knows neither word and picks the shortest encoding itself).

Errors name the offending source line (:class:`vtlab.errors.AssemblyError`); a program may
assemble to at most :data:`MAX_OUTPUT` bytes (1 MiB), and the bytes of each
(source, address, bits) are cached, so assembling the same text again costs nothing.

Keystone 0.9.2 cannot be trusted with arbitrary text: a statement that starts with a
token that is not a name (``[``, ``]``, ``+``, ``,`` ...), a ``{`` in an operand or a
number wider than 64 bits makes it loop forever, and after some errors it carries on
with the next line and silently leaves the bad statement out (``nop / jmp $ / hlt``
assembles to ``90 F4``; ``mov eax,`` followed by another line vanishes).  So every line
is checked here before Keystone sees it, Keystone gets one statement per line, and its
result is verified: the number of statements it read must be the number it was given,
and every line that should produce code must have produced some (the address of each
such line is read back from a table of labels assembled behind the program).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from functools import cache, lru_cache

import capstone
import keystone

from ..errors import AssemblyError

_KS_MODE = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32, 64: keystone.KS_MODE_64}
_CS_MODE = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_DATA = {"db": ".byte", "dw": ".short", "dd": ".long", "dq": ".quad"}
#: Keystone's own data directives, accepted as written (checked like db/dw/dd/dq).
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
_LABEL_NAME = re.compile(r"[A-Za-z_.][\w.$@?]*")
_BRANCHES = re.compile(r"j[a-z]{1,4}|call|loop[a-z]{0,3}|xbegin", re.IGNORECASE)
#: What Keystone reads as a prefix, and then whatever follows it as the next statement.
_PREFIXES = {"lock", "rep", "repe", "repz", "repne", "repnz", "data16", "rex64"}
_PREFIX = re.compile(r"([A-Za-z_][\w.$@?]*)\s*/?(.*)")
_DIRECTIVE = re.compile(r"\[?\s*(bits|org|use16|use32|use64)(?:\s+(.*?))?\s*\]?", re.IGNORECASE)


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
def _ks(bits: int) -> keystone.Ks:
    return keystone.Ks(keystone.KS_ARCH_X86, _KS_MODE[bits])


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
    """The value of a number token as Keystone reads it (0x.., 0b.., ..h, 0.. octal, decimal)."""
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
    """A checked expression: Keystone text, its value if constant, whether it uses $."""

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


class _ExprParser:
    """Recursive descent over :data:`_EXPR_TOKEN` tokens; evaluates what is constant."""

    def __init__(self, text: str, here: str | None, what: str):
        self.tokens, self.what = [], what
        for m in _EXPR_TOKEN.finditer(text):
            kind = m.lastgroup
            tok = m.group(kind)
            if kind == "bad":
                raise _LineError(f"{tok!r} cannot appear in {what}")
            self.tokens.append((kind, tok))
        self.i, self.here, self.dollar, self.out = 0, here, False, []

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def parse(self) -> _Expr:
        if not self.tokens:
            raise _LineError(f"{self.what} is missing")
        value = self.binary(0)
        if self.i < len(self.tokens):
            raise _LineError(f"unexpected {self.tokens[self.i][1]!r} in {self.what}")
        return _Expr(" ".join(self.out), value, self.dollar)

    def binary(self, level: int):
        if level == len(_BINARY):
            return self.unary()
        value = self.binary(level + 1)
        while True:
            kind, tok = self.peek()
            if kind != "op" or tok not in _BINARY[level]:
                return value
            self.take()
            self.out.append(tok)
            rhs = self.binary(level + 1)
            if value is None or rhs is None:
                value = None
            elif tok in ("/", "%"):
                value = _c_div(value, rhs, tok)
            elif tok in ("<<", ">>") and not 0 <= rhs < 64:
                raise _LineError(f"shift by {rhs} in {self.what}: shifts go from 0 to 63")
            else:
                value = _BINARY[level][tok](value, rhs)

    def unary(self):
        kind, tok = self.take()
        if kind == "op" and tok in "-+~!":
            self.out.append(tok)
            value = self.unary()
            if value is None:
                return None
            return {"-": -value, "+": value, "~": ~value, "!": int(not value)}[tok]
        if kind == "op" and tok == "(":
            self.out.append(tok)
            value = self.binary(0)
            if self.take() != ("op", ")"):
                raise _LineError(f"a '(' in {self.what} has no matching ')'")
            self.out.append(")")
            return value
        if kind == "num":
            self.out.append(tok)
            return _number(tok)
        if kind == "chr":
            body = tok[1:-1]
            _check_char_literal(body)
            if len(body) != 1:
                raise _LineError(f"{tok} in {self.what}: a character constant is one character")
            self.out.append(str(ord(body)))
            return ord(body)
        if kind == "d":
            if self.here is None:
                raise _LineError(f"$ cannot be used in {self.what}: it must be a constant")
            self.dollar = True
            self.out.append(self.here)
            return None
        if kind == "dd":
            if self.here is None:
                raise _LineError(f"$$ cannot be used in {self.what}: it must be a constant")
            self.out.append(_START)
            return None
        if kind == "id":
            if self.here is None:
                raise _LineError(f"{self.what} must be a constant: the symbol {tok!r} cannot "
                                 "be used in it")
            if tok.startswith("$"):
                raise _LineError(f"{tok!r}: NASM's $name escape is not supported")
            if tok.startswith(_RESERVED):
                raise _LineError(f"{tok!r}: names starting with {_RESERVED} are vtlab's own")
            self.out.append(tok)
            return None
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

    def keystone(self, reps: int | None = None) -> list[str]:
        """This line's Keystone statements (one per entry), ``reps`` repetitions."""
        reps = self.reps if reps is None else reps
        out = [f"{label}:" for label in self.labels]
        if not self.stmts or reps == 0:
            return out
        marker = f"{_RESERVED}L{self.number}"
        out.append(f"{marker}:")
        if not self.dollar:
            body = [s.replace(_REP, "") for s in self.stmts]
            out.extend(body * reps if reps > 1 else body)
            return out
        for r in range(reps):
            out.append(f"{marker}_{r}:")
            out.extend(self.resolve(s, r) for s in self.stmts)
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
    """Keystone statement(s) for ``db``-style data; (statements, produces bytes)."""
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


def _instruction(code: str, number: int) -> tuple[list[str], bool]:
    """Keystone statement(s) for an instruction line; (statements, uses $)."""
    if not re.match(r"[A-Za-z_]", code):
        raise _LineError(f"{code.split()[0]!r} cannot start a statement: a line holds an "
                         "instruction, a label (name:) or a directive (db, times, bits, org)")
    plain = "".join(text for quote, text in _pieces(code) if not quote)
    for ch, why in (("{", "braces { } (AVX-512 masks) are not supported"),
                    ("}", "braces { } (AVX-512 masks) are not supported"),
                    ("\\", "a backslash cannot appear in an instruction"),
                    ("`", "a backquote cannot appear in an instruction"),
                    ("#", ("# does not start a comment here (Keystone would drop the rest of "
                          "the line silently): comments start with ;"))):
        if ch in plain:
            raise _LineError(why)
    m = re.search(r"([-+~!*/%&|^<>])\s*($|[,\])])", plain)
    if m:  # Keystone reads "mov ax, -" as "mov ax, 0"
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
    _check_brackets(code)
    code = _SIZE_NO_PTR.sub(lambda m: f"{m.group(1)} ptr [", code)  # NASM "word [x]"
    prefixes = []  # Keystone reads "rep movsb" as two statements: give it two lines
    while (m := _PREFIX.match(code)) and m.group(1).lower() in _PREFIXES:
        prefixes.append(m.group(1).lower())
        code = m.group(2).strip()
        if not code:
            return prefixes, False, None
    stmts, dollar, target = _operation(code, number)
    return prefixes + stmts, dollar, target


def _operation(code: str, number: int) -> tuple[list[str], bool, str | None]:
    """Statements for one instruction; (statements, uses $, the symbol a branch goes to)."""
    if not re.match(r"[A-Za-z_]", code) or _LABEL.match(code) or re.match(r"[\w.$@?]+\s*=", code):
        raise _LineError(f"{code.split()[0]!r} cannot follow a prefix: an instruction must")
    mnemonic, operand = re.match(r"(\S+)\s*(.*)", code).groups()
    if _BRANCHES.fullmatch(mnemonic):
        # NASM's "jmp short x" / "jmp near x": Keystone knows neither and picks the size.
        operand = re.sub(r"^(short|near)(\s+|$)", "", operand, flags=re.IGNORECASE).strip()
        code = f"{mnemonic} {operand}".strip()
        if (operand and not re.search(r"[\[\],:'\"]", operand)
                and re.search(r"[-+*/%&|^~()]", operand) and re.search(r"[A-Za-z_.$]", operand)):
            # Keystone cannot branch to "label+n" (nor to $+n): it gets a name of its own.
            target = _expression(operand, "the branch target")
            name = f"{_RESERVED}T{number}{_REP}"
            return [f"{name} = {target.text}", f"{mnemonic} {name}"], target.dollar, name
    code, dollar = _substitute_dollars(code)
    target = None
    if _BRANCHES.fullmatch(mnemonic):
        operand = re.match(r"\S+\s*(.*)", code).group(1).strip()
        if re.fullmatch(rf"[A-Za-z_.][\w.$@?]*|{_HERE}", operand):
            target = operand  # a label (or a register: run() only checks known names)
    return [code], dollar, target


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
        line.stmts, line.dollar, line.target = _instruction(code, line.number)
        line.code, line.what = True, "instruction"

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


# ------------------------------------------------------------------ Keystone
def _ks_asm(text: str, address: int, bits: int) -> tuple[bytes, int]:
    """Keystone on checked text: (code, statements read); raises keystone.KsError."""
    encoding, count = _ks(bits).asm(text.encode("ascii"), address, as_bytes=True)
    return encoding or b"", count


_HINTS = {
    "KS_ERR_ASM_MNEMONICFAIL": "unknown instruction {mnemonic!r}",
    "KS_ERR_ASM_INVALIDOPERAND": "Keystone cannot encode these operands",
    "KS_ERR_ASM_SYMBOL_MISSING": "a label or symbol used here is not defined",
    "KS_ERR_ASM_SYMBOL_REDEFINED": "a label or symbol is defined twice",
    "KS_ERR_ASM_DIRECTIVE_VALUE_RANGE": "a value does not fit {where}",
    "KS_ERR_ASM_EXPR_TOKEN": "an operand is missing or has an unexpected token",
}


def _reason(exc: Exception, line: _Line | None) -> str:
    """Keystone's message, after a hint in a learner's terms where there is one."""
    message = str(exc)
    code = re.search(r"\((KS_ERR_\w+)\)", message)
    hint = _HINTS.get(code.group(1)) if code else None
    if not hint or line is None:
        return message
    words = [w for w in strip_comment(line.text).split() if not w.endswith(":")]
    if words[:1] and words[0].lower() == "times":
        words = words[2:]
    where = ("its operand" if line.what != "data" else
             "(db takes -128..255, dw -32768..65535, dd -2**31..2**32-1)")
    hint = hint.format(mnemonic=words[0] if words else "", where=where)
    return f"{hint} (Keystone: {message})"


class _Assembly:
    def __init__(self, program: _Program):
        self.p = program

    def probe(self, line: _Line, reps: int = 1) -> tuple[bytes, str | None]:
        """Assemble ``line`` alone (every other name defined after it): (code, problem)."""
        own = set(line.labels) | {s.split(" = ")[0] for s in line.stmts if " = " in s}
        others = [f"{name}:" for name in self.p.labels if name not in own]
        others += [f"{name} = 0" for name in self.p.symbols if name not in own]
        text = [f"{_START}:", *line.keystone(reps), *others]
        try:
            code, count = _ks_asm("\n".join(text), self.p.origin, self.p.bits)
        except keystone.KsError as exc:
            return b"", _reason(exc, line)
        except Exception as exc:  # noqa: BLE001 - Keystone must never escape raw
            return b"", f"Keystone failed: {type(exc).__name__}: {exc}"
        if count != len(text) or (line.code and reps and not code):
            return code, ("Keystone could not read this line but reported no error (it would "
                          "have been left out of the program silently); check the operands")
        return code, None

    def locate(self, whole: str) -> AssemblyError:
        for line in self.p.lines:
            if line.stmts or line.labels:
                _, problem = self.probe(line, min(line.reps, 1))
                if problem:
                    return self.p.error(problem, line)
        return self.p.error(whole, None)

    def check_sizes(self) -> None:
        """Fail fast when times lines would add up to more than :data:`MAX_OUTPUT`."""
        total = 0
        for line in self.p.lines:
            if line.code and line.reps > 64:
                code, problem = self.probe(line, 1)
                size = 1 if problem else len(code)  # a problem is reported by the real run
                total += line.reps * size
                if total > MAX_OUTPUT:
                    own = line.reps * size
                    more = "" if own == total else f", {total:,} bytes with the times before it"
                    raise self.p.error(
                        f"times {line.reps:,} of {size} bytes makes {own:,} bytes{more}: a "
                        f"program may take at most 1 MiB ({MAX_OUTPUT:,} bytes, the smallest "
                        "guest memory)", line)

    def check_branch(self, line: _Line, code: bytes, address: int, expected: int) -> None:
        """Disassemble a branch and check that it goes where the source says.

        Keystone encodes LOOP/JCXZ to a label out of their reach (-128..+127) with the
        distance cut to 8 bits, silently: ``loop far`` 200 bytes on goes 56 bytes back.
        """
        found = disassemble(code, address, self.p.bits)
        if not found or not re.fullmatch(r"0x[0-9a-f]+|\d+", found[-1].op_str):
            return
        insn = found[-1]
        actual = int(insn.op_str, 0)
        mask = (1 << min(self.p.bits, 64)) - 1
        if (actual - expected) & mask:
            distance = expected - (insn.address + insn.size)
            wrong = (f"Keystone encoded a branch to {actual:#x} instead of {expected:#x}, "
                     f"{distance:+,} bytes away")
            if re.fullmatch(r"loop\w*|j[er]?cxz", insn.mnemonic):
                raise self.p.error(
                    f"the target is out of the reach of {insn.mnemonic.upper()} ({wrong}): "
                    "LOOP, JCXZ, JECXZ and JRCXZ reach only -128..+127 bytes; use DEC and "
                    "JNZ, or TEST and JZ", line)
            raise self.p.error(f"the branch would go to the wrong place ({wrong})", line)

    def run(self) -> bytes:
        p = self.p
        coded = [line for line in p.lines if line.code and line.reps]
        if not coded:
            return b""
        self.check_sizes()
        text = [f"{_START}:"]
        for line in p.lines:
            text.extend(line.keystone())
        markers = [f"{_RESERVED}L{line.number}" for line in coded] + [_END]
        known = set(p.labels) | set(p.symbols)
        branches = [(line, line.resolve(line.target)) for line in coded
                    if line.target and line.reps == 1
                    and (line.target in known or line.target.startswith((_RESERVED, _HERE)))]
        markers += [name for _, name in branches]
        text += [f"{_END}:", ".quad " + ", ".join(markers)]
        try:
            code, count = _ks_asm("\n".join(text), p.origin, p.bits)
        except keystone.KsError as exc:
            raise self.locate(_reason(exc, None)) from None
        except Exception as exc:  # noqa: BLE001 - Keystone must never escape raw
            raise self.locate(f"Keystone failed: {type(exc).__name__}: {exc}") from None
        if count != len(text) or len(code) < 8 * len(markers):
            raise self.locate("Keystone left statements out without reporting an error")
        table = code[-8 * len(markers):]
        code = code[: -8 * len(markers)]
        starts = [int.from_bytes(table[i:i + 8], "little") for i in range(0, len(table), 8)]
        targets = starts[len(coded) + 1:]
        starts = starts[: len(coded) + 1]
        if (starts[-1] - p.origin) % (1 << 64) != len(code) or starts[0] != p.origin:
            raise self.locate("Keystone placed the program's lines where vtlab cannot follow")
        for line, start, end in zip(coded, starts, starts[1:]):
            if end <= start:
                _, problem = self.probe(line, 1)
                raise p.error(problem or "Keystone produced no code for this line (it would "
                              "have been left out of the program silently)", line)
        where = dict(zip((line.number for line in coded), zip(starts, starts[1:])))
        for (line, _), expected in zip(branches, targets):
            start, end = where[line.number]
            self.check_branch(line, code[start - p.origin:end - p.origin], start, expected)
        if len(code) > MAX_OUTPUT:
            raise p.error(f"the program assembles to {len(code):,} bytes: a program may take at"
                          f" most 1 MiB ({MAX_OUTPUT:,} bytes, the smallest guest memory)", None)
        return _fix_keystone(code, p.origin, p.bits)


@lru_cache(maxsize=256)
def _assemble(source: str, address: int, bits: int) -> bytes:
    return _Assembly(_Program(source, address, bits)).run()


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

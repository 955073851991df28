"""What a careless learner types must come out of vtlab.cpu.asm as an AssemblyError naming
the line - never as a raw traceback, a hang, a silently shortened program or a huge one.

Expected bytes are hand-assembled from the SDM (Vol. 2) opcode tables: EB cb is JMP rel8,
E2 cb LOOP rel8, 90 NOP, F4 HLT, F3 the REP prefix, A4 MOVSB, 0F 01 /2 LGDT.
"""
from __future__ import annotations

import random
import threading

import pytest

from vtlab import AssemblyError
from vtlab.cpu import asm


def run(source, address=0, bits=16, timeout=20.0):
    """``asm.assemble`` in a thread, so that a hang (of the assembler, or of the checks
    in front of it) fails the test instead of hanging the run."""
    box = {}

    def work():
        try:
            box["code"] = asm.assemble(source, address, bits)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"assembling {source!r} hangs"
    if "error" in box:
        raise box["error"]
    return box["code"]


def error(source, address=0, bits=16) -> AssemblyError:
    with pytest.raises(AssemblyError) as info:
        run(source, address, bits)
    return info.value


def assert_error(source, line, *words, bits=16):
    exc = error(source, bits=bits)
    assert exc.line == line, str(exc)
    assert exc.text == source.splitlines()[line - 1]
    assert f"line {line}" in str(exc)
    for word in words:
        assert word.lower() in exc.reason.lower(), str(exc)
    return exc


# ------------------------------------------------------------------------ times
@pytest.mark.parametrize("stmt, words", [
    ("times x nop", ["times", "count"]),
    ("times -1 nop", ["negative"]),
    ("times 0x nop", ["'0x' is not a number"]),
    ("times 5", ["statement to repeat"]),
    ("times", ["count"]),
    ("times 08 nop", ["octal"]),
    ("times 1.5 nop", ["floating-point"]),
    ("times 510-($-$$) db 0", ["constant"]),
    ("times 3 times 2 nop", ["another times"]),
    ("times 3 again: nop", ["label"]),
    ("times 2 bits 32", ["bits"]),
    ("times 2 org 0x100", ["org"]),
])
def test_times_with_a_bad_count_or_statement(stmt, words):
    assert_error(f"nop\n{stmt}\nhlt", 2, *words)


def test_times_counts_are_constant_expressions():
    assert run("times 2*3 nop") == b"\x90" * 6
    assert run("times (1 << 2) db 0x41") == b"A" * 4
    assert run("times 0 nop\nhlt") == b"\xf4"


def test_a_huge_times_fails_at_once_with_the_limit():
    exc = assert_error("nop\ntimes 100000000 nop", 2, "1 MiB", f"{asm.MAX_OUTPUT:,}")
    assert "100,000,000" in exc.reason


def test_times_below_the_count_limit_is_still_held_to_1_mib_of_code():
    # 1,000,000 repetitions of a 7-byte instruction: caught before 7 MB are assembled.
    assert_error("times 1000000 mov eax, [ebx+ecx*4+0x12345678]", 1, "7,000,000", "1 MiB",
                 bits=32)
    # ... and so is the sum of several.
    assert_error("times 600000 nop\ntimes 600000 nop", 2, "1,200,000", "1 MiB")


# -------------------------------------------------------------------------- org
@pytest.mark.parametrize("stmt, words", [
    ("org", ["org needs"]),
    ("org foo", ["constant", "foo"]),
    ("org -5", ["between 0"]),
    ("org 0x", ["not a number"]),
    ("[org]", ["org needs"]),
])
def test_org_misuse(stmt, words):
    assert_error(f"nop\n{stmt}\nnop", 2, *words)


def test_org_twice_with_code_between():
    exc = assert_error("org 0x100\nnop\norg 0x200\nnop", 3, "org given twice", "line 1")
    assert "0x100" in exc.reason
    # The same origin again changes nothing.
    assert run("org 0x100\nnop\norg 0x100\nmov ax, $") == bytes.fromhex("90 b8 01 01")


def test_org_sets_the_origin_of_the_whole_program_wherever_it_stands():
    # MOV AX, imm16 is B8 iw: $ of line 1 is the origin 0x7C00, NASM's rule.
    assert run("mov ax, $\nmov bx, $$\norg 0x7c00") == bytes.fromhex("b8 00 7c bb 00 7c")


# --------------------------------------------------------------------- non-ASCII
def test_non_ascii_in_comments_simply_works():
    assert run("nop ; café, naïve “quotes” and 漢字\n; ÿ only\nhlt") == b"\x90\xf4"


def test_non_ascii_in_an_immediate():
    exc = assert_error("nop\nmov al, 'é'", 2, "ascii", "U+00E9")
    assert "C3 A9" in exc.reason  # the UTF-8 bytes, for whoever wants them


def test_non_ascii_in_db_strings_is_utf8_as_in_nasm():
    assert run('db "héllo", 0') == "héllo".encode() + b"\0"


@pytest.mark.parametrize("source, line, words", [
    ("lébel: nop", 1, ["non-ascii", "U+00E9"]),
    ("nop\nmov eax, ebx × 2", 2, ["non-ascii", "U+00D7"]),
    ("nop\njmp ünter", 2, ["non-ascii"]),
    ("mov al, ‘a’", 1, ["typographic"]),
    ("db 1 − 2", 1, ["typographic"]),
    ("nop\x00 hidden", 1, ["control character"]),
])
def test_non_ascii_and_control_characters_elsewhere(source, line, words):
    assert_error(source, line, *words)


def test_unicode_spaces_pasted_from_a_web_page_are_spaces():
    assert run("mov\u00a0ax,\u2009 1\n\u200bhlt") == bytes.fromhex("b8 01 00 f4")


@pytest.mark.parametrize("failure", [
    UnicodeEncodeError("ascii", "é", 0, 1, "ordinal not in range(128)"),
    UnicodeDecodeError("ascii", b"\xe9", 0, 1, "ordinal not in range(128)"),
    MemoryError(),
])
def test_anything_the_assembler_raises_becomes_an_assembly_error(monkeypatch, failure):
    def broken(text):
        raise failure

    monkeypatch.setattr(asm, "_llvm", broken)
    exc = error("nop\nmov ax, 0x4242  ; unique to this test")
    assert exc.line is None  # not the program's fault: no line to blame
    assert type(failure).__name__ in exc.reason


# ------------------------------------------------------------------ bits, data
@pytest.mark.parametrize("source, line, words", [
    ("bits 8\nnop", 1, ["16, 32 or 64", "'8'"]),
    ("bits\nnop", 1, ["bits needs"]),
    ("[bits 8]\nnop", 1, ["16, 32 or 64"]),
    ("nop\nbits 32\nnop", 2, ["after code"]),
])
def test_bad_bits(source, line, words):
    assert_error(source, line, *words)


def test_bits_before_code_and_repeated_is_fine():
    assert run("[bits 32]\nbits 32\nmov eax, 1\nbits 32") == bytes.fromhex("b8 01 00 00 00")
    assert run("use64\nmov rax, 1", bits=16) == bytes.fromhex("48 c7 c0 01 00 00 00")


@pytest.mark.parametrize("source, words", [
    ("db", ["at least one value"]),
    ("dw   ; nothing", ["at least one value"]),
    ("dd 0x1ffffffff", ["does not fit", "dd takes"]),
    ("db 256", ["db takes -128..255"]),
    ("dw -32769", ["dw takes"]),
    ("dq -9223372036854775809", ["dq takes"]),
    ("dq 0x10000000000000000", ["at most 64 bits"]),
    ("db 1,", ["empty"]),
    ("db 1,,2", ["empty"]),
    ("db ,1", ["empty"]),
    ("db ]", ["']'"]),
    ("db 1 2", ["unexpected '2'"]),
    ("db 1/0", ["division by zero"]),
    ("dd 1.5", ["floating-point"]),
    ("db 'ab'+1", ["one character"]),
    ("db (1", ["no matching"]),
    (".align 16", ["not supported"]),
    (".rept 1000000000", ["not supported"]),
])
def test_bad_data(source, words):
    assert_error(f"nop\n{source}\nhlt", 2, *words)


def test_data_still_works():
    assert run("msg: db 'hi', 0\ndw msg\ndd -1\ndq 1\ndb ''\n.byte 7") == (
        b"hi\0" + b"\0\0" + b"\xff" * 4 + (1).to_bytes(8, "little") + b"\x07")
    assert run("db 'a'+1, 0ffh, 010, 0b11, -1") == bytes([0x62, 0xFF, 8, 3, 0xFF])
    # Arithmetic follows NASM's precedence (LLVM's GNU rules would give 1+(2<<3) = 17),
    # in data and in instructions alike (B8 iw: MOV AX, imm16).
    assert run("db 1 + 2 << 3") == bytes([24])
    assert run("mov ax, 1 + 2 << 3") == bytes.fromhex("b8 18 00")


# --------------------------------------------------------------- not a program
@pytest.mark.parametrize("source", [None, 5, 3.5, ["nop"], b"\x90", bytearray(b"\x90")])
def test_a_source_that_is_not_text(source):
    with pytest.raises(AssemblyError) as info:
        asm.assemble(source)
    assert isinstance(info.value, TypeError)
    assert "str" in str(info.value)
    if isinstance(source, (bytes, bytearray)):
        assert "machine code" in str(info.value)


@pytest.mark.parametrize("kwargs, kind", [
    ({"bits": 8}, ValueError), ({"bits": True}, ValueError), ({"bits": None}, ValueError),
    ({"address": -1}, ValueError), ({"address": 1 << 64}, ValueError),
    ({"address": "0x1000"}, TypeError),
])
def test_bad_arguments(kwargs, kind):
    with pytest.raises(AssemblyError) as info:
        asm.assemble("nop", **kwargs)
    assert isinstance(info.value, kind)


# ------------------------------------------------------------------------- $
@pytest.mark.parametrize("bits", [16, 32, 64])
def test_jmp_dollar_is_not_dropped(bits):
    # Keystone 0.9.2 alone assembled this to 90 F4: the JMP vanished (issue #14).
    assert run("nop\njmp $\nhlt", bits=bits) == bytes.fromhex("90 eb fe f4")


def test_dollar_arithmetic():
    assert run("jmp $+2\nnop") == bytes.fromhex("eb 00 90")
    assert run("nop\njmp short $-1") == bytes.fromhex("90 eb fd")
    assert run("loop $") == bytes.fromhex("e2 fe")
    assert run("times 3 jmp $") == bytes.fromhex("eb fe") * 3
    assert run("times 2 dw $", 0x1000) == bytes.fromhex("00 10 02 10")
    assert run("nop\nmov ax, [$+4]", 0x100) == bytes.fromhex("90 a1 05 01")
    assert run("nop\ndw $$, $", 0x1000) == bytes.fromhex("90 00 10 01 10")
    assert run("start: nop\njmp start+1") == bytes.fromhex("90 eb fe")
    assert run("msg: db 'hello'\nlen equ $ - msg\nmov cx, len") == b"hello" + bytes.fromhex(
        "b9 05 00")


# -------------------------------------------------------- silently dropped lines
@pytest.mark.parametrize("source, line", [
    ("mov eax,\nnop", 1),            # Keystone accepted this and dropped it silently
    ("nop\nmov eax,\nnop", 2),
    ("nop\nadd eax\nnop", 2),
    ("nop\nout dx\nhlt", 2),
    ("nop\nmov ax, word\nhlt", 2),   # accepted by Keystone, silently empty
    ("nop\nx =\nnop", 2),
    ("nop\nmov ax, -\nhlt", 2),      # Keystone read "mov ax, 0"
    ("mov ax, [bx\nhlt", 1),         # Keystone (and LLVM) read "mov ax, [0]"
    ("mov eax, 1 ]\nhlt", 1),        # Keystone ignored the "]"
    ("mov ax, 1 # 2\nhlt", 1),       # "#" would drop the rest of the line
    ("nop\nmov ax, 0x1ffffffffffffffffff\nnop", 2),
    ("jmp $\n$: nop", 2),
])
def test_missing_or_broken_operands_are_reported_not_dropped(source, line):
    assert_error(source, line)


def test_the_guard_reports_a_statement_the_assembler_leaves_out(monkeypatch):
    """An assembler that skipped a statement without an error (as Keystone skipped
    "jmp $" after a failed parse) is caught by the per-line addresses and pinned to
    its line."""
    real = asm._llvm

    def forgetful(text):
        return real("\n".join(l for l in text.split("\n") if l != "inc ax"))

    monkeypatch.setattr(asm, "_llvm", forgetful)
    exc = assert_error("nop\nnop\ninc ax\nhlt ; guard test", 3)
    assert "silently" in exc.reason


@pytest.mark.parametrize("source, line", [
    ("[", 1), ("nop\n]\nnop", 2), ("foo: [", 1), ("nop\n, eax", 2), ("+", 1), ("a: :", 1),
    ("shl = dx [ 'a'", 1), ("jmp cr0 { )", 1), ("lock+ edi", 1), ("rep movsb = eax 08", 1),
    ("rep label: nop", 1), ("$$: nop", 1), ("@@: nop", 1), ("nop\n.byte ,1", 2),
    ("dq 0x10000000000000000\nnop", 1), ("mov ax, \\", 1), ("nop\n'a'", 2), ("1: nop", 1),
])
def test_what_hung_keystone_is_refused(source, line):
    # Every one of these made Keystone 0.9.2 loop forever; they are still errors.
    assert_error(source, line)


# --------------------------------------------------------- existing behaviour
def test_labels_prefixes_and_operand_sizes():
    assert run("start:\n  rep movsb\n  REP/movsb\n  lock\n  jmp start") == bytes.fromhex(
        "f3 a4 f3 a4 f0 eb f9")
    # No stray 66H: LGDT in 32-bit code is 0F 01 /2 with a 32-bit base, RETF in 16-bit
    # code CB (CA iw with a count), RETF in 32-bit code CB too.
    assert run("lgdt [0x600]", 0, 32) == bytes.fromhex("0f 01 15 00 06 00 00")
    assert run("retf", 0, 16) == bytes.fromhex("cb")
    assert run("retf 6", 0, 16) == bytes.fromhex("ca 06 00")
    assert run("retf", 0, 32) == bytes.fromhex("cb")
    assert run("mov word [bx], 5") == bytes.fromhex("c7 07 05 00")
    assert run("mov al, ';'   ; a semicolon") == bytes.fromhex("b0 3b")
    assert run("") == b"" and run("; only a comment\nlabel:") == b""


def test_error_line_numbers_count_blank_and_comment_lines():
    assert_error("\n; setup\n\n  mov ax, 1\n  jmp nowhere\n  hlt", 5, "not defined")
    assert_error("mov ax, 1\nmov bx, 2\nfrobnicate ax\nhlt", 3, "unknown instruction")
    assert_error("a: nop\nb: nop\na: hlt", 3, "already defined", "line 1")


def test_the_same_text_assembles_once():
    source = "mov ax, 0x1234\nmov [0x500], ax\nhlt ; cached"
    first = asm.assemble(source, 0x1000, 16)
    assert asm.assemble(source, 0x1000, 16) is first
    assert asm.assemble(source, 0x2000, 16) == first  # another key, the same bytes here


# ------------------------------------------------------------------- property
_TOKENS = ["mov", "add", "jmp", "call", "out", "in", "push", "lgdt", "rep", "lock", "times",
           "db", "dw", "dd", "dq", "org", "bits", "equ", "label:", "x =", ".byte", "eax", "ax",
           "al", "dx", "cr0", "es", "[", "]", "(", ")", "{", "}", "+", "-", "*", ",", ":", "=",
           "$", "$$", "@", "?", "!", "~", "#", "\\", "'", '"', "'a'", '"ab"', "1", "0x10", "08",
           "0ffh", "1.5", "0x1ffffffffffffffffff", "short", "byte", "ptr", ";", "é", "\u00a0",
           "“", "\t", "漢"]
_CHARS = "".join(chr(c) for c in range(32, 127)) + "\té€ü漢\u00a0\u2019\x00\x7f"


def _garbage(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return " ".join(rng.choice(_TOKENS) for _ in range(rng.randint(0, 6)))
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, 16)))


def test_random_garbage_gives_code_or_an_assembly_error():
    rng = random.Random(20240611)
    lines = [_garbage(rng) for _ in range(4000)]

    def work():
        outcomes = {"code": 0, "error": 0}
        for k, line in enumerate(lines):
            source = f"nop\n{line}\nhlt" if k % 2 else line
            try:
                asm.assemble(source, 0x1000, (16, 32, 64)[k % 3])
                outcomes["code"] += 1
            except AssemblyError as exc:
                assert exc.line in (None, 1, 2), (source, exc)
                outcomes["error"] += 1
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"{source!r} escaped as {type(exc).__name__}: {exc}")
        return outcomes

    box = {}
    thread = threading.Thread(target=lambda: box.update(r=_safe(work)), daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "some garbage line hangs the assembler"
    outcome = box["r"]
    if isinstance(outcome, BaseException):
        raise outcome
    assert outcome["code"] > 0 and outcome["error"] > 0


def _safe(fn):
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
        return exc


def test_the_assembler_only_sees_checked_text(monkeypatch):
    """Every text handed to LLVM is plain ASCII, one statement per line."""
    seen = []
    real = asm._llvm

    def spy(text):
        seen.append(text)
        return real(text)

    monkeypatch.setattr(asm, "_llvm", spy)
    rng = random.Random(7)
    for k in range(400):
        try:
            asm.assemble(f"nop\n{_garbage(rng)}\nhlt ; spy {k}", 0, 32)
        except AssemblyError:
            pass
    assert seen
    for text in seen:
        assert text.isascii() and "{" not in text
        for statement in text.split("\n"):
            assert statement[:1].isalpha() or statement[:1] in "_.", statement


@pytest.mark.parametrize("source, line, bits", [
    ("loop far\ntimes 200 nop\nfar: hlt", 1, 16),      # LOOP rel8: Keystone cut +200 to -56
    ("back: times 200 nop\nloop back", 2, 16),
    ("nop\njcxz far\ntimes 130 nop\nfar: hlt", 2, 16),
    ("jecxz far\ntimes 130 nop\nfar: hlt", 1, 32),
    ("jrcxz far\ntimes 130 nop\nfar: hlt", 1, 64),
])
def test_a_loop_out_of_reach_is_reported_not_wrapped(source, line, bits):
    assert_error(source, line, "-128..+127", "reach", bits=bits)


def test_branches_in_reach_and_relaxed_jumps_are_untouched():
    assert run("loop next\ntimes 100 nop\nnext: hlt")[:2] == bytes.fromhex("e2 64")
    code = run("jz far\ntimes 200 nop\nfar: hlt", 0, 32)     # JZ rel32: 0F 84 cd
    assert code[:6] == bytes.fromhex("0f 84 c8 00 00 00")


# ------------------------------------------------------- NASM meaning, not LLVM's
@pytest.mark.parametrize("source, address, bits, code", [
    # A bare symbol is its address or value (B8 iw), not memory as in MASM/LLVM.
    ("mov ax, msg\nmsg: db 0", 0x100, 16, "b8 03 01 00"),
    ("size equ 4\nmov eax, size\nmov bl, size", 0, 32, "b8 04 00 00 00 b3 04"),
    ("push msg\nmsg:", 0x1000, 32, "68 05 10 00 00"),
    # A constant branch target is an address (EB cb / E9 cw), far pointers EA/9A.
    ("jmp 0x1010", 0x1000, 16, "eb 0e"),
    ("call 0x2000", 0x1000, 32, "e8 fb 0f 00 00"),
    ("jmp 0x8:0x1000", 0, 32, "ea 00 10 00 00 08 00"),
    ("call 0x10:there\nthere: hlt", 0x500, 16, "9a 05 05 10 00 f4"),
    # In 64-bit code an absolute address is reached RIP-relative (as Keystone did): a
    # disp32 at or above 2 GiB would be sign-extended (0xFFFFFFFF80000000).  Only the
    # top 2 GiB, out of RIP's reach, take the SIB form with a sign-extended disp32.
    ("mov qword ptr [0x80000000], 1", 0x1000, 64, "48 c7 05 f5 ef ff 7f 01 00 00 00"),
    ("mov eax, [0x500]", 0x1000, 64, "8b 05 fa f4 ff ff"),
    ("mov eax, [-8]", 0x1000, 64, "8b 04 25 f8 ff ff ff"),
    ("int1", 0, 16, "f1"),
])
def test_nasm_meanings(source, address, bits, code):
    assert run(source, address, bits) == bytes.fromhex(code)


@pytest.mark.parametrize("source, bits, words", [
    ("mov al, 300", 16, ["does not fit", "8-bit"]),       # LLVM alone: mov al, 44
    ("mov ax, 0x12345", 16, ["does not fit", "16-bit"]),
    ("mov ax, [0x12345]", 16, ["does not fit", "0xffff"]),  # LLVM alone: [0x2345]
    ("dw far_away\ntimes 70000 nop\nfar_away:", 16, ["does not fit"]),
    ("retf 0x10000", 16, ["0..65535"]),
    ("mov rax, [0x100000000]", 64, ["out of reach", "register"]),
])
def test_values_that_do_not_fit_are_errors_not_cut(source, bits, words):
    assert_error(source, 1, *words, bits=bits)


def test_the_disk_cache_serves_bytes_and_errors(monkeypatch, tmp_path):
    from vtlab.cpu import asm_cache

    monkeypatch.setenv("VTLAB_ASM_CACHE", str(tmp_path))
    asm_cache.folder.cache_clear()
    try:
        source = "mov ax, 0x4711\nhlt ; disk cache test"
        code = asm._assemble.__wrapped__(source, 0, 16)
        assert list(tmp_path.rglob("*.bin"))          # written ...
        calls = []
        monkeypatch.setattr(asm_cache, "store_code", lambda *a: calls.append(a))
        assert asm._assemble.__wrapped__(source, 0, 16) == code
        assert not calls                              # ... and read back, not re-made
        with pytest.raises(AssemblyError) as first:
            asm._assemble.__wrapped__("nop\nfrobnicate ax ; disk", 0, 16)
        with pytest.raises(AssemblyError) as again:
            asm._assemble.__wrapped__("nop\nfrobnicate ax ; disk", 0, 16)
        assert str(again.value) == str(first.value) and again.value.line == 2
        for entry in tmp_path.rglob("*.bin"):         # a damaged entry is ignored
            entry.write_bytes(b"junk")
        assert asm._assemble.__wrapped__(source, 0, 16) == code
    finally:
        monkeypatch.delenv("VTLAB_ASM_CACHE")
        asm_cache.folder.cache_clear()


def test_the_disk_cache_can_be_turned_off(monkeypatch):
    from vtlab.cpu import asm_cache

    monkeypatch.setenv("VTLAB_ASM_CACHE", "off")
    asm_cache.folder.cache_clear()
    try:
        assert asm_cache.folder() is None
        assert asm_cache.load("0" * 64) is None
        asm_cache.store_code("0" * 64, b"\x90")      # a no-op, no error
    finally:
        monkeypatch.delenv("VTLAB_ASM_CACHE")
        asm_cache.folder.cache_clear()

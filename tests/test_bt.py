"""The toy binary translator: rewriting, layout, and equivalence with native runs."""
from __future__ import annotations

import pytest

from vtlab import asm, bt, rings

CLI_SGDT = """
    cli
    sgdt [0x600]
    sidt [0x608]
    pushfd
    pop eax
    smsw bx
    str cx
    sldt dx
    hlt
"""

LOOP = """
    mov ecx, 5
    xor eax, eax
again:
    add eax, ecx
    dec ecx
    jnz again
    pushfd
    cli
    pushfd
    pop ebx
    popfd
    pushfd
    pop edx
    hlt
"""

CALL = """
    call f
    mov esi, eax
    hlt
f:
    mov eax, cr0
    mov ax, cs
    push cs
    pop cx
    ret
"""

PORTS = """
    mov al, 'h'
    out 0xe9, al
    mov al, 'i'
    mov dx, 0xe9
    out dx, al
    in al, 0x60
    mov ecx, 3
l:  loop l
    hlt
"""

LGDT = """
    mov dword ptr [0x700], 0x12345678
    mov word ptr [0x6fe], 0x1f
    lgdt [0x6fe]
    sgdt [0x710]
    mov ebx, 0x5000
    mov cr3, ebx
    mov ecx, cr3
    hlt
"""


def test_translation_keeps_innocuous_bytes_and_calls_stubs():
    code = rings.assemble(LOOP, 0x20000, 32)
    t = bt.translate(code, 0x20000, 32)
    assert [(b.guest_start, b.tc_address, b.instructions, b.sites) for b in t.blocks] == [
        (0x20000, 0x60000, 2, 0), (0x20007, 0x60007, 3, 0), (0x2000C, 0x60010, 8, 6)]
    tc = asm.disassemble(t.code, t.tc_address, 32)
    texts = [i.text for i in tc if i.address < t.stub_address]
    assert texts[:5] == ["mov ecx, 5", "xor eax, eax", "add eax, ecx", "dec ecx",
                         "jne 0x60007"]          # JNZ re-targeted into the TC (rel32)
    # byte-identical copies of the innocuous instructions
    assert t.code[:7] == code[:7]
    # every sensitive instruction became a 5-byte CALL into the stubs
    assert [s.text for s in t.sites] == ["pushfd", "cli", "pushfd", "popfd", "pushfd", "hlt"]
    for s in t.sites:
        assert s.stub_address >= t.stub_address
    calls = [i for i in tc if i.address < t.stub_address and i.mnemonic == "call"]
    assert len(calls) == 6 and all(i.size == 5 for i in calls)
    assert t.entry == 0x60000 and t.halt_address == t.code.rindex(b"\xf4") + t.tc_address


@pytest.mark.parametrize("source, counts", [
    (CLI_SGDT, dict(guest_instructions=9, tc_instructions=9, stub_instructions=41,
                    sensitive_translated=8, sensitive_executed=8, blocks=1)),
    (LOOP, dict(guest_instructions=25, tc_instructions=25, stub_instructions=69,
                sensitive_translated=6, sensitive_executed=6, blocks=3)),
    (CALL, dict(guest_instructions=8, tc_instructions=8, stub_instructions=15,
                sensitive_translated=4, sensitive_executed=4, blocks=3)),
    (PORTS, dict(guest_instructions=11, tc_instructions=14, stub_instructions=27,
                 sensitive_translated=4, sensitive_executed=4, blocks=3)),
    (LGDT, dict(guest_instructions=8, tc_instructions=8, stub_instructions=21,
                sensitive_translated=5, sensitive_executed=5, blocks=1)),
])
def test_translated_run_matches_native(source, counts):
    r = bt.run_translated(source)
    assert r.differences == []
    assert r.matches_native
    assert {k: getattr(r, k) for k in counts} == counts
    assert r.overhead == pytest.approx((r.tc_instructions + r.stub_instructions)
                                       / r.guest_instructions)


def test_virtual_state_is_the_guests_own():
    r = bt.run_translated(CLI_SGDT)
    # native CPL 0: CLI really cleared IF; SGDT showed the guest's GDT at 0x90000
    assert (r.native["IF"], r.native["GDTR"], r.native["eax"]) == (0, (0x90000, 0x47), 0x2)
    # translated CPL 3: the same, from the virtual CPU
    assert (r.translated["IF"], r.translated["GDTR"], r.translated["eax"]) == (0, (0x90000, 0x47), 0x2)
    assert r.translated["memory"][0x600:0x606] == bytes.fromhex("470000000900")
    assert (r.translated["ebx"] & 0xFFFF, r.translated["ecx"] & 0xFFFF,
            r.translated["edx"] & 0xFFFF) == (0x31, 0x38, 0x0)
    assert r.untranslated == "trapped: #GP(0) at 0x20000 (CPL 3) cli"


def test_popf_restores_virtual_if():
    r = bt.run_translated(LOOP)
    assert (r.native["eax"], r.native["ebx"] >> 9 & 1, r.native["edx"] >> 9 & 1) == (15, 0, 1)
    # ZF and PF from the last DEC, IF from the virtual CPU: 0x46, then 0x246 after POPFD
    assert (r.translated["ebx"], r.translated["edx"]) == (0x46, 0x246)
    assert r.translated["IF"] == 1


def test_cs_reads_show_cpl_0_and_cr_moves_hit_the_vcpu():
    r = bt.run_translated(CALL)
    assert (r.translated["esi"] & 0xFFFF, r.translated["ecx"] & 0xFFFF) == (0x8, 0x8)
    l = bt.run_translated(LGDT)
    assert l.translated["GDTR"] == (0x12345678, 0x1F) == l.native["GDTR"]
    assert l.translated["CR3"] == 0x5000 == l.translated["ecx"]


def test_port_output_goes_to_the_virtual_device():
    r = bt.run_translated(PORTS)
    assert r.native["output"] == r.translated["output"] == [(0xE9, ord("h")), (0xE9, ord("i"))]
    assert r.translated["eax"] & 0xFF == 0xFF
    assert r.untranslated == "trapped: #GP(0) at 0x20002 (CPL 3) out 0xe9, al"


def test_untranslated_sgdt_silently_leaks_the_vmm_tables():
    r = bt.run_translated("sgdt [0x600]\nsidt [0x608]\nhlt")
    assert r.matches_native
    assert r.untranslated == "ran to HLT with wrong results"
    assert ("memory differs from offset 0x600: 47 00 00 00 09 00 00 00 vs "
            "ff 03 00 00 05 00 00 00") in r.untranslated_differences


@pytest.mark.parametrize("source, message", [
    ("mov ebx, 8\nlar eax, ebx\nhlt", "`lar eax, ebx` is sensitive or a far transfer"),
    ("jmp eax\nhlt", "`jmp eax` is an indirect branch"),
    ("sgdt [esp]\nhlt", "memory operands based on ESP"),
    ("nop", "falls off the end of the guest code"),
])
def test_unsupported_code_is_refused(source, message):
    with pytest.raises(bt.TranslationError, match=message.replace("[", r"\[")):
        bt.translate(rings.assemble(source, 0x20000, 32), 0x20000, 32)


def test_only_32_bit():
    with pytest.raises(bt.TranslationError):
        bt.translate(b"\x90\xf4", 0x1000, 64)
    with pytest.raises(ValueError):
        bt.run_translated("hlt", mode="long")

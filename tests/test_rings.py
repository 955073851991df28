"""The ring lab: classification by experiment, Robin & Irvine, the red pill."""
from __future__ import annotations

import pytest

from vtlab import rings


@pytest.fixture(scope="module")
def table():
    return rings.probe_all()


# ------------------------------------------------------------- single probes
@pytest.mark.parametrize("text", ["cli", "sti", "hlt", "lgdt [0x600]", "lidt [0x600]",
                                  "mov eax, cr0", "mov eax, cr3", "clts", "wbinvd",
                                  "invlpg [0x600]", "in al, 0x80", "out 0x80, al"])
def test_privileged(text):
    p = rings.probe(text)
    assert (p.category, p.cpl0, p.cpl3) == ("privileged", "ok", "#GP(0)")
    assert p.depends_on == ()


def test_cli_evidence_mentions_iopl():
    p = rings.probe("cli")
    assert p.evidence == ("#GP(0) at CPL 3 on `cli`, runs at CPL 0: the trap lets a VMM "
                          "emulate it; but it runs at CPL 3 with EFLAGS.IOPL = 3 instead of 0")


@pytest.mark.parametrize("text, depends_on", [
    ("sgdt [0x600]", ("GDTR",)),
    ("sidt [0x600]", ("IDTR",)),
    ("sldt ax", ("LDTR",)),
    ("str ax", ("TR",)),
    ("smsw ax", ("CR0",)),
    ("pushfd", ("IF", "IOPL")),
    ("push 0x2\npopfd", ("CPL", "IOPL")),
    ("mov ebx, 0x08\nlar eax, ebx", ("CPL", "DPL")),
    ("mov ebx, 0x08\nlsl eax, ebx", ("CPL", "DPL")),
    ("mov ebx, 0x08\nverr bx", ("CPL", "DPL")),
    ("mov ebx, 0x10\nverw bx", ("CPL", "DPL")),
    ("push cs", ("CPL",)),
    ("mov ax, cs", ("CPL",)),
])
def test_sensitive_unprivileged(text, depends_on):
    p = rings.probe(text)
    assert (p.category, p.cpl0, p.cpl3) == ("sensitive-unprivileged", "ok", "ok")
    assert p.depends_on == depends_on


def test_sgdt_evidence():
    p = rings.probe("sgdt [0x600]")
    assert p.evidence == ("SGDT stored base 0x90000 limit 0x6f vs base 0x50000 limit 0x3ff "
                          "after the GDT moved")


def test_sidt_evidence():
    assert rings.probe("sidt [0x600]").evidence == (
        "SIDT stored base 0x91000 limit 0x7ff vs base 0x51000 limit 0xfff after the IDT moved")


def test_smsw_and_popf_evidence():
    assert rings.probe("smsw ax").evidence == (
        "EAX 0x11110031 vs 0x1111003b after the VMM set CR0.TS and CR0.MP")
    assert rings.probe("push 0x2\npopfd").evidence == (
        "EFLAGS bits it changed: IF vs none at CPL 0 vs CPL 3; "
        "EFLAGS bits it changed: none vs IF with EFLAGS.IOPL = 3 instead of 0")
    assert rings.probe("pushfd").evidence == (
        "stack [top-0x4] 0x202 vs 0x2 with the real EFLAGS.IF cleared; "
        "stack [top-0x4] 0x202 vs 0x3202 with EFLAGS.IOPL = 3 instead of 0")
    assert rings.probe("push cs").evidence == "stack [top-0x2] 0x8 vs 0x23 at CPL 0 vs CPL 3"


@pytest.mark.parametrize("text", ["add eax, ebx", "mov eax, 0x1234", "nop", "xchg eax, ebx",
                                  "mov eax, 1\ncpuid"])
def test_innocuous(text):
    p = rings.probe(text)
    assert (p.category, p.cpl0, p.cpl3, p.depends_on) == ("innocuous", "ok", "ok", ())
    assert p.evidence == ("same results at CPL 0 and CPL 3 and under all 8 VMM changes "
                          "of privileged state")


def test_rdtsc_clock_is_noise_not_privilege():
    p = rings.probe("rdtsc")
    assert p.category == "innocuous"
    assert "ignored: EAX" in p.evidence and "merely takes longer" in p.evidence


def test_int_n_is_untestable_under_unicorn():
    p = rings.probe("int 0x80")
    assert (p.category, p.cpl0, p.robin_irvine) == ("untestable", "INT 0x80", "INT n")


def test_bad_assembly_is_untestable_not_a_crash():
    p = rings.probe("frobnicate eax")
    assert p.category == "untestable" and p.cpl0 == "assembly error"


def test_probe_record_as_dict():
    d = rings.probe("sgdt [0x600]").as_dict()
    assert set(d) == {"instruction", "category", "cpl0", "cpl3", "evidence", "name",
                      "mnemonic", "depends_on", "robin_irvine"}
    assert (d["name"], d["mnemonic"], d["depends_on"], d["robin_irvine"]) == (
        "SGDT [0x600]", "sgdt", "GDTR", "SGDT")


def test_paged_and_long_modes():
    assert rings.probe("cli", "paged").category == "privileged"
    assert rings.probe("sgdt [0x600]", "paged").category == "sensitive-unprivileged"
    p = rings.probe("sgdt [0x600]", "long")
    assert p.evidence == ("SGDT stored base 0x90000 limit 0x6f vs base 0x50000 limit 0x3ff "
                          "after the GDT moved")
    assert rings.probe("pushfq", "long").depends_on == ("IF", "IOPL")
    assert rings.probe("add rax, rbx", "long").category == "innocuous"
    with pytest.raises(ValueError):
        rings.probe("cli", "real")


def test_descriptor_table_instructions_have_no_stray_prefix():
    # 32-bit LGDT/SIDT carry no 66H (which would make them 16-bit: a 24-bit base).
    assert rings.assemble("lgdt [0x600]", 0, 32) == bytes.fromhex("0f011500060000")
    assert rings.assemble("sidt [ebp]", 0, 32) == bytes.fromhex("0f014d00")
    assert rings.assemble("lgdt [0x600]", 0, 16) == bytes.fromhex("0f01160006")


# -------------------------------------------------------------- whole table
EXPECTED = {
    "CLI": "privileged", "STI": "privileged", "HLT": "privileged", "LGDT": "privileged",
    "LIDT": "privileged", "LLDT": "privileged", "LTR": "privileged", "LMSW": "privileged",
    "MOV r32, CR0": "privileged", "MOV CR0, r32": "privileged", "MOV r32, CR3": "privileged",
    "MOV CR3, r32": "privileged", "MOV r32, DR7": "privileged", "RDMSR": "privileged",
    "WRMSR": "privileged", "CLTS": "privileged", "INVLPG": "privileged",
    "WBINVD": "privileged", "INVD": "privileged", "IN": "privileged", "OUT": "privileged",
    "SGDT": "sensitive-unprivileged", "SIDT": "sensitive-unprivileged",
    "SLDT": "sensitive-unprivileged", "STR": "sensitive-unprivileged",
    "SMSW": "sensitive-unprivileged", "PUSHF": "sensitive-unprivileged",
    "POPF": "sensitive-unprivileged", "LAR": "sensitive-unprivileged",
    "LSL": "sensitive-unprivileged", "VERR": "sensitive-unprivileged",
    "VERW": "sensitive-unprivileged", "PUSH CS": "sensitive-unprivileged",
    "PUSH SS": "sensitive-unprivileged", "POP DS": "privileged", "POP SS": "privileged",
    "MOV AX, CS": "sensitive-unprivileged", "MOV AX, SS": "sensitive-unprivileged",
    "MOV DS, AX": "privileged", "CALL FAR": "sensitive-unprivileged",
    "JMP FAR": "sensitive-unprivileged", "RETF": "sensitive-unprivileged",
    "INT n": "untestable", "ADD": "innocuous", "MOV r32, imm": "innocuous",
    "XCHG": "innocuous", "NOP": "innocuous", "CPUID": "innocuous", "RDTSC": "innocuous",
}


def test_default_table(table):
    assert list(table.columns) == ["name", "instruction", "mnemonic", "category", "cpl0",
                                   "cpl3", "depends_on", "robin_irvine", "evidence"]
    assert dict(zip(table["name"], table["category"])) == EXPECTED


def test_far_transfers_show_the_cpl(table):
    ev = dict(zip(table["name"], table["evidence"]))
    assert ev["CALL FAR"] == ("CS loaded with 0x48 vs 0x4b at CPL 0 vs CPL 3; "
                              "stack [top-0x4] 0x8 vs 0x23 at CPL 0 vs CPL 3")
    assert ev["JMP FAR"] == "CS loaded with 0x48 vs 0x4b at CPL 0 vs CPL 3"
    assert ev["RETF"].startswith("stack pointer moved by -0x1000 vs -0x8 at CPL 0 vs CPL 3")


def test_robin_irvine_list():
    names = [n for n, _ in rings.ROBIN_IRVINE_2000]
    assert names == ["SGDT", "SIDT", "SLDT", "SMSW", "PUSHF", "POPF", "LAR", "LSL", "VERR",
                     "VERW", "POP", "PUSH", "CALL", "JMP", "INT n", "RET", "STR", "MOV"]
    groups = [g for _, g in rings.ROBIN_IRVINE_2000]
    assert groups.count("sensitive register") == 6


def test_compare_with_robin_irvine(table):
    cmp = rings.compare_with_robin_irvine(table)
    assert len(cmp) == len(rings.ROBIN_IRVINE_2000) == 18
    agreement = dict(zip(cmp["robin_irvine"], cmp["agreement"]))
    assert agreement == {
        "SGDT": "agree", "SIDT": "agree", "SLDT": "agree", "SMSW": "agree", "PUSHF": "agree",
        "POPF": "agree", "LAR": "agree", "LSL": "agree", "VERR": "agree", "VERW": "agree",
        "POP": "differ", "PUSH": "agree", "CALL": "agree", "JMP": "agree",
        "INT n": "not tested", "RET": "agree", "STR": "agree", "MOV": "agree"}
    assert cmp.loc[cmp.robin_irvine == "MOV", "probes"].item() == (
        "MOV AX, CS: sensitive-unprivileged; MOV AX, SS: sensitive-unprivileged; "
        "MOV DS, AX: privileged")


# ---------------------------------------------------------------- red pill
def test_red_pill():
    seen = rings.red_pill()
    native, vmm = seen["native"], seen["vmm"]
    assert native["verdict"] == "native hardware"
    assert vmm["verdict"] == "running under a VMM"
    assert (native["cpl"], native["idt_base"], native["if_after_cli"], native["clues"]) == (
        0, 0x91000, 0, [])
    assert (vmm["cpl"], vmm["idt_base"], vmm["if_after_cli"], vmm["virtual_if"]) == (
        3, 0xFFC18000, 1, 0)
    assert vmm["traps"] == ["cli", "hlt"]
    assert vmm["clues"] == [
        "SIDT: IDT base 0xffc18000 is above 0xd0000000, not where a kernel puts its IDT",
        "PUSHF: IF = 1 right after CLI, so the CLI did not reach the CPU"]

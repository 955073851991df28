"""The ring lab: which x86 instructions stop a trap-and-emulate VMM, found by experiment.

Popek and Goldberg (1974) showed that a machine can be virtualized by *trap and
emulate* when every **sensitive** instruction (one whose behaviour depends on, or that
changes, the privileged state of the machine) is also **privileged** (traps when run
outside the most privileged mode).  A VMM then runs the guest kernel deprivileged, gets
control at every sensitive instruction through the trap, and emulates it against the
guest's *virtual* state.

This module asks the emulated CPU, one instruction at a time, and classifies each one:

``privileged``
    Faults (#GP, SDM Vol. 3A 5.9 "Privileged Instructions") at CPL 3 but runs at CPL 0.
    A VMM gets a trap and can emulate it.
``sensitive-unprivileged``
    Runs at CPL 3 without a fault, but its result depends on privileged state or it
    silently fails to change privileged state.  A trap-and-emulate VMM never sees it
    run, so the guest sees the VMM's real state instead of its virtual one.
``innocuous``
    Runs at CPL 3 and nothing it produces depends on privileged state.
``untestable``
    Faults at CPL 0 too (or Unicorn cannot run it): there is nothing to compare.

How the experiment works (:func:`probe`)
----------------------------------------
The instruction text (with any set-up statements before it; the *last* instruction
is the one probed) is run in several *worlds*, each a fresh :class:`~vtlab.guest.Guest`
whose privileged state is loaded by real ring-0 code (LGDT, LIDT, LLDT, LTR, MOV CR0,
POPF, IRET) before the probe starts.  The probe always starts with the same general
registers, the same stack pointer and the same memory:

1. **native**: the guest kernel as it runs on bare hardware, at CPL 0 with its own
   tables (GDT at ``Layout.GDT``, IDT at ``Layout.IDT``), LDTR = 0, TR = 0x38,
   EFLAGS.IF = 1, IOPL = 0.
2. **deprivileged**: the same state, but entered at CPL 3 by an IRET (the way a
   trap-and-emulate VMM runs a guest kernel, SDM Vol. 3A 6.14 / 5.8).  A fault here
   (before the final ``hlt``) makes the instruction *privileged*.
3. If it runs at CPL 3, the deprivileged run is repeated with one piece of privileged
   state changed the way a VMM would change it (:data:`FACTORS`): the GDT and IDT
   moved to the VMM's memory with other limits, LDTR/TR loaded with the VMM's own
   selectors, CR0.TS/MP set (lazy FPU switching), the real IF cleared, IOPL raised,
   descriptor privilege compressed to DPL 3 ("ring compression").
4. *What the instruction produced* is compared: general registers, how far ESP moved,
   which EFLAGS bits changed, which segment registers changed, and the bytes of the
   first page (``0x0-0xFFF``, where probes store results) and of the stack.  Native
   vs deprivileged shows a dependence on the CPL; each factor run vs the deprivileged
   run shows a dependence on that factor.  A control run (the deprivileged world again,
   only a few instructions later) exposes values that change with time (RDTSC's
   clock), which are ignored.

Anything that differs makes the instruction sensitive; :attr:`Probe.evidence` says
what differed and under which change, e.g. ``SGDT stored base 0x90000 vs 0x50000 after
the GDT moved``.

What is left out, and why
-------------------------
* **INT n** cannot be tested here: Unicorn hands every interrupt and exception to the
  host's ``UC_HOOK_INTR`` callback instead of delivering it through the IDT, so the
  gate's DPL check against the CPL (SDM Vol. 3A 6.12.1.1) that makes INT n sensitive
  never happens.  It appears as ``untestable``.
* **RDPMC** raises #UD in Unicorn even at CPL 0, so it is not in the default list.
* IN/OUT/INS/OUTS at CPL > IOPL: Unicorn skips the check; :mod:`vtlab.guest` applies
  it (with no I/O permission bitmap), so they fault as on hardware.
* The assembler (LLVM's) encodes ``push cs`` / ``pop ss`` without a size in 32-bit code
  as their 16-bit forms (a 0x66 prefix); the probes below use forms whose size is
  unambiguous (``lcall sel:label``, ``ljmp [mem]``).
* Unicorn never delivers an exception through the IDT (the host hook gets it), and
  it then reports the *next* #GP on the same CPU as #DF; every run here therefore
  uses a fresh :class:`~vtlab.guest.Guest` and ends with exactly one fault.

Where the parts live
--------------------
:mod:`vtlab.lab.rings_worlds` (the worlds and the ring-0 code that loads them),
:mod:`vtlab.lab.rings_runs` (one run and the differences between two),
:mod:`vtlab.lab.rings_redpill` (the red pill); this module classifies instructions
and compares the result with Robin & Irvine.  Every name is importable from here.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import pandas as pd

from ..cpu import asm
from ..arch.msrs import Cr0  # noqa: F401  (re-exported: this module's names before the split)
from ..errors import AssemblyError, BudgetExceeded  # noqa: F401
from ..cpu.guest import Guest, GuestException, Layout, Mode, Selector  # noqa: F401
from .rings_worlds import (CONFORMING_CODE, DEPRIVILEGED, FACTORS, GDT_LIMIT,  # noqa: F401
                           LDT_SELECTOR, NATIVE, PROBE_ADDRESS, SETUP_ADDRESS, VMM_GDT,
                           VMM_GDT_LIMIT, VMM_IDT, VMM_IDT_LIMIT, VMM_LDT, VMM_TSS,
                           VMM_TSS_BASE, Factor, World, _PSEUDO, _code_selectors,
                           _gprs, _initial_gprs, _install_tables, _setup_source,
                           _system_descriptor, assemble)
from .rings_runs import (_DATA_PAGE, _FLAG_MASK, _FLAG_NAMES, _IOPL, _STACK_WINDOW,  # noqa: F401
                         Difference, _Run, _compare, _describe, _flags_text,
                         _memory_differences, _outcome, _pseudo_operand, _run)
from ..vmm.machine import parse_mode
from .rings_redpill import (RED_PILL_THRESHOLD, RED_PILL_VMM_IDT, _RED_PILL,  # noqa: F401
                            _red_pill_run, red_pill)

__all__ = [
    "Probe",
    "Difference",
    "World",
    "Factor",
    "FACTORS",
    "NATIVE",
    "CATEGORIES",
    "DEFAULT_INSTRUCTIONS",
    "ROBIN_IRVINE_2000",
    "probe",
    "probe_all",
    "disassembly_text",
    "default_instructions",
    "compare_with_robin_irvine",
    "red_pill",
    "assemble",
    "DEPRIVILEGED",
    "RED_PILL_THRESHOLD",
    "RED_PILL_VMM_IDT",
]

#: The four classes, in the order tables show them.
CATEGORIES = ("privileged", "sensitive-unprivileged", "innocuous", "untestable")


# ----------------------------------------------------------------------- probing
@dataclass
class Probe:
    """The classification of one instruction, with the evidence for it.

    ``cpl0`` and ``cpl3`` are the outcomes of the native and deprivileged runs: ``"ok"``
    or the exception (``"#GP(0)"``, ``"#UD"`` ...).  ``depends_on`` lists the
    privileged state the results depended on (``CPL``, ``GDTR``, ``IF`` ...);
    ``differences`` holds every observed difference.
    """

    instruction: str
    category: str
    cpl0: str
    cpl3: str
    evidence: str
    name: str = ""
    mnemonic: str = ""
    depends_on: tuple[str, ...] = ()
    robin_irvine: str | None = None
    differences: list[Difference] = field(default_factory=list)
    #: What the assembler made of ``instruction``: one line per instruction (address,
    #: bytes, Capstone's reading of them), so a typo cannot pass unseen.
    disassembly: str = ""

    def as_dict(self) -> dict:
        """A flat dict (one DataFrame row): differences are folded into ``evidence``."""
        d = asdict(self)
        d.pop("differences")
        d.pop("disassembly")
        d["depends_on"] = ", ".join(self.depends_on)
        return d


def _robin_irvine_entry(insn: asm.Instruction | None) -> str | None:
    """Which of Robin & Irvine's 17 sensitive instructions ``insn`` is, if any."""
    if insn is None:
        return None
    m, ops = insn.mnemonic, insn.op_str
    segs = r"\b(cs|ds|es|fs|gs|ss)\b"
    if m in ("sgdt", "sidt", "sldt", "smsw", "str", "lar", "lsl", "verr", "verw"):
        return m.upper()
    if m in ("pushf", "pushfd", "pushfq"):
        return "PUSHF"
    if m in ("popf", "popfd", "popfq"):
        return "POPF"
    if m == "push" and re.fullmatch(segs, ops):
        return "PUSH"
    if m == "pop" and re.fullmatch(segs, ops):
        return "POP"
    if m == "mov" and re.search(segs, ops):
        return "MOV"
    if m == "lcall" or (m == "call" and ("ptr" in ops or ":" in ops or "far" in ops)):
        return "CALL"
    if m == "ljmp" or (m == "jmp" and ("ptr" in ops or ":" in ops or "far" in ops)):
        return "JMP"
    if m in ("retf", "retfq", "lret"):
        return "RET"
    if m == "int":
        return "INT n"
    return None


def _default_name(text: str) -> str:
    """The probed statement as written (last line that is not a label), mnemonic in caps."""
    lines = [asm.strip_comment(l).strip() for l in text.splitlines()]
    lines = [l for l in lines if l and not re.fullmatch(r"[\w.$@?]+:", l)]
    if not lines:
        return text
    head, _, rest = lines[-1].partition(" ")
    return f"{head.upper()} {rest.strip()}".strip()


def probe(text: str, mode: str | Mode = "protected", name: str | None = None) -> Probe:
    """Classify one instruction by running it at CPL 0 and CPL 3 (see the module doc).

    ``text`` is assembly (Intel syntax); set-up statements may come first, the *last*
    instruction is the one probed.  A label may follow it.  Examples::

        probe("cli")                       # privileged
        probe("sgdt [0x600]")              # sensitive-unprivileged (GDTR)
        probe("push 0x2\\npopfd")           # sensitive-unprivileged (IF silently kept)
        probe("add eax, ebx")              # innocuous
    """
    mode = parse_mode(mode)
    if mode is Mode.REAL:
        raise ValueError("rings need protected mode: in real mode everything runs at CPL 0")
    wide = mode is Mode.LONG
    try:
        code = assemble(text, PROBE_ADDRESS, mode.bits)
    except AssemblyError as exc:
        return Probe(text, "untestable", "assembly error", "assembly error", str(exc),
                     name or text, "")
    listing = disassembly_text(code, PROBE_ADDRESS, mode.bits)
    if not code:
        # Only blank lines, comments or labels: the run would be the final HLT alone,
        # which says nothing about any instruction (it is not "innocuous").
        return Probe(text, "untestable", "nothing to run", "nothing to run",
                     "nothing to run: the text holds no instruction (only blank lines, "
                     "comments or labels); type one, e.g. `sgdt [0x600]`", name or "(empty)", "")
    native = _run(text, NATIVE, mode)
    insn = native.instruction
    name = name or _default_name(text)
    mnemonic = insn.mnemonic if insn else ""
    ri = _robin_irvine_entry(insn)
    common = dict(name=name, mnemonic=mnemonic, robin_irvine=ri, disassembly=listing)
    depriv = _run(text, DEPRIVILEGED, mode)
    if native.outcome != "ok":
        why = f"faults at CPL 0 too ({native.outcome}): nothing to compare"
        if mnemonic == "int":
            why += ("; Unicorn hands INT n to the host hook instead of delivering it through "
                    "the IDT, so the gate's DPL check (SDM Vol. 3A 6.12.1.1) is never made")
        elif native.faulted_at:
            why = why.replace("):", f" at `{native.faulted_at}`):")
        return Probe(text, "untestable", native.outcome, depriv.outcome, why, **common)

    if depriv.outcome != "ok":
        # Privileged: the CPU traps it, so a VMM gets control (SDM Vol. 3A 5.9).
        evidence = (f"{depriv.outcome} at CPL 3 on `{depriv.faulted_at}`, runs at CPL 0: "
                    "the trap lets a VMM emulate it")
        runs_when = [f.phrase for f in FACTORS if _run(text, f.world, mode).outcome == "ok"]
        if runs_when:
            evidence += "; but it runs at CPL 3 " + " / ".join(runs_when)
        return Probe(text, "privileged", native.outcome, depriv.outcome, evidence, **common)

    control = _run(text, DEPRIVILEGED, mode, delay=37)
    noisy = {k for k, v in depriv.observed.items() if control.observed.get(k) != v}
    diffs = _compare(native, depriv, noisy, "CPL", "at CPL 0 vs CPL 3", wide)
    notes = []
    for factor in FACTORS:
        run = _run(text, factor.world, mode)
        if run.outcome != "ok":
            notes.append(f"faults ({run.outcome}) {factor.phrase}, a trap the VMM would see")
            continue
        diffs += _compare(depriv, run, noisy, factor.key, factor.phrase, wide)
    if noisy:
        notes.append("ignored: " + ", ".join(sorted(k.upper() if len(k) <= 3 else k for k in noisy))
                     + " differ when the same run merely takes longer (a clock, not privileged state)")
    depends = tuple(dict.fromkeys(d.factor for d in diffs))
    if diffs:
        category = "sensitive-unprivileged"
        evidence = "; ".join(str(d) for d in diffs)
    else:
        category = "innocuous"
        evidence = (f"same results at CPL 0 and CPL 3 and under all {len(FACTORS)} VMM "
                    "changes of privileged state")
    if notes:
        evidence += "; " + "; ".join(notes)
    return Probe(text, category, native.outcome, depriv.outcome, evidence,
                 depends_on=depends, differences=diffs, **common)


def disassembly_text(code: bytes, address: int, bits: int) -> str:
    """``code`` decoded back by Capstone, one ``address: bytes  instruction`` line each.

    What the assembler actually produced, shown beside a probe so that the learner sees
    the instruction that ran, not the one they meant to type.
    """
    lines = [str(i) for i in asm.disassemble(code, address, bits)]
    decoded = sum(i.size for i in asm.disassemble(code, address, bits))
    if decoded < len(code):  # (Capstone stops at bytes it cannot decode: say so)
        lines.append(f"{address + decoded:#06x}: {code[decoded:].hex(' ')}  (bytes Capstone cannot decode)")
    return "\n".join(lines)


# --------------------------------------------------------------- the default list
def default_instructions(mode: str | Mode = "protected") -> list[tuple[str, str]]:
    """(name, probe text) pairs covering the usual suspects, for :func:`probe_all`.

    Set-up statements come first; the last instruction is the one probed.  Values
    written to CR0/CR3 are the ones already there, so the kernel keeps running.
    """
    g = Guest(mode)
    cr0, cr3 = g.reg("cr0"), g.reg("cr3")
    retf_target = PROBE_ADDRESS + len(asm.assemble(
        "push 0x2b\npush 0x8d000\npush 0x23\npush 0x20000\nretf", PROBE_ADDRESS, 32))
    return [
        # --- privileged (SDM Vol. 3A 5.9) -------------------------------------------------
        ("CLI", "cli"),
        ("STI", "sti"),
        ("HLT", "hlt"),
        ("LGDT", "lgdt [0x600]"),
        ("LIDT", "lidt [0x600]"),
        ("LLDT", "xor eax, eax\nlldt ax"),
        ("LTR", f"mov eax, {VMM_TSS:#x}\nltr ax"),
        ("LMSW", "smsw ax\nlmsw ax"),
        ("MOV r32, CR0", "mov eax, cr0"),
        ("MOV CR0, r32", f"mov eax, {cr0:#x}\nmov cr0, eax"),
        ("MOV r32, CR3", "mov eax, cr3"),
        ("MOV CR3, r32", f"mov eax, {cr3:#x}\nmov cr3, eax"),
        ("MOV r32, DR7", "mov eax, dr7"),
        ("RDMSR", "mov ecx, 0xc0000080\nrdmsr"),
        ("WRMSR", "mov ecx, 0xc0000080\nxor eax, eax\nxor edx, edx\nwrmsr"),
        ("CLTS", "clts"),
        ("INVLPG", "invlpg [0x600]"),
        ("WBINVD", "wbinvd"),
        ("INVD", "invd"),
        ("IN", "in al, 0x80"),
        ("OUT", "out 0x80, al"),
        # --- Robin & Irvine's suspects ----------------------------------------------------
        ("SGDT", "sgdt [0x600]"),
        ("SIDT", "sidt [0x600]"),
        ("SLDT", "sldt ax"),
        ("STR", "str ax"),
        ("SMSW", "smsw ax"),
        ("PUSHF", "pushfd"),
        ("POPF", "push 0x2\npopfd"),                       # asks for IF = 0
        ("LAR", "mov ebx, 0x08\nlar eax, ebx"),            # the kernel's code segment, DPL 0
        ("LSL", "mov ebx, 0x08\nlsl eax, ebx"),
        ("VERR", "mov ebx, 0x08\nverr bx"),
        ("VERW", "mov ebx, 0x10\nverw bx"),
        ("PUSH CS", "push cs"),
        ("PUSH SS", "push ss"),
        ("POP DS", "push 0x10\npop ds"),                   # the kernel's data selector
        ("POP SS", "push 0x10\npop ss"),
        ("MOV AX, CS", "mov ax, cs"),
        ("MOV AX, SS", "mov ax, ss"),
        ("MOV DS, AX", "mov eax, 0x10\nmov ds, ax"),
        # far transfers to a *conforming* ring-0 segment keep the caller's CPL (5.8.1.2)
        ("CALL FAR", f"lcall {CONFORMING_CODE:#x}:next\nnext:"),
        ("JMP FAR", f"mov dword ptr [0x600], next\nmov word ptr [0x604], {CONFORMING_CODE:#x}\n"
                    "ljmp [0x600]\nnext:"),
        # the kernel's return to user mode: an inter-privilege RETF at CPL 0 (5.8.6)
        ("RETF", f"push 0x2b\npush 0x8d000\npush 0x23\npush {retf_target:#x}\nretf"),
        ("INT n", "int 0x80"),
        # --- innocuous ------------------------------------------------------------------
        ("ADD", "add eax, ebx"),
        ("MOV r32, imm", "mov eax, 0x1234"),
        ("XCHG", "xchg eax, ebx"),
        ("NOP", "nop"),
        ("CPUID", "mov eax, 1\ncpuid"),
        ("RDTSC", "rdtsc"),
    ]


#: The default list for protected mode (see :func:`default_instructions`).
DEFAULT_INSTRUCTIONS: list[tuple[str, str]] = default_instructions("protected")


def probe_all(instructions: list[str] | list[tuple[str, str]] | None = None,
              mode: str | Mode = "protected", progress: bool = False) -> pd.DataFrame:
    """Probe many instructions; one row per instruction.

    ``instructions`` are probe texts or ``(name, text)`` pairs (default:
    :func:`default_instructions`).  Columns: ``name``, ``instruction`` (the probe text),
    ``mnemonic``, ``category``, ``cpl0``, ``cpl3``, ``depends_on``, ``robin_irvine``
    (which of the published 17 it is, or None) and ``evidence``.
    """
    items = default_instructions(mode) if instructions is None else instructions
    pairs = [(None, it) if isinstance(it, str) else it for it in items]
    iterator = pairs
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(pairs, desc="probing", unit="insn")
    rows = [probe(text, mode, name=name).as_dict() for name, text in iterator]
    for row in rows:
        row["robin_irvine"] = row["robin_irvine"] or ""
    columns = ["name", "instruction", "mnemonic", "category", "cpl0", "cpl3", "depends_on",
               "robin_irvine", "evidence"]
    return pd.DataFrame(rows, columns=columns)


# -------------------------------------------------------------- Robin & Irvine 2000
#: The sensitive, unprivileged instructions published by J. S. Robin and C. E. Irvine,
#: "Analysis of the Intel Pentium's Ability to Support a Secure Virtual Machine
#: Monitor", USENIX Security 2000, in the paper's two groups.  The paper speaks of
#: seventeen instructions; its grouped list names the eighteen mnemonics below (the
#: commonly quoted list: SGDT, SIDT, SLDT; SMSW; PUSHF, POPF | LAR, LSL, VERR, VERW;
#: POP; PUSH; CALL, JMP, INT n, RET; STR; MOV), so every one of them is kept here.
ROBIN_IRVINE_2000: tuple[tuple[str, str], ...] = (
    ("SGDT", "sensitive register"), ("SIDT", "sensitive register"),
    ("SLDT", "sensitive register"), ("SMSW", "sensitive register"),
    ("PUSHF", "sensitive register"), ("POPF", "sensitive register"),
    ("LAR", "protection system"), ("LSL", "protection system"),
    ("VERR", "protection system"), ("VERW", "protection system"),
    ("POP", "protection system"), ("PUSH", "protection system"),
    ("CALL", "protection system"), ("JMP", "protection system"),
    ("INT n", "protection system"), ("RET", "protection system"),
    ("STR", "protection system"), ("MOV", "protection system"),
)


def compare_with_robin_irvine(df: pd.DataFrame) -> pd.DataFrame:
    """Our experimental classification beside the published list, one row per entry.

    ``df`` is a :func:`probe_all` table.  Columns: ``robin_irvine`` (the published
    mnemonic), ``group``, ``published`` (always ``sensitive-unprivileged``), ``probes``
    (our rows for it, with their category), ``ours`` (``sensitive-unprivileged`` if
    any of our probes found it so, else the most common category), ``agreement``:
    ``agree``, ``differ`` or ``not tested``, and ``evidence`` (our probes' evidence).

    Expect *differ* where the published reasoning needs a situation this lab does not
    build: e.g. POP into a segment register traps here at CPL 3 (the kernel's
    selectors have DPL 0, or RPL 0 for SS, SDM Vol. 3A 5.7), so a VMM would see it.
    """
    rows = []
    for entry, group in ROBIN_IRVINE_2000:
        mine = df[df["robin_irvine"] == entry]
        tested = mine[mine["category"] != "untestable"]
        if tested.empty:
            ours, agreement = ("untestable" if not mine.empty else "not probed"), "not tested"
        elif (tested["category"] == "sensitive-unprivileged").any():
            ours, agreement = "sensitive-unprivileged", "agree"
        else:
            ours, agreement = tested["category"].mode().iloc[0], "differ"
        probes = "; ".join(f"{r.name}: {r.category}" for r in mine.itertuples())
        evidence = " | ".join(f"{r.name}: {r.evidence}" for r in mine.itertuples())
        rows.append({"robin_irvine": entry, "group": group,
                     "published": "sensitive-unprivileged", "ours": ours,
                     "agreement": agreement, "probes": probes, "evidence": evidence})
    return pd.DataFrame(rows, columns=["robin_irvine", "group", "published", "ours",
                                       "agreement", "probes", "evidence"])

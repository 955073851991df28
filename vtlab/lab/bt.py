"""A toy binary translator: how VMware ran x86 kernels deprivileged before VT-x.

x86 could not be virtualized by trap and emulate alone (see :mod:`vtlab.rings`): some
sensitive instructions do not trap at CPL 3.  VMware's answer (1999) was to *never run
the guest kernel's code as is*.  Its binary translator decoded the guest's code one
basic block at a time, copied the innocuous instructions unchanged into a
**translation cache** (TC) and replaced each sensitive one with code that works on a
**virtual CPU** kept in memory: CLI clears a *virtual* IF, SGDT stores the *guest's*
GDTR, PUSHF pushes the *virtual* IF and IOPL.  The translated code then runs at CPL 3
at nearly native speed.

This module does the same, in miniature:

* :func:`translate` decodes 32-bit guest code with Capstone, splits it into basic
  blocks (discovered from the entry point by following direct branches, as a real
  translator discovers them), copies every innocuous instruction **byte for byte**
  into the TC, and rewrites every supported sensitive instruction into a
  ``CALL rel32`` to an emulation stub.  Stubs are real machine code, assembled by
  vtlab's assembler, that read and write the :data:`VCPU` block.  Because instruction lengths
  change, every direct branch is re-emitted as a ``rel32`` branch to the *translated*
  target (JMP/Jcc/CALL), and fall-through edges get an explicit JMP when the
  successor block is not laid out next.
* :func:`run_translated` runs the translation at CPL 3 under a "VMM" that has moved
  the real GDT and IDT to its own memory, runs the original natively at CPL 0 for
  reference, and compares what each left behind (registers, flags with the virtual
  IF/IOPL, memory, the stack, the virtual CR0/CR3/GDTR/IDTR, port output).  It also
  runs the *untranslated* code at CPL 3 to show what trap-and-emulate alone gets wrong.

What the toy supports (32-bit protected mode, flat segments)
-----------------------------------------------------------
CLI, STI, PUSHFD, POPFD, SGDT/SIDT/LGDT/LIDT m, SLDT/STR/SMSW r/m, MOV r32 <-> CR0/CR2/
CR3/CR4, MOV r, CS/SS, PUSH CS/SS, IN AL / OUT with AL (port imm8 or DX; OUT is
logged in the VCPU, IN reads 0xFF like a floating bus), HLT (ends the run).

Limits, stated honestly
-----------------------
* 32-bit code only; memory operands of translated instructions may not use ESP (the
  stub's CALL moves ESP) nor FS/GS overrides.  16-bit PUSHF/POPF are refused.
* Indirect JMP/CALL (through a register or memory) and far transfers (LCALL, LJMP,
  RETF, IRET, INT n) are refused: a real translator looks the target up in a hash
  table of translated blocks at run time.  RET works, because CALLs are translated
  into CALLs: the guest therefore sees TC addresses as return addresses on its stack
  (a real translator pushes the guest's address and translates RET instead).
* Other sensitive instructions (LAR, LSL, VERR, VERW, LLDT, LTR, LMSW, CLTS, INVLPG,
  RDMSR, WRMSR, segment-register loads ...) are refused with :class:`TranslationError`.
* Translation is eager (all blocks reachable by direct branches, before the run);
  VMware translated lazily, on first execution, and chained blocks as they appeared.
  Self-modifying code and code that reads its own bytes are not handled.
* The VCPU block and the TC live in memory the deprivileged guest could write: VMware
  protected them with segment limits ("segment truncation"); the toy does not.

Where the parts live
--------------------
:mod:`vtlab.lab.bt_stubs` (the VCPU block and the emulation stubs),
:mod:`vtlab.lab.bt_translate` (basic blocks, layout and encoding of the TC); this
module runs and compares.  Every name is importable from here.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..arch.msrs import RFLAGS_IOPL_SHIFT, Rflags
from ..cpu import asm
from ..errors import BudgetExceeded, VtlabError  # noqa: F401  (VtlabError: re-exported)
from ..cpu.guest import Guest, Layout, Mode, Selector
from ..cpu.layout import parse_mode
from .rings_worlds import VMM_GDT, VMM_GDT_LIMIT, VMM_IDT, VMM_IDT_LIMIT, _initial_gprs
from .rings_worlds import assemble as _assemble
from .bt_stubs import (SUPPORTED, VCPU, VCPU_ADDRESS, TranslationError, _REFUSED,  # noqa: F401
                       _SEGS, _is_sensitive_mov, _memory_operand, _register_operand,
                       _shared_stubs, _site_stub, _store_selector, _stub_name)
from .bt_translate import (TC_ADDRESS, Block, Site, Translation, _PREFIXES,  # noqa: F401
                           _branch_kind, _direct_target, _rel32, translate)

__all__ = ["VCPU", "TC_ADDRESS", "GUEST_ADDRESS", "TranslationError", "Site", "Block",
           "Translation", "BTRun", "translate", "run_translated", "SUPPORTED"]

#: Where :func:`run_translated` loads the guest's own code.
GUEST_ADDRESS = 0x2_0000


# ------------------------------------------------------------------------ running
_ARITH_FLAGS = int(Rflags.CF | Rflags.PF | Rflags.AF | Rflags.ZF | Rflags.SF | Rflags.OF | Rflags.DF)


@dataclass
class BTRun:
    """What :func:`run_translated` measured.

    Counts: ``guest_instructions`` (the original, run natively), ``tc_instructions``
    (translated-block instructions executed, including the CALLs that replaced
    sensitive instructions and the JMPs the layout added), ``stub_instructions``
    (executed inside emulation stubs), ``sensitive_translated`` (sensitive
    instructions rewritten, static), ``sensitive_executed`` (stub calls, dynamic),
    ``blocks`` (TC blocks).  ``overhead`` = executed instructions translated /
    natively.  ``matches_native`` says whether the translated run left the same
    architectural state as the native run (``differences`` lists what did not);
    ``untranslated`` says what happened when the same code ran at CPL 3 *without*
    translation, and ``untranslated_differences`` what that got wrong.
    """

    guest_instructions: int
    tc_instructions: int
    stub_instructions: int
    sensitive_translated: int
    sensitive_executed: int
    blocks: int
    overhead: float
    matches_native: bool
    differences: list[str]
    native: dict
    translated: dict
    untranslated: str
    untranslated_differences: list[str]
    translation: Translation

    def as_dict(self) -> dict:
        """The counts and verdicts (no nested state), e.g. for a DataFrame row."""
        return {k: getattr(self, k) for k in (
            "guest_instructions", "tc_instructions", "stub_instructions",
            "sensitive_translated", "sensitive_executed", "blocks", "overhead",
            "matches_native", "untranslated")}


def _state(g: Guest, vcpu: int | None, out_log: list) -> dict:
    """The architectural state to compare: real registers, and the guest's view of
    the privileged state (the real one natively, the VCPU's when translated)."""
    s = {r: g.reg(r) for r in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp")}
    flags = g.reg("eflags")
    s["flags"] = flags & _ARITH_FLAGS
    if vcpu is None:
        s["IF"], s["IOPL"] = 1 if flags & Rflags.IF else 0, (flags & Rflags.IOPL) >> RFLAGS_IOPL_SHIFT
        s["GDTR"] = g.descriptor_table("gdtr")   # (base, limit)
        s["IDTR"] = g.descriptor_table("idtr")
        for cr in ("cr0", "cr3", "cr4"):
            s[cr.upper()] = g.reg(cr)
        s["output"] = list(out_log)
    else:
        s["IF"], s["IOPL"] = g.read_u8(vcpu + VCPU.IF), g.read_u8(vcpu + VCPU.IOPL)
        lim, base = struct.unpack("<HI", g.read(vcpu + VCPU.GDTR, 6))
        s["GDTR"] = (base, lim)
        lim, base = struct.unpack("<HI", g.read(vcpu + VCPU.IDTR, 6))
        s["IDTR"] = (base, lim)
        for n, cr in enumerate(("CR0", "CR3", "CR4")):
            s[cr] = g.read_u32(vcpu + VCPU.CR0 + (0, 8, 12)[n])
        count = g.read_u32(vcpu + VCPU.OUT_COUNT)
        recs = [struct.unpack("<HBB", g.read(vcpu + VCPU.OUT_LOG + 4 * (k % VCPU.OUT_RECORDS), 4))
                for k in range(max(0, count - VCPU.OUT_RECORDS), count)]
        s["output"] = [(port, value) for port, value, _ in recs]
    s["memory"] = g.read(0, 0x1000)
    # only the live part of the stack: below ESP lie dead values (return addresses the
    # translated CALLs pushed are TC addresses, which a native run never sees)
    esp = s["esp"]
    s["stack"] = g.read(esp, max(0, Layout.USER_STACK - esp)) if esp <= Layout.USER_STACK else b""
    return s


def _differences(a: dict, b: dict) -> list[str]:
    out = []
    for k, va in a.items():
        vb = b.get(k)
        if va == vb:
            continue
        if isinstance(va, (bytes, bytearray)):
            first = next((n for n in range(min(len(va), len(vb))) if va[n] != vb[n]), min(len(va), len(vb)))
            out.append(f"{k} differs from offset {first:#x}: {va[first:first + 8].hex(' ')} vs "
                       f"{vb[first:first + 8].hex(' ')}")
        elif isinstance(va, tuple):
            out.append(f"{k} base {va[0]:#x} limit {va[1]:#x} vs base {vb[0]:#x} limit {vb[1]:#x}")
        elif isinstance(va, int):
            out.append(f"{k} {va:#x} vs {vb:#x}")
        else:
            out.append(f"{k} {va} vs {vb}")
    return out


def _vmm_guest(mode: Mode) -> Guest:
    """A guest whose real GDT and IDT a VMM has moved to its own memory."""
    g = Guest(mode)
    gdt = g.read(Layout.GDT, g.gdt_limit + 1)
    g.write(VMM_GDT, gdt)
    g.set_descriptor_table("gdtr", VMM_GDT, VMM_GDT_LIMIT)
    g.set_descriptor_table("idtr", VMM_IDT, VMM_IDT_LIMIT)
    return g


def run_translated(source: str | bytes, mode: str | Mode = "protected",
                   address: int = GUEST_ADDRESS, max_instructions: int = 100_000) -> BTRun:
    """Translate ``source``, run it deprivileged (CPL 3), and compare with a native run.

    ``source`` is 32-bit guest *kernel* code (assembly text or machine code) that ends
    with HLT.  Three runs, each on a fresh guest, all starting with the same registers,
    stack (``Layout.USER_STACK``) and EFLAGS.IF = 1:

    1. **native**: the code as is, at CPL 0, with its own GDT/IDT;
    2. **translated**: :func:`translate`'s output at CPL 3, the real GDT/IDT moved to the
       VMM's memory, the guest's privileged state in the :class:`VCPU` block;
    3. **untranslated**: the code as is at CPL 3 under the same VMM (plain
       trap-and-emulate with no emulation: the first privileged instruction faults,
       the sensitive unprivileged ones silently show the VMM's state).

    Returns a :class:`BTRun` (counts, comparison, the translation).
    """
    mode = parse_mode(mode)
    if mode not in (Mode.PROTECTED, Mode.PAGED):
        raise ValueError("the toy translator handles 32-bit code: use 'protected' or 'paged'")
    code = _assemble(source, address, 32) if isinstance(source, str) else bytes(source)
    regs = _initial_gprs(mode)

    # 1. native, CPL 0
    g = Guest(mode)
    native_out: list = []
    g.connect_io(g.io_read, lambda port, size, value: native_out.append((port, value)))
    g.load(code, address)
    for r, val in regs.items():
        g.set_reg(r, val)
    g.set_reg("esp", Layout.USER_STACK)
    g.set_reg("eflags", int(Rflags.FIXED | Rflags.IF))
    vcpu_init = {
        "gdtr": g.descriptor_table("gdtr"), "idtr": g.descriptor_table("idtr"),  # (base, limit)
        "cr0": g.reg("cr0"), "cr3": g.reg("cr3"), "cr4": g.reg("cr4"),
    }
    try:
        result = g.run(address, max_instructions)
    except BudgetExceeded as exc:
        raise TranslationError(f"the native run did not stop: {exc}") from None
    hlts = {i.address for i in asm.disassemble(code, address, 32) if i.mnemonic == "hlt"}
    if result.reason != "hlt" or result.rip not in hlts:
        raise TranslationError("the native run (CPL 0) did not end at one of the guest's HLTs: "
                               f"{result.exception or f'HLT at {result.rip:#x}'}")
    native = _state(g, None, native_out)
    guest_instructions = result.instructions

    # 2. translated, CPL 3
    t = translate(code, address, 32, TC_ADDRESS, VCPU_ADDRESS)
    g2 = _vmm_guest(mode)
    g2.write(address, code)                        # the guest's own image (data it may read)
    v = VCPU_ADDRESS
    block = bytearray(VCPU.SIZE)
    block[VCPU.IF], block[VCPU.IOPL] = 1, 0
    struct.pack_into("<HI", block, VCPU.GDTR, vcpu_init["gdtr"][1], vcpu_init["gdtr"][0])
    struct.pack_into("<HI", block, VCPU.IDTR, vcpu_init["idtr"][1], vcpu_init["idtr"][0])
    struct.pack_into("<HH", block, VCPU.LDTR, 0, Selector.TSS)
    struct.pack_into("<HH", block, VCPU.CS, Selector.KERNEL_CODE32, Selector.KERNEL_DATA)
    struct.pack_into("<IIII", block, VCPU.CR0, vcpu_init["cr0"], 0, vcpu_init["cr3"], vcpu_init["cr4"])
    g2.write(v, bytes(block))
    for r, val in regs.items():
        g2.set_reg(r, val)
    counts = {"tc": 0, "stub": 0, "calls": 0}
    stub_entries = {s.stub_address for s in t.sites}

    def count(addr, size):
        if addr >= t.stub_address:
            counts["stub"] += 1
            if addr in stub_entries:
                counts["calls"] += 1
        else:
            counts["tc"] += 1
    # A code hook bound to the TC's range: a Python call per TC instruction, fine for a
    # toy; nothing else the guest runs (the IRET trampoline) is slowed down.
    g2.add_code_hook(count, TC_ADDRESS, TC_ADDRESS + len(t.code) - 1)
    try:
        r2 = g2.run_user(t.code, address=TC_ADDRESS, max_instructions=max_instructions)
    except BudgetExceeded as exc:
        raise TranslationError(f"the translated run did not stop: {exc}") from None
    exc = r2.exception
    if exc is None or exc.rip != t.halt_address:
        raise TranslationError(f"the translated code stopped unexpectedly: {exc or r2.reason}")
    # The HLT stub dropped its return address, so ESP is the guest's again.
    translated = _state(g2, v, [])
    differences = _differences(native, translated)

    # 3. untranslated, CPL 3: trap-and-emulate with nothing emulated
    g3 = _vmm_guest(mode)
    untranslated_out: list = []
    g3.connect_io(g3.io_read, lambda port, size, value: untranslated_out.append((port, value)))
    for r, val in regs.items():
        g3.set_reg(r, val)
    try:
        r3 = g3.run_user(code, address=address, max_instructions=max_instructions)
        e3 = r3.exception
        if e3 is not None and e3.rip in hlts:
            state3 = _state(g3, None, untranslated_out)
            untranslated_diffs = _differences(native, state3)
            untranslated = ("ran to HLT" + (" with wrong results" if untranslated_diffs
                                            else " with the native results"))
        else:
            untranslated = f"trapped: {e3}" if e3 else r3.reason
            untranslated_diffs = [f"stopped by {e3.name if e3 else r3.reason} at "
                                  f"{(e3.rip if e3 else r3.rip):#x} before the guest's HLT"]
    except BudgetExceeded:
        untranslated, untranslated_diffs = "did not stop", ["ran out of budget"]

    executed = counts["tc"] + counts["stub"]
    return BTRun(
        guest_instructions=guest_instructions,
        tc_instructions=counts["tc"],
        stub_instructions=counts["stub"],
        sensitive_translated=len(t.sites),
        sensitive_executed=counts["calls"],
        blocks=len(t.blocks),
        overhead=executed / guest_instructions if guest_instructions else float("nan"),
        matches_native=not differences,
        differences=differences,
        native=native,
        translated=translated,
        untranslated=untranslated,
        untranslated_differences=untranslated_diffs,
        translation=t,
    )

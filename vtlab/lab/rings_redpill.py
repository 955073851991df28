"""The red pill: a guest kernel that finds out by itself whether it runs under a VMM.

Rutkowska's "red pill" (2004) is one unprivileged SIDT: VMware's monitor kept the real
IDT at the top of the address space, far from where a kernel puts its own.  The version
here adds a second clue, the IF that PUSHF shows right after a CLI that trapped to the
VMM.  :func:`red_pill` runs it natively and under a minimal trap-and-emulate VMM.
"""
from __future__ import annotations

import struct
from dataclasses import replace

from ..arch.exceptions import Vector
from ..arch.msrs import RFLAGS_IOPL_SHIFT, Rflags
from ..vmm.machine import parse_mode
from ..cpu.guest import Guest, Mode
from .rings_worlds import (DEPRIVILEGED, NATIVE, PROBE_ADDRESS, SETUP_ADDRESS, VMM_GDT,
                           VMM_GDT_LIMIT, World, _install_tables, _setup_source, assemble)

#: Rutkowska's "red pill" (2004) threshold: native Windows kept its IDT below this,
#: VMware's monitor relocated the real IDT above it.
RED_PILL_THRESHOLD = 0xD000_0000
#: Where the VMM of :func:`red_pill` keeps the real IDT (the top of the address space,
#: where VMware's monitor lived).
RED_PILL_VMM_IDT = 0xFFC1_8000

_RED_PILL = f"""
    cli                          ; the kernel disables interrupts ...
    sidt [0x700]                 ; ... and asks where its IDT is
    pushfd                       ; ... and what EFLAGS look like now
    pop eax
    mov [0x708], eax
    xor ebx, ebx                 ; EBX collects the clues
    mov eax, dword ptr [0x702]   ; the IDT base
    cmp eax, {RED_PILL_THRESHOLD:#x}
    jb idt_ok
    or ebx, 1                    ; clue 1: the IDT is not where a kernel puts it
idt_ok:
    test dword ptr [0x708], {Rflags.IF:#x}
    jz if_ok
    or ebx, 2                    ; clue 2: IF is still 1 right after my CLI
if_ok:
    test dword ptr [0x708], {Rflags.IOPL:#x}
    jz iopl_ok
    or ebx, 4                    ; clue 3: IOPL is not the 0 my kernel set
iopl_ok:
    mov [0x70c], ebx
    hlt
"""


def _red_pill_run(world: World, mode: Mode) -> dict:
    """Run the red pill in ``world``; at CPL 3 play a minimal trap-and-emulate VMM."""
    g = Guest(mode)
    _install_tables(g, world)
    prog = g.load(assemble(_RED_PILL, PROBE_ADDRESS, 32), PROBE_ADDRESS)
    final_hlt = prog.instructions[-1].address
    g.load(assemble(_setup_source(g, world, prog.address), SETUP_ADDRESS, 32), SETUP_ADDRESS)
    virtual_if, traps = 1, []
    result = g.run(SETUP_ADDRESS, 10_000)
    # The VMM's loop: privileged instructions trap (#GP) and are emulated against the
    # guest's *virtual* state, then the guest resumes after them.  Unicorn quirk: after
    # one #GP went to the host hook (never delivered), QEMU still remembers it as the
    # exception "being delivered", so the next #GP is reported as #DF (vector 8, the
    # SDM Vol. 3A 6.15 Table 6-5 rule).  Both vectors mean "trapped" here.
    while result.exception is not None and result.exception.vector in (Vector.GP, Vector.DF):
        exc = result.exception
        insn = g.instruction_at(exc.rip)
        traps.append(insn.text)
        if exc.rip == final_hlt:
            break                             # the guest halted: the VMM would idle it
        if insn.mnemonic == "cli":
            virtual_if = 0
        elif insn.mnemonic == "sti":
            virtual_if = 1
        else:
            raise RuntimeError(f"red pill VMM cannot emulate {insn.text}")
        result = g.run(exc.rip + insn.size, 10_000)
    clues = g.read_u32(0x70C)
    limit, base = struct.unpack("<HI", g.read(0x700, 6))
    eflags = g.read_u32(0x708)
    reasons = []
    if clues & 1:
        reasons.append(f"SIDT: IDT base {base:#x} is above {RED_PILL_THRESHOLD:#x}, "
                       "not where a kernel puts its IDT")
    if clues & 2:
        reasons.append("PUSHF: IF = 1 right after CLI, so the CLI did not reach the CPU")
    if clues & 4:
        reasons.append(f"PUSHF: IOPL = {(eflags & Rflags.IOPL) >> RFLAGS_IOPL_SHIFT}, not the 0 the kernel set")
    return {
        "cpl": world.cpl,
        "idt_base": base,
        "idt_limit": limit,
        "eflags": eflags,
        "if_after_cli": 1 if eflags & Rflags.IF else 0,
        "iopl": (eflags & Rflags.IOPL) >> RFLAGS_IOPL_SHIFT,
        "virtual_if": virtual_if if world.cpl else None,
        "traps": traps if world.cpl else [],
        "clues": reasons,
        "verdict": "running under a VMM" if clues else "native hardware",
    }


def red_pill(mode: str | Mode = "protected") -> dict:
    """Run a "red pill" twice: on bare hardware and under a trap-and-emulate VMM.

    The guest kernel executes CLI, then SIDT and PUSHF, and decides *by itself* (in
    x86 code, result in memory at 0x70C) whether it is virtualized:

    * SIDT is unprivileged, so it shows the *real* IDTR: a VMM that moved the IDT to
      its own memory (here :data:`RED_PILL_VMM_IDT`) is exposed (Rutkowska, 2004).
    * CLI is privileged, so under the VMM it traps and the VMM clears only the
      *virtual* IF; PUSHF (unprivileged) then shows the real IF, still 1.

    Returns ``{"native": {...}, "vmm": {...}}``; each has what the guest saw
    (``idt_base``, ``idt_limit``, ``eflags``, ``if_after_cli``, ``iopl``), the
    ``clues`` it found, and its ``verdict``.  Under the VMM, ``traps`` lists the
    instructions that trapped to the VMM and ``virtual_if`` the VMM's copy of IF.
    """
    mode = parse_mode(mode)
    if mode not in (Mode.PROTECTED, Mode.PAGED):
        raise ValueError("the red pill is written in 32-bit code: use 'protected' or 'paged'")
    native = replace(NATIVE, idt_limit=0x7FF)
    vmm = replace(DEPRIVILEGED, idt_base=RED_PILL_VMM_IDT, idt_limit=0x7FF,
                  gdt_base=VMM_GDT, gdt_limit=VMM_GDT_LIMIT)
    return {"native": _red_pill_run(native, mode), "vmm": _red_pill_run(vmm, mode)}

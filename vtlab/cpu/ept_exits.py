"""EPT violations and misconfigurations as VM exits (SDM Vol. 3C 29.3.3, 28.2.1).

:class:`vtlab.cpu.ept.EptUnit` says *whether* a guest-physical access faults; this module
builds what the exit reports: the qualification (Table 28-7), the guest-physical address
and - the one thing Unicorn's memory hooks do not give - the guest-linear address, found
by walking the guest's own page tables for the addresses the faulting instruction uses.
It also finds the EPT faults that hide behind a #PF: Unicorn's page walker reads the
guest's paging structures without a hook, so a paging-structure entry in memory the EPT
does not map shows up as a page fault first (:func:`guest_walk`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import unicorn

from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Cr0
from ..arch.qualifications import EptViolationQualification
from .ept import EptUnit, Leaf, guest_paging_format
from .nested_walk import X86_PAE, Walk, walk_2d

if TYPE_CHECKING:
    from .guest import Guest
    from .vmexit import VmExit


def violation_qualification(kind: str, permissions: int, gla_valid: bool = True,
                            translation: bool = True) -> int:
    """The EPT-violation exit qualification (SDM Table 28-7) of an access of ``kind``."""
    return EptViolationQualification(
        read=kind == "r", write=kind == "w", fetch=kind == "x", readable=bool(permissions & 1),
        writable=bool(permissions & 2), executable=bool(permissions & 4),
        gla_valid=gla_valid, gla_translation=gla_valid and translation).encode()


def _cached_nested(unit: EptUnit, filled: list[Leaf] | None = None) -> Callable[[int, str], Walk]:
    """The nested step of a 2-D walk through the *cached* mappings (what the processor
    uses while they are cached), not the tables in memory.  With ``filled`` (a list),
    a guest paging-structure access to a page whose EPT accessed flag is still 0 sets
    it - and, as such accesses count as writes with A/D on, the dirty flag (SDM
    29.3.4) - maps the page, and is noted in ``filled``."""
    def nested(gpa: int, purpose: str) -> Walk:
        ctx = unit.current
        lf = ctx.leaf(gpa) if ctx is not None else None
        if lf is None:
            why = ctx.misconfiguration(gpa) if ctx is not None else None
            return Walk(gpa, permissions=0, fault="misconfigured" if why else "not-present", problem=why or "")
        if filled is not None and not lf.accessed and purpose.startswith("guest") and lf.permissions & 1:
            unit.set_flags(lf, write=bool(lf.permissions & 2))
            filled.append(lf)
        return Walk(gpa, physical=lf.hpa + gpa - lf.gpa, permissions=lf.permissions, page_size=lf.size)
    return nested


def guest_walk(unit: EptUnit, guest: "Guest", linear: int, fill: bool = False):
    """The guest's translation of ``linear`` with the cached EPT mappings in force (a
    :class:`Walk2D`); with ``fill``, (the walk, whether accessed flags were set on the way)."""
    fmt = guest_paging_format(guest.reg("cr0"), guest.reg("cr4"), guest.reg("efer"))
    root = guest.reg("cr3") & (~0x1F if fmt is X86_PAE else ~0xFFF) & ((1 << 52) - 1)
    filled: list[Leaf] | None = [] if fill else None
    w = walk_2d(fmt, root, linear, _cached_nested(unit, filled), unit.memory.read_int)
    return (w, bool(filled)) if fill else w


def _operand_addresses(guest: "Guest") -> list[int]:
    """Linear addresses the instruction at RIP may touch: its memory operands' effective
    addresses (plus FS/GS base), the stack around RSP, its own bytes."""
    import capstone
    from . import asm
    rip = guest.linear_rip()
    out = [rip, rip + 15]
    try:
        rsp = guest.reg("rsp")
        out += [rsp - 8, rsp, rsp + 8]
        cs = capstone.Cs(capstone.CS_ARCH_X86, asm._CS_MODE[guest.bits])
        cs.detail = True
        insn = next(cs.disasm(guest.read(rip, 15), rip, 1), None)
        if insn is not None:
            for op in insn.operands:
                if op.type != capstone.x86.X86_OP_MEM:
                    continue
                m = op.mem
                ea = m.disp
                for reg, scale in ((m.base, 1), (m.index, m.scale)):
                    if reg:
                        name = insn.reg_name(reg)
                        ea += (rip + insn.size if name in ("rip", "eip") else guest.reg(name)) * scale
                if m.segment:
                    ea += guest.segment(insn.reg_name(m.segment)).base
                out += [ea, ea + op.size - 1]
    except (unicorn.UcError, KeyError, ValueError, AttributeError):
        pass
    return out


def fault_linear(unit: EptUnit, guest: "Guest", gpa: int) -> int | None:
    """The guest-linear address whose translation gave ``gpa`` (None if not found): with
    paging off the linear address *is* the guest-physical one."""
    if not guest.reg("cr0") & Cr0.PG:
        return gpa
    for linear in _operand_addresses(guest):
        mask = (1 << 64) - 1 if guest.bits == 64 else 0xFFFF_FFFF
        w = guest_walk(unit, guest, linear & mask)
        if w.guest_physical is not None and w.guest_physical >> 12 == gpa >> 12:
            return (linear & mask & ~0xFFF) | (gpa & 0xFFF)
    return None


def ept_exit(unit: EptUnit, guest: "Guest", outcome: tuple[str, object], kind: str, gpa: int,
             linear: int | None, translation: bool = True, note: str = "") -> "VmExit":
    """The VM exit for an EPT violation or misconfiguration ``outcome`` (see
    :meth:`EptUnit.fault`) of an access of ``kind`` to ``gpa`` (SDM 29.3.3, 28.2.1)."""
    from .vmexit import VmExit
    insn = guest.instruction_at()
    common = dict(guest_physical_address=gpa, guest_instructions=guest.counter.total, cpl=guest.cpl)
    if outcome[0] == "misconfig":
        # SDM 28.2.1: the exit qualification of an EPT misconfiguration is undefined (0
        # here); the guest-linear-address field is not written.
        return VmExit(ExitReason.EPT_MISCONFIG, 0, 0, guest.rip, insn.text if insn else "",
                      note=note or f"EPT misconfiguration: {outcome[1]}", **common)
    q = violation_qualification(kind, int(outcome[1]), gla_valid=linear is not None, translation=translation)
    return VmExit(ExitReason.EPT_VIOLATION, q, 0, guest.rip, insn.text if insn else "",
                  guest_linear_address=linear, note=note, **common)

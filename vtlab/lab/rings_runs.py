"""The ring lab's runs: one probe in one world, what it left behind, and how two differ.

:func:`_run` runs a probe (set-up statements, the probed instruction, HLT) in a fresh
guest built as a :class:`~vtlab.lab.rings_worlds.World` and records what a learner can
observe: general registers, how far the stack pointer moved, which EFLAGS bits and
segment registers changed, the first page of memory and the top of the stack.
:func:`_compare` turns two such records into :class:`Difference` s worded for a reader
(``SGDT stored base 0x90000 vs 0x50000 after the GDT moved``).
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..cpu import asm
from ..arch.exceptions import Vector
from ..arch.msrs import Rflags
from ..errors import BudgetExceeded
from ..cpu.guest import Guest, GuestException, Layout, Mode
from .rings_worlds import (PROBE_ADDRESS, SETUP_ADDRESS, World, _code_selectors, _gprs,
                           _initial_gprs, _install_tables, _setup_source, assemble)

#: Memory the comparison looks at: the first page (where probes store results) and
#: the top of the probe's stack.
_DATA_PAGE = (0x0, 0x1000)
_STACK_WINDOW = 0x100

#: Bit number -> name of every one-bit EFLAGS flag (bit 1, always 1, is not a flag).
_FLAG_NAMES = {m.value.bit_length() - 1: m.name for m in Rflags if m is not Rflags.FIXED}
_IOPL = int(Rflags.IOPL)  # EFLAGS.IOPL, bits 13:12
# RF is set/cleared by fault delivery machinery, bit 1 is always 1: neither is a result.
_FLAG_MASK = 0x3F_FFFF & ~int(Rflags.RF | Rflags.FIXED)   # bits 21:0 but those two


# ------------------------------------------------------------------------ one run
@dataclass
class _Run:
    outcome: str                       # "ok", "#GP(0)", "#UD", "budget" ...
    exception: GuestException | None
    observed: dict[str, object]
    instruction: asm.Instruction | None  # the probed (last) instruction
    faulted_at: str = ""


def _outcome(exc: GuestException) -> str:
    code = "" if exc.error_code is None else f"({exc.error_code})"
    return f"{exc.name}{code}"


def _run(text: str, world: World, mode: Mode, delay: int = 0) -> _Run:
    """Run ``text`` + ``hlt`` in a fresh guest set up as ``world``; observe the results.

    ``delay`` NOPs run first: the same experiment, only later - what changes then is a
    clock (the guest's time-stamp counter counts instructions retired), not privilege.
    """
    g = Guest(mode)
    _install_tables(g, world)
    prog = g.load(assemble(text + "\nhlt", PROBE_ADDRESS, mode.bits), PROBE_ADDRESS)
    final_hlt = prog.instructions[-1].address
    probed = prog.instructions[-2] if len(prog.instructions) > 1 else None
    g.load(assemble("nop\n" * delay + _setup_source(g, world, prog.address), SETUP_ADDRESS, mode.bits),
           SETUP_ADDRESS)
    start = _initial_gprs(mode)
    for name, value in start.items():
        g.set_reg(name, value)
    code_sel, data_sel = _code_selectors(mode, world.cpl)
    segs0 = {"cs": code_sel, "ss": data_sel, "ds": data_sel, "es": data_sel,
             "fs": data_sel, "gs": data_sel}
    try:
        result = g.run(SETUP_ADDRESS, max_instructions=10_000)
    except BudgetExceeded:
        return _Run("budget", None, {}, probed, "")
    exc = result.exception
    # The run ends at the final HLT: at CPL 0 it stops the CPU; at CPL 3 (or after the
    # probe returned to CPL 3) HLT itself raises #GP, which ends the run just the same.
    reached_end = result.reason == "hlt" or (
        exc is not None and exc.vector == Vector.GP and exc.rip == final_hlt and exc.cpl == 3)
    if not reached_end:
        return _Run(_outcome(exc) if exc else result.reason, exc, {}, probed,
                    exc.instruction if exc else "")
    observed: dict[str, object] = {}
    for name in _gprs(mode):
        observed[name] = g.reg(name)
    sp = "rsp" if mode is Mode.LONG else "esp"
    observed["stack pointer moved by"] = g.reg(sp) - Layout.USER_STACK
    flags0 = world.eflags
    # Which EFLAGS bits the probe changed: the IF and IOPL worlds start with other
    # values on purpose, so the change (not the value) is what can be compared.
    observed["EFLAGS bits changed"] = (g.reg("rflags") ^ flags0) & _FLAG_MASK
    for seg, before in segs0.items():
        now = g.reg(seg)
        observed[f"{seg.upper()} loaded with"] = None if now == before else now
    lo, hi = _DATA_PAGE
    observed["memory"] = g.read(lo, hi - lo)
    observed["stack"] = g.read(Layout.USER_STACK - _STACK_WINDOW, _STACK_WINDOW)
    return _Run("ok", None, observed, probed)


# ----------------------------------------------------------------- comparing runs
@dataclass
class Difference:
    """One observable that differed between two worlds."""

    factor: str       # "CPL", "GDTR", ...
    what: str         # "EAX", "memory 0x600..0x605", ...
    a: str            # value in the reference world
    b: str            # value in the changed world
    phrase: str = ""  # "after the GDT moved"

    def __str__(self) -> str:
        return f"{self.what} {self.a} vs {self.b} {self.phrase}".strip()


def _flags_text(mask: int) -> str:
    names = [n for bit, n in _FLAG_NAMES.items() if mask & (1 << bit)]
    if mask & _IOPL:
        names.append("IOPL")
    return "+".join(names) if names else "none"


def _pseudo_operand(insn: asm.Instruction | None) -> tuple[str, int] | None:
    """For SGDT/SIDT with an absolute memory operand: (name, address)."""
    if insn is None or insn.mnemonic not in ("sgdt", "sidt"):
        return None
    m = re.search(r"\[(0x[0-9a-f]+|\d+)\]", insn.op_str)
    if m:
        return insn.mnemonic.upper(), int(m.group(1), 0)
    # The assembler encodes [abs] as RIP-relative in 64-bit code: [rip +/- disp]
    m = re.search(r"\[rip ([+-]) (0x[0-9a-f]+|\d+)\]", insn.op_str)
    if m:
        disp = int(m.group(2), 0) * (1 if m.group(1) == "+" else -1)
        return insn.mnemonic.upper(), insn.address + insn.size + disp
    return None


def _memory_differences(a: bytes, b: bytes, base: int, label, insn, wide: bool):
    """Group differing bytes into runs; decode an SGDT/SIDT image when there is one."""
    out = []
    pseudo = _pseudo_operand(insn) if label == "memory" else None
    size = 10 if wide else 6
    skip = set()
    if pseudo:
        name, addr = pseudo
        off = addr - base
        if 0 <= off and off + size <= len(a) and a[off:off + size] != b[off:off + size]:
            fmt = "<HQ" if wide else "<HI"
            la, ba = struct.unpack(fmt, a[off:off + size])
            lb, bb = struct.unpack(fmt, b[off:off + size])
            what = f"{name} stored"
            if ba != bb and la != lb:
                out.append((what, f"base {ba:#x} limit {la:#x}", f"base {bb:#x} limit {lb:#x}"))
            elif ba != bb:
                out.append((what, f"base {ba:#x}", f"{bb:#x}"))
            else:
                out.append((what, f"limit {la:#x}", f"{lb:#x}"))
            skip = set(range(off, off + size))
    i = 0
    while i < len(a):
        if a[i] == b[i] or i in skip:
            i += 1
            continue
        j = i
        while j < len(a) and a[j] != b[j] and j not in skip:
            j += 1
        # widen to whole 2/4-byte values so that a pushed selector reads naturally
        start, end = i, j
        if label == "stack":
            start, end = start - start % 2, end + end % 2
            where = (f"stack [top-{len(a) - start:#x}]" if end - start <= 8 else
                     f"stack [top-{len(a) - start:#x}..top-{len(a) - end:#x}]")
        else:
            where = f"memory {base + start:#x}" + (f"..{base + end - 1:#x}" if end - start > 1 else "")
        chunk_a, chunk_b = a[start:end], b[start:end]
        if end - start <= 8:
            va = int.from_bytes(chunk_a, "little")
            vb = int.from_bytes(chunk_b, "little")
            out.append((where, f"{va:#x}", f"{vb:#x}"))
        else:
            out.append((where, chunk_a.hex(" "), chunk_b.hex(" ")))
        i = j
    return out


def _describe(key: str, a: object, b: object, insn, wide: bool) -> list[tuple[str, str, str]]:
    """Turn one differing observable into (what, a, b) triples a learner can read."""
    if key in ("memory", "stack"):
        base = _DATA_PAGE[0] if key == "memory" else Layout.USER_STACK - _STACK_WINDOW
        return _memory_differences(a, b, base, key, insn, wide)
    if key == "EFLAGS bits changed":
        return [("EFLAGS bits it changed:", _flags_text(a), _flags_text(b))]
    if key.endswith("loaded with"):
        fmt = lambda v: "unchanged" if v is None else f"{v:#x}"
        return [(key, fmt(a), fmt(b))]
    if key == "stack pointer moved by":
        return [(key, f"{a:+#x}", f"{b:+#x}")]
    return [(key.upper(), f"{a:#x}", f"{b:#x}")]


def _compare(ref: _Run, other: _Run, noisy: set[str], factor: str, phrase: str,
             wide: bool) -> list[Difference]:
    out = []
    for key, value in ref.observed.items():
        if key in noisy or other.observed.get(key) == value:
            continue
        for what, a, b in _describe(key, value, other.observed[key], ref.instruction, wide):
            out.append(Difference(factor, what, a, b, phrase))
    return out

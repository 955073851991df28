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
* Keystone encodes ``push cs`` / ``pop ss`` with a 0x66 prefix (16-bit push/pop) in
  32-bit code, and truncates the offset of ``ljmp sel:offset`` to 16 bits; the probes
  below use the forms that assemble correctly (``lcall sel:label``, ``ljmp [mem]``).
  It also puts a 0x66 prefix on LGDT/LIDT/SGDT/SIDT, which :func:`assemble` repairs.
* Unicorn never delivers an exception through the IDT (the host hook gets it), and
  it then reports the *next* #GP on the same CPU as #DF; every run here therefore
  uses a fresh :class:`~vtlab.guest.Guest` and ends with exactly one fault.
"""
from __future__ import annotations

import re
import struct
from dataclasses import asdict, dataclass, field, replace

import pandas as pd
from unicorn import x86_const as X

from ..cpu import asm
from ..arch.msrs import Cr0
from ..errors import AssemblyError, BudgetExceeded
from ..cpu.guest import Guest, GuestException, Layout, Mode, Selector, _descriptor

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

# ----------------------------------------------------------------------------- layout
#: Where the probe's code is loaded (the same address in every world).
PROBE_ADDRESS = 0x2_0000
#: Ring-0 code that loads a world's privileged state, then jumps/IRETs to the probe.
SETUP_ADDRESS = Layout.TRAMPOLINE
#: Pseudo-descriptors (limit, base) for LGDT/LIDT used by the set-up code.
_PSEUDO = 0x9_7F00

#: Extra GDT entries this lab adds to the guest's GDT (16-byte slots, so that the same
#: selectors work in long mode, where LDT and TSS descriptors are 16 bytes long).
CONFORMING_CODE = 0x48   # ring-0 *conforming* code segment (SDM Vol. 3A 5.8.1.2)
LDT_SELECTOR = 0x50      # an LDT descriptor (the VMM's LDT)
VMM_TSS = 0x60           # a second TSS descriptor (the VMM's TSS)
GDT_LIMIT = 0x6F         # the guest's GDT with those entries: 14 x 8 bytes - 1

#: Where a VMM would keep *its* tables (the guest's own stay at Layout.GDT / .IDT).
VMM_GDT, VMM_GDT_LIMIT = 0x5_0000, 0x3FF
VMM_IDT, VMM_IDT_LIMIT = 0x5_1000, 0xFFF
VMM_LDT = 0x5_2000
VMM_TSS_BASE = 0x5_3000

#: Memory the comparison looks at: the first page (where probes store results) and
#: the top of the probe's stack.
_DATA_PAGE = (0x0, 0x1000)
_STACK_WINDOW = 0x100

_FLAG_NAMES = {0: "CF", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF", 10: "DF",
               11: "OF", 14: "NT", 16: "RF", 17: "VM", 18: "AC", 19: "VIF", 20: "VIP", 21: "ID"}
_IOPL = 3 << 12  # EFLAGS.IOPL, bits 13:12
# RF is set/cleared by fault delivery machinery, bit 1 is always 1: neither is a result.
_FLAG_MASK = 0x3F_FFFF & ~(1 << 16) & ~0x2


def _gprs(mode: Mode) -> list[str]:
    if mode is Mode.LONG:
        return ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
                "r12", "r13", "r14", "r15"]
    return ["eax", "ebx", "ecx", "edx", "esi", "edi", "ebp"]


def _initial_gprs(mode: Mode) -> dict[str, int]:
    """Distinctive start values, identical in every world (0x11111111, 0x22222222 ...)."""
    wide = mode is Mode.LONG
    out = {}
    for i, name in enumerate(_gprs(mode), start=1):
        digit = i % 16 or 1
        out[name] = int(f"{digit:x}" * (16 if wide else 8), 16)
    return out


# ----------------------------------------------------------------------------- worlds
@dataclass(frozen=True)
class World:
    """One setting of the privileged state a probe runs under.

    Every field is state that only ring-0 code can change: the CPL the probe runs at,
    GDTR/IDTR (SDM Vol. 3A 2.4), LDTR/TR selectors, CR0 bits, EFLAGS.IF and IOPL
    (SDM Vol. 3A 2.3), and whether the kernel's descriptors were rewritten to DPL 3
    (ring compression, as VMware and Xen did to run a kernel outside ring 0).
    """

    cpl: int = 0
    gdt_base: int = Layout.GDT
    gdt_limit: int = GDT_LIMIT
    idt_base: int = Layout.IDT
    idt_limit: int = 0x7FF
    ldtr: int = 0
    tr: int = Selector.TSS
    cr0_set: int = 0
    interrupt_flag: int = 1
    iopl: int = 0
    ring_compression: bool = False

    @property
    def eflags(self) -> int:
        return 0x2 | (self.interrupt_flag << 9) | (self.iopl << 12)


#: The guest kernel on bare hardware.
NATIVE = World()
#: The same kernel run by a trap-and-emulate VMM at CPL 3 (nothing else changed yet).
DEPRIVILEGED = replace(NATIVE, cpl=3)


@dataclass(frozen=True)
class Factor:
    """One change a VMM makes to the real privileged state while the guest runs."""

    key: str          # short name used in the ``depends_on`` column
    phrase: str       # "after the GDT moved"
    world: World      # the deprivileged world with this one change


#: The changes tried on every instruction that runs at CPL 3.
FACTORS: tuple[Factor, ...] = (
    Factor("GDTR", "after the GDT moved",
           replace(DEPRIVILEGED, gdt_base=VMM_GDT, gdt_limit=VMM_GDT_LIMIT)),
    Factor("IDTR", "after the IDT moved",
           replace(DEPRIVILEGED, idt_base=VMM_IDT, idt_limit=VMM_IDT_LIMIT)),
    Factor("LDTR", "after LDTR was loaded with the VMM's LDT",
           replace(DEPRIVILEGED, ldtr=LDT_SELECTOR)),
    Factor("TR", "after TR was loaded with the VMM's TSS",
           replace(DEPRIVILEGED, tr=VMM_TSS)),
    Factor("CR0", "after the VMM set CR0.TS and CR0.MP",
           replace(DEPRIVILEGED, cr0_set=int(Cr0.TS | Cr0.MP))),
    Factor("IF", "with the real EFLAGS.IF cleared",
           replace(DEPRIVILEGED, interrupt_flag=0)),
    Factor("IOPL", "with EFLAGS.IOPL = 3 instead of 0",
           replace(DEPRIVILEGED, iopl=3)),
    Factor("DPL", "after ring compression gave the kernel's descriptors DPL 3",
           replace(DEPRIVILEGED, ring_compression=True)),
)


def _code_selectors(mode: Mode, cpl: int) -> tuple[int, int]:
    """(CS, SS/DS) selectors of the probe at ``cpl``."""
    if cpl == 0:
        return (Selector.KERNEL_CODE64 if mode is Mode.LONG else Selector.KERNEL_CODE32,
                Selector.KERNEL_DATA)
    return (Selector.USER_CODE64 if mode is Mode.LONG else Selector.USER_CODE32,
            Selector.USER_DATA)


def _system_descriptor(base: int, limit: int, access: int, long_mode: bool) -> bytes:
    """An LDT/TSS descriptor: 8 bytes, or 16 in IA-32e mode (SDM Vol. 3A 8.2.3)."""
    low = _descriptor(base, limit, access, 0)
    return low + (struct.pack("<Q", base >> 32) if long_mode else bytes(8))


_TABLE_OPS = ("lgdt", "lidt", "sgdt", "sidt")


def assemble(source: str, address: int, bits: int) -> bytes:
    """:func:`vtlab.asm.assemble`, with Keystone's LGDT/LIDT/SGDT/SIDT fixed in 32-bit code.

    Keystone puts a 0x66 operand-size prefix on these four in 32-bit code, which makes
    them 16-bit instructions: LGDT/LIDT then load only a 24-bit base (SDM Vol. 2A,
    LGDT/LIDT "Operation") and QEMU's SGDT/SIDT store only 24 bits of it.  The prefix
    is replaced by a segment-override prefix naming the segment the operand uses
    anyway (DS, or SS for EBP/ESP-based operands), so the length and every label stay
    the same and the instruction gets its 32-bit operand size back.
    """
    code = bytearray(asm.assemble(source, address, bits))
    if bits != 32:
        return bytes(code)
    for insn in asm.disassemble(bytes(code), address, bits):
        if insn.mnemonic in _TABLE_OPS and insn.bytes[:1] == b"\x66":
            uses_stack = re.search(r"\b(ebp|esp)\b", insn.op_str) is not None
            code[insn.address - address] = 0x36 if uses_stack else 0x3E
    return bytes(code)


def _install_tables(g: Guest, world: World) -> None:
    """Write the guest's GDT (plus this lab's entries), the VMM's copies, LDT and TSS."""
    long_mode = g.mode is Mode.LONG
    flat_flags = 0xA if long_mode else 0xC
    extra = b"".join([
        _descriptor(0, 0xFFFFF, 0x9E, flat_flags),            # 0x48 conforming ring-0 code
        _system_descriptor(VMM_LDT, 0xF, 0x82, long_mode),    # 0x50 LDT
        _system_descriptor(VMM_TSS_BASE, 0x67, 0x89, long_mode),  # 0x60 available TSS
    ])
    g.write(Layout.GDT + CONFORMING_CODE, extra)
    g.write(VMM_TSS_BASE, g.read(Layout.TSS, 0x68))
    g.write(VMM_LDT, bytes(16))
    gdt = bytearray(g.read(Layout.GDT, GDT_LIMIT + 1))
    # LTR only loads an *available* TSS and marks it busy (SDM Vol. 3A 8.2.4); the
    # guest's TSS is already busy (TR holds it), so clear the bit as a kernel does
    # before it reloads TR.
    gdt[Selector.TSS + 5] &= ~0x02
    if world.ring_compression:
        # Ring compression: the kernel's code and data descriptors get DPL 3 so that the
        # deprivileged kernel may still use them (access byte bits 6:5, SDM Vol. 3A 3.4.5).
        for sel in (Selector.KERNEL_CODE32, Selector.KERNEL_DATA, Selector.KERNEL_CODE64):
            gdt[sel + 5] |= 0x60
    g.write(world.gdt_base, bytes(gdt))
    pointer = "<HQ" if long_mode else "<HI"
    g.write(_PSEUDO, struct.pack(pointer, world.gdt_limit, world.gdt_base))
    g.write(_PSEUDO + 0x10, struct.pack(pointer, world.idt_limit, world.idt_base))


def _setup_source(g: Guest, world: World, entry: int) -> str:
    """Ring-0 code that loads ``world``'s privileged state with the real instructions.

    It preserves every general register, so the probe starts with the same values in
    every world, then either jumps to the probe (CPL 0) or builds an IRET frame and
    returns to it at CPL 3 (SDM Vol. 3A 6.14 / Vol. 2 IRET: the only way *down*).
    """
    long_mode = g.mode is Mode.LONG
    ax, sp = ("rax", "rsp") if long_mode else ("eax", "esp")
    cr0 = g.reg("cr0") | world.cr0_set
    lines = [
        f"push {ax}",
        f"lgdt [{_PSEUDO:#x}]",
        f"lidt [{_PSEUDO + 0x10:#x}]",
        f"mov {ax}, {cr0:#x}",
        f"mov cr0, {ax}",
        f"mov ax, {world.ldtr:#x}",
        "lldt ax",
        f"mov ax, {world.tr:#x}",
        "ltr ax",
    ]
    code_sel, data_sel = _code_selectors(g.mode, world.cpl)
    if world.cpl == 0:
        lines += [f"pop {ax}", f"push {world.eflags:#x}", "popfq" if long_mode else "popfd",
                  f"mov {sp}, {Layout.USER_STACK:#x}", f"jmp {entry:#x}"]
    else:
        lines += [f"mov ax, {data_sel:#x}", "mov ds, ax", "mov es, ax", "mov fs, ax",
                  "mov gs, ax", f"pop {ax}",
                  f"push {data_sel:#x}", f"push {Layout.USER_STACK:#x}",
                  f"push {world.eflags:#x}", f"push {code_sel:#x}", f"push {entry:#x}",
                  "iretq" if long_mode else "iretd"]
    return "\n".join(lines)


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
        exc is not None and exc.vector == 13 and exc.rip == final_hlt and exc.cpl == 3)
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
        now = g.uc.reg_read(getattr(X, f"UC_X86_REG_{seg.upper()}"))
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
    # Keystone encodes [abs] as RIP-relative in 64-bit code: [rip +/- disp]
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

    def as_dict(self) -> dict:
        """A flat dict (one DataFrame row): differences are folded into ``evidence``."""
        d = asdict(self)
        d.pop("differences")
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
    lines = [asm._strip_comment(l).strip() for l in text.splitlines()]
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
    mode = Mode(mode)
    if mode is Mode.REAL:
        raise ValueError("rings need protected mode: in real mode everything runs at CPL 0")
    wide = mode is Mode.LONG
    try:
        native = _run(text, NATIVE, mode)
    except AssemblyError as exc:
        return Probe(text, "untestable", "assembly error", "assembly error", str(exc),
                     name or text, "")
    insn = native.instruction
    name = name or _default_name(text)
    mnemonic = insn.mnemonic if insn else ""
    ri = _robin_irvine_entry(insn)
    common = dict(name=name, mnemonic=mnemonic, robin_irvine=ri)
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


# ----------------------------------------------------------------------- red pill
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
    test dword ptr [0x708], 0x200
    jz if_ok
    or ebx, 2                    ; clue 2: IF is still 1 right after my CLI
if_ok:
    test dword ptr [0x708], 0x3000
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
    while result.exception is not None and result.exception.vector in (13, 8):
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
        reasons.append(f"PUSHF: IOPL = {eflags >> 12 & 3}, not the 0 the kernel set")
    return {
        "cpl": world.cpl,
        "idt_base": base,
        "idt_limit": limit,
        "eflags": eflags,
        "if_after_cli": eflags >> 9 & 1,
        "iopl": eflags >> 12 & 3,
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
    mode = Mode(mode)
    if mode not in (Mode.PROTECTED, Mode.PAGED):
        raise ValueError("the red pill is written in 32-bit code: use 'protected' or 'paged'")
    native = replace(NATIVE, idt_limit=0x7FF)
    vmm = replace(DEPRIVILEGED, idt_base=RED_PILL_VMM_IDT, idt_limit=0x7FF,
                  gdt_base=VMM_GDT, gdt_limit=VMM_GDT_LIMIT)
    return {"native": _red_pill_run(native, mode), "vmm": _red_pill_run(vmm, mode)}

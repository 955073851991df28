"""The ring lab's worlds: the privileged state a probe runs under, and how it is loaded.

A *world* (:class:`World`) is one setting of the state only ring-0 code can change:
the CPL, GDTR/IDTR, LDTR/TR, CR0 bits, EFLAGS.IF and IOPL, and whether the kernel's
descriptors were compressed to DPL 3.  :data:`NATIVE` is the guest kernel on bare
hardware, :data:`DEPRIVILEGED` the same kernel at CPL 3 under a trap-and-emulate VMM,
and each :class:`Factor` of :data:`FACTORS` changes one more piece of state the way a
VMM would.  :func:`_install_tables` and :func:`_setup_source` build a world in a fresh
:class:`~vtlab.cpu.guest.Guest` with the real instructions (LGDT, LIDT, LLDT, LTR,
MOV CR0, POPF, IRET).  See :mod:`vtlab.lab.rings` for the experiment as a whole.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from ..cpu import asm
from ..arch.msrs import RFLAGS_IOPL_SHIFT, Cr0, Rflags
from ..cpu.guest import Guest, Layout, Mode, Selector, pack_descriptor

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
        return int(Rflags.FIXED | (Rflags.IF if self.interrupt_flag else 0)) | (self.iopl << RFLAGS_IOPL_SHIFT)


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
    low = pack_descriptor(base, limit, access, 0)
    return low + (struct.pack("<Q", base >> 32) if long_mode else bytes(8))


def assemble(source: str, address: int, bits: int) -> bytes:
    """:func:`vtlab.asm.assemble` (kept under this name for the lab's callers)."""
    return asm.assemble(source, address, bits)


def _install_tables(g: Guest, world: World) -> None:
    """Write the guest's GDT (plus this lab's entries), the VMM's copies, LDT and TSS."""
    long_mode = g.mode is Mode.LONG
    flat_flags = 0xA if long_mode else 0xC
    extra = b"".join([
        pack_descriptor(0, 0xFFFFF, 0x9E, flat_flags),        # 0x48 conforming ring-0 code
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

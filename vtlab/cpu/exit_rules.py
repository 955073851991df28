"""Which guest instructions cause VM exits, under which controls (SDM Vol. 3C 26.1).

Each rule gets the monitor and the decoded instruction and returns a :class:`VmExit`,
None (no exit: the CPU executes it), or "emulated" (vtlab carried it out itself).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..arch.controls import ProcBased, ProcBased2
from ..arch.exceptions import Vector
from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Cr0, Cr4, Efer
from ..arch.qualifications import (GPR_ORDER, CrAccessQualification, CrAccessType,
                                  IoDirection,
                                  IoQualification)
from ..arch.vmcs_fields import VmcsField as F
from .asm import Instruction

from .vmexit import VmExit

if TYPE_CHECKING:
    from .nonroot import ExitMonitor

# ----------------------------------------------------------------------- exit rules
# Each rule gets the monitor and the decoded instruction and returns a VmExit, None (no
# exit: the CPU executes it), or the string "emulated" (vtlab carried it out itself,
# e.g. a read of CR0 through the read shadow).  Privileged instructions at CPL > 0
# raise #GP *before* any exit check (SDM 26.1.1), so their rules start with _ring0().

Rule = Callable[["ExitMonitor", Instruction], "VmExit | None | str"]


def _exit(m: "ExitMonitor", insn: Instruction, reason: ExitReason, qualification: int = 0, **kw) -> VmExit:
    return VmExit(reason, qualification, insn.size, m.guest.rip, insn.text, **kw)


def _ring0(m: "ExitMonitor") -> bool:
    return m.guest.cpl == 0


def unconditional(reason: ExitReason) -> Rule:
    """CPUID, GETSEC and VMCALL always exit (SDM 26.1.2; INVD, XSETBV and the other VMX
    instructions exit unconditionally too, after their own fault checks - see below)."""
    def rule(m, insn):
        return _exit(m, insn, reason)
    rule.__doc__ = f"{reason.name}: exits unconditionally"
    return rule


def when(control, reason: ExitReason, privileged: bool = True) -> Rule:
    """Exits if a processor-based control (primary or secondary) is 1 (SDM 26.1.3)."""
    def rule(m, insn):
        if privileged and not _ring0(m):
            return None
        return _exit(m, insn, reason) if m.control_on(control) else None
    rule.__doc__ = f"{reason.name}: exits if {control.name} is 1"
    return rule


def rule_invd(m, insn):
    """INVD exits unconditionally (SDM 26.1.2) - but it is privileged, and a #GP at
    CPL > 0 has priority over the VM exit (SDM 26.1.1)."""
    if not _ring0(m):
        return None  # the CPU raises #GP(0)
    return _exit(m, insn, ExitReason.INVD)


def rule_xsetbv(m, insn):
    """XSETBV exits unconditionally (SDM 26.1.2) once its own fault checks pass.

    XSETBV raises #UD if CR4.OSXSAVE = 0 and #GP(0) at CPL > 0 (SDM Vol. 2, XSETBV);
    both have priority over the VM exit (SDM 26.1.1: invalid-opcode exceptions and
    faults based on privilege level come first).
    """
    if not m.guest.reg("cr4") & Cr4.OSXSAVE:
        return m.raise_exception(Vector.UD, "XSETBV with CR4.OSXSAVE = 0 raises #UD")
    if not _ring0(m):
        return None  # the CPU raises #GP(0)
    return _exit(m, insn, ExitReason.XSETBV)


def rule_rdpmc(m, insn):
    """RDPMC exits if "RDPMC exiting" is 1 (SDM 26.1.3), after the CPL/CR4.PCE #GP check.

    With the control 0 the CPU reads the counter.  QEMU (Unicorn) does not implement
    RDPMC at all - it raises #UD - so vtlab carries it out: no counters are running,
    so EDX:EAX = 0.
    """
    g = m.guest
    if g.cpl > 0 and not g.reg("cr4") & Cr4.PCE:
        return None  # #GP(0) (SDM Vol. 2, RDPMC), before any exit
    if m.proc & ProcBased.RDPMC_EXITING:
        return _exit(m, insn, ExitReason.RDPMC)
    g.set_reg("rax", 0)
    g.set_reg("rdx", 0)
    return "emulated"


def _monitor_mwait(control, reason: ExitReason) -> Rule:
    """MONITOR / MWAIT exit if their control is 1 (SDM 26.1.3); both are #UD at CPL > 0
    here (IA32_MISC_ENABLE gives no user-mode MONITOR/MWAIT), which comes first.

    With the control 0 the CPU executes them.  vtlab's CPUID reports MONITOR/MWAIT
    (CPUID.1:ECX[3] = 1) but QEMU (Unicorn) raises #UD for both, so vtlab carries them
    out: MONITOR arms a monitor nobody watches, and MWAIT returns at once, as the SDM
    allows it to on any implementation-specific event (KVM does the same: MWAIT as NOP).
    """
    def rule(m, insn):
        if not _ring0(m):
            return None
        return _exit(m, insn, reason) if m.proc & control else "emulated"
    rule.__doc__ = f"{reason.name}: exits if {control.name} is 1, else executes (as a NOP)"
    return rule


def rule_hlt(m, insn):
    """HLT exits if "HLT exiting" is 1; otherwise the guest halts inside non-root operation."""
    if not _ring0(m):
        return None
    return _exit(m, insn, ExitReason.HLT) if m.proc & ProcBased.HLT_EXITING else None


def rule_invlpg(m, insn):
    """INVLPG exits if "INVLPG exiting" is 1; the qualification is the linear address."""
    if not _ring0(m) or not m.proc & ProcBased.INVLPG_EXITING:
        return None
    return _exit(m, insn, ExitReason.INVLPG, m.effective_address(insn))


def rule_rdtsc(m, insn):
    """RDTSC exits if "RDTSC exiting" is 1 (after the CR4.TSD check at CPL > 0)."""
    if m.guest.cpl > 0 and m.guest.reg("cr4") & Cr4.TSD:
        return None
    return _exit(m, insn, ExitReason.RDTSC) if m.proc & ProcBased.RDTSC_EXITING else None


def rule_rdtscp(m, insn):
    """RDTSCP: #UD unless "enable RDTSCP"; exits (reason 51) if RDTSC exiting is also 1."""
    if not m.proc2 & ProcBased2.ENABLE_RDTSCP:
        return m.raise_exception(Vector.UD, "RDTSCP with \"enable RDTSCP\" = 0 raises #UD")
    return _exit(m, insn, ExitReason.RDTSCP) if m.proc & ProcBased.RDTSC_EXITING else None


def _cr_operands(insn: Instruction) -> tuple[int, str, bool]:
    """(CR number, general register, to_cr) of a MOV CR instruction."""
    dst, src = [o.strip() for o in insn.op_str.split(",")]
    to_cr = dst.startswith("cr")
    cr = int((dst if to_cr else src)[2:])
    return cr, (src if to_cr else dst), to_cr


def _gpr_index(reg: str) -> int:
    """SDM register number (GPR_ORDER) of any width's name: rbx/ebx/bx -> 3, r9d/r9w -> 9."""
    reg = reg.lower()
    names32 = {"eax": 0, "ecx": 1, "edx": 2, "ebx": 3, "esp": 4, "ebp": 5, "esi": 6, "edi": 7}
    if reg in names32:
        return names32[reg]
    if "r" + reg in GPR_ORDER[:8]:  # 16-bit names: ax, cx, dx, bx, sp, bp, si, di
        return GPR_ORDER.index("r" + reg)
    return GPR_ORDER.index(reg.rstrip("dwb")) if reg.rstrip("dwb") in GPR_ORDER else 0


def rule_mov_cr(m, insn):
    """MOV to/from CR0, CR3, CR4, CR8 (SDM 26.1.3, 26.3 on guest/host masks and read shadows)."""
    if not _ring0(m):
        return None
    cr, reg, to_cr = _cr_operands(insn)
    gpr = _gpr_index(reg)
    qual = CrAccessQualification(cr, CrAccessType.MOV_TO_CR if to_cr else CrAccessType.MOV_FROM_CR, gpr).encode()
    v = m.vmcs.get
    if cr == 3:
        if to_cr:
            value = m.guest.reg(reg)
            targets = [v(F[f"CR3_TARGET_VALUE{i}"]) for i in range(min(v(F.CR3_TARGET_COUNT), 4))]
            if m.proc & ProcBased.CR3_LOAD_EXITING and value not in targets:
                return _exit(m, insn, ExitReason.CR_ACCESS, qual)
        elif m.proc & ProcBased.CR3_STORE_EXITING:
            return _exit(m, insn, ExitReason.CR_ACCESS, qual)
        return None
    if cr == 8:
        control = ProcBased.CR8_LOAD_EXITING if to_cr else ProcBased.CR8_STORE_EXITING
        return _exit(m, insn, ExitReason.CR_ACCESS, qual) if m.proc & control else None
    if cr in (0, 4):
        mask, shadow = (v(F.CR0_GUEST_HOST_MASK), v(F.CR0_READ_SHADOW)) if cr == 0 else \
                       (v(F.CR4_GUEST_HOST_MASK), v(F.CR4_READ_SHADOW))
        actual = m.guest.reg(f"cr{cr}")
        if to_cr:
            value = m.guest.reg(reg)
            if (value ^ shadow) & mask:
                return _exit(m, insn, ExitReason.CR_ACCESS, qual)
            if mask:  # bits the VMM owns keep their real value (SDM 26.3)
                m.guest.set_reg(f"cr{cr}", (actual & mask) | (value & ~mask))
                return "emulated"
            return None
        if mask:  # reads see the shadow for owned bits
            m.guest.set_reg(reg, (actual & ~mask) | (shadow & mask))
            return "emulated"
    return None


def rule_clts(m, insn):
    """CLTS exits if CR0.TS is owned by the VMM (mask bit 3) and the shadow's TS is 1."""
    if not _ring0(m):
        return None
    mask, shadow = m.vmcs.get(F.CR0_GUEST_HOST_MASK), m.vmcs.get(F.CR0_READ_SHADOW)
    if mask & Cr0.TS and shadow & Cr0.TS:
        return _exit(m, insn, ExitReason.CR_ACCESS, CrAccessQualification(0, CrAccessType.CLTS).encode())
    return None


def rule_lmsw(m, insn):
    """LMSW exits if it would change an owned bit of CR0[3:0] away from the shadow (SDM 26.1.3)."""
    if not _ring0(m):
        return None
    mask, shadow = m.vmcs.get(F.CR0_GUEST_HOST_MASK), m.vmcs.get(F.CR0_READ_SHADOW)
    op = insn.op_str.strip()
    memory = "[" in op
    value = m.guest.read(m.effective_address(insn), 2) if memory else None
    value = int.from_bytes(value, "little") if memory else m.guest.reg(op) & 0xFFFF
    pe_set = mask & 1 and not shadow & 1 and value & 1
    others = (value ^ shadow) & mask & 0xE
    if pe_set or others:
        q = CrAccessQualification(0, CrAccessType.LMSW, 0, memory, value & 0xFFFF).encode()
        return _exit(m, insn, ExitReason.CR_ACCESS, q)
    return None


def rule_smsw(m, insn):
    """SMSW never exits, but reads CR0[15:0] through the read shadow for owned bits."""
    mask = m.vmcs.get(F.CR0_GUEST_HOST_MASK) & 0xFFFF
    if not mask or "[" in insn.op_str:
        return None
    actual = m.guest.reg("cr0")
    m.guest.set_reg(insn.op_str.strip(), ((actual & ~mask) | (m.vmcs.get(F.CR0_READ_SHADOW) & mask)) & 0xFFFF)
    return "emulated"


def rule_mov_dr(m, insn):
    """MOV DR exits if "MOV-DR exiting" is 1 (SDM 26.1.3); qualification per Table 28-4."""
    if not _ring0(m) or not m.proc & ProcBased.MOV_DR_EXITING:
        return None
    dst, src = [o.strip() for o in insn.op_str.split(",")]
    to_dr = dst.startswith("dr")
    dr = int((dst if to_dr else src)[2:])
    reg = src if to_dr else dst
    q = dr | (0 if to_dr else 1 << 4) | (_gpr_index(reg) << 8)
    return _exit(m, insn, ExitReason.DR_ACCESS, q)


_IO_SIZES = {"b": 1, "w": 2, "d": 4}


def io_operands(m: "ExitMonitor", insn: Instruction) -> IoQualification:
    """Decode IN/OUT/INS/OUTS into the I/O exit qualification (SDM Table 28-5)."""
    mnem = insn.mnemonic.split()
    base = mnem[-1]
    rep = len(mnem) > 1 and mnem[0].startswith("rep")
    if base in ("in", "out"):
        ops = [o.strip() for o in insn.op_str.split(",")]
        port_op, reg = (ops[1], ops[0]) if base == "in" else (ops[0], ops[1])
        size = {"al": 1, "ax": 2, "eax": 4}[reg]
        immediate = port_op != "dx"
        port = int(port_op, 0) if immediate else m.guest.reg("dx")
        string = False
    else:
        size, immediate, string = _IO_SIZES[base[-1]], False, True
        port = m.guest.reg("dx")
    direction = IoDirection.IN if base.startswith("in") else IoDirection.OUT
    return IoQualification(port, size, direction, string, rep, immediate)


def rule_io(m, insn):
    """I/O instructions: unconditional I/O exiting, or the I/O bitmaps (SDM 26.1.3).

    With "use I/O bitmaps" = 1, "unconditional I/O exiting" is ignored and the access
    exits if the bit of *any* port it touches is 1 in bitmap A (ports 0000H-7FFFH) or B
    (8000H-FFFFH); an access that wraps past FFFFH always exits.
    """
    if m.guest._stop is not None:  # the CPL/IOPL check already raised #GP
        return None
    q = io_operands(m, insn)
    if m.proc & ProcBased.USE_IO_BITMAPS:
        exits = False
        for port in range(q.port, q.port + q.size):
            if port > 0xFFFF:
                exits = True
                break
            bitmap = m.vmcs.get(F.IO_BITMAP_A if port < 0x8000 else F.IO_BITMAP_B)
            if m.cpu.memory.test_bit(bitmap, port & 0x7FFF):
                exits = True
                break
    else:
        exits = bool(m.proc & ProcBased.UNCOND_IO_EXITING)
    if not exits:
        return None
    kw = {}
    if q.string:
        kw["guest_linear_address"] = _string_io_linear_address(m, insn, q)
    return _exit(m, insn, ExitReason.IO_INSTRUCTION, q.encode(), **kw)


def _string_io_linear_address(m: "ExitMonitor", insn: Instruction, q: IoQualification) -> int:
    """Linear address of the memory operand of INS/OUTS (the guest-linear-address field).

    A *linear* address: segment base plus offset (SDM 28.2.1) - ES:rDI for INS (ES
    cannot be overridden), DS:rSI for OUTS unless a segment prefix names another
    segment; the offset register has the instruction's address size (SI, ESI or RSI).
    """
    ops = insn.op_str.lower()
    index = "di" if q.direction is IoDirection.IN else "si"
    seg = "es" if q.direction is IoDirection.IN else "ds"
    for s in ("es", "cs", "ss", "ds", "fs", "gs"):
        if f"{s}:[" in ops.replace(" ", ""):
            seg = s if q.direction is IoDirection.OUT else "es"
    if f"[r{index}]" in ops:
        offset = m.guest.reg("r" + index)
    elif f"[e{index}]" in ops:
        offset = m.guest.reg("r" + index) & 0xFFFF_FFFF
    else:
        offset = m.guest.reg("r" + index) & 0xFFFF
    return (m.guest.segment(seg).base + offset) & 0xFFFF_FFFF_FFFF_FFFF


def msr_bitmap_position(msr: int) -> tuple[int, int] | None:
    """(byte offset of its read bitmap, bit) of ``msr`` in the 4-KByte MSR bitmap (SDM 25.6.9).

    Read bitmap for low MSRs (00000000H-00001FFFH) at offset 0, for high MSRs
    (C0000000H-C0001FFFH) at 1024; the write bitmaps follow 2048 bytes later.  None for
    an MSR in neither range: it has no bit, and accessing it always exits.
    """
    if msr <= 0x1FFF:
        return 0, msr
    if 0xC000_0000 <= msr <= 0xC000_1FFF:
        return 1024, msr - 0xC000_0000
    return None


def msr_bitmap_exits(m: "ExitMonitor", msr: int, write: bool) -> bool:
    """Does RDMSR/WRMSR of ``msr`` exit: always, or per the MSR bitmap (SDM 26.1.3)."""
    if not m.proc & ProcBased.USE_MSR_BITMAPS:
        return True
    position = msr_bitmap_position(msr)
    if position is None:
        return True
    offset, bit = position
    return m.cpu.memory.test_bit(m.vmcs.get(F.MSR_BITMAP) + offset + (2048 if write else 0), bit)


def rule_rdmsr(m, insn):
    """RDMSR exits always, or per the MSR bitmap when "use MSR bitmaps" is 1."""
    if not _ring0(m):
        return None
    msr = m.guest.reg("ecx")
    return _exit(m, insn, ExitReason.MSR_READ) if msr_bitmap_exits(m, msr, False) else None


def rule_wrmsr(m, insn):
    """WRMSR exits always, or per the MSR bitmap when "use MSR bitmaps" is 1."""
    if not _ring0(m):
        return None
    msr = m.guest.reg("ecx")
    return _exit(m, insn, ExitReason.MSR_WRITE) if msr_bitmap_exits(m, msr, True) else None


_DESC_IDENTITY = {"sgdt": 0, "sidt": 1, "lgdt": 2, "lidt": 3, "sldt": 0, "str": 1, "lldt": 2, "ltr": 3}


def rule_descriptor_table(m, insn):
    """LGDT/LIDT/SGDT/SIDT (reason 46) and LLDT/LTR/SLDT/STR (47) with descriptor-table exiting.

    The loads are privileged (#GP at CPL > 0 comes first); the stores exit at any CPL,
    which is how a VMM can hide its own tables from a curious guest.
    """
    base = insn.mnemonic
    gdtr_idtr = base in ("sgdt", "sidt", "lgdt", "lidt")
    if not gdtr_idtr and (not m.guest.reg("cr0") & Cr0.PE or m.guest.reg("eflags") & (1 << 17)):
        return None  # LLDT/LTR/SLDT/STR are #UD in real and virtual-8086 mode (SDM Vol. 2)
    if base.startswith("l") and not _ring0(m):
        return None
    if not m.proc2 & ProcBased2.DESC:
        return None
    reason = ExitReason.GDTR_IDTR if gdtr_idtr else ExitReason.LDTR_TR
    info = m.instruction_information(insn, gdtr_idtr) | _DESC_IDENTITY[base] << 28
    return _exit(m, insn, reason, m.displacement(insn), instruction_info=info)


def _vmx_rule(reason: ExitReason) -> Rule:
    """VMCLEAR, VMLAUNCH, VMPTRLD, VMPTRST, VMREAD, VMRESUME, VMWRITE, VMXOFF, VMXON,
    INVEPT, INVVPID: a VM exit in non-root operation - after the #UD checks.

    Their pseudo-code (SDM Vol. 3C 31.3, Vol. 2 for INVEPT/INVVPID) tests
    ``(CR0.PE = 0) or (RFLAGS.VM = 1) or (IA32_EFER.LMA = 1 and CS.L = 0)`` -> #UD
    *before* ``ELSIF in VMX non-root operation THEN VM exit``, and invalid-opcode
    exceptions have priority over VM exits (SDM 26.1.1).  So an (unrestricted) real-mode
    guest, a virtual-8086 task or compatibility-mode code gets #UD, not an exit.
    VMCALL has no such check and exits in every mode (rule ``unconditional``).
    """
    def rule(m, insn):
        g = m.guest
        if (not g.reg("cr0") & Cr0.PE or g.reg("eflags") & (1 << 17)
                or (g.reg("efer") & Efer.LMA and g.bits != 64)):
            return m.raise_exception(Vector.UD, f"{insn.mnemonic.upper()} with CR0.PE = 0, "
                                     "RFLAGS.VM = 1 or in compatibility mode raises #UD")
        # Exit qualification: the displacement of the memory operand (SDM 28.2.1).
        return _exit(m, insn, reason, m.displacement(insn))
    rule.__doc__ = f"{reason.name}: exits unless a #UD condition comes first"
    return rule


RULES: dict[str, Rule] = {
    "cpuid": unconditional(ExitReason.CPUID),
    "getsec": unconditional(ExitReason.GETSEC),
    "invd": rule_invd,
    "xsetbv": rule_xsetbv,
    "vmcall": unconditional(ExitReason.VMCALL),
    "vmclear": _vmx_rule(ExitReason.VMCLEAR),
    "vmlaunch": _vmx_rule(ExitReason.VMLAUNCH),
    "vmptrld": _vmx_rule(ExitReason.VMPTRLD),
    "vmptrst": _vmx_rule(ExitReason.VMPTRST),
    "vmread": _vmx_rule(ExitReason.VMREAD),
    "vmresume": _vmx_rule(ExitReason.VMRESUME),
    "vmwrite": _vmx_rule(ExitReason.VMWRITE),
    "vmxoff": _vmx_rule(ExitReason.VMOFF),
    "vmxon": _vmx_rule(ExitReason.VMON),
    "invept": _vmx_rule(ExitReason.INVEPT),
    "invvpid": _vmx_rule(ExitReason.INVVPID),
    "hlt": rule_hlt,
    "invlpg": rule_invlpg,
    "rdpmc": rule_rdpmc,
    "rdtsc": rule_rdtsc,
    "rdtscp": rule_rdtscp,
    "mwait": _monitor_mwait(ProcBased.MWAIT_EXITING, ExitReason.MWAIT_INSTRUCTION),
    "monitor": _monitor_mwait(ProcBased.MONITOR_EXITING, ExitReason.MONITOR_INSTRUCTION),
    "pause": when(ProcBased.PAUSE_EXITING, ExitReason.PAUSE_INSTRUCTION, privileged=False),
    "wbinvd": when(ProcBased2.WBINVD_EXITING, ExitReason.WBINVD),
    "rdrand": when(ProcBased2.RDRAND_EXITING, ExitReason.RDRAND, privileged=False),
    "rdseed": when(ProcBased2.RDSEED_EXITING, ExitReason.RDSEED, privileged=False),
    "mov cr": rule_mov_cr,
    "mov dr": rule_mov_dr,
    "clts": rule_clts,
    "lmsw": rule_lmsw,
    "smsw": rule_smsw,
    "in": rule_io, "out": rule_io,
    "insb": rule_io, "insw": rule_io, "insd": rule_io,
    "outsb": rule_io, "outsw": rule_io, "outsd": rule_io,
    "rdmsr": rule_rdmsr,
    "wrmsr": rule_wrmsr,
    "lgdt": rule_descriptor_table, "lidt": rule_descriptor_table,
    "sgdt": rule_descriptor_table, "sidt": rule_descriptor_table,
    "lldt": rule_descriptor_table, "ltr": rule_descriptor_table,
    "sldt": rule_descriptor_table, "str": rule_descriptor_table,
}


def rule_key(insn: Instruction) -> str | None:
    """Which rule governs ``insn`` (None: it never exits and is not hooked)."""
    mnem = insn.mnemonic.split()[-1]
    if mnem == "mov":
        ops = insn.op_str
        if "cr" in ops and any(f"cr{n}" in ops.replace(" ", "").split(",") for n in (0, 2, 3, 4, 8)):
            return "mov cr"
        if any(f"dr{n}" in ops.replace(" ", "").split(",") for n in range(8)):
            return "mov dr"
        return None
    return mnem if mnem in RULES else None

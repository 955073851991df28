"""VMX non-root operation: which guest instructions and events cause VM exits, and how.

The guest runs natively in Unicorn.  A Python callback per instruction would make it
hundreds of times slower, so vtlab does what a binary translator's front end does:
when code is loaded it is decoded (Capstone) and a code hook is placed on exactly the
*sensitive* instructions (CPUID, HLT, IN/OUT, RDMSR, MOV CR ...).  When one is about to
execute, its rule below decides - from the VMCS controls, bitmaps and masks, as SDM
Vol. 3C 26.1 ("Instructions That Cause VM Exits") prescribes - whether it exits.  If it
does, emulation stops *before* the instruction, so the saved guest RIP points at it
and VM_EXIT_INSTRUCTION_LEN tells the VMM how far to advance (SDM 28.2.5).

Events arrive the same way: exceptions through Unicorn's interrupt hook (checked
against the exception bitmap, SDM 26.2), guest-physical accesses that the EPT does not
allow through Unicorn's memory hooks (EPT violations, SDM 29.3.3), external interrupts
and NMIs from the VMM's virtual devices (pin-based controls, SDM 26.2).

:class:`ExitMonitor` also moves guest state between the VMCS and the CPU on VM entry
and VM exit (SDM 27.3.2 and 28.3).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import capstone
import unicorn
from unicorn import x86_const as X
from unicorn.unicorn_py3 import unicorn as _ucmod

from ..arch.controls import EntryControl, ExitControl, PinBased, ProcBased, ProcBased2
from ..arch.exceptions import IntrInfo, InterruptionType, Vector
from ..arch.exit_reasons import EXIT_REASON_INFO, ExitReason
from ..arch.msrs import Cr0, Cr4, Efer, Msr
from ..arch.qualifications import (GPR_ORDER, CrAccessQualification, CrAccessType,
                                  DrAccessQualification, EptViolationQualification, IoDirection,
                                  IoQualification)
from ..arch.vmcs_fields import VmcsField as F
from .asm import _CS_MODE, Instruction
from .guest import ERROR_CODE_VECTORS
from .quirks import forget_exception
from .vmx import Status, VmxOperation, VmxOutcome

if TYPE_CHECKING:
    from .guest import Guest, Program
    from .vmcs import Vmcs
    from .vmx import VmxCpu


# ----------------------------------------------------------------------------- records
@dataclass
class VmExit:
    """One VM exit (or VM-entry failure) with the exit-information fields it wrote."""

    reason: ExitReason
    qualification: int = 0
    instruction_length: int = 0
    guest_rip: int = 0
    instruction: str = ""
    guest_linear_address: int | None = None
    guest_physical_address: int | None = None
    intr_info: int = 0
    intr_error_code: int | None = None
    instruction_info: int = 0
    entry_failure: bool = False
    note: str = ""
    guest_instructions: int = 0
    cpl: int = 0
    device: str | None = None

    @property
    def reason_number(self) -> int:
        return int(self.reason)

    @property
    def exit_reason_field(self) -> int:
        """The VM_EXIT_REASON field value: basic reason, bit 31 for entry failures."""
        return int(self.reason) | (1 << 31 if self.entry_failure else 0)

    @property
    def category(self) -> str:
        return EXIT_REASON_INFO[self.reason].category

    def decoded(self) -> dict[str, object]:
        """The qualification (and interruption information) split into named fields."""
        q = self.qualification
        if self.reason is ExitReason.IO_INSTRUCTION:
            return IoQualification.decode(q).as_dict()
        if self.reason is ExitReason.CR_ACCESS:
            return CrAccessQualification.decode(q).as_dict()
        if self.reason is ExitReason.DR_ACCESS:
            return DrAccessQualification.decode(q).as_dict()
        if self.reason is ExitReason.EPT_VIOLATION:
            d = EptViolationQualification.decode(q).as_dict()
            d["guest_physical_address"] = self.guest_physical_address
            return d
        if self.reason in (ExitReason.EXCEPTION_NMI, ExitReason.EXTERNAL_INTERRUPT):
            d = IntrInfo.decode(self.intr_info).as_dict()
            if self.intr_error_code is not None:
                d["error_code"] = self.intr_error_code
            return d
        if self.reason is ExitReason.INVLPG:
            return {"linear_address": q}
        if self.reason is ExitReason.INVALID_STATE:
            return {"entry_failure": True, "qualification": q, "why": self.note}
        return {"qualification": q} if q else {}

    def __str__(self) -> str:
        what = f"{self.reason.name} ({int(self.reason)})"
        if self.entry_failure:
            what = f"VM-entry failure: {what}, bit 31 set"
        at = f" at {self.guest_rip:#x}" + (f" '{self.instruction}'" if self.instruction else "")
        q = f" qualification={self.qualification:#x}" if self.qualification else ""
        n = f" length={self.instruction_length}" if self.instruction_length else ""
        return what + at + q + n


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


# ------------------------------------------------------------------------- the monitor
_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")
_SEG_FIELDS = {s: (F[f"GUEST_{s.upper()}_SELECTOR"], F[f"GUEST_{s.upper()}_BASE"],
                   F[f"GUEST_{s.upper()}_LIMIT"], F[f"GUEST_{s.upper()}_AR_BYTES"]) for s in _SEGMENTS}
#: The size a UC_HOOK_CODE callback receives for an instruction QEMU does not implement.
_UNDECODED_SIZE = 0xF1F1F1F1
#: Rules of instructions QEMU does not implement (it raises #UD for them), so the size it
#: reports to a code hook says nothing about the instruction.
_NOT_IN_QEMU = frozenset({"getsec", "vmcall", "vmclear", "vmlaunch", "vmptrld", "vmptrst",
                          "vmread", "vmresume", "vmwrite", "vmxoff", "vmxon", "invept",
                          "invvpid"})
#: Guest-state fields that can be saved on their own (see ExitMonitor.materialize).
_SINGLE_FIELD_SAVERS = {
    int(F.GUEST_SYSENTER_CS): lambda g: g.uc.msr_read(Msr.IA32_SYSENTER_CS) & 0xFFFF_FFFF,
    int(F.GUEST_SYSENTER_ESP): lambda g: g.uc.msr_read(Msr.IA32_SYSENTER_ESP),
    int(F.GUEST_SYSENTER_EIP): lambda g: g.uc.msr_read(Msr.IA32_SYSENTER_EIP),
    int(F.GUEST_RSP): lambda g: g.reg("rsp"),
    int(F.GUEST_RFLAGS): lambda g: g.reg("rflags"),
    int(F.GUEST_CR0): lambda g: g.reg("cr0"),
    int(F.GUEST_CR3): lambda g: g.reg("cr3"),
    int(F.GUEST_CR4): lambda g: g.reg("cr4"),
}
_RIP_ONLY = frozenset({int(F.GUEST_RIP)})
#: Guest-state fields saved lazily (all but RIP, which the exit path writes at once).
_LAZY_FIELDS = frozenset(int(f) for f in F if f.name.startswith("GUEST_") and
                         (int(f) >> 10) & 3 == 2 and f is not F.GUEST_RIP) | {int(F.VM_ENTRY_CONTROLS)}

# Plain-int copies of the control bits the per-entry path tests.  ``int & IntFlag``
# dispatches to IntFlag.__rand__, written in Python (~0.5 us a time): too slow for a
# path that runs on every VM entry.
_MONITOR_TRAP_FLAG = int(ProcBased.MONITOR_TRAP_FLAG)
_ACTIVATE_SECONDARY = int(ProcBased.ACTIVATE_SECONDARY_CONTROLS)
_VALID = 1 << 31  # the valid bit of the interruption-information fields (SDM 25.8.3, 27.2.2)

#: The exit-information fields every VM exit writes (SDM 28.2), in vm_exit's order.
_EXIT_INFO_FIELDS = tuple(int(f) for f in (
    F.VM_EXIT_REASON, F.EXIT_QUALIFICATION, F.VM_EXIT_INSTRUCTION_LEN, F.VM_EXIT_INTR_INFO,
    F.VM_EXIT_INTR_ERROR_CODE, F.IDT_VECTORING_INFO_FIELD, F.VMX_INSTRUCTION_INFO,
    F.GUEST_LINEAR_ADDRESS, F.GUEST_PHYSICAL_ADDRESS))

_uc_hook_add = _ucmod.uclib.uc_hook_add


class ExitMonitor:
    """Watches a guest in VMX non-root operation and turns sensitive events into VM exits."""

    def __init__(self, cpu: "VmxCpu"):
        self.cpu = cpu
        self.guest: "Guest" = cpu.guest
        self.vmcs: "Vmcs | None" = None
        self.pin = self.proc = self.proc2 = 0
        self.pending: VmExit | None = None
        self.event: tuple | None = None          # (vector, rip, software?) from the INTR hook
        self.mem_fault: tuple | None = None
        self.halted = False
        self._hooked: dict[int, Instruction] = {}
        self._rule_keys: dict[int, str] = {}      # address -> RULES key, found once at load time
        # Which VMCS (and which of its write generations) pin/proc/proc2 were read from:
        # run() re-reads the controls only when software wrote the VMCS since.
        self._controls_of: tuple | None = None
        self._materialize_pending = False
        self.pending_interrupts: list[int] = []   # external interrupt vectors raised by devices
        self.pending_nmi = False
        self.ept_pages: dict[int, int] | None = None  # page -> RWX permissions, None = no EPT view
        g = self.guest
        g.on_interrupt = self._on_interrupt
        g.on_hlt = self._on_hlt
        g.on_rdtsc = self._on_rdtsc
        g.on_hlt_stops_itself = True
        g.load_listeners.append(self.watch_program)
        for prog in g.programs:
            self.watch_program(prog)
        g.uc.hook_add(unicorn.UC_HOOK_MEM_UNMAPPED | unicorn.UC_HOOK_MEM_PROT, self._on_mem_fault)
        # The code hook of the sensitive instructions, as a raw ctypes callback: the
        # binding's hook_add wraps every callback in two more Python frames, which is a
        # noticeable part of a VM exit.  One callback object serves every address; it
        # must stay referenced for as long as the engine may call it.
        self._code_hook_fn = _ucmod.HOOK_CODE_CFUNC(self._code_hook)
        self._cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._cs.detail = True

    # --------------------------------------------------------------- hooks
    def watch_program(self, prog: "Program") -> None:
        """Hook every sensitive instruction of a newly loaded program (one hook per address)."""
        for insn in prog.instructions:
            key = rule_key(insn)
            if insn.address in self._hooked or key is None:
                continue
            self._hooked[insn.address] = insn
            self._rule_keys[insn.address] = key
            if insn.mnemonic in ("hlt", "rdtsc", "rdtscp"):
                continue  # the guest's own hook for these calls _on_hlt / _on_rdtsc
            handle = _ucmod.uc_hook_h()
            status = _uc_hook_add(self.guest.uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_CODE,
                                  self._code_hook_fn, None, ctypes.c_uint64(insn.address),
                                  ctypes.c_uint64(insn.address))
            if status != unicorn.UC_ERR_OK:
                raise unicorn.UcError(status)

    def _code_hook(self, _handle, address: int, size: int, _user) -> None:
        """UC_HOOK_CODE entry point (see __init__), with the binding's exception contract:
        an exception stops emulation and ``Uc.emu_start`` raises it once Unicorn returns."""
        try:
            self._on_sensitive(self.guest.uc, address, size, None)
        except BaseException as exc:
            uc = self.guest.uc
            if uc._hook_exception is None:
                uc._hook_exception = exc
            uc.emu_stop()

    def control_on(self, control) -> bool:
        if isinstance(control, ProcBased2):
            return bool(self.proc2 & control)
        return bool(self.proc & control)

    def _on_sensitive(self, uc, address, size, _user) -> bool:
        """Decide, just before a sensitive instruction executes, whether it exits."""
        if self.pending is not None or self.vmcs is None or self.event is not None:
            return False  # (an exception - e.g. the I/O-permission #GP - claimed it first)
        insn = self._hooked.get(address)
        if insn is None:
            return False
        key = self._rule_keys[address]
        # Unicorn (QEMU) passes the size it decoded, except for instructions its
        # translator turns straight into #UD (GETSEC, VMCALL and the other VMX
        # instructions): their size arrives as the placeholder 0xF1F1F1F1, or as the
        # length of the part QEMU decoded before giving up (2 for VMREAD 0F 78 /r).
        # Those are exactly instructions that exit unconditionally, so trust the
        # sweep's size for them (the byte comparison below still guards against
        # self-modifying code).
        if insn.size != size and size != _UNDECODED_SIZE and key not in _NOT_IN_QEMU:
            return False
        g = self.guest
        # Self-modifying code: trust the bytes that are there now, not the sweep.
        if not g.memory_holds(address, insn.bytes):
            return False
        result = RULES[key](self, insn)
        if result is None:
            return False
        if result == "emulated":
            g.counter.unretire_rest_of_block(address, retired_here=True)
            g.rip = g.rip + insn.size  # the rule did the work; skip it
            return False
        if result == "emulated-fault":
            return True
        g.counter.unretire_rest_of_block(address)  # it exits instead of retiring
        result.guest_instructions = g.counter.total
        result.cpl = g.cpl
        self.pending = result
        uc.emu_stop()
        return True

    def _on_hlt(self, address: int) -> bool:
        """Called by the guest before HLT executes: exit, or enter the HLT activity state."""
        if self.pending is not None or self.vmcs is None:
            return False
        if self._on_sensitive(self.guest.uc, address, 1, None):
            return True
        self.halted = True
        return True

    def _on_rdtsc(self, address: int) -> bool:
        """Called by the guest before RDTSC/RDTSCP: True if it exits (or faults) instead."""
        if self.pending is not None or self.vmcs is None:
            return False
        insn = self._hooked.get(address)
        return insn is not None and self._on_sensitive(self.guest.uc, address, insn.size, None)

    def _on_interrupt(self, vector: int) -> None:
        g = self.guest
        rip = g.rip
        software = self._software_interrupt_at(rip, vector)
        self.event = (vector, rip, software)
        if vector == Vector.PF and not software and g.page_fault is not None:
            # #PF: the error code and faulting address the guest captured (see Guest._on_intr)
            self.event = (vector, rip, software, g.page_fault[1], 0, g.page_fault[0])
        g.uc.emu_stop()

    def _software_interrupt_at(self, rip: int, vector: int) -> bool:
        """Did an INT n / INT3 just execute (Unicorn reports RIP after it)?"""
        for length, opcode in ((2, 0xCD), (1, 0xCC), (1, 0xCE)):
            try:
                raw = self.guest.read(self.guest.segment("cs").base + rip - length, length)
            except unicorn.UcError:
                continue
            if raw[0] == opcode and (opcode != 0xCD or raw[1] == vector):
                return True
        return False

    def _on_mem_fault(self, uc, access, address, size, value, _user):
        if self.vmcs is None or not self.proc2 & ProcBased2.ENABLE_EPT:
            return False
        kind = {unicorn.UC_MEM_READ_UNMAPPED: "r", unicorn.UC_MEM_WRITE_UNMAPPED: "w",
                unicorn.UC_MEM_FETCH_UNMAPPED: "x", unicorn.UC_MEM_READ_PROT: "r",
                unicorn.UC_MEM_WRITE_PROT: "w", unicorn.UC_MEM_FETCH_PROT: "x"}.get(access, "r")
        perms = 0
        if self.ept_pages is not None:
            perms = self.ept_pages.get(address & ~0xFFF, 0)
        q = EptViolationQualification(read=kind == "r", write=kind == "w", fetch=kind == "x",
                                      readable=bool(perms & 1), writable=bool(perms & 2),
                                      executable=bool(perms & 4), gla_valid=True, gla_translation=True)
        insn = self.guest.instruction_at()
        self.pending = VmExit(ExitReason.EPT_VIOLATION, q.encode(), 0, self.guest.rip,
                              insn.text if insn else "", guest_linear_address=address,
                              guest_physical_address=address,
                              guest_instructions=self.guest.counter.total, cpl=self.guest.cpl)
        uc.emu_stop()
        return False

    # ------------------------------------------------------------ operands
    def effective_address(self, insn: Instruction) -> int:
        """Linear address of ``insn``'s memory operand (segment base + base + index*scale + disp)."""
        d = self._detail(insn)
        if d is None:
            return 0
        for op in d.operands:
            if op.type == capstone.x86.X86_OP_MEM:
                addr = op.mem.disp
                if op.mem.base:
                    base = d.reg_name(op.mem.base)
                    addr += self.guest.rip + insn.size if base == "rip" else self.guest.reg(base)
                if op.mem.index:
                    addr += self.guest.reg(d.reg_name(op.mem.index)) * op.mem.scale
                seg = d.reg_name(op.mem.segment) if op.mem.segment else "ds"
                return (self.guest.segment(seg).base + addr) & 0xFFFF_FFFF_FFFF_FFFF
        return 0

    def _detail(self, insn: Instruction):
        """Capstone's detailed decode of ``insn`` in the guest's current code size."""
        self._cs.mode = _CS_MODE[self.guest.bits]
        return next(self._cs.disasm(insn.bytes, insn.address, 1), None)

    def displacement(self, insn: Instruction) -> int:
        """The exit qualification of descriptor-table and VMX-instruction exits (SDM 28.2.1).

        It is the instruction's displacement field, sign-extended to 64 bits, or 0 when
        there is none (a register operand, or a memory operand without displacement).
        RIP-relative addressing is the exception: the qualification is then the
        displacement plus the RIP of the following instruction.
        """
        d = self._detail(insn)
        mem = [op for op in (d.operands if d else []) if op.type == capstone.x86.X86_OP_MEM]
        if not mem or not d.disp_size:
            return 0
        raw = d.bytes[d.disp_offset:d.disp_offset + d.disp_size]
        disp = int.from_bytes(raw, "little", signed=True)
        if mem[0].mem.base and d.reg_name(mem[0].mem.base) == "rip":
            disp += insn.address + insn.size
        return disp & 0xFFFF_FFFF_FFFF_FFFF

    def instruction_information(self, insn: Instruction, gdtr_idtr: bool) -> int:
        """VM-exit instruction-information field for LGDT/LIDT/SGDT/SIDT (SDM Table 28-10)
        and LLDT/LTR/SLDT/STR (Table 28-11), without the identity bits 29:28.

        Bits 1:0 scaling, 9:7 address size (0 16-bit, 1 32-bit, 2 64-bit), 17:15 segment
        register (ES, CS, SS, DS, FS, GS), 21:18 index register, 22 index invalid, 26:23
        base register, 27 base invalid.  Table 28-10 adds bit 11, the operand size (0
        16-bit, 1 32-bit); Table 28-11 has bit 10 (1 = register operand, given in bits
        6:3).  Bits the SDM calls undefined are left 0.
        """
        d = self._detail(insn)
        if d is None:
            return 0
        info = 0
        if gdtr_idtr and self.guest.bits != 64:
            operand32 = (self.guest.bits == 32) != (0x66 in d.prefix)
            info |= int(operand32) << 11
        for op in d.operands:
            if op.type == capstone.x86.X86_OP_REG and not gdtr_idtr:
                return info | _gpr_index(d.reg_name(op.reg)) << 3 | 1 << 10
            if op.type != capstone.x86.X86_OP_MEM:
                continue
            mem = op.mem
            info |= {1: 0, 2: 1, 4: 2, 8: 3}.get(mem.scale, 0)
            info |= {2: 0, 4: 1, 8: 2}.get(d.addr_size, 0) << 7
            base = d.reg_name(mem.base) if mem.base else None
            if mem.segment:
                seg = d.reg_name(mem.segment)
            else:  # default segment: SS for rBP/rSP-based addresses, DS otherwise
                seg = "ss" if base and base.lstrip("re").rstrip("lwd") in ("bp", "sp") else "ds"
            info |= ("es", "cs", "ss", "ds", "fs", "gs").index(seg) << 15
            if mem.index:
                info |= _gpr_index(d.reg_name(mem.index)) << 18
            else:
                info |= 1 << 22
            if base and base != "rip":
                info |= _gpr_index(base) << 23
            else:
                info |= 1 << 27
            return info
        return info

    def raise_exception(self, vector: Vector, note: str = "") -> str:
        """Make the current instruction raise ``vector`` (used for #UD of disabled features)."""
        self.event = (int(vector), self.guest.rip, False)
        self.guest.uc.emu_stop()
        return "emulated-fault"

    # --------------------------------------------------- guest state <-> VMCS
    def save_guest_state(self, vmcs: "Vmcs") -> None:
        """Store the CPU's guest state into the guest-state area (SDM 28.3).

        Fields software already rewrote since the exit (``vmcs.dirty``, e.g. GUEST_RIP
        advanced by the VMM) keep the software's value: on hardware the save happened
        before the VMM ran, so its VMWRITEs came after.
        """
        g = self.guest
        dirty = vmcs.dirty
        save = vmcs.save_guest
        put = (lambda f, value: None if int(f) in dirty else save(f, value)) if dirty else save
        # CR0/3/4, RSP, RFLAGS and SYSENTER_*: the same savers materialize() uses for a
        # single field, so a partial save and a full one cannot disagree.
        for f, saver in _SINGLE_FIELD_SAVERS.items():
            put(f, saver(g))
        put(F.GUEST_RIP, g.reg("rip"))
        put(F.GUEST_DR7, g.reg("dr7"))
        for seg, (fsel, fbase, flim, far) in _SEG_FIELDS.items():
            s = g.segment(seg)
            put(fsel, s.selector)
            put(fbase, s.base)
            put(flim, s.limit)
            put(far, s.access_rights)
        for table, fbase, flim in (("gdtr", F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT),
                                   ("idtr", F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT)):
            _, base, limit, _ = g.uc.reg_read(getattr(X, f"UC_X86_REG_{table.upper()}"))
            put(fbase, base)
            put(flim, limit)
        efer = g.reg("efer")
        if vmcs.get(F.VM_EXIT_CONTROLS) & ExitControl.SAVE_IA32_EFER:
            put(F.GUEST_IA32_EFER, efer)
        if vmcs.get(F.VM_EXIT_CONTROLS) & ExitControl.SAVE_IA32_PAT:
            put(F.GUEST_IA32_PAT, g.uc.msr_read(Msr.IA32_PAT))
        put(F.GUEST_ACTIVITY_STATE, 1 if self.halted else 0)
        # SDM 28.2: the "IA-32e mode guest" entry control reflects EFER.LMA after an exit.
        entry = vmcs.get(F.VM_ENTRY_CONTROLS) & ~EntryControl.IA32E_MODE
        vmcs.save_guest(F.VM_ENTRY_CONTROLS, entry | (EntryControl.IA32E_MODE if efer & Efer.LMA else 0))

    def materialize(self, field: int | None = None) -> None:
        """Complete a lazy guest-state save (done on the first VMREAD that needs it).

        For a field that maps to one register or MSR (``field`` given), just that field is
        saved: the CPU's guest state cannot change before the next VM entry, so saving it
        again later gives the same value.  A WRMSR/RDMSR exit handler that touches
        IA32_SYSENTER_ESP thus costs one MSR read, not a full state save.
        """
        if field is not None and self._materialize_pending and self.vmcs is not None:
            saver = _SINGLE_FIELD_SAVERS.get(field)
            if saver is not None:
                self.vmcs.save_guest(field, saver(self.guest))
                return
        if self._materialize_pending and self.vmcs is not None:
            self._materialize_pending = False
            self.vmcs.on_access = None
            self.save_guest_state(self.vmcs)

    def load_guest_state(self, vmcs: "Vmcs") -> None:
        """Load the guest-state area into the CPU (SDM 27.3.2).

        Fields the VMM did not write since the last exit already hold what the CPU has,
        so only those it wrote are loaded (everything on a first launch).  vtlab's CPU
        loads a segment's hidden part from the guest's descriptor table (Unicorn has no
        interface to set it directly), so base/limit/access rights must agree with the
        GDT; real mode uses selector << 4 as the base.
        """
        g = self.guest
        full = vmcs.full_load or self.vmcs is not vmcs
        if self.vmcs is not vmcs:
            self.materialize()  # the previous VMCS must not lose the state the CPU holds
        elif self._materialize_pending:
            # The CPU still holds the guest state; the stale fields are simply not loaded.
            self._materialize_pending = False
            vmcs.on_access = None
        self.vmcs = vmcs
        if not full and vmcs.dirty <= _RIP_ONLY:  # the common case: the VMM advanced RIP
            if vmcs.dirty:
                g.rip = vmcs.get(F.GUEST_RIP)
                vmcs.dirty.clear()
            return
        fields = None if full else set(vmcs.dirty)
        want = (lambda *fs: True) if full else (lambda *fs: any(int(f) in fields for f in fs))
        v = vmcs.get
        entry = v(F.VM_ENTRY_CONTROLS)
        if want(F.GUEST_IA32_EFER, F.VM_ENTRY_CONTROLS, F.GUEST_CR0, F.GUEST_CR4, F.GUEST_CR3):
            efer = v(F.GUEST_IA32_EFER) if entry & EntryControl.LOAD_IA32_EFER else g.reg("efer")
            efer = (efer & ~(Efer.LME | Efer.LMA)) | ((Efer.LME | Efer.LMA) if entry & EntryControl.IA32E_MODE else 0)
            g.uc.msr_write(Msr.IA32_EFER, efer & ~Efer.LMA)
            g.uc.reg_write(X.UC_X86_REG_CR4, v(F.GUEST_CR4))
            g.uc.reg_write(X.UC_X86_REG_CR3, v(F.GUEST_CR3))
            g.uc.reg_write(X.UC_X86_REG_CR0, v(F.GUEST_CR0))
        if want(F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT):
            g.uc.reg_write(X.UC_X86_REG_GDTR, (0, v(F.GUEST_GDTR_BASE), v(F.GUEST_GDTR_LIMIT), 0))
        if want(F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT):
            g.uc.reg_write(X.UC_X86_REG_IDTR, (0, v(F.GUEST_IDTR_BASE), v(F.GUEST_IDTR_LIMIT), 0))
        order = ("cs", "ss", "ds", "es", "fs", "gs")
        for seg in order:
            if want(*_SEG_FIELDS[seg]):
                sel = v(_SEG_FIELDS[seg][0])
                if v(_SEG_FIELDS[seg][3]) & (1 << 16) and v(F.GUEST_CR0) & Cr0.PE:
                    sel = 0 if seg not in ("cs", "ss") else sel
                try:
                    g.load_segment(seg, sel)
                except unicorn.UcError as exc:
                    raise ValueError(f"GUEST_{seg.upper()}_SELECTOR {sel:#x} cannot be loaded from "
                                     f"the guest GDT ({exc})") from None
        for seg in ("ldtr", "tr"):
            if want(*_SEG_FIELDS[seg]):
                fsel, fbase, flim, far = _SEG_FIELDS[seg]
                if not v(far) & (1 << 16):
                    g.uc.reg_write(getattr(X, f"UC_X86_REG_{seg.upper()}"),
                                   (v(fsel), v(fbase), v(flim), (v(far) & 0xF0FF) << 8))
        if want(F.GUEST_RSP):
            g.set_reg("rsp", v(F.GUEST_RSP))
        if want(F.GUEST_RIP):
            g.rip = v(F.GUEST_RIP)
        if want(F.GUEST_RFLAGS):
            g.set_reg("rflags", v(F.GUEST_RFLAGS))
        if want(F.GUEST_DR7) and entry & EntryControl.LOAD_DEBUG_CONTROLS:
            g.set_reg("dr7", v(F.GUEST_DR7))
        for msr, f in ((Msr.IA32_SYSENTER_CS, F.GUEST_SYSENTER_CS), (Msr.IA32_SYSENTER_ESP, F.GUEST_SYSENTER_ESP),
                       (Msr.IA32_SYSENTER_EIP, F.GUEST_SYSENTER_EIP)):
            if want(f):
                g.uc.msr_write(msr, v(f))
        if want(F.GUEST_IA32_PAT) and entry & EntryControl.LOAD_IA32_PAT:
            g.uc.msr_write(Msr.IA32_PAT, v(F.GUEST_IA32_PAT))
        self.halted = v(F.GUEST_ACTIVITY_STATE) == 1
        vmcs.dirty.clear()
        vmcs.full_load = False

    # ----------------------------------------------------------- running
    def _load_controls(self) -> None:
        """Read the execution controls the rules test, unless the VMCS is unchanged since.

        Every software write to a VMCS except GUEST_RIP bumps its ``generation`` (the
        processor's own writes never touch the controls), so (VMCS, generation) says
        whether :attr:`pin`, :attr:`proc` and :attr:`proc2` are still what it holds.
        """
        vmcs = self.vmcs
        source = (vmcs, vmcs.generation)
        if source == self._controls_of:
            return
        v = vmcs.get
        self.pin = v(F.PIN_BASED_VM_EXEC_CONTROL)
        self.proc = v(F.CPU_BASED_VM_EXEC_CONTROL)
        self.proc2 = v(F.SECONDARY_VM_EXEC_CONTROL) if self.proc & _ACTIVATE_SECONDARY else 0
        self._controls_of = source

    def run(self, insn: str, budget: int, step: bool = False) -> VmxOutcome:
        """Run the guest in non-root operation until a VM exit (or the budget / a step)."""
        self._load_controls()
        g = self.guest
        start = g.counter.total
        exit_ = self._inject_event()
        while exit_ is None:
            if self.pending_nmi or self.pending_interrupts:
                exit_ = self._pending_interrupt_exit()
                if exit_ is not None:
                    break
            if self.halted:
                return VmxOutcome(insn, Status.PAUSED, halted=True, message="the guest is in the HLT activity "
                                  "state (HLT exiting is 0) and no interrupt is pending")
            remaining = budget - (g.counter.total - start)
            if remaining <= 0:
                return VmxOutcome(insn, Status.PAUSED, message=f"paused after {budget:,} guest "
                                  "instructions without a VM exit (budget)")
            mtf = bool(self.proc & _MONITOR_TRAP_FLAG)
            single = step or mtf
            self.pending, self.event = None, None
            rip_before = g.rip if single else None  # (only the step message shows it)
            cr2 = g.reg("cr2")  # QEMU overwrites it when it raises #PF
            try:
                g.emulate(1 if single else remaining, exact=single)
            except unicorn.UcError as exc:
                if self.pending is None and self.event is None:
                    exit_ = self._cpu_error(exc)
                    if exit_ is not None:
                        break
                    continue
            if self.pending is not None:
                exit_ = self.pending
                break
            if self.event is not None:
                forget_exception(g.uc)  # vtlab, not QEMU, delivers it (or exits)
                g.counter.unretire_rest_of_block(g.linear_rip())
                exit_ = self._handle_event(*self.event)
                if exit_ is not None:
                    if self.event[0] == Vector.PF and exit_.reason is ExitReason.EXCEPTION_NMI:
                        # A #PF that causes a VM exit does not load CR2 (SDM 28.1): the
                        # address is in the exit qualification instead.
                        g.uc.reg_write(X.UC_X86_REG_CR2, cr2)
                    break
                continue
            if self.halted:
                continue
            if single:
                if mtf:  # SDM 26.5.2: MTF exit after the instruction completes
                    exit_ = VmExit(ExitReason.MONITOR_TRAP_FLAG, 0, 0, g.rip, "",
                                   guest_instructions=g.counter.total, cpl=g.cpl)
                    break
                return VmxOutcome(insn, Status.PAUSED, message=f"stepped one instruction ({rip_before:#x})")
        return VmxOutcome(insn, Status.VM_EXIT, exit=self.vm_exit(exit_))

    def _cpu_error(self, exc: unicorn.UcError) -> VmExit | None:
        """A Unicorn error with no hook involved: an unmapped access or an invalid opcode."""
        e = self.guest._unicorn_error(exc)
        if e.vector == Vector.UD:
            # Unicorn reports every vector-6 event as UC_ERR_INSN_INVALID, without calling
            # the interrupt hook - including INT 6 (CD 06), which is a software interrupt
            # (type 4): it skips the exception bitmap and returns past the INT (SDM 26.2).
            try:
                raw = self.guest.read(self.guest.linear_rip(), 2)
            except unicorn.UcError:
                raw = b""
            if raw == b"\xcd\x06":
                return self._handle_event(int(Vector.UD), self.guest.rip + 2, True)
        return self._handle_event(int(e.vector), self.guest.rip, False, error_code=e.error_code)

    def _handle_event(self, vector: int, rip: int, software: bool, error_code: int | None = None,
                      depth: int = 0, fault_address: int | None = None) -> VmExit | None:
        """An exception or INT n: exit through the exception bitmap, or deliver it (SDM 26.2).

        ``fault_address`` is the linear address of a #PF: the exit qualification of a #PF
        exit (SDM 28.2.1) - such an exit leaves CR2 alone (SDM 28.1) - and the value
        loaded into CR2 when the #PF is delivered to the guest instead.
        """
        g = self.guest
        if not software and error_code is None and vector in ERROR_CODE_VECTORS:
            error_code = 0  # Unicorn does not report error codes (see ERROR_CODE_VECTORS)
        is_exception = vector < 32 and (not software or vector in (3, 4))
        if is_exception and self._exception_exits(vector, error_code or 0):
            kind = InterruptionType.SOFTWARE_EXCEPTION if software else InterruptionType.HARDWARE_EXCEPTION
            info = IntrInfo(vector, kind, error_code is not None).encode()
            insn = g.instruction_at()
            at = rip - (2 if software and vector not in (3, 4) else 1) if software else rip
            qualification = fault_address if vector == Vector.PF and fault_address is not None else 0
            return VmExit(ExitReason.EXCEPTION_NMI, qualification, (rip - at) if software else 0, at,
                          insn.text if insn and not software else "", intr_info=info,
                          intr_error_code=error_code, guest_instructions=g.counter.total, cpl=g.cpl)
        if vector == Vector.PF and not software and fault_address is not None:
            g.uc.reg_write(X.UC_X86_REG_CR2, fault_address)
        problem = g.deliver_interrupt(vector, error_code if is_exception and not software else None, rip)
        if problem is None:
            return None
        # Could not deliver: #GP, then #DF, then a triple fault (SDM Vol. 3A 6.15, Table 6-5).
        if depth >= 1 or vector == Vector.DF:
            return VmExit(ExitReason.TRIPLE_FAULT, 0, 0, rip, "", note=f"triple fault: {problem}",
                          guest_instructions=g.counter.total, cpl=g.cpl)
        return self._handle_event(int(Vector.DF), rip, False, 0, depth + 1)

    def _exception_exits(self, vector: int, error_code: int) -> bool:
        """Exception bitmap, with the #PF error-code mask/match rule (SDM 26.2)."""
        bitmap = self.vmcs.get(F.EXCEPTION_BITMAP)
        if vector != Vector.PF:
            return bool(bitmap >> vector & 1)
        match = (error_code & self.vmcs.get(F.PAGE_FAULT_ERROR_CODE_MASK)) == self.vmcs.get(F.PAGE_FAULT_ERROR_CODE_MATCH)
        return bool(bitmap >> 14 & 1) == match

    def _inject_event(self) -> VmExit | None:
        """VM-entry event injection (SDM 27.6): deliver VM_ENTRY_INTR_INFO through the guest IDT."""
        info = self.vmcs.get(F.VM_ENTRY_INTR_INFO_FIELD)
        if not info & _VALID:
            return None
        d = IntrInfo.decode(info)
        code = self.vmcs.get(F.VM_ENTRY_EXCEPTION_ERROR_CODE) if d.deliver_error_code else None
        rip = self.guest.rip
        if d.type in (InterruptionType.SOFTWARE_INTERRUPT, InterruptionType.SOFTWARE_EXCEPTION):
            rip += self.vmcs.get(F.VM_ENTRY_INSTRUCTION_LEN)
        self.vmcs.save_guest(F.VM_ENTRY_INTR_INFO_FIELD, info & ~_VALID)
        self.halted = False
        problem = self.guest.deliver_interrupt(d.vector, code, rip)
        if problem is None:
            return None
        return self._handle_event(int(Vector.DF), rip, False, 0, 1)

    def _pending_interrupt_exit(self) -> VmExit | None:
        """External interrupts / NMIs raised by devices: exit if the pin-based control says so."""
        g = self.guest
        if self.pending_nmi:
            self.pending_nmi = False
            if self.pin & PinBased.NMI_EXITING:
                return VmExit(ExitReason.EXCEPTION_NMI, 0, 0, g.rip, intr_info=IntrInfo(
                    2, InterruptionType.NMI).encode(), guest_instructions=g.counter.total, cpl=g.cpl)
            g.deliver_interrupt(2)
            self.halted = False
        if self.pending_interrupts:
            vector = self.pending_interrupts[0]
            if self.pin & PinBased.EXT_INTR_MASK:
                self.pending_interrupts.pop(0)
                ack = self.vmcs.get(F.VM_EXIT_CONTROLS) & ExitControl.ACK_INTR_ON_EXIT
                info = IntrInfo(vector, InterruptionType.EXTERNAL_INTERRUPT).encode() if ack else 0
                return VmExit(ExitReason.EXTERNAL_INTERRUPT, 0, 0, g.rip, intr_info=info,
                              guest_instructions=g.counter.total, cpl=g.cpl)
            if g.reg("eflags") & (1 << 9):  # IF = 1: the guest takes it itself
                self.pending_interrupts.pop(0)
                self.halted = False
                problem = g.deliver_interrupt(vector)
                if problem is not None:
                    return self._handle_event(int(Vector.DF), g.rip, False, 0, 1)
        return None

    def vm_exit(self, exit_: VmExit) -> VmExit:
        """Perform the VM exit (SDM 28): exit information, guest state, host state."""
        vmcs, cpu, g = self.vmcs, self.cpu, self.guest
        vmcs.set_exit_infos(zip(_EXIT_INFO_FIELDS, (
            exit_.exit_reason_field, int(exit_.qualification), int(exit_.instruction_length),
            int(exit_.intr_info), int(exit_.intr_error_code or 0), 0, int(exit_.instruction_info),
            int(exit_.guest_linear_address or 0), int(exit_.guest_physical_address or 0))))
        # Every VM exit clears the valid bit of the VM-entry interruption-information
        # field (SDM 28.2, introduction), so an injected event is not injected twice.
        vmcs.save_guest(F.VM_ENTRY_INTR_INFO_FIELD, vmcs.get(F.VM_ENTRY_INTR_INFO_FIELD) & ~_VALID)
        rip = g.rip
        if exit_.reason is not ExitReason.MONITOR_TRAP_FLAG and rip != exit_.guest_rip:
            g.rip = exit_.guest_rip  # (usually it is there already: the CPU stopped at it)
            rip = g.rip
        # Guest state is saved lazily: the first VMREAD of a guest-state field completes it.
        vmcs.save_guest(F.GUEST_RIP, rip)
        self._materialize_pending = True
        vmcs.lazy_fields = _LAZY_FIELDS
        vmcs.on_access = self.materialize
        # Host state (SDM 28.5): the VMM's CR0/CR4 come back from the host-state area.
        cpu.cr0, cpu.cr4 = vmcs.get(F.HOST_CR0) or cpu.cr0, vmcs.get(F.HOST_CR4) or cpu.cr4
        cpu.operation = VmxOperation.ROOT
        if exit_.reason is ExitReason.TRIPLE_FAULT:
            self.halted = False
        for listener in cpu.exit_listeners:
            listener(exit_)
        return exit_

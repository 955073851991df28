"""Which guest instructions cause VM exits, under which controls (SDM Vol. 3C 26.1).

Two tables, both over the records :mod:`vtlab.cpu.decoder` made when the code was
loaded - no decision here looks at an instruction's text:

* :data:`EXIT_REASON_BY_KIND` - which exit reason an instruction kind can cause
  (MOV to/from CR, CLTS and LMSW -> CR_ACCESS; IN, OUT, INS, OUTS -> IO_INSTRUCTION ...);
* :data:`EXIT_RULES` - for each exit reason, the rule that decides whether *this*
  execution exits.

A rule gets the monitor and the :class:`~vtlab.cpu.decoder.DecodedInstruction` and
returns a :class:`VmExit`, None (no exit: the CPU executes the instruction), or the
string "emulated" (vtlab carried it out itself, e.g. a read of CR0 through the read
shadow).  Faults come first: an instruction that raises #UD, or #GP because it is
privileged and CPL > 0, does so *before* any exit check (SDM 26.1.1), so rules begin
with those checks.  :data:`NON_EXITING_RULES` holds the instructions that never exit
but still behave differently in non-root operation (SMSW reads the CR0 read shadow).

Besides the instructions of 26.1, two more kinds are decided here: the instructions
that switch tasks (far JMP/CALL to a TSS or task gate, IRET with NT = 1), which exit
unconditionally (26.4.2, reason 9), and INT1, whose #DB - a privileged software
exception - goes through the exception bitmap (26.2).  Exits carry the exit
qualification (28.2.1) and, where the SDM defines them, the VM-exit instruction
information and guest-linear address (28.2.5, 28.2.1; :mod:`vtlab.cpu.operands`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..arch.controls import ProcBased, ProcBased2
from ..arch.exceptions import IntrInfo, InterruptionType, Vector
from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Cr0, Cr4, Efer, Rflags
from ..arch.qualifications import CrAccessQualification, CrAccessType, IoDirection, IoQualification
from ..arch.vmcs_fields import VmcsField as F
from .decoder import DecodedInstruction, InsnKind
from .operands import (displacement, instruction_information, rdrand_information,
                       string_io_information, vmx_instruction_information)
from .vmexit import VmExit

if TYPE_CHECKING:
    from .nonroot import ExitMonitor

#: What a rule returns: the VM exit, None (no exit: the CPU executes the instruction),
#: "emulated" (vtlab carried it out) or "emulated-fault" (it raised an exception).
Outcome = VmExit | None | str
Rule = Callable[["ExitMonitor", DecodedInstruction], Outcome]

K = InsnKind
R = ExitReason

# Plain-int copies of the bits the rules test: ``int & IntFlag`` dispatches to
# IntFlag.__rand__, written in Python, on every exit (see nonroot_consts).
_HLT_EXITING = int(ProcBased.HLT_EXITING)
_INVLPG_EXITING = int(ProcBased.INVLPG_EXITING)
_MWAIT_EXITING = int(ProcBased.MWAIT_EXITING)
_RDPMC_EXITING = int(ProcBased.RDPMC_EXITING)
_RDTSC_EXITING = int(ProcBased.RDTSC_EXITING)
_CR3_LOAD_EXITING = int(ProcBased.CR3_LOAD_EXITING)
_CR3_STORE_EXITING = int(ProcBased.CR3_STORE_EXITING)
_CR8_LOAD_EXITING = int(ProcBased.CR8_LOAD_EXITING)
_CR8_STORE_EXITING = int(ProcBased.CR8_STORE_EXITING)
_MOV_DR_EXITING = int(ProcBased.MOV_DR_EXITING)
_UNCOND_IO_EXITING = int(ProcBased.UNCOND_IO_EXITING)
_USE_IO_BITMAPS = int(ProcBased.USE_IO_BITMAPS)
_USE_MSR_BITMAPS = int(ProcBased.USE_MSR_BITMAPS)
_MONITOR_EXITING = int(ProcBased.MONITOR_EXITING)
_PAUSE_EXITING = int(ProcBased.PAUSE_EXITING)
_DESC = int(ProcBased2.DESC)
_ENABLE_RDTSCP = int(ProcBased2.ENABLE_RDTSCP)
_WBINVD_EXITING = int(ProcBased2.WBINVD_EXITING)
_RDRAND_EXITING = int(ProcBased2.RDRAND_EXITING)
_RDSEED_EXITING = int(ProcBased2.RDSEED_EXITING)
_CR0_PE, _CR0_TS = int(Cr0.PE), int(Cr0.TS)
_CR4_OSXSAVE, _CR4_PCE, _CR4_TSD = int(Cr4.OSXSAVE), int(Cr4.PCE), int(Cr4.TSD)
_CR4_SMXE = int(Cr4.SMXE)
_EFER_LMA = int(Efer.LMA)
_RFLAGS_VM = int(Rflags.VM)
_RFLAGS_NT = int(Rflags.NT)
_BASIC_INS_OUTS_INFO = 1 << 54   # IA32_VMX_BASIC[54]: INS/OUTS instruction information (SDM A.1)


# ----------------------------------------------------------------------- helpers
def _exit(m: ExitMonitor, d: DecodedInstruction, reason: ExitReason, qualification: int = 0,
          **kw) -> VmExit:
    """The exit record: reason, qualification, instruction length (SDM 28.2.5), RIP."""
    shown = d.text  # carried along for display only: no decision reads it
    if not kw:  # (the common case, without building keyword dictionaries)
        return VmExit(reason, qualification, d.length, m.rip, shown, None, None, 0, None, 0,
                      False, "", 0, m.cpl, None, d)
    return VmExit(reason, qualification, d.length, m.rip, shown, decoded_insn=d, cpl=m.cpl, **kw)


def _ring0(m: ExitMonitor) -> bool:
    return m.cpl == 0


# ------------------------------------------------------ unconditional (SDM 26.1.2)
def rule_cpuid(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """CPUID exits unconditionally (SDM 26.1.2), at any CPL."""
    return _exit(m, d, R.CPUID)


def rule_getsec(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """GETSEC exits unconditionally (SDM 26.1.2) - if CR4.SMXE = 1.

    The footnote to 26.1.2: GETSEC causes a VM exit if CR4.SMXE[bit 14] = 1, regardless
    of CPL or RAX, and #UD if CR4.SMXE = 0 (an invalid-opcode exception, which comes
    before any exit, 26.1.1).  Whether a guest can set SMXE at all is IA32_VMX_CR4_FIXED1's
    bit 14 (SDM A.8; vtlab's processor reports SMX, CPUID.1:ECX[6], and allows it).
    """
    if not m.guest.reg("cr4") & _CR4_SMXE:
        return m.raise_exception(Vector.UD, "GETSEC with CR4.SMXE = 0 raises #UD")
    return _exit(m, d, R.GETSEC)


def rule_vmcall(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """VMCALL exits unconditionally (SDM 26.1.2) - in every mode, with no #UD check
    before the exit (unlike the other VMX instructions, see :func:`rule_vmx_instruction`)."""
    return _exit(m, d, R.VMCALL)


def rule_invd(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """INVD exits unconditionally (SDM 26.1.2) - but it is privileged, and a #GP at
    CPL > 0 has priority over the VM exit (SDM 26.1.1)."""
    if not _ring0(m):
        return None  # the CPU raises #GP(0)
    return _exit(m, d, R.INVD)


def rule_xsetbv(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """XSETBV exits unconditionally (SDM 26.1.2) once its own fault checks pass.

    XSETBV raises #UD if CR4.OSXSAVE = 0 and #GP(0) at CPL > 0 (SDM Vol. 2, XSETBV);
    both have priority over the VM exit (SDM 26.1.1: invalid-opcode exceptions and
    faults based on privilege level come first).
    """
    if not m.guest.reg("cr4") & _CR4_OSXSAVE:
        return m.raise_exception(Vector.UD, "XSETBV with CR4.OSXSAVE = 0 raises #UD")
    if not _ring0(m):
        return None  # the CPU raises #GP(0)
    return _exit(m, d, R.XSETBV)


def rule_vmx_instruction(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """VMCLEAR, VMLAUNCH, VMPTRLD, VMPTRST, VMREAD, VMRESUME, VMWRITE, VMXOFF, VMXON,
    INVEPT, INVVPID: a VM exit in non-root operation (SDM 26.1.2) - after the #UD checks.

    Their pseudo-code (SDM Vol. 3C 31.3, Vol. 2 for INVEPT/INVVPID) tests
    ``(CR0.PE = 0) or (RFLAGS.VM = 1) or (IA32_EFER.LMA = 1 and CS.L = 0)`` -> #UD
    *before* ``ELSIF in VMX non-root operation THEN VM exit``, and invalid-opcode
    exceptions have priority over VM exits (SDM 26.1.1).  So an (unrestricted) real-mode
    guest, a virtual-8086 task or compatibility-mode code gets #UD, not an exit.  The
    exit qualification is the displacement of the memory operand (SDM 28.2.1); the
    VM-exit instruction-information field describes the operands (SDM 28.2.5, see
    :func:`~vtlab.cpu.operands.vmx_instruction_information`).
    """
    g = m.guest
    if (not g.reg("cr0") & _CR0_PE or g.reg("eflags") & _RFLAGS_VM
            or (g.reg("efer") & _EFER_LMA and g.bits != 64)):
        return m.raise_exception(Vector.UD, f"{d.kind.name} with CR0.PE = 0, "
                                 "RFLAGS.VM = 1 or in compatibility mode raises #UD")
    info = vmx_instruction_information(d)
    if not info:
        return _exit(m, d, EXIT_REASON_BY_KIND[d.kind], displacement(d))
    return _exit(m, d, EXIT_REASON_BY_KIND[d.kind], displacement(d), instruction_info=info)


# ------------------------------------------------------ conditional (SDM 26.1.3)
def rule_hlt(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """HLT exits if "HLT exiting" is 1 (SDM 26.1.3); otherwise the guest halts inside
    non-root operation.  Privileged: #GP at CPL > 0 comes first."""
    if not _ring0(m):
        return None
    return _exit(m, d, R.HLT) if m.proc & _HLT_EXITING else None


def rule_invlpg(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """INVLPG exits if "INVLPG exiting" is 1 (SDM 26.1.3); the exit qualification is
    the linear-address operand (SDM 28.2.1)."""
    if not _ring0(m) or not m.proc & _INVLPG_EXITING:
        return None
    return _exit(m, d, R.INVLPG, d.linear_address(m.guest))


def rule_rdpmc(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """RDPMC exits if "RDPMC exiting" is 1 (SDM 26.1.3), after the CPL/CR4.PCE #GP check.

    With the control 0 the CPU reads the counter.  QEMU (Unicorn) does not implement
    RDPMC at all - it raises #UD - so vtlab carries it out: no counters are running,
    so EDX:EAX = 0.
    """
    g = m.guest
    if m.cpl > 0 and not g.reg("cr4") & _CR4_PCE:
        return None  # #GP(0) (SDM Vol. 2, RDPMC), before any exit
    if m.proc & _RDPMC_EXITING:
        return _exit(m, d, R.RDPMC)
    g.set_reg("rax", 0)
    g.set_reg("rdx", 0)
    return "emulated"


def rule_rdtsc(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """RDTSC exits if "RDTSC exiting" is 1 (SDM 26.1.3), after the CR4.TSD #GP check
    at CPL > 0."""
    if m.cpl > 0 and m.guest.reg("cr4") & _CR4_TSD:
        return None
    return _exit(m, d, R.RDTSC) if m.proc & _RDTSC_EXITING else None


def rule_rdtscp(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """RDTSCP: #UD unless "enable RDTSCP" is 1; exits (reason 51) if "RDTSC exiting"
    is also 1 (SDM 26.1.3, and 26.1.1 for the #UD's priority)."""
    if not m.proc2 & _ENABLE_RDTSCP:
        return m.raise_exception(Vector.UD, "RDTSCP with \"enable RDTSCP\" = 0 raises #UD")
    return _exit(m, d, R.RDTSCP) if m.proc & _RDTSC_EXITING else None


def _monitor_mwait(m: ExitMonitor, d: DecodedInstruction, control: int, reason: ExitReason) -> Outcome:
    """MONITOR / MWAIT exit if their control is 1 (SDM 26.1.3); both are #UD at CPL > 0
    here (IA32_MISC_ENABLE gives no user-mode MONITOR/MWAIT), which comes first.

    With the control 0 the CPU executes them.  vtlab's CPUID reports MONITOR/MWAIT
    (CPUID.1:ECX[3] = 1) but QEMU (Unicorn) raises #UD for both, so vtlab carries them
    out: MONITOR arms a monitor nobody watches, and MWAIT returns at once, as the SDM
    allows it to on any implementation-specific event (KVM does the same: MWAIT as NOP).

    The address-range monitoring hardware is modelled as armed / not armed (the MWAIT
    exit qualification reports it, SDM 28.2.1): an executed MONITOR arms it; VM exits
    and VM entries clear it (SDM 28.5.6, 27.3.3); an executed MWAIT returns as if the
    monitored range had been written, which leaves it disarmed.
    """
    if not _ring0(m):
        return None
    if m.proc & control:
        if reason is R.MWAIT_INSTRUCTION:
            # Bit 0: 1 if address-range monitoring hardware was armed (SDM 28.2.1).
            return _exit(m, d, reason, int(m.address_monitor_armed))
        return _exit(m, d, reason)
    if reason is R.MONITOR_INSTRUCTION:
        m.arm_address_monitor()
    else:
        m.address_monitor_armed = False
    return "emulated"


def rule_monitor(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """MONITOR exits if "MONITOR exiting" is 1, else executes and arms the address-range
    monitor (SDM 26.1.3; see _monitor_mwait)."""
    return _monitor_mwait(m, d, _MONITOR_EXITING, R.MONITOR_INSTRUCTION)


def rule_mwait(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """MWAIT exits if "MWAIT exiting" is 1 - qualification bit 0: was the monitor armed
    (SDM 28.2.1) - else executes as a NOP (SDM 26.1.3)."""
    return _monitor_mwait(m, d, _MWAIT_EXITING, R.MWAIT_INSTRUCTION)


def rule_pause(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """PAUSE exits if "PAUSE exiting" is 1 (SDM 26.1.3), at any CPL (not privileged)."""
    return _exit(m, d, R.PAUSE_INSTRUCTION) if m.proc & _PAUSE_EXITING else None


def rule_wbinvd(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """WBINVD exits if "WBINVD exiting" is 1 (SDM 26.1.3); privileged (#GP first)."""
    if not _ring0(m):
        return None
    return _exit(m, d, R.WBINVD) if m.proc2 & _WBINVD_EXITING else None


def rule_rdrand(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """RDRAND exits if "RDRAND exiting" is 1 (SDM 26.1.3), at any CPL; the instruction
    information gives the destination register and operand size (SDM 28.2.5)."""
    if not m.proc2 & _RDRAND_EXITING:
        return None
    return _exit(m, d, R.RDRAND, instruction_info=rdrand_information(d))


def rule_rdseed(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """RDSEED exits if "RDSEED exiting" is 1 (SDM 26.1.3), at any CPL (information as RDRAND)."""
    if not m.proc2 & _RDSEED_EXITING:
        return None
    return _exit(m, d, R.RDSEED, instruction_info=rdrand_information(d))


# ------------------------------------------------------------- control registers
def rule_mov_cr(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """MOV to/from CR0, CR3, CR4, CR8 (SDM 26.1.3; 25.6.6 on guest/host masks and
    read shadows).  Qualification: CR number, direction, register (Table 28-3)."""
    if not _ring0(m) or not d.registers:
        return None
    from . import cr_checks  # (the #GP(0) checks of writes that do not exit)
    cr, to_cr = d.control_register, d.kind is K.MOV_TO_CR
    reg = d.registers[0].name
    qual = CrAccessQualification(cr, CrAccessType.MOV_TO_CR if to_cr else CrAccessType.MOV_FROM_CR,
                                 d.registers[0].number).encode()
    v = m.vmcs.get
    if cr == 3:
        if to_cr:
            value = m.guest.reg(reg)
            targets = [v(F[f"CR3_TARGET_VALUE{i}"]) for i in range(min(v(F.CR3_TARGET_COUNT), 4))]
            if m.proc & _CR3_LOAD_EXITING and value not in targets:
                return _exit(m, d, R.CR_ACCESS, qual)
            # A write that does not exit faults as on any CPU (#GP(0), SDM Vol. 2B MOV CR).
            return cr_checks.check_mov_to_cr(m, 3, value)
        elif m.proc & _CR3_STORE_EXITING:
            return _exit(m, d, R.CR_ACCESS, qual)
        return None
    if cr == 8:
        control = _CR8_LOAD_EXITING if to_cr else _CR8_STORE_EXITING
        if m.proc & control:
            return _exit(m, d, R.CR_ACCESS, qual)
        return cr_checks.check_mov_to_cr(m, 8, m.guest.reg(reg)) if to_cr else None
    if cr in (0, 4):
        mask, shadow = (v(F.CR0_GUEST_HOST_MASK), v(F.CR0_READ_SHADOW)) if cr == 0 else \
                       (v(F.CR4_GUEST_HOST_MASK), v(F.CR4_READ_SHADOW))
        actual = m.guest.reg(f"cr{cr}")
        if to_cr:
            value = m.guest.reg(reg)
            if (value ^ shadow) & mask:
                return _exit(m, d, R.CR_ACCESS, qual)
            if mask:  # bits the VMM owns keep their real value (SDM 25.6.6)
                value = (actual & mask) | (value & ~mask)
                fault = cr_checks.check_mov_to_cr(m, cr, value)  # #GP(0), SDM Vol. 2B MOV CR
                if fault is not None:
                    return fault
                m.guest.set_reg(f"cr{cr}", value)
                return "emulated"
            return cr_checks.check_mov_to_cr(m, cr, value)
        if mask:  # reads see the shadow for owned bits
            m.guest.set_reg(reg, (actual & ~mask) | (shadow & mask))
            return "emulated"
    return None  # CR2 (and the reserved CRs, #UD) never exit


def rule_clts(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """CLTS exits if CR0.TS is owned by the VMM (mask bit 3) and the shadow's TS is 1
    (SDM 26.1.3)."""
    if not _ring0(m):
        return None
    mask, shadow = m.vmcs.get(F.CR0_GUEST_HOST_MASK), m.vmcs.get(F.CR0_READ_SHADOW)
    if mask & _CR0_TS and shadow & _CR0_TS:
        return _exit(m, d, R.CR_ACCESS, CrAccessQualification(0, CrAccessType.CLTS).encode())
    return None


def rule_lmsw(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """LMSW exits if it would change an owned bit of CR0[3:0] away from the shadow, or
    set an owned PE whose shadow is 0 (SDM 26.1.3).  The qualification carries the
    source operand (Table 28-3: bit 6 the operand type, 1 = memory; bits 31:16 the
    source data); with a memory operand the guest-linear-address field receives the
    operand's linear address, bits 63:32 clear outside 64-bit mode (SDM 28.2.1)."""
    if not _ring0(m):
        return None
    mask, shadow = m.vmcs.get(F.CR0_GUEST_HOST_MASK), m.vmcs.get(F.CR0_READ_SHADOW)
    memory = d.memory is not None
    linear = None
    if memory:
        linear = d.linear_address(m.guest)
        value = int.from_bytes(m.guest.read(linear, 2), "little")
    else:
        value = m.guest.reg(d.registers[0].name) & 0xFFFF
    pe_set = mask & 1 and not shadow & 1 and value & 1
    others = (value ^ shadow) & mask & 0xE
    if pe_set or others:
        q = CrAccessQualification(0, CrAccessType.LMSW, 0, memory, value & 0xFFFF).encode()
        if linear is None:
            return _exit(m, d, R.CR_ACCESS, q)
        return _exit(m, d, R.CR_ACCESS, q, guest_linear_address=linear)
    return None


_CR_ACCESS_RULES: dict[InsnKind, Rule] = {
    K.MOV_TO_CR: rule_mov_cr, K.MOV_FROM_CR: rule_mov_cr, K.CLTS: rule_clts, K.LMSW: rule_lmsw,
}


def rule_cr_access(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """Control-register accesses (reason 28, SDM 26.1.3): MOV to/from CR, CLTS, LMSW."""
    return _CR_ACCESS_RULES[d.kind](m, d)


def rule_smsw(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """SMSW never exits (SDM 26.1.3 lists no control for it), but it reads CR0[15:0]
    through the read shadow for the bits the VMM owns (SDM 25.6.6)."""
    mask = m.vmcs.get(F.CR0_GUEST_HOST_MASK) & 0xFFFF
    if not mask or d.memory is not None or not d.registers:
        return None
    actual = m.guest.reg("cr0")
    m.guest.set_reg(d.registers[0].name, ((actual & ~mask) | (m.vmcs.get(F.CR0_READ_SHADOW) & mask)) & 0xFFFF)
    return "emulated"


# ------------------------------------------------------------- debug registers
def rule_dr_access(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """MOV DR exits if "MOV-DR exiting" is 1 (SDM 26.1.3); qualification per Table 28-4:
    bits 2:0 the DR number, bit 4 the direction (1 = MOV from DR), bits 11:8 the register.

    Priority: MOV DR is the exception to the rule that privilege-level faults come
    before VM exits (SDM 26.1.1, footnote).  26.1.3 says these exits take priority over
    the #GP of CPL > 0 and over the #UD of DR4/DR5 with CR4.DE = 1, so with the control
    1 a MOV DR at CPL 3 exits (the VMM sees ``exit.cpl`` and injects the #GP).  The
    #UD of a LOCK prefix is not among them and still comes first.
    """
    if not m.proc & _MOV_DR_EXITING or not d.registers or d.prefixes.lock:
        return None
    from_dr = d.kind is K.MOV_FROM_DR
    q = d.debug_register | (int(from_dr) << 4) | (d.registers[0].number << 8)
    return _exit(m, d, R.DR_ACCESS, q)


# ------------------------------------------------------------------------- I/O
def io_operands(m: ExitMonitor, d: DecodedInstruction) -> IoQualification:
    """The I/O exit qualification of IN/OUT/INS/OUTS (SDM Table 28-5), from the record.

    The access size is the data register's width (AL, AX, EAX) for IN/OUT and the memory
    operand's for INS/OUTS; the port is the immediate, or DX.  REP and REPNE both mark a
    repeated string instruction (bit 5).
    """
    kind = d.kind
    string = kind is K.INS or kind is K.OUTS
    if string:
        size = d.memory.size
    else:  # IN acc, port / OUT port, acc: the accumulator is the first / last register
        size = (d.registers[0] if kind is K.IN else d.registers[-1]).width // 8
    immediate = d.immediate is not None
    port = d.immediate if immediate else m.guest.reg("dx") & 0xFFFF
    direction = IoDirection.IN if kind is K.IN or kind is K.INS else IoDirection.OUT
    rep = string and (d.prefixes.rep or d.prefixes.repne)
    return IoQualification(port, size, direction, string, rep, immediate)


def rule_io_instruction(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """I/O instructions: unconditional I/O exiting, or the I/O bitmaps (SDM 26.1.3).

    With "use I/O bitmaps" = 1, "unconditional I/O exiting" is ignored and the access
    exits if the bit of *any* port it touches is 1 in bitmap A (ports 0000H-7FFFH) or B
    (8000H-FFFFH); an access that wraps past FFFFH always exits.  The I/O-permission
    #GP (CPL > IOPL) comes first (SDM 26.1.1).
    """
    if m.guest._stop is not None:  # the CPL/IOPL check already raised #GP
        return None
    q = io_operands(m, d)
    if m.proc & _USE_IO_BITMAPS:
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
        exits = bool(m.proc & _UNCOND_IO_EXITING)
    if not exits:
        return None
    kw = {}
    if q.string:
        # The guest-linear-address field: the linear address of the memory operand,
        # segment base + offset (SDM 28.2.1) - ES:rDI for INS, DS:rSI (or the override
        # prefix's segment) for OUTS, the offset register at the address size.
        kw["guest_linear_address"] = d.linear_address(m.guest)
        # The instruction-information field, on processors whose IA32_VMX_BASIC[54] is 1
        # (SDM 28.2.5, A.1): address size and (OUTS) segment register.
        if m.cpu.caps.basic & _BASIC_INS_OUTS_INFO:
            kw["instruction_info"] = string_io_information(d)
    return _exit(m, d, R.IO_INSTRUCTION, q.encode(), **kw)


# ------------------------------------------------------------------------ MSRs
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


def msr_bitmap_exits(m: ExitMonitor, msr: int, write: bool) -> bool:
    """Does RDMSR/WRMSR of ``msr`` exit: always, or per the MSR bitmap (SDM 26.1.3)."""
    if not m.proc & _USE_MSR_BITMAPS:
        return True
    position = msr_bitmap_position(msr)
    if position is None:
        return True
    offset, bit = position
    return m.cpu.memory.test_bit(m.vmcs.get(F.MSR_BITMAP) + offset + (2048 if write else 0), bit)


def rule_rdmsr(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """RDMSR exits always, or per the MSR bitmap when "use MSR bitmaps" is 1 (SDM 26.1.3);
    privileged (#GP at CPL > 0 first)."""
    if not _ring0(m):
        return None
    msr = m.guest.reg("ecx")
    return _exit(m, d, R.MSR_READ) if msr_bitmap_exits(m, msr, False) else None


def rule_wrmsr(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """WRMSR exits always, or per the MSR bitmap when "use MSR bitmaps" is 1 (SDM 26.1.3);
    privileged (#GP at CPL > 0 first)."""
    if not _ring0(m):
        return None
    msr = m.guest.reg("ecx")
    return _exit(m, d, R.MSR_WRITE) if msr_bitmap_exits(m, msr, True) else None


# ----------------------------------------------------------- descriptor tables
#: Instruction identity, bits 29:28 of the instruction-information field (Tables 28-10, 28-11).
_DESC_IDENTITY = {K.SGDT: 0, K.SIDT: 1, K.LGDT: 2, K.LIDT: 3, K.SLDT: 0, K.STR: 1, K.LLDT: 2, K.LTR: 3}
_GDTR_IDTR_KINDS = frozenset({K.SGDT, K.SIDT, K.LGDT, K.LIDT})
_DESC_LOADS = frozenset({K.LGDT, K.LIDT, K.LLDT, K.LTR})


def rule_descriptor_table(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """LGDT/LIDT/SGDT/SIDT (reason 46) and LLDT/LTR/SLDT/STR (47) exit if
    "descriptor-table exiting" is 1 (SDM 26.1.3).

    The loads are privileged (#GP at CPL > 0 comes first); the stores exit at any CPL,
    which is how a VMM can hide its own tables from a curious guest.  Qualification:
    the displacement (SDM 28.2.1); instruction information per Tables 28-10 / 28-11.
    """
    kind = d.kind
    gdtr_idtr = kind in _GDTR_IDTR_KINDS
    if not gdtr_idtr and (not m.guest.reg("cr0") & _CR0_PE or m.guest.reg("eflags") & _RFLAGS_VM):
        return None  # LLDT/LTR/SLDT/STR are #UD in real and virtual-8086 mode (SDM Vol. 2)
    if kind in _DESC_LOADS and not _ring0(m):
        return None
    if not m.proc2 & _DESC:
        return None
    reason = R.GDTR_IDTR if gdtr_idtr else R.LDTR_TR
    info = instruction_information(d, gdtr_idtr) | _DESC_IDENTITY[kind] << 28
    return _exit(m, d, reason, displacement(d), instruction_info=info)


# ---------------------------------------------------------------- task switches
#: Bits 31:30 of the task-switch exit qualification: the source (SDM Table 28-2).
TASK_SWITCH_CALL, TASK_SWITCH_IRET, TASK_SWITCH_JMP, TASK_SWITCH_IDT = 0, 1, 2, 3
_TASK_GATE = 5
_AVAILABLE_TSS = frozenset({1, 9})   # 16-bit / 32-bit available TSS (SDM Vol. 3A Table 3-2)


def _far_selector(m: ExitMonitor, d: DecodedInstruction) -> int | None:
    """The selector of a far JMP/CALL: the last two bytes of ptr16:16/32 (EA, 9A), or the
    word after the offset of an m16:16/32/64 operand (SDM Vol. 2, JMP and CALL)."""
    if d.memory is None:
        return int.from_bytes(d.raw[-2:], "little")
    try:
        at = d.linear_address(m.guest) + d.operand_size // 8
        return int.from_bytes(m.guest.read(at, 2), "little")
    except Exception:  # an unmapped operand: the CPU raises the #PF / #GP itself
        return None


def rule_task_switch(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """Task switches exit unconditionally (reason 9, SDM 26.4.2) - once the checks that
    come first pass, so that the CPU raises their faults itself otherwise.

    * far JMP/CALL to an available-TSS descriptor: its DPL must be >= CPL and >= RPL;
    * far JMP/CALL to a task gate: the gate's DPL >= CPL and >= RPL and P; no privilege
      check on the TSS it names;
    * IRET with RFLAGS.NT = 1: the previous-task link of the current TSS, a busy TSS, no
      privilege checks;

    then the new TSS selector (in the GDT, within its limit) and descriptor (type, P, S,
    limit >= 67H for a 32-bit TSS, 2BH for a 16-bit one; :meth:`~vtlab.cpu.events.EventUnit.valid_new_tss`).
    In IA-32e mode, in real mode and in virtual-8086 mode nothing here is a task switch
    (IA-32e mode raises #GP instead, 26.4.2 c and g).  Qualification (Table 28-2): bits
    15:0 the new TSS's selector, bits 31:30 the source - 0 CALL, 1 IRET, 2 JMP.
    """
    g = m.guest
    if d.kind is K.IRET:
        if m.stop_before_opening(g.linear_rip(), iret=True):
            return None   # a window may open after this IRET: the run loop steps it
        if m.nmi_blocked:
            # IRET ends blocking by NMI (virtual-NMI blocking with "virtual NMIs"), in every
            # mode and even if it faults (SDM Vol. 3A 6.7.1; Vol. 3C 26.3, 28.3.4).
            m.iret_executed()
    cr0, eflags = g.reg("cr0"), g.reg("eflags")
    if not cr0 & _CR0_PE or eflags & _RFLAGS_VM or g.reg("efer") & _EFER_LMA:
        return None
    if d.kind is K.IRET:
        if not eflags & _RFLAGS_NT:
            return None
        try:
            selector = g.read_u16(g.segment("tr").base)   # previous-task link (Vol. 3A 8.2.1)
        except Exception:  # a TSS outside memory: the CPU faults itself
            return None
        if not m.valid_new_tss(selector, busy=True):
            return None
        return _exit(m, d, R.TASK_SWITCH, selector | TASK_SWITCH_IRET << 30)
    selector = _far_selector(m, d)
    if selector is None or selector & ~3 == 0:
        return None
    raw = m.descriptor(selector)
    if raw is None or raw >> 44 & 1:    # beyond the table, or a code/data segment
        return None
    kind, dpl, present = raw >> 40 & 0xF, raw >> 45 & 3, raw >> 47 & 1
    if kind not in _AVAILABLE_TSS and kind != _TASK_GATE:
        return None                      # a call gate, a busy TSS (#GP) ...
    if dpl < m.cpl or dpl < selector & 3 or not present:
        return None                      # #GP / #NP, raised by the CPU
    if kind == _TASK_GATE:
        selector = raw >> 16 & 0xFFFF    # the TSS selector the gate names
    if not m.valid_new_tss(selector, busy=False):
        return None
    source = TASK_SWITCH_JMP if d.kind is K.FAR_JMP else TASK_SWITCH_CALL
    return _exit(m, d, R.TASK_SWITCH, selector | source << 30)


# ----------------------------------------------------------------------- INT1
_INT1_INFO = IntrInfo(1, InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION).encode()


def rule_int1(m: ExitMonitor, d: DecodedInstruction) -> Outcome:
    """INT1 (ICEBP, F1) raises #DB as a *privileged software exception* (interruption type
    5, SDM 25.8.3 / 28.2.2): a VM exit if bit 1 of the exception bitmap is 1 (SDM 26.2),
    with the instruction's length in the VM-exit instruction-length field (28.2.5) and
    RIP at the INT1; otherwise #DB is delivered to the guest as a trap (the return
    address is the next instruction).  QEMU (Unicorn) does not implement INT1 as the SDM
    does - it reports an invalid opcode - so vtlab raises the exception itself.
    """
    if m.exception_exits(1):
        return _exit(m, d, R.EXCEPTION_NMI, 0, intr_info=_INT1_INFO)
    return m.raise_event(1, m.rip + d.length, d.length)


# ------------------------------------------------------------------- the tables
#: Which exit reason each instruction kind can cause (SDM 26.1.2, 26.1.3).
EXIT_REASON_BY_KIND: dict[InsnKind, ExitReason] = {
    K.CPUID: R.CPUID, K.GETSEC: R.GETSEC, K.INVD: R.INVD, K.XSETBV: R.XSETBV,
    K.VMCALL: R.VMCALL, K.VMCLEAR: R.VMCLEAR, K.VMLAUNCH: R.VMLAUNCH, K.VMPTRLD: R.VMPTRLD,
    K.VMPTRST: R.VMPTRST, K.VMREAD: R.VMREAD, K.VMRESUME: R.VMRESUME, K.VMWRITE: R.VMWRITE,
    K.VMXOFF: R.VMOFF, K.VMXON: R.VMON, K.INVEPT: R.INVEPT, K.INVVPID: R.INVVPID,
    K.HLT: R.HLT, K.INVLPG: R.INVLPG, K.RDPMC: R.RDPMC, K.RDTSC: R.RDTSC, K.RDTSCP: R.RDTSCP,
    K.MONITOR: R.MONITOR_INSTRUCTION, K.MWAIT: R.MWAIT_INSTRUCTION, K.PAUSE: R.PAUSE_INSTRUCTION,
    K.WBINVD: R.WBINVD, K.RDRAND: R.RDRAND, K.RDSEED: R.RDSEED,
    K.MOV_TO_CR: R.CR_ACCESS, K.MOV_FROM_CR: R.CR_ACCESS, K.CLTS: R.CR_ACCESS, K.LMSW: R.CR_ACCESS,
    K.MOV_TO_DR: R.DR_ACCESS, K.MOV_FROM_DR: R.DR_ACCESS,
    K.IN: R.IO_INSTRUCTION, K.OUT: R.IO_INSTRUCTION, K.INS: R.IO_INSTRUCTION, K.OUTS: R.IO_INSTRUCTION,
    K.RDMSR: R.MSR_READ, K.WRMSR: R.MSR_WRITE,
    K.LGDT: R.GDTR_IDTR, K.LIDT: R.GDTR_IDTR, K.SGDT: R.GDTR_IDTR, K.SIDT: R.GDTR_IDTR,
    K.LLDT: R.LDTR_TR, K.LTR: R.LDTR_TR, K.SLDT: R.LDTR_TR, K.STR: R.LDTR_TR,
    K.FAR_JMP: R.TASK_SWITCH, K.FAR_CALL: R.TASK_SWITCH, K.IRET: R.TASK_SWITCH,
    K.INT1: R.EXCEPTION_NMI,
}

#: The rule deciding each instruction-caused exit reason.
EXIT_RULES: dict[ExitReason, Rule] = {
    R.CPUID: rule_cpuid,
    R.GETSEC: rule_getsec,
    R.INVD: rule_invd,
    R.XSETBV: rule_xsetbv,
    R.VMCALL: rule_vmcall,
    **{reason: rule_vmx_instruction for reason in (
        R.VMCLEAR, R.VMLAUNCH, R.VMPTRLD, R.VMPTRST, R.VMREAD, R.VMRESUME, R.VMWRITE,
        R.VMOFF, R.VMON, R.INVEPT, R.INVVPID)},
    R.HLT: rule_hlt,
    R.INVLPG: rule_invlpg,
    R.RDPMC: rule_rdpmc,
    R.RDTSC: rule_rdtsc,
    R.RDTSCP: rule_rdtscp,
    R.MONITOR_INSTRUCTION: rule_monitor,
    R.MWAIT_INSTRUCTION: rule_mwait,
    R.PAUSE_INSTRUCTION: rule_pause,
    R.WBINVD: rule_wbinvd,
    R.RDRAND: rule_rdrand,
    R.RDSEED: rule_rdseed,
    R.CR_ACCESS: rule_cr_access,
    R.DR_ACCESS: rule_dr_access,
    R.IO_INSTRUCTION: rule_io_instruction,
    R.MSR_READ: rule_rdmsr,
    R.MSR_WRITE: rule_wrmsr,
    R.GDTR_IDTR: rule_descriptor_table,
    R.LDTR_TR: rule_descriptor_table,
    R.TASK_SWITCH: rule_task_switch,
    # The one *instruction* whose exception the rules decide (every other exception
    # reaches the exception bitmap through vtlab.cpu.events): INT1.
    R.EXCEPTION_NMI: rule_int1,
}

#: Instructions that never exit but that non-root operation changes: SMSW reads CR0
#: through the read shadow (SDM 25.6.6).
NON_EXITING_RULES: dict[InsnKind, Rule] = {K.SMSW: rule_smsw}


def rule_for(kind: InsnKind) -> Rule | None:
    """The rule that governs an instruction of ``kind`` (None: it is not watched)."""
    reason = EXIT_REASON_BY_KIND.get(kind)
    return EXIT_RULES[reason] if reason is not None else NON_EXITING_RULES.get(kind)

"""SVM guest mode: which guest instructions and events are intercepted, and how.

The guest runs natively in Unicorn, exactly as under VMX: when code is loaded the
decoder's records (:mod:`vtlab.cpu.decoder`, shared with VMX) say where the sensitive
instructions are, and one code hook per address asks the rule of that instruction,
just before it executes, whether the VMCB's intercepts claim it.  The rules read the
intercept vectors, the IOPM and the MSRPM as *memory* (the VMCB and the maps are bytes
in host memory; APM Vol. 2, 15.7-15.11).  The I/O operand decoding is VMX's own
(:func:`vtlab.cpu.exit_rules.io_operands`); the SVM instructions (0F 01 D8-DF), which
VMX's decoder does not tell apart, are found by their opcode bytes.

Priority (APM Vol. 2, 15.7): instruction intercepts are checked after the simple
exceptions - #UD, #GP for a CPL that is not 0 - and before exceptions that depend on
memory accesses or operand values.  So a rule returns None (the CPU executes the
instruction and raises its own #GP) for a privileged instruction at CPL > 0.

Not modelled (yet): interrupt intercepts (INTR/NMI/VINTR), task-switch, IRET, INTn,
PUSHF/POPF and descriptor-table intercepts, nested paging (NPF), the selective CR0
write intercept; exceptions raised while delivering another one end in a SHUTDOWN
intercept rather than a #DF.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import unicorn
from unicorn.unicorn_py3 import unicorn as _ucmod

from ...arch.exceptions import Vector
from ...arch.msrs import Cr0
from ...arch.svm import (CR_DR_EXITINFO1_GPR, CR_DR_EXITINFO1_MOV, MSR_EXITINFO1_READ, MSR_EXITINFO1_WRITE,
                         SVM_OPCODES, EventInfo, EventType, Intercept, Intercept2, IoioInfo, NpfError, SvmExitCode, VmcbControl, cr_read, cr_write,
                         dr_read, dr_write, exception_exit, exit_name, iopm_bit, msrpm_bits)
from ..decoder import DecodedInstruction, InsnKind
from ..events import software_interrupt_length
from ..exit_rules import io_operands
from ..nonroot_consts import _UNDECODED_SIZE, _uc_hook_add
from ..quirks import forget_exception
from .vmcb import Vmcb

if TYPE_CHECKING:
    from ..guest import Guest, Program
    from ..hostmem import HostMemory

K = InsnKind
C = SvmExitCode
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})  # (SDM Vol. 3A 6.15; APM Vol. 2, 8.2)


@dataclass(slots=True)
class SvmExit:
    """One #VMEXIT: what the processor wrote into the VMCB's control area, plus what
    vtlab knew of it (the instruction, RIP, CPL) for traces and the VMM."""

    code: int                      #: EXITCODE (:class:`SvmExitCode` where named)
    exitinfo1: int = 0
    exitinfo2: int = 0
    exitintinfo: int = 0
    next_rip: int = 0              #: nRIP (NRIP save): RIP of the next instruction, 0 if none
    guest_rip: int = 0
    instruction: str = ""
    instruction_length: int = 0
    cpl: int = 0
    note: str = ""
    guest_instructions: int = 0
    decoded_insn: DecodedInstruction | None = None
    device: str | None = None
    registers: tuple | None = field(default=None)

    @property
    def name(self) -> str:
        """Linux's name of the exit code (``SVM_EXIT_`` dropped): "IOIO", "CR0_WRITE" ..."""
        return exit_name(self.code)

    def decoded(self) -> dict[str, object]:
        """EXITINFO1/2 split into named parts, per the APM's layout for this exit code."""
        if self.code == C.IOIO:
            d = IoioInfo.decode(self.exitinfo1).as_dict()
            d["next_rip"] = self.exitinfo2
            return d
        if self.code == C.MSR:
            return {"access": "WRMSR" if self.exitinfo1 == MSR_EXITINFO1_WRITE else "RDMSR"}
        if 0x00 <= self.code < 0x20:
            d: dict[str, object] = {"mov": bool(self.exitinfo1 & CR_DR_EXITINFO1_MOV)}
            if self.exitinfo1 & CR_DR_EXITINFO1_MOV:
                d["gpr"] = self.exitinfo1 & CR_DR_EXITINFO1_GPR
            return d
        if 0x20 <= self.code < 0x40:
            # MOV DR: EXITINFO1[3:0] is the GPR; there is no bit 63 (only MOV DR can access DRs)
            return {"gpr": self.exitinfo1 & CR_DR_EXITINFO1_GPR}
        if 0x40 <= self.code < 0x60:
            d = {"vector": self.code - 0x40, "error_code": self.exitinfo1}
            if self.code == C.EXCP_PF:
                d["fault_address"] = self.exitinfo2
            return d
        if self.code == C.NPF:
            flags = [f.name for f in NpfError if self.exitinfo1 & f]
            return {"error_code": "|".join(flags), "guest_physical_address": self.exitinfo2}
        if self.code == C.INVALID:
            return {"why": self.note}
        return {k: v for k, v in (("exitinfo1", self.exitinfo1), ("exitinfo2", self.exitinfo2)) if v}

    def __str__(self) -> str:
        at = f" at {self.guest_rip:#x}" + (f" '{self.instruction}'" if self.instruction else "")
        info = f" EXITINFO1={self.exitinfo1:#x}" if self.exitinfo1 else ""
        info += f" EXITINFO2={self.exitinfo2:#x}" if self.exitinfo2 else ""
        return f"#VMEXIT {self.name} ({int(self.code) & 0xFFFF_FFFF_FFFF_FFFF:#x}){at}{info}"


Rule = Callable[["SvmMonitor", DecodedInstruction], "SvmExit | str | None"]


class SvmMonitor:
    """Watches a guest in SVM guest mode and turns intercepted events into #VMEXITs.

    Implements the Guest's monitor interface (:class:`vtlab.cpu.guest.GuestMonitor`), as
    the VMX exit monitor does; the VMCB it reads is set by :meth:`SvmCpu.vmrun`.
    """

    records_own_stops = True

    def __init__(self, guest: "Guest", memory: "HostMemory"):
        self.guest = guest
        self.memory = memory
        self.vmcb: Vmcb | None = None
        self.pending: SvmExit | None = None
        self.event: tuple | None = None
        self.halted = False
        self.rip = self.cpl = 0
        self._watched: dict[int, tuple[DecodedInstruction | None, Rule, bytes]] = {}
        self._hook_fn = _ucmod.HOOK_CODE_CFUNC(self._code_hook)
        #: The nested paging in force (:class:`vtlab.cpu.svm.npt.NestedPaging`), None with
        #: NP_ENABLE = 0; set by VMRUN.
        self.npt = None
        guest.attach_monitor(self)
        guest.uc.hook_add(unicorn.UC_HOOK_MEM_UNMAPPED | unicorn.UC_HOOK_MEM_PROT, self._on_mem_fault)

    # ------------------------------------------------ the Guest's monitor interface
    def interrupt_raised(self, vector: int) -> None:
        if self.vmcb is None:
            return self.guest._record_interrupt(vector)
        g = self.guest
        software = software_interrupt_length(g, g.rip, vector)
        pf = g.page_fault if vector == Vector.PF and not software else None
        self.event = (vector, g.rip, software, pf)
        g.uc.emu_stop()

    def before_hlt(self, address: int) -> bool:
        if self.vmcb is None:
            return True
        if self.pending is not None:
            return False
        self._on_sensitive(address, 1)
        if self.pending is None:
            self.halted = True   # HLT not intercepted: the guest sleeps in guest mode
        return True

    def before_rdtsc(self, address: int) -> bool:
        if self.vmcb is None or self.pending is not None:
            return False
        watched = self._watched.get(address)
        return watched is not None and self._on_sensitive(address, len(watched[2]))

    def program_loaded(self, program: "Program") -> None:
        """Hook the sensitive instructions of a program: the decoder's kinds this model
        has rules for, and the SVM instructions by opcode."""
        self.guest._guard_programs()  # stop a guest that runs past its program (as VMX does)
        for address, d in program.decoded.items():
            rule = _RULES.get(d.kind)
            if rule is not None and address not in self._watched:
                self._hook(address, d, rule, d.raw)
        for insn in program.instructions:
            raw = bytes(insn.bytes)
            name = SVM_OPCODES.get(raw) if len(raw) == 3 else None
            if name is not None and insn.address not in self._watched:
                self._hook(insn.address, None, _svm_rule(name), raw)

    def _hook(self, address: int, d, rule: Rule, raw: bytes) -> None:
        self._watched[address] = (d, rule, raw)
        if d is not None and d.kind in (K.HLT, K.RDTSC, K.RDTSCP):
            return  # the guest's own hook calls before_hlt / before_rdtsc
        handle = _ucmod.uc_hook_h()
        status = _uc_hook_add(self.guest.uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_CODE, self._hook_fn,
                              None, ctypes.c_uint64(address), ctypes.c_uint64(address))
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)

    def _code_hook(self, _handle, address: int, size: int, _user) -> None:
        try:
            if self._on_sensitive(address, size):
                self.guest.uc.emu_stop()
        except BaseException as exc:
            uc = self.guest.uc
            if uc._hook_exception is None:
                uc._hook_exception = exc
            uc.emu_stop()

    _ACCESS = {unicorn.UC_MEM_READ_UNMAPPED: "r", unicorn.UC_MEM_WRITE_UNMAPPED: "w",
               unicorn.UC_MEM_FETCH_UNMAPPED: "x", unicorn.UC_MEM_READ_PROT: "r",
               unicorn.UC_MEM_WRITE_PROT: "w", unicorn.UC_MEM_FETCH_PROT: "x"}

    def _on_mem_fault(self, uc, access, address, size, value, _user) -> bool:
        """Unicorn refused a guest-physical access: with nested paging on, a nested page
        fault (#VMEXIT NPF, APM Vol. 2, 15.25.6); otherwise not ours to handle."""
        if self.vmcb is None or self.npt is None or self.pending is not None:
            return False
        if address >= self.guest.memory_size:
            return False   # no RAM there at all: the guest's own fault, not the tables'
        self.pending = self.npt.fault(self._ACCESS.get(access, "r"), address, -1, self.guest.cpl)
        uc.emu_stop()
        return False

    # ----------------------------------------------------------------- deciding
    def _on_sensitive(self, address: int, size: int) -> bool:
        """Just before a sensitive instruction: does the VMCB intercept it?"""
        if self.vmcb is None or self.pending is not None or self.event is not None or self.guest._stop:
            return False
        watched = self._watched.get(address)
        if watched is None:
            return False
        d, rule, raw = watched
        if size != len(raw) and size != _UNDECODED_SIZE and d is not None:
            return False
        g = self.guest
        if not g.memory_holds(address, raw):
            return False   # self-modifying code: the bytes there now are not the sweep's
        self.rip, self.cpl = g.rip, g.cpl
        result = rule(self, d)
        if result is None:
            return False
        if result == "fault":
            return True
        g.counter.unretire_rest_of_block(address)
        result.guest_instructions = g.counter.total
        self.pending = result
        return True

    def intercepted(self, vector_field: VmcbControl, flag: int) -> bool:
        return bool(self.vmcb.get(vector_field) & int(flag))

    def exit(self, code: int, d: DecodedInstruction | None, length: int, exitinfo1: int = 0,
             exitinfo2: int = 0, text: str = "") -> SvmExit:
        """An instruction intercept: nRIP is the next instruction (NRIP save, 15.7.1)."""
        return SvmExit(code, exitinfo1, exitinfo2, 0, self.rip + length, self.rip,
                       d.text if d is not None else text, length, self.cpl, decoded_insn=d)

    def raise_ud(self, note: str) -> str:
        """Raise #UD in the guest instead of executing the instruction."""
        self.event = (int(Vector.UD), self.rip, 0, None)
        self.note = note
        return "fault"

    note = ""

    # ------------------------------------------------------------------- events
    def handle_event(self) -> SvmExit | None:
        """An exception or INT n the guest raised: intercepted (40h + vector), or
        delivered through the guest's IVT/IDT (APM Vol. 2, 15.12)."""
        vector, rip, software, pf = self.event
        self.event = None
        g = self.guest
        forget_exception(g.uc)
        g.counter.unretire_rest_of_block(g.linear_rip())
        real = not g.reg("cr0") & Cr0.PE
        error_code = None
        address = None
        if not software and vector in _ERROR_CODE_VECTORS and not real:
            error_code = 0
        if pf is not None:
            address, error_code = pf
        # INT n (CD ib, also CD 03 and CD 04) is not an exception: it has an intercept of
        # its own (INTN, not modelled); the one-byte INT3 (CC) and INTO (CE) raise #BP and
        # #OF and go through the exception intercepts.
        is_exception = not software or (software == 1 and vector in (3, 4))
        at = rip - software if software else rip
        if is_exception and vector < 32 and self.vmcb.get(VmcbControl.INTERCEPT_EXCEPTIONS) >> vector & 1:
            insn = g.instruction_at(at)
            # nRIP is saved for the exceptions INT3, INTO (and BOUND) raise; 0 for the
            # other exception intercepts (APM Vol. 2, 15.7.1).
            nrip = rip if software else 0
            exit_ = SvmExit(exception_exit(vector), error_code or 0, address or 0, 0, nrip, at,
                            insn.text if insn else "", software, g.cpl, note=self.note,
                            guest_instructions=g.counter.total)
            g.rip = at
            self.note = ""
            return exit_
        self.note = ""
        if address is not None:
            g.set_reg("cr2", address)
        fault = g.deliver_interrupt(vector, error_code, rip, software=bool(software) and vector not in (1,))
        if fault is None:
            return None
        return SvmExit(C.SHUTDOWN, 0, 0, 0, 0, g.rip, "", 0, g.cpl,
                       note=f"delivering vector {vector} failed ({fault}): shutdown",
                       guest_instructions=g.counter.total)

    def inject(self) -> SvmExit | None:
        """EVENTINJ at VMRUN (APM Vol. 2, 15.20): deliver the event through the guest's
        IDT/IVT before its first instruction, and clear V (a #VMEXIT would anyway)."""
        value = self.vmcb.get(VmcbControl.EVENTINJ)
        info = EventInfo.decode(value)
        self.vmcb.put(VmcbControl.EVENTINJ, value & ~(1 << 31))
        g = self.guest
        code = info.error_code if info.type is EventType.EXCEPTION else None
        fault = g.deliver_interrupt(info.vector, code, g.rip, software=info.type is EventType.SOFT_INT)
        if fault is None:
            return None
        return SvmExit(C.SHUTDOWN, 0, 0, 0, 0, g.rip, "", 0, g.cpl,
                       note=f"injecting vector {info.vector} failed ({fault}): shutdown")


# --------------------------------------------------------------------------- rules
def _ring0(m: SvmMonitor) -> bool:
    return m.cpl == 0


def _flag_rule(field: VmcbControl, flag, code: SvmExitCode, privileged: bool = False) -> Rule:
    def rule(m: SvmMonitor, d: DecodedInstruction):
        if privileged and not _ring0(m):
            return None   # #GP(0) first (15.7)
        if m.intercepted(field, flag):
            return m.exit(code, d, d.length)
        return None
    rule.__doc__ = f"{code.name}: intercepted if {flag.name} is set in the VMCB at {int(field):03X}h."
    return rule


def rule_cpuid(m: SvmMonitor, d: DecodedInstruction):
    """CPUID: intercepted if the CPUID intercept bit is set - unlike VMX, where CPUID
    always exits, an SVM guest may run CPUID natively (APM Vol. 2, 15.8, Table B-1)."""
    return m.exit(C.CPUID, d, d.length) if m.intercepted(VmcbControl.INTERCEPT_MISC1, Intercept.CPUID) else None


def rule_io(m: SvmMonitor, d: DecodedInstruction):
    """IN/OUT/INS/OUTS: with IOIO_PROT set, intercepted if the IOPM bit of any byte the
    access touches is set (APM Vol. 2, 15.10.1); EXITINFO1 per 15.10.2, EXITINFO2 = the
    RIP of the next instruction."""
    if not m.intercepted(VmcbControl.INTERCEPT_MISC1, Intercept.IOIO_PROT):
        return None
    q = io_operands(m, d)   # (VMX's operand decoding: port, size, direction, string, rep)
    iopm = m.vmcb.get(VmcbControl.IOPM_BASE_PA)
    hit = False
    for port in range(q.port, q.port + q.size):
        # ports past FFFFh use the bits of the IOPM's third 4-KByte page (15.10.1)
        byte, bit = iopm_bit(port) if port <= 0xFFFF else (port >> 3, port & 7)
        if m.memory.test_bit(iopm + byte, bit):
            hit = True
            break
    if not hit:
        return None
    segment = d.memory.segment if (q.string and d.memory is not None) else 0
    info = IoioInfo(q.port, q.size, q.direction.name == "IN", q.string, q.rep, d.address_size, segment)
    return m.exit(C.IOIO, d, d.length, info.encode(), m.rip + d.length)


def rule_msr(m: SvmMonitor, d: DecodedInstruction):
    """RDMSR/WRMSR: with MSR_PROT set, intercepted if the MSRPM's read (even) or write
    (odd) bit of ECX is set, or always for an MSR outside the map's ranges (APM Vol. 2,
    15.11); EXITINFO1 = 0 for RDMSR, 1 for WRMSR.  #GP at CPL > 0 comes first."""
    if not _ring0(m) or not m.intercepted(VmcbControl.INTERCEPT_MISC1, Intercept.MSR_PROT):
        return None
    write = d.kind is K.WRMSR
    msr = m.guest.reg("ecx") & 0xFFFF_FFFF
    position = msrpm_bits(msr)
    if position is not None:
        byte, bit = position
        if not m.memory.test_bit(m.vmcb.get(VmcbControl.MSRPM_BASE_PA) + byte, bit + int(write)):
            return None
    return m.exit(C.MSR, d, d.length, MSR_EXITINFO1_WRITE if write else MSR_EXITINFO1_READ)


def rule_cr(m: SvmMonitor, d: DecodedInstruction):
    """MOV to/from CRn, CLTS, LMSW, SMSW: the CR read (bit n) / write (bit 16 + n)
    intercepts at VMCB 000h.  With decode assists EXITINFO1 bit 63 says "a MOV" and
    bits 3:0 give its general register; 0 for CLTS, LMSW and SMSW."""
    if not _ring0(m) and d.kind is not K.SMSW:
        return None
    cr = d.control_register or 0
    write = d.kind in (K.MOV_TO_CR, K.CLTS, K.LMSW)
    bits = m.vmcb.get(VmcbControl.INTERCEPT_CR)
    if not bits >> (cr + 16 * write) & 1:
        return None
    info = 0
    if d.kind in (K.MOV_TO_CR, K.MOV_FROM_CR) and d.registers:
        info = CR_DR_EXITINFO1_MOV | d.registers[0].number
    return m.exit(cr_write(cr) if write else cr_read(cr), d, d.length, info)


def rule_dr(m: SvmMonitor, d: DecodedInstruction):
    """MOV to/from DRn: the DR read (bit n) / write (bit 16 + n) intercepts at VMCB 004h."""
    if not _ring0(m):
        return None
    dr = d.debug_register or 0
    write = d.kind is K.MOV_TO_DR
    if not m.vmcb.get(VmcbControl.INTERCEPT_DR) >> (dr + 16 * write) & 1:
        return None
    # Decode assists (APM Vol. 2, chapter 15, "Decode Assists"): EXITINFO1[3:0] = the
    # GPR.  Bit 63 ("a MOV, not CLTS/LMSW/SMSW") is defined for CR intercepts only.
    info = d.registers[0].number & CR_DR_EXITINFO1_GPR if d.registers else 0
    return m.exit(dr_write(dr) if write else dr_read(dr), d, d.length, info)


def rule_invlpg(m: SvmMonitor, d: DecodedInstruction):
    """INVLPG: intercepted if INVLPG is set; EXITINFO1 = the linear address (decode assist)."""
    if not _ring0(m) or not m.intercepted(VmcbControl.INTERCEPT_MISC1, Intercept.INVLPG):
        return None
    return m.exit(C.INVLPG, d, d.length, d.linear_address(m.guest))


_RULES: dict[InsnKind, Rule] = {
    K.CPUID: rule_cpuid,
    K.HLT: _flag_rule(VmcbControl.INTERCEPT_MISC1, Intercept.HLT, C.HLT, privileged=True),
    K.IN: rule_io, K.OUT: rule_io, K.INS: rule_io, K.OUTS: rule_io,
    K.RDMSR: rule_msr, K.WRMSR: rule_msr,
    K.MOV_TO_CR: rule_cr, K.MOV_FROM_CR: rule_cr, K.CLTS: rule_cr, K.LMSW: rule_cr, K.SMSW: rule_cr,
    K.MOV_TO_DR: rule_dr, K.MOV_FROM_DR: rule_dr,
    K.INVLPG: rule_invlpg,
    K.RDTSC: _flag_rule(VmcbControl.INTERCEPT_MISC1, Intercept.RDTSC, C.RDTSC),
    K.RDTSCP: _flag_rule(VmcbControl.INTERCEPT_MISC2, Intercept2.RDTSCP, C.RDTSCP),
    K.RDPMC: _flag_rule(VmcbControl.INTERCEPT_MISC1, Intercept.RDPMC, C.RDPMC),
    K.INVD: _flag_rule(VmcbControl.INTERCEPT_MISC1, Intercept.INVD, C.INVD, privileged=True),
    K.PAUSE: _flag_rule(VmcbControl.INTERCEPT_MISC1, Intercept.PAUSE, C.PAUSE),
    K.WBINVD: _flag_rule(VmcbControl.INTERCEPT_MISC2, Intercept2.WBINVD, C.WBINVD, privileged=True),
    K.MONITOR: _flag_rule(VmcbControl.INTERCEPT_MISC2, Intercept2.MONITOR, C.MONITOR, privileged=True),
    K.MWAIT: _flag_rule(VmcbControl.INTERCEPT_MISC2, Intercept2.MWAIT, C.MWAIT, privileged=True),
    K.XSETBV: _flag_rule(VmcbControl.INTERCEPT_MISC2, Intercept2.XSETBV, C.XSETBV, privileged=True),
}

#: The SVM instructions' intercept bits and exit codes (Table B-1, Appendix C).
_SVM_INSTRUCTIONS = {
    "VMRUN": (Intercept2.VMRUN, C.VMRUN), "VMMCALL": (Intercept2.VMMCALL, C.VMMCALL),
    "VMLOAD": (Intercept2.VMLOAD, C.VMLOAD), "VMSAVE": (Intercept2.VMSAVE, C.VMSAVE),
    "STGI": (Intercept2.STGI, C.STGI), "CLGI": (Intercept2.CLGI, C.CLGI),
    "SKINIT": (Intercept2.SKINIT, C.SKINIT), "INVLPGA": (Intercept.INVLPGA, C.INVLPGA),
}


def _svm_rule(name: str) -> Rule:
    flag, code = _SVM_INSTRUCTIONS[name]
    field = VmcbControl.INTERCEPT_MISC1 if isinstance(flag, Intercept) else VmcbControl.INTERCEPT_MISC2

    def rule(m: SvmMonitor, _d):
        if m.intercepted(field, flag):
            return m.exit(code, None, 3, text=name.lower())
        if name == "VMMCALL":
            # VMMCALL that is not intercepted raises #UD (APM Vol. 3, VMMCALL).
            return m.raise_ud("VMMCALL is not intercepted (VMCB 010h bit 1 clear): #UD")
        # A guest with EFER.SVME = 0 gets #UD for the other SVM instructions (APM Vol. 3);
        # vtlab does not model nested SVM, so a guest that set SVME gets #UD too.
        return m.raise_ud(f"{name} in the guest is not intercepted and vtlab does not model "
                          "nested SVM: #UD")
    rule.__doc__ = f"{name}: intercepted if its bit is set (VMCB {int(field):03X}h)."
    return rule

"""The checks VMLAUNCH/VMRESUME perform before entering the guest (SDM Vol. 3C ch. 27).

They come in three groups, and the group decides how a failure is reported:

1. **VMX controls** (SDM 27.2.1) -> VMfailValid, VM-instruction error 7;
2. **host-state area** (SDM 27.2.2-27.2.4) -> VMfailValid, error 8;
3. **guest-state area** (SDM 27.3.1) -> the entry *fails like a VM exit*: exit reason
   33 (INVALID_STATE) with bit 31 set, host state loaded, the guest never runs.

Each check below is one rule, named after what it checks, returning a message that
says what is wrong in the SDM's words.  :func:`entry_violations` lists every broken
rule at once (a real CPU stops at the first; vtlab reports that one and keeps the rest
for the learner).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from ..arch.controls import EntryControl, ExitControl, PinBased, ProcBased, ProcBased2
from ..arch.exceptions import INTR_INFO_VALID, InterruptionType, IntrInfo
from ..arch.msrs import Cr0, Cr4, Efer
from ..arch.vmcs_fields import VmcsField as F
from .capabilities import flag_names
from .vmcs import INVALID_POINTER

if TYPE_CHECKING:
    from .vmx import VmxCpu
    from .vmcs import Vmcs


@dataclass(frozen=True)
class Violation:
    """One broken VM-entry rule."""

    group: str          #: "controls", "host-state" or "guest-state"
    section: str        #: SDM section that states the rule
    message: str
    qualification: int = 0   #: exit qualification for guest-state failures (SDM 27.8)

    def __str__(self) -> str:
        return f"[{self.group}, SDM {self.section}] {self.message}"


def _canonical(address: int) -> bool:
    """Bits 63:47 all equal (48-bit linear addresses)."""
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1


_SEGS = ("ES", "CS", "SS", "DS", "FS", "GS", "LDTR", "TR")


def _seg(vmcs: "Vmcs", name: str, prefix: str = "GUEST"):
    g = lambda part: vmcs.get(F[f"{prefix}_{name}_{part}"])
    return g("SELECTOR"), g("BASE"), g("LIMIT"), g("AR_BYTES")


def _seg_ar_problems(name: str, sel: int, limit: int, ar: int, unrestricted: bool, cs_dpl: int,
                     v8086: bool) -> Iterable[str]:
    """Access-rights rules for CS/SS/DS/ES/FS/GS (SDM 27.3.1.2)."""
    if v8086:
        if ar != 0xF3:
            yield f"{name} access rights must be 0xF3 in virtual-8086 mode (are {ar:#x})"
        return
    if ar & (1 << 16) and name != "CS":
        return  # unusable: no further checks
    typ, s, dpl, p = ar & 0xF, (ar >> 4) & 1, (ar >> 5) & 3, (ar >> 7) & 1
    g = (ar >> 15) & 1
    if ar & 0xFFFE0F00:
        yield f"{name} access-rights reserved bits (11:8, 31:17) must be 0 (are {ar:#x})"
    if name == "CS":
        ok = {9, 11, 13, 15} | ({3} if unrestricted else set())
        if typ not in ok:
            yield (f"CS type must be an accessed code segment (9, 11, 13 or 15"
                   f"{', or 3 with unrestricted guest' if unrestricted else ''}); it is {typ}")
    elif name == "SS":
        if typ not in (3, 7):
            yield f"SS type must be a read/write accessed data segment (3 or 7); it is {typ}"
    elif not typ & 1:
        yield f"{name} type must have the accessed bit (bit 0) set; it is {typ}"
    elif typ & 8 and not typ & 2:
        yield f"{name} is a code segment, so it must be readable (type bit 1)"
    if not s:
        yield f"{name} S bit (bit 4) must be 1: a code or data segment, not a system one"
    if not p:
        yield f"{name} P bit (bit 7) must be 1 (segment present)"
    if name == "SS" and not unrestricted and dpl != (sel & 3):
        yield f"SS DPL ({dpl}) must equal SS selector RPL ({sel & 3})"
    if name == "CS" and typ in (9, 11) and not unrestricted and dpl != cs_dpl:
        pass
    if (limit & 0xFFF) != 0xFFF and g:
        yield f"{name} G bit is 1 but limit bits 11:0 are not all 1 (limit {limit:#x})"
    if limit >> 20 and not g:
        yield f"{name} limit {limit:#x} exceeds 1 MByte but G bit is 0"


class Checker:
    """Runs the entry checks of one VMCS against one processor's capabilities."""

    def __init__(self, cpu: "VmxCpu", vmcs: "Vmcs"):
        self.cpu, self.vmcs, self.caps = cpu, vmcs, cpu.caps
        v = vmcs.get
        self.pin, self.proc = v(F.PIN_BASED_VM_EXEC_CONTROL), v(F.CPU_BASED_VM_EXEC_CONTROL)
        self.proc2 = v(F.SECONDARY_VM_EXEC_CONTROL) if self.proc & ProcBased.ACTIVATE_SECONDARY_CONTROLS else 0
        self.exit_ctl, self.entry_ctl = v(F.VM_EXIT_CONTROLS), v(F.VM_ENTRY_CONTROLS)

    # ---------------------------------------------------------- controls (27.2.1)
    def controls(self) -> Iterable[str]:
        v = self.vmcs.get
        for cls, value, field in ((PinBased, self.pin, "pin-based VM-execution controls"),
                                  (ProcBased, self.proc, "primary processor-based VM-execution controls"),
                                  (ExitControl, self.exit_ctl, "VM-exit controls"),
                                  (EntryControl, self.entry_ctl, "VM-entry controls")):
            yield from self._reserved(cls, value, field)
        if self.proc & ProcBased.ACTIVATE_SECONDARY_CONTROLS:
            yield from self._reserved(ProcBased2, self.proc2, "secondary processor-based VM-execution controls")
        if v(F.CR3_TARGET_COUNT) > self.caps.cr3_targets:
            yield (f"CR3-target count {v(F.CR3_TARGET_COUNT)} exceeds the {self.caps.cr3_targets} "
                   "CR3-target values this CPU supports (IA32_VMX_MISC[24:16])")
        mem = self.cpu.memory
        if self.proc & ProcBased.USE_IO_BITMAPS:
            for f in (F.IO_BITMAP_A, F.IO_BITMAP_B):
                if not mem.valid_address(v(f)):
                    yield f"{f.name} address {v(f):#x} must be 4-KByte aligned and within the physical-address width"
        if self.proc & ProcBased.USE_MSR_BITMAPS and not mem.valid_address(v(F.MSR_BITMAP)):
            yield f"MSR_BITMAP address {v(F.MSR_BITMAP):#x} must be 4-KByte aligned and within the physical-address width"
        if not self.pin & PinBased.NMI_EXITING and self.pin & PinBased.VIRTUAL_NMIS:
            yield "\"virtual NMIs\" requires \"NMI exiting\""
        if self.proc2 & ProcBased2.UNRESTRICTED_GUEST and not self.proc2 & ProcBased2.ENABLE_EPT:
            yield "\"unrestricted guest\" is 1, so \"enable EPT\" must also be 1"
        if self.proc2 & ProcBased2.ENABLE_VPID and v(F.VIRTUAL_PROCESSOR_ID) == 0:
            yield "\"enable VPID\" is 1, so the VPID field must not be 0000H"
        if self.proc2 & ProcBased2.ENABLE_EPT:
            eptp = v(F.EPT_POINTER)
            if eptp & 7 not in (0, 6):
                yield f"EPTP memory type (bits 2:0) must be UC (0) or WB (6); it is {eptp & 7}"
            if (eptp >> 3) & 7 != 3:
                yield f"EPTP bits 5:3 must be 3 (a 4-level page walk); they are {(eptp >> 3) & 7}"
            if eptp & 0xF80 or eptp >> self.cpu.memory.width:
                yield "EPTP reserved bits (11:7 and above the physical-address width) must be 0"
        info = v(F.VM_ENTRY_INTR_INFO_FIELD)
        if info & INTR_INFO_VALID:
            yield from self._event_injection(IntrInfo.decode(info))
        for count in (F.VM_EXIT_MSR_STORE_COUNT, F.VM_EXIT_MSR_LOAD_COUNT, F.VM_ENTRY_MSR_LOAD_COUNT):
            if v(count):
                yield (f"{count.name} is {v(count)}: vtlab's CPU supports no MSR-load/store "
                       "lists (IA32_VMX_MISC[27:25] = 0 means 512 entries on hardware; use 0 here)")

    def _reserved(self, cls, value: int, field: str) -> Iterable[str]:
        must1, must0 = self.caps.allowed(cls).violations(value)
        for bits, verb in ((must1, "must be 1"), (must0, "must be 0")):
            if bits:
                names = ", ".join(flag_names(cls, bits, 32))
                yield f"{field}: {names} {verb} on this CPU (capability MSR allowed-{'0' if verb == 'must be 1' else '1'} settings)"

    def _event_injection(self, info: IntrInfo) -> Iterable[str]:
        if info.type is InterruptionType.RESERVED:
            yield "VM-entry interruption-information: type 1 is reserved"
        if info.type is InterruptionType.NMI and info.vector != 2:
            yield "VM-entry interruption-information: an NMI must have vector 2"
        if info.type is InterruptionType.HARDWARE_EXCEPTION and info.vector > 31:
            yield "VM-entry interruption-information: a hardware exception must have a vector of 0-31"

    # ------------------------------------------------------- host state (27.2.2)
    def host_state(self) -> Iterable[str]:
        v = self.vmcs.get
        yield from self.caps.cr_fixed_violations("cr0", v(F.HOST_CR0))
        yield from self.caps.cr_fixed_violations("cr4", v(F.HOST_CR4))
        if v(F.HOST_CR3) >> self.cpu.memory.width:
            yield "HOST_CR3 sets bits beyond the physical-address width"
        for f in (F.HOST_IA32_SYSENTER_ESP, F.HOST_IA32_SYSENTER_EIP, F.HOST_FS_BASE, F.HOST_GS_BASE,
                  F.HOST_TR_BASE, F.HOST_GDTR_BASE, F.HOST_IDTR_BASE):
            if not _canonical(v(f)):
                yield f"{f.name} ({v(f):#x}) must be canonical"
        if not self.exit_ctl & ExitControl.HOST_ADDR_SPACE_SIZE:
            yield ("the VMM runs in IA-32e mode, so the \"host address-space size\" VM-exit "
                   "control must be 1")
        else:
            if not v(F.HOST_CR4) & Cr4.PAE:
                yield "\"host address-space size\" is 1, so HOST_CR4.PAE must be 1"
            if not _canonical(v(F.HOST_RIP)):
                yield f"HOST_RIP ({v(F.HOST_RIP):#x}) must be canonical"
        for seg in ("ES", "CS", "SS", "DS", "FS", "GS", "TR"):
            sel = v(F[f"HOST_{seg}_SELECTOR"])
            if sel & 7:
                yield f"HOST_{seg}_SELECTOR ({sel:#x}): RPL and TI (bits 2:0) must be 0"
        if v(F.HOST_CS_SELECTOR) == 0:
            yield "HOST_CS_SELECTOR must not be 0000H"
        if v(F.HOST_TR_SELECTOR) == 0:
            yield "HOST_TR_SELECTOR must not be 0000H"

    # ----------------------------------------------------- guest state (27.3.1)
    def guest_state(self) -> Iterable[tuple[str, int]]:
        v = self.vmcs.get
        unrestricted = bool(self.proc2 & ProcBased2.UNRESTRICTED_GUEST)
        ia32e = bool(self.entry_ctl & EntryControl.IA32E_MODE)
        cr0, cr4, rflags = v(F.GUEST_CR0), v(F.GUEST_CR4), v(F.GUEST_RFLAGS)
        for msg in self.caps.cr_fixed_violations("cr0", cr0, unrestricted):
            yield (f"GUEST_{msg}" + ("" if unrestricted else
                   " (only an unrestricted guest may run with PE or PG clear)"), 0)
        if cr0 & Cr0.PG and not cr0 & Cr0.PE:
            yield "GUEST_CR0.PG is 1, so GUEST_CR0.PE must be 1 (paging needs protected mode)", 0
        for msg in self.caps.cr_fixed_violations("cr4", cr4):
            yield f"GUEST_{msg}", 0
        if ia32e and not (cr0 & Cr0.PG and cr4 & Cr4.PAE):
            yield "\"IA-32e mode guest\" is 1, so GUEST_CR0.PG and GUEST_CR4.PAE must be 1", 0
        if not ia32e and cr4 & Cr4.PCIDE:
            yield "\"IA-32e mode guest\" is 0, so GUEST_CR4.PCIDE must be 0", 0
        if v(F.GUEST_CR3) >> self.cpu.memory.width:
            yield "GUEST_CR3 sets bits beyond the physical-address width", 0
        if self.entry_ctl & EntryControl.LOAD_DEBUG_CONTROLS and v(F.GUEST_DR7) >> 32:
            yield "GUEST_DR7 bits 63:32 must be 0", 0
        for f in (F.GUEST_SYSENTER_ESP, F.GUEST_SYSENTER_EIP):
            if not _canonical(v(f)):
                yield f"{f.name} must be canonical", 0
        if self.entry_ctl & EntryControl.LOAD_IA32_EFER:
            efer = v(F.GUEST_IA32_EFER)
            if bool(efer & Efer.LMA) != ia32e:
                yield "GUEST_IA32_EFER.LMA must equal the \"IA-32e mode guest\" VM-entry control", 0
            if cr0 & Cr0.PG and bool(efer & Efer.LMA) != bool(efer & Efer.LME):
                yield "GUEST_CR0.PG is 1, so GUEST_IA32_EFER.LMA must equal LME", 0
        # RFLAGS (27.3.1.4)
        if rflags >> 22 or rflags & ((1 << 15) | (1 << 5) | (1 << 3)):
            yield f"GUEST_RFLAGS reserved bits (63:22, 15, 5, 3) must be 0 (RFLAGS = {rflags:#x})", 0
        if not rflags & 2:
            yield f"GUEST_RFLAGS bit 1 must be 1 (RFLAGS = {rflags:#x}); it is reserved and always set", 0
        v8086 = bool(rflags & (1 << 17))
        if v8086 and (ia32e or not cr0 & Cr0.PE):
            yield "GUEST_RFLAGS.VM must be 0 in IA-32e mode or when CR0.PE is 0", 0
        info = v(F.VM_ENTRY_INTR_INFO_FIELD)
        if info & INTR_INFO_VALID and IntrInfo.decode(info).type is InterruptionType.EXTERNAL_INTERRUPT \
                and not rflags & (1 << 9):
            yield "injecting an external interrupt requires GUEST_RFLAGS.IF = 1", 0
        # RIP (27.3.1.4)
        cs_ar = v(F.GUEST_CS_AR_BYTES)
        if not (ia32e and cs_ar & (1 << 13)) and v(F.GUEST_RIP) >> 32:
            yield "GUEST_RIP bits 63:32 must be 0 unless the guest runs 64-bit code (IA-32e mode, CS.L = 1)", 0
        # Segments (27.3.1.2)
        cs_dpl = (cs_ar >> 5) & 3
        for name in ("CS", "SS", "DS", "ES", "FS", "GS"):
            sel, base, limit, ar = _seg(self.vmcs, name)
            for msg in _seg_ar_problems(name, sel, limit, ar, unrestricted, cs_dpl, v8086):
                yield f"GUEST_{name}: {msg}", 0
            if v8086 and base != sel << 4:
                yield f"GUEST_{name}_BASE must be selector << 4 in virtual-8086 mode", 0
        tr_sel, tr_base, tr_limit, tr_ar = _seg(self.vmcs, "TR")
        if tr_sel & 4:
            yield "GUEST_TR_SELECTOR TI flag (bit 2) must be 0", 0
        if tr_ar & (1 << 16):
            yield "GUEST_TR must be usable (access rights bit 16 clear)", 0
        elif (tr_ar & 0xF) not in ((11,) if ia32e else (3, 11)) or tr_ar & 0x10 or not tr_ar & 0x80:
            yield (f"GUEST_TR access rights {tr_ar:#x}: TR must be a present busy TSS (type 11"
                   f"{', or 3 for a 16-bit TSS' if not ia32e else ''}), S = 0", 0)
        ldtr_sel, _, _, ldtr_ar = _seg(self.vmcs, "LDTR")
        if not ldtr_ar & (1 << 16) and ((ldtr_ar & 0xF) != 2 or ldtr_ar & 0x10 or not ldtr_ar & 0x80):
            yield "GUEST_LDTR is usable, so it must be a present LDT descriptor (type 2, S = 0)", 0
        for t in ("GDTR", "IDTR"):
            if v(F[f"GUEST_{t}_LIMIT"]) >> 16:
                yield f"GUEST_{t}_LIMIT bits 31:16 must be 0", 0
            if not _canonical(v(F[f"GUEST_{t}_BASE"])):
                yield f"GUEST_{t}_BASE must be canonical", 0
        # Non-register state (27.3.1.5)
        activity = v(F.GUEST_ACTIVITY_STATE)
        if activity > 3:
            yield f"GUEST_ACTIVITY_STATE {activity} is not a valid activity state (0-3)", 0
        elif activity == 1 and (v(F.GUEST_SS_AR_BYTES) >> 5) & 3 != 0:
            yield "the HLT activity state requires SS.DPL = 0", 0
        if v(F.GUEST_INTERRUPTIBILITY_INFO) & ~0x1F:
            yield "GUEST_INTERRUPTIBILITY_INFO reserved bits 31:5 must be 0", 0
        if v(F.VMCS_LINK_POINTER) != INVALID_POINTER:
            yield (f"VMCS_LINK_POINTER is {v(F.VMCS_LINK_POINTER):#x}; without VMCS shadowing it "
                   "must be FFFFFFFF_FFFFFFFFH", 4)


def _canonical_rule(field: F) -> Callable[["Vmcs"], list[Violation]]:
    def rule(vmcs: "Vmcs") -> list[Violation]:
        if _canonical(vmcs.get(field)):
            return []
        return [Violation("guest-state", "27.3.1", f"{field.name} must be canonical")]
    return rule


#: Guest-state fields whose only VM-entry rule involves nothing but the field itself.  When
#: the VMM wrote just these since the last full check (a WRMSR of IA32_SYSENTER_ESP, a
#: MOV to CR3 ...), VM entry re-checks only them, with the very same messages.
LOCAL_RULES: dict[int, Callable[["Vmcs"], list[Violation]]] = {
    int(F.GUEST_SYSENTER_ESP): _canonical_rule(F.GUEST_SYSENTER_ESP),
    int(F.GUEST_SYSENTER_EIP): _canonical_rule(F.GUEST_SYSENTER_EIP),
    int(F.GUEST_SYSENTER_CS): lambda vmcs: [],
    int(F.GUEST_RSP): lambda vmcs: [],
}


def entry_violations(cpu: "VmxCpu", vmcs: "Vmcs") -> list[Violation]:
    """Every VM-entry rule the current VMCS breaks, in the order the CPU checks them."""
    c = Checker(cpu, vmcs)
    out = [Violation("controls", "27.2.1", m) for m in c.controls()]
    out += [Violation("host-state", "27.2.2", m) for m in c.host_state()]
    out += [Violation("guest-state", "27.3.1", m, q) for m, q in c.guest_state()]
    return out

"""VM-entry checks on guest non-register state (SDM 27.3.1.5): activity state,
interruptibility state, pending debug exceptions and the VMCS link pointer; and on the
guest's PDPTEs (SDM 27.3.1.6).  A failure is a VM-entry failure, exit reason 33 | bit 31;
the VMCS link pointer has its own exit qualification, 4, and the PDPTEs theirs, 2 (SDM 27.8).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ...arch.controls import PinBased, ProcBased2
from ...arch.exceptions import InterruptionType as T, Vector
from ...arch.msrs import Cr0, Cr4, Rflags
from ...arch.vmcs_fields import VmcsField as F
from ..vmcs import INVALID_POINTER
from .registry import SECONDARY_READS, Reader, both, ia32e_guest, rule, secondary_controls, set_bits, write

if TYPE_CHECKING:
    from ..vmx import VmxCpu

guest = functools.partial(rule, "guest-state")

_ACTIVITY, _BLOCKING = F.GUEST_ACTIVITY_STATE, F.GUEST_INTERRUPTIBILITY_INFO
_INFO, _PENDING = F.VM_ENTRY_INTR_INFO_FIELD, F.GUEST_PENDING_DBG_EXCEPTIONS
_PIN, _VIRTUAL_NMIS = F.PIN_BASED_VM_EXEC_CONTROL, int(PinBased.VIRTUAL_NMIS)
#: Activity states (SDM 25.4.2) and the IA32_VMX_MISC bit that reports each (SDM A.6).
ACTIVE, HLT, SHUTDOWN, WAIT_FOR_SIPI = range(4)
ACTIVITY_NAMES = {ACTIVE: "active", HLT: "HLT", SHUTDOWN: "shutdown", WAIT_FOR_SIPI: "wait-for-SIPI"}
MISC_ACTIVITY_BIT = {HLT: 1 << 6, SHUTDOWN: 1 << 7, WAIT_FOR_SIPI: 1 << 8}
#: Interruptibility-state bits (SDM 25.4.2, Table 25-3).
BLOCKING_BY_STI, BLOCKING_BY_MOV_SS, BLOCKING_BY_SMI, BLOCKING_BY_NMI, ENCLAVE_INTERRUPTION = (1 << b for b in range(5))
RFLAGS_TF, RFLAGS_IF = int(Rflags.TF), int(Rflags.IF)   # plain ints: the rules re-run on VM entries
DEBUGCTL_BTF = 1 << 1
#: Pending debug exceptions (SDM 25.4.2, Table 25-4): B3-B0 (3:0), enabled breakpoint (12),
#: BS (14), RTM (16).  Everything else is reserved.
PENDING_BS, PENDING_RTM = 1 << 14, 1 << 16
PENDING_RESERVED = 0xFF0 | 1 << 13 | 1 << 15 | (~0x1FFFF & 0xFFFF_FFFF_FFFF_FFFF)


def _injected(get: Reader) -> tuple[int, int] | None:
    """(type, vector) of the event VM entry injects, or None if the valid bit is 0."""
    info = get(_INFO)
    return ((info >> 8) & 7, info & 0xFF) if info >> 31 & 1 else None


# ------------------------------------------------------------ activity state
@guest("guest_activity_state_valid", "27.3.1.5", reads={_ACTIVITY}, processor=True,
       breaks=write(_ACTIVITY, SHUTDOWN))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The activity-state field must contain a value in the range 0-3 that the processor
    supports: active (0) always; HLT (1), shutdown (2) and wait-for-SIPI (3) if IA32_VMX_MISC
    bits 6, 7 and 8 say so (vtlab's CPU supports HLT only)."""
    activity = get(_ACTIVITY)
    if activity == ACTIVE:
        return []
    if activity > 3:
        return [f"GUEST_ACTIVITY_STATE {activity} is not an activity state (0-3)"]
    if not cpu.caps.misc & MISC_ACTIVITY_BIT[activity]:
        return [f"GUEST_ACTIVITY_STATE {activity} ({ACTIVITY_NAMES[activity]}) is not supported: "
                f"IA32_VMX_MISC bit {MISC_ACTIVITY_BIT[activity].bit_length() - 1} is 0"]
    return []


@guest("guest_hlt_requires_ss_dpl_0", "27.3.1.5", reads={_ACTIVITY, F.GUEST_SS_AR_BYTES},
       breaks=both(write(_ACTIVITY, HLT), set_bits(F.GUEST_SS_AR_BYTES, 3 << 5)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The activity-state field must not indicate the HLT state (1) if the DPL in the SS
    access-rights field (the CPL) is not 0: only ring-0 code can execute HLT."""
    if get(_ACTIVITY) == HLT and (get(F.GUEST_SS_AR_BYTES) >> 5) & 3 != 0:
        return ["the HLT activity state requires SS.DPL = 0"]
    return []


@guest("guest_activity_active_when_blocking", "27.3.1.5", reads={_ACTIVITY, _BLOCKING},
       breaks=both(write(_ACTIVITY, HLT), write(_BLOCKING, BLOCKING_BY_MOV_SS)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The activity-state field must indicate the active state if the interruptibility-
    state field indicates blocking by STI or by MOV SS (bit 0 or bit 1 is 1)."""
    if get(_ACTIVITY) != ACTIVE and get(_BLOCKING) & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS):
        return ["blocking by STI or MOV SS (GUEST_INTERRUPTIBILITY_INFO bits 1:0) requires the "
                "active activity state"]
    return []


def _allowed_in(activity: int, type_: int, vector: int) -> bool:
    """May VM entry inject this event into a guest in ``activity``?  (SDM 27.3.1.5)"""
    if activity == ACTIVE:
        return True
    if activity == HLT:   # external interrupt, NMI, #DB, #MC, pending MTF VM exit
        return (type_ in (T.EXTERNAL_INTERRUPT, T.NMI) or (type_ == T.HARDWARE_EXCEPTION and vector in (Vector.DB, Vector.MC))
                or (type_ == T.OTHER_EVENT and vector == 0))
    if activity == SHUTDOWN:   # NMI and machine check
        return type_ == T.NMI or (type_ == T.HARDWARE_EXCEPTION and vector == Vector.MC)
    return False   # wait-for-SIPI: nothing


@guest("guest_activity_allows_injected_event", "27.3.1.5", reads={_ACTIVITY, _INFO},
       breaks=both(write(_ACTIVITY, HLT), write(_INFO, (1 << 31) | (3 << 8) | 6)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the VM-entry interruption-information valid bit is 1, the event must not be one
    the activity state would block.  Active: any.  HLT: external interrupts, NMIs,
    hardware exceptions 1 (#DB) and 18 (#MC), and other event 0 (pending MTF VM exit).
    Shutdown: NMIs and machine checks.  Wait-for-SIPI: none."""
    event = _injected(get)
    if event is not None:
        activity = get(_ACTIVITY)
        if not _allowed_in(activity, *event):
            return [f"the {ACTIVITY_NAMES.get(activity, activity)} activity state blocks the injected "
                    f"event (type {event[0]}, vector {event[1]})"]
    return []


# ------------------------------------------------------ interruptibility state
@guest("guest_interruptibility_reserved", "27.3.1.5", reads={_BLOCKING}, breaks=set_bits(_BLOCKING, 1 << 5))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Reserved bits 31:5 of the interruptibility-state field must be 0."""
    if get(_BLOCKING) & ~0x1F:
        return ["GUEST_INTERRUPTIBILITY_INFO reserved bits 31:5 must be 0"]
    return []


@guest("guest_interruptibility_sti_and_mov_ss", "27.3.1.5", reads={_BLOCKING},
       breaks=write(_BLOCKING, BLOCKING_BY_STI | BLOCKING_BY_MOV_SS))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The interruptibility-state field cannot indicate blocking by both STI and MOV SS
    (bits 0 and 1 cannot both be 1)."""
    if get(_BLOCKING) & 3 == 3:
        return ["GUEST_INTERRUPTIBILITY_INFO: blocking by STI and by MOV SS cannot both be 1"]
    return []


@guest("guest_interruptibility_sti_requires_if", "27.3.1.5", reads={_BLOCKING, F.GUEST_RFLAGS},
       breaks=write(_BLOCKING, BLOCKING_BY_STI))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Bit 0 (blocking by STI) must be 0 if the IF flag (bit 9) is 0 in the RFLAGS field:
    STI blocks interrupts only when it sets IF."""
    if get(_BLOCKING) & BLOCKING_BY_STI and not get(F.GUEST_RFLAGS) & RFLAGS_IF:
        return ["GUEST_INTERRUPTIBILITY_INFO: blocking by STI requires GUEST_RFLAGS.IF = 1"]
    return []


@guest("guest_interruptibility_external_interrupt", "27.3.1.5", reads={_BLOCKING, _INFO},
       breaks=both(set_bits(F.GUEST_RFLAGS, RFLAGS_IF), write(_INFO, (1 << 31) | 0x20),
                   write(_BLOCKING, BLOCKING_BY_MOV_SS)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Bit 0 (blocking by STI) and bit 1 (blocking by MOV SS) must both be 0 if VM entry
    injects an external interrupt (valid bit 1, interruption type 0)."""
    if get(_BLOCKING) & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS):
        event = _injected(get)
        if event is not None and event[0] == 0:
            return ["injecting an external interrupt requires no blocking by STI or MOV SS"]
    return []


@guest("guest_interruptibility_nmi_mov_ss", "27.3.1.5", reads={_BLOCKING, _INFO},
       breaks=both(write(_INFO, (1 << 31) | (2 << 8) | 2), write(_BLOCKING, BLOCKING_BY_MOV_SS)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Bit 1 (blocking by MOV SS) must be 0 if VM entry injects an NMI (valid bit 1,
    interruption type 2)."""
    if get(_BLOCKING) & BLOCKING_BY_MOV_SS:
        event = _injected(get)
        if event is not None and event[0] == 2:
            return ["injecting an NMI requires no blocking by MOV SS"]
    return []


@guest("guest_interruptibility_nmi_virtual_nmis", "27.3.1.5", reads={_BLOCKING, _INFO, _PIN},
       breaks=both(set_bits(_PIN, PinBased.NMI_EXITING | PinBased.VIRTUAL_NMIS),
                   write(_INFO, (1 << 31) | (2 << 8) | 2), write(_BLOCKING, BLOCKING_BY_NMI)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Bit 3 (blocking by NMI) must be 0 if the "virtual NMIs" control is 1 and VM entry
    injects an NMI (valid bit 1, interruption type 2): the virtual NMI being injected
    cannot already be blocked."""
    if get(_BLOCKING) & BLOCKING_BY_NMI and get(_PIN) & _VIRTUAL_NMIS:
        event = _injected(get)
        if event is not None and event[0] == 2:
            return ["injecting a virtual NMI requires no blocking by NMI (bit 3)"]
    return []


@guest("guest_interruptibility_smi", "27.3.1.5", reads={_BLOCKING}, breaks=write(_BLOCKING, BLOCKING_BY_SMI))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Bit 2 (blocking by SMI) must be 0 if the processor is not in SMM (vtlab's never is)."""
    if get(_BLOCKING) & BLOCKING_BY_SMI:
        return ["GUEST_INTERRUPTIBILITY_INFO: blocking by SMI (bit 2) must be 0 outside SMM"]
    return []


@guest("guest_interruptibility_enclave", "27.3.1.5", reads={_BLOCKING},
       breaks=write(_BLOCKING, ENCLAVE_INTERRUPTION))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If bit 4 (enclave interruption) is 1, bit 1 (blocking by MOV SS) must be 0 and the
    processor must support SGX (CPUID.(EAX=07H,ECX=0):EBX.SGX[bit 2] = 1).  vtlab's CPU
    has no SGX, so bit 4 must be 0."""
    if get(_BLOCKING) & ENCLAVE_INTERRUPTION:
        return ["GUEST_INTERRUPTIBILITY_INFO: enclave interruption (bit 4) needs SGX, which this "
                "CPU does not support"]
    return []


# -------------------------------------------------- pending debug exceptions
@guest("guest_pending_debug_reserved", "27.3.1.5", reads={_PENDING}, breaks=set_bits(_PENDING, 1 << 4))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Bits 11:4, bit 13, bit 15 and bits 63:17 of the pending-debug-exceptions field are
    reserved and must be 0."""
    if get(_PENDING) & PENDING_RESERVED:
        return [f"GUEST_PENDING_DBG_EXCEPTIONS {get(_PENDING):#x}: reserved bits (11:4, 13, 15, "
                "63:17) must be 0"]
    return []


def _single_step_pending(get: Reader) -> bool | None:
    """Whether BS must be 1 (True) or 0 (False) when the BS rules apply - blocking by STI or
    MOV SS, or the HLT state - else None.  BS must be 1 exactly when RFLAGS.TF = 1 and
    IA32_DEBUGCTL.BTF = 0: a single-step trap is then pending past the blocking."""
    if not (get(_BLOCKING) & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) or get(_ACTIVITY) == HLT):
        return None
    return bool(get(F.GUEST_RFLAGS) & RFLAGS_TF) and not get(F.GUEST_IA32_DEBUGCTL) & DEBUGCTL_BTF


_BS_READS = {_PENDING, _BLOCKING, _ACTIVITY, F.GUEST_RFLAGS, F.GUEST_IA32_DEBUGCTL}


@guest("guest_pending_debug_bs_set", "27.3.1.5", reads=_BS_READS,
       breaks=both(write(_ACTIVITY, HLT), set_bits(F.GUEST_RFLAGS, RFLAGS_TF)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the interruptibility state indicates blocking by STI or MOV SS, or the activity
    state is HLT: bit 14 (BS) of the pending debug exceptions must be 1 if RFLAGS.TF (bit 8)
    is 1 and IA32_DEBUGCTL.BTF (bit 1) is 0."""
    if _single_step_pending(get) and not get(_PENDING) & PENDING_BS:
        return ["RFLAGS.TF = 1 and DEBUGCTL.BTF = 0 with STI/MOV-SS blocking or in HLT: "
                "GUEST_PENDING_DBG_EXCEPTIONS.BS (bit 14) must be 1"]
    return []


@guest("guest_pending_debug_bs_clear", "27.3.1.5", reads=_BS_READS,
       breaks=both(write(_ACTIVITY, HLT), write(_PENDING, PENDING_BS)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the interruptibility state indicates blocking by STI or MOV SS, or the activity
    state is HLT: bit 14 (BS) of the pending debug exceptions must be 0 if RFLAGS.TF is 0
    or IA32_DEBUGCTL.BTF is 1."""
    if _single_step_pending(get) is False and get(_PENDING) & PENDING_BS:
        return ["RFLAGS.TF = 0 or DEBUGCTL.BTF = 1 with STI/MOV-SS blocking or in HLT: "
                "GUEST_PENDING_DBG_EXCEPTIONS.BS (bit 14) must be 0"]
    return []


@guest("guest_pending_debug_rtm", "27.3.1.5", reads={_PENDING}, breaks=write(_PENDING, PENDING_RTM | 1 << 12))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If bit 16 (RTM) of the pending debug exceptions is 1: bits 11:0, 15:13 and 63:17
    must be 0, bit 12 must be 1, blocking by MOV SS must be 0 - and the processor must
    support RTM (CPUID.(EAX=07H,ECX=0):EBX[bit 11]).  vtlab's CPU has no RTM, so bit 16
    must be 0."""
    if get(_PENDING) & PENDING_RTM:
        return ["GUEST_PENDING_DBG_EXCEPTIONS.RTM (bit 16) needs RTM, which this CPU does not support"]
    return []


# ------------------------------------------------------ VMCS link pointer
# Checked only if the field is not FFFFFFFF_FFFFFFFFH; every failure has exit
# qualification 4 (SDM 27.8).
_LINK = F.VMCS_LINK_POINTER
link_rule = functools.partial(guest, qualification=4)


def _link(get: Reader) -> int | None:
    """The VMCS link pointer, or None if it is FFFFFFFF_FFFFFFFFH (then nothing is checked)."""
    link = get(_LINK)
    return None if link == INVALID_POINTER else link


def _linked_revision(get: Reader, cpu: "VmxCpu") -> int | None:
    """The first 32 bits of the 4-KByte region the link pointer names, or None if it names
    none (the pointer is FFFFFFFF_FFFFFFFFH, unaligned or beyond the physical-address
    width: the other rules report that)."""
    link = _link(get)
    if link is None or link & 0xFFF or link >> cpu.memory.width:
        return None
    return cpu.memory.read_u32(link)


@link_rule("vmcs_link_pointer_alignment", "27.3.1.5", reads={_LINK}, breaks=write(_LINK, 0x1_0000_0800))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the VMCS link pointer is not FFFFFFFF_FFFFFFFFH, bits 11:0 must be 0: it names a
    4-KByte VMCS region."""
    link = _link(get)
    if link is not None and link & 0xFFF:
        return [f"VMCS_LINK_POINTER {link:#x}: bits 11:0 must be 0 (or the field FFFFFFFF_FFFFFFFFH)"]
    return []


@link_rule("vmcs_link_pointer_width", "27.3.1.5", reads={_LINK}, processor=True, breaks=write(_LINK, 1 << 40))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the VMCS link pointer is not FFFFFFFF_FFFFFFFFH, it must not set any bit beyond
    the processor's physical-address width."""
    link = _link(get)
    if link is not None and link >> cpu.memory.width:
        return [f"VMCS_LINK_POINTER {link:#x} sets bits beyond the physical-address width "
                f"({cpu.memory.width} bits)"]
    return []


@link_rule("vmcs_link_pointer_revision", "27.3.1.5", reads={_LINK}, processor=True,
           breaks=lambda vm: vm.vmwrite(_LINK, vm.vmread(F.IO_BITMAP_A)))   # a zeroed page
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the VMCS link pointer is not FFFFFFFF_FFFFFFFFH, bits 30:0 of the 4 bytes it
    points to (in physical memory) must be the processor's VMCS revision identifier
    (IA32_VMX_BASIC[30:0]).  VM entry reads them on every check of this rule: when the
    field, the capabilities or the physical-address width change."""
    first = _linked_revision(get, cpu)
    if first is not None and first & 0x7FFF_FFFF != cpu.caps.revision_id:
        return [f"the region VMCS_LINK_POINTER names ({get(_LINK):#x}) holds revision identifier "
                f"{first & 0x7FFF_FFFF:#x}, not the CPU's {cpu.caps.revision_id:#x}"]
    return []


def _shadow_region(vm) -> None:
    """Recipe: point the link pointer at a region with the right revision and bit 31 set."""
    page = vm.cpu.memory.alloc()
    vm.cpu.memory.write_u32(page, vm.cpu.caps.revision_id | 1 << 31)
    vm.vmwrite(_LINK, page)


@link_rule("vmcs_link_pointer_shadow_indicator", "27.3.1.5", reads={_LINK} | SECONDARY_READS, processor=True,
           breaks=_shadow_region)
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the VMCS link pointer is not FFFFFFFF_FFFFFFFFH, bit 31 of the 4 bytes it points
    to must equal the "VMCS shadowing" VM-execution control: the linked VMCS is a shadow
    VMCS exactly when VMCS shadowing is on (never, on vtlab's CPU)."""
    first = _linked_revision(get, cpu)
    if first is not None:
        shadowing = bool(secondary_controls(get) & ProcBased2.SHADOW_VMCS)
        if bool(first >> 31) != shadowing:
            return [f"the region VMCS_LINK_POINTER names has shadow-VMCS indicator (bit 31) "
                    f"{first >> 31}; \"VMCS shadowing\" is {int(shadowing)}"]
    return []


@link_rule("vmcs_link_pointer_not_current", "27.3.1.5", reads={_LINK},
           breaks=lambda vm: vm.vmwrite(_LINK, vm.vmcs_address))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the VMCS link pointer is not FFFFFFFF_FFFFFFFFH and the processor is not in SMM
    (vtlab's never is), it must not contain the current-VMCS pointer."""
    link = _link(get)
    if link is not None and link == cpu.current_vmcs_pointer:
        return [f"VMCS_LINK_POINTER {link:#x} is the current VMCS"]
    return []


# ------------------------------------------------------------ PDPTEs (27.3.1.6)
_PDPTES = (F.GUEST_PDPTR0, F.GUEST_PDPTR1, F.GUEST_PDPTR2, F.GUEST_PDPTR3)
PDPTE_RESERVED = 0b1_1110_0110   # bits 8:5 and 2:1 (SDM Vol. 3A 4.4.1, Table 4-8)


@guest("guest_pdptes_valid", "27.3.1.6", qualification=2, processor=True,
       reads={F.GUEST_CR0, F.GUEST_CR4, F.VM_ENTRY_CONTROLS, *_PDPTES} | SECONDARY_READS, mode="paged",
       breaks=both(set_bits(F.GUEST_CR4, Cr4.PAE), write(F.GUEST_PDPTR2, 0x1000 | 1 << 1 | 1)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """If the guest will use PAE paging (CR0.PG = 1 and CR4.PAE = 1 in their fields,
    "IA-32e mode guest" 0) and "enable EPT" is 1, the PDPTE fields must pass the checks of
    MOV to CR3: a present PDPTE (bit 0 = 1) sets no reserved bit (2:1, 8:5, or beyond the
    physical-address width).  (With EPT off the PDPTEs come from guest memory at CR3;
    vtlab's CPU does not check those.)"""
    if not (get(F.GUEST_CR0) & Cr0.PG and get(F.GUEST_CR4) & Cr4.PAE) or ia32e_guest(get):
        return []
    if not secondary_controls(get) & ProcBased2.ENABLE_EPT:
        return []
    width = cpu.memory.width
    bad = [i for i, f in enumerate(_PDPTES)
           if get(f) & 1 and (get(f) & PDPTE_RESERVED or get(f) >> width)]
    if bad:
        return [f"GUEST_PDPTR{i} {get(_PDPTES[i]):#x}: a present PDPTE sets reserved bits (2:1, 8:5 or "
                f"beyond the physical-address width)" for i in bad]
    return []

"""INVEPT and INVVPID in VMX root operation (SDM Vol. 3C 31.3, 29.4.3).

Both take a type in a register and a 128-bit descriptor in memory; vtlab's
:meth:`vtlab.cpu.vmx.VmxCpu.invept` / :meth:`~vtlab.cpu.vmx.VmxCpu.invvpid` take them as
arguments.  The checks follow the instructions' pseudo-code in its order:

* INVEPT: a type whose IA32_VMX_EPT_VPID_CAP bit (type + 24: bit 25 single-context,
  bit 26 all-context) is 0 is VMfail "invalid operand to INVEPT/INVVPID" (error 28);
  single-context with an EPTP that would fail the VM-entry checks on EPTP (SDM 27.2.1.1)
  is error 28 as well; otherwise the guest-physical and combined mappings of that EP4TA
  (all-context: of every EP4TA) are invalidated.
* INVVPID: a type whose capability bit (type + 40) is 0, or descriptor bits 63:16 not 0,
  is error 28; individual-address with VPID 0 or a non-canonical linear address, and
  single-context (retaining globals or not) with VPID 0, are error 28.

In non-root operation both cause VM exits (50, 53; :mod:`vtlab.cpu.exit_rules`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import unicorn

from ..arch.controls import ProcBased, ProcBased2
from ..arch.ept import INVEPT_TYPE_CAP, INVVPID_TYPE_CAP, EptVpidCap, InveptType, InvvpidType
from ..arch.errors import VmInstructionError
from ..arch.exceptions import Vector
from ..arch.msrs import Msr
from ..arch.vmcs_fields import VmcsField as F
from .entry.registry import canonical, get_rule

if TYPE_CHECKING:
    from .outcome import VmxOutcome
    from .vmx import VmxCpu

_INVALID = VmInstructionError.INVALID_OPERAND_TO_INVEPT_INVVPID
#: The VM-entry rules on the EPTP value (SDM 27.2.1.1) that single-context INVEPT applies.
EPTP_RULES = ("ept_pointer_memory_type", "ept_pointer_walk_length", "ept_pointer_accessed_dirty",
              "ept_pointer_reserved")


class _EptpOnly:
    """A VMCS reader that holds only an EPTP with "enable EPT" on (for the EPTP rules)."""

    def __init__(self, eptp: int):
        self.values = {F.CPU_BASED_VM_EXEC_CONTROL: int(ProcBased.ACTIVATE_SECONDARY_CONTROLS),
                       F.SECONDARY_VM_EXEC_CONTROL: int(ProcBased2.ENABLE_EPT), F.EPT_POINTER: eptp}

    def get(self, field: F) -> int:
        return self.values.get(F(field), 0)


def eptp_problems(cpu: "VmxCpu", eptp: int) -> list[str]:
    """What VM entry would say of ``eptp`` (empty: it is a valid EPTP here)."""
    reader = _EptpOnly(eptp)
    return [m for rid in EPTP_RULES for m in get_rule(rid).check(cpu, reader)]


def _unsupported(cpu: "VmxCpu", insn: str, offered: int) -> "VmxOutcome | None":
    bad = cpu._common_checks(insn)
    if bad is not None:
        return bad
    if not cpu.caps.msr_exists(Msr.IA32_VMX_EPT_VPID_CAP) or not cpu.caps.ept_vpid_cap & offered:
        return cpu._fault(insn, Vector.UD, f"this processor does not support {insn} "
                          f"(IA32_VMX_EPT_VPID_CAP bit {offered.bit_length() - 1} is 0)")
    return None


def invept(cpu: "VmxCpu", type_: int, eptp: int = 0) -> "VmxOutcome":
    """INVEPT ``type_`` with descriptor EPTP ``eptp`` (SDM 31.3 "INVEPT")."""
    bad = _unsupported(cpu, "INVEPT", EptVpidCap.INVEPT)
    if bad is not None:
        return bad
    try:
        kind = InveptType(type_)
    except ValueError:
        return cpu._fail("INVEPT", _INVALID, f"INVEPT type {type_} does not exist (1 single-context, "
                         "2 all-context): invalid operand to INVEPT/INVVPID")
    if not cpu.caps.ept_vpid_cap & INVEPT_TYPE_CAP[kind]:
        return cpu._fail("INVEPT", _INVALID, f"{kind.name} INVEPT is not offered "
                         f"(IA32_VMX_EPT_VPID_CAP[{INVEPT_TYPE_CAP[kind].bit_length() - 1}] = 0)")
    ept = cpu.monitor.ept if cpu.monitor is not None else None
    if kind is InveptType.SINGLE_CONTEXT:
        problems = eptp_problems(cpu, eptp)
        if problems:
            return cpu._fail("INVEPT", _INVALID, f"single-context INVEPT with EPTP {eptp:#x}, which VM "
                             f"entry would refuse: {problems[0]}")
        if ept is not None:
            ept.invalidate(eptp & ~0xFFF & ((1 << 52) - 1))
        return cpu._succeed("INVEPT", f"invalidated the mappings of EP4TA {eptp & ~0xFFF:#x}")
    if ept is not None:
        ept.invalidate(None)
    return cpu._succeed("INVEPT", "invalidated the mappings of every EP4TA")


def invvpid(cpu: "VmxCpu", type_: int, vpid: int = 0, linear: int = 0) -> "VmxOutcome":
    """INVVPID ``type_`` with descriptor (``vpid`` in bits 63:0 - only 15:0 may be set -,
    ``linear`` in bits 127:64) (SDM 31.3 "INVVPID")."""
    bad = _unsupported(cpu, "INVVPID", EptVpidCap.INVVPID)
    if bad is not None:
        return bad
    try:
        kind = InvvpidType(type_)
    except ValueError:
        return cpu._fail("INVVPID", _INVALID, f"INVVPID type {type_} does not exist (0-3): invalid "
                         "operand to INVEPT/INVVPID")
    if not cpu.caps.ept_vpid_cap & INVVPID_TYPE_CAP[kind]:
        return cpu._fail("INVVPID", _INVALID, f"{kind.name} INVVPID is not offered "
                         f"(IA32_VMX_EPT_VPID_CAP[{INVVPID_TYPE_CAP[kind].bit_length() - 1}] = 0)")
    if vpid >> 16:
        return cpu._fail("INVVPID", _INVALID, f"INVVPID descriptor bits 63:16 must be 0 (got {vpid:#x})")
    if kind is not InvvpidType.ALL_CONTEXT and vpid == 0:
        return cpu._fail("INVVPID", _INVALID, f"{kind.name} INVVPID of VPID 0000H (the VMM's own) "
                         "is an invalid operand")
    if kind is InvvpidType.INDIVIDUAL_ADDRESS and not canonical(linear):
        return cpu._fail("INVVPID", _INVALID, f"linear address {linear:#x} is not canonical")
    # Linear and combined mappings are QEMU's TLB (one for every VPID): every INVVPID that
    # passes its checks flushes it, which drops at least what the type asks for.
    if cpu.guest is not None:
        cpu.guest.uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)   # QEMU's TLB
    return cpu._succeed("INVVPID", f"{kind.name.lower().replace('_', '-')} invalidation")

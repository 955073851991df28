"""VM-entry checks on guest non-register state (SDM 27.3.1.5): activity state,
interruptibility state and the VMCS link pointer.  A failure is a VM-entry failure, exit
reason 33 | bit 31; the VMCS link pointer has its own exit qualification, 4 (SDM 27.8).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ...arch.vmcs_fields import VmcsField as F
from ..vmcs import INVALID_POINTER
from .registry import Reader, both, rule, set_bits, write

if TYPE_CHECKING:
    from ..vmx import VmxCpu

guest = functools.partial(rule, "guest-state")


@guest("guest_activity_state_valid", "27.3.1.5", reads={F.GUEST_ACTIVITY_STATE},
       breaks=write(F.GUEST_ACTIVITY_STATE, 4))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The activity-state field must contain a value in the range 0-3: active (0), HLT (1),
    shutdown (2) or wait-for-SIPI (3)."""
    activity = get(F.GUEST_ACTIVITY_STATE)
    if activity > 3:
        return [f"GUEST_ACTIVITY_STATE {activity} is not a valid activity state (0-3)"]
    return []


@guest("guest_hlt_requires_ss_dpl_0", "27.3.1.5", reads={F.GUEST_ACTIVITY_STATE, F.GUEST_SS_AR_BYTES},
       breaks=both(write(F.GUEST_ACTIVITY_STATE, 1), set_bits(F.GUEST_SS_AR_BYTES, 3 << 5)))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The activity-state field must not indicate the HLT state (1) if the DPL in the SS
    access-rights field (the CPL) is not 0: only ring-0 code can execute HLT."""
    if get(F.GUEST_ACTIVITY_STATE) == 1 and (get(F.GUEST_SS_AR_BYTES) >> 5) & 3 != 0:
        return ["the HLT activity state requires SS.DPL = 0"]
    return []


@guest("guest_interruptibility_reserved", "27.3.1.5", reads={F.GUEST_INTERRUPTIBILITY_INFO},
       breaks=set_bits(F.GUEST_INTERRUPTIBILITY_INFO, 1 << 5))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """Reserved bits 31:5 of the interruptibility-state field must be 0."""
    if get(F.GUEST_INTERRUPTIBILITY_INFO) & ~0x1F:
        return ["GUEST_INTERRUPTIBILITY_INFO reserved bits 31:5 must be 0"]
    return []


# The SDM lists the VMCS-link-pointer checks last among the non-register state (27.3.1.5)
# and gives their failure its own exit qualification, 4 (27.8).
@guest("vmcs_link_pointer_invalid", "27.3.1.5", reads={F.VMCS_LINK_POINTER}, qualification=4,
       breaks=write(F.VMCS_LINK_POINTER, 0))
def _(get: Reader, cpu: "VmxCpu") -> list[str]:
    """The VMCS link pointer must be FFFFFFFF_FFFFFFFFH.  (On hardware any other value is
    checked as a pointer to a shadow VMCS; vtlab's CPU has no VMCS shadowing, so no other
    value can be valid.)"""
    link = get(F.VMCS_LINK_POINTER)
    if link != INVALID_POINTER:
        return [f"VMCS_LINK_POINTER is {link:#x}; without VMCS shadowing it must be FFFFFFFF_FFFFFFFFH"]
    return []

"""VMWRITE through the current-VMCS view keeps its checks once a field takes the fast path.

:meth:`vtlab.cpu.vmcs_view.CurrentVmcs.write` stores a field it has written once without
decoding it again (a VMM writes GUEST_RIP after nearly every exit).  What VMWRITE does
must not change for the second and later writes: a value wider than the field fails
unless truncated (SDM Vol. 3C, 31.3 VMWRITE: "If the VMCS field is narrower than the
operand size, the high bits of the source operand are ignored" - vtlab's software API
refuses them without ``truncate=True``), a read-only field refuses with VM-instruction
error 13 (SDM Vol. 3C, 31.4), and the written field is loaded by the next VM entry.
"""
from __future__ import annotations

import pytest

from vtlab import VirtualMachine
from vtlab.arch.exit_reasons import ExitReason
from vtlab.errors import VmcsError

# Encodings typed from SDM Vol. 3C Appendix B.
GUEST_ES_LIMIT = 0x4800     # B.3.3, 32-bit guest-state field
GUEST_RIP = 0x681E          # B.4.3, natural-width guest-state field
VM_EXIT_REASON = 0x4402     # B.3.2, 32-bit read-only data field
GUEST_RBX_LIKE_VALUE = 0x1234


def _at_cpuid() -> VirtualMachine:
    vm = VirtualMachine("mov eax, 1\ncpuid\nmov ebx, 0x1234\nhlt", mode="protected")
    exit_ = vm.next_exit()
    assert exit_ is not None and exit_.reason.name == "CPUID"
    return vm


def test_width_check_holds_after_the_first_write():
    vm = _at_cpuid()
    view = vm.cpu.current_vmcs
    limit = view.read(GUEST_ES_LIMIT)
    for _ in range(2):   # the first write fills the fast path, the second uses it
        view.write(GUEST_ES_LIMIT, limit)
        with pytest.raises(VmcsError):
            view.write(GUEST_ES_LIMIT, 1 << 32)
        with pytest.raises(VmcsError):
            view.write(GUEST_ES_LIMIT, -1)
        assert view.read(GUEST_ES_LIMIT) == limit
    view.write(GUEST_ES_LIMIT, (1 << 32) | 0xFFFF, truncate=True)
    assert view.read(GUEST_ES_LIMIT) == 0xFFFF


def test_read_only_field_refuses_every_time():
    vm = _at_cpuid()
    view = vm.cpu.current_vmcs
    for _ in range(2):
        with pytest.raises(VmcsError) as info:
            view.write(VM_EXIT_REASON, 0)
        assert "error 13" in str(info.value)


def test_fast_written_rip_is_loaded_by_the_next_entry():
    vm = VirtualMachine("mov eax, 1\ncpuid\nmov ebx, 0x1234\nhlt", mode="protected")

    @vm.handler(ExitReason.CPUID)
    def skip_by_hand(vm, exit):
        view = vm.cpu.current_vmcs
        rip = view.read(GUEST_RIP)
        view.write(GUEST_RIP, rip)        # (fills the fast path)
        view.write(GUEST_RIP, rip + 2)    # skip CPUID (2 bytes, 0F A2) through it
        return True

    vm.run(max_exits=10)
    # The guest went on past CPUID (once): MOV EBX ran, then HLT.
    assert vm.guest.reg("ebx") == GUEST_RBX_LIKE_VALUE
    assert vm.trace.counts().get("CPUID") == 1

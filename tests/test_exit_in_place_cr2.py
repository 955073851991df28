"""CR2 across exits handled in place, with EPT on (vtlab.cpu.vcpu.vmresume_in_place).

QEMU overwrites CR2 when it raises a #PF, but a #PF that causes a VM exit - or that is
really an EPT fault on the guest's own page walk - must leave CR2 alone (SDM Vol. 3C,
28.1).  So the vCPU keeps the CR2 a run started with (``ExitMonitor._cr2``) and, for an
exit handled in place, the CR2 the VMM's handler left (a VMM may write guest CR2, which
is not in the VMCS).  With the guest's paging off no walk can fault, so the in-place
entry does not read CR2 then; the next MOV to CR - the one way to turn paging on without
a VM exit - reads it instead.  These tests pin that bookkeeping down.
"""
from __future__ import annotations

from vtlab import ExitReason, VirtualMachine
from vtlab.vmm.handlers import HANDLERS

PAGING_OFF = """
    mov eax, 0
    cpuid
    mov eax, 0
    cpuid
    mov eax, cr0
    hlt
"""


def _vm_setting_cr2(src: str, mode: str) -> VirtualMachine:
    vm = VirtualMachine(src, mode=mode)
    assert vm.ept_enabled
    values = iter((0x1111, 0x2222))

    @vm.handler(ExitReason.CPUID)
    def cpuid_and_cr2(vm, exit):
        vm.guest.set_reg("cr2", next(values))   # a VMM may load guest CR2 (it is no VMCS field)
        return HANDLERS[ExitReason.CPUID](vm, exit)

    return vm


def test_paging_off_cr2_is_read_at_the_next_mov_to_or_from_cr():
    vm = _vm_setting_cr2(PAGING_OFF, "protected")
    monitor = vm.cpu.monitor
    seen = []
    original = monitor._on_sensitive

    def spy(uc, address, size, in_place=None):
        seen.append((address, monitor._cr2_stale, monitor._cr2))
        return original(uc, address, size, in_place)

    monitor._on_sensitive = spy
    vm.run(max_exits=10)
    assert vm.trace.counts()["CPUID"] == 2
    # Both CPUIDs were handled in place (no stop between them): the second one found the
    # CR2 refresh deferred, and so did MOV EAX, CR0 - which took CR2 as the VMM left it.
    assert [s[1] for s in seen[1:3]] == [True, True]
    assert monitor._cr2 == 0x2222 and not monitor._cr2_stale
    assert vm.guest.reg("cr2") == 0x2222


def test_paging_on_cr2_is_read_at_every_entry_in_place():
    vm = _vm_setting_cr2(PAGING_OFF.replace("mov eax, cr0\n", ""), "long")
    monitor = vm.cpu.monitor
    vm.run(max_exits=10)
    assert vm.trace.counts()["CPUID"] == 2
    assert not monitor._cr2_stale
    assert monitor._cr2 == 0x2222

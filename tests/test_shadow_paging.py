"""The same guests under EPT and under shadow paging (vtlab.vmm.shadow), and the
workloads with EPT on and off.

Shadow paging needs exits EPT does not (SDM Vol. 3C 26.1.3 for the exiting
instructions, 26.2 for #PF through exception-bitmap bit 14): MOV to/from CR3 (exit
reason 28, CR_ACCESS), INVLPG (14) and every page fault (0, EXCEPTION_NMI), hidden or not.
"""
from __future__ import annotations

import pytest

from vtlab import VirtualMachine
from vtlab.lab import guests
from vtlab.vmm.shadow import ShadowPaging

LONG = [n for n in guests.names() if guests.info(n).mode == "long"]
PAGING_OFF = [n for n in guests.names() if guests.info(n).mode in ("real", "protected")]


def vm_for(name: str, ept: bool) -> VirtualMachine:
    wi = guests.info(name)
    return VirtualMachine(guests.source(name), mode=wi.mode, load=wi.load, ept=ept)


def counts(vm) -> dict[str, int]:
    return {str(k): int(v) for k, v in vm.exit_counts().items()}


@pytest.mark.parametrize("name", LONG)
def test_long_mode_workloads_run_the_same_with_ept_on_and_off(name):
    results = []
    for ept in (True, False):
        vm = vm_for(name, ept)
        s = vm.run(max_exits=20_000, max_instructions=2_000_000)
        results.append((s.state.value, s.instructions, counts(vm)))
    assert results[0][0] == "halted", results
    assert results[0] == results[1]


@pytest.mark.parametrize("name", PAGING_OFF)
def test_paging_off_workloads_need_ept_for_unrestricted_guest(name):
    """Real-mode guests run natively only as unrestricted guests, which need EPT (SDM
    27.2.1.1); without EPT the VMM runs them in virtual-8086 mode (vtlab.vmm.v86) and
    unpaged protected-mode guests on its identity page table (vtlab.vmm.unpaged); both
    halt (tests/test_ept_off.py compares their exits)."""
    vm = vm_for(name, ept=True)
    assert vm.run(max_exits=20_000, max_instructions=2_000_000).state.value == "halted"
    vm = vm_for(name, ept=False)
    assert vm.run(max_exits=20_000, max_instructions=2_000_000).state.value == "halted"
    assert (vm.v86 is not None) == (guests.info(name).mode == "real")


def test_page_table_heavy_under_shadow_paging_and_under_ept():
    """The guest checks every translation it makes (UD2 on a wrong one): it halts under
    both.  Under EPT nothing but HLT exits; under shadow paging the 1024 remaps and 64
    CR3 reloads each cost exits: INVLPG x 1025, CR_ACCESS x 65 (1 read of CR3, 64 loads),
    and a #PF for every shadow entry filled and every page-table write emulated."""
    ept = vm_for("page-table-heavy", ept=True)
    assert ept.run(max_exits=20_000, max_instructions=2_000_000).state.value == "halted"
    assert counts(ept) == {"HLT": 1}

    vm = vm_for("page-table-heavy", ept=False)
    shadow = ShadowPaging(vm)
    s = vm.run(max_exits=20_000, max_instructions=2_000_000)
    assert s.state.value == "halted", vm.message
    c = counts(vm)
    assert c["INVLPG"] == 1025 and c["CR_ACCESS"] == 65 and c["HLT"] == 1
    assert shadow.stats.emulated_writes == 1025              # the PDE written 1024 + 1 times
    assert shadow.stats.cr3_loads == 64 and shadow.stats.invlpgs == 1025
    assert c["EXCEPTION_NMI"] == shadow.stats.hidden_faults + shadow.stats.emulated_writes
    assert shadow.stats.guest_faults == 0
    assert sum(c.values()) > 1000 * sum(counts(ept).values())
    # the guest saw its own CR3, not the shadow's
    assert vm.regs.r12 == ept.regs.r12


def test_a_guest_page_fault_is_reflected_to_the_guest():
    """Linear 40000000H is not mapped by the guest's own tables: the #PF is the guest's,
    and the VMM injects it with CR2 = the address and P = 0 in the error code."""
    vm = VirtualMachine("mov rax, qword ptr [0x40000000]\nhlt", mode="long", ept=False)
    shadow = ShadowPaging(vm)
    vm.run(max_exits=50)
    assert shadow.stats.guest_faults >= 1
    assert vm.guest.reg("cr2") == 0x4000_0000


def test_shadow_paging_refuses_a_vm_with_ept():
    with pytest.raises(ValueError, match="ept=False"):
        ShadowPaging(VirtualMachine("hlt", mode="long"))

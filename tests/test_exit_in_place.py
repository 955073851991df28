"""Exits handled in place (inside the emulator) give exactly what the ordinary path gives.

``VirtualMachine.run`` lets the processor perform an instruction exit, run the VMM's
handler and re-enter the guest without stopping Unicorn (``VmxCpu.exit_in_place``).  That
is an implementation shortcut, so it must be invisible: the same trace, the same VMCS,
the same registers, output and VMX-instruction history as one emulator run per exit.
"""
from __future__ import annotations

import pytest

from vtlab import ExitReason, ProcBased, VirtualMachine, VmState, guests


def _run(make, in_place: bool, **run_kw):
    vm = make()
    vm.exits_in_place = in_place
    summary = vm.run(**run_kw)
    return vm, summary


def _snapshot(vm, summary):
    trace = vm.trace.to_dataframe(include_entries=True)
    return {
        "summary": (summary.state, summary.exits, summary.instructions, summary.message, summary.output),
        "trace": trace.to_dict(orient="list"),
        "vmcs": vm.vmcs.to_dataframe().to_dict(orient="list"),
        "regs": vm.guest.registers(),
        "history": [(o.instruction, o.status, o.exit.reason if o.exit else None) for o in vm.cpu.history],
        "last": (vm.last_outcome.instruction, vm.last_outcome.status) if vm.last_outcome else None,
    }


@pytest.mark.parametrize("name", guests.names())
def test_workloads_agree(name):
    make = lambda: guests.make_vm(name)   # noqa: E731
    a = _snapshot(*_run(make, True, max_exits=3000))
    b = _snapshot(*_run(make, False, max_exits=3000))
    assert a == b


CPUID_LOOP = """
    mov esi, 50
l:  mov eax, 1
    cpuid
    dec esi
    jnz l
    hlt
"""


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_budgets_agree(mode):
    """The exit and instruction budgets stop both paths at the same exit."""
    make = lambda: VirtualMachine(CPUID_LOOP, mode=mode)   # noqa: E731
    for kw in ({"max_exits": 7}, {"max_instructions": 40}):
        a = _snapshot(*_run(make, True, **kw))
        b = _snapshot(*_run(make, False, **kw))
        assert a == b
        assert a["summary"][0] is VmState.BUDGET


def test_in_place_really_happens():
    """The shortcut is taken (else this file tests nothing): one VMRESUME outcome per exit
    in the history, but a single trip through the emulator's run loop."""
    vm = VirtualMachine(CPUID_LOOP, mode="protected")
    runs = []
    original = vm.cpu.monitor.run
    vm.cpu.monitor.run = lambda *a, **k: runs.append(1) or original(*a, **k)
    vm.run()
    assert len(vm.trace) == 51
    assert len(runs) == 1


def test_handler_that_stops_or_raises():
    """A handler run in place that stops the VM (returns False) or raises ends the run
    exactly where the ordinary path ends it."""
    def make_stopper():
        vm = VirtualMachine(CPUID_LOOP, mode="protected")
        seen = []

        @vm.handler(ExitReason.CPUID)
        def stop_at_five(vm, exit):
            seen.append(1)
            vm.skip_instruction()
            return len(seen) < 5
        return vm
    a = _snapshot(*_run(make_stopper, True))
    b = _snapshot(*_run(make_stopper, False))
    assert a == b and a["summary"][1] == 5

    from vtlab import HandlerError

    for in_place in (True, False):
        vm = VirtualMachine(CPUID_LOOP, mode="protected")
        vm.exits_in_place = in_place
        calls = []

        @vm.handler(ExitReason.CPUID)
        def boom(vm, exit):
            calls.append(1)
            if len(calls) == 3:
                raise ValueError("learner bug")
            vm.skip_instruction()
            return True
        with pytest.raises(HandlerError, match="learner bug"):
            vm.run()
        assert vm.state is VmState.ERROR and len(vm.trace) == 3


def test_handler_changing_controls_mid_run():
    """A handler that turns on HLT exiting / MTF or injects an event mid-run: the next
    entry is not one the shortcut takes, and both paths still agree."""
    def make():
        vm = VirtualMachine(CPUID_LOOP, mode="protected")
        n = []

        @vm.handler(ExitReason.CPUID)
        def toggle(vm, exit):
            n.append(1)
            if len(n) == 10:
                vm.set_control(ProcBased.MONITOR_TRAP_FLAG, True)
            if len(n) == 12:
                vm.set_control(ProcBased.MONITOR_TRAP_FLAG, False)
            return vm.default(exit)
        return vm
    a = _snapshot(*_run(make, True))
    b = _snapshot(*_run(make, False))
    assert a == b
    assert "MONITOR_TRAP_FLAG" in a["trace"]["reason"]


def test_stepping_after_a_long_run_steps_one_instruction():
    """Unicorn counts instructions (single-stepping, MTF) with code added when a block is
    translated; blocks translated earlier for an uncounted run must not make a step run
    on to the next exit (found while writing the tests above)."""
    vm = VirtualMachine(CPUID_LOOP, mode="protected")
    for _ in range(20):       # the loop's blocks get translated without counting
        vm.next_exit()
    vm.handle_pending_exit()
    rip = vm.vmread("GUEST_RIP")
    out = vm.step()
    assert out.status.value == "paused" and vm.guest.rip != rip
    assert vm.guest.rip == 0x100d   # past DEC ESI (0x100c), at the JNZ

"""The VM-exit round trip's shortcuts keep the behaviour of the plain path.

The exit path (vtlab/cpu/nonroot.py, vcpu.py, vmx.py, vtlab/vmm/machine.py) avoids work it can prove unnecessary:
sensitive instructions are hooked with a raw ctypes callback, execution controls are
re-read only when the VMCS changed, registers are read and written in batches, the
self-modifying-code check compares bytes in a preallocated buffer, and the trace keeps
VM entries in a compact form.  These tests pin down that each shortcut gives what the
long way gives.
"""
from __future__ import annotations

import pytest
import unicorn

from vtlab import ExitReason, Guest, TraceEvent, VirtualMachine, VmState, exits
from vtlab.arch import ProcBased
from vtlab.arch.vmcs_fields import VmcsField as F

CPUID_LOOP = """
    mov esi, 3
l:  mov eax, 1
    cpuid
    dec esi
    jnz l
    hlt
"""


# ------------------------------------------------------------------ batched registers
@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_read_registers_matches_reg(mode):
    g = Guest(mode)
    names = ("rax", "rbx", "rcx", "rdx", "rsp", "rflags", "cr0", "cs", "al", "dx")
    for i, name in enumerate(("rax", "rbx", "rcx", "rdx")):
        g.set_reg(name, 0x1111_2222 * (i + 1))
    assert g.read_registers(names) == [g.reg(n) for n in names]
    # Names the batch cannot serve (EFER, CPL, segment MMRs) fall back to reg()
    assert g.read_registers(("rax", "efer", "cpl")) == [g.reg("rax"), g.reg("efer"), g.cpl]


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_write_registers_matches_set_reg(mode):
    a, b = Guest(mode), Guest(mode)
    names = ("rax", "rbx", "rcx", "rdx")
    values = (0x906EA, -1, 1 << 70 | 5, 0x8000_0000)
    a.write_registers(names, values)
    for n, v in zip(names, values):
        b.set_reg(n, v & 0xFFFF_FFFF_FFFF_FFFF)
    assert a.read_registers(names) == b.read_registers(names)
    with pytest.raises(ValueError, match="4 register names but 3 values"):
        a.write_registers(names, (1, 2, 3))


def test_memory_holds():
    g = Guest("protected")
    g.write(0x3000, b"\x0f\xa2\x90")
    assert g.memory_holds(0x3000, b"\x0f\xa2")
    assert not g.memory_holds(0x3000, b"\x0f\xa3")
    assert g.memory_holds(0x3000, bytes.fromhex("0fa290") + bytes(14))  # longer than the buffer
    with pytest.raises(unicorn.UcError):
        g.memory_holds(g.memory_size + 0x1000, b"\x0f\xa2")


# ------------------------------------------------------------------ the exit path
def test_cpuid_round_trip_results():
    vm = VirtualMachine(CPUID_LOOP, mode="protected")
    summary = vm.run()
    assert summary.state is VmState.HALTED and summary.exits == 4
    assert [e.reason for e in vm.trace.exits] == ["CPUID"] * 3 + ["HLT"]
    assert vm.regs.eax == 0x000906EA and vm.regs.esi == 0
    assert vm.vmread(F.VM_EXIT_REASON) == int(ExitReason.HLT)
    # every VMRESUME is in the processor's history, each ending in a VM exit
    entries = [o for o in vm.cpu.history if o.instruction in ("VMLAUNCH", "VMRESUME")]
    assert [o.instruction for o in entries] == ["VMLAUNCH"] + ["VMRESUME"] * 3
    assert all(o.exit is not None for o in entries)
    assert vm.last_outcome is entries[-1]


def test_controls_written_between_exits_take_effect():
    vm = VirtualMachine("mov eax, 1\ncpuid\nrdtsc\ncpuid\nrdtsc\nhlt", mode="protected")
    assert vm.next_exit().reason is ExitReason.CPUID
    assert vm.next_exit().reason is ExitReason.CPUID  # RDTSC exiting is 0: no exit
    vm.set_control(ProcBased.RDTSC_EXITING, True)
    assert vm.next_exit().reason is ExitReason.RDTSC
    vm.set_control(ProcBased.HLT_EXITING, False)
    assert vm.next_exit() is None
    assert vm.state is VmState.HALTED and "HLT exiting is 0" in vm.message


def test_self_modifying_code_is_not_taken_for_the_swept_instruction():
    src = """
        mov eax, 1
        cpuid
        mov byte ptr [patch], 0x90
        mov byte ptr [patch + 1], 0x90
    patch:
        cpuid
        hlt
    """
    vm = VirtualMachine(src, mode="protected")
    vm.run()
    assert [e.reason for e in vm.trace.exits] == ["CPUID", "HLT"]


def test_exception_in_exit_rule_propagates(monkeypatch):
    """An exception inside the code hook stops emulation and comes out of the run,
    as it does through the Unicorn binding's own hook wrapper."""
    def broken(m, insn):
        raise RuntimeError("rule failed")
    monkeypatch.setitem(exits.EXIT_RULES, ExitReason.CPUID, broken)
    vm = VirtualMachine("mov eax, 1\ncpuid\nhlt", mode="protected")
    with pytest.raises(RuntimeError, match="rule failed"):
        vm.run()
    assert vm.guest.uc._hook_exception is not None


# ------------------------------------------------------------------ the trace
def test_trace_entries_are_trace_events():
    vm = VirtualMachine(CPUID_LOOP, mode="protected")
    vm.run()
    events = vm.trace.events
    assert all(isinstance(e, TraceEvent) for e in events)
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.event for e in events] == ["entry", "exit"] * 4
    first = events[0]
    assert (first.instruction, first.guest_rip, first.guest_instructions) == ("VMLAUNCH", 0x1000, 0)
    assert [e.instruction for e in events[2::2]] == ["VMRESUME"] * 3
    assert vm.trace.events is events and events[0] is first  # made once, then kept
    df = vm.trace.to_dataframe(include_entries=True)
    assert list(df["event"]) == [e.event for e in events]
    assert list(df["instruction"]) == [e.instruction for e in events]
    assert list(df["guest_rip"]) == [e.guest_rip for e in events]
    assert len(vm.trace) == 4 and [e.seq for e in vm.trace] == [1, 3, 5, 7]
    vm.trace.clear()
    assert vm.trace.events == [] and len(vm.trace) == 0

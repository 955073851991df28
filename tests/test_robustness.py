"""Nothing a learner types can hang the kernel or escape as a raw traceback.

Regression tests for the ways a guest (or a VMM) used to run for ever, crash the
emulator or leave the VM unusable: MOV to CR0 with PG = 1 and PE = 0 (Unicorn writes it
where the CPU raises #GP), guests that run off the end of their code into zeroed
memory, exception loops, a KeyboardInterrupt in the middle of a run or of a handler, a
handler that loops past the wall-clock cap, VM-entry state the emulator cannot walk, and
memory that must stay bounded.  Anything that could hang or crash runs in a subprocess
with a timeout.
"""
from __future__ import annotations

import gc
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from vtlab import BudgetExceeded, ExitReason, Guest, VirtualMachine, VmcsField, VmState, VmxCpu, VtlabError
from vtlab.cpu import cr_checks, nonroot
from vtlab.cpu.guest import RanPastProgram, WallClockExceeded
from vtlab.vmm import machine
from vtlab.vmm.trace import DEFAULT_MAX_EVENTS, Trace

ROOT = Path(__file__).resolve().parents[1]
MODES = ("real", "protected", "paged", "long")

CR0_PG_WITHOUT_PE = "mov eax, cr0\nor eax, 0x80000000\nmov cr0, eax\nhlt"


def in_subprocess(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter (a hang or a crash cannot take the test run
    with it); returns its stdout, failing on a timeout or a non-zero exit."""
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the subprocess hung (more than {timeout} s)")
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


# ------------------------------------------------------------- MOV to CR0/CR4
def test_cr0_pg_without_pe_ends_with_gp_in_a_subprocess():
    """The guest of the issue never returned; now its #GP is delivered (to an IVT entry
    that points at nothing) and the run stops at once, saying so."""
    out = in_subprocess(f"""
        import time
        from vtlab import VirtualMachine
        t = time.perf_counter()
        vm = VirtualMachine({CR0_PG_WITHOUT_PE!r}, mode="real")
        s = vm.run()
        print(s.state.value, round(time.perf_counter() - t, 2))
        print(s.message)
        print(hex(vm.guest.reg("cr0")))
    """, timeout=60)
    state, seconds = out.splitlines()[0].split()
    assert state == "budget" and float(seconds) < 5
    assert "#GP" in out and "CR0.PG = 1 with CR0.PE = 0" in out and "IVT" in out
    assert int(out.splitlines()[2], 16) & (1 << 31) == 0  # the write did not happen


def test_cr0_pg_without_pe_exits_through_the_exception_bitmap():
    vm = VirtualMachine(CR0_PG_WITHOUT_PE, mode="real")
    vm.vmwrite("EXCEPTION_BITMAP", 1 << 13)
    out = vm.next_exit()
    assert out.reason is ExitReason.EXCEPTION_NMI and out.guest_rip == 0x1009
    assert vm.vmread("VM_EXIT_INTR_INFO") & 0xFF == 13
    assert "CR0.PG = 1 with CR0.PE = 0" in vm.trace.to_dataframe()["note"].iloc[-1]
    assert not vm.guest.reg("cr0") & (1 << 31)


def test_cr0_pg_without_pe_in_a_bare_run():
    g = Guest("real")
    g.load(CR0_PG_WITHOUT_PE, 0x1000)
    result = g.run(0x1000)
    assert result.reason == "exception" and result.exception.vector == 13
    assert result.exception.error_code == 0 and result.rip == 0x1009
    assert "CR0.PG = 1 with CR0.PE = 0" in result.exception.instruction


@pytest.mark.parametrize("mode, source, why", [
    ("real", "mov eax, cr0\nor eax, 0x20000000\nand eax, 0xbfffffff\nmov cr0, eax", "CR0.NW = 1 with CR0.CD = 0"),
    ("real", "mov eax, 0x8000\nmov cr4, eax", "reserved CR4 bits 0x8000"),
    ("protected", "mov eax, cr4\nor eax, 0x20000\nmov cr4, eax", "PCIDE can be set only in IA-32e mode"),
    ("long", "mov rax, cr0\nbts rax, 32\nmov cr0, rax", "bits 63:32 of CR0"),
    ("long", "mov rax, cr0\nbtr rax, 31\nmov cr0, rax", "clearing CR0.PG in 64-bit mode"),
    ("long", "mov rax, cr4\nbtr rax, 5\nmov cr4, rax", "clearing CR4.PAE in IA-32e mode"),
    ("long", "mov rax, cr3\nbts rax, 45\nmov cr3, rax", "MAXPHYADDR"),
    ("long", "mov rax, 0x10\nmov cr8, rax", "bits 63:4 of CR8"),
])
def test_mov_to_cr_faults(mode, source, why):
    """The SDM's #GP(0) conditions of MOV to CR0/CR3/CR4/CR8, in bare runs and in VMX
    non-root operation (a write that does not exit)."""
    g = Guest(mode)
    g.load(source + "\nhlt", 0x1000)
    result = g.run(0x1000)
    assert result.reason == "exception" and result.exception.vector == 13, result
    assert why in result.exception.instruction
    vm = VirtualMachine(source + "\nhlt", mode=mode)
    vm.vmwrite("EXCEPTION_BITMAP", 1 << 13)
    exit_ = vm.next_exit()
    assert exit_.reason is ExitReason.EXCEPTION_NMI and vm.vmread("VM_EXIT_INTR_INFO") & 0xFF == 13
    assert why in exit_.note


@pytest.mark.parametrize("mode", MODES)
def test_legal_cr_writes_still_work(mode):
    """The checks refuse only what the SDM refuses: e.g. toggling CR0.TS, reloading CR3."""
    acc = "rax" if mode == "long" else "eax"
    vm = VirtualMachine(f"mov {acc}, cr0\nor eax, 8\nmov cr0, {acc}\nmov {acc}, cr3\nmov cr3, {acc}\nhlt",
                        mode=mode)
    vm.set_control(machine.ProcBased.HLT_EXITING, False)
    s = vm.run()
    assert s.state is VmState.HALTED, s
    assert vm.guest.reg("cr0") & 8


def test_vmx_fixed_bits_of_cr0():
    """In VMX operation CR0.NE must stay 1 (IA32_VMX_CR0_FIXED0): with the VMM not owning
    it (mask 0), a guest clearing it gets #GP(0) (SDM Vol. 3C 24.8)."""
    vm = VirtualMachine("mov eax, cr0\nand eax, 0xffffffdf\nmov cr0, eax\nhlt", mode="real")
    vm.vmwrite("CR0_GUEST_HOST_MASK", 0)
    vm.vmwrite("EXCEPTION_BITMAP", 1 << 13)
    exit_ = vm.next_exit()
    assert exit_.reason is ExitReason.EXCEPTION_NMI and "FIXED0" in exit_.note


def test_pdpte_reserved_bits():
    """Turning PAE paging on loads the PDPTEs; a reserved bit in one is #GP(0) (SDM 4.4.1)."""
    g = Guest("protected")
    g.write(0x5000, struct.pack("<Q", 0x6001 | 1 << 5))  # a present PDPTE with bit 5 set
    g.set_reg("cr4", 0x20)
    g.set_reg("cr3", 0x5000)
    assert "PDPTE 0" in cr_checks.mov_to_cr_fault(g, 0, 0x8000_0011)
    g.write(0x5000, struct.pack("<Q", 0x6001))
    assert cr_checks.mov_to_cr_fault(g, 0, 0x8000_0011) is None


# ------------------------------------------------------------ running off the end
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source", ["mov ax, 1", "nop\nnop\nnop", "inc eax"])
def test_forgotten_hlt_stops_at_once(mode, source):
    vm = VirtualMachine(source, mode=mode)
    t = time.perf_counter()
    s = vm.run()
    assert time.perf_counter() - t < 1
    assert s.state is VmState.BUDGET and not s.ok
    end = vm.program.end
    assert f"the guest ran past its program at {end:#x}" in s.message and "did you forget HLT?" in s.message
    assert vm.guest.linear_rip() == end
    # Still runnable (it says the same again), and inspectable.
    assert vm.run().state is VmState.BUDGET
    vm.trace.to_dataframe(), vm.vmcs.to_dataframe(), repr(vm.regs)


@pytest.mark.parametrize("mode", MODES)
def test_empty_program(mode):
    s = VirtualMachine(b"", mode=mode).run()
    assert s.state is VmState.BUDGET and "is empty" in s.message


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_forgotten_hlt_in_a_bare_run(mode):
    g = Guest(mode)
    g.load("nop\nnop", 0x1000)
    t = time.perf_counter()
    with pytest.raises(RanPastProgram, match="ran past its program at 0x1002: did you forget HLT"):
        g.run(0x1000)
    assert time.perf_counter() - t < 1
    assert isinstance(RanPastProgram("x"), BudgetExceeded)
    g.load("hlt", 0x1002)        # now there is something there: the guard steps aside
    assert g.run(0x1000).reason == "hlt"


def test_jump_into_zeroed_memory():
    vm = VirtualMachine("mov eax, 0x5000\njmp eax", mode="protected")
    t = time.perf_counter()
    s = vm.run()
    assert time.perf_counter() - t < 2
    assert s.state is VmState.BUDGET and "executing zeroed memory at 0x" in s.message, s


def test_stepping_past_the_end():
    vm = VirtualMachine("nop", mode="protected")
    vm.step()
    assert vm.state is VmState.READY
    vm.step()
    assert vm.state is VmState.BUDGET and "ran past its program at 0x1001" in vm.message


def test_adjacent_program_is_not_a_runaway():
    vm = VirtualMachine("mov eax, 1", mode="protected")
    vm.load("mov ebx, 2\nhlt", vm.program.end)
    s = vm.run()
    assert s.state is VmState.HALTED and vm.regs.ebx == 2, s


# -------------------------------------------------------- exception loops, events
def test_endless_exception_loop_is_bounded():
    """#UD whose handler is UD2 again: nothing ever retires (real mode, IVT vector 6)."""
    vm = VirtualMachine("ud2", mode="real")
    vm.load(b"\x0f\x0b", 0x2000)                   # the handler: UD2
    vm.guest.write(6 * 4, struct.pack("<HH", 0x2000, 0))
    t = time.perf_counter()
    s = vm.run()
    assert time.perf_counter() - t < 5
    assert s.state is VmState.BUDGET and "endless exception loop" in s.message, s
    assert "the guest's fault" in s.message


def test_event_budget(monkeypatch):
    """INT n after INT n (each retiring, each handled): the event budget ends the run."""
    monkeypatch.setattr(machine, "_EVENT_BUDGET", 300)
    vm = VirtualMachine("l: int 0x30\njmp l", mode="real")
    vm.load("iret", 0x2000)
    vm.guest.write(0x30 * 4, struct.pack("<HH", 0x2000, 0))
    s = vm.run()
    assert s.state is VmState.BUDGET and "event budget exhausted" in s.message, s
    assert vm.run().state is VmState.BUDGET        # and again: still runnable


@pytest.mark.parametrize("ept", [False, True])
def test_delivery_with_a_stack_beyond_memory_is_a_triple_fault(ept):
    """Pushing an exception frame outside guest memory used to escape as a raw UcError.
    Without EPT: a triple fault.  With EPT (the default VMM) the frame's guest-physical
    address has no EPT mapping: an EPT violation during delivery (SDM 28.2.4), which the
    VMM reports as guest memory that is not there."""
    from vtlab.arch import ProcBased2
    # (without EPT there is no unrestricted guest, so paging must be on: identity-mapped)
    vm = VirtualMachine("mov esp, 0x3ffffff0\nint 0x30\nhlt", mode="protected" if ept else "paged")
    if not ept:
        vm.set_control(ProcBased2.UNRESTRICTED_GUEST, False)   # (it needs EPT)
        vm.set_control(ProcBased2.ENABLE_EPT, False)
    gate = struct.pack("<HHBBH", 0x2000, 0x08, 0, 0x8E, 0)      # present 32-bit interrupt gate
    vm.guest.write(0x9_1000 + 0x30 * 8, gate)
    vm.vmwrite("GUEST_IDTR_LIMIT", 0x7FF)
    s = vm.run()
    if ept:
        assert s.state is VmState.STOPPED and "no RAM or device there" in s.message, s
        assert vm.vmread("VM_EXIT_REASON") == 48                       # EPT violation
        assert vm.vmread("IDT_VECTORING_INFO_FIELD") == 0x8000_0430    # INT 30H, type 4
        return
    assert s.state is VmState.CRASHED, s
    assert "could not be delivered" in vm.trace.to_dataframe()["note"].iloc[-1]


# ---------------------------------------------------- emulator crashes (subprocess)
def test_vm_entry_with_unwalkable_page_tables_does_not_crash():
    """GUEST_CR3 pointing at a zero page, or beyond memory: loading the segment
    registers made QEMU walk the page tables from a register write, which killed the
    process (found by the fuzz, seeds 2:1612 and 2:533).  Now: a VM-entry failure."""
    out = in_subprocess("""
        from vtlab import VirtualMachine
        for mode, cr3 in (("paged", 0x91000), ("long", 0xC0000080), ("long", 0x91000)):
            vm = VirtualMachine("hlt", mode=mode)
            vm.vmwrite("GUEST_CR3", cr3)
            s = vm.run()
            print(s.state.value, "|", s.message)
    """)
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith("entry-failed | ") for line in lines), out
    assert "cannot be loaded from the guest GDT" in out


def test_delivery_through_unmapped_page_tables_does_not_crash():
    """A guest that loads a CR3 mapping nothing and then takes an exception: vtlab's
    delivery loads CS from the GDT, which is no longer mapped."""
    out = in_subprocess("""
        import struct
        from vtlab import VirtualMachine
        vm = VirtualMachine("mov eax, 0x91000\\nmov cr3, eax\\nhlt", mode="paged")
        gate = struct.pack("<HHBBH", 0x2000, 0x08, 0, 0x8E, 0)
        for vector in (8, 13, 14):
            vm.guest.write(0x9_1000 + vector * 8, gate)
        vm.vmwrite("GUEST_IDTR_LIMIT", 0x7FF)
        s = vm.run()
        print(s.state.value, "|", s.message)
    """)
    assert out.startswith(("crashed |", "budget |")), out


def test_vmxcpu_for_a_guest_with_code():
    """VmxCpu(guest) for a guest that already holds a program (found by the fuzz)."""
    g = Guest("protected")
    g.load("cpuid\nhlt", 0x1000)
    cpu = VmxCpu(g)
    assert 0x1000 in cpu.monitor._watched


# ------------------------------------------------------ interrupts and the clock
CPUID_FOREVER = "l: mov eax, 1\ncpuid\njmp l"
LOOP_FOREVER = "mov ecx, 0xffffffff\nl: dec ecx\njnz l\nhlt"


@pytest.mark.parametrize("in_place", [True, False])
def test_keyboard_interrupt_in_a_handler_leaves_the_vm_runnable(in_place):
    vm = VirtualMachine(CPUID_FOREVER, mode="protected")
    vm.exits_in_place = in_place
    calls = []

    @vm.handler(ExitReason.CPUID)
    def cpuid(vm, exit):
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return vm.default(exit)

    with pytest.raises(KeyboardInterrupt):
        vm.run()
    assert vm.state is VmState.READY and "interrupted" in vm.message
    assert vm.pending_exit is None
    vm.trace.to_dataframe(), vm.vmcs.to_dataframe(), repr(vm.regs)
    s = vm.run(max_exits=25)
    assert s.state is VmState.BUDGET and s.exits == 25 and len(calls) == 40 + 25
    assert vm.trace.counts()["CPUID"] == 40 + 25


def _interrupt_after(seconds: float) -> threading.Timer:
    """SIGINT to this process after ``seconds``, as the notebook's interrupt button does."""
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_keyboard_interrupt_during_a_long_exit_free_run():
    vm = VirtualMachine(LOOP_FOREVER, mode="protected")
    timer = _interrupt_after(0.3)
    t = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        vm.run(max_instructions=10 ** 13, max_seconds=None)
    late = time.perf_counter() - t - 0.3
    timer.join()
    assert late < 0.5, f"the interrupt took {late:.2f} s to be honoured"
    assert vm.state is VmState.READY and vm.cpu.operation.value == "VMX non-root operation"
    ecx = vm.regs.ecx
    s = vm.run(max_instructions=1_000_000)
    assert s.state is VmState.BUDGET and s.instructions == 1_000_000
    assert abs(vm.regs.ecx - (ecx - 500_000)) <= 1   # (the budget stops at a block boundary)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_keyboard_interrupt_during_a_bare_run():
    g = Guest("protected")
    g.load(LOOP_FOREVER, 0x1000)
    timer = _interrupt_after(0.3)
    t = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        g.run(0x1000, max_instructions=10 ** 13, max_seconds=None)
    timer.join()
    assert time.perf_counter() - t < 1
    assert g.counter.stop_at == (1 << 64) - 1      # no budget left behind
    with pytest.raises(BudgetExceeded):
        g.run(None, max_instructions=1000)


def test_wall_clock_cap_of_an_exit_free_run():
    vm = VirtualMachine(LOOP_FOREVER, mode="protected")
    t = time.perf_counter()
    s = vm.run(max_instructions=10 ** 13, max_seconds=0.3)
    assert 0.25 < time.perf_counter() - t < 1.5
    assert s.state is VmState.BUDGET and "wall-clock cap" in s.message, s
    g = Guest("protected")
    g.load(LOOP_FOREVER, 0x1000)
    with pytest.raises(WallClockExceeded, match="max_seconds=0.3"):
        g.run(0x1000, max_instructions=10 ** 13, max_seconds=0.3)


def test_wall_clock_cap_of_a_handler_that_loops():
    """A learner's handler that never returns: stopped half a second past the cap,
    with a message, and nothing escapes."""
    vm = VirtualMachine(CPUID_FOREVER, mode="protected")

    @vm.handler(ExitReason.CPUID)
    def forever(vm, exit):
        while True:
            pass

    t = time.perf_counter()
    s = vm.run(max_seconds=0.3)
    assert time.perf_counter() - t < 3
    assert s.state is VmState.BUDGET and "stopped inside Python code" in s.message, s
    time.sleep(0.6)  # (a RunTimeout arriving late would surface here)
    vm.handlers[ExitReason.CPUID] = machine.HANDLERS[ExitReason.CPUID]
    assert vm.run(max_exits=5).exits == 5


def test_rep_insd_with_a_huge_count_is_bounded():
    """REP INSD with RCX = 0x3164F763: the I/O handler emulates every iteration in
    Python (fuzz seed 2:16) - the wall-clock cap ends the run."""
    vm = VirtualMachine("mov ecx, 0x3164f763\nrep insd\nhlt", mode="long")
    t = time.perf_counter()
    s = vm.run(max_seconds=0.5)
    assert time.perf_counter() - t < 3
    assert s.state is VmState.BUDGET and "wall-clock cap" in s.message, s


def test_rep_insd_past_the_end_of_ram_stops_the_vm():
    """REP INSD whose last elements fall beyond guest RAM (fuzz vtlab-fuzz-1:1335): the VM
    stops with a message, RDI and RCX name the element that could not be stored (SDM
    Vol. 2, REP: the count and index move after every element), and the VM stays
    inspectable instead of a raw Unicorn error escaping from the I/O handler."""
    vm = VirtualMachine("hlt", mode="long")
    end = vm.guest.memory_size
    vm = VirtualMachine(f"mov rdi, {end - 4:#x}\nmov ecx, 3\nmov dx, 0x60\nrep insd\nhlt", mode="long")
    s = vm.run()
    assert s.state is VmState.STOPPED, s
    assert "INS wrote to" in s.message and "no RAM" in s.message and f"{end:#x}" in s.message
    assert vm.regs.rdi == end and vm.regs.rcx == 2
    assert vm.vmcs.read(VmcsField.VM_EXIT_REASON) == 30          # SDM Appendix C: I/O instruction


# --------------------------------------------------------------------- memory
def test_trace_cap_keeps_counts_exact():
    vm = VirtualMachine("mov esi, 1000\nl: mov eax, 1\ncpuid\ndec esi\njnz l\nhlt", mode="protected")
    vm.trace = Trace(max_events=100)
    s = vm.run()
    assert s.state is VmState.HALTED and s.exits == 1001
    trace = vm.trace
    assert len(trace._log) <= 100 + 1024 + 1 and trace.dropped > 0
    assert trace.counts().to_dict() == {"CPUID": 1000, "HLT": 1}
    assert trace.exits_total == 1001
    df = trace.to_dataframe()
    assert df.attrs["dropped"] == trace.dropped and df["seq"].is_monotonic_increasing
    assert df["reason"].iloc[-1] == "HLT" and df["seq"].iloc[-1] == 2 * 1001 - 1
    assert Trace().max_events == DEFAULT_MAX_EVENTS
    with pytest.raises(ValueError):
        Trace(max_events=0)


def test_uncapped_counts_agree_with_the_frame():
    vm = VirtualMachine("mov esi, 5\nl: mov eax, 1\ncpuid\ndec esi\njnz l\nhlt", mode="protected")
    vm.trace = Trace(max_events=None)
    vm.run()
    assert vm.trace.counts().to_dict() == vm.trace.to_dataframe()["reason"].value_counts().to_dict()


def test_many_exits_in_bounded_memory():
    """30,000 exits with a capped trace: traced memory stays a few MB (the trace would
    otherwise hold some 750 bytes per exit)."""
    vm = VirtualMachine("mov esi, 30000\nl: mov eax, 1\ncpuid\ndec esi\njnz l\nhlt", mode="protected")
    vm.trace = Trace(max_events=2000)
    vm.run(max_exits=10)  # (warm up: translation, caches)
    gc.collect()
    tracemalloc.start()
    try:
        s = vm.run(max_exits=40_000, max_instructions=10 ** 9)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s.state is VmState.HALTED and vm.trace.counts()["CPUID"] == 30000
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_many_virtual_machines_do_not_grow_rss():
    out = in_subprocess("""
        import gc
        from vtlab import VirtualMachine
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20
        for _ in range(10):
            VirtualMachine("mov eax, 1\\ncpuid\\nhlt", mode="protected").run()
        gc.collect()
        start, peak = rss(), 0
        for _ in range(200):
            vm = VirtualMachine("mov eax, 1\\ncpuid\\nhlt", mode="protected")
            vm.run()
            peak = max(peak, rss() - start)
        del vm
        gc.collect()
        print(round(peak, 1), round(rss() - start, 1))
    """, timeout=120)
    peak, after = map(float, out.split())
    assert peak < 100, f"RSS grew by {peak} MiB during 200 constructions"
    assert after < 64, f"RSS grew by {after} MiB after 200 constructions and a collection"


def test_errors_are_vtlab_errors():
    assert issubclass(RanPastProgram, VtlabError) and issubclass(WallClockExceeded, VtlabError)
    assert issubclass(machine.InternalError, VtlabError)
    assert nonroot.EVENT_BUDGET >= 10_000 and nonroot.STUCK_LIMIT >= 100

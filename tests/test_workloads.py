"""The guest workloads in vtlab/lab/guests/: they assemble, run, and exit as their headers say.

The first part needs only the assembler and the bare guest CPU.  The second part runs
each workload under vtlab's VMM (``vtlab.VirtualMachine``); those tests carry the
``needs_vm`` marker and skip while ``VirtualMachine`` does not exist.
"""
from __future__ import annotations

import pytest

import vtlab
from vtlab import asm, cost, guests
from vtlab.arch import ProcBased
from vtlab.guest import Guest

ALL = guests.names()
EXPECTED = {"cpuid-loop", "vmcall-loop", "rdtsc-loop", "msr-loop", "io-vmm", "io-userspace", "mov-cr3",
            "hlt-loop", "syscall-heavy", "serial-poll", "page-table-heavy"}


# ============================================================ no VMM needed
def test_the_workload_set():
    assert EXPECTED <= set(ALL)
    assert ALL == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_header(name):
    wi = guests.info(name)
    assert wi.name == name
    assert wi.path.name == f"{name}.asm"
    assert wi.mode in ("real", "protected", "long")
    assert wi.bits == {"real": 16, "protected": 32, "long": 64}[wi.mode]
    assert wi.load == 0x1000
    assert len(wi.description) > 80
    assert wi.exits
    assert wi.iterations is not None and 32 <= wi.iterations <= 5_000
    assert guests.source(name).startswith(f"; name: {name}\n")


@pytest.mark.parametrize("name", ALL)
def test_assembles_and_ends_in_hlt(name):
    wi = guests.info(name)
    code = asm.assemble(guests.source(name), wi.load, wi.bits)
    assert code == guests.assemble(name)
    assert 0 < len(code) < 512
    mnemonics = [i.mnemonic for i in asm.disassemble(code, wi.load, wi.bits)]
    assert "hlt" in mnemonics
    assert "jmp" in mnemonics or "jne" in mnemonics or "jnz" in mnemonics   # it loops


def test_header_parser():
    text = ("; name: x\n; mode: long\n; load: 0x2000\n; description: first line\n"
            ";   continued: here\n;\n; not: a header field\nnop\n")
    assert guests.parse_header(text) == {"name": "x", "mode": "long", "load": "0x2000",
                                         "description": "first line continued: here"}


def test_unknown_workload():
    with pytest.raises(KeyError, match="cpuid-loop"):
        guests.info("no-such-workload")


class _Ports:
    """A bare-metal device bus: records port I/O; the UART is always ready."""

    def __init__(self):
        self.log: list[tuple[str, int]] = []

    def read(self, port, size):
        self.log.append(("in", port))
        return 0x60 if port == 0x3FD else 0

    def write(self, port, size, value):
        self.log.append(("out", port))


# Guest instructions retired before the final HLT on a bare CPU (no VMX at all).
BARE = {
    "cpuid-loop": 10_002, "rdtsc-loop": 6_002, "msr-loop": 5_002, "io-vmm": 8_002, "io-userspace": 7_002,
    "mov-cr3": 6_003, "syscall-heavy": 57_362, "serial-poll": 15_170, "page-table-heavy": 12_880,
}


@pytest.mark.parametrize("name", sorted(BARE))
def test_runs_on_a_bare_cpu(name):
    """Outside VMX the same code is ordinary x86: it must run to its HLT on Unicorn."""
    wi = guests.info(name)
    g = Guest(wi.mode)
    ports = _Ports()
    g.io_read, g.io_write = ports.read, ports.write
    g.load(guests.source(name), wi.load)
    result = g.run(wi.load, max_instructions=1_000_000)
    assert result.reason == "hlt", result
    if name == "rdtsc-loop":
        # vtlab emulates RDTSC (a deterministic virtual TSC) by stopping the CPU at each
        # one; the block counter may then count part of a block twice
        assert BARE[name] <= result.instructions <= 2 * BARE[name]
    else:
        assert result.instructions == BARE[name]
    io = {"io-vmm": 2_000, "io-userspace": 2_500, "serial-poll": 2 * 32 * 39, "syscall-heavy": 8}
    assert len(ports.log) == io.get(name, 0)


def test_bare_cpu_details():
    # the first HLT of the idle loop stops a bare CPU
    g = Guest("real")
    g.load(guests.source("hlt-loop"), 0x1000)
    assert g.run(0x1000).reason == "hlt"
    # VMCALL outside VMX non-root operation is #UD
    g = Guest("protected")
    g.load(guests.source("vmcall-loop"), 0x1000)
    result = g.run(0x1000)
    assert result.reason == "exception" and result.exception.vector == 6
    assert "vmcall" in result.exception.instruction


# ============================================================ under the VMM
_no_vm = pytest.mark.skipif(not hasattr(vtlab, "VirtualMachine"),
                            reason="vtlab.VirtualMachine does not exist yet")


def needs_vm(test):
    """Mark a test as needing vtlab's VMM, and skip it while there is none."""
    return pytest.mark.needs_vm(_no_vm(test))


def run(name: str, *, controls: dict | None = None, setup=None, max_exits: int = 10_000):
    """Run workload ``name`` under the VMM; returns (vm, summary)."""
    vm = guests.make_vm(name)
    for flag, on in (controls or {}).items():
        vm.set_control(flag, on)
    if setup is not None:
        setup(vm)
    summary = vm.run(max_exits=max_exits, max_instructions=2_000_000)
    return vm, summary


def counts(vm) -> dict[str, int]:
    return {str(k): int(v) for k, v in vm.exit_counts().items()}


def halted(vm, summary) -> bool:
    return getattr(summary.state, "value", summary.state) == "halted"


# What each workload should cause, and under which controls (besides the default
# HLT exiting, unconditional I/O exiting and an all-ones MSR bitmap).
SCENARIOS = {
    "cpuid-loop": ({}, {"CPUID": 2_000}),
    "vmcall-loop": ({}, {"VMCALL": 2_000}),
    "rdtsc-loop": ({ProcBased.RDTSC_EXITING: True}, {"RDTSC": 2_000}),
    "msr-loop": ({}, {"MSR_READ": 1_000, "MSR_WRITE": 1_000}),
    "io-vmm": ({}, {"IO_INSTRUCTION": 2_000}),
    "io-userspace": ({}, {"IO_INSTRUCTION": 2_500}),
    "mov-cr3": ({ProcBased.CR3_LOAD_EXITING: True, ProcBased.CR3_STORE_EXITING: True}, {"CR_ACCESS": 2_001}),
    "hlt-loop": ({}, {}),
    "syscall-heavy": ({}, {"IO_INSTRUCTION": 8}),
    "serial-poll": ({}, {"IO_INSTRUCTION": 2 * 32 * 39}),
    "page-table-heavy": ({ProcBased.INVLPG_EXITING: True, ProcBased.CR3_LOAD_EXITING: True,
                          ProcBased.CR3_STORE_EXITING: True}, {"INVLPG": 1_025, "CR_ACCESS": 65}),
}


def test_every_workload_has_a_scenario():
    assert set(SCENARIOS) == set(ALL)


@needs_vm
@pytest.mark.parametrize("name", ALL)
def test_runs_to_hlt_in_its_mode(name):
    controls, expected = SCENARIOS[name]
    vm, summary = run(name, controls={ProcBased.HLT_EXITING: True, **controls})
    assert halted(vm, summary), summary.message
    df = cost.trace_frame(vm.trace)
    assert df["reason"].iloc[-1] == "HLT"
    wi = guests.info(name)
    assert vm.guest.bits == wi.bits, f"{name} should still run {wi.bits}-bit code at its HLT"
    got = counts(vm)
    for reason, n in expected.items():
        assert got.get(reason, 0) == n, (reason, got)
    assert got["HLT"] == 1


@needs_vm
@pytest.mark.parametrize("name", ALL)
def test_hlt_exiting_adds_one_exit_and_its_cost(name):
    controls, _ = SCENARIOS[name]
    vm_on, s_on = run(name, controls={**controls, ProcBased.HLT_EXITING: True})
    vm_off, s_off = run(name, controls={**controls, ProcBased.HLT_EXITING: False})
    assert halted(vm_on, s_on) and halted(vm_off, s_off), (s_on.message, s_off.message)
    on, off = counts(vm_on), counts(vm_off)
    assert on.get("HLT") == 1 and "HLT" not in off
    assert sum(on.values()) == sum(off.values()) + 1
    e_on, e_off = cost.summary(vm_on.trace), cost.summary(vm_off.trace)
    assert e_on["virtualization_cycles"] > e_off["virtualization_cycles"]
    assert e_on["overhead_pct"] > e_off["overhead_pct"]


@needs_vm
def test_idle_loop_woken_by_a_timer():
    """With a timer to wake it, every HLT of the idle loop is an exit and the VMM resumes
    the guest; the final CLI; HLT (nothing can wake it) ends the run."""
    vm, summary = run("hlt-loop", controls={ProcBased.HLT_EXITING: True},
                      setup=lambda vm: vm.set_timer(200), max_exits=5_000)
    assert halted(vm, summary), summary.message
    assert counts(vm)["HLT"] == 1_001


@needs_vm
def test_io_bitmap_lets_the_serial_port_through():
    lines, chars = 32, 39
    # unconditional I/O exiting (the default): every LSR read and THR write exits
    vm_all, s_all = run("serial-poll", controls={ProcBased.UNCOND_IO_EXITING: True,
                                                 ProcBased.USE_IO_BITMAPS: False})

    def bitmap_without_thr(vm):
        vm.set_io_intercept(range(0x3F8, 0x400), True)
        vm.set_io_intercept([0x3F8], False)

    vm_bm, s_bm = run("serial-poll", controls={ProcBased.USE_IO_BITMAPS: True}, setup=bitmap_without_thr)
    vm_none, s_none = run("serial-poll", controls={ProcBased.USE_IO_BITMAPS: True},
                          setup=lambda vm: vm.set_io_intercept(range(0x3F8, 0x400), False))
    for vm, s in ((vm_all, s_all), (vm_bm, s_bm), (vm_none, s_none)):
        assert halted(vm, s), s.message
        assert vm.output.count("vtlab: polling COM1") == lines   # the UART got every byte
    io = [counts(vm).get("IO_INSTRUCTION", 0) for vm in (vm_all, vm_bm, vm_none)]
    assert io == [2 * lines * chars, lines * chars, 0]
    overhead = [cost.summary(vm.trace)["overhead_pct"] for vm in (vm_all, vm_bm, vm_none)]
    assert overhead[0] > overhead[1] > overhead[2]


@needs_vm
def test_io_bitmap_on_the_vmm_device():
    vm_all, _ = run("io-vmm")
    vm_bm, s = run("io-vmm", controls={ProcBased.USE_IO_BITMAPS: True},
                   setup=lambda vm: vm.set_io_intercept([0x80], False))
    assert halted(vm_bm, s), s.message
    assert counts(vm_all)["IO_INSTRUCTION"] == 2_000
    assert counts(vm_bm).get("IO_INSTRUCTION", 0) == 0
    assert cost.summary(vm_bm.trace)["overhead_pct"] < cost.summary(vm_all.trace)["overhead_pct"]


@needs_vm
def test_userspace_device_is_costed_as_such():
    vm_user, _ = run("io-userspace")
    vm_kernel, _ = run("io-vmm")
    user = cost.classify(vm_user.trace)
    io = user[user["reason"] == "IO_INSTRUCTION"]
    assert len(io) == 2_500 and (io["cost_category"] == "userspace-device").all()
    kernel = cost.classify(vm_kernel.trace)
    assert (kernel[kernel["reason"] == "IO_INSTRUCTION"]["cost_category"] == "instruction").all()
    per_exit = [cost.estimate(vm.trace).loc["total", "cycles_per_exit"] for vm in (vm_user, vm_kernel)]
    assert per_exit[0] > 5 * per_exit[1]


@needs_vm
def test_msr_bitmap():
    vm_all, _ = run("msr-loop")
    vm_read, _ = run("msr-loop", setup=lambda vm: vm.set_msr_intercept(0x175, read=True, write=False))
    vm_none, s = run("msr-loop", setup=lambda vm: vm.set_msr_intercept(0x175, read=False, write=False))
    assert halted(vm_none, s), s.message
    assert (counts(vm_all).get("MSR_READ"), counts(vm_all).get("MSR_WRITE")) == (1_000, 1_000)
    assert (counts(vm_read).get("MSR_READ"), counts(vm_read).get("MSR_WRITE", 0)) == (1_000, 0)
    assert counts(vm_none).get("MSR_READ", 0) == counts(vm_none).get("MSR_WRITE", 0) == 0


@needs_vm
def test_rdtsc_exits_only_when_asked():
    vm_off, _ = run("rdtsc-loop", controls={ProcBased.RDTSC_EXITING: False})
    vm_on, _ = run("rdtsc-loop", controls={ProcBased.RDTSC_EXITING: True})
    assert counts(vm_off).get("RDTSC", 0) == 0
    assert counts(vm_on)["RDTSC"] == 2_000
    assert cost.summary(vm_on.trace)["overhead_pct"] > cost.summary(vm_off.trace)["overhead_pct"]


@needs_vm
def test_system_calls_do_not_exit():
    vm_sys, s = run("syscall-heavy")
    vm_cpuid, _ = run("cpuid-loop")
    assert halted(vm_sys, s), s.message
    assert set(counts(vm_sys)) <= {"IO_INSTRUCTION", "HLT"}
    sys_cost, cpuid_cost = cost.summary(vm_sys.trace), cost.summary(vm_cpuid.trace)
    assert sys_cost["exits_per_1k_instructions"] < 1
    assert sys_cost["overhead_pct"] < cpuid_cost["overhead_pct"] / 100

"""vtlab benchmarks: vtlab against plain Unicorn on the same guests, in one run.

    python benchmarks/run.py            (or: make bench)

Prints, for each figure, vtlab's rate, plain Unicorn's rate and their ratio:

1. exit-free guest code throughput (a tight arithmetic loop, no sensitive
   instructions): vtlab's run loop with its native instruction counter vs. a bare
   ``emu_start`` (target ratio >= 0.5);
1b. the same on the Python counter path (``VTLAB_PYTHON_COUNTER=1``), which hosts
   other than x86-64 Linux/macOS take (Apple silicon, ARM Linux, Windows): one Python
   call per basic block, so this tight loop is its worst case;
2. CPUID VM-exit round trips per second through the full exit/entry path (exit
   information, lazy guest-state save, the VMM's CPUID handler, trace record, VM-entry
   checks, guest-state load) vs. a plain Unicorn UC_HOOK_INSN CPUID callback that does
   the same register work (target ratio >= 0.5);
3. single-step rate (one guest instruction per step, as the stepper widget does);
4. a 1,000,000-exit run with the trace on (its default cap): time and process RSS
   before/after, to show a long run fits a 1-2 GB Binder pod while the trace's counts
   stay exact.

Timings are wall-clock, best of several repetitions, on whatever machine runs them.
"""
from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import unicorn  # noqa: E402
from unicorn import x86_const as X  # noqa: E402

import vtlab  # noqa: E402
from vtlab import assemble  # noqa: E402
from vtlab.cpu.counter import PYTHON_COUNTER_ENV, native_counter_supported  # noqa: E402

LOOP = """
    mov ecx, {n}
l:  add eax, ecx
    xor ebx, eax
    dec ecx
    jnz l
    hlt
"""
CPUID_LOOP = """
    mov esi, {n}
l:  mov eax, 1
    cpuid
    dec esi
    jnz l
    hlt
"""


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def plain_unicorn(code: bytes, insn_hook=None) -> unicorn.Uc:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 2 << 20)
    uc.mem_write(0x1000, code)
    if insn_hook:
        uc.hook_add(unicorn.UC_HOOK_INSN, insn_hook, None, 1, 0, X.UC_X86_INS_CPUID)
    uc.reg_write(X.UC_X86_REG_ESP, 0x7000)
    return uc


def bench_exit_free(n: int = 3_000_000, python_counter: bool = False, mode: str = "protected",
                    ept: bool = True, ept_4k: bool = False) -> dict:
    """Exit-free MIPS of vtlab and of bare Unicorn; ``python_counter`` forces vtlab's
    Python counting path (as on a host where the native counter cannot run).  ``ept``:
    the VM's EPT (an identity map with 2-MByte pages, walked by the processor model) on
    or off; ``ept_4k``: the EPT split into 4-KByte pages with the code page aliased at a
    second guest-physical address (non-identity mappings in Unicorn's map)."""
    src = LOOP.format(n=n)
    code = assemble(src, 0x1000, 32)
    insns = 4 * n + 2

    # Set-up (creating the engine / building the VM and its VMCS) is not guest code:
    # only the run itself is timed, for both.
    def timed_plain() -> float:
        uc = plain_unicorn(code)
        t = time.perf_counter()
        uc.emu_start(0x1000, 0x1000 + len(code) - 1)
        return time.perf_counter() - t

    def timed_vtlab() -> float:
        # The counter reads the switch when the VM's engine is made, so set it only then.
        saved = os.environ.get(PYTHON_COUNTER_ENV)
        os.environ[PYTHON_COUNTER_ENV] = "1" if python_counter else "0"
        try:
            vm = vtlab.VirtualMachine(src, mode=mode, ept=ept)
            if ept_4k:
                vm.ept_tables.protect(0, vm.guest.memory_size, 7)        # 512 4-KByte PTEs
                vm.ept_tables.map(0x10_0000, 0x1000, 0x1000)             # an alias of the code page
                vm.invept()
        finally:
            if saved is None:
                del os.environ[PYTHON_COUNTER_ENV]
            else:
                os.environ[PYTHON_COUNTER_ENV] = saved
        assert vm.guest.counter.native is (not python_counter and native_counter_supported())
        t = time.perf_counter()
        s = vm.run(max_instructions=10 * n)
        dt = time.perf_counter() - t
        assert s.state.value == "halted" and s.instructions >= insns - 1, s
        return dt

    tp = min(timed_plain() for _ in range(3))
    tv = min(timed_vtlab() for _ in range(3))
    return {"plain_mips": insns / tp / 1e6, "vtlab_mips": insns / tv / 1e6, "ratio": tp / tv}


def bench_cpuid(n: int = 5_000) -> dict:
    src = CPUID_LOOP.format(n=n)
    code = assemble(src, 0x1000, 32)

    def hook(uc, _):
        uc.reg_write(X.UC_X86_REG_EAX, 0x000906EA)
        uc.reg_write(X.UC_X86_REG_EBX, 0)
        uc.reg_write(X.UC_X86_REG_ECX, 0x80000000)
        uc.reg_write(X.UC_X86_REG_EDX, 0)
        return 1

    # As for exit-free code, set-up (the engine, the VM and its VMCS) is not part of a
    # round trip: only the run is timed, for both.
    def run_plain() -> float:
        uc = plain_unicorn(code, hook)
        t = time.perf_counter()
        uc.emu_start(0x1000, 0x1000 + len(code) - 1)
        return time.perf_counter() - t

    def run_vtlab() -> float:
        vm = vtlab.VirtualMachine(src, mode="protected")
        t = time.perf_counter()
        s = vm.run(max_exits=n + 10)
        dt = time.perf_counter() - t
        assert s.exits == n + 1, s
        return dt

    tp = min(run_plain() for _ in range(3))
    tv = min(run_vtlab() for _ in range(3))
    return {"plain_per_s": n / tp, "vtlab_per_s": n / tv, "ratio": tp / tv,
            "vtlab_us_per_exit": tv / n * 1e6}


def bench_step(n: int = 2_000) -> dict:
    vm = vtlab.VirtualMachine(LOOP.format(n=10 * n), mode="protected")
    t = time.perf_counter()
    for _ in range(n):
        vm.step()
    dt = time.perf_counter() - t
    return {"steps_per_s": n / dt}


def _rss_mib() -> float:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        return 0.0


def bench_million_exits(n: int = 1_000_000) -> dict:
    vm = vtlab.VirtualMachine(CPUID_LOOP.format(n=n), mode="protected")   # trace on, default cap
    vm.run(max_exits=10)   # warm up: translation, caches
    gc.collect()
    rss0 = _rss_mib()
    t = time.perf_counter()
    s = vm.run(max_exits=n + 10, max_instructions=10 * n, max_seconds=None)
    dt = time.perf_counter() - t
    rss1 = _rss_mib()
    assert s.exits == n + 1 - 10 and vm.trace.counts()["CPUID"] == n, s
    return {"exits": vm.trace.exits_total, "seconds": dt, "rss_before_mib": rss0,
            "rss_after_mib": rss1, "max_events": vm.trace.max_events, "dropped": vm.trace.dropped}


def main() -> None:
    print(f"vtlab {vtlab.__version__}, unicorn {unicorn.__version__}, python {sys.version.split()[0]}")
    ef = bench_exit_free()
    print(f"exit-free throughput : vtlab {ef['vtlab_mips']:8.1f} MIPS | plain Unicorn {ef['plain_mips']:8.1f} MIPS"
          f" | ratio {ef['ratio']:.2f} (target >= 0.5)")
    for label, kw in (("EPT off, paged guest", dict(mode="paged", ept=False)),
                      ("EPT on, paged guest ", dict(mode="paged")),
                      ("EPT 4K + alias      ", dict(ept_4k=True))):
        e = bench_exit_free(**kw)
        print(f"  ... {label}: vtlab {e['vtlab_mips']:8.1f} MIPS | ratio {e['ratio']:.2f} (target >= 0.5)")
    # A tenth of the loop: the Python path runs one callback per block (per iteration).
    py = bench_exit_free(n=300_000, python_counter=True)
    print(f"  ... Python counter : vtlab {py['vtlab_mips']:8.1f} MIPS | plain Unicorn {py['plain_mips']:8.1f} MIPS"
          f" | ratio {py['ratio']:.2f} ({ef['vtlab_mips'] / py['vtlab_mips']:.1f}x slower than native;"
          " the path off x86-64 Linux/macOS)")
    cp = bench_cpuid()
    print(f"CPUID exit round trip: vtlab {cp['vtlab_per_s']:8.0f} /s ({cp['vtlab_us_per_exit']:.1f} us) | plain "
          f"Unicorn CPUID hook {cp['plain_per_s']:8.0f} /s | ratio {cp['ratio']:.3f} (target >= 0.5)")
    st = bench_step()
    print(f"single-step rate     : {st['steps_per_s']:8.0f} steps/s")
    me = bench_million_exits()
    print(f"1,000,000-exit run   : {me['exits']} exits in {me['seconds']:.1f} s, trace capped at "
          f"{me['max_events']} events ({me['dropped']} dropped, counts exact); RSS "
          f"{me['rss_before_mib']:.0f} -> {me['rss_after_mib']:.0f} MiB")
    extra = Path(__file__).with_name("widgets_latency.py")
    if extra.exists():
        import runpy
        runpy.run_path(str(extra), run_name="__main__")


if __name__ == "__main__":
    main()

"""The fuzz worker of tests/test_fuzz.py: runs seeded random guests, one JSON line each.

    python tests/fuzz_worker.py SEED START COUNT [KIND]

Case ``i`` is generated from ``random.Random(f"{SEED}:{i}")`` alone, so any case can be
re-run by itself (``START=i COUNT=1``).  Before a case runs the worker prints
``{"case": i, "started": true}`` (flushed), after it ``{"case": i, "outcome": ...}``: if
the emulator crashes the process, the parent knows which case did it.

Outcomes are ``state:<VmState>`` (a RunSummary), ``vmx:<Status>`` (a VMX instruction's
outcome) or ``error:<class>`` (a VtlabError with a message) - all fine - or a failure:
``raw:<class>`` (an exception that is not a VtlabError), ``internal`` (vtlab's
InternalError), ``hang`` (a run outlived its wall-clock guard), ``inspect:<class>``
(the VM could not be inspected afterwards), ``empty-message``.

KIND is ``vm`` (a VirtualMachine running a random guest, with random VMCS writes before
entry), ``vmx`` (random VMX instruction orders on a bare VmxCpu), or ``mixed`` (default).
"""
from __future__ import annotations

import json
import random
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vtlab  # noqa: E402
from vtlab import VirtualMachine, VmcsField, VmxCpu, VtlabError  # noqa: E402
from vtlab.arch.controls import ProcBased, ProcBased2, PinBased  # noqa: E402
from vtlab.cpu.asm import assemble  # noqa: E402
from vtlab.cpu.guest import Guest  # noqa: E402

MODES = ("real", "protected", "paged", "long")
#: Values the generated operands take: edges, the interesting bits of CR0/CR4/EFER,
#: addresses inside and beyond guest memory, and the system tables.
VALUES = (0, 1, 2, 0x10, 0x11, 0x20, 0x31, 0xFF, 0x1000, 0x7000, 0x7C00, 0x9_0000, 0x9_1000,
          0x9_3000, 0x1F_F000, 0x20_0000, 0x4000_0000, 0x7FFF_FFFF, 0x8000_0000, 0x8000_0001,
          0x8000_0011, 0x8001_0031, 0xC000_0080, 0xFFFF_FFFF, 0x2000, 0x4020, 0x20020, 0x1_0000,
          0x60, 0x64, 0x3F8, 0x80, 0xE9, 0x174, 0x1B, 0x10, 0x480, 0x8000_0010)
GPR32 = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")
INT_VECTORS = (0, 1, 3, 4, 6, 8, 13, 14, 0x10, 0x13, 0x20, 0x21, 0x80, 0xFF)
PORTS = (0x60, 0x64, 0x70, 0x80, 0xE9, 0x3F8, 0x3FD, 0x510, 0xCF8)


class Hang(BaseException):
    """A run outlived its wall-clock guard (raised by SIGALRM)."""


def _alarm(signum, frame):
    raise Hang()


# --------------------------------------------------------------- generation
def _instruction(rng: random.Random, bits: int) -> str:
    """One interesting instruction (or a tiny sequence) for code of ``bits``."""
    r = rng.choice(GPR32) if bits != 64 else rng.choice(("rax", "rbx", "rcx", "rdx", "rsi", "rdi"))
    acc = "eax" if bits != 64 else "rax"
    v = rng.choice(VALUES) if rng.random() < 0.8 else rng.getrandbits(32)
    n = rng.choice(INT_VECTORS)
    port = rng.choice(PORTS)
    iret = {16: "iret", 32: "iretd", 64: "iretq"}[bits]
    choices = [
        "cpuid", "hlt", "nop", "pause", "rdtsc", "rdtscp", "rdpmc", "rdmsr", "wrmsr",
        f"mov {r}, {v:#x}", f"mov ecx, {rng.choice((0xC0000080, 0x10, 0x1B, 0x174, 0x277, 0x3A, 0x480, v)):#x}",
        f"mov {acc}, cr0", f"mov cr0, {acc}", f"mov {acc}, cr3", f"mov cr3, {acc}", f"mov {acc}, cr4",
        f"mov cr4, {acc}", "or eax, 0x80000000", "or eax, 1", "and eax, 0x7ffffffe", "or eax, 0x20",
        "or eax, 0x20000000", "xor eax, eax", "xor edx, edx",
        f"in al, {port & 0xFF:#x}" if port < 0x100 else "in al, dx", f"mov dx, {port:#x}",
        "out dx, al", "out dx, eax", "in eax, dx", "outsb", "insb", "rep outsd", "rep insb",
        "rep outsb", "rep insd", f"int {n:#x}", "int3", "ud2", iret, "cli", "sti", "pushf", "popf",
        "push eax" if bits != 64 else "push rax", "pop eax" if bits != 64 else "pop rax", "ret", "retf",
        "getsec", "vmcall", "vmlaunch", "vmresume", "vmxoff",
        f"vmxon [{'eax' if bits != 64 else 'rax'}]", f"vmclear [{'eax' if bits != 64 else 'rax'}]",
        f"vmptrld [{'eax' if bits != 64 else 'rax'}]", f"vmptrst [{'eax' if bits != 64 else 'rax'}]",
        f"lgdt [{'eax' if bits != 64 else 'rax'}]", f"lidt [{'eax' if bits != 64 else 'rax'}]",
        f"sgdt [{'eax' if bits != 64 else 'rax'}]", "lldt ax", "ltr ax", "str ax", "sldt ax",
        "smsw ax", "lmsw ax", "clts", "invd", "wbinvd", "xsetbv", "xgetbv", "monitor", "mwait",
        "rdrand eax", f"mov dr7, {acc}", f"mov {acc}, dr6",
        f"mov [{'ebx' if bits != 64 else 'rbx'}], eax", f"mov eax, [{'ebx' if bits != 64 else 'rbx'}]",
        f"mov esp, {rng.choice((0x7000, 0, 0x20_0000, 0xFFFF_FFF0, 3)):#x}" if bits != 64 else
        f"mov rsp, {rng.choice((0x7000, 0, 0x20_0000, 0xFFFF_FFF0, 3)):#x}",
        "div ecx", "syscall", "sysenter", "sysret" if bits == 64 else "sysexit",
        "jmp $", "loop $", "call $+5", "jmp $+2",
        # a mode switch: long mode enable in EFER, PAE, protection/paging in CR0
        "mov ecx, 0xc0000080\nrdmsr\nor eax, 0x100\nwrmsr",
        f"mov {acc}, cr4\nor eax, 0x20\nmov cr4, {acc}",
        f"mov {acc}, cr0\nor eax, 0x80000001\nmov cr0, {acc}",
        f"mov {acc}, cr0\nand eax, 0x7ffffffe\nmov cr0, {acc}",
    ]
    if bits == 16:
        choices += ["jmp 0x0:0x1000", "jmp 0x8:0x1000", "jmp 0xffff:0x0", "lmsw ax", "into"]
    elif bits == 32:
        choices += ["jmp 0x8:0x1000", "jmp 0x18:0x1000", "jmp 0x0:0x0", "jmp 0x23:0x1000", "into"]
    else:
        choices += ["mov cr8, rax", "mov rax, cr8", "swapgs", "push 0x8\npush 0x1000\nretfq",
                    "push 0x18\npush 0x1000\nretfq", "mov rax, 0x123456789abcdef", "bts rax, 45"]
    return rng.choice(choices)


def _assemble_skipping(texts: list[str], address: int, bits: int) -> bytes:
    """The instructions as one program (one assembler run, not one per instruction);
    a line the assembler refuses in this mode is left out and the rest tried again."""
    lines = [line for text in texts for line in text.split("\n")]
    while lines:
        try:
            return assemble("\n".join(lines), address, bits)
        except vtlab.AssemblyError as exc:
            if exc.line is None:
                return b""
            del lines[exc.line - 1]
    return b""


def program(rng: random.Random, bits: int, address: int = 0x1000) -> bytes:
    """Random bytes, or a random sequence of interesting instructions (HLT-terminated
    most of the time: the rest run off the end)."""
    if rng.random() < 0.2:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 48)))
    texts = [_instruction(rng, bits) for _ in range(rng.randint(0, 12))]
    code = _assemble_skipping(texts, address, bits)
    if rng.random() < 0.75:
        code += b"\xf4"
    return code


def vmcs_writes(rng: random.Random) -> list[tuple[int, int]]:
    fields = list(VmcsField)
    out = []
    for _ in range(rng.choice((0, 0, 0, 1, 2, 4))):
        f = rng.choice(fields)
        value = rng.choice(VALUES) if rng.random() < 0.7 else rng.getrandbits(64)
        out.append((int(f), value))
    return out


# --------------------------------------------------------------------- cases
def _inspect(vm) -> None:
    vm.trace.to_dataframe(include_entries=True)
    vm.trace.counts()
    vm.vmcs.to_dataframe()
    repr(vm.regs)
    str(vm.summary())
    repr(vm)


def _classify_run(fn) -> str:
    try:
        result = fn()
    except Hang:
        return "hang"
    except VtlabError as e:
        if type(e).__name__.startswith("InternalError"):
            return "internal"
        return f"error:{type(e).__name__}" if str(e) else "empty-message"
    except Exception as e:  # noqa: BLE001 - that is what the fuzz looks for
        return f"raw:{type(e).__name__}"
    if isinstance(result, vtlab.RunSummary):
        if not result.message and result.state.value not in ("halted",):
            return "empty-message"
        return f"state:{result.state.value}"
    if isinstance(result, vtlab.VmxOutcome):
        return f"vmx:{result.status.value}"
    return f"value:{type(result).__name__}"


def vm_case(rng: random.Random) -> dict:
    mode = rng.choice(MODES)
    bits = {"real": 16, "protected": 32, "paged": 32, "long": 64}[mode]
    code = program(rng, bits)
    info = {"kind": "vm", "mode": mode, "code": code.hex()}
    try:
        vm = VirtualMachine(code, mode=mode)
    except VtlabError as e:
        info["outcome"] = f"error:{type(e).__name__}"
        return info
    except Exception as e:  # noqa: BLE001
        info["outcome"] = f"raw:{type(e).__name__}"
        info["traceback"] = traceback.format_exc()
        return info
    writes = vmcs_writes(rng)
    info["writes"] = writes
    for field, value in writes:
        try:
            vm.vmwrite(field, value)
        except VtlabError:
            pass
    if rng.random() < 0.3:
        flag = rng.choice([ProcBased.HLT_EXITING, ProcBased.UNCOND_IO_EXITING, ProcBased.USE_MSR_BITMAPS,
                           ProcBased.MONITOR_TRAP_FLAG, ProcBased.CR3_LOAD_EXITING, ProcBased.RDTSC_EXITING,
                           ProcBased2.UNRESTRICTED_GUEST, ProcBased2.ENABLE_EPT, ProcBased2.DESC,
                           PinBased.EXT_INTR_MASK])
        try:
            vm.set_control(flag, rng.random() < 0.5)
        except VtlabError:
            pass
    if rng.random() < 0.3:
        try:
            vm.vmwrite("EXCEPTION_BITMAP", rng.getrandbits(32))
        except VtlabError:
            pass
    if rng.random() < 0.1:
        vm.raise_interrupt(rng.choice((0x20, 0x21, 2, 13)))
    first = _classify_run(lambda: vm.run(max_exits=30, max_instructions=100_000, max_seconds=1))
    info["outcome"] = first
    info["message"] = vm.message[:300]
    if first in ("hang",) or first.startswith("raw") or first == "internal":
        info["traceback"] = traceback.format_exc()
        return info
    try:
        _inspect(vm)
    except Hang:
        info["outcome"] = "hang"
        return info
    except Exception as e:  # noqa: BLE001
        info["outcome"] = f"inspect:{type(e).__name__}"
        info["traceback"] = traceback.format_exc()
        return info
    second = _classify_run(lambda: vm.run(max_exits=10, max_instructions=20_000, max_seconds=1))
    if second == "hang" or second.startswith("raw") or second == "internal":
        info["outcome"] = "second-" + second
        info["traceback"] = traceback.format_exc()
    return info


VMX_OPS = ("vmxon", "vmxon", "vmclear", "vmptrld", "vmptrst", "vmread", "vmwrite", "vmwrite",
           "vmlaunch", "vmresume", "vmxoff", "cr4", "capture", "continue", "vmcall")


def vmx_case(rng: random.Random) -> dict:
    """Random VMX instruction orders on a bare VmxCpu."""
    mode = rng.choice(MODES)
    guest = Guest(mode)
    guest.load(b"\x0f\xa2\xf4" if rng.random() < 0.7 else bytes(rng.getrandbits(8) for _ in range(8)), 0x1000)
    guest.rip = 0x1000
    cpu = VmxCpu(guest)
    regions = [cpu.alloc_region(cpu.caps.revision_id), cpu.alloc_region(cpu.caps.revision_id),
               cpu.alloc_region(rng.getrandbits(31))]
    fields = list(VmcsField)
    ops, outcomes = [], []
    for _ in range(rng.randint(1, 14)):
        op = rng.choice(VMX_OPS)
        address = rng.choice(regions + [0, 1, 0x1000, 0x20_0000, rng.getrandbits(32) & ~0xFFF])

        def call(op=op, address=address):
            if op == "vmxon":
                return cpu.vmxon(address)
            if op == "vmclear":
                return cpu.vmclear(address)
            if op == "vmptrld":
                return cpu.vmptrld(address)
            if op == "vmptrst":
                return cpu.vmptrst()
            if op == "vmread":
                return cpu.vmread(int(rng.choice(fields)) if rng.random() < 0.9 else rng.getrandbits(32))
            if op == "vmwrite":
                return cpu.vmwrite(int(rng.choice(fields)), rng.choice(VALUES))
            if op == "vmlaunch":
                return cpu.vmlaunch(2_000)
            if op == "vmresume":
                return cpu.vmresume(2_000)
            if op == "vmxoff":
                return cpu.vmxoff()
            if op == "cr4":
                return cpu.write_cr4(cpu.cr4 ^ (1 << 13))
            if op == "capture":
                return cpu.capture_guest_state()
            if op == "continue":
                return cpu.continue_guest(2_000)
            return cpu.vmcall()
        ops.append(op)
        outcomes.append(_classify_run(call))
    bad = [o for o in outcomes if o == "hang" or o.startswith("raw") or o == "internal"]
    return {"kind": "vmx", "mode": mode, "ops": ops, "outcome": bad[0] if bad else "vmx-sequence",
            "outcomes": outcomes, **({"traceback": traceback.format_exc()} if bad else {})}


def main(argv: list[str]) -> None:
    seed, start, count = argv[1], int(argv[2]), int(argv[3])
    kind = argv[4] if len(argv) > 4 else "mixed"
    signal.signal(signal.SIGALRM, _alarm)
    out = sys.stdout
    for i in range(start, start + count):
        rng = random.Random(f"{seed}:{i}")
        out.write(json.dumps({"case": i, "started": True}) + "\n")
        out.flush()
        t = time.perf_counter()
        # The per-run wall-clock guard (repeated: a signal that arrives as a ctypes callback
        # starts is printed and lost).
        signal.setitimer(signal.ITIMER_REAL, 8.0, 0.5)
        try:
            which = kind if kind != "mixed" else ("vmx" if rng.random() < 0.15 else "vm")
            info = vmx_case(rng) if which == "vmx" else vm_case(rng)
        except Hang:
            info = {"outcome": "hang"}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        info["case"] = i
        info["seconds"] = round(time.perf_counter() - t, 4)
        out.write(json.dumps(info) + "\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv)

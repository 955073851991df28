"""The instruction counter (vtlab/cpu/counter.py): native hook and Python hook agree.

vtlab counts guest instructions with a 90-byte native basic-block hook on x86-64 SysV
hosts, and with a Python block hook elsewhere.  These tests pin down that

* the shipped machine code is exactly what its assembly source (counter_hook.asm)
  assembles to, and the ctx offsets the source documents are the ones counter.py uses;
* the page holding the hook is read/execute, never writable, once set up;
* both hooks give the same totals, block counts, exactness and budget stops on the same
  guests (and the totals are the ones counted by hand);
* on a host where the native hook cannot run (Windows x64, another CPU) vtlab warns
  once and still counts correctly in Python.
"""
from __future__ import annotations

import ast
import ctypes
import importlib.resources
import inspect
import platform
import re
import sys
import warnings

import pytest

from vtlab import BudgetExceeded, Guest
from vtlab.cpu import counter as C

needs_native = pytest.mark.skipif(not C.native_counter_supported(),
                                  reason="the native counter needs an x86-64 SysV host")


def _asm_source() -> str:
    # Through importlib.resources, as an installed vtlab would find it (package data)
    return importlib.resources.files("vtlab.cpu").joinpath("counter_hook.asm").read_text()


def make_guest(mode: str, native: bool, monkeypatch) -> Guest:
    """A Guest whose counter is native or Python, chosen the way users would: by env var."""
    if native:
        monkeypatch.delenv(C.PYTHON_COUNTER_ENV, raising=False)
    else:
        monkeypatch.setenv(C.PYTHON_COUNTER_ENV, "1")
    g = Guest(mode)
    assert g.counter.native is native
    return g


# ------------------------------------------------------------------ shipped bytes
def test_shipped_bytes_are_the_assembled_source():
    from vtlab.cpu import asm_llvm
    obj = asm_llvm.read_object(asm_llvm.assemble_object(".intel_syntax noprefix\n" + _asm_source()))
    code = asm_llvm.link(obj, 0, 64)
    assert code == C._HOOK_CODE, (
        "counter_hook.asm and counter._HOOK_CODE disagree; re-assemble the .asm and "
        f"paste the bytes: {code.hex()}")


def test_source_documents_the_ctx_layout_counter_py_uses():
    """The .asm's ctx table ("[rcx + 16]  total") matches _CTX_FIELDS, word for word."""
    table = re.findall(r"^#\s+\[rcx \+\s*(\d+)\]\s+(\w+)", _asm_source(), re.MULTILINE)
    assert [(int(off), name) for off, name in table] == [
        (8 * i, name) for i, name in enumerate(C._CTX_FIELDS)]


def test_counter_does_not_assemble_at_run_time():
    """counter.py ships bytes: it imports no assembler."""
    tree = ast.parse(inspect.getsource(C))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"keystone", "ziglang", "asm", "asm_llvm"}


# ------------------------------------------------------------------ the page: W^X
def _mapping_perms(address: int) -> str:
    """The permissions ("r-xp" ...) of the mapping that holds ``address`` in this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return perms
    raise AssertionError(f"{address:#x} is not mapped")


@needs_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_native_page_is_read_execute_only():
    g = Guest("protected")
    assert g.counter.native
    address = C._native_hook()
    assert address is not None and address % 4096 == 0
    assert _mapping_perms(address) == "r-xp"
    # ... and it holds the shipped code, which the counter of every engine shares
    assert ctypes.string_at(address, len(C._HOOK_CODE)) == C._HOOK_CODE
    assert Guest("long").counter.native and C._native_hook() == address


@needs_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_executable_page_runs_and_is_not_writable():
    address = C._executable_page(b"\xb8\x2a\x00\x00\x00\xc3")  # mov eax, 42; ret
    assert _mapping_perms(address) == "r-xp"
    assert ctypes.CFUNCTYPE(ctypes.c_int)(address)() == 42


# ------------------------------------------------------------------ native == Python
TIGHT_LOOP = """
    mov ecx, 1000
l:  add eax, ecx
    xor ebx, eax
    dec ecx
    jnz l
    hlt
"""
BRANCHES = """
    mov ecx, 200
    xor eax, eax
    xor ebx, ebx
l:  test ecx, 1
    jz even
    add eax, ecx
    jmp next
even:
    inc ebx
    cmp ebx, 50
    ja next
    add eax, 3
next:
    dec ecx
    jnz l
    hlt
"""
REAL_LOOP = """
    mov cx, 100
    xor ax, ax
l:  add ax, cx
    loop l
    mov [0x500], ax
    hlt
"""
LONG_CALLS = """
    mov rcx, 50
    xor rax, rax
l:  call f
    dec rcx
    jnz l
    hlt
f:  add rax, rcx
    ret
"""
FAULT_MID_BLOCK = """
    mov eax, 5
    xor ecx, ecx
    mov ebx, 7
    div ecx
    mov edx, 1
    hlt
"""
RDTSC_MID_BLOCK = """
    mov ecx, 3
    xor esi, esi
l:  rdtsc
    add esi, eax
    dec ecx
    jnz l
    hlt
"""
# calls code at 0x5000 that was written, not loaded: never swept, so not exact
OUTSIDE_WINDOW = """
    mov ecx, 10
l:  mov eax, 0x5000
    call eax
    dec ecx
    jnz l
    hlt
"""
INC_INC_RET = bytes.fromhex("4343c3")  # inc ebx; inc ebx; ret (32-bit)

GUESTS = {
    # name: (mode, source, instructions counted by hand, or None)
    "tight-loop": ("protected", TIGHT_LOOP, 1 + 4 * 1000 + 1),
    "branches": ("protected", BRANCHES, None),
    "real-mode": ("real", REAL_LOOP, 2 + 2 * 100 + 2),
    "long-mode": ("long", LONG_CALLS, 2 + 50 * 5 + 1),
    "fault-mid-block": ("protected", FAULT_MID_BLOCK, 3),  # the DIV faults: not retired
    "rdtsc-mid-block": ("protected", RDTSC_MID_BLOCK, 2 + 3 * 4 + 1),
    "outside-window": ("protected", OUTSIDE_WINDOW, None),
}


def _run(mode: str, source: str, native: bool, monkeypatch, budget: int = 1_000_000) -> dict:
    g = make_guest(mode, native, monkeypatch)
    g.load(source, 0x1000)
    g.write(0x5000, INC_INC_RET)
    try:
        result = g.run(0x1000, max_instructions=budget)
        outcome = (result.reason, result.rip, result.instructions,
                   result.exception.vector if result.exception else None)
    except BudgetExceeded:
        outcome = ("budget", g.rip, None, None)
    c = g.counter
    return {"outcome": outcome, "total": c.total, "blocks": c.blocks, "exact": c.exact,
            "regs": g.read_registers(("rax", "rbx", "rcx", "rsi")),
            "tsc": g.read_tsc()}


@needs_native
@pytest.mark.parametrize("name", list(GUESTS))
def test_native_and_python_counts_agree(name, monkeypatch):
    mode, source, expected = GUESTS[name]
    native = _run(mode, source, True, monkeypatch)
    python = _run(mode, source, False, monkeypatch)
    assert native == python
    assert native["blocks"] > 0
    if expected is not None:
        assert native["total"] == expected
    assert native["exact"] is (name != "outside-window")


@needs_native
def test_outside_window_counts_each_block_once(monkeypatch):
    """Unswept blocks count one instruction each (the two-instruction helper + RET is one block)."""
    for native in (True, False):
        r = _run("protected", OUTSIDE_WINDOW, native, monkeypatch)
        assert r["outcome"][0] == "hlt" and not r["exact"]
        assert r["total"] == 1 + 10 * 4 + 10 + 1  # mov; 10x (mov, call, dec, jnz); 10 calls; hlt
        assert r["regs"][1] == 20  # EBX: the helper did run


@needs_native
@pytest.mark.parametrize("budget", [1, 5, 999, 1001, 2502])
def test_budget_stops_both_at_the_same_count(budget, monkeypatch):
    native = _run("protected", TIGHT_LOOP, True, monkeypatch, budget)
    python = _run("protected", TIGHT_LOOP, False, monkeypatch, budget)
    assert native["outcome"][0] == "budget"
    assert native == python
    # the hook stops at the first block start past the budget: at most one block
    # (the 4-instruction loop body) beyond it, never short of it
    assert budget <= native["total"] <= budget + 4


@needs_native
def test_stop_at_on_a_bare_counter(monkeypatch):
    """stop_at set by hand (not through Guest.run) stops a bare emu_start the same way."""
    totals = []
    for native in (True, False):
        g = make_guest("protected", native, monkeypatch)
        g.load(TIGHT_LOOP, 0x1000)
        g.rip = 0x1000
        g.counter.stop_at = 101
        g.uc.emu_start(g.rip, 0)  # no exit address (Guest disables them): only the hook stops
        totals.append((g.counter.total, g.counter.exhausted, g.rip, g.reg("ecx")))
    assert totals[0] == totals[1]
    assert totals[0][1] and 101 <= totals[0][0] <= 105


# ------------------------------------------------------------------ other hosts
@pytest.mark.parametrize("host", ["windows-x64", "arm64"])
def test_non_sysv_host_warns_once_and_counts_in_python(host, monkeypatch):
    if host == "windows-x64":  # x86-64 CPU, but the Microsoft x64 calling convention
        monkeypatch.setattr(platform, "machine", lambda: "AMD64")
        monkeypatch.setattr(sys, "platform", "win32")
    else:
        monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.delenv(C.PYTHON_COUNTER_ENV, raising=False)
    monkeypatch.setattr(C, "_warned", False)  # as in a fresh process
    assert not C.native_counter_supported()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # let only vtlab's own once-per-process rule act
        guests = [Guest("protected") for _ in range(3)]
    slow = [w for w in caught if issubclass(w.category, C.SlowCounterWarning)]
    assert len(slow) == 1
    assert "x86-64 SysV" in str(slow[0].message) and "Python" in str(slow[0].message)
    g = guests[-1]
    assert not g.counter.native
    g.load("mov ecx, 5\nl: dec ecx\njnz l\nhlt", 0x1000)
    result = g.run(0x1000)
    assert (result.reason, result.instructions, g.counter.total) == ("hlt", 12, 12)
    assert g.counter.exact and g.counter.blocks == 6
    with pytest.raises(RuntimeError, match="x86-64 SysV"):
        C.InstructionCounter(g.uc, native=True)


def test_python_path_on_request_does_not_warn(monkeypatch):
    monkeypatch.setattr(C, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = make_guest("protected", False, monkeypatch)
        explicit = C.InstructionCounter(g.uc, native=False)
    assert not explicit.native
    assert not [w for w in caught if issubclass(w.category, C.SlowCounterWarning)]
    monkeypatch.setenv(C.PYTHON_COUNTER_ENV, "0")  # "0" means: no, use native
    assert Guest("protected").counter.native is C.native_counter_supported()

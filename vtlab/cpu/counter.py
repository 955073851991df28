"""Count the guest instructions retired, at native speed.

A Python callback per guest instruction (or even per basic block) slows Unicorn down
by one to two orders of magnitude.  Instead, on an x86-64 host, we hand Unicorn a
*native* basic-block hook: a dozen bytes of machine code (assembled by Keystone at
import time, placed in an executable page) that adds the number of instructions in the
block to a 64-bit counter.  The number of instructions in a block is looked up in a
prefix-sum table built from a Capstone sweep of the loaded guest code:
``insns(block) = P[end] - P[start]``, where ``P[x]`` counts instruction starts below x.

Blocks outside the swept window count as one instruction each and are tallied
separately, so a total is never silently wrong: :attr:`InstructionCounter.exact` says
whether it is.  The count is taken when a block starts, so a run that stops in the
middle of a block (at a VM exit) has counted the rest of that block too.

The same hook enforces the instruction budget that stops runaway guests: once the
total reaches :attr:`InstructionCounter.stop_at` it tail-calls ``uc_emu_stop`` itself,
so a guest spinning in a tight loop is stopped without any Python running at all.

Where native code cannot be used (another host architecture, or a kernel that forbids
executable mappings), a Python block hook gives the same numbers, slowly.
"""
from __future__ import annotations

import ctypes
import mmap
import platform

import numpy as np
import unicorn
from unicorn.unicorn_py3 import unicorn as _ucmod

# ctx layout (u64 each, in this order; _HOOK_ASM addresses them as [rcx + 8*index]):
# window base, window size, total, blocks, outside_blocks, prefix-table pointer,
# outside_bytes, stop_at (instruction budget), address of uc_emu_stop, and the address
# and size of the block that started last (for unretire_rest_of_block)
_CTX_FIELDS = ("base", "limit", "total", "blocks", "outside_blocks", "prefix", "outside_bytes",
               "stop_at", "emu_stop", "last_block", "last_size")

# SysV ABI: rdi = uc, rsi = block address, edx = block size, rcx = user data (ctx)
_HOOK_ASM = """
    mov qword ptr [rcx + 72], rsi
    mov r8d, edx
    mov qword ptr [rcx + 80], r8
    mov rax, rsi
    sub rax, qword ptr [rcx]
    cmp rax, qword ptr [rcx + 8]
    jae outside
    mov r8d, edx
    lea r9, [rax + r8]
    cmp r9, qword ptr [rcx + 8]
    ja outside
    mov r10, qword ptr [rcx + 40]
    mov r11d, dword ptr [r10 + r9*4]
    sub r11d, dword ptr [r10 + rax*4]
    add qword ptr [rcx + 16], r11
    inc qword ptr [rcx + 24]
check:
    mov rax, qword ptr [rcx + 16]
    cmp rax, qword ptr [rcx + 56]
    jae stop
    ret
outside:
    inc qword ptr [rcx + 32]
    inc qword ptr [rcx + 16]
    mov r8d, edx
    add qword ptr [rcx + 48], r8
    jmp check
stop:
    mov rax, qword ptr [rcx + 64]
    jmp rax
"""

_native_fn = None  # (mmap, function pointer) shared by every counter


def _native_hook():
    """Assemble the block hook once into an executable page; None if impossible here."""
    global _native_fn
    if _native_fn is not None:
        return _native_fn or None
    _native_fn = False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        import keystone

        code = bytes(keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64).asm(_HOOK_ASM)[0])
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    except Exception:  # no RWX mappings allowed, no keystone: fall back to Python
        return None
    _native_fn = (page, address)
    return _native_fn


class InstructionCounter:
    """Counts instructions retired by one Unicorn instance; read :attr:`total`."""

    def __init__(self, uc: unicorn.Uc):
        self._uc = uc
        self._ctx = (ctypes.c_uint64 * len(_CTX_FIELDS))()
        self._ctx[7] = (1 << 64) - 1
        self._ctx[8] = ctypes.cast(_ucmod.uclib.uc_emu_stop, ctypes.c_void_p).value
        self._prefix = np.zeros(2, dtype=np.uint32)
        # The same table as a memoryview: indexing it gives Python ints at a fraction of
        # the cost of numpy scalars (unretire_rest_of_block runs on every VM exit).
        self._prefix_view = memoryview(self._prefix)
        self._starts: dict[int, None] = {}  # instruction start addresses from sweeps
        self._handle = None
        native = _native_hook()
        self.native = native is not None
        if native:
            handle = _ucmod.uc_hook_h()
            status = _ucmod.uclib.uc_hook_add(
                uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_BLOCK,
                ctypes.c_void_p(native[1]), ctypes.cast(self._ctx, ctypes.c_void_p),
                ctypes.c_uint64(1), ctypes.c_uint64(0))
            if status != unicorn.UC_ERR_OK:
                self.native = False
            else:
                self._handle = handle
        if not self.native:
            self._handle = uc.hook_add(unicorn.UC_HOOK_BLOCK, self._python_hook)

    def add_instructions(self, addresses) -> None:
        """Register instruction start addresses found by a sweep of loaded code."""
        for a in addresses:
            self._starts[a] = None
        lo, hi = min(self._starts), max(self._starts) + 16
        marks = np.zeros(hi - lo + 1, dtype=np.uint32)
        marks[np.fromiter((a - lo for a in self._starts), dtype=np.int64)] = 1
        prefix = np.zeros(hi - lo + 2, dtype=np.uint32)
        np.cumsum(marks, out=prefix[1:])
        self._prefix = prefix
        self._prefix_view = memoryview(prefix)
        self._ctx[0], self._ctx[1] = lo, hi - lo + 1
        self._ctx[5] = prefix.ctypes.data

    def _python_hook(self, uc, address, size, _user):
        c = self._ctx
        c[9], c[10] = address, size
        off = address - c[0]
        if 0 <= off and off + size <= c[1]:
            c[2] += int(self._prefix[off + size] - self._prefix[off])
            c[3] += 1
        else:
            c[4] += 1
            c[2] += 1
            c[6] += size
        if c[2] >= c[7]:
            uc.emu_stop()

    def unretire_rest_of_block(self, address: int, retired_here: bool = False) -> None:
        """Emulation left the current block at ``address``: take back what was counted ahead.

        The hook counts a whole block when it starts; if a VM exit or an exception stops
        the CPU before the instruction at ``address`` (or vtlab emulated it and jumped past
        it, ``retired_here=True``), the instructions from there to the end of the block
        were counted but did not run here.
        """
        c = self._ctx  # (a ctypes array of c_uint64: its items are Python ints)
        start, size = c[9], c[10]
        if not start <= address < start + size:
            return
        off, end = address - c[0], start + size - c[0]
        if 0 <= off and end <= c[1]:
            prefix = self._prefix_view
            over = prefix[end] - prefix[off] - (1 if retired_here else 0)
            if over > 0:
                c[2] = max(0, c[2] - over)

    @property
    def total(self) -> int:
        """Instructions retired so far (unswept blocks count as one instruction each)."""
        return int(self._ctx[2])

    @property
    def stop_at(self) -> int:
        """The total at which the hook stops emulation (the budget), or 2**64-1."""
        return int(self._ctx[7])

    @stop_at.setter
    def stop_at(self, value: int) -> None:
        self._ctx[7] = min(int(value), (1 << 64) - 1)

    @property
    def exhausted(self) -> bool:
        """True when the last run was stopped by the budget."""
        return self._ctx[2] >= self._ctx[7]

    @property
    def exact(self) -> bool:
        """True while every executed block lay inside the swept code."""
        return self._ctx[4] == 0

    @property
    def blocks(self) -> int:
        """Basic blocks executed."""
        return int(self._ctx[3] + self._ctx[4])

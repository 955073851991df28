"""Work-arounds for the places where Unicorn is not quite a CPU.

**Exceptions that are never delivered.**  Unicorn hands every exception to the
UC_HOOK_INTR hook *instead of* delivering it through the IDT.  QEMU's CPU model,
underneath, still remembers the exception as "being delivered" (``old_exception``), to
detect a double fault (SDM Vol. 3A 6.15, Table 6-5) - and since delivery never
completes, it never forgets: the next contributory exception becomes #DF, the one after
a triple fault.  Real hardware forgets once delivery succeeds, and so must we, because
vtlab delivers (or turns into VM exits) the exceptions itself.

Unicorn's API has no handle on that field, so :func:`forget_exception` finds it once per
process by experiment: raise #DE in a scratch CPU and see which 32-bit word of the saved
CPU context went from -1 to 0.  If exactly one did, clearing it afterwards (context save,
patch, restore) is safe; if the experiment is ambiguous, nothing is patched.
"""
from __future__ import annotations

import ctypes

import unicorn

_OFFSET: int | None | bool = False  # False: not calibrated yet


def _raw(ctx) -> tuple[int, bytes]:
    ptr = ctypes.cast(ctx.context, ctypes.c_void_p).value
    return ptr, ctypes.string_at(ptr, ctx.size)


#: ``xor cx, cx`` / ``div cx`` in 16-bit code (SDM Vol. 2: 31 /r XOR r/m16, r16; F7 /6
#: DIV r/m16): a division by zero, #DE.  Written as bytes: no assembler needed here.
_DIVIDE_BY_ZERO = bytes.fromhex("31c9" "f7f1")


def _calibrate() -> int | None:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, _DIVIDE_BY_ZERO)
    uc.hook_add(unicorn.UC_HOOK_INTR, lambda u, n, d: u.emu_stop())
    _, before = _raw(uc.context_save())
    uc.emu_start(0x1000, 0x2000, count=10)
    _, after = _raw(uc.context_save())
    hits = [i for i in range(0, min(len(before), len(after)) - 3, 4)
            if before[i:i + 4] == b"\xff\xff\xff\xff" and after[i:i + 4] == b"\0\0\0\0"]
    return hits[0] if len(hits) == 1 else None


def old_exception_offset() -> int | None:
    """Byte offset of QEMU's ``old_exception`` in a saved Unicorn x86 context (or None)."""
    global _OFFSET
    if _OFFSET is False:
        try:
            _OFFSET = _calibrate()
        except Exception:
            _OFFSET = None
    return _OFFSET  # type: ignore[return-value]


def forget_exception(uc: unicorn.Uc) -> bool:
    """Tell the CPU model that the last exception has been dealt with (see module doc)."""
    offset = old_exception_offset()
    if offset is None:
        return False
    ctx = uc.context_save()
    ptr, _ = _raw(ctx)
    ctypes.memmove(ptr + offset, b"\xff\xff\xff\xff", 4)
    uc.context_restore(ctx)
    return True

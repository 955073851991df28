"""Count the guest instructions retired, at native speed.

A Python callback per guest instruction (or even per basic block) slows Unicorn down
by one to two orders of magnitude.  Instead, on an x86-64 host, we hand Unicorn a
*native* basic-block hook: 90 bytes of machine code that add the number of
instructions in the block to a 64-bit counter.  The bytes ship ready-made in
:data:`_HOOK_CODE`; their assembly source, with every ctx field and register
explained, is ``counter_hook.asm`` next to this file (a test re-assembles it and checks
that the two still agree).  The number of instructions in a block is looked up in a
prefix-sum table built from a Capstone sweep of the loaded guest code:
``insns(block) = P[end] - P[start]``, where ``P[x]`` counts instruction starts below x.

Blocks outside the swept window count as one instruction each and are tallied
separately, so a total is never silently wrong: :attr:`InstructionCounter.exact` says
whether it is.  The count is taken when a block starts, so a run that stops in the
middle of a block (at a VM exit) has counted the rest of that block too.

The same hook enforces the instruction budget that stops runaway guests: once the
total reaches :attr:`InstructionCounter.stop_at` it tail-calls ``uc_emu_stop`` itself,
so a guest spinning in a tight loop is stopped without any Python running at all.

**Where the native hook runs.**  The code assumes the System V AMD64 calling convention
(arguments in rdi, rsi, rdx, rcx), which Linux, macOS and the BSDs use on x86-64.  It is
used only there (:func:`native_counter_supported`); Windows x64 (and Cygwin) pass
arguments in rcx, rdx, r8, r9, and other CPUs cannot run x86 code at all.  The page that
holds it is never writable and executable at once: it is mapped read/write, filled, and
then switched to read/execute with ``mprotect`` (the W^X rule hardened systems enforce).

Elsewhere, or where the OS refuses executable memory, a Python block hook gives the same
numbers, slowly (one Python call per basic block: a tight exit-free loop runs about two
orders of magnitude slower; ``make bench`` measures both paths), and a
:class:`SlowCounterWarning` says so once per process, naming the host.  Set
``VTLAB_PYTHON_COUNTER=1`` in the environment (read whenever a counter is created), or
pass ``native=False``, to take the Python path on purpose (the tests compare the two).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
import warnings

import numpy as np
import unicorn
from unicorn.unicorn_py3 import unicorn as _ucmod

_uc_emu_stop = _ucmod.uclib.uc_emu_stop

# ctx layout (u64 each, in this order; the hook addresses them as [rcx + 8*index]):
# window base, window size, total, blocks, outside_blocks, prefix-table pointer,
# outside_bytes, stop_at (instruction budget), address of uc_emu_stop, and the address
# and size of the block that started last (for unretire_rest_of_block)
_CTX_FIELDS = ("base", "limit", "total", "blocks", "outside_blocks", "prefix", "outside_bytes",
               "stop_at", "emu_stop", "last_block", "last_size")

#: The native block hook: ``counter_hook.asm`` assembled by Keystone (x86-64).  Called
#: as ``hook(uc, address, size, ctx)``, SysV ABI: rdi = uc, rsi = address, edx = size,
#: rcx = ctx.  Change it only together with the .asm file (tests/test_counter.py checks).
_HOOK_CODE = bytes.fromhex(
    "48897148"   # 00: mov [rcx + 72], rsi        ctx.last_block = address
    "4189d0"     # 04: mov r8d, edx
    "4c894150"   # 07: mov [rcx + 80], r8         ctx.last_size = size
    "4889f0"     # 0b: mov rax, rsi
    "482b01"     # 0e: sub rax, [rcx]             off = address - base
    "483b4108"   # 11: cmp rax, [rcx + 8]
    "732c"       # 15: jae outside                off >= limit (unsigned)
    "4189d0"     # 17: mov r8d, edx
    "4e8d0c00"   # 1a: lea r9, [rax + r8]         end = off + size
    "4c3b4908"   # 1e: cmp r9, [rcx + 8]
    "771f"       # 22: ja outside                 end > limit
    "4c8b5128"   # 24: mov r10, [rcx + 40]        r10 = prefix table
    "478b1c8a"   # 28: mov r11d, [r10 + r9*4]
    "452b1c82"   # 2c: sub r11d, [r10 + rax*4]    P[end] - P[off]
    "4c015910"   # 30: add [rcx + 16], r11        ctx.total += ...
    "48ff4118"   # 34: inc qword [rcx + 24]       ctx.blocks += 1
    "488b4110"   # 38: check: mov rax, [rcx + 16]
    "483b4138"   # 3c: cmp rax, [rcx + 56]
    "7312"       # 40: jae stop                   total >= stop_at
    "c3"         # 42: ret
    "48ff4120"   # 43: outside: inc qword [rcx + 32]   ctx.outside_blocks += 1
    "48ff4110"   # 47: inc qword [rcx + 16]       ctx.total += 1
    "4189d0"     # 4b: mov r8d, edx
    "4c014130"   # 4e: add [rcx + 48], r8         ctx.outside_bytes += size
    "ebe4"       # 52: jmp check
    "488b4140"   # 54: stop: mov rax, [rcx + 64]
    "ffe0"       # 58: jmp rax                    tail call uc_emu_stop(uc)
)

#: Set (to anything but "" or "0") to make new counters count in Python.
PYTHON_COUNTER_ENV = "VTLAB_PYTHON_COUNTER"


class SlowCounterWarning(RuntimeWarning):
    """The native instruction counter cannot run here; counting falls back to Python."""


def native_counter_supported() -> bool:
    """Can this process run the native hook (an x86-64 CPU with the SysV calling convention)?

    Checked afresh on every call (it is cheap), so tests can pretend to be another host.
    The pointer size rules out a 32-bit Python on a 64-bit CPU, where platform.machine()
    still says x86_64.
    """
    return (platform.machine().lower() in ("x86_64", "amd64")
            and sys.platform not in ("win32", "cygwin", "msys")
            and ctypes.sizeof(ctypes.c_void_p) == 8)


def _python_counter_requested() -> bool:
    return os.environ.get(PYTHON_COUNTER_ENV, "") not in ("", "0")


_warned = False  # one SlowCounterWarning per process is enough


def _host() -> str:
    """This host in words, e.g. ``macOS on arm64``, ``Windows on AMD64``."""
    system = {"darwin": "macOS", "win32": "Windows", "cygwin": "Cygwin", "msys": "MSYS2"}.get(
        sys.platform, sys.platform.capitalize())
    bits = "" if ctypes.sizeof(ctypes.c_void_p) == 8 else " (32-bit Python)"
    return f"{system} on {platform.machine() or 'an unknown CPU'}{bits}"


def _warn_slow(reason: str) -> None:
    """Say once per process that counting falls back to Python, and why.

    A learner on Apple silicon, ARM Linux or Windows sees this once (in the first cell
    that makes a guest), not once per guest: the message is about the machine, not the
    code.  Counts are identical on both paths (tests/test_counter.py), so it is a note on
    speed, not an error.
    """
    global _warned
    if _warned:
        return
    _warned = True
    # stacklevel 4: _warn_slow <- _choose_native <- InstructionCounter.__init__ <- the
    # code that made the counter (usually vtlab's Guest)
    warnings.warn(
        f"vtlab: counting guest instructions in Python on this host ({_host()}): the native "
        f"instruction counter {reason}.  Every count and result is the same; only long "
        "exit-free guest code runs slower (one Python call per basic block).  Shown once "
        f"per process; set {PYTHON_COUNTER_ENV}=1 to choose the Python path without it.",
        SlowCounterWarning, stacklevel=4)


def _executable_page(code: bytes) -> int:
    """Put ``code`` in a fresh page that ends up read+execute only; returns its address.

    The page is mapped with libc's own ``mmap`` (not Python's :mod:`mmap`, whose object
    would keep believing the page is writable, and whose buffer we would have to export
    to learn its address), filled while it is read/write, then ``mprotect``-ed to
    read/execute.  It is never unmapped: one page serves every counter in the process.
    Raises OSError if the OS refuses.
    """
    libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded into Python
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int64)  # off_t is 64-bit on x86-64 SysV
    libc.mprotect.restype = ctypes.c_int
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    size = mmap.PAGESIZE
    anonymous = getattr(mmap, "MAP_ANONYMOUS", None) or mmap.MAP_ANON
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | anonymous, -1, 0)
    if address is None or address == ctypes.c_void_p(-1).value:  # MAP_FAILED
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    ctypes.memmove(address, code, len(code))
    if libc.mprotect(address, size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        err = ctypes.get_errno()
        libc.munmap(address, size)
        raise OSError(err, f"mprotect(PROT_READ|PROT_EXEC): {os.strerror(err)}")
    return address


_page: int | None = None     # address of the hook's page once made
_page_error: str | None = None  # why it could not be made (then never tried again)


def _native_hook() -> int | None:
    """Address of the native hook (made on first use), or None if the OS refused a page.

    Callers check :func:`native_counter_supported` first: the page is only ever made on
    a SysV x86-64 host.
    """
    global _page, _page_error
    if _page is None and _page_error is None:
        try:
            _page = _executable_page(_HOOK_CODE)
        except (OSError, AttributeError) as exc:  # AttributeError: no mmap/mprotect in libc
            _page_error = str(exc)
    return _page


def _catch_lost_exceptions() -> None:
    """Make sure a Ctrl-C during an exit-free run on the Python path is not lost.

    Python checks for a pending signal (and for an exception another thread set, as the
    watchdog's RunTimeout) as a function *starts*: so on the Python path a KeyboardInterrupt
    is raised as :meth:`InstructionCounter._python_hook` is entered, before its ``try``.
    ctypes cannot pass it on to C; it reports it to :func:`sys.unraisablehook` and
    returns, and the guest would spin on (the binding's own hook wrapper has the same
    hole).  This hook, wrapped around whatever hook is installed, hands such an exception
    to the counter instead, which stops the engine so that Guest raises it.  Installed
    again whenever someone (pytest, per test) has put another hook in its place.
    """
    current = sys.unraisablehook
    if getattr(current, "_vtlab_counter", False):
        return

    def hook(unraisable) -> None:
        counter = getattr(unraisable.object, "__self__", None)
        if isinstance(counter, InstructionCounter) and unraisable.exc_value is not None:
            counter._stop_for(unraisable.exc_value)
        else:
            current(unraisable)

    hook._vtlab_counter = True
    sys.unraisablehook = hook


class InstructionCounter:
    """Counts instructions retired by one Unicorn instance; read :attr:`total`.

    ``native`` chooses the hook: None (the default) uses the native one wherever it can
    run, unless ``VTLAB_PYTHON_COUNTER`` is set; False always counts in Python; True
    insists on native code and raises RuntimeError where it cannot run.  The hook in use
    is reported by the :attr:`native` attribute.
    """

    def __init__(self, uc: unicorn.Uc, native: bool | None = None):
        self._uc = uc
        self._ctx = (ctypes.c_uint64 * len(_CTX_FIELDS))()
        # The same words as a memoryview of unsigned 64-bit items, for the Python hook
        # (a ctypes array item costs about twice as much to get or set).
        self._ctx_view = memoryview(self._ctx).cast("B").cast("Q")
        self._ctx[7] = (1 << 64) - 1
        self._ctx[8] = ctypes.cast(_ucmod.uclib.uc_emu_stop, ctypes.c_void_p).value
        self._prefix = np.zeros(2, dtype=np.uint32)
        # The same table as a memoryview: indexing it gives Python ints at a fraction of
        # the cost of numpy scalars (unretire_rest_of_block runs on every VM exit).
        self._prefix_view = memoryview(self._prefix)
        self._starts: dict[int, None] = {}  # instruction start addresses from sweeps
        self._handle = None
        #: True if the native hook counts for this engine, False if the Python one does.
        self.native = False
        self._python_callback = None  # the ctypes callback of the Python path (kept alive)
        address = self._choose_native(native)
        if address is not None:
            handle = _ucmod.uc_hook_h()
            status = _ucmod.uclib.uc_hook_add(
                uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_BLOCK,
                ctypes.c_void_p(address), ctypes.cast(self._ctx, ctypes.c_void_p),
                ctypes.c_uint64(1), ctypes.c_uint64(0))
            if status == unicorn.UC_ERR_OK:
                self._handle, self.native = handle, True
            elif native:
                raise RuntimeError(f"uc_hook_add refused the native hook: {unicorn.UcError(status)}")
            else:
                _warn_slow(f"was refused by Unicorn ({unicorn.UcError(status)})")
        if not self.native:
            self._handle = self._add_python_hook(uc)

    def _add_python_hook(self, uc: unicorn.Uc):
        """Register :meth:`_python_hook` as a raw ctypes block hook; returns its handle.

        Not through ``uc.hook_add``: the binding wraps each callback in two more Python
        frames, which roughly doubles the cost of a block on this path (it runs once per
        basic block).  A block hook has the code-hook signature, so the binding's
        HOOK_CODE_CFUNC type fits.  The callback object must live as long as the engine
        may call it: the engine's own table of callbacks (``Uc._callbacks``, where
        hook_add keeps its own) holds it, as does the counter.
        """
        _catch_lost_exceptions()
        self._python_callback = _ucmod.HOOK_CODE_CFUNC(self._python_hook)
        handle = _ucmod.uc_hook_h()
        status = _ucmod.uclib.uc_hook_add(
            uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_BLOCK,
            ctypes.cast(self._python_callback, ctypes.c_void_p), None,
            ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)
        callbacks = getattr(uc, "_callbacks", None)
        if isinstance(callbacks, dict):
            callbacks[handle.value] = self._python_callback
        return handle

    @staticmethod
    def _choose_native(native: bool | None) -> int | None:
        """The native hook's address if this counter should use it, else None."""
        if native is False or (native is None and _python_counter_requested()):
            return None  # asked for the Python path: no warning
        if not native_counter_supported():
            why = ("is x86-64 machine code for the System V calling convention, so it needs "
                   "an x86-64 SysV host (Linux, macOS or a BSD on an x86-64 CPU, 64-bit Python)")
            if native:
                raise RuntimeError(f"vtlab: the native instruction counter {why}")
            _warn_slow(why)
            return None
        address = _native_hook()
        if address is None:
            why = f"could not get an executable page ({_page_error})"
            if native:
                raise RuntimeError(f"vtlab: the native instruction counter {why}")
            _warn_slow(why)
        return address

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

    def _python_hook(self, uch, address, size, _user):
        """The native hook's work in Python (see counter_hook.asm), for other hosts.

        Called by the engine through ctypes with its C handle ``uch``.  An exception
        cannot travel through the C code back to emu_start, and on this path a Ctrl-C
        (KeyboardInterrupt) or the watchdog's RunTimeout is raised *here*, in the only
        Python code running: so it is handled as the binding's own hook wrapper does it
        (which Guest relies on): kept in ``Uc._hook_exception``, the engine stopped, and
        Guest raises it once emu_start has returned.
        """
        try:
            c = self._ctx_view  # the ctx through a memoryview: faster items than ctypes'
            c[9] = address
            c[10] = size
            off = address - c[0]
            if 0 <= off and off + size <= c[1]:
                prefix = self._prefix_view  # Python ints, cheaper than numpy scalars
                total = c[2] + prefix[off + size] - prefix[off]
                c[3] += 1
            else:
                total = c[2] + 1
                c[4] += 1
                c[6] += size
            c[2] = total
            if total >= c[7]:
                _uc_emu_stop(uch)
        except BaseException as exc:
            self._stop_for(exc)

    def _stop_for(self, exc: BaseException) -> None:
        """Stop the engine and leave ``exc`` for Guest to raise after emu_start returns."""
        uc = self._uc
        if uc._hook_exception is None:  # the first exception wins, as in the binding
            uc._hook_exception = exc
        _uc_emu_stop(uc._uch)

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
        # The block now ends here as far as the count goes, so taking back "the rest" a
        # second time (a run sliced right after an exit handled in place) changes nothing.
        c[10] = address - start
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

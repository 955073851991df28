"""Guest-physical memory: reading, writing and protecting the guest's RAM.

:class:`GuestMemory` is one part of :class:`vtlab.cpu.guest.Guest`.  Addresses are
guest-physical (what the CPU puts on its bus after segmentation and paging), so these
calls never fault the way a guest access would: they are the view of the machine from
outside, as a hypervisor or a debugger has it.
"""
from __future__ import annotations

import ctypes
import struct

import unicorn
from unicorn.unicorn_py3 import unicorn as _ucmod

_uc_mem_read = _ucmod.uclib.uc_mem_read

#: What :meth:`GuestMemory.read` and :meth:`GuestMemory.write` raise for an address with
#: no RAM behind it, for code above the processor layer that must not import Unicorn.
UnmappedMemoryError = unicorn.UcError


class GuestMemory:
    """Guest-physical memory access (a part of :class:`~vtlab.cpu.guest.Guest`).

    Relies on the Guest for ``uc`` (the engine) and ``_uch`` (its C handle).
    """

    def _init_memory(self) -> None:
        """Set up the buffers :meth:`memory_holds` reuses."""
        self._insn_buf = ctypes.create_string_buffer(16)  # for memory_holds (x86: <= 15 bytes)

    def read(self, address: int, size: int) -> bytes:
        """Read guest-physical memory."""
        return bytes(self.uc.mem_read(address, size))

    def memory_holds(self, address: int, data: bytes) -> bool:
        """Does guest-physical memory at ``address`` hold ``data`` (an instruction's bytes)?

        ``read(address, len(data)) == data``, without the binding's bytearray and copy:
        the exit path asks this once per sensitive instruction to catch self-modifying
        code.  Raises ``UcError`` for unmapped memory, as :meth:`read` does.
        """
        size = len(data)
        if size > 16:
            return self.read(address, size) == data
        status = _uc_mem_read(self._uch, address, self._insn_buf, size)
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)
        return self._insn_buf.raw[:size] == data

    def write(self, address: int, data: bytes) -> None:
        """Write guest-physical memory."""
        self.uc.mem_write(address, bytes(data))

    def read_u8(self, a: int) -> int:
        return self.read(a, 1)[0]

    def read_u16(self, a: int) -> int:
        return struct.unpack("<H", self.read(a, 2))[0]

    def read_u32(self, a: int) -> int:
        return struct.unpack("<I", self.read(a, 4))[0]

    def read_u64(self, a: int) -> int:
        return struct.unpack("<Q", self.read(a, 8))[0]

    def write_u64(self, a: int, v: int) -> None:
        self.write(a, struct.pack("<Q", v))

    def protect(self, address: int, size: int, read: bool = True, write: bool = True,
                execute: bool = True) -> None:
        """Allow or forbid reading, writing and executing guest-physical memory.

        ``address`` and ``size`` must be multiples of 4 KiB (whole pages).  This works
        below the guest's own page tables, which cannot see or change it.  (With EPT on,
        :mod:`vtlab.cpu.ept` sets Unicorn's map and protections from the EPT paging
        structures at VM entry, replacing what was set here.)  A guest access it forbids
        stops the emulated CPU: in a bare run, an exception.
        """
        perms = ((unicorn.UC_PROT_READ if read else 0) | (unicorn.UC_PROT_WRITE if write else 0)
                 | (unicorn.UC_PROT_EXEC if execute else 0))
        self.uc.mem_protect(address, size, perms)

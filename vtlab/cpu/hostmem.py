"""Host-physical memory: where the VMM keeps VMXON/VMCS regions and bitmaps.

The guest's memory lives in Unicorn; the structures that only the VMM and the VMX
logic touch (the VMXON region, VMCS regions, I/O bitmaps A and B, the MSR bitmap) live
here, addressed by host-physical address just as the VMX instructions expect.  Pages
that were never written read as zeros, as fresh RAM would after the VMM zeroed it.
"""
from __future__ import annotations

import struct

PAGE = 0x1000


class HostMemory:
    """Sparse host-physical memory in 4-KByte pages, with a simple page allocator."""

    def __init__(self, base: int = 0x1_0000_0000, width: int = 39):
        self.width = width
        self._pages: dict[int, bytearray] = {}
        self._next = base

    def alloc(self, pages: int = 1) -> int:
        """Allocate zeroed, 4-KByte aligned memory; returns its physical address."""
        address = self._next
        self._next += pages * PAGE
        for i in range(pages):
            self._pages[address + i * PAGE] = bytearray(PAGE)
        return address

    def _page(self, address: int) -> bytearray:
        base = address & ~(PAGE - 1)
        page = self._pages.get(base)
        if page is None:
            page = self._pages[base] = bytearray(PAGE)
        return page

    def read(self, address: int, size: int) -> bytes:
        out = bytearray()
        while size:
            page, off = self._page(address), address & (PAGE - 1)
            n = min(size, PAGE - off)
            out += page[off:off + n]
            address, size = address + n, size - n
        return bytes(out)

    def write(self, address: int, data: bytes) -> None:
        data = bytes(data)
        while data:
            page, off = self._page(address), address & (PAGE - 1)
            n = min(len(data), PAGE - off)
            page[off:off + n] = data[:n]
            address, data = address + n, data[n:]

    def read_u32(self, address: int) -> int:
        return struct.unpack("<I", self.read(address, 4))[0]

    def write_u32(self, address: int, value: int) -> None:
        self.write(address, struct.pack("<I", value & 0xFFFF_FFFF))

    def test_bit(self, address: int, bit: int) -> bool:
        """Bit ``bit`` of the bitmap that starts at ``address``."""
        return bool(self._page(address + bit // 8)[(address + bit // 8) & (PAGE - 1)] >> (bit % 8) & 1)

    def set_bit(self, address: int, bit: int, value: bool = True) -> None:
        a = address + bit // 8
        page, off = self._page(a), a & (PAGE - 1)
        if value:
            page[off] |= 1 << (bit % 8)
        else:
            page[off] &= ~(1 << (bit % 8)) & 0xFF

    def valid_address(self, address: int) -> bool:
        """4-KByte aligned and within the physical-address width (SDM 31.3, VMXON/VMPTRLD)."""
        return address & (PAGE - 1) == 0 and 0 <= address < (1 << self.width)

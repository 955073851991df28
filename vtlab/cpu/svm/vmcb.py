"""The VMCB: a 4-KByte page of ordinary memory at the APM's offsets (APM Vol. 2, Appendix B).

Where VMX hides the VMCS behind VMREAD/VMWRITE (its layout in memory is the processor's
secret; software names fields by encoding), SVM publishes the layout: the control area
at 000h-3FFh, the state-save area from 400h.  A VMM sets a VMCB up with plain stores and
reads the exit code with a plain load - :class:`Vmcb` does exactly that on
:class:`~vtlab.cpu.hostmem.HostMemory`, the memory the VMM owns.  Nothing is cached
here: every read goes to the bytes, so ``vmcb.memory.write(vmcb.address + 0x70, ...)``
is as good as ``vmcb.put(VmcbControl.EXITCODE, ...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...arch.svm import (CONTROL_WIDTH, SEG_ATTRIB, SEG_BASE, SEG_LIMIT, SEG_SELECTOR, SEGMENTS,
                         VMCB_SIZE, SvmExitCode, VmcbControl, VmcbSave, exit_name)
from ..hostmem import HostMemory

#: Widths of the save-area fields that are not 8 bytes (APM Vol. 2, Appendix B, Table B-2).
_SAVE_WIDTH = {VmcbSave.CPL: 1}


@dataclass(frozen=True)
class VmcbSegment:
    """A segment register as the state-save area holds it: selector, the 12-bit
    attribute (descriptor bits 47:40 and 55:52), limit and base (Appendix B)."""

    selector: int
    attrib: int
    limit: int
    base: int


def field_width(field: VmcbControl | VmcbSave) -> int:
    """Width in bytes of a VMCB field (segments: use :meth:`Vmcb.segment`)."""
    if isinstance(field, VmcbControl):
        return CONTROL_WIDTH[field]
    if field in SEGMENTS:
        raise ValueError(f"{field.name} is a 16-byte segment: use Vmcb.segment()/set_segment()")
    return _SAVE_WIDTH.get(field, 8)


#: (offset, width) of every named non-segment field, looked up once per access.
_LAYOUT: dict[object, tuple[int, int]] = {
    **{f: (int(f), CONTROL_WIDTH[f]) for f in VmcbControl},
    **{f: (int(f), _SAVE_WIDTH.get(f, 8)) for f in VmcbSave if f not in SEGMENTS},
}


class Vmcb:
    """The VMCB at host-physical ``address``: named fields over plain bytes.

    >>> from vtlab.cpu.hostmem import HostMemory
    >>> mem = HostMemory()
    >>> vmcb = Vmcb(mem, mem.alloc())
    >>> vmcb.put(VmcbControl.GUEST_ASID, 1)
    >>> mem.read(vmcb.address + 0x58, 4)    # the ASID is at 058h: it is just memory
    b'\\x01\\x00\\x00\\x00'
    """

    def __init__(self, memory: HostMemory, address: int):
        if address & 0xFFF:
            raise ValueError(f"a VMCB must be 4-KByte aligned (APM Vol. 2, 15.5.1): {address:#x} is not")
        self.memory = memory
        self.address = address
        # The page's bytes themselves (HostMemory keeps one bytearray per page, updated in
        # place): loads and stores go straight to them, as a CPU's would.
        self._bytes = memory._page(address)

    # --------------------------------------------------------------- raw bytes
    def read(self, offset: int, size: int) -> int:
        """The little-endian integer of ``size`` bytes at ``offset`` (a plain load)."""
        if not 0 <= offset <= VMCB_SIZE - size:
            raise ValueError(f"offset {offset:#x} (+{size}) is outside the 4-KByte VMCB")
        return int.from_bytes(self._bytes[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Store ``value`` as ``size`` little-endian bytes at ``offset`` (a plain store;
        high bits beyond the width are dropped, as a store of that size drops them)."""
        if not 0 <= offset <= VMCB_SIZE - size:
            raise ValueError(f"offset {offset:#x} (+{size}) is outside the 4-KByte VMCB")
        self._bytes[offset:offset + size] = (int(value) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def raw(self) -> bytes:
        """All 4096 bytes."""
        return self.memory.read(self.address, VMCB_SIZE)

    def hexdump(self, offset: int = 0, length: int = 0x100) -> str:
        """A hex dump of part of the VMCB, 16 bytes a line, offsets as the APM prints them."""
        data = self.memory.read(self.address + offset, length)
        return "\n".join(f"{offset + i:03X}h: " + " ".join(f"{b:02x}" for b in data[i:i + 16])
                         for i in range(0, len(data), 16))

    # ------------------------------------------------------------ named fields
    def get(self, field: VmcbControl | VmcbSave) -> int:
        """A control-area or save-area field by name, read from the bytes."""
        layout = _LAYOUT.get(field)
        if layout is None:
            field_width(field)   # raises the right error for a segment
        offset, size = layout
        return int.from_bytes(self._bytes[offset:offset + size], "little")

    def put(self, field: VmcbControl | VmcbSave, value: int) -> None:
        """Write a field by name (what a VMM's C code does with ``vmcb->control.x = v``)."""
        layout = _LAYOUT.get(field)
        if layout is None:
            field_width(field)   # raises the right error for a segment
        offset, size = layout
        self._bytes[offset:offset + size] = (int(value) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def segment(self, seg: VmcbSave) -> VmcbSegment:
        """One of the ten segment/descriptor-table registers of the save area."""
        if seg not in SEGMENTS:
            raise ValueError(f"{seg!r} is not a segment of the VMCB state-save area")
        at = int(seg)
        return VmcbSegment(self.read(at + SEG_SELECTOR, 2), self.read(at + SEG_ATTRIB, 2),
                           self.read(at + SEG_LIMIT, 4), self.read(at + SEG_BASE, 8))

    def set_segment(self, seg: VmcbSave, selector: int, attrib: int, limit: int, base: int) -> None:
        if seg not in SEGMENTS:
            raise ValueError(f"{seg!r} is not a segment of the VMCB state-save area")
        at = int(seg)
        self.write(at + SEG_SELECTOR, 2, selector)
        self.write(at + SEG_ATTRIB, 2, attrib)
        self.write(at + SEG_LIMIT, 4, limit)
        self.write(at + SEG_BASE, 8, base)

    def bit(self, field: VmcbControl, bit: int) -> bool:
        """Bit ``bit`` of an intercept vector (or any control field)."""
        return bool(self.get(field) >> bit & 1)

    def set_bits(self, field: VmcbControl, mask: int, on: bool = True) -> None:
        value = self.get(field)
        self.put(field, (value | int(mask)) if on else (value & ~int(mask)))

    # ------------------------------------------------------------------ views
    @property
    def exit_code(self) -> "SvmExitCode | int":
        """EXITCODE, as a named :class:`SvmExitCode` where it has a name."""
        return SvmExitCode.from_field(self.get(VmcbControl.EXITCODE))

    def as_dict(self) -> dict[str, int]:
        """Every named field with its value (segments as their four parts)."""
        out: dict[str, int] = {f"control.{f.name}": self.get(f) for f in VmcbControl if f is not VmcbControl.INSN_BYTES}
        for f in VmcbSave:
            if f in SEGMENTS:
                s = self.segment(f)
                for part in ("selector", "attrib", "limit", "base"):
                    out[f"save.{f.name}.{part}"] = getattr(s, part)
            else:
                out[f"save.{f.name}"] = self.get(f)
        return out

    def to_dataframe(self):
        """The fields as a pandas DataFrame: area, field, offset, width, value."""
        import pandas as pd

        rows = []
        for f in VmcbControl:
            rows.append(("control", f.name, int(f), CONTROL_WIDTH[f],
                         self.memory.read(self.address + f, CONTROL_WIDTH[f]).hex() if f is VmcbControl.INSN_BYTES
                         else hex(self.get(f))))
        for f in VmcbSave:
            if f in SEGMENTS:
                s = self.segment(f)
                rows.append(("save", f.name, int(f), 16,
                             f"sel={s.selector:#x} attrib={s.attrib:#x} limit={s.limit:#x} base={s.base:#x}"))
            else:
                rows.append(("save", f.name, int(f), field_width(f), hex(self.get(f))))
        return pd.DataFrame(rows, columns=["area", "field", "offset", "width", "value"])

    def __repr__(self) -> str:
        return f"Vmcb({self.address:#x}, EXITCODE={exit_name(self.exit_code)})"

"""The Virtual Machine Control Structure (SDM Vol. 3C, chapter 25).

A VMCS lives in a 4-KByte region of physical memory.  Only two things in that region
have an architectural format (SDM 25.2, Table 25-1): bits 30:0 of the first 4 bytes are
the **VMCS revision identifier** (bit 31 is the shadow-VMCS indicator) and the next 4
bytes are the **VMX-abort indicator**.  "The remainder of the VMCS region is used for
VMCS data ... The format of these data is implementation-specific", which is why
software must use VMREAD and VMWRITE and address each field by its 32-bit *encoding*
(Appendix B) rather than by an offset.

vtlab's implementation-specific format
--------------------------------------
vtlab's processor keeps the VMCS data of a VMCS in its region, in this layout (its own
choice, as any processor's is; :data:`REGION_LAYOUT` is the table):

========================== ===========================================================
byte offset                contents
========================== ===========================================================
0x000 (4 bytes)            revision identifier (bits 30:0), shadow-VMCS indicator (31)
0x004 (4 bytes)            VMX-abort indicator
0x008 (4 bytes)            launch state: 0 = clear, 1 = launched (SDM 25.1, 25.11.3)
0x00C (4 bytes)            reserved (0)
0x010 + 8 * i (8 bytes)    field number ``i`` of :class:`VmcsField`, in the order of
                           Appendix B, little-endian, the value zero-extended to 64
                           bits (16-bit, 32-bit, 64-bit and natural-width alike)
========================== ===========================================================

As a processor may (SDM 25.11.1), vtlab's keeps the data of each *active* VMCS on the
chip - the :class:`Vmcs` object, a cache that VMREAD and VMWRITE work on at dictionary
speed - and writes it to the region only when VMCLEAR makes the VMCS inactive; VMPTRLD
of an inactive VMCS fills the cache from the region.  So after VMCLEAR the region holds
the whole VMCS and a copy of it, made current with VMPTRLD, is the same VMCS.  Software
"should never access or modify the VMCS data of an active VMCS using ordinary memory
operations" (SDM 25.11.1): vtlab ignores such writes - the VMCS keeps its cached data
until VMCLEAR, which overwrites the data area with it - and only a VMPTRLD after
VMCLEAR reads the region again.  (The revision identifier is an exception: VMPTRLD
always checks the one in memory, as its pseudo-code says, SDM 31.3.)

The *launch state* (clear / launched, SDM 25.1) decides whether VMLAUNCH or VMRESUME
is the right instruction; VMCLEAR sets it back to clear.
"""
from __future__ import annotations

import enum
import struct
from typing import Iterator

from ..arch.vmcs_fields import (AccessType, FieldEncoding, VmcsField, VmcsArea,
                               decode_encoding, field_area)
from ..arch.errors import VmInstructionError
from ..errors import VmcsError

#: "Invalid" value of a VMCS pointer and of the VMCS link pointer (SDM 25.4.2, 27.3.1.5;
#: VMPTRST stores it when there is no current VMCS, 31.3).
INVALID_POINTER = 0xFFFF_FFFF_FFFF_FFFF


class LaunchState(str, enum.Enum):
    """Launch state of a VMCS (SDM 25.1)."""

    CLEAR = "clear"
    LAUNCHED = "launched"


def _field_name(encoding: int) -> str:
    try:
        return VmcsField(encoding).name   # (a *_HIGH member for a high access encoding)
    except ValueError:
        return f"{encoding:#06x}"


# ----------------------------------------------------- the region in memory
#: Size of a VMCS region (IA32_VMX_BASIC[44:32] reports 4096, SDM A.1).
REGION_SIZE = 0x1000
#: Byte offset of the launch state in vtlab's layout (0 = clear, 1 = launched).
LAUNCH_STATE_OFFSET = 8
#: Byte offset of the first field's 8-byte slot in vtlab's layout.
DATA_OFFSET = 0x10
#: vtlab's layout of the VMCS data: field -> byte offset of its 8-byte slot in the region.
REGION_LAYOUT: dict[VmcsField, int] = {f: DATA_OFFSET + 8 * i for i, f in enumerate(VmcsField)}

_FIELD_ORDER = tuple(int(f) for f in REGION_LAYOUT)
#: launch state, reserved dword, then one quadword per field: what VMCLEAR writes.
_IMAGE = struct.Struct(f"<II{len(_FIELD_ORDER)}Q")
_HEADER = struct.Struct("<II")
assert LAUNCH_STATE_OFFSET + _IMAGE.size <= REGION_SIZE


def lookup(encoding: int | str | VmcsField) -> FieldEncoding:
    """Decode an encoding (int, member or name) that this processor supports.

    Raises :class:`VmcsError` carrying VM-instruction error 12 ("VMREAD/VMWRITE from/to
    unsupported VMCS component") for anything that is not a field of SDM Appendix B.
    """
    if type(encoding) is not str:
        found = _LOOKUP.get(encoding)
        if found is not None:
            return found
    enc = _lookup(encoding)
    if type(encoding) is not str:
        _LOOKUP[int(encoding)] = enc
    return enc


#: encoding -> (read-only?, width in bits, full encoding, HIGH half?) for VMWRITE.
_WRITES: dict[int, tuple[bool, int, int, bool]] = {}

#: Decoded encodings by int (an int and its VmcsField member hash alike): every VMREAD
#: and VMWRITE goes through lookup(), so decoding each encoding once matters.
_LOOKUP: dict[int, FieldEncoding] = {}


def _lookup(encoding: int | str | VmcsField) -> FieldEncoding:
    """:func:`lookup` without the cache (names are not cached: they are the slow path anyway)."""
    if isinstance(encoding, str):
        try:
            encoding = VmcsField[encoding.upper()]
        except KeyError:
            raise VmcsError(f"there is no VMCS field named {encoding!r}",
                            VmInstructionError.UNSUPPORTED_VMCS_COMPONENT) from None
    try:
        enc = decode_encoding(int(encoding))
    except ValueError as exc:
        raise VmcsError(f"unsupported VMCS component {int(encoding):#x}: {exc} "
                        "(VM-instruction error 12)", VmInstructionError.UNSUPPORTED_VMCS_COMPONENT) from None
    if enc.field is None:
        raise VmcsError(
            f"unsupported VMCS component {int(encoding):#06x}: no field of SDM Appendix B has "
            f"this encoding (index {enc.index}, {enc.type.name}, {enc.width.name}); "
            "VM-instruction error 12", VmInstructionError.UNSUPPORTED_VMCS_COMPONENT)
    return enc


class Vmcs:
    """One VMCS as the processor holds it: revision identifier, abort indicator, launch
    state and fields - the on-chip copy of the region at :attr:`address`.

    While the VMCS is active it is the only up-to-date copy; VMCLEAR writes it to the
    region (:meth:`image`) and VMPTRLD of an inactive VMCS refills it from there
    (:meth:`load_image`), see the module doc.  What a processor keeps *about* the VMCS it
    is running - which guest-state fields it has not saved yet, which fields software
    wrote since the last VM entry - lives with the vCPU
    (:class:`vtlab.cpu.vmcs_view.CurrentVmcs`).

    Learners normally reach fields through VMREAD/VMWRITE (:class:`vtlab.cpu.vmx.VmxCpu`),
    or through the current VMCS (``cpu.current_vmcs[VmcsField.GUEST_RIP]``) as KVM uses its
    ``vmcs_read64()`` helpers: same checks, errors raised instead of returned.
    """

    def __init__(self, address: int, revision_id: int):
        self.address = address
        self.revision_id = revision_id
        self.abort_indicator = 0
        self.launch_state = LaunchState.CLEAR
        self._data: dict[int, int] = {}

    # ------------------------------------------------ the region in memory
    def image(self) -> bytes:
        """The bytes VMCLEAR writes at offset :data:`LAUNCH_STATE_OFFSET` of the region:
        launch state, a reserved dword and every field's slot (vtlab's layout, see the
        module doc).  The revision identifier and the abort indicator are not written:
        software writes the first, and the processor the second only on a VMX abort."""
        get = self._data.get
        mask = 0xFFFF_FFFF_FFFF_FFFF
        return _IMAGE.pack(int(self.launch_state is LaunchState.LAUNCHED), 0,
                           *[get(f, 0) & mask for f in _FIELD_ORDER])

    def load_image(self, region: bytes) -> None:
        """Fill this VMCS from the whole ``region`` (REGION_SIZE bytes, as VMPTRLD of an
        inactive VMCS reads it): revision identifier, abort indicator, launch state and
        every field.  A launch-state value other than 0 or 1 reads as clear."""
        revision, self.abort_indicator = _HEADER.unpack_from(region, 0)
        self.revision_id = revision & 0x7FFF_FFFF
        launch, _, *values = _IMAGE.unpack_from(region, LAUNCH_STATE_OFFSET)
        self.launch_state = LaunchState.LAUNCHED if launch == 1 else LaunchState.CLEAR
        data = self._data   # (the same dict: the VM-exit path may hold it)
        data.clear()
        data.update((f, v) for f, v in zip(_FIELD_ORDER, values) if v)

    # ----------------------------------------------------------------- access
    def read(self, encoding: int | str | VmcsField) -> int:
        """VMREAD semantics: the field's value (the high half for a HIGH encoding)."""
        enc = lookup(encoding)
        value = self._data.get(enc.full_encoding, 0)
        return value >> 32 if enc.access_type is AccessType.HIGH else value

    def write(self, encoding: int | str | VmcsField, value: int, *, truncate: bool = False) -> FieldEncoding:
        """VMWRITE semantics for software: read-only fields refuse (error 13).

        A value wider than the field raises :class:`VmcsError`; with ``truncate=True``
        the high bits are dropped as the VMWRITE instruction does (SDM 31.3, VMWRITE).
        Returns the decoded encoding (the caller may want its type or full encoding).
        """
        enc = lookup(encoding)
        plan = _WRITES.get(enc.encoding)
        if plan is None:
            plan = _WRITES[enc.encoding] = (enc.read_only, enc.access_bits, enc.full_encoding,
                                            enc.access_type is AccessType.HIGH)
        read_only, bits, full, high = plan
        if read_only:
            raise VmcsError(
                f"VMWRITE to read-only VMCS component {_field_name(enc.encoding)} "
                f"({enc.encoding:#06x}, a VM-exit information field): VM-instruction error 13",
                VmInstructionError.VMWRITE_READ_ONLY_VMCS_COMPONENT)
        value = int(value)
        if value < 0 or value >> bits:
            if not truncate:
                raise VmcsError(
                    f"value {value:#x} does not fit the {bits}-bit field "
                    f"{_field_name(enc.encoding)} ({enc.encoding:#06x})")
            value &= (1 << bits) - 1
        if high:
            value = (self._data.get(full, 0) & 0xFFFF_FFFF) | (value << 32)
        self._data[full] = value
        return enc

    def get(self, field: VmcsField | int) -> int:
        """Fast internal read of a full field (no checks)."""
        return self._data.get(field, 0)

    def put(self, field: VmcsField | int, value: int) -> None:
        """The processor's own write of a field (exit information, SDM 28.2; guest state
        saved on VM exit, SDM 28.3): no read-only check, not a software write."""
        self._data[int(field)] = int(value)

    def put_many(self, values) -> None:
        """Several processor writes at once: ``values`` is an iterable of (int encoding,
        int value) pairs (the VM-exit path writes nine exit-information fields)."""
        self._data.update(values)

    # The first layout's names of :meth:`put`.
    set_exit_info = save_guest = put
    set_exit_infos = put_many

    __getitem__ = read

    def __setitem__(self, encoding, value) -> None:
        self.write(encoding, value)

    # ------------------------------------------------------------- inspection
    def fields(self, area: VmcsArea | None = None) -> Iterator[tuple[VmcsField, int]]:
        """Every field (optionally of one area) with its current value."""
        for f in VmcsField:
            if area is None or field_area(f) is area:
                yield f, self._data.get(int(f), 0)

    def to_dataframe(self, nonzero: bool = False):
        """All fields as a pandas DataFrame: area, encoding, width, read-only, value."""
        return fields_dataframe(self.fields(), nonzero)

    def clear(self) -> None:
        """The launch-state part of VMCLEAR (SDM 31.3): launch state := clear.  (VMCLEAR
        itself, :meth:`vtlab.cpu.vmx.VmxCpu.vmclear`, also writes the data to the region.)"""
        self.launch_state = LaunchState.CLEAR

    def __repr__(self) -> str:
        return (f"<Vmcs at {self.address:#x} revision {self.revision_id:#x} "
                f"launch state {self.launch_state.value}, {len(self._data)} fields set>")


def fields_dataframe(fields, nonzero: bool = False):
    """(field, value) pairs as the DataFrame :meth:`Vmcs.to_dataframe` shows."""
    import pandas as pd

    rows = []
    for f, value in fields:
        if nonzero and not value:
            continue
        enc = decode_encoding(int(f))
        rows.append({"field": f.name, "area": field_area(f).name, "encoding": f"{int(f):#06x}",
                     "width": enc.width.name, "read_only": enc.read_only,
                     "value": f"{value:#x}"})
    return pd.DataFrame(rows)

"""The current VMCS as the processor sees it: its copy of the VMCS plus what the vCPU keeps about it.

A processor may keep the data of an active VMCS on the chip (SDM Vol. 3C 25.11.1:
software must not touch the region in memory directly, only with VMREAD/VMWRITE).
vtlab's processor does: the :class:`vtlab.cpu.vmcs.Vmcs` object is that on-chip copy,
written to the region in memory by VMCLEAR and read from it by VMPTRLD (see
:mod:`vtlab.cpu.vmcs` for the layout).  On top of it, it does the two things a real
processor gets for free from such a cache:

* after a VM exit it saves the guest state *lazily* - the first VMREAD of a guest-state
  field completes the save (:class:`vtlab.cpu.guest_state.GuestStateCache`);
* it notes which fields software wrote, so the next VM entry loads just those into the
  CPU and re-checks just the entry rules that read them.

:class:`CurrentVmcs` is that view.  It behaves like :class:`vtlab.cpu.vmcs.Vmcs` (read,
write, ``[]``, fields, to_dataframe, launch state) and is what ``cpu.current_vmcs`` and
``vm.vmcs`` return; the :class:`Vmcs` object itself holds nothing but fields, revision
identifier, abort indicator and launch state - what the region holds after VMCLEAR.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from ..arch.vmcs_fields import FieldType, VmcsArea, VmcsField
from .vmcs import LaunchState, Vmcs, fields_dataframe, lookup

if TYPE_CHECKING:
    from .guest_state import GuestStateCache

_GUEST_STATE = FieldType.GUEST_STATE
_ENTRY_CONTROLS = int(VmcsField.VM_ENTRY_CONTROLS)

#: encoding -> (full encoding, HIGH half?, saved lazily?, field type): what a VMREAD or
#: VMWRITE of the current VMCS needs to know, decoded once per encoding.
_PLANS: dict[int, tuple[int, bool, bool, FieldType]] = {}

#: encoding -> (full encoding, mask of its width, field type) for the fields a VMWRITE
#: may write whole (not read-only, not a HIGH half): filled by the first such write.
_FAST_WRITES: dict[int, tuple[int, int, FieldType]] = {}


def _plan(encoding) -> tuple[int, bool, bool, FieldType]:
    enc = lookup(encoding)   # raises VmcsError (VM-instruction error 12) for no such field
    full = enc.full_encoding
    plan = (full, enc.access_type.name == "HIGH",
            enc.type is _GUEST_STATE or full == _ENTRY_CONTROLS, enc.type)
    if type(encoding) is not str:
        _PLANS[int(encoding)] = plan
    return plan


class CurrentVmcs:
    """A VMCS region seen through the vCPU that has it current (see the module doc)."""

    __slots__ = ("region", "_state", "_written")

    def __init__(self, region: Vmcs, state: "GuestStateCache", written: set[int]):
        self.region = region
        self._state = state
        #: fields software wrote since the entry checks last ran on this VMCS
        self._written = written

    # --------------------------------------------------------------- identity
    @property
    def address(self) -> int:
        return self.region.address

    @property
    def revision_id(self) -> int:
        return self.region.revision_id

    @property
    def launch_state(self) -> LaunchState:
        return self.region.launch_state

    @launch_state.setter
    def launch_state(self, value: LaunchState) -> None:
        self.region.launch_state = value

    @property
    def abort_indicator(self) -> int:
        return self.region.abort_indicator

    def __eq__(self, other) -> bool:
        if isinstance(other, CurrentVmcs):
            return other.region is self.region
        return other is self.region

    def __hash__(self) -> int:
        return id(self.region)

    # ----------------------------------------------------------------- access
    def read(self, encoding: int | str | VmcsField) -> int:
        """VMREAD semantics; a guest-state field first completes a lazy save."""
        plan = _PLANS.get(encoding) if type(encoding) is not str else None
        if plan is None:
            plan = _plan(encoding)
        full, high, lazy, _ = plan
        if lazy and self._state.pending:
            self._state.complete(self.region, full)
        value = self.region._data.get(full, 0)
        return value >> 32 if high else value

    def get(self, field: VmcsField | int) -> int:
        """Fast read of a full field (no encoding checks), completing a lazy save."""
        if self._state.pending:
            self._state.complete(self.region, field)
        return self.region._data.get(field, 0)

    def write(self, encoding: int | str | VmcsField, value: int, *, truncate: bool = False) -> None:
        """VMWRITE semantics for software (read-only fields refuse with error 13)."""
        fast = _FAST_WRITES.get(encoding) if type(encoding) is not str else None
        if fast is not None and type(value) is int and (truncate or 0 <= value <= fast[1]):
            # A field this VMWRITE may write whole, with a value it takes (or truncates,
            # SDM 31.3 VMWRITE): all Vmcs.write would do is store it.  (A VMM writes
            # GUEST_RIP after nearly every exit.)
            full, mask, field_type = fast
            self.region._data[full] = value & mask
            self._written.add(full)
            self._state.software_wrote(self.region, full, field_type)
            return
        plan = _PLANS.get(encoding) if type(encoding) is not str else None
        if plan is None:
            plan = _plan(encoding)
        full, high, _, field_type = plan
        if high and field_type is _GUEST_STATE and self._state.pending:
            self._state.complete(self.region)  # the other half must be the saved value
        enc = self.region.write(encoding, value, truncate=truncate)
        self._written.add(full)
        self._state.software_wrote(self.region, full, field_type)
        if not high and not enc.read_only and isinstance(encoding, int):
            _FAST_WRITES[int(encoding)] = (full, (1 << enc.access_bits) - 1, field_type)

    __getitem__ = read

    def __setitem__(self, encoding, value) -> None:
        self.write(encoding, value)

    # The processor's own writes (exit information, saved guest state).
    def put(self, field: VmcsField | int, value: int) -> None:
        self.region.put(field, value)

    set_exit_info = save_guest = put

    # ------------------------------------------------------------- inspection
    def fields(self, area: VmcsArea | None = None) -> Iterator[tuple[VmcsField, int]]:
        """Every field (optionally of one area) with its current value."""
        self._state.complete(self.region)
        return self.region.fields(area)

    def to_dataframe(self, nonzero: bool = False):
        """All fields as a pandas DataFrame: area, encoding, width, read-only, value."""
        return fields_dataframe(self.fields(), nonzero)

    def clear(self) -> None:
        """The launch state becomes clear, with a pending lazy guest-state save completed
        first.  (This is not the instruction: ``cpu.vmclear(address)`` also writes the VMCS
        to its region, makes it inactive and, if current, not current.)"""
        self._state.complete(self.region)
        self.region.clear()

    def __repr__(self) -> str:
        return repr(self.region).replace("<Vmcs", "<current Vmcs", 1)


class _Detached:
    """The vCPU state of a VmxCpu without a guest CPU: nothing is ever pending."""

    pending = False

    def complete(self, region=None, field=None) -> None:
        return None

    def software_wrote(self, region, field, field_type) -> None:
        return None


#: Shared by every guest-less VmxCpu (the VMX-instruction exercises of notebook 02).
DETACHED = _Detached()

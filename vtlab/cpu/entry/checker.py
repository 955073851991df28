"""Running the VM-entry rules: all of them, or only those a change may have broken.

A real processor runs every check of SDM 27.2-27.3 on every VMLAUNCH/VMRESUME.  vtlab
gets the same answers with less work: a rule is a pure function of the fields it
``reads`` (and, for some, of processor state), so a rule whose fields kept their values
since the last check of a VMCS keeps its verdict.  After a VM exit the VMM's handler
typically writes nothing but GUEST_RIP, and the rules reading GUEST_RIP hold while it is
below 4 GBytes (a promise of the registry, see :mod:`.registry`): so VMRESUME then re-runs
no rule at all instead of ~180.

:class:`EntryChecker` keeps each VMCS's verdicts.  The caller says which fields changed
since the previous check of that VMCS: VMWRITEs, and guest state the VM exit saved with a
new value (vtlab's vCPU tracks both, see :class:`vtlab.cpu.guest_state.GuestStateCache`).
A superset is always safe; a field left out is a verdict left stale, which is why every
rule's ``reads`` is tested to be complete (tests/test_entry_rules.py).
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Iterable

from ...arch.vmcs_fields import VmcsField as F
from .registry import Rule, Violation, rules

if TYPE_CHECKING:
    from ..vmcs import Vmcs
    from ..vmx import VmxCpu

_GUEST_RIP = int(F.GUEST_RIP)
_NOTHING: frozenset[int] = frozenset()


def processor_key(cpu: "VmxCpu") -> tuple:
    """A snapshot of what the ``processor=True`` rules read outside the VMCS:
    ``(cpu.caps, physical-address width, copy of the capabilities' attributes)``.

    The attributes of :class:`vtlab.cpu.capabilities.VmxCapabilities` are what its
    capability MSRs (``caps.msrs()``) are computed from; the dicts among them are copied,
    so that replacing one control's allowed settings in place shows as a change.
    """
    caps = cpu.caps
    return caps, cpu.memory.width, {k: v.copy() if isinstance(v, (dict, list, set)) else v
                                    for k, v in vars(caps).items()}


def same_processor(cpu: "VmxCpu", key: tuple) -> bool:
    """Is the processor state :func:`processor_key` took still the same?  (One identity
    test and one C-level dict comparison: a fraction of a microsecond, unlike building
    ``caps.msrs()``.)"""
    caps = cpu.caps
    return caps is key[0] and cpu.memory.width == key[1] and caps.__dict__ == key[2]


def _region(vmcs: Any) -> Any:
    """What the verdicts are kept under: the VMCS region (``cpu.current_vmcs`` is a view
    of it, :class:`vtlab.cpu.vmcs_view.CurrentVmcs`, which reads through the lazy save)."""
    return getattr(vmcs, "region", vmcs)


class _State:
    """The verdicts of every rule for one VMCS, as of its last check."""

    __slots__ = ("results", "failing", "caps", "width", "caps_dict", "rip", "data", "__weakref__")

    def __init__(self, n: int):
        self.results: list[tuple[Violation, ...]] = [()] * n   #: per rule index
        self.failing: set[int] = set()                         #: indexes with violations
        self.caps: Any = None          #: cpu.caps, cpu.memory.width and a copy of the
        self.width = -1                #: capabilities' attributes at the check
        self.caps_dict: dict | None = None
        self.rip = -1                                          #: GUEST_RIP at the check
        #: the VMCS region's field dict (a Vmcs keeps the one dict for life), or None
        self.data: dict[int, int] | None = None


class EntryChecker:
    """The VM-entry checks of one processor, re-running only what a VMWRITE may have changed.

    ``violations(cpu, vmcs)`` runs every rule; ``violations(cpu, vmcs, changed)``, with
    ``changed`` the set of field encodings written since the previous check of the same
    VMCS, re-runs only the rules whose ``reads`` meet it and reuses the other verdicts.
    GUEST_RIP is also compared with its value at the last check, so a caller that does not
    count RIP writes as changes is still right; the processor-dependent rules re-run
    whenever the capability MSRs or the physical-address width differ.  The field -> rules
    index comes from the rules' ``reads`` once, here.

    VM entry uses the processor's checker, ``cpu.entry_checker``; :func:`entry_violations`
    is the stateless full check.
    """

    def __init__(self, rule_list: Iterable[Rule] | None = None):
        self.rules: tuple[Rule, ...] = tuple(rules() if rule_list is None else rule_list)
        self._fns = tuple(r.fn for r in self.rules)
        index: dict[int, set[int]] = {}
        for i, r in enumerate(self.rules):
            for f in r.reads:
                index.setdefault(int(f), set()).add(i)
        #: field encoding -> indexes (into :attr:`rules`) of the rules that read it
        self.by_field: dict[int, frozenset[int]] = {f: frozenset(ix) for f, ix in index.items()}
        self._processor = frozenset(i for i, r in enumerate(self.rules) if r.processor)
        self._rip_rules = self.by_field.get(_GUEST_RIP, frozenset())
        # The per-entry path compares GUEST_RIP itself, so a written RIP needs no lookup.
        self._by_field = {f: ix for f, ix in self.by_field.items() if f != _GUEST_RIP}
        self._states: "weakref.WeakKeyDictionary[Any, _State]" = weakref.WeakKeyDictionary()
        self._last_vmcs: Any = None
        self._last_state: _State | None = None
        #: indexes of the rules the latest call ran (all of them for a full check)
        self.last_run: frozenset[int] | range = range(0)

    @classmethod
    def of(cls, cpu: "VmxCpu") -> "EntryChecker":
        """The checker of ``cpu`` (created on first use and kept as ``cpu.entry_checker``)."""
        try:
            return cpu.entry_checker
        except AttributeError:
            checker = cpu.entry_checker = cls()
            return checker

    def rules_reading(self, field: F | int) -> tuple[Rule, ...]:
        """The rules that read ``field``, in checking order: those a VMWRITE of it re-runs."""
        return tuple(self.rules[i] for i in sorted(self.by_field.get(int(field), ())))

    @property
    def last_run_ids(self) -> list[str]:
        """The ids of the rules the latest call ran, in checking order."""
        return [self.rules[i].id for i in sorted(self.last_run)]

    def forget(self, vmcs: Any) -> None:
        """Drop the verdicts kept for ``vmcs``: its next check runs every rule."""
        self._states.pop(_region(vmcs), None)
        if self._last_vmcs is not None and _region(self._last_vmcs) is _region(vmcs):
            self._last_vmcs = self._last_state = None

    def violations(self, cpu: "VmxCpu", vmcs: "Vmcs", changed: Iterable[int] | None = None) -> list[Violation]:
        """Every rule ``vmcs`` breaks, in checking order (controls, host state, guest state).

        ``changed=None`` runs every rule.  Otherwise ``changed`` holds the field encodings
        written since this checker last checked ``vmcs`` (a superset is fine): only the rules
        reading one of them, or processor state if it differs, run - and the rules reading
        GUEST_RIP if it moved to or from an address at or above 4 GBytes (below, they hold).
        """
        # This runs on every VMLAUNCH/VMRESUME: the common case (after a VM exit whose
        # handler advanced GUEST_RIP) must cost well under a microsecond, so it builds no
        # objects and calls nothing but the rules that re-run.
        state = self._last_state
        if vmcs is not self._last_vmcs or changed is None or state is None:
            state = self._states.get(_region(vmcs)) if changed is not None else None
            if state is None:
                state = self._full(cpu, vmcs)
                return self._report(state)
            self._last_vmcs, self._last_state = vmcs, state
        get = vmcs.get
        todo = None
        # GUEST_RIP straight from the region: the VM exit saves it at once, never lazily
        # (SDM 28.3 saves it with the rest; vtlab's lazy save leaves RIP out), so a view's
        # get() would return the same after two calls more.
        data = state.data
        rip = get(_GUEST_RIP) if data is None else data.get(_GUEST_RIP, 0)
        if rip != state.rip:   # a VMCS need not count VMWRITEs of GUEST_RIP as changes
            state.rip = rip
            # The RIP rules hold below 4 GBytes, whatever else the VMCS holds (see
            # .registry): they run only above, or to clear the verdicts of a failed check.
            if rip >> 32 or state.failing:
                todo = self._rip_rules
        if changed:
            by_field = self._by_field
            for f in changed:
                ix = by_field.get(f)
                if ix is not None and ix is not todo:
                    todo = ix if todo is None else todo | ix
        caps = cpu.caps   # same_processor(), inlined
        if caps is not state.caps or cpu.memory.width != state.width or caps.__dict__ != state.caps_dict:
            self._note_processor(cpu, state)
            todo = self._processor if todo is None else todo | self._processor
        if todo is None:
            self.last_run = _NOTHING
        else:   # _run(), inlined: this is the per-entry path
            self.last_run = todo
            fns, results, failing = self._fns, state.results, state.failing
            for i in todo:
                found = fns[i](get, cpu)
                if found:
                    violation = self.rules[i].violation
                    results[i] = tuple(violation(m) for m in found)
                    failing.add(i)
                elif i in failing:
                    failing.discard(i)
                    results[i] = ()
        if not state.failing:
            return []
        return self._report(state)

    # ------------------------------------------------------------ internals
    @staticmethod
    def _report(state: _State) -> list[Violation]:
        results = state.results
        return [v for i in sorted(state.failing) for v in results[i]]

    @staticmethod
    def _note_processor(cpu: "VmxCpu", state: _State) -> None:
        """Remember the processor state the processor-dependent verdicts were made with."""
        state.caps, state.width, state.caps_dict = processor_key(cpu)

    def _full(self, cpu: "VmxCpu", vmcs: "Vmcs") -> _State:
        state = _State(len(self.rules))
        get = vmcs.get
        state.rip = get(_GUEST_RIP)
        data = getattr(_region(vmcs), "_data", None)
        state.data = data if type(data) is dict else None
        self._note_processor(cpu, state)
        self._run(cpu, get, state, range(len(self.rules)))
        self._states[_region(vmcs)] = state
        self._last_vmcs, self._last_state = vmcs, state
        return state

    def _run(self, cpu: "VmxCpu", get: Any, state: _State, todo: Iterable[int]) -> None:
        """Run the rules ``todo`` on ``get`` and file their verdicts in ``state``."""
        self.last_run = todo
        fns, results, failing = self._fns, state.results, state.failing
        for i in todo:
            found = fns[i](get, cpu)
            if found:
                violation = self.rules[i].violation
                results[i] = tuple(violation(m) for m in found)
                failing.add(i)
            elif i in failing:
                failing.discard(i)
                results[i] = ()


def entry_violations(cpu: "VmxCpu", vmcs: "Vmcs") -> list[Violation]:
    """Every VM-entry rule ``vmcs`` breaks, in the order the CPU checks them (controls,
    host state, guest state).  A real processor stops at the first; vtlab reports that
    one and keeps the rest for the learner.  Stateless: nothing is cached."""
    get = vmcs.get
    return [r.violation(m) for r in rules() for m in r.fn(get, cpu)]

"""Running the VM-entry rules: all of them, or only those a VMWRITE may have broken.

A real processor runs every check of SDM 27.2-27.3 on every VMLAUNCH/VMRESUME.  vtlab
gets the same answers with less work: a rule is a pure function of the fields it
``reads`` (and, for some, of processor state), so after a VM exit the VMM's handler -
which typically writes nothing but GUEST_RIP - can only have changed the verdict of the
rules that read a field it wrote.  :class:`EntryChecker` keeps each VMCS's verdicts and
re-runs just those rules.

State the *processor* writes (the guest state saved on a VM exit, SDM 28.3) is not
re-checked: it is state the processor was running with, which the checks accept.
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
    """A snapshot of what the ``processor=True`` rules read outside the VMCS: the capability
    MSRs (the attributes of ``cpu.caps`` that ``caps.msrs()`` is computed from, dicts
    copied so that changing one in place shows) and the physical-address width.
    :func:`same_processor` compares it without building anything."""
    caps = cpu.caps
    fields = getattr(caps, "__dict__", None)
    if fields is None:  # a capabilities object without instance dict: its MSR values
        return caps, cpu.memory.width, None, caps.msrs()
    return caps, cpu.memory.width, {k: v.copy() if isinstance(v, (dict, list, set)) else v
                                    for k, v in fields.items()}, None


def same_processor(cpu: "VmxCpu", key: tuple) -> bool:
    """Is the processor state :func:`processor_key` took still the same?  (About 0.2 us:
    one C-level comparison of the capability attributes.)"""
    caps = cpu.caps
    if caps is not key[0] or cpu.memory.width != key[1]:
        return False
    if key[2] is None:
        return caps.msrs() == key[3]
    return caps.__dict__ == key[2]


class _State:
    """The verdicts of every rule for one VMCS, as of its last check."""

    __slots__ = ("results", "failing", "key", "rip", "__weakref__")

    def __init__(self, n: int):
        self.results: list[tuple[Violation, ...]] = [()] * n   #: per rule index
        self.failing: set[int] = set()                         #: indexes with violations
        self.key: tuple = ()                                   #: processor_key at the check
        self.rip = -1                                          #: GUEST_RIP at the check


class EntryChecker:
    """The VM-entry checks of one processor, re-running only what a VMWRITE may have changed.

    ``violations(cpu, vmcs)`` runs every rule; ``violations(cpu, vmcs, changed)``, with
    ``changed`` the set of field encodings written since the previous check of the same
    VMCS, re-runs only the rules whose ``reads`` meet it and reuses the other verdicts.
    GUEST_RIP is compared with its value at the last check (the VMCS does not count RIP
    writes as changes), and the processor-dependent rules re-run whenever the capability
    MSRs or the physical-address width differ.  The field -> rules index comes from the
    rules' ``reads`` once, here.
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
        self._states.pop(vmcs, None)
        if self._last_vmcs is vmcs:
            self._last_vmcs = self._last_state = None

    def violations(self, cpu: "VmxCpu", vmcs: "Vmcs", changed: Iterable[int] | None = None) -> list[Violation]:
        """Every rule ``vmcs`` breaks, in checking order (controls, host state, guest state).

        ``changed=None`` runs every rule.  Otherwise ``changed`` holds the field encodings
        written since this checker last checked ``vmcs`` (a superset is fine): only the rules
        reading one of them, or GUEST_RIP if it moved, or processor state if it differs, run.
        """
        # This runs on every VMLAUNCH/VMRESUME: the common case (after a VM exit whose
        # handler advanced GUEST_RIP) must cost about a microsecond, so no objects are
        # built unless a rule re-runs.
        if vmcs is self._last_vmcs:
            state = self._last_state
        else:
            state = self._states.get(vmcs)
            if state is not None:
                self._last_vmcs, self._last_state = vmcs, state
        if changed is None or state is None:
            state = self._full(cpu, vmcs)
        else:
            get = vmcs.get
            todo = None
            rip = get(_GUEST_RIP)
            if rip != state.rip:   # a VMCS need not count VMWRITEs of GUEST_RIP as changes
                state.rip = rip
                todo = self._rip_rules
            if changed:
                by_field = self.by_field
                for f in changed:
                    ix = by_field.get(f)
                    if ix is not None and ix is not todo:
                        todo = ix if todo is None else todo | ix
            if not same_processor(cpu, state.key):
                state.key = processor_key(cpu)
                todo = self._processor if todo is None else todo | self._processor
            if todo is None:
                self.last_run = _NOTHING
            else:
                self._run(cpu, get, state, todo)
        failing = state.failing
        if not failing:
            return []
        results = state.results
        return [v for i in sorted(failing) for v in results[i]]

    # ------------------------------------------------------------ internals
    def _full(self, cpu: "VmxCpu", vmcs: "Vmcs") -> _State:
        state = _State(len(self.rules))
        get = vmcs.get
        state.rip, state.key = get(_GUEST_RIP), processor_key(cpu)
        self._run(cpu, get, state, range(len(self.rules)))
        self._states[vmcs] = state
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

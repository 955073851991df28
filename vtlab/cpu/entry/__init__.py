"""The checks VMLAUNCH/VMRESUME perform before entering the guest (SDM Vol. 3C ch. 27).

They come in three groups, and the group decides how a failure is reported:

1. **VMX controls** (SDM 27.2.1) -> VMfailValid, VM-instruction error 7;
2. **host-state area** (SDM 27.2.2-27.2.4) -> VMfailValid, error 8;
3. **guest-state area** (SDM 27.3.1) -> the entry *fails like a VM exit*: exit reason
   33 (INVALID_STATE) with bit 31 set, host state loaded, the guest never runs.

Every condition the SDM states is one :class:`Rule` in a registry, named like KVM's
``CC()`` checks name theirs::

    >>> from vtlab.cpu.entry import get_rule
    >>> print(get_rule("guest_cr0_pg_requires_pe").explain())
    >>> table()          # every rule as a pandas DataFrame

:func:`entry_violations` lists every broken rule at once (a real CPU stops at the
first; vtlab reports that one and keeps the rest for the learner), and
:class:`EntryChecker` is what VM entry uses: it re-runs only the rules that read a field
written since the last check.

Modules: :mod:`.registry` (the records, the decorator), :mod:`.controls`,
:mod:`.injection`, :mod:`.host_state`, :mod:`.guest_registers`, :mod:`.guest_segments`,
:mod:`.guest_tables`, :mod:`.guest_nonregister` (the rules, in checking order) and
:mod:`.checker`.
"""
from __future__ import annotations

from .checker import EntryChecker, entry_violations, processor_key, same_processor
from .registry import GROUPS, MODES, Rule, Violation, get_rule, rule, rules

__all__ = ["EntryChecker", "GROUPS", "MODES", "Rule", "Violation", "entry_violations", "get_rule",
           "processor_key", "rule", "rules", "same_processor", "table"]


def table():
    """Every VM-entry rule as a pandas DataFrame: id, group, SDM section, exit
    qualification, fields read, whether processor state matters, and what it says."""
    import pandas as pd

    return pd.DataFrame([{"id": r.id, "group": r.group, "section": r.section,
                          "qualification": r.qualification,
                          "reads": ", ".join(sorted(f.name for f in r.reads)),
                          "processor state": r.processor,
                          "rule": " ".join(r.doc.split())} for r in rules()]).set_index("id")


rules()  # register every rule now: the registry is complete once the package is imported

"""The VM-entry checks (SDM Vol. 3C ch. 27) - now the rule registry :mod:`vtlab.cpu.entry`.

This module keeps the old import path working::

    from vtlab.cpu.entry_checks import Violation, entry_violations

See :mod:`vtlab.cpu.entry` for the rules themselves (one record per SDM condition) and
:class:`vtlab.cpu.entry.EntryChecker`, which VM entry uses to re-check only what changed.
"""
from __future__ import annotations

from .entry import EntryChecker, Rule, Violation, entry_violations, get_rule, rules

__all__ = ["EntryChecker", "Rule", "Violation", "entry_violations", "get_rule", "rules"]

"""The module names of vtlab's first, flat layout, kept working after the move to layers.

Learners' notebooks say ``from vtlab.widgets import Dashboard`` or ``from vtlab import
cost``; those modules now live in their layer's package (``vtlab.lab.widgets``,
``vtlab.analysis.cost``).  A meta-path finder answers the old dotted names with the very
same module objects (no copies, no shim files), and ``vtlab.__getattr__`` does the same
for attribute access.  Nothing is imported before it is asked for, so ``import vtlab``
stays light (ipywidgets and matplotlib load only with the lab and analysis layers).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old name (under vtlab.) -> where the module lives now
ALIASES: dict[str, str] = {
    "asm": "vtlab.cpu.asm",
    "guest": "vtlab.cpu.guest",
    "counter": "vtlab.cpu.counter",
    "quirks": "vtlab.cpu.quirks",
    "hostmem": "vtlab.cpu.hostmem",
    "vmcs": "vtlab.cpu.vmcs",
    "capabilities": "vtlab.cpu.capabilities",
    "entry_checks": "vtlab.cpu.entry_checks",
    "vmx": "vtlab.cpu.vmx",
    "exits": "vtlab.cpu.exits",
    "devices": "vtlab.vmm.devices",
    "trace": "vtlab.vmm.trace",
    "cost": "vtlab.analysis.cost",
    "plots": "vtlab.analysis.plots",
    "widgets": "vtlab.lab.widgets",
    "rings": "vtlab.lab.rings",
    "bt": "vtlab.lab.bt",
    "cli": "vtlab.lab.cli",
    "guests": "vtlab.lab.guests",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.real_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # Already executed under its own name; the import system has just stamped the
        # alias spec on it, so give the module its own spec back.
        module.__spec__ = self.real_spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds ``vtlab.<old name>`` (and below it) and hands back the moved module."""

    def find_spec(self, fullname: str, path=None, target=None):
        if not fullname.startswith("vtlab."):
            return None
        head, _, below = fullname[len("vtlab."):].partition(".")
        if head not in ALIASES:
            return None
        real = ALIASES[head] + ("." + below if below else "")
        if real in sys.modules:
            return importlib.util.spec_from_loader(fullname, _AliasLoader(real))
        if importlib.util.find_spec(real) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real))


def module_attribute(name: str):
    """``vtlab.<name>`` for an old module name (AttributeError for anything else)."""
    if name in ALIASES:
        module = importlib.import_module(ALIASES[name])
        sys.modules.setdefault(f"vtlab.{name}", module)
        return module
    raise AttributeError(f"module 'vtlab' has no attribute {name!r}")


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())

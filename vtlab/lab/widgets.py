"""ipywidgets front ends: the learner's hands on the VMCS, the guest and the VMX instructions.

* :class:`ControlsPanel` - every pin-based, primary, secondary, VM-exit and VM-entry
  control as a labelled toggle (SDM name, bit, tooltip); bits the capability MSRs fix
  are shown disabled with the reason; exception bitmap, I/O bitmap and MSR bitmap editors.
* :class:`Stepper` - step one instruction, run to the next exit, run, reset; shows VMX
  mode and CPL, the next instruction, registers, the last exit decoded and the VMCS
  fields that changed.
* :class:`Dashboard` - pick a workload and a CPU profile, toggle controls; exit counts,
  the cycle-cost breakdown and a summary table update live.
* :class:`VmcsExplorer` - all fields by area, with VMREAD/VMWRITE and their real outcome.
* :class:`VmxConsole` - press VMXON/VMCLEAR/VMPTRLD/VMPTRST/VMLAUNCH/VMRESUME/VMREAD/
  VMWRITE/VMCALL/VMXOFF in any order and watch the state diagram and the SDM outcome.
* :class:`ProbeBox` - type an instruction, see what was assembled and whether it is
  privileged, sensitive-unprivileged or innocuous (:mod:`vtlab.lab.rings`).

Colours: text follows JupyterLab's theme; states are badges with a symbol and a word on
fixed colour pairs of contrast >= 4.5:1 (:data:`vtlab.lab.widgets_base.BADGES`).

Each widget object has a ``.widget`` (the ipywidgets container) and displays itself in
a notebook.  Every interactive element carries a stable CSS class (``vtlab-...``) so
that browser tests can find it.

Each widget lives in a module of its own (:mod:`vtlab.lab.widgets_controls`,
:mod:`~vtlab.lab.widgets_stepper`, :mod:`~vtlab.lab.widgets_vmcs`,
:mod:`~vtlab.lab.widgets_console`, :mod:`~vtlab.lab.widgets_dashboard`, with what they
share in :mod:`~vtlab.lab.widgets_base`); import them from here.
"""
from __future__ import annotations

from .widgets_base import _Base, _css, _FlagMap, parse_ranges  # noqa: F401
from .widgets_console import VmxConsole, _STATES  # noqa: F401
from .widgets_controls import _CAP_MSR, _CLASS_TITLES, _CLASSES, ControlsPanel  # noqa: F401
from .widgets_dashboard import DASHBOARD_CONTROLS, Dashboard  # noqa: F401
from .widgets_stepper import _WATCHED, Stepper, _fmt  # noqa: F401
from .widgets_vmcs import VmcsExplorer  # noqa: F401


def __getattr__(name: str):
    # ProbeBox pulls in the ring lab (which builds guests at import): load it on first use.
    if name in ("ProbeBox", "probe_card_html"):
        from . import widgets_probe
        return getattr(widgets_probe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The hypervisor layer: a tiny VMM on top of :mod:`vtlab.cpu` (only its public API).

:mod:`.machine` brings VMX up, builds the VMCS and runs the guest; :mod:`.handlers` is the
exit-handler table keyed by exit reason and the hypercalls; :mod:`.state` the VMM's
vocabulary (VmState, RunSummary, Registers); :mod:`.devices` the virtual devices;
:mod:`.trace` the record of every VM entry and exit (the VMM's own log, which the analysis
layer reads).
"""
from .handlers import *  # noqa: F401,F403  - the first layout's vtlab.vmm module, unchanged
from .machine import *  # noqa: F401,F403
from .state import *  # noqa: F401,F403
from .handlers import HANDLERS, HYPERCALLS, Handler, Hypercall
from .machine import VirtualMachine
from .state import Registers, RunSummary, VmState
from .exit_record import Exit, ExitKind
from .vendors import SvmVendorVm, VmxVendorVm

__all__ = ["HANDLERS", "HYPERCALLS", "Handler", "Hypercall", "Registers", "RunSummary",
           "VirtualMachine", "VmState", "Exit", "ExitKind", "SvmVendorVm", "VmxVendorVm"]

"""The hypervisor layer: a tiny VMM on top of :mod:`vtlab.cpu` (only its public API).

:mod:`.machine` brings VMX up, builds the VMCS and runs the guest; :mod:`.handlers` is the
exit-handler table keyed by exit reason; :mod:`.devices` the virtual devices; :mod:`.trace`
the record of every VM entry and exit (the VMM's own log, which the analysis layer reads).
"""
from .machine import *  # noqa: F401,F403  - the first layout's vtlab.vmm module, unchanged
from .machine import (HANDLERS, HYPERCALLS, Handler, Hypercall, Registers, RunSummary,
                      VirtualMachine, VmState)

__all__ = ["HANDLERS", "HYPERCALLS", "Handler", "Hypercall", "Registers", "RunSummary",
           "VirtualMachine", "VmState"]

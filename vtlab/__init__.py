"""vtlab: learn Intel VT-x by driving a VMX processor model around a real x86 guest.

The guest is machine code executed by the Unicorn CPU emulator; vtlab plays the
part of the processor's VMX logic (VMCS, VM entries and VM exits) and a small
VMM written in Python handles the exits.
"""

__version__ = "0.1.0"

from . import _aliases
from .arch import *  # noqa: F401,F403  - the SDM's tables: ExitReason, VmcsField, controls ...
from .arch import __all__ as _arch_all
from .errors import (AssemblyError, BudgetExceeded, GuestFault, HandlerError, TripleFault,
                     VmcsError, VmEntryFailure, VtlabError, VmxFailure)
from .cpu.asm import Instruction, assemble, disassemble
from .cpu.capabilities import VmxCapabilities
from .cpu.entry_checks import Violation, entry_violations
from .cpu.exits import ExitMonitor, VmExit
from .cpu.guest import Guest, Layout, Mode, Selector
from .cpu.vmcs import INVALID_POINTER, LaunchState, Vmcs
from .cpu.vmx import Status, VmxCpu, VmxOperation, VmxOutcome
from .vmm.devices import DebugPort, Device, DeviceBus, PostCodePort, Serial16550, UserspaceDevice
from .vmm.pic import PicPair
from .vmm.pit import Pit8254
from .arch.interrupts import ActivityState, Interruptibility
from .vmm import HANDLERS, Hypercall, Registers, RunSummary, VirtualMachine, VmState
from .vmm.trace import Trace, TraceEvent
from .vmm.ept_tables import EptTables
from .vmm.shadow import ShadowPaging
# AMD-V (SVM) beside VT-x: the APM's facts, the SVM processor, one VMM for both vendors
from .arch.svm import APM_EDITION, Intercept, Intercept2, SvmExitCode, VmcbControl, VmcbSave
from .cpu.svm import SvmCpu, SvmExit, Vmcb
from .vmm.exit_record import Exit, ExitKind
from .vmm.vendors import SvmVendorVm, VmxVendorVm

__all__ = list(_arch_all) + [
    "Instruction", "assemble", "disassemble", "VmxCapabilities", "DebugPort", "Device", "DeviceBus",
    "PostCodePort", "Serial16550", "UserspaceDevice", "PicPair", "Pit8254", "ActivityState",
    "Interruptibility", "Violation", "entry_violations",
    "AssemblyError", "BudgetExceeded", "GuestFault", "HandlerError", "TripleFault", "VmcsError",
    "VmEntryFailure", "VtlabError", "VmxFailure", "ExitMonitor", "VmExit", "Guest", "Layout", "Mode",
    "Selector", "Trace", "TraceEvent", "INVALID_POINTER", "LaunchState", "Vmcs", "HANDLERS",
    "Hypercall", "Registers", "RunSummary", "VirtualMachine", "VmState", "Status", "VmxCpu",
    "VmxOperation", "VmxOutcome", "EptTables", "ShadowPaging",
    "APM_EDITION", "Intercept", "Intercept2", "SvmExitCode", "VmcbControl", "VmcbSave", "SvmCpu", "SvmExit",
    "Vmcb", "Exit", "ExitKind", "SvmVendorVm", "VmxVendorVm",
]


def __getattr__(name: str):
    """``vtlab.cost``, ``vtlab.widgets`` ...: the modules of the first, flat layout, imported
    on first use from where they live now (see :mod:`vtlab._aliases`)."""
    return _aliases.module_attribute(name)

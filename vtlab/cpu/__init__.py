"""The processor layer: the x86 CPU (Unicorn) and the VMX logic vtlab adds around it.

This is the only package that touches Unicorn, Capstone and the assembler (LLVM from ziglang).  Everything above
it (:mod:`vtlab.vmm`, :mod:`vtlab.analysis`, :mod:`vtlab.lab`) talks to the processor
through the public names re-exported here (``from vtlab.cpu import VmxCpu, Guest ...``),
the way a hypervisor talks to silicon through its instructions and nothing else.
"""

# First of all: the modules below call Unicorn's private ctypes layer, so a binding
# without it must fail here, once, with the version vtlab needs (not deep in a run).
from ._unicorn import check_binding as _check_binding

_check_binding()

from .asm import Instruction, assemble, disassemble
from .capabilities import VmxCapabilities
from .decoder import DecodedInstruction, InsnKind
from .entry_checks import EntryChecker, Violation, entry_violations
from .exit_rules import msr_bitmap_position
from .guest import Guest, GuestException, Layout, Mode, Program, Selector, pack_descriptor
from .outcome import Status, VmxOperation, VmxOutcome
from .vmcs import INVALID_POINTER, LaunchState, Vmcs
from .vmcs_view import CurrentVmcs
from .vmexit import VmExit
from .vmx import VmxCpu
from .svm import SvmCpu, SvmExit, SvmOutcome, SvmStatus, Vmcb  # AMD-V, the second vendor

__all__ = ["CurrentVmcs", "DecodedInstruction", "EntryChecker", "Guest", "GuestException",
           "INVALID_POINTER", "InsnKind", "Instruction", "LaunchState", "Layout", "Mode",
           "Program", "Selector", "Status", "Violation", "Vmcs", "VmExit", "VmxCapabilities",
           "VmxCpu", "VmxOperation", "VmxOutcome", "SvmCpu", "SvmExit", "SvmOutcome", "SvmStatus", "Vmcb", "assemble", "disassemble", "entry_violations",
           "msr_bitmap_position", "pack_descriptor"]

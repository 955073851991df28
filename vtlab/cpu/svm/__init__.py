"""AMD-V (SVM) beside VT-x: the second vendor of vtlab's processor layer.

* :mod:`.vmcb` - the VMCB, a page of plain memory at the APM's offsets;
* :mod:`.state` - guest state between the VMCB save area and the CPU (VMRUN, #VMEXIT,
  VMLOAD, VMSAVE);
* :mod:`.intercepts` - which guest instructions and events are intercepted (shares the
  instruction decoder, the Unicorn hooks and the I/O operand decoding with VMX);
* :mod:`.processor` - :class:`SvmCpu`: EFER.SVME, VM_CR, VM_HSAVE_PA, GIF and the SVM
  instructions with the APM's faults and VMRUN's consistency checks.

Facts (offsets, bits, exit codes) live in :mod:`vtlab.arch.svm`.
"""
from .intercepts import SvmExit, SvmMonitor
from .processor import SvmCpu, SvmOutcome, SvmStatus
from .vmcb import Vmcb, VmcbSegment

__all__ = ["SvmCpu", "SvmExit", "SvmMonitor", "SvmOutcome", "SvmStatus", "Vmcb", "VmcbSegment"]

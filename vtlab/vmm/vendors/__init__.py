"""One VMM, two vendors: the vendor-neutral handlers (:mod:`.common`) and, side by side,
the VT-x (:mod:`.vmx`) and AMD-V (:mod:`.svm`) parts - bring-up, control block set-up,
exit decoding (:mod:`vtlab.vmm.exit_record`)."""
from .common import NEUTRAL_HANDLERS, VendorVm
from .svm import SvmVendorVm
from .vmx import VmxVendorVm

__all__ = ["NEUTRAL_HANDLERS", "SvmVendorVm", "VendorVm", "VmxVendorVm"]

"""VMX non-root operation as one module name (``vtlab.exits`` of the first layout).

The pieces live in their own modules: :mod:`.vmexit` (the exit record and the VM exit),
:mod:`.exit_rules` (which instructions exit under which controls), :mod:`.events`
(exceptions, interrupts, EPT violations), :mod:`.guest_state` (state save and load),
:mod:`.nonroot` (the monitor that runs the guest).
"""
from .exit_rules import RULES, io_operands, msr_bitmap_exits, msr_bitmap_position, rule_key
from .nonroot import ExitMonitor
from .vmexit import VmExit

__all__ = ["RULES", "ExitMonitor", "VmExit", "io_operands", "msr_bitmap_exits",
           "msr_bitmap_position", "rule_key"]

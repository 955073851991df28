"""VMX non-root operation as one module name (``vtlab.exits`` of the first layout).

The pieces live in their own modules: :mod:`.vmexit` (the exit record and the VM exit),
:mod:`.decoder` (guest instructions decoded once, at load),
:mod:`.exit_rules` (which instructions exit under which controls), :mod:`.events`
(exceptions, interrupts, EPT violations), :mod:`.guest_state` (state save and load),
:mod:`.nonroot` (the monitor that runs the guest).
"""
from .decoder import DecodedInstruction, InsnKind
from .exit_rules import (EXIT_REASON_BY_KIND, EXIT_RULES, NON_EXITING_RULES, io_operands,
                         msr_bitmap_exits, msr_bitmap_position, rule_for)
from .nonroot import ExitMonitor
from .vmexit import VmExit

__all__ = ["EXIT_REASON_BY_KIND", "EXIT_RULES", "NON_EXITING_RULES", "DecodedInstruction",
           "ExitMonitor", "InsnKind", "VmExit", "io_operands", "msr_bitmap_exits",
           "msr_bitmap_position", "rule_for"]

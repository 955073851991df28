"""The analysis layer: turns a VMM's exit trace into cycle-cost estimates and figures."""

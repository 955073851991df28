"""vtlab: learn Intel VT-x by driving a VMX processor model around a real x86 guest.

The guest is machine code executed by the Unicorn CPU emulator; vtlab plays the
part of the processor's VMX logic (VMCS, VM entries and VM exits) and a small
VMM written in Python handles the exits.
"""

__version__ = "0.1.0"

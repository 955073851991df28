"""The processor layer: the x86 CPU (Unicorn) and the VMX logic vtlab adds around it.

This is the only package that touches Unicorn, Capstone and Keystone.  Everything above
it (:mod:`vtlab.vmm`, :mod:`vtlab.analysis`, :mod:`vtlab.lab`) talks to the processor
through the public names re-exported here, the way a hypervisor talks to silicon through
its instructions and nothing else.
"""

"""Guest state between the VMCB's state-save area and the CPU (APM Vol. 2, 15.5.1, 15.6).

VMRUN loads the guest's segment registers, descriptor-table registers, EFER, CR0, CR2,
CR3, CR4, RFLAGS, RIP, RSP, RAX, DR6, DR7 and the CPL from the save area; #VMEXIT stores
them back (the same list, APM Vol. 2, 15.6 "#VMEXIT").  The rest of the save area (FS,
GS, TR, LDTR hidden state, the SYSCALL/SYSENTER MSRs, KernelGsBase) is VMLOAD's and
VMSAVE's business, not VMRUN's - which is why a VMM runs VMLOAD/VMSAVE around VMRUN only
when it needs them.

The CPU is vtlab's Unicorn guest; segment registers load from the guest's descriptor
tables (Unicorn cannot set hidden state directly), so selector and attributes in the
VMCB must agree with the guest's GDT, as they do in a VMCB a VMM filled from real state.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import unicorn
from unicorn import x86_const as X

from ...arch.msrs import Msr
from ...arch.svm import EFER_SVME, VmcbSave, pack_attrib, unpack_attrib
from .vmcb import Vmcb

if TYPE_CHECKING:
    from ..guest import Guest

#: The segment registers VMRUN loads and #VMEXIT saves (APM Vol. 2, 15.5.1, 15.6).
_VMRUN_SEGMENTS = {"es": VmcbSave.ES, "cs": VmcbSave.CS, "ss": VmcbSave.SS, "ds": VmcbSave.DS}
#: ... the ones VMLOAD loads and VMSAVE saves (APM Vol. 2, 15.5.2).
_VMLOAD_SEGMENTS = {"fs": VmcbSave.FS, "gs": VmcbSave.GS, "tr": VmcbSave.TR, "ldtr": VmcbSave.LDTR}
#: Plain registers of the save area VMRUN/#VMEXIT move: (VMCB field, vtlab register name).
_VMRUN_REGISTERS = ((VmcbSave.CR2, "cr2"), (VmcbSave.DR6, "dr6"), (VmcbSave.DR7, "dr7"),
                    (VmcbSave.RSP, "rsp"), (VmcbSave.RAX, "rax"))
#: The MSRs VMLOAD/VMSAVE move (APM Vol. 2, 15.5.2).
_VMLOAD_MSRS = ((VmcbSave.STAR, Msr.IA32_STAR), (VmcbSave.LSTAR, Msr.IA32_LSTAR),
                (VmcbSave.CSTAR, Msr.IA32_CSTAR), (VmcbSave.SFMASK, Msr.IA32_FMASK),
                (VmcbSave.KERNEL_GS_BASE, Msr.IA32_KERNEL_GS_BASE), (VmcbSave.SYSENTER_CS, Msr.IA32_SYSENTER_CS),
                (VmcbSave.SYSENTER_ESP, Msr.IA32_SYSENTER_ESP), (VmcbSave.SYSENTER_EIP, Msr.IA32_SYSENTER_EIP))


def save_guest(vmcb: Vmcb, g: "Guest") -> None:
    """#VMEXIT's guest-state save into the VMCB (APM Vol. 2, 15.6)."""
    for name, field in _VMRUN_SEGMENTS.items():
        s = g.segment(name)
        vmcb.set_segment(field, s.selector, 0 if s.unusable else pack_attrib(s.access_rights), s.limit, s.base)
    for table, field in (("gdtr", VmcbSave.GDTR), ("idtr", VmcbSave.IDTR)):
        _, base, limit, _ = g.uc.reg_read(getattr(X, f"UC_X86_REG_{table.upper()}"))
        vmcb.set_segment(field, 0, 0, limit, base)
    # EFER.SVME is the VMM's (the guest saw it set at VMRUN); Unicorn does not hold it.
    svme = vmcb.get(VmcbSave.EFER) & EFER_SVME
    vmcb.put(VmcbSave.EFER, g.reg("efer") | svme)
    for field, reg in ((VmcbSave.CR0, "cr0"), (VmcbSave.CR3, "cr3"), (VmcbSave.CR4, "cr4"),
                       (VmcbSave.RFLAGS, "rflags"), (VmcbSave.RIP, "rip")) + _VMRUN_REGISTERS:
        vmcb.put(field, g.reg(reg))
    vmcb.put(VmcbSave.CPL, g.cpl)


def load_guest(vmcb: Vmcb, g: "Guest") -> None:
    """VMRUN's guest-state load from the VMCB (APM Vol. 2, 15.5.1).  Registers that
    already hold the VMCB's value are not written (Unicorn flushes translations on
    some control-register writes); raises ValueError if a selector cannot be loaded."""
    efer = vmcb.get(VmcbSave.EFER) & ~EFER_SVME
    for field, reg in ((VmcbSave.CR4, "cr4"), (VmcbSave.CR3, "cr3")):
        if g.reg(reg) != vmcb.get(field):
            g.set_reg(reg, vmcb.get(field))
    if g.reg("efer") != efer:
        g.uc.msr_write(Msr.IA32_EFER, efer)
    if g.reg("cr0") != vmcb.get(VmcbSave.CR0):
        g.set_reg("cr0", vmcb.get(VmcbSave.CR0))
    for table, field in (("gdtr", VmcbSave.GDTR), ("idtr", VmcbSave.IDTR)):
        s = vmcb.segment(field)
        g.uc.reg_write(getattr(X, f"UC_X86_REG_{table.upper()}"), (0, s.base, s.limit, 0))
    rflags = vmcb.get(VmcbSave.RFLAGS)
    if g.reg("rflags") != rflags:
        g.set_reg("rflags", rflags)
    for name in ("cs", "ss", "ds", "es"):
        s = vmcb.segment(_VMRUN_SEGMENTS[name])
        if g.segment(name).selector == s.selector and pack_attrib(g.segment(name).access_rights) == s.attrib:
            continue
        try:
            g.load_segment(name, s.selector)
        except unicorn.UcError as exc:
            raise ValueError(f"VMCB save area {name.upper()}.selector {s.selector:#x} cannot be loaded "
                             f"from the guest's GDT ({exc})") from None
    for field, reg in _VMRUN_REGISTERS:
        if g.reg(reg) != vmcb.get(field):
            g.set_reg(reg, vmcb.get(field))
    g.rip = vmcb.get(VmcbSave.RIP)


def vmsave_state(vmcb: Vmcb, g: "Guest") -> None:
    """VMSAVE: FS, GS, TR, LDTR (with hidden state) and the SYSCALL/SYSENTER MSRs and
    KernelGsBase into the VMCB (APM Vol. 2, 15.5.2)."""
    for name, field in _VMLOAD_SEGMENTS.items():
        s = g.segment(name)
        vmcb.set_segment(field, s.selector, 0 if s.unusable else pack_attrib(s.access_rights), s.limit, s.base)
    for field, msr in _VMLOAD_MSRS:
        vmcb.put(field, g.uc.msr_read(msr))


def vmload_state(vmcb: Vmcb, g: "Guest") -> None:
    """VMLOAD: the reverse of :func:`vmsave_state` (APM Vol. 2, 15.5.2)."""
    for name, field in _VMLOAD_SEGMENTS.items():
        s = vmcb.segment(field)
        if name in ("tr", "ldtr"):
            g.set_system_segment(name, s.selector, s.base, s.limit, unpack_attrib(s.attrib))
        else:
            try:
                g.load_segment(name, s.selector)
            except unicorn.UcError as exc:
                raise ValueError(f"VMCB {name.upper()}.selector {s.selector:#x} cannot be loaded ({exc})") from None
    for field, msr in _VMLOAD_MSRS:
        g.uc.msr_write(msr, vmcb.get(field))

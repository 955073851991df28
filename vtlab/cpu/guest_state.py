"""Guest state between the VMCS and the CPU: saved on VM exit (SDM 28.3), loaded on
VM entry (SDM 27.3.2)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import unicorn
from unicorn import x86_const as X

from ..arch.controls import EntryControl, ExitControl
from ..arch.msrs import Cr0, Efer, Msr
from ..arch.vmcs_fields import VmcsField as F

if TYPE_CHECKING:
    from .vmcs import Vmcs

from .nonroot_consts import _SEG_FIELDS, _SINGLE_FIELD_SAVERS, _RIP_ONLY

class GuestStateTransfer:
    """Save and load of the guest-state area."""

    def save_guest_state(self, vmcs: "Vmcs") -> None:
        """Store the CPU's guest state into the guest-state area (SDM 28.3).

        Fields software already rewrote since the exit (``vmcs.dirty``, e.g. GUEST_RIP
        advanced by the VMM) keep the software's value: on hardware the save happened
        before the VMM ran, so its VMWRITEs came after.
        """
        g = self.guest
        dirty = vmcs.dirty
        save = vmcs.save_guest
        put = (lambda f, value: None if int(f) in dirty else save(f, value)) if dirty else save
        # CR0/3/4, RSP, RFLAGS and SYSENTER_*: the same savers materialize() uses for a
        # single field, so a partial save and a full one cannot disagree.
        for f, saver in _SINGLE_FIELD_SAVERS.items():
            put(f, saver(g))
        put(F.GUEST_RIP, g.reg("rip"))
        put(F.GUEST_DR7, g.reg("dr7"))
        for seg, (fsel, fbase, flim, far) in _SEG_FIELDS.items():
            s = g.segment(seg)
            put(fsel, s.selector)
            put(fbase, s.base)
            put(flim, s.limit)
            put(far, s.access_rights)
        for table, fbase, flim in (("gdtr", F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT),
                                   ("idtr", F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT)):
            _, base, limit, _ = g.uc.reg_read(getattr(X, f"UC_X86_REG_{table.upper()}"))
            put(fbase, base)
            put(flim, limit)
        efer = g.reg("efer")
        if vmcs.get(F.VM_EXIT_CONTROLS) & ExitControl.SAVE_IA32_EFER:
            put(F.GUEST_IA32_EFER, efer)
        if vmcs.get(F.VM_EXIT_CONTROLS) & ExitControl.SAVE_IA32_PAT:
            put(F.GUEST_IA32_PAT, g.uc.msr_read(Msr.IA32_PAT))
        put(F.GUEST_ACTIVITY_STATE, 1 if self.halted else 0)
        # SDM 28.2: the "IA-32e mode guest" entry control reflects EFER.LMA after an exit.
        entry = vmcs.get(F.VM_ENTRY_CONTROLS) & ~EntryControl.IA32E_MODE
        vmcs.save_guest(F.VM_ENTRY_CONTROLS, entry | (EntryControl.IA32E_MODE if efer & Efer.LMA else 0))

    def materialize(self, field: int | None = None) -> None:
        """Complete a lazy guest-state save (done on the first VMREAD that needs it).

        For a field that maps to one register or MSR (``field`` given), just that field is
        saved: the CPU's guest state cannot change before the next VM entry, so saving it
        again later gives the same value.  A WRMSR/RDMSR exit handler that touches
        IA32_SYSENTER_ESP thus costs one MSR read, not a full state save.
        """
        if field is not None and self._materialize_pending and self.vmcs is not None:
            saver = _SINGLE_FIELD_SAVERS.get(field)
            if saver is not None:
                self.vmcs.save_guest(field, saver(self.guest))
                return
        if self._materialize_pending and self.vmcs is not None:
            self._materialize_pending = False
            self.vmcs.on_access = None
            self.save_guest_state(self.vmcs)

    def load_guest_state(self, vmcs: "Vmcs") -> None:
        """Load the guest-state area into the CPU (SDM 27.3.2).

        Fields the VMM did not write since the last exit already hold what the CPU has,
        so only those it wrote are loaded (everything on a first launch).  vtlab's CPU
        loads a segment's hidden part from the guest's descriptor table (Unicorn has no
        interface to set it directly), so base/limit/access rights must agree with the
        GDT; real mode uses selector << 4 as the base.
        """
        g = self.guest
        full = vmcs.full_load or self.vmcs is not vmcs
        if self.vmcs is not vmcs:
            self.materialize()  # the previous VMCS must not lose the state the CPU holds
        elif self._materialize_pending:
            # The CPU still holds the guest state; the stale fields are simply not loaded.
            self._materialize_pending = False
            vmcs.on_access = None
        self.vmcs = vmcs
        if not full and vmcs.dirty <= _RIP_ONLY:  # the common case: the VMM advanced RIP
            if vmcs.dirty:
                g.rip = vmcs.get(F.GUEST_RIP)
                vmcs.dirty.clear()
            return
        fields = None if full else set(vmcs.dirty)
        want = (lambda *fs: True) if full else (lambda *fs: any(int(f) in fields for f in fs))
        v = vmcs.get
        entry = v(F.VM_ENTRY_CONTROLS)
        if want(F.GUEST_IA32_EFER, F.VM_ENTRY_CONTROLS, F.GUEST_CR0, F.GUEST_CR4, F.GUEST_CR3):
            efer = v(F.GUEST_IA32_EFER) if entry & EntryControl.LOAD_IA32_EFER else g.reg("efer")
            efer = (efer & ~(Efer.LME | Efer.LMA)) | ((Efer.LME | Efer.LMA) if entry & EntryControl.IA32E_MODE else 0)
            g.uc.msr_write(Msr.IA32_EFER, efer & ~Efer.LMA)
            g.uc.reg_write(X.UC_X86_REG_CR4, v(F.GUEST_CR4))
            g.uc.reg_write(X.UC_X86_REG_CR3, v(F.GUEST_CR3))
            g.uc.reg_write(X.UC_X86_REG_CR0, v(F.GUEST_CR0))
        if want(F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT):
            g.uc.reg_write(X.UC_X86_REG_GDTR, (0, v(F.GUEST_GDTR_BASE), v(F.GUEST_GDTR_LIMIT), 0))
        if want(F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT):
            g.uc.reg_write(X.UC_X86_REG_IDTR, (0, v(F.GUEST_IDTR_BASE), v(F.GUEST_IDTR_LIMIT), 0))
        order = ("cs", "ss", "ds", "es", "fs", "gs")
        for seg in order:
            if want(*_SEG_FIELDS[seg]):
                sel = v(_SEG_FIELDS[seg][0])
                if v(_SEG_FIELDS[seg][3]) & (1 << 16) and v(F.GUEST_CR0) & Cr0.PE:
                    sel = 0 if seg not in ("cs", "ss") else sel
                try:
                    g.load_segment(seg, sel)
                except unicorn.UcError as exc:
                    raise ValueError(f"GUEST_{seg.upper()}_SELECTOR {sel:#x} cannot be loaded from "
                                     f"the guest GDT ({exc})") from None
        for seg in ("ldtr", "tr"):
            if want(*_SEG_FIELDS[seg]):
                fsel, fbase, flim, far = _SEG_FIELDS[seg]
                if not v(far) & (1 << 16):
                    g.uc.reg_write(getattr(X, f"UC_X86_REG_{seg.upper()}"),
                                   (v(fsel), v(fbase), v(flim), (v(far) & 0xF0FF) << 8))
        if want(F.GUEST_RSP):
            g.set_reg("rsp", v(F.GUEST_RSP))
        if want(F.GUEST_RIP):
            g.rip = v(F.GUEST_RIP)
        if want(F.GUEST_RFLAGS):
            g.set_reg("rflags", v(F.GUEST_RFLAGS))
        if want(F.GUEST_DR7) and entry & EntryControl.LOAD_DEBUG_CONTROLS:
            g.set_reg("dr7", v(F.GUEST_DR7))
        for msr, f in ((Msr.IA32_SYSENTER_CS, F.GUEST_SYSENTER_CS), (Msr.IA32_SYSENTER_ESP, F.GUEST_SYSENTER_ESP),
                       (Msr.IA32_SYSENTER_EIP, F.GUEST_SYSENTER_EIP)):
            if want(f):
                g.uc.msr_write(msr, v(f))
        if want(F.GUEST_IA32_PAT) and entry & EntryControl.LOAD_IA32_PAT:
            g.uc.msr_write(Msr.IA32_PAT, v(F.GUEST_IA32_PAT))
        self.halted = v(F.GUEST_ACTIVITY_STATE) == 1
        vmcs.dirty.clear()
        vmcs.full_load = False

    # ----------------------------------------------------------- running

"""Guest state between the VMCS and the CPU: saved on VM exit (SDM 28.3), loaded on
VM entry (SDM 27.3.2), and what the vCPU keeps in between.

Saving every guest-state field on every exit would cost more than the rest of the exit
path, and most handlers read none of them (a CPUID handler needs RIP and the exit
length).  So the exit saves RIP at once and marks the rest *pending*; the first VMREAD
of a guest-state field completes the save (just that field when it maps to one register).
Until the next entry the CPU's registers are exactly what the save would store, so doing
it late gives the same values: the laziness cannot be observed through VMREAD.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import unicorn
from unicorn import x86_const as X

from ..arch.controls import EntryControl, ExitControl
from ..arch.msrs import Cr0, Efer, Msr, Rflags
from ..arch.vmcs_fields import VmcsField as F

if TYPE_CHECKING:
    from .guest import Guest
    from .vmcs import Vmcs

from ..arch.vmcs_fields import FieldType
from .nonroot_consts import _LAZY_FIELDS, _RIP_ONLY, _SEG_FIELDS, _SINGLE_FIELD_SAVERS

_GUEST_STATE = FieldType.GUEST_STATE
_GUEST_RIP = int(F.GUEST_RIP)


class GuestStateCache:
    """What the vCPU keeps about the VMCS whose guest it last ran (see the module doc).

    * :attr:`vmcs` - that VMCS region; while the guest is out, the CPU's registers still
      hold its state;
    * :attr:`pending` - guest-state fields not saved into the region yet (the lazy save);
    * :attr:`unloaded` - guest-state fields software wrote since the exit: the next VM
      entry loads just these (everything when it enters another VMCS);
    * :attr:`unchecked` - per region, the fields whose value changed since the VM-entry
      checks last ran on it (software writes and saved guest state alike): the entry
      re-checks only the rules that read them (:mod:`vtlab.cpu.entry`);
    * :attr:`controls_version` - bumped by every software write outside the guest-state
      area, so the monitor knows when to re-read the execution controls.
    """

    def __init__(self, guest: "Guest", monitor):
        self.guest = guest
        self.monitor = monitor
        self.vmcs: "Vmcs | None" = None
        self.pending = False
        self.unloaded: set[int] = set()
        self.unchecked: dict[int, set[int]] = {}
        self.controls_version = 0

    def written_set(self, region: "Vmcs") -> set[int]:
        """The set of unchecked fields of ``region`` (made on first use)."""
        found = self.unchecked.get(id(region))
        if found is None:
            found = self.unchecked[id(region)] = set()
        return found

    def software_wrote(self, region: "Vmcs", field: int, field_type) -> None:
        """Software wrote ``field`` of ``region`` (VMWRITE or the current-VMCS view)."""
        if field_type is _GUEST_STATE:
            if region is self.vmcs:
                self.unloaded.add(field)
        else:
            self.controls_version += 1

    def forget(self, region: "Vmcs") -> None:
        """VMCLEAR: the region's data is in memory now; the CPU holds nothing of it."""
        self.complete(region)
        if region is self.vmcs:
            self.vmcs = None
            self.unloaded.clear()
        self.unchecked.pop(id(region), None)

    # ---------------------------------------------------------------- VM exit
    def after_exit(self, region: "Vmcs", rip: int) -> None:
        """The VM exit's guest-state step (SDM 28.3), done lazily: RIP now, the rest on demand."""
        data = region._data   # (the processor's own write: Vmcs.put without the call)
        if data.get(_GUEST_RIP, 0) != rip:
            data[_GUEST_RIP] = rip
            self.written_set(region).add(_GUEST_RIP)
        self.pending = True
        self.unloaded.clear()

    def complete(self, region: "Vmcs | None" = None, field: int | None = None) -> None:
        """Complete a lazy guest-state save (done on the first VMREAD that needs it).

        For a field that maps to one register or MSR (``field`` given), just that field is
        saved: the CPU's guest state cannot change before the next VM entry, so saving it
        again later gives the same value.  A WRMSR/RDMSR exit handler that touches
        IA32_SYSENTER_ESP thus costs one MSR read, not a full state save.
        """
        if not self.pending or (region is not None and region is not self.vmcs) or self.vmcs is None:
            return
        if field is not None:
            if field not in _LAZY_FIELDS:
                return
            saver = _SINGLE_FIELD_SAVERS.get(field)
            if saver is not None:
                if field not in self.unloaded:
                    self._put(self.vmcs, field, saver(self.guest))
                return
        self.pending = False
        self.save(self.vmcs)

    def _put(self, region: "Vmcs", field: int, value: int) -> None:
        if region.get(field) != value:
            region.put(field, value)
            self.written_set(region).add(field)

    def save(self, vmcs: "Vmcs") -> None:
        """Store the CPU's guest state into the guest-state area (SDM 28.3).

        Fields software already rewrote since the exit (:attr:`unloaded`, e.g. GUEST_RIP
        advanced by the VMM) keep the software's value: on hardware the save happened
        before the VMM ran, so its VMWRITEs came after.
        """
        g = self.guest
        dirty = self.unloaded
        put = (lambda f, value: None if int(f) in dirty else self._put(vmcs, int(f), value))
        # CR0/3/4, RSP, RFLAGS and SYSENTER_*: the same savers complete() uses for a
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
        put(F.GUEST_ACTIVITY_STATE, 1 if self.monitor.halted else 0)
        # SDM 28.2: the "IA-32e mode guest" entry control reflects EFER.LMA after an exit.
        entry = vmcs.get(F.VM_ENTRY_CONTROLS) & ~EntryControl.IA32E_MODE
        self._put(vmcs, int(F.VM_ENTRY_CONTROLS), entry | (EntryControl.IA32E_MODE if efer & Efer.LMA else 0))

    def capture(self, vmcs: "Vmcs") -> None:
        """Copy the CPU's current state into ``vmcs`` as software would (a VMM's set-up:
        the guest starts where the CPU is now); the first VM entry loads all of it."""
        if self.vmcs is vmcs:
            self.vmcs = None
        self.unloaded = set()
        self.save(vmcs)
        self.unloaded = set()

    # --------------------------------------------------------------- VM entry
    def load(self, vmcs: "Vmcs") -> None:
        """Load the guest-state area into the CPU (SDM 27.3.2).

        Fields the VMM did not write since the last exit already hold what the CPU has,
        so only those it wrote are loaded (everything on a first launch).  vtlab's CPU
        loads a segment's hidden part from the guest's descriptor table (Unicorn has no
        interface to set it directly), so base/limit/access rights must agree with the
        GDT; real mode uses selector << 4 as the base.
        """
        g = self.guest
        full = self.vmcs is not vmcs
        if full:
            self.complete(self.vmcs)  # the previous VMCS must not lose the state the CPU holds
        else:
            # The CPU still holds the guest state; fields not saved yet are simply not loaded.
            self.pending = False
        self.vmcs = vmcs
        written = self.unloaded
        if not full and written <= _RIP_ONLY:  # the common case: the VMM advanced RIP
            if written:
                g.rip = vmcs.get(F.GUEST_RIP)
                written.clear()
            return
        fields = None if full else set(written)
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
        rflags_first = want(F.GUEST_RFLAGS) and (v(F.GUEST_RFLAGS) | g.reg("rflags")) & Rflags.VM
        if rflags_first:
            # Into or out of virtual-8086 mode: RFLAGS.VM decides how the segment registers
            # load (SDM 27.3.2.2: with VM = 1 each base is selector << 4, limit FFFFH,
            # access rights F3H), so it is loaded before them.
            g.set_reg("rflags", v(F.GUEST_RFLAGS))
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
        if want(F.GUEST_RFLAGS) and not rflags_first:
            g.set_reg("rflags", v(F.GUEST_RFLAGS))
        if want(F.GUEST_DR7) and entry & EntryControl.LOAD_DEBUG_CONTROLS:
            g.set_reg("dr7", v(F.GUEST_DR7))
        for msr, f in ((Msr.IA32_SYSENTER_CS, F.GUEST_SYSENTER_CS), (Msr.IA32_SYSENTER_ESP, F.GUEST_SYSENTER_ESP),
                       (Msr.IA32_SYSENTER_EIP, F.GUEST_SYSENTER_EIP)):
            if want(f):
                g.uc.msr_write(msr, v(f))
        if want(F.GUEST_IA32_PAT) and entry & EntryControl.LOAD_IA32_PAT:
            g.uc.msr_write(Msr.IA32_PAT, v(F.GUEST_IA32_PAT))
        self.monitor.halted = v(F.GUEST_ACTIVITY_STATE) == 1
        written.clear()

    # ----------------------------------------------------------- running

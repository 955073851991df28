"""Running a guest whose paging is off when EPT is off: the VMM's identity page table.

Without "unrestricted guest" (which needs EPT, SDM Vol. 3C 25.6.2) VM entry demands
CR0.PE = 1 and CR0.PG = 1 (IA32_VMX_CR0_FIXED0, SDM Vol. 3C 27.3.1.1 and A.7).  A VMM
of the pre-2010 era still ran a protected-mode guest with paging off: it entered the
guest *with* paging on, on a page table that maps every linear address to the same
physical address, and hid that from the guest.  This is KVM's "identity-mapped page
table" for ``enable_ept=0`` / ``unrestricted_guest=0`` (``ept_identity_map_addr``),
built here with 32-bit paging and 4-MByte pages (CR4.PSE, SDM Vol. 3A 4.3):

* GUEST_CR0.PG = 1 underneath; CR0 guest/host mask bit PG set and the read shadow's PG
  = 0, so a MOV from CR0 reads what the guest wrote (SDM Vol. 3C 25.6.6).
* GUEST_CR4.PSE = 1, PAE = 0 underneath; mask bits PSE and PAE, the shadow the guest's.
* GUEST_CR3 = the identity page directory; "CR3-load exiting" and "CR3-store exiting"
  keep the guest's own CR3 value in the VMM (a guest may load CR3 before turning
  paging on) - MOV to/from CR3 become CR-access exits (reason 28) while paging is off.
* A MOV to CR0 that sets PG (it changes a masked bit, so it exits, SDM Vol. 3C 26.1.3)
  switches to the guest's own tables: GUEST_CR3 = the guest's CR3, GUEST_CR4 = its CR4,
  CR3 exiting back as before.  Clearing PG switches back to the identity table.

Where the table lives: vtlab's guest-physical memory *is* the memory the processor
walks when EPT is off (there is no host memory behind it that the guest cannot reach),
so the page directory takes the top 4-KByte page of guest RAM,
:func:`identity_table_address`, which the guest must leave alone - as KVM reserves
the page at ``ept_identity_map_addr`` in the guest's E820 map.  With the guest's own
paging on, the processor walks the guest's tables directly (vtlab's guest-physical is
host-physical here); :mod:`vtlab.vmm.shadow` adds real shadow tables for long mode.

A guest that starts in real mode runs in virtual-8086 mode on the same table
(:mod:`vtlab.vmm.v86`).  Not modelled (the VM stops with a message saying so): a
guest that clears CR0.PE (see :func:`real_mode_message`), and a guest that turns paging on with EFER.LME = 1 (IA-32e
mode activation under the identity table).
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..arch.controls import ProcBased, ProcBased2
from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Cr0, Cr4, Efer
from ..arch.qualifications import CrAccessQualification, CrAccessType
from ..arch.vmcs_fields import VmcsField as F
from .handlers import handle_cr_access, _gpr_name
from .state import VmState

if TYPE_CHECKING:
    from ..cpu.exits import VmExit
    from .machine import VirtualMachine

# A 32-bit page-directory entry that maps a 4-MByte page (SDM Vol. 3A 4.3, Table 4-4):
# P (bit 0), R/W (bit 1), U/S (bit 2), PS (bit 7); bits 31:22 the page frame.
_PDE_4MB = 0x1 | 0x2 | 0x4 | 0x80
_PDE_COUNT = 1024          # 1024 entries x 4 MBytes: all 4 GBytes of linear space
_PAGE_4MB = 1 << 22
_TABLE_SIZE = 0x1000

_CR3_EXITING = ProcBased.CR3_LOAD_EXITING | ProcBased.CR3_STORE_EXITING


def identity_table_address(memory_size: int) -> int:
    """Guest-physical address of the VMM's identity page directory: the top page of RAM."""
    return memory_size - _TABLE_SIZE


def write_identity_table(vm: "VirtualMachine") -> int:
    """Write the identity page directory (1024 4-MByte PDEs) at the top page of guest RAM;
    returns its guest-physical address, the CR3 value that selects it."""
    table = identity_table_address(vm.guest.memory_size)
    entries = [i * _PAGE_4MB | _PDE_4MB for i in range(_PDE_COUNT)]
    vm.guest.write(table, struct.pack(f"<{_PDE_COUNT}I", *entries))
    return table


def real_mode_message() -> str:
    """Why VM entry refuses a real-mode guest with ``ept=False``, and what a VMM does."""
    return ("real mode with ept=False: without EPT there is no \"unrestricted guest\" "
            "(SDM Vol. 3C 25.6.2), so VM entry requires CR0.PE = 1 and CR0.PG = 1 "
            "(IA32_VMX_CR0_FIXED0, SDM Vol. 3C 27.3.1.1, A.7) and VT-x cannot run real-mode "
            "code natively. A VMM of that era ran it in virtual-8086 mode (CR0.PE = PG = 1 "
            "on an identity page table, RFLAGS.VM = 1, a TSS, the CR0 read shadow hiding "
            "PE and PG; HLT, INT n and I/O then fault with #GP and are emulated) or "
            "emulated it instruction by instruction (KVM's emulate_invalid_guest_state). "
            "vtlab's VMM does the first when it brings up a real-mode guest with ept=False "
            "(vtlab.vmm.v86), but not for a guest that leaves protected mode or whose "
            "GUEST_CR0.PE was cleared after bring-up: run this guest with ept=True.")


class IdentityPaging:
    """The VMM part that runs a guest with CR0.PG = 0 on its identity page table.

    Attached by :class:`~vtlab.vmm.machine.VirtualMachine` when ``ept=False`` and the
    guest starts in protected mode (paging off); ``vm.unpaged`` is this object.
    ``active`` says whether the identity table is in use (the guest's CR0.PG is 0).
    """

    def __init__(self, vm: "VirtualMachine") -> None:
        self.vm = vm
        self.table = write_identity_table(vm)
        self.guest_cr3 = vm.vmread(F.GUEST_CR3)      #: the CR3 the guest loaded
        self.switches = 0                             #: paging on/off transitions handled
        self._cr3_exiting = bool(vm.vmread(F.CPU_BASED_VM_EXEC_CONTROL) & _CR3_EXITING)
        vm.vmwrite(F.CR0_GUEST_HOST_MASK, vm.vmread(F.CR0_GUEST_HOST_MASK) | Cr0.PG | Cr0.PE)
        vm.vmwrite(F.CR4_GUEST_HOST_MASK, vm.vmread(F.CR4_GUEST_HOST_MASK) | Cr4.PSE | Cr4.PAE)
        self.active = False
        self._enter_identity()
        vm.handler(ExitReason.CR_ACCESS)(self.on_cr_access)

    # ------------------------------------------------------------ the two states
    def _enter_identity(self) -> None:
        """The guest's CR0.PG is 0: run it on the identity table, CR3 moves exiting."""
        vm = self.vm
        self.active = True
        vm.vmwrite(F.GUEST_CR0, vm.vmread(F.GUEST_CR0) | Cr0.PG)
        vm.vmwrite(F.GUEST_CR4, (vm.vmread(F.GUEST_CR4) | Cr4.PSE) & ~Cr4.PAE)
        vm.vmwrite(F.GUEST_CR3, self.table)
        vm.set_control(ProcBased.CR3_LOAD_EXITING, True)
        vm.set_control(ProcBased.CR3_STORE_EXITING, True)

    def _enter_guest_paging(self) -> None:
        """The guest turned CR0.PG on: its own CR3 and CR4 go into the VMCS."""
        vm = self.vm
        self.active = False
        shadow4 = vm.vmread(F.CR4_READ_SHADOW)
        vm.vmwrite(F.GUEST_CR4, (shadow4 | vm.cpu.caps.cr4_fixed0) & vm.cpu.caps.cr4_fixed1)
        vm.vmwrite(F.GUEST_CR3, self.guest_cr3)
        vm.set_control(ProcBased.CR3_LOAD_EXITING, self._cr3_exiting)
        vm.set_control(ProcBased.CR3_STORE_EXITING, self._cr3_exiting)

    # ------------------------------------------------------------ the exit handler
    def on_cr_access(self, vm: "VirtualMachine", exit: "VmExit") -> bool:
        """CR-access exits (reason 28, qualification per SDM Vol. 3C Table 28-3)."""
        q = CrAccessQualification.decode(exit.qualification)
        if q.access_type is CrAccessType.MOV_TO_CR and q.cr == 0:
            return self._write_cr0(vm, vm.regs[_gpr_name(vm, q.gpr)])
        if q.access_type is CrAccessType.LMSW:   # LMSW never clears PE, never touches PG
            shadow = vm.vmread(F.CR0_READ_SHADOW)
            return self._write_cr0(vm, (shadow & ~0xE) | (q.lmsw_source & 0xF) | (shadow & 1))
        if q.cr == 4 and q.access_type is CrAccessType.MOV_TO_CR and self.active:
            value = vm.regs[_gpr_name(vm, q.gpr)]
            vm.vmwrite(F.CR4_READ_SHADOW, value)
            vm.vmwrite(F.GUEST_CR4, ((value | vm.cpu.caps.cr4_fixed0) & vm.cpu.caps.cr4_fixed1
                                     | Cr4.PSE) & ~Cr4.PAE)
            vm.skip_instruction()
            return True
        if q.cr == 3 and self.active:
            reg = _gpr_name(vm, q.gpr)
            if q.access_type is CrAccessType.MOV_TO_CR:
                self.guest_cr3 = vm.regs[reg]    # kept for when the guest turns paging on
            else:
                vm.regs[reg] = self.guest_cr3
            vm.skip_instruction()
            return True
        if q.cr == 3 and q.access_type is CrAccessType.MOV_TO_CR:
            self.guest_cr3 = vm.regs[_gpr_name(vm, q.gpr)]
        return handle_cr_access(vm, exit)

    def _write_cr0(self, vm: "VirtualMachine", value: int) -> bool:
        if not value & Cr0.PE:
            vm.stop(VmState.STOPPED, "the guest cleared CR0.PE with ept=False: " + real_mode_message())
            return False
        paging = bool(value & Cr0.PG)
        if paging and self.active and vm.vmread(F.GUEST_IA32_EFER) & Efer.LME:
            vm.stop(VmState.STOPPED, "the guest turned paging on with EFER.LME = 1 (IA-32e mode "
                    "activation, SDM Vol. 3A 10.8.5) while the VMM ran it on its identity page "
                    "table (ept=False): switching to IA-32e mode from there is not modelled; "
                    "use ept=True or start the guest in mode='long'")
            return False
        vm.set_guest_cr0(value)   # shadow = value; GUEST_CR0 = value | FIXED0 (PE, PG, NE)
        if paging and self.active:
            self.switches += 1
            self._enter_guest_paging()
        elif not paging and not self.active:
            self.switches += 1
            self.guest_cr3 = vm.vmread(F.GUEST_CR3)   # (its loads did not exit while paged)
            self._enter_identity()
        vm.skip_instruction()
        return True


def attach(vm: "VirtualMachine") -> IdentityPaging | None:
    """What ``VirtualMachine(..., ept=False)`` does at bring-up for a guest whose paging is
    off: protected mode gets the identity table; real mode is left to :mod:`vtlab.vmm.v86`
    (a real-mode GUEST_CR0 that reaches VM entry fails it, with the message
    :func:`explain_entry_failure` completes); paged guests need nothing."""
    cr0 = vm.vmread(F.GUEST_CR0)
    if vm.ept_enabled or vm.control(ProcBased2.UNRESTRICTED_GUEST):
        return None
    if cr0 & Cr0.PE and not cr0 & Cr0.PG:
        return IdentityPaging(vm)
    return None


def explain_entry_failure(vm: "VirtualMachine", message: str) -> str:
    """``message`` plus :func:`real_mode_message` if VM entry failed on a real-mode guest
    with EPT off (a GUEST_CR0.PE = 0 that only an unrestricted guest may have)."""
    if vm.ept_enabled or vm.vmread(F.GUEST_CR0) & Cr0.PE:
        return message
    return f"{message}. {real_mode_message()}"

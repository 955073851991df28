"""Running a real-mode guest without unrestricted guest: virtual-8086 mode, as VMMs did
before 2010 (and KVM still does with ``unrestricted_guest=0``, ``vmx->rmode``).

VM entry refuses CR0.PE = 0 unless "unrestricted guest" is 1, and that needs EPT (SDM
Vol. 3C 27.3.1.1, 25.6.2).  So with ``ept=False`` the VMM enters the guest in
virtual-8086 mode, which runs 8086 code in protected mode:

* CR0.PE = CR0.PG = 1 underneath, on the identity page table of :mod:`vtlab.vmm.unpaged`
  (4-MByte pages, U/S = 1: v86 code runs at CPL 3); the CR0 guest/host mask owns PE and
  PG and the read shadow keeps the guest's 0s (SDM Vol. 3C 25.6.6).
* RFLAGS.VM = 1 and IOPL = 3 (so CLI, STI, PUSHF and POPF run natively, SDM Vol. 3B
  21.2.7); each segment register has base = selector x 16, limit FFFFH and access
  rights F3H, which is what VM entry checks in virtual-8086 mode (SDM Vol. 3C 27.3.1.2).
* TR: a 32-bit TSS the VMM owns, with an all-zero I/O permission bitmap, because in
  virtual-8086 mode IN and OUT consult the bitmap whatever IOPL is (SDM Vol. 1 19.5.2);
  with every bit 0 they reach the I/O exit as in real mode.  The TSS takes the
  :data:`TSS_PAGES` pages below the identity table, at the top of guest RAM.
* #GP intercepted (exception bitmap bit 13): code at CPL 3 cannot run HLT, and the
  privilege check comes before the HLT exit (SDM Vol. 3C 26.1.1), so HLT is a #GP exit
  (reason 0) that the VMM emulates.  This is the exit virtual-8086 mode adds: where the
  unrestricted guest has an HLT exit (reason 12), this guest has an exception exit.

How it runs on vtlab's processor: ``VirtualMachine(..., mode="real", ept=False)`` opens
the guest's engine as a 32-bit one (``Guest(virtual_8086=True)``, see
:mod:`vtlab.cpu.guest`): only there does Unicorn load virtual-8086 segment registers
with DPL 3, so that the code runs at CPL 3 and HLT or MOV from CR0 raise the #GP the
SDM requires (SDM Vol. 3B 21.2.7); the 16-bit code is still decoded as 16-bit, by CS's
D flag.  Bring-up then calls :func:`attach` (``vm.v86``).

What is not emulated (the VM stops with a message): any other #GP - MOV to/from a
control register, LGDT/LIDT, INT n through the guest's interrupt-vector table (the
IDT is the VMM's, limit 0), IRET and other privileged or IOPL-sensitive instructions.
Nor is an interrupt the VMM injects delivered through the guest's interrupt-vector table
(KVM does that in software, ``kvm_inject_realmode_interrupt``): injected through the
VMM's IDT, limit 0, it raises #GP during delivery and the VM stops.
The guest sees IOPL = 3 if it reads FLAGS, and SIDT shows the VMM's IDTR.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.exceptions import INTR_INFO_VALID, IntrInfo, Vector
from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Cr0, Cr4, Rflags
from ..arch.vmcs_fields import VmcsField as F
from . import irq as _irq
from .state import VmState
from .unpaged import write_identity_table

if TYPE_CHECKING:
    from ..cpu.exits import VmExit
    from .machine import VirtualMachine

#: Pages of the VMM's TSS (104 bytes, then 8192 bytes of I/O bitmap and its FFH end
#: byte, SDM Vol. 1 19.5.2), as KVM's RMODE_TSS_SIZE.
TSS_PAGES = 3
_TSS_HEADER = 104          # a 32-bit TSS is 104 bytes (SDM Vol. 3A 8.2.1, Figure 8-2)
_IO_MAP_BASE_OFFSET = 102  # the I/O map base address field (SDM Vol. 3A Figure 8-2)
_IO_BITMAP_BYTES = 8192    # one bit per port, 65536 ports
# Access rights as VMCS fields carry them (SDM Vol. 3C 25.4.1, Table 25-2):
_AR_V86_SEGMENT = 0xF3     # present, DPL 3, read/write accessed data (SDM 27.3.1.2)
_AR_BUSY_TSS32 = 0x8B      # present, type 11: busy 32-bit TSS (SDM 27.3.1.2)
_HLT = 0xF4                # the HLT opcode (SDM Vol. 2B, HLT)
_SEGMENTS = ("CS", "SS", "DS", "ES", "FS", "GS")


class Virtual8086:
    """The VMM part that runs a real-mode guest in virtual-8086 mode (``vm.v86``)."""

    def __init__(self, vm: "VirtualMachine") -> None:
        self.vm = vm
        self.table = write_identity_table(vm)
        self.tss = self.table - TSS_PAGES * 0x1000
        self.emulated_hlts = 0                 #: HLTs emulated on a #GP exit
        tss = bytearray(TSS_PAGES * 0x1000)
        tss[_IO_MAP_BASE_OFFSET:_IO_MAP_BASE_OFFSET + 2] = _TSS_HEADER.to_bytes(2, "little")
        tss[_TSS_HEADER + _IO_BITMAP_BYTES] = 0xFF   # the bitmap's end byte
        vm.guest.write(self.tss, bytes(tss))
        w, r = vm.vmwrite, vm.vmread
        w(F.CR0_GUEST_HOST_MASK, r(F.CR0_GUEST_HOST_MASK) | Cr0.PE | Cr0.PG)
        w(F.GUEST_CR0, r(F.GUEST_CR0) | Cr0.PE | Cr0.PG)
        w(F.CR4_GUEST_HOST_MASK, r(F.CR4_GUEST_HOST_MASK) | Cr4.PSE | Cr4.PAE)
        w(F.GUEST_CR4, (r(F.GUEST_CR4) | Cr4.PSE) & ~Cr4.PAE)
        w(F.GUEST_CR3, self.table)
        w(F.GUEST_RFLAGS, r(F.GUEST_RFLAGS) | Rflags.VM | Rflags.IOPL)
        for seg in _SEGMENTS:
            selector = r(F[f"GUEST_{seg}_SELECTOR"])
            w(F[f"GUEST_{seg}_BASE"], selector << 4)
            w(F[f"GUEST_{seg}_LIMIT"], 0xFFFF)
            w(F[f"GUEST_{seg}_AR_BYTES"], _AR_V86_SEGMENT)
        w(F.GUEST_TR_BASE, self.tss)
        w(F.GUEST_TR_LIMIT, _TSS_HEADER + _IO_BITMAP_BYTES)
        w(F.GUEST_TR_AR_BYTES, _AR_BUSY_TSS32)
        w(F.GUEST_IDTR_LIMIT, 0)   # INT n and exceptions: #GP, which exits
        w(F.EXCEPTION_BITMAP, r(F.EXCEPTION_BITMAP) | 1 << Vector.GP)
        vm.handler(ExitReason.EXCEPTION_NMI)(self.on_exception)

    def on_exception(self, vm: "VirtualMachine", exit: "VmExit") -> bool:
        """#GP from virtual-8086 mode: emulate HLT; anything else stops with a message."""
        info = IntrInfo.decode(exit.intr_info)
        if info.vector != Vector.GP:
            return bool(vm.default(exit))
        rip = vm.vmread(F.GUEST_RIP)
        linear = vm.vmread(F.GUEST_CS_BASE) + rip
        opcode = vm.guest.read(linear, 1)[0]
        if exit.idt_vectoring_info & INTR_INFO_VALID:
            # The #GP came while an event was delivered (SDM Vol. 3C 28.2.4): INT n or an
            # injected interrupt through the VMM's IDT, limit 0.  Re-injecting it would only
            # fault again; the guest's interrupt-vector table is not emulated.
            event = IntrInfo.decode(exit.idt_vectoring_info)
            vm.stop(VmState.STOPPED, unemulated_message(
                f"delivery of vector {event.vector:#x} ({event.type.name})", rip))
            return False
        if opcode != _HLT:
            insn = vm.guest.instruction_at(linear)
            text = insn.text if insn is not None else f"opcode {opcode:#04x}"
            vm.stop(VmState.STOPPED, unemulated_message(text, rip))
            return False
        self.emulated_hlts += 1
        vm.vmwrite(F.GUEST_RIP, rip + 1)       # what the HLT exit handler does, for a #GP
        if vm.vmread(F.GUEST_RFLAGS) & Rflags.IF:
            if vm.timer_period or _irq.sleep_until_timer(vm):
                return True
        vm.stop(VmState.HALTED, f"the guest executed HLT at {rip:#x}")
        return False


def unemulated_message(text: str, rip: int) -> str:
    """Why the VM stopped on a #GP from virtual-8086 mode that this VMM does not emulate."""
    return (f"'{text}' at {rip:#x} raised #GP in virtual-8086 mode (CPL 3, SDM Vol. 3B "
            "21.2.7), the way this VMM runs a real-mode guest with ept=False: without EPT "
            "there is no \"unrestricted guest\" (SDM Vol. 3C 25.6.2) and VM entry requires "
            "CR0.PE = 1 and CR0.PG = 1 (SDM Vol. 3C 27.3.1.1). This VMM emulates only HLT; "
            "a VMM of that era also emulated MOV CR, INT n, IRET, LGDT/LIDT and mode switches "
            "(KVM: handle_rmode_exception, emulate_invalid_guest_state). Run this guest "
            "with ept=True (unrestricted guest), or start it in mode='protected'.")


def attach(vm: "VirtualMachine") -> Virtual8086 | None:
    """With ``ept=False``, a guest that starts in real mode runs in virtual-8086 mode."""
    if vm.ept_enabled or vm.vmread(F.GUEST_CR0) & Cr0.PE:
        return None
    return Virtual8086(vm)

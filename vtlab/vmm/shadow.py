"""A shadow-paging VMM: memory virtualization without EPT, as VMware and Xen did it before 2008.

Without EPT the processor walks only one set of page tables, so the VMM cannot let it
walk the guest's: the guest's "physical" addresses are the VMM's to place.  It keeps
*shadow* page tables instead - linear address to the real frame, built from the guest's
own tables - and points the real CR3 (GUEST_CR3 in the VMCS) at them.  To keep them
right it must see everything that changes a translation:

* MOV to CR3 ("CR3-load exiting"): the guest switches address space; the VMM notes the
  guest's CR3 and starts an empty shadow (this VMM keeps no shadows across switches).
  MOV from CR3 ("CR3-store exiting") returns the guest's value, not the shadow's.
* #PF (exception bitmap bit 14): a shadow entry is missing.  The VMM walks the guest's
  tables: if the guest's own translation forbids the access the fault is the guest's and
  is reflected to it (CR2 and the error code as the guest's tables say); otherwise the
  VMM writes the shadow entry and the guest retries - a "hidden" page fault.
* Writes to the guest's page tables: every guest page that the VMM has read as a paging
  structure is mapped read-only in the shadow, so a guest write to it faults; the VMM
  emulates the write (MOV of a register or an immediate) and drops the shadow entries
  that were derived from the old contents.
* INVLPG ("INVLPG exiting"): the guest drops a translation; the VMM drops the shadow entry.

After changing shadow entries the VMM flushes the TLB of the guest's VPID with INVVPID
(single-context), as KVM does.  Count the exits of ``page-table-heavy`` under this VMM
and under EPT to see why EPT won.

Scope: a long-mode guest (4-level paging) started by vtlab (``VirtualMachine(..., mode=
"long", ept=False)``); the shadow tables live in the top :data:`POOL_PAGES` pages of the
guest's RAM (vtlab's guest-physical memory is the host's when EPT is off), which the
guest must leave alone; the guest's accessed and dirty bits are not maintained.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..arch.controls import ProcBased
from ..arch.exceptions import IntrInfo, Vector
from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Efer
from ..arch.qualifications import CrAccessQualification, CrAccessType
from ..arch.vmcs_fields import VmcsField as F
from .state import VmState
from ..cpu.layout import Layout

if TYPE_CHECKING:
    from ..cpu.vmexit import VmExit
    from .machine import VirtualMachine

#: Pages at the top of guest RAM that hold the shadow tables.
POOL_PAGES = 64
# x86 paging-structure entry bits (SDM Vol. 3A 4.5): P, R/W, U/S, PS, XD; frame 51:12.
_P, _RW, _US, _PS, _XD = 1, 2, 4, 0x80, 1 << 63
_FRAME = 0x000F_FFFF_FFFF_F000
# #PF error-code bits (SDM Vol. 3A 4.7): P, W/R, U/S, I/D.
_EC_P, _EC_W, _EC_U, _EC_I = 1, 2, 4, 16
_SIZES = {"byte": 1, "word": 2, "dword": 4, "qword": 8}


@dataclass
class ShadowStats:
    """What the shadow VMM did (hidden faults are #PF exits the guest never sees)."""

    hidden_faults: int = 0        #: shadow entries filled on a #PF
    guest_faults: int = 0         #: #PFs reflected to the guest
    emulated_writes: int = 0      #: guest page-table writes emulated
    cr3_loads: int = 0
    invlpgs: int = 0
    flushes: int = 0              #: shadow tables dropped (CR3 loads, pool full)


@dataclass
class ShadowPaging:
    """The shadow-paging part of a VMM, attached to one :class:`VirtualMachine`."""

    vm: "VirtualMachine"
    guest_cr3: int = 0
    stats: ShadowStats = field(default_factory=ShadowStats)

    def __post_init__(self) -> None:
        vm = self.vm
        if vm.ept_enabled:
            raise ValueError("shadow paging replaces EPT: make the VM with ept=False")
        if not vm.guest.reg("efer") & Efer.LMA:
            raise ValueError("this shadow VMM handles 4-level (long-mode) guest paging only")
        size = vm.guest.memory_size
        self.pool = [size - (i + 1) * 0x1000 for i in range(POOL_PAGES)]
        self._free: list[int] = []
        self.protected: set[int] = set()          # guest page-table frames, read-only in the shadow
        self.derived: dict[int, set[int]] = {}    # guest table frame -> shadow leaf slots using it
        self.rmap: dict[int, set[int]] = {}       # frame -> shadow leaf slots that map it
        self.guest_cr3 = vm.vmread(F.GUEST_CR3)
        self.root = self._new_root()
        vm.vmwrite(F.GUEST_CR3, self.root)
        self._prefault()
        for flag in (ProcBased.CR3_LOAD_EXITING, ProcBased.CR3_STORE_EXITING, ProcBased.INVLPG_EXITING):
            vm.set_control(flag, True)
        vm.vmwrite(F.CR3_TARGET_COUNT, 0)
        vm.vmwrite(F.EXCEPTION_BITMAP, vm.vmread(F.EXCEPTION_BITMAP) | 1 << Vector.PF)
        vm.vmwrite(F.PAGE_FAULT_ERROR_CODE_MASK, 0)
        vm.vmwrite(F.PAGE_FAULT_ERROR_CODE_MATCH, 0)
        vm.handler(ExitReason.EXCEPTION_NMI)(self.on_exception)
        vm.handler(ExitReason.CR_ACCESS)(self.on_cr_access)
        vm.handler(ExitReason.INVLPG)(self.on_invlpg)

    # ------------------------------------------------------------ shadow tables
    def _alloc(self) -> int:
        if not self._free:
            raise MemoryError
        page = self._free.pop()
        self.vm.guest.write(page, bytes(0x1000))
        return page

    def _new_root(self) -> int:
        self._free = list(self.pool)
        self.protected.clear()
        self.derived.clear()
        self.rmap.clear()
        return self._alloc()

    def flush_all(self) -> None:
        """Drop every shadow entry (a new, empty shadow PML4)."""
        self.root = self._new_root()
        self.vm.vmwrite(F.GUEST_CR3, self.root)
        self.stats.flushes += 1
        self._prefault()

    def _prefault(self) -> None:
        """Shadow the GDT, IDT and TSS pages at once: vtlab's VM entry loads the hidden
        parts of the segment registers from the guest's GDT (README, "Where vtlab's
        processor differs"), through the shadow, which silicon would not need."""
        for linear in (Layout.GDT, Layout.IDT, Layout.TSS):
            frame, flags, tables = self.guest_walk(linear)
            if frame is not None:
                self._fill(linear, frame, flags, tables)

    def _read(self, address: int) -> int:
        return struct.unpack("<Q", self.vm.guest.read(address, 8))[0]

    def _write(self, address: int, value: int) -> None:
        self.vm.guest.write(address, struct.pack("<Q", value))

    def _slot(self, linear: int) -> int:
        """The shadow PTE for ``linear`` (shadow tables allocated on the way)."""
        table = self.root
        for shift in (39, 30, 21):
            at = table + ((linear >> shift) & 0x1FF) * 8
            entry = self._read(at)
            if not entry & _P:
                entry = self._alloc() | _P | _RW | _US     # the leaf decides the permissions
                self._write(at, entry)
            table = entry & _FRAME
        return table + ((linear >> 12) & 0x1FF) * 8

    def _flush_tlb(self) -> None:
        """INVVPID single-context for the guest's VPID: the real TLB caches the shadow."""
        self.vm.cpu.invvpid(1, self.vm.vmread(F.VIRTUAL_PROCESSOR_ID) or 1).check()

    # ------------------------------------------------------------ the guest's tables
    def guest_walk(self, linear: int) -> tuple[int | None, int, list[int]]:
        """(the 4-KByte frame the guest maps ``linear`` to or None, its R/W U/S XD bits as
        a shadow leaf would carry them, the guest table frames read on the way)."""
        table, tables, flags = self.guest_cr3 & _FRAME, [], _RW | _US
        for shift in (39, 30, 21, 12):
            tables.append(table)
            entry = self._read(table + ((linear >> shift) & 0x1FF) * 8)
            if not entry & _P:
                return None, flags, tables
            flags = (flags & entry & (_RW | _US)) | (flags | entry) & _XD
            if shift == 12 or (shift in (30, 21) and entry & _PS):
                size = 1 << shift
                frame = (entry & _FRAME & ~(size - 1)) + (linear & (size - 1) & ~0xFFF)
                return frame, flags, tables
            table = entry & _FRAME
        raise AssertionError("unreachable")

    def _zap(self, slots: set[int]) -> None:
        for slot in slots:
            self._write(slot, 0)

    def _fill(self, linear: int, frame: int, flags: int, tables: list[int]) -> None:
        for t in tables:                       # the tables used become read-only
            if t not in self.protected:
                self.protected.add(t)
                for slot in self.rmap.get(t, ()):
                    self._write(slot, self._read(slot) & ~_RW)
        if frame in self.protected:
            flags &= ~_RW
        try:
            slot = self._slot(linear)
        except MemoryError:                    # the pool is full: start again
            self.flush_all()
            slot = self._slot(linear)
        self._write(slot, frame | _P | flags)
        for t in tables:
            self.derived.setdefault(t, set()).add(slot)
        self.rmap.setdefault(frame, set()).add(slot)

    # ------------------------------------------------------------ exit handlers
    def on_exception(self, vm: "VirtualMachine", exit: "VmExit") -> bool:
        info = IntrInfo.decode(exit.intr_info)
        if info.vector != Vector.PF:
            return bool(vm.default(exit))
        linear, code = exit.qualification, exit.intr_error_code or 0
        frame, flags, tables = self.guest_walk(linear)
        denied = frame is None or (code & _EC_W and not flags & _RW) or (code & _EC_U and not flags & _US) \
            or (code & _EC_I and flags & _XD)
        if denied:                             # the guest's own fault: reflect it
            self.stats.guest_faults += 1
            guest_code = (code & (_EC_W | _EC_U | _EC_I)) | (_EC_P if frame is not None else 0)
            vm.guest.set_reg("cr2", linear)
            return vm.inject_exception(Vector.PF, guest_code)
        if code & _EC_W and frame in self.protected:
            return self._emulate_table_write(vm, exit, linear, frame)
        self.stats.hidden_faults += 1
        self._fill(linear, frame, flags, tables)
        self._flush_tlb()
        return True                            # retry the instruction

    def _emulate_table_write(self, vm: "VirtualMachine", exit: "VmExit", linear: int, frame: int) -> bool:
        """A guest write to one of its page tables: do it for the guest, drop the shadow
        entries derived from that table, skip the instruction."""
        insn = vm.guest.instruction_at(vm.guest.rip)
        text = insn.text if insn is not None else ""
        mnemonic, _, ops = text.partition(" ")
        dest, _, src = ops.partition(", ")
        size = next((n for word, n in _SIZES.items() if dest.startswith(word)), 0)
        if mnemonic != "mov" or not size or not src:
            vm.stop(VmState.STOPPED, f"shadow paging: cannot emulate '{text}', a write to the guest "
                    f"page table at {frame:#x} (only MOV of a register or an immediate)")
            return False
        try:
            value = int(src, 0)
        except ValueError:
            value = vm.regs[src]
        vm.guest.write(frame + (linear & 0xFFF), (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
        self._zap(self.derived.pop(frame, set()))
        self.stats.emulated_writes += 1
        self._flush_tlb()
        vm.vmwrite(F.GUEST_RIP, vm.guest.rip + insn.size)
        return True

    def on_cr_access(self, vm: "VirtualMachine", exit: "VmExit") -> bool:
        q = CrAccessQualification.decode(exit.qualification)
        if q.cr != 3 or q.access_type not in (CrAccessType.MOV_TO_CR, CrAccessType.MOV_FROM_CR):
            return bool(vm.default(exit))
        reg = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
               "r13", "r14", "r15")[q.gpr]
        if q.access_type is CrAccessType.MOV_FROM_CR:
            vm.regs[reg] = self.guest_cr3     # the guest sees its own CR3, not the shadow's
        else:
            self.guest_cr3 = vm.regs[reg]
            self.stats.cr3_loads += 1
            self.flush_all()
            self._flush_tlb()
        vm.skip_instruction()
        return True

    def on_invlpg(self, vm: "VirtualMachine", exit: "VmExit") -> bool:
        linear = exit.qualification
        try:
            slot = self._slot(linear)
        except MemoryError:
            self.flush_all()
        else:
            self._write(slot, 0)
        self.stats.invlpgs += 1
        self._flush_tlb()
        vm.skip_instruction()
        return True


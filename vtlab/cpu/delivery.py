"""Exceptions and interrupts: describing what the CPU raised, and delivering events.

Unicorn reports every exception and interrupt to a host callback instead of vectoring
it through the guest's IDT.  :class:`EventDelivery`, one part of
:class:`vtlab.cpu.guest.Guest`, turns such a report into a :class:`GuestException`
(:meth:`~EventDelivery.make_exception`) and, when an event must really reach the guest
(a VMM injecting an interrupt, an exception the guest handles itself), delivers it the
way the CPU would (:meth:`~EventDelivery.deliver_interrupt`).

Delivery either completes or changes nothing: every check, table read and stack address
is worked out first, and only then are the frame written and the registers loaded.  When
a check fails, :meth:`~EventDelivery.deliver_interrupt` returns a :class:`DeliveryFault` -
the exception that delivery raised, with the error code the SDM gives it (Vol. 3A 6.13),
or the EPT violation it met - and the guest's state is still that of before the event, as
the VMX layer needs it for a VM exit "during event delivery" (SDM 28.2.4).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

import unicorn
from unicorn import x86_const as X

from ..arch.exceptions import ERROR_CODE_VECTORS as _ERROR_CODE_VECTORS
from ..arch.exceptions import Vector, selector_error_code
from ..arch.msrs import Cr0, Efer, Rflags

#: The exceptions that push an error code (SDM Vol. 3A 6.13, Table 6-1).  Unicorn never
#: reports the code, so vtlab supplies 0: right for the #GP(0) of a privileged
#: instruction or a segment check at CPL 3 (SDM Vol. 3A 6.15, "Exception 13").
ERROR_CODE_VECTORS = set(_ERROR_CODE_VECTORS)

#: RFLAGS bits every protected-mode delivery clears (SDM Vol. 3A 6.12.1: TF, VM, RF, NT),
#: and IF as well through an interrupt gate (6.12.1.3).
_CLEARED_BY_DELIVERY = int(Rflags.TF | Rflags.VM | Rflags.RF | Rflags.NT)
#: Real-address mode: IF, TF, AC and RF are cleared (SDM Vol. 3A "8086 Emulation").
_CLEARED_REAL = int(Rflags.IF | Rflags.TF | Rflags.AC | Rflags.RF)
_IF, _VM = int(Rflags.IF), int(Rflags.VM)
_PE, _LMA = int(Cr0.PE), int(Efer.LMA)

#: Offsets in a 64-bit TSS (SDM Vol. 3A 8.7, Figure 8-11): RSP0-2 at 4, 12, 20; IST1-7 at 36 ... 84.
_TSS64_RSP0, _TSS64_IST1 = 4, 36


@dataclass
class GuestException:
    """An exception or interrupt the CPU raised while running the guest."""

    vector: int
    rip: int
    error_code: int | None = None
    cpl: int = 0
    instruction: str = ""
    #: #PF only: the linear address that caused it (what the CPU loads into CR2).
    address: int | None = None

    @property
    def name(self) -> str:
        try:
            return "#" + Vector(self.vector).name
        except ValueError:
            return f"INT {self.vector:#x}"

    def __str__(self) -> str:
        code = "" if self.error_code is None else f"({self.error_code})"
        return f"{self.name}{code} at {self.rip:#x} (CPL {self.cpl}) {self.instruction}".strip()


@dataclass
class DeliveryFault:
    """Why an event could not be delivered (nothing of the guest's state has changed).

    Either an exception that delivery raised - ``vector`` with ``error_code`` (None in
    real-address mode, which pushes none) and, for a #PF, the linear ``address`` - or,
    with ``vector`` None, an EPT violation: the guest-physical address ``ept_physical``
    (reached from ``ept_linear``) lacked the permission the access needed.
    """

    vector: int | None
    error_code: int | None = None
    note: str = ""
    address: int | None = None
    ept_physical: int | None = None
    ept_linear: int | None = None
    ept_write: bool = False
    ept_permissions: int = 0

    def __str__(self) -> str:
        return self.note


class _Abort(Exception):
    """Internal: a check of the delivery failed (carries the DeliveryFault)."""

    def __init__(self, fault: DeliveryFault):
        self.fault = fault


def _gp(code: int | None, note: str) -> _Abort:
    return _Abort(DeliveryFault(int(Vector.GP), code, note))


class EventDelivery:
    """Exception reports and IVT/IDT delivery (a part of :class:`~vtlab.cpu.guest.Guest`).

    Relies on the Guest for ``uc``, the registers, the segments and memory, and on
    ``page_fault`` (set when Unicorn raised a #PF).
    """

    def make_exception(self, vector: int) -> GuestException:
        """Describe an exception Unicorn just raised (RIP points at the faulting instruction
        for faults, after the INT n for software interrupts)."""
        rip = self.rip
        insn = self.instruction_at()
        code = 0 if vector in ERROR_CODE_VECTORS else None
        address = None
        if vector == Vector.PF and self.page_fault is not None:
            address, code = self.page_fault
        return GuestException(vector, rip, code, self.cpl, insn.text if insn else "", address)

    # ------------------------------------------------------------ memory
    def _event_access(self, linear: int, size: int, write: bool, user: bool,
                      ept: Callable[[int], int] | None) -> list[tuple[int, int]]:
        """The guest-physical pieces ``[(physical, length)]`` of an access delivery makes,
        or _Abort with the #PF / EPT violation it raises.  ``ept(page)`` gives a page's
        EPT permissions (None: EPT is off).  RAM that is not there raises UcError (the
        caller's triple fault), before anything was written."""
        pieces = []
        cache = self._delivery_pages
        while size > 0:
            n = min(size, 0x1000 - (linear & 0xFFF))
            key = (linear >> 12, write, user)
            page = cache.get(key)
            if page is not None:   # (this delivery already translated and checked the page)
                pieces.append((page | (linear & 0xFFF), n))
                linear, size = linear + n, size - n
                continue
            if self._delivery_paging is None:
                self._delivery_paging = (self.reg("cr0"), self.reg("cr3"), self.reg("cr4"), self.reg("efer"))
            physical, pf_code = self.translate_linear(linear, write, user, self._delivery_paging)
            if physical is None:
                raise _Abort(DeliveryFault(int(Vector.PF), pf_code, f"#PF at {linear:#x} during delivery",
                                           address=linear))
            if ept is not None:
                perms = ept(physical & ~0xFFF)
                if not perms & (2 if write else 1):
                    raise _Abort(DeliveryFault(None, None, f"EPT violation at {physical:#x} during delivery",
                                               ept_physical=physical, ept_linear=linear, ept_write=write,
                                               ept_permissions=perms))
            if physical + n > self.memory_size:
                raise unicorn.UcError(unicorn.UC_ERR_WRITE_UNMAPPED if write else unicorn.UC_ERR_READ_UNMAPPED)
            cache[key] = physical & ~0xFFF
            pieces.append((physical, n))
            linear, size = linear + n, size - n
        return pieces

    #: Pages one delivery translated: (linear page, write, user) -> physical page; and the
    #: paging registers it translated with.
    _delivery_pages: dict = {}
    _delivery_paging: tuple | None = None

    def _event_read(self, linear: int, size: int, ept) -> bytes:
        """An implicit supervisor-mode read of a system table (IDT, GDT, LDT, TSS)."""
        return b"".join(self.read(p, n) for p, n in self._event_access(linear, size, False, False, ept))

    def _descriptor_for(self, selector: int, ext: bool, ept) -> int:
        """The descriptor ``selector`` names, or #GP(selector) beyond its table's limit."""
        if selector & 4:
            ldtr = self.segment("ldtr")
            if ldtr.unusable:
                raise _gp(selector_error_code(selector, ext=ext), f"selector {selector:#x}: no LDT")
            base, limit = ldtr.base, ldtr.limit
        else:
            base, limit = self.descriptor_table("gdtr")
        if (selector | 7) > limit:
            raise _gp(selector_error_code(selector, ext=ext),
                      f"selector {selector:#x} is beyond the descriptor table's limit {limit:#x}")
        return struct.unpack("<Q", self._event_read(base + (selector & ~7), 8, ept))[0]

    # ---------------------------------------------------------- delivery
    def deliver_interrupt(self, vector: int, error_code: int | None = None,
                          return_rip: int | None = None, *, software: bool = False,
                          ept: Callable[[int], int] | None = None) -> DeliveryFault | None:
        """Deliver an interrupt or exception through the guest's IVT/IDT, as the CPU would.

        Unicorn reports events but never vectors them (its UC_HOOK_INTR replaces the
        delivery), so vtlab does what SDM Vol. 3A 6.12 (protected mode), 6.14 (IA-32e
        mode) and the real-address-mode rules of "8086 Emulation" describe: check the
        gate and the handler's code segment, switch to the stack the TSS gives on a
        privilege change (or the IST, 6.14.5), push the return frame (in IA-32e mode on
        a 16-byte aligned stack, always with SS:RSP, 6.14.2; from virtual-8086 mode with
        GS, FS, DS and ES too), load CS:RIP from the gate and clear TF, VM, RF, NT - and
        IF for interrupt gates.

        ``software``: the event is INT n, INT3 or INTO - the gate's DPL is checked against
        the CPL (6.12.1) and an exception raised by delivery has EXT = 0 in its error
        code (6.13); for everything else (INT1 included) EXT = 1.  ``ept``: the EPT
        permissions of a guest-physical page, when EPT is on.

        Returns None when the event was delivered, else the :class:`DeliveryFault`
        (nothing changed).  Memory that does not exist raises ``UcError``.
        """
        rip = self.rip if return_rip is None else return_rip
        self._delivery_pages, self._delivery_paging = {}, None
        try:
            if not self.reg("cr0") & _PE:
                plan = self._real_mode_plan(vector, rip, ept)
            else:
                plan = self._protected_plan(vector, error_code, rip, software, ept)
        except _Abort as abort:
            return abort.fault
        plan()
        return None

    def _real_mode_plan(self, vector: int, rip: int, ept):
        """Real-address mode: the 4-byte IVT entry offset:segment; FLAGS, CS, IP pushed."""
        _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
        if vector * 4 + 3 > limit:
            raise _gp(None, f"vector {vector} is beyond the IVT limit {limit:#x}")
        offset, segment = struct.unpack("<HH", self._event_read(base + vector * 4, 4, ept))
        flags, sp, ss = self.reg("eflags"), self.reg("rsp"), self.reg("ss")
        writes = []
        for i, value in enumerate((flags, self.reg("cs"), rip), 1):   # pushed in this order
            at = (ss << 4) + ((sp - 2 * i) & 0xFFFF)   # (the stack wraps at 64 KiB)
            writes.append((self._event_access(at, 2, True, False, ept), (value & 0xFFFF).to_bytes(2, "little")))

        def commit() -> None:
            self._write_pieces(writes)
            self.set_reg("rsp", (sp & ~0xFFFF) | ((sp - 6) & 0xFFFF))
            self.set_reg("eflags", flags & ~_CLEARED_REAL)
            self.uc.reg_write(X.UC_X86_REG_CS, segment)
            self.rip = offset
        return commit

    def _write_pieces(self, writes) -> None:
        for pieces, data in writes:
            for physical, n in pieces:
                self.write(physical, data[:n])
                data = data[n:]

    def _protected_plan(self, vector: int, error_code: int | None, rip: int, software: bool, ept):
        """Protected mode and IA-32e mode (SDM Vol. 3A 6.12, 6.14): every check first."""
        ext = not software
        idt_code = selector_error_code(vector, idt=True, ext=ext)
        flags = self.reg("eflags")
        v86 = bool(flags & _VM)
        cpl = 3 if v86 else self.cpl
        long_mode = bool(self.reg("efer") & _LMA)
        size = 16 if long_mode else 8
        base, limit = self.descriptor_table("idtr")
        if vector * size + size - 1 > limit:
            raise _gp(idt_code, f"vector {vector} is beyond the IDT limit {limit:#x}")
        raw = self._event_read(base + vector * size, size, ept)
        lo = struct.unpack("<Q", raw[:8])[0]
        gate_type, gate_dpl, present = (lo >> 40) & 0x1F, (lo >> 45) & 3, (lo >> 47) & 1
        valid = (0xE, 0xF) if long_mode else (0x6, 0x7, 0xE, 0xF)   # (S = 0 and the type)
        if gate_type not in valid:
            raise _gp(idt_code, f"IDT entry {vector} is not an interrupt or trap gate"
                      + (" (type 5, a task gate whose new TSS failed its checks)" if gate_type == 5 else ""))
        if software and gate_dpl < cpl:
            raise _gp(idt_code, f"INT {vector:#x} at CPL {cpl} through a gate of DPL {gate_dpl}")
        if not present:
            raise _Abort(DeliveryFault(int(Vector.NP), idt_code, f"IDT entry {vector} is not present"))
        selector = (lo >> 16) & 0xFFFF
        offset = (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16)
        if long_mode:
            offset |= struct.unpack("<I", raw[8:12])[0] << 32
        word = 8 if long_mode else 4 if gate_type & 8 else 2
        if word == 2:
            offset &= 0xFFFF
        # The handler's code segment (SDM Vol. 3A 6.12.1.2 and the INT n pseudo-code).
        sel_code = selector_error_code(selector, ext=ext)
        if selector & ~3 == 0:
            raise _gp(selector_error_code(0, ext=ext), f"IDT entry {vector} has a null code selector")
        desc = self._descriptor_for(selector, ext, ept)
        access = (desc >> 40) & 0xFF
        if not access & 0x10 or not access & 0x08:
            raise _gp(sel_code, f"selector {selector:#x} of IDT entry {vector} is not a code segment")
        dpl = (access >> 5) & 3
        if dpl > cpl:
            raise _gp(sel_code, f"the handler's code segment {selector:#x} has DPL {dpl} > CPL {cpl}")
        if not access & 0x80:
            raise _Abort(DeliveryFault(int(Vector.NP), sel_code, f"code segment {selector:#x} is not present"))
        if long_mode and ((desc >> 53) & 3) != 1:
            raise _gp(sel_code, f"code segment {selector:#x} is not a 64-bit code segment (L = 1, D = 0)")
        new_cpl = cpl if access & 0x04 else dpl   # conforming: no privilege change
        if v86 and new_cpl != 0:
            raise _gp(sel_code, "from virtual-8086 mode the handler must run at CPL 0")
        # The stack.
        old_cs, old_ss, old_sp = self.reg("cs"), self.reg("ss"), self.reg("rsp")
        tr = self.segment("tr")
        tr_code = selector_error_code(tr.selector, ext=ext)
        ist = (lo >> 32) & 7 if long_mode else 0
        new_ss = old_ss
        switch = new_cpl < cpl
        if long_mode:
            if ist or switch:
                at = _TSS64_IST1 + 8 * (ist - 1) if ist else _TSS64_RSP0 + 8 * new_cpl
                if at + 7 > tr.limit:
                    raise _Abort(DeliveryFault(int(Vector.TS), tr_code, f"the TSS (limit {tr.limit:#x}) "
                                               f"holds no {'IST' + str(ist) if ist else 'RSP' + str(new_cpl)}"))
                new_sp = struct.unpack("<Q", self._event_read(tr.base + at, 8, ept))[0]
            else:
                new_sp = old_sp
            if switch:
                new_ss = new_cpl          # a null selector with RPL = the new CPL (6.14.4)
            new_sp &= ~0xF                # 16-byte aligned frame (6.14.2)
            ss_base, sp_mask = 0, 0xFFFF_FFFF_FFFF_FFFF
        elif switch:
            at = 4 + 8 * new_cpl
            if at + 5 > tr.limit:
                raise _Abort(DeliveryFault(int(Vector.TS), tr_code, f"the TSS (limit {tr.limit:#x}) holds "
                                           f"no SS{new_cpl}:ESP{new_cpl}"))
            new_sp, new_ss = struct.unpack("<IH", self._event_read(tr.base + at, 6, ept))
            ss_code = selector_error_code(new_ss, ext=ext)
            if new_ss & ~3 == 0:
                raise _Abort(DeliveryFault(int(Vector.TS), selector_error_code(0, ext=ext),
                                           f"SS{new_cpl} in the TSS is a null selector"))
            if (new_ss & 3) != new_cpl:
                raise _Abort(DeliveryFault(int(Vector.TS), ss_code, f"SS{new_cpl} {new_ss:#x} has RPL {new_ss & 3}"))
            ss_desc = self._descriptor_for(new_ss, ext, ept)
            ss_access = (ss_desc >> 40) & 0xFF
            if (ss_access >> 5) & 3 != new_cpl or (ss_access & 0x1A) != 0x12:
                raise _Abort(DeliveryFault(int(Vector.TS), ss_code,
                                           f"SS{new_cpl} {new_ss:#x} is not a writable data segment of DPL {new_cpl}"))
            if not ss_access & 0x80:
                raise _Abort(DeliveryFault(int(Vector.SS), ss_code, f"stack segment {new_ss:#x} is not present"))
            ss_base = ((ss_desc >> 16) & 0xFF_FFFF) | ((ss_desc >> 56) & 0xFF) << 24
            sp_mask = 0xFFFF_FFFF if (ss_desc >> 54) & 1 else 0xFFFF
        else:
            new_sp = old_sp
            ss = self.segment("ss")
            ss_base, sp_mask = ss.base, 0xFFFF_FFFF if ss.access_rights & (1 << 14) else 0xFFFF
        values = []
        if v86:
            values += [self.reg(s) for s in ("gs", "fs", "ds", "es")]
        if long_mode or switch:
            values += [old_ss, old_sp]
        values += [flags, old_cs, rip]
        if error_code is not None:
            values.append(error_code)
        mask = (1 << (8 * word)) - 1
        writes = []
        for i, value in enumerate(values, 1):   # in the order the CPU pushes them
            slot = (new_sp - i * word) & sp_mask
            linear = ss_base + slot if long_mode else (ss_base + slot) & 0xFFFF_FFFF
            writes.append((self._event_access(linear, word, True, new_cpl == 3, ept),
                           (value & mask).to_bytes(word, "little")))
        sp = (new_sp - len(values) * word) & sp_mask
        if sp_mask == 0xFFFF:   # a 16-bit stack: only SP moves
            sp |= new_sp & ~0xFFFF
        new_flags = flags & ~_CLEARED_BY_DELIVERY
        if not gate_type & 1:
            new_flags &= ~_IF   # interrupt gate (6, E): IF := 0 (6.12.1.3)
        new_cs = (selector & ~3) | new_cpl   # CS.RPL := the new CPL

        def commit() -> None:
            self._write_pieces(writes)
            self.set_reg("eflags", new_flags)
            # The descriptors were read (and found reachable) above, so the registers are
            # written directly.
            uc = self.uc
            if new_cpl < cpl or v86:
                # vtlab plays the microcode: drop to ring 0 (see load_segment), then load
                # the new CS and SS as the privilege change does.
                cr0 = uc.reg_read(X.UC_X86_REG_CR0)
                uc.reg_write(X.UC_X86_REG_CR0, cr0 & ~_PE)
                uc.reg_write(X.UC_X86_REG_SS, 0)
                uc.reg_write(X.UC_X86_REG_CR0, cr0)
                uc.reg_write(X.UC_X86_REG_CS, new_cs)
                uc.reg_write(X.UC_X86_REG_SS, new_ss)
                if v86:
                    for reg in (X.UC_X86_REG_DS, X.UC_X86_REG_ES, X.UC_X86_REG_FS, X.UC_X86_REG_GS):
                        uc.reg_write(reg, 0)
            else:
                uc.reg_write(X.UC_X86_REG_CS, new_cs)
            self.set_reg("rsp", sp)
            self.rip = offset
        return commit

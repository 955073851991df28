"""The PC's interrupt controller: two cascaded Intel 8259A PICs, as a VMM emulates them.

A guest programs each 8259A with initialization command words (ICW1 on the command port,
then ICW2 - the vector base - ICW3 and, if ICW1 asked for it, ICW4 on the data port) and
then drives it with operation command words: OCW1 (the interrupt mask, on the data port),
OCW2 (end of interrupt, on the command port) and OCW3 (which register a command-port read
returns: IRR or ISR).  Port numbers and bit meanings are in :mod:`vtlab.arch.interrupts`.

Three 8-bit registers per chip hold its state: IRR (requests seen on the IR inputs,
edge-triggered), ISR (requests acknowledged and being serviced) and IMR (masked inputs).
In the fully nested mode a PC uses, IR0 has the highest priority (rotation commands move
the lowest priority around); a request is passed on to the CPU only if it is unmasked and
of higher priority than every request in service.  The slave's INT output is the
master's IR2, so IRQ 8-15 reach the CPU through the master's IR2.

The VMM plays the CPU's INTA cycle: :meth:`PicPair.acknowledge` moves the highest request
from IRR to ISR and returns its vector (ICW2's base + the IR number), which the VMM then
injects into the guest with VM-entry event injection (interruption type 0, external
interrupt, SDM Vol. 3C 27.6).  The guest's handler ends with an EOI (OCW2 = 20H).

Not modelled: the MCS-80/85 mode (ICW4 uPM = 0), level-triggered inputs (ICW1 LTIM), the
special mask and special fully nested modes, polling (OCW3 P); a guest that asks for them
stops the VM with a message saying so.
"""
from __future__ import annotations

from ..arch.interrupts import (ICW1_IC4, ICW1_INIT, ICW1_LTIM, ICW1_SINGLE, ICW4_8086, ICW4_AEOI, ICW4_SFNM,
                               OCW2_EOI, OCW2_ROTATE, OCW2_SPECIFIC, OCW3_ESMM, OCW3_POLL, OCW3_READ_ISR,
                               OCW3_READ_REGISTER, OCW3_SELECT, OCW3_SMM, PIC_CASCADE_IRQ, PIC_MASTER_COMMAND,
                               PIC_MASTER_DATA, PIC_SLAVE_COMMAND, PIC_SLAVE_DATA)
from .devices import Device

#: OCW3 ESMM = SMM = 1 sets the special mask mode (not modelled); SMM alone is no action
#: and ESMM alone resets a mode that is never set here (8259A data sheet, OCW3).
_OCW3_SET_SPECIAL_MASK = OCW3_ESMM | OCW3_SMM


class DeviceProgrammingError(ValueError):
    """A guest programmed a device in a way vtlab's model does not support (the message
    says which command word and bit)."""


class Pic8259(Device):
    """One 8259A on the device bus (its command and data port): IRR, ISR, IMR, the
    initialization sequence and EOIs (see the module doc)."""

    def __init__(self, name: str, vector_base: int, command_port: int):
        self.name = f"pic-{name}"
        self.command_port = command_port
        self.irr = self.isr = self.imr = 0
        self.vector_base = vector_base   #: ICW2 bits 7:3 (the PC BIOS uses 08H and 70H)
        self.lowest = 7                  #: the IR with the lowest priority (7 until rotated)
        self.auto_eoi = False
        self.read_isr = False            #: OCW3 RR/RIS: a command-port read returns ISR
        self.cascade = 0                 #: ICW3: master - inputs with a slave; slave - its ID
        self._init_step = 0              #: 0: operating; 2, 3, 4: the next ICW expected
        self._icw1 = 0
        self.pair: "PicPair | None" = None   #: the pair this chip belongs to

    def ports(self) -> range:
        return range(self.command_port, self.command_port + 2)

    def read(self, port: int, size: int) -> int:   # (the bus's interface)
        return self.read_register(port == self.command_port)

    def write(self, port: int, size: int, value: int) -> None:
        self.write_register(port == self.command_port, value)

    # ------------------------------------------------------------ priorities
    def _by_priority(self) -> list[int]:
        """IR numbers from the highest priority to the lowest."""
        first = (self.lowest + 1) & 7
        return [(first + i) & 7 for i in range(8)]

    def highest_request(self) -> int | None:
        """The unmasked request the chip passes on (fully nested mode): the highest-priority
        bit of IRR & ~IMR, if it outranks everything in service."""
        for ir in self._by_priority():
            if self.isr >> ir & 1:
                return None          # an equal or higher request is in service
            if (self.irr & ~self.imr) >> ir & 1:
                return ir
        return None

    def raise_ir(self, ir: int) -> None:
        """An edge on input ``ir``: the request is latched in IRR (edge-triggered mode)."""
        self.irr |= 1 << ir

    def acknowledge(self, ir: int) -> int:
        """INTA for ``ir``: IRR -> ISR (unless automatic EOI); returns the vector."""
        self.irr &= ~(1 << ir)
        if self.auto_eoi:
            self._rotate_after(ir, False)
        else:
            self.isr |= 1 << ir
        return (self.vector_base & 0xF8) | ir

    def _rotate_after(self, ir: int, rotate: bool) -> None:
        if rotate:
            self.lowest = ir

    # ------------------------------------------------------------ port I/O
    def write_register(self, command: bool, value: int) -> None:
        """A byte written to the command (A0 = 0) or data (A0 = 1) port."""
        value &= 0xFF
        if command and value & ICW1_INIT:
            self._icw1_written(value)
        elif not command and self._init_step:
            self._icw_written(value)
        elif not command:
            self.imr = value                                         # OCW1
        elif value & OCW3_SELECT:
            self._ocw3(value)
        else:
            self._ocw2(value)

    def read_register(self, command: bool) -> int:
        """A byte read from the command port (IRR or ISR, as OCW3 chose) or data port (IMR)."""
        if not command:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def _icw1_written(self, value: int) -> None:
        """ICW1 starts initialization: the mask and the in-service bits clear, IR7 gets the
        lowest priority, reads return IRR, and the edge latches reset."""
        if value & ICW1_LTIM:
            raise DeviceProgrammingError(f"{self.name} 8259A: ICW1 {value:#04x} selects level-triggered "
                                         "inputs (LTIM, bit 3): vtlab models edge-triggered ones only")
        self._icw1 = value
        self.irr = self.isr = self.imr = 0
        self.lowest, self.read_isr, self.auto_eoi = 7, False, False
        self._init_step = 2

    def _icw_written(self, value: int) -> None:
        step = self._init_step
        if step == 2:                                                # ICW2: vector base
            self.vector_base = value & 0xF8
            step = 3 if not self._icw1 & ICW1_SINGLE else 4
        elif step == 3:                                              # ICW3: cascading
            self.cascade = value
            step = 4
        else:                                                        # ICW4
            if not value & ICW4_8086:
                raise DeviceProgrammingError(f"{self.name} 8259A: ICW4 {value:#04x} has uPM (bit 0) = 0, "
                                             "the MCS-80/85 mode; an x86 PC needs 8086 mode (uPM = 1)")
            if value & ICW4_SFNM:
                raise DeviceProgrammingError(f"{self.name} 8259A: ICW4 {value:#04x} sets SFNM (bit 4), the "
                                             "special fully nested mode, which vtlab does not model: "
                                             "use the fully nested mode (SFNM = 0)")
            self.auto_eoi = bool(value & ICW4_AEOI)
            step = 0
        if step == 4 and not self._icw1 & ICW1_IC4:
            # No ICW4: its functions are cleared, which would be the MCS-80/85 mode.
            raise DeviceProgrammingError(f"{self.name} 8259A: ICW1 {self._icw1:#04x} has IC4 (bit 0) = 0, "
                                         "so no ICW4 follows and the chip is left in MCS-80/85 mode; "
                                         "an x86 guest sets IC4 and writes ICW4 = 01H")
        self._init_step = step

    def _ocw2(self, value: int) -> None:
        """OCW2: non-specific EOI (20H), specific EOI (60H | level), rotate on EOI (A0H,
        E0H | level), set priority (C0H | level)."""
        rotate, specific, eoi = bool(value & OCW2_ROTATE), bool(value & OCW2_SPECIFIC), bool(value & OCW2_EOI)
        level = value & 7
        if eoi and not specific:            # the highest-priority IR in service ends
            for ir in self._by_priority():
                if self.isr >> ir & 1:
                    self.isr &= ~(1 << ir)
                    self._rotate_after(ir, rotate)
                    break
        elif eoi and specific:
            self.isr &= ~(1 << level)
            self._rotate_after(level, rotate)
        elif specific and rotate:           # set priority: ``level`` becomes the lowest
            self.lowest = level
        # (R = 1 alone, SL = EOI = 0: rotate in automatic-EOI mode - priorities unchanged here)

    def _ocw3(self, value: int) -> None:
        if value & OCW3_POLL or value & _OCW3_SET_SPECIAL_MASK == _OCW3_SET_SPECIAL_MASK:
            raise DeviceProgrammingError(f"{self.name} 8259A: OCW3 {value:#04x} asks for the poll command "
                                         "(P, bit 2) or sets the special mask mode (ESMM and SMM, bits "
                                         "6 and 5), which vtlab does not model")
        if value & OCW3_READ_REGISTER:
            self.read_isr = bool(value & OCW3_READ_ISR)


class PicPair:
    """The PC/AT's master and slave 8259A (ports 20H-21H and A0H-A1H), IRQ 0-15.

    The two chips are the devices on the bus (:attr:`master`, :attr:`slave`); the pair is
    what the VMM talks to: it raises IRQs and plays the INTA cycle.  Before the guest
    initializes them the vector bases are the PC BIOS's: 08H (IRQ 0-7) and 70H (IRQ
    8-15); every input is unmasked.
    """

    def __init__(self):
        self.master = Pic8259("master", 0x08, PIC_MASTER_COMMAND)
        self.slave = Pic8259("slave", 0x70, PIC_SLAVE_COMMAND)
        self.master.cascade = 1 << PIC_CASCADE_IRQ
        self.slave.cascade = PIC_CASCADE_IRQ
        self.master.pair = self.slave.pair = self   # (so a bus holding the chips finds the pair)
        #: Vectors handed to the CPU (the VMM's injections), oldest first.
        self.delivered: list[int] = []

    @property
    def devices(self) -> tuple[Pic8259, Pic8259]:
        """The two chips, as the device bus holds them."""
        return self.master, self.slave

    def _chip(self, port: int) -> Pic8259:
        if port in (PIC_MASTER_COMMAND, PIC_MASTER_DATA):
            return self.master
        if port in (PIC_SLAVE_COMMAND, PIC_SLAVE_DATA):
            return self.slave
        raise ValueError(f"port {port:#x} is not a PIC port (20H-21H, A0H-A1H)")

    def read(self, port: int, size: int = 1) -> int:
        """An IN from one of the four ports (as the bus would route it)."""
        return self._chip(port).read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        """An OUT to one of the four ports."""
        self._chip(port).write(port, size, value)

    # ------------------------------------------------------- the VMM's side
    def raise_irq(self, irq: int) -> None:
        """An edge on IRQ ``irq`` (0-15; 8-15 are the slave's IR0-7, cascaded on IRQ 2)."""
        if not 0 <= irq <= 15:
            raise ValueError(f"IRQ {irq} does not exist on a PC's PIC pair (IRQ 0-15)")
        if irq >= 8:
            self.slave.raise_ir(irq - 8)
            self._cascade()
        else:
            self.master.raise_ir(irq)

    def _cascade(self) -> None:
        """The slave's INT output follows its highest request, into the master's IR2."""
        if self.slave.highest_request() is not None:
            self.master.raise_ir(PIC_CASCADE_IRQ)

    def pending(self) -> bool:
        """Is the master's INT output asserted (a request the CPU should take)?"""
        return self.master.highest_request() is not None

    def acknowledge(self) -> int | None:
        """The CPU's INTA: the vector of the highest request, now in service; None if
        nothing is pending.  A request on IR2 acknowledges the slave for its vector."""
        ir = self.master.highest_request()
        if ir is None:
            return None
        vector = self.master.acknowledge(ir)
        if ir == PIC_CASCADE_IRQ and self.master.cascade >> PIC_CASCADE_IRQ & 1:
            slave_ir = self.slave.highest_request()
            if slave_ir is None:
                vector = (self.slave.vector_base & 0xF8) | 7   # a spurious IRQ 15
            else:
                vector = self.slave.acknowledge(slave_ir)
                self._cascade()   # another slave request keeps IR2 asserted
        self.delivered.append(vector)
        return vector

    def vector_of(self, irq: int) -> int:
        """The vector IRQ ``irq`` is delivered with (ICW2's base + its IR number)."""
        chip = self.master if irq < 8 else self.slave
        return (chip.vector_base & 0xF8) | (irq & 7)

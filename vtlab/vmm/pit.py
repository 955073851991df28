"""The PC's interval timer: an Intel 8254 PIT whose counter 0 drives IRQ 0.

A guest programs a counter with a control word on port 43H - bits 7:6 the counter (0-2;
3 is the read-back command), bits 5:4 how the count is read and written (0 latch the
count, 1 LSB only, 2 MSB only, 3 LSB then MSB), bits 3:1 the mode, bit 0 BCD - and then
writes the initial count to the counter's port (40H-42H).  Counter 0's OUT is wired to the
master PIC's IRQ 0 (:mod:`vtlab.arch.interrupts`).

Modelled: modes 0 (interrupt on terminal count: one IRQ 0 after ``count`` input ticks),
2 (rate generator) and 3 (square wave) - both periodic, an IRQ 0 edge every ``count``
ticks; a count of 0 means 65536; reading the count (live or latched, LSB/MSB in the
order the control word chose).  Not modelled: modes 1 and 5 (hardware-triggered: they
start on a rising edge of GATE, which on a PC only counter 2's can give - counters 0
and 1 have GATE tied high), mode 4 (software-triggered strobe), BCD counting and the
read-back command: a guest that asks for them stops the VM with a message saying so.

**vtlab's clock.**  The 8254's input clock is 1.193182 MHz on a PC; vtlab's clock is the
guest's instruction count (:mod:`vtlab.cpu.event_controls`), and this model counts
:data:`INSTRUCTIONS_PER_TICK` guest instructions per input tick - one - so a count of N
gives IRQ 0 every N guest instructions: a guest that asks for 100 Hz (count 11932)
gets an interrupt every 11,932 instructions, as if its CPU ran one instruction per PIT
tick.  Counting is deterministic: the same guest gets its interrupts at the same
instructions on every run.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..arch.interrupts import PIT_CHANNEL0, PIT_COMMAND, PIT_INPUT_HZ
from .devices import Device
from .pic import DeviceProgrammingError

#: Guest instructions per 8254 input-clock tick (see the module doc).
INSTRUCTIONS_PER_TICK = 1
#: The largest count: an initial count of 0 counts 65536 ticks.
_FULL_COUNT = 0x10000
#: Control-word fields (8254 data sheet, "Control Word Format").
_SC_SHIFT, _RW_SHIFT, _MODE_SHIFT = 6, 4, 1
_RW_LATCH, _RW_LSB, _RW_MSB, _RW_BOTH = 0, 1, 2, 3
_READ_BACK = 3
_PERIODIC_MODES = frozenset({2, 3})
_MODELLED_MODES = frozenset({0, 2, 3})


@dataclass
class Counter:
    """One 8254 counter: its mode, initial count and when counting started."""

    mode: int = 0
    access: int = _RW_BOTH
    count: int = 0            #: the initial count (1-65536); 0 until the guest writes one
    start: int | None = None  #: vtlab's clock when the count was loaded (None: not counting)
    write_lsb: int | None = None   #: the LSB written, waiting for its MSB (access mode 3)
    latched: int | None = None     #: a count latched by a counter-latch command, until read
    read_msb_next: bool = False    #: access mode 3: the next read returns the MSB
    fired: bool = False       #: mode 0: the terminal count was reached

    def value(self, now: int) -> int:
        """The counting element now (counts down from ``count``, reloads in modes 2 and 3)."""
        if self.start is None or not self.count:
            return 0
        elapsed = (now - self.start) // INSTRUCTIONS_PER_TICK
        if self.mode in _PERIODIC_MODES:
            return self.count - elapsed % self.count
        return max(0, self.count - elapsed) & 0xFFFF


class Pit8254(Device):
    """Counters 0-2 of an 8254 at ports 40H-43H; counter 0 raises IRQ 0 (see the module doc).

    The VMM asks :meth:`next_irq` when the next IRQ 0 edge is due on vtlab's clock and calls
    :meth:`expire` once the guest got there; :attr:`clock` gives the current time.
    """

    name = "pit"
    input_hz = PIT_INPUT_HZ

    def __init__(self, clock=None):
        #: A function returning vtlab's clock (guest instructions retired); the VMM sets it.
        self.clock = clock or (lambda: 0)
        self.counters = [Counter(), Counter(), Counter()]
        #: The clock value of the next IRQ 0 edge not yet handed to the PIC.
        self._next: int | None = None
        #: IRQ 0 edges produced so far.
        self.irqs = 0

    def ports(self) -> range:
        return range(PIT_CHANNEL0, PIT_COMMAND + 1)

    # ------------------------------------------------------------ port I/O
    def write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        if port == PIT_COMMAND:
            self._control_word(value)
            return
        c = self.counters[port - PIT_CHANNEL0]
        if c.access == _RW_LSB:
            self._load(port - PIT_CHANNEL0, value)
        elif c.access == _RW_MSB:
            self._load(port - PIT_CHANNEL0, value << 8)
        elif c.write_lsb is None:
            c.write_lsb = value              # LSB first, then MSB
        else:
            lsb, c.write_lsb = c.write_lsb, None
            self._load(port - PIT_CHANNEL0, lsb | value << 8)

    def read(self, port: int, size: int) -> int:
        if port == PIT_COMMAND:
            return 0xFF   # the control word register cannot be read
        c = self.counters[port - PIT_CHANNEL0]
        value = c.latched if c.latched is not None else c.value(self.clock()) & 0xFFFF
        if c.access == _RW_LSB:
            byte = value & 0xFF
        elif c.access == _RW_MSB:
            byte = value >> 8
        else:
            byte = value >> 8 if c.read_msb_next else value & 0xFF
            c.read_msb_next = not c.read_msb_next
            if c.read_msb_next:
                return byte
        c.latched = None
        return byte

    def _control_word(self, value: int) -> None:
        sc, rw, mode = value >> _SC_SHIFT, (value >> _RW_SHIFT) & 3, (value >> _MODE_SHIFT) & 7
        if sc == _READ_BACK:
            raise DeviceProgrammingError(f"8254: control word {value:#04x} is the read-back command, "
                                         "which vtlab's PIT does not model")
        c = self.counters[sc]
        if rw == _RW_LATCH:                      # counter latch command
            c.latched, c.read_msb_next = c.value(self.clock()) & 0xFFFF, False
            return
        if mode >= 6:
            mode -= 4                            # 110 and 111 are modes 2 and 3 (data sheet)
        if mode not in _MODELLED_MODES:
            raise DeviceProgrammingError(f"8254: control word {value:#04x} selects mode {mode} for counter "
                                         f"{sc}; vtlab models modes 0, 2 and 3")
        if value & 1:
            raise DeviceProgrammingError(f"8254: control word {value:#04x} selects BCD counting (bit 0), "
                                         "which vtlab does not model: use binary (bit 0 = 0)")
        # A new control word stops the counter until its initial count is written.
        self.counters[sc] = Counter(mode=mode, access=rw)
        if sc == 0:
            self._next = None

    def _load(self, index: int, count: int) -> None:
        c = self.counters[index]
        c.count = count or _FULL_COUNT
        c.start = self.clock()
        c.fired = False
        if index == 0:
            self._next = c.start + c.count * INSTRUCTIONS_PER_TICK

    # ------------------------------------------------------- the VMM's side
    def next_irq(self) -> int | None:
        """vtlab's clock value of the next IRQ 0 edge (None: counter 0 will not raise one)."""
        return self._next

    def expire(self, now: int) -> int:
        """The clock reached ``now``: the IRQ 0 edges due since the last call (0, 1 or more -
        the PIC latches one request however many edges it missed)."""
        c = self.counters[0]
        if self._next is None or now < self._next:
            return 0
        period = c.count * INSTRUCTIONS_PER_TICK
        if c.mode in _PERIODIC_MODES:
            edges = 1 + (now - self._next) // period
            self._next += edges * period
        else:
            edges, self._next, c.fired = 1, None, True
        self.irqs += edges
        return edges

    def frequency_hz(self) -> float | None:
        """Counter 0's IRQ 0 rate on a real PC (input clock / count), for display."""
        c = self.counters[0]
        return self.input_hz / c.count if c.count else None

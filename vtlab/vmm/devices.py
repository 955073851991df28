"""Virtual devices behind port I/O, and the bus that routes ports to them.

These are what a VMM emulates when the guest's IN/OUT instructions exit (or, with I/O
exiting off, what the guest reaches "directly"):

* :class:`Serial16550` - COM1 at 0x3F8, the UART every PC guest knows: a transmit
  holding register and a line-status register whose THRE/TEMT bits tell a polling
  driver it may send the next byte;
* :class:`DebugPort` - Bochs/QEMU's port 0xE9: every byte written is printed;
* :class:`PostCodePort` - port 0x80, where firmware writes progress codes.

The :class:`DeviceBus` answers unclaimed reads with all ones (a floating ISA bus).
"""
from __future__ import annotations

from dataclasses import dataclass, field


class Device:
    """A port-I/O device: override :meth:`read` and :meth:`write`."""

    name = "device"
    #: "kernel" for devices a VMM emulates in the hypervisor itself, "userspace" for those
    #: emulated by a separate process (QEMU for KVM); the cost model charges them differently.
    location = "kernel"

    def ports(self) -> range:
        raise NotImplementedError

    def read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        pass


class Serial16550(Device):
    """A 16550 UART's transmit side, enough for polling and interrupt-free drivers.

    Register offsets (from the base): 0 THR/RBR, 1 IER, 2 IIR/FCR, 3 LCR, 4 MCR, 5 LSR,
    6 MSR, 7 SCR.  LSR bit 5 (THRE) and bit 6 (TEMT) are always 1: the virtual wire
    is infinitely fast.  With LCR.DLAB = 1, offsets 0 and 1 are the baud-rate divisor.
    """

    name = "serial"
    LSR_DATA_READY, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40

    def __init__(self, base: int = 0x3F8):
        self.base = base
        self.output = bytearray()
        self.regs = {1: 0, 3: 0x03, 4: 0, 7: 0}
        self.divisor = 1
        self.input = bytearray()

    def ports(self) -> range:
        return range(self.base, self.base + 8)

    def read(self, port: int, size: int) -> int:
        off = port - self.base
        dlab = self.regs[3] & 0x80
        if off == 0:
            if dlab:
                return self.divisor & 0xFF
            return self.input.pop(0) if self.input else 0
        if off == 1 and dlab:
            return self.divisor >> 8
        if off == 2:
            return 0xC1  # FIFOs enabled, no interrupt pending
        if off == 5:
            return self.LSR_THRE | self.LSR_TEMT | (self.LSR_DATA_READY if self.input else 0)
        if off == 6:
            return 0xB0
        return self.regs.get(off, 0)

    def write(self, port: int, size: int, value: int) -> None:
        off = port - self.base
        dlab = self.regs[3] & 0x80
        if off == 0 and not dlab:
            self.output.append(value & 0xFF)
        elif off == 0:
            self.divisor = (self.divisor & 0xFF00) | (value & 0xFF)
        elif off == 1 and dlab:
            self.divisor = (self.divisor & 0xFF) | ((value & 0xFF) << 8)
        elif off in self.regs:
            self.regs[off] = value & 0xFF

    @property
    def text(self) -> str:
        return self.output.decode("latin-1")


class DebugPort(Device):
    """Port 0xE9: the emulator console ("port E9 hack")."""

    name = "debugcon"

    def __init__(self, port: int = 0xE9):
        self.port = port
        self.output = bytearray()

    def ports(self) -> range:
        return range(self.port, self.port + 1)

    def read(self, port: int, size: int) -> int:
        return 0xE9  # how Bochs/QEMU let software detect the port

    def write(self, port: int, size: int, value: int) -> None:
        self.output.append(value & 0xFF)

    @property
    def text(self) -> str:
        return self.output.decode("latin-1")


class PostCodePort(Device):
    """Port 0x80: firmware progress codes; remembers every code written."""

    name = "post"

    def __init__(self, port: int = 0x80):
        self.port = port
        self.codes: list[int] = []

    def ports(self) -> range:
        return range(self.port, self.port + 1)

    def write(self, port: int, size: int, value: int) -> None:
        self.codes.append(value & 0xFF)


class UserspaceDevice(Device):
    """A device model living in a user-space process (like QEMU's fw_cfg at 0x510).

    It behaves like any other device here; what differs on real systems is the cost:
    each access goes VM exit -> kernel -> user space -> kernel -> VM entry.
    """

    name = "fw_cfg"
    location = "userspace"

    def __init__(self, base: int = 0x510, count: int = 2):
        self.base, self.count = base, count
        self.selector = 0
        self.accesses = 0

    def ports(self) -> range:
        return range(self.base, self.base + self.count)

    def read(self, port: int, size: int) -> int:
        self.accesses += 1
        return 0x51 if self.selector == 0 else 0

    def write(self, port: int, size: int, value: int) -> None:
        self.accesses += 1
        if port == self.base:
            self.selector = value


@dataclass
class DeviceBus:
    """Routes port numbers to devices."""

    devices: list[Device] = field(default_factory=list)

    def __post_init__(self):
        self._map: dict[int, Device] = {}
        for d in self.devices:
            self.attach(d)

    def attach(self, device: Device) -> Device:
        """Plug ``device`` in; its ports must be free."""
        for port in device.ports():
            if port in self._map:
                raise ValueError(f"port {port:#x} already belongs to {self._map[port].name}")
        for port in device.ports():
            self._map[port] = device
        if device not in self.devices:
            self.devices.append(device)
        return device

    def device_at(self, port: int) -> Device | None:
        return self._map.get(port)

    def read(self, port: int, size: int) -> int:
        d = self._map.get(port)
        return d.read(port, size) if d else (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        d = self._map.get(port)
        if d:
            d.write(port, size, value)


def standard_devices() -> DeviceBus:
    """COM1, the debug port, the POST-code port and a user-space fw_cfg device."""
    return DeviceBus([Serial16550(), DebugPort(), PostCodePort(), UserspaceDevice()])

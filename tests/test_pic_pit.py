"""The VMM's 8259A PIC pair and 8254 PIT, and a timer-driven guest under vtlab.

Register and port facts are typed in from the Intel 8259A and 8254 data sheets and the
PC/AT port map: PIC command/data ports 20H/21H (master) and A0H/A1H (slave); ICW1 =
11H (D4 = 1 ICW1, D0 IC4: ICW4 follows; D1 SNGL = 0: cascaded; D3 LTIM = 0: edge), ICW2 =
the vector base (bits 7:3), ICW3 = 04H on the master (slave on IR2) and 02H on the slave
(its ID), ICW4 = 01H (uPM: 8086 mode; D1 AEOI; D4 SFNM special fully nested mode);
OCW1 = the mask (data port), OCW2 = 20H non-specific EOI, 60H + level specific EOI,
OCW3 = 0AH read IRR, 0BH read ISR (D6 ESMM, D5 SMM: special mask mode only with both
set; D2 P: poll).  8254:
counters at 40H-42H, control word at 43H (bits 7:6 counter, 5:4 00 latch / 01 LSB / 10
MSB / 11 LSB then MSB, 3:1 mode, 0 BCD): 34H = counter 0, LSB then MSB, mode 2; 36H =
mode 3; 30H = mode 0; an initial count of 0 counts 65536; input clock 1.193182 MHz.

VMX facts (Intel SDM 325462-084US): exit reasons 1 (external interrupt) and 7 (interrupt
window) (Appendix C); the VM-exit interruption-information field (28.2.2) 800000ECH =
valid, type 0 external interrupt, vector ECH; primary control bit 2 interrupt-window
exiting (25.6.2 Table 25-6).
"""
from __future__ import annotations

import pytest

from vtlab import VirtualMachine, VmcsField as F
from vtlab.vmm.pic import DeviceProgrammingError, PicPair
from vtlab.vmm.pit import Pit8254

EXTERNAL_INTERRUPT, INTERRUPT_WINDOW = 1, 7
INTR_WINDOW_EXITING = 1 << 2


def programmed_pic(master_base: int = 0x20, slave_base: int = 0x28, icw4: int = 0x01) -> PicPair:
    """The PC initialization sequence, as an OS writes it."""
    pic = PicPair()
    for port, value in ((0x20, 0x11), (0xA0, 0x11), (0x21, master_base), (0xA1, slave_base),
                        (0x21, 0x04), (0xA1, 0x02), (0x21, icw4), (0xA1, icw4)):
        pic.write(port, 1, value)
    return pic


# ==================================================================== 8259A
def test_initialization_sets_the_vector_base_and_clears_the_mask():
    pic = PicPair()
    pic.write(0x21, 1, 0xFF)
    pic = programmed_pic()
    assert pic.read(0x21, 1) == 0x00 and pic.read(0xA1, 1) == 0x00     # ICW1 cleared IMR
    assert pic.vector_of(0) == 0x20 and pic.vector_of(7) == 0x27
    assert pic.vector_of(8) == 0x28 and pic.vector_of(15) == 0x2F


def test_before_initialization_the_bios_bases_08h_and_70h_apply():
    pic = PicPair()
    assert pic.vector_of(0) == 0x08 and pic.vector_of(8) == 0x70


def test_ir0_has_the_highest_priority_and_an_eoi_lets_the_next_through():
    pic = programmed_pic()
    pic.raise_irq(1)
    pic.raise_irq(0)
    assert pic.read(0x20, 1) == 0b11                 # IRR (the default read)
    assert pic.acknowledge() == 0x20                 # IR0 first
    pic.write(0x20, 1, 0x0B)                         # OCW3: read ISR
    assert pic.read(0x20, 1) == 0b01
    assert not pic.pending()                         # IR1 waits behind IR0 in service
    pic.write(0x20, 1, 0x20)                         # OCW2: non-specific EOI
    assert pic.read(0x20, 1) == 0                    # ISR empty
    assert pic.acknowledge() == 0x21
    pic.write(0x20, 1, 0x0A)                         # OCW3: read IRR
    assert pic.read(0x20, 1) == 0


def test_a_higher_priority_request_interrupts_a_lower_one_in_service():
    pic = programmed_pic()
    pic.raise_irq(3)
    assert pic.acknowledge() == 0x23
    pic.raise_irq(1)
    assert pic.pending() and pic.acknowledge() == 0x21   # fully nested mode


def test_the_mask_holds_a_request_back():
    pic = programmed_pic()
    pic.write(0x21, 1, 0x01)                         # OCW1: mask IR0
    pic.raise_irq(0)
    assert not pic.pending() and pic.acknowledge() is None
    pic.write(0x21, 1, 0x00)
    assert pic.acknowledge() == 0x20


def test_a_slave_irq_arrives_through_the_masters_ir2():
    pic = programmed_pic()
    pic.raise_irq(9)                                 # slave IR1
    assert pic.acknowledge() == 0x29
    pic.write(0x20, 1, 0x0B)
    pic.write(0xA0, 1, 0x0B)
    assert pic.read(0x20, 1) == 0b100 and pic.read(0xA0, 1) == 0b10
    pic.write(0xA0, 1, 0x20)                         # EOI to the slave, then the master
    pic.write(0x20, 1, 0x20)
    assert pic.read(0x20, 1) == 0 and pic.read(0xA0, 1) == 0


def test_specific_eoi_clears_the_level_it_names():
    pic = programmed_pic()
    pic.raise_irq(4)
    pic.acknowledge()
    pic.write(0x20, 1, 0x0B)
    pic.write(0x20, 1, 0x60 | 4)                     # OCW2: specific EOI, level 4
    assert pic.read(0x20, 1) == 0


def test_automatic_eoi_leaves_nothing_in_service():
    pic = programmed_pic(icw4=0x03)                  # ICW4: 8086 mode + AEOI
    pic.raise_irq(0)
    assert pic.acknowledge() == 0x20
    pic.write(0x20, 1, 0x0B)
    assert pic.read(0x20, 1) == 0


@pytest.mark.parametrize("writes, words", [
    (((0x20, 0x19),), "LTIM"),                                            # level-triggered
    (((0x20, 0x10), (0x21, 0x20), (0x21, 0x04)), "IC4"),                  # no ICW4
    (((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x00)), "uPM"),    # MCS-80/85 mode
    (((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x11)), "SFNM"),   # ICW4 D4: special fully nested
    (((0x20, 0x68),), "special mask"),                                    # OCW3 ESMM = SMM = 1
    (((0x20, 0x0C),), "poll"),                                            # OCW3 D2 P: poll command
])
def test_programming_the_pic_in_an_unmodelled_way_says_so(writes, words):
    pic = PicPair()
    with pytest.raises(DeviceProgrammingError, match=words):
        for port, value in writes:
            pic.write(port, 1, value)


@pytest.mark.parametrize("ocw3", [0x28 | 0x03, 0x48 | 0x03])
def test_ocw3_smm_without_esmm_and_reset_special_mask_are_harmless(ocw3):
    """8259A data sheet, OCW3: D5 SMM acts only with D6 ESMM = 1; ESMM = 1, SMM = 0 resets
    the special mask mode (never set here).  With RR = RIS = 1 the write still selects ISR."""
    pic = programmed_pic()
    pic.raise_irq(1)
    assert pic.acknowledge() == 0x21
    pic.write(0x20, 1, ocw3)
    assert pic.read(0x20, 1) == 0b10                 # ISR: IR1 in service


def test_irq_numbers_beyond_15_are_refused():
    with pytest.raises(ValueError, match="IRQ 16"):
        PicPair().raise_irq(16)


# ==================================================================== 8254
class Clock:
    def __init__(self):
        self.now = 0

    def __call__(self) -> int:
        return self.now


def pit_with(control: int, count: int, clock: Clock | None = None) -> Pit8254:
    pit = Pit8254(clock or Clock())
    pit.write(0x43, 1, control)
    pit.write(0x40, 1, count & 0xFF)
    pit.write(0x40, 1, count >> 8)
    return pit


@pytest.mark.parametrize("control", [0x34, 0x36])   # mode 2 (rate generator), mode 3 (square wave)
def test_periodic_modes_raise_irq0_every_count_ticks(control):
    clock = Clock()
    clock.now = 500
    pit = pit_with(control, 1000, clock)
    assert pit.next_irq() == 1500
    assert pit.expire(1499) == 0
    assert pit.expire(1500) == 1 and pit.next_irq() == 2500
    assert pit.expire(4700) == 3 and pit.next_irq() == 5500    # 2500, 3500, 4500


def test_mode_0_raises_irq0_once():
    pit = pit_with(0x30, 100)
    assert pit.expire(100) == 1 and pit.next_irq() is None and pit.expire(10_000) == 0


def test_a_count_of_0_counts_65536():
    assert pit_with(0x34, 0).next_irq() == 65536


def test_latching_and_reading_the_count_lsb_then_msb():
    clock = Clock()
    pit = pit_with(0x34, 0x1234, clock)
    clock.now = 0x34
    pit.write(0x43, 1, 0x00)                         # counter latch command, counter 0
    clock.now = 0x100                                # the latched value does not move
    assert pit.read(0x40, 1) == 0x00 and pit.read(0x40, 1) == 0x12      # 1234H - 34H = 1200H
    assert pit.read(0x40, 1) == (0x1234 - 0x100) & 0xFF                 # live again


def test_100_hz_is_a_count_of_11932_on_the_pc_clock():
    assert round(pit_with(0x34, 11932).frequency_hz(), 1) == 100.0


@pytest.mark.parametrize("control, words", [(0x32, "mode 1"), (0x35, "BCD"), (0xC2, "read-back")])
def test_programming_the_pit_in_an_unmodelled_way_says_so(control, words):
    with pytest.raises(DeviceProgrammingError, match=words):
        Pit8254().write(0x43, 1, control)


def test_the_standard_bus_has_the_pic_and_the_pit():
    vm = VirtualMachine("hlt")
    assert vm.bus.device_at(0x20) is vm.pic.master and vm.bus.device_at(0x21) is vm.pic.master
    assert vm.bus.device_at(0xA0) is vm.pic.slave and vm.bus.device_at(0xA1) is vm.pic.slave
    assert vm.bus.device_at(0x40) is vm.pit and vm.bus.device_at(0x43) is vm.pit


# ==================================================================== a timer-driven guest
#: A real-mode guest that remaps the PIC to 20H, programs the PIT for IRQ 0 every 1000
#: ticks (mode 2), and counts ticks in its handler at 0500H, with a CLI ... STI critical
#: section in its wait loop, until 10 ticks have come.
TICKS = 0x500
TICK_GUEST = f"""
    cli
    mov word ptr [{TICKS:#x}], 0
    mov word ptr [0x20 * 4], irq0       ; IVT entry 20H
    mov word ptr [0x20 * 4 + 2], 0
    mov al, 0x11                        ; ICW1
    out 0x20, al
    out 0xA0, al
    mov al, 0x20                        ; ICW2: IRQ 0-7 at 20H
    out 0x21, al
    mov al, 0x28                        ; ICW2: IRQ 8-15 at 28H
    out 0xA1, al
    mov al, 4                           ; ICW3
    out 0x21, al
    mov al, 2
    out 0xA1, al
    mov al, 1                           ; ICW4: 8086 mode
    out 0x21, al
    out 0xA1, al
    mov al, 0xFE                        ; OCW1: IRQ 0 only
    out 0x21, al
    mov al, 0xFF
    out 0xA1, al
    mov al, 0x34                        ; counter 0, LSB then MSB, mode 2
    out 0x43, al
    mov ax, 1000
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
wait_loop:
    cli                                 ; critical section: a tick here must wait
    mov cx, 50
busy:
    loop busy
    sti
    mov cx, 50
idle:
    loop idle
    cmp word ptr [{TICKS:#x}], 10
    jb wait_loop
    cli
    hlt
irq0:
    push ax
    inc word ptr [{TICKS:#x}]
    mov al, 0x20                        ; non-specific EOI
    out 0x20, al
    pop ax
    iret
"""


def run_tick_guest():
    """Run the guest exit by exit, noting what each exit reports."""
    vm = VirtualMachine(TICK_GUEST, mode="real")
    seen = []
    while (e := vm.next_exit()) is not None:
        seen.append((int(e.reason), vm.vmread(F.VM_EXIT_INTR_INFO), vm.vmread(F.GUEST_RIP),
                     e.guest_instructions, vm.vmread(F.CPU_BASED_VM_EXEC_CONTROL)))
    return vm, seen


def test_a_pit_driven_guest_counts_its_ticks():
    vm, seen = run_tick_guest()
    assert vm.state.value == "halted", vm.message
    assert int.from_bytes(vm.guest.read(TICKS, 2), "little") == 10
    assert vm.pic.delivered == [0x20] * 10           # IRQ 0 injected once per tick
    assert vm.pit.irqs == 10


def test_the_trace_shows_exit_1_then_exit_7_in_the_sdms_order():
    """Each tick is an external-interrupt exit (the host's timer, acknowledged on exit:
    800000ECH); when it found the guest with IF = 0 the VMM set interrupt-window exiting
    and the window exit (7) follows, before the next tick, at the instruction after STI's
    shadow."""
    vm, seen = run_tick_guest()
    reasons = [s[0] for s in seen]
    assert reasons.count(EXTERNAL_INTERRUPT) == 10
    windows = [i for i, s in enumerate(seen) if s[0] == INTERRUPT_WINDOW]
    assert windows, "no tick landed in the CLI section"
    for i in windows:
        earlier = [s[0] for s in seen[:i] if s[0] in (EXTERNAL_INTERRUPT, INTERRUPT_WINDOW)]
        assert earlier and earlier[-1] == EXTERNAL_INTERRUPT          # 1, then 7 - never 7, 7
        assert seen[i - 1][4] & INTR_WINDOW_EXITING or seen[i][4] & INTR_WINDOW_EXITING
    for reason, info, *_ in seen:
        if reason == EXTERNAL_INTERRUPT:
            assert info == 0x8000_00EC
    # The window opens after STI and the MOV CX its shadow covers: at LOOP idle.
    insns = vm.program.instructions
    after_shadow = {insns[k + 2].address for k, i in enumerate(insns[:-2])
                    if i.mnemonic == "sti" and insns[k + 1].mnemonic == "mov"}
    assert {seen[i][2] for i in windows} == after_shadow


def test_ticks_arrive_every_1000_guest_instructions():
    vm, seen = run_tick_guest()
    ticks = [s[3] for s in seen if s[0] == EXTERNAL_INTERRUPT]
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert all(990 <= g <= 1010 for g in gaps), gaps    # a basic block of slack either side


def test_without_the_cli_section_no_window_is_needed():
    guest = TICK_GUEST.replace("    cli                                 ; critical section: a tick here must wait\n",
                               "    nop\n")
    vm = VirtualMachine(guest, mode="real")
    vm.run()
    assert int.from_bytes(vm.guest.read(TICKS, 2), "little") == 10
    counts = vm.exit_counts()
    assert counts.get("EXTERNAL_INTERRUPT", 0) == 10 and counts.get("INTERRUPT_WINDOW", 0) == 0


def test_a_halted_guest_sleeps_until_irq0_and_the_tsc_counts_the_sleep():
    """STI; HLT in a loop: each HLT exit puts the vCPU to sleep until the PIT's next IRQ 0
    (as KVM blocks a halted vCPU); vtlab's clock - the TSC - moves on to the tick, IRQ 0 is
    injected and wakes the guest.  No exit 1 is needed: the guest was not running."""
    idle = TICK_GUEST.replace("""wait_loop:
    cli                                 ; critical section: a tick here must wait
    mov cx, 50
busy:
    loop busy
    sti
    mov cx, 50
idle:
    loop idle
""", """wait_loop:
    sti
    hlt
""")
    vm = VirtualMachine(idle, mode="real")
    vm.run(max_exits=200)
    assert vm.state.value == "halted", vm.message
    assert int.from_bytes(vm.guest.read(TICKS, 2), "little") == 10
    counts = vm.exit_counts()
    assert counts.get("HLT", 0) == 11 and counts.get("EXTERNAL_INTERRUPT", 0) == 0
    assert vm.pic.delivered == [0x20] * 10
    # The clock went on while the guest slept: ten periods of 1000 ticks, far more than
    # the few hundred instructions the guest ran.
    assert vm.guest.read_tsc() >= 10_000 > vm.guest.counter.total

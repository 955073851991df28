"""Event-blocking state and the PC's legacy interrupt hardware, as data.

* :class:`Interruptibility` - the guest interruptibility-state field (SDM Vol. 3C, 25.4.2
  Table 25-3 "Format of Interruptibility State"): bit 0 blocking by STI, bit 1 blocking by
  MOV SS, bit 2 blocking by SMI, bit 3 blocking by NMI, bit 4 enclave interruption;
  bits 31:5 reserved.
* :class:`ActivityState` - the guest activity-state field (25.4.2, "Activity state"):
  0 active, 1 HLT, 2 shutdown, 3 wait-for-SIPI.
* The opcodes that set an interrupt shadow (SDM Vol. 2, STI, MOV and POP: "the processor
  inhibits interrupts ... until after the next instruction"): STI (FB), POP SS (17) and
  MOV SS, r/m16 (8E /2).
* :data:`MISC_PREEMPTION_TIMER_RATE` - IA32_VMX_MISC bits 4:0 (SDM Vol. 3C, A.6): the
  VMX-preemption timer counts down by 1 each time bit X of the TSC changes.
* The 8259A programmable interrupt controller and the 8254 programmable interval timer
  of the PC (Intel 8259A and 8254 data sheets; the PC/AT port assignment): the port
  numbers, the initialization/operation command word bits and the timer's input clock.
"""
from __future__ import annotations

import enum

from .bits import RegisterBits

__all__ = [
    "Interruptibility",
    "INTERRUPTIBILITY_RESERVED",
    "ActivityState",
    "OPCODE_STI",
    "OPCODE_POP_SS",
    "OPCODE_MOV_SREG",
    "OPCODE_POPF",
    "SREG_SS",
    "MISC_PREEMPTION_TIMER_RATE",
    "PIC_MASTER_COMMAND",
    "PIC_MASTER_DATA",
    "PIC_SLAVE_COMMAND",
    "PIC_SLAVE_DATA",
    "PIC_CASCADE_IRQ",
    "ICW1_IC4",
    "ICW1_SINGLE",
    "ICW1_LTIM",
    "ICW1_INIT",
    "ICW4_8086",
    "ICW4_AEOI",
    "ICW4_SFNM",
    "OCW2_EOI",
    "OCW2_SPECIFIC",
    "OCW2_ROTATE",
    "OCW3_SELECT",
    "OCW3_READ_REGISTER",
    "OCW3_READ_ISR",
    "OCW3_ESMM",
    "OCW3_SMM",
    "OCW3_POLL",
    "PIC_EOI_NONSPECIFIC",
    "PIT_CHANNEL0",
    "PIT_CHANNEL2",
    "PIT_COMMAND",
    "PIT_INPUT_HZ",
    "PIT_IRQ",
]


class Interruptibility(RegisterBits):
    """GUEST_INTERRUPTIBILITY_INFO (SDM Vol. 3C 25.4.2, Table 25-3)."""

    BLOCKING_BY_STI = 1 << 0     #: STI with IF = 0 just executed: interrupts wait one instruction
    BLOCKING_BY_MOV_SS = 1 << 1  #: MOV SS / POP SS just executed (also blocks #DB and NMIs)
    BLOCKING_BY_SMI = 1 << 2     #: in SMM (vtlab never is)
    BLOCKING_BY_NMI = 1 << 3     #: an NMI handler runs (or, with "virtual NMIs", virtual-NMI blocking)
    ENCLAVE_INTERRUPTION = 1 << 4  #: the exit interrupted an SGX enclave


#: Bits 31:5 of the interruptibility state are reserved (Table 25-3).
INTERRUPTIBILITY_RESERVED: int = 0xFFFF_FFE0


class ActivityState(enum.IntEnum):
    """GUEST_ACTIVITY_STATE (SDM Vol. 3C 25.4.2)."""

    ACTIVE = 0
    HLT = 1
    SHUTDOWN = 2
    WAIT_FOR_SIPI = 3


#: STI (SDM Vol. 2B, STI): with IF = 0 it delays interrupts until after the next instruction.
OPCODE_STI: int = 0xFB
#: POP SS (Vol. 2B, POP; invalid in 64-bit mode) and MOV Sreg, r/m16 (Vol. 2B, MOV, 8E /r):
#: loading SS inhibits interrupts, NMIs and #DB until after the next instruction.
OPCODE_POP_SS: int = 0x17
OPCODE_MOV_SREG: int = 0x8E
#: POPF / POPFD / POPFQ (Vol. 2B, POPF): may set IF, but leaves no interrupt shadow.
OPCODE_POPF: int = 0x9D
#: The ModRM reg field naming SS in MOV Sreg (segment-register numbers: ES 0, CS 1, SS 2).
SREG_SS: int = 2

#: IA32_VMX_MISC bits 4:0: X, the TSC bit whose every change decrements the
#: VMX-preemption timer by 1 (SDM Vol. 3C A.6).
MISC_PREEMPTION_TIMER_RATE: int = 0x1F

# ------------------------------------------------------------------ 8259A PIC pair
#: I/O ports of the PC/AT's two cascaded 8259As: command (A0 = 0) and data (A0 = 1).
PIC_MASTER_COMMAND, PIC_MASTER_DATA = 0x20, 0x21
PIC_SLAVE_COMMAND, PIC_SLAVE_DATA = 0xA0, 0xA1
#: The master's input the slave's INT output is wired to (IRQ 2).
PIC_CASCADE_IRQ: int = 2
#: ICW1 (a write to the command port with D4 = 1): D0 IC4 (an ICW4 follows), D1 SNGL
#: (no slave), D3 LTIM (level-triggered), D4 = 1 marks ICW1.
ICW1_IC4, ICW1_SINGLE, ICW1_LTIM, ICW1_INIT = 1 << 0, 1 << 1, 1 << 3, 1 << 4
#: ICW4: D0 uPM (8086/8088 mode: vector = ICW2 base + IRQ), D1 AEOI (automatic EOI),
#: D4 SFNM (special fully nested mode; D3 BUF selects buffered mode, D2 M/S its master/slave).
ICW4_8086, ICW4_AEOI, ICW4_SFNM = 1 << 0, 1 << 1, 1 << 4
#: OCW2 (command port, D4 = D3 = 0): D5 EOI, D6 SL (specific level in D2:0), D7 R (rotate).
OCW2_EOI, OCW2_SPECIFIC, OCW2_ROTATE = 1 << 5, 1 << 6, 1 << 7
#: OCW3 (command port, D4 = 0, D3 = 1): D1 RR (read register), D0 RIS (1 ISR, 0 IRR).
OCW3_SELECT, OCW3_READ_REGISTER, OCW3_READ_ISR = 1 << 3, 1 << 1, 1 << 0
#: OCW3 D6 ESMM (enable special mask mode) and D5 SMM: SMM counts only with ESMM = 1 -
#: ESMM = 1, SMM = 1 sets the special mask mode, ESMM = 1, SMM = 0 resets it, ESMM = 0 is
#: no action; D2 P is the poll command.
OCW3_ESMM, OCW3_SMM, OCW3_POLL = 1 << 6, 1 << 5, 1 << 2
#: The non-specific EOI command byte every PC interrupt handler writes (OCW2 = 20H).
PIC_EOI_NONSPECIFIC: int = OCW2_EOI

# ------------------------------------------------------------------ 8254 PIT
#: I/O ports of the 8254: counters 0-2 at 40H-42H, the control word at 43H.
PIT_CHANNEL0, PIT_CHANNEL2, PIT_COMMAND = 0x40, 0x42, 0x43
#: The PC's 8254 input clock, 1.193182 MHz (14.31818 MHz / 12).
PIT_INPUT_HZ: int = 1_193_182
#: Counter 0's OUT drives the master PIC's IRQ 0.
PIT_IRQ: int = 0

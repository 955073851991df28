"""The VMM's emulation of string I/O after an I/O exit (OUTS/INS with REP)."""
from vtlab import VirtualMachine

GUEST = """
    mov ax, 0x100
    mov es, ax
    mov dx, 0xe9
    mov si, msg
    mov cx, 3
    rep outsb              ; DS:SI, upwards        -> "abc"
    mov si, msg2 - 0x1000
    mov cx, 2
    db 0x26, 0xf3, 0x6e    ; es rep outsb: ES:SI   -> "XY" (ES base 0x1000)
    std
    mov si, msg + 2
    mov cx, 3
    rep outsb              ; RFLAGS.DF = 1: downwards -> "cba"
    hlt
msg: db "abc"
msg2: db "XY"
"""


def test_outs_follows_segment_override_and_direction_flag():
    vm = VirtualMachine(GUEST, mode="real")
    summary = vm.run(max_exits=10, max_instructions=1_000)
    assert summary.state.value == "halted"
    assert vm.output == "abcXYcba"
    assert [e.reason for e in vm.trace.exits] == ["IO_INSTRUCTION"] * 3 + ["HLT"]
    assert vm.regs.cx == 0


def test_ins_writes_es_di():
    vm = VirtualMachine("""
        mov ax, 0x200
        mov es, ax
        mov di, 0x10
        mov dx, 0xe9
        mov cx, 2
        rep insb             ; the debug port reads back 0xE9
        hlt
    """, mode="real")
    vm.run(max_exits=10, max_instructions=1_000)
    assert vm.guest.read(0x2010, 2) == b"\xe9\xe9"
    assert vm.regs.di == 0x12

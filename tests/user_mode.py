"""Guest prologues that drop to CPL 3, shared by the SDM fact tests.

Each builds the IRET frame an OS would (SDM Vol. 3A 6.14: SS, RSP, RFLAGS, CS, RIP) with
vtlab's user selectors - SS 2BH, RSP 8E000H, RFLAGS 202H, CS 33H (64-bit) or 23H
(32-bit) - and continues at ``user:`` in ring 3.
"""

TO_USER_64 = """
    push 0x2b
    push 0x8e000
    push 0x202
    push 0x33
    mov rax, user
    push rax
    iretq
user:
"""

TO_USER_32 = """
    push 0x2b
    push 0x8e000
    push 0x202
    push 0x23
    push user
    iretd
user:
"""

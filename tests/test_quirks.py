"""Work-arounds for Unicorn (vtlab/cpu/quirks.py): the remembered exception.

Unicorn reports an exception to UC_HOOK_INTR instead of delivering it, but QEMU's CPU
model still records it as "being delivered" (``old_exception``) and never clears it.
The next contributory exception (#DE, #TS, #NP, #SS, #GP; SDM Vol. 3A 6.15, Table 6-5)
is then turned into a double fault, #DF (vector 8).  These tests use bare Unicorn, not
vtlab's Guest, to show the quirk itself and that :func:`forget_exception` cures it.

If a future Unicorn stops remembering the exception, the "quirk is real" test fails:
that is the signal that the work-around can go.
"""
from __future__ import annotations

import pytest
import unicorn
from unicorn import x86_const as X

from vtlab.cpu import asm, quirks

DE, DF, GP = 0, 8, 13  # SDM Vol. 3A Table 6-1

CASES = {
    # name: (Unicorn mode, code size in bits, code raising the exception, vector)
    # DIV by zero, in 16-bit real mode
    "#DE": (unicorn.UC_MODE_16, 16, "xor cx, cx\ndiv cx", DE),
    # loading DS with a selector far past the (empty) GDT, in Unicorn's 32-bit protected mode
    "#GP": (unicorn.UC_MODE_32, 32, "mov ax, 0x1234\nmov ds, ax", GP),
}
CODE = 0x1000


def _cpu(name: str) -> tuple[unicorn.Uc, list[int]]:
    """A bare Unicorn CPU holding the case's code; the list collects reported vectors."""
    uc_mode, bits, source, _ = CASES[name]
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, uc_mode)
    uc.mem_map(0, 0x10000)
    uc.mem_write(CODE, asm.assemble(source, CODE, bits))
    vectors: list[int] = []

    def on_intr(uc: unicorn.Uc, vector: int, _user) -> None:
        vectors.append(vector)
        uc.emu_stop()  # report, do not deliver: what vtlab's Guest does

    uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
    return uc, vectors


def _raise(uc: unicorn.Uc) -> None:
    uc.emu_start(CODE, CODE + 0x100, count=10)


@pytest.mark.parametrize("name", list(CASES))
def test_second_exception_becomes_double_fault_without_the_work_around(name):
    uc, vectors = _cpu(name)
    vector = CASES[name][3]
    _raise(uc)
    _raise(uc)
    assert vectors == [vector, DF]


@pytest.mark.parametrize("name", list(CASES))
def test_forget_exception_keeps_reporting_the_original_vector(name):
    uc, vectors = _cpu(name)
    vector = CASES[name][3]
    for _ in range(4):  # past the #DF *and* the triple fault that would follow it
        _raise(uc)
        assert quirks.forget_exception(uc) is True
    assert vectors == [vector] * 4


def test_forget_exception_leaves_the_registers_alone():
    """Only old_exception is patched: the rest of the saved context comes back as it was."""
    uc, _ = _cpu("#GP")
    uc.reg_write(X.UC_X86_REG_EBX, 0xCAFE_BABE)
    _raise(uc)
    regs = (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_EIP, X.UC_X86_REG_ESP,
            X.UC_X86_REG_EFLAGS, X.UC_X86_REG_CR0, X.UC_X86_REG_DS)
    before = [uc.reg_read(r) for r in regs]
    assert quirks.forget_exception(uc)
    assert [uc.reg_read(r) for r in regs] == before
    assert before[1] == 0xCAFE_BABE and before[2] == CODE + 4  # stopped at MOV DS, AX


def test_old_exception_offset_is_a_stable_int_inside_the_context():
    offset = quirks.old_exception_offset()
    assert isinstance(offset, int) and not isinstance(offset, bool)
    assert offset % 4 == 0
    size = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32).context_save().size
    assert 0 <= offset <= size - 4
    assert quirks.old_exception_offset() == offset  # calibrated once, then cached

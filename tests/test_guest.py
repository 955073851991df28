"""The guest CPU (vtlab/cpu/guest.py and its parts) on its own, outside VMX.

Expected values come from the Intel SDM (Vol. 3A ch. 2, 4, 6 and Vol. 2): control-register
bits, exception vectors and error codes are written out literally here, never taken from
the code under test.
"""
from __future__ import annotations

import pytest
from unicorn import x86_const

from vtlab import AssemblyError, BudgetExceeded, Guest

# SDM Vol. 3A 2.5 (Control Registers)
CR0_PE, CR0_NE, CR0_PG = 1 << 0, 1 << 5, 1 << 31
CR4_PSE, CR4_PAE = 1 << 4, 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
# SDM Vol. 3A Table 6-1
UD, GP, PF = 6, 13, 14


# ------------------------------------------------------------------ the four modes
def test_real_mode_at_0x1000():
    g = Guest("real")
    g.load("mov ax, 0x1234\nmov [0x500], ax\nhlt", 0x1000)
    result = g.run(0x1000)
    assert result.reason == "hlt"
    assert g.read_u16(0x500) == 0x1234
    assert g.reg("cr0") & CR0_PE == 0
    assert g.bits == 16
    assert g.cpl == 0


def test_real_mode_boot_sector_at_0x7c00():
    g = Guest("real")
    g.load("mov ax, 0xbeef\nmov [0x600], ax\nhlt", 0x7C00)
    result = g.run(0x7C00)
    assert result.reason == "hlt"
    assert result.rip == 0x7C06  # mov ax, imm16 (3) + mov [moffs], ax (3) -> HLT
    assert g.read_u16(0x600) == 0xBEEF


def test_real_mode_segmented_addressing():
    """Real mode forms addresses as segment * 16 + offset (SDM Vol. 3A 20.1.1)."""
    g = Guest("real")
    g.load("mov ax, 0x200\nmov ds, ax\nmov word ptr [0x10], 0x4242\nhlt", 0x1000)
    assert g.run(0x1000).reason == "hlt"
    assert g.read_u16(0x2010) == 0x4242


def test_protected_mode_flat():
    g = Guest("protected")
    g.load("mov dword ptr [0x2000], 0xcafebabe\nhlt", 0x1000)
    assert g.run(0x1000).reason == "hlt"
    assert g.read_u32(0x2000) == 0xCAFEBABE
    assert g.reg("cr0") & CR0_PE
    assert not g.reg("cr0") & CR0_PG
    assert g.bits == 32


def test_protected_mode_with_paging():
    g = Guest("paged")
    g.load("mov dword ptr [0x180000], 0x12345678\nhlt", 0x1000)
    assert g.run(0x1000).reason == "hlt"
    assert g.read_u32(0x180000) == 0x12345678  # identity-mapped: linear == physical
    assert g.reg("cr0") & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG
    assert g.reg("cr4") & CR4_PSE        # 4-MByte pages
    assert not g.reg("efer") & EFER_LMA
    assert g.bits == 32


def test_long_mode():
    g = Guest("long")
    g.load("mov rax, 0x1122334455667788\nmov [0x3000], rax\nhlt", 0x1000)
    assert g.run(0x1000).reason == "hlt"
    assert g.read_u64(0x3000) == 0x1122334455667788
    assert g.reg("cr4") & CR4_PAE
    assert g.reg("efer") & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert g.bits == 64


def test_mode_names_are_checked():
    with pytest.raises(ValueError):
        Guest("virtual-8086")


# ------------------------------------------------------------------------- CPL 3
@pytest.mark.parametrize("mode", ["protected", "long"])
def test_cli_at_cpl3_is_a_general_protection_fault(mode):
    """CLI with CPL > IOPL raises #GP(0) (SDM Vol. 2A, CLI)."""
    g = Guest(mode)
    result = g.run_user("cli\nhlt")
    assert result.reason == "exception"
    assert result.exception.vector == GP == 13
    assert result.exception.error_code == 0
    assert result.exception.cpl == 3
    assert result.exception.rip == 0x2_0000  # the faulting CLI (run_user's default address)


@pytest.mark.parametrize("mode", ["protected", "long"])
def test_sgdt_runs_at_cpl3(mode):
    """SGDT is not privileged (without CR4.UMIP): it runs at CPL 3, which is why a VMM
    cannot see it without descriptor-table exiting."""
    g = Guest(mode)
    result = g.run_user("sgdt [0x30000]\nmov dword ptr [0x30010], 0x600d\nhlt")
    # It ran, and so did the store after it; then HLT at CPL 3 faults.
    assert g.read_u32(0x30010) == 0x600D
    limit = g.read_u16(0x30000)
    base = g.read_u32(0x30002)
    assert (base, limit) == g.uc.reg_read(x86_const.UC_X86_REG_GDTR)[1:3]
    assert result.exception.vector == GP
    assert result.exception.instruction == "hlt"
    assert result.exception.cpl == 3


def test_run_user_needs_protected_mode():
    with pytest.raises(ValueError):
        Guest("real").run_user("nop")


# ---------------------------------------------------------------- faults, #PF
def test_invalid_opcode_is_reported_with_its_vector():
    g = Guest("protected")
    g.load("ud2\nhlt", 0x1000)
    result = g.run(0x1000)
    assert result.reason == "exception"
    assert result.exception.vector == UD == 6
    assert result.exception.error_code is None  # #UD pushes no error code
    assert result.exception.rip == 0x1000


@pytest.mark.parametrize("code, error_code", [
    ("mov rax, [0x80000000]", 0b000),          # read, not present, supervisor
    ("mov qword ptr [0x80000000], 1", 0b010),  # W/R = 1: a write
])
def test_page_fault_error_code_and_cr2(code, error_code):
    """#PF error code (SDM Vol. 3A 4.7, Figure 4-12) and CR2 = faulting linear address.

    vtlab's long-mode page tables map the first GiB only, so 2 GiB is not present.
    """
    g = Guest("long")
    g.load(code + "\nhlt", 0x1000)
    result = g.run(0x1000)
    assert result.exception.vector == PF == 14
    assert result.exception.error_code == error_code
    assert result.exception.address == 0x8000_0000
    assert g.reg("cr2") == 0x8000_0000


def test_page_fault_at_cpl3_sets_the_user_bit():
    """A user-mode access to a non-present page: error code U/S = 1 (bit 2)."""
    g = Guest("long")
    result = g.run_user("mov qword ptr [0x80000000], 1\nhlt")
    assert result.exception.vector == PF
    assert result.exception.error_code == 0b110  # U/S | W/R, P = 0
    assert result.exception.cpl == 3


def test_cr2_survives_a_run():
    """CR2 keeps what the guest wrote (Unicorn's end-address probe must not clobber it)."""
    g = Guest("long")
    g.load("mov rax, 0x55\nmov cr2, rax\nhlt", 0x1000)
    assert g.run(0x1000).reason == "hlt"
    assert g.reg("cr2") == 0x55


# --------------------------------------------------------------- clear errors
def test_assembly_error_names_the_line():
    g = Guest("real")
    source = "mov ax, 1\nmov bx, 2\nfrobnicate ax\nhlt"
    with pytest.raises(AssemblyError) as info:
        g.load(source, 0x1000)
    assert info.value.line == 3
    assert info.value.text == "frobnicate ax"
    assert "line 3" in str(info.value)


def test_assembly_error_on_an_operand():
    with pytest.raises(AssemblyError) as info:
        Guest("long").load("nop\nnop\nmov rax, [rbx+rcx*3]\nhlt", 0x1000)
    assert info.value.line == 3


@pytest.mark.parametrize("name", ["xyz", "r99", "cr42"])
def test_bad_register_names_raise_value_error(name):
    g = Guest("long")
    with pytest.raises(ValueError):
        g.reg(name)
    with pytest.raises(ValueError):
        g.set_reg(name, 1)


def test_register_round_trip():
    g = Guest("long")
    g.set_reg("r15", 0xDEAD_BEEF_0000_0001)
    assert g.reg("r15") == 0xDEAD_BEEF_0000_0001
    g = Guest("real")
    g.set_reg("rax", 0x1234_5678)  # the 64-bit name addresses EAX on a 16/32-bit guest
    assert g.reg("eax") == 0x1234_5678
    assert g.reg("ax") == 0x5678


def test_runaway_guest_raises_budget_exceeded():
    g = Guest("real")
    g.load("spin: jmp spin", 0x1000)
    with pytest.raises(BudgetExceeded) as info:
        g.run(0x1000, max_instructions=10_000)
    assert "10,000" in str(info.value)


def test_program_outside_memory_is_refused():
    with pytest.raises(ValueError):
        Guest("real").load("nop", 0x10_0000_0000)

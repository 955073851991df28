"""EPT as the SDM defines it: the paging structures behind EPTP walked for every
guest-physical access (SDM Vol. 3C 29.3), cached until INVEPT (29.4), INVEPT/INVVPID
(31.3), VPID and unrestricted guest (27.2.1.1, 27.3.1.1).

Every architectural value below is typed from the SDM (325462-084US), never read from
vtlab's own tables:

* EPT entry (29.3.2): bit 0 read, 1 write, 2 execute, 5:3 memory type (6 = WB), 7 maps a
  page (PDPTE: 1 GByte, PDE: 2 MBytes), 8 accessed, 9 dirty; address in bits N-1:12.
* EPTP (25.6.11): bits 2:0 memory type, 5:3 page-walk length - 1, bit 6 A/D enable.
* EPT-violation exit qualification (Table 28-7): bit 0 data read, 1 data write,
  2 instruction fetch, 3/4/5 the entries allowed read/write/execute, 7 guest-linear
  address valid, 8 (with 7) the access was to the translated linear address (1) or to
  a guest paging-structure entry (0).
* Exit reasons (Appendix C): 48 EPT violation, 49 EPT misconfiguration, 50 INVEPT,
  53 INVVPID; 33 VM-entry failure due to invalid guest state.
* VM-instruction error 28 (31.4): invalid operand to INVEPT/INVVPID.
"""
from __future__ import annotations

import struct

import pytest

from vtlab import ExitReason, VirtualMachine
from vtlab.cpu.capabilities import VmxCapabilities
from vtlab.cpu.ept import ept_format
from vtlab.cpu.outcome import Status
from vtlab.vmm.ept_tables import EptTables

EPT_VIOLATION, EPT_MISCONFIG, INVEPT_EXIT, INVVPID_EXIT, INVALID_GUEST_STATE = 48, 49, 50, 53, 33
INVALID_OPERAND_TO_INVEPT_INVVPID = 28
GUEST_PHYSICAL_ADDRESS, GUEST_LINEAR_ADDRESS = 0x2400, 0x640A      # Appendix B encodings
EPT_POINTER, EXIT_REASON, EXIT_QUALIFICATION = 0x201A, 0x4402, 0x6400
IA32_VMX_EPT_VPID_CAP = 0x48C


def first_exit(code: str, mode: str = "real", setup=None) -> VirtualMachine:
    vm = VirtualMachine(code, mode=mode)
    if setup is not None:
        setup(vm)
    vm.run(max_exits=1)
    return vm


def pte(vm: VirtualMachine, gpa: int) -> int:
    """The EPT entry that maps ``gpa`` (the last entry of the walk)."""
    return vm.ept_tables.describe(gpa)[-1][2]


# ============================================================ formats (29.3.2, 25.6.11)
def test_eptp_of_the_vmm_is_wb_with_a_4_level_walk():
    vm = VirtualMachine("hlt")
    eptp = vm.vmread(EPT_POINTER)
    assert eptp & 0x7 == 6                      # bits 2:0: WB
    assert (eptp >> 3) & 0x7 == 3               # bits 5:3: walk length 4 - 1
    assert not eptp & 0x40                      # bit 6: no A/D flags
    assert eptp & ~0xFFF == vm.ept_tables.root


def test_identity_map_uses_2_mbyte_pages():
    vm = VirtualMachine("hlt")                  # 2 MiB of RAM: one PDE with bit 7
    levels = vm.ept_tables.describe(0x1234)
    assert [name for name, _, _ in levels] == ["PML4E", "PDPTE", "PDE"]
    pde = levels[-1][2]
    assert pde & 0x80                           # bit 7: maps a 2-MByte page
    assert pde & 0x7 == 0x7 and (pde >> 3) & 0x7 == 6
    assert pde & 0x000F_FFFF_FFE0_0000 == 0     # the page at host-physical 0


def test_a_4k_leaf_written_as_the_sdm_lays_it_out():
    tables = EptTables(VirtualMachine("hlt").cpu.memory)
    tables.map(0x5000, 0x8000, 0x1000, 0b101)
    assert tables.describe(0x5000)[-1] == ("PTE", tables.describe(0x5000)[-1][1], 0x8000 | 0b101 | 6 << 3)


def test_walk_reports_permissions_and_page_size():
    vm = VirtualMachine("hlt")
    w = vm.cpu.ept.translate(vm.vmread(EPT_POINTER), 0x10_0123)
    assert w.ok and w.page_size == 0x20_0000 and [r.level for r in w.references] == ["PML4E", "PDPTE", "PDE"]
    vm.ept_tables.protect(0x5000, 0x1000, 0b001)           # splits the 2-MByte page
    w = vm.cpu.ept.translate(vm.vmread(EPT_POINTER), 0x5123)
    assert w.ok and w.physical == 0x5123 and w.permissions == 0b001 and w.page_size == 0x1000
    assert [r.level for r in w.references] == ["PML4E", "PDPTE", "PDE", "PTE"]


# ============================================================ violations (29.3.3.2)
@pytest.mark.parametrize("code, qualification", [
    ("mov ax, [0x5000]", 0x1 | 0x80 | 0x100),
    ("mov word ptr [0x5000], 1", 0x2 | 0x80 | 0x100),
    ("jmp 0x5000", 0x4 | 0x80 | 0x100),
])
def test_not_present_page(code, qualification):
    vm = first_exit(code, setup=lambda vm: vm.ept_unmap(0x5000, 0x1000))
    assert vm.vmread(EXIT_REASON) == EPT_VIOLATION
    assert vm.vmread(EXIT_QUALIFICATION) == qualification
    assert vm.vmread(GUEST_PHYSICAL_ADDRESS) == 0x5000


def test_execute_only_page_fetch_runs_read_faults():
    """IA32_VMX_EPT_VPID_CAP bit 0: execute-only translations.  Bits 2:0 = 100b: code in
    such a page runs; a read of another execute-only page is a violation with bit 0
    (read) and bit 5 (executable) set: 1H | 20H | 80H | 100H = 1A1H."""
    assert VirtualMachine("hlt").cpu.rdmsr(IA32_VMX_EPT_VPID_CAP) & 1
    code = "jmp 0x5000"

    def setup(vm):
        vm.guest.load("mov ax, [0x6010]\nhlt", 0x5000)
        vm.ept_map(0x5000, 0x2000, 0b100)

    vm = first_exit(code, setup=setup)
    assert vm.vmread(EXIT_REASON) == EPT_VIOLATION
    assert vm.vmread(EXIT_QUALIFICATION) == 0x1A1
    assert vm.vmread(GUEST_PHYSICAL_ADDRESS) == 0x6010
    assert vm.last_exit.guest_rip == 0x5000         # it fetched and began the MOV


def test_write_to_read_execute_page_reports_permissions():
    vm = first_exit("mov word ptr [0x6000], 1", setup=lambda vm: vm.ept_map(0x6000, 0x1000, 0b101))
    assert vm.vmread(EXIT_QUALIFICATION) == 0x2 | 0x8 | 0x20 | 0x80 | 0x100


def test_guest_page_walk_through_an_unmapped_ept_page_is_a_violation_on_the_paging_structure():
    """The guest's PDPT page (93000H + 1000H, vtlab's long-mode tables) not in the EPT: the
    guest's own page walk faults in EPT, so bit 8 is 0 (a guest paging-structure entry)
    and the guest-physical address is the PDPTE's."""
    vm = first_exit("nop\nhlt", "long", setup=lambda vm: vm.ept_unmap(0x94000, 0x1000))
    assert vm.vmread(EXIT_REASON) == EPT_VIOLATION
    assert vm.vmread(EXIT_QUALIFICATION) == 0x1 | 0x80
    assert vm.vmread(GUEST_PHYSICAL_ADDRESS) == 0x94000          # PDPTE 0 of the PDPT
    assert vm.vmread(GUEST_LINEAR_ADDRESS) == 0x1000


def test_guest_linear_address_differs_from_guest_physical_under_guest_paging():
    """A long-mode guest maps linear 40000000H onto guest-physical 5000H; the EPT has no
    5000H: GUEST_LINEAR_ADDRESS = 40000008H, GUEST_PHYSICAL_ADDRESS = 5008H."""
    def setup(vm):
        pd = 0x95000 + 0x1000                    # a new page directory for PDPTE 1
        vm.guest.write(0x94000 + 8, struct.pack("<Q", pd | 0x7))
        vm.guest.write(pd, struct.pack("<Q", 0x97000 | 0x7))              # PDE 0 -> a page table
        vm.guest.write(0x97000, struct.pack("<Q", 0x5000 | 0x7))          # PTE 0 -> 5000H
        vm.ept_unmap(0x5000, 0x1000)

    vm = first_exit("mov rax, [0x40000008]\nhlt", "long", setup=setup)
    assert vm.vmread(EXIT_REASON) == EPT_VIOLATION
    assert vm.vmread(EXIT_QUALIFICATION) == 0x1 | 0x80 | 0x100
    assert vm.vmread(GUEST_PHYSICAL_ADDRESS) == 0x5008
    assert vm.vmread(GUEST_LINEAR_ADDRESS) == 0x4000_0008


# ============================================================ misconfigurations (29.3.3.1)
def _leaf(vm, gpa, value):
    vm.ept_tables.protect(gpa, 0x1000, 7)       # a 4-KByte PTE to overwrite
    at = vm.ept_tables.describe(gpa)[-1][1]
    vm.ept_tables.write_entry(at, value)
    vm.invept()


@pytest.mark.parametrize("entry", [
    0x5000 | 0b010 | 6 << 3,          # bit 1 (write) without bit 0 (read)
    0x5000 | 0b011 | 2 << 3,          # memory type 2 is reserved
    0x5000 | 0b011 | 7 << 3,          # memory type 7 is reserved
])
def test_misconfigured_pte(entry):
    vm = first_exit("mov ax, [0x5000]", setup=lambda vm: _leaf(vm, 0x5000, entry))
    assert vm.vmread(EXIT_REASON) == EPT_MISCONFIG
    assert vm.vmread(GUEST_PHYSICAL_ADDRESS) == 0x5000


def test_reserved_bit_in_a_pml4e_is_a_misconfiguration():
    """Bits 7:3 of an EPT PML4E are reserved: bit 3 set there misconfigures everything below."""
    def setup(vm):
        root = vm.ept_tables.root
        vm.ept_tables.write_entry(root, vm.ept_tables.read_entry(root) | 1 << 3)
        vm.invept()
    vm = first_exit("nop\nhlt", setup=setup)
    assert vm.vmread(EXIT_REASON) == EPT_MISCONFIG
    assert "PML4E" in vm.last_exit.note


def test_misconfiguration_rules_of_the_format():
    fmt = ept_format(cap=1 << 6 | 1 << 16, width=39)     # no execute-only, no 1-GByte pages
    pdpte, pde = fmt.levels[1], fmt.levels[2]
    assert fmt.problem(0b100 | 6 << 3, fmt.levels[3])            # execute-only not offered
    assert fmt.problem(0x80 | 7 | 6 << 3, pdpte)                  # 1-GByte page not offered
    assert fmt.problem(0x80 | 7 | 6 << 3, pde) is None            # 2-MByte page offered
    assert fmt.problem(0x80 | 7 | 6 << 3 | 1 << 12, pde)          # bits 20:12 reserved
    assert fmt.problem(7 | 1 << 39, pde)                          # above MAXPHYADDR (39)
    assert fmt.problem(7 | 7 << 3, fmt.levels[3])                 # memory type 7 reserved


# ============================================================ 2-MByte and 1-GByte pages
def test_2_mbyte_page_remapped_to_another_host_region():
    """A PDE with bit 7 maps guest-physical 200000H-3FFFFFH onto host-physical 0: the guest
    reads at 201000H what lies at 1000H (its own code)."""
    vm = VirtualMachine("mov eax, dword ptr [0x201000]\nhlt", mode="long")
    vm.ept_tables.map(0x20_0000, 0, 0x20_0000, 0b111, page=0x20_0000)
    vm.invept()
    vm.run()
    assert vm.regs.rax & 0xFFFF_FFFF == struct.unpack("<I", vm.guest.read(0x1000, 4))[0]
    assert vm.ept_tables.describe(0x20_0000)[-1][2] & 0x80


def test_1_gbyte_page():
    assert VirtualMachine("hlt").cpu.rdmsr(IA32_VMX_EPT_VPID_CAP) >> 17 & 1
    vm = VirtualMachine("mov eax, dword ptr [0x40001000]\nhlt", mode="long")
    # the guest's own tables map linear 1 GiB onto guest-physical 1 GiB ...
    vm.guest.write(0x94000 + 8, struct.pack("<Q", 0x4000_0000 | 0x87))
    # ... and the EPT maps guest-physical 1 GiB (a PDPTE with bit 7) onto host-physical 0
    vm.ept_tables.map(0x4000_0000, 0, 0x4000_0000, 0b111, page=0x4000_0000)
    vm.invept()
    vm.run()
    assert vm.regs.rax & 0xFFFF_FFFF == struct.unpack("<I", vm.guest.read(0x1000, 4))[0]


# ============================================================ aliasing and the cache (29.4)
def test_two_guest_physical_pages_alias_one_host_page():
    vm = VirtualMachine("mov word ptr [0x5000], 0x1234\nmov ax, [0x9000]\nhlt")
    vm.ept_tables.map(0x9000, 0x5000, 0x1000)
    vm.invept()
    vm.run()
    assert vm.regs.rax & 0xFFFF == 0x1234


def test_remap_without_invept_keeps_the_stale_mapping():
    """SDM 29.4.3.4: software must INVEPT after changing an EPT entry; until then the
    processor may use the cached mapping - vtlab always does."""
    code = "mov ax, [0x5000]\ncpuid\nmov bx, [0x5000]\ncpuid\nmov cx, [0x5000]\nhlt"
    vm = VirtualMachine(code)
    vm.guest.write(0x5000, b"\x11\x11")
    vm.guest.write(0x8000, b"\x22\x22")
    seen = []

    @vm.handler(ExitReason.CPUID)
    def remap(vm, exit):
        seen.append(exit)
        if len(seen) == 1:
            vm.ept_tables.map(0x5000, 0x8000, 0x1000)     # ... and no INVEPT
        else:
            vm.invept()
        vm.skip_instruction()
        return True

    vm.run()
    assert (vm.regs.rax & 0xFFFF, vm.regs.rbx & 0xFFFF, vm.regs.rcx & 0xFFFF) == (0x1111, 0x1111, 0x2222)


def test_mappings_are_cached_per_ep4ta():
    vm = VirtualMachine("hlt")
    vm.run()
    builds = vm.cpu.ept.builds
    other = EptTables(vm.cpu.memory)
    other.identity(vm.guest.memory_size)
    assert vm.cpu.invept(1, other.eptp()).status is Status.VMSUCCEED
    assert vm.cpu.ept.builds == builds                # nothing walked by INVEPT itself


# ============================================================ A/D flags (29.3.4)
def test_accessed_and_dirty_flags():
    """With IA32_VMX_EPT_VPID_CAP[21] and EPTP bit 6: a read sets bit 8 (accessed) of
    every entry used, a write also bit 9 (dirty) of the entry that maps the page."""
    vm = VirtualMachine("mov ax, [0x5000]\nmov word ptr [0x6000], 1\nhlt")
    vm.cpu.caps = VmxCapabilities(ept_accessed_dirty=True)
    assert vm.cpu.rdmsr(IA32_VMX_EPT_VPID_CAP) >> 21 & 1
    vm.ept_tables.protect(0x5000, 0x3000, 0b111)       # 4-KByte pages 5000H-7FFFH
    vm.vmwrite(EPT_POINTER, vm.vmread(EPT_POINTER) | 1 << 6)
    vm.run()
    assert vm.state.name == "HALTED", vm.message
    read, written, untouched = pte(vm, 0x5000), pte(vm, 0x6000), pte(vm, 0x7000)
    assert read >> 8 & 1 and not read >> 9 & 1
    assert written >> 8 & 1 and written >> 9 & 1
    assert not untouched >> 8 & 1 and not untouched >> 9 & 1
    assert vm.ept_tables.describe(0x5000)[0][2] >> 8 & 1          # the PML4E too


def test_no_flags_without_eptp_bit_6():
    vm = VirtualMachine("mov word ptr [0x6000], 1\nhlt")
    vm.ept_tables.protect(0x6000, 0x1000, 0b111)
    vm.run()
    assert not pte(vm, 0x6000) >> 8 & 3


# ============================================================ INVEPT / INVVPID (31.3)
def test_invept_outcomes():
    vm = VirtualMachine("hlt")
    eptp = vm.vmread(EPT_POINTER)
    assert vm.cpu.invept(1, eptp).status is Status.VMSUCCEED
    assert vm.cpu.invept(2).status is Status.VMSUCCEED
    for type_, desc in ((0, eptp), (3, eptp), (1, eptp & ~7 | 1), (1, eptp & ~0x38 | 1 << 3)):
        out = vm.cpu.invept(type_, desc)
        assert out.status is Status.VMFAIL_VALID and int(out.error) == INVALID_OPERAND_TO_INVEPT_INVVPID, out


def test_invvpid_outcomes():
    vm = VirtualMachine("hlt")
    ok = [(0, 1, 0x1000), (1, 1, 0), (2, 0, 0), (3, 1, 0)]
    bad = [(1, 0, 0), (3, 0, 0), (0, 0, 0x1000), (0, 1, 0x0000_8000_0000_0000), (1, 1 << 16, 0), (4, 1, 0)]
    for t, vpid, linear in ok:
        assert vm.cpu.invvpid(t, vpid, linear).status is Status.VMSUCCEED
    for t, vpid, linear in bad:
        out = vm.cpu.invvpid(t, vpid, linear)
        assert out.status is Status.VMFAIL_VALID and int(out.error) == INVALID_OPERAND_TO_INVEPT_INVVPID, (t, vpid)


def test_invept_outside_vmx_operation_is_ud():
    from vtlab.cpu.vmx import VmxCpu
    out = VmxCpu().invept(2)
    assert out.status is Status.FAULT and int(out.vector) == 6


@pytest.mark.parametrize("insn, reason", [("invept rax, [0x500]", INVEPT_EXIT),
                                          ("invvpid rax, [0x500]", INVVPID_EXIT)])
def test_invept_invvpid_in_the_guest_exit(insn, reason):
    vm = first_exit(insn + "\nhlt", "long")
    assert vm.vmread(EXIT_REASON) == reason


# ============================================================ VPID and unrestricted guest
def test_vpid_0_with_enable_vpid_fails_entry():
    vm = VirtualMachine("hlt")
    vm.vmwrite(0x0000, 0)                              # VIRTUAL_PROCESSOR_ID
    vm.run()
    assert vm.last_outcome.status is Status.VMFAIL_VALID and int(vm.last_outcome.error) == 7


GUEST_CR0, CR0_READ_SHADOW = 0x6800, 0x6004          # Appendix B encodings
CR0_PG = 1 << 31                                     # Vol. 3A 2.5


@pytest.mark.parametrize("mode", ["real", "protected"])
def test_paging_off_needs_unrestricted_guest(mode):
    """Without EPT there is no unrestricted guest, and CR0.PE = 0 or PG = 0 breaks the CR0
    fixed bits (SDM 27.3.1.1; IA32_VMX_CR0_FIXED0 = 80000021H): VM entry fails with exit
    reason 33 (invalid guest state).  The VMM runs an unpaged protected-mode guest on its
    own identity page table (GUEST_CR0.PG = 1, the read shadow shows the guest PG = 0);
    a GUEST_CR0 with PG = 0 written over what the VMM set up fails the check all the same."""
    vm = VirtualMachine("hlt", mode=mode, ept=False)
    if mode == "protected":
        assert vm.vmread(GUEST_CR0) & CR0_PG and not vm.vmread(CR0_READ_SHADOW) & CR0_PG
    vm.vmwrite(GUEST_CR0, vm.vmread(GUEST_CR0) & ~CR0_PG)
    vm.run()
    assert vm.last_exit.reason == INVALID_GUEST_STATE and vm.last_exit.entry_failure
    assert "27.3.1.1" in vm.message and "PG" in vm.message
    assert VirtualMachine("hlt", mode=mode).run().state.name == "HALTED"


@pytest.mark.parametrize("mode", ["paged", "long"])
def test_ept_off_guests_run(mode):
    vm = VirtualMachine("mov dx, 0x3f8\nmov al, 'A'\nout dx, al\nhlt", mode=mode, ept=False)
    vm.run()
    assert vm.state.name == "HALTED" and vm.output == "A"
    assert vm.cpu.ept.builds == 0


# ============================================================ the two-dimensional walk
def test_24_references_for_4_level_guest_paging_on_a_4_level_ept():
    """Each of the 4 guest paging-structure entries is at a guest-physical address that
    costs a 4-reference EPT walk (+ 1 to read it), and the final guest-physical address
    another 4: 4 x 5 + 4 = 24 (SDM 29.3.2: the guest's paging-structure addresses are
    guest-physical)."""
    vm = VirtualMachine("hlt", mode="long")
    ept = EptTables(vm.cpu.memory)
    ept.identity(vm.guest.memory_size, large=False)         # 4-KByte EPT pages throughout
    tables = {"pml4": 0x10_0000, "pdpt": 0x10_1000, "pd": 0x10_2000, "pt": 0x10_3000}
    vm.guest.write(tables["pml4"], struct.pack("<Q", tables["pdpt"] | 7))
    vm.guest.write(tables["pdpt"], struct.pack("<Q", tables["pd"] | 7))
    vm.guest.write(tables["pd"], struct.pack("<Q", tables["pt"] | 7))
    vm.guest.write(tables["pt"] + 5 * 8, struct.pack("<Q", 0x7000 | 7))
    cr0, cr4, efer = vm.guest.reg("cr0"), vm.guest.reg("cr4"), vm.guest.reg("efer")
    walk = vm.cpu.ept.walk_linear(ept.eptp(), tables["pml4"], cr0, cr4, efer, 0x5123)
    assert walk.physical == 0x7123 and walk.guest_physical == 0x7123
    assert len(walk.references) == 24
    assert walk.count("EPT") == 20 and walk.count("guest") == 4
    assert [r.dimension for r in walk.references[:5]] == ["EPT"] * 4 + ["guest"]
    # the same address without EPT: the 4 guest references only
    native = vm.cpu.ept.walk_linear(None, tables["pml4"], cr0, cr4, efer, 0x5123)
    assert len(native.references) == 0 + 4 and native.physical == 0x7123


def test_guest_paging_structure_accesses_set_accessed_and_dirty():
    """SDM 29.3.4: with EPTP bit 6, processor accesses to guest paging-structure entries
    are treated as writes: the EPT entry mapping the guest's PML4 page (93000H) gets bit 8
    and bit 9; the code page only bit 8.  The guest never sees a #PF for it."""
    vm = VirtualMachine("mov eax, dword ptr [0x5000]\nhlt", mode="long")
    vm.cpu.caps = VmxCapabilities(ept_accessed_dirty=True)
    vm.ept_tables.protect(0x1000, 0x1000, 0b111)
    vm.ept_tables.protect(0x93000, 0x1000, 0b111)
    vm.vmwrite(EPT_POINTER, vm.vmread(EPT_POINTER) | 1 << 6)
    s = vm.run()
    assert s.state.name == "HALTED" and s.instructions == 1, vm.message
    assert pte(vm, 0x93000) >> 8 & 3 == 0b11
    assert pte(vm, 0x1000) >> 8 & 3 == 0b01


def test_the_vmm_stops_on_a_misconfiguration_and_names_the_entry():
    vm = VirtualMachine("mov ax, [0x5000]\nhlt")
    vm.ept_tables.map(0x5000, 0x5000, 0x1000, 0b010)     # write without read
    vm.invept()
    assert vm.run().state.name == "STOPPED"
    assert "EPT misconfiguration at guest-physical 0x5000" in vm.message
    assert "write without read" in vm.message and "PTE" in vm.message

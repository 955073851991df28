"""AMD-V (SVM) facts and behaviour, with the APM's numbers written out literally.

Every number below is typed from the AMD64 Architecture Programmer's Manual Vol. 2
(24593 Rev. 3.42): Appendix B "Layout of VMCB" (Tables B-1, B-2), Appendix C "SVM
Intercept Exit Codes", 15.10 (IOIO EXITINFO1, IOPM), 15.11 (MSRPM), 15.20 (EVENTINJ),
15.30 (VM_CR, VM_HSAVE_PA), 15.5.1 (VMRUN's consistency checks) - never derived from
vtlab's own tables.
"""
from __future__ import annotations

import pytest

from vtlab.arch import svm as A
from vtlab.cpu import Guest
from vtlab.cpu.svm import SvmCpu, SvmStatus, Vmcb
from vtlab.cpu.svm.state import save_guest


# ------------------------------------------------------------- Appendix B, Table B-1
@pytest.mark.parametrize("field, offset", [
    ("INTERCEPT_CR", 0x000), ("INTERCEPT_DR", 0x004), ("INTERCEPT_EXCEPTIONS", 0x008),
    ("INTERCEPT_MISC1", 0x00C), ("INTERCEPT_MISC2", 0x010), ("IOPM_BASE_PA", 0x040),
    ("MSRPM_BASE_PA", 0x048), ("TSC_OFFSET", 0x050), ("GUEST_ASID", 0x058), ("TLB_CONTROL", 0x05C),
    ("VINTR", 0x060), ("INTERRUPT_SHADOW", 0x068), ("EXITCODE", 0x070), ("EXITINFO1", 0x078),
    ("EXITINFO2", 0x080), ("EXITINTINFO", 0x088), ("NESTED_CTL", 0x090), ("EVENTINJ", 0x0A8),
    ("N_CR3", 0x0B0), ("CLEAN", 0x0C0), ("NEXT_RIP", 0x0C8), ("INSN_LEN", 0x0D0), ("INSN_BYTES", 0x0D1),
])
def test_control_area_offsets(field, offset):
    assert A.VmcbControl[field] == offset


# ------------------------------------------- Appendix B, Table B-2 (+ 400h from the VMCB start)
@pytest.mark.parametrize("field, offset", [
    ("ES", 0x400), ("CS", 0x410), ("SS", 0x420), ("DS", 0x430), ("FS", 0x440), ("GS", 0x450),
    ("GDTR", 0x460), ("LDTR", 0x470), ("IDTR", 0x480), ("TR", 0x490), ("CPL", 0x4CB), ("EFER", 0x4D0),
    ("CR4", 0x548), ("CR3", 0x550), ("CR0", 0x558), ("DR7", 0x560), ("DR6", 0x568), ("RFLAGS", 0x570),
    ("RIP", 0x578), ("RSP", 0x5D8), ("RAX", 0x5F8), ("STAR", 0x600), ("LSTAR", 0x608), ("CSTAR", 0x610),
    ("SFMASK", 0x618), ("KERNEL_GS_BASE", 0x620), ("SYSENTER_CS", 0x628), ("SYSENTER_ESP", 0x630),
    ("SYSENTER_EIP", 0x638), ("CR2", 0x640), ("G_PAT", 0x668),
])
def test_save_area_offsets(field, offset):
    assert A.VmcbSave[field] == offset


@pytest.mark.parametrize("name, bit", [("INTR", 0), ("CPUID", 18), ("HLT", 24), ("INVLPG", 25),
                                       ("IOIO_PROT", 27), ("MSR_PROT", 28), ("SHUTDOWN", 31)])
def test_intercept_vector_3_bits(name, bit):
    assert A.Intercept[name] == 1 << bit


@pytest.mark.parametrize("name, bit", [("VMRUN", 0), ("VMMCALL", 1), ("VMLOAD", 2), ("VMSAVE", 3),
                                       ("STGI", 4), ("CLGI", 5), ("RDTSCP", 7), ("XSETBV", 13)])
def test_intercept_vector_4_bits(name, bit):
    assert A.Intercept2[name] == 1 << bit


# -------------------------------------------------------------------- Appendix C
@pytest.mark.parametrize("name, code", [
    ("CR0_READ", 0x0), ("CR3_WRITE", 0x13), ("DR7_READ", 0x27), ("EXCP_BASE", 0x40), ("EXCP_GP", 0x4D),
    ("EXCP_PF", 0x4E), ("INTR", 0x60), ("NMI", 0x61), ("RDTSC", 0x6E), ("CPUID", 0x72), ("HLT", 0x78),
    ("INVLPG", 0x79), ("IOIO", 0x7B), ("MSR", 0x7C), ("SHUTDOWN", 0x7F), ("VMRUN", 0x80),
    ("VMMCALL", 0x81), ("VMLOAD", 0x82), ("VMSAVE", 0x83), ("STGI", 0x84), ("CLGI", 0x85),
    ("RDTSCP", 0x87), ("NPF", 0x400), ("INVALID", -1),
])
def test_exit_codes(name, code):
    assert A.SvmExitCode[name] == code


def test_exit_code_ranges():
    assert (A.cr_read(4), A.cr_write(8), A.dr_read(2), A.dr_write(7), A.exception_exit(14)) == (
        0x04, 0x18, 0x22, 0x37, 0x4E)
    assert A.SvmExitCode.INVALID.field_value == 0xFFFF_FFFF_FFFF_FFFF
    assert A.exit_name(0x5) == "CR5_READ" and A.exit_name(0x51) == "EXCP_17"


# ------------------------------------------------------ EXITINFO1 of IOIO (15.10.2)
def test_ioio_exitinfo1_layout():
    # OUT DX, AL to 3F8h from 16-bit code: TYPE 0, SZ8 bit 4, A16 bit 7, port in 31:16
    assert A.IoioInfo(0x3F8, 1, False).encode() == 0x03F8_0090
    # IN EAX, 60h from 32-bit code: TYPE 1, SZ32 bit 6, A32 bit 8
    assert A.IoioInfo(0x60, 4, True, address_size=32).encode() == 0x0060_0141
    # REP OUTSW (STR bit 2, REP bit 3, SZ16 bit 5) with DS (3) as SEG (bits 12:10), A64 bit 9
    assert A.IoioInfo(0x80, 2, False, True, True, 64, 3).encode() == 0x0080_0E2C
    d = A.IoioInfo.decode(0x0060_0141)
    assert (d.port, d.size, d.is_in, d.address_size) == (0x60, 4, True, 32)


def test_eventinj_layout():
    # #GP (vector 13) as an exception (TYPE 3) with error code 0x18: V bit 31, EV bit 11
    assert A.EventInfo(13, A.EventType.EXCEPTION, 0x18).encode() == 0x0000_0018_8000_0B0D
    assert A.EventInfo(0x20, A.EventType.INTR).encode() == 0x8000_0020
    assert A.EventInfo.decode(0x0000_0018_8000_0B0D).error_code == 0x18


def test_iopm_and_msrpm_layout():
    assert A.IOPM_SIZE == 12288 and A.MSRPM_SIZE == 8192
    assert A.iopm_bit(0x3F8) == (0x7F, 0)
    assert A.iopm_bit(0xFFFF) == (0x1FFF, 7)
    assert A.msrpm_bits(0x0000_0000) == (0x000, 0)
    assert A.msrpm_bits(0x0000_0175) == (0x05D, 2)       # IA32_SYSENTER_ESP: bits 0x2EA/0x2EB
    assert A.msrpm_bits(0xC000_0080) == (0x820, 0)       # EFER
    assert A.msrpm_bits(0xC001_0117) == (0x1045, 6)      # VM_HSAVE_PA
    assert A.msrpm_bits(0x4000_0000) is None             # outside: always intercepted


def test_detection_and_enabling_facts():
    assert A.CPUID_8000_0001_ECX_SVM == 1 << 2
    assert A.CPUID_SVM_LEAF == 0x8000_000A
    assert (A.SvmMsr.VM_CR, A.SvmMsr.VM_HSAVE_PA, A.SvmMsr.EFER) == (0xC001_0114, 0xC001_0117, 0xC000_0080)
    assert (A.VmCr.LOCK, A.VmCr.SVMDIS) == (1 << 3, 1 << 4)
    assert A.EFER_SVME == 1 << 12
    assert (A.SvmFeature.NP, A.SvmFeature.NRIPS, A.SvmFeature.DECODE_ASSISTS) == (1, 1 << 3, 1 << 7)


# ------------------------------------------------------ the VMCB is memory
def test_vmcb_is_plain_memory():
    cpu = SvmCpu(Guest("real"))
    vmcb = Vmcb(cpu.memory, cpu.memory.alloc())
    cpu.memory.write(vmcb.address + 0x70, (0x7B).to_bytes(8, "little"))   # a plain store at 070h
    assert vmcb.exit_code == A.SvmExitCode.IOIO
    vmcb.put(A.VmcbSave.RIP, 0x7C00)
    assert cpu.memory.read(vmcb.address + 0x578, 8) == (0x7C00).to_bytes(8, "little")
    with pytest.raises(ValueError, match="4-KByte aligned"):
        Vmcb(cpu.memory, vmcb.address + 8)


# ------------------------------------------------ faults and VMRUN's checks (15.4, 15.5.1)
def _svm_cpu(code="cpuid\nhlt"):
    g = Guest("real")
    g.load(code, 0x1000)
    g.rip = 0x1000
    cpu = SvmCpu(g)
    return cpu


def _ready_vmcb(cpu):
    cpu.enable_svm().check()
    cpu.wrmsr(0xC001_0117, cpu.memory.alloc()).check()
    vmcb = Vmcb(cpu.memory, cpu.memory.alloc())
    save_guest(vmcb, cpu.guest)
    vmcb.put(A.VmcbSave.EFER, vmcb.get(A.VmcbSave.EFER) | (1 << 12))
    vmcb.put(A.VmcbControl.INTERCEPT_MISC1, (1 << 18) | (1 << 24))    # CPUID, HLT
    vmcb.put(A.VmcbControl.INTERCEPT_MISC2, 1 << 0)                   # VMRUN
    vmcb.put(A.VmcbControl.GUEST_ASID, 1)
    return vmcb


def test_svm_instructions_fault_as_the_apm_says():
    cpu = _svm_cpu()
    out = cpu.vmrun(cpu.memory.alloc())
    assert out.status is SvmStatus.FAULT and out.vector == 6 and "EFER.SVME = 0" in out.message   # #UD
    assert cpu.stgi().vector == 6 and cpu.vmsave(0).vector == 6
    cpu.enable_svm().check()
    assert cpu.vmrun(0x1234).vector == 13          # rAX not 4-KByte aligned: #GP
    cpu.host.cpl = 3
    assert cpu.clgi().vector == 13                 # CPL > 0: #GP
    cpu.host.cpl = 0
    cpu.wrmsr(0xC000_0080, 0)                      # EFER.SVME = 0 again
    cpu.vm_cr = 1 << 4                             # SVMDIS
    out = cpu.wrmsr(0xC000_0080, 1 << 12)
    assert out.vector == 13 and "SVMDIS" in out.message


@pytest.mark.parametrize("breakage, why", [
    (lambda v: v.put(A.VmcbSave.EFER, v.get(A.VmcbSave.EFER) & ~(1 << 12)), "EFER.SVME is zero"),
    (lambda v: v.put(A.VmcbSave.CR0, (v.get(A.VmcbSave.CR0) & ~(1 << 30)) | (1 << 29)),
     "CR0.CD is zero and CR0.NW is set"),
    (lambda v: v.put(A.VmcbSave.CR0, v.get(A.VmcbSave.CR0) | (1 << 32)), "CR0[63:32]"),
    (lambda v: v.put(A.VmcbSave.DR6, 1 << 40), "DR6[63:32]"),
    (lambda v: v.put(A.VmcbSave.DR7, 1 << 33), "DR7[63:32]"),
    (lambda v: v.put(A.VmcbControl.INTERCEPT_MISC2, 0), "VMRUN intercept bit is clear"),
    (lambda v: v.put(A.VmcbControl.GUEST_ASID, 0), "ASID is equal to zero"),
    (lambda v: v.put(A.VmcbControl.EVENTINJ, (1 << 31) | (1 << 8)), "illegal event injection"),
])
def test_vmrun_consistency_checks_end_in_vmexit_invalid(breakage, why):
    cpu = _svm_cpu()
    vmcb = _ready_vmcb(cpu)
    breakage(vmcb)
    out = cpu.vmrun(vmcb.address)
    assert out.status is SvmStatus.VMEXIT and out.exit.code == -1 and why in out.message
    assert vmcb.get(A.VmcbControl.EXITCODE) == 0xFFFF_FFFF_FFFF_FFFF


def test_vmexit_writes_exitcode_nrip_and_saves_state():
    cpu = _svm_cpu("mov eax, 7\ncpuid\nhlt")
    vmcb = _ready_vmcb(cpu)
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x72
    assert vmcb.read(0x070, 8) == 0x72                        # EXITCODE
    assert vmcb.read(0x578, 8) == 0x1006                      # RIP saved: at the CPUID (66 B8 imm32 first)
    assert vmcb.read(0x0C8, 8) == 0x1008                      # nRIP: past the 2-byte CPUID
    assert vmcb.read(0x5F8, 8) & 0xFFFF_FFFF == 7             # RAX saved in the VMCB
    assert not cpu.gif                                        # #VMEXIT clears GIF (15.17)
    vmcb.put(A.VmcbSave.RIP, vmcb.get(A.VmcbControl.NEXT_RIP))
    assert cpu.vmrun(vmcb.address).exit.code == 0x78         # HLT


def test_iopm_bit_selects_the_port():
    cpu = _svm_cpu("mov dx, 0x80\nout dx, al\nmov dx, 0x3f8\nout dx, al\nhlt")
    vmcb = _ready_vmcb(cpu)
    iopm = cpu.memory.alloc(3)
    cpu.memory.set_bit(iopm, 0x3F8)                           # only COM1's THR
    vmcb.put(A.VmcbControl.IOPM_BASE_PA, iopm)
    vmcb.put(A.VmcbControl.INTERCEPT_MISC1, (1 << 27) | (1 << 24))
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x7B and out.exit.exitinfo1 >> 16 == 0x3F8
    assert out.exit.exitinfo2 == out.exit.guest_rip + 1       # EXITINFO2: the next RIP


def test_msrpm_read_and_write_bits():
    cpu = _svm_cpu("mov ecx, 0x175\nrdmsr\nwrmsr\nhlt")
    vmcb = _ready_vmcb(cpu)
    msrpm = cpu.memory.alloc(2)
    cpu.memory.set_bit(msrpm + 0x05D, 3)                      # write bit of 175h only (2n + 1)
    vmcb.put(A.VmcbControl.MSRPM_BASE_PA, msrpm)
    vmcb.put(A.VmcbControl.INTERCEPT_MISC1, (1 << 28) | (1 << 24))
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x7C and out.exit.exitinfo1 == 1  # WRMSR; the RDMSR ran natively


def test_cr_write_intercept_with_decode_assist():
    g = Guest("protected")
    g.load("mov eax, cr0\nmov cr0, eax\nhlt", 0x1000)
    g.rip = 0x1000
    cpu = SvmCpu(g)
    vmcb = _ready_vmcb(cpu)
    vmcb.put(A.VmcbControl.INTERCEPT_CR, 1 << (16 + 0))       # CR0 writes
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x10
    assert out.exit.exitinfo1 == (1 << 63) | 0                # MOV, GPR 0 (EAX)


def test_exception_intercept_and_vmmcall_ud():
    cpu = _svm_cpu("vmmcall\nhlt")
    vmcb = _ready_vmcb(cpu)
    vmcb.put(A.VmcbControl.INTERCEPT_EXCEPTIONS, 1 << 6)      # #UD
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x46 and "VMMCALL is not intercepted" in out.exit.note
    vmcb.put(A.VmcbControl.INTERCEPT_MISC2, (1 << 0) | (1 << 1))
    assert cpu.vmrun(vmcb.address).exit.code == 0x81


def test_cpuid_reports_svm():
    assert SvmCpu.cpuid(0x8000_0001)[2] & (1 << 2)
    eax, ebx, _, edx = SvmCpu.cpuid(0x8000_000A)
    assert eax & 0xFF >= 1 and ebx >= 1 and edx & (1 << 3)    # a revision, ASIDs, NRIP save


# ------------------------------------------------------------ nested paging (15.25)
def _identity_npt(cpu, missing=(), read_only=(), supervisor=()):
    """Four-level nested tables mapping the first 2 MBytes onto themselves (x86 entries:
    bit 0 P, bit 1 R/W, bit 2 U/S), with some pages left out, read-only, or U/S = 0."""
    m = cpu.memory
    pml4, pdpt, pd, pt = m.alloc(), m.alloc(), m.alloc(), m.alloc()
    m.write(pml4, (pdpt | 7).to_bytes(8, "little"))
    m.write(pdpt, (pd | 7).to_bytes(8, "little"))
    m.write(pd, (pt | 7).to_bytes(8, "little"))
    for i in range(512):
        gpa = i << 12
        if gpa in missing:
            continue
        entry = gpa | (5 if gpa in read_only else 3 if gpa in supervisor else 7)
        m.write(pt + 8 * i, entry.to_bytes(8, "little"))
    return pml4, pt


def test_nested_page_fault_exitinfo():
    g = Guest("protected")
    g.load("mov eax, [0x5000]\nmov dword [0x6000], 1\nhlt", 0x1000)
    g.rip = 0x1000
    cpu = SvmCpu(g)
    vmcb = _ready_vmcb(cpu)
    root, pt = _identity_npt(cpu, missing={0x5000}, read_only={0x6000})
    vmcb.put(A.VmcbControl.NESTED_CTL, 1)            # NP_ENABLE, bit 0 at 090h
    vmcb.put(A.VmcbControl.N_CR3, root)
    out = cpu.vmrun(vmcb.address)
    # #VMEXIT 400h; EXITINFO1: US (bit 2: guest accesses are user accesses) and bit 32
    # (final guest-physical address), P = 0 (not present); EXITINFO2 the address.
    assert out.exit.code == 0x400 and out.exit.guest_rip == 0x1000
    assert out.exit.exitinfo1 == (1 << 32) | (1 << 2) and out.exit.exitinfo2 == 0x5000
    # Map the page, flush this ASID's TLB (TLB_CONTROL 3 at 05Ch), run again: the write
    # to the read-only page faults with P, RW and US set.
    cpu.memory.write(pt + 8 * 5, (0x5000 | 7).to_bytes(8, "little"))
    vmcb.put(A.VmcbControl.TLB_CONTROL, 3)
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x400 and out.exit.exitinfo1 == (1 << 32) | 0b111 and out.exit.exitinfo2 == 0x6000


def test_nested_tables_are_cached_like_a_tlb():
    g = Guest("protected")
    g.load("mov eax, [0x5000]\nhlt", 0x1000)
    g.rip = 0x1000
    cpu = SvmCpu(g)
    vmcb = _ready_vmcb(cpu)
    root, pt = _identity_npt(cpu, missing={0x5000})
    vmcb.put(A.VmcbControl.NESTED_CTL, 1)
    vmcb.put(A.VmcbControl.N_CR3, root)
    assert cpu.vmrun(vmcb.address).exit.code == 0x400
    cpu.memory.write(pt + 8 * 5, (0x5000 | 7).to_bytes(8, "little"))
    # no TLB flush requested: the stale "not present" translation is still used
    assert cpu.vmrun(vmcb.address).exit.code == 0x400
    vmcb.put(A.VmcbControl.TLB_CONTROL, 1)           # flush everything
    assert cpu.vmrun(vmcb.address).exit.code == 0x78


def test_nested_user_bit_and_non_identity_mapping():
    g = Guest("protected")
    g.load("mov eax, [0x5000]\nhlt", 0x1000)
    g.rip = 0x1000
    cpu = SvmCpu(g)
    vmcb = _ready_vmcb(cpu)
    root, pt = _identity_npt(cpu, supervisor={0x5000})
    vmcb.put(A.VmcbControl.NESTED_CTL, 1)
    vmcb.put(A.VmcbControl.N_CR3, root)
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x400 and out.exit.exitinfo1 & 1   # present, but U/S = 0 denies it
    cpu.memory.write(pt + 8 * 5, (0x9000 | 7).to_bytes(8, "little"))
    vmcb.put(A.VmcbControl.TLB_CONTROL, 1)
    out = cpu.vmrun(vmcb.address)
    assert out.status is SvmStatus.FAULT and "identity" in out.message


# ------------------------------------------------ VMLOAD/VMSAVE, VM_CR, INVLPGA (15.5.2, 15.30)
def test_vmload_and_vmsave_move_the_sysenter_msrs():
    cpu = _svm_cpu()
    cpu.enable_svm().check()
    vmcb = Vmcb(cpu.memory, cpu.memory.alloc())
    cpu.vmsave(vmcb.address).check()
    vmcb.write(0x630, 8, 0x8000)                           # SYSENTER_ESP at 630h (Table B-2)
    cpu.vmload(vmcb.address).check()
    assert cpu.guest.uc.msr_read(0x175) == 0x8000          # IA32_SYSENTER_ESP (MSR 175h)
    cpu.guest.uc.msr_write(0x175, 0x9000)
    cpu.vmsave(vmcb.address).check()
    assert vmcb.read(0x630, 8) == 0x9000


def test_vm_cr_lock_makes_svmdis_read_only():
    cpu = _svm_cpu()
    cpu.wrmsr(0xC001_0114, (1 << 3) | (1 << 4)).check()    # LOCK | SVMDIS
    out = cpu.wrmsr(0xC001_0114, 0)
    assert out.vector == 13 and "LOCK" in out.message
    assert cpu.enable_svm().vector == 13                    # EFER.SVME with SVMDIS = 1: #GP
    assert cpu.wrmsr(0xC001_0117, 0x1234).vector == 13     # VM_HSAVE_PA not 4-KByte aligned


def test_invlpga_needs_svme():
    cpu = _svm_cpu()
    assert cpu.invlpga(0x5000, 1).vector == 6
    cpu.enable_svm().check()
    cpu.invlpga(0x5000, 1).check()
    assert cpu.invlpga_log == [(0x5000, 1)]


def test_eventinj_delivers_through_the_guests_ivt():
    """EVENTINJ (APM Vol. 2, 15.20): VMRUN delivers the event before the guest's first
    instruction - here #UD (vector 6, TYPE 3) through a real-mode IVT - and clears V."""
    g = Guest("real")
    g.load("hlt", 0x1000)
    g.load("mov bx, 0x77\nhlt", 0x2000)
    g.write(6 * 4, (0x2000).to_bytes(2, "little") + (0).to_bytes(2, "little"))   # IVT[6] = 0000:2000
    g.rip = 0x1000
    cpu = SvmCpu(g)
    vmcb = _ready_vmcb(cpu)
    vmcb.put(A.VmcbControl.EVENTINJ, (1 << 31) | (3 << 8) | 6)
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x78 and out.exit.guest_rip == 0x2003
    assert g.reg("bx") == 0x77 and not vmcb.get(A.VmcbControl.EVENTINJ) >> 31 & 1


# ------------------------------------- decode assists and nRIP (chapter 15, 15.7.1)
def test_dr_intercept_exitinfo1_is_the_gpr_without_bit_63():
    """APM Vol. 2, chapter 15, "Decode Assists" (MOV CRx/DRx intercepts): EXITINFO1[3:0]
    is the GPR; bit 63 (MOV vs. CLTS/LMSW/SMSW) exists for CR intercepts only.  MOV EBX, DR7
    is a DR7 read: EXITCODE 27h, EXITINFO1 = 3 (EBX)."""
    g = Guest("protected")
    g.load("mov ebx, dr7\nhlt", 0x1000)
    g.rip = 0x1000
    cpu = SvmCpu(g)
    vmcb = _ready_vmcb(cpu)
    vmcb.put(A.VmcbControl.INTERCEPT_DR, 1 << 7)              # DR7 reads (bits 15:0 at 004h)
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x27
    assert out.exit.exitinfo1 == 3


def test_int3_exception_intercept_saves_nrip():
    """APM Vol. 2, 15.7.1: nRIP is saved for instruction intercepts and for the exceptions
    INT3, INTO and BOUND raise; 0 for other intercepts.  INT3 (CC, 1 byte) at 1000h with
    the #BP intercept (bit 3 at 008h): EXITCODE 43h, RIP 1000h, nRIP 1001h."""
    cpu = _svm_cpu("int3\nhlt")
    vmcb = _ready_vmcb(cpu)
    vmcb.put(A.VmcbControl.INTERCEPT_EXCEPTIONS, 1 << 3)
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x43 and out.exit.guest_rip == 0x1000
    assert vmcb.read(0x0C8, 8) == 0x1001
    assert vmcb.read(0x578, 8) == 0x1000


def test_ud_exception_intercept_leaves_nrip_zero():
    """APM Vol. 2, 15.7.1: a #UD from UD2 (0F 0B) is not one of INT3/INTO/BOUND: nRIP = 0."""
    cpu = _svm_cpu("ud2\nhlt")
    vmcb = _ready_vmcb(cpu)
    vmcb.put(A.VmcbControl.INTERCEPT_EXCEPTIONS, 1 << 6)
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x46 and vmcb.read(0x0C8, 8) == 0


def test_int_3_two_byte_form_is_int_n_not_the_bp_exception():
    """INT 3 written as CD 03 is INT n (the INTn intercept, bit 21 at 00Ch), not the
    one-byte INT3 (CC) that raises #BP (APM Vol. 3, INT n/INTO/INT3): with only the #BP
    intercept (bit 3 at 008h) set it goes through the guest's IVT entry 3."""
    g = Guest("real")
    g.load("nop\nnop\nhlt", 0x1000)
    g.write(0x1000, b"\xcd\x03")               # INT 3 as CD ib (assemblers pick CC for "int 3")
    g.load("hlt", 0x2000)
    g.write(3 * 4, (0x2000).to_bytes(2, "little") + (0).to_bytes(2, "little"))   # IVT[3] = 0000:2000
    g.rip = 0x1000
    cpu = SvmCpu(g)
    vmcb = _ready_vmcb(cpu)
    vmcb.put(A.VmcbControl.INTERCEPT_EXCEPTIONS, 1 << 3)
    out = cpu.vmrun(vmcb.address)
    assert out.exit.code == 0x78 and out.exit.guest_rip == 0x2000

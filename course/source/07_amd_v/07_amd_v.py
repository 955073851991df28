# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_intro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# # 07 · AMD-V beside VT-x
#
# Intel's VT-x is not the only hardware virtualization on x86. AMD's **Secure Virtual
# Machine** (SVM, marketed as AMD-V) solves the same problem - run a guest at full speed and
# get control back when it does something sensitive - with a different design. A
# hypervisor that runs on both (KVM, Xen, Hyper-V, Hypervisor-101) keeps one VMM and two
# small vendor modules. In this notebook you run the *same* guest under both processors
# and compare, field by field.
#
# The facts come from the **AMD64 Architecture Programmer's Manual, Volume 2** (24593 Rev.
# 3.42): chapter 15 "Secure Virtual Machine", Appendix B "Layout of VMCB", Appendix C "SVM
# Intercept Exit Codes".
#
# **Learning objectives** - after this notebook you can
#
# * bring SVM up step by step (CPUID, VM_CR.SVMDIS, EFER.SVME, VM_HSAVE_PA) and say which
#   fault each wrong step raises;
# * read and write a **VMCB** - plain memory at documented offsets - and contrast it with
#   the opaque VMCS behind VMREAD/VMWRITE;
# * break one of VMRUN's consistency checks and read the **VMEXIT_INVALID** it causes;
# * read a #VMEXIT: **EXITCODE**, **EXITINFO1**, **EXITINFO2**, **nRIP**, and map it to the
#   VT-x exit reason and qualification that say the same thing;
# * set the **IOPM** so that only the serial port is intercepted, and port a VT-x I/O exit
#   handler to SVM's EXITINFO1;
# * compare nested paging (NPT, an ordinary x86 page table) with EPT.

# %% nbgrader={"grade": false, "grade_id": "nb07_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import pandas as pd
from IPython.display import display

import vtlab
from vtlab import (Guest, Intercept, Intercept2, SvmCpu, SvmExitCode, SvmVendorVm, Vmcb, VmcbControl,
                   VmcbSave, VmxVendorVm, VmState)
from vtlab.arch import svm as apm
from vtlab.cpu.svm.state import save_guest

pd.set_option("display.max_colwidth", 80)
print(vtlab.APM_EDITION)

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_table", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## VMCS and VMCB
#
# | | VT-x (Intel SDM Vol. 3C) | AMD-V (AMD APM Vol. 2) |
# | --- | --- | --- |
# | control block | VMCS: layout is the processor's secret | VMCB: one 4-KByte page, layout in Appendix B |
# | access | VMREAD / VMWRITE with field encodings | ordinary loads and stores at byte offsets |
# | making it current | VMPTRLD; VMCLEAR before moving it | the VMCB's address in RAX at each VMRUN |
# | entering the guest | VMLAUNCH, then VMRESUME | VMRUN, every time |
# | what exits | execution controls, bitmaps, CR masks; CPUID *always* exits | intercept bit vectors; CPUID exits only if intercepted |
# | I/O ports | two 4-KByte I/O bitmaps (A, B) | one 12-KByte IOPM |
# | MSRs | one 4-KByte MSR bitmap, separate read/write halves | an 8-KByte MSRPM, two bits per MSR |
# | why it exited | exit reason + exit qualification | EXITCODE + EXITINFO1 / EXITINFO2 |
# | guest's RAX | in the CPU: the VMM saves it | in the VMCB save area |
# | second-level paging | EPT, its own entry format | NPT, an ordinary x86 page table (nCR3) |
# | TLB tags | VPID | ASID (ASID 0 is the host) |
# | masking interrupts around the switch | (none) | the global interrupt flag, CLGI / STGI |

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_bringup_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Bringing SVM up
#
# APM Vol. 2, 15.4: software checks CPUID Fn8000_0001h ECX[2] (SVM), then that the BIOS did
# not disable SVM (VM_CR MSR C001_0114h, bit 4 SVMDIS), sets EFER.SVME (bit 12) and gives the
# processor a 4-KByte host save area (VM_HSAVE_PA, MSR C001_0117h). Before EFER.SVME = 1
# every SVM instruction raises #UD:

# %% nbgrader={"grade": false, "grade_id": "nb07_ud", "locked": true, "schema_version": 3, "solution": false, "task": false}
cpu = SvmCpu(Guest("real"))
print(cpu.vmrun(cpu.memory.alloc()))
print(cpu.clgi())

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_ex1_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 1 - bring up SVM (2 points)
#
# Complete `bring_up(cpu)`: check that SVM exists (`cpu.cpuid(0x8000_0001)` returns
# `(EAX, EBX, ECX, EDX)`), raise `RuntimeError` if it does not or if VM_CR.SVMDIS is set
# (`cpu.rdmsr(...)`), set EFER.SVME with a read-modify-write of EFER (`cpu.wrmsr(msr, value)`
# returns an outcome; `.check()` raises if it faulted), allocate a page with
# `cpu.memory.alloc()` and write its address to VM_HSAVE_PA. Use the MSR numbers and bits of
# the paragraph above.

# %% nbgrader={"grade": false, "grade_id": "ex07_bringup", "locked": false, "schema_version": 3, "solution": true, "task": false}
def bring_up(cpu):
    ### BEGIN SOLUTION
    if not cpu.cpuid(0x8000_0001)[2] >> 2 & 1:
        raise RuntimeError("no SVM")
    if cpu.rdmsr(0xC001_0114) >> 4 & 1:
        raise RuntimeError("SVM disabled (VM_CR.SVMDIS)")
    cpu.wrmsr(0xC000_0080, cpu.rdmsr(0xC000_0080) | (1 << 12)).check()
    cpu.wrmsr(0xC001_0117, cpu.memory.alloc()).check()
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex07_bringup_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
from vtlab import Guest, SvmCpu

cpu = SvmCpu(Guest("real"))
bring_up(cpu)
assert cpu.rdmsr(0xC000_0080) >> 12 & 1, "EFER.SVME must be 1"
assert cpu.rdmsr(0xC001_0117) and not cpu.rdmsr(0xC001_0117) & 0xFFF, "VM_HSAVE_PA: a 4-KByte aligned page"
assert cpu.stgi().status.value == "ok"
### BEGIN HIDDEN TESTS
locked = SvmCpu(Guest("real"))
locked.wrmsr(0xC001_0114, (1 << 4) | (1 << 3)).check()
try:
    bring_up(locked)
except RuntimeError:
    pass
else:
    raise AssertionError("bring_up must refuse when VM_CR.SVMDIS = 1")
assert not locked.rdmsr(0xC000_0080) >> 12 & 1
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_vmcb_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## The VMCB is memory
#
# Below, a VMM sets up a VMCB for a small real-mode guest with plain stores: the intercepts
# at 00Ch/010h, the IOPM's address at 040h, an ASID at 058h, the guest state from 400h.
# After the first #VMEXIT the exit code is simply *there*, at offset 070h - a load, not a
# VMREAD.

# %% nbgrader={"grade": false, "grade_id": "nb07_vmcb", "locked": true, "schema_version": 3, "solution": false, "task": false}
GUEST = """
    mov dx, 0x3f8
    mov al, 'A'
    out dx, al
    cpuid
    hlt
"""


def fresh_guest(source=GUEST, mode="real"):
    g = Guest(mode)
    g.load(source, 0x1000)
    g.rip = 0x1000
    cpu = SvmCpu(g)
    cpu.enable_svm().check()
    cpu.wrmsr(apm.SvmMsr.VM_HSAVE_PA, cpu.memory.alloc()).check()
    vmcb = Vmcb(cpu.memory, cpu.memory.alloc())
    iopm = cpu.memory.alloc(3)
    cpu.memory.write(iopm, b"\xff" * apm.IOPM_SIZE)
    save_guest(vmcb, g)                                   # the guest's CPU state into the save area
    vmcb.put(VmcbSave.EFER, vmcb.get(VmcbSave.EFER) | apm.EFER_SVME)
    vmcb.put(VmcbControl.INTERCEPT_MISC1, Intercept.CPUID | Intercept.HLT | Intercept.IOIO_PROT)
    vmcb.put(VmcbControl.INTERCEPT_MISC2, Intercept2.VMRUN)
    vmcb.put(VmcbControl.IOPM_BASE_PA, iopm)
    vmcb.put(VmcbControl.GUEST_ASID, 1)
    return cpu, vmcb


cpu, vmcb = fresh_guest()
outcome = cpu.vmrun(vmcb.address)
print(outcome)
print(vmcb.hexdump(0x70, 0x10))            # EXITCODE at 070h, EXITINFO1 at 078h
print("EXITCODE by a plain load:", hex(cpu.memory.read_u32(vmcb.address + 0x70)))
print("decoded:", outcome.exit.decoded())

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_invalid_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## VMRUN's consistency checks
#
# Where a VT-x VM entry fails with an error number (VMfailValid) or exit reason 33 with
# bit 31 set, VMRUN checks the guest state it loads (APM Vol. 2, 15.5.1 "Canonicalization
# and Consistency Checks") and, if one fails, ends at once in a #VMEXIT with EXITCODE
# **VMEXIT_INVALID** (-1). One check is peculiar to SVM: the VMRUN intercept must be set
# (a guest may not run VMRUN un-intercepted).

# %% nbgrader={"grade": false, "grade_id": "nb07_invalid", "locked": true, "schema_version": 3, "solution": false, "task": false}
cpu, vmcb = fresh_guest()
vmcb.put(VmcbControl.INTERCEPT_MISC2, 0)
vmcb.put(VmcbControl.GUEST_ASID, 0)
out = cpu.vmrun(vmcb.address)
print(out.exit.name, hex(vmcb.get(VmcbControl.EXITCODE)))
print(out.message)

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_same_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## One guest, two processors
#
# `VmxVendorVm` and `SvmVendorVm` run a guest under vtlab's VT-x and AMD-V processors with
# one VMM: each vendor decodes its exits into a vendor-neutral record (kind + payload), and
# the same handlers - notebook 04's CPUID, serial port and MSR handlers - serve both. The
# serial driver of notebook 04's workloads polls the line status register and prints:

# %% nbgrader={"grade": false, "grade_id": "nb07_same", "locked": true, "schema_version": 3, "solution": false, "task": false}
DRIVER = """
    mov si, msg
next:
    mov al, [si]
    test al, al
    jz done
    mov bl, al
wait:
    mov dx, 0x3fd
    in al, dx
    test al, 0x20
    jz wait
    mov dx, 0x3f8
    mov al, bl
    out dx, al
    inc si
    jmp next
done:
    mov eax, 1
    cpuid
    hlt
msg: db "hi", 10, 0
"""
vms = {}
for cls in (VmxVendorVm, SvmVendorVm):
    vm = cls(DRIVER, mode="real")
    vm.run(max_exits=100, max_instructions=100_000)
    vms[vm.vendor] = vm
    print(vm.vendor, vm.state.value, repr(vm.output))
side = pd.concat({v: vm.exit_table()[["exit", "code", "what"]] for v, vm in vms.items()}, axis=1)
display(side)

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_same_after", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Row for row the "what" columns agree; the vendors' own columns differ: exit reason 30
# (IO_INSTRUCTION) is EXITCODE 7Bh (IOIO), 10 (CPUID) is 72h, 12 (HLT) is 78h. Under SVM the
# CPUID exit happens only because the VMM set the CPUID intercept - VT-x gives the VMM no
# choice.

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_maps_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Where a port and an MSR sit in the permission maps
#
# Type a port and an MSR number: the widget shows the byte and bit of the port in the
# 12-KByte IOPM (APM Vol. 2, 15.10.1) and the read and write bits of the MSR in the 8-KByte
# MSRPM (APM Vol. 2, 15.11), as `vtlab.arch.svm.iopm_bit` and `msrpm_bits` compute them. An
# MSR outside the MSRPM's three ranges is always intercepted when MSR_PROT is set.

# %% nbgrader={"grade": false, "grade_id": "nb07_maps", "locked": true, "schema_version": 3, "solution": false, "task": false}
import ipywidgets as ipw


def where_in_maps(port: int = 0x3F8, msr: int = 0xC000_0080) -> None:
    """Print the IOPM position of ``port`` and the MSRPM positions of ``msr``."""
    try:
        byte, bit = apm.iopm_bit(port)
        print(f"port {port:#06x}: IOPM byte {byte:#05x}, bit {bit}")
    except ValueError as exc:
        print(exc)
    where = apm.msrpm_bits(msr)
    if where is None:
        print(f"MSR {msr:#x}: outside the MSRPM - always intercepted (MSR_PROT set)")
    else:
        byte, bit = where
        print(f"MSR {msr:#x}: MSRPM byte {byte:#06x}, read bit {bit}, write bit {bit + 1}")


maps_widget = ipw.interactive(where_in_maps, port=ipw.IntText(value=0x3F8, description="port"),
                              msr=ipw.IntText(value=0xC000_0080, description="MSR"))
display(maps_widget)

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_ex2_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 2 - only the serial port exits (2 points)
#
# The IOPM has one bit per port: bit *n* (byte *n* // 8, bit *n* % 8) for port *n*
# (APM Vol. 2, 15.10.1). `SvmVendorVm` starts with every bit set. Write `serial_only(vm)`
# so that accesses to COM1's transmit register 3F8h are intercepted and no other port is -
# the driver's reads of the line status register 3FDh then reach the device without a
# #VMEXIT (as they would reach real hardware). Change the bits in `vm.cpu.memory` at
# `vm.iopm` (`memory.write(address, bytes)`, `memory.set_bit(address, bit, on)`).

# %% nbgrader={"grade": false, "grade_id": "ex07_iopm", "locked": false, "schema_version": 3, "solution": true, "task": false}
def serial_only(vm):
    ### BEGIN SOLUTION
    vm.cpu.memory.write(vm.iopm, bytes(apm.IOPM_SIZE))
    vm.cpu.memory.set_bit(vm.iopm + 0x3F8 // 8, 0x3F8 % 8)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex07_iopm_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
from vtlab import SvmVendorVm

# the serial driver above, built here so that the test does not depend on the notebook's DRIVER
_DRIVER = """
    mov si, msg
next:
    mov al, [si]
    test al, al
    jz done
    mov bl, al
wait:
    mov dx, 0x3fd
    in al, dx
    test al, 0x20
    jz wait
    mov dx, 0x3f8
    mov al, bl
    out dx, al
    inc si
    jmp next
done:
    mov eax, 1
    cpuid
    hlt
msg: db "hi", 10, 0
"""
vm = SvmVendorVm(_DRIVER, mode="real")
serial_only(vm)
vm.run(max_exits=100, max_instructions=100_000)
kinds = [x.summary().split(" at ")[0] for x in vm.exits]
assert vm.output == "hi\n", vm.output
assert kinds.count("io OUT port 0x3f8 size 1") == 3 and not any("0x3fd" in k for k in kinds), kinds
### BEGIN HIDDEN TESTS
assert all(vm.cpu.memory.test_bit(vm.iopm, p) == (p == 0x3F8) for p in range(0x3F0, 0x400))
assert not vm.cpu.memory.test_bit(vm.iopm, 0x3FD) and not vm.cpu.memory.test_bit(vm.iopm, 0x80)
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_ex3_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 3 - port a VT-x I/O handler to SVM (3 points)
#
# A VT-x handler reads the port from the exit qualification, bits 31:16 (SDM Table 28-5), the
# direction from bit 3 and the size from bits 2:0, and skips the instruction with
# `GUEST_RIP += VM_EXIT_INSTRUCTION_LEN`. An SVM handler gets the same facts from
# **EXITINFO1** (APM Vol. 2, 15.10.2: bit 0 TYPE, 1 = IN; bits 6:4 SZ32/SZ16/SZ8 one-hot;
# bits 31:16 the port) and skips with **RIP = EXITINFO2** (the next RIP).
#
# Write `my_ioio(vm, e)` for raw #VMEXITs (`e.exitinfo1`, `e.exitinfo2`): for an OUT,
# append the byte in AL (`vm.regs.al`) to the list `LOG` as `(port, value)`; for an IN
# return FFh in AL; then set `vm.vmcb`'s RIP (`vm.vmcb.put(VmcbSave.RIP, ...)`) and return True.

# %% nbgrader={"grade": false, "grade_id": "ex07_port", "locked": false, "schema_version": 3, "solution": true, "task": false}
LOG = []


def my_ioio(vm, e):
    ### BEGIN SOLUTION
    port, is_in = e.exitinfo1 >> 16 & 0xFFFF, e.exitinfo1 & 1
    if is_in:
        vm.regs.al = 0xFF
    else:
        LOG.append((port, vm.regs.al))
    vm.vmcb.put(VmcbSave.RIP, e.exitinfo2)
    return True
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex07_port_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from vtlab import SvmExitCode, SvmVendorVm, VmState

# the serial driver above, built here so that the test does not depend on the notebook's DRIVER
_DRIVER = """
    mov si, msg
next:
    mov al, [si]
    test al, al
    jz done
    mov bl, al
wait:
    mov dx, 0x3fd
    in al, dx
    test al, 0x20
    jz wait
    mov dx, 0x3f8
    mov al, bl
    out dx, al
    inc si
    jmp next
done:
    mov eax, 1
    cpuid
    hlt
msg: db "hi", 10, 0
"""
LOG.clear()
vm = SvmVendorVm(_DRIVER, mode="real")
vm.svm_handlers[SvmExitCode.IOIO] = my_ioio
vm.run(max_exits=100, max_instructions=100_000)
assert vm.state is VmState.HALTED, vm.message
assert [v for p, v in LOG if p == 0x3F8] == [ord("h"), ord("i"), 10], LOG
### BEGIN HIDDEN TESTS
LOG.clear()
vm = SvmVendorVm("mov dx, 0xe9\nmov al, 0x41\nout dx, al\nin al, dx\nmov bl, al\nhlt", mode="real")
vm.svm_handlers[SvmExitCode.IOIO] = my_ioio
vm.run(max_exits=100, max_instructions=100_000)
assert LOG == [(0xE9, 0x41)] and vm.regs.bl == 0xFF
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_npt_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Nested paging
#
# With NP_ENABLE (bit 0 at 090h) every guest-physical address goes through a second page
# table whose root is N_CR3 (0B0h). Unlike EPT, whose entries have their own format, NPT
# *is* an x86 4-level page table - vtlab walks it with the same walker it uses for EPT and
# for the guest's own paging. An access it refuses is a #VMEXIT NPF (400h) with a page-fault
# error code in EXITINFO1 (bit 32: it was the final guest-physical address) and the address in
# EXITINFO2. As with a TLB, editing the tables changes nothing until the VMM flushes
# (TLB_CONTROL at 05Ch) or loads a new N_CR3.

# %% nbgrader={"grade": false, "grade_id": "nb07_npt", "locked": true, "schema_version": 3, "solution": false, "task": false}
cpu, vmcb = fresh_guest("mov eax, [0x5000]\nhlt", mode="protected")
m = cpu.memory
pml4, pdpt, pd, pt = m.alloc(), m.alloc(), m.alloc(), m.alloc()
for table, nxt in ((pml4, pdpt), (pdpt, pd), (pd, pt)):
    m.write(table, (nxt | 7).to_bytes(8, "little"))          # P | R/W | U/S
for i in range(512):
    if i != 5:                                               # leave guest page 5000h out
        m.write(pt + 8 * i, (i << 12 | 7).to_bytes(8, "little"))
vmcb.put(VmcbControl.NESTED_CTL, apm.NP_ENABLE)
vmcb.put(VmcbControl.N_CR3, pml4)
out = cpu.vmrun(vmcb.address)
print(out, out.exit.decoded())

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_costs", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## What the exits cost
#
# The exit *counts* of a workload are the same under both vendors (the VMM intercepts the same
# things). vtlab's cost model (notebook 04) holds cycle figures for Intel cores with their
# published sources; it has no AMD profile yet, because a VMRUN/#VMEXIT round-trip figure for
# AMD cores with a citable source has not been added - vtlab does not invent numbers.

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb07_recap", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Recap
#
# * SVM is enabled by software in steps - CPUID Fn8000_0001h ECX[2], VM_CR.SVMDIS clear,
#   EFER.SVME = 1, a host save area in VM_HSAVE_PA - and before EFER.SVME every SVM
#   instruction raises #UD.
# * The **VMCB** is a page of ordinary memory at offsets the APM documents (Appendix B):
#   the VMM sets intercepts and reads EXITCODE, EXITINFO1 and EXITINFO2 with loads and
#   stores, where VT-x hides the VMCS behind VMREAD and VMWRITE.
# * VMRUN checks the state it loads and fails with **VMEXIT_INVALID** (-1), e.g. without the
#   VMRUN intercept or with ASID 0.
# * One VMM serves both vendors once each decodes its exits into a neutral record: exit
#   reason 30 is EXITCODE 7Bh (IOIO), 10 is 72h (CPUID), 12 is 78h (HLT) - and under SVM
#   even CPUID exits only when intercepted.
# * The **IOPM** has one bit per port, the **MSRPM** two bits per MSR; an I/O handler finds
#   the port in EXITINFO1 bits 31:16 and the next RIP in EXITINFO2.
# * **Nested paging** walks an ordinary x86 page table rooted at N_CR3; a refused access is
#   an NPF (400h) with a page-fault error code in EXITINFO1 and the address in EXITINFO2.

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

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb02_intro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# # 02 · VMX root and non-root operation
#
# Notebook 01 ended with a dead end: the four x86 rings cannot hold two kernels at once. The
# hypervisor needs ring 0 to control the machine, and so does every guest operating system,
# because that is where it was written to run. Intel VT-x (Virtualization Technology for x86,
# introduced in 2005; its processor part is called **VMX**, the Virtual-Machine Extensions)
# does not try to share the rings more cleverly. It adds a second, independent dimension.
#
# In this notebook you run that dimension on vtlab's processor: a real x86 guest executed by
# Unicorn, with vtlab playing the VMX logic of the CPU and a small VMM written in Python.
#
# **Learning objectives** — after this notebook you can
#
# * explain VMX root and VMX non-root operation as a dimension orthogonal to the rings, and
#   show a guest kernel keeping ring 0 (CPL 0) while it runs in non-root operation;
# * detect VMX (CPUID.1:ECX[5], IA32_FEATURE_CONTROL) and enable it step by step — CR4.VMXE,
#   the CR0/CR4 fixed bits, the VMXON region and its revision identifier — recognising
#   each failure on the way;
# * predict how each VMX instruction ends (VMsucceed, VMfailInvalid, VMfailValid with a
#   VM-instruction error number, or a fault) from the state the processor is in;
# * follow the first VM entry and the first VM exits one instruction at a time, and tell a
#   hypercall (VMCALL in the guest) from VMCALL in root operation (error 1).

# %% nbgrader={"grade": false, "grade_id": "nb02_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
from pathlib import Path

import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure

import vtlab
import vtlab.widgets as widgets
from vtlab import (Cr0, Cr4, ExitReason, FeatureControl, Msr, Status, VirtualMachine,
                   VmcsField as F, VmState, VmxCpu, VmxFailure, VmxOperation)
from vtlab.plots import OKABE_ITO

pd.set_option("display.max_colwidth", 110)


print("vtlab", vtlab.__version__, "ready")

# %% [markdown]
# ## 1 · A second dimension beside the rings
#
# VT-x gives the processor a new switch that is independent of the current privilege level:
#
# * **VMX root operation** is where the virtual-machine monitor (VMM, the hypervisor) runs.
#   The processor behaves much as it always did, plus the new VMX instructions.
# * **VMX non-root operation** is where guests run. It is a *restricted* mode: the processor
#   watches the code, and operations the VMM asked to see — plus a few it always sees — end
#   the guest's turn with a **VM exit** back to the VMM.
#
# Each side has all four rings. So the guest kernel no longer has to be pushed out of ring 0:
# it runs at CPL 0 *in non-root operation*, where it may change control registers, mask
# interrupts and load its descriptor tables as it was written to do. Non-root operation is
# not a debugging or tracing aid bolted on top; it is an execution mode the hardware
# enforces. It does not by itself wall the guest off from the hardware, though (a claim you
# may read elsewhere): which I/O ports, MSRs and physical memory a ring-0 guest reaches
# directly is whatever the VMM allowed through the I/O bitmaps, MSR bitmaps and EPT, and for
# everything else the processor hands control back to the VMM — notebooks 03 and 04 show the
# controls. (Rings 1 and 2 stay unused in practice, on both sides.)

# %%
who_runs_where = pd.DataFrame(
    {"ring 0 (CPL 0)": ["the VMM / host kernel (e.g. Linux with KVM)", "the guest kernel"],
     "rings 1-2": ["(unused)", "(unused)"],
     "ring 3 (CPL 3)": ["host user space (e.g. QEMU's device models)", "guest applications"]},
    index=["VMX root operation", "VMX non-root operation"])
who_runs_where

# %% [markdown]
# Let us watch a guest walk across this grid. `RING_GUEST` below is a 32-bit protected-mode
# guest. Its kernel part reads CR0 and executes CLI — privileged instructions that run
# natively because the guest *is* at CPL 0 — then executes CPUID, which VT-x always turns
# into a VM exit. Then it enters ring 3 the way an operating system starts a process (an IRET
# to a CPL-3 code segment), runs CPUID again and finally asks the VMM to switch it off with
# a hypercall.
#
# The **Stepper** widget executes one guest instruction per click. Its coloured bar is the
# mode indicator: orange for VMX root operation (the VMM has control), blue for VMX non-root
# operation (the guest runs), with the guest's CPL beside it.

# %%
RING_GUEST = '''
    mov eax, cr0          ; read a control register: fine at CPL 0, no exit
    cli                   ; privileged, and the guest is at CPL 0: runs natively
    mov eax, 0
    cpuid                 ; CPUID always causes a VM exit in non-root operation
    push 0x2B             ; build an IRET frame to ring 3: SS (user data, RPL 3)
    push 0x8E000          ;   ESP (user stack)
    pushfd                ;   EFLAGS
    push 0x23             ;   CS (user code, RPL 3)
    lea eax, [user]
    push eax              ;   EIP
    iretd                 ; now at CPL 3 - still in VMX non-root operation
user:
    mov eax, 0
    cpuid                 ; exits at CPL 3 too
    mov eax, 2            ; hypercall number 2: SHUTDOWN
    vmcall                ; ask the VMM to stop this VM
'''
stepper = widgets.Stepper(RING_GUEST, mode="protected")
stepper

# %% [markdown]
# Click **step instruction** a few times and watch the bar. The same steps, driven from code:
# after three steps the guest is in non-root operation *and* at CPL 0.

# %%
for _ in range(3):
    stepper.step()
print(stepper.mode_text)
assert stepper.vm.cpu.operation is VmxOperation.NON_ROOT and stepper.vm.guest.cpl == 0

# %% [markdown]
# To see the whole walk at once, `walk()` calls `vm.step()` until the VM stops and records,
# for every step, the instruction, what happened (a VM entry, an ordinary guest
# instruction, a VM exit, or the VMM handling an exit) and where the processor ended up.
# We reuse it in section 6.

# %%
FINAL = {VmState.HALTED, VmState.STOPPED, VmState.SHUTDOWN, VmState.CRASHED,
         VmState.ENTRY_FAILED, VmState.ERROR, VmState.BUDGET}


def next_instruction(vm):
    """The guest instruction that runs next (in root operation: the one at GUEST_RIP)."""
    if vm.cpu.operation is VmxOperation.ROOT:   # a handler may have advanced GUEST_RIP
        insn = vm.guest.instruction_at(vm.guest.segment("cs").base + vm.vmread(F.GUEST_RIP))
    else:
        insn = vm.guest.instruction_at()
    return insn.text if insn else "?"


def walk(vm, max_steps=60):
    """Step ``vm`` to the end; one row per vm.step() call."""
    rows = []
    for n in range(1, max_steps + 1):
        was_root = vm.cpu.operation is VmxOperation.ROOT
        pending = vm.pending_exit
        text = "(VMM code)" if pending is not None else next_instruction(vm)
        out = vm.step()
        if out is None:
            break
        root = vm.cpu.operation is VmxOperation.ROOT
        if pending is not None:
            event = f"VMM handles {pending.reason.name}"
        else:
            parts = [f"VM entry ({out.instruction})"] if was_root else []
            if out.status is Status.VM_EXIT:
                parts.append(f"VM exit: {out.exit.reason.name} ({int(out.exit.reason)})")
            event = " + ".join(parts) or "guest instruction"
        rows.append({"step": n, "instruction": text, "event": event,
                     "mode": "root" if root else "non-root",
                     "CPL": vm.cpu.cpl if root else vm.guest.cpl,
                     "who": "VMM" if root else "guest", "VM state": vm.state.value})
        if vm.state in FINAL:
            break
    return pd.DataFrame(rows).set_index("step")


ring_walk = walk(VirtualMachine(RING_GUEST, mode="protected"))
ring_walk

# %% [markdown]
# Counting the steps per cell of the grid confirms the picture: the guest ran at CPL 0 *and*
# at CPL 3, both in non-root operation, while the VMM's steps all happened in root operation
# at CPL 0.

# %%
grid_counts = pd.crosstab(ring_walk["mode"].map({"root": "VMX root", "non-root": "VMX non-root"}),
                          ring_walk["CPL"].map(lambda c: f"CPL {c}"))
grid_counts


# %% [markdown]
# ## 2 · Is VMX there? CPUID.1:ECX[5]
#
# Before anything else a VMM asks the processor whether it implements VMX at all: CPUID leaf 1
# reports it in **bit 5 of ECX**. Operating systems expose the same bit: on Linux the `vmx`
# flag of `/proc/cpuinfo` comes from it (`grep -E 'vmx|svm' /proc/cpuinfo` — `svm` is AMD's
# counterpart), `lsmod | grep kvm` shows whether KVM is loaded and
# `/sys/module/kvm_intel/parameters/nested` whether it lets guests use VMX themselves; on
# Windows, `systeminfo` and Sysinternals' `coreinfo -v` report it. vtlab can model both kinds
# of processor, and on the one without VMX even setting CR4.VMXE faults:

# %%
def cpuid_row(name, cpu):
    eax, ebx, ecx, edx = cpu.cpuid(1)
    try:
        cpu.write_cr4(cpu.cr4 | Cr4.VMXE)
        cr4 = "accepted"
    except VmxFailure as exc:
        cr4 = f"#{exc.outcome.vector.name}: {exc.outcome.message}"
    return {"processor": name, "CPUID.1:ECX": f"{ecx:#010x}", "ECX bit 5 (VMX)": ecx >> 5 & 1,
            "MOV CR4 with VMXE = 1": cr4}


pd.DataFrame([cpuid_row("VmxCpu()", VmxCpu()),
              cpuid_row("VmxCpu(vmx_supported=False)", VmxCpu(vmx_supported=False))])

# %% [markdown]
# Inside a virtual machine the answer is whatever the VMM decides, because CPUID exits.
# vtlab's VMM clears the VMX bit and sets bit 31. Intel's SDM lists that bit as unused
# (always 0 on real hardware); hypervisors agreed to set it to mean "a hypervisor is present"
# (AMD's manual reserves it for exactly that), and Linux shows it as the `hypervisor` flag.
# That is why running a hypervisor *inside* a guest (nested virtualization) needs the outer
# VMM's cooperation, for KVM the `nested=1` option of `kvm_intel`:

# %%
vm = VirtualMachine("mov eax, 1\ncpuid\nhlt", mode="real")
vm.run(max_exits=10, max_instructions=1_000)
ecx = vm.regs.ecx
print(f"guest sees CPUID.1:ECX = {ecx:#010x}: VMX bit {ecx >> 5 & 1}, hypervisor bit {ecx >> 31 & 1}")


# %% [markdown]
# The guest and the VMM ask the same processor, so apart from the bits the VMM changes on
# purpose, the two answers agree. One bit of leaf 1 is not a fixed feature at all: ECX bit 27,
# **OSXSAVE**, reports whether the *operating system* has set CR4.OSXSAVE (bit 18) to enable
# XSAVE and XGETBV (SDM Vol. 2A, CPUID, Table 3-10). Each side therefore sees its own CR4: the
# host here left CR4.OSXSAVE at 0, and a guest kernel that sets the bit in *its* CR4 reads 1.

# %% nbgrader={"grade": false, "grade_id": "nb02_cpuid_probe", "locked": true, "schema_version": 3, "solution": false, "task": false}
host_ecx = VmxCpu().cpuid(1)[2]
osxsave_vm = VirtualMachine("""
    mov eax, cr4
    or eax, 0x40000       ; CR4.OSXSAVE (bit 18)
    mov cr4, eax
    mov eax, 1
    cpuid
    hlt""", mode="protected")
osxsave_vm.run(max_exits=10, max_instructions=1_000)
cpuid_views = pd.DataFrame([
    {"asked by": who, "CPUID.1:ECX": f"{value:#010x}", "bit 5 VMX": value >> 5 & 1,
     "bit 27 OSXSAVE": value >> 27 & 1, "bit 31 hypervisor": value >> 31 & 1}
    for who, value in (("host (VmxCpu, CR4.OSXSAVE = 0)", host_ecx), ("guest, CR4.OSXSAVE = 0", ecx),
                       ("guest, CR4.OSXSAVE = 1", osxsave_vm.regs.ecx))]).set_index("asked by")
# Key results: host and guest differ in bits 5 and 31 only (the VMM's edit), and bit 27
# follows the CR4 of whoever asks (SDM Vol. 2A, CPUID, Table 3-10).
assert host_ecx ^ ecx == (1 << 5) | (1 << 31)
assert host_ecx >> 27 & 1 == 0 and ecx >> 27 & 1 == 0 and osxsave_vm.regs.ecx >> 27 & 1 == 1
assert osxsave_vm.regs.ecx ^ ecx == 1 << 27
cpuid_views

# %% [markdown]
# ### The machine you are using
#
# The same questions, asked of the computer this notebook runs on. The cell below only reads
# what Linux publishes — the flags in `/proc/cpuinfo`, the KVM module's parameters under
# `/sys/module`, and whether `/dev/kvm` exists — and says "not available" elsewhere (macOS,
# Windows, some containers). On a cloud server or on Binder you will most likely find the
# `hypervisor` flag set and `vmx` missing: the notebook itself runs inside a virtual machine
# whose VMM hides VMX, just as vtlab's does. Recent Linux kernels also drop the `vmx` flag when
# the firmware has locked VT-x off (next section), and list the VMX features they found — EPT,
# VPID, unrestricted guest ... — on a separate `vmx flags` line.

# %%
def host_vt_report() -> pd.Series:
    """What this machine's Linux kernel reports about hardware virtualization (read-only)."""
    try:
        first_cpu = Path("/proc/cpuinfo").read_text(errors="replace").split("\n\n")[0]
    except OSError:
        return pd.Series({"/proc/cpuinfo": "not available (not Linux?)"}, name="this machine")
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first_cpu.splitlines())}
    flags = set(info.get("flags", "").split())
    vmx_features = [f for f in info.get("vmx flags", "").split()
                    if f in ("ept", "vpid", "unrestricted_guest", "vmfunc", "shadow_vmcs", "posted_intr")]
    report = {"processor": info.get("model name", "?"),
              "vmx flag (Intel VT-x usable)": "vmx" in flags,
              "svm flag (AMD-V usable)": "svm" in flags,
              "hypervisor flag (we are a guest)": "hypervisor" in flags,
              "vmx flags (a few)": " ".join(vmx_features) or "-",
              "kvm module loaded": Path("/sys/module/kvm").exists(),
              "/dev/kvm present": Path("/dev/kvm").exists()}
    for module in ("kvm_intel", "kvm_amd"):
        nested = Path(f"/sys/module/{module}/parameters/nested")
        if nested.exists():
            report[f"{module} nested"] = nested.read_text().strip()
    return pd.Series(report, name="this machine")


host_vt_report().to_frame()


# %% [markdown]
# ## 3 · IA32_FEATURE_CONTROL: the firmware's say
#
# A processor that has VMX may still refuse to use it. MSR **IA32_FEATURE_CONTROL** (0x3A)
# holds the platform's decision:
#
# | bit | meaning |
# |---|---|
# | 0 | **lock**: once set, every WRMSR to this MSR faults (#GP) until the next reset |
# | 1 | VMXON allowed *inside* SMX operation (Intel TXT's measured launch) |
# | 2 | VMXON allowed *outside* SMX operation — the normal case |
#
# The firmware (BIOS/UEFI) normally sets these bits and locks the MSR during boot. VMXON
# raises #GP unless the lock bit **and** the enable bit for the current mode are both 1. Locked
# with bit 2 clear is what "VT-x disabled in the BIOS setup" means: no software can change it
# before the next reset. If the firmware left the MSR *unlocked*, the OS may set bit 2 and the
# lock bit itself — Linux does so at boot. Below, every possible value of the three bits on a
# fresh vtlab processor:

# %%
def try_vmxon(cpu):
    cpu.write_cr4(cpu.cr4 | Cr4.VMXE)
    return cpu.vmxon(cpu.alloc_region(cpu.caps.revision_id))


rows = []
for fc in range(8):
    cpu = VmxCpu(feature_control=fc)
    first = try_vmxon(cpu)
    try:                                 # what an OS can do about it
        cpu.wrmsr(Msr.IA32_FEATURE_CONTROL, fc | FeatureControl.LOCKED
                  | FeatureControl.VMXON_ENABLED_OUTSIDE_SMX)
        fixed = "WRMSR lock|enable accepted"
        second = cpu.vmxon(cpu.alloc_region(cpu.caps.revision_id)) if not first.ok else first
    except VmxFailure as exc:
        fixed, second = f"WRMSR refused: {exc.outcome.status.value} #{exc.outcome.vector.name}", first
    rows.append({"IA32_FEATURE_CONTROL": f"{fc:#05b}", "lock": fc & 1, "inside SMX": fc >> 1 & 1,
                 "outside SMX": fc >> 2 & 1,
                 "VMXON as firmware left it": first.status.value + (f" #{first.vector.name}" if first.vector else ""),
                 "OS fix-up": fixed if not first.ok else "(not needed)",
                 "VMXON afterwards": second.status.value})
feature_control_table = pd.DataFrame(rows).set_index("IA32_FEATURE_CONTROL")
feature_control_table

# %% [markdown]
# When VT-x "does not work" on a real machine, the symptom usually points at one of these
# layers:
#
# | symptom | usual cause | remedy |
# |---|---|---|
# | "VMX not supported" although the CPU has it | VT-x switched off in the firmware setup | enable "Intel Virtualization Technology" in the BIOS/UEFI setup |
# | VMXON fails | IA32_FEATURE_CONTROL locked with bit 2 clear | firmware update or setting; check for other software that took VT-x |
# | a VM inside a VM fails to start | nested virtualization off | load `kvm_intel` with `nested=1` |
# | guests are slow | EPT (hardware page-table virtualization) not used | enable EPT in the firmware; see "no secondary ept" |
# | "no secondary ept" | processor older than EPT (Nehalem, 2008) | newer hardware |
#
# The same power cuts both ways: code that can enable VT-x can slip a thin hypervisor *under*
# a running operating system and hide there (the "Blue Pill" rootkit idea). Platforms defend
# with Secure Boot and measured, hardware-verified boot chains, with protections for SMM, and
# by locking IA32_FEATURE_CONTROL early. Do not turn VT-x on for machines you do not trust.

# %% [markdown]
# ## 4 · Enabling VMX step by step
#
# Three more conditions stand between a VMM and VMX operation:
#
# * **CR4.VMXE** (bit 13) must be 1, or VMXON raises #UD. On a processor without VMX the bit
#   is reserved and setting it faults; inside VMX operation it cannot be cleared.
# * **CR0 and CR4 fixed bits.** Two MSR pairs say which control-register bits VMX operation
#   needs: a bit that is 1 in IA32_VMX_CR0_FIXED0 (0x486) must be 1 in CR0, a bit that is 0 in
#   IA32_VMX_CR0_FIXED1 (0x487) must be 0; likewise IA32_VMX_CR4_FIXED0/1 (0x488/0x489) for
#   CR4. VMXON checks them (#GP if violated). Short bring-up sketches often skip this step
#   and only set CR4.VMXE; on a host whose CR0.NE happens to be clear, their VMXON faults.
# * **The VMXON region**: a 4-KByte, 4-KByte-aligned piece of memory within the processor's
#   physical-address width, handed to VMXON by address. The processor uses it for itself; the
#   only thing software writes there is the **revision identifier** in bits 30:0 of the first
#   dword (bit 31 zero), copied from bits 30:0 of **IA32_VMX_BASIC** (0x480). A wrong address
#   or a wrong revision ends in VMfailInvalid.
#
# First the MSRs of vtlab's processor:

# %%
cpu = VmxCpu()
basic = cpu.rdmsr(Msr.IA32_VMX_BASIC)
pd.DataFrame([
    {"field": "revision identifier", "bits": "30:0", "value": f"{basic & 0x7FFF_FFFF:#x}"},
    {"field": "VMXON/VMCS region size", "bits": "44:32", "value": f"{basic >> 32 & 0x1FFF:#x} bytes"},
    {"field": "memory type for the regions", "bits": "53:50", "value": f"{basic >> 50 & 0xF} (6 = write-back)"},
    {"field": "TRUE control MSRs available", "bits": "55", "value": basic >> 55 & 1},
], ).set_index("field").rename_axis(f"IA32_VMX_BASIC = {basic:#018x}")


# %%
def bit_names(flag_cls, bits, width=32):
    names = []
    for b in range(width):
        if bits >> b & 1:
            try:
                names.append(flag_cls(1 << b).name or f"bit {b}")
            except ValueError:
                names.append(f"bit {b}")
    return ", ".join(names) or "-"


fixed = []
for reg, cls, f0, f1 in (("CR0", Cr0, Msr.IA32_VMX_CR0_FIXED0, Msr.IA32_VMX_CR0_FIXED1),
                         ("CR4", Cr4, Msr.IA32_VMX_CR4_FIXED0, Msr.IA32_VMX_CR4_FIXED1)):
    fixed0, fixed1 = cpu.rdmsr(f0), cpu.rdmsr(f1)
    fixed.append({"register": reg, "FIXED0": f"{fixed0:#x}", "FIXED1": f"{fixed1:#x}",
                  "must be 1": bit_names(cls, fixed0),
                  "must be 0": bit_names(cls, ~fixed1 & 0xFFFF_FFFF)})
pd.DataFrame(fixed).set_index("register")

# %% [markdown]
# Now the whole bring-up on a processor whose firmware left IA32_FEATURE_CONTROL unlocked,
# making every classic mistake once. Each row is one attempt; `CF`/`ZF` are the flags a VMX
# instruction leaves behind, and the last column says where the processor is afterwards.

# %%
cpu = VmxCpu(feature_control=0)          # firmware left the MSR unlocked
region = cpu.alloc_region()              # 4 KiB, zeroed: no revision identifier yet
revision = cpu.rdmsr(Msr.IA32_VMX_BASIC) & 0x7FFF_FFFF
attempts = []


def attempt(action, fn):
    try:
        out = fn()
    except VmxFailure as exc:            # MOV CR4 and WRMSR faults are raised as exceptions
        out = exc.outcome
    if out is None:                      # a plain register/memory write that worked
        status, flags, detail = "done", "", ""
    else:
        status = out.status.value + (f" #{out.vector.name}" if out.vector is not None else "")
        status += f" (error {int(out.error)})" if out.error is not None else ""
        flags = "" if out.status is Status.FAULT else f"CF={out.rflags['CF']} ZF={out.rflags['ZF']}"
        detail = out.message
    attempts.append({"action": action, "outcome": status, "flags": flags, "why": detail,
                     "afterwards": cpu.operation.value})


attempt("VMXON region", lambda: cpu.vmxon(region))
attempt("MOV CR4: set VMXE", lambda: cpu.write_cr4(cpu.cr4 | Cr4.VMXE))
attempt("VMXON region", lambda: cpu.vmxon(region))
attempt("WRMSR IA32_FEATURE_CONTROL = lock | enable outside SMX",
        lambda: cpu.wrmsr(Msr.IA32_FEATURE_CONTROL, FeatureControl.LOCKED | FeatureControl.VMXON_ENABLED_OUTSIDE_SMX))
attempt("MOV CR0: clear NE", lambda: setattr(cpu, "cr0", cpu.cr0 & ~Cr0.NE))
attempt("VMXON region", lambda: cpu.vmxon(region))
attempt("MOV CR0: set NE again", lambda: setattr(cpu, "cr0", cpu.cr0 | Cr0.NE))
attempt("VMXON 0x1234 (not 4-KByte aligned)", lambda: cpu.vmxon(0x1234))
attempt("VMXON region", lambda: cpu.vmxon(region))
attempt(f"write revision identifier {revision:#x} into the region",
        lambda: cpu.memory.write_u32(region, revision))
attempt("VMXON region", lambda: cpu.vmxon(region))
attempt("VMXON region (again)", lambda: cpu.vmxon(region))
attempt("MOV CR4: clear VMXE", lambda: cpu.write_cr4(cpu.cr4 & ~Cr4.VMXE))
enable_steps = pd.DataFrame(attempts, index=pd.RangeIndex(1, len(attempts) + 1, name="attempt"))
enable_steps


# %% [markdown]
# Read the table top to bottom: #UD while CR4.VMXE is 0; #GP while the MSR is unlocked and
# while CR0.NE violates IA32_VMX_CR0_FIXED0; VMfailInvalid (CF = 1) for a bad address and for
# a region without the right revision identifier; VMsucceed (CF = ZF = 0) once everything is
# in place. The second VMXON fails too: in root operation VMXON is an error (number 15), but
# with no current VMCS there is nowhere to store the number, so it is VMfailInvalid again.
# Section 5 explains that distinction.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex02_support_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 1 — can this machine use VT-x? (2 points)
#
# Write `vmx_status(cpuid1_ecx, feature_control)` that classifies a machine from two raw
# numbers: ECX of CPUID leaf 1 and the value of IA32_FEATURE_CONTROL. Return one of
#
# * `"unsupported"` — the processor has no VMX;
# * `"disabled"` — the MSR is locked and VMXON outside SMX is not enabled (only the firmware
#   can change that);
# * `"unlocked"` — the MSR is not locked yet: software may enable VMX and lock it;
# * `"ready"` — locked with VMXON outside SMX enabled.
#
# Use bit operations on the arguments only. The tests also check your answer against
# vtlab's processor for every IA32_FEATURE_CONTROL value.

# %% nbgrader={"grade": false, "grade_id": "ex02_support", "locked": false, "schema_version": 3, "solution": true, "task": false}
def vmx_status(cpuid1_ecx: int, feature_control: int) -> str:
    ### BEGIN SOLUTION
    if not cpuid1_ecx >> 5 & 1:
        return "unsupported"
    locked = feature_control & 1
    outside_smx = feature_control >> 2 & 1
    if not locked:
        return "unlocked"
    return "ready" if outside_smx else "disabled"
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex02_support_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
from vtlab import Cr4, VmxCpu


def names_used(fn) -> set:
    """Global and attribute names fn's code uses, following the notebook's own functions."""
    assert hasattr(fn, "__code__"), f"define {getattr(fn, '__name__', 'it')} with def in the answer cell"
    seen, names, todo = set(), set(), [fn]
    while todo:
        f = todo.pop()
        codes = [f.__code__]
        while codes:
            code = codes.pop()
            names |= set(code.co_names)
            codes += [c for c in code.co_consts if hasattr(c, "co_names")]
        for name in list(names):
            g = f.__globals__.get(name)
            if callable(g) and getattr(g, "__module__", None) == "__main__" and hasattr(g, "__code__") and g not in seen:
                seen.add(g)
                todo.append(g)
    return names


# By hand: the VMX bit is CPUID.1:ECX[5] (SDM Vol. 3C 24.6, discovering support for VMX),
# the lock and enable bits are those of IA32_FEATURE_CONTROL (SDM Vol. 3C 24.7).
used = names_used(vmx_status) & {"VmxCpu", "VirtualMachine", "Guest", "vmxon", "write_cr4", "cpuid", "rdmsr"}
assert not used, f"vmx_status must decide by hand from the bits of its two arguments; it uses {sorted(used)}"
assert vmx_status(0, 5) == "unsupported"
assert vmx_status(1 << 5, 5) == "ready"
assert vmx_status(1 << 5, 1) == "disabled"
assert vmx_status(1 << 5, 0) == "unlocked"
### BEGIN HIDDEN TESTS
assert vmx_status(0xFFFF_FFDF, 5) == "unsupported"
assert vmx_status(0x7FFA_FBFF, 0x3) == "disabled"      # enabled inside SMX only
assert vmx_status(0x20, 0x4) == "unlocked"
assert vmx_status(0x20, 0xFF07) == "ready"             # other bits do not matter
for fc in range(8):
    cpu = VmxCpu(feature_control=fc)
    cpu.write_cr4(cpu.cr4 | Cr4.VMXE)
    works = cpu.vmxon(cpu.alloc_region(cpu.caps.revision_id)).ok
    assert (vmx_status(cpu.cpuid(1)[2], fc) == "ready") == works, fc
assert vmx_status(VmxCpu(vmx_supported=False).cpuid(1)[2], 5) == "unsupported"
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex02_enable_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 2 — enable VMX (3 points)
#
# Write `enable_vmx(cpu)` that takes a fresh `VmxCpu` (outside VMX operation) and brings it
# into VMX root operation the way a VMM's start-up code does:
#
# 1. give up (return `None`) if CPUID.1:ECX[5] is 0 — touch nothing else on such a CPU;
# 2. read IA32_FEATURE_CONTROL (`cpu.rdmsr`); give up (return `None`) if it is locked with
#    VMXON outside SMX disabled; if it is unlocked, set the enable bit and the lock bit
#    (`cpu.wrmsr`);
# 3. make CR0 and CR4 satisfy the fixed-bit MSRs (`cpu.cr0` is a plain attribute; set CR4 with
#    `cpu.write_cr4(...)`, which also sets VMXE since CR4_FIXED0 contains it);
# 4. allocate a region (`cpu.alloc_region()`), write the revision identifier from
#    IA32_VMX_BASIC into it (`cpu.memory.write_u32(address, value)`), and
# 5. return the outcome of `cpu.vmxon(address)`.
#
# Do not use `cpu.caps` — read everything through `cpu.rdmsr` as real code must.

# %% nbgrader={"grade": false, "grade_id": "ex02_enable", "locked": false, "schema_version": 3, "solution": true, "task": false}
def enable_vmx(cpu):
    ### BEGIN SOLUTION
    if not cpu.cpuid(1)[2] >> 5 & 1:
        return None
    fc = cpu.rdmsr(Msr.IA32_FEATURE_CONTROL)
    if fc & FeatureControl.LOCKED:
        if not fc & FeatureControl.VMXON_ENABLED_OUTSIDE_SMX:
            return None
    else:
        cpu.wrmsr(Msr.IA32_FEATURE_CONTROL,
                  fc | FeatureControl.LOCKED | FeatureControl.VMXON_ENABLED_OUTSIDE_SMX)
    cpu.cr0 = (cpu.cr0 | cpu.rdmsr(Msr.IA32_VMX_CR0_FIXED0)) & cpu.rdmsr(Msr.IA32_VMX_CR0_FIXED1)
    cpu.write_cr4((cpu.cr4 | cpu.rdmsr(Msr.IA32_VMX_CR4_FIXED0)) & cpu.rdmsr(Msr.IA32_VMX_CR4_FIXED1))
    region = cpu.alloc_region()
    cpu.memory.write_u32(region, cpu.rdmsr(Msr.IA32_VMX_BASIC) & 0x7FFF_FFFF)
    return cpu.vmxon(region)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex02_enable_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
import vtlab
from vtlab import Cr0, FeatureControl, Msr, Status, VmxCpu, VmxOperation

cpu = VmxCpu()
out = enable_vmx(cpu)
assert out is not None and out.status is Status.VMSUCCEED, out
assert cpu.operation is VmxOperation.ROOT
cpu = VmxCpu(feature_control=0)
assert enable_vmx(cpu).ok and cpu.rdmsr(Msr.IA32_FEATURE_CONTROL) & FeatureControl.LOCKED
### BEGIN HIDDEN TESTS
assert enable_vmx(VmxCpu(vmx_supported=False)) is None
locked_off = VmxCpu(feature_control=FeatureControl.LOCKED)
assert enable_vmx(locked_off) is None and locked_off.operation is VmxOperation.OUTSIDE
smx_only = VmxCpu(feature_control=FeatureControl.LOCKED | FeatureControl.VMXON_ENABLED_INSIDE_SMX)
assert enable_vmx(smx_only) is None
no_ne = VmxCpu()
no_ne.cr0 &= ~Cr0.NE                      # a host that left CR0.NE clear
assert enable_vmx(no_ne).ok and no_ne.cr0 & Cr0.NE
other_revision = VmxCpu(capabilities=vtlab.VmxCapabilities(revision_id=0x12))
assert enable_vmx(other_revision).ok      # the identifier must come from IA32_VMX_BASIC
assert other_revision.memory.read_u32(other_revision.vmxon_pointer) == 0x12
assert cpu.vmxon_pointer is not None and cpu.memory.read_u32(cpu.vmxon_pointer) == cpu.caps.revision_id
### END HIDDEN TESTS

# %% [markdown]
# ## 5 · The VMX instructions as a state machine
#
# VT-x adds a handful of instructions. All but one are for the VMM, in root operation:
#
# | instruction | what it does | when a VMM uses it |
# |---|---|---|
# | VMXON *addr* | enter VMX operation (root), giving the processor its VMXON region | once, at start-up |
# | VMXOFF | leave VMX operation | at shutdown |
# | VMCLEAR *addr* | bring a VMCS to a clean, inactive state in memory; its launch state becomes *clear* | before first use of a new VMCS, before moving it |
# | VMPTRLD *addr* | make a VMCS the *current* one | to switch between VMs / virtual CPUs |
# | VMLAUNCH | enter the guest of the current VMCS, whose launch state must be clear | first run of a VM |
# | VMRESUME | enter it again; the launch state must be *launched* | after every later exit |
# | VMREAD / VMWRITE | read / write one field of the current VMCS | to inspect and configure a VM |
# | VMCALL | from a guest: call the VMM (a **hypercall**) | paravirtual services |
#
# Every VMX instruction ends in one of the SDM's outcomes, reported in RFLAGS:
#
# * **VMsucceed** — CF = ZF = 0.
# * **VMfailInvalid** — CF = 1. The instruction failed and there is *no current VMCS* in which
#   to store an error number.
# * **VMfailValid** — ZF = 1. The instruction failed and its **VM-instruction error number**
#   was written to the VM-instruction error field of the current VMCS (read it with VMREAD).
# * a **fault** (#UD, #GP) when the instruction may not execute at all: outside VMX operation,
#   at CPL > 0, ...
#
# A successful VMLAUNCH or VMRESUME does not "return": the guest runs until a VM exit, and the
# VMM continues at its HOST_RIP. In non-root operation none of these instructions executes —
# each one causes a VM exit (VMREAD and VMWRITE can be spared that by VMCS shadowing, a later
# feature). Which outcome you get depends on the state the processor is in;
# the table below is produced by executing every instruction in every state.

# %%
STATES = ["outside VMX operation", "root, no current VMCS", "root, current VMCS clear",
          "root, current VMCS launched", "non-root (guest running)"]
INSTRUCTIONS = ["VMXON", "VMXOFF", "VMCLEAR", "VMPTRLD", "VMLAUNCH", "VMRESUME", "VMREAD",
                "VMWRITE", "VMCALL"]
SM_GUEST = "mov eax, 0\ncpuid\nmov eax, 1\ncpuid\nhlt"     # the guest VMLAUNCH/VMRESUME enter
IN_GUEST = {"VMXON": "vmxon [0x500]", "VMXOFF": "vmxoff", "VMCLEAR": "vmclear [0x500]",
            "VMPTRLD": "vmptrld [0x500]", "VMLAUNCH": "vmlaunch", "VMRESUME": "vmresume",
            "VMREAD": "vmread eax, ebx", "VMWRITE": "vmwrite ebx, eax", "VMCALL": "vmcall"}


def where(cpu):
    """The node of the state machine ``cpu`` is in."""
    if cpu.operation is VmxOperation.OUTSIDE:
        return STATES[0]
    if cpu.operation is VmxOperation.NON_ROOT:
        return STATES[4]
    if cpu.current_vmcs is None:
        return STATES[1]
    return STATES[3] if cpu.current_vmcs.launch_state.value == "launched" else STATES[2]


def machine_in(state):
    """A VirtualMachine whose processor is in one of the four root/outside states."""
    vm = VirtualMachine(SM_GUEST, mode="real")   # bring-up leaves: root, current VMCS clear
    cpu = vm.cpu
    if state == STATES[0]:
        cpu.vmxoff()
    elif state == STATES[1]:
        cpu.vmclear(vm.vmcs_address)
    elif state == STATES[3]:
        cpu.vmlaunch(1_000)                       # runs to the first CPUID exit
        cpu.current_vmcs.write(F.GUEST_RIP, cpu.current_vmcs.read(F.GUEST_RIP) + 2)
    assert where(cpu) == state
    return vm


def execute(vm, name):
    """Execute one VMX instruction on vm's processor, in root operation or outside."""
    cpu = vm.cpu
    return {"VMXON": lambda: cpu.vmxon(vm.vmxon_address), "VMXOFF": cpu.vmxoff,
            "VMCLEAR": lambda: cpu.vmclear(vm.vmcs_address),
            "VMPTRLD": lambda: cpu.vmptrld(vm.vmcs_address),
            "VMLAUNCH": lambda: cpu.vmlaunch(1_000), "VMRESUME": lambda: cpu.vmresume(1_000),
            "VMREAD": lambda: cpu.vmread(F.GUEST_RIP),
            "VMWRITE": lambda: cpu.vmwrite(F.GUEST_RIP, 0x1000), "VMCALL": cpu.vmcall}[name]()


def label(out):
    if out.status is Status.FAULT:
        return f"#{out.vector.name}"
    if out.status is Status.VMFAIL_VALID:
        return f"VMfailValid ({int(out.error)})"
    if out.status is Status.VM_EXIT:
        return "VMsucceed: guest ran"
    return out.status.value


rows = []
for state in STATES:
    for name in INSTRUCTIONS:
        if state == STATES[4]:           # executed by the guest itself
            vm = VirtualMachine(IN_GUEST[name], mode="protected")
            ex = vm.next_exit(max_instructions=100)
            rows.append({"state": state, "instruction": name, "outcome": f"VM exit {int(ex.reason)}",
                         "error": None, "next state": "root (VMM handles the exit)"})
            continue
        vm = machine_in(state)
        out = execute(vm, name)
        rows.append({"state": state, "instruction": name, "outcome": label(out),
                     "error": int(out.error) if out.error is not None else None,
                     "next state": where(vm.cpu)})
state_machine = pd.DataFrame(rows)
state_table = state_machine.pivot(index="state", columns="instruction", values="outcome")
state_table = state_table.loc[STATES, INSTRUCTIONS]

COLOURS = {"VMsucceed": OKABE_ITO["bluish green"], "VMfailInvalid": OKABE_ITO["orange"],
           "VMfailValid": OKABE_ITO["vermillion"], "#": OKABE_ITO["black"],
           "VM exit": OKABE_ITO["reddish purple"]}


def colour(cell):
    for key, c in COLOURS.items():
        if cell.startswith(key):
            return f"background-color: {c}33; border: 1px solid {c}"
    return ""


display(state_table.style.map(colour).set_caption(
    "Outcome of each VMX instruction (columns) in each processor state (rows); "
    "VMfailValid shows the VM-instruction error number"))

# %% [markdown]
# Some cells worth a second look:
#
# * **Outside VMX operation** everything but VMXON is #UD — there is no VMX yet.
# * **VMfailInvalid versus VMfailValid** is decided by one thing: is there a current VMCS?
#   VMCALL in root operation is error 1 — VMfailValid (1) with a current VMCS, but
#   VMfailInvalid without one. The same holds for VMXON in root operation (error 15).
# * **VMLAUNCH versus VMRESUME** follows the launch state: VMLAUNCH on a launched VMCS is
#   error 4, VMRESUME on a clear one is error 5.
# * **In non-root operation** each of them causes a VM exit with its own exit reason
#   (VMCALL 18, VMCLEAR 19, VMLAUNCH 20, VMPTRLD 21, VMREAD 23, VMRESUME 24, VMWRITE 25,
#   VMXOFF 26, VMXON 27). A VMM that does not offer nested virtualization answers them by
#   injecting #UD into the guest.
#
# Every outcome that moves the processor to another state, as data (none of these is a
# failure, so none has an error number):

# %%
transitions = state_machine[state_machine["next state"] != state_machine["state"]]
transitions[["state", "instruction", "outcome", "next state"]].set_index(["state", "instruction"])

# %% [markdown]
# ### A new VMCS: VMCLEAR before its first VMPTRLD
#
# The `machine_in` helper above could skip a step because `VirtualMachine` had done it already.
# A VMCS region is ordinary memory until the processor has initialised it, and the SDM gives
# the order (SDM Vol. 3C 25.11.3, "Initializing a VMCS"): allocate a 4-KByte aligned region,
# write the revision identifier from IA32_VMX_BASIC[30:0] into its first dword, execute
# **VMCLEAR** on it, and only then **VMPTRLD** it. VMCLEAR sets the region's launch state to
# *clear* and puts the processor's own data for it into a defined state; VMPTRLD of a region
# that was never VMCLEARed reads whatever that memory happened to hold, and the SDM does not
# say what follows. Then VMWRITE the fields and VMLAUNCH. The same VMCLEAR is needed before a
# VMCS moves to another processor. Here it is on a fresh processor, and the bring-up every
# `VirtualMachine` performs:

# %% nbgrader={"grade": false, "grade_id": "nb02_vmclear_probe", "locked": true, "schema_version": 3, "solution": false, "task": false}
fresh_cpu = VmxCpu()
fresh_cpu.write_cr4(fresh_cpu.cr4 | Cr4.VMXE)
fresh_cpu.vmxon(fresh_cpu.alloc_region(fresh_cpu.caps.revision_id)).check()
new_vmcs = fresh_cpu.alloc_region(fresh_cpu.caps.revision_id)     # 4 KiB, revision identifier in dword 0
for out in (fresh_cpu.vmclear(new_vmcs), fresh_cpu.vmptrld(new_vmcs)):
    print(out)
print("current VMCS:", hex(fresh_cpu.current_vmcs_pointer), "| launch state:", fresh_cpu.current_vmcs.launch_state.value)
bring_up = [(o.instruction, o.status.value) for o in VirtualMachine("hlt", mode="real").cpu.history]
print("VirtualMachine's bring-up:", bring_up)
# Key results (SDM Vol. 3C 25.11.3): VMCLEAR comes before the first VMPTRLD, and the VMCS it
# leaves current is clear, ready for VMLAUNCH.
assert [name for name, _ in bring_up] == ["VMXON", "VMCLEAR", "VMPTRLD"]
assert all(status == "VMsucceed" for _, status in bring_up)
assert fresh_cpu.current_vmcs_pointer == new_vmcs and fresh_cpu.current_vmcs.launch_state.value == "clear"

# %% [markdown]
# ### Try it: the VMX instruction console
#
# `VmxConsole` is the same state machine under your fingers. It starts **outside** VMX
# operation with CR4.VMXE = 0. Pick an operand (the VMXON region, a configured VMCS, an empty
# VMCS, a region with a wrong revision identifier, a misaligned address) and press
# instructions in any order: the highlighted box is the processor's state and the log shows
# each outcome in the SDM's terms. Try VMLAUNCH with the *empty* VMCS, or VMCLEAR the current
# VMCS and then VMREAD.

# %%
console = widgets.VmxConsole()
console

# %% [markdown]
# The same console, pressed from code:

# %%
console.press("VMXON")                                   # CR4.VMXE is still 0
console.press("CR4.VMXE=1")
console.press("VMXON")
console.operand.value = console.vm.vmcs_address          # the configured VMCS
for name in ["VMPTRLD", "VMLAUNCH", "VMLAUNCH", "VMREAD", "VMRESUME"]:
    console.press(name)
for n, line in enumerate(console.entries, 1):
    print(f"{n:2}. {line}")
print("state:", console.state)

# %% [markdown]
# ### VMCALL: a hypercall from the guest, an error in the VMM
#
# In non-root operation VMCALL always exits (reason 18) — it is how a paravirtualized guest
# calls its hypervisor, the hardware counterpart of a system call. vtlab's VMM follows KVM's
# convention: the hypercall number in EAX, arguments in EBX, ECX, EDX, the result back in EAX.
# Hypercall 4 (`Hypercall.ADD`) adds EBX and ECX.
#
# **What "guest instructions" counts.** In every run summary of this course, "guest
# instructions" are the instructions the guest completed itself in non-root operation. An
# instruction that causes a VM exit does not complete in the guest: the exit takes place
# instead of it, with the guest state as it was before the instruction (SDM Vol. 3C 28.1), and
# the VMM finishes its work (notebook 04). Such an instruction is counted as an exit, never as a
# guest instruction. Below: three MOVs complete in the guest, VMCALL and HLT exit, so the
# summary reads 3 guest instructions and 2 exits.

# %%
HYPERCALL_GUEST = '''
    mov eax, 4        ; hypercall number: ADD
    mov ebx, 40
    mov ecx, 2
    vmcall            ; VM exit 18; the VMM computes EBX + ECX into EAX
    hlt
'''
vm = VirtualMachine(HYPERCALL_GUEST, mode="real")
summary = vm.run(max_exits=10, max_instructions=1_000)
hypercall_result = vm.regs.eax
print(summary)
print("exits:", {k: int(v) for k, v in vm.trace.counts().items()}, "| EAX after the hypercall:", hypercall_result)
# Key result: the two exiting instructions (VMCALL, HLT) are exits, not guest instructions.
assert (summary.instructions, summary.exits) == (3, 2)

# %% [markdown]
# Executed by the VMM itself, in root operation, VMCALL has nobody to call (it is only
# meaningful for the dual-monitor treatment of SMM, which is not active). It fails with
# VM-instruction error 1 — as VMfailValid when there is a current VMCS, as VMfailInvalid when
# there is none:

# %%
cpu = vm.cpu
with_vmcs = cpu.vmcall()
print(with_vmcs, "| VMREAD VM_INSTRUCTION_ERROR ->", cpu.vmread(F.VM_INSTRUCTION_ERROR).value)
cpu.vmclear(vm.vmcs_address)              # now there is no current VMCS
without_vmcs = cpu.vmcall()
print(without_vmcs)

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex02_predict_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 3 — predict the outcome (3 points)
#
# The table of section 5 tried each instruction with well-formed operands. The sequences below
# go further: wrong operands, a VMCS loaded twice, VMX operation left and entered again. Each
# starts on a fresh processor *outside* VMX operation, with CR4.VMXE = 1, IA32_FEATURE_CONTROL
# locked and enabled, a VMXON region `R` and a configured VMCS `V` that both carry the right
# revision identifier, a second region `W` whose revision identifier is wrong, and a guest
# whose first instruction (CPUID) exits at once, so a successful VMLAUNCH is back in root
# operation a moment later. `V+0x10` is an address 16 bytes into `V`.
#
# Predict how the **last** instruction of each sequence ends, *without running anything*,
# and write each prediction as a literal tuple `(status, error)`: `status` is one of
# `"VMsucceed"`, `"VMfailInvalid"`, `"VMfailValid"`, `"fault"`, and `error` is the
# VM-instruction error number for VMfailValid and `None` otherwise. Then run the self-check
# cell, which tells you where your predictions break a rule, without telling you the answers.
#
# <details><summary>Hint 1 — where is the processor before the last instruction?</summary>
#
# Follow the current-VMCS pointer through the sequence. VMXON starts VMX operation with *no*
# current VMCS (the pointer is set to FFFFFFFF_FFFFFFFFH, SDM Vol. 3C 31.3, VMXON); VMPTRLD
# makes a VMCS current; VMCLEAR of the current VMCS leaves none; VMXOFF leaves VMX operation.
# </details>
#
# <details><summary>Hint 2 — Invalid or Valid?</summary>
#
# A failing VMX instruction reports VMfailValid only if there is a current VMCS to hold the
# error number; with none it is VMfailInvalid, whatever went wrong (SDM Vol. 3C 31.2). Only the
# VMfailValid cases need a number.
# </details>
#
# <details><summary>Hint 3 — the numbers and the launch state</summary>
#
# The numbers are in SDM Vol. 3C 31.4, Table 31-1. Those you need are among: 2 (VMCLEAR with
# an invalid physical address), 4 (VMLAUNCH with a non-clear VMCS), 5 (VMRESUME with a
# non-launched VMCS), 10 (VMPTRLD with the VMXON pointer), 11 (VMPTRLD with an incorrect
# VMCS revision identifier). The launch state lives with the VMCS: VMLAUNCH sets it to
# launched, only VMCLEAR sets it back to clear, and VMPTRLD leaves it as it is.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex02_predict_sequences", "locked": true, "schema_version": 3, "solution": false, "task": false}
SEQUENCES = {
    "A": ["VMXON R", "VMPTRLD R"],
    "B": ["VMXON R", "VMPTRLD V", "VMPTRLD R"],
    "C": ["VMXON R", "VMPTRLD V", "VMCLEAR V+0x10"],
    "D": ["VMXON R", "VMPTRLD V", "VMPTRLD W"],
    "E": ["VMXON R", "VMPTRLD V", "VMXOFF", "VMXON R", "VMREAD GUEST_RIP"],
    "F": ["VMXON R", "VMPTRLD V", "VMLAUNCH", "VMPTRLD V", "VMLAUNCH"],
    "G": ["VMXON R", "VMPTRLD V", "VMLAUNCH", "VMCLEAR V", "VMPTRLD V", "VMRESUME"],
}

# %% nbgrader={"grade": false, "grade_id": "ex02_predict", "locked": false, "schema_version": 3, "solution": true, "task": false}
predictions = {}
### BEGIN SOLUTION
predictions["A"] = ("VMfailInvalid", None)
predictions["B"] = ("VMfailValid", 10)
predictions["C"] = ("VMfailValid", 2)
predictions["D"] = ("VMfailValid", 11)
predictions["E"] = ("VMfailInvalid", None)
predictions["F"] = ("VMfailValid", 4)
predictions["G"] = ("VMfailValid", 5)
### END SOLUTION

# %% nbgrader={"grade": false, "grade_id": "ex02_predict_selfcheck", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Self-check (not graded). It replays each sequence *except its last instruction* on vtlab's
# processor and checks your prediction against the one rule that state decides (Hint 2):
# VMfailValid needs a current VMCS, VMfailInvalid needs none. It never runs the last one.
def state_before_last(seq):
    vm = VirtualMachine("mov eax, 0\ncpuid\nhlt", mode="real")
    cpu = vm.cpu
    cpu.vmxoff()
    R, V = vm.vmxon_address, vm.vmcs_address
    ops = {"VMXON R": lambda: cpu.vmxon(R), "VMXOFF": cpu.vmxoff, "VMPTRLD V": lambda: cpu.vmptrld(V),
           "VMCLEAR V": lambda: cpu.vmclear(V), "VMLAUNCH": lambda: cpu.vmlaunch(1_000)}
    for step in seq[:-1]:
        ops[step]()
    return cpu.operation, cpu.current_vmcs


for key, seq in SEQUENCES.items():
    p = predictions.get(key)
    if not (isinstance(p, tuple) and len(p) == 2):
        print(f"{key}: no prediction in the form (status, error) yet")
        continue
    operation, current = state_before_last(seq)
    if p[0] == "VMfailValid" and current is None:
        print(f"{key}: VMfailValid is impossible here - there is no current VMCS before {seq[-1]}")
    elif p[0] == "VMfailInvalid" and current is not None:
        print(f"{key}: VMfailInvalid is impossible here - a VMCS is current before {seq[-1]}")
    elif p[0] == "VMfailValid" and not isinstance(p[1], int):
        print(f"{key}: a VMfailValid needs its error number")
    elif p[0] != "VMfailValid" and p[1] is not None:
        print(f"{key}: only VMfailValid carries an error number")
    else:
        number = " (the number is yours to check in Table 31-1)" if p[0] == "VMfailValid" else ""
        print(f"{key}: consistent with the state before {seq[-1]}{number}")

# %% nbgrader={"grade": true, "grade_id": "ex02_predict_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
# The expected outcomes are written out from the SDM, not read from vtlab; the test uses no
# notebook global but `predictions`.
assert isinstance(predictions, dict) and set(predictions) == set("ABCDEFG"), "predict every sequence A-G"
for key, p in predictions.items():
    assert isinstance(p, tuple) and len(p) == 2, f"{key}: write (status, error)"
    assert p[0] in ("VMsucceed", "VMfailInvalid", "VMfailValid", "fault"), f"{key}: unknown status {p[0]!r}"
    assert (p[0] == "VMfailValid") == isinstance(p[1], int), f"{key}: an error number with VMfailValid only"
# Sequences A and E leave no current VMCS before their last instruction (VMXON sets the
# current-VMCS pointer to FFFFFFFF_FFFFFFFFH, SDM Vol. 3C 31.3), so they cannot fail valid.
assert predictions["A"][0] != "VMfailValid" and predictions["E"][0] != "VMfailValid"
### BEGIN HIDDEN TESTS
# The SDM's answers (Vol. 3C 31.3 for each instruction; error numbers from 31.4, Table 31-1):
# A: VMPTRLD of the VMXON pointer with no current VMCS: VMfailInvalid (error 10 has nowhere to go);
# B: the same with a current VMCS: VMfailValid 10; C: VMCLEAR of an address that is not
# 4-KByte aligned: error 2; D: VMPTRLD of a region with the wrong revision identifier: error 11;
# E: VMXON leaves no current VMCS, so VMREAD fails invalid; F: VMPTRLD keeps the launch state,
# so the second VMLAUNCH is error 4; G: VMCLEAR made it clear again, so VMRESUME is error 5.
SDM_ANSWERS = {"A": ("VMfailInvalid", None), "B": ("VMfailValid", 10), "C": ("VMfailValid", 2),
               "D": ("VMfailValid", 11), "E": ("VMfailInvalid", None), "F": ("VMfailValid", 4),
               "G": ("VMfailValid", 5)}
for key, answer in SDM_ANSWERS.items():
    assert predictions[key] == answer, f"{key} is wrong"
### END HIDDEN TESTS

# %% [markdown]
# ## 6 · The first VM entry and the first VM exit
#
# A **VM entry** (VMLAUNCH or VMRESUME) is one atomic step of the processor:
#
# 1. check the VMX controls and the host-state area — a problem makes the instruction fail
#    with VMfailValid, error 7 or 8, and execution simply continues in the VMM;
# 2. check the guest-state area — a problem makes the entry fail *like a VM exit* (notebook 03);
# 3. load the guest state from the VMCS into the processor's registers;
# 4. apply the VM-entry controls, e.g. inject a pending interrupt or exception into the guest;
# 5. switch to VMX non-root operation and start executing at GUEST_RIP.
#
# A **VM exit** is the mirror image, equally atomic — there is no half-done exit:
#
# 1. the processor recognises the exit condition at an instruction boundary;
# 2. it records why in the VM-exit information fields: the exit reason, the exit
#    qualification, the length of the exiting instruction, and (for some exits) guest
#    addresses;
# 3. it saves the guest state into the guest-state area;
# 4. it loads the host state from the host-state area (control registers, stack pointer,
#    GDTR/IDTR, ...). Host state is not saved on entry: the VMM wrote it in advance;
# 5. it switches to VMX root operation and continues at HOST_RIP, the VMM's exit handler.
#
# `BOOT_GUEST` is a tiny real-mode guest: some ordinary instructions, then CPUID, a hypercall
# and HLT — three VM exits. Step it with the widget, or read the programmatic walk below it.

# %%
BOOT_GUEST = '''
    mov ax, 0x1234        ; ordinary instructions run natively in non-root operation
    add ax, 1
    cli                   ; privileged, but the guest is at CPL 0: no exit
    mov eax, 0
    cpuid                 ; the first VM exit (always)
    mov eax, 4            ; hypercall ADD(40, 2)
    mov ebx, 40
    mov ecx, 2
    vmcall                ; the second VM exit
    hlt                   ; the third: HLT exiting is on, and the VMM stops the VM
'''
widgets.Stepper(BOOT_GUEST, mode="real")

# %%
boot_vm = VirtualMachine(BOOT_GUEST, mode="real")
watched = [F.GUEST_RIP, F.VM_EXIT_REASON, F.EXIT_QUALIFICATION, F.VM_EXIT_INSTRUCTION_LEN, F.HOST_RIP]
before = {f.name: boot_vm.vmread(f) for f in watched}
boot_vm.next_exit(max_instructions=1_000)   # VMLAUNCH ... up to the first exit; its handler has not run
after = {f.name: boot_vm.vmread(f) for f in watched}
first_exit_fields = pd.DataFrame({"before VMLAUNCH": before, "after the first VM exit": after}).map(hex)
print("pending exit:", boot_vm.pending_exit)
first_exit_fields

# %% [markdown]
# The exit wrote its reason (10 = CPUID) and the instruction length (2 bytes), and saved the
# guest's RIP, which still points *at* the CPUID: the VMM must emulate it and advance
# GUEST_RIP itself (notebook 04). HOST_RIP did not change — it is where the VMM's exit handler
# lives. Now the whole run, one `vm.step()` at a time:

# %%
boot_steps = walk(VirtualMachine(BOOT_GUEST, mode="real"))
boot_steps

# %%
y = (boot_steps["mode"] == "non-root").astype(int)
fig = Figure(figsize=(9.5, 3.4), layout="constrained")
ax = fig.subplots()
ax.step(boot_steps.index, y, where="mid", color=OKABE_ITO["black"], linewidth=1, alpha=0.6)
colours = [OKABE_ITO["blue"] if v else OKABE_ITO["orange"] for v in y]
ax.scatter(boot_steps.index, y, c=colours, s=60, zorder=3)
for step, row in boot_steps.iterrows():
    if "VM entry" in row["event"]:
        ax.annotate("entry", (step, 0.5), ha="center", color=OKABE_ITO["bluish green"], fontsize=8)
    if "VM exit" in row["event"]:
        reason = row["event"].split("VM exit: ")[1].split(" (")[0]
        ax.annotate(f"exit: {reason}", (step, 0.12), ha="center", color=OKABE_ITO["vermillion"],
                    fontsize=8, rotation=90, va="bottom")
ax.set_yticks([0, 1], ["VMX root\n(VMM)", "VMX non-root\n(guest)"])
ax.set_ylim(-0.3, 1.3)
ax.set_xlabel("step (one vm.step() call)")
ax.set_ylabel("VMX mode after the step")
ax.set_xticks(boot_steps.index)
ax.set_title("BOOT_GUEST: VMX mode after each step")
fig


# %% [markdown]
# *Figure: the processor's VMX mode after each `vm.step()` — blue dots are guest instructions
# in non-root operation, orange dots are the VMM in root operation. Look for the drops to
# root operation at the CPUID and VMCALL exits, each followed by one step of VMM work before
# the next entry (VMRESUME) lifts the processor back to non-root operation. The third exit
# hides in step 12: VMRESUME entered the guest, whose very first instruction, HLT, exited at
# once, so entry and exit fall into one step and the dot stays down.*

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex02_first_exit_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 4 — reach the first VM exit yourself (3 points)
#
# `lab_machine(source)` below builds a VM whose VMCS is fully configured, then switches the
# processor back *outside* VMX operation and clears CR4.VMXE. Write `first_exit(vm)` that
# executes, on `vm.cpu`, the sequence of instructions that gets the guest running and returns
# the outcome of the instruction that entered the guest. The VMXON region is at
# `vm.vmxon_address`, the VMCS at `vm.vmcs_address`; pass `max_instructions=10_000` when you
# enter the guest. Every instruction in your sequence must succeed (no VMfail, no fault), and
# it must treat the VMCS the way the SDM asks for a VMCS that starts being used after VMXON
# (section 5, "A new VMCS"). The console cell of section 5 is not the whole recipe.
#
# <details><summary>Hint 1</summary>
#
# Walk back from the goal: VMLAUNCH needs a current VMCS whose launch state is clear; a current
# VMCS needs VMPTRLD in VMX root operation; root operation needs VMXON; VMXON needs CR4.VMXE.
# </details>
#
# <details><summary>Hint 2</summary>
#
# SDM Vol. 3C 25.11.3: between VMXON and the first VMPTRLD of a VMCS comes one more
# instruction. The hidden tests check the order of the instructions in `vm.cpu.history`.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex02_first_exit_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
def lab_machine(source=BOOT_GUEST):
    vm = VirtualMachine(source, mode="real")
    vm.cpu.vmxoff()
    vm.cpu.write_cr4(vm.cpu.cr4 & ~Cr4.VMXE)
    vm.cpu.history.clear()
    return vm


# %% nbgrader={"grade": false, "grade_id": "ex02_first_exit", "locked": false, "schema_version": 3, "solution": true, "task": false}
def first_exit(vm):
    cpu = vm.cpu
    ### BEGIN SOLUTION
    cpu.write_cr4(cpu.cr4 | Cr4.VMXE)
    cpu.vmxon(vm.vmxon_address).check()
    cpu.vmclear(vm.vmcs_address).check()      # SDM 25.11.3: VMCLEAR before the first VMPTRLD
    cpu.vmptrld(vm.vmcs_address).check()
    return cpu.vmlaunch(max_instructions=10_000)
    ### END SOLUTION


# %% nbgrader={"grade": false, "grade_id": "ex02_first_exit_selfcheck", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Self-check (not graded): run your first_exit on a fresh lab machine and list what each
# instruction did, in the order the processor saw them.
try:
    check_vm = lab_machine()
    check_out = first_exit(check_vm)
    for n, o in enumerate(check_vm.cpu.history, 1):
        print(f"{n}. {o}")
    print("entered the guest:", getattr(check_out, "status", None) is Status.VM_EXIT)
except NotImplementedError:
    print("first_exit: not written yet")
except Exception as exc:                     # show the learner's error as a message
    print(f"first_exit raised {type(exc).__name__}: {exc}")


# %% nbgrader={"grade": true, "grade_id": "ex02_first_exit_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from vtlab import Cr4, ExitReason, Status, VirtualMachine, VmcsField as F, VmxOperation


def fresh_machine(source="mov ax, 0x1234\nmov eax, 0\ncpuid\nhlt"):
    """A VM with its VMCS set up but the processor outside VMX operation (CR4.VMXE = 0)."""
    vm = VirtualMachine(source, mode="real")
    vm.cpu.vmxoff()
    vm.cpu.write_cr4(vm.cpu.cr4 & ~Cr4.VMXE)
    vm.cpu.history.clear()
    return vm


vm = fresh_machine()
out = first_exit(vm)
assert out is not None and out.status is Status.VM_EXIT, f"the guest did not run: {out}"
assert vm.cpu.operation is VmxOperation.ROOT, "after a VM exit the processor is in root operation"
assert out.exit.reason is ExitReason.CPUID
assert vm.cpu.vmread(F.VM_EXIT_REASON).value == 10
### BEGIN HIDDEN TESTS
assert vm.cpu.current_vmcs_pointer == vm.vmcs_address
assert vm.vmcs.launch_state.value == "launched"
names = [o.instruction for o in vm.cpu.history]
assert "VMXON" in names and names.index("VMXON") < names.index("VMPTRLD") < names.index("VMLAUNCH"), names
# SDM Vol. 3C 25.11.3: VMCLEAR of the VMCS between VMXON and its first VMPTRLD
assert "VMCLEAR" in names and names.index("VMXON") < names.index("VMCLEAR") < names.index("VMPTRLD"), names
assert all(o.ok for o in vm.cpu.history), [str(o) for o in vm.cpu.history if not o.ok]
vm2 = fresh_machine("mov eax, 0\nmov ebx, 1\nvmcall\nhlt")
out2 = first_exit(vm2)
assert out2.status is Status.VM_EXIT and out2.exit.reason is ExitReason.VMCALL
assert vm2.cpu.vmread(F.VM_EXIT_REASON).value == 18
vm3 = fresh_machine("nop\nhlt")
assert first_exit(vm3).exit.reason is ExitReason.HLT
vm4 = VirtualMachine("mov eax, 0\ncpuid\nhlt", mode="long")   # a long-mode VMCS works the same way
vm4.cpu.vmxoff()
vm4.cpu.write_cr4(vm4.cpu.cr4 & ~Cr4.VMXE)
vm4.cpu.history.clear()
assert first_exit(vm4).exit.reason is ExitReason.CPUID and vm4.cpu.vmread(F.VM_EXIT_REASON).value == 10
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb02_recap", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Recap
#
# * VT-x adds **VMX root** (VMM) and **VMX non-root** (guest) operation as a dimension beside
#   the rings; a guest kernel keeps **CPL 0** in non-root operation, and the hardware returns
#   control to the VMM with a **VM exit** when a configured condition — or an always-exiting
#   instruction such as CPUID or VMCALL — occurs.
# * Detection: **CPUID.1:ECX[5]**. Permission: **IA32_FEATURE_CONTROL** lock bit (0) and
#   "VMXON outside SMX" bit (2), set and locked by the firmware (#GP otherwise; a locked MSR
#   cannot be rewritten before reset).
# * Enabling: **CR4.VMXE** (else #UD), CR0/CR4 within **IA32_VMX_CR0/CR4_FIXED0/1** (else #GP),
#   a 4-KByte aligned **VMXON region** carrying the **revision identifier** from
#   **IA32_VMX_BASIC[30:0]** (else VMfailInvalid), then **VMXON**.
# * Every VMX instruction ends in **VMsucceed** (CF = ZF = 0), **VMfailInvalid** (CF = 1, no
#   current VMCS), **VMfailValid** (ZF = 1, error number in the VM-instruction error field) or
#   a fault; in non-root operation each causes a VM exit instead.
# * A new VMCS gets its revision identifier and a **VMCLEAR** before its first **VMPTRLD**
#   (SDM Vol. 3C 25.11.3). **VMLAUNCH** needs a clear VMCS (else error 4), **VMRESUME** a
#   launched one (else error 5); **VMCALL** is a hypercall (exit 18) in the guest and error 1
#   in the VMM.
# * Host and guest CPUID report one processor: the VMM hides VMX and sets the hypervisor bit,
#   and OSXSAVE follows the CR4 of whoever asks.
# * "Guest instructions" are those the guest completed; an instruction that causes a VM exit
#   is counted as an exit, not as a guest instruction (SDM Vol. 3C 28.1).
# * A VM entry checks, loads guest state, injects events and switches to non-root operation;
#   a VM exit records reason, qualification and instruction length, saves guest state, loads
#   host state and continues at HOST_RIP.
#
# Next: **03 · the VMCS** — what all those fields are, how they are encoded, and which rules
# VM entry checks.

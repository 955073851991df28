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

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb04_intro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# # 04 · VM exits: handlers and what they cost
#
# Notebooks 02 and 03 got a guest running in VMX non-root operation and showed the VMCS that
# controls it. This notebook is about the moment the guest stops running: the **VM exit**.
# Every exit hands the processor back to the VMM, which must work out what happened, do
# something sensible about it and resume the guest — and every exit costs time that the
# guest would not have spent on bare metal.
#
# You will write the exit handlers yourself. The guests are real x86 code executed by
# Unicorn; vtlab plays the processor's VMX logic and calls your Python functions where a
# real VMM's exit handlers would run.
#
# **Learning objectives** — after this notebook you can
#
# * tell the instructions that **always** exit in non-root operation (CPUID, GETSEC, INVD,
#   XSETBV, VMCALL and the VMX instructions) from those that exit only when a VM-execution
#   control, bitmap or mask asks for it (HLT, port I/O, MOV CR, RDMSR/WRMSR, RDTSC, INVLPG,
#   LGDT/LIDT ...), and show both by experiment;
# * read an exit the way a VMM does: the **exit reason**, the **exit qualification**
#   (decoded for I/O and control-register accesses) and the **instruction length**, and
#   advance the guest's RIP — and recognise what happens when a handler forgets;
# * write exit handlers: a CPUID handler that hides VMX and announces a hypervisor, a
#   serial port emulated behind I/O exits, and MSR access split between pass-through and
#   interception with the MSR bitmap;
# * estimate what exits cost — by category, by CPU generation and by exit rate — and cut
#   a workload's exits with I/O bitmaps, MSR bitmaps and exit controls, because **the
#   best exit is no exit** — and then try it all live in the exit dashboard.

# %% nbgrader={"grade": false, "grade_id": "nb04_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import struct

import numpy as np
import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure

import vtlab
import vtlab.widgets as widgets
from vtlab import (EXIT_REASON_INFO, HANDLERS, Cr0, CrAccessQualification, ExitReason,
                   IoDirection, IoQualification, Msr, ProcBased, ProcBased2, Serial16550,
                   VirtualMachine, VmcsField as F, VmState, basic_exit_reason, cost, guests,
                   plots)
from vtlab.arch.cpuid import HOST_CPUID
from vtlab.plots import OKABE_ITO

pd.set_option("display.max_colwidth", 120)

#: Budgets for every workload run in this notebook: a runaway guest ends, it never hangs.
BUDGET = dict(max_exits=20_000, max_instructions=2_000_000)


def host_cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(EAX, EBX, ECX, EDX) that CPUID returns on the host processor vtlab models."""
    return HOST_CPUID.get(leaf, (0, 0, 0, 0))


def run_workload(name, controls=None, setup=None, **run_kwargs):
    """Run one of vtlab's workloads with some VM-execution controls changed."""
    vm = guests.make_vm(name)
    for flag, on in (controls or {}).items():
        vm.set_control(flag, on)
    if setup is not None:
        setup(vm)
    vm.run(**{**BUDGET, **run_kwargs})
    return vm


def counts(vm) -> dict:
    """Exits per reason of a VM's run, as a plain dict."""
    return {str(k): int(v) for k, v in vm.trace.counts().items()}


print("vtlab", vtlab.__version__, "ready;", len(guests.names()), "workloads:", ", ".join(guests.names()))

# %% [markdown]
# ## 1 · Which instructions exit? Unconditional and conditional exits
#
# In VMX non-root operation the processor checks certain instructions and events against
# the VMCS before it carries them out. Two kinds of VM exit come out of that check:
#
# * **Unconditional exits.** A handful of instructions exit *every* time, whatever the VMM
#   wrote into the controls:
#   * **CPUID** — it tells software what the processor can do, so the VMM must be able to
#     decide what the guest is told (hide VMX, announce itself, mask features the VMM cannot
#     support on this host);
#   * **GETSEC** — the entry point of Intel's Safer Mode Extensions (TXT measured launch),
#     far too security-sensitive to hand to a guest;
#   * **INVD** — throws away the contents of the caches *without* writing them back; cache
#     lines belonging to the host or to other guests would be lost;
#   * **XSETBV** — sets XCR0, which decides which register state the processor saves and
#     restores; the VMM has to agree to it;
#   * **VMCALL** — the guest's explicit call into the VMM, a *hypercall*;
#   * the **VMX instructions** themselves (VMXON, VMXOFF, VMCLEAR, VMPTRLD, VMPTRST,
#     VMLAUNCH, VMRESUME, INVEPT, INVVPID; VMREAD/VMWRITE unless VMCS shadowing is on) — a
#     guest may not run VMX on the real processor; the VMM emulates it (nested
#     virtualization) or answers with #UD.
# * **Conditional exits.** Everything else exits only when the VMM asked for it through a
#   VM-execution control, a bitmap or a mask: HLT (*HLT exiting*), IN/OUT/INS/OUTS
#   (*unconditional I/O exiting* or the *I/O bitmaps*), control-register moves, each with its
#   own control (SDM Vol. 3C, 26.1.3): MOV to CR0 or CR4 exits only if it would change a bit the
#   VMM owns in the *CR0/CR4 guest/host mask*, MOV to and from CR3 under *CR3-load* and
#   *CR3-store exiting*, MOV to and from CR8 (64-bit mode only) under *CR8-load* and *CR8-store
#   exiting* — the CR3 controls have no say over CR8 — and **MOV from CR0 or CR4 never exits**:
#   the guest reads the *read shadow* for the bits the VMM owns. Then RDMSR/WRMSR (the *MSR
#   bitmaps*), RDTSC (*RDTSC exiting*), INVLPG and other TLB management (*INVLPG exiting*),
#   LGDT/LIDT/SGDT/SIDT (exit reason 46) **and** LLDT/LTR/SLDT/STR (exit reason 47), all eight
#   under the one *descriptor-table exiting* control, PAUSE, MWAIT, MOV DR, RDPMC, WBINVD ... Events are
#   conditional too: external interrupts and NMIs exit if the pin-based controls say so, and
#   exceptions if their bit is set in the *exception bitmap* (a VMM that wants to see every
#   #UD sets bit 6).
#
# vtlab keeps the SDM's list in `EXIT_REASON_INFO`. The reasons flagged as unconditional
# (SEAMCALL and TDCALL belong to Intel TDX, confidential VMs, beyond this course). The names
# are KVM's short ones: `VMOFF` and `VMON` are the SDM's exit reasons "VMXOFF" and "VMXON".

# %%
always = pd.DataFrame(
    [{"exit reason": f"{r.name} ({int(r)})", "category": i.category, "what happened": i.description}
     for r, i in EXIT_REASON_INFO.items() if i.unconditional]).set_index("exit reason")
always

# %% [markdown]
# Now the experiment. Each probe below is a few guest instructions; the last one is the
# instruction under test. We run every probe twice in 32-bit protected mode at CPL 0: once
# with **every optional exit control off** (no HLT/RDTSC/INVLPG/... exiting, no I/O exiting,
# the MSR bitmap letting MSR 174H through) and once with **all of them on** (plus the VMM
# owning CR0.TS through the CR0 guest/host mask). `vm.next_exit()` runs the guest to its
# first exit and tells us whether it was the instruction under test.

# %%
PROBES = [  # (instruction, guest code ending with it, what decides whether it exits)
    ("CPUID", "xor eax, eax\ncpuid", "nothing: always exits"),
    # GETSEC: set CR4.SMXE first - with SMXE = 0 GETSEC is #UD, which comes before any exit
    ("GETSEC", "mov eax, cr4\nor eax, 0x4000\nmov cr4, eax\nxor eax, eax\ngetsec", "nothing: always exits"),
    ("INVD", "invd", "nothing: always exits"),
    ("XSETBV", "mov eax, cr4\nor eax, 0x40000\nmov cr4, eax\nxor ecx, ecx\nmov eax, 7\nxor edx, edx\nxsetbv",
     "nothing: always exits"),
    ("VMCALL", "xor eax, eax\nvmcall", "nothing: always exits"),
    ("VMXON", "vmxon [0x500]", "nothing: always exits"),
    ("VMPTRLD", "vmptrld [0x500]", "nothing: always exits"),
    ("VMLAUNCH", "vmlaunch", "nothing: always exits"),
    ("HLT", "hlt", "HLT exiting"),
    ("OUT 80H, AL", "mov al, 0x55\nout 0x80, al", "unconditional I/O exiting or the I/O bitmaps"),
    ("IN AL, DX (3FDH)", "mov dx, 0x3FD\nin al, dx", "unconditional I/O exiting or the I/O bitmaps"),
    ("MOV to CR3", "mov eax, 0x1000\nmov cr3, eax", "CR3-load exiting (unless a CR3-target value)"),
    ("MOV from CR3", "mov eax, cr3", "CR3-store exiting"),
    ("MOV to CR0 (set TS)", "mov eax, cr0\nor eax, 8\nmov cr0, eax", "CR0 guest/host mask and read shadow"),
    ("RDMSR 174H", "mov ecx, 0x174\nrdmsr", "use MSR bitmaps + the read bitmap"),
    ("WRMSR 174H", "mov ecx, 0x174\nxor eax, eax\nxor edx, edx\nwrmsr", "use MSR bitmaps + the write bitmap"),
    ("RDTSC", "rdtsc", "RDTSC exiting"),
    ("INVLPG", "invlpg [0x2000]", "INVLPG exiting"),
    ("SGDT", "sgdt [0x600]", "descriptor-table exiting"),
    ("LIDT", "lidt [0x600]", "descriptor-table exiting"),
    ("SLDT", "sldt ax", "descriptor-table exiting (reason 47)"),
    ("STR", "str ax", "descriptor-table exiting (reason 47)"),
    ("LLDT (null selector)", "xor eax, eax\nlldt ax", "descriptor-table exiting (reason 47)"),
    ("PAUSE", "pause", "PAUSE exiting"),
    ("MWAIT", "xor eax, eax\nxor ecx, ecx\nmwait", "MWAIT exiting"),
    ("WBINVD", "wbinvd", "WBINVD exiting"),
    ("MOV from DR7", "mov eax, dr7", "MOV-DR exiting"),
    ("RDPMC", "xor ecx, ecx\nrdpmc", "RDPMC exiting"),
    ("CLI", "cli", "never exits: the guest is at CPL 0"),
    ("PUSHFD / POPFD", "pushfd\npopfd", "never exits"),
    ("MOV from CR0", "mov eax, cr0", "never exits: served from the read shadow"),
    ("MOV from CR4", "mov eax, cr4", "never exits: served from the read shadow"),
]
OPTIONAL_EXITS = [ProcBased.HLT_EXITING, ProcBased.UNCOND_IO_EXITING, ProcBased.CR3_LOAD_EXITING,
                  ProcBased.CR3_STORE_EXITING, ProcBased.RDTSC_EXITING, ProcBased.INVLPG_EXITING,
                  ProcBased.PAUSE_EXITING, ProcBased.MWAIT_EXITING, ProcBased.MOV_DR_EXITING,
                  ProcBased.RDPMC_EXITING, ProcBased2.DESC, ProcBased2.WBINVD_EXITING]


def controls_off(vm):
    for flag in OPTIONAL_EXITS:
        vm.set_control(flag, False)
    vm.set_control(ProcBased.USE_IO_BITMAPS, False)      # no I/O bitmaps, no unconditional I/O exiting
    vm.set_control(ProcBased.USE_MSR_BITMAPS, True)
    vm.set_msr_intercept(Msr.IA32_SYSENTER_CS, read=False, write=False)


def controls_on(vm):
    for flag in OPTIONAL_EXITS:
        vm.set_control(flag, True)
    vm.set_control(ProcBased.USE_IO_BITMAPS, False)
    vm.set_control(ProcBased.USE_MSR_BITMAPS, False)     # no MSR bitmaps: every RDMSR/WRMSR exits
    vm.vmwrite(F.CR0_GUEST_HOST_MASK, vm.vmread(F.CR0_GUEST_HOST_MASK) | Cr0.TS)


def probe(snippet, configure):
    """The VM exit caused by the last instruction of ``snippet``, or None if it ran natively."""
    vm = VirtualMachine(snippet + "\nhlt", mode="protected")
    configure(vm)
    final_hlt = vm.program.instructions[-1].address
    ex = vm.next_exit(max_instructions=100)
    if ex is None or (ex.guest_rip == final_hlt and snippet != "hlt"):
        return None
    return ex


rows = []
for name, snippet, decided_by in PROBES:
    off, on = probe(snippet, controls_off), probe(snippet, controls_on)
    ex = on or off
    rows.append({"instruction": name,
                 "exit reason": f"{ex.reason.name} ({int(ex.reason)})" if ex else "-",
                 "SDM: always exits": EXIT_REASON_INFO[ex.reason].unconditional if ex else False,
                 "controls off": "exit" if off else "runs", "controls on": "exit" if on else "runs",
                 "decided by": decided_by,
                 "length (bytes)": ex.instruction_length if ex else ""})
exit_table = pd.DataFrame(rows).set_index("instruction")


def _shade(value):
    if value == "exit":
        return f"background-color: {OKABE_ITO['vermillion']}33"
    if value == "runs":
        return f"background-color: {OKABE_ITO['sky blue']}33"
    return ""


exit_table.style.map(_shade, subset=["controls off", "controls on"])

# %% [markdown]
# Read the two shaded columns together. The first eight rows exit in *both* runs: nothing the
# VMM writes into the controls can stop them, exactly the set `EXIT_REASON_INFO` flags as
# unconditional. The middle rows exit only when their control is on — the VMM chooses. The
# last four never exit: CLI, PUSHF/POPF and reads of CR0 and CR4 are harmless in a guest that
# owns ring 0 of non-root operation. No control can make MOV from CR0/CR4 exit: for each bit the
# VMM owns (mask bit 1) the guest reads the read shadow, for the others the real register (SDM
# Vol. 3C, 26.3 and 25.6.6). SLDT, STR and LLDT exit with reason 47 (LDTR_TR), under the same
# control as SGDT and LIDT, whose reason is 46 (GDTR_IDTR). The last column is the
# **instruction length** the processor reported with each exit;
# we will need it in section 3. The cell below checks the experiment against the SDM table:

# %%
measured_always = exit_table["controls off"] == "exit"
assert (measured_always == exit_table["SDM: always exits"]).all()
print(f"{measured_always.sum()} instructions always exit, "
      f"{((exit_table['controls on'] == 'exit') & ~measured_always).sum()} exit on request, "
      f"{(exit_table['controls on'] == 'runs').sum()} never exit - the experiment agrees with EXIT_REASON_INFO")
# SDM Vol. 3C, Appendix C: exit reason 46 is LGDT/LIDT/SGDT/SIDT, 47 is LLDT/LTR/SLDT/STR
for name in ("SLDT", "STR", "LLDT (null selector)"):
    assert exit_table.loc[name, "exit reason"] == "LDTR_TR (47)", exit_table.loc[name]
assert exit_table.loc["SGDT", "exit reason"] == "GDTR_IDTR (46)"
assert (exit_table.loc[["MOV from CR0", "MOV from CR4"], "controls on"] == "runs").all()

# %% [markdown]
# CR8, the task-priority register, exists only in 64-bit mode, so its probe needs a long-mode
# guest. MOV to and from CR8 exit under *CR8-load* and *CR8-store exiting* (primary controls
# bits 19 and 20, SDM Vol. 3C, 25.6.2); the CR3 controls, even both on, let it through:

# %%
CR8_CONTROLS = {"none": {}, "CR3-load + CR3-store exiting": {ProcBased.CR3_LOAD_EXITING, ProcBased.CR3_STORE_EXITING},
                "CR8-load + CR8-store exiting": {ProcBased.CR8_LOAD_EXITING, ProcBased.CR8_STORE_EXITING}}
cr8_rows = {}
for snippet in ("mov rax, cr8", "mov eax, 1\nmov cr8, rax"):
    for label, on in CR8_CONTROLS.items():
        cr8_vm = VirtualMachine(snippet + "\nhlt", mode="long")
        for flag in (ProcBased.CR3_LOAD_EXITING, ProcBased.CR3_STORE_EXITING,
                     ProcBased.CR8_LOAD_EXITING, ProcBased.CR8_STORE_EXITING):
            cr8_vm.set_control(flag, flag in on)
        ex = cr8_vm.next_exit(max_instructions=100)
        cr8_rows[(snippet.splitlines()[-1], label)] = f"{ex.reason.name} at {ex.instruction!r}"
cr8_table = pd.Series(cr8_rows, name="first VM exit").to_frame()
# key results (SDM Vol. 3C, 26.1.3): only the CR8 controls make CR8 moves exit (reason 28)
assert cr8_table.loc[("mov rax, cr8", "CR8-load + CR8-store exiting"), "first VM exit"].startswith("CR_ACCESS")
assert cr8_table.loc[("mov cr8, rax", "CR8-load + CR8-store exiting"), "first VM exit"].startswith("CR_ACCESS")
assert cr8_table.loc[("mov cr8, rax", "CR3-load + CR3-store exiting"), "first VM exit"].startswith("HLT")
assert cr8_table.loc[("mov rax, cr8", "CR3-load + CR3-store exiting"), "first VM exit"].startswith("HLT")
cr8_table

# %% [markdown]
# One conditional exit decides a whole workload. `rdtsc-loop` reads the time-stamp counter
# 2,000 times; `cpuid-loop` executes CPUID 2,000 times. Flip *RDTSC exiting* and *HLT exiting*
# and count:

# %%
on_off = []
for name in ("rdtsc-loop", "cpuid-loop"):
    for rdtsc in (False, True):
        for hlt in (True, False):
            vm = run_workload(name, {ProcBased.RDTSC_EXITING: rdtsc, ProcBased.HLT_EXITING: hlt})
            on_off.append({"workload": name, "RDTSC exiting": rdtsc, "HLT exiting": hlt,
                           "exits": len(vm.trace), **counts(vm)})
on_off_table = pd.DataFrame(on_off).fillna(0).set_index(["workload", "RDTSC exiting", "HLT exiting"])
on_off_table = on_off_table.astype(int)
on_off_table

# %% [markdown]
# `rdtsc-loop` costs 2,000 exits or none depending on one bit, plus one for its final HLT if
# HLT exiting is on. `cpuid-loop` pays its 2,000 CPUID exits whatever the controls say.

# %% [markdown]
# ## 2 · Reading an exit: reason, qualification, instruction length
#
# When a VM exit happens the processor fills the VMCS's **exit-information fields** before it
# switches to the VMM:
#
# | field | what it holds |
# |---|---|
# | `VM_EXIT_REASON` | bits 15:0 the **basic exit reason** (10 = CPUID, 30 = I/O ...); bit 31 set if this was really a failed VM entry |
# | `EXIT_QUALIFICATION` | details whose layout depends on the reason: the port and size of an I/O access, the control register and general register of a MOV CR, the address of an INVLPG ... |
# | `VM_EXIT_INSTRUCTION_LEN` | for exits caused by an instruction: its length in bytes |
# | `GUEST_LINEAR_ADDRESS` | for some exits (string I/O, EPT violations ...): the linear address involved |
# | `GUEST_PHYSICAL_ADDRESS` | for EPT violations and misconfigurations: the guest-physical address |
# | `VM_EXIT_INSTRUCTION_INFO` | for instructions with memory operands (LGDT, VMX instructions ...): how the operand is encoded |
#
# A VMM's exit handler starts by reading the reason, masking it to its low 16 bits (so a
# failed entry, reason 33 with bit 31 set, does not masquerade as something else):

# %%
print(basic_exit_reason(0x0000_001E), "|", basic_exit_reason(0x8000_0021),
      "| bit 31:", bool(0x8000_0021 >> 31))

# %% [markdown]
# `IO_CR_GUEST` performs every flavour of port I/O — an immediate port, a port in DX, 1, 2 and 4
# bytes, in and out, string instructions with and without REP — and then touches CR3 and CR0
# with CR3 exiting on and CR0.TS owned by the VMM. Each exit's raw qualification and its
# decoded form (`exit.decoded()`, which vtlab also stores in the trace) sit side by side.
# (The debug port E9H is one byte wide: vtlab's device keeps the low byte of a 2- or 4-byte
# OUT, which is why the 16- and 32-bit writes print just "A" and "B".)

# %%
IO_CR_GUEST = '''
    mov al, 0x42
    out 0x80, al          ; immediate port, 1 byte, OUT
    mov dx, 0x3FD
    in al, dx             ; port in DX, 1 byte, IN
    mov dx, 0xE9
    mov ax, 0x4141
    out dx, ax            ; 2 bytes
    mov eax, 0x0A0D4242
    out dx, eax           ; 4 bytes
    mov esi, text
    mov ecx, 3
    rep outsb             ; string OUT with REP: 3 bytes from DS:ESI
    mov edi, 0x700
    mov ecx, 2
    mov dx, 0x3FD
    insb                  ; string IN without REP
    mov eax, cr3          ; CR3-store exiting
    mov cr3, eax          ; CR3-load exiting
    mov ebx, cr3          ; the general register is part of the qualification
    mov eax, cr0
    or eax, 8
    mov cr0, eax          ; sets TS, a bit the VMM owns through the CR0 guest/host mask
    clts                  ; clears it again
    hlt
text: db "abc"
'''
io_vm = VirtualMachine(IO_CR_GUEST, mode="protected")
io_vm.set_control(ProcBased.CR3_LOAD_EXITING, True)
io_vm.set_control(ProcBased.CR3_STORE_EXITING, True)
io_vm.vmwrite(F.CR0_GUEST_HOST_MASK, io_vm.vmread(F.CR0_GUEST_HOST_MASK) | Cr0.TS)
print(io_vm.run(max_exits=50, max_instructions=1_000), "| debug port printed:", repr(io_vm.output))
decoded_exits = io_vm.trace.to_dataframe()[["reason", "instruction", "qualification", "instruction_length", "decoded"]]
decoded_exits = decoded_exits.assign(qualification=decoded_exits["qualification"].map(lambda q: f"{q:#010x}"))


def describe(d: dict) -> str:
    # one line for a decoded qualification (the dicts vtlab stores in the trace)
    if "port" in d:
        kind = ("REP " if d["rep"] else "") + ("string " if d["string"] else "") + d["direction"]
        where = "immediate" if d["operand"] == "immediate" else "in DX"
        return f"{kind}, {d['size']} byte(s), port {d['port']} ({where})"
    if "cr" in d:
        register = f", register {d['register'].upper()}" if "register" in d else ""
        verb = {"MOV_TO_CR": "MOV to", "MOV_FROM_CR": "MOV from"}.get(d["access_type"])
        return f"{verb} CR{d['cr']}{register}" if verb else f"{d['access_type']} (CR{d['cr']}){register}"
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "-"


decoded_exits.assign(decoded=decoded_exits["decoded"].map(describe))

# %% [markdown]
# The I/O layout (SDM Table 28-5) and the control-register layout (Table 28-3) in one place:
#
# | I/O bits | meaning | | CR-access bits | meaning |
# |---|---|---|---|---|
# | 2:0 | size − 1 (0 = 1 byte, 1 = 2, 3 = 4) | | 3:0 | control register number |
# | 3 | direction: 0 = OUT, 1 = IN | | 5:4 | 0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW |
# | 4 | string instruction (INS/OUTS) | | 6 | LMSW operand: 0 register, 1 memory |
# | 5 | REP prefix | | 11:8 | general register (0 RAX, 1 RCX, 2 RDX, 3 RBX, ...) |
# | 6 | operand encoding: 0 = port in DX, 1 = immediate | | 31:16 | LMSW source data |
# | 31:16 | port number | | | |
#
# Take `mov ebx, cr3`: qualification `0x313` = register 3 (RBX) in bits 11:8, type 1 (MOV
# from CR) in bits 5:4, CR 3 in bits 3:0. And `in al, dx` at 3FDH gives `0x03fd0008`: port
# 3FDH in the top half, bit 3 (IN) set, size code 0. vtlab's classes do the same splitting:

# %%
cr = CrAccessQualification.decode(0x313)
print(f"CrAccessQualification.decode(0x313):  cr={cr.cr}, access type={cr.access_type.name}, "
      f"general register={cr.gpr} (RBX)")
io = IoQualification.decode(0x03FD_0008)
print(f"IoQualification.decode(0x03FD0008):   port={io.port:#x}, size={io.size}, direction={io.direction.name}, "
      f"string={io.string}, rep={io.rep}, immediate={io.immediate}")
back = IoQualification(port=0x3F8, size=1, direction=IoDirection.OUT).encode()
print(f"and back: IoQualification(port=0x3F8, size=1, direction=OUT).encode() = {back:#010x}  (out dx, al to 3F8H)")


# %% [markdown] nbgrader={"grade": false, "grade_id": "ex04_decode_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 1 — decode an I/O exit qualification (2 points)
#
# Write `decode_io(qualification)` using bit operations only (no `IoQualification`). Return a
# dict with the keys
#
# * `"port"` — the port number (int),
# * `"size"` — the access size in bytes: 1, 2 or 4,
# * `"direction"` — `"IN"` or `"OUT"`,
# * `"string"`, `"rep"`, `"immediate"` — booleans (bits 4, 5 and 6).
#
# The tests compare your function with the layout of SDM Table 28-5 (Vol. 3C, 28.2.1), written
# out in the test cell, on thousands of qualifications; an answer that calls
# `IoQualification.decode` (or another vtlab decoder) scores no points.

# %% nbgrader={"grade": false, "grade_id": "ex04_decode", "locked": false, "schema_version": 3, "solution": true, "task": false}
def decode_io(qualification: int) -> dict:
    ### BEGIN SOLUTION
    size_code = qualification & 0b111
    return {
        "port": qualification >> 16 & 0xFFFF,
        "size": {0: 1, 1: 2, 3: 4}[size_code],
        "direction": "IN" if qualification >> 3 & 1 else "OUT",
        "string": bool(qualification >> 4 & 1),
        "rep": bool(qualification >> 5 & 1),
        "immediate": bool(qualification >> 6 & 1),
    }
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex04_decode_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
import vtlab.arch.qualifications as qualifications


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


BY_HAND = "decode_io must decode the bits by hand (SDM Vol. 3C, 28.2.1, Table 28-5)"
used = names_used(decode_io) & {"IoQualification", "qualifications", "decode", "decoded", "as_dict"}
assert not used, f"{BY_HAND}; it uses {sorted(used)}"


def decoded_by_hand(q):
    """decode_io(q), with vtlab's own I/O decoder switched off while it runs."""
    real = qualifications.IoQualification.__dict__["decode"]

    def tripwire(cls, value):
        raise AssertionError(f"{BY_HAND}, not call IoQualification.decode")

    qualifications.IoQualification.decode = classmethod(tripwire)
    try:
        return decode_io(q)
    finally:
        qualifications.IoQualification.decode = real


assert decoded_by_hand(0x0080_0040) == {"port": 0x80, "size": 1, "direction": "OUT", "string": False,
                                        "rep": False, "immediate": True}
assert decoded_by_hand(0x03FD_0008)["direction"] == "IN" and decoded_by_hand(0x03FD_0008)["port"] == 0x3FD
assert decoded_by_hand(0x00E9_0003)["size"] == 4
### BEGIN HIDDEN TESTS
import random

# Table 28-5: bits 2:0 size - 1 (0, 1 or 3), bit 3 direction (1 = IN), bit 4 string,
# bit 5 REP, bit 6 operand encoding (1 = immediate), bits 31:16 port.
TABLE_28_5 = {
    0x0000_0000: (0x0000, 1, "OUT", False, False, False),
    0x0060_0048: (0x0060, 1, "IN", False, False, True),        # IN AL, 60H
    0x0CF8_0003: (0x0CF8, 4, "OUT", False, False, False),      # OUT DX, EAX to CF8H
    0x03F8_0031: (0x03F8, 2, "OUT", True, True, False),        # REP OUTSW
    0x01F0_0019: (0x01F0, 2, "IN", True, False, False),        # INSW
    0x0071_0049: (0x0071, 2, "IN", False, False, True),        # IN AX, 71H
    0xFFFF_0079: (0xFFFF, 2, "IN", True, True, True),
    0xABCD_0023: (0xABCD, 4, "OUT", False, True, False),       # REP (ignored without string)
}
for q, (port, size, direction, string, rep, immediate) in TABLE_28_5.items():
    want = {"port": port, "size": size, "direction": direction, "string": string, "rep": rep,
            "immediate": immediate}
    assert decoded_by_hand(q) == want, (hex(q), decoded_by_hand(q))
rng = random.Random(4)
for _ in range(3000):
    port, code, d, s, r, i = rng.getrandbits(16), rng.choice([0, 1, 3]), *(rng.getrandbits(1) for _ in range(4))
    q = port << 16 | i << 6 | r << 5 | s << 4 | d << 3 | code
    want = {"port": port, "size": code + 1, "direction": ("OUT", "IN")[d], "string": bool(s), "rep": bool(r),
            "immediate": bool(i)}
    assert decoded_by_hand(q) == want, hex(q)
### END HIDDEN TESTS

# %% [markdown]
# ## 3 · Exit handlers, and why RIP must move
#
# A VMM is, at its heart, a loop: enter the guest, wait for an exit, look up the handler for
# the exit reason, run it, enter again. KVM keeps the handlers in a table indexed by exit
# reason (`kvm_vmx_exit_handlers` in `arch/x86/kvm/vmx/vmx.c`); vtlab copies that design in
# `vtlab.HANDLERS`. Part of it:

# %%
handler_table = pd.DataFrame(
    [{"exit reason": f"{r.name} ({int(r)})", "handler": h.__name__,
      "what it does": (h.__doc__ or "").strip().splitlines()[0]}
     for r, h in HANDLERS.items()
     if r.name in ("CPUID", "HLT", "IO_INSTRUCTION", "CR_ACCESS", "MSR_READ", "MSR_WRITE", "VMCALL",
                   "RDTSC", "EPT_VIOLATION", "EXTERNAL_INTERRUPT", "TRIPLE_FAULT", "VMCLEAR",
                   "EXCEPTION_NMI", "INVD")]).set_index("exit reason")
handler_table

# %% [markdown]
# A reason without an entry stops the VM ("no handler for exit reason ..."): a real VMM
# would log it and kill the guest rather than carry on in an unknown state. Three handlers
# show the three ways an exit can end:
#
# * **Emulate and move on** (CPUID, I/O, MSR, HLT, VMCALL, ...). The exit happened *before*
#   the instruction completed, so GUEST_RIP still points **at** it. The handler does the
#   instruction's work and then sets `GUEST_RIP = GUEST_RIP + VM_EXIT_INSTRUCTION_LEN` —
#   `vm.skip_instruction()`, KVM's `kvm_skip_emulated_instruction()`.
# * **Fix the cause and retry** (an EPT violation: the guest touched guest-physical memory the
#   EPT does not map yet). The handler maps the page and leaves RIP alone; the same
#   instruction runs again and now succeeds. A handler that *injects* an exception into the
#   guest (an unknown MSR gets #GP) also leaves RIP at the faulting instruction.
# * **Nothing to do for the guest** (an external interrupt that belonged to the host, a triple
#   fault that ends the VM).
#
# Step one CPUID exit by hand and watch the fields a handler uses:

# %%
vm = VirtualMachine("mov eax, 0\ncpuid\nmov ebx, eax\nhlt", mode="real")
ex = vm.next_exit(max_instructions=100)        # stops at the exit, before any handler runs
rip, length = vm.vmread(F.GUEST_RIP), vm.vmread(F.VM_EXIT_INSTRUCTION_LEN)
print(f"exit: {ex}")
print(f"GUEST_RIP = {rip:#x} ('{vm.guest.instruction_at(rip).text}'), VM_EXIT_INSTRUCTION_LEN = {length}")
print(f"next instruction at {rip + length:#x}: '{vm.guest.instruction_at(rip + length).text}'")

# %% [markdown]
# Now a handler that does the emulation but **forgets** to advance RIP. The guest resumes at
# the same CPUID, which exits again, and again ... Every run in this notebook carries an exit
# budget, so instead of hanging, the run stops and says why:

# %%
vm = VirtualMachine("mov eax, 0\ncpuid\nhlt", mode="real")


@vm.handler(ExitReason.CPUID)
def forgetful_cpuid(vm, exit):
    vm.regs.rax, vm.regs.rbx, vm.regs.rcx, vm.regs.rdx = host_cpuid(vm.regs.eax)
    return True                          # resume the guest ... at the same CPUID


forgetful = vm.run(max_exits=25, max_instructions=10_000)
print(forgetful)
print("distinct guest RIPs of those exits:", sorted({hex(e.guest_rip) for e in vm.trace}))

# %% [markdown]
# Twenty-five exits, all at one address, and the guest never got further. The opposite case —
# a handler that *must not* move RIP — is the EPT violation. Here the VMM removes guest page
# 5000H from the EPT before the guest starts:

# %%
vm = VirtualMachine("mov eax, [0x5000]\nmov ebx, 1\nhlt", mode="protected")
vm.ept_unmap(0x5000, 0x1000)             # the next access to this page is an EPT violation
ept_run = vm.run(max_exits=10, max_instructions=1_000)
print(ept_run)
ept_exits = vm.trace.to_dataframe()[["reason", "guest_rip", "instruction", "instruction_length"]]
ept_exits.assign(guest_rip=ept_exits["guest_rip"].map(hex))

# %% [markdown]
# The EPT violation reports no instruction length (it was not caused by an instruction as
# such); the handler mapped the page and the *same* `mov eax, [0x5000]` ran again, this time
# without an exit.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex04_cpuid_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 2 — a CPUID handler that hides VMX and announces the hypervisor (3 points)
#
# CPUID is the guest's window onto the processor, and because it always exits, the VMM
# decides what the guest sees through it. Two conventions matter:
#
# * **CPUID.1:ECX** — bit 5 is VMX. A VMM that does not offer nested virtualization clears
#   it. Bit 31 is always 0 on real Intel hardware (the SDM lists it as unused); hypervisors
#   by convention set it to say "you are running under a hypervisor" (Linux shows it as the
#   `hypervisor` flag in `/proc/cpuinfo`, notebook 02).
# * **Leaf 0x40000000** — the hypervisor's own leaf: EAX = the highest hypervisor leaf
#   (0x40000001 here) and EBX, ECX, EDX = a 12-byte vendor signature, four ASCII bytes per
#   register, little-endian (KVM says `"KVMKVMKVM\0\0\0"`, Hyper-V `"Microsoft Hv"`). Leaf
#   0x40000001 is hypervisor-specific (KVM lists its paravirtual features there): report
#   none (all four registers 0).
#
# Write `my_cpuid(vm, exit)`. The leaf is in EAX (`vm.regs.eax`). Answer leaf 1 with the host's
# values (`host_cpuid(1)`), VMX cleared and bit 31 set; answer 0x40000000 with the signature
# `SIGNATURE` below and 0x40000001 with zeros; answer every other leaf with `host_cpuid(leaf)`
# unchanged. Write the result to `vm.regs.rax/rbx/rcx/rdx`, advance RIP and return `True`.
# (Do not call `vm.default(exit)`: vtlab's built-in handler announces a different vendor.)
# The tests run `CPUID_GUEST`, which stores what it sees at 0x600.

# %% nbgrader={"grade": false, "grade_id": "ex04_cpuid_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
SIGNATURE = "vtlab-course"            # 12 bytes: EBX = "vtla", ECX = "b-co", EDX = "urse"
CPUID_GUEST = '''
    mov eax, 1
    cpuid
    mov [0x600], eax
    mov [0x604], ebx
    mov [0x608], ecx
    mov [0x60C], edx
    mov eax, 0x40000000
    cpuid
    mov [0x610], eax
    mov [0x614], ebx
    mov [0x618], ecx
    mov [0x61C], edx
    hlt
'''


def run_cpuid_guest(handler, source=CPUID_GUEST):
    vm = VirtualMachine(source, mode="protected")
    vm.handler(ExitReason.CPUID)(handler)
    summary = vm.run(max_exits=50, max_instructions=10_000)
    return vm, summary


# %% nbgrader={"grade": false, "grade_id": "ex04_cpuid", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_cpuid(vm, exit):
    ### BEGIN SOLUTION
    leaf = vm.regs.eax & 0xFFFF_FFFF
    if leaf == 0x4000_0000:
        raw = SIGNATURE.encode("ascii")
        ebx, ecx, edx = struct.unpack("<3I", raw)
        eax = 0x4000_0001
    elif leaf == 0x4000_0001:
        eax = ebx = ecx = edx = 0
    else:
        eax, ebx, ecx, edx = host_cpuid(leaf)
        if leaf == 1:
            ecx = (ecx & ~(1 << 5)) | (1 << 31)
    vm.regs.rax, vm.regs.rbx, vm.regs.rcx, vm.regs.rdx = eax, ebx, ecx, edx
    vm.skip_instruction()
    return True
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex04_cpuid_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
import struct

from vtlab import ExitReason, VirtualMachine, VmState
from vtlab.arch.cpuid import HOST_CPUID

SIGNATURE_TESTED = "vtlab-course"      # what the exercise asks for: EBX, ECX, EDX of leaf 4000_0000H
CPUID_GUEST_TESTED = '''
    mov eax, 1
    cpuid
    mov [0x600], eax
    mov [0x604], ebx
    mov [0x608], ecx
    mov [0x60C], edx
    mov eax, 0x40000000
    cpuid
    mov [0x610], eax
    mov [0x614], ebx
    mov [0x618], ecx
    mov [0x61C], edx
    hlt
'''


def run_cpuid_tested(handler, source=CPUID_GUEST_TESTED):
    vm = VirtualMachine(source, mode="protected")
    vm.handler(ExitReason.CPUID)(handler)
    return vm, vm.run(max_exits=50, max_instructions=10_000)


def exit_counts(vm) -> dict:
    return {str(k): int(v) for k, v in vm.trace.counts().items()}


vm, summary = run_cpuid_tested(my_cpuid)
assert summary.state is VmState.HALTED, summary
leaf1 = struct.unpack("<4I", vm.guest.read(0x600, 16))
assert not leaf1[2] >> 5 & 1, "CPUID.1:ECX[5] (VMX) must be 0"
assert leaf1[2] >> 31 & 1, "CPUID.1:ECX[31] (hypervisor present) must be 1"
hv = vm.guest.read(0x610, 16)
assert struct.unpack("<I", hv[:4])[0] == 0x4000_0001
assert hv[4:16] == SIGNATURE_TESTED.encode(), hv[4:16]
### BEGIN HIDDEN TESTS
host = HOST_CPUID[1]
assert leaf1[0] == host[0] and leaf1[1] == host[1] and leaf1[3] == host[3]
assert leaf1[2] == (host[2] & ~0x20) | 0x8000_0000
assert exit_counts(vm) == {"CPUID": 2, "HLT": 1}, exit_counts(vm)        # each CPUID exited once
other = '''
    xor eax, eax
    cpuid
    mov [0x600], ebx
    mov [0x604], edx
    mov [0x608], ecx
    mov eax, 0x40000001
    mov ebx, 7
    cpuid
    mov [0x610], eax
    mov [0x614], ebx
    mov [0x618], ecx
    mov [0x61C], edx
    mov eax, 0x12345
    cpuid
    mov [0x620], eax
    mov eax, 7
    xor ecx, ecx
    cpuid
    mov [0x624], ebx
    hlt
'''
vm2, summary2 = run_cpuid_tested(my_cpuid, other)
assert summary2.state is VmState.HALTED, summary2
assert vm2.guest.read(0x600, 12) == b"GenuineIntel"
assert vm2.guest.read(0x610, 16) == bytes(16)
assert struct.unpack("<I", vm2.guest.read(0x620, 4))[0] == 0
assert struct.unpack("<I", vm2.guest.read(0x624, 4))[0] == HOST_CPUID.get(7, (0, 0, 0, 0))[1]
assert len(vm2.trace) == 5
### END HIDDEN TESTS

# %% [markdown]
# ## 4 · Devices behind I/O exits
#
# Port I/O is how a PC guest talks to its oldest devices: the serial port, the keyboard
# controller, the PIC and PIT, IDE disk controllers, older network cards, the PCI
# configuration space. The VMM can make every
# IN/OUT exit (*unconditional I/O exiting*) or decide port by port with the two 4-KByte **I/O
# bitmaps** — bitmap A for ports 0000H-7FFFH, B for 8000H-FFFFH; a 1 bit means "exit". After
# an I/O exit the qualification tells the VMM the port, the size, the direction and whether
# it was a string instruction, so it can hand the access to the right **device model**.
#
# vtlab's VMM has a small device bus: a 16550 UART at 3F8H (COM1), the debug port E9H, the
# POST-code port 80H and a `fw_cfg`-like device at 510H that stands for a device model
# living in user space (as QEMU's do under KVM):

# %%
devices = pd.DataFrame([{"device": type(d).__name__, "ports": f"{d.ports().start:#x}-{d.ports().stop - 1:#x}",
                         "emulated in": d.location, "about": (type(d).__doc__ or "").strip().splitlines()[0]}
                        for d in VirtualMachine("hlt").bus.devices]).set_index("device")
devices

# %% [markdown]
# A polling serial driver shows why device emulation through exits is expensive. For each
# character it reads the **line status register** (LSR, 3FDH) until bit 5, *transmit holding
# register empty* (THRE), is set, and then writes the character to the **transmit holding
# register** (THR, 3F8H). Two exits per character at least — and with the I/O bitmap the VMM
# can choose which of the two it needs to see:

# %%
serial = {}
serial["unconditional I/O exiting"] = run_workload("serial-poll")


def trap_thr_only(vm):
    vm.set_control(ProcBased.USE_IO_BITMAPS, True)   # the bitmaps replace unconditional I/O exiting
    vm.set_io_intercept([0x3F8])                     # only the THR still exits


serial["I/O bitmap: only 3F8H exits"] = run_workload("serial-poll", setup=trap_thr_only)
serial_table = pd.DataFrame({k: {"exits": len(v.trace), "I/O exits": counts(v).get("IO_INSTRUCTION", 0),
                                 "state": v.state.value, "first line printed": v.output.splitlines()[0]}
                             for k, v in serial.items()}).T
serial_table

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex04_serial_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# The guest printed the same text both times; the LSR reads that no longer exit went
# straight to the device (vtlab lets the guest reach the device model directly, as if it
# were the real chip). Half the exits are gone.
#
# ### Exercise 3 — emulate the serial port yourself (3 points)
#
# Write `attach_serial(vm)`: it installs an `IO_INSTRUCTION` handler on `vm` and returns a
# `bytearray` that the handler fills with everything the guest sends to the serial port. In
# the handler, decode the qualification (`IoQualification.decode(exit.qualification)` or
# your `decode_io`) and
#
# * for an **OUT to 3F8H** (THR): append the byte in AL (`vm.regs.al`) to the buffer;
# * for an **IN from 3FDH** (LSR): return `0x60` in AL — THRE and TEMT (transmitter empty)
#   set, so the driver may send at once;
# * for anything else: leave it to vtlab's handler, `return vm.default(exit)` (it advances
#   RIP itself).
#
# After handling 3F8H or 3FDH yourself, advance RIP and return `True`. If your LSR answer
# lacks THRE, the guest polls forever — and the exit budget stops it. The tests print with
# `POLL_GUEST`.

# %% nbgrader={"grade": false, "grade_id": "ex04_serial_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
POLL_GUEST = '''
    mov si, message
next_char:
    mov bl, [si]
    test bl, bl
    jz done
    mov dx, 0x3FD          ; LSR
wait_thre:
    in al, dx
    test al, 0x20          ; THRE?
    jz wait_thre
    mov dx, 0x3F8          ; THR
    mov al, bl
    out dx, al
    inc si
    jmp next_char
done:
    hlt
message: db "Hello from the guest!", 13, 10, 0
'''


def run_serial_guest(source=POLL_GUEST, mode="real", max_exits=500):
    vm = VirtualMachine(source, mode=mode)
    received = attach_serial(vm)
    summary = vm.run(max_exits=max_exits, max_instructions=100_000)
    uart = next(d for d in vm.bus.devices if isinstance(d, Serial16550))
    return vm, summary, received, uart


# %% nbgrader={"grade": false, "grade_id": "ex04_serial", "locked": false, "schema_version": 3, "solution": true, "task": false}
def attach_serial(vm):
    received = bytearray()

    @vm.handler(ExitReason.IO_INSTRUCTION)
    def serial_port(vm, exit):
        ### BEGIN SOLUTION
        q = IoQualification.decode(exit.qualification)
        if q.port == 0x3F8 and q.direction is IoDirection.OUT and not q.string:
            received.append(vm.regs.al & 0xFF)
        elif q.port == 0x3FD and q.direction is IoDirection.IN and not q.string:
            vm.regs.al = 0x60
        else:
            return vm.default(exit)
        vm.skip_instruction()
        return True
        ### END SOLUTION

    return received


# %% nbgrader={"grade": true, "grade_id": "ex04_serial_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from vtlab import Serial16550, VirtualMachine, VmState

POLL_GUEST_TESTED = '''
    mov si, message
next_char:
    mov bl, [si]
    test bl, bl
    jz done
    mov dx, 0x3FD          ; LSR
wait_thre:
    in al, dx
    test al, 0x20          ; THRE?
    jz wait_thre
    mov dx, 0x3F8          ; THR
    mov al, bl
    out dx, al
    inc si
    jmp next_char
done:
    hlt
message: db "Hello from the guest!", 13, 10, 0
'''


def run_serial_tested(source=POLL_GUEST_TESTED, mode="real"):
    vm = VirtualMachine(source, mode=mode)
    received = attach_serial(vm)
    summary = vm.run(max_exits=500, max_instructions=100_000)
    uart = next(d for d in vm.bus.devices if isinstance(d, Serial16550))
    return vm, summary, received, uart


def exit_counts(vm) -> dict:
    return {str(k): int(v) for k, v in vm.trace.counts().items()}


vm, summary, received, uart = run_serial_tested()
assert summary.state is VmState.HALTED, summary
assert bytes(received) == b"Hello from the guest!\r\n", bytes(received)
assert uart.output == b"", "the bytes went to vtlab's UART, not through your handler"
### BEGIN HIDDEN TESTS
message = b"Hello from the guest!\r\n"
assert exit_counts(vm) == {"IO_INSTRUCTION": 2 * len(message), "HLT": 1}, exit_counts(vm)
other = '''
    mov al, 0x11
    out 0x80, al           ; POST code: not yours, vtlab's handler takes it
    mov esi, msg
again:
    mov bl, [esi]
    test bl, bl
    jz done
    mov dx, 0x3FD
poll:
    in al, dx
    test al, 0x20
    jz poll
    mov dx, 0x3F8
    mov al, bl
    out dx, al
    inc esi
    jmp again
done:
    mov al, 0x22
    out 0x80, al
    hlt
msg: db "VT-x", 0
'''
vm2, summary2, received2, uart2 = run_serial_tested(other, mode="protected")
assert summary2.state is VmState.HALTED, summary2
assert bytes(received2) == b"VT-x" and uart2.output == b""
post = next(d for d in vm2.bus.devices if type(d).__name__ == "PostCodePort")
assert post.codes == [0x11, 0x22]
### END HIDDEN TESTS

# %% [markdown]
# ## 5 · MSRs and the MSR bitmap
#
# Model-specific registers hold everything from the SYSENTER entry point to the APIC base,
# power management and performance counters. A VMM intercepts MSR accesses when the guest
# must not touch the real register (the APIC base, microcode update, power and thermal
# control affect the whole host), when the MSR is virtualized (the TSC deadline, a virtual
# APIC's registers) or when it wants to hide a feature. Many MSRs, though, are harmless or
# already switched on every VM entry and exit, and the guest may use them directly.
#
# Without *use MSR bitmaps* every RDMSR and WRMSR exits. With it, one 4-KByte page decides,
# MSR by MSR and separately for reads and writes:
#
# | offset | bitmap | MSRs |
# |---|---|---|
# | 0 | read, low | 00000000H-00001FFFH |
# | 1024 | read, high | C0000000H-C0001FFFH |
# | 2048 | write, low | 00000000H-00001FFFH |
# | 3072 | write, high | C0000000H-C0001FFFH |
#
# A 1 bit means exit; MSRs outside both ranges always exit. vtlab's VMM starts with the bitmap
# full of ones (intercept everything) and `vm.set_msr_intercept(msr, read=..., write=...)`
# clears or sets single bits. `msr-loop` reads and writes IA32_SYSENTER_ESP (175H) 1,000 times:

# %%
msr_runs = {
    "no MSR bitmaps": run_workload("msr-loop", {ProcBased.USE_MSR_BITMAPS: False}),
    "bitmap: intercept all (vtlab default)": run_workload("msr-loop"),
    "bitmap: 175H reads pass": run_workload("msr-loop", setup=lambda vm: vm.set_msr_intercept(0x175, read=False)),
    "bitmap: 175H reads and writes pass": run_workload(
        "msr-loop", setup=lambda vm: vm.set_msr_intercept(0x175, read=False, write=False)),
}
msr_table = pd.DataFrame({k: counts(v) for k, v in msr_runs.items()}).T.fillna(0).astype(int)
msr_table

# %% [markdown]
# Letting reads through while writes still exit is a common split: the VMM wants to know
# when the guest *changes* something. But it has a catch. A read that does not exit is
# served by the hardware from the guest's real MSR, which VM entry loads from the VMCS — for
# IA32_SYSENTER_CS/ESP/EIP the guest-state fields `GUEST_SYSENTER_CS/ESP/EIP`. So the write
# handler must put the new value *there* — vtlab's built-in WRMSR handler does that for the
# MSRs that every VM entry loads from the guest-state area (SYSENTER_CS/ESP/EIP), besides keeping its own
# table `vm.msrs`. A guest that writes 8000H to IA32_SYSENTER_ESP (175H) and reads it back:

# %%
WRITE_READ_GUEST = '''
    mov ecx, 0x175         ; IA32_SYSENTER_ESP
    mov eax, 0x8000
    xor edx, edx
    wrmsr                  ; exits: the VMM sees the write
    xor eax, eax
    rdmsr                  ; passes through: the hardware answers
    mov ebx, eax
    hlt
'''
vm = VirtualMachine(WRITE_READ_GUEST, mode="protected")
vm.set_msr_intercept(Msr.IA32_SYSENTER_ESP, read=False, write=True)
vm.run(max_exits=20, max_instructions=1_000)
print("exits:", counts(vm))
print(f"guest wrote 0x8000 and read back {vm.regs.ebx:#x}; vm.msrs[0x175] = {vm.msrs[0x175]:#x}, "
      f"GUEST_SYSENTER_ESP = {vm.vmread(F.GUEST_SYSENTER_ESP):#x}")
assert vm.regs.ebx == 0x8000 and counts(vm) == {"MSR_WRITE": 1, "HLT": 1}, counts(vm)

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex04_msr_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 4 — IA32_SYSENTER_CS: reads pass, writes exit (3 points)
#
# Write `configure_sysenter_cs(vm)`. It must
#
# 1. change the MSR bitmap so that **RDMSR of IA32_SYSENTER_CS (174H) does not exit while
#    WRMSR of it still does** (`vm.set_msr_intercept`); leave every other MSR as it is;
# 2. install an `MSR_WRITE` handler that records every write as a tuple `(msr, value)` in a
#    list (the value is EDX:EAX), makes a write to 174H visible to later pass-through reads
#    (`vm.vmwrite(F.GUEST_SYSENTER_CS, value)` — vtlab's default handler does it too, doing it
#    yourself is harmless) and then lets vtlab's handler finish the job
#    (`return vm.default(exit)`: it stores the value in `vm.msrs` and advances RIP);
# 3. return that list.
#
# The tests run `SYSENTER_GUEST`: 50 rounds of "write a new value, read it back".
#
# <details><summary>Hint 1</summary>
#
# The cell above did step 1 for another MSR. Which MSR number, which guest-state field?
# </details>
#
# <details><summary>Hint 2</summary>
#
# A handler is a function `handler(vm, exit)` registered with `@vm.handler(ExitReason.MSR_WRITE)`
# inside `configure_sysenter_cs`, so that it can append to `writes`. At a WRMSR exit the guest's
# ECX holds the MSR number and EDX:EAX the value (SDM Vol. 2B, WRMSR): `vm.regs.ecx`,
# `vm.regs.edx`, `vm.regs.eax`.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex04_msr_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
SYSENTER_GUEST = '''
    mov edi, 50
again:
    mov ecx, 0x174         ; IA32_SYSENTER_CS
    mov eax, edi
    shl eax, 3             ; a selector: 8 * round
    xor edx, edx
    wrmsr
    xor eax, eax
    rdmsr                  ; does not exit: must see the value just written
    mov ebx, eax           ; the last value read back
    dec edi
    jnz again
    hlt
'''


def run_sysenter_guest(source=SYSENTER_GUEST):
    vm = VirtualMachine(source, mode="protected")
    writes = configure_sysenter_cs(vm)
    summary = vm.run(max_exits=500, max_instructions=100_000)
    return vm, summary, writes


# %% nbgrader={"grade": false, "grade_id": "ex04_msr", "locked": false, "schema_version": 3, "solution": true, "task": false}
def configure_sysenter_cs(vm):
    writes = []
    ### BEGIN SOLUTION
    vm.set_msr_intercept(Msr.IA32_SYSENTER_CS, read=False, write=True)

    @vm.handler(ExitReason.MSR_WRITE)
    def record_wrmsr(vm, exit):
        msr = vm.regs.ecx & 0xFFFF_FFFF
        value = (vm.regs.edx & 0xFFFF_FFFF) << 32 | (vm.regs.eax & 0xFFFF_FFFF)
        writes.append((msr, value))
        if msr == Msr.IA32_SYSENTER_CS:
            vm.vmwrite(F.GUEST_SYSENTER_CS, value)
        return vm.default(exit)
    ### END SOLUTION
    return writes


# %% [markdown]
# Self-check (not graded): which exits do you expect for 50 rounds? Predict, then run.

# %%
try:
    check_vm, check_run, check_writes = run_sysenter_guest()
    print(check_run, "| exits:", counts(check_vm), "| first writes:", check_writes[:3])
except NotImplementedError:
    print("configure_sysenter_cs is not written yet")

# %% nbgrader={"grade": true, "grade_id": "ex04_msr_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from vtlab import ProcBased, VirtualMachine, VmState

SYSENTER_GUEST_TESTED = '''
    mov edi, 50
again:
    mov ecx, 0x174         ; IA32_SYSENTER_CS
    mov eax, edi
    shl eax, 3             ; a selector: 8 * round
    xor edx, edx
    wrmsr
    xor eax, eax
    rdmsr                  ; does not exit: must see the value just written
    mov ebx, eax           ; the last value read back
    dec edi
    jnz again
    hlt
'''


def run_sysenter_tested(source=SYSENTER_GUEST_TESTED):
    vm = VirtualMachine(source, mode="protected")
    writes = configure_sysenter_cs(vm)
    summary = vm.run(max_exits=500, max_instructions=100_000)
    return vm, summary, writes


def exit_counts(vm) -> dict:
    return {str(k): int(v) for k, v in vm.trace.counts().items()}


vm, summary, writes = run_sysenter_tested()
assert summary.state is VmState.HALTED, summary
c = exit_counts(vm)
assert c.get("MSR_READ", 0) == 0, f"RDMSR of 174H still exits: {c}"
assert c.get("MSR_WRITE", 0) == 50, f"every WRMSR must exit: {c}"
assert writes[:2] == [(0x174, 50 * 8), (0x174, 49 * 8)], writes[:2]
assert vm.regs.ebx == 8, f"the guest read back {vm.regs.ebx:#x} after writing 0x8"
### BEGIN HIDDEN TESTS
assert c == {"MSR_WRITE": 50, "HLT": 1}, c
assert writes == [(0x174, 8 * n) for n in range(50, 0, -1)]
assert vm.msrs[0x174] == 8 and vm.control(ProcBased.USE_MSR_BITMAPS)
other = '''
    mov ecx, 0x175         ; IA32_SYSENTER_ESP: still intercepted both ways
    rdmsr
    mov eax, 0x9000
    xor edx, edx
    wrmsr
    mov ecx, 0x174
    mov eax, 0x23
    mov edx, 0
    wrmsr
    rdmsr
    mov ebx, eax
    hlt
'''
vm2, summary2, writes2 = run_sysenter_tested(other)
assert summary2.state is VmState.HALTED, summary2
assert exit_counts(vm2) == {"MSR_READ": 1, "MSR_WRITE": 2, "HLT": 1}, exit_counts(vm2)
assert writes2 == [(0x175, 0x9000), (0x174, 0x23)] and vm2.msrs[0x175] == 0x9000
assert vm2.regs.ebx == 0x23
### END HIDDEN TESTS

# %% [markdown]
# ## 6 · Exit categories and what they typically cost
#
# An exit costs twice. The **transition** — saving the guest state, loading the host state,
# and the same backwards on the next VM entry — is pure hardware work. Introductions to VT-x
# often quote 500 to 2,000 cycles for it. That range describes the parts of 2006-2008 (Core 2
# to Nehalem: about 1,000 down to 500 cycles); the first VT-x Pentium 4 (Prescott, 2,409 cycles
# measured) lies above it, and every part since Westmere (2010) below it. vtlab's profile for a
# current core assumes 300-600 cycles (section 7 draws all of these on one chart). Then the VMM's **handling**: from a table lookup to a round trip
# through a user-space device model. The handling varies more than the transition, so VMM
# developers sort exits by how much work they need:
#
# | category | typical exits | what the VMM does | usual verdict |
# |---|---|---|---|
# | benign | CPUID, HLT, VMCALL, MONITOR/MWAIT, PAUSE | answer from a table, or let the idle vCPU sleep | cheap: microseconds at most |
# | instruction emulation | port I/O to a device inside the VMM, RDMSR/WRMSR, MOV CR | decode the instruction, emulate it, advance RIP | medium: up to tens of microseconds |
# | memory virtualization | EPT violations and misconfigurations, (shadow) page faults | fill in or repair guest-physical mappings | varies with the access pattern |
# | device emulation | I/O or MMIO to a full device model (in user space for QEMU/KVM) | leave the kernel, run the device model, come back | expensive: latencies up to milliseconds |
# | interrupt delivery | external interrupts, NMIs, interrupt windows | hand the interrupt to the host or inject it into the guest | cheap to medium |
# | errors | triple fault, failed VM entry | stop or reset the VM | fatal, not a running cost |
#
# The verdicts are wall-clock orders of magnitude as VMM developers quote them, with
# everything around an exit included. The cost model below counts only the direct cycles of
# an exit — for the categories handled inside the kernel that is well under a microsecond on
# a 3 GHz core — so read both: the model for *relative* costs, the verdicts for how bad
# things can get in a real system.
#
# vtlab's cost model (`vtlab.cost`) attaches a cycle range to each category, with the kind of
# number and where it comes from:

# %%
CATEGORY_EXAMPLES = {"benign": "CPUID, HLT, VMCALL, PAUSE", "instruction": "I/O in the VMM, MSR, CR, RDTSC",
                     "memory": "EPT violation", "userspace-device": "I/O to fw_cfg (510H)",
                     "interrupt": "external interrupt, NMI", "fatal": "triple fault, failed entry"}
handling_table = pd.DataFrame(
    [{"cost category": c, "examples": CATEGORY_EXAMPLES[c], "handling cycles": f"{f.low:,.0f}-{f.high:,.0f}",
      "+ round trip (generic-modern)": f"{cost.PROFILES['generic-modern'].roundtrip.low:,.0f}-"
                                       f"{cost.PROFILES['generic-modern'].roundtrip.high:,.0f}"
                                       if c != "fatal" else "-",
      "kind": f.kind, "source": f.source} for c, f in cost.VMM_HANDLING.items()]).set_index("cost category")
handling_table

# %% [markdown]
# Put the workloads through the model. Each row is one full run under vtlab's default
# controls; *time vs native* is the estimated run time (native + virtualization) as a factor
# of the guest's native time (instructions × 1 cycle): x2 means twice as long. For overheads
# in the tens of thousands of percent a factor is the readable form (`cost.format_factor`):

# %%
# hlt-loop is left out: without a timer to wake it, it stops at its first HLT
workload_vms = {name: run_workload(name) for name in guests.names() if name != "hlt-loop"}
rows = []
for name, wvm in workload_vms.items():
    s = cost.summary(wvm.trace)
    est = cost.estimate(wvm.trace).drop(index=["native", "total"])
    top = est.groupby("cost_category")["total_cycles"].sum().sort_values(ascending=False)
    rows.append({"workload": name, "exits": s["exits"], "guest instructions": s["instructions"],
                 "exits / 1k instructions": round(s["exits_per_1k_instructions"], 2),
                 "time vs native (x)": round(cost.slowdown_factor(s["overhead_pct"]), 1),
                 "time vs native": cost.format_factor(s["overhead_pct"]),
                 "dominant cost category": top.index[0] if len(top) else "-"})
workload_costs = pd.DataFrame(rows).set_index("workload").sort_values("time vs native (x)")
# the format a learner reads: 65,008.3 % overhead is a factor of 1 + 650.083, shown "x651"
assert cost.format_factor(65_008.3) == "x651"
workload_costs

# %% [markdown]
# These are microbenchmarks: a loop that does nothing *but* exit runs hundreds or even
# thousands of times slower than it would natively. `syscall-heavy`, a ring-0 kernel doing
# 4,096 system calls with CLI, STI, PUSHF/POPF and CR0 reads, is the workload binary
# translation struggled with — under VT-x it barely exits. Compare two I/O workloads in detail:

# %%
plots.cycle_breakdown(workload_vms["io-vmm"].trace)

# %% [markdown]
# *Figure: `io-vmm`'s 2,000 port writes handled inside the VMM — look at the shares in the legend: the
# hatched hardware round trip is under a quarter of the exit cost, the VMM's emulation the rest,
# the guest's own work 0%.*

# %%
fig = plots.compare_settings(workload_vms["io-vmm"].trace, workload_vms["io-userspace"].trace,
                             labels=("io-vmm", "io-userspace"))
fig.axes[1].legend(loc="upper left", fontsize="small")     # keep the legend off the tall bar
fig

# %% [markdown]
# *Figure: the two I/O workloads side by side — look at the right panel: a similar number of
# I/O exits (2,000 and 2,500, left), but when each one has to leave the kernel for a device
# model in user space, the VMM's handling (dotted) swamps everything else.*
#
# Per I/O exit, the model charges:

# %%
io_per_exit = {name: cost.estimate(workload_vms[name].trace).loc["IO_INSTRUCTION", "cycles_per_exit"]
               for name in ("io-vmm", "io-userspace")}
for name, cycles in io_per_exit.items():
    print(f"{name:13} {cycles:8,.0f} cycles per I/O exit")
print(f"a user-space device makes each exit {io_per_exit['io-userspace'] / io_per_exit['io-vmm']:.0f}x as expensive")

# %% [markdown]
# This is why exits that happen at a high rate — an I/O exit for every network packet, for
# every update of an emulated display — can cripple a guest, and why real VMMs keep the hot
# devices inside the kernel (vhost) or give the guest the real device (pass-through with
# VT-d).

# %% [markdown]
# ## 7 · Exit cost by CPU generation
#
# The hardware round trip has become much cheaper since VT-x appeared in 2005. On the first
# VT-x Pentium 4s a VM exit plus VM entry took about 2,400 cycles — so slow that VMware's
# binary translator often beat the hardware. Intel cut it with every core generation up to
# Sandy Bridge; after that, vendors stopped publishing a figure, and vtlab's profiles carry a
# range derived from whole-exit measurements instead. Solid bars are published numbers (the
# colour says which kind); the hatched outlines after 2011 are vtlab's assumed 300-600-cycle
# ranges, not measurements. The dotted band is the 500-2,000-cycle rule of thumb of section 6:

# %%
plots.roundtrip_by_generation()

# %% [markdown]
# *Figure: VM exit + VM entry cycles per Intel generation — look for the steep fall from Prescott
# (2,409, measured) to Sandy Bridge (~350, Intel's chart), for the rule-of-thumb band matching
# only Merom to Nehalem, and for the hatched outlines after 2011: no vendor figure, only an
# assumed range.*

# %%
generations = cost.by_generation(trace=workload_vms["cpuid-loop"].trace)
generations = generations.assign(
    **{"round trip (cycles)": [f"{lo:,.0f}" if lo == hi else f"{lo:,.0f}-{hi:,.0f}"
                               for lo, hi in zip(generations["roundtrip_low"], generations["roundtrip_high"])],
       "cpuid-loop time vs native": [cost.format_factor(o) for o in generations["overhead_pct"]]})
generations[["generation", "year", "round trip (cycles)", "kind", "source", "cpuid-loop time vs native"]]

# %% [markdown]
# The `source` keys point into `cost.SOURCES`; the ones behind the round-trip figures:

# %%
used = sorted({k.strip() for s in generations["source"] for k in s.split("+")})
for key in used:
    print(f"{key}:\n    {cost.SOURCES[key]}")

# %% [markdown]
# Two caveats that keep real numbers above these: since 2018 the mitigations for speculative
# execution attacks (an L1 data-cache flush on VM entry, buffer clearing, indirect-branch
# barriers) add hundreds to thousands of cycles to an exit on affected parts; and an exit
# disturbs caches and TLBs in ways the model does not charge. In a nested guest a single
# CPUID costs on the order of 13,000-15,000 cycles because every L2 exit becomes a series of
# exits of the L1 hypervisor.

# %% [markdown]
# ## 8 · Overhead grows with the exit rate
#
# What matters for a guest is not the cost of one exit but how often it exits. The overhead
# is, to first order, *exit rate × cycles per exit*. The lines below are the model for three
# categories; the black markers are our workloads:

# %%
plots.overhead_vs_exit_rate(rates=np.logspace(-3, 3, 37), traces={name: workload_vms[name].trace
                                    for name in ("syscall-heavy", "serial-poll", "cpuid-loop", "io-userspace")})

# %% [markdown]
# *Figure: overhead against exit rate, both on log scales — look where each line crosses the dotted
# "2x slower" line: at about one benign exit per 1,000 instructions, and at a rate some fifteen
# times lower for a user-space device.*
#
# The microbenchmarks sit far to the right, at hundreds of exits per 1,000 instructions;
# `syscall-heavy` sits on the left and pays little.

# %% [markdown]
# ## 9 · Before and after: the same workload under two settings
#
# `plots.compare_settings` puts two runs side by side. Here is `serial-poll` under
# unconditional I/O exiting and with an I/O bitmap that traps only the THR — the setting from
# section 4:

# %%
plots.compare_settings(serial["unconditional I/O exiting"].trace, serial["I/O bitmap: only 3F8H exits"].trace,
                       labels=("all I/O exits", "only 3F8H exits"))

# %% [markdown]
# *Figure: `serial-poll` under two I/O settings — look at the right panel: halving the I/O exits
# halves both exit-related slices, while the guest's native work is too small to see at all.*

# %% [markdown]
# ## 10 · The best exit is no exit
#
# Every exit that does not happen saves the whole round trip *and* the handler. VMM
# developers therefore hunt exits rather than speed them up, and most of the hardware
# features added to VT-x since 2005 exist to remove whole classes of exits:
#
# * **EPT** (extended page tables, Nehalem 2008) — the processor walks the guest's page
#   tables and the VMM's guest-physical map itself, so the guest may load CR3, run INVLPG and
#   write its page tables without exits. Before EPT, *shadow page tables* required trapping
#   all of those.
# * **APIC virtualization** and the **TPR shadow** — the guest reads and writes its local
#   APIC (task priority, end of interrupt) without an exit for each access.
# * **Posted interrupts** — an interrupt for a running vCPU is delivered straight into the
#   guest, instead of an exit, an injection and another entry.
# * **VMCS shadowing** — a guest hypervisor's VMREAD/VMWRITE no longer exit.
# * **I/O and MSR bitmaps**, the **CR0/CR4 guest/host masks** and the **CR3-target values** —
#   exit only on the ports, MSRs and bits the VMM really needs to see.
# * **Device pass-through** (VT-d) and **paravirtual devices** (virtio) — the guest uses a real
#   device, or batches many requests into one notification.
#
# Two measurements. First, `page-table-heavy`, a kernel that remaps a window 1,024 times,
# configured like a shadow-paging VMM (INVLPG and CR3 exiting on) and like an EPT VMM:

# %%
SHADOW_PAGING = {ProcBased.INVLPG_EXITING: True, ProcBased.CR3_LOAD_EXITING: True,
                 ProcBased.CR3_STORE_EXITING: True}
paging = {"shadow-paging controls": run_workload("page-table-heavy", SHADOW_PAGING),
          "EPT (vtlab default)": workload_vms["page-table-heavy"]}
pd.DataFrame({k: {"exits": len(v.trace), **counts(v), "state": v.state.value,
                  "time vs native": cost.format_factor(cost.summary(v.trace)["overhead_pct"])}
              for k, v in paging.items()}).T.fillna(0)

# %% [markdown]
# Second, a "boot" workload with a bit of everything: 300 POST codes to port 80H, 200 rounds of
# RDTSC + RDMSR of IA32_SYSENTER_CS, and a banner printed through the polling serial driver.
# `conservative_vm()` sets it up the way a cautious VMM might: every port exits, RDTSC exits,
# no MSR bitmaps. Not every exit can go — the VMM must see what it emulates, or the guest
# breaks — but which of these does it really need? (A worked example: Exercise 5 then asks the
# same of another guest.)

# %% nbgrader={"grade": false, "grade_id": "ex04_tune_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
BOOT_GUEST = '''
    mov edi, 300
post:
    mov eax, edi
    out 0x80, al           ; firmware-style progress code
    dec edi
    jnz post
    mov edi, 200
clock:
    rdtsc                  ; read the time-stamp counter
    mov ecx, 0x174
    rdmsr                  ; read IA32_SYSENTER_CS
    dec edi
    jnz clock
    mov esi, banner
char:
    mov bl, [esi]
    test bl, bl
    jz done
    mov dx, 0x3FD
wait_thre:
    in al, dx
    test al, 0x20
    jz wait_thre
    mov dx, 0x3F8
    mov al, bl
    out dx, al
    inc esi
    jmp char
done:
    hlt
banner: db "boot ok", 13, 10, 0
'''


def conservative_vm():
    vm = VirtualMachine(BOOT_GUEST, mode="protected")
    vm.set_control(ProcBased.UNCOND_IO_EXITING, True)
    vm.set_control(ProcBased.USE_IO_BITMAPS, False)
    vm.set_control(ProcBased.RDTSC_EXITING, True)
    vm.set_control(ProcBased.USE_MSR_BITMAPS, False)
    return vm


baseline = conservative_vm()
print(baseline.run(max_exits=5_000, max_instructions=100_000), "| printed:", repr(baseline.output))
baseline_overhead = cost.summary(baseline.trace)["overhead_pct"]
baseline_exits = baseline.trace.to_dataframe()
baseline_exits["port"] = [d.get("port", "") for d in baseline_exits["decoded"]]
baseline_exits.groupby(["reason", "instruction", "port"]).size().rename("exits").to_frame()


# %% [markdown]
# Go through the table: each kind of exit has a control, a bitmap or an intercept bit that
# decides it. Here is the worked answer for this guest, a measure at a time — the I/O bitmap
# trapping only the THR, RDTSC exiting off, the MSR bitmap letting reads of 174H through — with
# the model's estimate after each:

# %%
def io_bitmap_thr_only(vm):
    vm.set_control(ProcBased.USE_IO_BITMAPS, True)
    vm.set_io_intercept([0x3F8])


def rdtsc_native(vm):
    vm.set_control(ProcBased.RDTSC_EXITING, False)


def msr_bitmap_174_read(vm):
    vm.set_control(ProcBased.USE_MSR_BITMAPS, True)
    vm.set_msr_intercept(Msr.IA32_SYSENTER_CS, read=False)


STEPS = [("conservative", []), ("+ I/O bitmap: only 3F8H", [io_bitmap_thr_only]),
         ("+ RDTSC exiting off", [io_bitmap_thr_only, rdtsc_native]),
         ("+ MSR bitmap: 174H reads pass", [io_bitmap_thr_only, rdtsc_native, msr_bitmap_174_read])]
best_exit = {}
for label, measures in STEPS:
    bvm = conservative_vm()
    for measure in measures:
        measure(bvm)
    bvm.run(max_exits=5_000, max_instructions=100_000)
    best_exit[label] = bvm
best_exit_table = pd.DataFrame(
    {k: {"exits": len(v.trace), **counts(v), "output": v.output,
         "time vs native (x)": round(cost.slowdown_factor(cost.summary(v.trace)["overhead_pct"]), 1)}
     for k, v in best_exit.items()}).T.fillna(0)
best_exit_table

# %%
fig = Figure(figsize=(8, 3.6), layout="constrained")
ax = fig.subplots()
labels = list(best_exit_table.index)
values = best_exit_table["time vs native (x)"].astype(float).to_numpy()
bars = ax.barh(labels[::-1], values[::-1], color=OKABE_ITO["vermillion"], hatch="//", edgecolor="white")
ax.bar_label(bars, labels=[cost.format_factor((v - 1) * 100) for v in values[::-1]], padding=3)
ax.set_xscale("log")
ax.set_xlabel("estimated run time as a factor of native time (log scale)")
ax.set_ylabel("exit causes removed (cumulative)")
ax.set_title("BOOT_GUEST on generic-modern: removing exit causes")
ax.margins(x=0.25)
fig

# %% [markdown]
# *Figure: the same guest and output after each measure — look at the log scale: every step cuts
# the run time by half or more, down to the exits the VMM really wants (the banner's bytes and
# the final HLT).*
#
# A last lever is HLT itself. With *HLT exiting* off an idle vCPU halts inside the guest and
# its physical core sits idle with it; the VMM cannot use the core for anything else. That is
# worth it only when a vCPU owns its core — KVM offers it for such setups
# (`KVM_CAP_X86_DISABLE_EXITS`) — otherwise the HLT exit is the VMM's chance to schedule
# something useful.

# %% [markdown]
# ### Your turn: another guest
#
# `TELEMETRY_GUEST` spins 250 times on PAUSE + RDMSR of IA32_TIME_STAMP_COUNTER (MSR 10H), sets
# IA32_SYSENTER_EIP (MSR 176H) once with WRMSR, and prints a banner through the polling serial
# driver. `cautious_vm()` runs it the cautious way: every port exits, *PAUSE exiting* is on,
# no MSR bitmaps. Look at the table, and before you write any code, write down which exits
# your VMM can drop — and which it must keep.

# %% nbgrader={"grade": false, "grade_id": "ex04_tune_guest", "locked": true, "schema_version": 3, "solution": false, "task": false}
TELEMETRY_GUEST = '''
    mov edi, 250
spin:
    pause                  ; a spin-wait hint, as in a lock loop
    mov ecx, 0x10
    rdmsr                  ; read IA32_TIME_STAMP_COUNTER (MSR 10H)
    dec edi
    jnz spin
    mov ecx, 0x176
    mov eax, 0x401000
    xor edx, edx
    wrmsr                  ; write IA32_SYSENTER_EIP (MSR 176H), once
    mov esi, banner
char:
    mov bl, [esi]
    test bl, bl
    jz done
    mov dx, 0x3FD
wait_thre:
    in al, dx
    test al, 0x20
    jz wait_thre
    mov dx, 0x3F8
    mov al, bl
    out dx, al
    inc esi
    jmp char
done:
    hlt
banner: db "tele ok", 13, 10, 0
'''


def cautious_vm():
    """TELEMETRY_GUEST with every port, every PAUSE and every MSR access exiting."""
    vm = VirtualMachine(TELEMETRY_GUEST, mode="protected")
    vm.set_control(ProcBased.UNCOND_IO_EXITING, True)
    vm.set_control(ProcBased.USE_IO_BITMAPS, False)
    vm.set_control(ProcBased.PAUSE_EXITING, True)
    vm.set_control(ProcBased.USE_MSR_BITMAPS, False)
    return vm


cautious = cautious_vm()
print(cautious.run(max_exits=5_000, max_instructions=100_000), "| printed:", repr(cautious.output))
cautious_exits = cautious.trace.to_dataframe()
cautious_exits["port"] = [d.get("port", "") for d in cautious_exits["decoded"]]
cautious_exits.groupby(["reason", "instruction", "port"]).size().rename("exits").to_frame()


# %% [markdown] nbgrader={"grade": false, "grade_id": "ex04_tune_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 5 — cut the exits (2 points)
#
# Write `tune(vm)`. It receives a fresh `cautious_vm()` and may change its controls, I/O
# bitmap and MSR bitmap (not the guest) so that the guest's run
#
# * still prints `"tele ok\r\n"` and ends halted,
# * still exits on **every** write to the THR (3F8H) — the VMM's console must see each byte —
# * still exits on the **WRMSR to IA32_SYSENTER_EIP** — the VMM keeps track of where the
#   guest's fast system calls enter its kernel, so the write must reach the VMM and take effect,
# * and makes **at most 12 VM exits** in all.
#
# <details><summary>Hint 1</summary>
#
# Count the exits of `cautious_vm()` by reason in the table above. Three reasons make up almost
# all of them; only two of them are "wanted". Which VM-execution control decides each reason?
# </details>
#
# <details><summary>Hint 2</summary>
#
# PAUSE has a primary processor-based control of its own (SDM Vol. 3C, 25.6.2). An MSR bitmap
# has separate *read* and *write* halves (SDM Vol. 3C, 25.6.9): `vm.set_msr_intercept(msr,
# read=..., write=...)` sets one MSR's bits in either half, and with *use MSR bitmaps* off
# every RDMSR and WRMSR exits. vtlab's VMM starts with every MSR intercepted.
# </details>
#
# <details><summary>Hint 3</summary>
#
# Four changes are enough: PAUSE exiting off; *use I/O bitmaps* on with only 3F8H intercepted;
# *use MSR bitmaps* on; reads of MSR 10H not intercepted (leave its write and MSR 176H alone).
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex04_tune", "locked": false, "schema_version": 3, "solution": true, "task": false}
def tune(vm):
    ### BEGIN SOLUTION
    vm.set_control(ProcBased.USE_IO_BITMAPS, True)
    vm.set_io_intercept([0x3F8])
    vm.set_control(ProcBased.PAUSE_EXITING, False)
    vm.set_control(ProcBased.USE_MSR_BITMAPS, True)
    vm.set_msr_intercept(Msr.IA32_TIME_STAMP_COUNTER, read=False)
    ### END SOLUTION


# %% [markdown]
# Self-check (not graded): run your `tune` and compare the exits per reason with your prediction.

# %%
try:
    checked = cautious_vm()
    tune(checked)
    print(checked.run(max_exits=5_000, max_instructions=100_000), "| printed:", repr(checked.output))
    print("exits per reason:", counts(checked))
except NotImplementedError:
    print("tune is not written yet")


# %% nbgrader={"grade": true, "grade_id": "ex04_tune_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
from vtlab import ProcBased, VirtualMachine, VmcsField as F, VmState, cost

TELEMETRY_TESTED = '''
    mov edi, 250
spin:
    pause
    mov ecx, 0x10
    rdmsr
    dec edi
    jnz spin
    mov ecx, 0x176
    mov eax, 0x401000
    xor edx, edx
    wrmsr
    mov esi, banner
char:
    mov bl, [esi]
    test bl, bl
    jz done
    mov dx, 0x3FD
wait_thre:
    in al, dx
    test al, 0x20
    jz wait_thre
    mov dx, 0x3F8
    mov al, bl
    out dx, al
    inc esi
    jmp char
done:
    hlt
banner: db "tele ok", 13, 10, 0
'''


def cautious_tested():
    """The cautious start, built by the test: every port, PAUSE and every MSR access exit."""
    vm = VirtualMachine(TELEMETRY_TESTED, mode="protected")
    vm.set_control(ProcBased.UNCOND_IO_EXITING, True)
    vm.set_control(ProcBased.USE_IO_BITMAPS, False)
    vm.set_control(ProcBased.PAUSE_EXITING, True)
    vm.set_control(ProcBased.USE_MSR_BITMAPS, False)
    return vm


def exit_counts(vm) -> dict:
    return {str(k): int(v) for k, v in vm.trace.counts().items()}


tuned = cautious_tested()
tune(tuned)
tuned_run = tuned.run(max_exits=5_000, max_instructions=100_000)
assert tuned_run.state is VmState.HALTED, tuned_run
assert tuned.output == "tele ok\r\n", repr(tuned.output)
thr_writes = [e for e in tuned.trace if e.reason == "IO_INSTRUCTION" and e.decoded.get("port") == "0x3f8"]
assert len(thr_writes) == len("tele ok\r\n"), f"{len(thr_writes)} THR writes exited"
assert len(tuned.trace) <= 12, f"{len(tuned.trace)} exits: {exit_counts(tuned)}"
### BEGIN HIDDEN TESTS
# the WRMSR to 176H must exit (basic reason 32, WRMSR; SDM Vol. 3C, Appendix C) and take effect
assert exit_counts(tuned).get("MSR_WRITE") == 1, exit_counts(tuned)
assert tuned.vmread(F.GUEST_SYSENTER_EIP) == 0x401000, hex(tuned.vmread(F.GUEST_SYSENTER_EIP))
assert all(e.decoded.get("direction") == "OUT" for e in thr_writes)
assert "PAUSE_INSTRUCTION" not in exit_counts(tuned) and "MSR_READ" not in exit_counts(tuned)
baseline_tested = cautious_tested()
baseline_tested.run(max_exits=5_000, max_instructions=100_000)
assert len(baseline_tested.trace) > 500, len(baseline_tested.trace)    # 250 PAUSE + 250 RDMSR + I/O
assert cost.summary(tuned.trace)["overhead_pct"] < cost.summary(baseline_tested.trace)["overhead_pct"] / 30
### END HIDDEN TESTS

# %% [markdown]
# ### More features that exist to avoid exits (or their cost)
#
# Intel kept adding VMX features after 2005, and nearly all of them remove exits or make the
# remaining ones cheaper. A VMM never assumes one is there: it reads the capability MSRs (and
# CPUID) at start-up and falls back when a feature is missing. The table below asks vtlab's
# own CPU.
#
# * **Unrestricted guest** (notebook 03): the guest may run in real mode or with paging off,
#   so booting no longer needs the VMM to emulate real-mode code instruction by instruction.
#   It requires EPT.
# * **VPID** (virtual-processor identifiers): without it every VM entry and exit had to flush
#   the TLB, because guest and host translations could not be told apart. With it, each TLB
#   entry carries a 16-bit tag — 0 for the host, one value per vCPU — so translations of the
#   same linear address for the host and two guests can sit in the TLB together, and only
#   the entries with the current tag are used. The VMCS field `VIRTUAL_PROCESSOR_ID` holds the
#   tag; 0 is reserved for the host, which VM entry checks.
# * **VMFUNC** (VM functions): the guest itself may switch to another EPT page-table set
#   (EPTP switching, function 0) from a list the VMM prepared — no exit at all, and from any
#   privilege level, even guest user code. Security
#   monitors use it to give parts of a guest different views of memory, e.g. sub-page
#   isolation inside a hardened kernel.
# * **Nested virtualization**: a guest hypervisor (L1) runs its own guests (L2) on top of the
#   real hypervisor (L0). Every exit of L2 goes to L0 first, which reflects it to L1; L1's
#   handler then runs VMREAD/VMWRITE/VMRESUME, and each of those exits to L0 again — unless
#   *VMCS shadowing* lets them through. One L2 exit can cost dozens of L0 exits. Clouds need
#   it all the same: it is how a tenant runs its own hypervisor (or a VM-based sandbox) on a
#   rented virtual machine.

# %%
caps = VirtualMachine("hlt", mode="real").cpu.caps
features = [
    ("unrestricted guest", ProcBased2.UNRESTRICTED_GUEST),
    ("VPID", ProcBased2.ENABLE_VPID),
    ("EPT", ProcBased2.ENABLE_EPT),
    ("VMFUNC", ProcBased2.ENABLE_VMFUNC),
    ("VMCS shadowing", ProcBased2.SHADOW_VMCS),
    ("APIC-register virtualization", ProcBased2.APIC_REGISTER_VIRT),
]
allowed1 = caps.allowed(ProcBased2).allowed1
pd.DataFrame([(name, flag.name, bool(allowed1 & flag)) for name, flag in features],
             columns=["feature", "secondary control", "vtlab's CPU allows it"])

# %% [markdown]
# A VPID of 0 belongs to the host, so VM entry refuses it whenever "enable VPID" is 1 —
# another control check, another VMfailValid with error 7:

# %%
vm = VirtualMachine("hlt", mode="real")
vm.vmwrite(F.VIRTUAL_PROCESSOR_ID, 0)
print(vm.run(max_exits=5, max_instructions=100).message)
vm = VirtualMachine("hlt", mode="real")
vm.vmwrite(F.VIRTUAL_PROCESSOR_ID, 7)          # any non-zero tag will do
print(vm.run(max_exits=5, max_instructions=100).message)


# %% [markdown]
# How bad nesting gets is simple arithmetic. Suppose L1's handler for one exit executes a
# handful of VMREADs and VMWRITEs and one VMRESUME, and that each of them exits to L0 when
# VMCS shadowing is off:

# %%
def l0_exits_per_l2_exit(vmreads: int, vmwrites: int, shadowing: bool) -> int:
    reflected = 1                       # the L2 exit itself, reflected by L0 to L1
    vmx_instructions = 0 if shadowing else vmreads + vmwrites
    return reflected + vmx_instructions + 1   # ... + L1's VMRESUME, emulated by L0

profile = cost.PROFILES[cost.DEFAULT_PROFILE]
rt = sum(profile.roundtrip_cycles) / 2
nested = pd.DataFrame(
    [(label, l0_exits_per_l2_exit(6, 4, shadow)) for label, shadow in
     (("without VMCS shadowing", False), ("with VMCS shadowing", True))],
    columns=["L1 hypervisor", "L0 exits per L2 exit"])
nested["round trips alone (cycles)"] = (nested["L0 exits per L2 exit"] * rt).round().astype(int)
nested

# %% [markdown]
# Even before counting any handling work, one exit of the nested guest costs a dozen round
# trips without shadowing; measured nested CPUID exits on KVM take over ten thousand cycles.
# Which is why the best exit is still no exit.

# %% [markdown]
# ## 11 · Your turn: the live dashboard
#
# Everything above in one widget. The dashboard runs one of vtlab's workloads under the
# controls you tick, counts its exits and estimates what they would cost on the CPU you pick.
# Choose a workload, tick or untick a control, press **run**. Things to try:
#
# * `cpuid-loop` or `vmcall-loop`: untick everything — the exits stay, they are unconditional;
# * `rdtsc-loop`: tick *RDTSC_EXITING*; `page-table-heavy`: tick *INVLPG_EXITING* and
#   *CR3_LOAD_EXITING*, the world before EPT;
# * `serial-poll`: tick *USE_IO_BITMAPS* — vtlab's I/O bitmaps start empty, so all I/O passes
#   through;
# * `msr-loop`: untick *USE_MSR_BITMAPS* and watch nothing change (vtlab's MSR bitmap
#   intercepts everything anyway); `io-userspace` against `io-vmm`: a similar number of
#   exits, a very different cost;
# * switch the CPU between `prescott` and a modern core and watch the hatched part.

# %%
dashboard = widgets.Dashboard()
dashboard

# %% [markdown]
# The bottom chart of the dashboard splits each exit reason's cycles into the hardware round
# trip (hatched) and the VMM's handling (dotted); the table beside the counts gives the
# overhead on the chosen CPU.

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb04_recap", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Recap
#
# * In VMX non-root operation **CPUID, GETSEC, INVD, XSETBV, VMCALL and the VMX instructions
#   always exit**; HLT, port I/O, MOV to CR0/CR4 (guest/host masks), MOV CR3 (CR3-load/store
#   exiting), MOV CR8 (CR8-load/store exiting), RDMSR/WRMSR, RDTSC, INVLPG, LGDT/LIDT/SGDT/SIDT
#   (reason 46) and LLDT/LTR/SLDT/STR (reason 47, the same descriptor-table exiting control),
#   PAUSE, MWAIT, MOV DR, RDPMC, WBINVD and events such as interrupts and exceptions exit
#   **only when a control, bitmap or mask asks for it**; some instructions (CLI, PUSHF/POPF,
#   MOV from CR0 or CR4, which reads the read shadow) never exit.
# * An exit leaves the **reason** (bits 15:0; bit 31 = failed entry), the **qualification**
#   (I/O: size, direction, string, REP, operand encoding, port; CR access: register number,
#   access type, general register) and the **instruction length** in the VMCS.
# * Handlers that emulate an instruction must **advance GUEST_RIP by the instruction length**;
#   otherwise the guest re-executes it and exits forever. Handlers for faults (EPT violation,
#   injected exceptions) leave RIP alone so that the guest retries.
# * **CPUID** is the VMM's channel to say what the guest may use: clear VMX (ECX[5]), set the
#   hypervisor bit (ECX[31]) and answer the vendor leaf 0x40000000.
# * **Devices** sit behind I/O exits; the **I/O bitmaps** and **MSR bitmaps** choose, port by
#   port and MSR by MSR, what exits. A pass-through MSR read is served from guest state, so
#   the write handler must keep that state right.
# * Exit costs = hardware **round trip** (2,409 cycles on Prescott; the quoted 500-2,000
#   fits 2006-2008 parts; a few hundred today, with no published figure since 2011) +
#   the VMM's **handling**, from benign to user-space device emulation; the overhead is the
#   exit **rate** times that cost.
# * **The best exit is no exit**: bitmaps and masks, turning off exits the VMM does not need,
#   and hardware features — EPT, APIC virtualization, posted interrupts, VMCS shadowing,
#   device pass-through — that remove whole classes of exits.

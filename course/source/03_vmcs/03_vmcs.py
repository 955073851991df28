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

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb03_intro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# # 03 · The Virtual Machine Control Structure (VMCS)
#
# Notebook 02 got the processor into VMX root operation and through a first VM entry and exit.
# Everything those transitions needed to know — which guest state to load, where the VMM
# continues after an exit, which guest operations must exit — came from one data structure:
# the **Virtual Machine Control Structure**. This notebook takes it apart, field by field,
# on vtlab's processor.
#
# **Learning objectives** — after this notebook you can
#
# * name the six areas of a VMCS (guest state, host state, VM-execution, VM-exit and VM-entry
#   controls, VM-exit information) and find any field in them;
# * decode a VMCS field encoding (access type, index, type, width) by hand, and explain why
#   software must use VMREAD/VMWRITE — and what happens with read-only fields, over-wide
#   values and unsupported encodings;
# * compute a legal control value from a capability MSR's allowed-0 and allowed-1 settings,
#   and recognise the error when a VMM gets it wrong;
# * set up a real-mode boot-sector guest at 0x7C00 (unrestricted guest, which needs EPT),
#   break one VM-entry rule at a time — controls, host state or guest state — and read the
#   failure;
# * use VMLAUNCH, VMRESUME and VMCLEAR according to the launch state, including when a VMCS
#   moves to another logical processor.

# %% nbgrader={"grade": false, "grade_id": "nb03_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure

import vtlab
import vtlab.widgets as widgets
from vtlab import (CONTROL_CLASSES, CONTROL_FIELD, Cr0, EntryControl, ExitControl, FieldType,
                   FieldWidth, Msr, PinBased, ProcBased, ProcBased2, Rflags, Status, VirtualMachine,
                   VmcsArea, VmcsField as F, VmState, VmxOperation, control_names,
                   decode_encoding, field_area)
from vtlab import plots
from vtlab.plots import OKABE_ITO

pd.set_option("display.max_colwidth", 120)

BOOT_SECTOR = '''
; a boot sector: the firmware loads it at 0000:7C00 and jumps there in real mode
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7C00
    mov si, msg
    mov dx, 0xE9          ; the emulator debug port
next:
    lodsb
    test al, al
    jz done
    out dx, al            ; an I/O exit per character (unconditional I/O exiting)
    jmp next
done:
    hlt
msg: db "boot ok", 0
'''


def boot_vm():
    """A VM for BOOT_SECTOR, configured by vtlab's VMM and ready for VMLAUNCH."""
    return VirtualMachine(BOOT_SECTOR, mode="real", load=0x7C00)


vm = boot_vm()
print(vm, "| VMCS at", hex(vm.vmcs_address))

# %% [markdown]
# ## 1 · One VMCS per virtual CPU, and why you may not peek
#
# A VMCS describes one **virtual processor**: a VM with four vCPUs has four of them. The
# processor works from it on every VM entry (it loads the guest's state and obeys the
# controls) and on every VM exit (it stores the guest's state and the reason for the exit,
# and loads the VMM's state).
#
# A VMCS lives in a 4-KByte region of memory (the size comes from IA32_VMX_BASIC[44:32]), but
# its layout is **not architectural**. Only two things in the region have a defined meaning:
# bits 30:0 of the first dword are the VMCS **revision identifier** (bit 31 marks a *shadow*
# VMCS), and the second dword is the **VMX-abort indicator**, where the processor records why
# a VM exit could not complete. Everything else is the processor's private format, and a
# processor may keep parts of the active VMCS in internal storage rather than in memory. So
# software reads and writes fields only with **VMREAD** and **VMWRITE**, naming each field by a
# 32-bit *encoding*, never by an offset. (That caching is also why VMCS accesses show up in a
# hypervisor's performance: each VMREAD/VMWRITE is an instruction with a cost, and KVM, for one,
# keeps copies of often-read fields in software.) vtlab behaves like such a processor: while a
# VMCS is *active* its data lives "on the chip", and the region holds only what the last VMCLEAR
# wrote there, in a layout that is vtlab's own (`vtlab.cpu.vmcs.REGION_LAYOUT`). Writing to
# the region of an active VMCS therefore has no effect that VMREAD could see:

# %%
raw = vm.cpu.memory.read(vm.vmcs_address, 32)
print("first 32 bytes of the VMCS region:", raw.hex(" "))
print("revision identifier:", hex(int.from_bytes(raw[0:4], "little") & 0x7FFF_FFFF),
      "| VMX-abort indicator:", int.from_bytes(raw[4:8], "little"))
vm.cpu.memory.write(vm.vmcs_address + 0x100, b"\xff" * 256)   # scribble over the region
print("after scribbling:", vm.cpu.vmread(F.GUEST_RIP))

# %% [markdown]
# The scribble changed nothing that VMREAD sees. With several vCPUs, the VMM switches between
# their VMCSs with **VMPTRLD**, which makes one of them the *current* VMCS — the one VMREAD,
# VMWRITE, VMLAUNCH and VMRESUME act on.
#
# **VMCLEAR comes first.** A new VMCS region is 4 KBytes of memory with the revision identifier
# written into its first dword — nothing more. Before the first VMPTRLD of that region, software
# executes VMCLEAR on it (SDM Vol. 3C, 25.11.3, "Initializing a VMCS"): VMCLEAR puts the
# processor's own, implementation-specific data into the region and sets the launch state to
# *clear*. Without it the processor would treat whatever bytes happen to be in the region as a
# VMCS, and the launch state — which decides whether VMLAUNCH or VMRESUME is allowed — would be
# undefined. vtlab's VMM did exactly that for our VM (VMXON, then VMCLEAR, then VMPTRLD), and the
# cell below does it for a second vCPU's VMCS:

# %%
cpu = vm.cpu
print("what the VMM executed to bring up vm's VMCS:", [o.instruction for o in cpu.history])
second = cpu.alloc_region(cpu.caps.revision_id)   # a VMCS for a second vCPU
for outcome in (cpu.vmclear(second), cpu.vmptrld(second), cpu.vmread(F.GUEST_RIP),
                cpu.vmptrld(vm.vmcs_address), cpu.vmread(F.GUEST_RIP)):
    print(outcome)
# key result (SDM Vol. 3C, 25.11.3): VMCLEAR of a region before its first VMPTRLD
bring_up = [o.instruction for o in boot_vm().cpu.history]
assert bring_up.index("VMCLEAR") < bring_up.index("VMPTRLD"), bring_up
assert cpu.view(second).launch_state.value == "clear"

# %% [markdown]
# ## 2 · The six areas
#
# The SDM sorts the VMCS data into six groups:
#
# | area | holds | who writes it |
# |---|---|---|
# | **guest-state area** | the guest's processor state: loaded on VM entry, saved on VM exit | VMM before the first entry; the processor on every exit |
# | **host-state area** | the VMM's processor state, loaded on every VM exit | VMM (never saved: the VMM's state at entry is simply dropped) |
# | **VM-execution controls** | what the guest may do without a VM exit | VMM |
# | **VM-exit controls** | what a VM exit saves and loads | VMM |
# | **VM-entry controls** | what a VM entry loads, and events to inject | VMM |
# | **VM-exit information** | why the last exit (or VMX instruction) happened; read-only | processor |
#
# `vtlab.VmcsField` lists every field of SDM Appendix B and `vtlab.field_area` sorts it:

# %%
fields = pd.DataFrame([{"field": f.name, "area": field_area(f).value, "width": f.width.name,
                        "read-only": f.read_only} for f in F])
area_order = [a.value for a in VmcsArea]
width_order = ["BIT16", "BIT32", "BIT64", "NATURAL"]
area_counts = (pd.crosstab(fields["area"], fields["width"]).reindex(index=area_order, columns=width_order)
               .fillna(0).astype(int))
area_counts["all widths"] = area_counts.sum(axis=1)
area_counts.loc["all areas"] = area_counts.sum()
area_counts

# %%
fig = Figure(figsize=(9, 3.8), layout="constrained")
ax = fig.subplots()
colours = {"BIT16": OKABE_ITO["sky blue"], "BIT32": OKABE_ITO["blue"],
           "BIT64": OKABE_ITO["orange"], "NATURAL": OKABE_ITO["bluish green"]}
hatches = {"BIT16": "", "BIT32": "//", "BIT64": "..", "NATURAL": "xx"}
left = pd.Series(0, index=area_order)
for width in width_order:
    n = area_counts.loc[area_order, width]
    ax.barh(area_order, n, left=left, color=colours[width], hatch=hatches[width],
            edgecolor="white", label={"NATURAL": "natural width (64 bits here)"}.get(width, width[3:] + "-bit"))
    left += n
for i, total in enumerate(left):
    ax.text(total + 0.8, i, str(int(total)), va="center")
ax.invert_yaxis()
ax.set_xlabel("number of fields")
ax.set_title("VMCS fields per area and width (SDM Appendix B)")
ax.legend(loc="lower right", frameon=False)
ax.margins(x=0.08)
fig


# %% [markdown]
# *Figure: number of VMCS fields in each area, split by field width. Look at how large the
# guest-state area is — it must capture everything a guest kernel can see of its processor —
# and how small the exit and entry controls are.*

# %% [markdown]
# ### The guest-state area
#
# It holds what the processor needs to resume the guest exactly where it was. For our
# boot-sector VM (still before its first VM entry):

# %%
def read(f):
    return vm.vmread(f)


segments = pd.DataFrame({seg: {part: hex(read(F[f"GUEST_{seg}_{part}"]))
                               for part in ("SELECTOR", "BASE", "LIMIT", "AR_BYTES")}
                         for seg in ("CS", "SS", "DS", "ES", "FS", "GS", "LDTR", "TR")}).T
others = pd.DataFrame([
    ("registers", "RIP, RSP, RFLAGS", f"{read(F.GUEST_RIP):#x}, {read(F.GUEST_RSP):#x}, {read(F.GUEST_RFLAGS):#x}"),
    ("control registers", "CR0, CR3, CR4", f"{read(F.GUEST_CR0):#x}, {read(F.GUEST_CR3):#x}, {read(F.GUEST_CR4):#x}"),
    ("debug", "DR7", f"{read(F.GUEST_DR7):#x}"),
    ("descriptor tables", "GDTR base/limit, IDTR base/limit",
     f"{read(F.GUEST_GDTR_BASE):#x}/{read(F.GUEST_GDTR_LIMIT):#x}, {read(F.GUEST_IDTR_BASE):#x}/{read(F.GUEST_IDTR_LIMIT):#x}"),
    ("MSRs", "IA32_SYSENTER_CS/ESP/EIP, IA32_EFER, IA32_PAT",
     f"{read(F.GUEST_SYSENTER_CS):#x}/{read(F.GUEST_SYSENTER_ESP):#x}/{read(F.GUEST_SYSENTER_EIP):#x}, "
     f"{read(F.GUEST_IA32_EFER):#x}, {read(F.GUEST_IA32_PAT):#x}"),
    ("non-register state", "activity state, interruptibility, VMCS link pointer",
     f"{read(F.GUEST_ACTIVITY_STATE)}, {read(F.GUEST_INTERRUPTIBILITY_INFO)}, {read(F.VMCS_LINK_POINTER):#x}"),
], columns=["group", "fields", "value"]).set_index("group")
display(others)
segments

# %% [markdown]
# Each segment register appears with its visible selector *and* its hidden part — base,
# limit and access rights — because the guest may be running with descriptors that no longer
# match any table. Note what is **not** there: RAX, RBX, ... R15. Some introductions list the
# general-purpose registers in the guest-state area, but the SDM's VMCS keeps only RIP, RSP
# and RFLAGS; a VMM saves and restores the other registers itself around every entry and exit
# (KVM keeps them in `vcpu->arch.regs`; vtlab in `vm.regs`):

# %%
gprs = ["RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP"] + [f"R{n}" for n in range(8, 16)]
print("general-purpose registers with a guest-state field:", [r for r in gprs if f"GUEST_{r}" in F.__members__])
print("general-purpose registers without one:            ", [r for r in gprs if f"GUEST_{r}" not in F.__members__])

# %% [markdown]
# ### Host state, controls and exit information
#
# The **host-state area** is what the processor loads on every VM exit: HOST_RIP (the entry
# point of the VMM's exit handler), HOST_RSP (its stack), HOST_CR0/CR3/CR4 (its control
# registers and page tables), segment selectors, FS/GS/TR/GDTR/IDTR bases and a few MSRs.
#
# The **VM-execution controls** decide which guest operations exit. The *pin-based* controls
# cover asynchronous events (external-interrupt exiting, NMI exiting); the *primary
# processor-based* controls cover instructions (HLT, MWAIT, RDPMC, RDTSC, CR3 loads and stores,
# I/O, MSR bitmaps ...) and switch on the *secondary* controls (virtualized APIC accesses, EPT,
# unrestricted guest, VPID ...). Next to them are the exception bitmap (one bit per exception
# vector), the I/O bitmaps A (ports 0000-7FFFH) and B (8000-FFFFH) and the MSR bitmap. A VMM
# chooses them by what it must see and what it can afford: every exit costs time, but some —
# I/O to an emulated device, for example — are needed for correctness.
#
# vtlab's VMM configures its VMs much like a typical KVM guest:

# %%
controls = pd.DataFrame([{"control field": CONTROL_FIELD[cls].name, "value": f"{vm.vmcs.get(CONTROL_FIELD[cls]):#010x}",
                          "named bits that are set": ", ".join(control_names(cls, vm.vmcs.get(CONTROL_FIELD[cls])))}
                         for cls in CONTROL_CLASSES]).set_index("control field")
vm.vmwrite(F.EXCEPTION_BITMAP, 1 << 6)       # also ask for an exit on #UD (vector 6)
controls.loc["EXCEPTION_BITMAP"] = [f"{vm.vmread(F.EXCEPTION_BITMAP):#010x}", "vector 6 (#UD)"]
for f in (F.IO_BITMAP_A, F.IO_BITMAP_B, F.MSR_BITMAP, F.HOST_RIP, F.HOST_RSP, F.HOST_CR3):
    controls.loc[f.name] = [f"{vm.vmread(f):#x}", field_area(f).value]
controls

# %% [markdown]
# The **VM-exit information** fields (exit reason, exit qualification, exit instruction
# length, guest linear and guest physical address, VM-instruction error, ...) are written by
# the processor and are read-only for software.
#
# ### Explore it
#
# `VmcsExplorer` shows every field of the current VMCS by area (tick off "only non-zero
# fields" to see them all) and lets you VMREAD and VMWRITE any encoding, with the real
# outcome. Try `0x681E`, then `0x4402` with VMWRITE, then `0x1234`.

# %%
explorer = widgets.VmcsExplorer(vm)
explorer

# %%
explorer.encoding.value = "0x681E"
explorer.vmread()
print(explorer.decoded.value)
print(explorer.result.value)

# %% [markdown]
# ## 3 · Field encodings
#
# A field's 32-bit encoding is not an address; it is a small descriptor of the field:
#
# | bits | meaning |
# |---|---|
# | 0 | access type: 0 = *full*, 1 = *high* (bits 63:32 of a 64-bit field) |
# | 9:1 | index (numbers the fields of one type and width) |
# | 11:10 | type: 0 control, 1 VM-exit information (read-only), 2 guest state, 3 host state |
# | 12 | reserved, must be 0 |
# | 14:13 | width: 0 16-bit, 1 64-bit, 2 32-bit, 3 natural width (64 bits on a 64-bit CPU) |
# | 31:15 | reserved, must be 0 |
#
# `vtlab.decode_encoding` splits an encoding live:

# %%
examples = [F.GUEST_ES_SELECTOR, F.PIN_BASED_VM_EXEC_CONTROL, F.VM_EXIT_REASON, F.TSC_OFFSET,
            int(F.TSC_OFFSET) + 1, F.GUEST_RIP, F.HOST_CR3]
rows = []
for e in examples:
    d = decode_encoding(int(e))
    e = int(e)
    rows.append({"field": (d.field.name + ("_HIGH" if d.access_type.value else "")),
                 "encoding": f"{e:#06x}",
                 # the 15 low bits as text, cut at the field boundaries (Exercise 1 does it with numbers)
                 "bits 14:13 | 12 | 11:10 | 9:1 | 0": " | ".join(
                     f"{e:015b}"[i:j] for i, j in ((0, 2), (2, 3), (3, 5), (5, 14), (14, 15))),
                 "width": d.width.name, "type": d.type.name, "index": d.index, "access": d.access_type.name})
encodings = pd.DataFrame(rows).set_index("field")
encodings


# %% [markdown]
# Reading the binary column from left to right gives width, the reserved bit, type, index and
# access type: GUEST_RIP = 0x681E is natural-width (11), guest state (10), index 15, full.
# The *high* access type exists only for 64-bit fields, so that 32-bit software can reach their
# upper half: TSC_OFFSET + 1 = 0x2011 reads bits 63:32 of TSC_OFFSET.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex03_decode_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 1 — decode an encoding by hand (3 points)
#
# Write `decode(encoding)` using only bit operations (no vtlab decoder). Return a dict with
#
# * `"access"`: `"full"` or `"high"`,
# * `"index"`: an int,
# * `"type"`: `"control"`, `"exit information"`, `"guest state"` or `"host state"`,
# * `"width"`: `16`, `64`, `32` or `"natural"`,
#
# and raise `ValueError` if a reserved bit (12, or any of 31:15) is set. The tests compare your
# function with encodings listed in SDM Appendix B and with the layout of SDM 25.11.2 on
# thousands of encodings; an answer that uses `decode_encoding` or `VmcsField` scores no points.

# %% nbgrader={"grade": false, "grade_id": "ex03_decode", "locked": false, "schema_version": 3, "solution": true, "task": false}
def decode(encoding: int) -> dict:
    ### BEGIN SOLUTION
    if encoding >> 15 or encoding >> 12 & 1:
        raise ValueError(f"reserved bits set in {encoding:#x}")
    return {
        "access": "high" if encoding & 1 else "full",
        "index": encoding >> 1 & 0x1FF,
        "type": ["control", "exit information", "guest state", "host state"][encoding >> 10 & 3],
        "width": [16, 64, 32, "natural"][encoding >> 13 & 3],
    }
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex03_decode_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
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


# The exercise is done by hand, from the bits of the encoding (SDM Vol. 3C, 25.11.2):
used = names_used(decode) & {"decode_encoding", "FieldEncoding", "field_area", "VmcsField", "F", "vmcs_fields"}
assert not used, f"decode must work out the fields by hand from the encoding's bits; it uses {sorted(used)}"
assert decode(0x681E) == {"access": "full", "index": 15, "type": "guest state", "width": "natural"}
assert decode(0x4402)["type"] == "exit information"
assert decode(0x2011)["access"] == "high"
try:
    decode(0x1000)              # bit 12 is reserved
except ValueError:
    pass
else:
    raise AssertionError("decode(0x1000) must raise ValueError: bit 12 is reserved")
### BEGIN HIDDEN TESTS
# SDM Vol. 3C, Appendix B: encodings and what they name, as the tables list them.
APPENDIX_B = {
    0x0000: ("full", 0, "control", 16),             # virtual-processor identifier
    0x0800: ("full", 0, "guest state", 16),         # guest ES selector
    0x0C00: ("full", 0, "host state", 16),          # host ES selector
    0x2000: ("full", 0, "control", 64),             # address of I/O bitmap A
    0x2001: ("high", 0, "control", 64),
    0x201A: ("full", 13, "control", 64),            # EPT pointer
    0x2400: ("full", 0, "exit information", 64),    # guest-physical address
    0x2800: ("full", 0, "guest state", 64),         # VMCS link pointer
    0x2803: ("high", 1, "guest state", 64),         # guest IA32_DEBUGCTL, high
    0x2C00: ("full", 0, "host state", 64),          # host IA32_PAT
    0x4000: ("full", 0, "control", 32),             # pin-based VM-execution controls
    0x4002: ("full", 1, "control", 32),             # primary processor-based controls
    0x4400: ("full", 0, "exit information", 32),    # VM-instruction error
    0x4402: ("full", 1, "exit information", 32),    # exit reason
    0x4826: ("full", 19, "guest state", 32),        # guest activity state
    0x4C00: ("full", 0, "host state", 32),          # host IA32_SYSENTER_CS
    0x6000: ("full", 0, "control", "natural"),      # CR0 guest/host mask
    0x6400: ("full", 0, "exit information", "natural"),   # exit qualification
    0x6800: ("full", 0, "guest state", "natural"),  # guest CR0
    0x681E: ("full", 15, "guest state", "natural"), # guest RIP
    0x6C16: ("full", 11, "host state", "natural"),  # host RIP
}
for e, (access, index, kind, width) in APPENDIX_B.items():
    got = decode(e)
    assert got == {"access": access, "index": index, "type": kind, "width": width}, (hex(e), got)
# and every other encoding with bits 15 and 12 clear, against the layout of 25.11.2:
# bit 0 access type, bits 9:1 index, bits 11:10 type, bits 14:13 width
for e in range(0, 0x8000, 7):
    if e >> 12 & 1:
        continue
    want = {"access": ("full", "high")[e & 1], "index": e >> 1 & 0x1FF,
            "type": ("control", "exit information", "guest state", "host state")[e >> 10 & 3],
            "width": (16, 64, 32, "natural")[e >> 13 & 3]}
    assert decode(e) == want, (hex(e), decode(e))
for bad in (0x1000, 0x1234, 0x8000, 0x1_0000_681E):
    try:
        decode(bad)
    except ValueError:
        pass
    else:
        raise AssertionError(f"{bad:#x} has reserved bits set")
### END HIDDEN TESTS

# %% [markdown]
# ### VMREAD and VMWRITE: the rules
#
# Every access goes through the current VMCS and ends in one of the outcomes from notebook 02.
# The table below tries the interesting cases on our VM:
#
# * VM-exit information fields are **read-only**: VMWRITE fails with error 13 (unless
#   IA32_VMX_MISC bit 29 says the processor allows it — vtlab's does not);
# * VMWRITE of a value wider than the field silently keeps the low bits (the field's width
#   wins); VMREAD of a narrow field returns it zero-extended;
# * an encoding that names no field this processor supports — a free index, a reserved bit,
#   the high half of a field that is not 64 bits wide — is an **unsupported VMCS component**:
#   error 12.

# %%
cpu = vm.cpu
trials = [
    ("VMWRITE GUEST_ES_SELECTOR (16-bit) = 0x12345", lambda: cpu.vmwrite(F.GUEST_ES_SELECTOR, 0x12345), F.GUEST_ES_SELECTOR),
    ("VMWRITE TSC_OFFSET (64-bit) = 0x1122334455667788", lambda: cpu.vmwrite(F.TSC_OFFSET, 0x1122334455667788), F.TSC_OFFSET),
    ("VMREAD 0x2011 (TSC_OFFSET, high)", lambda: cpu.vmread(0x2011), None),
    ("VMWRITE 0x2011 (TSC_OFFSET, high) = 0xAABBCCDD", lambda: cpu.vmwrite(0x2011, 0xAABBCCDD), F.TSC_OFFSET),
    ("VMWRITE VM_EXIT_REASON = 5", lambda: cpu.vmwrite(F.VM_EXIT_REASON, 5), None),
    ("VMREAD 0x0830 (16-bit guest field, index 24)", lambda: cpu.vmread(0x0830), None),
    ("VMREAD 0x681F (GUEST_RIP, high)", lambda: cpu.vmread(0x681F), None),
    ("VMREAD 0x1234 (bit 12 set)", lambda: cpu.vmread(0x1234), None),
]
rows = []
for what, fn, readback in trials:
    out = fn()
    rows.append({"attempt": what, "outcome": out.status.value,
                 "error": int(out.error) if out.error is not None else "",
                 "value / read back": (f"{out.value:#x}" if out.value is not None
                                       else f"{cpu.vmread(readback).value:#x}" if readback and out.ok else "")})
cpu.vmwrite(F.GUEST_ES_SELECTOR, 0)
cpu.vmwrite(F.TSC_OFFSET, 0)
vmread_vmwrite_rules = pd.DataFrame(rows).set_index("attempt")
vmread_vmwrite_rules

# %% [markdown]
# ## 4 · Capability MSRs: which controls may be set
#
# Not every processor implements every control, and some control bits are reserved with a
# fixed value. A VMM never guesses: it reads a **capability MSR** per control field and obeys
# both halves of it:
#
# * bits 31:0, the **allowed-0 settings**: a bit that is **1** here *must be 1* in the control;
# * bits 63:32, the **allowed-1 settings**: a bit that is **0** here *must be 0* in the control.
#
# A bit that is 0 in the low half and 1 in the high half is free to choose. If IA32_VMX_BASIC
# bit 55 is 1, the "TRUE" MSRs (0x48D-0x490) replace the original ones for pin-based,
# primary processor-based, exit and entry controls; they may allow a few more bits to be 0.
# Capabilities differ between processor generations, models and even microcode versions, so
# a robust hypervisor checks them at start-up and falls back when a feature is missing. The
# primary processor-based controls of vtlab's processor:

# %%
cpu = vm.cpu
true_msr = cpu.rdmsr(Msr.IA32_VMX_TRUE_PROCBASED_CTLS)
old_msr = cpu.rdmsr(Msr.IA32_VMX_PROCBASED_CTLS)
print(f"IA32_VMX_TRUE_PROCBASED_CTLS = {true_msr:#018x}: allowed-0 {true_msr & 0xFFFF_FFFF:#010x}, "
      f"allowed-1 {true_msr >> 32:#010x}")


def verdict(msr, bit):
    must1, may1 = msr >> bit & 1, msr >> (32 + bit) & 1
    return "fixed to 1" if must1 else ("free" if may1 else "fixed to 0")


current = vm.vmcs.get(F.CPU_BASED_VM_EXEC_CONTROL)
primary = pd.DataFrame([{"bit": flag.bit_length() - 1, "control": flag.name,
                         "allowed-0 bit": true_msr >> (flag.bit_length() - 1) & 1,
                         "allowed-1 bit": true_msr >> (32 + flag.bit_length() - 1) & 1,
                         "TRUE MSR": verdict(true_msr, flag.bit_length() - 1),
                         "original MSR": verdict(old_msr, flag.bit_length() - 1),
                         "set in our VM": int(bool(current & flag))} for flag in ProcBased]).set_index("bit")
primary

# %% [markdown]
# Two examples to remember: **CR3_LOAD_EXITING** (bit 15) is *fixed to 1* in the original MSR —
# the first VT-x processors, which had no EPT, always exited on MOV to CR3, and the original MSR
# still reports that default for old VMMs — while the TRUE MSR reveals that this processor lets
# a VMM (one using EPT, typically) clear it. **TPR_SHADOW** (bit 21) is *fixed to 0*: vtlab's processor
# does not implement it. Here is the same information for all five control fields as a map:

# %%
rows = [("pin-based (TRUE)", cpu.caps.allowed(PinBased)),
        ("primary proc-based (TRUE)", cpu.caps.allowed(ProcBased)),
        ("primary proc-based (original)", cpu.caps.allowed(ProcBased, true=False)),
        ("secondary proc-based", cpu.caps.allowed(ProcBased2)),
        ("VM-exit (TRUE)", cpu.caps.allowed(ExitControl)),
        ("VM-entry (TRUE)", cpu.caps.allowed(EntryControl))]
grid = [[2 if s.allowed0 >> b & 1 else (1 if s.allowed1 >> b & 1 else 0) for b in range(32)] for _, s in rows]
# Colour, hatching and a mark per cell (1, 0 or blank), so the map reads in greyscale too.
fig = plots.category_grid(grid, [name for name, _ in rows], range(32),
                          levels=[("fixed to 0 (allowed-1 bit = 0)", OKABE_ITO["vermillion"], "xx", "0"),
                                  ("free to choose", OKABE_ITO["bluish green"], "", ""),
                                  ("fixed to 1 (allowed-0 bit = 1)", OKABE_ITO["blue"], "//", "1")],
                          title="Control bits per capability MSR on vtlab's processor",
                          xlabel="bit position in the 32-bit control field")
fig

# %% [markdown]
# *Figure: each cell is one control bit — blue (hatched, "1") must be 1, vermillion (cross-hatched,
# "0") must be 0, green (plain) may be chosen. Look for the blue "default1" bits that every VMM must keep set, for bits 15-16 of
# the primary controls turning from fixed to free between the original and the TRUE MSR, and
# for how few secondary controls this processor offers.*
#
# The usual VMM idiom applies both halves at once — force in the must-be-1 bits, mask off the
# must-be-0 bits: `value = (desired | allowed0) & allowed1`. vtlab calls it `caps.adjust`:

# %%
caps = cpu.caps
desired = ProcBased.HLT_EXITING | ProcBased.TPR_SHADOW | ProcBased.RDTSC_EXITING
adjusted = caps.adjust(ProcBased, desired)
print(f"desired  {int(desired):#010x}: {control_names(ProcBased, desired)}")
print(f"adjusted {int(adjusted):#010x}: {control_names(ProcBased, adjusted)} + reserved bits "
      f"{int(adjusted) & ~sum(ProcBased) :#x}")
must1, must0 = caps.allowed(ProcBased).violations(int(desired))
print(f"the raw desired value breaks: must-be-1 bits {must1:#x}, must-be-0 bits {must0:#x}")

# %% [markdown]
# `ControlsPanel` shows every control bit of a VM as a toggle; the bits the capability MSRs fix
# are greyed out, with the reason written under each one; its VMLAUNCH button tries the VM
# as it stands and shows the first exit, the VMfailValid error or the VM-entry failure:

# %%
widgets.ControlsPanel(boot_vm())

# %% [markdown]
# What if a VMM ignores the capability MSRs? VM entry checks every control against them, and a
# bad control makes VMLAUNCH fail with **VMfailValid, error 7** ("VM entry with invalid control
# field(s)"). The guest never runs and the VMM continues with the next instruction. Both
# directions count: setting a must-be-0 control (TPR shadow) and clearing a must-be-1 one (the
# reserved bit 1):

# %%
bad = boot_vm()
bad.set_control(ProcBased.TPR_SHADOW, True)      # fixed to 0 on this processor
summary = bad.run(max_exits=10, max_instructions=10_000)
forbidden_outcome = bad.last_outcome
print(summary)
print("VM-instruction error field:", bad.vmread(F.VM_INSTRUCTION_ERROR))

missing = boot_vm()                              # clear bit 1, which is fixed to 1
missing.vmwrite(F.CPU_BASED_VM_EXEC_CONTROL, missing.vmread(F.CPU_BASED_VM_EXEC_CONTROL) & ~0x2)
missing.run(max_exits=10, max_instructions=10_000)
missing_outcome = missing.last_outcome
print(missing_outcome)


# %% [markdown] nbgrader={"grade": false, "grade_id": "ex03_allowed_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 2 — a legal guest CR0 or CR4 from the fixed-bit MSRs (3 points)
#
# The control fields have one capability MSR each, with the two halves in one 64-bit value.
# CR0 and CR4 are constrained in VMX operation too, but by **two** MSRs each, with the same idea
# in another shape (SDM Vol. 3C, Appendix A.7 and A.8): IA32_VMX_CR0_FIXED0 (486H) and
# IA32_VMX_CR0_FIXED1 (487H), IA32_VMX_CR4_FIXED0 (488H) and IA32_VMX_CR4_FIXED1 (489H).
# A bit that is **1 in FIXED0** is fixed to 1; a bit that is **0 in FIXED1** is fixed to 0.
# The VM-entry checks on the guest's CR0 (SDM 27.3.1.1) add two twists:
#
# * if "unrestricted guest" is 1, CR0.PE (bit 0) and CR0.PG (bit 31) are **not** checked
#   against FIXED0 — that is what lets a real-mode guest run;
# * CR0.PG = 1 requires CR0.PE = 1.
#
# Write `legal_guest_cr(register, fixed0, fixed1, desired, unrestricted=False)`. `register` is
# `"cr0"` or `"cr4"`; `fixed0` and `fixed1` are the raw 64-bit MSR values. Return the value
# closest to `desired` that passes the checks: every fixed-to-1 bit set, every fixed-to-0 bit
# clear, all other bits as in `desired` (for CR0 with `unrestricted=True`, PE and PG as in
# `desired`). Raise `ValueError` for any other `register`, and for a CR0 that would have PG = 1
# with PE = 0, with a message that names the rule. Work from the numbers alone: the tests give
# you MSR values of other processors, and an answer that calls vtlab's capability helpers or
# entry checks scores no points.
#
# <details><summary>Hint 1</summary>
#
# Start from the idiom of this section, `(desired | allowed0) & allowed1`. Which MSR plays the
# role of `allowed0`, which one `allowed1`?
# </details>
#
# <details><summary>Hint 2</summary>
#
# With "unrestricted guest", FIXED0's bits 0 and 31 do not apply to CR0: clear them from FIXED0
# before you use it (`fixed0 & ~(1 << 0 | 1 << 31)`). The PG/PE rule is checked on the result.
# </details>
#
# <details><summary>Hint 3</summary>
#
# Try vtlab's processor by hand: FIXED0 = 0x80000021, FIXED1 = 0xFFFFFFFF. The reset value
# 0x60000010 becomes 0xE0000031 for a restricted guest and 0x60000030 for an unrestricted one.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex03_allowed", "locked": false, "schema_version": 3, "solution": true, "task": false}
def legal_guest_cr(register: str, fixed0: int, fixed1: int, desired: int, unrestricted: bool = False) -> int:
    ### BEGIN SOLUTION
    if register not in ("cr0", "cr4"):
        raise ValueError(f"register must be 'cr0' or 'cr4', not {register!r}")
    must_be_1 = fixed0
    if register == "cr0" and unrestricted:
        must_be_1 &= ~(1 << 0 | 1 << 31)      # PE and PG are not checked (SDM 27.3.1.1)
    value = (int(desired) | must_be_1) & fixed1
    if register == "cr0" and value >> 31 & 1 and not value & 1:
        raise ValueError("CR0.PG = 1 requires CR0.PE = 1 (SDM 27.3.1.1)")
    return value
    ### END SOLUTION


# %% [markdown]
# Self-check (not graded): the reset CR0 on vtlab's processor, for an unrestricted real-mode guest.

# %%
try:
    check_vm = boot_vm()
    fixed = (check_vm.cpu.rdmsr(Msr.IA32_VMX_CR0_FIXED0), check_vm.cpu.rdmsr(Msr.IA32_VMX_CR0_FIXED1))
    cr0 = legal_guest_cr("cr0", *fixed, 0x60000010, unrestricted=True)
    check_vm.vmwrite(F.GUEST_CR0, cr0)
    print(f"GUEST_CR0 = {cr0:#x}; VM-entry checks:", [str(v) for v in check_vm.cpu.entry_violations()] or "all pass")
    print(check_vm.run(max_exits=50, max_instructions=10_000), "| output:", repr(check_vm.output))
except NotImplementedError:
    print("legal_guest_cr is not written yet")

# %% nbgrader={"grade": true, "grade_id": "ex03_allowed_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
import random

from vtlab import Msr, VirtualMachine, VmcsField as F, VmState


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


def raises_value_error(*args, **kwargs) -> bool:
    try:
        legal_guest_cr(*args, **kwargs)
    except ValueError:
        return True
    return False


# By hand, from the MSR values (SDM Vol. 3C, Appendix A.7/A.8): vtlab's helpers would do it for
# you (cr_fixed_violations, caps.adjust), and the entry checks would let you search for a value.
used = names_used(legal_guest_cr) & {"adjust", "allowed", "caps", "capabilities", "cr_fixed_violations",
                                     "entry_violations", "cr0_fixed0", "cr0_fixed1", "cr4_fixed0", "cr4_fixed1"}
assert not used, f"legal_guest_cr must work from fixed0/fixed1 by hand; it uses {sorted(used)}"
# vtlab's processor: CR0 FIXED0 = 80000021H (PG, NE, PE), FIXED1 = FFFFFFFFH
assert legal_guest_cr("cr0", 0x8000_0021, 0xFFFF_FFFF, 0x6000_0010) == 0xE000_0031
assert legal_guest_cr("cr0", 0x8000_0021, 0xFFFF_FFFF, 0x6000_0010, unrestricted=True) == 0x6000_0030
assert legal_guest_cr("cr4", 0x2000, 0x0037_6FFF, 0) == 0x2000               # CR4.VMXE (bit 13) fixed to 1
assert raises_value_error("cr3", 0, 0xFFFF_FFFF, 0), "only cr0 and cr4 have fixed-bit MSRs"
### BEGIN HIDDEN TESTS
# CR4 bits that FIXED1 does not allow are cleared: bit 12 (LA57) is 0 in 376FFFH
assert legal_guest_cr("cr4", 0x2000, 0x0037_6FFF, 0x1000) == 0x2000
assert legal_guest_cr("cr4", 0x2000, 0x0037_6FFF, 0xFFFF_FFFF) == 0x0037_6FFF
assert legal_guest_cr("cr4", 0x2000, 0x0037_6FFF, 0x20, unrestricted=True) == 0x2020   # no exception for CR4
# another processor's MSRs: FIXED1 = 0x1FFFFFFF would forbid CD, NW and PG
assert legal_guest_cr("cr0", 0x21, 0x1FFF_FFFF, 0xE000_0000) == 0x21
# unrestricted: PE and PG come from desired, NE stays forced
assert legal_guest_cr("cr0", 0x8000_0021, 0xFFFF_FFFF, 0x1, unrestricted=True) == 0x21
assert legal_guest_cr("cr0", 0x8000_0021, 0xFFFF_FFFF, 0x8000_0001, unrestricted=True) == 0x8000_0021
# PG = 1 with PE = 0 (SDM 27.3.1.1)
assert raises_value_error("cr0", 0x8000_0021, 0xFFFF_FFFF, 0x8000_0000, unrestricted=True)
assert raises_value_error("cr0", 0x8000_0000, 0xFFFF_FFFF, 0, unrestricted=False)
assert not raises_value_error("cr0", 0x8000_0021, 0xFFFF_FFFF, 0x8000_0000)       # PE forced to 1
assert raises_value_error("CR0", 0x21, 0xFFFF_FFFF, 0)
rng = random.Random(16)
for _ in range(300):
    f0, f1, want, unr = rng.getrandbits(32), rng.getrandbits(32) | rng.getrandbits(32), rng.getrandbits(32), rng.random() < 0.5
    f0 &= f1                                   # a processor never fixes a bit to both 0 and 1
    value = (want | f0) & f1
    assert legal_guest_cr("cr4", f0, f1, want, unr) == value, ("cr4", hex(f0), hex(f1), hex(want))
    f0_cr0 = f0 & ~0x8000_0001 if unr else f0
    value = (want | f0_cr0) & f1
    if value >> 31 & 1 and not value & 1:
        assert raises_value_error("cr0", f0, f1, want, unrestricted=unr), (hex(f0), hex(f1), hex(want), unr)
    else:
        assert legal_guest_cr("cr0", f0, f1, want, unrestricted=unr) == value, (hex(f0), hex(f1), hex(want), unr)
# and the result boots the boot sector as an unrestricted real-mode guest
boot_sector = '''
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7C00
    mov si, msg
    mov dx, 0xE9
next:
    lodsb
    test al, al
    jz done
    out dx, al
    jmp next
done:
    hlt
msg: db "boot ok", 0
'''
probe = VirtualMachine(boot_sector, mode="real", load=0x7C00)
msr0, msr1 = probe.cpu.rdmsr(Msr.IA32_VMX_CR0_FIXED0), probe.cpu.rdmsr(Msr.IA32_VMX_CR0_FIXED1)
probe.vmwrite(F.GUEST_CR0, legal_guest_cr("cr0", msr0, msr1, 0x6000_0010, unrestricted=True))
assert probe.vmread(F.GUEST_CR0) == 0x6000_0030
assert probe.run(max_exits=50, max_instructions=10_000).state is VmState.HALTED and probe.output == "boot ok"
### END HIDDEN TESTS

# %% [markdown]
# ## 5 · VM-entry checks: a boot sector at 0x7C00
#
# A PC's firmware starts an operating system by loading its first sector to 0000:7C00 and
# jumping there **in real mode**: CR0.PE = 0, no paging. Early VT-x processors could not run
# such code in non-root operation at all, because VMX required CR0.PE and CR0.PG to be 1 (see
# IA32_VMX_CR0_FIXED0 in notebook 02); VMMs emulated real mode or ran it in virtual-8086
# mode. The **unrestricted guest** control lifts that requirement, so guests can run in real
# mode, protected mode without paging, or long mode on their own — which is what firmware,
# boot loaders and early kernel code need. It relies on **EPT**: with guest paging off, only
# the extended page tables stand between the guest's addresses and host memory, so
# "unrestricted guest" may only be 1 if "enable EPT" is 1.
#
# Our `BOOT_SECTOR` prints "boot ok" through port 0xE9. vtlab's VMM put it into the VMCS like
# this — GUEST_RIP is 0x7C00, RFLAGS has only its always-one bit 1 set, and CR0 is the real-mode
# value plus the NE bit that VMX insists on (the CR0 read shadow shows the guest the value it
# expects):

# %%
vm = boot_vm()
guest_setup = pd.Series({f.name: f"{vm.vmread(f):#x}" for f in
                         (F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_CR0, F.CR0_READ_SHADOW,
                          F.GUEST_CS_SELECTOR, F.GUEST_CS_BASE, F.GUEST_CS_AR_BYTES)}, name="value")
guest_setup["secondary controls"] = ", ".join(control_names(ProcBased2, vm.vmread(F.SECONDARY_VM_EXEC_CONTROL)))
display(guest_setup.to_frame())
print(vm.run(max_exits=50, max_instructions=10_000), "| guest output:", repr(vm.output))

# %% [markdown]
# The CR0 value matters. A processor fresh out of reset has CR0 = 0x60000010 — caches disabled
# (CD, NW), protection and paging off, ET set. Hand that value to VM entry unchanged and it is
# refused: even an unrestricted guest must keep CR0.NE = 1, as IA32_VMX_CR0_FIXED0 demands.
# (Simplified VMCS examples sometimes write exactly 0x60000010 into GUEST_CR0; the SDM's checks
# say otherwise, as the cell below shows.) A VMM
# therefore ORs the FIXED0 bits into GUEST_CR0 and lets the guest read its own idea of CR0
# through the CR0 read shadow:

# %%
reset_cr0 = boot_vm()
reset_cr0.vmwrite(F.GUEST_CR0, 0x60000010)
print(reset_cr0.run(max_exits=5, max_instructions=1_000))

# %% [markdown]
# Now switch EPT off but leave unrestricted guest on. The combination is illegal, and it is a
# *control* problem, so VMLAUNCH fails with VMfailValid, error 7. Switch unrestricted guest off
# instead and the controls are fine — but now the guest state is not: a real-mode CR0 breaks
# IA32_VMX_CR0_FIXED0.

# %%
no_ept = boot_vm()
no_ept.set_control(ProcBased2.ENABLE_EPT, False)
print("EPT off:               ", no_ept.run(max_exits=5, max_instructions=1_000))
no_ug = boot_vm()
no_ug.set_control(ProcBased2.UNRESTRICTED_GUEST, False)
print("unrestricted guest off:", no_ug.run(max_exits=5, max_instructions=1_000))

# %% [markdown]
# That second failure looks different. VM entry checks in three stages, and the stage decides
# how a failure is reported:
#
# 1. **VMX controls** → VMfailValid, error **7**;
# 2. **host-state area** → VMfailValid, error **8**;
# 3. **guest-state area** → the entry fails *after* the processor has committed to it, so it
#    is reported like a VM exit: the exit-reason field gets basic reason **33** ("VM entry
#    failure: invalid guest state") with **bit 31** set — **0x80000021** — the exit
#    qualification may say more, the host state is loaded and the VMM continues at HOST_RIP.
#    The guest has not executed a single instruction.
#
# Break one rule at a time and read what the processor says:

# %%
BREAKERS = {
    "RFLAGS bit 1 = 0": lambda vm: vm.vmwrite(F.GUEST_RFLAGS, vm.vmread(F.GUEST_RFLAGS) & ~int(Rflags.FIXED)),
    "CR0.PG = 1 while CR0.PE = 0": lambda vm: vm.vmwrite(F.GUEST_CR0, vm.vmread(F.GUEST_CR0) | Cr0.PG),
    "CR0.NE = 0 (IA32_VMX_CR0_FIXED0)": lambda vm: vm.vmwrite(F.GUEST_CR0, vm.vmread(F.GUEST_CR0) & ~Cr0.NE),
    "unrestricted guest off (real-mode CR0)": lambda vm: vm.set_control(ProcBased2.UNRESTRICTED_GUEST, False),
    "CS access rights: accessed bit clear": lambda vm: vm.vmwrite(F.GUEST_CS_AR_BYTES, vm.vmread(F.GUEST_CS_AR_BYTES) & ~0x1),
    "SS access rights: not present": lambda vm: vm.vmwrite(F.GUEST_SS_AR_BYTES, vm.vmread(F.GUEST_SS_AR_BYTES) & ~0x80),
    "VMCS link pointer = 0": lambda vm: vm.vmwrite(F.VMCS_LINK_POINTER, 0),
    "EPT off, unrestricted guest on": lambda vm: vm.set_control(ProcBased2.ENABLE_EPT, False),
    "TPR shadow on (fixed to 0)": lambda vm: vm.set_control(ProcBased.TPR_SHADOW, True),
    "HOST_CS_SELECTOR = 0": lambda vm: vm.vmwrite(F.HOST_CS_SELECTOR, 0),
    "HOST_CR0.NE = 0": lambda vm: vm.vmwrite(F.HOST_CR0, vm.vmread(F.HOST_CR0) & ~Cr0.NE),
}


def broken_boot_vm(*rules):
    """A fresh boot-sector VM with the named rules of BREAKERS broken."""
    vm = boot_vm()
    for rule in rules:
        BREAKERS[rule](vm)
    return vm


rows = []
for rule in BREAKERS:
    vm = broken_boot_vm(rule)
    vm.run(max_exits=5, max_instructions=1_000)
    out = vm.last_outcome
    failure = vm.cpu.entry_violations()[0]
    reason = vm.vmread(F.VM_EXIT_REASON)
    rows.append({"rule broken": rule, "stage": failure.group,
                 "outcome": out.status.value,
                 "VM-instruction error": vm.vmread(F.VM_INSTRUCTION_ERROR) if out.status is Status.VMFAIL_VALID else "",
                 "exit reason": f"{reason:#010x}" if out.status is Status.ENTRY_FAILED else "",
                 "qualification": vm.vmread(F.EXIT_QUALIFICATION) if out.status is Status.ENTRY_FAILED else "",
                 "guest instructions run": vm.guest.counter.total,
                 "what the check says": failure.message})
entry_checks = pd.DataFrame(rows).set_index("rule broken")
entry_checks

# %% [markdown]
# Reading an entry failure is a matter of splitting the exit-reason field: bits 15:0 are the
# basic reason, bit 31 says "this was a failed VM entry". A VMM's exit handler must look at bit
# 31 before it dispatches on the basic reason:

# %%
failed = broken_boot_vm("VMCS link pointer = 0")
failed.run(max_exits=5, max_instructions=1_000)
field = failed.vmread(F.VM_EXIT_REASON)
print(f"exit reason field {field:#010x}: basic reason {field & 0xFFFF} "
      f"({vtlab.ExitReason(field & 0xFFFF).name}), VM-entry failure bit {field >> 31}, "
      f"qualification {failed.vmread(F.EXIT_QUALIFICATION)} (4 = invalid VMCS link pointer)")
print("processor:", failed.cpu.operation.value, "| VM:", failed.state.value)

# %% [markdown]
# The **VMCS link pointer** rule, exactly as SDM Vol. 3C, 27.3.1.5 states it: the checks apply
# only if the field is *not* FFFFFFFF_FFFFFFFFH — that value means "no linked VMCS" and is what
# a VMM writes when it does not use VMCS shadowing. Otherwise
#
# * bits 11:0 must be 0 (it names a 4-KByte region),
# * it must not set any bit beyond the processor's physical-address width,
# * bits 30:0 of the first 4 bytes of the region it names must be the VMCS revision identifier
#   (IA32_VMX_BASIC[30:0]), and
# * bit 31 of those bytes (the shadow-VMCS indicator) must be 1 if the "VMCS shadowing"
#   VM-execution control is 1, and 0 if it is 0.
#
# So 0 is not rejected for being 0: it is aligned and in range, but the 4 bytes at physical
# address 0 do not hold the revision identifier. Every link-pointer failure is a guest-state
# failure with exit qualification 4 (SDM 27.8). The cell tries one value per rule:

# %%
link_vm = boot_vm()
link_cpu = link_vm.cpu
linked = link_cpu.alloc_region(link_cpu.caps.revision_id)        # a region with the right revision id
shadow = link_cpu.alloc_region(link_cpu.caps.revision_id)
link_cpu.memory.write_u32(shadow, link_cpu.caps.revision_id | 1 << 31)   # marked as a shadow VMCS
LINK_TRIALS = {"FFFFFFFF_FFFFFFFFH (no linked VMCS)": 0xFFFF_FFFF_FFFF_FFFF, "0": 0,
               "1_0000_0800H (bits 11:0 not 0)": 0x1_0000_0800,
               "1 << 40 (beyond the physical-address width)": 1 << 40,
               "a region with the revision identifier": linked,
               "the same, shadow-VMCS indicator 1": shadow}
link_rows = {}
for label, value in LINK_TRIALS.items():
    link_vm.vmwrite(F.VMCS_LINK_POINTER, value)
    broken = [v for v in link_cpu.entry_violations() if v.rule.startswith("vmcs_link_pointer")]
    link_rows[label] = {"value": f"{value:#x}", "rule broken": broken[0].rule if broken else "-",
                        "qualification": broken[0].qualification if broken else "",
                        "what the check says": broken[0].message if broken else "passes"}
link_table = pd.DataFrame(link_rows).T
# key results (SDM Vol. 3C, 27.3.1.5; qualification 4 from 27.8); "VMCS shadowing" is 0 here
assert link_table.loc["FFFFFFFF_FFFFFFFFH (no linked VMCS)", "rule broken"] == "-"
assert link_table.loc["a region with the revision identifier", "rule broken"] == "-"
assert link_table.loc["0", "rule broken"] == "vmcs_link_pointer_revision"
assert link_table.loc["1_0000_0800H (bits 11:0 not 0)", "rule broken"] == "vmcs_link_pointer_alignment"
assert link_table.loc["1 << 40 (beyond the physical-address width)", "rule broken"] == "vmcs_link_pointer_width"
assert link_table.loc["the same, shadow-VMCS indicator 1", "rule broken"] == "vmcs_link_pointer_shadow_indicator"
assert set(link_table["qualification"]) - {""} == {4}
link_table

# %% [markdown]
# (vtlab's registry holds one more link-pointer record, `vmcs_link_pointer_not_current`;
# `EntryRuleExplorer` below shows its statement.)
#
# A real processor stops at the first broken rule. vtlab also keeps the full list, which is
# handy when several things are wrong at once — `vm.cpu.entry_violations()` shows every rule the
# current VMCS breaks, in the order the processor checks them:

# %%
several = broken_boot_vm("RFLAGS bit 1 = 0", "SS access rights: not present", "HOST_CS_SELECTOR = 0",
                         "EPT off, unrestricted guest on")
for violation in several.cpu.entry_violations():
    print(violation)

# %% [markdown]
# ### Every rule of SDM 27.2-27.3, one at a time
#
# The eleven rules of `BREAKERS` are a handful of the conditions SDM Vol. 3C chapter 27 states.
# vtlab keeps all of them in a **registry** (`vtlab.cpu.entry`), one record per condition, the
# way KVM names each of its checks: a stable id, the **group** (controls, host state or guest
# state — which decides how a failure is reported), the **SDM section** that states it, and a
# *break recipe* — the VMWRITEs that break that rule in a fresh, valid `VirtualMachine` started
# in the guest mode the recipe needs. (The event-injection checks of SDM 27.2.1.3 belong to the
# controls group: the VM-entry interruption-information field is a VM-entry control.)
#
# The cell below breaks one rule of each kind with its own recipe, each in a fresh VM, and
# VMLAUNCHes: compare the outcome column with the three reporting rules above.

# %%
from vtlab.cpu.entry import get_rule, rules
from vtlab.lab.widgets_entry import EntryRuleExplorer

print(len(rules()), "rules in the registry:", pd.Series([r.group for r in rules()]).value_counts().to_dict())
SAMPLES = ["ept_pointer_memory_type",                # controls: the EPTP's memory type (SDM 27.2.1.1)
           "event_injection_nmi_vector",             # controls: event injection (SDM 27.2.1.3)
           "host_ia32_pat_valid",                    # host state (SDM 27.2.2)
           "guest_interruptibility_sti_and_mov_ss",  # guest state, non-register state (SDM 27.3.1.5)
           "guest_pdptes_valid"]                     # guest state, PAE paging: a paged-mode guest
rows = []
for sample in map(get_rule, SAMPLES):
    probe = VirtualMachine("hlt", mode=sample.mode)  # fresh and valid, in the mode the recipe needs
    sample.breaks(probe)                            # the rule's own recipe
    probe.run(max_exits=5, max_instructions=1_000)
    out = probe.last_outcome
    failed = out.status is Status.ENTRY_FAILED
    rows.append({"rule": sample.id, "group": sample.group, "SDM": sample.section, "guest mode": sample.mode,
                 "outcome": out.status.value,
                 "VM-instruction error": probe.vmread(F.VM_INSTRUCTION_ERROR) if out.status is Status.VMFAIL_VALID else "",
                 "exit reason": f"{probe.vmread(F.VM_EXIT_REASON):#010x}" if failed else "",
                 "qualification": probe.vmread(F.EXIT_QUALIFICATION) if failed else "",
                 "what the check says": out.violations[0].message})
registry_sample = pd.DataFrame(rows).set_index("rule")
registry_sample

# %% [markdown]
# The controls rules end in VMfailValid with error 7 and the host-state rule with error 8;
# both guest-state rules are VM-entry failures with exit reason 0x80000021 (basic reason 33),
# and the qualification tells them apart: 0 for most rules, 2 when the PDPTEs could not be
# loaded (SDM 27.8). No guest instruction ran in any of them.
#
# `EntryRuleExplorer` lets you try any rule of the registry: pick a group and a rule (listed
# with its SDM section), press **Break it and VMLAUNCH** and read the outcome in the SDM's
# terms, what the checks say and the rule's statement. Each press starts a fresh VM, so
# nothing here touches `broken_boot_vm`. The guest mode is the recipe's own unless you pick
# another; a recipe written for another mode may then not break its rule, and the explorer
# says so. (`EntryRuleExplorer?` shows how to drive it from code.)

# %%
entry_explorer = EntryRuleExplorer()
entry_explorer

# %%
entry_explorer.select("guest_ia32_pat_valid")
explored = entry_explorer.break_and_launch()
print(explored.describe())


# %% [markdown] nbgrader={"grade": false, "grade_id": "ex03_repair_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 3 — repair a broken VMCS (4 points)
#
# Write `repair(vm)` that takes a boot-sector VM with **any combination** of the rules in
# `BREAKERS` broken (the hidden tests use other combinations than the visible ones) and fixes
# its VMCS so that `vm.run()` boots it: the guest prints "boot ok" and halts. Use only
# `vm.vmread`, `vm.vmwrite`, `vm.set_control` and `vm.control`; `vm.cpu.entry_violations()`
# tells you what is still wrong. Restore, don't rebuild: real-mode CR0 keeps PE = 0, the VMM's
# code-segment selector is 0x10.
#
# (A VM whose entry failed stays stopped: to experiment, build a new one with
# `broken_boot_vm(...)`.)

# %% nbgrader={"grade": false, "grade_id": "ex03_repair", "locked": false, "schema_version": 3, "solution": true, "task": false}
def repair(vm):
    ### BEGIN SOLUTION
    vm.vmwrite(F.GUEST_RFLAGS, vm.vmread(F.GUEST_RFLAGS) | Rflags.FIXED)
    vm.set_control(ProcBased.TPR_SHADOW, False)
    vm.set_control(ProcBased2.ENABLE_EPT, True)
    vm.set_control(ProcBased2.UNRESTRICTED_GUEST, True)
    cr0 = vm.vmread(F.GUEST_CR0) | Cr0.NE
    if not cr0 & Cr0.PE:
        cr0 &= ~Cr0.PG
    vm.vmwrite(F.GUEST_CR0, cr0)
    vm.vmwrite(F.GUEST_CS_AR_BYTES, vm.vmread(F.GUEST_CS_AR_BYTES) | 0x1)
    vm.vmwrite(F.GUEST_SS_AR_BYTES, vm.vmread(F.GUEST_SS_AR_BYTES) | 0x80)
    vm.vmwrite(F.VMCS_LINK_POINTER, 0xFFFF_FFFF_FFFF_FFFF)
    if vm.vmread(F.HOST_CS_SELECTOR) == 0:
        vm.vmwrite(F.HOST_CS_SELECTOR, 0x10)
    vm.vmwrite(F.HOST_CR0, vm.vmread(F.HOST_CR0) | Cr0.NE)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex03_repair_tests", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
from vtlab import Cr0, ProcBased, ProcBased2, Rflags, VirtualMachine, VmcsField as F, VmState

BOOT_SECTOR_TESTED = '''
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7C00
    mov si, msg
    mov dx, 0xE9
next:
    lodsb
    test al, al
    jz done
    out dx, al
    jmp next
done:
    hlt
msg: db "boot ok", 0
'''


def boot_vm_tested():
    """The boot sector of section 1, on a VM of the test's own."""
    return VirtualMachine(BOOT_SECTOR_TESTED, mode="real", load=0x7C00)


# The rules of BREAKERS, written out again here (the test does not read BREAKERS).
BREAK = {
    "RFLAGS bit 1 = 0": lambda vm: vm.vmwrite(F.GUEST_RFLAGS, vm.vmread(F.GUEST_RFLAGS) & ~int(Rflags.FIXED)),
    "CR0.PG = 1 while CR0.PE = 0": lambda vm: vm.vmwrite(F.GUEST_CR0, vm.vmread(F.GUEST_CR0) | Cr0.PG),
    "CR0.NE = 0 (IA32_VMX_CR0_FIXED0)": lambda vm: vm.vmwrite(F.GUEST_CR0, vm.vmread(F.GUEST_CR0) & ~Cr0.NE),
    "unrestricted guest off (real-mode CR0)": lambda vm: vm.set_control(ProcBased2.UNRESTRICTED_GUEST, False),
    "CS access rights: accessed bit clear": lambda vm: vm.vmwrite(F.GUEST_CS_AR_BYTES, vm.vmread(F.GUEST_CS_AR_BYTES) & ~0x1),
    "SS access rights: not present": lambda vm: vm.vmwrite(F.GUEST_SS_AR_BYTES, vm.vmread(F.GUEST_SS_AR_BYTES) & ~0x80),
    "VMCS link pointer = 0": lambda vm: vm.vmwrite(F.VMCS_LINK_POINTER, 0),
    "EPT off, unrestricted guest on": lambda vm: vm.set_control(ProcBased2.ENABLE_EPT, False),
    "TPR shadow on (fixed to 0)": lambda vm: vm.set_control(ProcBased.TPR_SHADOW, True),
    "HOST_CS_SELECTOR = 0": lambda vm: vm.vmwrite(F.HOST_CS_SELECTOR, 0),
    "HOST_CR0.NE = 0": lambda vm: vm.vmwrite(F.HOST_CR0, vm.vmread(F.HOST_CR0) & ~Cr0.NE),
}


def boots(*rules):
    vm = boot_vm_tested()
    for rule in rules:
        BREAK[rule](vm)
    repair(vm)
    left = vm.cpu.entry_violations()
    assert not left, f"{rules}: still broken: {[str(v) for v in left]}"
    summary = vm.run(max_exits=50, max_instructions=10_000)
    assert summary.state is VmState.HALTED and vm.output == "boot ok", f"{rules}: {summary}"


boots("RFLAGS bit 1 = 0")
boots("VMCS link pointer = 0", "CS access rights: accessed bit clear")
### BEGIN HIDDEN TESTS
boots()
for rule in BREAK:
    boots(rule)
boots("CR0.PG = 1 while CR0.PE = 0", "CR0.NE = 0 (IA32_VMX_CR0_FIXED0)", "HOST_CS_SELECTOR = 0")
boots("EPT off, unrestricted guest on", "unrestricted guest off (real-mode CR0)", "TPR shadow on (fixed to 0)")
boots(*BREAK)
### END HIDDEN TESTS

# %% [markdown]
# ## 6 · Launch state: VMLAUNCH, VMRESUME and VMCLEAR
#
# Besides its fields, every VMCS has a **launch state**, *clear* or *launched*. VMCLEAR makes it
# clear; a successful VMLAUNCH makes it launched. VMLAUNCH insists on a clear VMCS (else error
# 4) and VMRESUME on a launched one (else error 5), which is why a VMM uses VMLAUNCH for the
# very first entry of a vCPU and VMRESUME after every exit.
#
# VMCLEAR does three things to the VMCS at its operand:
#
# * it makes sure everything the processor holds about that VMCS internally is written back
#   to the VMCS region in memory,
# * it sets the launch state to clear, and
# * if that VMCS was the current one, the **current-VMCS pointer** becomes invalid
#   (FFFFFFFF_FFFFFFFFH): VMREAD, VMWRITE, VMLAUNCH and VMRESUME then end in VMfailInvalid.
#
# A VMCS must never be active on two logical processors at once, and that first point is why
# it must be VMCLEARed before it **moves to another logical processor** — when the scheduler
# migrates a vCPU. The old processor may hold part of the VMCS internally; only VMCLEAR guarantees that the region in memory is complete. The new processor
# then runs VMPTRLD and, because the launch state is clear again, VMLAUNCH rather than
# VMRESUME. (KVM does exactly this when it loads a vCPU on a different CPU.) Below, the whole
# story on one processor — steps 7-9 are what the "other" processor would execute:

# %%
vm = boot_vm()
cpu, V = vm.cpu, vm.vmcs_address
story = []


def do(what, fn):
    out = fn()
    story.append({"instruction": what, "outcome": out.status.value,
                  "error": int(out.error) if out.error is not None else "",
                  "launch state of V": vm.vmcs.launch_state.value,
                  "current-VMCS pointer": f"{cpu.current_vmcs_pointer:#x}"})


do("VMRESUME", lambda: cpu.vmresume(10_000))
do("VMLAUNCH", lambda: cpu.vmlaunch(10_000))
do("VMLAUNCH", lambda: cpu.vmlaunch(10_000))
do("VMRESUME", lambda: cpu.vmresume(10_000))
do("VMCLEAR V", lambda: cpu.vmclear(V))
do("VMREAD GUEST_RIP", lambda: cpu.vmread(F.GUEST_RIP))
do("VMPTRLD V", lambda: cpu.vmptrld(V))
do("VMRESUME", lambda: cpu.vmresume(10_000))
do("VMLAUNCH", lambda: cpu.vmlaunch(10_000))
launch_story = pd.DataFrame(story, index=pd.RangeIndex(1, len(story) + 1, name="step"))
launch_story

# %% [markdown]
# (The entries here run the guest only up to its first VM exit — an I/O exit for the first
# character — and no exit handler runs, so the guest simply exits again at the same place.)

# %% [markdown]
# VMCLEAR's first point can be seen in memory. After VMCLEAR the region holds the whole VMCS,
# so a copy of those 4 KBytes at another address is the same VMCS: VMPTRLD the copy and every
# field reads the same (this is how kvm-unit-tests checks that VMCLEAR really flushes). The
# copy's launch state is clear too, so it needs VMLAUNCH:

# %%
vm = boot_vm()
cpu, V = vm.cpu, vm.vmcs_address
cpu.vmlaunch(10_000)                      # V is launched and active; back in root operation
rip = cpu.vmread(F.GUEST_RIP).value
cpu.vmclear(V).check()                    # everything the processor held is now in memory
copy = cpu.alloc_region()                 # a zeroed 4-KByte region elsewhere
cpu.memory.write(copy, cpu.memory.read(V, 4096))
for outcome in (cpu.vmptrld(copy), cpu.vmread(F.GUEST_RIP), cpu.vmresume(10_000), cpu.vmlaunch(10_000)):
    print(outcome)
print(f"GUEST_RIP before the copy: {rip:#x}; after its VMLAUNCH the copy is {cpu.view(copy).launch_state.value}")


# %% [markdown] nbgrader={"grade": false, "grade_id": "ex03_migrate_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 4 — a scheduler's entry path for several vCPUs (2 points)
#
# Section 6 moved one VMCS by hand. A VMM does this in code that must work for any vCPU at
# any time, and it has a problem: **no VMX instruction reports a VMCS's launch state** (there
# is no VMCS field for it in SDM Appendix B), so the VMM records it itself — KVM keeps a
# `launched` flag next to each VMCS for exactly this reason.
#
# Write two functions. `launched` is the VMM's own record: a `set` of the VMCS addresses whose
# launch state is *launched*.
#
# * `enter_vcpu(cpu, vmcs_address, launched)` enters the guest of the vCPU whose VMCS is at
#   `vmcs_address` and returns the outcome of the entry instruction (pass
#   `max_instructions=10_000`). Make that VMCS current if it is not (VMPTRST or
#   `cpu.current_vmcs_pointer` tell you which one is), pick VMLAUNCH or VMRESUME from
#   `launched`, and keep `launched` right.
# * `migrate_away(cpu, vmcs_address, launched)` prepares that VMCS to be run on another logical
#   processor next, and keeps `launched` right.
#
# Every instruction must succeed (no VMfail). Do not read the launch state from vtlab's model
# (`cpu.view(...).launch_state`, `vm.vmcs`): a real VMM cannot, and the test checks your code
# for it. `two_vcpus()` gives you a guest with two VMCSs to try it on.
#
# <details><summary>Hint 1</summary>
#
# Which instruction makes a VMCS *launched*, and which ones make it *clear* again? Only those
# should change `launched`.
# </details>
#
# <details><summary>Hint 2</summary>
#
# VMLAUNCH leaves the launch state clear if the entry fails (VMfail, or an entry failure with
# bit 31 of the exit reason); it becomes launched when the guest ran and exited. Check
# `outcome.status is Status.VM_EXIT`.
# </details>
#
# <details><summary>Hint 3</summary>
#
# `migrate_away` is one VMX instruction (section 6, first bullet of VMCLEAR) plus one change to
# `launched`. And VMPTRLD does not change the launch state.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex03_migrate_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
def two_vcpus():
    """A boot-sector VM and a second VMCS with the same guest state: (vm, vmcs_a, vmcs_b).

    Both VMCSs are clear and neither is current. B is a copy of A's region taken after
    VMCLEAR, then VMCLEARed itself before its first use (SDM 25.11.3)."""
    vm = boot_vm()
    cpu, a = vm.cpu, vm.vmcs_address
    cpu.vmclear(a).check()
    b = cpu.alloc_region()
    cpu.memory.write(b, cpu.memory.read(a, 4096))
    cpu.vmclear(b).check()
    cpu.history.clear()
    return vm, a, b


# %% nbgrader={"grade": false, "grade_id": "ex03_migrate", "locked": false, "schema_version": 3, "solution": true, "task": false}
def enter_vcpu(cpu, vmcs_address, launched):
    ### BEGIN SOLUTION
    if cpu.vmptrst().value != vmcs_address:
        cpu.vmptrld(vmcs_address).check()
    if vmcs_address in launched:
        return cpu.vmresume(max_instructions=10_000)
    outcome = cpu.vmlaunch(max_instructions=10_000)
    if outcome.status is Status.VM_EXIT:
        launched.add(vmcs_address)
    return outcome
    ### END SOLUTION


def migrate_away(cpu, vmcs_address, launched):
    ### BEGIN SOLUTION
    cpu.vmclear(vmcs_address).check()      # data back in memory, launch state clear, not current
    launched.discard(vmcs_address)
    ### END SOLUTION


# %% [markdown]
# Self-check (not graded): write down, before you run it, the VMX instructions you expect for
# A, B, A, then A after `migrate_away` — and compare.

# %%
try:
    check_vm, a, b = two_vcpus()
    mine = set()
    for address in (a, b, a):
        enter_vcpu(check_vm.cpu, address, mine)
    migrate_away(check_vm.cpu, a, mine)
    enter_vcpu(check_vm.cpu, a, mine)
    for outcome in check_vm.cpu.history:
        print(outcome)
except NotImplementedError:
    print("enter_vcpu / migrate_away are not written yet")

# %% nbgrader={"grade": true, "grade_id": "ex03_migrate_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
from vtlab import Status, VirtualMachine


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


# No VMX instruction reads the launch state (no such field in SDM Vol. 3C, Appendix B): the VMM
# keeps its own record, so the answer must not peek into vtlab's model of the VMCS.
for fn in (enter_vcpu, migrate_away):
    peeks = names_used(fn) & {"launch_state", "LaunchState", "view", "vmcs", "vmcs_view"}
    assert not peeks, f"{fn.__name__} reads the launch state from vtlab's model ({sorted(peeks)}): track it in `launched`"

BOOT_SECTOR_TESTED = '''
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7C00
    mov si, msg
    mov dx, 0xE9
next:
    lodsb
    test al, al
    jz done
    out dx, al
    jmp next
done:
    hlt
msg: db "boot ok", 0
'''


def vcpus_tested(n):
    """A boot-sector VM and n VMCSs with its guest state, all clear, none current."""
    vm = VirtualMachine(BOOT_SECTOR_TESTED, mode="real", load=0x7C00)
    cpu, first = vm.cpu, vm.vmcs_address
    cpu.vmclear(first).check()
    addresses = [first]
    for _ in range(n - 1):
        region = cpu.alloc_region()
        cpu.memory.write(region, cpu.memory.read(first, 4096))
        cpu.vmclear(region).check()
        addresses.append(region)
    cpu.history.clear()
    return vm, addresses


def steps(cpu):
    """The VMX instructions since the last check, and whether all of them succeeded."""
    names = [o.instruction for o in cpu.history]
    failed = [str(o) for o in cpu.history if o.status in (Status.VMFAIL_VALID, Status.VMFAIL_INVALID)]
    cpu.history.clear()
    return names, failed


vm, (a, b) = vcpus_tested(2)
cpu, launched = vm.cpu, set()
# SDM Vol. 3C, 25.1 and 31.3: VMPTRLD makes a VMCS current; VMLAUNCH needs a clear one,
# VMRESUME a launched one; VMCLEAR makes it clear (and not current).
for address, want in ((a, ["VMPTRLD", "VMLAUNCH"]), (b, ["VMPTRLD", "VMLAUNCH"]), (a, ["VMPTRLD", "VMRESUME"])):
    out = enter_vcpu(cpu, address, launched)
    names, failed = steps(cpu)
    assert not failed, failed
    assert out is not None and out.status is Status.VM_EXIT, f"the guest did not run: {out}"
    assert [n for n in names if n != "VMPTRST"] == want, (hex(address), names)
assert launched == {a, b}, "both VMCSs are launched now"
### BEGIN HIDDEN TESTS
# the same vCPU again: it is current already, so VMRESUME (a second VMPTRLD would be harmless)
out = enter_vcpu(cpu, a, launched)
names, failed = steps(cpu)
assert not failed and out.status is Status.VM_EXIT and [n for n in names if n not in ("VMPTRST", "VMPTRLD")] == ["VMRESUME"], names
# migrate A (current) and B (not current) away; both come back with VMPTRLD + VMLAUNCH
migrate_away(cpu, a, launched)
migrate_away(cpu, b, launched)
names, failed = steps(cpu)
assert names == ["VMCLEAR", "VMCLEAR"] and not failed, names
assert launched == set() and cpu.current_vmcs_pointer == 0xFFFF_FFFF_FFFF_FFFF
for address in (b, a):
    out = enter_vcpu(cpu, address, launched)
    names, failed = steps(cpu)
    assert not failed and out.status is Status.VM_EXIT
    assert [n for n in names if n != "VMPTRST"] == ["VMPTRLD", "VMLAUNCH"], names
# a random schedule over three vCPUs with migrations: no VMfail ever
rng = __import__("random").Random(4)
vm3, vcpus = vcpus_tested(3)
record = set()
for _ in range(30):
    address = rng.choice(vcpus)
    if rng.random() < 0.3:
        migrate_away(vm3.cpu, address, record)
    else:
        assert enter_vcpu(vm3.cpu, address, record).status is Status.VM_EXIT
    names, failed = steps(vm3.cpu)
    assert not failed, failed
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb03_recap", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Recap
#
# * A **VMCS** describes one virtual CPU. Its memory region has only two architectural parts,
#   the **revision identifier** and the **VMX-abort indicator**; all fields are reached through
#   **VMREAD/VMWRITE** by encoding, because the processor may cache them internally.
# * Six areas: **guest state** (loaded on entry, saved on exit — RIP, RSP, RFLAGS but not the
#   other general registers; segments with hidden parts; CR0/CR3/CR4, DR7, GDTR/IDTR, some
#   MSRs), **host state** (loaded on exit: HOST_RIP, HOST_RSP, HOST_CR3 ...), **VM-execution**,
#   **VM-exit** and **VM-entry controls**, and the read-only **VM-exit information**.
# * An **encoding** packs access type (bit 0), index (9:1), type (11:10) and width (14:13).
#   Read-only fields refuse VMWRITE (error **13**), wider values are truncated, unknown or
#   malformed encodings are unsupported (error **12**).
# * Each control field has a **capability MSR**: allowed-0 bits must be 1, bits clear in the
#   allowed-1 half must be 0 — `(desired | allowed0) & allowed1`. A forbidden control makes
#   VMLAUNCH fail with error **7**, a bad host state with error **8**.
# * A real-mode guest at 0x7C00 needs **unrestricted guest**, which needs **EPT**. Guest-state
#   problems make the entry fail like an exit: reason **0x80000021** (33 with bit 31).
# * Every rule of SDM 27.2-27.3 is a record in vtlab's registry (`vtlab.cpu.entry.rules()`) with
#   its group, section and a recipe that breaks it; `EntryRuleExplorer` breaks any of them.
# * **VMLAUNCH** wants a clear VMCS (else error **4**), **VMRESUME** a launched one (else
#   error **5**). **VMCLEAR** writes the VMCS back to memory, makes it clear and invalidates the
#   current-VMCS pointer if it was current — do it before a VMCS moves to another processor,
#   then VMPTRLD and VMLAUNCH there.
#
# Next: **04 · exits** — what happens after the guest leaves, and what it costs.

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

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb06_intro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# # 06 · Events: injection, windows and timers
#
# A VMM spends much of its life on **events**. Device interrupts arrive for the guest and
# must be handed to it — but only when the guest can take them; an exit can interrupt the
# delivery of an event halfway, and the VMM must finish the job; and time itself is
# something the VMM hands out, through timer interrupts, the TSC and a timer of its own.
# VT-x gives the VMM a small kit for all this: **event injection** on VM entry, the
# **interrupt window** and **NMI window** exits, the **IDT-vectoring information** of an
# exit, the **VMX-preemption timer** and **TSC offsetting**.
#
# As before, the guest is real x86 code run by Unicorn; vtlab plays the processor's VMX
# logic and a small VMM with a virtual **8259A PIC** and **8254 PIT**.
#
# **Learning objectives** — after this notebook you can
#
# * tell exceptions, external interrupts and NMIs apart in VMX non-root operation, and
#   read the **interruption-information** format (vector 7:0, type 10:8, error code 11,
#   valid 31) in the exit and entry fields;
# * **inject** any kind of event on VM entry and predict the frame the guest's handler
#   sees (the VM-entry instruction length for INT n, INT3, INT1);
# * write the VMM's "**inject now or open the interrupt window**" logic from RFLAGS.IF and
#   the **interruptibility state** (blocking by STI and MOV SS);
# * **re-inject** an event whose delivery an exit interrupted, from the IDT-vectoring fields;
# * run a **timer-driven guest**, read the exit-1/exit-7 rhythm in its trace, and estimate
#   with the cost model what its exits cost — and why APIC virtualization and posted
#   interrupts exist.

# %% nbgrader={"grade": false, "grade_id": "nb06_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import struct

import ipywidgets as ipw
import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure

import vtlab
import vtlab.widgets as widgets
from vtlab import IntrInfo, PinBased, ProcBased, VirtualMachine, VmcsField as F, cost
from vtlab.plots import OKABE_ITO

IDT = vtlab.Layout.IDT


def gate32(offset, selector=0x08, type_=0xE):
    """A 32-bit interrupt gate (SDM Vol. 3A 6.11): offset, selector, type E, present."""
    return struct.pack("<HHBBH", offset & 0xFFFF, selector, 0, type_ | 0x80, offset >> 16)


def reasons(vm):
    """The exit reasons of a VM's trace, in order (names)."""
    return list(vm.trace.to_dataframe()["reason"])


# %% [markdown]
# ## 1 · Three kinds of event
#
# In non-root operation an **exception** (a #UD, a #PF ...) exits if its bit is set in the
# **exception bitmap**; an **external interrupt** exits if the pin-based control
# *external-interrupt exiting* is 1 — whatever the guest's RFLAGS.IF says; an **NMI**
# exits if *NMI exiting* is 1. All three exits report the event in the **VM-exit
# interruption-information** field (SDM Vol. 3C 28.2.2): bits 7:0 the vector, bits 10:8
# the type (0 external interrupt, 2 NMI, 3 hardware exception, 4 software interrupt, 5
# privileged software exception, 6 software exception), bit 11 "an error code is in the
# error-code field", bit 31 valid. For an external interrupt the field is filled only when
# the VM-exit control *acknowledge interrupt on exit* is 1 — the processor then takes the
# vector from the interrupt controller itself, as KVM lets it.

# %%
def one_exit(setup, program="nop\nnop\nhlt", mode="protected"):
    vm = VirtualMachine(program, mode=mode)
    setup(vm)
    e = vm.next_exit(max_instructions=1_000)
    return {"exit reason": f"{int(e.reason)} {e.reason.name}",
            "VM_EXIT_INTR_INFO": f"{vm.vmread(F.VM_EXIT_INTR_INFO):#010x}",
            "error code": vm.vmread(F.VM_EXIT_INTR_ERROR_CODE),
            "decoded": IntrInfo.decode(vm.vmread(F.VM_EXIT_INTR_INFO)).as_dict()}


events = pd.DataFrame({
    "#UD (bitmap bit 6)": one_exit(lambda vm: vm.vmwrite(F.EXCEPTION_BITMAP, 1 << 6), "ud2"),
    "#GP (bitmap bit 13)": one_exit(lambda vm: vm.vmwrite(F.EXCEPTION_BITMAP, 1 << 13),
                                    "mov ax, 0x55\nmov ds, ax"),
    "external interrupt 31H": one_exit(lambda vm: vm.raise_interrupt(0x31)),
    "NMI": one_exit(lambda vm: vm.raise_nmi()),
}).T
events

# %% [markdown]
# The table shows the three kinds side by side: #UD and #GP are both **exit 0** with type
# 3 (the #GP with bit 11 set: it has an error code, which vtlab reports as 0 for faults the
# emulator raises itself - see the README); the NMI is also exit 0 but type 2; the device
# interrupt is **exit 1**, type 0, vector 31H.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex06_decode_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 1 — read an interruption-information value (2 points)
#
# Write `decode_intr_info(value)` **by hand** (bit operations, not `IntrInfo`): return a
# dict with keys `"valid"` (bool, bit 31), `"type"` (int, bits 10:8), `"vector"` (int,
# bits 7:0) and `"error_code"` (bool, bit 11).

# %% nbgrader={"grade": false, "grade_id": "ex06_decode_answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def decode_intr_info(value):
    ### BEGIN SOLUTION
    return {"valid": bool(value >> 31 & 1), "type": value >> 8 & 7, "vector": value & 0xFF,
            "error_code": bool(value >> 11 & 1)}
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex06_decode_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
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


BY_HAND = "decode_intr_info must decode the bits by hand (SDM Vol. 3C, 25.9.2, Table 25-19)"
used = names_used(decode_intr_info) & {"IntrInfo", "exceptions", "decode", "as_dict", "deliver_error_code"}
assert not used, f"{BY_HAND}; it uses {sorted(used)}"
assert decode_intr_info(0x8000_0B0D) == {"valid": True, "type": 3, "vector": 13, "error_code": True}
assert decode_intr_info(0x8000_0202) == {"valid": True, "type": 2, "vector": 2, "error_code": False}
### BEGIN HIDDEN TESTS
assert decode_intr_info(0x8000_0031) == {"valid": True, "type": 0, "vector": 0x31, "error_code": False}
assert decode_intr_info(0x0000_0603) == {"valid": False, "type": 6, "vector": 3, "error_code": False}
assert decode_intr_info(0x8000_0E0E) == {"valid": True, "type": 6, "vector": 14, "error_code": True}
### END HIDDEN TESTS

# %% [markdown]
# ## 2 · Injection on VM entry
#
# To give the guest an event, the VMM writes the **VM-entry interruption-information**
# field (same layout), the **VM-entry exception error code** for bit 11, and — for the
# types an instruction causes (4 INT n, 5 INT1, 6 INT3/INTO) — the **VM-entry instruction
# length**: the processor delivers the event through the guest's IDT (or IVT in real mode)
# *as if it happened right after the entry*, pushing RIP + that length, so the guest's
# handler returns past the instruction (SDM 27.6.1). VM entry checks the field first
# (27.2.1.3): a reserved type, an NMI whose vector is not 2, an error code for a type that
# has none, a length of 0 for a software event — each a VMfailValid with error 7.
#
# Below the VMM injects one event of each type into a protected-mode guest whose IDT sends
# every vector to a handler at 3000H that halts at once; the frame on the stack is what the
# handler would see.

# %%
def inject(info, error_code=None, length=0):
    vm = VirtualMachine("nop\nhlt", mode="protected")
    vm.load("hlt", 0x3000)
    for vector in range(256):
        vm.guest.write(IDT + vector * 8, gate32(0x3000))
    vm.vmwrite(F.GUEST_IDTR_LIMIT, 0x7FF)
    vm.vmwrite(F.GUEST_RFLAGS, 0x202)    # IF = 1: required to inject an external interrupt
    esp = vm.vmread(F.GUEST_RSP)
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info)
    if error_code is not None:
        vm.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, error_code)
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, length)
    vm.next_exit(max_instructions=100)
    pushed = (esp - vm.vmread(F.GUEST_RSP)) // 4
    frame = struct.unpack(f"<{pushed}I", vm.guest.read(vm.vmread(F.GUEST_RSP), 4 * pushed))
    return {"entry info": f"{info:#010x}", "handler ran at": f"{vm.vmread(F.GUEST_RIP):#x}",
            "frame (top first)": " ".join(f"{w:#x}" for w in frame)}


injections = pd.DataFrame({
    "external interrupt 30H": inject(0x8000_0030),
    "NMI": inject(0x8000_0202),
    "#UD": inject(0x8000_0306),
    "#GP(1234H)": inject(0x8000_0B0D, error_code=0x1234),
    "INT 80H (length 2)": inject(0x8000_0480, length=2),
    "INT1 (length 1)": inject(0x8000_0501, length=1),
    "INT3 (length 1)": inject(0x8000_0603, length=1),
}).T
injections

# %% [markdown]
# Every handler ran at 3000H. The frames read EIP, CS (08H), EFLAGS from the top — with the
# #GP's error code 1234H above them — and the return EIP is 1000H for the hardware events
# and 1000H + the length (1002H, 1001H) for the software ones.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex06_encode_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 2 — the VMM's interrupt logic: inject now, or open the window (3 points)
#
# A device interrupt for the guest (here the PIC's IRQ 0, vector 20H) may be injected only
# if the guest can take an external interrupt **now**: `GUEST_RFLAGS.IF` = 1 (bit 9) and no
# **blocking by STI or by MOV SS** in `GUEST_INTERRUPTIBILITY_INFO` (bits 0 and 1), and no
# other event already in the VM-entry interruption-information field (bit 31). Otherwise
# the VMM sets the primary control **interrupt-window exiting** (`ProcBased.INTR_WINDOW_EXITING`):
# the processor exits with reason 7 at the first instruction boundary where the guest can
# take it — and the VMM injects then.
#
# Write `inject_or_open_window(vm, vector)`: if the guest can take the interrupt, write the
# VM-entry interruption information for an external interrupt of `vector` (valid, type 0),
# clear interrupt-window exiting and return `"injected"`; otherwise set interrupt-window
# exiting and return `"window"`. Use `vm.vmread`, `vm.vmwrite` and `vm.set_control`.
#
# The test runs a guest that executes `CLI`, a few instructions, `STI` and more; the timer
# interrupt arrives while IF = 0. Your function is called on the exit that brings it and
# on the window exit; the guest must receive it right after STI and the one instruction
# STI's shadow covers.

# %% nbgrader={"grade": false, "grade_id": "ex06_window_answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def inject_or_open_window(vm, vector):
    ### BEGIN SOLUTION
    busy = vm.vmread(F.VM_ENTRY_INTR_INFO_FIELD) >> 31 & 1
    blocked = vm.vmread(F.GUEST_INTERRUPTIBILITY_INFO) & 0b11
    if not busy and vm.vmread(F.GUEST_RFLAGS) >> 9 & 1 and not blocked:
        vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, (1 << 31) | (0 << 8) | vector)
        vm.set_control(ProcBased.INTR_WINDOW_EXITING, False)
        return "injected"
    vm.set_control(ProcBased.INTR_WINDOW_EXITING, True)
    return "window"
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex06_window_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
import struct as _struct

from vtlab import ExitReason as _R, ProcBased as _PB, VirtualMachine as _VM, VmcsField as _F


def _window_guest(program, fire_after, vector=0x20):
    """Run ``program`` (real mode, IVT 20H -> a handler that records its return IP at 600H
    and halts); a host timer interrupt arrives after ``fire_after`` instructions and the
    learner's function decides."""
    vm = _VM(program + "\nhlt", mode="real")
    vm.load("mov bp, sp\nmov ax, [bp]\nmov [0x600], ax\nhlt", 0x3000)
    vm.guest.write(vector * 4, _struct.pack("<HH", 0x3000, 0))
    calls = []

    @vm.handler(_R.EXTERNAL_INTERRUPT)
    def tick(vm, exit):
        calls.append(inject_or_open_window(vm, vector))
        return True

    @vm.handler(_R.INTERRUPT_WINDOW)
    def window(vm, exit):
        calls.append(inject_or_open_window(vm, vector))
        return True

    e = vm.next_exit(max_instructions=fire_after)     # run up to the tick
    assert e is None or e.reason is _R.HLT
    vm.raise_interrupt(0xEC)                          # the host's timer: an exit 1 comes
    vm.run(max_exits=20, max_instructions=10_000)
    return vm, calls


# IF = 0 when the tick comes: the window opens after STI and the instruction after it.
vm, calls = _window_guest("cli\nmov cx, 5\nl: loop l\nsti\nmov bx, 1\nmov dx, 2", fire_after=4)
assert calls == ["window", "injected"], calls
assert int.from_bytes(vm.guest.read(0x600, 2), "little") == 0x100A, "delivered after STI's shadow (MOV BX): at MOV DX"
assert [e for e in vm.trace.to_dataframe()["reason"]][:2] == ["EXTERNAL_INTERRUPT", "INTERRUPT_WINDOW"]
### BEGIN HIDDEN TESTS
# IF = 1 and no shadow: injected at once, no window exit.
vm, calls = _window_guest("sti\nnop\nmov cx, 20\nl: loop l\nmov bx, 1", fire_after=8)
assert calls == ["injected"], calls
assert "INTERRUPT_WINDOW" not in list(vm.trace.to_dataframe()["reason"])
# An event already being injected (a #UD re-injected, say) must not be overwritten.
vm = _VM("sti\nnop\nnop\nhlt", mode="real")
vm.vmwrite(_F.GUEST_RFLAGS, 0x202)
vm.vmwrite(_F.VM_ENTRY_INTR_INFO_FIELD, 0x8000_0306)
assert inject_or_open_window(vm, 0x20) == "window"
assert vm.vmread(_F.VM_ENTRY_INTR_INFO_FIELD) == 0x8000_0306
# Blocking by MOV SS also keeps the window shut.
vm = _VM("nop\nhlt", mode="real")
vm.vmwrite(_F.GUEST_RFLAGS, 0x202)
vm.vmwrite(_F.GUEST_INTERRUPTIBILITY_INFO, 0b10)
assert inject_or_open_window(vm, 0x20) == "window" and vm.control(_PB.INTR_WINDOW_EXITING)
### END HIDDEN TESTS

# %% [markdown]
# ## 3 · The window, step by step
#
# The stepper below runs a guest that closes interrupts, works, and opens them again; the
# VMM has interrupt-window exiting on from the start. Step it: nothing happens while IF = 0,
# STI sets IF — and the exit still waits one instruction, the one **STI's shadow** covers
# (blocking by STI, interruptibility bit 0). POPF or IRET setting IF leave no shadow; MOV SS
# and POP SS leave one too (bit 1).

# %%
STEP_GUEST = """
    cli
    mov ax, 1
    mov bx, 2
    sti
    mov cx, 3        ; in STI's shadow: runs before the window exit
    mov dx, 4        ; the window exit comes before this one
    hlt
"""
def window_vm():
    vm = VirtualMachine(STEP_GUEST, mode="real")
    vm.set_control(ProcBased.INTR_WINDOW_EXITING)   # the VMM waits for the window from the start
    return vm


stepper = widgets.Stepper(factory=window_vm)
stepper

# %% [markdown]
# Press **Step** until the interrupt-window exit appears in the log: its RIP is the
# `mov dx, 4`, and CX already holds 3.

# %% [markdown]
# ## 4 · When an exit interrupts a delivery
#
# Delivering an event touches memory: the IDT, the GDT, the handler's stack. If one of
# those accesses causes a VM exit — an EPT violation because the VMM has not mapped the
# stack page yet, an exception the bitmap intercepts — the event was **not delivered**.
# The exit says so in the **IDT-vectoring information** field (same layout again) and the
# **IDT-vectoring error code** (SDM 28.2.4). The VMM fixes the cause and must **re-inject**
# the event, or the guest never gets it: copy the vectoring information into the VM-entry
# interruption information (without bit 12, reserved there), the error code into the entry
# error code, and — for a software event — the VM-exit instruction length into the VM-entry
# instruction length. KVM does this on every exit, in `vmx_complete_interrupts`.
#
# vtlab's VMM does it too (`vm.reinject_events`); here it is turned off, so that you can see
# the event get lost:

# %%
def delivery_meets_ept(reinject, info=0x8000_0B0D, code=0x10, length=0):
    vm = VirtualMachine("nop\nhlt", mode="protected")
    vm.load("hlt", 0x3000)
    vm.guest.write(IDT + (info & 0xFF) * 8, gate32(0x3000))
    vm.vmwrite(F.GUEST_IDTR_LIMIT, 0x7FF)
    vm.reinject_events = reinject
    esp = vm.vmread(F.GUEST_RSP)
    vm.ept_map((esp - 4) & ~0xFFF, 0x1000, 0b101)     # the stack page: not writable yet
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info)
    vm.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, code)
    vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, length)
    first = vm.next_exit(max_instructions=100)
    row = {"first exit": first.reason.name,
           "IDT-vectoring info": f"{vm.vmread(F.IDT_VECTORING_INFO_FIELD):#010x}",
           "IDT-vectoring error code": vm.vmread(F.IDT_VECTORING_ERROR_CODE)}
    vm.run(max_exits=5, max_instructions=100)
    row["guest halted at"] = f"{vm.vmread(F.GUEST_RIP) - 1:#x}"
    return row


pd.DataFrame({"VMM re-injects": delivery_meets_ept(True),
              "VMM forgets": delivery_meets_ept(False)}).T

# %% [markdown]
# With re-injection the #GP's handler at 3000H runs once the EPT handler has mapped the
# page; without it the guest carries on at 1001H as if nothing had happened.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex06_reinject_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 3 — re-inject the interrupted event (3 points)
#
# Write `reinject(vm, exit)`, called before the handler of every exit. If the exit's
# IDT-vectoring information (`vm.vmread(F.IDT_VECTORING_INFO_FIELD)`) is valid (bit 31),
# queue the same event for the next VM entry: the VM-entry interruption information
# without bit 12, the IDT-vectoring error code as the VM-entry exception error code when
# bit 11 is set, and the VM-exit instruction length as the VM-entry instruction length for
# types 4, 5 and 6. Return `True` if you queued an event, `False` otherwise.

# %% nbgrader={"grade": false, "grade_id": "ex06_reinject_answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def reinject(vm, exit):
    ### BEGIN SOLUTION
    info = vm.vmread(F.IDT_VECTORING_INFO_FIELD)
    if not info >> 31 & 1:
        return False
    vm.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD, info & ~(1 << 12))
    if info >> 11 & 1:
        vm.vmwrite(F.VM_ENTRY_EXCEPTION_ERROR_CODE, vm.vmread(F.IDT_VECTORING_ERROR_CODE))
    if info >> 8 & 7 in (4, 5, 6):
        vm.vmwrite(F.VM_ENTRY_INSTRUCTION_LEN, vm.vmread(F.VM_EXIT_INSTRUCTION_LEN))
    return True
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex06_reinject_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
import struct as _st

from vtlab import ExitReason as _Reason, Layout as _Layout, VirtualMachine as _Vm, VmcsField as _Fld


def _interrupted(info, code=None, length=0):
    """Inject ``info`` into a protected-mode guest whose stack page the EPT does not let it
    write; the learner's reinject runs before the EPT handler.  The handler at 3000H halts;
    returns the VM and the frame it was given (top first)."""
    vm = _Vm("nop\nhlt", mode="protected")
    vm.load("hlt", 0x3000)
    gate = _st.pack("<HHBBH", 0x3000, 0x08, 0, 0x8E, 0)
    vm.guest.write(_Layout.IDT + (info & 0xFF) * 8, gate)
    vm.vmwrite(_Fld.GUEST_IDTR_LIMIT, 0x7FF)
    vm.reinject_events = False
    esp = vm.vmread(_Fld.GUEST_RSP)
    vm.ept_map((esp - 4) & ~0xFFF, 0x1000, 0b101)
    vm.vmwrite(_Fld.GUEST_RFLAGS, 0x202)
    vm.vmwrite(_Fld.VM_ENTRY_INTR_INFO_FIELD, info)
    if code is not None:
        vm.vmwrite(_Fld.VM_ENTRY_EXCEPTION_ERROR_CODE, code)
    vm.vmwrite(_Fld.VM_ENTRY_INSTRUCTION_LEN, length)
    default_ept = vm.handlers[_Reason.EPT_VIOLATION]

    @vm.handler(_Reason.EPT_VIOLATION)
    def ept(vm, exit):
        reinject(vm, exit)
        return default_ept(vm, exit)

    vm.run(max_exits=5, max_instructions=100)
    words = (esp - vm.vmread(_Fld.GUEST_RSP)) // 4
    return vm, _st.unpack(f"<{words}I", vm.guest.read(vm.vmread(_Fld.GUEST_RSP), 4 * words))


vm, frame = _interrupted(0x8000_0B0D, code=0x10)          # #GP(10H)
assert vm.vmread(_Fld.GUEST_RIP) == 0x3001, "the #GP handler must run (it halts at 3000H)"
assert frame[:2] == (0x10, 0x1000), frame                  # error code, then EIP
### BEGIN HIDDEN TESTS
vm, frame = _interrupted(0x8000_0430, length=2)            # INT 30H: software interrupt
assert vm.vmread(_Fld.GUEST_RIP) == 0x3001 and frame[0] == 0x1002, frame
vm, frame = _interrupted(0x8000_0030)                      # external interrupt 30H
assert vm.vmread(_Fld.GUEST_RIP) == 0x3001 and frame[0] == 0x1000, frame
vm = _Vm("nop\nhlt", mode="real")
vm.next_exit()
assert reinject(vm, None) is False                          # nothing was interrupted
### END HIDDEN TESTS

# %% [markdown]
# ## 5 · A timer-driven guest
#
# The guest below is a tiny kernel: it remaps the PIC so that IRQ 0-7 arrive at vectors
# 20H-27H (ICW1-ICW4), unmasks IRQ 0 (OCW1), programs the 8254's counter 0 for a rate
# generator (mode 2) with a count of 1000, and counts ticks in its IRQ 0 handler, which
# ends with an EOI (OCW2 = 20H). Its idle loop has a CLI ... STI critical section.
#
# vtlab's clock is deterministic: **one TSC tick per guest instruction**, and the PIT
# counts one input tick per instruction too — so IRQ 0 comes every 1000 guest
# instructions. When a tick falls due while the guest runs, the host's timer interrupt
# arrives: an **exit 1** (external-interrupt exiting; the exit information names the
# host's vector ECH). The VMM's timer code raises IRQ 0 on the virtual PIC and then does
# what you wrote in exercise 2: inject if it can, else open the window — an **exit 7**
# follows.

# %%
TICK_GUEST = """
    cli
    mov word ptr [0x500], 0
    mov word ptr [0x20 * 4], irq0
    mov word ptr [0x20 * 4 + 2], 0
    mov al, 0x11            ; ICW1: edge-triggered, cascaded, ICW4 follows
    out 0x20, al
    out 0xA0, al
    mov al, 0x20            ; ICW2: master vector base 20H
    out 0x21, al
    mov al, 0x28            ; ICW2: slave vector base 28H
    out 0xA1, al
    mov al, 4               ; ICW3: the slave sits on IR2
    out 0x21, al
    mov al, 2
    out 0xA1, al
    mov al, 1               ; ICW4: 8086 mode
    out 0x21, al
    out 0xA1, al
    mov al, 0xFE            ; OCW1: only IRQ 0
    out 0x21, al
    mov al, 0xFF
    out 0xA1, al
    mov al, 0x34            ; 8254 counter 0: LSB then MSB, mode 2
    out 0x43, al
    mov ax, 1000
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
wait_loop:
    cli                     ; critical section
    mov cx, CRITICAL
busy:
    loop busy
    sti
    mov cx, 50
idle:
    loop idle
    cmp word ptr [0x500], TICKS
    jb wait_loop
    cli
    hlt
irq0:
    push ax
    inc word ptr [0x500]
    mov al, 0x20            ; OCW2: non-specific EOI
    out 0x20, al
    pop ax
    iret
"""


def tick_vm(critical=50, ticks=20):
    vm = VirtualMachine(TICK_GUEST.replace("CRITICAL", str(critical)).replace("TICKS", str(ticks)),
                        mode="real")
    vm.run(max_exits=2_000, max_instructions=1_000_000)
    return vm


vm = tick_vm()
print(f"{vm.state.value}: {len(vm.trace)} VM exits in {vm.guest.counter.total:,} guest instructions; "
      f"ticks counted by the guest: {int.from_bytes(vm.guest.read(0x500, 2), 'little')}")
trace = vm.trace.to_dataframe()
trace[trace.reason.isin(["EXTERNAL_INTERRUPT", "INTERRUPT_WINDOW"])][
    ["reason", "guest_rip", "guest_instructions"]].head(12)

# %% [markdown]
# Every exit 7 in the table follows an exit 1 — the tick found the guest inside its
# critical section — and comes at the same RIP: the `loop idle` right after STI's shadow.

# %%
def exits_per_tick(critical):
    vm = tick_vm(critical=critical)
    counts = vm.exit_counts()
    return {r: counts.get(r, 0) / 20 for r in ("EXTERNAL_INTERRUPT", "INTERRUPT_WINDOW", "IO_INSTRUCTION")}


sweep = pd.DataFrame({c: exits_per_tick(c) for c in (1, 50, 150, 300)}).T
fig = Figure(figsize=(7, 3.2))
ax = fig.subplots()
bottom = None
for reason, colour in zip(sweep.columns, (OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["bluish green"])):
    ax.bar([str(c) for c in sweep.index], sweep[reason], bottom=bottom, color=colour, label=reason)
    bottom = sweep[reason] if bottom is None else bottom + sweep[reason]
ax.set_xlabel("LOOP iterations inside CLI ... STI (per idle round)")
ax.set_ylabel("VM exits per timer tick")
ax.legend(fontsize=8)
fig.tight_layout()
fig

# %% [markdown]
# *Figure: VM exits per timer tick against the length of the guest's critical section. Look at the orange part: the longer the guest keeps interrupts off, the more ticks find
# the window shut and cost an extra exit 7; exit 1 and the EOI's I/O exit are paid on
# every tick.*

# %% [markdown]
# ## 6 · What the ticks cost — and why APIC virtualization exists
#
# Every tick costs at least two round trips here (the host interrupt and the EOI), often
# three. The cost model turns the trace into cycles:

# %%
estimate = cost.estimate(vm.trace, cpu="generic-modern")
estimate[["exits", "cycles_per_exit", "total_cycles", "share_pct"]]

# %% [markdown]
# At a guest tick rate of 1000 Hz (Linux's HZ=1000) that is some 3,000 exits a second per
# vCPU from the timer alone. A widget to play with the rate and the exits per tick:

# %%
def per_second(hz=1000, exits_per_tick=3.0, cpu="generic-modern"):
    profile = cost.get_profile(cpu)
    cycles = hz * exits_per_tick * (profile.roundtrip.pick("mid") + profile.handling["interrupt"].pick("mid"))
    print(f"{hz} Hz x {exits_per_tick:.1f} exits/tick = {hz * exits_per_tick:,.0f} exits/s "
          f"= {cycles / 1e6:,.1f} M cycles/s on {cpu} ({cycles / 3e9 * 100:.2f} % of a 3 GHz core)")


rate_widget = ipw.interactive(per_second, hz=ipw.IntSlider(value=1000, min=100, max=10_000, step=100),
                              exits_per_tick=ipw.FloatSlider(value=3.0, min=0.0, max=4.0, step=0.5),
                              cpu=ipw.Dropdown(options=["prescott", "nehalem", "skylake", "generic-modern"],
                                               value="generic-modern"))
display(rate_widget)

# %% [markdown]
# This is why later hardware removed the exits one by one. **TSC offsetting** and the
# **VMX-preemption timer** let the VMM give the guest its own clock and take the CPU back
# on schedule without a host interrupt (exit 52 instead of exit 1). **APIC virtualization**
# (virtual-interrupt delivery) lets the processor deliver a pending virtual interrupt itself
# as soon as the guest can take it — no interrupt-window exit — and virtualizes the EOI —
# no I/O or APIC-access exit; **posted interrupts** let a device interrupt reach a running
# guest without any exit at all. With all three, the trace above would shrink to nearly
# nothing. vtlab's processor models the first two; its capability MSRs report the APIC
# features as fixed to 0.

# %%
def preemption_slices(value, instructions=5_000):
    """How many exit-52 time slices a busy guest gets in ``instructions`` instructions."""
    vm = VirtualMachine("spin:\ninc ax\njmp spin", mode="real")
    vm.set_control(PinBased.VMX_PREEMPTION_TIMER)
    vm.vmwrite(F.VMX_PREEMPTION_TIMER_VALUE, value)
    vm.preemption_slice = value          # the handler re-arms the timer with this
    vm.run(max_exits=10_000, max_instructions=instructions)
    return vm.exit_counts().get("PREEMPTION_TIMER", 0)


misc = VirtualMachine("hlt").cpu.rdmsr(0x485)
print("IA32_VMX_MISC[4:0] =", misc & 0x1F, "-> the timer counts down once every", 1 << (misc & 0x1F), "TSC ticks")
pd.Series({v: preemption_slices(v) for v in (5, 10, 20, 40)}, name="timer exits in 5,000 instructions")

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex06_timer_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 4 — a time slice for the preemption timer (2 points)
#
# The VMX-preemption timer counts down by 1 each time bit X of the TSC changes, X being
# `IA32_VMX_MISC[4:0]` (SDM 26.5.1, A.6). Write `timer_value(tsc_ticks, misc)`: the timer
# value that gives the guest a slice of (about) `tsc_ticks` TSC ticks — `tsc_ticks` divided
# by 2^X, rounded down. Then set `SLICE` to the value for a slice of 3,200 guest
# instructions on vtlab's CPU (read its IA32_VMX_MISC, MSR 485H, with `vm.cpu.rdmsr`).

# %% nbgrader={"grade": false, "grade_id": "ex06_timer_answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def timer_value(tsc_ticks, misc):
    ### BEGIN SOLUTION
    return tsc_ticks >> (misc & 0x1F)
    ### END SOLUTION


### BEGIN SOLUTION
SLICE = timer_value(3_200, VirtualMachine("hlt").cpu.rdmsr(0x485))
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "ex06_timer_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
assert timer_value(3_200, 5) == 100
assert timer_value(1_000, 0) == 1_000
assert SLICE == 100
### BEGIN HIDDEN TESTS
assert timer_value(3_200, 0xFFFF_FF05) == 100      # only bits 4:0 are the rate
assert timer_value(31, 5) == 0
assert timer_value(1 << 20, 10) == 1 << 10
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb06_recap", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Recap
#
# * Exceptions exit through the **exception bitmap**, external interrupts through
#   **external-interrupt exiting** (whatever RFLAGS.IF), NMIs through **NMI exiting**; all
#   report an **interruption-information** value: vector 7:0, type 10:8, error code 11,
#   valid 31.
# * **Injection** on VM entry delivers any event through the guest's IDT/IVT as if it came
#   right after the entry; software events return past the instruction by the **VM-entry
#   instruction length**.
# * An external interrupt may be injected only when **RFLAGS.IF = 1** and there is **no
#   blocking by STI or MOV SS**; otherwise **interrupt-window exiting** makes the processor
#   exit (reason 7) exactly when the guest can take it — after STI *and* the instruction in
#   its shadow. **NMI-window exiting** (reason 8) does the same for NMIs with virtual-NMI
#   blocking, which ends at IRET.
# * An exit **during event delivery** reports the event in the **IDT-vectoring** fields; the
#   VMM must **re-inject** it after fixing the cause.
# * A timer-driven guest costs exits on every tick: the host interrupt (1), often the window
#   (7), the EOI. The **preemption timer** (52) and **TSC offsetting** give the VMM time
#   control without them; **APIC virtualization** and **posted interrupts** remove the rest.

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

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb05_intro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# # 05 · Memory: EPT and shadow paging
#
# A guest kernel believes it owns physical memory: it builds page tables that map its
# linear addresses onto "physical" frames. Those frames are the VMM's to place. Before
# 2008 a VMM kept **shadow page tables** - linear address straight to the real frame -
# and had to see every change the guest made to its own tables. Intel's **EPT**
# (extended page tables) gave the processor a second set of tables, written by the VMM,
# that translate every *guest-physical* address once more (SDM Vol. 3C 29.3). The guest
# then keeps its page tables to itself, and most memory exits disappear.
#
# In vtlab the EPT is real: tables of 512 8-byte entries in host memory, walked by the
# processor model for every guest-physical access, cached until INVEPT.
#
# **Learning objectives** - after this notebook you can
#
# * draw the **two-dimensional walk** of one linear address and count its memory
#   references: 24 for 4-level guest paging on a 4-level EPT;
# * build an **identity EPT** for a guest's RAM entry by entry (EPTP, PML4E, PDPTE,
#   2-MByte PDEs), and change one page's permissions, e.g. **execute-only**;
# * decode an **EPT-violation exit qualification** (SDM Table 28-7) and tell a fault on
#   the translated address from one on the guest's own page tables;
# * explain why a VMM must execute **INVEPT** after changing an EPT entry, by watching a
#   guest use a stale mapping;
# * compare the exits of a page-table-heavy guest under **shadow paging** and under EPT
#   and estimate what each costs, including the walks EPT makes longer - and what
#   **VPID** saves on every world switch.

# %% nbgrader={"grade": false, "grade_id": "nb05_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import struct

import ipywidgets as W
import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vtlab import EptTables, ExitReason, ShadowPaging, VirtualMachine, cost, guests
from vtlab.plots import OKABE_ITO


def long_vm(code: str, ept: bool = True) -> VirtualMachine:
    """A 64-bit guest under vtlab's VMM (identity EPT of its 2 MiB of RAM when ``ept``)."""
    return VirtualMachine(code, mode="long", ept=ept)


# %% [markdown] nbgrader={"grade": false, "grade_id": "nb05_walk_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## 1 · The two-dimensional walk
#
# With EPT on, the guest's CR3 and every entry of its page tables hold **guest-physical**
# addresses, so the processor must translate each of them through the EPT before it can
# read the entry (SDM Vol. 3C 29.3.2). Below, a guest with four levels of 4-KByte page
# tables and an EPT with four levels of 4-KByte pages: each guest entry costs an EPT
# walk of 4 references plus the read itself, and the final guest-physical address needs
# one more EPT walk. `vm.cpu.ept.walk_linear` lists every reference in the order the
# processor makes them.

# %% nbgrader={"grade": false, "grade_id": "nb05_walk", "locked": true, "schema_version": 3, "solution": false, "task": false}
vm = long_vm("hlt")
ept4k = EptTables(vm.cpu.memory)
ept4k.identity(vm.guest.memory_size, large=False)         # 4-KByte EPT pages throughout
PML4, PDPT, PD, PT = 0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000
for table, entry in ((PML4, PDPT | 7), (PDPT, PD | 7), (PD, PT | 7)):
    vm.guest.write(table, struct.pack("<Q", entry))       # present, writable, user
vm.guest.write(PT + 5 * 8, struct.pack("<Q", 0x7000 | 7)) # linear 5000H -> guest-physical 7000H
regs = {r: vm.guest.reg(r) for r in ("cr0", "cr4", "efer")}
walk = vm.cpu.ept.walk_linear(ept4k.eptp(), PML4, regs["cr0"], regs["cr4"], regs["efer"], 0x5123)
refs = pd.DataFrame([{"#": i + 1, "dimension": r.dimension, "entry": r.level, "at": hex(r.address),
                      "for": r.purpose or "the guest's walk"} for i, r in enumerate(walk.references)])
print(f"linear 0x5123 -> guest-physical {walk.guest_physical:#x} -> host-physical {walk.physical:#x}: "
      f"{len(walk.references)} memory references ({walk.count('EPT')} EPT, {walk.count('guest')} guest)")
refs.head(10)

# %% nbgrader={"grade": false, "grade_id": "nb05_walk_plot", "locked": true, "schema_version": 3, "solution": false, "task": false}
fig = Figure(figsize=(7.5, 3.4), layout="constrained")
ax = fig.subplots()
rows = ["guest PML4E", "guest PDPTE", "guest PDE", "guest PTE", "the data"]
row = col = 0
for i, r in enumerate(walk.references):
    if r.dimension == "guest":           # the guest's own entry closes a row
        x, color = 4, OKABE_ITO["blue"]
    else:                                # the next reference of this row's EPT walk
        x, color = col, OKABE_ITO["orange"]
    ax.add_patch(Rectangle((x, len(rows) - 1 - row), 0.9, 0.8, color=color))
    ax.text(x + 0.45, len(rows) - 0.6 - row, str(i + 1), ha="center", va="center", color="white")
    if r.dimension == "guest":
        row, col = row + 1, 0
    else:
        col += 1
ax.set_xlim(0, 5)
ax.set_ylim(0, len(rows))
ax.set_xticks([0.45, 1.45, 2.45, 3.45, 4.45], ["EPT PML4E", "EPT PDPTE", "EPT PDE", "EPT PTE", "guest entry"])
ax.set_yticks([len(rows) - 0.6 - i for i in range(len(rows))], rows)
ax.set_title("One TLB miss under EPT: 24 memory references (numbered in order)")
fig

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb05_walk_caption", "locked": true, "schema_version": 3, "solution": false, "task": false}
# *Figure: the references of one TLB miss, numbered in order. What to look for:* every row but the last is an EPT walk (orange) followed by one read
# of the guest's own entry (blue); the guest's four references are the only ones a
# processor without EPT makes. Move the sliders to see how the count grows with the
# levels of each dimension: `g x (e + 1) + e`.

# %% nbgrader={"grade": false, "grade_id": "nb05_walk_widget", "locked": true, "schema_version": 3, "solution": false, "task": false}
def references(guest_levels: int = 4, ept_levels: int = 4) -> str:
    n = guest_levels * (ept_levels + 1) + ept_levels
    return f"{guest_levels}-level guest on {ept_levels}-level EPT: {n} references (native: {guest_levels})"


out = W.interactive(lambda g, e: print(references(g, e)), g=W.IntSlider(4, 2, 5, description="guest"),
                    e=W.IntSlider(4, 4, 5, description="EPT"))
display(out)

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex05_identity_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## 2 · Exercise: build the identity EPT yourself
#
# Write `identity_ept(memory, ram_size)` that builds, in host memory, an EPT that maps
# guest-physical `[0, ram_size)` onto the same host-physical addresses with **2-MByte
# pages**, and returns its EPTP. `memory.alloc()` gives a zeroed 4-KByte table and its
# address; `memory.write(address, struct.pack("<Q", entry))` writes an entry. The formats
# (SDM Vol. 3C 29.3.2, 25.6.11):
#
# * an entry that references a table: the table's address, bits 2:0 = 111b (read, write,
#   execute - the leaves decide);
# * a PDE that maps a 2-MByte page: the page's address, bit 7 = 1, memory type WB (6) in
#   bits 5:3, bits 2:0 = 111b;
# * the EPTP: the PML4 table's address, walk length 4 - 1 = 3 in bits 5:3, WB in 2:0.
#
# `ram_size` is a multiple of 2 MiB and at most 1 GiB (one PDPTE).

# %% nbgrader={"grade": false, "grade_id": "ex05_identity", "locked": false, "schema_version": 3, "solution": true, "task": false}
def identity_ept(memory, ram_size: int) -> int:
    ### BEGIN SOLUTION
    pml4, pdpt, pd = memory.alloc(), memory.alloc(), memory.alloc()
    memory.write(pml4, struct.pack("<Q", pdpt | 0b111))
    memory.write(pdpt, struct.pack("<Q", pd | 0b111))
    for i in range(ram_size // 0x20_0000):
        memory.write(pd + 8 * i, struct.pack("<Q", i * 0x20_0000 | 1 << 7 | 6 << 3 | 0b111))
    return pml4 | 3 << 3 | 6
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex05_identity_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
import struct

from vtlab import VirtualMachine, VmcsField as F

vm = VirtualMachine("mov eax, dword ptr [0x1f0000]\nhlt", mode="long")
eptp = identity_ept(vm.cpu.memory, vm.guest.memory_size)
assert eptp & 7 == 6 and (eptp >> 3) & 7 == 3, "EPTP: WB in bits 2:0, 3 in bits 5:3"
vm.vmwrite(F.EPT_POINTER, eptp)
assert vm.run(max_exits=5).state.value == "halted", vm.message
w = vm.cpu.ept.translate(eptp, 0x1F_0123)
assert w.ok and w.physical == 0x1F_0123, "guest-physical must equal host-physical"
### BEGIN HIDDEN TESTS
assert w.page_size == 0x20_0000, "use 2-MByte pages (bit 7 in the PDE)"
assert [r.level for r in w.references] == ["PML4E", "PDPTE", "PDE"]
vm4 = VirtualMachine("hlt", mode="long", memory_size=4 << 20)
e4 = identity_ept(vm4.cpu.memory, 4 << 20)
assert vm4.cpu.ept.translate(e4, 0x3F_FFF0).physical == 0x3F_FFF0
assert not vm4.cpu.ept.translate(e4, 0x40_0000).ok, "nothing beyond the RAM"
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex05_xonly_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## 3 · Exercise: an execute-only page, and its violation
#
# IA32_VMX_EPT_VPID_CAP bit 0 says this processor supports **execute-only** EPT pages
# (bits 2:0 = 100b). Write `make_execute_only(vm, gpa)`: the 4-KByte page holding `gpa`
# may be fetched from but neither read nor written. Use `vm.ept_tables.protect(...)`
# and do not forget that the processor caches translations (section 5). Then the guest
# below runs code from page 5000H that reads page 6000H, both execute-only: the read is
# an EPT violation (exit reason 48).

# %% nbgrader={"grade": false, "grade_id": "ex05_xonly", "locked": false, "schema_version": 3, "solution": true, "task": false}
def make_execute_only(vm, gpa: int) -> None:
    ### BEGIN SOLUTION
    vm.ept_tables.protect(gpa & ~0xFFF, 0x1000, 0b100)
    vm.invept()
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex05_xonly_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
from vtlab import VirtualMachine, VmcsField as F

vm = VirtualMachine("jmp 0x5000")
vm.guest.load("mov ax, [0x6010]\nhlt", 0x5000)
make_execute_only(vm, 0x5000)
make_execute_only(vm, 0x6123)
vm.run(max_exits=1)
assert vm.vmread(F.VM_EXIT_REASON) == 48, vm.last_exit
assert vm.vmread(F.GUEST_PHYSICAL_ADDRESS) == 0x6010
### BEGIN HIDDEN TESTS
assert vm.vmread(F.EXIT_QUALIFICATION) == 0x1A1     # read | executable | GLA valid | translated
assert vm.last_exit.guest_rip == 0x5000              # the fetch from 5000H was allowed
assert vm.last_exit.guest_linear_address == 0x6010  # paging off: linear = guest-physical
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex05_decode_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## 4 · Exercise: decode a violation
#
# Write `decode_violation(q)` for an EPT-violation exit qualification (SDM Vol. 3C,
# 28.2.1, Table 28-7) returning a dict with
#
# * `"access"`: `"read"`, `"write"` or `"fetch"` (bits 0, 1, 2),
# * `"allowed"`: what the EPT entries allowed, as `"rwx"` with `-` for a missing right
#   (bits 3, 4, 5),
# * `"linear_valid"`: bit 7 (the guest-linear-address field is valid),
# * `"on_paging_structure"`: True if bit 7 is set and bit 8 is clear - the access was to
#   one of the guest's own paging-structure entries, not to the translated address.
#
# Decode the bits by hand (not with `EptViolationQualification`).

# %% nbgrader={"grade": false, "grade_id": "ex05_decode", "locked": false, "schema_version": 3, "solution": true, "task": false}
def decode_violation(q: int) -> dict:
    ### BEGIN SOLUTION
    access = "read" if q & 1 else "write" if q & 2 else "fetch"
    allowed = "".join(c if q >> bit & 1 else "-" for c, bit in (("r", 3), ("w", 4), ("x", 5)))
    return {"access": access, "allowed": allowed, "linear_valid": bool(q >> 7 & 1),
            "on_paging_structure": bool(q >> 7 & 1) and not q >> 8 & 1}
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex05_decode_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
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


BY_HAND = "decode_violation must decode the bits by hand (SDM Vol. 3C, 28.2.1, Table 28-7)"
used = names_used(decode_violation) & {"EptViolationQualification", "qualifications", "decode", "as_dict",
                                       "permissions", "gla_valid", "gla_translation"}
assert not used, f"{BY_HAND}; it uses {sorted(used)}"
assert decode_violation(0x181) == {"access": "read", "allowed": "---", "linear_valid": True,
                                   "on_paging_structure": False}
assert decode_violation(0x18A)["access"] == "write" and decode_violation(0x18A)["allowed"] == "r--"
### BEGIN HIDDEN TESTS
assert decode_violation(0x1A1)["allowed"] == "--x"
assert decode_violation(0x184)["access"] == "fetch"
assert decode_violation(0x81)["on_paging_structure"] is True
assert decode_violation(0x3A)["linear_valid"] is False and decode_violation(0x3A)["allowed"] == "rwx"
from vtlab import VirtualMachine
vm = VirtualMachine("nop\nhlt", mode="long")
vm.ept_unmap(0x94000, 0x1000)                        # the guest's own PDPT page
vm.run(max_exits=1)
assert decode_violation(vm.last_exit.qualification)["on_paging_structure"] is True
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb05_stale_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## 5 · Remap a page and forget INVEPT
#
# The processor caches the translations it derives from the EPT, tagged with the EPT's
# address (EP4TA), and keeps them until INVEPT (SDM Vol. 3C 29.4.1, 29.4.3). Below the
# guest reads guest-physical 5000H three times; between the reads the VMM (in its CPUID
# handler) points page 5000H at host page 8000H. Without INVEPT the guest still sees the
# old page.

# %% nbgrader={"grade": false, "grade_id": "nb05_stale", "locked": true, "schema_version": 3, "solution": false, "task": false}
STALE = "mov ax, [0x5000]\ncpuid\nmov bx, [0x5000]\ncpuid\nmov cx, [0x5000]\nhlt"


def stale_demo(invept_after_remap: bool) -> tuple[int, int, int]:
    vm = VirtualMachine(STALE)
    vm.guest.write(0x5000, b"\x11\x11")
    vm.guest.write(0x8000, b"\x22\x22")
    calls = []

    @vm.handler(ExitReason.CPUID)
    def remap(vm, exit):
        calls.append(exit)
        if len(calls) == 1:
            vm.ept_tables.map(0x5000, 0x8000, 0x1000)
            if invept_after_remap:
                vm.invept()
        vm.skip_instruction()
        return True

    vm.run(max_exits=10)
    return tuple(hex(vm.regs[r] & 0xFFFF) for r in ("rax", "rbx", "rcx"))


pd.DataFrame({"no INVEPT": stale_demo(False), "INVEPT": stale_demo(True)},
             index=["1st read", "2nd read", "3rd read"])

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex05_remap_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise: a VMM that moves a page
#
# Write the CPUID handler `move_page(vm, exit)`: it copies guest page 5000H to host page
# 9000H, points guest-physical 5000H at it (`vm.ept_tables.map`), makes the processor
# drop the old translation, and skips the CPUID. Afterwards a write by the guest to 5000H
# must land in host page 9000H.

# %% nbgrader={"grade": false, "grade_id": "ex05_remap", "locked": false, "schema_version": 3, "solution": true, "task": false}
def move_page(vm, exit) -> bool:
    ### BEGIN SOLUTION
    vm.guest.write(0x9000, vm.guest.read(0x5000, 0x1000))
    vm.ept_tables.map(0x5000, 0x9000, 0x1000)
    vm.invept()
    vm.skip_instruction()
    return True
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex05_remap_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
from vtlab import ExitReason, VirtualMachine

vm = VirtualMachine("mov ax, [0x5000]\ncpuid\nmov word ptr [0x5002], 0x4242\nmov bx, [0x5000]\nhlt")
vm.guest.write(0x5000, b"\x33\x33")
vm.handler(ExitReason.CPUID)(move_page)
assert vm.run(max_exits=10).state.value == "halted", vm.message
assert vm.regs.rbx & 0xFFFF == 0x3333, "the copy must hold the page's old contents"
### BEGIN HIDDEN TESTS
assert vm.cpu.ept.memory.read(0x9002, 2) == b"\x42\x42", "the write must reach host page 9000H"
assert vm.cpu.ept.memory.read(0x5002, 2) != b"\x42\x42", "... and not the old host page"
assert vm.cpu.ept.translate(vm.vmread(0x201A), 0x5000).physical == 0x9000
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb05_shadow_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## 6 · Shadow paging against EPT
#
# `page-table-heavy` remaps a 2-MiB window 1024 times (a PDE write and INVLPG each) and
# reloads CR3 every 16th time. Under EPT the guest's page tables are its own business.
# Under shadow paging (`vtlab.ShadowPaging`, no EPT) the VMM write-protects the guest's
# page tables and must see every CR3 load, every INVLPG and every page fault.

# %% nbgrader={"grade": false, "grade_id": "nb05_shadow", "locked": true, "schema_version": 3, "solution": false, "task": false}
def run_workload(name: str, shadow: bool) -> VirtualMachine:
    wi = guests.info(name)
    vm = VirtualMachine(guests.source(name), mode=wi.mode, load=wi.load, ept=not shadow)
    if shadow:
        vm.shadow = ShadowPaging(vm)
    vm.run(max_exits=20_000, max_instructions=2_000_000)
    return vm


under_ept = run_workload("page-table-heavy", shadow=False)
under_shadow = run_workload("page-table-heavy", shadow=True)
exits = pd.DataFrame({"EPT": pd.Series(dict(under_ept.exit_counts())),
                      "shadow paging": pd.Series(dict(under_shadow.exit_counts()))}).fillna(0).astype(int)
print(under_shadow.shadow.stats)
exits

# %% nbgrader={"grade": false, "grade_id": "nb05_shadow_plot", "locked": true, "schema_version": 3, "solution": false, "task": false}
fig = Figure(figsize=(6.5, 3), layout="constrained")
ax = fig.subplots()
ax.barh(exits.index, exits["shadow paging"], color=OKABE_ITO["blue"], label="shadow paging")
ax.barh(exits.index, exits["EPT"], color=OKABE_ITO["orange"], label="EPT", height=0.4)
ax.set_xlabel("VM exits (count)")
ax.legend(loc="lower right")
fig

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb05_shadow_caption", "locked": true, "schema_version": 3, "solution": false, "task": false}
# *Figure: VM exits of `page-table-heavy` under each scheme. What to look for:* under EPT only the final HLT exits; under shadow paging the page
# faults (EXCEPTION_NMI: shadow entries filled and page-table writes emulated), INVLPG
# and CR_ACCESS together cost thousands of exits for the same guest work.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex05_cost_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise: what does each scheme cost?
#
# EPT trades exits for longer walks. Write `scheme_costs(shadow_vm, ept_vm, tlb_misses,
# cycles_per_reference)` returning a dict with
#
# * `"shadow"`: the virtualization cycles of the shadow run (`cost.summary(vm.trace)
#   ["virtualization_cycles"]`) plus its TLB misses at 4 references each,
# * `"ept"`: the same for the EPT run, with 24 references per TLB miss,
#
# both times `cycles_per_reference` per reference (assume both runs take `tlb_misses`
# TLB misses).

# %% nbgrader={"grade": false, "grade_id": "ex05_cost", "locked": false, "schema_version": 3, "solution": true, "task": false}
def scheme_costs(shadow_vm, ept_vm, tlb_misses: int, cycles_per_reference: float) -> dict:
    ### BEGIN SOLUTION
    def exits(vm):
        return cost.summary(vm.trace)["virtualization_cycles"]
    return {"shadow": exits(shadow_vm) + tlb_misses * 4 * cycles_per_reference,
            "ept": exits(ept_vm) + tlb_misses * 24 * cycles_per_reference}
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex05_cost_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
from vtlab import ShadowPaging, VirtualMachine, cost, guests


def workload_vm(shadow: bool):
    wi = guests.info("page-table-heavy")
    vm = VirtualMachine(guests.source("page-table-heavy"), mode="long", load=wi.load, ept=not shadow)
    if shadow:
        ShadowPaging(vm)
    vm.run(max_exits=20_000, max_instructions=2_000_000)
    return vm


under_shadow, under_ept = workload_vm(True), workload_vm(False)
c = scheme_costs(under_shadow, under_ept, tlb_misses=2_000, cycles_per_reference=10)
assert c["shadow"] > c["ept"], c
### BEGIN HIDDEN TESTS
base = cost.summary(under_ept.trace)["virtualization_cycles"]
assert abs(c["ept"] - (base + 2_000 * 24 * 10)) < 1
assert abs(scheme_costs(under_shadow, under_ept, 0, 10)["shadow"]
           - cost.summary(under_shadow.trace)["virtualization_cycles"]) < 1
### END HIDDEN TESTS

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb05_vpid_md", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## 7 · VPID: a world switch without a TLB flush
#
# Without VPIDs every VM entry and VM exit must flush the linear and combined
# translations (SDM Vol. 3C 29.4.3.1): after each exit the guest refills its TLB, and
# under EPT each refill is a two-dimensional walk. With "enable VPID" the TLB entries
# carry the guest's VPID and survive the switch. The table estimates the refill cost per
# exit for a guest with a working set of `pages` 4-KByte pages (one miss per page, 24
# references each, 10 cycles per reference - a cache hit in the paging-structure caches
# would be cheaper, a DRAM access far dearer).

# %% nbgrader={"grade": false, "grade_id": "nb05_vpid", "locked": true, "schema_version": 3, "solution": false, "task": false}
roundtrip = cost.summary(under_ept.trace)["roundtrip_cycles"]
pd.DataFrame([{"working set (pages)": pages, "exit round trip (cycles)": roundtrip,
               "TLB refill after the exit, no VPID (cycles)": pages * 24 * 10,
               "with VPID (cycles)": 0} for pages in (16, 64, 256, 1024)])

# %% [markdown] nbgrader={"grade": false, "grade_id": "nb05_recap", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Recap
#
# * EPT adds a second translation: guest-physical to host-physical, through tables the
#   VMM writes (EPTP -> PML4E -> PDPTE -> PDE -> PTE, bits 2:0 read/write/execute, bit 7
#   for 1-GByte and 2-MByte pages). A 4-on-4 TLB miss costs up to 24 references.
# * An access the EPT does not allow is an EPT violation (48) whose qualification says
#   the access, what the entries allowed, and whether it hit the guest's own page
#   tables; a malformed entry is an EPT misconfiguration (49).
# * Translations are cached per EPTP until INVEPT: a VMM that edits its EPT and forgets
#   INVEPT leaves the guest on the old mapping.
# * Shadow paging needs #PF, CR3 and INVLPG exits and write-protected guest tables; EPT
#   needs none of them - at the price of longer walks, which VPID keeps from being paid
#   again after every world switch.

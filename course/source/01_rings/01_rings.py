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

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex01_intro", "locked": true, "schema_version": 3, "solution": false, "task": false}
# # 01 · Rings, traps and why x86 was not virtualizable
#
# Until 2005, anyone who wanted several operating systems to share one x86 PC or server had to
# outwit the processor. VMware, Xen and others made it work with clever software — binary
# translation, paravirtualization and shadow page tables — and paid for it in speed and in very
# complicated code. The reason lies in how the x86 protects its own kernel: a few
# instructions that matter to a hypervisor simply do not ask for permission.
#
# In this notebook you find those instructions yourself. vtlab runs real x86 machine code on
# the Unicorn CPU emulator; you will execute single instructions in the kernel's ring and in
# the user ring, compare what they do, and build the table that shows why the classic way of
# building a hypervisor fails on x86. Then you try the two software answers that came before
# Intel VT-x.
#
# **Learning objectives** — after this notebook you can
#
# * explain the four x86 privilege rings, the current privilege level (CPL) and what makes an
#   instruction *privileged*;
# * state Popek and Goldberg's condition for a trap-and-emulate hypervisor (every *sensitive*
#   instruction must be *privileged*) and show, by experiment, where x86 breaks it;
# * classify an instruction as privileged, sensitive-but-unprivileged or innocuous from what
#   it does at CPL 0 and CPL 3, and compare your table with the published list of Robin and
#   Irvine (2000);
# * explain how a guest can tell that it has been deprivileged (the "red pill");
# * describe binary translation and paravirtualization, run both, and compare what they cost;
# * say what a hardware solution has to provide — the subject of notebook 02.

# %% nbgrader={"grade": false, "grade_id": "ex01_setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import html
import struct

import ipywidgets as W
import numpy as np
import pandas as pd
from IPython.display import HTML, display
from matplotlib.figure import Figure

import vtlab
from vtlab import Guest, Hypercall, VirtualMachine, VmState, bt, cost, plots, rings
from vtlab.arch import Rflags   # the EFLAGS/RFLAGS bits by name: Rflags.IF, Rflags.IOPL ...
from vtlab.plots import OKABE_ITO

pd.set_option("display.max_colwidth", 120)
pd.set_option("display.max_rows", 80)

#: One colour per class of instruction (Okabe-Ito, colour-blind safe), used everywhere below.
CATEGORY_COLOURS = {
    "privileged": OKABE_ITO["blue"],
    "sensitive-unprivileged": OKABE_ITO["vermillion"],
    "innocuous": OKABE_ITO["bluish green"],
    "untestable": OKABE_ITO["yellow"],
}

print("vtlab", vtlab.__version__, "ready")

# %% [markdown]
# ## 1 · Rings, the CPL and privileged instructions
#
# The x86 architecture goes back to the 8086 of 1978; the protection you meet here arrived with
# the 80286 (1982) and the 32-bit 80386 (1985). Nobody designed it with virtual machines in
# mind — it only had to keep user programs away from the operating system.
#
# It does so with **four privilege levels, numbered 0 to 3 and called rings**. Ring 0 is the
# most privileged. Windows, Linux and nearly every other operating system use just two of them:
# the kernel in ring 0 and applications in ring 3. Rings 1 and 2 stay empty. The line that
# matters for security is the one between ring 0 and ring 3.
#
# The ring the processor is executing in right now is the **current privilege level (CPL)**.
# You can read it off the code-segment register: the two lowest bits of the selector in CS are
# the CPL. A kernel's code selector here is `0x08` (CPL 0); a user program's is `0x23` (binary
# …10**0011**, CPL 3).
#
# A **privileged instruction** is one the processor only executes at CPL 0. Anywhere else it
# refuses with a *general-protection fault* (#GP) — a trap that hands control to the kernel,
# which decides what to do. Typical examples: CLI (turn interrupts off), LGDT (load the global
# descriptor table), HLT (stop the processor until the next interrupt), MOV to or from a
# control register.
#
# Let's check this on the emulated CPU. `run_at(cpl, code)` builds a fresh 32-bit protected-mode
# machine, runs `code` at CPL 0 (as the kernel) or at CPL 3 (entered with IRET, the way an
# operating system starts a process), and reports how it ended.

# %%
PROBE_AT = 0x2_0000   # where run_at() puts the code


def run_at(cpl: int, code: str) -> dict:
    # Run `code` (32-bit assembly) at CPL 0 or CPL 3 on a fresh machine.
    machine = rings.assemble(code + "\nhlt", PROBE_AT, 32)
    last_hlt = PROBE_AT + len(machine) - 1      # the HLT we appended ends a clean run
    g = Guest("protected")
    if cpl == 0:
        g.load(machine, PROBE_AT)
        result = g.run(PROBE_AT, max_instructions=1_000)
    else:
        result = g.run_user(machine, address=PROBE_AT, max_instructions=1_000)
    exc = result.exception
    # At CPL 3 even our final HLT is privileged: its #GP is how a clean run ends there.
    finished = result.reason == "hlt" or (exc is not None and exc.rip == last_hlt and exc.vector == 13)
    return {
        "CPL": g.cpl,
        "outcome": "ran" if finished else (str(exc) if exc else result.reason),
        "CS": f"{g.reg('cs'):#06x}",
        "EAX": f"{g.reg('eax'):#010x}",
        "EFLAGS": f"{g.reg('eflags'):#07x}",
    }


first_tries = ["add eax, 5", "mov ax, cs", "cli", "hlt", "mov eax, cr0", "lgdt [0x600]", "smsw ax"]
pd.DataFrame({(text, cpl): run_at(cpl, text) for text in first_tries for cpl in (0, 3)}).T

# %% [markdown]
# Read the table row by row. ADD runs anywhere. `mov ax, cs` shows the CPL in the low bits of
# CS: `0x0008` in the kernel, `0x0023` in user mode. CLI, HLT, MOV from CR0 and LGDT run at
# CPL 0 and stop with **#GP(0)** at CPL 3: they are privileged.
#
# Now look at the last pair. SMSW ("store machine status word") copies the low 16 bits of the
# control register CR0 — the same register that `mov eax, cr0` was not allowed to read — and it
# runs at CPL 3 without complaint. Keep it in mind.

# %% [markdown]
# ## 2 · Two kernels, one ring 0 — and Popek & Goldberg's rule
#
# A hypervisor (virtual-machine monitor, **VMM**) must control the real hardware, so it has to
# run in ring 0. But the guest operating system was written to run in ring 0 as well: it turns
# interrupts off, loads descriptor tables and switches page tables. Two programs cannot both
# own ring 0 and still be kept apart. So the VMM **deprivileges** the guest kernel: it runs it
# in a less privileged ring (ring 3, or ring 1 in VMware's and Xen's 32-bit designs) and keeps
# ring 0 for itself.
#
# That works if the VMM notices every time the guest tries something that only a ring-0
# program may do. The classic recipe is **trap and emulate**:
#
# 1. run the guest's instructions directly on the processor, at full speed;
# 2. every privileged instruction traps (#GP) into the VMM, because the guest is not at CPL 0;
# 3. the VMM *emulates* that instruction against the guest's **virtual** machine state — e.g.
#    CLI clears a *virtual* interrupt flag, LGDT records the guest's table — and resumes the
#    guest after it.
#
# In 1974 Gerald Popek and Robert Goldberg made this precise ("Formal Requirements for
# Virtualizable Third Generation Architectures"). They call an instruction
#
# * **privileged** if it traps when executed outside the most privileged mode and runs
#   normally inside it;
# * **sensitive** if it changes the machine's configuration — the privileged state: control
#   registers, descriptor tables, the interrupt flag — or if what it does *depends* on that
#   state: on the privilege level it runs at, on where the tables are, on segment descriptors.
#
# Their theorem: a trap-and-emulate VMM can be built for a machine **if every sensitive
# instruction is also privileged**. Then nothing that could betray or break the virtual machine
# escapes the trap, and the VMM delivers the three properties they asked of it: *equivalence*
# (the guest behaves as on real hardware), *resource control* (the VMM stays in charge) and
# *efficiency* (innocuous instructions run natively).
#
# An instruction that is sensitive but **not** privileged breaks this: it runs in the
# deprivileged guest without a trap, so the VMM never learns about it. It either shows the
# guest the VMM's *real* state instead of the guest's virtual one, or it quietly fails to do
# what the guest asked. SMSW above is such an instruction: it reads CR0, and CR0 is
# privileged state. The next section finds all of them.

# %% [markdown]
# ## 3 · Lab: classify instructions by experiment
#
# `rings.probe(text)` decides what an instruction is by running it, not by looking it up. It
# runs the instruction (the last one in `text`; set-up lines may come first) on fresh machines
# that start with identical registers, stack and memory, and compares what the instruction left
# behind — registers, flags, segment registers, the stack and the first page of memory:
#
# * **native world** — the guest kernel on bare hardware: CPL 0, its own tables.
# * **deprivileged world** — the same, entered at CPL 3, the way a trap-and-emulate VMM runs
#   the guest kernel. A fault here makes the instruction **privileged**.
# * if it ran at CPL 3, the deprivileged run is repeated once for each change a VMM makes to
#   the *real* privileged state while a guest runs (table below). Any difference — native vs
#   deprivileged (the factor is then *CPL*), or deprivileged vs one change — makes it
#   **sensitive-unprivileged**; no difference anywhere makes it **innocuous**.
#
# Values that change merely because a run takes longer (the time-stamp counter) are recognised
# with a control run and ignored.

# %%
pd.DataFrame([(f.key, f.phrase) for f in rings.FACTORS],
              columns=["factor", "the deprivileged run repeated ..."]).set_index("factor")

# %% [markdown]
# Four instructions to start with: one privileged, two sensitive-unprivileged, one innocuous.

# %%
examples = {"CLI": "cli", "SGDT": "sgdt [0x600]", "POPF (asks for IF = 0)": "push 0x2\npopfd",
            "ADD": "add eax, ebx"}
pd.DataFrame([{"instruction": name, **{k: v for k, v in rings.probe(text).as_dict().items()
                                      if k in ("category", "cpl0", "cpl3", "depends_on", "evidence")}}
              for name, text in examples.items()]).set_index("instruction")


# %% [markdown]
# * **CLI** faults at CPL 3: privileged, the VMM gets its trap. (The evidence also notes that it
#   *would* run at CPL 3 if the real IOPL were 3 — CLI, STI, IN and OUT are guarded by the I/O
#   privilege level (IOPL) in EFLAGS, so a VMM must keep the real IOPL below the guest's CPL.)
# * **SGDT** stores the GDTR — base and limit of the global descriptor table — and runs at
#   CPL 3. When the VMM has moved the real GDT into its own memory, the guest reads the VMM's
#   address instead of its own.
# * **POPF** loads EFLAGS from the stack. At CPL 0 it clears IF as asked; at CPL 3 the change
#   of IF is *silently dropped*: no fault, no effect. The guest kernel believes interrupts are
#   off while they are on. (The same happens in rings 1 and 2 — whenever CPL > IOPL.)
# * **ADD** behaves identically in every world.
#
# ### Try it yourself
#
# Pick a preset or type any 32-bit instruction (set-up lines first, the probed instruction
# last) and run it at CPL 0, at CPL 3, or through the whole classification.

# %%
def _badge(category: str) -> str:
    fg = "black" if category == "untestable" else "white"
    return (f"<span style='background:{CATEGORY_COLOURS[category]};color:{fg};padding:2px 8px;"
            f"border-radius:4px;font-weight:bold'>{category}</span>")


def probe_card(p) -> str:
    # An HTML card for one rings.Probe result.
    facts = p.differences and [f"<b>{html.escape(d.factor)}</b>: {html.escape(str(d))}" for d in p.differences]
    items = "".join(f"<li>{x}</li>" for x in (facts or [html.escape(p.evidence)]))
    return (f"<div style='border:1px solid #ccc;border-radius:6px;padding:8px;max-width:60em'>"
            f"<code>{html.escape(p.name)}</code> &nbsp; {_badge(p.category)}<br>"
            f"CPL 0: <b>{html.escape(p.cpl0)}</b> &nbsp;|&nbsp; CPL 3: <b>{html.escape(p.cpl3)}</b>"
            f" &nbsp;|&nbsp; depends on: <b>{html.escape(', '.join(p.depends_on) or '-')}</b>"
            f"<ul style='margin:4px 0'>{items}</ul></div>")


def run_card(cpl: int, text: str) -> str:
    r = run_at(cpl, text)
    return (f"<div style='border:1px solid #ccc;border-radius:6px;padding:8px;max-width:60em'>"
            f"at CPL {cpl}: <b>{html.escape(r['outcome'])}</b><br>"
            f"CS={r['CS']} &nbsp; EAX={r['EAX']} &nbsp; EFLAGS={r['EFLAGS']}</div>")


PRESETS = dict(rings.DEFAULT_INSTRUCTIONS)
preset = W.Dropdown(options=list(PRESETS), value="SMSW", description="preset")
source = W.Textarea(value=PRESETS["SMSW"], description="assembly",
                    layout=W.Layout(width="32em", height="5em"))
where = W.ToggleButtons(options=["CPL 0", "CPL 3", "classify"], value="classify",
                        description="run", style={"button_width": "7em"})
go = W.Button(description="run", button_style="primary", icon="play")
card = W.HTML()


def show_card(_=None):
    try:
        if where.value == "classify":
            card.value = probe_card(rings.probe(source.value))
        else:
            card.value = run_card(int(where.value[-1]), source.value)
    except Exception as exc:  # an assembly error, a budget ... : show it, keep the widget alive
        card.value = f"<pre>{html.escape(type(exc).__name__ + ': ' + str(exc))}</pre>"


def pick_preset(change):
    source.value = PRESETS[change["new"]]
    show_card()


preset.observe(pick_preset, names="value")
where.observe(show_card, names="value")
go.on_click(show_card)
show_card()
W.VBox([W.HBox([preset, where]), W.HBox([source, go]), card])

# %% [markdown]
# Widgets need a live kernel. In case you are reading a saved copy, here is the card the widget
# shows for SMSW, as plain HTML:

# %%
display(HTML(probe_card(rings.probe("smsw ax"))))

# %% [markdown]
# ### The whole table
#
# `rings.probe_all()` probes a wide set: the privileged instructions of the Intel SDM, every
# suspect from the literature and a few innocuous controls. About 50 instructions × up to 11
# runs each take a second or two.

# %%
table = rings.probe_all()
table["category"].value_counts().reindex(rings.CATEGORIES, fill_value=0).to_frame("instructions")


# %%
def colour_category(value):
    fg = "black" if value == "untestable" else "white"
    return f"background-color: {CATEGORY_COLOURS.get(value, 'white')}; color: {fg}"


shown = table[["name", "instruction", "category", "cpl0", "cpl3", "depends_on", "evidence"]]
shown.style.map(colour_category, subset=["category"]).set_properties(
    subset=["evidence"], **{"text-align": "left", "font-size": "85%"})


# %% [markdown]
# The **evidence** column is the point of the lab: each verdict carries the observation that
# produced it. A few to read closely:
#
# * the `sensitive-unprivileged` rows whose factor is **CPL** — PUSH CS, `mov ax, cs`, far CALL
#   and JMP, RETF — all reveal or act on the low bits of CS/SS, i.e. the privilege level itself;
# * LAR, LSL, VERR and VERW report on a segment descriptor *as seen from the current privilege
#   level*: at CPL 3 the kernel's own DPL-0 segments suddenly look inaccessible, and with "ring
#   compression" (the kernel's descriptors rewritten to DPL 3, as deprivileging VMMs did) the
#   guest sees DPL 3 where it wrote DPL 0;
# * PUSHF shows the *real* IF and IOPL; SMSW shows the real CR0.TS/MP bits that the VMM uses for
#   lazy FPU switching; SLDT and STR show the VMM's LDT and TSS selectors.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex01_classify_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 1 — the decision rule, then a machine you have not probed (3 points)
#
# **(a)** Write `classify(cpl0, cpl3, depends_on)`: the lab's verdict from three columns of a
# probe, for *any* probe — the tests feed it runs you have not seen (64-bit guests, invented
# outcomes), not only the rows of `table`:
#
# * `cpl0`, `cpl3` — how the native and the deprivileged run ended: `"ok"` or anything else
#   (a fault such as `"#GP(0)"`, `"#UD"`, `"#BP"`, `"INT 0x80"`, `"assembly error"` ...);
# * `depends_on` — the privileged state the results depended on, e.g. `"GDTR"`, `"CPL, DPL"`,
#   or `""` when nothing differed.
#
# Return one of `"privileged"`, `"sensitive-unprivileged"`, `"innocuous"`, `"untestable"`.
#
# **(b)** A prediction, written before anything runs it. Section 5 below meets a modern
# kernel: it sets **CR4.UMIP** (user-mode instruction prevention, CR4 bit 11) while it boots,
# as Linux does on every processor that has it. Suppose the lab's native and deprivileged
# worlds both ran with CR4.UMIP = 1 (and CR4.TSD = 0, as here). Fill `UMIP_PREDICTIONS` with
# the verdict your rule would give for each of these six rows of `table`:
# `"SIDT"`, `"STR"`, `"SMSW"`, `"PUSHF"`, `"MOV AX, CS"`, `"RDTSC"`. `rings.probe` has no UMIP
# world, so this is reasoning from the manual: SDM Vol. 3A 2.5 (the CR4.UMIP entry) and each
# instruction's "Protected Mode Exceptions" in Vol. 2.
#
# <details><summary>Hint 1 — the order of the questions</summary>
#
# The lab asks three questions in a fixed order, and the first "no" decides: did the
# instruction run at CPL 0 at all? did it run at CPL 3? did anything differ? An outcome that is
# not exactly `"ok"` is a "no", whatever its name.
# </details>
#
# <details><summary>Hint 2 — what CR4.UMIP changes</summary>
#
# With CR4.UMIP = 1, five instructions raise #GP(0) when CPL > 0: SGDT, SIDT, SLDT, SMSW and
# STR. At CPL 0 they still run. Which of the six rows are in that list, and what does your rule
# return for an instruction that runs at CPL 0 and faults at CPL 3?
# </details>
#
# <details><summary>Hint 3 — what it does not change</summary>
#
# UMIP names those five and no others. PUSHF still pushes the real IF and IOPL, MOV from CS
# still shows the CPL. RDTSC has its own CR4 bit (TSD, bit 2), which this kernel left at 0, and
# its result depends on no privileged state a VMM changes.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex01_classify", "locked": false, "schema_version": 3, "solution": true, "task": false}
def classify(cpl0: str, cpl3: str, depends_on: str) -> str:
    ### BEGIN SOLUTION
    if cpl0 != "ok":
        return "untestable"
    if cpl3 != "ok":
        return "privileged"
    return "sensitive-unprivileged" if depends_on.strip() else "innocuous"
    ### END SOLUTION


UMIP_PREDICTIONS: dict[str, str] = {}
### BEGIN SOLUTION
UMIP_PREDICTIONS = {"SIDT": "privileged", "STR": "privileged", "SMSW": "privileged",
                    "PUSHF": "sensitive-unprivileged", "MOV AX, CS": "sensitive-unprivileged",
                    "RDTSC": "innocuous"}
### END SOLUTION

# %% nbgrader={"grade": false, "grade_id": "ex01_classify_selfcheck", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Self-check (not graded): your rule against every row of this notebook's 32-bit table,
# and the shape of your predictions. The graded tests use other runs.
try:
    wrong = [(r.name, r.category, classify(r.cpl0, r.cpl3, r.depends_on)) for r in table.itertuples()]
    wrong = [w for w in wrong if w[1] != w[2]]
    print(f"classify agrees with the lab on {len(table) - len(wrong)} of {len(table)} rows")
    for name, lab, yours in wrong[:5]:
        print(f"  {name}: the lab says {lab!r}, classify says {yours!r}")
except NotImplementedError:
    print("classify: not written yet")
missing = {"SIDT", "STR", "SMSW", "PUSHF", "MOV AX, CS", "RDTSC"} - set(UMIP_PREDICTIONS)
odd = {k: v for k, v in UMIP_PREDICTIONS.items() if v not in rings.CATEGORIES}
print("UMIP_PREDICTIONS:", f"missing {sorted(missing)}" if missing else "all six rows predicted",
      f"| not a category: {odd}" if odd else "")


# %% nbgrader={"grade": true, "grade_id": "ex01_classify_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
# Test cells re-import what they use and write the expected values out literally (from the
# SDM and the rule stated in section 3), so nothing an answer cell deletes or rebinds, and no
# vtlab table, can make them pass.
from vtlab import rings

assert classify("ok", "#GP(0)", "") == "privileged"
assert classify("ok", "ok", "GDTR") == "sensitive-unprivileged"
assert classify("ok", "ok", "") == "innocuous"
assert classify("assembly error", "assembly error", "") == "untestable"
assert isinstance(UMIP_PREDICTIONS, dict) and set(UMIP_PREDICTIONS) == {
    "SIDT", "STR", "SMSW", "PUSHF", "MOV AX, CS", "RDTSC"}, "predict exactly the six rows named"
assert set(UMIP_PREDICTIONS.values()) <= {"privileged", "sensitive-unprivileged", "innocuous", "untestable"}
### BEGIN HIDDEN TESTS
# invented outcomes: no row of any table has them
assert classify("#UD", "#UD", "") == "untestable"
assert classify("#BP", "#BP", "CPL") == "untestable"
assert classify("ok", "#UD", "") == "privileged"
assert classify("ok", "#SS(0)", "GDTR") == "privileged"
assert classify("ok", "ok", "CPL, DPL") == "sensitive-unprivileged"
assert classify("ok", "ok", "  ") == "innocuous"
# 64-bit probes (this notebook only probed 32-bit code). Expected from the SDM:
# CLI at CPL 3 with IOPL 0 is #GP(0) (Vol. 2A, CLI); PUSHFQ shows the real IF/IOPL; PUSH CS
# does not exist in 64-bit mode (Vol. 2B, PUSH: "Invalid" in 64-bit mode); SYSENTER with
# IA32_SYSENTER_CS[15:2] = 0 is #GP(0) even at CPL 0 (Vol. 2B, SYSENTER); INT3 is #BP
# (Vol. 2A, INT n/INTO/INT3/INT1), a trap whose saved RIP is the next instruction (Vol. 3A
# 6.15, Table 6-1); Unicorn hands it to the host instead of the IDT, so even at CPL 0 the run
# ends there and there is nothing to compare.
EXPECTED_64 = {"cli": "privileged", "pushfq": "sensitive-unprivileged", "push cs": "untestable",
               "sysenter": "untestable", "int3": "untestable", "str ax": "sensitive-unprivileged",
               "nop": "innocuous"}
for text, category in EXPECTED_64.items():
    p = rings.probe(text, mode="long")
    got = classify(p.cpl0, p.cpl3, ", ".join(p.depends_on))
    assert got == category, f"64-bit {text}: CPL 0 {p.cpl0!r}, CPL 3 {p.cpl3!r}, depends on {p.depends_on}: got {got!r}"
# UMIP (SDM Vol. 3A 2.5): SGDT, SIDT, SLDT, SMSW, STR #GP(0) at CPL > 0; nothing else changes.
UMIP_ANSWERS = {"SIDT": "privileged", "STR": "privileged", "SMSW": "privileged",
                "PUSHF": "sensitive-unprivileged", "MOV AX, CS": "sensitive-unprivileged",
                "RDTSC": "innocuous"}
for name, category in UMIP_ANSWERS.items():
    assert UMIP_PREDICTIONS[name] == category, f"{name} under CR4.UMIP = 1 is not {UMIP_PREDICTIONS[name]!r}"
### END HIDDEN TESTS

# %% [markdown]
# ### Which privileged state gives each instruction away?
#
# Left: how many instructions fell into each class. Right: for every sensitive-unprivileged
# instruction, the factor(s) whose change altered its result — CPL means "native vs
# deprivileged", the other columns are one VMM change each.

# %%
factors = ["CPL"] + [f.key for f in rings.FACTORS]
sensitive = table[table["category"] == "sensitive-unprivileged"]
grid = np.array([[f in row.split(", ") for f in factors] for row in sensitive["depends_on"]], dtype=int)
counts = table["category"].value_counts().reindex(rings.CATEGORIES, fill_value=0)

fig = Figure(figsize=(11, 6.2), layout="constrained")
left, right = fig.subplots(1, 2, width_ratios=[1, 1.6])
bars = left.barh(counts.index[::-1], counts.values[::-1], edgecolor="black", linewidth=0.5,
                 color=[CATEGORY_COLOURS[c] for c in counts.index[::-1]])
left.bar_label(bars, padding=3)
left.set_xlabel("instructions probed (count)")
left.set_title("Classes found by experiment")
left.margins(x=0.15)

# Colour, hatching and a mark per cell, so the grid reads in greyscale too.
plots.category_grid(grid, sensitive["name"], factors, ax=right,
                    levels=[("no effect", "#ffffff", "", ""),
                            ("altered the result", CATEGORY_COLOURS["sensitive-unprivileged"], "//", "x")],
                    title="Which change altered the result (x = it did)",
                    xlabel="privileged state changed between two runs",
                    ylabel="sensitive-unprivileged instruction")
fig

# %% [markdown]
# *Figure: left, the number of probed instructions in each class; right, one row per
# sensitive-unprivileged instruction and one column per piece of privileged state. Look for
# the pattern: each "store" instruction (SGDT, SIDT, SLDT, STR, SMSW) is betrayed by exactly the
# register it stores, while the protection-checking and segment instructions all hinge on the
# CPL (and on descriptor DPLs).*

# %% [markdown]
# ## 4 · Our table beside Robin & Irvine (2000)
#
# In 2000 John Scott Robin and Cynthia Irvine analysed the Pentium's instruction set ("Analysis
# of the Intel Pentium's Ability to Support a Secure Virtual Machine Monitor", USENIX Security
# 2000) and reported **seventeen sensitive, unprivileged instructions** in two groups: ones that
# read or change *sensitive registers* and ones that depend on the *protection system*. The
# grouped list the paper is quoted with names eighteen mnemonics; `rings.ROBIN_IRVINE_2000` keeps
# all eighteen, so the comparison below has a row for each.
#
# `rings.compare_with_robin_irvine(table)` puts our experimental verdict next to each one
# ("ours" is sensitive-unprivileged if any of our probes for that mnemonic was).

# %%
ri = rings.compare_with_robin_irvine(table)
ri.style.map(colour_category, subset=["ours"]).map(
    lambda a: "font-weight: bold" if a != "agree" else "", subset=["agreement"])

# %%
ri["agreement"].value_counts()

# %% [markdown]
# The experiment confirms the published list almost everywhere. The two rows that do not
# say "agree" deserve an honest look:
#
# * **POP** (into a segment register) — *differs*. In our deprivileged world `pop ds` with the
#   kernel's data selector **faults**: the selector's DPL 0 is more privileged than CPL 3, and
#   `pop ss` must match the CPL exactly. A fault is a trap, so a trap-and-emulate VMM *would*
#   see it — here it behaves like a privileged instruction. Robin and Irvine's concern is the
#   situation the evidence column also mentions: once the VMM compresses the rings (kernel
#   descriptors rewritten to DPL 3 so the deprivileged kernel can use its own segments), the
#   same POP runs at CPL 3 without a trap, and its checks are made against the wrong CPL. Whether
#   POP "leaks" therefore depends on how the VMM sets up descriptors; our default world does not
#   compress rings. MOV into a segment register behaves the same way, but the MOV row still
#   agrees because `mov ax, cs` (MOV *from* a segment register) gives the CPL away.
# * **INT n** — *not tested*, and we should say why rather than pretend. On real hardware INT n
#   goes through the interrupt descriptor table; the processor compares the gate's DPL with the
#   CPL, and when the call succeeds the CS it pushes carries the caller's CPL — so a deprivileged
#   kernel's software interrupts behave differently. Unicorn, however, never delivers interrupts
#   through the IDT: it hands every INT n to the host program's interrupt hook. The DPL check
#   never happens, so even at CPL 0 the run just stops at the INT, and there is nothing to
#   compare. vtlab reports `untestable` instead of guessing.
#
# Two more observations from our table:
#
# * **CPUID** comes out *innocuous*: what it returns does not depend on any privileged state a
#   VMM changes. Still, it tells the guest which real processor it runs on and which features
#   that processor has, and a VMM usually wants to show a different CPU (hide features, keep the
#   model stable for migration, announce itself). Without hardware help only binary
#   translation can intercept it — which is why VT-x makes CPUID cause a VM exit *always*
#   (notebook 04).
# * You may meet the claim that these instructions "do not trap in ring 0". Nothing traps in
#   ring 0; the problem is that they do not trap *outside* ring 0, where the deprivileged guest
#   kernel runs.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex01_popek_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 2 — which condition fails, even with CR4.UMIP? (2 points)
#
# Section 2 explained why a classic trap-and-emulate VMM cannot be built for the x86 of 2000.
# Now take a processor of today with **CR4.UMIP = 1** (Exercise 1 (b): SGDT, SIDT, SLDT, SMSW
# and STR raise #GP(0) at CPL > 0). Set `pg_answer` to the letter of the true statement about
# such a processor, and set `witness` to the `name` of one row of `table` that proves it *on
# that processor* (the table itself was measured without UMIP).
#
# * **A.** Nothing fails any more: with CR4.UMIP = 1 every sensitive instruction traps at CPL 3.
# * **B.** Trap and emulate now works, but only for guest kernels deprivileged to ring 1.
# * **C.** Some sensitive instructions are still not privileged: UMIP covers five store
#   instructions, and others still run at CPL 3 without a trap, out of the VMM's sight.
# * **D.** UMIP made five sensitive instructions privileged, and Popek and Goldberg forbid an
#   instruction to be both.
#
# <details><summary>Hint 1</summary>
#
# Popek and Goldberg need *every* sensitive instruction to be privileged. Go through the
# sensitive-unprivileged rows of `table` and strike out the ones UMIP turns into #GP(0) at
# CPL 3. Is anything left?
# </details>
#
# <details><summary>Hint 2</summary>
#
# The witness must be a row whose verdict UMIP does not change. The POPF row is one kind
# (section 3 says what goes wrong at CPL 3); the rows whose factor is CPL are another.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex01_popek", "locked": false, "schema_version": 3, "solution": true, "task": false}
pg_answer = ""
witness = ""
### BEGIN SOLUTION
pg_answer = "C"
witness = "POPF"
### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "ex01_popek_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# The names of table's rows, written out here: the test does not read `table`.
ROW_NAMES = {"ADD", "CALL FAR", "CLI", "CLTS", "CPUID", "HLT", "IN", "INT n", "INVD", "INVLPG", "JMP FAR",
             "LAR", "LGDT", "LIDT", "LLDT", "LMSW", "LSL", "LTR", "MOV AX, CS", "MOV AX, SS", "MOV CR0, r32",
             "MOV CR3, r32", "MOV DS, AX", "MOV r32, CR0", "MOV r32, CR3", "MOV r32, DR7", "MOV r32, imm",
             "NOP", "OUT", "POP DS", "POP SS", "POPF", "PUSH CS", "PUSH SS", "PUSHF", "RDMSR", "RDTSC",
             "RETF", "SGDT", "SIDT", "SLDT", "SMSW", "STI", "STR", "VERR", "VERW", "WBINVD", "WRMSR", "XCHG"}
assert pg_answer in ("A", "B", "C", "D"), "answer with one capital letter"
assert witness in ROW_NAMES, "use a value from table['name']"
### BEGIN HIDDEN TESTS
assert pg_answer == "C"
# the sensitive-unprivileged instructions (Robin & Irvine 2000, as this lab measured them)
SENSITIVE_UNPRIVILEGED = {"SGDT", "SIDT", "SLDT", "STR", "SMSW", "PUSHF", "POPF", "LAR", "LSL", "VERR",
                          "VERW", "PUSH CS", "PUSH SS", "MOV AX, CS", "MOV AX, SS", "CALL FAR", "JMP FAR",
                          "RETF"}
# the five CR4.UMIP makes #GP(0) at CPL > 0 (SDM Vol. 3A 2.5)
UMIP_FIVE = {"SGDT", "SIDT", "SLDT", "SMSW", "STR"}
assert witness in SENSITIVE_UNPRIVILEGED, f"{witness!r} is not sensitive-unprivileged"
assert witness not in UMIP_FIVE, f"{witness!r} raises #GP(0) at CPL 3 once CR4.UMIP = 1"
### END HIDDEN TESTS

# %% [markdown]
# ## 5 · The red pill: a guest that notices
#
# Sensitive unprivileged instructions are not only a correctness problem; they let a guest find
# out that it is being virtualized. In 2004 Joanna Rutkowska published the "Red Pill": a handful
# of bytes that executes SIDT and looks at the IDT base. A VMM of that time had to keep the
# *real* IDT in its own memory (VMware's sat near the top of the address space), and SIDT, being
# unprivileged, shows the real one. Native Windows kept its IDT below `0xD0000000`.
#
# `rings.red_pill()` runs a small guest kernel twice — on bare hardware and deprivileged under a
# minimal trap-and-emulate VMM that moved the IDT and GDT and emulates the privileged CLI. The
# guest executes CLI, SIDT and PUSHF and decides *by itself*, in x86 code, whether it is
# virtualized.

# %%
pill = rings.red_pill()
pd.DataFrame({
    where: {"CPL": r["cpl"], "IDT base (SIDT)": f"{r['idt_base']:#010x}",
            "EFLAGS (PUSHF after CLI)": f"{r['eflags']:#06x}", "IF after CLI": r["if_after_cli"],
            "IOPL": r["iopl"], "trapped to the VMM": ", ".join(r["traps"]) or "-",
            "clues": "; ".join(r["clues"]) or "-", "verdict": r["verdict"]}
    for where, r in pill.items()})

# %% [markdown]
# Under the VMM two clues appear. SIDT returns the VMM's address `0xffc18000`. And CLI *did*
# trap — the VMM faithfully cleared the guest's **virtual** interrupt flag (`virtual_if` is
# now 0) — but PUSHF, which does not trap, reads the **real** EFLAGS, where IF is still 1. The
# VMM did its job for the privileged instruction and was betrayed by the unprivileged one.

# %%
print("the VMM's copy of the guest's IF:", pill["vmm"]["virtual_if"])
print("what PUSHF showed the guest:      IF =", pill["vmm"]["if_after_cli"])


# %% [markdown]
# ### How modern kernels shut this door: CR4.UMIP (and CR4.TSD)
#
# Everything above is true of the x86 Robin and Irvine studied in 2000, and of every processor
# since, *as long as CR4.UMIP is 0*. **User-mode instruction prevention** came much later, in
# the late 2010s (Intel's big cores have it from Ice Lake on; CPUID.(EAX=7,ECX=0):ECX bit 2
# says a processor has it). With **CR4.UMIP = 1**, SGDT, SIDT, SLDT, SMSW and STR raise
# #GP(0) whenever CPL > 0 (SDM Vol. 3A 2.5, the CR4.UMIP entry; each instruction's "Protected
# Mode Exceptions" in Vol. 2). Linux sets the bit at boot wherever the CPU has it, so a user
# program can no longer read the kernel's table addresses, and the Red Pill's SIDT at CPL 3
# traps into the kernel (which, for old programs that use these instructions, answers some of
# them with fixed dummy values).
#
# Note what UMIP does *not* do: it turns exactly those five into privileged instructions and
# leaves PUSHF, POPF, LAR, LSL, VERR, VERW, PUSH CS and the far transfers as they were. So even
# with it, a deprivileged x86 kernel could not be run by trap and emulate alone; the list of 17
# stays the right list for the processor without UMIP.
#
# **RDTSC** comes out innocuous in our table, and by Popek and Goldberg's definition it is:
# what it returns depends on no privileged state a VMM changes. It has its own gate,
# **CR4.TSD** (time-stamp disable, bit 2): with TSD = 1, RDTSC raises #GP(0) at CPL > 0 (SDM
# Vol. 2B, RDTSC). And it is the classic *timing* red pill: a guest reads the time-stamp
# counter, executes an instruction that always leaves the guest (CPUID, notebook 04), and
# reads it again. On bare hardware CPUID takes some tens to a couple of hundred cycles; a trip
# through a VMM adds the exit and the entry, a thousand cycles or more, and no VMM can make
# that round trip free. A VMM can offset or scale the guest's TSC, but hiding the cost
# completely is an arms race, not a fix.
#
# Below, a guest kernel sets one CR4 bit at CPL 0 and then the same user program runs at
# CPL 3, once per instruction.

# %% nbgrader={"grade": false, "grade_id": "ex01_umip_demo", "locked": true, "schema_version": 3, "solution": false, "task": false}
from vtlab import Cr4

KERNEL_AT = 0x3_0000   # where the kernel part goes (the user program sits at PROBE_AT)


def user_run_after(cr4_bits: int, code: str) -> str:
    """The kernel ORs ``cr4_bits`` into CR4 at CPL 0; then ``code`` runs at CPL 3."""
    g = Guest("protected")
    boot = rings.assemble(f"mov eax, cr4\nor eax, {int(cr4_bits):#x}\nmov cr4, eax\nhlt", KERNEL_AT, 32)
    g.load(boot, KERNEL_AT)
    g.run(KERNEL_AT, max_instructions=100)
    user = rings.assemble(code + "\nhlt", PROBE_AT, 32)
    exc = g.run_user(user, address=PROBE_AT, max_instructions=1_000).exception
    # the final HLT's #GP at CPL 3 is how a clean run ends (as in run_at above)
    if exc is not None and exc.rip == PROBE_AT + len(user) - 1 and exc.vector == 13:
        return "ran"
    return str(exc).split(" at ")[0] if exc is not None else "?"


CR4_SETTINGS = {"CR4 as booted": 0, "CR4.UMIP = 1": Cr4.UMIP, "CR4.TSD = 1": Cr4.TSD}
USER_CODE = {"SGDT": "sgdt [0x600]", "SIDT": "sidt [0x600]", "SLDT": "sldt ax", "SMSW": "smsw ax",
             "STR": "str ax", "PUSHF": "pushfd", "MOV AX, CS": "mov ax, cs", "RDTSC": "rdtsc"}
umip_table = pd.DataFrame({setting: {name: user_run_after(bits, code) for name, code in USER_CODE.items()}
                           for setting, bits in CR4_SETTINGS.items()})
# Key results, written from the SDM (Vol. 3A 2.5 CR4.UMIP and CR4.TSD; Vol. 2B RDTSC):
for name in ("SGDT", "SIDT", "SLDT", "SMSW", "STR"):
    assert umip_table.loc[name, "CR4 as booted"] == "ran", name
    assert umip_table.loc[name, "CR4.UMIP = 1"] == "#GP(0)", name
    assert umip_table.loc[name, "CR4.TSD = 1"] == "ran", name
assert umip_table.loc["PUSHF", "CR4.UMIP = 1"] == umip_table.loc["MOV AX, CS", "CR4.UMIP = 1"] == "ran"
assert umip_table.loc["RDTSC"].tolist() == ["ran", "ran", "#GP(0)"]
umip_table

# %% [markdown]
# *Table: how the same user-mode instruction ends at CPL 3 after the kernel set nothing, UMIP or
# TSD in CR4. Look at the columns: UMIP turns exactly the five store instructions into #GP(0),
# TSD does the same for RDTSC only, and PUSHF and `mov ax, cs` run in every column.*

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex01_redpill_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 3 — write the red-pill check (2 points)
#
# Write `red_pill_clues(sidt_image, eflags)` for a guest kernel that has just executed CLI,
# then SIDT and PUSHF:
#
# * `sidt_image` — the 6 bytes SIDT stored in 32-bit mode: a 16-bit limit, then a 32-bit base,
#   little-endian (`struct.unpack("<HI", ...)` reads them);
# * `eflags` — the value PUSHF pushed.
#
# Return a list with those of the following clues that are present, in this order:
# `"idt-high"` (the IDT base is at or above `rings.RED_PILL_THRESHOLD`, `0xD0000000`),
# `"if-still-set"` (EFLAGS.IF, bit 9, is 1 although the kernel just executed CLI) and
# `"iopl-not-0"` (EFLAGS.IOPL, bits 13:12, is not the 0 the kernel set). Native hardware gives
# an empty list. `Rflags.IF` (`0x200`) and `Rflags.IOPL` (`0x3000`, both bits) are those bits
# as masks: `eflags & Rflags.IF` is non-zero exactly when IF is 1.

# %% nbgrader={"grade": false, "grade_id": "ex01_redpill", "locked": false, "schema_version": 3, "solution": true, "task": false}
def red_pill_clues(sidt_image: bytes, eflags: int) -> list[str]:
    ### BEGIN SOLUTION
    _limit, base = struct.unpack("<HI", bytes(sidt_image[:6]))
    clues = []
    if base >= rings.RED_PILL_THRESHOLD:
        clues.append("idt-high")
    if eflags & Rflags.IF:
        clues.append("if-still-set")
    if eflags & Rflags.IOPL:
        clues.append("iopl-not-0")
    return clues
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex01_redpill_tests", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
import struct

from vtlab import rings

pill_now = rings.red_pill()          # a fresh run of the red pill, native and under a VMM


def image_of(run):
    return struct.pack("<HI", run["idt_limit"], run["idt_base"])


assert red_pill_clues(image_of(pill_now["native"]), pill_now["native"]["eflags"]) == []
assert red_pill_clues(image_of(pill_now["vmm"]), pill_now["vmm"]["eflags"]) == ["idt-high", "if-still-set"]
assert red_pill_clues(struct.pack("<HI", 0x7FF, 0x0009_1000), 0x1002) == ["iopl-not-0"]   # IOPL = 1
### BEGIN HIDDEN TESTS
assert red_pill_clues(struct.pack("<HI", 0x7FF, 0xCFFF_FFFF), 0x2) == []
assert red_pill_clues(struct.pack("<HI", 0x7FF, 0xD000_0000), 0x2) == ["idt-high"]
assert red_pill_clues(struct.pack("<HI", 0xFFF, 0x0009_1000), 0x3002) == ["iopl-not-0"]
assert red_pill_clues(struct.pack("<HI", 0xFFF, 0xFFC1_8000), 0x1246) == ["idt-high", "if-still-set", "iopl-not-0"]
assert red_pill_clues(struct.pack("<HI", 0, 0x1000), 0x200) == ["if-still-set"]
### END HIDDEN TESTS

# %% [markdown]
# ## 6 · Before VT-x: binary translation
#
# If the processor will not trap the dangerous instructions, the VMM must make sure they never
# run. **Binary translation** — VMware's approach from 1999 — never executes the guest kernel's
# code as it is. The VMM reads that code before it runs, a basic block at a time, copies every
# innocuous instruction unchanged into a *translation cache*, and replaces each sensitive one by
# a call to a routine that does the right thing against the virtual CPU: CLI clears the virtual
# IF, SGDT stores the guest's GDTR, PUSHF pushes the virtual IF and IOPL. The translated kernel
# then runs deprivileged at nearly native speed, and the sensitive instructions can no longer
# leak. (User-mode code, which touches no privileged state, ran directly.)
#
# `bt.translate` / `bt.run_translated` do this in miniature. First a short guest kernel that only
# *reads* privileged state — exactly the kind of code plain trap-and-emulate gets silently wrong:

# %%
SNOOP = '''
    pushfd              ; what are my flags?
    pop eax
    sgdt [0x600]        ; where is my GDT?
    str bx              ; which TSS is mine?
    mov cx, cs          ; which ring am I in?
    hlt
'''
snoop = bt.run_translated(SNOOP)
print("translated run matches the native one:", snoop.matches_native, snoop.differences)
print("the same code run deprivileged WITHOUT translation:", snoop.untranslated)
for d in snoop.untranslated_differences:
    print("   ", d)

# %% [markdown]
# Without translation the code runs at CPL 3 to its end and returns wrong answers with no trap
# at all: CX holds the user-mode selector `0x23` instead of the kernel's `0x08`, and the 6 bytes
# SGDT stored at 0x600 describe the VMM's GDT (`ff 03 … 05 00` = limit 0x3ff, base 0x50000)
# instead of the guest's. (The GDTR/IDTR lines compare the real registers, which the VMM
# moved.) Translated, every value matches the native run. Here is what the translator made of
# the code: each sensitive instruction became a 5-byte `call` into a stub.

# %%
print(snoop.translation.listing())

# %% [markdown]
# Now a guest kernel that does real work. It runs eight "timer ticks"; each one updates a
# counter with interrupts disabled, computes a sum in a loop of ordinary instructions, and
# prints a dot to the debug console port 0xE9. We use it for the rest of the notebook.

# %%
WORK = 1000   # iterations of the ordinary work loop per tick


def kernel(work: int = WORK) -> str:
    return f'''
    mov ecx, 8              ; eight timer ticks
tick:
    cli                     ; critical section: no interrupts while the counter changes
    mov eax, dword ptr [0x800]
    add eax, ecx
    mov dword ptr [0x800], eax
    sti
    mov edx, {work}         ; ordinary work: sum the numbers work..1
    xor ebx, ebx
work:
    add ebx, edx
    dec edx
    jnz work
    mov al, 0x2e            ; print '.' on the debug console (port 0xE9)
    out 0xe9, al
    loop tick
    hlt
'''


KERNEL = kernel()
bt_run = bt.run_translated(KERNEL)
print(bt_run.translation.listing().split("; stubs")[0])

# %%
bt_counts = pd.Series(bt_run.as_dict()).drop("untranslated")
bt_counts["instructions executed translated"] = bt_run.tc_instructions + bt_run.stub_instructions
bt_counts.to_frame("binary translation of KERNEL")

# %% [markdown]
# The translator copied the work loop byte for byte (compare the listing with the source), so
# almost all of the 24,000 instructions run exactly as natively. Each tick adds three stub
# calls (CLI, STI, OUT) and a few extra jumps, so the translated kernel executed only about
# half a percent more instructions than the native one (`overhead` is their ratio), and it
# produced the same result (`matches_native`).
#
# The toy leaves out most of what made VMware's translator hard. It translates everything
# up front and only follows direct jumps; a real translator worked lazily, on first execution,
# and had to cope with indirect jumps and calls (whose targets are only known at run time),
# self-modifying code, and guests that read their own code bytes, while protecting the
# translation cache and the virtual-CPU block from the guest. For CPU-heavy workloads the
# technique typically cost **10–40 %**; the exact figure depended heavily on how often the
# guest did sensitive things such as page-table updates, system calls and I/O.

# %% [markdown]
# ## 7 · Before VT-x: paravirtualization
#
# The other way round: if the guest kernel can be **changed**, it can simply stop using the
# problematic instructions and ask the hypervisor explicitly — a **hypercall**, the guest
# kernel's equivalent of a system call. Xen (2003) took this route: its guests ran a modified
# Linux kernel that called the hypervisor for page-table updates, I/O and so on, and kept the
# virtual interrupt flag in a page shared with the hypervisor instead of executing CLI and STI.
# With no translation and few traps it came close to native speed. The price: you need the
# guest's source code (no stock Windows), and every new kernel version must be ported and
# maintained again.
#
# vtlab's VMM understands a few hypercalls. The guest puts the number in EAX, arguments in EBX
# and ECX, and executes **VMCALL**; the result comes back in EAX.

# %%
pd.DataFrame([(h.name, int(h)) for h in Hypercall], columns=["hypercall", "number (EAX)"]).set_index("hypercall").T

# %% [markdown]
# Here is `KERNEL`, paravirtualized by hand. CLI/STI become plain stores to the virtual IF byte
# in the shared page (no trap at all); the port write becomes the PUTCHAR hypercall; HLT becomes
# SHUTDOWN. (vtlab's only VMM is a VT-x one, so our hypercall instruction is VMCALL; Xen's
# original 32-bit guests trapped into the hypervisor with a software interrupt instead. We count
# the hypercalls, and in section 8 we cost them as software traps, not as VT-x exits.)

# %%
VIRTUAL_IF = 0x900   # a byte in the page the guest shares with the hypervisor


def pv_kernel(work: int = WORK) -> str:
    return f'''
    mov ecx, 8
tick:
    mov byte ptr [{VIRTUAL_IF:#x}], 0   ; was CLI: virtual IF := 0
    mov eax, dword ptr [0x800]
    add eax, ecx
    mov dword ptr [0x800], eax
    mov byte ptr [{VIRTUAL_IF:#x}], 1   ; was STI
    mov edx, {work}
    xor ebx, ebx
work:
    add ebx, edx
    dec edx
    jnz work
    mov eax, 1              ; was OUT: hypercall PUTCHAR('.')
    mov ebx, 0x2e
    vmcall
    loop tick
    mov eax, 2              ; was HLT: hypercall SHUTDOWN
    vmcall
'''


pv_vm = VirtualMachine(pv_kernel(), mode="protected")
pv_summary = pv_vm.run(max_exits=100, max_instructions=1_000_000)
print(pv_summary)
print("console:", repr(pv_vm.output))
pv_vm.exit_counts().to_frame()

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex01_hello_task", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ### Exercise 4 — your own paravirtual guest (3 points)
#
# Write `HELLO_PV`, 32-bit assembly for a paravirtual guest that talks to the VMM only through
# hypercalls (no I/O ports, no HLT):
#
# 1. print `OK` on the VMM console with PUTCHAR, one character per call;
# 2. ask the VMM how many VM exits this VM has had so far with the **GET_EXITS** hypercall
#    (the table above has its number; the count includes the GET_EXITS exit itself, and the
#    answer comes back in EAX);
# 3. print that count as one decimal digit (the character code of the digit *n* is `0x30 + n`);
# 4. switch the VM off with SHUTDOWN.
#
# Your program must *compute* the digit from the VMM's answer: the hidden tests also run it
# behind guest code that has already caused other exits, where the count is different. The
# tests run it with `VirtualMachine(..., mode="protected")` under small budgets, so a mistake
# ends with a budget message rather than a hung kernel.
#
# <details><summary>Hint 1</summary>
#
# A hypercall takes its number in EAX and returns its result in EAX; PUTCHAR wants the
# character in BL. So the answer of GET_EXITS has to move out of EAX *before* EAX is loaded
# with the next hypercall number.
# </details>
#
# <details><summary>Hint 2</summary>
#
# `lea ebx, [eax + 0x30]` (or `mov ebx, eax` then `add ebx, 0x30`) makes the character from a
# count of 0-9.
# </details>
#
# <details><summary>Hint 3</summary>
#
# Run on its own, your guest has had two exits (the two PUTCHARs) when GET_EXITS is called, and
# GET_EXITS is the third: the console should show `OK3`, and there are five hypercalls in all.
# </details>

# %% nbgrader={"grade": false, "grade_id": "ex01_hello", "locked": false, "schema_version": 3, "solution": true, "task": false}
### BEGIN SOLUTION
HELLO_PV = '''
    mov eax, 1          ; PUTCHAR
    mov ebx, 0x4f       ; 'O'
    vmcall
    mov eax, 1
    mov ebx, 0x4b       ; 'K'
    vmcall
    mov eax, 3          ; GET_EXITS: the number of exits so far, this one included
    vmcall
    lea ebx, [eax + 0x30]   ; the count as a decimal digit
    mov eax, 1          ; PUTCHAR
    vmcall
    mov eax, 2          ; SHUTDOWN
    vmcall
'''
### END SOLUTION

# %% nbgrader={"grade": false, "grade_id": "ex01_hello_selfcheck", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Self-check (not graded): run your guest once and show what the VMM saw.
if "HELLO_PV" not in globals():
    print("HELLO_PV: not written yet")
else:
    try:
        check_vm = VirtualMachine(HELLO_PV, mode="protected")
        print(check_vm.run(max_exits=20, max_instructions=10_000))
        print("console:", repr(check_vm.output), "| exits:", {str(k): int(v) for k, v in check_vm.exit_counts().items()})
    except Exception as exc:           # an assembly error or a budget: show it as a message
        print(f"{type(exc).__name__}: {exc}")

# %% nbgrader={"grade": true, "grade_id": "ex01_hello_tests", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from vtlab import VirtualMachine, VmState

hello_vm = VirtualMachine(HELLO_PV, mode="protected")
hello = hello_vm.run(max_exits=20, max_instructions=10_000)
print(hello)
assert hello_vm.output.startswith("OK"), f"the console shows {hello_vm.output!r}"
assert len(hello_vm.output) == 3 and hello_vm.output[2].isdigit(), "OK, then one digit"
assert hello.state is VmState.SHUTDOWN, "end with the SHUTDOWN hypercall"
### BEGIN HIDDEN TESTS
assert hello_vm.output == "OK3", f"on its own the count at GET_EXITS is 3, the console shows {hello_vm.output!r}"
assert hello.exits == 5, f"expected 5 hypercalls (O, K, GET_EXITS, digit, shutdown), saw {hello.exits} exits"
assert set(hello_vm.trace.to_dataframe()["reason"]) == {"VMCALL"}
assert "IO_INSTRUCTION" not in hello_vm.exit_counts().index
# behind one and two CPUID exits (CPUID always exits, SDM Vol. 3C 26.1.2) the count grows
for before, digit in (("mov eax, 0\ncpuid\n", "4"), ("mov eax, 0\ncpuid\nmov eax, 0\ncpuid\n", "5")):
    behind = VirtualMachine(before + HELLO_PV, mode="protected")
    assert behind.run(max_exits=20, max_instructions=10_000).state is VmState.SHUTDOWN
    assert behind.output == "OK" + digit, f"after {before.count('cpuid')} CPUID exit(s): {behind.output!r}"
### END HIDDEN TESTS

# %% [markdown]
# ## 8 · What each answer costs
#
# Let's put the techniques side by side on the same kernel, as far as vtlab can measure them.
# For comparison we add the answer of notebook 02: the *unmodified* kernel run with VT-x, where
# it keeps CPL 0 and only the OUT and HLT instructions leave the guest (VM exits).

# %%
vtx_vm = VirtualMachine(KERNEL, mode="protected")
vtx_summary = vtx_vm.run(max_exits=100, max_instructions=1_000_000)
assert vtx_vm.output == pv_vm.output == "." * 8

measured = pd.DataFrame([
    {"technique": "native (bare hardware)", "guest kernel": "as written", "kernel runs at": "CPL 0",
     "instructions executed": bt_run.guest_instructions, "VMM involvement": 0, "how the VMM gets control": "-"},
    {"technique": "binary translation", "guest kernel": "as written, translated by the VMM",
     "kernel runs at": "CPL 3", "instructions executed": bt_run.tc_instructions + bt_run.stub_instructions,
     "VMM involvement": bt_run.sensitive_executed, "how the VMM gets control": "calls into stubs (no trap)"},
    {"technique": "paravirtualization", "guest kernel": "source modified", "kernel runs at": "CPL 0*",
     "instructions executed": pv_summary.instructions, "VMM involvement": pv_summary.exits,
     "how the VMM gets control": "hypercalls"},
    {"technique": "VT-x (notebook 02)", "guest kernel": "as written", "kernel runs at": "CPL 0, VMX non-root",
     "instructions executed": vtx_summary.instructions, "VMM involvement": vtx_summary.exits,
     "how the VMM gets control": "VM exits (OUT, HLT)"},
]).set_index("technique")
measured


# %% [markdown]
# (*Xen's 32-bit guests actually ran their kernels in ring 1; in vtlab the paravirtual guest runs
# under the VT-x VMM, which is why it is at CPL 0 here.)
#
# What "instructions executed" counts: for the native and the translated runs, every
# instruction the processor completed; for the two rows run under vtlab's VMM, the instructions
# the *guest* completed, the definition notebook 02 uses. An instruction that causes a VM exit
# does not complete in the guest (SDM Vol. 3C 28.1: the exit happens instead of it, and the VMM
# finishes its work). So the VT-x row is exactly its 9 exits (8 OUT, 1 HLT) short of the native
# count, and the paravirtual kernel's 9 VMCALLs are not in its count either.

# %% nbgrader={"grade": false, "grade_id": "ex01_count_probe", "locked": true, "schema_version": 3, "solution": false, "task": false}
# Key result: the exiting instructions are the whole difference between the two counts.
assert bt_run.guest_instructions - vtx_summary.instructions == vtx_summary.exits == 9
assert pv_summary.exits == 9 and set(pv_vm.trace.to_dataframe()["reason"]) == {"VMCALL"}
print(f"native {bt_run.guest_instructions:,} - VT-x {vtx_summary.instructions:,} = "
      f"{bt_run.guest_instructions - vtx_summary.instructions} = the {vtx_summary.exits} VM exits")

# %% [markdown]
# Instruction counts say nothing about time, though: a trip into the VMM costs far more than an
# instruction. `vtlab.cost` turns the VT-x trace into cycle estimates for all three techniques on
# a chosen processor, from published measurements where they exist (its assumptions are printed
# below). We ask for two processors: the Pentium 4 of 2005, the first with VT-x, and a generic
# modern core — and for three versions of the kernel, with less or more ordinary work between
# the sensitive operations.

# %%
def techniques(work: int, cpu: str) -> pd.DataFrame:
    vm = VirtualMachine(kernel(work), mode="protected")
    summary = vm.run(max_exits=100, max_instructions=5_000_000)
    est = cost.compare_techniques(vm.trace, cpu=cpu, native_instructions=summary.instructions)
    return est["overhead_pct"]


costs = pd.DataFrame({(f"WORK={w}", cpu): techniques(w, cpu)
                      for w in (100, 1_000, 10_000) for cpu in ("prescott", "generic-modern")})
costs.columns.names = ["kernel", "CPU profile"]
# Small overheads read best in %, large ones as a factor of the native time (x651, not 65,008 %).
costs.map(plots.overhead_text)

# %%
for line in cost.compare_techniques(vtx_vm.trace, cpu="prescott")["assumptions"]:
    print("-", line)
print()
for line in cost.ASSUMPTIONS:
    print("-", line)

# %%
fig = Figure(figsize=(12, 4.6), layout="constrained")
axes = fig.subplots(1, 2, sharey=True)
for ax, cpu in zip(axes, ("prescott", "generic-modern")):
    plots.technique_comparison(vtx_vm.trace, cpu=cpu, native_instructions=vtx_summary.instructions, ax=ax)
axes[1].set_ylabel("")
fig.suptitle(f"KERNEL (WORK={WORK}): estimated cycles, native work + virtualization overhead")
fig

# %% [markdown]
# *Figure: estimated cycles for `KERNEL` under each technique on the 2005 Pentium 4 (left) and a
# modern core (right); the blue part is the guest's own work, the hatched part the overhead,
# labelled in percent. Look at the VT-x bar: on the first VT-x processor a VM exit cost about
# 2,400 cycles, and for this kernel VT-x comes out **behind** binary translation — the surprise
# VMware reported in 2006 for many workloads — while on a modern core, with exits several times
# cheaper, it is the cheapest of the three.*
#
# Now read the table above along each row: the overhead of every technique falls as the amount
# of ordinary work between two sensitive operations grows. The cost is paid per *sensitive
# event*, not per instruction — a lesson that returns in notebook 04. The ranking depends on the
# workload, too: at `WORK=10000` binary translation is the most expensive, because the model
# charges translated code a 10 % slowdown (its middle estimate). Our toy executed only about
# 0.5 % more instructions, but a real translator also pays for looking up the targets of
# indirect jumps and returns, for translating code as it is first reached, and for keeping the
# translation cache consistent.

# %% [markdown]
# ## 9 · Why the hardware had to change
#
# By the early 2000s the demand for virtual machines was growing fast: data centres wanted to
# consolidate many lightly loaded servers onto a few machines, developers wanted isolated and
# disposable environments, and security researchers wanted sandboxes. Everything in this
# notebook worked, but each answer carried a burden:
#
# * **trap and emulate** alone is impossible on x86: the sensitive unprivileged instructions of
#   section 3 leak the VMM's state or silently misbehave (section 5);
# * **binary translation** is correct for unmodified guests but is a large, subtle piece of
#   software, and it costs time whenever the guest does something sensitive;
# * **paravirtualization** is fast, but only for guests whose source you can change and keep
#   changing;
# * and memory needed its own trick, **shadow page tables** (the VMM maintains the page tables
#   the processor really uses and keeps them in step with the guest's), which we meet later.
#
# Intel's answer, **VT-x** (first processors in November 2005), does not squeeze the guest into
# another ring. It adds a new dimension: *VMX root operation* for the VMM and *VMX non-root
# operation* for guests. A guest kernel keeps ring 0 — CPL 0 — inside non-root operation, so
# POPF, PUSHF, SGDT and friends see exactly what the guest set up; and the processor itself
# hands control to the VMM (a **VM exit**) for every event the VMM asked to see, plus a few it
# always sees, such as CPUID. The last row of `measured` already ran that way. Notebook 02 opens
# the box.

# %% [markdown] nbgrader={"grade": false, "grade_id": "ex01_recap", "locked": true, "schema_version": 3, "solution": false, "task": false}
# ## Recap
#
# * x86 has **four rings**; operating systems use ring 0 (kernel) and ring 3 (applications). The
#   **CPL** is the low two bits of CS. A **privileged instruction** runs only at CPL 0 and raises
#   **#GP** elsewhere (CLI, LGDT, HLT, MOV CR0 ...).
# * A hypervisor needs ring 0, so it **deprivileges** the guest kernel and relies on **trap and
#   emulate**. **Popek & Goldberg (1974)**: this works if every **sensitive** instruction (one that
#   changes or depends on privileged state) is **privileged**.
# * x86 breaks the rule. Running single instructions at CPL 0 and CPL 3 under the changes a VMM
#   makes, we found the **sensitive unprivileged** ones: SGDT, SIDT, SLDT, STR, SMSW, PUSHF,
#   POPF, LAR, LSL, VERR, VERW, PUSH CS/SS, MOV from CS/SS, far CALL/JMP/RET — Robin & Irvine's
#   list of 17 (18 mnemonics), except POP (traps in our set-up unless rings are compressed) and
#   INT n (untestable: Unicorn does not deliver interrupts through the IDT).
# * Such instructions let a guest detect the VMM (**red pill**: SIDT base, PUSHF's IF/IOPL) and
#   make a deprivileged kernel misbehave silently (POPF drops IF). RDTSC is the *timing* red
#   pill (an exiting instruction takes far longer under a VMM); CR4.TSD makes it #GP at CPL > 0.
# * Modern kernels set **CR4.UMIP**: SGDT, SIDT, SLDT, SMSW and STR then raise #GP(0) at
#   CPL > 0 (SDM Vol. 3A 2.5). That closes the store instructions' leak and nothing else; the
#   list of 17 describes the x86 without UMIP.
# * **Binary translation** (VMware) rewrites sensitive instructions into calls to the VMM; it
#   runs unmodified guests, at 10–40 % cost on CPU-heavy work. **Paravirtualization** (Xen)
#   replaces them in the guest's source with **hypercalls** and shared-memory flags; it is fast
#   but needs a modified guest. Both cost per sensitive event.
# * **VT-x** (2005) adds VMX root and non-root operation so that the guest keeps ring 0 and the
#   hardware delivers the traps. Next: **02 · VMX root and non-root operation**.

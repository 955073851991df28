"""The numbers of vtlab's cycle-cost model, each with where it comes from.

Everything :mod:`vtlab.analysis.cost` computes with lives here: the sources
(:data:`SOURCES`), the record of one number and its provenance (:class:`CostFigure`),
the cost categories of VM exits, the VMM's handling costs (:data:`VMM_HANDLING`), the
costs of binary translation and paravirtualization (:data:`BT_COSTS`,
:data:`PV_COSTS`), and the CPU generations (:class:`CpuProfile`, :data:`PROFILES`).
This module is long because it is a table; read the notes beside the numbers.  Every
name is also importable from :mod:`vtlab.analysis.cost`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

Use = Literal["low", "mid", "high"]

# --------------------------------------------------------------------------- sources
#: Every source the numbers below come from: short key -> full reference.
SOURCES: Mapping[str, str] = MappingProxyType({
    "adams-agesen-2006": (
        "K. Adams and O. Agesen (VMware), \"A Comparison of Software and Hardware "
        "Techniques for x86 Virtualization\", ASPLOS XII, 2006. Measured on a 3.8 GHz "
        "Pentium 4 672 (Prescott), the first VT-x part; compares VMware's binary "
        "translator with a hardware-assisted VMM."),
    "intel-transition-chart": (
        "Intel's published VMX transition (VM exit + VM entry) latency by processor "
        "generation, Prescott to Sandy Bridge (Intel virtualization/IDF presentations); "
        "reproduced in VMware's 2009 performance blog chart and in Agesen et al., "
        "USENIX ATC 2012, Fig. 1. Values are read off a bar chart, so they are approximate."),
    "intel-penryn-2007": (
        "Intel's Penryn disclosure (P. Gelsinger press briefing, March 2007, reported by "
        "Ars Technica and vmblog.com, 2007-03-29): VM entry/exit transition times 25 to 75 "
        "percent lower than on Core 2 (Merom)."),
    "vmware-2009": (
        "S. Drummonds (VMware), \"Newer processors and virtualization performance\", VMware "
        "Communities blog, 2009-06-02: chart of Intel's VM-exit latency falling from "
        "NetBurst (Prescott, Cedar Mill) to Core (Merom, Penryn) to Nehalem."),
    "agesen-2012": (
        "O. Agesen, J. Mattson, R. Rugina and J. Sheldon (VMware), \"Software Techniques "
        "for Avoiding Hardware Virtualization Exits\", USENIX ATC 2012: exits remain "
        "expensive on current parts; handling a cluster of exiting instructions per exit "
        "saves transition costs."),
    "kvm-unit-tests": (
        "kvm-unit-tests x86/vmexit.c microbenchmarks (cpuid, vmcall, inl_from_kernel, "
        "outl_to_kernel, inl_from_qemu on unassigned port 0x1234, rd/wr_tsc_adjust_msr) and "
        "the results posted with KVM patches on the KVM mailing list (kvm@vger.kernel.org): "
        "a whole null exit (cpuid, vmcall) costs roughly 1,000-1,300 cycles on Haswell to "
        "Skylake hosts, hardware round trip and KVM's handler together."),
    "bonzini-2019": (
        "P. Bonzini, \"[PATCH 00/43] VMX optimizations\", KVM mailing list, 2019: "
        "vmexit.flat in a *nested* (L2) guest: cpuid 14,886 -> 13,142 cycles, "
        "inl_from_kernel 15,218 -> 13,518, inl_from_qemu 46,747 -> 44,826."),
    "kuznetsov-2018": (
        "V. Kuznetsov, \"x86/kvm/vmx: use enlightened VMCS\" (Linux KVM patch, 2018): a "
        "tight CPUID loop in a nested guest on Hyper-V drops from 18,890 to 8,304 cycles."),
    "ben-yehuda-2010": (
        "M. Ben-Yehuda et al., \"The Turtles Project: Design and Implementation of Nested "
        "Virtualization\", OSDI 2010: every L2 exit becomes many L1 exits (exit "
        "multiplication)."),
    "barham-2003": (
        "P. Barham et al., \"Xen and the Art of Virtualization\", SOSP 2003: "
        "paravirtualization; the guest kernel calls the hypervisor through hypercalls "
        "(a software trap into ring 0) and batches updates such as page-table writes."),
    "linux-l1tf": (
        "Linux kernel documentation, admin-guide/hw-vuln/l1tf.rst and mds.rst: on affected "
        "Intel parts KVM flushes the L1 data cache on VM entry (conditionally by default) "
        "and clears CPU buffers (VERW) before VM entry, which adds to the cost of an exit."),
    "course-page": (
        "The course's VT-x introduction page (COURSE.md source material): a transition "
        "costs typically 500-2,000 cycles plus the VMM's work; exit categories benign / "
        "instruction emulation / memory / device emulation / interrupt / error; binary "
        "translation costs 10-40% on CPU-intensive workloads."),
    "model": (
        "vtlab's own estimate (no published measurement): an order of magnitude chosen to "
        "be consistent with the sources named in the note; treat it as a teaching "
        "assumption and change it if you have a measurement."),
})

FigureKind = Literal["measured", "vendor", "derived", "estimate", "convention"]


@dataclass(frozen=True)
class CostFigure:
    """One number of the model: a cycle count (or a fraction) with its provenance.

    Attributes:
        low, high: the range; equal when a single value was published.
        source: key into :data:`SOURCES` (``" + "`` joins several keys).
        kind: ``"measured"`` (a published measurement), ``"vendor"`` (the CPU
            vendor's figure), ``"derived"`` (computed from published numbers, see
            the note), ``"estimate"`` (vtlab's order-of-magnitude assumption) or
            ``"convention"`` (a modelling choice, e.g. 0 for a fatal exit).
        note: how the number was obtained and what it covers.
    """

    low: float
    high: float
    source: str
    kind: FigureKind = "measured"
    note: str = ""

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"CostFigure range must have low <= high, got {self.low} > {self.high}")
        for key in self.source_keys:
            if key not in SOURCES:
                raise ValueError(f"unknown source key {key!r}")

    @property
    def mid(self) -> float:
        """The middle of the range."""
        return (self.low + self.high) / 2

    @property
    def is_range(self) -> bool:
        """True when only a range is known (low < high)."""
        return self.low != self.high

    @property
    def source_keys(self) -> list[str]:
        """The :data:`SOURCES` keys this number rests on."""
        return [k.strip() for k in self.source.split("+") if k.strip()]

    @property
    def citation(self) -> str:
        """The full reference(s) of :attr:`source`."""
        return " | ".join(SOURCES[k] for k in self.source_keys)

    def pick(self, use: Use = "mid") -> float:
        """``low``, ``mid`` or ``high``."""
        if use == "low":
            return self.low
        if use == "high":
            return self.high
        if use == "mid":
            return self.mid
        raise ValueError(f"use must be 'low', 'mid' or 'high', not {use!r}")

    def __str__(self) -> str:
        value = f"{self.low:,.0f}" if not self.is_range else f"{self.low:,.0f}-{self.high:,.0f}"
        return f"{value} ({self.kind}; {self.source})"


# ----------------------------------------------------------------- cost categories
#: Handling-cost categories, after the course page's table of exit categories.
COST_CATEGORIES: tuple[str, ...] = (
    "benign",            # CPUID, HLT, VMCALL, MONITOR/MWAIT, PAUSE: a quick answer
    "instruction",       # I/O to a device inside the VMM, MSR, CR, RDTSC ...: decode + emulate
    "memory",            # EPT violation / misconfiguration, APIC-access page: page-table work
    "userspace-device",  # I/O or MMIO to a device model in a user-space process (QEMU)
    "interrupt",         # external interrupts, NMIs, windows, reflected exceptions
    "fatal",             # triple fault, failed VM entry: the VM stops; not a running cost
)

#: Exit reasons whose cost category differs from what their SDM-style display
#: category (``vtlab.arch.EXIT_REASON_INFO[r].category``) would give.
REASON_COST_CATEGORY: Mapping[str, str] = MappingProxyType({
    "CPUID": "benign",
    "HLT": "benign",
    "VMCALL": "benign",                # a null hypercall costs about what CPUID costs (kvm-unit-tests)
    "MWAIT_INSTRUCTION": "benign",
    "MONITOR_INSTRUCTION": "benign",
    "PAUSE_INSTRUCTION": "benign",
    "RDTSC": "instruction",
    "RDTSCP": "instruction",
    "IO_INSTRUCTION": "instruction",   # unless the device is in user space, see classify()
    "MSR_READ": "instruction",
    "MSR_WRITE": "instruction",
    "CR_ACCESS": "instruction",
    "EPT_VIOLATION": "memory",
    "EPT_MISCONFIG": "memory",
    "EXTERNAL_INTERRUPT": "interrupt",
    "EXCEPTION_NMI": "interrupt",
    "TRIPLE_FAULT": "fatal",
    "INVALID_STATE": "fatal",
    "MSR_LOAD_FAIL": "fatal",
    "MCE_DURING_VMENTRY": "fatal",
})

# Display category (vtlab.arch.EXIT_CATEGORIES) -> cost category, for everything else.
_DISPLAY_TO_COST = {
    "benign": "benign",
    "instruction": "instruction",
    "io": "instruction",
    "memory": "memory",
    "interrupt": "interrupt",
    "exception": "interrupt",          # reflecting an exception = injecting an event
    "entry-failure": "fatal",
    "other": "instruction",
}

#: Handler names that mean "this exit went to a device model in user space".
USERSPACE_HANDLERS: frozenset[str] = frozenset({"handle_io_userspace", "handle_mmio_userspace"})

# ---------------------------------------------------------------- handling costs
_F = CostFigure

#: The VMM's software cost per exit, by cost category, on top of the hardware round
#: trip.  It is the VMM's code that costs these cycles, so one table serves every
#: CPU profile (see ASSUMPTIONS).
VMM_HANDLING: Mapping[str, CostFigure] = MappingProxyType({
    "benign": _F(400, 1_000, "kvm-unit-tests", "derived",
                 "A whole null exit (cpuid, vmcall) costs ~1,000-1,300 cycles in KVM on "
                 "Haswell-Skylake; minus the 300-600-cycle hardware round trip this leaves "
                 "~400-1,000 cycles of handler: save/restore registers, dispatch, emulate, "
                 "advance RIP."),
    "instruction": _F(500, 2_500, "kvm-unit-tests + course-page", "estimate",
                      "Decode and emulate one instruction in the VMM (an in-kernel port such "
                      "as inl_from_kernel/outl_to_kernel, an MSR such as IA32_TSC_ADJUST, a "
                      "CR write with EPT): somewhat more than a null exit. A CR3 write under "
                      "shadow paging costs far more and is not modelled separately."),
    "memory": _F(2_000, 10_000, "model + course-page", "estimate",
                 "An EPT violation that the VMM resolves by filling in EPT entries for memory "
                 "it already has: a software walk of the guest-physical map plus the entries. "
                 "The course page calls it 'variable'; faults that allocate or swap host "
                 "memory cost far more."),
    "userspace-device": _F(5_000, 30_000, "kvm-unit-tests + bonzini-2019 + course-page", "estimate",
                           "Exit to the kernel, return to the VMM's user-space process "
                           "(KVM_EXIT_IO), run the device model, re-enter with KVM_RUN. "
                           "kvm-unit-tests' inl_from_qemu (an empty port) is the floor; real "
                           "device models cost more; nested, inl_from_qemu - inl_from_kernel "
                           "is ~31,000 cycles (bonzini-2019). Real device work (disk, "
                           "network) can take milliseconds and is not modelled."),
    "interrupt": _F(1_000, 4_000, "model + course-page", "estimate",
                    "Take the host interrupt, find the target vCPU and inject the event on the "
                    "next VM entry; 'low to medium' on the course page. Posted interrupts and "
                    "APIC virtualization remove most of these exits."),
    "fatal": _F(0, 0, "model", "convention",
                "A triple fault or failed VM entry stops the VM: it is not a per-exit running "
                "cost ('N/A (fatal)' on the course page), so the model charges nothing."),
})

#: Binary translation (VMware-style, no VT-x): cost per translated sensitive
#: instruction by cost category, per translated block, and the slowdown of
#: translated code.
BT_COSTS: Mapping[str, CostFigure] = MappingProxyType({
    "benign": _F(50, 500, "adams-agesen-2006 + model", "estimate",
                 "The translator replaces CPUID/HLT/hypercall-like instructions with inline "
                 "code or a call into the VMM, with no hardware world switch."),
    "instruction": _F(200, 1_500, "adams-agesen-2006 + model", "estimate",
                      "I/O, MSR and CR accesses become calls into the VMM's emulation, "
                      "again with no hardware world switch."),
    "memory": _F(2_000, 10_000, "adams-agesen-2006 + model", "estimate",
                 "Without EPT a BT VMM uses shadow page tables: hidden page faults and traced "
                 "page-table writes, about as costly as the hardware VMM's memory exits."),
    "userspace-device": _F(5_000, 30_000, "model", "estimate",
                           "The device model is the same whatever the CPU technique: same "
                           "cost as under VT-x (see VMM_HANDLING)."),
    "interrupt": _F(1_000, 4_000, "model", "estimate",
                    "Interrupt delivery into the translated guest costs about what it costs "
                    "under VT-x."),
    "fatal": _F(0, 0, "model", "convention", "The VM stops."),
    "per_block": _F(1_000, 10_000, "adams-agesen-2006 + model", "estimate",
                    "One-off cost of translating a basic block into the translation cache, "
                    "paid once per distinct block (the trace's distinct exit sites stand in "
                    "for blocks)."),
    "code_slowdown": _F(0.0, 0.2, "adams-agesen-2006 + course-page", "estimate",
                        "Fraction added to the native time of translated (guest kernel) code: "
                        "most instructions are copied unchanged, indirect branches and "
                        "returns need lookups. The course page quotes 10-40% overall for "
                        "CPU-intensive workloads."),
})

#: Paravirtualization (Xen-style, no VT-x): the cost of one hypercall's trap into the
#: hypervisor and back; the hypervisor's work per call comes from VMM_HANDLING.
PV_COSTS: Mapping[str, CostFigure] = MappingProxyType({
    "hypercall": _F(300, 1_500, "barham-2003 + model", "estimate",
                    "A software trap into the hypervisor and the return: a system-call-like "
                    "ring transition plus the hypervisor's entry/exit code, with no VMX "
                    "state save/restore."),
})


@dataclass(frozen=True)
class CpuProfile:
    """One CPU generation's VT-x costs.

    Attributes:
        name: key in :data:`PROFILES` (``"prescott"``, ``"skylake"`` ...).
        generation: the products, e.g. ``"Pentium 4 662/672"``.
        year: year of first shipment.
        microarchitecture: the core, e.g. ``"NetBurst (Prescott, 90 nm)"``.
        roundtrip: hardware cost of one VM exit plus one VM entry (:class:`CostFigure`).
        handling: the VMM's cost per exit, by cost category (:data:`COST_CATEGORIES`).
        notes: what else matters on this generation (features, mitigations).
    """

    name: str
    generation: str
    year: int
    microarchitecture: str
    roundtrip: CostFigure
    handling: Mapping[str, CostFigure] = field(default_factory=lambda: VMM_HANDLING)
    notes: str = ""

    @property
    def roundtrip_cycles(self) -> tuple[float, float]:
        """(low, high) cycles of a VM exit + VM entry round trip."""
        return (self.roundtrip.low, self.roundtrip.high)

    @property
    def handling_cycles(self) -> dict[str, tuple[float, float]]:
        """Cost category -> (low, high) handling cycles."""
        return {c: (f.low, f.high) for c, f in self.handling.items()}

    @property
    def figures(self) -> dict[str, CostFigure]:
        """Every number of the profile: ``"roundtrip"`` and each cost category."""
        return {"roundtrip": self.roundtrip, **dict(self.handling)}

    @property
    def sources(self) -> dict[str, str]:
        """The source (full reference) of every number, keyed like :attr:`figures`."""
        return {k: f.citation for k, f in self.figures.items()}

    def cycles_per_exit(self, category: str, use: Use = "mid") -> float:
        """Round trip plus handling for one exit of ``category``."""
        if category == "fatal":
            return 0.0
        return self.roundtrip.pick(use) + self.handling[category].pick(use)


# ------------------------------------------------------------------------ profiles
def _chart(low: float, high: float, note: str) -> CostFigure:
    return CostFigure(low, high, "intel-transition-chart + vmware-2009", "vendor", note)


_MODERN_NOTE = (
    "No per-generation hardware figure has been published since Sandy Bridge. Lower "
    "bound: the Sandy Bridge figure (the transition has stayed at a few hundred cycles); "
    "upper bound: a whole KVM null exit (~1,000-1,300 cycles, kvm-unit-tests) minus the "
    "few hundred cycles of KVM's own code on that path.")
_MODERN = CostFigure(300, 600, "kvm-unit-tests + intel-transition-chart", "derived", _MODERN_NOTE)

_MITIGATIONS = (
    "Since 2018 Linux/KVM adds speculative-execution mitigations on this part (IBRS/IBPB "
    "or retpolines, an L1D flush on VM entry for L1TF, VERW for MDS; source linux-l1tf), "
    "which can add hundreds to thousands of cycles to an exit; not included.")

#: The CPU profiles, oldest first.  ``PROFILES[name]`` is a :class:`CpuProfile`.
PROFILES: Mapping[str, CpuProfile] = MappingProxyType({p.name: p for p in [
    CpuProfile(
        "prescott", "Pentium 4 662/672", 2005, "NetBurst (Prescott, 90 nm)",
        CostFigure(2_409, 2_409, "adams-agesen-2006", "measured",
               "VM exit + VM entry round trip measured on a Pentium 4 672, the first VT-x "
               "parts (the 662 has the same core). Adams & Agesen found that at this cost "
               "the hardware VMM often lost to VMware's binary translator."),
        notes="First VT-x processors (November 2005). No EPT, no VPID: a VMM shadows the "
              "guest's page tables and the TLB is flushed on every transition."),
    CpuProfile(
        "merom", "Core 2 Duo (Merom/Conroe)", 2006, "Core (65 nm)",
        _chart(900, 1_100, "~1,000 cycles on Intel's chart (read off the bars, about +-10%)."),
        notes="Less than half of Prescott's transition cost; still no EPT."),
    CpuProfile(
        "penryn", "Core 2 (Penryn/Wolfdale/Harpertown)", 2007, "Penryn (45 nm)",
        CostFigure(550, 700, "intel-transition-chart + intel-penryn-2007", "vendor",
               "~600-700 cycles on Intel's chart; consistent with Intel's claim of 25-75% "
               "faster VM transitions than Merom."),
        notes="Shipped from November 2007 (Xeon 5400, Core 2 Extreme QX9650)."),
    CpuProfile(
        "nehalem", "Core i7 (Bloomfield), Xeon 5500", 2008, "Nehalem (45 nm)",
        _chart(450, 550, "~500 cycles on Intel's chart."),
        notes="First Intel parts with EPT and VPID: no more shadow page tables or TLB "
              "flushes on every transition."),
    CpuProfile(
        "westmere", "Xeon 5600, Core i3/i5 (Clarkdale)", 2010, "Westmere (32 nm)",
        _chart(350, 450, "~400 cycles on Intel's chart."),
        notes="Adds unrestricted guest: real-mode guests run without emulation."),
    CpuProfile(
        "sandy-bridge", "2nd-gen Core, Xeon E5", 2011, "Sandy Bridge (32 nm)",
        _chart(300, 400, "~350 cycles on Intel's chart, its last generation."),
        notes="The last generation on Intel's transition-latency chart."),
    CpuProfile(
        "ivy-bridge", "3rd-gen Core, Xeon E5 v2", 2012, "Ivy Bridge (22 nm)",
        CostFigure(300, 450, "intel-transition-chart + model", "estimate",
               "No published figure; Ivy Bridge is Sandy Bridge's core on a new process, so "
               "the Sandy Bridge range, widened."),
        notes="Xeon E5 v2 adds APIC virtualization (fewer interrupt-related exits)."),
    CpuProfile("haswell", "4th-gen Core, Xeon E5 v3", 2013, "Haswell (22 nm)", _MODERN,
               notes="Adds VMCS shadowing (cheaper nested VMREAD/VMWRITE) and VMFUNC. " + _MITIGATIONS),
    CpuProfile("broadwell", "5th-gen Core, Xeon E5 v4", 2014, "Broadwell (14 nm)", _MODERN,
               notes="Adds page-modification logging (PML). " + _MITIGATIONS),
    CpuProfile("skylake", "6th-gen Core, Xeon Scalable (Skylake-SP)", 2015, "Skylake (14 nm)",
               _MODERN, notes="Adds TSC scaling. " + _MITIGATIONS),
    CpuProfile("cascade-lake", "2nd-gen Xeon Scalable", 2019, "Cascade Lake (14 nm)", _MODERN,
               notes="Hardware fixes for Meltdown and L1TF remove the L1D flush on VM entry."),
    CpuProfile("ice-lake", "3rd-gen Xeon Scalable (Ice Lake-SP)", 2021, "Sunny Cove (10 nm)",
               _MODERN, notes="Adds 5-level EPT for 57-bit guest-physical addresses."),
    CpuProfile("sapphire-rapids", "4th-gen Xeon Scalable", 2023, "Golden Cove (Intel 7)",
               _MODERN, notes="A current server core."),
    CpuProfile("granite-rapids", "Xeon 6 (6900P)", 2024, "Redwood Cove (Intel 3)", _MODERN,
               notes="The newest server core here; no VT-x latency figure has been published."),
    CpuProfile("generic-modern", "Generic modern Intel core (Haswell or later)", 2024,
               "any core from Haswell on", _MODERN,
               notes="The default: a few hundred cycles of hardware transition plus a "
                     "KVM-like in-kernel VMM. Pick a named profile to compare generations."),
]})

#: The profile :func:`estimate` uses when none is given.
DEFAULT_PROFILE: str = "generic-modern"

#: What the model assumes; shown with every estimate.
ASSUMPTIONS: tuple[str, ...] = (
    "Native time = guest instructions retired x cpi cycles (cpi = 1.0 unless given); "
    "caches, TLBs and pipelines are not modelled.",
    "Every exit costs one hardware round trip (VM exit + VM entry) of the chosen CPU plus the "
    "VMM's handling cost for its category; fatal exits (triple fault, failed entry) cost nothing.",
    "Handling costs are those of a KVM-like VMM that handles exits in the kernel, the same on "
    "every CPU profile; exits to a device model in user space add a process round trip.",
    "Exits do not disturb the guest: lost cache/TLB state after an exit (the indirect cost) "
    "is not modelled, so real overheads are higher.",
    "Ranges: 'low', 'mid' or 'high' picks one end of every range; the truth for one machine "
    "can lie outside them (microcode, mitigations, frequency).",
)


def get_profile(cpu: str | CpuProfile) -> CpuProfile:
    """The :class:`CpuProfile` named ``cpu`` (or ``cpu`` itself if it is one)."""
    if isinstance(cpu, CpuProfile):
        return cpu
    try:
        return PROFILES[cpu]
    except KeyError:
        raise KeyError(f"unknown CPU profile {cpu!r}; choose one of {', '.join(PROFILES)}") from None

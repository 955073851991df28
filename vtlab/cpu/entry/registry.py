"""The registry of VM-entry rules: one record per condition the SDM states.

KVM checks a VMCS with a long run of ``if (CC(condition)) return -EINVAL;`` lines, and
the ``CC()`` macro makes every condition name itself in a trace when it fails.  vtlab
does the same with a decorator: each check is a small function, registered with

* ``id`` - a short, stable snake_case name (``guest_cr0_pg_requires_pe``);
* ``section`` - the SDM Vol. 3C section that states it (``"27.3.1.1"``);
* ``group`` - which stage of VM entry checks it, which decides how a failure is
  reported (SDM 27.2 and 27.8):

  ============ ================================================================
  controls     VMfailValid, VM-instruction error 7 (SDM 27.2.1)
  host-state   VMfailValid, VM-instruction error 8 (SDM 27.2.2-27.2.4)
  guest-state  VM-entry failure: exit reason 33 with bit 31 set, and the rule's
               exit qualification (0, or 4 for the VMCS link pointer; SDM 27.8)
  ============ ================================================================

* ``reads`` - every VMCS field the check may read.  VM entry uses it to re-run, after
  VMWRITEs, only the rules that read a written field (see :mod:`.checker`), so it must
  be complete: ``tests/test_entry_rules.py`` records what each rule really reads;
* ``processor`` - True when the rule also depends on processor state outside the VMCS
  (the capability MSRs ``cpu.caps`` or the physical-address width ``cpu.memory.width``);
* ``breaks`` and ``mode`` - a recipe that breaks the rule in a fresh, valid
  :class:`vtlab.VirtualMachine` started in ``mode``; the tests are generated from it.

A check function takes ``get`` (a VMCS reader: ``get(VmcsField.GUEST_CR0)`` returns the
field's value) and the :class:`vtlab.cpu.vmx.VmxCpu`, and returns the list of messages
that say what is wrong in the SDM's words - empty when the rule holds.

One promise every rule that reads GUEST_RIP keeps (tests/test_entry_rules.py checks it):
while bits 63:32 of the RIP field are 0 it holds, and reads no other field.  The SDM's
RIP checks only restrict RIPs above 4 GBytes, and the VMM advances RIP after nearly every
exit: so VM entry does not run the RIP rules for a RIP below 4 GBytes (see
:mod:`.checker`) and need not complete the lazy save of guest state (see
:meth:`vtlab.cpu.vmx.VmxCpu._check_entry`).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ...arch.controls import EntryControl, ProcBased, ProcBased2
from ...arch.msrs import Efer, Rflags
from ...arch.vmcs_fields import VmcsField as F

if TYPE_CHECKING:
    from ..vmx import VmxCpu

#: A VMCS reader: the value of a full field (``Vmcs.get``).
Reader = Callable[[F], int]
#: A check function: (reader, processor) -> messages, empty when the rule holds.
CheckFn = Callable[[Reader, "VmxCpu"], Sequence[str]]

#: The three stages of VM entry, in the order the processor runs them (SDM 27.1-27.3).
GROUPS = ("controls", "host-state", "guest-state")
#: The modes a break recipe's guest may start in (those of :class:`vtlab.Mode`).
MODES = ("real", "protected", "paged", "long")
#: The modules that register rules, in the order the processor checks them.
RULE_MODULES = ("controls", "injection", "host_state", "guest_registers", "guest_segments", "guest_tables",
                "guest_nonregister")

_ID = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
_SECTION = re.compile(r"27\.[234](\.\d+)*")


@dataclass(frozen=True)
class Violation:
    """One broken VM-entry rule: what :func:`entry_violations` and VM entry report."""

    group: str          #: "controls", "host-state" or "guest-state"
    section: str        #: SDM section that states the rule, e.g. "27.3.1.2"
    message: str        #: what is wrong, in the SDM's words
    qualification: int = 0   #: exit qualification for guest-state failures (SDM 27.8)
    rule: str = ""      #: the broken rule's id (see :func:`vtlab.cpu.entry.rules`)

    def __str__(self) -> str:
        return f"[{self.group}, SDM {self.section}] {self.message}"


@dataclass(frozen=True, eq=False)
class Rule:
    """One VM-entry rule of SDM Vol. 3C chapter 27 (see the module docstring).

    ``rule.check(cpu, vmcs)`` lists what the VMCS breaks of this rule (empty: it holds);
    ``rule.explain()`` prints the rule in full.
    """

    id: str
    group: str
    section: str
    reads: frozenset[F]
    fn: CheckFn
    qualification: int = 0
    processor: bool = False
    breaks: Callable[[Any], None] | None = None
    mode: str = "real"
    doc: str = ""

    def check(self, cpu: "VmxCpu", vmcs: Any) -> list[str]:
        """The messages of this rule for ``vmcs`` (anything with a ``get(field)`` method)."""
        return list(self.fn(vmcs.get, cpu))

    def violations(self, cpu: "VmxCpu", vmcs: Any) -> list[Violation]:
        """:meth:`check` as :class:`Violation` records."""
        return [self.violation(m) for m in self.fn(vmcs.get, cpu)]

    def violation(self, message: str) -> Violation:
        """A :class:`Violation` of this rule saying ``message``."""
        return Violation(self.group, self.section, message, self.qualification, self.id)

    def explain(self) -> str:
        """The rule as text: id, section, how a failure is reported, fields read, doc."""
        report = {"controls": "VMfailValid, VM-instruction error 7",
                  "host-state": "VMfailValid, VM-instruction error 8",
                  "guest-state": f"VM-entry failure, exit reason 33 | bit 31, "
                                 f"exit qualification {self.qualification}"}[self.group]
        reads = ", ".join(sorted(f.name for f in self.reads))
        extra = " + processor state (capability MSRs, physical-address width)" if self.processor else ""
        return (f"{self.id} (SDM {self.section}, {self.group}: {report})\n"
                f"reads: {reads}{extra}\n{self.doc}")

    def __repr__(self) -> str:
        return f"<Rule {self.id} [{self.group}, SDM {self.section}]>"


_REGISTERED: list[Rule] = []
_RULES: tuple[Rule, ...] | None = None


def rule(group: str, id: str, section: str, *, reads: Iterable[F], breaks: Callable[[Any], None],
         mode: str = "real", qualification: int = 0, processor: bool = False,
         doc: str | None = None) -> Callable[[Callable], Callable]:
    """Register the decorated check function as a VM-entry rule (KVM's ``CC()``, by name).

    ``breaks(vm)`` must VMWRITE a fresh :class:`vtlab.VirtualMachine` (started in
    ``mode``) so that this rule is broken.  ``doc`` defaults to the function's docstring.
    A generator function is accepted; its messages are collected into a tuple.
    """
    if group not in GROUPS:
        raise ValueError(f"rule {id}: group {group!r} is not one of {GROUPS}")
    if not _ID.fullmatch(id):
        raise ValueError(f"rule id {id!r} is not snake_case")
    if not _SECTION.fullmatch(section):
        raise ValueError(f"rule {id}: {section!r} is not a section of SDM chapter 27")
    if mode not in MODES:
        raise ValueError(f"rule {id}: mode {mode!r} is not one of {MODES}")

    def register(fn: Callable) -> Callable:
        global _RULES
        if any(r.id == id for r in _REGISTERED):
            raise ValueError(f"rule id {id!r} is registered twice")
        check = fn
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def check(get: Reader, cpu: "VmxCpu", _fn=fn) -> tuple[str, ...]:
                return tuple(_fn(get, cpu))
        _REGISTERED.append(Rule(id, group, section, frozenset(F(f) for f in reads), check,
                                qualification, processor, breaks, mode,
                                inspect.cleandoc(doc) if doc else inspect.getdoc(fn) or ""))
        _RULES = None   # rules() sorts again (checkers made before keep their own list)
        return fn
    return register


def rules() -> tuple[Rule, ...]:
    """Every registered rule, in the order VM entry checks them (controls, host state,
    guest state; within a group, the order of SDM 27.2-27.3 as the processor runs it)."""
    global _RULES
    if _RULES is None:
        for name in RULE_MODULES:
            importlib.import_module(f"{__package__}.{name}")
        # Group first, then the module's place in RULE_MODULES (whichever was imported
        # first), then the order of registration within the module.
        def order(r: Rule) -> tuple[int, int]:
            module = r.fn.__module__.rpartition(".")[2]
            return (GROUPS.index(r.group),
                    RULE_MODULES.index(module) if module in RULE_MODULES else len(RULE_MODULES))
        _RULES = tuple(sorted(_REGISTERED, key=order))  # a stable sort keeps registration order
    return _RULES


def get_rule(id: str) -> Rule:
    """The rule named ``id`` (KeyError if there is none)."""
    for r in rules():
        if r.id == id:
            return r
    raise KeyError(f"no VM-entry rule is named {id!r}")


# ------------------------------------------------------------- shared readers
# Plain-int copies of the bits several rules test: ``int & IntFlag`` runs Python code
# (~0.5 us), and the rules re-run on VM entries.
ACTIVATE_SECONDARY = int(ProcBased.ACTIVATE_SECONDARY_CONTROLS)
UNRESTRICTED_GUEST = int(ProcBased2.UNRESTRICTED_GUEST)
IA32E_MODE = int(EntryControl.IA32E_MODE)
RFLAGS_VM = int(Rflags.VM)

#: What reading the secondary controls involves: the primary controls say whether they
#: exist at all ("activate secondary controls", SDM 25.6.2).
SECONDARY_READS = frozenset({F.CPU_BASED_VM_EXEC_CONTROL, F.SECONDARY_VM_EXEC_CONTROL})


def secondary_controls(get: Reader) -> int:
    """The secondary processor-based controls as VM entry sees them: 0 unless "activate
    secondary controls" is 1 (SDM 25.6.2: the field is then ignored)."""
    if get(F.CPU_BASED_VM_EXEC_CONTROL) & ACTIVATE_SECONDARY:
        return get(F.SECONDARY_VM_EXEC_CONTROL)
    return 0


def unrestricted_guest(get: Reader) -> bool:
    """Is the "unrestricted guest" control 1?  (Reads :data:`SECONDARY_READS`.)"""
    return bool(secondary_controls(get) & UNRESTRICTED_GUEST)


def ia32e_guest(get: Reader) -> bool:
    """Is the "IA-32e mode guest" VM-entry control 1?  (Reads VM_ENTRY_CONTROLS.)"""
    return bool(get(F.VM_ENTRY_CONTROLS) & IA32E_MODE)


def virtual_8086(get: Reader) -> bool:
    """Will the guest be in virtual-8086 mode (GUEST_RFLAGS.VM = 1)?  (Reads GUEST_RFLAGS.)"""
    return bool(get(F.GUEST_RFLAGS) & RFLAGS_VM)


def canonical(address: int) -> bool:
    """Bits 63:47 all equal: canonical for 48-bit linear addresses (SDM Vol. 1, 3.3.7.1)."""
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1


#: A non-canonical address the break recipes write (bit 47 set, bits 63:48 clear).
NON_CANONICAL = 0x0000_8000_0000_0000

#: IA32_EFER bits that are reserved (SDM Vol. 3A 2.2.1, Vol. 4 Table 2-2): all but SCE (0),
#: LME (8), LMA (10) and NXE (11).
EFER_RESERVED = ~int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NXE) & 0xFFFF_FFFF_FFFF_FFFF

#: The memory types an IA32_PAT entry may hold (SDM Vol. 3A 12.12.2): UC, WC, WT, WP, WB, UC-.
PAT_MEMORY_TYPES = frozenset({0, 1, 4, 5, 6, 7})


def pat_invalid_bytes(pat: int) -> list[int]:
    """The indexes of the bytes of an IA32_PAT value that are not a memory type (WRMSR
    would #GP): empty for a value VM entry may load."""
    return [i for i in range(8) if (pat >> (8 * i)) & 0xFF not in PAT_MEMORY_TYPES]


# ------------------------------------------------------- break-recipe helpers
# A recipe gets a fresh, valid VirtualMachine and VMWRITEs it until one rule breaks.
def write(field: F, value: int) -> Callable[[Any], None]:
    """Recipe: VMWRITE ``value`` to ``field``."""
    def recipe(vm: Any) -> None:
        vm.vmwrite(field, value)
    return recipe


def set_bits(field: F, bits: int) -> Callable[[Any], None]:
    """Recipe: VMREAD ``field``, set ``bits``, VMWRITE it back."""
    def recipe(vm: Any) -> None:
        vm.vmwrite(field, vm.vmread(field) | int(bits))
    return recipe


def clear_bits(field: F, bits: int) -> Callable[[Any], None]:
    """Recipe: VMREAD ``field``, clear ``bits``, VMWRITE it back."""
    def recipe(vm: Any) -> None:
        vm.vmwrite(field, vm.vmread(field) & ~int(bits))
    return recipe


def both(*recipes: Callable[[Any], None]) -> Callable[[Any], None]:
    """Recipe: apply ``recipes`` in turn."""
    def recipe(vm: Any) -> None:
        for r in recipes:
            r(vm)
    return recipe

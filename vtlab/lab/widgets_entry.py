"""The VM-entry rule explorer: break any rule of the registry, VMLAUNCH, read the outcome.

:class:`EntryRuleExplorer` lists every rule of :func:`vtlab.cpu.entry.rules` by group,
breaks the one a learner picks with the rule's own break recipe in a fresh, valid
:class:`vtlab.VirtualMachine` and reports what VMLAUNCH did in the SDM's terms.
:func:`break_and_launch` is the same without the widget (it returns an
:class:`EntryAttempt`).  Section numbers: SDM Vol. 3C, edition 325462-084US.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
import ipywidgets as W

from ..arch.errors import VmInstructionError
from ..arch.exit_reasons import ExitReason
from ..arch.vmcs_fields import VmcsField as F
from ..cpu.entry import GROUPS, MODES, Rule, get_rule, rules
from ..cpu.vmx import Status
from ..vmm.machine import VirtualMachine
from .widgets_base import _Base, _css, badge

#: How each group of checks reports a broken rule (SDM 27.2, 27.3 and 27.8).
GROUP_REPORTS = {
    "controls": "checks on VMX controls (SDM 27.2.1): VMfailValid, VM-instruction error 7",
    "host-state": "checks on the host-state area (SDM 27.2.2-27.2.4): VMfailValid, VM-instruction error 8",
    "guest-state": ("checks on the guest-state area (SDM 27.3.1): VM-entry failure, exit reason 33 "
                    "with bit 31 set (SDM 27.8)"),
}

#: The sections that state each group's rules.
GROUP_SECTIONS = {"controls": "27.2.1", "host-state": "27.2.2-27.2.4", "guest-state": "27.3.1"}

#: The exit qualification of a VM-entry failure with basic reason 33 (SDM 27.8).
ENTRY_FAILURE_QUALIFICATIONS = {
    0: "no further detail (the default)",
    2: "a problem loading the PDPTEs",
    3: "an attempt to inject an NMI into a guest that blocks events by STI",
    4: "an invalid VMCS link pointer",
}

#: The SDM's names of the two VM-entry failure exit reasons (Appendix C).
ENTRY_FAILURE_REASONS = {
    int(ExitReason.INVALID_STATE): "VM-entry failure due to invalid guest state",
    int(ExitReason.MSR_LOAD_FAIL): "VM-entry failure due to MSR loading",
}

#: The guest a fresh VM runs if VM entry lets it in (it never does with a rule broken).
DEFAULT_PROGRAM = "hlt"


@dataclass
class EntryAttempt:
    """What happened when one rule was broken and VMLAUNCH executed.

    ``outcome`` is the instruction's status as the SDM says it ("VMfailValid",
    "VM-entry failure", "VM exit" ...) or "not run" when the guest could not be built or
    the recipe could not be applied (``note`` says why; nothing is raised).
    """

    rule: Rule
    mode: str                       #: the mode the fresh guest started in
    outcome: str = "not run"
    error: int | None = None        #: VM-instruction error number (VMfailValid)
    exit_reason: int | None = None  #: the whole exit-reason field (VM-entry failure)
    qualification: int | None = None
    messages: list[str] = field(default_factory=list)   #: what the checks say, in order
    broken: bool = False            #: is the rule among the broken ones?
    guest_instructions: int = 0
    note: str = ""
    vm: VirtualMachine | None = None

    @property
    def basic_reason(self) -> int | None:
        """Bits 15:0 of the exit-reason field (None unless VM entry failed)."""
        return None if self.exit_reason is None else self.exit_reason & 0xFFFF

    def as_row(self) -> dict:
        """One row for a pandas table."""
        return {"group": self.rule.group, "rule": self.rule.id, "SDM": self.rule.section,
                "guest mode": self.mode, "outcome": self.outcome,
                "VM-instruction error": "" if self.error is None else self.error,
                "exit reason": "" if self.exit_reason is None else f"{self.exit_reason:#010x}",
                "basic reason": "" if self.exit_reason is None else self.basic_reason,
                "qualification": "" if self.qualification is None else self.qualification,
                "what the check says": self.messages[0] if self.messages else self.note}

    def describe(self) -> str:
        """The outcome in the SDM's words (plain text)."""
        if self.outcome == "VMfailValid":
            try:
                words = VmInstructionError(self.error).description
            except ValueError:
                words = "an error number the SDM does not define"
            return (f"VMLAUNCH: VMfailValid (CF = 0, ZF = 1), VM-instruction error {self.error}: "
                    f"\"{words}\" (SDM 31.4, Table 31-1). The checks of SDM 27.2 run before anything "
                    f"is loaded: the processor stays in VMX root operation and goes on with the "
                    f"instruction after VMLAUNCH.")
        if self.outcome == "VM-entry failure":
            basic = self.basic_reason
            name = ENTRY_FAILURE_REASONS.get(basic, "not a VM-entry failure reason")
            if basic == int(ExitReason.MSR_LOAD_FAIL):
                qual = f"the failing entry of the VM-entry MSR-load area is number {self.qualification}"
            else:
                qual = ENTRY_FAILURE_QUALIFICATIONS.get(self.qualification, "a value SDM 27.8 does not define")
            return (f"VMLAUNCH: VM-entry failure. Exit-reason field {self.exit_reason:#010x}: basic "
                    f"reason {basic} \"{name}\" (SDM Appendix C) with bit 31 set (\"VM-entry "
                    f"failure\"); exit qualification {self.qualification}: {qual} (SDM 27.8). The "
                    f"processor loaded the host state and went on at HOST_RIP, as after a VM exit; "
                    f"the guest ran {self.guest_instructions} instructions.")
        if self.outcome == "not run":
            return f"Nothing was launched: {self.note}"
        if self.vm is not None and self.vm.last_outcome is not None:
            return f"{self.vm.last_outcome} (the guest ran {self.guest_instructions} instructions)"
        return self.outcome


def break_and_launch(rule: Rule | str, mode: str | None = None, *,
                     program: str = DEFAULT_PROGRAM) -> EntryAttempt:
    """Break ``rule`` (a :class:`Rule` or its id) in a fresh, valid VM and VMLAUNCH it.

    The VM runs ``program`` in ``mode`` (default: the mode the rule's recipe is written
    for, ``rule.mode``).  Never raises for a rule of the registry: a recipe that cannot be
    applied, or that does not break its rule in another mode, is reported in ``note``.
    """
    rule = get_rule(rule) if isinstance(rule, str) else rule
    mode = mode or rule.mode
    attempt = EntryAttempt(rule, mode)
    if mode not in MODES:
        attempt.note = f"{mode!r} is not a guest mode (one of {', '.join(MODES)})"
        return attempt
    try:
        vm = VirtualMachine(program, mode=mode)
    except Exception as exc:   # an assembler error in a learner's program, for instance
        attempt.note = f"could not build a {mode}-mode guest: {exc}"
        return attempt
    attempt.vm = vm
    if rule.breaks is None:
        attempt.note = f"{rule.id} has no break recipe"
        return attempt
    try:
        rule.breaks(vm)
    except Exception as exc:
        attempt.note = (f"the break recipe of {rule.id} is written for a {rule.mode}-mode guest and "
                        f"cannot be applied to a {mode}-mode one ({type(exc).__name__}: {exc})")
        return attempt
    try:
        vm.run(max_exits=5, max_instructions=1_000)
    except Exception as exc:
        attempt.note = f"VMLAUNCH could not complete: {type(exc).__name__}: {exc}"
        return attempt
    out = vm.last_outcome
    if out is None:
        attempt.note = f"the VM did not execute VMLAUNCH ({vm.state.value}: {vm.message})"
        return attempt
    attempt.outcome = out.status.value
    attempt.messages = [str(v) for v in out.violations]
    attempt.broken = rule.id in [v.rule for v in out.violations]
    attempt.guest_instructions = vm.guest.counter.total
    if out.status is Status.VMFAIL_VALID:
        attempt.error = vm.vmread(F.VM_INSTRUCTION_ERROR)
    elif out.status is Status.ENTRY_FAILED:
        attempt.exit_reason = vm.vmread(F.VM_EXIT_REASON)
        attempt.qualification = vm.vmread(F.EXIT_QUALIFICATION)
    if not attempt.broken:
        attempt.note = (f"in a {mode}-mode guest the recipe does not break {rule.id}: it is written "
                        f"for a {rule.mode}-mode guest, and the rule's condition does not arise (or "
                        f"holds anyway) in {mode} mode")
    elif out.violations and out.violations[0].rule != rule.id:
        attempt.note = (f"{rule.id} is broken, but the processor checks {out.violations[0].rule} "
                        f"first and reports that one")
    return attempt


class EntryRuleExplorer(_Base):
    """Break one VM-entry rule of vtlab's registry and VMLAUNCH: read the SDM's outcome.

    * **group** - controls (SDM 27.2.1), host state (27.2.2-27.2.4) or guest state
      (27.3.1), with how a failure of that group is reported;
    * **rule** - every rule of the group, with the SDM Vol. 3C section that states it
      (and the guest mode its break recipe needs, when that is not real mode);
    * **guest mode** - "the recipe's own" (default) or a mode of your choice: a recipe
      written for another mode may then not break its rule, and the explorer says so;
    * **Break it and VMLAUNCH** - a fresh, valid VM, the rule's own break recipe, then
      VMLAUNCH; the output shows the outcome in the SDM's terms (VMfailValid with the
      VM-instruction error, or a VM-entry failure with exit reason and qualification),
      what the checks say, and the rule's statement.

    From code: ``explorer.select("guest_cr0_pg_requires_pe")``, then
    ``attempt = explorer.break_and_launch()`` (an :class:`EntryAttempt`; the VM it used is
    ``attempt.vm``).  ``explorer.rules`` holds every rule listed.
    """

    AUTO = "the recipe's own"

    def __init__(self, program: str = DEFAULT_PROGRAM):
        self.program = program
        self.rules: tuple[Rule, ...] = rules()
        self.by_group: dict[str, list[Rule]] = {g: [r for r in self.rules if r.group == g] for g in GROUPS}
        self.last: EntryAttempt | None = None
        wide = {"description_width": "initial"}
        self.group = _css(W.Dropdown(
            description="group", style=wide, layout=W.Layout(width="100%", max_width="60em"),
            options=[(f"{g} (SDM {GROUP_SECTIONS[g]}, {len(self.by_group[g])} rules)", g) for g in GROUPS]),
            "vtlab-entry-group")
        self.rule = _css(W.Dropdown(description="rule", style=wide,
                                     layout=W.Layout(width="100%", max_width="60em")),
                         "vtlab-entry-rule")
        self.mode = _css(W.Dropdown(description="guest mode", style=wide, layout=W.Layout(width="20em"),
                                    options=[(self.AUTO, None)] + [(m, m) for m in MODES]),
                         "vtlab-entry-mode")
        self.button = _css(W.Button(description="Break it and VMLAUNCH", button_style="warning",
                                    icon="bolt", layout=W.Layout(width="auto")), "vtlab-entry-launch")
        self.about = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-entry-about")
        self.output = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-entry-output")
        self.group.observe(lambda change: self._fill_rules(), names="value")
        self.rule.observe(lambda change: self._describe(), names="value")
        self.button.on_click(lambda button: self.break_and_launch())
        self.widget = _css(W.VBox([self.group, self.rule, W.HBox([self.mode, self.button]),
                                   self.about, self.output]), "vtlab-entry-explorer")
        self._fill_rules()

    # ----------------------------------------------------------------- selection
    @staticmethod
    def label(rule: Rule) -> str:
        """The rule's entry in the rule list: id, SDM section and (if not real) its mode."""
        mode = "" if rule.mode == "real" else f", {rule.mode}-mode guest"
        return f"{rule.id} (SDM {rule.section}{mode})"

    def _fill_rules(self) -> None:
        options = [(self.label(r), r.id) for r in self.by_group[self.group.value]]
        self.rule.options = options
        self.rule.value = options[0][1]   # (also when the value was already that id)
        self._describe()

    def select(self, rule_id: str) -> Rule:
        """Pick ``rule_id`` in the dropdowns (KeyError if the registry has no such rule)."""
        rule = get_rule(rule_id)
        self.group.value = rule.group
        self.rule.value = rule.id
        return rule

    @property
    def selected(self) -> Rule | None:
        """The rule picked in the rule dropdown."""
        return get_rule(self.rule.value) if self.rule.value else None

    def _describe(self) -> None:
        rule = self.selected
        self.output.value = ""
        if rule is None:
            self.about.value = ""
            return
        self.about.value = self._rule_html(rule)

    @staticmethod
    def _rule_html(rule: Rule) -> str:
        doc = html.escape(" ".join(rule.doc.split()))
        return (f"<div style='line-height:1.4;white-space:normal;overflow-wrap:anywhere'><b>{html.escape(rule.id)}</b> - SDM Vol. 3C "
                f"<b>{rule.section}</b>, {html.escape(GROUP_REPORTS[rule.group])}.<br>"
                f"<i>{doc}</i><br><small>break recipe written for a {rule.mode}-mode guest; "
                f"fields the check reads: {html.escape(', '.join(sorted(f.name for f in rule.reads)))}"
                f"</small></div>")

    # -------------------------------------------------------------------- action
    def break_and_launch(self) -> EntryAttempt | None:
        """Break the selected rule in a fresh VM, VMLAUNCH, show and return the outcome."""
        rule = self.selected
        if rule is None:
            self.output.value = "<b>pick a rule first</b>"
            return None
        try:
            attempt = break_and_launch(rule, self.mode.value, program=self.program)
        except Exception as exc:   # never a traceback in the learner's face
            attempt = EntryAttempt(rule, self.mode.value or rule.mode,
                                   note=f"{type(exc).__name__}: {exc}")
        self.last = attempt
        self.output.value = self._attempt_html(attempt)
        return attempt

    @staticmethod
    def _attempt_html(a: EntryAttempt) -> str:
        kind = {"VMfailValid": "error", "VM-entry failure": "error", "VM exit": "ok"}.get(a.outcome, "note")
        parts = [f"<div style='line-height:1.4;white-space:normal;overflow-wrap:anywhere'>{badge(kind, a.outcome)}"
                 f" - {html.escape(a.describe())}"]
        if a.note and a.outcome != "not run":
            parts.append(f"<br><b>Note:</b> {html.escape(a.note)}")
        if a.messages:
            items = "".join(f"<li>{html.escape(m)}</li>" for m in a.messages)
            parts.append(f"<br>What the checks say (the processor reports the first):<ol>{items}</ol>")
        parts.append("</div>")
        return "".join(parts)


"""The VM-entry rule explorer (vtlab.lab.widgets_entry.EntryRuleExplorer), headless.

The expected outcomes are written out from the Intel SDM, 325462-084US, Vol. 3C - not
taken from vtlab's tables:

* controls    -> VMfailValid, VM-instruction error 7 "VM entry with invalid control
  field(s)" (checks of SDM 27.2.1; error numbers: SDM 31.4, Table 31-1);
* host state  -> VMfailValid, VM-instruction error 8 "VM entry with invalid host-state
  field(s)" (checks of SDM 27.2.2-27.2.4; SDM 31.4, Table 31-1);
* guest state -> VM-entry failure: exit-reason field 0x80000021, basic reason 33 "VM-entry
  failure due to invalid guest state" (Appendix C) with bit 31 set, exit qualification 0,
  2 (PDPTEs) or 4 (VMCS link pointer) (checks of SDM 27.3.1; reporting: SDM 27.8).
"""
from __future__ import annotations

import html
import re
import time

import pytest

pytest.importorskip("ipywidgets")

from vtlab.cpu.entry import MODES, rules
from vtlab.lab.widgets_entry import EntryRuleExplorer, break_and_launch

RULES = rules()


def _text(value: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", value))


@pytest.fixture(scope="module")
def explorer():
    return EntryRuleExplorer()


def test_lists_every_rule_of_the_registry(explorer):
    listed = []
    for group, _ in [(v, k) for k, v in explorer.group.options]:
        explorer.group.value = group
        listed += [value for _, value in explorer.rule.options]
    assert len(listed) == len(rules()) == len(set(listed))
    assert set(listed) == {r.id for r in RULES}
    assert [value for _, value in explorer.group.options] == ["controls", "host-state", "guest-state"]
    assert len(explorer.rules) == len(rules())


def test_labels_are_not_clipped_and_name_the_section(explorer):
    for w in (explorer.group, explorer.rule, explorer.mode):
        assert w.style.description_width == "initial"
        assert w.layout.width
    assert explorer.button.description == "Break it and VMLAUNCH"
    assert explorer.button.layout.width == "auto"
    explorer.select("guest_cr0_pg_requires_pe")
    label = dict((v, k) for k, v in explorer.rule.options)["guest_cr0_pg_requires_pe"]
    assert "27.3.1.1" in label
    assert "27.3.1.1" in _text(explorer.about.value)


# One rule per group (and event injection, which the SDM checks with the controls): the
# outcome written literally from the SDM.
SAMPLES = [
    # rule id, VM-instruction error or None, exit-reason field or None, qualification
    ("unrestricted_guest_requires_ept", 7, None, None),      # SDM 27.2.1.1
    ("event_injection_nmi_vector", 7, None, None),           # SDM 27.2.1.3
    ("host_cs_selector_nonzero", 8, None, None),             # SDM 27.2.3
    ("host_ia32_pat_valid", 8, None, None),                  # SDM 27.2.2
    ("guest_cr0_pg_requires_pe", None, 0x80000021, 0),       # SDM 27.3.1.1
    ("vmcs_link_pointer_revision", None, 0x80000021, 4),     # SDM 27.3.1.5, 27.8
    ("guest_pdptes_valid", None, 0x80000021, 2),             # SDM 27.3.1.6, 27.8 (paged guest)
]


@pytest.mark.parametrize("rule_id, error, reason, qualification", SAMPLES)
def test_breaking_a_sample_shows_the_sdm_outcome(explorer, rule_id, error, reason, qualification):
    explorer.select(rule_id)
    explorer.mode.value = None                      # the recipe's own mode
    explorer.button.click()
    attempt = explorer.last
    shown = _text(explorer.output.value)
    assert attempt.rule.id == rule_id and attempt.broken
    assert attempt.guest_instructions == 0
    if error is not None:
        assert attempt.outcome == "VMfailValid"
        assert attempt.error == error
        words = {7: "VM entry with invalid control field(s)", 8: "VM entry with invalid host-state field(s)"}[error]
        assert f"VM-instruction error {error}" in shown and words in shown
    else:
        assert attempt.outcome == "VM-entry failure"
        assert attempt.exit_reason == reason and attempt.basic_reason == 33
        assert attempt.qualification == qualification
        assert "0x80000021" in shown and "basic reason 33" in shown
        assert "VM-entry failure due to invalid guest state" in shown
        assert f"exit qualification {qualification}" in shown
    group = {7: "controls", 8: "host-state"}.get(error, "guest-state")
    assert attempt.messages and all(m.startswith(f"[{group}, SDM 27.") for m in attempt.messages)
    assert "What the checks say" in shown


def test_every_group_is_covered_by_the_samples():
    groups = {r.group for r in RULES if r.id in {s[0] for s in SAMPLES}}
    assert groups == {r.group for r in RULES}


def test_every_rule_breaks_through_the_explorer_without_an_exception(explorer):
    start = time.perf_counter()
    for rule in RULES:
        explorer.select(rule.id)
        explorer.mode.value = None
        explorer.button.click()                     # an exception here fails the test
        attempt = explorer.last
        assert attempt.rule is rule and attempt.broken, (rule.id, attempt.note)
        expected = {"controls": "VMfailValid", "host-state": "VMfailValid",
                    "guest-state": "VM-entry failure"}[rule.group]
        assert attempt.outcome == expected, (rule.id, attempt.outcome)
        assert attempt.error == {"controls": 7, "host-state": 8}.get(rule.group), rule.id
        if rule.group == "guest-state":
            assert attempt.exit_reason == 0x80000021, rule.id
        assert explorer.output.value
    assert time.perf_counter() - start < 30


def test_a_recipe_in_another_mode_says_so_and_never_raises(explorer):
    explorer.select("guest_cr0_pg_requires_pe")     # written for a real-mode guest
    explorer.mode.value = "paged"                   # where CR0.PE = 1 already
    explorer.button.click()
    attempt = explorer.last
    assert not attempt.broken
    assert "does not break guest_cr0_pg_requires_pe" in _text(explorer.output.value)
    explorer.mode.value = None
    # every rule in every mode: an outcome or a note, never a traceback
    for rule in RULES[::7]:
        for mode in MODES:
            a = break_and_launch(rule, mode)
            assert a.outcome or a.note


def test_explorer_does_not_reveal_recipes(explorer):
    """The output states the rule and the outcome; it never shows the recipe's code."""
    explorer.select("guest_cr0_pg_requires_pe")
    explorer.button.click()
    shown = explorer.output.value + explorer.about.value
    assert "vmwrite" not in shown.lower() and "lambda" not in shown


def test_docstring_reads_with_question_mark():
    doc = EntryRuleExplorer.__doc__
    assert "Break it and VMLAUNCH" in doc and "select(" in doc

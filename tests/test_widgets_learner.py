"""What the learner sees in the widgets (issue #16 "Widgets", #15 "Accessibility").

Fast and headless: each test builds a widget, presses its buttons the way the front end
would (``.click()``, setting ``.value``) and reads what it displays.  SDM facts are typed
here from the manual (SDM Vol. 3C, Appendix C "VMX Basic Exit Reasons": CPUID = 10,
HLT = 12, I/O instruction = 30, VM-entry failure due to invalid guest state = 33; SDM
Vol. 3C, 31.4 "VM Instruction Error Numbers": 1 = VMCALL executed in VMX root operation,
4 = VMLAUNCH with non-clear VMCS, 7 = VM entry with invalid control field(s)), never read
from vtlab's tables.  The browser end is tests/test_browser.py.
"""
from __future__ import annotations

import html
import re
import traceback

import pytest

pytest.importorskip("ipywidgets")

from vtlab import ExitReason, HandlerError, VirtualMachine
from vtlab.arch.controls import ProcBased
from vtlab.arch.vmcs_fields import VmcsField as F
from vtlab.lab import rings
from vtlab.lab.widgets_base import (BADGES, THEME_BACKGROUNDS, contrast_ratio, parse_number,
                                    parse_ranges)
from vtlab.vmm import VmState
from vtlab.widgets import ControlsPanel, Stepper, VmcsExplorer, VmxConsole

GUEST = "mov eax, 0\ncpuid\nmov dx, 0xe9\nmov al, 0x41\nout dx, al\nhlt\n"
LOAD = 0x1000


def _text(value: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", value))


# ====================================================================== Stepper
class TestStepper:
    def test_first_exit_by_single_steps_shows_the_exit_information_written(self):
        s = Stepper(GUEST)
        s.step_button.click()            # VMLAUNCH + MOV EAX, 0: now in non-root operation
        assert "non-root" in _text(s.changed_html.value)
        s.step_button.click()            # CPUID exits (SDM Vol. 3C, Appendix C: reason 10)
        changed = _text(s.changed_html.value)
        assert "VM_EXIT_REASON: 0x0 = " not in changed
        assert "VM_EXIT_REASON: 0x0 → 0xa = CPUID (10)" in changed
        assert "VM_EXIT_INSTRUCTION_LEN: 0x0 → 0x2" in changed   # CPUID is 0F A2: 2 bytes
        assert f"GUEST_RIP: {LOAD:#x} → {LOAD + 6:#x}" in changed  # 66 B8 imm32 = 6 bytes

    def test_root_operation_register_panel_reads_the_vmcs(self):
        s = Stepper(GUEST)
        s.exit_button.click()            # CPUID exit, handler pending
        s.step_button.click()            # the handler runs: the VMM advances GUEST_RIP by 2
        assert s.vm.vmcs.get(F.GUEST_RIP) == LOAD + 8
        regs = s.regs_html.value
        # the guest view is GUEST_RIP from the VMCS (not a stale RIP of the guest CPU)
        assert re.search(r"<td>rip</td><td><code>0x1008</code></td><td[^>]*><small>GUEST_RIP", regs), regs
        assert "host view" in _text(regs) and "HOST_RIP" in _text(regs)
        assert f"{LOAD + 8:#x}: mov dx, 0xe9" in _text(s.next_html.value)

    @pytest.mark.parametrize("make, words", [
        (lambda: VirtualMachine("mov eax, 2\nvmcall\nhlt\n", mode="real"), "switched off"),   # SHUTDOWN
        (lambda: VirtualMachine("ud2\nhlt\n", mode="protected"), "triple-faulted"),          # #UD, no IDT
        (lambda: _bad_rflags_vm(), "VM entry failed"),
    ])
    def test_step_and_run_say_why_they_cannot_go_on(self, make, words):
        s = Stepper(factory=make)
        s.run_button.click()
        assert s.vm.state in (VmState.SHUTDOWN, VmState.CRASHED, VmState.ENTRY_FAILED)
        for b in (s.step_button, s.exit_button, s.run_button):
            assert b.disabled, b.description
        assert not s.reset_button.disabled
        status = _text(s.status_html.value)
        assert "cannot go on" in status and words in status and "reset" in status
        s.step()                         # a click that slipped through changes nothing
        assert "cannot go on" in _text(s.status_html.value)
        s.reset_button.click()
        assert not s.step_button.disabled and s.status_html.value == ""

    def test_entry_failure_names_reason_33(self):
        s = Stepper(factory=_bad_rflags_vm)
        s.run_button.click()
        text = _text(s.exit_html.value)
        assert "INVALID_STATE (33)" in text
        assert "RFLAGS" in _text(s.status_html.value)   # the rule that failed, in full

    def test_disassembly_shows_what_was_assembled(self):
        s = Stepper(GUEST)
        listing = _text(s.disasm_html.value)
        # CPUID is 0F A2 (SDM Vol. 2A, CPUID); OUT DX, AL is EE; HLT is F4 (Vol. 2B).
        assert re.search(r"0f a2\s+cpuid", listing)
        assert re.search(r": ee\s+out dx, al", listing) and re.search(r": f4\s+hlt", listing)
        assert f"▶ next {LOAD:#06x}" in listing
        s.run_button.click()
        assert "outside the loaded program" in _text(s.disasm_html.value)


def _bad_rflags_vm() -> VirtualMachine:
    vm = VirtualMachine("cpuid\nhlt\n", mode="real")
    vm.vmwrite(F.GUEST_RFLAGS, 0)   # RFLAGS bit 1 must be 1 (SDM Vol. 3C, 27.3.1.4)
    return vm


# ======================================================================== Probe
class TestProbe:
    def test_unclosed_bracket_is_an_assembly_error_with_its_line(self):
        p = rings.probe("mov eax, [ebx")
        assert p.category == "untestable" and p.cpl0 == "assembly error"
        assert "line 1" in p.evidence and "[" in p.evidence

    @pytest.mark.parametrize("text", ["", "   \n", "; only a comment", "label:"])
    def test_empty_box_is_nothing_to_run(self, text):
        p = rings.probe(text)
        assert p.category != "innocuous"
        assert p.cpl0 == "nothing to run" and "nothing to run" in p.evidence

    def test_probe_shows_the_disassembly(self):
        p = rings.probe("smsw ax")
        # SMSW r/m16 is 0F 01 /4 (SDM Vol. 2B); AX as r/m is ModRM E0; 16-bit operand in
        # 32-bit code takes the 66H prefix.
        assert "66 0f 01 e0" in p.disassembly and "smsw ax" in p.disassembly

    def test_probe_box_widget(self):
        from vtlab.widgets import ProbeBox

        box = ProbeBox()
        assert "disassembly" in _text(box.card.value)
        box.source.value = "mov eax, [ebx"
        box.button.click()
        assert "assembly error" in _text(box.card.value) and "line 1" in _text(box.card.value)
        box.source.value = ""
        box.button.click()
        assert "nothing to run" in _text(box.card.value)
        assert "innocuous" not in _text(box.card.value)

    def test_probe_in_an_unknown_mode_says_which_modes_exist(self):
        with pytest.raises(ValueError) as info:
            rings.probe("nop", mode="smm")
        text = str(info.value)
        assert "not a valid Mode" not in text
        assert "'protected'" in text and "'long'" in text


# ================================================================ ControlsPanel
class TestControlsPanel:
    def test_fixed_reasons_are_visible_text(self):
        vm = VirtualMachine("cpuid\nhlt\n", mode="real")
        panel = ControlsPanel(vm)
        tpr = panel.toggles[ProcBased.TPR_SHADOW]
        assert tpr.disabled
        reason = _text(panel.reasons[ProcBased.TPR_SHADOW].value)
        assert "fixed to 0" in reason and "IA32_VMX_TRUE_PROCBASED_CTLS" in reason
        assert "A.3" in reason
        # every disabled toggle has its reason beside it, every free one has none
        for flag, cb in panel.toggles.items():
            assert (flag in panel.reasons) == cb.disabled, flag

    def test_tab_titles_are_short(self):
        panel = ControlsPanel(VirtualMachine("hlt\n", mode="real"))
        titles = [panel.tab.get_title(i) for i in range(len(panel.tab.children))]
        assert all(len(t) <= 10 for t in titles), titles

    def test_vmlaunch_success_shows_the_first_exit(self):
        panel = ControlsPanel(VirtualMachine("cpuid\nhlt\n", mode="real"))
        text = panel.vmlaunch()
        assert "CPUID (10)" in text
        assert "CPUID (10)" in _text(panel.launch_result.value)
        again = panel.vmlaunch()   # the VMCS is launched now: VMLAUNCH fails with error 4
        assert "VMfailValid" in again and "error 4" in again

    def test_vmlaunch_vmfailvalid_shows_error_number_and_name(self):
        vm = VirtualMachine("cpuid\nhlt\n", mode="real")
        vm.vmwrite(F.CR3_TARGET_COUNT, 9)    # more than the 4 CR3-target values vtlab offers
        panel = ControlsPanel(vm)
        panel.launch_button.click()
        text = _text(panel.launch_result.value)
        assert "VMfailValid" in text and "VM-instruction error 7" in text
        assert "invalid control field" in text

    def test_vmlaunch_entry_failure_shows_the_rule_in_full(self):
        panel = ControlsPanel(_bad_rflags_vm())
        panel.launch_button.click()
        text = _text(panel.launch_result.value)
        assert "VM-entry failure" in text and "(33)" in text
        assert "27.3.1.4" in text and "RFLAGS" in text and "..." not in text


# ==================================================================== Dashboard
@pytest.fixture(scope="module")
def dashboard():
    pytest.importorskip("matplotlib")
    from vtlab.widgets import Dashboard

    return Dashboard(workload="cpuid-loop")


class TestDashboard:
    def test_busy_state_while_recomputing(self, dashboard):
        seen = []
        dashboard.busy_html.observe(lambda c: seen.append(c["new"]), names="value")
        dashboard.run_button.click()
        assert any("recomputing" in v for v in seen) and dashboard.busy_html.value == ""
        assert not dashboard.run_button.disabled

    def test_toggle_back_reuses_the_cached_run(self, dashboard):
        cb = dashboard.toggles[ProcBased.HLT_EXITING]
        first = dashboard.vm
        cb.value = not cb.value
        cb.value = not cb.value
        assert dashboard.vm is first
        assert dashboard.timings[-1] < 0.3, dashboard.timings  # no run, no redraw

    def test_hlt_loop_without_exits_draws_sane_axes(self, dashboard):
        dashboard.workload.value = "hlt-loop"
        dashboard.toggles[ProcBased.HLT_EXITING].value = False
        assert sum(dashboard.exit_counts.values()) == 0
        assert "no VM exits" in dashboard.plot.value and ">0</text>" in dashboard.plot.value
        assert not re.search(r">[-\u2212]\d", dashboard.plot.value)   # no negative tick
        from vtlab.analysis import plots
        from matplotlib.figure import Figure

        ax = Figure().add_subplot()
        plots.cycles_by_reason(dashboard.estimate, ax)
        assert ax.get_xlim() == (0.0, 1.0)
        assert any("no VM exits" in t.get_text() for t in ax.texts)
        dashboard.workload.value = "cpuid-loop"

    def test_description_and_size(self, dashboard):
        dashboard.workload.value = "cpuid-loop"
        assert "CPUID" in _text(dashboard.about_html.value)
        svg = dashboard.plot.value
        assert svg.startswith("<svg") and re.search(r"width='(\d+)'", svg).group(1) >= "750"
        assert "data-reason='CPUID'" in svg and "2,000 exits" in svg
        fig = dashboard.figure()            # the same panel for saving: 100 dpi or more
        assert fig.dpi >= 100 and fig.get_size_inches()[0] * fig.dpi >= 750

    def test_prefetch_in_a_running_event_loop(self):
        import asyncio

        from vtlab.widgets import Dashboard

        async def scenario():
            d = Dashboard(workload="cpuid-loop")      # (an update: schedules the prefetch)
            flip = d._prefetch_plan()[0]
            for _ in range(300):                      # the kernel is idle: it prefetches
                await asyncio.sleep(0.05)
                if flip in d._runs and any(k[0] != "cpuid-loop" for k in d._runs):
                    break
            assert flip in d._runs, "the single toggle of the first control was not prefetched"
            cached = d._runs[flip]
            d.toggles[ProcBased.HLT_EXITING].value = not d.toggles[ProcBased.HLT_EXITING].value
            assert d.vm is cached                     # answered from the prefetched run
            d.prefetch = False                        # (stop guessing before the loop ends)
            d._schedule_prefetch()
            # A prefetched run is made in slices of a few hundred exits; it must be the
            # same run as one made at once (same counts, state and cost estimate).
            from vtlab.analysis import cost

            for key in [flip, *(k for k in list(d._runs) if k[0] != "cpuid-loop")][:3]:
                sliced, direct = d._runs[key], d._run(*key)
                assert sliced.trace.counts().to_dict() == direct.trace.counts().to_dict(), key
                assert (sliced.state, sliced.message) == (direct.state, direct.message), key
                a, b = cost.estimate(sliced.trace).attrs, cost.estimate(direct.trace).attrs
                assert (a["exits"], a["instructions"]) == (b["exits"], b["instructions"]), key

        asyncio.run(scenario())

    def test_overhead_as_a_factor(self, dashboard):
        assert "×" in _text(dashboard.summary_html.value)


# ==================================================================== VmxConsole
def _console_launched() -> VmxConsole:
    c = VmxConsole()
    c.press("CR4.VMXE=1")
    c.operand.value = c.vm.vmxon_address
    c.press("VMXON")
    c.operand.value = c.vm.vmcs_address
    c.press("VMPTRLD")
    return c


class TestConsole:
    def test_vmresume_after_hlt_exit_re_executes_hlt(self):
        c = _console_launched()
        c.press("VMLAUNCH")      # CPUID
        c.press("VMRESUME")      # CPUID
        text = c.press("VMRESUME")
        assert "HLT (12)" in text and "halted" in text
        for _ in range(3):       # never the zero bytes after HLT
            assert "HLT (12)" in c.press("VMRESUME")
        assert c.state == "launched"

    def test_hlt_without_hlt_exiting_is_the_hlt_activity_state(self):
        c = _console_launched()
        c.field.value = "CPU_BASED_VM_EXEC_CONTROL"
        controls = c.cpu.current_vmcs.read(F.CPU_BASED_VM_EXEC_CONTROL)
        c.value.value = hex(controls & ~int(ProcBased.HLT_EXITING))
        assert "VMsucceed" in c.press("VMWRITE")
        c.press("VMLAUNCH")
        c.press("VMRESUME")
        text = c.press("VMRESUME")
        assert "HLT activity state" in text and "reset" in text
        assert "not possible now" in c.press("VMXOFF")

    def test_log_numbering_is_stable(self):
        c = VmxConsole()
        for _ in range(15):
            c.press("VMXON")
        numbers = [int(n) for n in re.findall(r"<li value='(\d+)'>", c.log.value)]
        assert numbers == list(range(4, 16))

    def test_new_buttons(self):
        c = _console_launched()
        assert f"-> {c.vm.vmcs_address:#x}" in c.press("VMPTRST")
        text = c.press("VMCALL")      # in VMX root operation: VMfailValid(1)
        assert "VMfailValid" in text and "error 1" in text
        c.field.value, c.value.value = "GUEST_RIP", "0x1006"
        assert "VMsucceed" in c.press("VMWRITE")
        assert "-> 0x1006" in c.press("VMREAD")
        c.value.value = "twelve"
        text = c.press("VMWRITE")
        assert "not a number" in text and "invalid literal" not in text

    def test_dropdown_is_wide_enough(self):
        c = VmxConsole()
        assert c.operand.layout.width and c.operand.layout.width.endswith("em")
        assert int(c.operand.layout.width[:-2]) >= max(len(label) for label, _ in c.operand.options) * 0.7

    def test_state_diagram_is_svg_with_the_current_state_marked(self):
        c = _console_launched()
        svg = c.diagram.value
        assert svg.startswith("<svg") and svg.count("<rect") == 5 and "marker-end" in svg
        assert re.findall(r"vtlab-state-(\w+) vtlab-state-current", svg) == ["clear"]
        assert svg.count("you are here") == 1
        for label in ("VMXON", "VMXOFF", "VMPTRLD", "VMCLEAR", "VMLAUNCH", "VMRESUME", "VM exit"):
            assert f">{label}</text>" in svg


# ====================================================== errors that leak Python
class TestErrors:
    @pytest.mark.parametrize("bad", ["twelve", "", "0xZZ"])
    def test_numbers(self, bad):
        with pytest.raises(ValueError) as info:
            parse_number(bad, "value")
        assert "invalid literal" not in str(info.value) and "not a number" in str(info.value)
        assert parse_number("3F8H", "port") == 0x3F8 and parse_number("1016", "port") == 1016

    def test_widgets_never_say_invalid_literal(self):
        vm = VirtualMachine("hlt\n", mode="real")
        panel = ControlsPanel(vm)
        panel.io_ports.value = "zz"
        panel.io_apply.click()
        e = VmcsExplorer(vm)
        e.encoding.value, e.value.value = "GUEST_RIP", "twelve"
        e.write_button.click()
        for value in (panel.status.value, e.result.value):
            assert "invalid literal" not in value and "not a number" in _text(value)
        panel.exception_bitmap.value = "0x2z"
        assert "invalid literal" not in panel.status.value and "not a number" in _text(panel.status.value)
        panel.exception_bitmap.value = "GP, NOSUCH"
        assert "'NOSUCH' is not an exception name" in _text(panel.status.value)
        with pytest.raises(ValueError, match="not a number"):
            parse_ranges("0x3f8-zz")

    def test_unknown_mode(self):
        with pytest.raises(ValueError) as info:
            VirtualMachine("hlt", mode="smm")
        text = str(info.value)
        assert "is not a valid Mode" not in text and "'real'" in text and "SMM" in text

    def test_handler_error_traceback_is_short(self):
        vm = VirtualMachine("cpuid\nhlt\n", mode="real")

        @vm.handler(ExitReason.CPUID)
        def my_handler(vm, exit):
            return 1 / 0

        with pytest.raises(HandlerError) as info:
            vm.run()
        err = info.value
        assert isinstance(err.original, ZeroDivisionError)
        assert err.__cause__ is None and err.__suppress_context__
        text = "".join(traceback.format_exception(err))
        assert "During handling" not in text and "direct cause" not in text
        assert "my_handler" in text and "1 / 0" in text
        assert text.count("\n") < 25, text


# ================================================================ accessibility
#: The two stock JupyterLab themes' output backgrounds (--jp-layout-color0), as
#: JupyterLab's theme CSS defines them: light #FFFFFF, dark #111111.
LIGHT, DARK = "#FFFFFF", "#111111"


class TestAccessibility:
    def test_contrast_formula(self):
        # WCAG 2: black on white is 21:1; #767676 on white is the classic 4.54:1.
        assert contrast_ratio("#000000", "#FFFFFF") == pytest.approx(21.0)
        assert contrast_ratio("#767676", "#FFFFFF") == pytest.approx(4.54, abs=0.01)
        assert THEME_BACKGROUNDS == {"light": LIGHT, "dark": DARK}

    def test_badges_have_contrast_and_a_symbol(self):
        from vtlab.lab.widgets_probe import CATEGORY_BADGES

        for name, (symbol, fg, bg) in {**BADGES, **CATEGORY_BADGES}.items():
            assert symbol.strip(), name
            assert contrast_ratio(fg, bg) >= 4.5, (name, fg, bg)

    def test_no_fixed_text_colour_on_the_theme_background(self):
        """Every fixed text colour in what the widgets show sits on a fixed background
        with >= 4.5:1; anything else uses the theme's colours (var(--jp-...))."""
        s = Stepper(factory=_bad_rflags_vm)
        s.run_button.click()
        s2 = Stepper(GUEST)
        s2.exit_button.click()
        panel = ControlsPanel(_bad_rflags_vm())
        panel.vmlaunch()
        panel.io_ports.value = "zz"
        panel.io_apply.click()
        c = _console_launched()
        c.press("VMLAUNCH")
        e = VmcsExplorer(VirtualMachine("hlt\n", mode="real"))
        e.encoding.value = "0x4402"
        e.value.value = "5"
        e.write_button.click()
        htmls = [w.value for w in (s.mode_html, s.status_html, s.exit_html, s.regs_html, s2.changed_html,
                                   s2.mode_html, panel.launch_result, panel.status, c.log, e.result)]
        htmls += [r.value for _, r in panel.reasons.items()]
        styles = [st for h in htmls for st in re.findall(r"style='([^']*)'", h)]
        checked = 0
        for style in styles:
            fg = re.search(r"(?<![-\w])color:\s*(#[0-9A-Fa-f]{6})", style)
            if not fg:
                continue
            bg = re.search(r"background:\s*(#[0-9A-Fa-f]{6})", style)
            assert bg, f"fixed text colour without a fixed background: {style}"
            assert contrast_ratio(fg.group(1), bg.group(1)) >= 4.5, style
            checked += 1
        assert checked > 5
        # the yellow "changed" highlight carries black text and a symbol, in both themes
        assert "#F0E442" in s2.changed_html.value and "Δ changed" in _text(s2.changed_html.value)

    def test_svg_diagram_text_follows_the_theme(self):
        svg = _console_launched().diagram.value
        fills = re.findall(r"fill:([^;']+)", svg)
        fixed = [f for f in fills if f.startswith("#")]
        # the only fixed fills are the current box and its text, a pair with contrast
        _, fg, bg = BADGES["guest"]
        assert set(fixed) <= {fg, bg} and contrast_ratio(fg, bg) >= 4.5
        assert "var(--jp-content-font-color1" in svg

    def test_category_grid_is_readable_in_greyscale(self):
        pytest.importorskip("matplotlib")
        from vtlab.analysis import plots

        levels = [plots.GridLevel("fixed to 0", "#D55E00", "xx", "0"),
                  plots.GridLevel("free", "#009E73", "", "?"),
                  plots.GridLevel("fixed to 1", "#0072B2", "//", "1")]
        fig = plots.category_grid([[0, 1, 2], [2, 1, 0]], ["a", "b"], ["0", "1", "2"], levels)
        ax = fig.axes[0]
        marks = sorted(t.get_text() for t in ax.texts)
        assert marks == ["0", "0", "1", "1", "?", "?"]
        hatches = {p.get_hatch() for p in ax.patches}
        assert {"xx", "//"} <= hatches

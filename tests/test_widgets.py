"""Headless tests of the interactive layer (vtlab.widgets).

No browser and no kernel: each test builds a widget, drives it the way the front end
would (sets a checkbox or text value, which fires the observers; ``.click()`` on a
button, which fires its on_click handlers) and checks both the model underneath (the
VM's VMCS controls, the VMX CPU state, the I/O and MSR bitmaps) and what the widget
displays.  The browser end of the same widgets is tested in test_browser.py.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("ipywidgets")

from vtlab.arch.controls import EntryControl, ExitControl, PinBased, ProcBased, ProcBased2
from vtlab.arch.exit_reasons import ExitReason
from vtlab.arch.vmcs_fields import VmcsField as F
from vtlab.capabilities import AllowedSettings
from vtlab.vmm import VirtualMachine, VmState
from vtlab.vmx import VmxOperation
from vtlab.widgets import ControlsPanel, Stepper, VmcsExplorer, VmxConsole, parse_ranges

CLASSES = (PinBased, ProcBased, ProcBased2, ExitControl, EntryControl)

# A real-mode guest with one exit of each kind the stepper tests look at:
# CPUID (no qualification), OUT to the debug port 0xE9 (an I/O qualification), HLT.
STEP_GUEST = "mov eax, 0\ncpuid\nmov dx, 0xe9\nmov al, 0x41\nout dx, al\nhlt\n"
LOAD = 0x1000  # vtlab's default load address (= entry point) for a real-mode guest


def _text(html_value: str) -> str:
    """The visible text of an HTML widget's value (tags dropped, entities decoded)."""
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", html_value))


def _is_error(status_html: str) -> bool:
    """Widgets show errors in the colour-blind-safe vermillion."""
    return "#D55E00" in status_html


@pytest.fixture
def vm():
    return VirtualMachine("cpuid\nhlt\n", mode="real")


# =============================================================== ControlsPanel
class TestControlsPanel:
    def test_every_control_has_a_labelled_toggle(self, vm):
        panel = ControlsPanel(vm)
        expected = [(cls, flag) for cls in CLASSES for flag in cls]
        assert len(panel.toggles) == len(expected)
        for cls, flag in expected:
            cb = panel.toggles[flag]
            assert cb.value == vm.control(flag), flag
            assert flag.name in cb.description
            bit = int(flag).bit_length() - 1
            assert f"bit {bit}" in cb.description
            assert f"(bit {bit})" in cb.tooltip
            assert f"vtlab-control-{cls.__name__}-{flag.name}" in cb._dom_classes

    def test_toggling_hlt_exiting_changes_the_vmcs_field(self, vm):
        changes = []
        panel = ControlsPanel(vm, on_change=lambda: changes.append(1))
        cb = panel.toggles[ProcBased.HLT_EXITING]
        assert cb.value is True and not cb.disabled
        before = vm.vmcs.get(F.CPU_BASED_VM_EXEC_CONTROL)
        proc2_before = vm.vmcs.get(F.SECONDARY_VM_EXEC_CONTROL)

        cb.value = False
        assert vm.control(ProcBased.HLT_EXITING) is False
        assert vm.vmcs.get(F.CPU_BASED_VM_EXEC_CONTROL) == before & ~int(ProcBased.HLT_EXITING)
        # HLT_EXITING and UNRESTRICTED_GUEST are both 0x80: only the primary field moved.
        assert vm.vmcs.get(F.SECONDARY_VM_EXEC_CONTROL) == proc2_before
        assert panel.toggles[ProcBased2.UNRESTRICTED_GUEST].value is True
        assert "HLT_EXITING = 0" in panel.status.value
        assert "CPU_BASED_VM_EXEC_CONTROL" in panel.status.value
        assert changes == [1]

        cb.value = True
        assert vm.control(ProcBased.HLT_EXITING) is True
        assert vm.vmcs.get(F.CPU_BASED_VM_EXEC_CONTROL) == before
        assert "HLT_EXITING = 1" in panel.status.value
        assert changes == [1, 1]

    def test_toggle_changes_what_the_guest_does(self, vm):
        panel = ControlsPanel(vm)
        panel.toggles[ProcBased.HLT_EXITING].value = False
        vm.run(max_exits=100, max_instructions=10_000)
        counts = {str(k): int(v) for k, v in vm.trace.counts().items()}
        assert counts.get("CPUID") == 1 and "HLT" not in counts
        assert vm.state is VmState.HALTED

    def test_fixed_controls_are_disabled_with_the_reason(self, vm):
        panel = ControlsPanel(vm)
        caps = vm.cpu.caps
        disabled = 0
        for cls in CLASSES:
            allowed = caps.allowed(cls)
            for flag in cls:
                cb = panel.toggles[flag]
                fixed0 = not allowed.allowed1 & flag
                fixed1 = bool(allowed.allowed0 & flag)
                assert cb.disabled == (fixed0 or fixed1), flag
                if fixed0:
                    disabled += 1
                    assert "fixed to 0" in cb.tooltip and "allowed-1" in cb.tooltip, cb.tooltip
                if not cb.disabled:
                    assert "fixed" not in cb.tooltip
        assert disabled > 0  # e.g. "use TPR shadow" is not supported by vtlab's CPU
        tpr = panel.toggles[ProcBased.TPR_SHADOW]
        assert tpr.disabled and "IA32_VMX_TRUE_PROCBASED_CTLS" in tpr.tooltip

    def test_control_fixed_to_1_is_disabled_with_the_reason(self, vm):
        caps = vm.cpu.caps
        a = caps.true_controls[ProcBased]
        caps.true_controls[ProcBased] = AllowedSettings(a.allowed0 | ProcBased.HLT_EXITING, a.allowed1)
        panel = ControlsPanel(vm)
        cb = panel.toggles[ProcBased.HLT_EXITING]
        assert cb.disabled
        assert "fixed to 1" in cb.tooltip and "allowed-0" in cb.tooltip
        assert "IA32_VMX_TRUE_PROCBASED_CTLS" in cb.tooltip

    def test_exception_bitmap_by_name(self, vm):
        panel = ControlsPanel(vm)
        assert panel.exception_bitmap.value == ""
        panel.exception_bitmap.value = "UD, GP"
        assert vm.vmcs.get(F.EXCEPTION_BITMAP) == (1 << 6) | (1 << 13)
        assert not _is_error(panel.status.value)
        assert "0x00002040" in panel.status.value
        panel.exception_bitmap.value = "#pf, 3"
        assert vm.vmcs.get(F.EXCEPTION_BITMAP) == (1 << 14) | (1 << 3)
        panel.exception_bitmap.value = ""
        assert vm.vmcs.get(F.EXCEPTION_BITMAP) == 0

    def test_exception_bitmap_shows_the_current_value(self, vm):
        vm.vmwrite(F.EXCEPTION_BITMAP, (1 << 6) | (1 << 13))
        assert ControlsPanel(vm).exception_bitmap.value == "UD, GP"

    @pytest.mark.parametrize("bad", ["UD, NOSUCH", "40", "0x20", "GP,,zz"])
    def test_exception_bitmap_bad_input_shows_an_error(self, vm, bad):
        panel = ControlsPanel(vm)
        panel.exception_bitmap.value = "UD, GP"
        panel.exception_bitmap.value = bad  # must not raise
        assert _is_error(panel.status.value)
        assert "exception bitmap" in panel.status.value
        assert vm.vmcs.get(F.EXCEPTION_BITMAP) == (1 << 6) | (1 << 13)  # unchanged

    def test_io_port_ranges_set_and_clear_bitmap_bits(self, vm):
        panel = ControlsPanel(vm)
        mem = vm.cpu.memory
        panel.io_ports.value = "0x3f8-0x3ff, 0x60; 0x8001"
        panel.io_apply.click()
        assert not _is_error(panel.status.value)
        assert "10 port(s) intercepted" in panel.status.value
        for port in [*range(0x3F8, 0x400), 0x60]:
            assert mem.test_bit(vm.io_bitmap_a, port), hex(port)
        assert mem.test_bit(vm.io_bitmap_b, 1)  # port 8001H: bit 1 of bitmap B
        assert not mem.test_bit(vm.io_bitmap_a, 0x3F7)
        assert not mem.test_bit(vm.io_bitmap_a, 0x61)

        panel.io_ports.value = "0x3fc-0x3ff"
        panel.io_clear.click()
        assert "4 port(s) passed through" in panel.status.value
        assert mem.test_bit(vm.io_bitmap_a, 0x3FB)
        assert not any(mem.test_bit(vm.io_bitmap_a, p) for p in range(0x3FC, 0x400))

    def test_io_bitmap_decides_which_ports_exit(self):
        vm = VirtualMachine("mov al, 0x41\nout 0xe9, al\nout 0x80, al\nout 0xe9, al\nhlt\n", mode="real")
        panel = ControlsPanel(vm)
        panel.toggles[ProcBased.UNCOND_IO_EXITING].value = False
        panel.toggles[ProcBased.USE_IO_BITMAPS].value = True
        panel.io_ports.value = "0x80"
        panel.io_apply.click()
        vm.run(max_exits=100, max_instructions=10_000)
        counts = {str(k): int(v) for k, v in vm.trace.counts().items()}
        assert counts.get("IO_INSTRUCTION") == 1, counts

    @pytest.mark.parametrize("bad", ["0x3ff-0x3f8", "zz", "0x10000", "0-0x10000"])
    def test_io_ports_bad_input_shows_an_error(self, vm, bad):
        panel = ControlsPanel(vm)
        panel.io_ports.value = bad
        panel.io_apply.click()  # must not raise
        assert _is_error(panel.status.value)
        assert "I/O bitmap" in panel.status.value
        assert not vm.cpu.memory.test_bit(vm.io_bitmap_b, 0)  # 0x10000 must not alias port 8000H

    def test_msr_ranges_set_bitmap_bits(self, vm):
        panel = ControlsPanel(vm)
        mem, base = vm.cpu.memory, vm.msr_bitmap
        # The VMM starts with every MSR intercepted: pass two through for reads only.
        panel.msr_ranges.value = "0x174-0x175, 0xc0000080"
        panel.msr_read.value, panel.msr_write.value = False, True
        panel.msr_apply.click()
        assert not _is_error(panel.status.value)
        assert "3 MSR(s)" in panel.status.value
        # SDM 25.6.9: read-low at 0, read-high at 1024, write-low at 2048, write-high at 3072.
        assert not mem.test_bit(base, 0x174) and not mem.test_bit(base, 0x175)
        assert mem.test_bit(base, 0x176)
        assert mem.test_bit(base + 2048, 0x174)
        assert not mem.test_bit(base + 1024, 0x80)
        assert mem.test_bit(base + 3072, 0x80)

    @pytest.mark.parametrize("bad", ["0x40000000", "nope", "0-0xffffffff"])
    def test_msr_ranges_bad_input_shows_an_error(self, vm, bad):
        panel = ControlsPanel(vm)
        panel.msr_ranges.value = bad
        panel.msr_apply.click()  # must not raise (nor hang building a 4-billion-entry list)
        assert _is_error(panel.status.value)
        assert "MSR bitmap" in panel.status.value


def test_parse_ranges():
    assert parse_ranges("0x3f8-0x3fa, 96; 0x60") == [0x3F8, 0x3F9, 0x3FA, 96, 0x60]
    assert parse_ranges(" ") == []
    with pytest.raises(ValueError):
        parse_ranges("5-4")
    with pytest.raises(ValueError):
        parse_ranges("0x10000", maximum=0xFFFF)


# ===================================================================== Stepper
class TestStepper:
    def test_initial_display(self):
        s = Stepper(STEP_GUEST)
        assert s.vm.cpu.operation is VmxOperation.ROOT
        assert "VMX root operation" in _text(s.mode_html.value)
        assert "VM state: ready" in s.mode_text
        assert "guest CPL 0" in s.mode_text and "16-bit" in s.mode_text
        assert f"{LOAD:#x}: mov eax, 0" in _text(s.next_html.value)
        assert "none yet" in _text(s.exit_html.value)
        assert s.changed_html.value == ""
        regs = _text(s.regs_html.value)
        assert "rip" in regs and "rflags" in regs

    def test_step_enters_non_root(self):
        s = Stepper(STEP_GUEST)
        s.step_button.click()
        assert s.vm.cpu.operation is VmxOperation.NON_ROOT
        assert "VMX non-root operation" in _text(s.mode_html.value)
        assert ": cpuid" in _text(s.next_html.value)
        assert "none yet" in _text(s.exit_html.value)

    def test_next_exit_decodes_the_exit(self):
        s = Stepper(STEP_GUEST)
        s.exit_button.click()
        assert s.vm.cpu.operation is VmxOperation.ROOT
        assert "VMX root operation" in _text(s.mode_html.value)
        text = _text(s.exit_html.value)
        assert "CPUID (10)" in text
        assert "handler not run yet" in text
        assert "instruction length 2" in text
        assert f"guest RIP {LOAD + 6:#x}" in text
        changed = _text(s.changed_html.value)
        assert "VMCS fields changed" in changed
        assert "VM_EXIT_REASON: 0x0 → 0xa" in changed
        assert "VM_EXIT_INSTRUCTION_LEN: 0x0 → 0x2" in changed
        assert "GUEST_RIP: 0x1000 → 0x1006" in changed
        assert "#F0E442" in s.changed_html.value  # highlighted ...
        assert "\u0394 changed" in changed         # ... and marked with a symbol and a word

        # The next exit: OUT DX, AL to port E9H, with its qualification fields by name.
        s.exit_button.click()
        text = _text(s.exit_html.value)
        assert "IO_INSTRUCTION (30)" in text
        assert "instruction length 1" in text
        for field in ("port: 0xe9", "size: 0x1", "direction: OUT", "string: False", "rep: False"):
            assert field in text, (field, text)
        changed = _text(s.changed_html.value)
        assert "VM_EXIT_REASON: 0xa = CPUID (10) → 0x1e = IO_INSTRUCTION (30)" in changed
        assert "EXIT_QUALIFICATION: 0x0 → 0xe90000" in changed
        assert "(nothing yet)" in _text(s.output_html.value)  # the handler has not run

    def test_run_to_the_end(self):
        s = Stepper(STEP_GUEST)
        s.run_button.click()
        assert s.vm.state is VmState.HALTED
        assert "VM state: halted" in _text(s.mode_html.value)
        assert "VMX root operation" in _text(s.mode_html.value)
        text = _text(s.exit_html.value)
        assert "HLT (12)" in text and "handler not run yet" not in text
        assert "the guest executed HLT" in text
        assert "A" in _text(s.output_html.value)
        assert "VM_EXIT_REASON: 0x0 → 0xc" in _text(s.changed_html.value)
        counts = {str(k): int(v) for k, v in s.vm.trace.counts().items()}
        assert counts == {"CPUID": 1, "IO_INSTRUCTION": 1, "HLT": 1}

    def test_reset_starts_over(self):
        s = Stepper(STEP_GUEST)
        s.run_button.click()
        old = s.vm
        s.reset_button.click()
        assert s.vm is not old
        assert len(s.vm.trace) == 0
        assert "VM state: ready" in s.mode_text
        assert "none yet" in _text(s.exit_html.value)
        assert "HLT" not in _text(s.exit_html.value)  # not the old VM's last exit
        assert s.changed_html.value == ""
        assert f"{LOAD:#x}: mov eax, 0" in _text(s.next_html.value)
        assert "(nothing yet)" in _text(s.output_html.value)

    def test_vm_message_is_shown_once(self):
        def factory():
            vm = VirtualMachine("nop\nhlt\n", mode="real")
            vm.set_control(ProcBased.HLT_EXITING, False)
            return vm

        s = Stepper(factory=factory)
        for _ in range(3):
            s.run()
        assert s.exit_html.value.count("vtlab-vm-message") == 1
        assert "HLT exiting is 0" in _text(s.exit_html.value)

    def test_handler_error_is_displayed_not_raised(self):
        s = Stepper(STEP_GUEST)

        @s.vm.handler(ExitReason.CPUID)
        def broken(vm, exit):
            raise RuntimeError("student bug")

        s.run_button.click()  # must not raise
        assert s.vm.state is VmState.ERROR
        text = _text(s.exit_html.value)
        assert "student bug" in text and "broken" in text
        assert "vtlab-vm-error" in s.exit_html.value  # the HandlerError text itself


# ================================================================ VmcsExplorer
class TestVmcsExplorer:
    def test_tables_by_area(self, vm):
        e = VmcsExplorer(vm)
        titles = [e.tables.get_title(i) for i in range(len(e.tables.children))]
        assert [t.split(" (")[0] for t in titles] == [
            "guest state", "host state", "vm execution control", "vm exit control",
            "vm entry control", "exit information"]
        e.nonzero.value = False
        all_fields = "".join(c.value for c in e.tables.children)
        assert "GUEST_RIP" in all_fields and "0x681e" in all_fields
        assert "VM_EXIT_REASON" in all_fields and "(read-only)" in all_fields

    def test_vmwrite_read_only_field_fails_with_error_13(self, vm):
        e = VmcsExplorer(vm)
        e.encoding.value = "0x4402"
        assert "VM_EXIT_REASON" in e.decoded.value and "read-only" in e.decoded.value
        e.value.value = "5"
        e.write_button.click()
        text = _text(e.result.value)
        assert "VMfailValid" in text and "VM-instruction error 13" in text
        assert "ZF=1" in text and "CF=0" in text
        assert _is_error(e.result.value)
        assert vm.vmcs.get(F.VM_EXIT_REASON) == 0
        assert vm.vmread(F.VM_INSTRUCTION_ERROR) == 13

    def test_vmread_unsupported_encoding_fails_with_error_12(self, vm):
        e = VmcsExplorer(vm)
        e.encoding.value = "0x1234"
        e.read_button.click()
        text = _text(e.result.value)
        assert "VMfailValid" in text and "VM-instruction error 12" in text
        assert "ZF=1" in text and "CF=0" in text
        e.encoding.value = "NO_SUCH_FIELD"
        e.read_button.click()
        assert "VM-instruction error 12" in _text(e.result.value)

    def test_vmread_guest_rip_succeeds(self, vm):
        e = VmcsExplorer(vm)
        e.encoding.value = "GUEST_RIP"
        assert "GUEST_STATE" in e.decoded.value  # names decode too
        e.read_button.click()
        text = _text(e.result.value)
        assert "VMsucceed" in text and f"-> {LOAD:#x}" in text
        assert "CF=0 ZF=0" in text
        assert not _is_error(e.result.value)
        e.encoding.value = "0x681E"
        e.read_button.click()
        assert f"-> {LOAD:#x}" in _text(e.result.value)

    def test_vmwrite_updates_the_vmcs_and_the_table(self, vm):
        e = VmcsExplorer(vm)
        e.encoding.value = "GUEST_RIP"
        e.value.value = "0x2345"
        e.write_button.click()
        assert "VMsucceed" in _text(e.result.value)
        assert vm.vmcs.get(F.GUEST_RIP) == 0x2345
        assert "0x2345" in e.tables.children[0].value

    def test_bad_value_shows_a_message(self, vm):
        e = VmcsExplorer(vm)
        e.encoding.value = "GUEST_RIP"
        e.value.value = "twelve"
        e.write_button.click()  # must not raise
        assert _is_error(e.result.value) and "must be a number" in e.result.value
        assert vm.vmcs.get(F.GUEST_RIP) == LOAD

    def test_no_current_vmcs_is_vmfail_invalid(self, vm):
        vm.cpu.vmclear(vm.vmcs_address).check()
        e = VmcsExplorer(vm.cpu)
        assert "no current VMCS" in e.tables.children[0].value
        e.encoding.value = "GUEST_RIP"
        e.read_button.click()
        text = _text(e.result.value)
        assert "VMfailInvalid" in text and "CF=1 ZF=0" in text


# ================================================================== VmxConsole
def _current_states(console: VmxConsole) -> list[str]:
    return re.findall(r"vtlab-state-(\w+) vtlab-state-current", console.diagram.value)


class TestVmxConsole:
    def press(self, console, name, operand=None):
        if operand is not None:
            console.operand.value = operand
        before = len(console.entries)
        console.buttons[name].click()
        assert len(console.entries) == before + 1 or name == "reset"
        return console.entries[-1] if console.entries else ""

    def test_starts_outside_vmx_operation(self):
        c = VmxConsole()
        assert c.state == "outside" and _current_states(c) == ["outside"]
        assert c.cpu.operation is VmxOperation.OUTSIDE
        assert not c.cpu.cr4 & (1 << 13)
        assert c.diagram.value.count("vtlab-state-current") == 1

    def test_the_whole_sequence(self):
        c = VmxConsole()
        vmxon_region, vmcs = c.vm.vmxon_address, c.vm.vmcs_address

        text = self.press(c, "VMXON", vmxon_region)
        assert "#UD" in text and "CR4.VMXE" in text
        assert c.state == "outside" and _current_states(c) == ["outside"]

        text = self.press(c, "CR4.VMXE=1")
        assert c.cpu.cr4 & (1 << 13)
        assert _current_states(c) == ["outside"]

        text = self.press(c, "VMXON", vmxon_region)
        assert "VMsucceed" in text
        assert c.cpu.operation is VmxOperation.ROOT
        assert c.state == "root" and _current_states(c) == ["root"]

        text = self.press(c, "VMPTRLD", vmcs)
        assert "VMsucceed" in text
        assert c.cpu.current_vmcs_pointer == vmcs
        assert c.state == "clear" and _current_states(c) == ["clear"]

        text = self.press(c, "VMLAUNCH")
        assert "VM exit" in text and "CPUID" in text
        assert c.cpu.operation is VmxOperation.ROOT
        assert c.state == "launched" and _current_states(c) == ["launched"]

        text = self.press(c, "VMLAUNCH")
        assert "VMfailValid" in text and "VM-instruction error 4" in text
        assert c.state == "launched"
        text = self.press(c, "VMREAD")
        assert "-> 0x4" in text

        text = self.press(c, "VMRESUME")
        assert "VM exit" in text and "CPUID" in text  # the second CPUID of the guest
        assert c.state == "launched" and _current_states(c) == ["launched"]

        text = self.press(c, "VMCLEAR", vmcs)
        assert "VMsucceed" in text
        assert c.cpu.current_vmcs is None
        assert c.state == "root" and _current_states(c) == ["root"]

        text = self.press(c, "VMXOFF")
        assert "VMsucceed" in text
        assert c.state == "outside" and _current_states(c) == ["outside"]

        log = _text(c.log.value)
        assert "#UD" in log and "VM-instruction error 4" in log
        assert c.log.value.count("<li ") == len(c.entries) == 10

    def test_bad_operands(self):
        c = VmxConsole()
        self.press(c, "CR4.VMXE=1")
        assert "VMfailInvalid" in self.press(c, "VMXON", 0x1234)
        assert "VMfailInvalid" in self.press(c, "VMXON", c.bad_revision)
        assert c.state == "outside"
        assert "VMsucceed" in self.press(c, "VMXON", c.vm.vmxon_address)
        # VMPTRLD with the VMXON pointer is error 10, but with no current VMCS to hold
        # the error number the SDM's VMfail is VMfailInvalid (CF=1).
        text = self.press(c, "VMPTRLD", c.vm.vmxon_address)
        assert "VMfailInvalid" in text and "VMXON region" in text
        assert c.state == "root"

    def test_vmlaunch_with_the_empty_vmcs_fails_cleanly(self):
        c = VmxConsole()
        self.press(c, "CR4.VMXE=1")
        self.press(c, "VMXON", c.vm.vmxon_address)
        self.press(c, "VMPTRLD", c.empty_vmcs)
        text = self.press(c, "VMLAUNCH")  # must not raise: an SDM outcome, not a traceback
        assert "VMfailValid" in text and "VM-instruction error 7" in text
        assert c.state == "clear"

    def test_reset(self):
        c = VmxConsole()
        self.press(c, "CR4.VMXE=1")
        self.press(c, "VMXON", c.vm.vmxon_address)
        c.buttons["reset"].click()
        assert c.state == "outside" and c.entries == []
        assert "press an instruction" in c.log.value


# =================================================================== Dashboard
@pytest.fixture
def dashboard_modules():
    pytest.importorskip("vtlab.cost")
    pytest.importorskip("vtlab.plots")
    guests = pytest.importorskip("vtlab.guests")
    if not guests.names():
        pytest.skip("vtlab.guests has no workloads yet")
    pytest.importorskip("matplotlib")
    return guests


def _dashboard(guests):
    from vtlab.widgets import Dashboard

    names = guests.names()
    return Dashboard(workload="cpuid-loop" if "cpuid-loop" in names else names[0])


class TestDashboard:
    def test_initial_counts_are_rendered(self, dashboard_modules):
        d = _dashboard(dashboard_modules)
        counts = d.exit_counts
        assert counts and sum(counts.values()) > 0
        total = re.search(r"vtlab-exit-total'>(\d+)<", d.counts_html.value)
        assert total and int(total.group(1)) == sum(counts.values())
        for reason, n in counts.items():
            assert f"data-reason='{reason}'>{n}<" in d.counts_html.value
        assert "overhead" in d.summary_html.value

    def test_toggling_a_control_changes_the_exit_counts(self, dashboard_modules):
        d = _dashboard(dashboard_modules)
        before = dict(d.exit_counts)
        cb = d.toggles[ProcBased.HLT_EXITING]
        assert cb.value is True
        cb.value = False  # re-runs the workload at once
        after = dict(d.exit_counts)
        assert after != before
        assert "HLT" in before and "HLT" not in after
        assert "data-reason='HLT'" not in d.counts_html.value
        cb.value = True
        assert d.exit_counts == before

    def test_toggling_a_control_that_adds_exits(self, dashboard_modules):
        if "rdtsc-loop" not in dashboard_modules.names():
            pytest.skip("no rdtsc-loop workload")
        from vtlab.widgets import Dashboard

        d = Dashboard(workload="rdtsc-loop")
        assert d.exit_counts.get("RDTSC", 0) == 0
        d.toggles[ProcBased.RDTSC_EXITING].value = True
        assert d.exit_counts.get("RDTSC", 0) > 0
        assert "data-reason='RDTSC'" in d.counts_html.value

    def test_run_button_reruns(self, dashboard_modules):
        d = _dashboard(dashboard_modules)
        vm, counts = d.vm, dict(d.exit_counts)
        d.run_button.click()
        assert d.vm is not vm
        assert d.exit_counts == counts  # deterministic

    def test_cpu_profile_changes_the_estimate_not_the_counts(self, dashboard_modules):
        from vtlab import cost

        d = _dashboard(dashboard_modules)
        vm, counts = d.vm, dict(d.exit_counts)
        summary, attrs = d.summary_html.value, dict(d.estimate.attrs)
        other = next(p for p in cost.PROFILES if p != d.profile.value)
        d.profile.value = other
        assert d.vm is vm  # no re-run
        assert d.exit_counts == counts
        assert d.estimate.attrs.get("profile", other) == other
        assert d.estimate.attrs["virtualization_cycles"] != attrs["virtualization_cycles"]
        assert d.summary_html.value != summary

    def test_changing_the_workload_loads_its_default_controls(self, dashboard_modules):
        names = dashboard_modules.names()
        if len(names) < 2:
            pytest.skip("needs two workloads")
        d = _dashboard(dashboard_modules)
        d.toggles[ProcBased.HLT_EXITING].value = False
        other = next(n for n in names if n != d.workload.value)
        d.workload.value = other
        assert d.toggles[ProcBased.HLT_EXITING].value is True
        assert d.vm.program is not None

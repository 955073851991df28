"""The controls panel: every VMX control bit of a VMCS as a toggle, plus bitmap editors."""
from __future__ import annotations

import html
from typing import Callable

import ipywidgets as W

from ..arch.controls import (CONTROL_FIELD, CONTROL_INFO, EntryControl, ExitControl, PinBased,
                            ProcBased, ProcBased2)
from ..arch.exceptions import Vector
from ..arch.vmcs_fields import VmcsField as F
from ..errors import VtlabError
from ..cpu import LaunchState, Status
from ..vmm.machine import VirtualMachine
from .widgets_base import (TEXT_QUIET, _Base, _css, _FlagMap, badge, error_html, parse_number,
                           parse_ranges)
from .widgets_stepper import exit_reason_text


_CLASSES = (PinBased, ProcBased, ProcBased2, ExitControl, EntryControl)
_CLASS_TITLES = {PinBased: "Pin-based", ProcBased: "Primary processor-based",
                 ProcBased2: "Secondary processor-based", ExitControl: "VM-exit", EntryControl: "VM-entry"}
#: Tab titles short enough never to be clipped; each tab repeats the full title inside.
_TAB_TITLES = {PinBased: "Pin-based", ProcBased: "Primary", ProcBased2: "Secondary",
               ExitControl: "VM-exit", EntryControl: "VM-entry"}
#: Where the SDM describes each class of controls (SDM Vol. 3C, 25.6.1-25.6.2, 25.7.1, 25.8.1).
_CLASS_SECTIONS = {PinBased: "25.6.1", ProcBased: "25.6.2", ProcBased2: "25.6.2",
                   ExitControl: "25.7.1", EntryControl: "25.8.1"}
_CAP_MSR = {PinBased: "IA32_VMX_TRUE_PINBASED_CTLS", ProcBased: "IA32_VMX_TRUE_PROCBASED_CTLS",
            ProcBased2: "IA32_VMX_PROCBASED_CTLS2", ExitControl: "IA32_VMX_TRUE_EXIT_CTLS",
            EntryControl: "IA32_VMX_TRUE_ENTRY_CTLS"}


class ControlsPanel(_Base):
    """Toggles for every VMX control bit of ``vm``'s VMCS, plus bitmap editors.

    ``on_change`` (optional) is called after any change, e.g. to re-run a workload.
    """

    def __init__(self, vm: VirtualMachine, on_change: Callable[[], None] | None = None,
                 classes=_CLASSES):
        self.vm, self.on_change = vm, on_change
        self.toggles = _FlagMap()
        #: The visible "fixed to 0/1" reason under each disabled toggle, by flag.
        self.reasons = _FlagMap()
        caps = vm.cpu.caps
        tabs = []
        for cls in classes:
            allowed = caps.allowed(cls)
            boxes = []
            for flag in cls:
                info = CONTROL_INFO[flag]
                must1 = bool(allowed.allowed0 & flag)
                may1 = bool(allowed.allowed1 & flag)
                tip = f"{info.sdm_name} (bit {info.bit}): {info.description}"
                cb = W.Checkbox(value=vm.control(flag), description=f"{flag.name} (bit {info.bit})",
                                indent=False, layout=W.Layout(width="auto"))
                cb.tooltip = tip  # ipywidgets 8: .tooltip (description_tooltip is deprecated)
                _css(cb, "vtlab-control", f"vtlab-control-{cls.__name__}-{flag.name}")
                cb.observe(self._make_handler(flag), names="value")
                self.toggles[flag] = cb
                if must1 or not may1:
                    # The capability MSR decides (SDM Vol. 3C, A.3): the reason is shown as
                    # text beside the toggle - a tooltip is not shown by every browser.
                    cb.disabled = True
                    why = (f"fixed to 1: {_CAP_MSR[cls]} allowed-0 settings" if must1
                           else f"fixed to 0: {_CAP_MSR[cls]} allowed-1 settings (not supported by this CPU)")
                    cb.tooltip = f"{tip} — {why}"
                    reason = _css(W.HTML(f"<small style='color:{TEXT_QUIET};white-space:normal'>"
                                         f"\u2298 {html.escape(why)} (SDM Vol. 3C, A.3)</small>"),
                                  "vtlab-fixed-reason", f"vtlab-fixed-{cls.__name__}-{flag.name}")
                    self.reasons[flag] = reason
                    boxes.append(W.VBox([cb, reason], layout=W.Layout(margin="0 0 4px 0")))
                else:
                    boxes.append(cb)
            heading = W.HTML(f"<b>{_CLASS_TITLES[cls]} controls</b> - VMCS field "
                             f"<code>{CONTROL_FIELD[cls].name}</code>, capability MSR "
                             f"<code>{_CAP_MSR[cls]}</code> (SDM Vol. 3C, {_CLASS_SECTIONS[cls]})")
            tabs.append(W.VBox([heading, W.GridBox(boxes, layout=W.Layout(
                grid_template_columns="repeat(2, minmax(0, 1fr))", grid_gap="2px 1em"))]))
        self.exception_bitmap = _css(W.Text(value=self._vectors_text(), description="Exception bitmap",
                                            placeholder="e.g. UD, GP, 14", layout=W.Layout(width="60%")),
                                     "vtlab-exception-bitmap")
        self.io_ports = _css(W.Text(description="I/O ports", placeholder="0x3f8-0x3ff, 0x60",
                                    layout=W.Layout(width="60%")), "vtlab-io-ports")
        self.msr_ranges = _css(W.Text(description="MSRs", placeholder="0x174-0x176, 0xc0000080",
                                      layout=W.Layout(width="60%")), "vtlab-msr-ranges")
        self.msr_read = W.Checkbox(value=True, description="intercept reads", indent=False)
        self.msr_write = W.Checkbox(value=True, description="intercept writes", indent=False)
        self.io_apply = _css(W.Button(description="intercept ports"), "vtlab-io-apply")
        self.io_clear = _css(W.Button(description="pass ports through"), "vtlab-io-clear")
        self.msr_apply = _css(W.Button(description="apply MSR bitmap"), "vtlab-msr-apply")
        self.status = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-controls-status")
        self.launch_button = _css(W.Button(description="VMLAUNCH", icon="play", button_style="primary"),
                                  "vtlab-controls-vmlaunch")
        self.launch_result = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-vmlaunch-result")
        self.launch_button.on_click(lambda b: self.vmlaunch())
        self.exception_bitmap.observe(lambda c: self._set_exceptions(), names="value")
        self.io_apply.on_click(lambda b: self._set_ports(True))
        self.io_clear.on_click(lambda b: self._set_ports(False))
        self.msr_apply.on_click(lambda b: self._set_msrs())
        bitmaps = W.VBox([
            self.exception_bitmap,
            W.HBox([self.io_ports, self.io_apply, self.io_clear]),
            W.HBox([self.msr_ranges, self.msr_read, self.msr_write, self.msr_apply]),
        ])
        tab = _css(W.Tab(children=tabs + [bitmaps]), "vtlab-controls-tabs")
        for i, cls in enumerate(classes):
            tab.set_title(i, _TAB_TITLES[cls])
        tab.set_title(len(classes), "Bitmaps")
        self.tab = tab
        self.widget = _css(W.VBox([tab, self.status, W.HBox([self.launch_button, self.launch_result])]),
                           "vtlab-controls-panel")

    # ------------------------------------------------------------------ VMLAUNCH
    def vmlaunch(self) -> str:
        """VMLAUNCH the panel's VM with the controls as set; show and return the result.

        Success: the first VM exit (by name and number) - the handler has not run yet.
        VMfailValid: the VM-instruction error number and name (SDM Vol. 3C, 31.4).
        VM-entry failure: the exit reason and every rule the guest state breaks, in full.
        A VMCS launched already gets VMLAUNCH's own answer, VMfailValid error 4.
        """
        vm = self.vm
        if vm.vmcs.launch_state is LaunchState.LAUNCHED:
            # VMLAUNCH needs a clear VMCS (SDM Vol. 3C, 31.3 VMLAUNCH): VMfailValid(4),
            # nothing else changes. VMRESUME is the instruction for a launched VMCS.
            out = vm.cpu.vmlaunch()
            text = str(out)
            self.launch_result.value = (f"<div style='white-space:normal'>{badge('error', str(out.status.value))} "
                                        f"{html.escape(text)}</div>")
            return text
        try:
            exit_ = vm.next_exit(max_instructions=1_000_000)
            out = vm.last_outcome
        except VtlabError as exc:
            self.launch_result.value = error_html(str(exc))
            return str(exc)
        if out is not None and out.status is Status.VM_EXIT and exit_ is not None:
            text = (f"VM entry succeeded; first VM exit: {exit_reason_text(exit_.reason)} at guest RIP "
                    f"{exit_.guest_rip:#x} ({exit_.instruction}) - the exit handler has not run yet")
            self.launch_result.value = badge("ok", "VM exit") + " " + html.escape(text)
            return text
        if out is not None and out.status is Status.ENTRY_FAILED:
            rules = [str(v) for v in vm.cpu.entry_violations()] or [out.message]
            text = (f"VM-entry failure: exit reason {exit_reason_text(out.exit.reason)} with bit 31 set "
                    f"(SDM Vol. 3C, 27.8); the first rule that failed: {rules[0]}")
            items = "".join(f"<li>{html.escape(r)}</li>" for r in rules)
            self.launch_result.value = (f"<div style='white-space:normal'>{badge('error', 'VM-entry failure')} "
                                        f"{html.escape(text)}<br>every rule the guest state breaks:"
                                        f"<ol>{items}</ol></div>")
            return text
        text = str(out) if out is not None else (vm.message or f"the VM is {vm.state.value}")
        if out is not None and out.status is Status.VMFAIL_VALID:
            self.launch_result.value = f"<div style='white-space:normal'>{badge('error', 'VMfailValid')} {html.escape(text)}</div>"
        else:
            self.launch_result.value = f"<div style='white-space:normal'>{badge('note', vm.state.value)} {html.escape(text)}</div>"
        return text

    def _make_handler(self, flag):
        def handler(change):
            try:
                self.vm.set_control(flag, change["new"])
                self.status.value = (f"{type(flag).__name__}.{flag.name} = {int(change['new'])} "
                                     f"(VMWRITE {CONTROL_FIELD[type(flag)].name})")
            except VtlabError as exc:
                self.status.value = error_html(str(exc))
            if self.on_change:
                self.on_change()
        return handler

    def _vectors_text(self) -> str:
        bitmap = self.vm.vmcs.get(F.EXCEPTION_BITMAP)
        names = []
        for v in range(32):
            if bitmap >> v & 1:
                try:
                    names.append(Vector(v).name)
                except ValueError:
                    names.append(str(v))
        return ", ".join(names)

    def _set_exceptions(self) -> None:
        bitmap = 0
        try:
            for part in filter(None, (p.strip() for p in self.exception_bitmap.value.split(","))):
                vector = (Vector[part.upper().lstrip("#")] if not part[0].isdigit()
                          else parse_number(part, f"vector {part!r}"))
                if not 0 <= int(vector) < 32:
                    raise ValueError(f"vector {part} is not an exception (0-31)")
                bitmap |= 1 << int(vector)
        except KeyError as exc:
            names = ", ".join(v.name for v in Vector)
            self.status.value = error_html(f"exception bitmap: {exc.args[0]!r} is not an exception "
                                           f"name (use {names} or a vector number 0-31)")
            return
        except ValueError as exc:
            self.status.value = error_html(f"exception bitmap: {exc}")
            return
        self.vm.vmwrite(F.EXCEPTION_BITMAP, bitmap)
        self.status.value = f"EXCEPTION_BITMAP = {bitmap:#010x}"
        if self.on_change:
            self.on_change()

    def _set_ports(self, intercept: bool) -> None:
        try:
            ports = parse_ranges(self.io_ports.value, maximum=0xFFFF)
            self.vm.set_io_intercept(ports, intercept)
        except ValueError as exc:
            self.status.value = error_html(f"I/O bitmap: {exc}")
            return
        self.status.value = (f"I/O bitmap: {len(ports)} port(s) {'intercepted' if intercept else 'passed through'}"
                             " (takes effect while USE_IO_BITMAPS is 1)")
        if self.on_change:
            self.on_change()

    def _set_msrs(self) -> None:
        try:
            msrs = parse_ranges(self.msr_ranges.value, maximum=0xFFFF_FFFF)
            outside = [m for m in msrs if not (m <= 0x1FFF or 0xC000_0000 <= m <= 0xC000_1FFF)]
            if outside:  # check everything before changing anything
                raise ValueError(f"MSR {outside[0]:#x} is outside the ranges the MSR bitmap covers "
                                 "(0-1FFFH, C0000000H-C0001FFFH): it always exits")
            for msr in msrs:
                self.vm.set_msr_intercept(msr, read=self.msr_read.value, write=self.msr_write.value)
        except ValueError as exc:
            self.status.value = error_html(f"MSR bitmap: {exc}")
            return
        self.status.value = f"MSR bitmap updated for {len(msrs)} MSR(s)"
        if self.on_change:
            self.on_change()

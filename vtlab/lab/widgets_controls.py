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
from ..vmm.machine import VirtualMachine
from .widgets_base import _Base, _css, _FlagMap, parse_ranges


_CLASSES = (PinBased, ProcBased, ProcBased2, ExitControl, EntryControl)
_CLASS_TITLES = {PinBased: "Pin-based", ProcBased: "Primary processor-based",
                 ProcBased2: "Secondary processor-based", ExitControl: "VM-exit", EntryControl: "VM-entry"}
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
                if must1 or not may1:
                    cb.disabled = True
                    why = (f"fixed to 1: {_CAP_MSR[cls]} allowed-0 settings" if must1
                           else f"fixed to 0: {_CAP_MSR[cls]} allowed-1 settings (not supported by this CPU)")
                    cb.tooltip = f"{tip} — {why}"
                _css(cb, "vtlab-control", f"vtlab-control-{cls.__name__}-{flag.name}")
                cb.observe(self._make_handler(flag), names="value")
                self.toggles[flag] = cb
                boxes.append(cb)
            tabs.append(W.GridBox(boxes, layout=W.Layout(grid_template_columns="repeat(2, 1fr)")))
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
        self.status = _css(W.HTML(), "vtlab-controls-status")
        self.exception_bitmap.observe(lambda c: self._set_exceptions(), names="value")
        self.io_apply.on_click(lambda b: self._set_ports(True))
        self.io_clear.on_click(lambda b: self._set_ports(False))
        self.msr_apply.on_click(lambda b: self._set_msrs())
        bitmaps = W.VBox([
            self.exception_bitmap,
            W.HBox([self.io_ports, self.io_apply, self.io_clear]),
            W.HBox([self.msr_ranges, self.msr_read, self.msr_write, self.msr_apply]),
        ])
        tab = W.Tab(children=tabs + [bitmaps])
        for i, cls in enumerate(classes):
            tab.set_title(i, _CLASS_TITLES[cls])
        tab.set_title(len(classes), "Bitmaps")
        self.widget = _css(W.VBox([tab, self.status]), "vtlab-controls-panel")

    def _make_handler(self, flag):
        def handler(change):
            try:
                self.vm.set_control(flag, change["new"])
                self.status.value = (f"{type(flag).__name__}.{flag.name} = {int(change['new'])} "
                                     f"(VMWRITE {CONTROL_FIELD[type(flag)].name})")
            except VtlabError as exc:
                self.status.value = f"<span style='color:#D55E00'>{html.escape(str(exc))}</span>"
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
                vector = Vector[part.upper().lstrip("#")] if not part[0].isdigit() else int(part, 0)
                if not 0 <= int(vector) < 32:
                    raise ValueError(f"vector {part} is not an exception (0-31)")
                bitmap |= 1 << int(vector)
        except (KeyError, ValueError) as exc:
            self.status.value = f"<span style='color:#D55E00'>exception bitmap: {html.escape(str(exc))}</span>"
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
            self.status.value = f"<span style='color:#D55E00'>I/O bitmap: {html.escape(str(exc))}</span>"
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
            self.status.value = f"<span style='color:#D55E00'>MSR bitmap: {html.escape(str(exc))}</span>"
            return
        self.status.value = f"MSR bitmap updated for {len(msrs)} MSR(s)"
        if self.on_change:
            self.on_change()

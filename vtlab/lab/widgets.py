"""ipywidgets front ends: the learner's hands on the VMCS, the guest and the VMX instructions.

* :class:`ControlsPanel` - every pin-based, primary, secondary, VM-exit and VM-entry
  control as a labelled toggle (SDM name, bit, tooltip); bits the capability MSRs fix
  are shown disabled with the reason; exception bitmap, I/O bitmap and MSR bitmap editors.
* :class:`Stepper` - step one instruction, run to the next exit, run, reset; shows VMX
  mode and CPL, the next instruction, registers, the last exit decoded and the VMCS
  fields that changed.
* :class:`Dashboard` - pick a workload and a CPU profile, toggle controls; exit counts,
  the cycle-cost breakdown and a summary table update live.
* :class:`VmcsExplorer` - all fields by area, with VMREAD/VMWRITE and their real outcome.
* :class:`VmxConsole` - press VMXON/VMCLEAR/VMPTRLD/VMLAUNCH/VMRESUME/VMXOFF in any
  order and watch the state diagram and the SDM outcome.

Each widget object has a ``.widget`` (the ipywidgets container) and displays itself in
a notebook.  Every interactive element carries a stable CSS class (``vtlab-...``) so
that browser tests can find it.
"""
from __future__ import annotations

import html
import io
from typing import Callable

import ipywidgets as W

from ..arch.controls import (CONTROL_FIELD, CONTROL_INFO, EntryControl, ExitControl, PinBased,
                            ProcBased, ProcBased2)
from ..arch.exceptions import Vector
from ..arch.vmcs_fields import VmcsArea, VmcsField as F, decode_encoding
from ..errors import VtlabError
from ..vmm.machine import VirtualMachine
from ..cpu.vmx import Status, VmxCpu, VmxOperation

_CLASSES = (PinBased, ProcBased, ProcBased2, ExitControl, EntryControl)
_CLASS_TITLES = {PinBased: "Pin-based", ProcBased: "Primary processor-based",
                 ProcBased2: "Secondary processor-based", ExitControl: "VM-exit", EntryControl: "VM-entry"}
_CAP_MSR = {PinBased: "IA32_VMX_TRUE_PINBASED_CTLS", ProcBased: "IA32_VMX_TRUE_PROCBASED_CTLS",
            ProcBased2: "IA32_VMX_PROCBASED_CTLS2", ExitControl: "IA32_VMX_TRUE_EXIT_CTLS",
            EntryControl: "IA32_VMX_TRUE_ENTRY_CTLS"}


def _css(widget: W.Widget, *names: str) -> W.Widget:
    for n in names:
        widget.add_class(n)
    return widget


def parse_ranges(text: str, maximum: int | None = None, max_count: int = 0x10000) -> list[int]:
    """``"0x3f8-0x3ff, 0x60"`` -> [0x3f8, ..., 0x3ff, 0x60] (hex or decimal, inclusive ranges).

    ValueError for a value above ``maximum`` or more than ``max_count`` values in all.
    """
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        lo, sep, hi = part.partition("-")
        a = int(lo.strip(), 0)
        b = int(hi.strip(), 0) if sep else a
        if b < a:
            raise ValueError(f"range {part!r} ends before it starts")
        if maximum is not None and b > maximum:
            raise ValueError(f"{b:#x} in {part!r} is above {maximum:#x}")
        if len(out) + b - a + 1 > max_count:
            raise ValueError(f"{part!r}: more than {max_count:,} values in all")
        out.extend(range(a, b + 1))
    return out


class _FlagMap(dict):
    """A dict keyed by control flag that keeps ProcBased.HLT_EXITING and
    ProcBased2.UNRESTRICTED_GUEST apart (both are the int 0x80)."""

    def __getitem__(self, flag):
        return super().__getitem__((type(flag), int(flag)))

    def __setitem__(self, flag, value):
        super().__setitem__((type(flag), int(flag)), value)

    def __contains__(self, flag):
        return super().__contains__((type(flag), int(flag)))

    def items(self):
        return [(cls(v), w) for (cls, v), w in super().items()]


class _Base:
    widget: W.Widget

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)


# ----------------------------------------------------------------------- controls panel
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


# ------------------------------------------------------------------------- stepper
_WATCHED = [F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4,
            F.GUEST_CS_SELECTOR, F.VM_EXIT_REASON, F.EXIT_QUALIFICATION, F.VM_EXIT_INSTRUCTION_LEN,
            F.VM_EXIT_INTR_INFO, F.GUEST_LINEAR_ADDRESS, F.GUEST_PHYSICAL_ADDRESS, F.VM_INSTRUCTION_ERROR]


class Stepper(_Base):
    """Step a guest across VM entries and exits.

    ``source``/``mode``/``load`` describe the guest (a fresh VM is built on reset), or
    pass ``factory``: a function returning a configured :class:`VirtualMachine`.
    """

    def __init__(self, source: str | bytes | None = None, mode: str = "real", load: int | None = None,
                 factory: Callable[[], VirtualMachine] | None = None):
        self.factory = factory or (lambda: VirtualMachine(source, mode=mode, load=load))
        self.step_button = _css(W.Button(description="step instruction", icon="step-forward"), "vtlab-step")
        self.exit_button = _css(W.Button(description="run to next exit", icon="fast-forward"), "vtlab-next-exit")
        self.run_button = _css(W.Button(description="run", icon="play", button_style="success"), "vtlab-run")
        self.reset_button = _css(W.Button(description="reset", icon="undo"), "vtlab-reset")
        self.mode_html = _css(W.HTML(), "vtlab-mode")
        self.next_html = _css(W.HTML(), "vtlab-next-insn")
        self.regs_html = _css(W.HTML(), "vtlab-registers")
        self.exit_html = _css(W.HTML(), "vtlab-last-exit")
        self.changed_html = _css(W.HTML(), "vtlab-vmcs-changes")
        self.output_html = _css(W.HTML(), "vtlab-guest-output")
        self.step_button.on_click(lambda b: self.step())
        self.exit_button.on_click(lambda b: self.next_exit())
        self.run_button.on_click(lambda b: self.run())
        self.reset_button.on_click(lambda b: self.reset())
        self.widget = _css(W.VBox([
            W.HBox([self.step_button, self.exit_button, self.run_button, self.reset_button]),
            self.mode_html, self.next_html,
            W.HBox([self.regs_html, W.VBox([self.exit_html, self.changed_html])]),
            self.output_html,
        ]), "vtlab-stepper")
        self.reset()

    # actions -------------------------------------------------------------
    def _guarded(self, action: Callable[[], object]) -> None:
        before = self._snapshot()
        self._error = ""
        try:
            action()
        except VtlabError as exc:
            self._error = str(exc)
        self.refresh(before)

    def step(self) -> None:
        """Execute one guest instruction (or, if an exit is waiting, run its handler)."""
        self._guarded(self.vm.step)

    def next_exit(self) -> None:
        """Run until the next VM exit; stop before its handler runs."""
        self._guarded(lambda: self.vm.next_exit(max_instructions=1_000_000))

    def run(self) -> None:
        """Run to the end (HLT, shutdown, crash or budget)."""
        self._guarded(lambda: self.vm.run(max_exits=5_000, max_instructions=5_000_000))

    def reset(self) -> None:
        """Build a fresh VM from the guest source."""
        self.vm = self.factory()
        self._error = ""
        self.refresh(None)

    # display -------------------------------------------------------------
    def _snapshot(self) -> dict:
        vmcs = self.vm.vmcs
        if self.vm.cpu.operation is VmxOperation.NON_ROOT:
            return {}
        return {f: vmcs.get(f) for f in _WATCHED}

    @property
    def mode_text(self) -> str:
        cpu, g = self.vm.cpu, self.vm.guest
        where = "VMX non-root operation (guest)" if cpu.operation is VmxOperation.NON_ROOT else \
            "VMX root operation (VMM)"
        return f"{where} · guest CPL {g.cpl} · {g.bits}-bit code · VM state: {self.vm.state.value}"

    def refresh(self, before: dict | None) -> None:
        vm, g = self.vm, self.vm.guest
        colour = "#0072B2" if vm.cpu.operation is VmxOperation.NON_ROOT else "#E69F00"
        self.mode_html.value = (f"<div style='padding:4px;border-left:6px solid {colour}'>"
                                f"<b>{html.escape(self.mode_text)}</b></div>")
        where = g.linear_rip()
        if vm.cpu.operation is not VmxOperation.NON_ROOT:  # the VMM may have advanced GUEST_RIP
            where = g.segment("cs").base + vm.vmcs.get(F.GUEST_RIP)
        insn = g.instruction_at(where)
        self.next_html.value = ("next guest instruction: <code>" +
                                html.escape(f"{where:#x}: {insn.text}" if insn else "(undecodable)")
                                + "</code>")
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rip", "rflags"]
        rows = "".join(f"<tr><td>{n}</td><td><code>{g.reg(n):#x}</code></td></tr>" for n in names)
        self.regs_html.value = f"<table class='vtlab-regs'>{rows}</table>"
        exit_ = vm.last_exit
        if exit_ is not None:
            fields = "".join(f"<li>{html.escape(str(k))}: <code>{html.escape(_fmt(v))}</code></li>"
                             for k, v in exit_.decoded().items())
            pending = " <i>(handler not run yet)</i>" if vm.pending_exit is exit_ else ""
            text = (f"<b>last exit</b>{pending}: {html.escape(exit_.reason.name)} "
                    f"(reason {int(exit_.reason)}), guest RIP <code>{exit_.guest_rip:#x}</code>, "
                    f"instruction length {exit_.instruction_length}<ul>{fields}</ul>")
        else:
            text = "<b>last exit</b>: none yet"
        if getattr(self, "_error", ""):
            text += f"<div class='vtlab-vm-error'><b style='color:#D55E00'>{html.escape(self._error)}</b></div>"
        if vm.message:
            text += f"<div class='vtlab-vm-message'>{html.escape(vm.message)}</div>"
        self.exit_html.value = text
        after = self._snapshot()
        if before and after:
            changed = [f for f in _WATCHED if before.get(f) != after.get(f)]
            items = "".join(f"<li style='background:#F0E442'>{f.name}: <code>{before[f]:#x}</code> → "
                            f"<code>{after[f]:#x}</code></li>" for f in changed)
            self.changed_html.value = f"<b>VMCS fields changed</b><ul>{items or '<li>none</li>'}</ul>"
        else:
            self.changed_html.value = ""
        out = vm.output
        self.output_html.value = f"guest output: <pre>{html.escape(out) or '(nothing yet)'}</pre>"


def _fmt(v) -> str:
    return f"{v:#x}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


# ---------------------------------------------------------------------- VMCS explorer
class VmcsExplorer(_Base):
    """All VMCS fields by area, plus VMREAD/VMWRITE buttons with the real outcome."""

    def __init__(self, cpu: VmxCpu | VirtualMachine):
        self.cpu = cpu.cpu if isinstance(cpu, VirtualMachine) else cpu
        self.encoding = _css(W.Text(description="encoding", placeholder="0x681E or GUEST_RIP"), "vtlab-encoding")
        self.value = _css(W.Text(description="value", placeholder="0x1000"), "vtlab-value")
        self.read_button = _css(W.Button(description="VMREAD"), "vtlab-vmread")
        self.write_button = _css(W.Button(description="VMWRITE"), "vtlab-vmwrite")
        self.result = _css(W.HTML(), "vtlab-vmx-result")
        self.decoded = _css(W.HTML(), "vtlab-encoding-decoded")
        self.nonzero = W.Checkbox(value=True, description="only non-zero fields", indent=False)
        self.tables = W.Accordion()
        self.read_button.on_click(lambda b: self.vmread())
        self.write_button.on_click(lambda b: self.vmwrite())
        self.encoding.observe(lambda c: self._decode(), names="value")
        self.nonzero.observe(lambda c: self.refresh(), names="value")
        self.widget = _css(W.VBox([
            W.HBox([self.encoding, self.value, self.read_button, self.write_button]),
            self.decoded, self.result, self.nonzero, self.tables]), "vtlab-vmcs-explorer")
        self.refresh()

    def _parse(self) -> int | str:
        text = self.encoding.value.strip()
        try:
            return int(text, 0)
        except ValueError:
            return text

    def _decode(self) -> None:
        text = self.encoding.value.strip()
        if not text:
            self.decoded.value = ""
            return
        try:
            if text.upper() in F.__members__:
                text = str(int(F[text.upper()]))
            enc = decode_encoding(int(text, 0))
            d = enc.as_dict()
            self.decoded.value = ("<small>" + ", ".join(f"{k}: <b>{html.escape(str(v))}</b>" for k, v in d.items())
                                  + (" · <b>read-only</b>" if enc.read_only else "") + "</small>")
        except ValueError as exc:
            self.decoded.value = f"<small>{html.escape(str(exc))}</small>"

    def vmread(self) -> None:
        out = self.cpu.vmread(self._parse())
        self._show(out)

    def vmwrite(self) -> None:
        try:
            value = int(self.value.value, 0)
        except ValueError:
            self.result.value = "<b style='color:#D55E00'>value must be a number (e.g. 0x1000)</b>"
            return
        self._show(self.cpu.vmwrite(self._parse(), value))

    def _show(self, out) -> None:
        colour = "#009E73" if out.ok else "#D55E00"
        flags = out.rflags
        self.result.value = (f"<b style='color:{colour}'>{html.escape(str(out))}</b> "
                             f"<small>(CF={flags['CF']} ZF={flags['ZF']})</small>")
        self.refresh()

    def refresh(self) -> None:
        vmcs = self.cpu.current_vmcs
        if vmcs is None:
            self.tables.children = [W.HTML("no current VMCS (VMPTRLD one)")]
            return
        children, titles = [], []
        for area in VmcsArea:
            rows = []
            for f, value in vmcs.fields(area):
                if self.nonzero.value and not value:
                    continue
                enc = decode_encoding(int(f))
                ro = " (read-only)" if enc.read_only else ""
                rows.append(f"<tr><td>{f.name}</td><td><code>{int(f):#06x}</code></td>"
                            f"<td>{enc.width.name}</td><td><code>{value:#x}</code>{ro}</td></tr>")
            children.append(W.HTML("<table><tr><th>field</th><th>encoding</th><th>width</th><th>value</th></tr>"
                                   + "".join(rows) + "</table>"))
            titles.append(f"{area.name.replace('_', ' ').lower()} ({len(rows)})")
        self.tables.children = children
        for i, t in enumerate(titles):
            self.tables.set_title(i, t)


# ------------------------------------------------------------------------- VMX console
_STATES = [
    ("outside", "Outside VMX operation"),
    ("root", "VMX root, no current VMCS"),
    ("clear", "VMX root, current VMCS (clear)"),
    ("launched", "VMX root, current VMCS (launched)"),
    ("nonroot", "VMX non-root (guest running)"),
]


class VmxConsole(_Base):
    """Press the VMX instructions in any order; see the outcome and where the CPU is.

    The console owns a small guest (CPUID then HLT) and a VMCS that is already filled
    in ("configured VMCS"), plus an empty one: VMLAUNCH with the empty one shows what a
    VMCS without valid controls gets you.
    """

    GUEST = "mov eax, 0\ncpuid\nmov eax, 1\ncpuid\nhlt\n"

    def __init__(self):
        self.buttons: dict[str, W.Button] = {}
        self.operand = _css(W.Dropdown(description="operand", options=[]), "vtlab-operand")
        self.log = _css(W.HTML(), "vtlab-console-log")
        self.diagram = _css(W.HTML(), "vtlab-state-diagram")
        names = ["CR4.VMXE=1", "VMXON", "VMCLEAR", "VMPTRLD", "VMLAUNCH", "VMRESUME", "VMREAD", "VMXOFF", "reset"]
        for name in names:
            b = _css(W.Button(description=name), "vtlab-console-button", f"vtlab-{name.lower().replace('.', '-').replace('=', '')}")
            b.on_click(lambda btn, n=name: self.press(n))
            self.buttons[name] = b
        self.widget = _css(W.VBox([W.HBox([self.buttons[n] for n in names[:5]]),
                                   W.HBox([self.buttons[n] for n in names[5:]] + [self.operand]),
                                   self.diagram, self.log]), "vtlab-vmx-console")
        self.reset()

    def reset(self) -> None:
        """Power on again: outside VMX operation, CR4.VMXE = 0."""
        self.vm = VirtualMachine(self.GUEST, mode="real")
        cpu = self.vm.cpu
        cpu.vmxoff()
        cpu.cr4 &= ~(1 << 13)
        cpu.history.clear()
        self.empty_vmcs = cpu.alloc_region(cpu.caps.revision_id)
        self.bad_revision = cpu.alloc_region(0xBAD)
        self.operand.options = [
            (f"VMXON region {self.vm.vmxon_address:#x}", self.vm.vmxon_address),
            (f"configured VMCS {self.vm.vmcs_address:#x}", self.vm.vmcs_address),
            (f"empty VMCS {self.empty_vmcs:#x}", self.empty_vmcs),
            (f"region with wrong revision id {self.bad_revision:#x}", self.bad_revision),
            ("misaligned address 0x1234", 0x1234),
        ]
        self.operand.value = self.vm.vmxon_address
        self.entries: list[str] = []
        self.refresh()

    @property
    def cpu(self) -> VmxCpu:
        return self.vm.cpu

    @property
    def state(self) -> str:
        """Node of the state diagram the CPU is in."""
        cpu = self.cpu
        if cpu.operation is VmxOperation.OUTSIDE:
            return "outside"
        if cpu.operation is VmxOperation.NON_ROOT:
            return "nonroot"
        vmcs = cpu.current_vmcs
        if vmcs is None:
            return "root"
        return "launched" if vmcs.launch_state.value == "launched" else "clear"

    def press(self, name: str) -> str:
        """Execute one console button; returns the outcome text."""
        cpu, addr = self.cpu, self.operand.value
        try:
            if name == "reset":
                self.reset()
                return "reset"
            if name == "CR4.VMXE=1":
                cpu.write_cr4(cpu.cr4 | (1 << 13))
                text = "MOV CR4: CR4.VMXE = 1 (VMX enabled; VMXON is now allowed)"
            elif name == "VMXON":
                text = str(cpu.vmxon(addr))
            elif name == "VMCLEAR":
                text = str(cpu.vmclear(addr))
            elif name == "VMPTRLD":
                text = str(cpu.vmptrld(addr))
            elif name in ("VMLAUNCH", "VMRESUME"):
                out = cpu.vmlaunch(100_000) if name == "VMLAUNCH" else cpu.vmresume(100_000)
                text = str(out)
                if out.status is Status.VM_EXIT and out.exit is not None and out.exit.instruction_length:
                    # the console's tiny VMM: advance past the exiting instruction
                    vmcs = cpu.current_vmcs
                    vmcs.write(F.GUEST_RIP, vmcs.read(F.GUEST_RIP) + out.exit.instruction_length)
                    text += " (VMM advanced GUEST_RIP past it)"
            elif name == "VMREAD":
                text = str(cpu.vmread(F.VM_INSTRUCTION_ERROR))
            elif name == "VMXOFF":
                text = str(cpu.vmxoff())
            else:
                raise ValueError(name)
        except VtlabError as exc:
            text = str(exc)
        except Exception as exc:  # never fail silently in front of a learner
            text = f"internal error in the console: {type(exc).__name__}: {exc}"
        self.entries.append(text)
        self.refresh()
        return text

    def refresh(self) -> None:
        current = self.state
        boxes = []
        for key, label in _STATES:
            on = key == current
            style = ("background:#0072B2;color:white;font-weight:bold" if on else "background:#eee;color:#333")
            boxes.append(f"<div class='vtlab-state vtlab-state-{key}{' vtlab-state-current' if on else ''}' "
                         f"style='display:inline-block;margin:3px;padding:6px 10px;border-radius:6px;{style}'>"
                         f"{html.escape(label)}</div>")
        arrows = ("<div style='font-size:80%;color:#555'>VMXON → root · VMPTRLD → current VMCS · "
                  "VMLAUNCH (clear) / VMRESUME (launched) → non-root · VM exit → root, launched · "
                  "VMCLEAR → clear · VMXOFF → outside</div>")
        self.diagram.value = "".join(boxes) + arrows
        items = "".join(f"<li>{html.escape(t)}</li>" for t in self.entries[-12:])
        self.log.value = f"<ol>{items}</ol>" if items else "<i>press an instruction</i>"


# ---------------------------------------------------------------------------- dashboard
DASHBOARD_CONTROLS = [ProcBased.HLT_EXITING, ProcBased.UNCOND_IO_EXITING, ProcBased.USE_IO_BITMAPS,
                      ProcBased.RDTSC_EXITING, ProcBased.USE_MSR_BITMAPS, ProcBased.CR3_LOAD_EXITING,
                      ProcBased.INVLPG_EXITING, ProcBased.PAUSE_EXITING]


class Dashboard(_Base):
    """Choose a workload and a CPU profile, flip controls: exit counts and costs update."""

    def __init__(self, workload: str | None = None, cpu: str | None = None, controls=DASHBOARD_CONTROLS):
        from ..analysis import cost
        from . import guests

        self._cost, self._guests = cost, guests
        names = guests.names()
        self.workload = _css(W.Dropdown(options=names, value=workload or names[0], description="workload"),
                             "vtlab-workload")
        profiles = list(cost.PROFILES)
        self.profile = _css(W.Dropdown(options=profiles, value=cpu or cost.DEFAULT_PROFILE, description="CPU"),
                            "vtlab-profile")
        self.toggles = _FlagMap()
        for flag in controls:
            cb = _css(W.Checkbox(description=flag.name, indent=False, layout=W.Layout(width="auto")),
                      "vtlab-dash-control", f"vtlab-dash-{flag.name}")
            cb.tooltip = CONTROL_INFO[flag].description
            self.toggles[flag] = cb
        self.run_button = _css(W.Button(description="run", icon="play", button_style="success"), "vtlab-run")
        self.counts_html = _css(W.HTML(), "vtlab-exit-counts")
        self.summary_html = _css(W.HTML(), "vtlab-cost-summary")
        self.plot = _css(W.Output(), "vtlab-dashboard-plot")
        self.busy = False
        self.vm: VirtualMachine | None = None
        self.estimate = None
        self._load_defaults()
        for cb in self.toggles.values():
            cb.observe(lambda c: self.update(), names="value")
        self.workload.observe(lambda c: (self._load_defaults(), self.update()), names="value")
        self.profile.observe(lambda c: self.update(rerun=False), names="value")
        self.run_button.on_click(lambda b: self.update())
        self.widget = _css(W.VBox([
            W.HBox([self.workload, self.profile, self.run_button]),
            W.GridBox(list(self.toggles.values()), layout=W.Layout(grid_template_columns="repeat(4, 1fr)")),
            W.HBox([self.counts_html, self.summary_html], layout=W.Layout(grid_gap="3em")),
            self.plot]), "vtlab-dashboard")
        self.update()

    def _load_defaults(self) -> None:
        vm = self._make_vm()
        self.busy = True
        for flag, cb in self.toggles.items():
            cb.value = vm.control(flag)
        self.busy = False

    def _make_vm(self) -> VirtualMachine:
        info = self._guests.info(self.workload.value)
        return VirtualMachine(self._guests.source(self.workload.value), mode=info.mode, load=info.load)

    def run_workload(self) -> VirtualMachine:
        vm = self._make_vm()
        for flag, cb in self.toggles.items():
            vm.set_control(flag, cb.value)
        vm.run(max_exits=20_000, max_instructions=20_000_000)
        return vm

    @property
    def exit_counts(self) -> dict[str, int]:
        """Exits per reason of the last run."""
        return {} if self.vm is None else {str(k): int(v) for k, v in self.vm.trace.counts().items()}

    def update(self, rerun: bool = True) -> None:
        if self.busy:
            return
        import matplotlib.pyplot as plt
        from ..analysis import plots

        if rerun or self.vm is None:
            self.vm = self.run_workload()
        est = self._cost.estimate(self.vm.trace, cpu=self.profile.value)
        self.estimate = est
        counts = self.exit_counts
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td class='vtlab-count' data-reason='{html.escape(k)}'>{v}</td></tr>"
                       for k, v in counts.items())
        total = sum(counts.values())
        self.counts_html.value = (f"<b>VM exits: <span class='vtlab-exit-total'>{total}</span></b>"
                                  f"<table>{rows}</table><small>state: {html.escape(self.vm.state.value)}</small>")
        attrs = est.attrs
        self.summary_html.value = (
            f"<b>{html.escape(str(attrs.get('profile', self.profile.value)))}</b><br>"
            f"native: {attrs.get('native_cycles', 0):,.0f} cycles<br>"
            f"virtualization: {attrs.get('virtualization_cycles', est['total_cycles'].sum() if 'total_cycles' in est else 0):,.0f} cycles<br>"
            f"overhead: <b class='vtlab-overhead'>{attrs.get('overhead_pct', 0):.1f}%</b>")
        fig = plots.cycle_breakdown(self.vm.trace, cpu=self.profile.value)
        # A PNG, not the Figure: display(fig) shows "<Figure size ...>" as text unless the
        # inline backend registered its formatter (not so under MPLBACKEND=Agg or ipympl).
        buf = io.BytesIO()
        # The figure lays itself out (constrained layout); a "tight" bounding box would
        # draw it twice, and 80 dpi is plenty on screen: together they halve the redraw.
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        self.plot.clear_output(wait=True)
        with self.plot:
            from IPython.display import Image, display
            display(Image(data=buf.getvalue(), format="png"))

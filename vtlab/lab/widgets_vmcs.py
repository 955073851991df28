"""The VMCS explorer: every field by area, with VMREAD/VMWRITE and their real outcome."""
from __future__ import annotations

import html

import ipywidgets as W

from ..arch.vmcs_fields import VmcsArea, VmcsField as F, decode_encoding
from ..vmm.machine import VirtualMachine
from ..cpu.vmx import VmxCpu
from .widgets_base import _Base, _css, badge, error_html, parse_number


class VmcsExplorer(_Base):
    """All VMCS fields by area, plus VMREAD/VMWRITE buttons with the real outcome."""

    def __init__(self, cpu: VmxCpu | VirtualMachine):
        self.cpu = cpu.cpu if isinstance(cpu, VirtualMachine) else cpu
        wide = {"description_width": "initial"}   # (labels never clipped)
        self.encoding = _css(W.Text(description="encoding", placeholder="0x681E or GUEST_RIP", style=wide,
                                    layout=W.Layout(width="22em")), "vtlab-encoding")
        self.value = _css(W.Text(description="value", placeholder="0x1000", style=wide,
                                 layout=W.Layout(width="14em")), "vtlab-value")
        self.read_button = _css(W.Button(description="VMREAD"), "vtlab-vmread")
        self.write_button = _css(W.Button(description="VMWRITE"), "vtlab-vmwrite")
        self.result = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-vmx-result")
        self.decoded = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-encoding-decoded")
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
            value = parse_number(self.value.value, "VMWRITE value")
        except ValueError as exc:
            self.result.value = error_html(f"{exc}; the value must be a number (e.g. 0x1000)")
            return
        self._show(self.cpu.vmwrite(self._parse(), value))

    def _show(self, out) -> None:
        flags = out.rflags
        self.result.value = (f"{badge('ok' if out.ok else 'error', str(out))} "
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
            # (scrolls sideways rather than cutting a column off in a narrow notebook)
            children.append(W.HTML("<div style='overflow-x:auto;max-width:100%'><table>"
                                   "<tr><th>field</th><th>encoding</th><th>width</th><th>value</th></tr>"
                                   + "".join(rows) + "</table></div>", layout=W.Layout(width="100%")))
            titles.append(f"{area.name.replace('_', ' ').lower()} ({len(rows)})")
        self.tables.children = children
        for i, t in enumerate(titles):
            self.tables.set_title(i, t)

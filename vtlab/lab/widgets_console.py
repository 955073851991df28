"""The VMX console: press the VMX instructions in any order, watch the state diagram.

The console is a processor with a very small VMM around it: the buttons are the VMX
instructions (SDM Vol. 3C, chapter 31), their outcomes are the SDM's (VMsucceed,
VMfailInvalid, VMfailValid with an error number, #UD/#GP), and the diagram is the
life cycle of SDM Vol. 3C, 24.1 and 25.1 (a VMCS is *clear* until VMLAUNCH makes it
*launched*; VMCLEAR makes it clear again and not current).
"""
from __future__ import annotations

import html

import ipywidgets as W

from ..arch.exit_reasons import ExitReason
from ..arch.msrs import Cr4
from ..arch.vmcs_fields import VmcsField as F
from ..errors import VtlabError
from ..vmm.machine import VirtualMachine
from ..cpu.vmx import Status, VmxCpu, VmxOperation
from .widgets_base import BADGES, TEXT, _Base, _css, parse_number
from .widgets_stepper import exit_reason_text


_STATES = [
    ("outside", "Outside VMX operation"),
    ("root", "VMX root, no current VMCS"),
    ("clear", "VMX root, current VMCS (clear)"),
    ("launched", "VMX root, current VMCS (launched)"),
    ("nonroot", "VMX non-root (guest running)"),
]

#: Where each state sits in the diagram: (x, y) of its box, and its two label lines.
_NODES = {
    "outside": (10, 100, ("Off", "outside VMX operation")),
    "root": (250, 100, ("VMX root", "no current VMCS")),
    "clear": (500, 15, ("VMCS clear", "current, not launched")),
    "launched": (500, 185, ("VMCS launched", "current, launched")),
    "nonroot": (750, 100, ("VMX non-root", "the guest runs")),
}
_BOX_W, _BOX_H = 160, 62
_WIDTH, _HEIGHT = 920, 262
#: The transitions: (from, to, label).  A pair of opposite transitions is drawn as two
#: parallel arrows, each label on its own arrow's outer side.
_EDGES = [
    ("outside", "root", "VMXON"), ("root", "outside", "VMXOFF"),
    ("root", "clear", "VMPTRLD"), ("clear", "root", "VMCLEAR"),
    ("launched", "root", "VMCLEAR"),
    ("clear", "nonroot", "VMLAUNCH"), ("launched", "nonroot", "VMRESUME"),
    ("nonroot", "launched", "VM exit"),
]


def _centre(key: str) -> tuple[float, float]:
    x, y, _ = _NODES[key]
    return x + _BOX_W / 2, y + _BOX_H / 2


def _edge_points(a: str, b: str, offset: float) -> tuple[float, float, float, float, float, float]:
    """A line from box ``a`` to box ``b`` shifted sideways by ``offset``, clipped to the
    boxes; also the unit normal (nx, ny) the shift went along."""
    (x1, y1), (x2, y2) = _centre(a), _centre(b)
    dx, dy = x2 - x1, y2 - y1
    length = (dx * dx + dy * dy) ** 0.5
    ux, uy = -dy / length, dx / length
    # Clip: leave each box through its edge (half width / half height along the line).
    t = min((_BOX_W / 2 + 6) / abs(dx) if dx else 1e9, (_BOX_H / 2 + 6) / abs(dy) if dy else 1e9)
    return (x1 + dx * t + ux * offset, y1 + dy * t + uy * offset,
            x2 - dx * t + ux * offset, y2 - dy * t + uy * offset, ux, uy)


def state_diagram_svg(current: str) -> str:
    """The VMX life cycle as an SVG diagram with ``current`` highlighted.

    The current state is drawn filled, with a thick border and the words "you are here"
    (so it is never told by colour alone); other text follows JupyterLab's theme.
    """
    _, on_fg, on_bg = BADGES["guest"]
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {_WIDTH} {_HEIGHT}' width='{_WIDTH}' "
             f"height='{_HEIGHT}' role='img' aria-label='VMX state diagram, current state: "
             f"{html.escape(dict(_STATES)[current])}' "
             "style='max-width:100%;height:auto;font-family:sans-serif;font-size:13px'>",
             "<defs><marker id='vtlab-arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' "
             "markerHeight='7' orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' "
             f"style='fill:{TEXT}'/></marker></defs>"]
    pairs = {(a, b) for a, b, _ in _EDGES}
    for a, b, label in _EDGES:
        paired = (b, a) in pairs
        offset = 6 if paired else 0
        x1, y1, x2, y2, ux, uy = _edge_points(a, b, offset)
        # The label sits beside its own arrow: outward along the normal for a pair,
        # above (smaller y) a lone arrow.
        if not paired:
            ux, uy = (ux, uy) if uy < 0 or (uy == 0 and ux < 0) else (-ux, -uy)
        lx, ly = (x1 + x2) / 2 + ux * 14, (y1 + y2) / 2 + uy * 14 + 4
        parts.append(f"<line x1='{x1:.0f}' y1='{y1:.0f}' x2='{x2:.0f}' y2='{y2:.0f}' "
                     f"style='stroke:{TEXT};stroke-width:1.5' marker-end='url(#vtlab-arrow)'/>"
                     f"<text x='{lx:.0f}' y='{ly:.0f}' text-anchor='middle' class='vtlab-edge' "
                     f"style='fill:{TEXT};font-weight:bold'>{html.escape(label)}</text>")
    for key, (x, y, (title, sub)) in _NODES.items():
        on = key == current
        fill, fg = (on_bg, on_fg) if on else ("none", TEXT)
        width = 4 if on else 1.5
        cx = x + _BOX_W / 2
        parts.append(f"<g class='vtlab-state vtlab-state-{key}{' vtlab-state-current' if on else ''}'>"
                     f"<rect x='{x}' y='{y}' width='{_BOX_W}' height='{_BOX_H}' rx='8' "
                     f"style='fill:{fill};stroke:{TEXT};stroke-width:{width}'/>"
                     f"<text x='{cx:.0f}' y='{y + 20}' text-anchor='middle' "
                     f"style='fill:{fg};font-weight:bold'>{html.escape(title)}</text>"
                     f"<text x='{cx:.0f}' y='{y + 37}' text-anchor='middle' "
                     f"style='fill:{fg}'>{html.escape(sub)}</text>"
                     + (f"<text x='{cx:.0f}' y='{y + 54}' text-anchor='middle' "
                        f"style='fill:{fg};font-weight:bold'>\u25B6 you are here</text>" if on else "")
                     + "</g>")
    parts.append("</svg>")
    return "".join(parts)


class VmxConsole(_Base):
    """Press the VMX instructions in any order; see the outcome and where the CPU is.

    The console owns a small guest (CPUID, CPUID, HLT) and a VMCS that is already filled
    in ("configured VMCS"), plus an empty one: VMLAUNCH with the empty one shows what a
    VMCS without valid controls gets you.  Its VMM advances GUEST_RIP past an exiting
    CPUID; after a HLT exit it leaves GUEST_RIP at the HLT (the guest is halted: a VMM
    waits for an interrupt, and VMRESUME re-executes HLT, which exits again).

    VMREAD and VMWRITE use the *field* box (a name such as ``GUEST_RIP`` or an encoding
    such as ``0x681E``; default VM_INSTRUCTION_ERROR) and VMWRITE the *value* box.
    """

    GUEST = "mov eax, 0\ncpuid\nmov eax, 1\ncpuid\nhlt\n"
    #: The buttons, in the order shown.
    NAMES = ["CR4.VMXE=1", "VMXON", "VMCLEAR", "VMPTRLD", "VMPTRST", "VMLAUNCH", "VMRESUME",
             "VMREAD", "VMWRITE", "VMCALL", "VMXOFF", "reset"]

    def __init__(self):
        self.buttons: dict[str, W.Button] = {}
        self.operand = _css(W.Dropdown(description="operand", options=[],
                                       layout=W.Layout(width="34em"), style={"description_width": "initial"}),
                            "vtlab-operand")
        self.field = _css(W.Text(value="VM_INSTRUCTION_ERROR", description="field",
                                 placeholder="GUEST_RIP or 0x681E", layout=W.Layout(width="22em"),
                                 style={"description_width": "initial"}), "vtlab-console-field")
        self.value = _css(W.Text(value="", description="value", placeholder="0x1000",
                                 layout=W.Layout(width="14em"), style={"description_width": "initial"}),
                          "vtlab-console-value")
        self.log = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-console-log")
        self.diagram = _css(W.HTML(), "vtlab-state-diagram")
        for name in self.NAMES:
            b = _css(W.Button(description=name, layout=W.Layout(width="auto")), "vtlab-console-button",
                     f"vtlab-{name.lower().replace('.', '-').replace('=', '')}")
            b.on_click(lambda btn, n=name: self.press(n))
            self.buttons[name] = b
        self.widget = _css(W.VBox([W.HBox([self.buttons[n] for n in self.NAMES[:7]]),
                                   W.HBox([self.buttons[n] for n in self.NAMES[7:]]),
                                   W.HBox([self.operand]), W.HBox([self.field, self.value]),
                                   self.diagram, self.log]), "vtlab-vmx-console")
        self.reset()

    def reset(self) -> None:
        """Power on again: outside VMX operation, CR4.VMXE = 0."""
        self.vm = VirtualMachine(self.GUEST, mode="real")
        cpu = self.vm.cpu
        cpu.vmxoff()
        cpu.cr4 &= ~int(Cr4.VMXE)
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

    def _field(self) -> int | str:
        text = self.field.value.strip() or "VM_INSTRUCTION_ERROR"
        try:
            return parse_number(text, "field")
        except ValueError:
            return text.upper()   # a field name; VMREAD/VMWRITE answer error 12 for a bad one

    def _enter(self, name: str) -> str:
        cpu = self.cpu
        out = cpu.vmlaunch(100_000) if name == "VMLAUNCH" else cpu.vmresume(100_000)
        text = str(out)
        if out.status is Status.VM_EXIT and out.exit is not None:
            text = f"{name}: VM exit -> {exit_reason_text(out.exit.reason)} at guest RIP {out.exit.guest_rip:#x}"
            vmcs = cpu.current_vmcs
            if out.exit.reason == ExitReason.HLT:
                # A halted guest: KVM would block the vCPU until an interrupt. GUEST_RIP stays
                # on the HLT, so VMRESUME re-executes it (and exits again), never the bytes after.
                text += (" - the guest is halted (HLT exiting is 1, SDM Vol. 3C 26.1.3); the VMM leaves "
                         "GUEST_RIP at the HLT: a VMRESUME executes HLT again")
            elif out.exit.instruction_length:
                # the console's tiny VMM: advance past the exiting instruction
                vmcs.write(F.GUEST_RIP, vmcs.read(F.GUEST_RIP) + out.exit.instruction_length)
                text += " (VMM advanced GUEST_RIP past it)"
        elif out.status is Status.PAUSED:
            g = cpu.guest
            if out.halted:
                text = (f"{name}: the guest executed HLT with HLT exiting 0: it is in the HLT activity "
                        "state in VMX non-root operation (SDM Vol. 3C, 25.4.2, activity state) and only an "
                        "interrupt would wake it; this console sends none - press reset")
            elif g.limits.stopped:
                text = (f"{name}: stopped - {g.limits.stopped}. The guest is stuck in VMX non-root "
                        "operation; press reset")
            else:
                text = (f"{name}: stopped after 100,000 guest instructions without a VM exit "
                        f"(guest RIP {g.rip:#x}); press reset")
        return text

    def press(self, name: str) -> str:
        """Execute one console button; returns the outcome text."""
        cpu, addr = self.cpu, self.operand.value
        try:
            if name == "reset":
                self.reset()
                return "reset"
            if cpu.operation is VmxOperation.NON_ROOT and name != "CR4.VMXE=1":
                # Every VMX instruction causes a VM exit in VMX non-root operation (SDM Vol. 3C,
                # 26.1.2); the console's buttons are the VMM's, and the VMM is not running.
                text = (f"{name}: not possible now - the guest is running in VMX non-root operation "
                        "and never exits (see the entry above); press reset")
            elif name == "CR4.VMXE=1":
                cpu.write_cr4(cpu.cr4 | int(Cr4.VMXE))
                text = "MOV CR4: CR4.VMXE = 1 (VMX enabled; VMXON is now allowed)"
            elif name == "VMXON":
                text = str(cpu.vmxon(addr))
            elif name == "VMCLEAR":
                text = str(cpu.vmclear(addr))
            elif name == "VMPTRLD":
                text = str(cpu.vmptrld(addr))
            elif name == "VMPTRST":
                text = str(cpu.vmptrst())
            elif name in ("VMLAUNCH", "VMRESUME"):
                text = self._enter(name)
            elif name == "VMREAD":
                text = str(cpu.vmread(self._field()))
            elif name == "VMWRITE":
                try:
                    value = parse_number(self.value.value, "VMWRITE value")
                except ValueError as exc:
                    text = f"VMWRITE not executed: {exc}"
                else:
                    text = str(cpu.vmwrite(self._field(), value))
            elif name == "VMCALL":
                text = str(cpu.vmcall())
            elif name == "VMXOFF":
                text = str(cpu.vmxoff())
            else:
                raise ValueError(f"no console button {name!r}")
        except VtlabError as exc:
            text = str(exc)
        except Exception as exc:  # never fail silently in front of a learner
            text = f"internal error in the console (a vtlab bug): {type(exc).__name__}: {exc}"
        self.entries.append(text)
        self.refresh()
        return text

    def refresh(self) -> None:
        """Redraw the diagram and the log (the last 12 entries, numbered from the first)."""
        self.diagram.value = state_diagram_svg(self.state)
        first = max(0, len(self.entries) - 12)
        items = "".join(f"<li value='{n}'>{html.escape(t)}</li>"
                        for n, t in enumerate(self.entries[first:], start=first + 1))
        self.log.value = (f"<ol style='white-space:normal;color:{TEXT}'>{items}</ol>" if items
                          else "<i>press an instruction</i>")

"""The VMX console: press the VMX instructions in any order, watch the state diagram."""
from __future__ import annotations

import html

import ipywidgets as W

from ..arch.msrs import Cr4
from ..arch.vmcs_fields import VmcsField as F
from ..errors import VtlabError
from ..vmm.machine import VirtualMachine
from ..cpu.vmx import Status, VmxCpu, VmxOperation
from .widgets_base import _Base, _css


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

    def press(self, name: str) -> str:
        """Execute one console button; returns the outcome text."""
        cpu, addr = self.cpu, self.operand.value
        try:
            if name == "reset":
                self.reset()
                return "reset"
            if name == "CR4.VMXE=1":
                cpu.write_cr4(cpu.cr4 | int(Cr4.VMXE))
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

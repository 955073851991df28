"""The stepper: a guest stepped across VM entries and exits, one instruction at a time."""
from __future__ import annotations

import html
from typing import Callable

import ipywidgets as W

from ..arch.vmcs_fields import VmcsField as F
from ..errors import VtlabError
from ..vmm.machine import VirtualMachine
from ..cpu.vmx import VmxOperation
from .widgets_base import _Base, _css


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

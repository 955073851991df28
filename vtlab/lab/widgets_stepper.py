"""The stepper: a guest stepped across VM entries and exits, one instruction at a time.

What it shows follows where the processor is (SDM Vol. 3C, 24.1 "Overview"):

* in VMX **non-root** operation the guest runs: the guest view is the live guest CPU;
* in VMX **root** operation (after a VM exit) the VMM runs: the processor has saved the
  guest's RIP, RSP, RFLAGS, CR0/CR3/CR4 and segment selectors into the guest-state area
  and loaded the host-state area (SDM Vol. 3C, 28.3 "Saving Guest State" and 28.5
  "Loading Host State"), so the guest view reads those VMCS fields and the host view
  shows the HOST_* fields the processor loaded.  The general registers are not part of
  the VMCS: the VMM keeps them (``vm.regs``).

"VMCS fields changed" compares the VMCS after the step with the VMCS as it was before
the last VM entry, so the first VM exit shows what the processor wrote: VM_EXIT_REASON,
EXIT_QUALIFICATION, VM_EXIT_INSTRUCTION_LEN ... (SDM Vol. 3C, 28.2 "Recording VM-Exit
Information").
"""
from __future__ import annotations

import html
from typing import Callable

import ipywidgets as W

from ..arch.exit_reasons import ExitReason, basic_exit_reason
from ..arch.vmcs_fields import VmcsField as F
from ..errors import VtlabError
from ..vmm.machine import VirtualMachine
from ..vmm.state import VmState
from ..cpu.vmx import VmxOperation
from .widgets_base import TEXT, TEXT_QUIET, _Base, _css, badge, error_html


_WATCHED = [F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4,
            F.GUEST_CS_SELECTOR, F.GUEST_ACTIVITY_STATE, F.GUEST_INTERRUPTIBILITY_INFO,
            F.VM_EXIT_REASON, F.EXIT_QUALIFICATION, F.VM_EXIT_INSTRUCTION_LEN,
            F.VMX_INSTRUCTION_INFO, F.VM_EXIT_INTR_INFO, F.VM_EXIT_INTR_ERROR_CODE,
            F.GUEST_LINEAR_ADDRESS, F.GUEST_PHYSICAL_ADDRESS, F.VM_INSTRUCTION_ERROR]

#: The guest view in root operation: (label, guest-state field) - SDM Vol. 3C, 28.3.
_GUEST_FIELDS = [("rip", F.GUEST_RIP), ("rsp", F.GUEST_RSP), ("rflags", F.GUEST_RFLAGS),
                 ("cr0", F.GUEST_CR0), ("cr3", F.GUEST_CR3), ("cr4", F.GUEST_CR4),
                 ("cs", F.GUEST_CS_SELECTOR)]
#: The host view: (label, host-state field) the VM exit loads - SDM Vol. 3C, 28.5.
_HOST_FIELDS = [("rip", F.HOST_RIP), ("rsp", F.HOST_RSP), ("cr0", F.HOST_CR0),
                ("cr3", F.HOST_CR3), ("cr4", F.HOST_CR4), ("cs", F.HOST_CS_SELECTOR)]
_GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi"]

#: States after which the guest cannot go on (reset builds a fresh VM).
_DEAD = {VmState.CRASHED: "the guest triple-faulted (shutdown: SDM Vol. 3A, 6.15, #DF)",
         VmState.SHUTDOWN: "the guest asked to be switched off",
         VmState.ENTRY_FAILED: "VM entry failed, so there is no guest to run",
         VmState.ERROR: "an exit handler raised, so the VM is stopped",
         VmState.HALTED: "the guest is halted and nothing will wake it"}


def exit_reason_text(reason: ExitReason | int) -> str:
    """``"CPUID (10)"``: a basic exit reason by name with its number (SDM Vol. 3C, Appendix C)."""
    try:
        reason = ExitReason(int(reason))
    except ValueError:
        return f"reason {int(reason)} (not a basic exit reason of SDM Vol. 3C, Appendix C)"
    return f"{reason.name} ({int(reason)})"


def _field_value_text(field: F, value: int) -> str:
    if field is F.VM_EXIT_REASON and value:
        basic = basic_exit_reason(value)
        failed = " | bit 31: VM-entry failure" if value >> 31 & 1 else ""
        return f"{value:#x} = {exit_reason_text(basic)}{failed}"
    return f"{value:#x}"


class Stepper(_Base):
    """Step a guest across VM entries and exits.

    ``source``/``mode``/``load`` describe the guest (a fresh VM is built on reset), or
    pass ``factory``: a function returning a configured :class:`VirtualMachine`.

    Buttons: *step instruction* (one guest instruction, or the pending exit's handler),
    *run to next exit* (stops before the handler runs), *run*, *reset*.  After a triple
    fault, a failed VM entry, a handler error or a HLT nothing wakes, the first three
    are disabled and the widget says why; *reset* starts over.
    """

    def __init__(self, source: str | bytes | None = None, mode: str = "real", load: int | None = None,
                 factory: Callable[[], VirtualMachine] | None = None):
        self.factory = factory or (lambda: VirtualMachine(source, mode=mode, load=load))
        self.step_button = _css(W.Button(description="step instruction", icon="step-forward",
                                         layout=W.Layout(width="auto")), "vtlab-step")
        self.exit_button = _css(W.Button(description="run to next exit", icon="fast-forward",
                                         layout=W.Layout(width="auto")), "vtlab-next-exit")
        self.run_button = _css(W.Button(description="run", icon="play", button_style="success"), "vtlab-run")
        self.reset_button = _css(W.Button(description="reset", icon="undo"), "vtlab-reset")
        self.mode_html = _css(W.HTML(), "vtlab-mode")
        self.status_html = _css(W.HTML(), "vtlab-stepper-status")
        self.next_html = _css(W.HTML(), "vtlab-next-insn")
        self.disasm_html = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-disassembly")
        self.regs_html = _css(W.HTML(), "vtlab-registers")
        self.exit_html = _css(W.HTML(layout=W.Layout(width="auto")), "vtlab-last-exit")
        self.changed_html = _css(W.HTML(), "vtlab-vmcs-changes")
        self.output_html = _css(W.HTML(), "vtlab-guest-output")
        self.step_button.on_click(lambda b: self.step())
        self.exit_button.on_click(lambda b: self.next_exit())
        self.run_button.on_click(lambda b: self.run())
        self.reset_button.on_click(lambda b: self.reset())
        self.widget = _css(W.VBox([
            W.HBox([self.step_button, self.exit_button, self.run_button, self.reset_button]),
            self.mode_html, self.status_html, self.next_html, self.disasm_html,
            W.HBox([self.regs_html, W.VBox([self.exit_html, self.changed_html])],
                   layout=W.Layout(grid_gap="2em")),
            self.output_html,
        ]), "vtlab-stepper")
        self.reset()

    # actions -------------------------------------------------------------
    @property
    def can_go_on(self) -> bool:
        """False once the guest cannot run any further (see :data:`_DEAD`)."""
        vm = self.vm
        return not (vm.state in _DEAD and vm.pending_exit is None)

    def _guarded(self, action: Callable[[], object]) -> None:
        if not self.can_go_on:  # (a click that slipped past the disabled button)
            self.refresh(None)
            return
        root = self.vm.cpu.operation is not VmxOperation.NON_ROOT
        # Diff against the VMCS as it was before the VM entry: taken now in root
        # operation, or kept from the last moment the VMM was running.
        before = self._snapshot() if root else self._entry_snapshot
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
        self._entry_snapshot = self._snapshot()
        self.refresh(None)

    # display -------------------------------------------------------------
    def _snapshot(self) -> dict:
        vmcs = self.vm.vmcs
        return {f: vmcs.get(f) for f in _WATCHED}

    @property
    def mode_text(self) -> str:
        """Where the processor is: VMX operation, the guest's CPL and code size, VM state."""
        cpu, g = self.vm.cpu, self.vm.guest
        where = "VMX non-root operation (guest)" if cpu.operation is VmxOperation.NON_ROOT else \
            "VMX root operation (VMM)"
        return f"{where} · guest CPL {g.cpl} · {g.bits}-bit code · VM state: {self.vm.state.value}"

    def _guest_rip(self) -> int:
        """The linear address of the guest's next instruction, from wherever it lives now."""
        vm, g = self.vm, self.vm.guest
        if vm.cpu.operation is VmxOperation.NON_ROOT:
            return g.linear_rip()
        # Root operation: the guest's RIP is in the VMCS (and the VMM may have advanced it).
        return (vm.vmcs.get(F.GUEST_CS_BASE) + vm.vmcs.get(F.GUEST_RIP)) & 0xFFFF_FFFF_FFFF_FFFF

    def _registers(self, root: bool) -> str:
        vm, g = self.vm, self.vm.guest
        vmcs = vm.vmcs
        rows = []
        if root:
            guest = [(n, vmcs.get(f), f.name) for n, f in _GUEST_FIELDS]
        else:
            guest = [(n, g.reg(n), "live") for n in ("rip", "rsp", "rflags", "cr0", "cr3", "cr4", "cs")]
        for (name, value, src), (hname, hfield) in zip(guest, _HOST_FIELDS + [("", None)]):
            host = (f"<td>{hfield.name}</td><td><code>{vmcs.get(hfield):#x}</code></td>" if hfield is not None
                    else "<td></td><td></td>")
            rows.append(f"<tr><td>{name}</td><td><code>{value:#x}</code></td>"
                        f"<td style='color:{TEXT_QUIET}'><small>{html.escape(src)}</small></td>{host}</tr>")
        gprs = " ".join(f"{n}=<code>{g.reg(n):#x}</code>" for n in _GPRS)
        who = ("guest view from the VMCS guest-state area (saved by the VM exit, SDM Vol. 3C 28.3)"
               if root else "guest view: the live guest CPU")
        host_who = ("host view: the HOST_* fields the VM exit loaded (the VMM runs on them)" if root
                    else "host view: HOST_* fields, loaded at the next VM exit")
        return (f"<table class='vtlab-regs' style='color:{TEXT};line-height:1.3'>"
                f"<tr><th colspan=3 class='vtlab-guest-view' style='text-align:left'>{badge('guest', 'guest')}</th>"
                f"<th colspan=2 class='vtlab-host-view' style='text-align:left'>{badge('root', 'host')}</th></tr>"
                f"<tr><td colspan=3 style='max-width:16em;white-space:normal'><small>{html.escape(who)}</small></td>"
                f"<td colspan=2 style='max-width:16em;white-space:normal'><small>{html.escape(host_who)}</small>"
                f"</td></tr>{''.join(rows)}</table>"
                f"<div><small>general registers (not in the VMCS; the VMM keeps them, "
                f"<code>vm.regs</code>): {gprs}</small></div>")

    def _disassembly(self, where: int) -> str:
        """The program as assembled (Capstone's decoding), the next instruction marked."""
        program = self.vm.program
        lines = []
        found = False
        for insn in (program.instructions if program is not None else []):
            here = insn.address == where
            found |= here
            mark = "\u25B6 next" if here else "      "
            text = html.escape(f"{mark} {insn}")
            lines.append(f"<b class='vtlab-disasm-current'>{text}</b>" if here else text)
        if not found:
            if program is not None and not program.address <= where < program.end:
                lines.append(html.escape(f"\u25B6 next {where:#06x}: outside the loaded program "
                                         f"({program.address:#x}-{program.end - 1:#x}); what is there "
                                         "was never assembled (zero bytes or unloaded memory)"))
            else:
                insn = self.vm.guest.instruction_at(where)
                lines.append(html.escape(f"\u25B6 next {insn}" if insn else
                                         f"\u25B6 next {where:#06x}: (bytes that do not decode)"))
        return ("<details open><summary>what was assembled (disassembly)</summary>"
                f"<pre style='margin:2px 0;color:{TEXT};max-height:14em;overflow:auto'>"
                + "\n".join(lines) + "</pre></details>")

    def refresh(self, before: dict | None) -> None:
        """Redraw every panel; ``before`` is the VMCS to diff against (None: no diff)."""
        vm, g = self.vm, self.vm.guest
        root = vm.cpu.operation is not VmxOperation.NON_ROOT
        self.mode_html.value = (badge("root" if root else "guest", self.mode_text, "vtlab-mode-badge"))
        going = self.can_go_on
        for b in (self.step_button, self.exit_button, self.run_button):
            b.disabled = not going
        if going:
            self.status_html.value = ""
        else:
            why = _DEAD[vm.state]
            self.status_html.value = (
                f"<div class='vtlab-cannot-go-on' style='white-space:normal'>"
                f"{badge('off', 'cannot go on')} step and run are disabled: {html.escape(why)}"
                f"{': ' + html.escape(vm.message) if vm.message else ''}. Press <b>reset</b> to start over.</div>")
        where = self._guest_rip()
        insn = g.instruction_at(where)
        self.next_html.value = ("next guest instruction: <code>" +
                                html.escape(f"{where:#x}: {insn.text}" if insn else f"{where:#x}: (undecodable)")
                                + "</code>")
        self.disasm_html.value = self._disassembly(where)
        self.regs_html.value = self._registers(root)
        exit_ = vm.last_exit
        if exit_ is not None:
            fields = "".join(f"<li>{html.escape(str(k))}: <code>{html.escape(_fmt(v))}</code></li>"
                             for k, v in exit_.decoded().items())
            pending = " <i>(handler not run yet)</i>" if vm.pending_exit is exit_ else ""
            text = (f"<b>last exit</b>{pending}: <b>{html.escape(exit_reason_text(exit_.reason))}</b> "
                    f"- {html.escape(exit_.reason.description)}<br>guest RIP <code>{exit_.guest_rip:#x}</code>, "
                    f"instruction length {exit_.instruction_length}<ul>{fields}</ul>")
        else:
            text = "<b>last exit</b>: none yet"
        if getattr(self, "_error", ""):
            text += f"<div class='vtlab-vm-error'>{error_html(self._error)}</div>"
        if vm.message:
            text += f"<div class='vtlab-vm-message' style='white-space:normal'>{html.escape(vm.message)}</div>"
        self.exit_html.value = text
        if root:
            after = self._snapshot()
            if before:
                changed = [f for f in _WATCHED if before.get(f) != after.get(f)]
                items = "".join(f"<li class='vtlab-changed'>{badge('changed', 'changed')} {f.name}: "
                                f"<code>{html.escape(_field_value_text(f, before[f]))}</code> \u2192 "
                                f"<code>{html.escape(_field_value_text(f, after[f]))}</code></li>"
                                for f in changed)
                self.changed_html.value = (f"<b>VMCS fields changed</b> <small>(since before the VM entry)</small>"
                                           f"<ul>{items or '<li>none</li>'}</ul>")
            else:
                self.changed_html.value = ""
            self._entry_snapshot = after
        else:
            self.changed_html.value = ("<b>VMCS fields changed</b>: <i>the guest is running (non-root); "
                                       "the processor writes the VMCS at the next VM exit</i>")
        out = vm.output
        self.output_html.value = f"guest output: <pre>{html.escape(out) or '(nothing yet)'}</pre>"


def _fmt(v) -> str:
    return f"{v:#x}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

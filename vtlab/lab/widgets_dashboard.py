"""The dashboard: a workload, a CPU profile and some controls; exit counts and costs."""
from __future__ import annotations

import html
import io

import ipywidgets as W

from ..arch.controls import CONTROL_INFO, ProcBased
from ..vmm.machine import VirtualMachine
from .widgets_base import _Base, _css, _FlagMap


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

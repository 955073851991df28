"""The dashboard: a workload, a CPU profile and some controls; exit counts and costs.

Fast on purpose (a toggle or a workload switch should answer in well under 300 ms in
the browser): every run is cached by (workload, control settings), every estimate and
drawn panel by (workload, control settings, CPU profile), and the panel is an inline SVG
(:func:`vtlab.analysis.plots.cycles_by_reason_svg`) that the browser draws - no raster
image to render, encode and send per toggle (:meth:`Dashboard.figure` gives the same panel
as a matplotlib Figure at 100 dpi for saving).  While it recomputes, a busy line says so
and the inputs are disabled.
"""
from __future__ import annotations

import html

import ipywidgets as W

from ..arch.controls import CONTROL_INFO, ProcBased
from ..analysis.plots import overhead_text
from ..vmm.machine import VirtualMachine
from ..vmm.state import VmState
from .widgets_base import TEXT_QUIET, _Base, _css, _FlagMap, badge


DASHBOARD_CONTROLS = [ProcBased.HLT_EXITING, ProcBased.UNCOND_IO_EXITING, ProcBased.USE_IO_BITMAPS,
                      ProcBased.RDTSC_EXITING, ProcBased.USE_MSR_BITMAPS, ProcBased.CR3_LOAD_EXITING,
                      ProcBased.INVLPG_EXITING, ProcBased.PAUSE_EXITING]

#: Runs kept (each VM holds a few MB of guest memory), and the prefetch pacing (s).
MAX_RUNS = 40
PREFETCH_DELAY, PREFETCH_STEP = 0.3, 0.005
#: A run's budgets, and the VM exits per prefetch slice.
RUN_EXITS, RUN_INSTRUCTIONS = 20_000, 20_000_000
SLICE_EXITS = 200

#: Width of the dashboard's panel (CSS pixels) and the resolution of :meth:`Dashboard.figure`.
WIDTH = 760
DPI = 100


class Dashboard(_Base):
    """Choose a workload and a CPU profile, flip controls: exit counts and costs update.

    ``timings`` holds the seconds each update took (the last 50), for the curious and
    for the browser test.  With ``prefetch`` (the default) a running kernel uses its idle
    moments to run what the learner may ask for next (each single toggle, each other
    workload), so that those answer from the cache.
    """

    def __init__(self, workload: str | None = None, cpu: str | None = None, controls=DASHBOARD_CONTROLS,
                 prefetch: bool = True):
        from ..analysis import cost
        from . import guests

        self._cost, self._guests = cost, guests
        names = guests.names()
        self.workload = _css(W.Dropdown(options=names, value=workload or names[0], description="workload",
                                        layout=W.Layout(width="20em")), "vtlab-workload")
        profiles = list(cost.PROFILES)
        self.profile = _css(W.Dropdown(options=profiles, value=cpu or cost.DEFAULT_PROFILE, description="CPU",
                                       layout=W.Layout(width="20em")), "vtlab-profile")
        self.toggles = _FlagMap()
        for flag in controls:
            cb = _css(W.Checkbox(description=flag.name, indent=False, layout=W.Layout(width="auto")),
                      "vtlab-dash-control", f"vtlab-dash-{flag.name}")
            cb.tooltip = CONTROL_INFO[flag].description
            self.toggles[flag] = cb
        self.run_button = _css(W.Button(description="run", icon="play", button_style="success"), "vtlab-run")
        self.busy_html = _css(W.HTML(), "vtlab-dashboard-busy")
        self.about_html = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-workload-description")
        self.counts_html = _css(W.HTML(), "vtlab-exit-counts")
        self.summary_html = _css(W.HTML(), "vtlab-cost-summary")
        self.plot = _css(W.HTML(layout=W.Layout(width="100%")), "vtlab-dashboard-plot")
        self.busy = False
        self.vm: VirtualMachine | None = None
        self.estimate = None
        self.timings: list[float] = []
        self._runs: dict[tuple, VirtualMachine] = {}   # (insertion order = LRU order)
        self.prefetch = prefetch
        self._prefetch_generation = 0
        self._panels: dict[tuple, str] = {}
        self._estimates: dict[tuple, object] = {}
        self._defaults: dict[str, dict] = {}
        self._load_defaults()
        for cb in self.toggles.values():
            cb.observe(lambda c: self.update(), names="value")
        self.workload.observe(lambda c: (self._load_defaults(), self.update()), names="value")
        self.profile.observe(lambda c: self.update(rerun=False), names="value")
        self.run_button.on_click(lambda b: self.update(force=True))
        self.widget = _css(W.VBox([
            W.HBox([self.workload, self.profile, self.run_button, self.busy_html]),
            self.about_html,
            W.GridBox(list(self.toggles.values()), layout=W.Layout(grid_template_columns="repeat(4, 1fr)")),
            W.HBox([self.counts_html, self.summary_html], layout=W.Layout(grid_gap="3em")),
            self.plot]), "vtlab-dashboard")
        self.update()

    # ------------------------------------------------------------------ runs
    def _load_defaults(self) -> None:
        info = self._guests.info(self.workload.value)
        words = " ".join(info.description.split())
        exits = f" <i>Exits: {html.escape(' '.join(info.exits.split()))}</i>" if info.exits else ""
        self.about_html.value = (f"<div style='white-space:normal;color:{TEXT_QUIET}'><b>{html.escape(info.name)}</b> "
                                 f"({html.escape(info.mode)} mode): {html.escape(words)}{exits}</div>")
        settings = self._default_settings(self.workload.value)  # (the VMM's set-up for it)
        self.busy = True
        try:
            for (flag, cb), on in zip(self.toggles.items(), settings):
                cb.value = on
        finally:
            self.busy = False

    def _make_vm(self, workload: str | None = None) -> VirtualMachine:
        workload = workload or self.workload.value
        info = self._guests.info(workload)
        return VirtualMachine(self._guests.source(workload), mode=info.mode, load=info.load)

    def _key(self) -> tuple:
        return (self.workload.value, tuple(cb.value for _, cb in self.toggles.items()))

    def _run(self, workload: str, settings: tuple[bool, ...]) -> VirtualMachine:
        vm = self._make_vm(workload)
        for (flag, _), on in zip(self.toggles.items(), settings):
            vm.set_control(flag, on)
        vm.run(max_exits=RUN_EXITS, max_instructions=RUN_INSTRUCTIONS)
        return vm

    def run_workload(self) -> VirtualMachine:
        """Run the workload afresh under the controls as the toggles set them."""
        return self._run(*self._key())

    def _remember(self, key: tuple, vm: VirtualMachine) -> None:
        """Cache a run (the least recently used go first: a VM holds a few MB)."""
        self._runs.pop(key, None)
        self._runs[key] = vm
        while len(self._runs) > MAX_RUNS:
            old = next(iter(self._runs))
            del self._runs[old]
            self._panels = {k: v for k, v in self._panels.items() if k[:2] != old}
            self._estimates = {k: v for k, v in self._estimates.items() if k[:2] != old}

    # ------------------------------------------------------------ prefetching
    def _default_settings(self, workload: str) -> tuple[bool, ...]:
        defaults = self._defaults.get(workload)
        if defaults is None:
            vm = self._make_vm(workload)
            defaults = self._defaults[workload] = {
                (type(flag), int(flag)): vm.control(flag) for flag, _ in self.toggles.items()}
        return tuple(defaults[(type(flag), int(flag))] for flag, _ in self.toggles.items())

    def _prefetch_plan(self) -> list[tuple]:
        """What the learner may ask for next: each single toggle, then each other workload."""
        workload, settings = self._key()
        plan = [(workload, settings[:i] + (not settings[i],) + settings[i + 1:]) for i in range(len(settings))]
        return plan + [(w, None) for w in self._guests.names() if w != workload]

    def _schedule_prefetch(self) -> None:
        """In a running kernel, compute the likely next runs while the notebook is idle.

        One run per turn of the kernel's event loop, so a click waits for at most one
        of them; a new update supersedes the plan.  Outside an event loop (a script, a
        test) nothing is prefetched.
        """
        self._prefetch_generation += 1
        if not self.prefetch:
            return
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(PREFETCH_DELAY, self._prefetch_step, self._prefetch_generation,
                        self._prefetch_plan())

    def _prefetch_step(self, generation: int, plan: list[tuple], partial=None) -> None:
        """One slice of prefetching: at most :data:`SLICE_EXITS` VM exits of one run, so
        that a click arriving meanwhile waits a few milliseconds, not a whole run."""
        if generation != self._prefetch_generation or self.busy:
            return  # superseded by a newer update (or an update is running)
        try:
            if partial is None:
                key = None
                while plan and key is None:
                    workload, settings = plan.pop(0)
                    candidate = (workload, settings if settings is not None else self._default_settings(workload))
                    key = None if candidate in self._runs else candidate
                if key is None:
                    return
                vm = self._make_vm(key[0])
                for (flag, _), on in zip(self.toggles.items(), key[1]):
                    vm.set_control(flag, on)
                partial = (key, vm, 0, 0)
            key, vm, exits, insns = partial
            summary = vm.run(max_exits=min(SLICE_EXITS, RUN_EXITS - exits),
                             max_instructions=RUN_INSTRUCTIONS - insns)
            exits, insns = exits + summary.exits, insns + summary.instructions
            if vm.state is VmState.BUDGET and exits < RUN_EXITS and insns < RUN_INSTRUCTIONS \
                    and "exit budget" in vm.message:
                partial = (key, vm, exits, insns)   # a slice ended: go on next turn
            else:
                partial = None
                if vm.state is not VmState.BUDGET:  # (a whole-run budget: leave it to update)
                    self._remember(key, vm)
        except (Exception, KeyboardInterrupt):  # a guess must never disturb the notebook
            return
        import asyncio

        asyncio.get_running_loop().call_later(PREFETCH_STEP, self._prefetch_step, generation, plan, partial)

    @property
    def exit_counts(self) -> dict[str, int]:
        """Exits per reason of the last run."""
        return {} if self.vm is None else {str(k): int(v) for k, v in self.vm.trace.counts().items()}

    # ---------------------------------------------------------------- display
    def _set_busy(self, on: bool) -> None:
        # Busy line first when starting, last when done: once it is empty, everything is
        # enabled again (a click that follows at once is not lost on a disabled input).
        if on:
            self.busy_html.value = badge("note", "recomputing...", "vtlab-busy")
        for w in [self.workload, self.profile, self.run_button, *self.toggles.values()]:
            w.disabled = on
        if not on:
            self.busy_html.value = ""

    def update(self, rerun: bool = True, force: bool = False) -> None:
        """Re-run (or reuse a cached run of) the workload and redraw counts, costs and plot."""
        if self.busy:
            return
        import time

        start = time.perf_counter()
        self.busy = True
        self._set_busy(True)
        try:
            key = self._key()
            if force or (rerun and key not in self._runs) or self.vm is None:
                self._panels = {k: v for k, v in self._panels.items() if k[:2] != key}
                self._estimates = {k: v for k, v in self._estimates.items() if k[:2] != key}
                self._remember(key, self.run_workload())
            if rerun or self.vm is None:
                self.vm = self._runs[key]
                self._remember(key, self.vm)   # (most recently used)
            self._show(key)
        finally:
            self.busy = False
            self._set_busy(False)
        self.timings = (self.timings + [time.perf_counter() - start])[-50:]
        self._schedule_prefetch()

    def _show(self, key: tuple) -> None:
        panel_key = key + (self.profile.value,)
        est = self._estimates.get(panel_key)
        if est is None:
            est = self._estimates[panel_key] = self._cost.estimate(self.vm.trace, cpu=self.profile.value)
        self.estimate = est
        counts = self.exit_counts
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td class='vtlab-count' data-reason='{html.escape(k)}'>{v}</td></tr>"
                       for k, v in counts.items())
        total = sum(counts.values())
        self.counts_html.value = (f"<b>VM exits: <span class='vtlab-exit-total'>{total}</span></b>"
                                  f"<table>{rows}</table><small>state: {html.escape(self.vm.state.value)}</small>")
        attrs = est.attrs
        pct = attrs.get("overhead_pct", 0)
        # Large overheads as a factor of the native time (x289, not "28,760.8%"), small
        # ones in per cent; the other form in brackets.
        if pct != pct:
            pct_text, factor = "n/a", " (no native instructions counted)"
        elif pct >= 100:
            pct_text, factor = f"&times;{self._cost.slowdown_factor(pct):,.1f} the native time", f" ({pct:,.1f}% over native)"
        else:
            pct_text, factor = html.escape(overhead_text(pct)), f" (&times;{self._cost.slowdown_factor(pct):,.3f} the native time)"
        self.summary_html.value = (
            f"<b>{html.escape(str(attrs.get('profile', self.profile.value)))}</b><br>"
            f"native: {attrs.get('native_cycles', 0):,.0f} cycles<br>"
            f"virtualization: {attrs.get('virtualization_cycles', 0):,.0f} cycles<br>"
            f"overhead: <b class='vtlab-overhead'>{pct_text}</b>{factor}")
        svg = self._panels.get(panel_key)
        if svg is None:
            svg = self._panels[panel_key] = self._draw(est)
        self.plot.value = svg

    def _draw(self, est) -> str:
        """The cycles-by-reason panel as inline SVG (the browser draws it: a toggle costs
        no rasterising, PNG encoding or image transfer; sharp at any zoom)."""
        from ..analysis import plots

        a = est.attrs
        title = (f"{self.workload.value} on {a.get('profile', self.profile.value)}: "
                 f"{a.get('exits', 0):,} exits")
        return plots.cycles_by_reason_svg(est, title=title, width=WIDTH)

    def figure(self):
        """The current run's panel as a matplotlib Figure (to save or print; 100 dpi or more)."""
        from matplotlib.figure import Figure
        from ..analysis import plots

        fig = Figure(figsize=(7.6, 2.8), dpi=DPI, layout="constrained")
        plots.cycles_by_reason(self.estimate, fig.add_subplot())
        return fig

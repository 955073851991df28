"""Render the README's exit-cost figure: docs/cost-breakdown.png.

    python benchmarks/make_cost_figure.py                      (a hand-made mixed trace)
    python benchmarks/make_cost_figure.py --workload serial-poll   (a real run under the VMM)
    python benchmarks/make_cost_figure.py --cpu skylake --out /tmp/x.png

The default trace is hand-made, so the figure does not change when the VMM does: the
exits of a small guest kernel's start-up (CPUID probing, a serial console, firmware
configuration read through a user-space device, MSR and CR set-up, first touches of
memory through EPT, a few timer interrupts), spread over ten million guest
instructions.  ``--workload NAME`` costs a real run of ``vtlab/guests/NAME.asm``
instead (needs ``vtlab.VirtualMachine``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vtlab import cost, plots  # noqa: E402

#: (reason, handler, device, count) of the hand-made trace.
MIX = [
    ("CPUID", "handle_cpuid", None, 400),
    ("IO_INSTRUCTION", "handle_io", "kernel", 1_200),        # serial console at 0x3F8
    ("IO_INSTRUCTION", "handle_io", "userspace", 300),       # fw_cfg at 0x510 (user space)
    ("MSR_READ", "handle_msr_read", None, 200),
    ("MSR_WRITE", "handle_msr_write", None, 100),
    ("CR_ACCESS", "handle_cr_access", None, 150),
    ("EPT_VIOLATION", "handle_ept_violation", None, 250),
    ("EXTERNAL_INTERRUPT", "handle_external_interrupt", None, 50),
]
MIX_INSTRUCTIONS = 10_000_000


def hand_made_trace(seed: int = 4) -> pd.DataFrame:
    """The hand-made trace: MIX's exits in a shuffled order, then a final HLT."""
    rows = [(r, h, d) for r, h, d, n in MIX for _ in range(n)]
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order] + [("HLT", "handle_hlt", None)]
    at = np.linspace(1_000, MIX_INSTRUCTIONS, len(rows)).astype(int)
    return pd.DataFrame({"seq": range(len(rows)), "reason": [r[0] for r in rows],
                         "handler": [r[1] for r in rows], "device": [r[2] for r in rows],
                         "guest_instructions": at})


def workload_trace(name: str):
    from vtlab import guests

    vm = guests.make_vm(name)
    summary = vm.run(max_exits=50_000, max_instructions=20_000_000)
    print(f"{name}: {summary.state.value}, {summary.exits} exits, {vm.trace.instructions_total:,} instructions")
    return vm.trace


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", help="cost a real run of this vtlab/guests workload instead")
    parser.add_argument("--cpu", default=cost.DEFAULT_PROFILE, choices=list(cost.PROFILES))
    parser.add_argument("--use", default="mid", choices=["low", "mid", "high"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "cost-breakdown.png")
    args = parser.parse_args(argv)

    trace = workload_trace(args.workload) if args.workload else hand_made_trace()
    fig = plots.cycle_breakdown(trace, cpu=args.cpu, use=args.use)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    s = cost.summary(trace, cpu=args.cpu, use=args.use)
    print(f"{args.out}: {s['exits']:,} exits, {s['instructions']:,} instructions, "
          f"overhead {s['overhead_pct']:.1f}% on {s['profile']} ('{args.use}' costs)")
    return args.out


if __name__ == "__main__":
    main()

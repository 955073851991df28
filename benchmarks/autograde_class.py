#!/usr/bin/env python3
"""How many submissions per minute tools/autograde.py grades on this machine.

A class of 40 students x the 4 assignments of course/source/ = 160 submissions, made from
the learner versions (nbgrader's generate_assignment of each source) and the sources'
own solutions, in a mix: a third blank (the untouched learner version), a third complete
(every answer cell holds the source's solution), a third partial (the first half of the
answer cells solved). Each class is graded with JOBS=1 and JOBS=2, in a temporary course
folder (nothing is written into the repository)::

    .venv/bin/python benchmarks/autograde_class.py                 # 4 x 40, JOBS=1 and 2
    .venv/bin/python benchmarks/autograde_class.py --students 3    # a subset: 4 x 3
    .venv/bin/python benchmarks/autograde_class.py --jobs 2 --container never

With ``--students`` below 40 it grades that many per assignment and also prints what the
measured rate means for 160 submissions (an extrapolation, and said to be one).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import autograde  # noqa: E402

_MARKER = re.compile(r"\s*### (BEGIN|END) SOLUTION\s*$")


def _text(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def solutions(source: dict) -> dict[str, str]:
    """grade_id -> the source's answer with nbgrader's solution markers taken out."""
    out = {}
    for cell in source["cells"]:
        m = cell.get("metadata", {}).get("nbgrader", {})
        if m.get("solution"):
            out[m["grade_id"]] = "\n".join(ln for ln in _text(cell).split("\n") if not _MARKER.match(ln))
    return out


def submission(learner: dict, answers: dict[str, str], kind: str) -> dict:
    """A learner's notebook: ``blank``, ``full`` or ``partial`` (first half answered)."""
    nb = copy.deepcopy(learner)
    ids = [c["metadata"]["nbgrader"]["grade_id"] for c in nb["cells"]
           if c.get("metadata", {}).get("nbgrader", {}).get("solution")]
    chosen = {"blank": [], "full": ids, "partial": ids[: len(ids) // 2]}[kind]
    for cell in nb["cells"]:
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if gid in chosen and gid in answers:
            cell["source"] = answers[gid]
    return nb


def build_class(course: Path, students: int, names: list[str]) -> Path:
    """Lay out the course and write students x assignments submissions; returns their folder."""
    c = autograde.Course(course, log=lambda s: None)
    subs = course.parent / "submitted"
    kinds = ["blank", "full", "partial"]
    for name in names:
        c.ensure_assignment(name)
        learner = json.loads(json.dumps(__import__("nbformat").read(c.release(name), as_version=4)))
        answers = solutions(json.loads(json.dumps(__import__("nbformat").read(c.source(name), as_version=4))))
        for i in range(students):
            kind = kinds[i % 3]
            d = subs / f"s{i:02d}_{kind}" / name
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{name}.ipynb").write_text(json.dumps(submission(learner, answers, kind)), encoding="utf-8")
    return subs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--students", type=int, default=40, help="submissions per assignment (default 40)")
    ap.add_argument("--jobs", default="1,2", help="comma-separated JOBS values (default 1,2)")
    ap.add_argument("--container", choices=["auto", "never", "always"], default="auto")
    ap.add_argument("--assignment", action="append", default=None, help="only these (default: all of course/source)")
    args = ap.parse_args(argv)
    src_root = REPO / "course" / "source"
    names = args.assignment or sorted(p.name for p in src_root.iterdir() if (p / f"{p.name}.ipynb").is_file()) \
        if src_root.is_dir() else []
    if not names:
        print(f"autograde_class: no assignments in {src_root}", file=sys.stderr)
        return 1
    total = args.students * len(names)
    print(f"autograde_class: {len(names)} assignments x {args.students} submissions = {total} "
          f"({', '.join(names)}); mode: {autograde.isolation_mode(args.container)}")
    rates = {}
    for jobs in [int(j) for j in args.jobs.split(",")]:
        with tempfile.TemporaryDirectory(prefix="vtlab-bench-") as tmp:
            course = Path(tmp) / "course"
            for name in names:
                shutil.copytree(src_root / name, course / "source" / name,
                                ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
            subs = build_class(course, args.students, names)
            found = autograde.find_submissions(subs)
            t0 = time.monotonic()
            results = autograde.grade_class(course, found, jobs=jobs, container=args.container,
                                            progress=lambda s: print("  " + s, flush=True))
            minutes = (time.monotonic() - t0) / 60
        rates[jobs] = len(results) / minutes
        bad = sum(r.status != "ok" for r in results)
        print(f"JOBS={jobs}: {len(results)} submissions in {minutes * 60:.0f} s = {rates[jobs]:.1f} per minute"
              f" ({bad} not ok)", flush=True)
        if total != 160:
            print(f"JOBS={jobs}: extrapolated, 160 submissions would take about {160 / rates[jobs]:.0f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

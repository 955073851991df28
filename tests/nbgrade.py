"""The nbgrader course machinery shared by tests/test_nbgrader.py and
tests/test_learner_versions.py: build a course of its own for one instructor notebook,
generate its student version and autograde a few submissions, once per test session.

Not a test module (no ``test_`` prefix): the test modules import it (tests/ is on
sys.path, tests/conftest.py).
"""

from __future__ import annotations

import copy
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import nbgrader_course as course  # noqa: E402

SOURCE_DIR = REPO / "course" / "source"
LEARNER_DIR = REPO / "notebooks"
FIXTURE = REPO / "tests" / "fixtures" / "nbgrader_sample.ipynb"

#: assignment name -> instructor source course/source/<a>/<a>.ipynb
COURSE_SOURCES = course.find_assignments(SOURCE_DIR) if SOURCE_DIR.is_dir() else {}
COURSE_NOTEBOOKS = list(COURSE_SOURCES.values())
CASES = COURSE_NOTEBOOKS + [FIXTURE]
IDS = [p.stem for p in CASES]

# Per-cell timeout while autograding/validating in these tests. A course notebook runs
# top to bottom in well under a minute, so a cell that takes this long is a hang.
CELL_TIMEOUT = 60

#: Every graded case gets these submissions: the instructor's solutions pasted into the
#: student version, the untouched learner version (for a course assignment the committed
#: notebooks/<a>.ipynb, else the fresh release), and only the first answer filled in.
STUDENTS = ("full", "blank", "partial")

#: Submissions that take a shortcut the exercise forbids: all solutions pasted, except
#: that the answer cell *grade_id* calls the vtlab helper that does the exercise. They are
#: graded with the others (student "wrapper"); tests/test_learner_versions.py checks the
#: test cell gives them nothing. assignment -> (answer grade_id, test grade_id, source).
WRAPPERS = {
    "03_vmcs": ("ex03_decode", "ex03_decode_tests", """\
def decode(encoding: int) -> dict:
    ref = decode_encoding(encoding)
    return {"access": ref.access_type.name.lower(), "index": ref.index,
            "type": ref.type.name.lower().replace("_", " "),
            "width": {"BIT16": 16, "BIT32": 32, "BIT64": 64}.get(ref.width.name, "natural")}
"""),
    "04_exits": ("ex04_decode", "ex04_decode_tests", """\
def decode_io(qualification: int) -> dict:
    r = IoQualification.decode(qualification)
    return {"port": r.port, "size": r.size, "direction": r.direction.name, "string": r.string,
            "rep": r.rep, "immediate": r.immediate}
"""),
    "05_memory": ("ex05_decode", "ex05_decode_tests", """\
from vtlab.arch.qualifications import EptViolationQualification


def decode_violation(q: int) -> dict:
    r = EptViolationQualification.decode(q)
    return {"access": r.access, "allowed": r.permissions, "linear_valid": r.gla_valid,
            "on_paging_structure": r.gla_valid and not r.gla_translation}
"""),
    "06_events": ("ex06_decode_answer", "ex06_decode_tests", """\
def decode_intr_info(value):
    r = IntrInfo.decode(value)
    return {"valid": r.valid, "type": int(r.type), "vector": r.vector, "error_code": r.deliver_error_code}
"""),
}


SOLUTION_DELIMS = ("BEGIN SOLUTION", "END SOLUTION")
HIDDEN_DELIMS = ("BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
STUB_LINES = {"# YOUR CODE HERE", "raise NotImplementedError()", "YOUR ANSWER HERE"}


# --------------------------------------------------------------------------- helpers


def nbg(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_solution(cell) -> bool:
    return bool(nbg(cell).get("solution"))


def is_grade(cell) -> bool:
    return bool(nbg(cell).get("grade"))


def split_regions(source: str, begin: str, end: str) -> tuple[list[list[str]], list[str]]:
    """(regions, outside lines) of *source*, delimited the way nbgrader does it
    (a line containing *begin* opens a region, one containing *end* closes it)."""
    regions, outside, current = [], [], None
    for line in source.split("\n"):
        if begin in line:
            current = []
        elif end in line and current is not None:
            regions.append(current)
            current = None
        elif current is not None:
            current.append(line)
        else:
            outside.append(line)
    return regions, outside


def protected_text(instructor) -> tuple[list[str], list[str]]:
    """Lines (stripped) that are solution or hidden-test text and nothing else, and the
    full text of each region. A line that also appears outside every region of the
    instructor notebook (e.g. a ``return True`` the template already has) is not
    protected: the student version legitimately contains it."""
    inside, outside, blocks = [], set(), []
    for cell in instructor.cells:
        src = cell.source
        sol_regions, rest = split_regions(src, *SOLUTION_DELIMS)
        hidden_regions, rest = split_regions("\n".join(rest), *HIDDEN_DELIMS)
        for region in sol_regions + hidden_regions:
            inside.extend(region)
            text = "\n".join(region).strip()
            if text:
                blocks.append(text)
        outside.update(line.strip() for line in rest)
    lines = sorted({l.strip() for l in inside} - outside - STUB_LINES - {""})
    outside_text = "\n".join(sorted(outside))
    blocks = [b for b in blocks if b not in outside_text]
    return lines, blocks


def cell_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        parts.append(cell.source)
        for out in cell.get("outputs", []):
            parts.append(json.dumps(out))
    return "\n".join(parts)


def submission_from(student, instructor, grade_ids=None):
    """The student version with the instructor's source pasted into the answer cells
    whose grade_id is in *grade_ids* (all answer cells if None)."""
    by_id = {nbg(c)["grade_id"]: c for c in instructor.cells if is_solution(c)}
    nb = copy.deepcopy(student)
    for cell in nb.cells:
        gid = nbg(cell).get("grade_id")
        if is_solution(cell) and (grade_ids is None or gid in grade_ids):
            cell.source = by_id[gid].source
    return nb


def read_csv(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as f:
        return {(row["assignment"], row["student_id"]): row for row in csv.DictReader(f)}


def cell_grades(cfg, name: str, student: str) -> dict[str, tuple[float, float]]:
    from nbgrader.api import Gradebook

    cd = course._coursedir(cfg)
    with Gradebook(cd.db_url, cd.course_id) as gb:
        sub = gb.find_submission_notebook(name, name, student)
        return {g.name: (g.score, g.max_score) for g in sub.grades}


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Graded:
    name: str
    path: Path
    cfg: object
    root: Path
    instructor: nbformat.NotebookNode
    student: nbformat.NotebookNode
    release_path: Path
    failures: list
    csv_rows: dict
    cells: dict = field(default_factory=dict)  # student -> grade_id -> (score, max)
    first_answer: str = ""
    first_test: str = ""
    blank_from: Path | None = None

    @property
    def max_points(self) -> float:
        return float(sum(nbg(c).get("points", 0) for c in self.instructor.cells if is_grade(c)))

    @property
    def students(self) -> list[str]:
        return sorted(self.cells) if self.cells else list(STUDENTS)

    def score(self, student: str) -> tuple[float, float]:
        row = self.csv_rows[(self.name, student)]
        return float(row["score"]), float(row["max_score"])

    def autograded(self, student: str) -> nbformat.NotebookNode:
        return nbformat.read(self.root / "autograded" / student / self.name / f"{self.name}.ipynb", as_version=4)


def build_graded(path: Path, base: Path) -> Graded:
    """Generate the student version of the instructor notebook *path* in a course of its
    own under *base* and autograde the STUDENTS submissions (plus WRAPPERS' one)."""
    name = path.stem
    cfg = course.load_config(base / "course", timeout=CELL_TIMEOUT)
    release_path = course.generate(cfg, {name: path})[name]

    instructor = nbformat.read(path, as_version=4)
    student = nbformat.read(release_path, as_version=4)
    answers = [c for c in instructor.cells if is_solution(c)]
    assert answers, f"{path.name}: no answer cells (nbgrader metadata solution: true)"
    first_answer = nbg(answers[0])["grade_id"]
    first_index = next(i for i, c in enumerate(instructor.cells) if nbg(c).get("grade_id") == first_answer)
    first_test = next((nbg(c)["grade_id"] for c in instructor.cells[first_index:] if is_grade(c)), "")

    # the untouched learner version: what learners really get, when there is one
    learner = LEARNER_DIR / f"{name}.ipynb"
    blank_from = learner if COURSE_SOURCES.get(name) == path and learner.exists() else None
    subs = base / "submissions"
    submissions = {
        "full": submission_from(student, instructor),
        "blank": nbformat.read(blank_from, as_version=4) if blank_from else copy.deepcopy(student),
        "partial": submission_from(student, instructor, {first_answer}),
    }
    if name in WRAPPERS:
        answer_id, _test_id, wrapper = WRAPPERS[name]
        nb = submission_from(student, instructor)
        for cell in nb.cells:
            if nbg(cell).get("grade_id") == answer_id:
                cell.source = wrapper
        submissions["wrapper"] = nb
    for who, nb in submissions.items():
        out = subs / who / name / f"{name}.ipynb"
        out.parent.mkdir(parents=True)
        nbformat.write(nb, out)

    pairs = course.collect(cfg, subs)
    failures = course.autograde(cfg, pairs, path.parent)
    csv_path = course.export_csv(cfg, base / "course" / "grades.csv")
    g = Graded(
        name=name,
        path=path,
        cfg=cfg,
        root=base / "course",
        instructor=instructor,
        student=student,
        release_path=release_path,
        failures=failures,
        csv_rows=read_csv(csv_path),
        first_answer=first_answer,
        first_test=first_test,
        blank_from=blank_from,
    )
    if not failures:
        g.cells = {who: cell_grades(cfg, name, who) for who in submissions}
    return g


_GRADED: dict[Path, Graded] = {}


def graded_once(path: Path, tmp_path_factory) -> Graded:
    """build_graded(path), once per test session: tests/test_nbgrader.py and
    tests/test_learner_versions.py share the (minutes-long) autograde runs."""
    path = Path(path).resolve()
    if path not in _GRADED:
        _GRADED[path] = build_graded(path, tmp_path_factory.mktemp(f"nbgrader-{path.stem}"))
    return _GRADED[path]
